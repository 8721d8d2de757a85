//! The control socket's protocol under abuse (issues 12 and 13): a client
//! that never reads its replies cannot grow the daemon (issue 13, defect
//! 5), a client that reads late gets every reply, `ctl close --device`
//! closes only that device's connections, and no bytes, however crafted,
//! panic the request parser (property tests of the parse path the server
//! runs, then garbage over the real socket).

mod util;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Instant;

use proptest::prelude::*;
use proxy_channel::control::protocol::{LineReader, MAX_REQUEST, Reply, Request};
use serde_json::Value;
use util::*;

const STATS: &[u8] = b"{\"command\":\"stats\"}\n";
/// How much the flood may grow the daemon; the defect grew it by 340 MB
/// for 17 MB of requests.
const GROWTH_LIMIT_KIB: u64 = 20 * 1024;
const FLOOD_BYTES: usize = 32 << 20;

/// How a flood of requests without a read ended.
#[derive(Debug, PartialEq, Eq)]
enum FloodEnd {
    /// The daemon hung up.
    Disconnected,
    /// No byte was taken for 2 s: the daemon stopped reading.
    Blocked,
    /// The daemon read all of it.
    AllWritten,
    /// The test stopped it (time out, or the daemon had already grown).
    Stopped,
}

/// Writes `stats` requests to the control socket, never reading, until
/// FLOOD_BYTES, 20 s, `stop`, or the daemon stops taking them.
fn flood(socket: &Path, stop: &AtomicBool) -> (usize, FloodEnd) {
    let stream = UnixStream::connect(socket).expect("connect the flood");
    stream
        .set_write_timeout(Some(secs(2)))
        .expect("write timeout");
    let chunk = STATS.repeat(64 * 1024 / STATS.len());
    let deadline = Instant::now() + secs(20);
    let mut written = 0;
    while written < FLOOD_BYTES {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return (written, FloodEnd::Stopped);
        }
        match (&stream).write(&chunk[written % chunk.len()..]) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return (written, FloodEnd::Blocked);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (written, FloodEnd::Disconnected),
        }
    }
    (written, FloodEnd::AllWritten)
}

/// Issue 13, defect 5: a control client that wrote requests and never
/// read a reply grew the daemon without bound (17 MB of requests: RSS
/// 3 MB -> 340 MB). It is not read from while its replies wait, and is
/// dropped past 1 MiB of them; other clients are served meanwhile.
#[test]
fn a_client_that_never_reads_its_replies_cannot_grow_the_daemon() {
    let daemon = Daemon::start_with_control(&[]);
    let socket = daemon.control_socket();
    let mut normal = ControlClient::connect(&socket);
    assert_eq!(normal.ask(STATS)["ok"], true);
    let before = daemon.vm_rss_kib();

    let stop = Arc::new(AtomicBool::new(false));
    let flooding = {
        let (socket, stop) = (socket.clone(), Arc::clone(&stop));
        thread::spawn(move || flood(&socket, &stop))
    };
    let mut peak = before;
    let mut answered = 0;
    let deadline = Instant::now() + secs(40);
    while !flooding.is_finished() && Instant::now() < deadline {
        peak = peak.max(daemon.vm_rss_kib());
        if peak - before > GROWTH_LIMIT_KIB {
            // Past the bound already: stop feeding it.
            stop.store(true, Ordering::SeqCst);
        }
        let reply = normal.ask(STATS);
        assert_eq!(
            reply["ok"], true,
            "a normal client during the flood: {reply}"
        );
        answered += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let (written, end) = flooding.join().expect("the flood thread");
    peak = peak.max(daemon.vm_rss_kib());

    assert!(
        peak - before < GROWTH_LIMIT_KIB,
        "the daemon grew from {before} KiB to {peak} KiB while a client wrote {written} bytes \
         of requests and read nothing (ended: {end:?})"
    );
    assert!(
        matches!(end, FloodEnd::Disconnected | FloodEnd::Blocked),
        "the daemon took {written} bytes of requests from a client that reads nothing \
         (ended: {end:?}; it grew from {before} KiB to {peak} KiB)"
    );
    assert!(answered > 0, "the normal client was never asked");
    assert_eq!(normal.ask(STATS)["ok"], true, "the normal client after");
    let finished = daemon.ctl(&["stats"]);
    assert!(finished.status.success(), "ctl stats: {}", finished.stderr);
    daemon.assert_no_errors();
}

/// Pausing is not dropping: a client that writes batches of requests
/// before reading (replies under 1 MiB a batch) gets every reply, in
/// order, once it reads; and the same connection goes on.
#[test]
fn a_client_that_reads_its_replies_late_gets_every_one() {
    let daemon = Daemon::start_with_control(&[]);
    let socket = daemon.control_socket();
    let mut client = ControlClient::connect(&socket);
    let batch = 500;
    client.send(&STATS.repeat(batch));
    // The daemon answers what fits, then waits for the client to read:
    // another client is served meanwhile, and the second batch waits
    // unread until the client has read the replies to the first.
    let mut other = ControlClient::connect(&socket);
    assert_eq!(other.ask(STATS)["ok"], true, "another client meanwhile");
    client.send(&STATS.repeat(batch));
    for n in 0..2 * batch {
        let reply = client.reply();
        assert!(
            reply["ok"] == true && reply.get("stats").is_some(),
            "reply {n}: {reply}"
        );
    }
    let reply = client.ask(b"{\"command\":\"list\"}\n");
    assert!(reply.get("connections").is_some(), "{reply}");
    daemon.assert_no_errors();
}

/// `ctl close --device D`: no connection has a recognised device yet, so
/// it closes nothing, says so (exit 1), and every connection stays open.
#[test]
fn close_by_device_closes_only_that_devices_connections() {
    let daemon = Daemon::start_with_control(&[]);
    let devices: Vec<Device> = (0..3).map(|_| Device::connect(daemon.addr())).collect();
    let mut log = daemon.log();
    for device in &devices {
        log.wait_ident(device.name(), secs(5));
    }
    let socket = daemon.control_socket();
    let open = || {
        ctl_json(&socket, &["list"])["connections"]
            .as_array()
            .map(Vec::len)
    };
    assert_eq!(open(), Some(3));

    let finished = daemon.ctl(&["close", "--device", "356307042441013"]);
    assert_eq!(finished.status.code(), Some(1), "{finished:?}");
    assert_eq!(
        finished.stderr,
        "proxy-channel: no connection of device 356307042441013\n"
    );
    assert!(finished.stdout.is_empty(), "{finished:?}");
    let json = daemon.ctl(&["close", "--device", "356307042441013", "--json"]);
    assert_eq!(json.status.code(), Some(1), "{json:?}");
    assert_eq!(open(), Some(3), "connections after closing another device");

    let mut raw = ControlClient::connect(&socket);
    let reply =
        raw.ask(b"{\"command\":\"close\",\"device\":\"x\",\"ident\":\"0123456789abcdef\"}\n");
    assert_eq!(reply["ok"], false, "{reply}");
    let usage = daemon.ctl(&["close", "0123456789abcdef", "--device", "x"]);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "an ident and a device: {usage:?}"
    );
    daemon.assert_no_errors();
}

