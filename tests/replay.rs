//! Issue 5, replay: `proxy-channel replay` sends each recorded device
//! connection again on a connection of its own, exactly the recorded device
//! bytes in order, with `--concurrency` connections at once and, with
//! `--speed`, the recorded pace; replies are counted; a connection whose
//! bytes were not all stored is skipped and reported, never sent with a gap;
//! a refused target fails the run (exit 1); bad input gives one clear
//! message and the documented exit status.
//!
//! Recordings come from a real daemon in store mode (no target) where the
//! test is about what the daemon writes, and from lines written by the test
//! where exact times and peers matter.

mod util;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use serde_json::Value;
use util::*;

/// Runs `proxy-channel replay --target TARGET ARGS` to its end.
fn replay(target: &str, args: &[&str]) -> Finished {
    let mut all = vec!["replay", "--target", target];
    all.extend(args);
    run_to_exit(&all, &[], secs(30))
}

/// The summary line replay ends with.
fn summary(replayed: usize, sent: usize, replies: usize, failed: usize, skipped: usize) -> String {
    format!(
        "replayed {replayed} connections ({sent} bytes sent, {replies} bytes of replies), \
         {failed} failed, {skipped} skipped"
    )
}

/// Fails unless the run exited with `code` and its stderr is exactly
/// `lines` (in any order, the summary last).
fn assert_outcome(what: &str, run: &Finished, code: i32, lines: &[String]) {
    assert_eq!(
        run.status.code(),
        Some(code),
        "{what}: expected exit {code}, saw {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    let seen: Vec<&str> = run.stderr.lines().collect();
    let (expected_summary, expected_rest) = lines.split_last().expect("a summary line");
    assert_eq!(
        seen.last().copied(),
        Some(expected_summary.as_str()),
        "{what}: the summary line; stderr:\n{}",
        run.stderr
    );
    let seen_rest: BTreeSet<&str> = seen[..seen.len() - 1].iter().copied().collect();
    let expected_rest: BTreeSet<&str> = expected_rest.iter().map(String::as_str).collect();
    assert_eq!(
        seen_rest, expected_rest,
        "{what}: the lines before the summary; stderr:\n{}",
        run.stderr
    );
    assert!(
        seen.len() == lines.len() && run.stdout.is_empty(),
        "{what}: expected {} stderr lines and no stdout, saw stderr:\n{}\nstdout:\n{}",
        lines.len(),
        run.stderr,
        run.stdout
    );
}

/// What each connection the target accepted received, once all are done.
fn received_by(target: &Target, connections: usize) -> Vec<Vec<u8>> {
    let conns = target.wait_connections(connections, secs(10));
    assert_eq!(
        conns.len(),
        connections,
        "target {}: connections accepted",
        target.address()
    );
    conns
        .iter()
        .map(|conn| {
            conn.wait_done(secs(10));
            assert!(
                conn.eof() && conn.error().is_none(),
                "the replayed connection from {} must end with an end of stream, saw error {:?}",
                conn.peer,
                conn.error()
            );
            conn.received()
        })
        .collect()
}

// ---------------------------------------------------------------- recording

/// A device recorded by the daemon: its ident and the bytes it sent.
struct Recorded {
    ident: String,
    bytes: Vec<u8>,
}

/// Waits until the daemon has stored `total` source-0 bytes of `ident`
/// (counting sizes, also of payloads stored without hex).
fn wait_stored(log: &mut MessageLog, ident: &str, total: usize) {
    log.wait_for(
        secs(5),
        &format!("{total} stored bytes of {ident}"),
        |log| {
            log.select(ident, 0, 0)
                .iter()
                .map(|m| number(m, "proxy.payload.size"))
                .sum::<u64>()
                >= total as u64
        },
    );
}

/// Connects a device, sends `pieces` one by one (each waited for in the
/// file, so each is a packet of its own), closes its side and waits for its
/// event 2.
fn record_device(daemon: &Daemon, pieces: &[&[u8]]) -> Recorded {
    let mut device = Device::connect(daemon.addr());
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    let mut bytes = Vec::new();
    for piece in pieces {
        device.send(piece);
        bytes.extend_from_slice(piece);
        wait_stored(&mut log, &ident, bytes.len());
    }
    device.shutdown_write();
    let end = device.read_until_end(secs(5)).end;
    assert_eq!(
        end,
        End::Eof,
        "device {}: the daemon's close",
        device.name()
    );
    log.wait_reason(&ident, 0, secs(5));
    Recorded { ident, bytes }
}

/// Device `index`'s bytes: random, 16 bytes naming the device first.
fn device_bytes(index: usize) -> Vec<u8> {
    let mut bytes = random_bytes(500 + index as u64, 3000 + index * 2500);
    bytes[..16].copy_from_slice(format!("replay-device-{index:02}").as_bytes());
    bytes
}

#[test]
fn every_recorded_connection_is_replayed_byte_for_byte_with_concurrency_1_and_8() {
    const DEVICES: usize = 12;
    let daemon = Daemon::start(&[]);
    let recorded: Vec<Recorded> = thread::scope(|scope| {
        let daemon = &daemon;
        let devices: Vec<_> = (0..DEVICES)
            .map(|index| {
                scope.spawn(move || {
                    let bytes = device_bytes(index);
                    let n = bytes.len();
                    let cuts = [0, n / 5, n / 2, n * 3 / 4, n];
                    let pieces: Vec<&[u8]> = cuts.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
                    record_device(daemon, &pieces)
                })
            })
            .collect();
        devices
            .into_iter()
            .map(|d| d.join().expect("device thread"))
            .collect()
    });
    let mut log = daemon.log();
    log.refresh();
    log.assert_well_formed();
    for device in &recorded {
        assert!(
            log.select(&device.ident, 0, 0).len() >= 4,
            "device {}: expected at least 4 data messages, saw {}",
            device.ident,
            log.select(&device.ident, 0, 0).len()
        );
        assert_same_bytes(
            &format!("the stored bytes of {}", device.ident),
            &device.bytes,
            &log.payload(&device.ident, 0),
        );
    }
    let total: usize = recorded.iter().map(|d| d.bytes.len()).sum();
    let dir = daemon.data_dir().to_str().unwrap();

    for concurrency in ["1", "8"] {
        let target = Target::start(Behaviour::ReplyAtEof(b"ack\n".to_vec()));
        let run = replay(&target.address(), &["--concurrency", concurrency, dir]);
        let what = format!("replay --concurrency {concurrency}");
        assert_outcome(
            &what,
            &run,
            0,
            &[summary(DEVICES, total, 4 * DEVICES, 0, 0)],
        );
        let received = received_by(&target, DEVICES);
        let mut unseen: Vec<&Recorded> = recorded.iter().collect();
        for bytes in &received {
            let at = unseen
                .iter()
                .position(|d| bytes.len() >= 16 && d.bytes[..16] == bytes[..16])
                .unwrap_or_else(|| {
                    panic!(
                        "{what}: a connection whose first bytes {:?} are no recorded device's \
                         that is still unseen",
                        String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
                    )
                });
            let device = unseen.remove(at);
            assert_same_bytes(
                &format!("{what}: the bytes replayed for {}", device.ident),
                &device.bytes,
                bytes,
            );
        }
    }
    daemon.assert_no_errors();
}

// ---------------------------------------------------------------- written recordings

/// One message line; `extra` is appended inside the object.
fn line(ident: &str, peer: &str, event: u8, time: f64, extra: &str) -> String {
    format!(
        r#"{{"channel.id":1,"protocol.id":0,"ident":"{ident}","peer":"{peer}","proxy.event":{event},"proxy.source":0{extra},"server.timestamp":{time:.6},"timestamp":{time:.6}}}"#
    )
}

/// A recorded device connection: connect at `start`, one packet per second
/// after it, then the drop.
fn connection(ident: &str, peer: &str, start: f64, packets: &[&[u8]]) -> Vec<String> {
    let mut lines = vec![line(ident, peer, 1, start, "")];
    let mut total = 0;
    for (i, packet) in packets.iter().enumerate() {
        let extra = format!(
            r#","proxy.payload.size":{},"proxy.payload.hex":"{}""#,
            packet.len(),
            hex::encode(packet)
        );
        lines.push(line(ident, peer, 0, start + 1.0 + i as f64, &extra));
        total += packet.len();
    }
    let extra = format!(
        r#","proxy.reason":"closed by peer","proxy.bytes.received":{total},"proxy.bytes.sent":0"#
    );
    lines.push(line(
        ident,
        peer,
        2,
        start + 1.0 + packets.len() as f64,
        &extra,
    ));
    lines
}

/// 2026-11-18T11:06:40Z.
const T0: f64 = 1_795_000_000.0;
const X: &str = "1111111111111111";
const Y: &str = "2222222222222222";
const Z: &str = "3333333333333333";

/// Three recorded connections, lines interleaved as a daemon writes them.
fn three_connections() -> Vec<String> {
    let x = connection(X, "10.0.0.1:4000", T0, &[b"x-one;", b"x-two;"]);
    let y = connection(Y, "10.0.0.1:4001", T0 + 10.0, &[b"y-one;"]);
    let z = connection(Z, "[2001:db8::2]:4000", T0 + 20.0, &[b"z-one;", b"z-two;"]);
    let mut lines = Vec::new();
    lines.extend_from_slice(&x[..2]);
    lines.extend_from_slice(&y[..1]);
    lines.extend_from_slice(&x[2..]);
    lines.extend_from_slice(&y[1..]);
    lines.extend(z);
    lines
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(path, lines.join("\n") + "\n").expect("write a recording");
}

#[test]
fn filters_choose_connections_by_ident_peer_and_start() {
    let dir = tempfile::tempdir().unwrap();
    write_lines(&dir.path().join("messages.jsonl"), &three_connections());
    let folder = dir.path().to_str().unwrap();
    let x = b"x-one;x-two;".to_vec();
    let y = b"y-one;".to_vec();
    let z = b"z-one;z-two;".to_vec();
    // --since and --until look at a connection's start: X's packets come
    // after T0+1 but X started before it.
    let cases: Vec<(Vec<&str>, Vec<&Vec<u8>>)> = vec![
        (vec![], vec![&x, &y, &z]),
        (vec!["--ident", Y], vec![&y]),
        (vec!["--ident", "2222222222222222"], vec![&y]),
        (vec!["--peer", "10.0.0.1"], vec![&x, &y]),
        (vec!["--peer", "10.0.0.1:4001"], vec![&y]),
        (vec!["--peer", "2001:db8::2"], vec![&z]),
        (vec!["--since", "2026-11-18T11:06:50Z"], vec![&y, &z]),
        (vec!["--until", "2026-11-18T11:06:50Z"], vec![&x]),
        (vec!["--since", "2026-11-18T11:06:41Z"], vec![&y, &z]),
        (
            vec!["--peer", "10.0.0.1", "--since", "2026-11-18T11:06:45Z"],
            vec![&y],
        ),
        (vec!["--ident", "4444444444444444"], vec![]),
    ];
    for (options, expected) in cases {
        let target = Target::start(Behaviour::Record);
        let mut args = options.clone();
        args.push(folder);
        let run = replay(&target.address(), &args);
        let sent = expected.iter().map(|b| b.len()).sum();
        assert_outcome(
            &format!("replay {options:?}"),
            &run,
            0,
            &[summary(expected.len(), sent, 0, 0, 0)],
        );
        let received: BTreeSet<Vec<u8>> =
            received_by(&target, expected.len()).into_iter().collect();
        let expected: BTreeSet<Vec<u8>> = expected.into_iter().cloned().collect();
        assert_eq!(
            received, expected,
            "replay {options:?}: the connections' bytes at the target"
        );
    }
}

#[test]
fn concurrency_n_keeps_n_connections_open_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..12)
        .flat_map(|i| {
            let ident = format!("{:016x}", 0xa000 + i);
            connection(&ident, "127.0.0.1:40000", T0 + i as f64, &[b"hello"])
        })
        .collect();
    write_lines(&dir.path().join("messages.jsonl"), &lines);
    let folder = dir.path().to_str().unwrap().to_string();

    for concurrency in [8usize, 1] {
        // The target takes connections but reads nothing until the gate
        // opens, so each replayed connection stays open until then.
        let gate = Arc::new(AtomicBool::new(false));
        let target = Target::start(Behaviour::Gated(Arc::clone(&gate)));
        let address = target.address();
        let folder = folder.clone();
        let count = concurrency.to_string();
        let run = thread::spawn(move || {
            replay(
                &address,
                &["--concurrency", &count, "--wait", "20s", &folder],
            )
        });
        target.wait_connections(concurrency, secs(10));
        let more = poll_until(millis(300), || target.connections().len() > concurrency);
        assert!(
            !more,
            "--concurrency {concurrency}: expected {concurrency} connections open at once, saw {}",
            target.connections().len()
        );
        gate.store(true, Ordering::SeqCst);
        let run = run.join().expect("replay thread");
        assert_outcome(
            &format!("replay --concurrency {concurrency}"),
            &run,
            0,
            &[summary(12, 60, 0, 0, 0)],
        );
        let received = received_by(&target, 12);
        assert!(
            received.iter().all(|b| b == b"hello"),
            "every connection must carry hello"
        );
    }
}

