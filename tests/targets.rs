//! Issue 2, targets: replies come back only from targets with replies on;
//! a mandatory target that fails or closes takes the device connection with
//! it, a non-mandatory one is dropped alone.

mod util;

use std::time::Instant;

use util::*;

#[test]
fn only_replies_of_targets_with_replies_on_reach_the_device() {
    let first = Target::start(Behaviour::Reply { tag: 1 });
    let second = Target::start(Behaviour::Reply { tag: 2 });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &first.address()),
        ("PROXY_TARGET2", &second.address()),
        ("PROXY_TARGET2_REPLIES", "false"),
    ]);
    let mut device = Device::connect(daemon.addr());
    device.send(b"hello");
    // Replies come as they come, before the device is done.
    let early = device.read_at_least(3, secs(5));
    assert!(
        early.starts_with(b"t1:"),
        "expected target 1's reply first, saw {:?}",
        String::from_utf8_lossy(&early)
    );
    device.send(&random_bytes(3, 20_000));
    device.shutdown_write();
    let rest = device.read_until_end(secs(10));
    assert_eq!(rest.end, End::Eof, "the device must be closed normally");
    let mut received = early;
    received.extend_from_slice(&rest.bytes);

    let one = &first.wait_connections(1, secs(5))[0];
    let two = &second.wait_connections(1, secs(5))[0];
    one.wait_done(secs(5));
    two.wait_done(secs(5));
    assert!(!two.sent().is_empty(), "target 2 must have replied too");
    assert_same_bytes(
        "what the device received vs what target 1 replied",
        &one.sent(),
        &received,
    );
    assert!(
        !received.windows(3).any(|w| w == b"t2:"),
        "target 2's replies (replies off) reached the device: {:?}",
        String::from_utf8_lossy(&received)
    );

    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(5)), "closed by peer");
    log.assert_well_formed();
    assert_same_bytes(
        "stored source-1 payloads vs target 1's replies",
        &one.sent(),
        &log.payload(&ident, 1),
    );
    assert!(
        log.select(&ident, 2, 0).is_empty(),
        "replies off: expected no event 0 with source 2, saw {}",
        log.select(&ident, 2, 0).len()
    );
    let two_drop = log.dropped(&ident, 2).expect("event 2 of target 2");
    assert_eq!(
        number(two_drop, "proxy.bytes.received"),
        two.sent().len() as u64,
        "target 2's replies are read (and thrown away)"
    );
    daemon.assert_no_errors();
}

#[test]
fn a_refusing_mandatory_target_drops_the_device_within_a_second() {
    let first = Target::start(Behaviour::Record);
    let refused = RefusedPort::new();
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &first.address()),
        ("PROXY_TARGET2", &refused.address()),
    ]);
    let started = Instant::now();
    let mut device = Device::connect(daemon.addr());
    let ended = device.read_until_end(secs(5));
    let elapsed = started.elapsed();
    assert_ne!(ended.end, End::StillOpen, "the device was never closed");
    assert!(
        elapsed < secs(1),
        "expected the device to be closed within 1 s of connecting, took {elapsed:?}"
    );

    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    let device_reason = log.wait_reason(&ident, 0, secs(5));
    log.assert_well_formed();
    assert_eq!(device_reason, "mandatory target 2 failed");
    assert_eq!(
        log.reason(&ident, 2).as_deref(),
        Some("connect failed: connection refused"),
        "target 2's own reason"
    );
    assert!(
        log.select(&ident, 2, 1).is_empty(),
        "a target that could not be connected gets no event 1"
    );
    assert_eq!(
        log.reason(&ident, 1).as_deref(),
        Some("mandatory target 2 failed"),
        "the other target's reason"
    );
    let last = *log.of_ident(&ident).last().unwrap();
    assert_eq!((source(last), event(last)), (0, 2), "last: {last}");
    daemon.assert_no_errors();
}

