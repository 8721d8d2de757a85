//! Tests that need more than a normal user has: root (to mount a tmpfs or
//! to run a command as another user), a throttled loop device (root, a
//! loop device and cgroup v1's blkio throttle), or software installed
//! (HAProxy, Python's prometheus-client). Such a test starts with a guard:
//!
//! ```ignore
//! if !require(Need::Root, "mount a tmpfs") {
//!     return;
//! }
//! ```
//!
//! Invariants: `cargo test` as a normal user never fails for want of a
//! privilege or a package, and never installs anything: a test whose need
//! is not met prints one `SKIPPED <test>: ...` line to stderr, saying what
//! it needs and why, and returns. With `PROXY_CHANNEL_TEST_PRIVILEGED=1`
//! (CI sets it) no test skips: a missing package is installed, and a
//! missing privilege fails the test, saying what is missing.

use std::io::Write;
use std::path::Path;

use super::{WRITE_THROTTLE, find_program, haproxy_binary, prometheus_client_importable};

/// The variable that makes every guarded test run (and fail if it cannot).
pub const PRIVILEGED_VAR: &str = "PROXY_CHANNEL_TEST_PRIVILEGED";

/// What a test needs beyond a normal user on loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Effective user root.
    Root,
    /// Root, `losetup` and `mkfs.ext4`, a loop device, and cgroup v1's
    /// blkio write throttle (`util::SlowDisk`).
    ThrottledLoopDevice,
    /// A `haproxy` binary (installed with apt-get when privileged).
    Haproxy,
    /// python3 able to import `prometheus_client` (installed when
    /// privileged).
    PrometheusClient,
    /// Root and `strace` (installed with apt-get when privileged), to slow
    /// one thread of the daemon down with its fault injection.
    Strace,
}

/// Whether the calling test may go on: true if `need` is met (or, when
/// privileged, has just been met by an install); false, after a
/// `SKIPPED` line on stderr, if it is not and the run is not privileged.
/// `why` says what the test does with it ("mount a tmpfs").
///
/// Panics, naming what is missing, if the run is privileged and the need
/// cannot be met.
pub fn require(need: Need, why: &str) -> bool {
    if is_privileged() {
        provide(need, why);
        return true;
    }
    match missing(need) {
        None => true,
        Some(missing) => {
            skip(&format!(
                "{} ({why}){}; set {PRIVILEGED_VAR}=1 to require it",
                missing.needs, missing.detail
            ));
            false
        }
    }
}

/// Whether `PROXY_CHANNEL_TEST_PRIVILEGED=1`; any value but unset, empty,
/// 0 or 1 fails the test, so that a typo does not quietly skip.
pub fn is_privileged() -> bool {
    match std::env::var(PRIVILEGED_VAR) {
        Err(std::env::VarError::NotPresent) => false,
        Ok(value) if value.is_empty() || value == "0" => false,
        Ok(value) if value == "1" => true,
        other => panic!("{PRIVILEGED_VAR} must be 1 or 0, is {other:?}"),
    }
}

/// Meets `need` in a privileged run: installs software, or fails the test
/// saying which privilege is missing.
fn provide(need: Need, why: &str) {
    match need {
        // Installed when missing; fails, saying what to install, if not.
        Need::Haproxy => drop(haproxy_binary()),
        Need::PrometheusClient => super::ensure_prometheus_client(),
        Need::Strace => {
            super::ensure_strace();
            provide(Need::Root, why);
        }
        Need::Root | Need::ThrottledLoopDevice => {
            if let Some(missing) = missing(need) {
                panic!(
                    "{} {} ({why}){}, and {PRIVILEGED_VAR}=1 requires it to run",
                    test_name(),
                    missing.needs,
                    missing.detail
                );
            }
        }
    }
}

/// What a test needs and this machine lacks.
struct Missing {
    /// "needs root", "needs haproxy", ...
    needs: &'static str,
    /// What exactly is missing or how to get it, starting "; ", or empty.
    detail: String,
}

impl Missing {
    fn new(needs: &'static str, detail: &str) -> Option<Missing> {
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!("; {detail}")
        };
        Some(Missing { needs, detail })
    }
}

/// What of `need` this machine lacks, or None.
fn missing(need: Need) -> Option<Missing> {
    match need {
        Need::Root if !is_root() => Missing::new("needs root", ""),
        Need::ThrottledLoopDevice => missing_throttled_loop_device(),
        Need::Haproxy if find_program("haproxy").is_none() => {
            Missing::new("needs haproxy", "apt-get install haproxy")
        }
        Need::PrometheusClient if !prometheus_client_importable() => Missing::new(
            "needs python3 with prometheus-client",
            "pip install prometheus-client, or apt-get install python3-prometheus-client",
        ),
        Need::Strace if !is_root() => {
            Missing::new("needs root (strace attaches to the daemon)", "")
        }
        Need::Strace if find_program("strace").is_none() => {
            Missing::new("needs strace", "apt-get install strace")
        }
        _ => None,
    }
}

fn missing_throttled_loop_device() -> Option<Missing> {
    const NEEDS: &str = "needs root, a loop device and cgroup v1 blkio";
    if !is_root() {
        return Missing::new(NEEDS, "not root");
    }
    if ["losetup", "mkfs.ext4"]
        .iter()
        .any(|tool| find_program(tool).is_none())
    {
        return Missing::new(NEEDS, "apt-get install mount e2fsprogs");
    }
    if !Path::new("/dev/loop-control").exists() {
        return Missing::new(NEEDS, "there is no /dev/loop-control");
    }
    if !Path::new(WRITE_THROTTLE).exists() {
        return Missing::new(
            NEEDS,
            &format!("there is no {WRITE_THROTTLE} (cgroup v2 has none)"),
        );
    }
    None
}

fn is_root() -> bool {
    // SAFETY: geteuid only reads the process's credentials.
    unsafe { libc::geteuid() == 0 }
}

/// The running test's name: libtest names each test's thread after it.
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string()
}

/// Writes `SKIPPED <test>: <reason>` to the real stderr in one write: the
/// `eprintln!` of a passing test is captured and never shown, a write to
/// the stderr handle is not.
fn skip(reason: &str) {
    let line = format!("SKIPPED {}: {reason}\n", test_name());
    // Nothing to do about a stderr that cannot be written to.
    let _ = std::io::stderr().write_all(line.as_bytes());
}
