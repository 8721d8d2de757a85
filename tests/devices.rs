//! Issue 15, devices: who is on the other end (SPEC, Devices), black-box
//! through the built binary on loopback. Each built-in detector and a
//! user regex on a real first frame: `device.ident` from the packet that
//! revealed it on, on every later message (targets' ones included), never
//! on the device's event 1. Device lists (PROXY_TARGETn_DEVICES): a listed
//! device reaches its target with every byte from the first, another gets
//! `device not listed` (counts 0, no event 1) while a target without a list
//! gets everything at once; the detection window; SIGHUP reloads; a listed
//! mandatory target. PROXY_DEVICE_UNIQUE across workers, `ctl list` and
//! `ctl close --device`, `view --device` and `replay --device`, and UDP.

mod util;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use serde_json::Value;
use util::*;

const IMEI_A: &str = "356307042441013";
const IMEI_B: &str = "352093086403655";

// ------------------------------------------------------------ frames

/// Teltonika's TCP IMEI packet: a 2-byte length, then the IMEI's digits.
fn teltonika(imei: &str) -> Vec<u8> {
    let length = u16::try_from(imei.len()).unwrap();
    [&length.to_be_bytes()[..], imei.as_bytes()].concat()
}

/// A Teltonika UDP datagram: length, packet id CAFE, 01, AVL packet id 05,
/// the IMEI's length and digits, then a Codec 8 record (from Teltonika's
/// example).
fn teltonika_udp(imei: &str) -> Vec<u8> {
    let record = hex::decode(
        "08010000016B4F815B30010000000000000000000000000000000103021503010101425DBC000001",
    )
    .unwrap();
    let imei_length = u16::try_from(imei.len()).unwrap().to_be_bytes();
    let body = [
        &[0xCA, 0xFE, 0x01, 0x05][..],
        &imei_length,
        imei.as_bytes(),
        &record,
    ]
    .concat();
    let length = u16::try_from(body.len()).unwrap().to_be_bytes();
    [&length[..], &body].concat()
}

/// CRC-ITU (CRC-16/X-25), as the GT06 protocol document computes it.
fn crc_itu(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &byte in bytes {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = match crc & 1 {
                1 => (crc >> 1) ^ 0x8408,
                _ => crc >> 1,
            };
        }
    }
    !crc
}

/// A GT06 login: `78 78`, length 0D, protocol 01, the terminal ID in BCD,
/// serial 0001, CRC-ITU, `0D 0A`.
fn gt06_login(terminal_id: [u8; 8]) -> Vec<u8> {
    let checked = [&[0x0D, 0x01][..], &terminal_id, &[0x00, 0x01]].concat();
    let crc = crc_itu(&checked).to_be_bytes();
    [&[0x78, 0x78][..], &checked, &crc, &[0x0D, 0x0A]].concat()
}

/// A Meitrack frame: `$$`, flag, length, `,IMEI,command...*`, checksum, CR LF.
fn meitrack_frame(flag: char, imei: &str, rest: &str) -> Vec<u8> {
    let body = format!(",{imei},{rest}*");
    let checked = format!("$${flag}{}{body}", body.len() + 4);
    let sum = checked.bytes().fold(0u8, |sum, b| sum.wrapping_add(b));
    format!("{checked}{sum:02X}\r\n").into_bytes()
}

// ------------------------------------------------------------ helpers

