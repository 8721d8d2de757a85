//! How the end of a side reaches the daemon's log, as sozu does it: the
//! ordinary ends (closes, resets, timeouts of idle devices) at debug, a
//! target out of reach (refused, unresolvable, timing out, too slow) as a
//! warning, anything unexpected (the system's own words) as an error.
//!
//! A target that is down fails for every device that connects: its
//! warnings and errors are written at most once a minute per target, over
//! all workers ([`Throttle`] is shared), each saying how many were held
//! back since the previous one. Held-back lines still go out at debug.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::Level;

use super::TargetSpec;
use crate::net::reason::{Reason, Severity};
use crate::store::message::Origin;

/// At most one line per target this often.
const EVERY: Duration = Duration::from_secs(60);

/// A rate limit of one line per [`EVERY`], safe to share between threads.
#[derive(Debug)]
pub struct Throttle {
    epoch: Instant,
    /// When the next line may go out, in milliseconds since `epoch`.
    next_ms: AtomicU64,
    /// Lines held back since the last one that went out.
    held_back: AtomicU64,
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle {
            epoch: Instant::now(),
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// Whether a line may go out at `now`: `Some(n)` when it may, `n`
    /// lines having been held back before it.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let now_ms = millis(now.saturating_duration_since(self.epoch));
        let next = self.next_ms.load(Ordering::Relaxed);
        let admitted = now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + millis(EVERY),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok();
        match admitted {
            true => Some(self.held_back.swap(0, Ordering::Relaxed)),
            false => {
                self.held_back.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Logs that target `spec` was dropped for `why`, at the level `why`
/// deserves, within the target's rate limit.
pub(super) fn target_dropped(origin: Origin, spec: &TargetSpec, why: &Reason, now: Instant) {
    let level = match why.severity() {
        Severity::Expected => Level::Debug,
        Severity::Unreachable => Level::Warn,
        Severity::Unexpected => Level::Error,
    };
    let (ident, target, label) = (origin.ident, spec.id, &spec.label);
    if level == Level::Debug || !log::log_enabled!(level) {
        log::debug!("{ident}: target {target} ({label}) {why}");
        return;
    }
    match spec.warnings.admit(now) {
        None => log::debug!("{ident}: target {target} ({label}) {why}"),
        Some(0) => log::log!(level, "{ident}: target {target} ({label}) {why}"),
        Some(held_back) => log::log!(
            level,
            "{ident}: target {target} ({label}) {why} \
             ({held_back} more failures of target {target} not logged since the last line)"
        ),
    }
}

/// Logs how the device side ended: an error when it is unexpected, else
/// at debug (a device going away is its own business).
pub(super) fn device_dropped(origin: Origin, why: &Reason) {
    match why.severity() {
        Severity::Unexpected => log::error!("{}: device {} {why}", origin.ident, origin.peer),
        Severity::Expected | Severity::Unreachable => {
            log::debug!("{}: device {} {why}", origin.ident, origin.peer)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_minute_counting_the_held_back() {
        let throttle = Throttle::new();
        let start = throttle.epoch;
        assert_eq!(throttle.admit(start), Some(0));
        for second in 1..60 {
            assert_eq!(throttle.admit(start + Duration::from_secs(second)), None);
        }
        assert_eq!(throttle.admit(start + EVERY), Some(59));
        assert_eq!(throttle.admit(start + EVERY + Duration::from_secs(1)), None);
        assert_eq!(throttle.admit(start + EVERY * 3), Some(1));
    }
}