// ---------------------------------------------------------------- --speed

/// A one-connection target that notes when each read arrived.
struct ArrivalTarget {
    addr: SocketAddr,
    thread: Option<JoinHandle<Vec<(Instant, usize)>>>,
}

impl ArrivalTarget {
    fn start() -> ArrivalTarget {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a target");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + secs(20);
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if is_timeout(&e) && Instant::now() < deadline => {
                        thread::sleep(millis(1))
                    }
                    Err(e) => panic!("the timing target accepted nothing: {e}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(millis(100))).unwrap();
            // (when, bytes so far) after each read.
            let mut arrivals = Vec::new();
            let mut total = 0;
            let mut buffer = [0u8; 4096];
            while Instant::now() < deadline {
                match stream.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n;
                        arrivals.push((Instant::now(), total));
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => panic!("the timing target's read failed: {e}"),
                }
            }
            arrivals
        });
        ArrivalTarget {
            addr,
            thread: Some(thread),
        }
    }

    /// When the byte at each of `offsets` arrived.
    fn arrival_of(mut self, offsets: &[usize]) -> Vec<Instant> {
        let arrivals = self.thread.take().unwrap().join().expect("timing target");
        offsets
            .iter()
            .map(|&offset| {
                arrivals
                    .iter()
                    .find(|(_, total)| *total > offset)
                    .unwrap_or_else(|| {
                        panic!("byte {offset} never arrived; arrivals: {arrivals:?}")
                    })
                    .0
            })
            .collect()
    }
}

