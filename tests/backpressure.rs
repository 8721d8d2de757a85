//! Issue 2, backpressure: a non-mandatory target that does not keep up is
//! dropped alone; a mandatory one that stops reading holds the device back
//! through TCP, with bounded daemon memory and no byte lost.

mod util;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use util::*;

const MIB: usize = 1 << 20;

#[test]
fn a_non_mandatory_target_that_never_reads_overflows_alone() {
    let reader = Target::start(Behaviour::Record);
    // A small kernel receive buffer, so that its socket fills after a few
    // MiB (the daemon's send buffer), not after the 32 MiB Linux allows.
    let sleeper = Target::start_small_buffer(Behaviour::NeverRead);
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &reader.address()),
        ("PROXY_TARGET2", &sleeper.address()),
        ("PROXY_TARGET2_MANDATORY", "false"),
        ("PROXY_TARGET_BUFFER", "64KiB"),
        // Not needed here, and 32 MiB of hex would only slow the test down.
        ("PROXY_STORE", "false"),
    ]);
    let stream = random_bytes(30, 16 * MIB);
    let mut device = Device::connect(daemon.addr());
    device.send_in_random_writes(&stream, 31);
    device.shutdown_write();
    let ended = device.read_until_end(secs(20));
    assert_eq!(ended.end, End::Eof, "the device must be closed normally");

    let conn = &reader.wait_connections(1, secs(5))[0];
    conn.wait_done(secs(10));
    assert_same_bytes("the mandatory target's stream", &stream, &conn.received());

    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(10)), "closed by peer");
    log.assert_well_formed();
    assert_eq!(
        log.select(&ident, 2, 1).len(),
        1,
        "target 2 was connected before it overflowed"
    );
    let overflowed = log.dropped(&ident, 2).expect("event 2 of target 2");
    assert_eq!(
        text(overflowed, "proxy.reason"),
        "target buffer overflow",
        "{overflowed}"
    );
    assert!(number(overflowed, "proxy.bytes.sent") < stream.len() as u64);
    let one = log.dropped(&ident, 1).expect("event 2 of target 1");
    assert_eq!(text(one, "proxy.reason"), "closed by peer");
    assert_eq!(number(one, "proxy.bytes.sent"), stream.len() as u64);
    let device_drop = log.dropped(&ident, 0).unwrap();
    assert_eq!(
        number(device_drop, "proxy.bytes.received"),
        stream.len() as u64
    );
    daemon.assert_no_errors();
}

/// The most a device may push into a stalled connection before the test
/// calls the daemon's buffering unbounded: the kernel's buffers on the way
/// (device send, daemon receive, daemon send; the target's is capped small)
/// hold at most a few tens of MiB on Linux.
const PUSH_LIMIT: usize = 96 * MIB;

/// The daemon's resident memory allowed during the stall. What it holds by
/// design: code and thread stacks (a few MiB), one 256 KiB read buffer per
/// worker, this connection's 64 KiB target queue, the message channel
/// (at most 32 batches of ~128 KiB) and the writer's 1 MiB chunk: well
/// under 20 MiB in a debug build (about 5 MiB measured).
const RSS_LIMIT_KIB: u64 = 64 * 1024;
/// How much the stall may add to the memory at start: the connection's
/// share of the above (queues, the store channel, the writer's chunk) is at
/// most about 6 MiB, while holding what the device pushed before its writes
/// blocked (over 10 MiB on Linux, reported in the message) would exceed it.
const RSS_GROWTH_LIMIT_KIB: u64 = 8 * 1024;

