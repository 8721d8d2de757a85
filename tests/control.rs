//! Issue 6, operating the daemon: `proxy-channel ctl list|close|stats` on
//! the control socket, and the Prometheus metrics file, checked against
//! what the test itself sent and received, byte for byte and connection
//! for connection; the socket's protection (mode 0600, another user is
//! refused), bad requests, and a stale or live socket at start.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use util::*;

const DEVICES: usize = 50;
/// The index of "closed by operator" in the stats' drop kinds (and its
/// metrics label), as the README's reasons table orders them.
const OPERATOR: usize = 9;
const DROP_LABELS: [&str; 15] = [
    "closed_by_peer",
    "reset_by_peer",
    "idle_timeout",
    "connect_failed",
    "connect_timeout",
    "mandatory_target",
    "target_buffer_overflow",
    "device_failed",
    "too_many_connections",
    "closed_by_operator",
    "bad_proxy_header",
    "shutdown",
    "device_not_listed",
    "replaced",
    "other",
];

/// One device of the fifty, and what went each way.
struct Peer {
    device: Device,
    sent: Vec<u8>,
    received: Vec<u8>,
}

/// Sends `bytes` and reads until both targets have answered for every byte
/// the device has sent.
fn send_and_wait_for_replies(peer: &mut Peer, bytes: &[u8]) {
    peer.device.send(bytes);
    peer.sent.extend_from_slice(bytes);
    let deadline = Instant::now() + secs(10);
    let answered = |received: &[u8]| {
        let (_, one) = tagged_replies(received, 1);
        let (_, two) = tagged_replies(received, 2);
        (one, two)
    };
    for _ in 0..1000 {
        let (one, two) = answered(&peer.received);
        if one == peer.sent.len() && two == peer.sent.len() {
            return;
        }
        assert!(
            one <= peer.sent.len() && two <= peer.sent.len(),
            "replies for more than was sent"
        );
        let left = deadline.saturating_duration_since(Instant::now());
        let more = peer.device.read_at_least(1, left);
        peer.received.extend_from_slice(&more);
    }
    panic!("device {} never got all its replies", peer.device.name());
}

/// `ctl list --json`'s connections by peer.
fn list_by_peer(socket: &Path) -> BTreeMap<String, Value> {
    let reply = ctl_json(socket, &["list"]);
    let connections = reply["connections"].as_array().expect("connections");
    let by_peer: BTreeMap<String, Value> = connections
        .iter()
        .map(|c| (text(c, "peer").to_string(), c.clone()))
        .collect();
    assert_eq!(by_peer.len(), connections.len(), "one entry per peer");
    by_peer
}