#[test]
fn speed_keeps_the_recorded_gaps_scaled() {
    let daemon = Daemon::start(&[]);
    let packets: [&[u8]; 3] = [b"packet one;", b"packet two;", b"packet three;"];
    let mut device = Device::connect(daemon.addr());
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    for (i, packet) in packets.iter().enumerate() {
        if i > 0 {
            // The deliberate pacing this test is about.
            thread::sleep(millis(200));
        }
        device.send(packet);
    }
    device.shutdown_write();
    assert_eq!(
        device.read_until_end(secs(5)).end,
        End::Eof,
        "the daemon's close"
    );
    log.wait_reason(&ident, 0, secs(5));
    let data: Vec<&Value> = log.select(&ident, 0, 0);
    let stored: Vec<Vec<u8>> = data
        .iter()
        .map(|m| hex::decode(text(m, "proxy.payload.hex")).unwrap())
        .collect();
    assert_eq!(
        stored,
        packets.map(<[u8]>::to_vec),
        "each write must be stored as a packet of its own"
    );
    let times: Vec<f64> = data
        .iter()
        .map(|m| m["server.timestamp"].as_f64().unwrap())
        .collect();
    let recorded_gaps = [times[1] - times[0], times[2] - times[1]];
    for gap in recorded_gaps {
        assert!(
            (0.18..0.3).contains(&gap),
            "the recording's gaps should be about 200 ms, saw {recorded_gaps:?}"
        );
    }
    let offsets = [0, packets[0].len(), packets[0].len() + packets[1].len()];
    let dir = daemon.data_dir().to_str().unwrap().to_string();

    // Replays at speed 1, at speed 2 and as fast as possible, at once.
    let runs: Vec<_> = [Some("1"), Some("2"), None]
        .into_iter()
        .map(|speed| {
            let target = ArrivalTarget::start();
            let address = target.addr.to_string();
            let dir = dir.clone();
            let run = thread::spawn(move || match speed {
                Some(speed) => replay(&address, &["--speed", speed, &dir]),
                None => replay(&address, &[&dir]),
            });
            (speed, target, run)
        })
        .collect();
    for (speed, target, run) in runs {
        let run = run.join().expect("replay thread");
        let what = format!("replay --speed {speed:?}");
        assert_outcome(&what, &run, 0, &[summary(1, 35, 0, 0, 0)]);
        let arrived = target.arrival_of(&offsets);
        let gaps = [
            (arrived[1] - arrived[0]).as_secs_f64(),
            (arrived[2] - arrived[1]).as_secs_f64(),
        ];
        match speed {
            Some(speed) => {
                let speed: f64 = speed.parse().unwrap();
                for (seen, recorded) in gaps.iter().zip(recorded_gaps) {
                    let wanted = recorded / speed;
                    assert!(
                        (seen - wanted).abs() <= 0.2 * wanted,
                        "{what}: a recorded gap of {recorded:.3} s should take {wanted:.3} s \
                         within 20%, took {seen:.3} s (gaps {gaps:?})"
                    );
                }
            }
            None => assert!(
                gaps[0] + gaps[1] < 0.1,
                "{what}: without --speed the packets should follow at once, gaps {gaps:?}"
            ),
        }
    }
}