/// A device list file with these idents (and a comment).
fn write_list(path: &Path, idents: &[&str]) {
    let mut text = String::from("# devices moved to the new platform\n");
    for ident in idents {
        text.push_str(ident);
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// A device list in a temporary folder, which lives as long as it does.
struct ListFile {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl ListFile {
    fn new(idents: &[&str]) -> ListFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.txt");
        write_list(&path, idents);
        ListFile { _dir: dir, path }
    }

    fn as_str(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// Target 1 without a list, target 2 with a list of A only: the daemon
/// most list tests start.
struct SecondListed {
    list: ListFile,
    one: Target,
    two: Target,
    daemon: Daemon,
}

fn second_target_lists_a() -> SecondListed {
    let list = ListFile::new(&[IMEI_A]);
    let (one, two) = (
        Target::start(Behaviour::Record),
        Target::start(Behaviour::Record),
    );
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &one.address()),
        ("PROXY_TARGET2", &two.address()),
        ("PROXY_TARGET2_DEVICES", list.as_str()),
    ]);
    SecondListed {
        list,
        one,
        two,
        daemon,
    }
}

/// `device.ident` of a message, if it has one.
fn named(message: &Value) -> Option<&str> {
    message.get("device.ident").and_then(Value::as_str)
}

/// The connection's messages name `device` from its first device data
/// message on (that one included), and none before it does (its event 1,
/// a target's event 1 written before the first packet).
fn assert_named_from_first_packet(log: &MessageLog, ident: &str, device: &str) {
    let messages = log.of_ident(ident);
    assert!(
        source(messages[0]) == 0 && event(messages[0]) == 1 && named(messages[0]).is_none(),
        "{ident}: the device's event 1 comes first and names no device: {}",
        messages[0]
    );
    let first_data = messages
        .iter()
        .position(|m| source(m) == 0 && event(m) == 0)
        .unwrap_or_else(|| panic!("{ident}: no device data in\n{}", log.summary()));
    for (index, message) in messages.iter().enumerate() {
        let expected = (index >= first_data).then_some(device);
        assert_eq!(
            named(message),
            expected,
            "{ident}: message {index}: {message}"
        );
    }
    assert!(
        messages.iter().any(|m| source(m) == 1 && event(m) == 0),
        "{ident}: a target's reply was recorded (and named) too"
    );
}

/// Waits for the event 2 of `source_n` of `ident` and checks it says
/// `device not listed` with counts 0, with no event 1 before it.
fn assert_not_listed(log: &mut MessageLog, ident: &str, source_n: u64) {
    let reason = log.wait_reason(ident, source_n, secs(8));
    assert_eq!(reason, "device not listed", "{ident} source {source_n}");
    let dropped = log.dropped(ident, source_n).unwrap();
    assert_eq!(number(dropped, "proxy.bytes.received"), 0, "{dropped}");
    assert_eq!(number(dropped, "proxy.bytes.sent"), 0, "{dropped}");
    assert!(
        log.select(ident, source_n, 1).is_empty(),
        "{ident}: no event 1 for source {source_n}"
    );
    // Lines keep the order of events: a device found not listed by a
    // packet is so after that packet's event 0.
    let messages = log.of_ident(ident);
    let at = |found: &Value| messages.iter().position(|m| std::ptr::eq(*m, found));
    let not_listed = at(dropped).expect("the event 2 among the ident's lines");
    if let Some(named) = messages
        .iter()
        .find(|m| source(m) == 0 && event(m) == 0 && m.get("device.ident").is_some())
    {
        assert!(
            at(named) < Some(not_listed),
            "{ident}: `device not listed` written before the packet that named the device"
        );
    }
}

/// Waits until `target` has a connection that received exactly `bytes`.
fn wait_delivery(target: &Target, bytes: &[u8], what: &str) {
    wait_until(secs(5), what, || {
        target.connections().iter().any(|c| c.received() == bytes)
    });
}

// ------------------------------------------------------------ detectors

/// Every built-in detector and the user regex, each on a real first frame
/// sent in one write: the frame's own event 0 names the device, as does
/// every later message of the connection, the target's included.
#[test]
fn each_detector_names_the_device_from_the_packet_that_revealed_it() {
    let target = Target::start(Behaviour::Reply { tag: 1 });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_DEVICE_IDENT_REGEX", r"DEV=([\w-]+);"),
    ]);
    let meitrack_data = "AAA,35,22.536226,114.026186,100301113008,A,7,21,0,205,1.0,23,119,1039,460|0|E166|A08B,0000,0006|0000|0000|019D|0000,";
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("teltonika", teltonika(IMEI_A), IMEI_A),
        (
            "teltonika after FF keep-alives",
            [&[0xFF, 0xFF][..], &teltonika(IMEI_B)].concat(),
            IMEI_B,
        ),
        (
            "gt06",
            gt06_login([0x03, 0x53, 0x41, 0x90, 0x57, 0x39, 0x18, 0x21]),
            "353419057391821",
        ),
        (
            "h02",
            b"*HQ,865205030001234,V1,121532,A,2235.0887,N,11406.0105,E,000.00,000,150817,FFFFFBFF,460,00,0,0,6#".to_vec(),
            "865205030001234",
        ),
        (
            "queclink",
            b"+RESP:GTFRI,060228,862170010000000,,0,0,1,1,0.0,0,0.0,0.000000,0.000000,20100214093254,0460,0000,18d8,6141,00,20100214093254,11F0$".to_vec(),
            "862170010000000",
        ),
        (
            "coban",
            b"##,imei:359586015829802,A;".to_vec(),
            "359586015829802",
        ),
        (
            "meitrack",
            meitrack_frame('A', "862170010000001", meitrack_data),
            "862170010000001",
        ),
        (
            "regex",
            b"HELLO DEV=unit-42; fw 1.0\r\n".to_vec(),
            "unit-42",
        ),
    ];
    let mut log = daemon.log();
    for (name, frame, device_ident) in &cases {
        let mut device = Device::connect(daemon.addr());
        device.send(frame);
        let ident = log.wait_ident(device.name(), secs(5));
        log.wait_for(secs(5), &format!("{name}: the frame's event 0"), |log| {
            !log.select(&ident, 0, 0).is_empty()
        });
        device.send(b"the next packet");
        log.wait_for(secs(5), &format!("{name}: the next event 0"), |log| {
            log.select(&ident, 0, 0).len() >= 2 && !log.select(&ident, 1, 0).is_empty()
        });
        device.shutdown_write();
        device.read_until_end(secs(5));
        log.wait_reason(&ident, 0, secs(5));
        let first = log.select(&ident, 0, 0)[0];
        assert_eq!(
            number(first, "proxy.payload.size"),
            frame.len() as u64,
            "{name}: the frame came in one read"
        );
        assert_named_from_first_packet(&log, &ident, device_ident);
    }
    log.assert_well_formed();
    daemon.assert_no_errors();
}