#[test]
fn a_refusing_non_mandatory_target_is_dropped_alone() {
    let first = Target::start(Behaviour::Record);
    let refused = RefusedPort::new();
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &first.address()),
        ("PROXY_TARGET2", &refused.address()),
        ("PROXY_TARGET2_MANDATORY", "false"),
    ]);
    let mut device = Device::connect(daemon.addr());
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(
        log.wait_reason(&ident, 2, secs(5)),
        "connect failed: connection refused"
    );

    let first_part = random_bytes(10, 30_000);
    device.send(&first_part);
    let conn = &first.wait_connections(1, secs(5))[0];
    conn.wait_received(first_part.len(), secs(5));
    let second_part = random_bytes(11, 30_000);
    device.send(&second_part);
    conn.wait_received(first_part.len() + second_part.len(), secs(5));
    log.refresh();
    assert!(
        log.dropped(&ident, 0).is_none(),
        "the device must stay connected, yet: {}",
        log.summary()
    );
    device.shutdown_write();
    assert_eq!(device.read_until_end(secs(5)).end, End::Eof);
    assert_same_bytes(
        "target 1's stream",
        &[first_part, second_part].concat(),
        &conn.received(),
    );
    assert_eq!(log.wait_reason(&ident, 0, secs(5)), "closed by peer");
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("closed by peer"));
    assert!(
        log.select(&ident, 2, 1).is_empty(),
        "no event 1 for target 2"
    );
    log.assert_well_formed();
    daemon.assert_no_errors();
}

const FAREWELL: &[u8] = b"bye from target 2";

#[test]
fn a_mandatory_target_closing_mid_stream_drops_the_device_after_its_replies() {
    let first = Target::start(Behaviour::Record);
    let second = Target::start(Behaviour::CloseAfter {
        bytes: 1000,
        farewell: FAREWELL.to_vec(),
    });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &first.address()),
        ("PROXY_TARGET2", &second.address()),
    ]);
    let mut device = Device::connect(daemon.addr());
    // Exactly what target 2 reads before it closes: it leaves nothing
    // unread, so it closes with a FIN, not a reset.
    device.send(&random_bytes(20, 1000));
    let ended = device.read_until_end(secs(5));
    assert_eq!(
        ended.end,
        End::Eof,
        "expected the daemon to close the device after mandatory target 2 closed"
    );
    assert_eq!(
        String::from_utf8_lossy(&ended.bytes),
        String::from_utf8_lossy(FAREWELL),
        "target 2's last reply must be delivered before the close"
    );

    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(
        log.wait_reason(&ident, 0, secs(5)),
        "mandatory target 2 closed"
    );
    log.assert_well_formed();
    assert_eq!(log.reason(&ident, 2).as_deref(), Some("closed by peer"));
    assert_eq!(
        log.reason(&ident, 1).as_deref(),
        Some("mandatory target 2 closed")
    );
    assert_eq!(log.payload(&ident, 2), FAREWELL);
    let one = &first.wait_connections(1, secs(5))[0];
    one.wait_done(secs(5));
    daemon.assert_no_errors();
}

#[test]
fn a_non_mandatory_target_closing_mid_stream_is_dropped_alone() {
    let first = Target::start(Behaviour::Record);
    let second = Target::start(Behaviour::CloseAfter {
        bytes: 1000,
        farewell: FAREWELL.to_vec(),
    });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &first.address()),
        ("PROXY_TARGET2", &second.address()),
        ("PROXY_TARGET2_MANDATORY", "false"),
    ]);
    let mut device = Device::connect(daemon.addr());
    let first_part = random_bytes(21, 1000);
    device.send(&first_part);
    let farewell = device.read_at_least(FAREWELL.len(), secs(5));
    assert_eq!(farewell, FAREWELL, "target 2's reply reaches the device");

    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 2, secs(5)), "closed by peer");

    let second_part = random_bytes(22, 50_000);
    device.send(&second_part);
    let one = &first.wait_connections(1, secs(5))[0];
    one.wait_received(first_part.len() + second_part.len(), secs(5));
    log.refresh();
    assert!(
        log.dropped(&ident, 0).is_none() && log.dropped(&ident, 1).is_none(),
        "the device and target 1 must go on, yet: {}",
        log.summary()
    );
    device.shutdown_write();
    let rest = device.read_until_end(secs(5));
    assert_eq!(rest.end, End::Eof);
    assert!(rest.bytes.is_empty(), "nothing more to receive");
    assert_same_bytes(
        "target 1's stream",
        &[first_part, second_part].concat(),
        &one.received(),
    );
    assert_eq!(log.wait_reason(&ident, 0, secs(5)), "closed by peer");
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("closed by peer"));
    log.assert_well_formed();
    daemon.assert_no_errors();
}