// ---------------------------------------------------------------- gaps

#[test]
fn a_connection_with_a_packet_over_max_payload_is_skipped_never_sent() {
    let daemon = Daemon::start(&[("PROXY_MAX_PAYLOAD", "100")]);
    let whole = record_device(&daemon, &[&[b'w'; 50], &[b'w'; 50], &[b'w'; 50]]);
    let big = random_bytes(77, 1000);
    let gapped = record_device(&daemon, &[&[b'g'; 50], &big, &[b'g'; 50]]);
    let mut log = daemon.log();
    log.refresh();
    let unstored: Vec<u64> = log
        .select(&gapped.ident, 0, 0)
        .iter()
        .filter(|m| m.get("proxy.payload.hex").is_none())
        .map(|m| number(m, "proxy.payload.size"))
        .collect();
    assert!(
        !unstored.is_empty() && unstored.iter().all(|&size| size > 100),
        "the 1000-byte write must be stored without its payload, saw sizes {unstored:?}:\n{}",
        log.summary()
    );

    let target = Target::start(Behaviour::Record);
    let run = replay(&target.address(), &[daemon.data_dir().to_str().unwrap()]);
    assert_outcome(
        "replay of a connection with an unstored packet",
        &run,
        0,
        &[
            format!(
                "proxy-channel replay: {}: skipped: a packet of {} B was stored without its payload",
                gapped.ident, unstored[0]
            ),
            summary(1, 150, 0, 0, 1),
        ],
    );
    let received = received_by(&target, 1);
    assert_eq!(
        received,
        [whole.bytes],
        "only the whole connection is replayed"
    );
}