/// A frame split across writes: the target gets the first piece before
/// the device is known (detection delays no target without a list), the
/// piece's event 0 names no device, the one that completes the frame does.
#[test]
fn a_frame_split_across_writes_names_the_device_from_the_piece_that_completes_it() {
    let target = Target::start(Behaviour::Reply { tag: 1 });
    let daemon = Daemon::start(&[("PROXY_TARGET1", &target.address())]);
    let mut log = daemon.log();
    let frame = teltonika(IMEI_A);
    let mut device = Device::connect(daemon.addr());
    device.send(&frame[..5]);
    let conn = target.wait_connections(1, secs(5)).remove(0);
    conn.wait_received(5, secs(5));
    let ident = log.wait_ident(device.name(), secs(5));
    log.wait_for(secs(5), "the first piece's event 0", |log| {
        !log.select(&ident, 0, 0).is_empty()
    });
    device.send(&frame[5..]);
    log.wait_for(secs(5), "the second piece's event 0", |log| {
        log.select(&ident, 0, 0).len() >= 2
    });
    device.shutdown_write();
    device.read_until_end(secs(5));
    log.wait_reason(&ident, 0, secs(5));
    let data = log.select(&ident, 0, 0);
    assert_eq!(number(data[0], "proxy.payload.size"), 5);
    assert_eq!(named(data[0]), None, "the first piece does not name it");
    assert_eq!(named(data[1]), Some(IMEI_A), "the second piece does");
    let messages = log.of_ident(&ident);
    let second = messages
        .iter()
        .position(|m| std::ptr::eq(*m, data[1]))
        .unwrap();
    for message in &messages[second..] {
        assert_eq!(named(message), Some(IMEI_A), "{message}");
    }
    assert_eq!(conn.received(), frame, "the target got every byte");
}

/// Device bytes that came in the same read as a PROXY protocol header are
/// the device's first packet: detection reads them too.
#[test]
fn bytes_that_came_with_a_proxy_header_are_read_for_the_device() {
    let target = Target::start(Behaviour::Reply { tag: 1 });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_ACCEPT_PROXY_PROTOCOL", "v1"),
    ]);
    let mut log = daemon.log();
    let source: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let header = proxy_v1_header(source, daemon.addr());
    let mut device = Device::connect(daemon.addr());
    device.send(&[header.as_bytes(), &teltonika(IMEI_A)].concat());
    let ident = log.wait_ident("192.0.2.7:40000", secs(5));
    log.wait_for(secs(5), "the IMEI packet and a reply", |log| {
        !log.select(&ident, 0, 0).is_empty() && !log.select(&ident, 1, 0).is_empty()
    });
    device.shutdown_write();
    device.read_until_end(secs(5));
    log.wait_reason(&ident, 0, secs(5));
    assert_eq!(
        number(log.select(&ident, 0, 0)[0], "proxy.payload.size"),
        17,
        "the header is not the device's"
    );
    assert_named_from_first_packet(&log, &ident, IMEI_A);
}

/// PROXY_DEVICE_IDENT=off: no message names a device, whatever it sends.
#[test]
fn with_detection_off_no_message_names_a_device() {
    let target = Target::start(Behaviour::Reply { tag: 1 });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_DEVICE_IDENT", "off"),
    ]);
    let mut log = daemon.log();
    let mut device = Device::connect(daemon.addr());
    device.send(&teltonika(IMEI_A));
    device.shutdown_write();
    device.read_until_end(secs(5));
    let ident = log.wait_ident(device.name(), secs(5));
    log.wait_reason(&ident, 0, secs(5));
    assert!(
        log.lines().iter().all(|m| named(m).is_none()),
        "{}",
        log.summary()
    );
}

/// What cannot work stops the daemon before it listens: exit 2 and one
/// line naming the variable and its value.
#[test]
fn bad_detector_and_list_settings_stop_the_daemon_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("devices.txt");
    write_list(&list, &[IMEI_A]);
    let missing = dir.path().join("missing.txt");
    let bad_line = dir.path().join("bad.txt");
    std::fs::write(&bad_line, "356307042441013\n3563 0704\n").unwrap();
    let (list, missing, bad_line) = (
        list.to_str().unwrap(),
        missing.to_str().unwrap(),
        bad_line.to_str().unwrap(),
    );
    let folder = dir.path().to_str().unwrap();
    let target = ("PROXY_TARGET1", "127.0.0.1:9");
    let cases: Vec<(Vec<(&str, &str)>, String)> = vec![
        (
            vec![("PROXY_DEVICE_IDENT", "tk103")],
            "PROXY_DEVICE_IDENT=\"tk103\": expected ".into(),
        ),
        (
            vec![("PROXY_DEVICE_IDENT_REGEX", r"imei=(\d+")],
            "PROXY_DEVICE_IDENT_REGEX=\"imei=(\\\\d+\": expected ".into(),
        ),
        (
            vec![("PROXY_DEVICE_IDENT_REGEX", r"imei=\d+")],
            "PROXY_DEVICE_IDENT_REGEX=\"imei=\\\\d+\": expected ".into(),
        ),
        (
            vec![
                target,
                ("PROXY_TARGET1_DEVICES", list),
                ("PROXY_DEVICE_IDENT", "off"),
            ],
            format!("PROXY_TARGET1_DEVICES={list:?}: expected no device list while"),
        ),
        (
            vec![target, ("PROXY_TARGET1_DEVICES", missing)],
            format!("PROXY_TARGET1_DEVICES={missing:?}: expected a readable file of device idents"),
        ),
        (
            vec![target, ("PROXY_TARGET1_DEVICES", folder)],
            format!("PROXY_TARGET1_DEVICES={folder:?}: expected a readable file of device idents"),
        ),
        (
            vec![target, ("PROXY_TARGET1_DEVICES", bad_line)],
            format!("PROXY_TARGET1_DEVICES={bad_line:?}: expected a readable file"),
        ),
    ];
    for (vars, start) in cases {
        let data = tempfile::tempdir().unwrap();
        let mut all = vec![
            ("PROXY_LISTEN", "127.0.0.1:0"),
            ("PROXY_DATA_DIR", data.path().to_str().unwrap()),
            ("PROXY_CONTROL_SOCKET", "off"),
        ];
        all.extend_from_slice(&vars);
        let run = run_to_exit(&[], &all, secs(10));
        assert_eq!(run.status.code(), Some(2), "{vars:?}: {}", run.stderr);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{vars:?}: one line, saw {lines:#?}");
        let expected = format!("proxy-channel: {start}");
        assert!(
            lines[0].starts_with(&expected),
            "{vars:?}: expected a line starting {expected:?}, saw {:?}",
            lines[0]
        );
    }
}