/// What the server does with a client's bytes, without the workers: cut
/// them into lines as they come in `chunks`, parse each request line, and
/// encode the error reply of each one it refuses. Returns every line taken
/// (up to an overlong one) and checks each step's promises.
fn serve_bytes(chunks: &[Vec<u8>]) -> Result<Vec<Result<Vec<u8>, ()>>, TestCaseError> {
    let mut reader = LineReader::default();
    let mut taken = Vec::new();
    for chunk in chunks {
        reader.push(chunk);
        for line in reader.take_lines() {
            let Ok(line) = line else {
                taken.push(Err(()));
                prop_assert_eq!(reader.held(), 0, "an overlong line drops what is held");
                return Ok(taken);
            };
            prop_assert!(line.len() <= MAX_REQUEST && !line.contains(&b'\n'));
            match Request::parse(&line) {
                Ok(request) => {
                    let again = Request::parse(request.to_line().trim_end().as_bytes());
                    prop_assert_eq!(again, Ok(request));
                }
                Err(why) => {
                    let reply = Reply::Refused(why.to_string()).to_line();
                    prop_assert!(reply.ends_with('\n') && reply.matches('\n').count() == 1);
                    let value: Value = serde_json::from_str(&reply).expect("a JSON reply");
                    prop_assert_eq!(&value["ok"], &Value::Bool(false));
                }
            }
            taken.push(Ok(line));
        }
        prop_assert!(reader.held() <= MAX_REQUEST, "held {}", reader.held());
    }
    Ok(taken)
}

/// Cuts `bytes` at the given points.
fn chunked(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for point in points.into_iter().chain([bytes.len()]) {
        chunks.push(bytes[start..point].to_vec());
        start = point;
    }
    chunks
}