#[test]
fn a_connection_recorded_with_store_off_is_skipped() {
    let daemon = Daemon::start(&[("PROXY_STORE", "false")]);
    let mut device = Device::connect(daemon.addr());
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    device.send(&[b's'; 500]);
    device.shutdown_write();
    assert_eq!(
        device.read_until_end(secs(5)).end,
        End::Eof,
        "the daemon's close"
    );
    log.wait_reason(&ident, 0, secs(5));
    assert_eq!(
        number(log.dropped(&ident, 0).unwrap(), "proxy.bytes.received"),
        500,
        "bytes received in the device's event 2"
    );

    let target = Target::start(Behaviour::Record);
    let run = replay(&target.address(), &[daemon.data_dir().to_str().unwrap()]);
    assert_outcome(
        "replay of a connection recorded with store off",
        &run,
        0,
        &[
            format!(
                "proxy-channel replay: {ident}: skipped: 0 of its 500 bytes were stored \
                 (store mode off?)"
            ),
            summary(0, 0, 0, 0, 1),
        ],
    );
    assert!(
        target.connections().is_empty(),
        "nothing may be sent for a skipped connection"
    );
}

#[test]
fn a_connection_across_a_rotation_is_replayed_whole_and_skipped_without_its_start() {
    let daemon = Daemon::start(&[("PROXY_ROTATE_SIZE", "1GiB")]);
    let first_part = random_bytes(91, 4000);
    let second_part = random_bytes(92, 3000);
    let mut spanning = Device::connect(daemon.addr());
    let mut log = daemon.log();
    let spanning_ident = log.wait_ident(spanning.name(), secs(5));
    spanning.send(&first_part);
    wait_stored(&mut log, &spanning_ident, first_part.len());

    daemon.signal(libc::SIGHUP);
    wait_until(secs(5), "a rotated file after SIGHUP", || {
        fs::read_dir(daemon.data_dir()).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("messages-")
        })
    });
    spanning.send(&second_part);
    spanning.shutdown_write();
    assert_eq!(
        spanning.read_until_end(secs(5)).end,
        End::Eof,
        "the daemon's close"
    );
    // The current file starts after the rotation.
    let mut current = daemon.log();
    current.wait_reason(&spanning_ident, 0, secs(5));
    let after = record_device(&daemon, &[&random_bytes(93, 2000)]);
    assert!(
        current.select(&spanning_ident, 0, 1).is_empty(),
        "the spanning connection's connect must be in the rotated file"
    );
    let spanning_bytes = [first_part, second_part].concat();

    // The folder has the whole connection, across both files.
    let target = Target::start(Behaviour::Record);
    let folder = daemon.data_dir().to_str().unwrap();
    let run = replay(&target.address(), &[folder]);
    let total = spanning_bytes.len() + after.bytes.len();
    assert_outcome(
        "replay of the folder",
        &run,
        0,
        &[summary(2, total, 0, 0, 0)],
    );
    let received: BTreeSet<Vec<u8>> = received_by(&target, 2).into_iter().collect();
    let expected: BTreeSet<Vec<u8>> = [spanning_bytes, after.bytes.clone()].into();
    assert!(
        received == expected,
        "replay of the folder: expected the spanning connection whole and the later one"
    );

    // The current file alone lacks the connect: skipped, never half sent.
    let target = Target::start(Behaviour::Record);
    let file = daemon.messages_path();
    let run = replay(&target.address(), &[file.to_str().unwrap()]);
    assert_outcome(
        "replay of the current file",
        &run,
        0,
        &[
            format!(
                "proxy-channel replay: {spanning_ident}: skipped: its connect event is not in \
                 the files (rotated away?)"
            ),
            summary(1, after.bytes.len(), 0, 0, 1),
        ],
    );
    assert_eq!(
        received_by(&target, 1),
        [after.bytes],
        "replay of the current file: only the connection that started in it"
    );
    daemon.assert_no_errors();
}