// ------------------------------------------------------------ device lists

/// Target 2 lists device A: A reaches it with every byte from the first;
/// B and a device no detector knows get `device not listed` for source 2
/// (counts 0, no event 1) and stay connected though target 2 is mandatory;
/// target 1, without a list, gets every device's bytes.
#[test]
fn a_listed_target_gets_listed_devices_whole_and_others_are_not_listed() {
    let SecondListed {
        list: _list,
        one,
        two,
        daemon,
    } = second_target_lists_a();
    let mut log = daemon.log();

    // A's IMEI packet in two pieces: the first goes to target 1 at once
    // and is held for target 2 until the second piece says who A is.
    let mut listed = Device::connect(daemon.addr());
    let listed_bytes = [teltonika(IMEI_A), b"A's first record".to_vec()].concat();
    listed.send(&listed_bytes[..5]);
    wait_delivery(&one, &listed_bytes[..5], "target 1 to get A's first piece");
    assert!(
        two.connections().is_empty(),
        "target 2 waits for the device"
    );
    listed.send(&listed_bytes[5..17]);
    let ident_a = log.wait_ident(listed.name(), secs(5));
    log.wait_for(secs(5), "A's target 2 event 1", |log| {
        !log.select(&ident_a, 2, 1).is_empty()
    });
    listed.send(&listed_bytes[17..]);
    wait_delivery(&two, &listed_bytes, "target 2 to get all of A's bytes");
    wait_delivery(&one, &listed_bytes, "target 1 to get all of A's bytes");
    assert_eq!(named(log.select(&ident_a, 2, 1)[0]), Some(IMEI_A));

    let mut unlisted = Device::connect(daemon.addr());
    let unlisted_bytes = [teltonika(IMEI_B), b"B's record".to_vec()].concat();
    unlisted.send(&unlisted_bytes);
    let ident_b = log.wait_ident(unlisted.name(), secs(5));
    assert_not_listed(&mut log, &ident_b, 2);
    assert_eq!(named(log.dropped(&ident_b, 2).unwrap()), Some(IMEI_B));
    wait_delivery(&one, &unlisted_bytes, "target 1 to get B's bytes");
    unlisted.send(b" and more");
    let all_b = [unlisted_bytes.clone(), b" and more".to_vec()].concat();
    wait_delivery(&one, &all_b, "target 1 to get B's later bytes");
    assert!(log.dropped(&ident_b, 0).is_none(), "B is not dropped");

    let mut unknown = Device::connect(daemon.addr());
    unknown.send(b"hello, no detector knows me");
    let ident_c = log.wait_ident(unknown.name(), secs(5));
    assert_not_listed(&mut log, &ident_c, 2);
    wait_delivery(
        &one,
        b"hello, no detector knows me",
        "target 1 to get C's bytes",
    );

    assert_eq!(two.connections().len(), 1, "only A reached target 2");
    for device in [&listed, &unlisted, &unknown] {
        device.shutdown_write();
    }
    for ident in [&ident_a, &ident_b, &ident_c] {
        assert_eq!(log.wait_reason(ident, 0, secs(5)), "closed by peer");
    }
    assert_eq!(log.reason(&ident_a, 2).as_deref(), Some("closed by peer"));
    log.assert_well_formed();
    daemon.assert_no_errors();
}

/// A device whose first bytes could still become a frame stays
/// unrecognised for the 5 s window: target 1 (no list) gets its bytes at
/// once; target 2 (a list) gets `device not listed` once the window ends.
#[test]
fn a_device_not_recognised_within_the_window_is_not_listed() {
    let SecondListed {
        list: _list,
        one,
        two,
        daemon,
    } = second_target_lists_a();
    let mut log = daemon.log();
    let mut device = Device::connect(daemon.addr());
    let started = Instant::now();
    let partial = &teltonika(IMEI_A)[..8];
    device.send(partial);
    wait_delivery(&one, partial, "target 1 to get the bytes at once");
    let forwarded_after = started.elapsed();
    let ident = log.wait_ident(device.name(), secs(5));
    assert!(log.dropped(&ident, 2).is_none(), "still within the window");
    assert_not_listed(&mut log, &ident, 2);
    let decided_after = started.elapsed();
    assert!(
        forwarded_after < secs(2) && decided_after >= millis(4500),
        "forwarded after {forwarded_after:?}, not listed after {decided_after:?}"
    );
    assert!(
        log.of_ident(&ident).iter().all(|m| named(m).is_none()),
        "never recognised"
    );
    assert!(two.connections().is_empty());
    assert!(log.dropped(&ident, 0).is_none(), "the device goes on");
}

