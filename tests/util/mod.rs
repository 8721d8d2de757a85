//! Shared helpers of the integration tests: the real `proxy-channel` binary
//! on a free loopback port, scriptable target servers, device clients with
//! deadlines, and readers of the message files.
//!
//! Invariants every helper keeps: each wait is bounded in time and in
//! iterations, all traffic stays on 127.0.0.1, and every thread or process a
//! helper starts is stopped when its owner is dropped. Each test starts its
//! own daemon with its own temporary data folder, so tests run in parallel.
//!
//! Every helper is reachable as `util::name`; the submodules only sort them:
//! `daemon` (the process and its log), `control` (`ctl`, the control
//! socket, the metrics parser), `messages` (the message files),
//! `device` (device clients), `load` (many devices at a steady pace),
//! `target` (target servers), `sockets` (socket options and a refusing
//! port), `disk` (a tmpfs to fill up, a slow disk), `follower` (a
//! `view --follow` process), `install` (haproxy and prometheus-client,
//! installed when missing in a privileged run) and `privileged`
//! (`require`: the guard of a test that needs root, a loop device, cgroup
//! v1 or a package, which skips it for a normal user).
#![allow(dead_code)] // each test file uses its own subset of the helpers

mod control;
mod daemon;
mod device;
mod disk;
mod follower;
mod install;
mod load;
mod messages;
mod privileged;
mod sockets;
mod target;

// A test file that uses none of a submodule's helpers would warn otherwise.
#[allow(unused_imports)]
pub use control::*;
#[allow(unused_imports)]
pub use daemon::*;
#[allow(unused_imports)]
pub use device::*;
#[allow(unused_imports)]
pub use disk::*;
#[allow(unused_imports)]
pub use follower::*;
#[allow(unused_imports)]
pub use install::*;
#[allow(unused_imports)]
pub use load::*;
#[allow(unused_imports)]
pub use messages::*;
#[allow(unused_imports)]
pub use privileged::*;
#[allow(unused_imports)]
pub use sockets::*;
#[allow(unused_imports)]
pub use target::*;

use std::io;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The daemon binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_proxy-channel");

/// How often conditions are polled.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// Socket reads in helper threads wake up this often to look at deadlines
/// and stop flags.
const READ_TICK: Duration = Duration::from_millis(50);

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------- waiting

/// Polls `condition` every 10 ms until it holds or `timeout` has passed;
/// returns whether it held. Bounded in rounds as well as in time.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let rounds = timeout.as_millis() / POLL_EVERY.as_millis() + 2;
    for _ in 0..rounds {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_EVERY);
    }
    condition()
}

/// Like [`poll_until`], but a timeout fails the test, naming `what`.
pub fn wait_until(timeout: Duration, what: &str, condition: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, condition),
        "timed out after {timeout:?} waiting for {what}"
    );
}

// ---------------------------------------------------------------- bytes

/// `len` reproducible random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut bytes = vec![0; len];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// Compares two byte streams and, when they differ, says where and how,
/// without printing megabytes.
pub fn assert_same_bytes(what: &str, expected: &[u8], seen: &[u8]) {
    if expected == seen {
        return;
    }
    let first_difference = expected
        .iter()
        .zip(seen)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(seen.len()));
    let around = |bytes: &[u8]| {
        let end = (first_difference + 16).min(bytes.len());
        hex::encode(&bytes[first_difference.min(end)..end])
    };
    panic!(
        "{what}: expected {} bytes, saw {} bytes; first difference at offset {first_difference} \
         (expected {}.., saw {}..)",
        expected.len(),
        seen.len(),
        around(expected),
        around(seen)
    );
}

/// Whether a socket read or write gave up because its timeout passed.
pub fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Collects the lines of a child's pipe on a thread of its own, which ends
/// when the pipe closes (the child exited or closed it).
pub fn collect_lines(
    pipe: impl io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let collected = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = std::sync::Arc::clone(&collected);
    thread::spawn(move || {
        for line in io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line);
        }
    });
    collected
}