// ---------------------------------------------------------------- failures

#[test]
fn a_refused_target_fails_each_connection_and_the_run_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    write_lines(&dir.path().join("messages.jsonl"), &three_connections());
    let refused = RefusedPort::new();
    let run = replay(&refused.address(), &[dir.path().to_str().unwrap()]);
    assert_eq!(
        run.status.code(),
        Some(1),
        "replay to a refusing target: expected exit 1, saw {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.last().copied(),
        Some(summary(0, 0, 0, 3, 0).as_str()),
        "the summary; stderr:\n{}",
        run.stderr
    );
    for ident in [X, Y, Z] {
        let start = format!(
            "proxy-channel replay: {ident}: failed: cannot connect to {}: ",
            refused.address()
        );
        assert!(
            lines.iter().any(|l| l.starts_with(&start)),
            "expected a line starting {start:?}; stderr:\n{}",
            run.stderr
        );
    }
    assert_eq!(lines.len(), 4, "stderr:\n{}", run.stderr);
}

#[test]
fn a_missing_folder_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-data");
    let missing = missing.to_str().unwrap();
    let target = Target::start(Behaviour::Record);
    let address = target.address();
    let expected = format!("proxy-channel: cannot read {missing}: No such file or directory");
    for (path, vars) in [
        (Some(missing), vec![]),
        (None, vec![("PROXY_DATA_DIR", missing)]),
    ] {
        let mut args = vec!["replay", "--target", &address];
        args.extend(path);
        let run = run_to_exit(&args, &vars, secs(10));
        assert_eq!(
            run.status.code(),
            Some(1),
            "{args:?} {vars:?}: expected exit 1, saw {}; stderr:\n{}",
            run.status,
            run.stderr
        );
        assert!(
            run.stderr.lines().count() == 1 && run.stderr.starts_with(&expected),
            "{args:?} {vars:?}: expected one line starting {expected:?}, saw:\n{}",
            run.stderr
        );
    }
    assert!(target.connections().is_empty(), "nothing may be sent");
}