/// SIGHUP reads the lists again: a device added to the file reaches the
/// target from its next connection on; a file that cannot be read then
/// keeps the old list, and the log says so.
#[test]
fn sighup_reloads_the_lists_and_an_unreadable_list_keeps_the_old_one() {
    let SecondListed {
        list,
        one: _one,
        two,
        daemon,
    } = second_target_lists_a();
    let mut log = daemon.log();
    let mut first = Device::connect(daemon.addr());
    first.send(&[teltonika(IMEI_B), b"1".to_vec()].concat());
    let ident = log.wait_ident(first.name(), secs(5));
    assert_not_listed(&mut log, &ident, 2);

    write_list(&list.path, &[IMEI_A, IMEI_B]);
    daemon.signal(libc::SIGHUP);
    daemon.wait_log("device list reloaded, 2 devices listed", 1, secs(5));
    let mut second = Device::connect(daemon.addr());
    let bytes = [teltonika(IMEI_B), b"2".to_vec()].concat();
    second.send(&bytes);
    wait_delivery(&two, &bytes, "B at target 2 after the reload");

    std::fs::remove_file(&list.path).unwrap();
    daemon.signal(libc::SIGHUP);
    let warned = daemon.wait_log("PROXY_TARGET2_DEVICES not reloaded", 1, secs(5));
    assert!(warned[0].contains(" WARN "), "{warned:?}");
    let mut third = Device::connect(daemon.addr());
    let bytes = [teltonika(IMEI_B), b"3".to_vec()].concat();
    third.send(&bytes);
    wait_delivery(&two, &bytes, "B still at target 2");

    // SIGHUP rotated the message file each time: read every file, once
    // the lines of the last connection are written (batches go by age).
    let read_all = || MessageLog::read_files(&message_files(daemon.data_dir()));
    let connects_to_2 = |log: &MessageLog| {
        log.lines()
            .iter()
            .filter(|m| source(m) == 2 && event(m) == 1)
            .count()
    };
    poll_until(secs(5), || connects_to_2(&read_all()) >= 2);
    let all = read_all();
    let at_target_2: Vec<&Value> = all
        .lines()
        .iter()
        .filter(|m| source(m) == 2 && event(m) == 1)
        .collect();
    assert_eq!(at_target_2.len(), 2, "{}", all.summary());
    assert!(at_target_2.iter().all(|m| named(m) == Some(IMEI_B)));
}

/// A mandatory target with a list is mandatory for its listed devices
/// only: when it cannot be reached, a listed device's connection drops,
/// an unlisted device's goes on.
#[test]
fn a_listed_mandatory_target_is_mandatory_only_for_listed_devices() {
    let list = ListFile::new(&[IMEI_A]);
    let one = Target::start(Behaviour::Record);
    let refused = RefusedPort::new();
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &one.address()),
        ("PROXY_TARGET2", &refused.address()),
        ("PROXY_TARGET2_MANDATORY", "true"),
        ("PROXY_TARGET2_DEVICES", list.as_str()),
    ]);
    let mut log = daemon.log();

    let mut listed = Device::connect(daemon.addr());
    listed.send(&teltonika(IMEI_A));
    let ident_a = log.wait_ident(listed.name(), secs(5));
    assert_eq!(
        log.wait_reason(&ident_a, 0, secs(5)),
        "mandatory target 2 failed"
    );
    assert_ne!(listed.read_until_end(secs(5)).end, End::StillOpen);

    let mut unlisted = Device::connect(daemon.addr());
    unlisted.send(&teltonika(IMEI_B));
    let ident_b = log.wait_ident(unlisted.name(), secs(5));
    assert_not_listed(&mut log, &ident_b, 2);
    unlisted.send(b"still here");
    let bytes = [teltonika(IMEI_B), b"still here".to_vec()].concat();
    wait_delivery(&one, &bytes, "target 1 to get all of B's bytes");
    assert!(log.dropped(&ident_b, 0).is_none(), "B is not dropped");
}

// ------------------------------------------------------------ unique

/// PROXY_DEVICE_UNIQUE with two workers: each new connection of a device
/// closes its older one (device and target events 2: `replaced by a newer
/// connection`), wherever it lives; another device's is left alone.
#[test]
fn a_newer_connection_of_a_device_replaces_the_older_one_on_any_worker() {
    let target = Target::start(Behaviour::Record);
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_DEVICE_UNIQUE", "true"),
        ("PROXY_WORKERS", "2"),
    ]);
    let mut log = daemon.log();
    let open = |log: &mut MessageLog, imei: &str| {
        let mut device = Device::connect(daemon.addr());
        device.send(&teltonika(imei));
        let ident = log.wait_ident(device.name(), secs(5));
        log.wait_for(secs(5), "its IMEI packet", |log| {
            !log.select(&ident, 0, 0).is_empty()
        });
        (device, ident)
    };
    let (mut first, first_ident) = open(&mut log, IMEI_A);
    let (_other, other_ident) = open(&mut log, IMEI_B);
    // Round robin over two workers: the second connection of A is on the
    // other worker than the first.
    let (mut second, second_ident) = open(&mut log, IMEI_A);
    let replaced = "replaced by a newer connection";
    assert_eq!(log.wait_reason(&first_ident, 0, secs(5)), replaced);
    assert_eq!(log.wait_reason(&first_ident, 1, secs(5)), replaced);
    assert_ne!(first.read_until_end(secs(5)).end, End::StillOpen);
    assert_eq!(named(log.dropped(&first_ident, 0).unwrap()), Some(IMEI_A));

    let (_third, _) = open(&mut log, IMEI_A);
    assert_eq!(log.wait_reason(&second_ident, 0, secs(5)), replaced);
    assert_ne!(second.read_until_end(secs(5)).end, End::StillOpen);
    assert!(
        log.dropped(&other_ident, 0).is_none(),
        "B keeps its connection"
    );
    daemon.assert_no_errors();
}