/// A target that never answers: a listener with a backlog of 0 whose one
/// accept slot is taken, so the kernel drops further SYNs and a connect to
/// it neither succeeds nor is refused. Keep both values alive.
fn silent_target() -> (std::net::TcpListener, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on a socket we own.
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) };
    assert_eq!(rc, 0, "listen(0) failed");
    let filler =
        std::net::TcpStream::connect_timeout(&listener.local_addr().unwrap(), secs(2)).unwrap();
    (listener, filler)
}

#[test]
fn a_mandatory_target_that_never_answers_times_out() {
    let (listener, _filler) = silent_target();
    let silent = listener.local_addr().unwrap();
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &silent.to_string()),
        ("PROXY_CONNECT_TIMEOUT", "500ms"),
    ]);
    let started = Instant::now();
    let mut device = Device::connect(daemon.addr());
    let ended = device.read_until_end(secs(5));
    let elapsed = started.elapsed();
    assert_ne!(ended.end, End::StillOpen, "the device was never closed");
    assert!(
        elapsed >= millis(400) && elapsed < secs(2),
        "PROXY_CONNECT_TIMEOUT=500ms: expected the device closed after about 0.5 s, \
         took {elapsed:?}"
    );
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(
        log.wait_reason(&ident, 0, secs(5)),
        "mandatory target 1 failed"
    );
    log.assert_well_formed();
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("connect timeout"));
    assert!(
        log.select(&ident, 1, 1).is_empty(),
        "a target that could not be connected gets no event 1"
    );
    daemon.assert_no_errors();
}

/// Review finding: a non-mandatory target's connect timeout after the
/// device's end of stream left the device open until the idle timeout,
/// whose reason it then got.
#[test]
fn a_target_timing_out_after_the_devices_end_of_stream_lets_the_device_close() {
    let first = Target::start(Behaviour::ReplyAtEof(b"ack".to_vec()));
    let (listener, _filler) = silent_target();
    let silent = listener.local_addr().unwrap();
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &first.address()),
        ("PROXY_TARGET2", &silent.to_string()),
        ("PROXY_TARGET2_MANDATORY", "false"),
        ("PROXY_CONNECT_TIMEOUT", "500ms"),
        ("PROXY_IDLE_TIMEOUT", "10s"),
    ]);
    let mut device = Device::connect(daemon.addr());
    let started = Instant::now();
    device.send(b"report-1");
    device.shutdown_write();
    let ended = device.read_until_end(secs(5));
    let elapsed = started.elapsed();
    assert_eq!(ended.end, End::Eof, "the device was not closed in 5 s");
    assert_eq!(ended.bytes, b"ack", "target 1's reply");
    assert!(
        elapsed < secs(2),
        "closed {elapsed:?} after the device's end of stream: expected right \
         after target 2's 500 ms connect timeout"
    );
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(5)), "closed by peer");
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("closed by peer"));
    assert_eq!(log.reason(&ident, 2).as_deref(), Some("connect timeout"));
    log.assert_well_formed();
    daemon.assert_no_errors();
}

/// Review finding: when a mandatory target failed at once, the targets
/// after it got no event at all (a moment later they would have got
/// `mandatory target 1 failed`).
#[test]
fn a_mandatory_target_failing_at_once_leaves_the_other_targets_an_event_2() {
    let second = Target::start(Behaviour::Record);
    let third = Target::start(Behaviour::Record);
    let daemon = Daemon::start(&[
        // TCP to the broadcast address fails in connect() itself
        // ("network unreachable"): no packet leaves the host.
        ("PROXY_TARGET1", "255.255.255.255:9"),
        ("PROXY_TARGET2", &second.address()),
        ("PROXY_TARGET3", &third.address()),
    ]);
    let mut device = Device::connect(daemon.addr());
    let ended = device.read_until_end(secs(5));
    assert_ne!(ended.end, End::StillOpen, "the device was never closed");
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(
        log.wait_reason(&ident, 0, secs(5)),
        "mandatory target 1 failed"
    );
    assert_eq!(
        log.reason(&ident, 1).as_deref(),
        Some("connect failed: network unreachable")
    );
    for source in [2, 3] {
        assert_eq!(
            log.reason(&ident, source).as_deref(),
            Some("mandatory target 1 failed"),
            "target {source}: {}",
            log.summary()
        );
        assert!(
            log.select(&ident, source, 1).is_empty(),
            "target {source} was never connected: no event 1"
        );
    }
    assert!(
        second.connections().is_empty() && third.connections().is_empty(),
        "targets 2 and 3 are not connected once target 1 has failed"
    );
    log.assert_well_formed();
}