#[test]
fn a_bad_option_value_is_a_usage_error_naming_option_and_value() {
    let dir = tempfile::tempdir().unwrap();
    write_lines(&dir.path().join("messages.jsonl"), &three_connections());
    let folder = dir.path().to_str().unwrap();
    let target = Target::start(Behaviour::Record);
    let address = target.address();
    let cases: [(&[&str], &str); 11] = [
        (&["--speed", "0"], "--speed \"0\""),
        (&["--speed", "fast"], "--speed \"fast\""),
        (&["--speed", "-1"], "--speed \"-1\""),
        (&["--concurrency", "0"], "--concurrency \"0\""),
        (&["--concurrency", "many"], "--concurrency \"many\""),
        (&["--wait", "soon"], "--wait \"soon\""),
        (&["--since", "soon"], "--since \"soon\""),
        (
            &["--until", "2026-11-31T00:00:00Z"],
            "--until \"2026-11-31T00:00:00Z\"",
        ),
        (&["--source", "0"], "--source"),
        (&["--event", "data"], "--event"),
        (&["--follow"], "--follow"),
    ];
    for (options, named) in cases {
        let mut args = vec!["replay", "--target", &address];
        args.extend(options);
        args.push(folder);
        let run = run_to_exit(&args, &[], secs(10));
        assert_eq!(
            run.status.code(),
            Some(2),
            "replay {options:?}: expected exit 2, saw {}; stderr:\n{}",
            run.status,
            run.stderr
        );
        assert!(
            run.stderr.lines().count() == 1
                && run.stderr.contains(named)
                && !run.stderr.contains("panicked"),
            "replay {options:?}: expected one stderr line naming {named}, saw:\n{}",
            run.stderr
        );
    }
    let run = run_to_exit(&["replay", folder], &[], secs(10));
    assert!(
        run.status.code() == Some(2) && run.stderr.contains("--target"),
        "replay without --target: expected exit 2 and a line naming --target, saw {}:\n{}",
        run.status,
        run.stderr
    );
    assert!(
        target.connections().is_empty(),
        "a usage error must send nothing, yet the target was connected to"
    );
}

/// A folder with a foreign line, a line that is not JSON, a line cut short
/// and ended by a restart, and a last line cut short: X and Y are replayed
/// whole; Z, whose only packet is the cut line, is skipped.
fn folder_with_bad_lines() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let x = connection(X, "10.0.0.1:4000", T0, &[b"x-one;", b"x-two;"]);
    let y = connection(Y, "10.0.0.1:4001", T0 + 10.0, &[b"y-one;"]);
    let z = connection(Z, "10.0.0.3:4000", T0 + 20.0, &[b"z-one;"]);
    let mut lines = Vec::new();
    lines.extend(x);
    lines.push(r#"{"hello":"world"}"#.to_string());
    lines.push("GET / HTTP/1.1".to_string());
    lines.push(z[0].clone());
    lines.push(z[1][..z[1].len() / 2].to_string());
    lines.push(z[2].clone());
    lines.extend(y);
    let body = lines.join("\n") + "\n" + &lines[1][..30];
    let path = dir.path().join("messages.jsonl");
    fs::write(&path, body).unwrap();
    dir
}

#[test]
fn cut_off_and_foreign_lines_do_not_stop_a_replay() {
    let dir = folder_with_bad_lines();
    let target = Target::start(Behaviour::Record);
    let run = replay(&target.address(), &[dir.path().to_str().unwrap()]);
    assert!(
        run.status.success() && !run.stderr.contains("panicked"),
        "replay of a folder with bad lines: expected exit 0, saw {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    assert_eq!(
        run.stderr.lines().last(),
        Some(summary(2, 18, 0, 0, 1).as_str()),
        "the summary; stderr:\n{}",
        run.stderr
    );
    let skipped_z = format!("proxy-channel replay: {Z}: skipped: line 8 of ");
    assert!(
        run.stderr.lines().any(|l| l.starts_with(&skipped_z)),
        "expected a line starting {skipped_z:?}; stderr:\n{}",
        run.stderr
    );
    let received: BTreeSet<Vec<u8>> = received_by(&target, 2).into_iter().collect();
    let expected: BTreeSet<Vec<u8>> = [b"x-one;x-two;".to_vec(), b"y-one;".to_vec()].into();
    assert_eq!(received, expected, "the connections replayed whole");
}