/// PROXY_DEVICE_UNIQUE closes the older connection, also when the older
/// one is recognised last (its IMEI packet came in pieces): the newer
/// connection stays, the older one ends `replaced by a newer connection`.
#[test]
fn an_older_connection_recognised_last_is_the_one_replaced() {
    let daemon = Daemon::start(&[("PROXY_DEVICE_UNIQUE", "true")]);
    let mut log = daemon.log();
    let login = teltonika(IMEI_A);
    let mut older = Device::connect(daemon.addr());
    older.send(&login[..6]);
    let older_ident = log.wait_ident(older.name(), secs(5));
    log.wait_for(secs(5), "the older one's first piece", |log| {
        !log.select(&older_ident, 0, 0).is_empty()
    });

    let mut newer = Device::connect(daemon.addr());
    newer.send(&login);
    let newer_ident = log.wait_ident(newer.name(), secs(5));
    log.wait_for(secs(5), "the newer one recognised", |log| {
        log.select(&newer_ident, 0, 0)
            .iter()
            .any(|m| named(m).is_some())
    });
    older.send(&login[6..]);
    assert_eq!(
        log.wait_reason(&older_ident, 0, secs(5)),
        "replaced by a newer connection"
    );
    assert_ne!(older.read_until_end(secs(5)).end, End::StillOpen);
    newer.send(b"still here");
    log.wait_for(secs(5), "the newer one's next packet", |log| {
        log.select(&newer_ident, 0, 0).len() == 2
    });
    assert!(
        log.dropped(&newer_ident, 0).is_none(),
        "the newer connection stays: {}",
        log.summary()
    );
}

// ------------------------------------------------------------ ctl

/// `ctl list` shows a listed target that waits for the device to be
/// recognised as `waiting`, with the device bytes held for it as its
/// queue; once the device is recognised, as connected.
#[test]
fn ctl_list_shows_a_listed_target_waiting_for_the_device() {
    let list = ListFile::new(&[IMEI_A]);
    let target = Target::start(Behaviour::Record);
    let daemon = Daemon::start_with_control(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_TARGET1_DEVICES", list.as_str()),
    ]);
    let mut log = daemon.log();
    let login = teltonika(IMEI_A);
    let mut device = Device::connect(daemon.addr());
    device.send(&login[..5]);
    let ident = log.wait_ident(device.name(), secs(5));
    let target_of = |ident: &str| -> Value {
        let list = ctl_json(&daemon.control_socket(), &["list"]);
        let connection = list["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| text(c, "ident") == ident)
            .unwrap_or_else(|| panic!("{ident} not in {list}"))
            .clone();
        connection["targets"].clone()
    };
    wait_until(secs(5), "the first piece held for target 1", || {
        target_of(&ident)[0]["queued"] == 5
    });
    let waiting = target_of(&ident);
    assert_eq!(waiting.as_array().unwrap().len(), 1, "{waiting}");
    assert_eq!(waiting[0]["target"], 1, "{waiting}");
    assert_eq!(waiting[0]["state"], "waiting", "{waiting}");
    let table = daemon.ctl(&["list"]);
    assert!(
        table.stdout.contains("1:waiting queued 5 in 0 out 0"),
        "{}",
        table.stdout
    );

    device.send(&login[5..]);
    wait_delivery(&target, &login, "target 1 to get the login once A is known");
    wait_until(secs(5), "target 1 shown as connected", || {
        target_of(&ident)[0]["state"] == "connected"
    });
}

