//! Issue 13, defect 10: one non-mandatory target alone was dropped as soon
//! as the device was faster than it (a 2 GiB stream delivered 55 MB, then
//! `target buffer overflow`). SPEC (Backpressure): "When no mandatory
//! target is connected, the device is read at the pace of the fastest
//! non-mandatory target, which therefore never overflows (one
//! non-mandatory target alone is never dropped for being slower than the
//! device)"; a slower one beside it is still dropped, and the fast one
//! goes on at full speed.

mod util;

use util::*;

const MIB: usize = 1 << 20;

/// More than the kernel's buffers towards a target with a small receive
/// buffer hold (the daemon's send buffer grows to 4 MiB at most), so the
/// daemon has to hold the device back or queue megabytes.
const STREAM: usize = 12 * MIB;

#[test]
fn one_slow_non_mandatory_target_alone_sets_the_pace_and_gets_everything() {
    let target = Target::start_small_buffer(Behaviour::Paced {
        bytes_per_second: 4 * MIB,
    });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_TARGET1_MANDATORY", "false"),
        ("PROXY_TARGET_BUFFER", "64KiB"),
        ("PROXY_STORE", "false"),
    ]);
    let stream = random_bytes(50, STREAM);
    let mut device = Device::connect(daemon.addr());
    device.send_in_random_writes(&stream, 51);
    device.shutdown_write();
    let ended = device.read_until_end(secs(30));
    assert_eq!(ended.end, End::Eof, "the device must be closed normally");

    let conn = &target.wait_connections(1, secs(5))[0];
    conn.wait_done(secs(10));
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(
        log.wait_reason(&ident, 0, secs(10)),
        "closed by peer",
        "{}",
        log.summary()
    );
    log.assert_well_formed();
    let dropped = log.dropped(&ident, 1).expect("event 2 of target 1");
    assert_eq!(
        text(dropped, "proxy.reason"),
        "closed by peer",
        "the only target must not be dropped for being slower than the device: {dropped}"
    );
    assert_same_bytes("the target's stream", &stream, &conn.received());
    assert_eq!(number(dropped, "proxy.bytes.sent"), STREAM as u64);
    daemon.assert_no_errors();
}

#[test]
fn beside_a_fast_non_mandatory_target_a_slow_one_is_dropped_alone() {
    let fast = Target::start(Behaviour::Record);
    let slow = Target::start_small_buffer(Behaviour::NeverRead);
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &fast.address()),
        ("PROXY_TARGET1_MANDATORY", "false"),
        ("PROXY_TARGET2", &slow.address()),
        ("PROXY_TARGET2_MANDATORY", "false"),
        ("PROXY_TARGET_BUFFER", "64KiB"),
        ("PROXY_STORE", "false"),
    ]);
    let stream = random_bytes(52, STREAM);
    let mut device = Device::connect(daemon.addr());
    device.send_in_random_writes(&stream, 53);
    device.shutdown_write();
    let ended = device.read_until_end(secs(30));
    assert_eq!(ended.end, End::Eof, "the device must be closed normally");

    let conn = &fast.wait_connections(1, secs(5))[0];
    conn.wait_done(secs(10));
    assert_same_bytes("the fast target's stream", &stream, &conn.received());
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(10)), "closed by peer");
    log.assert_well_formed();
    let fast_drop = log.dropped(&ident, 1).expect("event 2 of target 1");
    assert_eq!(
        text(fast_drop, "proxy.reason"),
        "closed by peer",
        "{fast_drop}"
    );
    assert_eq!(number(fast_drop, "proxy.bytes.sent"), STREAM as u64);
    let slow_drop = log.dropped(&ident, 2).expect("event 2 of target 2");
    assert_eq!(
        text(slow_drop, "proxy.reason"),
        "target buffer overflow",
        "{slow_drop}"
    );
    assert!(number(slow_drop, "proxy.bytes.sent") < STREAM as u64);
    daemon.assert_no_errors();
}
