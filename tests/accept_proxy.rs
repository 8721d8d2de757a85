//! Devices behind a balancer that sends a PROXY protocol header
//! (PROXY_ACCEPT_PROXY_PROTOCOL): what is recorded for a device closed while
//! its header is awaited, and for device bytes that come with the header.
//! Refused headers and real HAProxy in front: tests/load_balancer.rs.

mod util;

use std::net::SocketAddr;

use serde_json::Value;
use util::*;

/// (event, source) of each message, in file order.
fn events(lines: &[&Value]) -> Vec<(u64, u64)> {
    lines.iter().map(|m| (event(m), source(m))).collect()
}

/// Review finding: a device closed while its header was awaited (by an
/// operator, at shutdown) got an event 2 without its event 1.
#[test]
fn a_device_closed_while_its_header_is_awaited_gets_its_event_1_first() {
    let target = Target::start(Behaviour::Record);
    let mut daemon = Daemon::start_with_control(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_ACCEPT_PROXY_PROTOCOL", "v1"),
    ]);
    let first = Device::connect(daemon.addr());
    let second = Device::connect(daemon.addr());
    let socket = daemon.control_socket();
    let listed = |device: &Device| -> Option<String> {
        let reply = ctl_json(&socket, &["list"]);
        let connections = reply["connections"].as_array()?.clone();
        connections
            .iter()
            .find(|c| text(c, "peer") == device.name())
            .map(|c| text(c, "ident").to_string())
    };
    wait_until(secs(5), "both devices listed", || {
        listed(&first).is_some() && listed(&second).is_some()
    });
    let (closed, stopped) = (listed(&first).unwrap(), listed(&second).unwrap());
    let reply = daemon.ctl(&["close", &closed]);
    assert!(reply.status.success(), "ctl close: {}", reply.stderr);
    daemon.stop();

    let mut log = daemon.log();
    log.refresh();
    for (ident, why) in [(&closed, "closed by operator"), (&stopped, "shutdown")] {
        let lines = log.of_ident(ident);
        assert_eq!(
            events(&lines),
            [(1, 0), (2, 0)],
            "{ident}: event 1 first, then event 2: {}",
            log.summary()
        );
        assert_eq!(text(lines[1], "proxy.reason"), why);
    }
    assert!(
        target.connections().is_empty(),
        "no target is connected before the header"
    );
    log.assert_well_formed();
    daemon.assert_no_errors();
}

/// The same finding, for the idle timeout when it is shorter than the
/// header's own limit (PROXY_CONNECT_TIMEOUT).
#[test]
fn a_device_idle_while_its_header_is_awaited_gets_its_event_1_first() {
    let target = Target::start(Behaviour::Record);
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_ACCEPT_PROXY_PROTOCOL", "v1"),
        ("PROXY_IDLE_TIMEOUT", "300ms"),
        ("PROXY_CONNECT_TIMEOUT", "10s"),
    ]);
    let mut device = Device::connect(daemon.addr());
    let ended = device.read_until_end(secs(5));
    assert_ne!(
        ended.end,
        End::StillOpen,
        "the idle device was never closed"
    );

    let mut log = daemon.log();
    log.wait_for(secs(5), "the device's event 2", |log| {
        log.lines().iter().any(|m| event(m) == 2 && source(m) == 0)
    });
    let groups = log.by_ident();
    let lines: Vec<&Value> = groups.values().flatten().copied().collect();
    assert_eq!(events(&lines), [(1, 0), (2, 0)], "{}", log.summary());
    assert_eq!(text(lines[0], "peer"), device.name());
    assert_eq!(text(lines[1], "proxy.reason"), "idle timeout");
    log.assert_well_formed();
    daemon.assert_no_errors();
}

/// Review finding: device bytes that came in the same read as the header
/// were counted in `proxy.bytes.received` but not stored when a mandatory
/// target failed at once, so the stored payloads were not what the device
/// sent.
#[test]
fn bytes_that_come_with_the_header_are_stored_when_a_mandatory_target_fails_at_once() {
    let daemon = Daemon::start(&[
        // TCP to the broadcast address fails in connect() itself
        // ("network unreachable"): no packet leaves the host.
        ("PROXY_TARGET1", "255.255.255.255:9"),
        ("PROXY_ACCEPT_PROXY_PROTOCOL", "v1"),
    ]);
    let source: SocketAddr = "192.0.2.7:4000".parse().unwrap();
    let report = b"IMEI123456,lat,lon";
    let mut device = Device::connect(daemon.addr());
    let mut first_write = proxy_v1_header(source, daemon.addr()).into_bytes();
    first_write.extend_from_slice(report);
    device.send(&first_write);
    let ended = device.read_until_end(secs(5));
    assert_ne!(ended.end, End::StillOpen, "the device was never closed");

    let mut log = daemon.log();
    let ident = log.wait_ident(&source.to_string(), secs(5));
    assert_eq!(
        log.wait_reason(&ident, 0, secs(5)),
        "mandatory target 1 failed"
    );
    assert_eq!(
        events(&log.of_ident(&ident)),
        [(1, 0), (0, 0), (2, 1), (2, 0)],
        "event 1, the bytes received with the header, then the failures: {}",
        log.summary()
    );
    assert_same_bytes("stored payload", report, &log.payload(&ident, 0));
    let dropped = log.dropped(&ident, 0).unwrap();
    assert_eq!(number(dropped, "proxy.bytes.received"), report.len() as u64);
    log.assert_well_formed();
}