/// `ctl list` shows each connection's device (`-` while unknown, no JSON
/// key); `ctl close --device` closes every connection of the device, its
/// UDP session too, with `closed by operator`, and nothing else.
#[test]
fn ctl_list_shows_devices_and_close_device_closes_all_of_its_connections() {
    let target = Target::start(Behaviour::Record);
    // Not mandatory: the UDP session's datagrams to this TCP-only port
    // come back ICMP unreachable, which drops target 1 alone.
    let daemon = Daemon::start_with_control(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_TARGET1_MANDATORY", "false"),
        ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
    ]);
    let mut log = daemon.log();
    let mut devices = Vec::new();
    for first in [
        teltonika(IMEI_A),
        teltonika(IMEI_A),
        teltonika(IMEI_B),
        b"hello".to_vec(),
    ] {
        let mut device = Device::connect(daemon.addr());
        device.send(&first);
        let ident = log.wait_ident(device.name(), secs(5));
        log.wait_for(secs(5), "its first packet", |log| {
            !log.select(&ident, 0, 0).is_empty()
        });
        devices.push((device, ident));
    }
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(&teltonika_udp(IMEI_A), udp_address(&daemon))
        .unwrap();
    let udp_peer = udp.local_addr().unwrap().to_string();
    log.wait_for(secs(5), "the UDP session's datagram", |log| {
        log.lines()
            .iter()
            .any(|m| text(m, "peer") == udp_peer && event(m) == 0)
    });
    let udp_ident = log.ident_of_peer(&udp_peer).unwrap();

    let list = ctl_json(&daemon.control_socket(), &["list"]);
    let listed: Vec<(String, Option<String>)> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (text(c, "ident").to_string(), named_key(c)))
        .collect();
    let device_of = |ident: &str| {
        listed
            .iter()
            .find(|(i, _)| i == ident)
            .unwrap_or_else(|| panic!("{ident} not in {list}"))
            .1
            .clone()
    };
    assert_eq!(device_of(&devices[0].1).as_deref(), Some(IMEI_A));
    assert_eq!(device_of(&devices[1].1).as_deref(), Some(IMEI_A));
    assert_eq!(device_of(&devices[2].1).as_deref(), Some(IMEI_B));
    assert_eq!(device_of(&devices[3].1), None, "unknown: no key");
    assert_eq!(device_of(&udp_ident).as_deref(), Some(IMEI_A));

    let table = daemon.ctl(&["list"]);
    let header: Vec<&str> = table
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(header[6], "device", "{}", table.stdout);
    let column = |ident: &str| {
        let row = table.stdout.lines().find(|l| l.starts_with(ident)).unwrap();
        row.split_whitespace().nth(6).unwrap().to_string()
    };
    assert_eq!(column(&devices[0].1), IMEI_A);
    assert_eq!(column(&devices[3].1), "-");

    let closed = daemon.ctl(&["close", "--device", IMEI_A]);
    assert!(closed.status.success(), "{}", closed.stderr);
    let said: BTreeSet<&str> = closed
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("closed "))
        .collect();
    let expected: BTreeSet<&str> = [&devices[0].1, &devices[1].1, &udp_ident]
        .into_iter()
        .map(String::as_str)
        .collect();
    assert_eq!(said, expected, "{}", closed.stdout);
    for ident in &expected {
        assert_eq!(log.wait_reason(ident, 0, secs(5)), "closed by operator");
    }
    // The UDP session's target 1 was dropped before: ICMP unreachable.
    for (_, ident) in &devices[..2] {
        assert_eq!(log.wait_reason(ident, 1, secs(5)), "closed by operator");
    }
    assert!(log.dropped(&devices[2].1, 0).is_none(), "B stays");
    assert!(
        log.dropped(&devices[3].1, 0).is_none(),
        "the unknown one stays"
    );
    let again = daemon.ctl(&["close", "--device", IMEI_A]);
    assert!(
        !again.status.success(),
        "nothing left of A: {}",
        again.stdout
    );
}