/// Checks one `ctl list` entry against what its device saw.
fn assert_listed(entry: &Value, peer: &Peer, ident: &str) {
    let name = peer.device.name();
    assert_eq!(text(entry, "ident"), ident, "{name}: ident");
    assert_eq!(
        number(entry, "bytes_received"),
        peer.sent.len() as u64,
        "{name}: bytes received from the device"
    );
    assert_eq!(
        number(entry, "bytes_sent"),
        peer.received.len() as u64,
        "{name}: bytes sent to the device"
    );
    assert_eq!(number(entry, "queued"), 0, "{name}: queued for the device");
    let age = entry["age_seconds"].as_f64().expect("age_seconds");
    let idle = entry["idle_seconds"].as_f64().expect("idle_seconds");
    assert!(
        (0.0..60.0).contains(&idle) && idle <= age,
        "{name}: age {age}, idle {idle}"
    );
    let targets = entry["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2, "{name}: two targets in {entry}");
    for (target, tag) in targets.iter().zip([1u8, 2]) {
        assert_eq!(number(target, "target"), u64::from(tag));
        assert_eq!(text(target, "state"), "connected", "{name}: {target}");
        assert_eq!(number(target, "queued"), 0, "{name}: {target}");
        assert_eq!(
            number(target, "bytes_sent"),
            peer.sent.len() as u64,
            "{name}: bytes sent to target {tag}"
        );
        assert_eq!(
            number(target, "bytes_received"),
            tagged_replies(&peer.received, tag).0 as u64,
            "{name}: bytes received from target {tag}"
        );
    }
}

#[test]
fn fifty_devices_through_two_targets_are_listed_closed_and_counted_exactly() {
    if !require(Need::PrometheusClient, "parse the metrics file") {
        return;
    }
    let targets = [
        Target::start(Behaviour::Reply { tag: 1 }),
        Target::start(Behaviour::Reply { tag: 2 }),
    ];
    let metrics_dir = tempfile::tempdir().unwrap();
    let metrics = metrics_dir.path().join("proxy_channel.prom");
    let daemon = Daemon::start_with_control(&[
        ("PROXY_TARGET1", &targets[0].address()),
        ("PROXY_TARGET2", &targets[1].address()),
        ("PROXY_METRICS_FILE", metrics.to_str().unwrap()),
        ("PROXY_METRICS_INTERVAL", "200ms"),
    ]);
    let socket = daemon.control_socket();
    let mut peers: Vec<Peer> = (0..DEVICES)
        .map(|_| Peer {
            device: Device::connect(daemon.addr()),
            sent: Vec::new(),
            received: Vec::new(),
        })
        .collect();
    for (index, peer) in peers.iter_mut().enumerate() {
        let bytes = random_bytes(600 + index as u64, 100 + 37 * index);
        send_and_wait_for_replies(peer, &bytes);
    }
    let mut log = daemon.log();
    let idents: Vec<String> = peers
        .iter()
        .map(|p| log.wait_ident(p.device.name(), secs(5)))
        .collect();

    // ctl list: every device, with its peer, ident and byte counts.
    let listed = list_by_peer(&socket);
    let names: BTreeSet<&str> = peers.iter().map(|p| p.device.name()).collect();
    assert_eq!(
        listed.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        names,
        "ctl list's peers"
    );
    for (peer, ident) in peers.iter().zip(&idents) {
        assert_listed(&listed[peer.device.name()], peer, ident);
    }
    let table = daemon.ctl(&["list"]);
    assert!(table.status.success(), "ctl list: {}", table.stderr);
    assert!(
        table
            .stdout
            .ends_with(&format!("\n{DEVICES} connections\n")),
        "ctl list's last line: {:?}",
        table.stdout.lines().last()
    );
    for (peer, ident) in peers.iter().zip(&idents) {
        let row = table
            .stdout
            .lines()
            .find(|l| l.starts_with(ident.as_str()))
            .unwrap_or_else(|| panic!("no row for {ident} in:\n{}", table.stdout));
        let fields: Vec<&str> = row.split_whitespace().collect();
        let expected = [
            peer.device.name().to_string(),
            peer.sent.len().to_string(),
            peer.received.len().to_string(),
        ];
        assert_eq!(
            [fields[1], fields[4], fields[5]],
            [&*expected[0], &*expected[1], &*expected[2]],
            "peer, received, sent in row {row:?}"
        );
    }

    // ctl close: exactly that device, with "closed by operator".
    let closed = 7;
    let gone = &idents[closed];
    let finished = daemon.ctl(&["close", gone]);
    assert!(finished.status.success(), "ctl close: {}", finished.stderr);
    assert_eq!(finished.stdout, format!("closed {gone}\n"));
    let mut closed_peer = peers.remove(closed);
    let end = closed_peer.device.read_until_end(secs(5)).end;
    assert_ne!(
        end,
        End::StillOpen,
        "the closed device's connection is still open"
    );
    for source_n in 0..=2 {
        let reason = log.wait_reason(gone, source_n, secs(5));
        assert_eq!(reason, "closed by operator", "source {source_n} of {gone}");
    }
    for target in &targets {
        wait_until(
            secs(5),
            "the closed device's target connection to end",
            || target.connections().iter().filter(|c| c.done()).count() == 1,
        );
    }
    let again = daemon.ctl(&["close", gone]);
    assert_eq!(again.status.code(), Some(1), "closing it again: {again:?}");
    assert!(
        again
            .stderr
            .contains(&format!("no open connection with ident {gone}")),
        "closing it again: {}",
        again.stderr
    );

    // The others go on.
    for peer in peers.iter_mut() {
        send_and_wait_for_replies(peer, b"still here");
    }
    let listed = list_by_peer(&socket);
    assert_eq!(listed.len(), DEVICES - 1, "connections after the close");
    let idents: Vec<&String> = idents.iter().filter(|i| *i != gone).collect();
    for (peer, ident) in peers.iter().zip(&idents) {
        assert_listed(&listed[peer.device.name()], peer, ident);
    }

    // ctl stats and the metrics file: exactly what went through.
    peers.push(closed_peer);
    let sent: u64 = peers.iter().map(|p| p.sent.len() as u64).sum();
    let received: u64 = peers.iter().map(|p| p.received.len() as u64).sum();
    let replied = |tag: u8| -> u64 {
        targets[usize::from(tag) - 1]
            .connections()
            .iter()
            .map(|c| c.sent_len() as u64)
            .sum()
    };
    assert_eq!(replied(1) + replied(2), received, "replies the devices got");
    let stats = wait_for_quiet_stats(&socket, &mut log);
    let mut drops = [[0u64; DROP_LABELS.len()]; 4];
    for side in drops.iter_mut().take(3) {
        side[OPERATOR] = 1;
    }
    let packets = |source_n: u64| {
        log.lines()
            .iter()
            .filter(|m| event(m) == 0 && source(m) == source_n)
            .count() as u64
    };
    let expected = serde_json::json!({
        "connections_open": DEVICES - 1,
        "connections_total": DEVICES,
        "connections_refused": 0,
        "refusals": [0, 0, 0],
        "bytes_received": [sent, replied(1), replied(2), 0],
        "bytes_sent": [received, sent, sent, 0],
        "packets": [packets(0), packets(1), packets(2), 0],
        "connect_failures": [0, 0, 0, 0],
        "drops": drops,
        "messages_queued": log.lines().len(),
        "messages_written": log.lines().len(),
        "writer_queue_depth": 0,
        "write_errors": 0,
    });
    assert_eq!(stats["stats"], expected, "ctl stats --json");
    assert_eq!(stats["targets"], serde_json::json!([1, 2]));
    assert_stats_table(&daemon, &expected);
    assert_metrics_agree(&metrics, &expected);
    daemon.assert_no_errors();
}

/// A device refused at PROXY_MAX_CONNECTIONS is counted by its cause in
/// ctl stats and the metrics file, and, since the SPEC's Security section,
/// costs no message at all (first counted as a too_many_connections drop
/// with two messages: defect 10 of issue 6, then issue 13 item 11).
#[test]
fn a_device_refused_at_max_connections_is_counted_by_cause_and_writes_nothing() {
    let metrics_dir = tempfile::tempdir().unwrap();
    let metrics = metrics_dir.path().join("proxy_channel.prom");
    let daemon = Daemon::start_with_control(&[
        ("PROXY_MAX_CONNECTIONS", "1"),
        ("PROXY_METRICS_FILE", metrics.to_str().unwrap()),
        ("PROXY_METRICS_INTERVAL", "200ms"),
    ]);
    let mut log = daemon.log();
    let held = Device::connect(daemon.addr());
    log.wait_ident(held.name(), secs(5));
    let mut refused = Device::connect(daemon.addr());
    assert_ne!(
        refused.read_until_end(secs(5)).end,
        End::StillOpen,
        "the second device must be closed at once"
    );

    let stats = ctl_json(&daemon.control_socket(), &["stats"]);
    assert_eq!(stats["stats"]["connections_refused"], 1, "{stats}");
    assert_eq!(
        stats["stats"]["refusals"],
        serde_json::json!([0, 1, 0]),
        "{stats}"
    );
    let drops = [[0u64; DROP_LABELS.len()]; 4];
    assert_eq!(
        stats["stats"]["drops"],
        serde_json::json!(drops),
        "a refusal is no drop of a connection: nothing was opened"
    );
    let table = daemon.ctl(&["stats"]);
    let line = "refused by cause       not_allowed 0, too_many_connections 1, too_many_per_ip 0";
    assert!(
        table.stdout.lines().any(|l| l == line),
        "expected the line {line:?} in ctl stats:\n{}",
        table.stdout
    );
    let sample =
        "proxy_channel_connections_refused_by_cause_total{cause=\"too_many_connections\"} 1\n";
    let counted = poll_until(secs(5), || {
        fs::read_to_string(&metrics).is_ok_and(|text| text.contains(sample))
    });
    assert!(
        counted,
        "expected {sample:?} in the metrics file:\n{}",
        fs::read_to_string(&metrics).unwrap_or_default()
    );
    drop(held);
    // The held device's event 2 is written after the refusal happened.
    log.wait_for(secs(5), "the held device's event 2", |log| {
        log.lines().iter().any(|m| event(m) == 2)
    });
    assert_eq!(
        log.ident_of_peer(refused.name()),
        None,
        "a refused device must cost no message:\n{}",
        log.summary()
    );
    daemon.assert_no_errors();
}

/// Waits until every message made is written and in the file, then
/// returns `ctl stats --json`.
fn wait_for_quiet_stats(socket: &Path, log: &mut MessageLog) -> Value {
    let mut stats = Value::Null;
    let quiet = poll_until(secs(10), || {
        stats = ctl_json(socket, &["stats"]);
        log.refresh();
        let s = &stats["stats"];
        s["writer_queue_depth"] == 0
            && s["messages_written"] == s["messages_queued"]
            && s["messages_written"].as_u64() == Some(log.lines().len() as u64)
    });
    assert!(
        quiet,
        "the writer did not catch up: {stats}, {} lines",
        log.lines().len()
    );
    stats
}

/// The human-readable `ctl stats` says the same.
fn assert_stats_table(daemon: &Daemon, s: &Value) {
    let table = daemon.ctl(&["stats"]);
    assert!(table.status.success(), "ctl stats: {}", table.stderr);
    let expected_lines = [
        format!("connections open       {}", s["connections_open"]),
        format!("connections total      {}", s["connections_total"]),
        format!(
            "device    received {} B in {} packets, sent {} B",
            s["bytes_received"][0], s["packets"][0], s["bytes_sent"][0]
        ),
        format!(
            "target 1  received {} B in {} packets, sent {} B",
            s["bytes_received"][1], s["packets"][1], s["bytes_sent"][1]
        ),
        "target 2  dropped: closed_by_operator 1".to_string(),
        format!("messages written       {}", s["messages_written"]),
    ];
    for line in expected_lines {
        assert!(
            table.stdout.lines().any(|l| l == line),
            "expected the line {line:?} in ctl stats:\n{}",
            table.stdout
        );
    }
}

/// The metrics file, once rewritten after the traffic, holds `s` exactly,
/// parses with a real Prometheus parser, and is never seen half-written.
fn assert_metrics_agree(path: &Path, s: &Value) {
    let open_line = format!("proxy_channel_connections_open {}\n", s["connections_open"]);
    let written_line = format!(
        "proxy_channel_messages_written_total {}\n",
        s["messages_written"]
    );
    wait_until(secs(5), "the metrics file to show the final counts", || {
        fs::read_to_string(path)
            .is_ok_and(|text| text.contains(&open_line) && text.contains(&written_line))
    });
    // Rewritten every 200 ms: reads across several rewrites see whole files.
    let mut reads = 0;
    wait_until(secs(5), "reads across several rewrites", || {
        let text = fs::read_to_string(path).expect("the metrics file is always there");
        assert!(
            text.ends_with("proxy_channel_write_errors_total 0\n"),
            "a metrics file read half-written:\n{text}"
        );
        reads += 1;
        reads >= 60
    });

    let mut seen: BTreeMap<String, f64> = BTreeMap::new();
    for family in parse_prometheus(path) {
        let name = text(&family, "name");
        assert!(name.starts_with("proxy_channel_"), "family {name}");
        assert!(
            matches!(text(&family, "type"), "counter" | "gauge"),
            "{name} has no TYPE line: {family}"
        );
        assert!(!text(&family, "help").is_empty(), "{name} has no HELP line");
        for sample in family["samples"].as_array().unwrap() {
            let labels = sample["labels"].as_object().unwrap();
            let mut labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                .collect();
            labels.sort();
            let key = format!("{}{{{}}}", text(sample, "name"), labels.join(","));
            let value = sample["value"].as_f64().unwrap();
            assert!(seen.insert(key.clone(), value).is_none(), "{key} twice");
        }
    }

    let n = |v: &Value| v.as_u64().unwrap() as f64;
    let mut expected: BTreeMap<String, f64> = BTreeMap::new();
    let mut put = |key: String, value: f64| {
        expected.insert(format!("proxy_channel_{key}"), value);
    };
    put("connections_open{}".into(), n(&s["connections_open"]));
    put("connections_total{}".into(), n(&s["connections_total"]));
    put(
        "connections_refused_total{}".into(),
        n(&s["connections_refused"]),
    );
    for (index, cause) in ["not_allowed", "too_many_connections", "too_many_per_ip"]
        .iter()
        .enumerate()
    {
        put(
            format!("connections_refused_by_cause_total{{cause={cause}}}"),
            n(&s["refusals"][index]),
        );
    }
    put(
        "device_bytes_received_total{}".into(),
        n(&s["bytes_received"][0]),
    );
    put("device_bytes_sent_total{}".into(), n(&s["bytes_sent"][0]));
    put("device_packets_total{}".into(), n(&s["packets"][0]));
    for (kind, label) in DROP_LABELS.iter().enumerate() {
        let value = n(&s["drops"][0][kind]);
        put(format!("device_drops_total{{reason={label}}}"), value);
    }
    for target in 1..=2 {
        let per = [
            ("target_bytes_received_total", &s["bytes_received"][target]),
            ("target_bytes_sent_total", &s["bytes_sent"][target]),
            ("target_packets_total", &s["packets"][target]),
            (
                "target_connect_failures_total",
                &s["connect_failures"][target],
            ),
        ];
        for (name, value) in per {
            put(format!("{name}{{target={target}}}"), n(value));
        }
        for (kind, label) in DROP_LABELS.iter().enumerate() {
            let value = n(&s["drops"][target][kind]);
            put(
                format!("target_drops_total{{reason={label},target={target}}}"),
                value,
            );
        }
    }
    put("messages_total{}".into(), n(&s["messages_queued"]));
    put("messages_written_total{}".into(), n(&s["messages_written"]));
    put("writer_queue_depth{}".into(), n(&s["writer_queue_depth"]));
    put("write_errors_total{}".into(), n(&s["write_errors"]));
    assert_eq!(seen, expected, "the metrics file's samples");
}

fn assert_refused(reply: &Value, why: &str, request: &str) {
    assert_eq!(reply["ok"], false, "{request}: {reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(why),
        "{request}: expected an error with {why:?}, saw {reply}"
    );
}

#[test]
fn garbage_and_oversized_requests_get_an_error_and_the_daemon_goes_on() {
    let daemon = Daemon::start_with_control(&[]);
    let socket = daemon.control_socket();
    // A client that sends half a request and waits does not hold up others.
    let mut patient = ControlClient::connect(&socket);
    patient.send(b"{\"comm");

    let mut client = ControlClient::connect(&socket);
    let bad: [(&str, &str); 8] = [
        ("hello\n", "not a request"),
        ("\n", "not a request"),
        ("[1,2]\n", "not a request"),
        ("{\"command\":\"dance\"}\n", "unknown command"),
        ("{\"command\":\"close\"}\n", "close needs an ident"),
        (
            "{\"command\":\"close\",\"ident\":\"xyz\"}\n",
            "not an ident",
        ),
        (
            "{\"command\":\"close\",\"ident\":\"+fffffffffffffff\"}\n",
            "not an ident",
        ),
        (
            "{\"command\":\"close\",\"ident\":\"0123456789abcdef\"}\n",
            "no open connection",
        ),
    ];
    for (request, why) in bad {
        assert_refused(&client.ask(request.as_bytes()), why, request);
    }
    // The same connection still answers, also two requests in one write.
    assert_eq!(client.ask(b"{\"command\":\"stats\"}\n")["ok"], true);
    client.send(b"{\"command\":\"list\"}\n{\"command\":\"stats\"}\n");
    for key in ["connections", "stats"] {
        let reply = client.reply();
        assert!(reply.get(key).is_some(), "expected {key} in {reply}");
    }

    // Over 64 KiB without a newline: an error, then the daemon hangs up
    // (a reset, as the rest of the request was left unread).
    let mut huge = ControlClient::connect(&socket);
    let reply = huge.ask(&vec![b'x'; 70 * 1024]);
    assert_refused(&reply, "longer than 65536 bytes", "70 KiB");
    let closed = huge.read_more();
    let hung_up = match &closed {
        Ok(n) => *n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        hung_up,
        "the daemon should hang up after an oversized request, read {closed:?}"
    );

    // And goes on: a new client, the CLI, and the patient client.
    let mut fresh = ControlClient::connect(&socket);
    assert_eq!(fresh.ask(b"{\"command\":\"stats\"}\n")["ok"], true);
    let finished = daemon.ctl(&["stats"]);
    assert!(finished.status.success(), "ctl stats: {}", finished.stderr);
    let reply = patient.ask(b"and\":\"stats\"}\n");
    assert_eq!(reply["ok"], true, "the patient client's request: {reply}");
    daemon.assert_no_errors();
}

#[test]
fn another_user_cannot_use_the_socket() {
    if !require(Need::Root, "run ctl as the user nobody") {
        return;
    }
    let daemon = Daemon::start_with_control(&[]);
    let socket = daemon.control_socket();
    let metadata = fs::metadata(&socket).expect("the control socket");
    assert!(
        metadata.file_type().is_socket(),
        "{} is a socket",
        socket.display()
    );
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600, "socket mode");
    // Only the socket's own mode may refuse: the folders lead to it for
    // everyone, and the binary is a copy everyone may run.
    for dir in socket.ancestors().skip(1) {
        if dir.starts_with(std::env::temp_dir()) && dir != std::env::temp_dir() {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let bin_dir = tempfile::tempdir().unwrap();
    fs::set_permissions(bin_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.path().join("proxy-channel");
    fs::copy(BIN, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |program: &Path, args: &[&str]| {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(program);
        command.args(args).uid(65534).gid(65534);
        run_command_to_exit(command, &format!("{args:?} as nobody"), secs(10))
    };
    let socket_arg = socket.to_str().unwrap();
    let seen = as_nobody(Path::new("sh"), &["-c", "test -S \"$0\"", socket_arg]);
    assert!(
        seen.status.success(),
        "nobody cannot reach the socket's folder: {seen:?}"
    );
    let version = as_nobody(&bin, &["--version"]);
    assert!(
        version.status.success(),
        "nobody cannot run the copy: {version:?}"
    );

    let refused = as_nobody(&bin, &["ctl", "stats", "--socket", socket_arg]);
    assert_eq!(refused.status.code(), Some(1), "ctl as nobody: {refused:?}");
    let expected = format!(
        "proxy-channel: cannot reach the daemon at {}: Permission denied",
        socket.display()
    );
    assert!(
        refused.stderr.starts_with(&expected) && refused.stderr.lines().count() == 1,
        "expected one line starting {expected:?}, saw {:?}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty(), "nothing on stdout: {refused:?}");
    // Its own user (root here) may; and finds it through PROXY_DATA_DIR.
    let data_dir = daemon.data_dir().to_str().unwrap();
    let own = run_to_exit(&["ctl", "stats"], &[("PROXY_DATA_DIR", data_dir)], secs(10));
    assert!(
        own.status.success(),
        "ctl stats as the daemon's user: {own:?}"
    );
    assert!(own.stdout.contains("connections open"), "{}", own.stdout);
    daemon.assert_no_errors();
}

#[test]
fn a_stale_socket_is_replaced_a_live_one_refused_and_off_means_none() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let socket_var = ("PROXY_CONTROL_SOCKET", socket.to_str().unwrap());
    let mut killed = Daemon::start_in(dir.path(), &[socket_var]);
    killed.kill_9();
    assert!(
        fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()),
        "kill -9 leaves the socket file behind"
    );
    assert!(
        UnixStream::connect(&socket).is_err(),
        "nobody answers on it"
    );

    let mut daemon = Daemon::start_in(dir.path(), &[socket_var]);
    ctl_json(&socket, &["stats"]);
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the new socket's mode");

    // A second daemon on the same folder and socket: exit 1, one clear line.
    let data_dir = dir.path().to_str().unwrap();
    let second = run_to_exit(
        &[],
        &[
            ("PROXY_LISTEN", "127.0.0.1:0"),
            ("PROXY_DATA_DIR", data_dir),
            socket_var,
        ],
        secs(10),
    );
    assert_eq!(
        second.status.code(),
        Some(1),
        "the second daemon: {second:?}"
    );
    let expected = format!(
        "proxy-channel: cannot use the control socket {}: another proxy-channel is running on it",
        socket.display()
    );
    assert!(
        second.stderr.lines().any(|l| l == expected),
        "expected the line {expected:?}, saw:\n{}",
        second.stderr
    );
    assert!(
        !second.stderr.contains("listening on"),
        "it must stop before listening:\n{}",
        second.stderr
    );
    // The first one is untouched and still answers.
    ctl_json(&socket, &["stats"]);
    daemon.stop();
    assert!(!socket.exists(), "a stopped daemon removes its socket");
    let gone = run_ctl(&socket, &["stats"]);
    assert_eq!(gone.status.code(), Some(1));
    let expected = format!(
        "proxy-channel: cannot reach the daemon at {}: ",
        socket.display()
    );
    assert!(
        gone.stderr.starts_with(&expected) && gone.stderr.lines().count() == 1,
        "expected one line starting {expected:?}, saw {:?}",
        gone.stderr
    );

    // PROXY_CONTROL_SOCKET=off: no socket at all.
    let off = Daemon::start(&[]);
    assert!(!off.control_socket().exists(), "off means no socket");
}

/// While the disk is full the workers wait on the writer; `ctl list` and
/// `ctl close` must then not give a wrong answer as if it were right:
/// list must show every open connection (or fail), and close of an open
/// connection must not say there is none (and then close it anyway).
#[test]
fn ctl_list_and_close_do_not_give_wrong_answers_while_the_disk_is_full() {
    if !require(Need::Root, "mount a tmpfs to fill") {
        return;
    }
    let disk = Tmpfs::mount("4m");
    let socket = disk.control_socket();
    let daemon = disk.start_daemon();
    let victim = Device::connect(daemon.addr());
    let mut log = daemon.log();
    let ident = log.wait_ident(victim.name(), secs(5));
    let devices: Vec<Device> = (0..4).map(|_| Device::connect(daemon.addr())).collect();
    let (filler, _) = disk.fill("filler.bin");
    let pace = Pace::trickle();
    let load = Load::start(devices, &pace, 1);
    daemon.wait_log("cannot write messages to ", 1, secs(10));
    // Wait until the writer's queue is full and the workers wait.
    let stalled = workers_stalled(&socket);
    assert!(stalled, "the workers never waited");
    let open = ctl_json(&socket, &["stats"])["stats"]["connections_open"].as_u64();
    let started = Instant::now();
    let list = run_ctl(&socket, &["list", "--json"]);
    let close = run_ctl(&socket, &["close", &ident]);
    fs::remove_file(&filler).unwrap();
    drop(load);
    if list.status.success() {
        let reply: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
        let listed = reply["connections"].as_array().unwrap().len() as u64;
        assert_eq!(
            Some(listed),
            open,
            "ctl list answered ok with {listed} connections while stats says {open:?} are open \
             (after {:?})",
            started.elapsed()
        );
    }
    assert!(
        !close.stderr.contains("no open connection"),
        "ctl close {ident} of an open connection said: {}",
        close.stderr
    );
}
