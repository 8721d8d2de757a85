//! Catch-up's counters for `ctl stats` and the metrics: per target, the
//! backlog (what it missed and has not been delivered yet) and what catch-up
//! delivered. Each target's catch-up thread is the only writer of its
//! counters; the control thread reads them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::control::stats::SIDES;

/// One target's counters, written by its catch-up thread only.
#[derive(Debug, Default)]
pub struct TargetCounters {
    pub enabled: AtomicBool,
    /// Missed device connections not delivered yet (ended or still open).
    pub backlog_connections: AtomicU64,
    /// Their missed device bytes.
    pub backlog_bytes: AtomicU64,
    pub delivered_connections: AtomicU64,
    /// Device bytes of completed deliveries (PROXY headers not counted).
    pub delivered_bytes: AtomicU64,
}

/// Every target's counters, indexed by target number (0 unused).
#[derive(Debug, Default)]
pub struct CatchUpStats {
    pub targets: [TargetCounters; SIDES],
}

/// One target's catch-up as `ctl stats` reports it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CatchUpCounts {
    pub enabled: bool,
    pub backlog_connections: u64,
    pub backlog_bytes: u64,
    pub delivered_connections: u64,
    pub delivered_bytes: u64,
}

impl CatchUpCounts {
    /// Whether no side has catch-up on.
    pub fn all_off(counts: &[CatchUpCounts; SIDES]) -> bool {
        counts.iter().all(|c| !c.enabled)
    }
}

impl CatchUpStats {
    /// The counts of every side (only targets can be enabled).
    pub fn counts(&self) -> [CatchUpCounts; SIDES] {
        self.targets.each_ref().map(|t| {
            let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
            CatchUpCounts {
                enabled: t.enabled.load(Ordering::Relaxed),
                backlog_connections: get(&t.backlog_connections),
                backlog_bytes: get(&t.backlog_bytes),
                delivered_connections: get(&t.delivered_connections),
                delivered_bytes: get(&t.delivered_bytes),
            }
        })
    }
}

impl TargetCounters {
    pub fn set_backlog(&self, connections: u64, bytes: u64) {
        self.backlog_connections
            .store(connections, Ordering::Relaxed);
        self.backlog_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn delivered(&self, bytes: u64) {
        crate::control::stats::add(&self.delivered_connections, 1);
        crate::control::stats::add(&self.delivered_bytes, bytes);
    }
}