/// `device` of a `ctl list` entry, if the key is there.
fn named_key(entry: &Value) -> Option<String> {
    entry
        .get("device")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The UDP address the daemon logged it listens on.
fn udp_address(daemon: &Daemon) -> SocketAddr {
    let lines = daemon.wait_log("listening for UDP datagrams on ", 1, secs(5));
    let (_, address) = lines[0].rsplit_once(" on ").unwrap();
    address.trim().parse().unwrap()
}

// ------------------------------------------------------------ view, replay

/// `view --device` and `replay --device` take whole connections of the
/// device: its messages from before the recognition (event 1, the first
/// piece of a split frame) included, another device's not at all.
#[test]
fn view_and_replay_by_device_take_whole_connections() {
    let target = Target::start(Behaviour::Record);
    let mut daemon = Daemon::start(&[("PROXY_TARGET1", &target.address())]);
    let mut log = daemon.log();
    let a_bytes = [teltonika(IMEI_A), b"A's record".to_vec()].concat();
    let mut a = Device::connect(daemon.addr());
    a.send(&a_bytes[..4]);
    let ident_a = log.wait_ident(a.name(), secs(5));
    log.wait_for(secs(5), "A's first piece", |log| {
        !log.select(&ident_a, 0, 0).is_empty()
    });
    a.send(&a_bytes[4..]);
    let mut b = Device::connect(daemon.addr());
    b.send(&[teltonika(IMEI_B), b"B's record".to_vec()].concat());
    let ident_b = log.wait_ident(b.name(), secs(5));
    for device in [&a, &b] {
        device.shutdown_write();
    }
    log.wait_reason(&ident_a, 0, secs(5));
    log.wait_reason(&ident_b, 0, secs(5));
    daemon.stop();
    let folder = daemon.data_dir().to_str().unwrap().to_string();

    let view = run_to_exit(
        &["view", "--json", "--device", IMEI_A, &folder],
        &[],
        secs(10),
    );
    assert!(view.status.success(), "{}", view.stderr);
    let shown: Vec<Value> = view
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let all = read_folder(daemon.data_dir());
    let expected: Vec<&Value> = all.of_ident(&ident_a);
    assert_eq!(shown.len(), expected.len(), "{}", view.stdout);
    assert!(shown.iter().all(|m| text(m, "ident") == ident_a));
    assert!(named(&shown[0]).is_none(), "its event 1 too");
    assert!(
        shown.iter().any(|m| event(m) == 0 && named(m).is_none()),
        "its first piece too"
    );

    let text_view = run_to_exit(&["view", "--device", IMEI_B, &folder], &[], secs(10));
    assert!(text_view.stdout.contains(&ident_b) && !text_view.stdout.contains(&ident_a));

    let replayed = Target::start(Behaviour::Record);
    let run = run_to_exit(
        &[
            "replay",
            "--target",
            &replayed.address(),
            "--device",
            IMEI_A,
            &folder,
        ],
        &[],
        secs(20),
    );
    assert!(run.status.success(), "{}", run.stderr);
    let conns = replayed.wait_connections(1, secs(5));
    conns[0].wait_done(secs(10));
    assert_eq!(replayed.connections().len(), 1, "A's connection only");
    assert_eq!(conns[0].received(), a_bytes, "every byte A sent");
}

/// `view --follow --device` shows, as they are written, the messages of
/// the device's connections from the one that names the device on, and
/// nothing of another device's connections (README, Devices).
#[test]
fn view_follow_by_device_shows_the_device_from_its_naming_message_on() {
    let daemon = Daemon::start(&[]);
    let folder = daemon.data_dir().to_str().unwrap().to_string();
    let viewer = Follower::start(&["--follow", "--json", "--device", IMEI_A, &folder]);
    viewer.wait_until_following();

    let mut log = daemon.log();
    let mut b = Device::connect(daemon.addr());
    b.send(&[teltonika(IMEI_B), b"B's record".to_vec()].concat());
    let mut a = Device::connect(daemon.addr());
    a.send(&teltonika(IMEI_A));
    a.send(b"A's record");
    let ident_b = log.wait_ident(b.name(), secs(5));
    b.shutdown_write();
    log.wait_reason(&ident_b, 0, secs(5));
    let ident_a = log.wait_ident(a.name(), secs(5));
    a.shutdown_write();
    log.wait_reason(&ident_a, 0, secs(5));
    // The viewer reads in file order: once A's end is shown, B's lines
    // (written before it) have been looked at too.
    let a_end = format!(r#""ident":"{ident_a}","#);
    wait_until(secs(5), "A's event 2 in view --follow", || {
        viewer
            .lines()
            .iter()
            .any(|l| l.contains(&a_end) && l.contains(r#""proxy.event":2"#))
    });

    let shown: Vec<Value> = viewer
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("view --json prints JSON lines"))
        .collect();
    let all = read_folder(daemon.data_dir());
    let expected: Vec<&Value> = all
        .of_ident(&ident_a)
        .into_iter()
        .filter(|m| named(m) == Some(IMEI_A))
        .collect();
    assert_eq!(
        shown.iter().collect::<Vec<_>>(),
        expected,
        "A's messages from the one naming it on, and nothing else"
    );
    assert_eq!(event(&shown[0]), 0, "the first shown is the naming packet");
    assert!(viewer.stderr().is_empty(), "{:?}", viewer.stderr());
}

// ------------------------------------------------------------ UDP

/// A UDP target that records each datagram.
struct UdpSink {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    fn start() -> UdpSink {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(millis(20))).unwrap();
        let address = socket.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopping) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut buffer = vec![0u8; 65_536];
            // Bounded by the stop flag, looked at every 20 ms at least.
            while !stopping.load(Ordering::SeqCst) {
                if let Ok(n) = socket.recv(&mut buffer) {
                    log.lock().unwrap().push(buffer[..n].to_vec());
                }
            }
        });
        UdpSink {
            address,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP session is recognised from its Teltonika datagram (the
/// datagram's event 0 on, never its event 1), and device lists apply: the
/// listed device's datagram reaches target 2, another's does not.
#[test]
fn a_udp_teltonika_datagram_names_the_device_and_lists_apply() {
    let list = ListFile::new(&[IMEI_A]);
    let (one, two) = (UdpSink::start(), UdpSink::start());
    let daemon = Daemon::start(&[
        ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
        ("PROXY_TARGET1", &one.address.to_string()),
        ("PROXY_TARGET2", &two.address.to_string()),
        ("PROXY_TARGET2_DEVICES", list.as_str()),
    ]);
    let address = udp_address(&daemon);
    let mut log = daemon.log();
    let send = |imei: &str| {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let datagram = teltonika_udp(imei);
        socket.send_to(&datagram, address).unwrap();
        let peer = socket.local_addr().unwrap().to_string();
        (socket, peer, datagram)
    };
    let (_a, peer_a, datagram_a) = send(IMEI_A);
    let ident_a = log.wait_ident(&peer_a, secs(5));
    log.wait_for(secs(5), "A's datagram and target 2's event 1", |log| {
        !log.select(&ident_a, 0, 0).is_empty() && !log.select(&ident_a, 2, 1).is_empty()
    });
    assert_eq!(named(log.select(&ident_a, 0, 1)[0]), None, "not on event 1");
    assert_eq!(named(log.select(&ident_a, 0, 0)[0]), Some(IMEI_A));
    assert_eq!(named(log.select(&ident_a, 2, 1)[0]), Some(IMEI_A));
    wait_until(secs(5), "target 2 to get A's datagram", || {
        two.seen().contains(&datagram_a)
    });

    let (_b, peer_b, datagram_b) = send(IMEI_B);
    let ident_b = log.wait_ident(&peer_b, secs(5));
    assert_not_listed(&mut log, &ident_b, 2);
    assert_eq!(
        text(log.dropped(&ident_b, 2).unwrap(), "proxy.transport"),
        "udp"
    );
    wait_until(secs(5), "target 1 to get B's datagram", || {
        one.seen().contains(&datagram_b)
    });
    assert!(
        !two.seen().contains(&datagram_b),
        "B never reaches target 2"
    );
    log.assert_well_formed();
}