#[test]
fn cut_off_and_foreign_lines_are_reported_by_replay() {
    let dir = folder_with_bad_lines();
    let path = dir.path().join("messages.jsonl");
    let target = Target::start(Behaviour::Record);
    let run = replay(&target.address(), &[dir.path().to_str().unwrap()]);
    // Lines 5 (not ours), 6 (not JSON), 8 (cut short, ended by a restart)
    // and 13 (the last line, cut short) must each be reported, as view does.
    for number in [5, 6, 8, 13] {
        let start = format!("{}:{number}: ", path.display());
        assert!(
            run.stderr.lines().any(|l| l.contains(&start)),
            "replay must report line {number} of {}, stderr:\n{}",
            path.display(),
            run.stderr
        );
    }
}

/// After a crash the last line can be cut short; if it is a packet of a
/// connection, that connection's bytes were not all stored.
#[test]
fn a_connection_whose_last_packet_line_is_cut_short_is_not_sent_with_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let z = connection(Z, "10.0.0.3:4000", T0, &[b"z-one;", b"z-two;"]);
    // The daemon crashed while writing z-two: no event 2, a cut last line.
    let body = format!("{}\n{}\n{}", z[0], z[1], &z[2][..60]);
    fs::write(dir.path().join("messages.jsonl"), body).unwrap();
    let target = Target::start(Behaviour::Record);
    let run = replay(&target.address(), &[dir.path().to_str().unwrap()]);
    let sent: Vec<Vec<u8>> = target.connections().iter().map(|c| c.received()).collect();
    assert!(
        sent.is_empty(),
        "a connection whose last packet was cut short must not be replayed without it; \
         the target received {:?}; stderr:\n{}",
        sent.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>(),
        run.stderr
    );
    let skipped = format!("proxy-channel replay: {Z}: skipped: ");
    assert!(
        run.stderr.lines().any(|l| l.starts_with(&skipped)),
        "expected a line starting {skipped:?}; stderr:\n{}",
        run.stderr
    );
}

/// Defect 9: a device line whose `server.timestamp` is no time (1e300, or a
/// connect at -1e300 that makes its packets' waits huge) made `replay
/// --speed 1` panic with exit 101. Such a line is reported, its connection
/// skipped, and the good connections are replayed; exit 0.
#[test]
fn a_timestamp_that_is_no_time_does_not_crash_replay_with_speed() {
    const W: &str = "4444444444444444";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("messages.jsonl");
    let with_time = |line: &str, time: f64, crafted: &str| {
        let written = format!("\"server.timestamp\":{time:.6}");
        assert!(line.contains(&written), "{line}");
        line.replace(&written, &format!("\"server.timestamp\":{crafted}"))
    };
    let mut z = connection(Z, "10.0.0.3:4000", T0 + 20.0, &[b"z-one;"]);
    z[1] = with_time(&z[1], T0 + 21.0, "1e300");
    let mut w = connection(W, "10.0.0.4:4000", T0 + 30.0, &[b"w-one;"]);
    w[0] = with_time(&w[0], T0 + 30.0, "-1e300");
    let mut lines = Vec::new();
    lines.extend(connection(X, "10.0.0.1:4000", T0, &[b"x-one;", b"x-two;"]));
    lines.extend(connection(Y, "10.0.0.1:4001", T0 + 10.0, &[b"y-one;"]));
    lines.extend(z);
    lines.extend(w);
    write_lines(&path, &lines);

    let target = Target::start(Behaviour::Record);
    let folder = dir.path().to_str().unwrap();
    let run = replay(
        &target.address(),
        &["--speed", "1", "--concurrency", "4", folder],
    );
    let (file, at) = (path.display(), "is not a time from 1970 to 9999");
    assert_outcome(
        "replay --speed 1 of a folder with a timestamp that is no time",
        &run,
        0,
        &[
            format!("proxy-channel replay: {file}:9: skipped: server.timestamp 1e300 {at}"),
            format!("proxy-channel replay: {file}:11: skipped: server.timestamp -1e300 {at}"),
            format!(
                "proxy-channel replay: {Z}: skipped: line 9 of {file}: server.timestamp 1e300 {at}"
            ),
            format!(
                "proxy-channel replay: {W}: skipped: line 11 of {file}: server.timestamp -1e300 {at}"
            ),
            summary(2, 18, 0, 0, 2),
        ],
    );
    let received: BTreeSet<Vec<u8>> = received_by(&target, 2).into_iter().collect();
    let expected: BTreeSet<Vec<u8>> = [b"x-one;x-two;".to_vec(), b"y-one;".to_vec()].into();
    assert_eq!(received, expected, "the good connections, replayed whole");
}
