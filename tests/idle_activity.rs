//! Issue 13, defect 1: the idle timeout cut an active transfer and lost
//! bytes. A device sent megabytes at once to a mandatory target that reads
//! slowly; the daemon had read (and recorded) them, and while they were
//! still on their way to the target nothing was read or written for longer
//! than PROXY_IDLE_TIMEOUT: the device was reset as `idle timeout` and what
//! was queued never reached the target. SPEC: "Idle means no byte moved in
//! either direction on any side: a connection still delivering queued bytes
//! to a target is not idle."

mod util;

use std::io::Write;
use std::time::{Duration, Instant};

use util::*;

const MIB: usize = 1 << 20;

/// What the device sends at once.
const STREAM: usize = 12 * MIB;
/// How fast the target reads: the whole stream takes about 12 s, and the
/// kernel's buffers towards it (megabytes) take far longer than the idle
/// timeout to drain.
const TARGET_RATE: usize = MIB;
const IDLE_TIMEOUT: &str = "1s";

/// Writes `bytes` until done or the connection fails; returns how many
/// bytes went out and the error that stopped it, if any.
fn send_all(device: &mut Device, bytes: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut written = 0;
    // Bounded: every write makes progress, fails, or times out (15 s).
    while written < bytes.len() {
        let end = (written + 256 * 1024).min(bytes.len());
        match device.stream().write(&bytes[written..end]) {
            Ok(0) => return (written, None),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Some(e)),
        }
    }
    (written, None)
}

#[test]
fn bytes_still_on_their_way_to_a_slow_target_keep_the_connection_alive() {
    let target = Target::start(Behaviour::Paced {
        bytes_per_second: TARGET_RATE,
    });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_IDLE_TIMEOUT", IDLE_TIMEOUT),
    ]);
    let stream = random_bytes(13, STREAM);
    let mut device = Device::connect(daemon.addr());
    let started = Instant::now();
    let (written, error) = send_all(&mut device, &stream);
    let sending_took = started.elapsed();
    let conn = &target.wait_connections(1, secs(5))[0];
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert!(
        error.is_none(),
        "the device could send only {written} of {STREAM} bytes ({error:?} after \
         {sending_took:?}); the target has {} bytes; the daemon dropped the device as {:?}",
        conn.received_len(),
        log.reason(&ident, 0)
    );
    device.shutdown_write();

    let budget = Duration::from_secs_f64(2.0 * STREAM as f64 / TARGET_RATE as f64) + secs(10);
    let ended = device.read_until_end(budget);
    assert_eq!(
        ended.end,
        End::Eof,
        "the device must be closed normally once the target has everything"
    );
    conn.wait_done(secs(10));
    assert_same_bytes("the target's stream", &stream, &conn.received());

    assert_eq!(log.wait_reason(&ident, 0, secs(10)), "closed by peer");
    log.assert_well_formed();
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("closed by peer"));
    let idle_drops: Vec<String> = log
        .lines()
        .iter()
        .filter(|m| event(m) == 2 && text(m, "proxy.reason") == "idle timeout")
        .map(ToString::to_string)
        .collect();
    assert!(idle_drops.is_empty(), "no idle timeout: {idle_drops:?}");
    assert_eq!(
        log.payload(&ident, 0),
        stream,
        "what the device sent is stored"
    );
    daemon.assert_no_errors();
}

/// The other side of the rule: bytes that sit in a queue because the
/// target takes nothing are not activity, so such a connection still ends
/// after the idle timeout.
#[test]
fn a_target_that_takes_nothing_leaves_the_connection_idle() {
    let target = Target::start_small_buffer(Behaviour::NeverRead);
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_IDLE_TIMEOUT", IDLE_TIMEOUT),
        ("PROXY_TARGET_BUFFER", "64KiB"),
    ]);
    let mut device = Device::connect(daemon.addr());
    device
        .stream()
        .set_write_timeout(Some(millis(300)))
        .unwrap();
    // Push until the daemon holds the device back (a write times out).
    let chunk = random_bytes(14, 64 * 1024);
    let mut pushed = 0;
    let blocked = loop {
        match device.stream().write(&chunk) {
            Ok(n) if pushed < 64 * MIB => pushed += n,
            Ok(_) => break false,
            Err(e) if is_timeout(&e) => break true,
            Err(e) => panic!("device write failed after {pushed} bytes: {e}"),
        }
    };
    assert!(blocked, "the device was never held back ({pushed} bytes)");
    let quiet_since = Instant::now();
    let ended = device.read_until_end(secs(10));
    let elapsed = quiet_since.elapsed();
    assert_ne!(
        ended.end,
        End::StillOpen,
        "the stalled connection never ended"
    );
    assert!(
        elapsed <= secs(4),
        "PROXY_IDLE_TIMEOUT={IDLE_TIMEOUT}: expected the end about 1 s after the target \
         stopped taking bytes, saw {elapsed:?}"
    );
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(5)), "idle timeout");
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("idle timeout"));
    log.assert_well_formed();
    daemon.assert_no_errors();
}