#[test]
fn a_stalled_mandatory_target_holds_the_device_back_without_losing_bytes() {
    let gate = Arc::new(AtomicBool::new(false));
    let target = Target::start_small_buffer(Behaviour::Gated(Arc::clone(&gate)));
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_TARGET_BUFFER", "64KiB"),
        ("PROXY_STORE", "false"),
    ]);
    let rss_at_start = daemon.vm_rss_kib();
    let mut device = Device::connect(daemon.addr());
    let mut rng = SmallRng::seed_from_u64(40);
    let mut written: Vec<u8> = Vec::new();

    // Push until writes make no progress for a whole second (two write
    // timeouts in a row), so that a daemon merely slowed down by a busy
    // machine is not taken for a stalled one.
    device
        .stream()
        .set_write_timeout(Some(millis(500)))
        .unwrap();
    let started = Instant::now();
    let mut pending: Vec<u8> = Vec::new();
    let mut timeouts_in_a_row = 0;
    while timeouts_in_a_row < 2 && written.len() < PUSH_LIMIT && started.elapsed() < secs(30) {
        if pending.is_empty() {
            pending = vec![0u8; 64 * 1024];
            rng.fill_bytes(&mut pending);
        }
        match device.stream().write(&pending) {
            Ok(n) => {
                written.extend_from_slice(&pending[..n]);
                pending.drain(..n);
                timeouts_in_a_row = 0;
            }
            Err(e) if is_timeout(&e) => timeouts_in_a_row += 1,
            Err(e) => panic!("device write failed after {} bytes: {e}", written.len()),
        }
    }
    assert!(
        timeouts_in_a_row == 2,
        "expected the device's writes to block while the mandatory target reads nothing; \
         pushed {} MiB in {:?} without blocking",
        written.len() / MIB,
        started.elapsed()
    );
    let pushed = written.len();

    // The stall: still blocked a moment later, memory bounded, connection open.
    let mut peak = 0;
    for _ in 0..5 {
        peak = peak.max(daemon.vm_rss_kib());
        match device.stream().write(&pending[..1]) {
            Err(e) if is_timeout(&e) => {}
            other => panic!("expected the device to stay blocked, write gave {other:?}"),
        }
    }
    assert!(
        peak < RSS_LIMIT_KIB && peak.saturating_sub(rss_at_start) < RSS_GROWTH_LIMIT_KIB,
        "daemon VmRSS {peak} KiB during the stall (at start {rss_at_start} KiB, device pushed \
         {pushed} bytes), expected under {RSS_LIMIT_KIB} KiB and at most \
         {RSS_GROWTH_LIMIT_KIB} KiB more than at start"
    );
    let conn = &target.wait_connections(1, secs(5))[0];
    assert_eq!(conn.received_len(), 0, "the gated target read nothing yet");
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert!(
        log.lines().iter().all(|m| event(m) != 2),
        "nothing may be dropped during the stall: {}",
        log.summary()
    );

    // The target reads again: everything arrives, in order.
    gate.store(true, Ordering::SeqCst);
    device.stream().set_write_timeout(Some(secs(15))).unwrap();
    device.send(&pending);
    written.extend_from_slice(&pending);
    let tail = random_bytes(41, MIB);
    device.send(&tail);
    written.extend_from_slice(&tail);
    device.shutdown_write();
    assert_eq!(device.read_until_end(secs(30)).end, End::Eof);
    conn.wait_done(secs(10));
    assert!(conn.eof(), "the target must see the end of stream");
    assert_same_bytes("the target's stream", &written, &conn.received());

    assert_eq!(log.wait_reason(&ident, 0, secs(10)), "closed by peer");
    log.assert_well_formed();
    let device_drop = log.dropped(&ident, 0).unwrap();
    assert_eq!(
        number(device_drop, "proxy.bytes.received"),
        written.len() as u64
    );
    let target_drop = log.dropped(&ident, 1).expect("event 2 of target 1");
    assert_eq!(text(target_drop, "proxy.reason"), "closed by peer");
    assert_eq!(
        number(target_drop, "proxy.bytes.sent"),
        written.len() as u64
    );
    eprintln!(
        "stall: device blocked after {pushed} bytes; daemon VmRSS {rss_at_start} KiB at start, \
         peak {peak} KiB during the stall"
    );
    daemon.assert_no_errors();
}

/// More than every kernel buffer between the target and the device can
/// hold on Linux (at most 32 MiB receive + 4 MiB send on each of the two
/// sockets), so the target can only finish if the daemon holds the rest.
const REPLY: usize = 128 * MIB;

#[test]
fn replies_for_a_device_that_does_not_read_are_held_back_not_buffered() {
    let reply = random_bytes(60, REPLY);
    let target = Target::start(Behaviour::ReplyAtEof(reply.clone()));
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_TARGET_BUFFER", "64KiB"),
        ("PROXY_STORE", "false"),
    ]);
    let rss_at_start = daemon.vm_rss_kib();
    let mut device = Device::connect(daemon.addr());
    device.shutdown_write();
    let conn = &target.wait_connections(1, secs(5))[0];

    // The device reads nothing: wait until the target's sending stalls
    // (no progress for half a second).
    let mut last = usize::MAX;
    let mut still_since = Instant::now();
    let mut peak = 0;
    let stalled = poll_until(secs(30), || {
        peak = peak.max(daemon.vm_rss_kib());
        let sent = conn.sent_len();
        if sent != last {
            last = sent;
            still_since = Instant::now();
        }
        sent > 0 && still_since.elapsed() >= millis(500)
    });
    let sent = conn.sent_len();
    assert!(
        stalled && sent < REPLY,
        "expected the target's reply to be held back while the device reads nothing; \
         it sent {sent} of {REPLY} bytes"
    );
    assert!(
        peak < RSS_LIMIT_KIB && peak.saturating_sub(rss_at_start) < RSS_GROWTH_LIMIT_KIB,
        "daemon VmRSS {peak} KiB while holding replies back (at start {rss_at_start} KiB, \
         target sent {sent} bytes), expected under {RSS_LIMIT_KIB} KiB and at most \
         {RSS_GROWTH_LIMIT_KIB} KiB more than at start"
    );

    eprintln!(
        "replies held back after the target sent {sent} bytes; daemon VmRSS {rss_at_start} KiB \
         at start, peak {peak} KiB"
    );

    // The device reads again: the whole reply arrives, in order.
    let received = device.read_until_end(secs(60));
    assert_eq!(received.end, End::Eof, "the device must be closed normally");
    assert_same_bytes("the reply at the device", &reply, &received.bytes);
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(10)), "closed by peer");
    log.assert_well_formed();
    let device_drop = log.dropped(&ident, 0).unwrap();
    assert_eq!(number(device_drop, "proxy.bytes.sent"), REPLY as u64);
    daemon.assert_no_errors();
}