/// JSON a request parser has to survive: requests with odd arguments,
/// extra and duplicate keys, wrong types, deep nesting, huge numbers.
fn crafted_line() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        Just("list".to_string()),
        Just("stats".to_string()),
        Just("close".to_string()),
        "\\PC{0,20}",
    ];
    let value = prop_oneof![
        word.clone()
            .prop_map(|w| serde_json::to_string(&w).expect("a string")),
        Just("null".to_string()),
        Just("1e999".to_string()),
        Just("-0".to_string()),
        Just("18446744073709551616".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        (1usize..2000).prop_map(|depth| "[".repeat(depth) + &"]".repeat(depth)),
        (1usize..2000).prop_map(|depth| "{\"a\":".repeat(depth)),
        "\\PC{0,40}",
    ];
    let key = prop_oneof![
        Just("command"),
        Just("ident"),
        Just("device"),
        Just("ok"),
        Just(""),
    ];
    proptest::collection::vec((key, value), 0..5).prop_map(|fields| {
        let fields: Vec<String> = fields
            .into_iter()
            .map(|(key, value)| format!("\"{key}\":{value}"))
            .collect();
        format!("{{{}}}", fields.join(","))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_parse_path(
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let whole = serve_bytes(std::slice::from_ref(&bytes))?;
        let pieces = serve_bytes(&chunked(&bytes, &cuts))?;
        prop_assert_eq!(whole, pieces, "the lines do not depend on how the bytes arrive");
    }

    #[test]
    fn random_lines_never_panic_the_parse_path(
        lines in proptest::collection::vec(
            prop_oneof![crafted_line(), "\\PC{0,80}", Just(String::new())],
            0..20,
        ),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let bytes: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\n").into_bytes()).collect();
        let taken = serve_bytes(&chunked(&bytes, &cuts))?;
        prop_assert_eq!(taken.len(), lines.len());
    }

    #[test]
    fn random_reply_lines_never_panic_ctl(
        line in prop_oneof![crafted_line(), "\\PC{0,200}"],
        kind in 0usize..4,
    ) {
        let request = [
            Request::List,
            Request::Stats,
            Request::Close("0123456789abcdef".into()),
            Request::CloseDevice("d".into()),
        ][kind].clone();
        if let Ok(reply) = Reply::parse(&request, &line) {
            prop_assert!(!matches!(reply, Reply::Refused(_)));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Lines around the 64 KiB limit: up to it they are requests, past it
    /// the input ends there, however the bytes arrive.
    #[test]
    fn lines_around_the_limit_are_taken_or_refused_whole(
        length in (MAX_REQUEST - 2)..(MAX_REQUEST + 3),
        newline in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        let mut bytes = b"{\"command\":\"list\"}\n".to_vec();
        bytes.extend(std::iter::repeat_n(b' ', length));
        if newline {
            bytes.extend_from_slice(b"\n{\"command\":\"stats\"}\n");
        }
        let taken = serve_bytes(&chunked(&bytes, &cuts))?;
        let expected = match (length <= MAX_REQUEST, newline) {
            (true, true) => 3,
            (true, false) => 1,
            (false, _) => 2,
        };
        prop_assert_eq!(taken.len(), expected, "{:?}", taken.iter().map(|l| l.is_ok()).collect::<Vec<_>>());
        prop_assert_eq!(taken.last().map(Result::is_err), Some(length > MAX_REQUEST));
    }
}

/// Garbage over the real socket: every line gets one JSON reply, the
/// daemon stays up, and a normal `ctl stats` works after.
#[test]
fn garbage_over_the_socket_gets_a_reply_per_line_and_ctl_still_works() {
    let daemon = Daemon::start_with_control(&[]);
    let socket = daemon.control_socket();
    for seed in 0..20u64 {
        let mut garbage = random_bytes(seed, 4000 + 500 * seed as usize);
        garbage.push(b'\n');
        let lines = garbage.iter().filter(|&&b| b == b'\n').count();
        let replies = send_and_read_to_end(&socket, &garbage);
        assert_eq!(replies.len(), lines, "seed {seed}: one reply per line");
        for reply in &replies {
            let value: Value = serde_json::from_str(reply)
                .unwrap_or_else(|e| panic!("seed {seed}: reply {reply:?} is not JSON: {e}"));
            assert!(value["ok"].is_boolean(), "seed {seed}: {value}");
        }
    }
    let finished = daemon.ctl(&["stats"]);
    assert!(finished.status.success(), "ctl stats: {}", finished.stderr);
    assert!(
        finished.stdout.starts_with("connections open"),
        "{}",
        finished.stdout
    );
    daemon.assert_no_errors();
}

/// Sends `bytes`, closes the sending side, and reads reply lines until the
/// daemon hangs up (10 s at most).
fn send_and_read_to_end(socket: &PathBuf, bytes: &[u8]) -> Vec<String> {
    let stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(secs(10)))
        .expect("read timeout");
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        let bytes = bytes.to_vec();
        thread::spawn(move || {
            stream.write_all(&bytes).expect("send garbage");
            stream
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
        })
    };
    let mut replies = Vec::new();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => replies.push(line),
            Err(e) => panic!("reading replies: {e}"),
        }
    }
    writer.join().expect("the writer");
    replies
}
