//! Counters of what the daemon does, kept without locks on the hot path.
//!
//! Each thread that counts (a worker, the acceptor, the writer) owns one
//! [`Counters`] and is its only writer, so a count is a plain load and store
//! of a relaxed atomic, no locked instruction. Readers (the control thread)
//! sum all of them into a [`Snapshot`]. Counts are per side, indexed by
//! [`Side::index`]: the device first, then targets 1..=3.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::catchup::stats::{CatchUpCounts, CatchUpStats};
use crate::net::reason::Reason;
pub use crate::net::side::SIDES;
use crate::net::side::Side;

/// Why a side was dropped, as a small fixed set for metrics; a
/// [`Reason`] knows its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropKind {
    ClosedByPeer,
    ResetByPeer,
    IdleTimeout,
    ConnectFailed,
    ConnectTimeout,
    MandatoryTarget,
    BufferOverflow,
    DeviceFailed,
    TooManyConnections,
    ClosedByOperator,
    BadProxyHeader,
    Shutdown,
    /// A target with a device list that does not take the device.
    DeviceNotListed,
    /// A device's older connection, closed for its newer one.
    Replaced,
    Other,
}

impl DropKind {
    pub const ALL: [DropKind; 15] = [
        DropKind::ClosedByPeer,
        DropKind::ResetByPeer,
        DropKind::IdleTimeout,
        DropKind::ConnectFailed,
        DropKind::ConnectTimeout,
        DropKind::MandatoryTarget,
        DropKind::BufferOverflow,
        DropKind::DeviceFailed,
        DropKind::TooManyConnections,
        DropKind::ClosedByOperator,
        DropKind::BadProxyHeader,
        DropKind::Shutdown,
        DropKind::DeviceNotListed,
        DropKind::Replaced,
        DropKind::Other,
    ];

    /// Its place in [`DropKind::ALL`] and in the arrays of counts.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its label value in metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropKind::ClosedByPeer => "closed_by_peer",
            DropKind::ResetByPeer => "reset_by_peer",
            DropKind::IdleTimeout => "idle_timeout",
            DropKind::ConnectFailed => "connect_failed",
            DropKind::ConnectTimeout => "connect_timeout",
            DropKind::MandatoryTarget => "mandatory_target",
            DropKind::BufferOverflow => "target_buffer_overflow",
            DropKind::DeviceFailed => "device_failed",
            DropKind::TooManyConnections => "too_many_connections",
            DropKind::ClosedByOperator => "closed_by_operator",
            DropKind::BadProxyHeader => "bad_proxy_header",
            DropKind::Shutdown => "shutdown",
            DropKind::DeviceNotListed => "device_not_listed",
            DropKind::Replaced => "replaced",
            DropKind::Other => "other",
        }
    }
}

const KINDS: usize = DropKind::ALL.len();

/// Why a device was closed at accept, before any message was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not in PROXY_ALLOW.
    NotAllowed,
    /// PROXY_MAX_CONNECTIONS were open.
    TooManyConnections,
    /// PROXY_MAX_CONNECTIONS_PER_IP were open from its address.
    TooManyFromAddress,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::NotAllowed,
        Refusal::TooManyConnections,
        Refusal::TooManyFromAddress,
    ];

    /// Its label value in metrics and `ctl stats`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyFromAddress => "too_many_per_ip",
        }
    }

    /// In the log: why the peer was closed.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not in PROXY_ALLOW",
            Refusal::TooManyConnections => "PROXY_MAX_CONNECTIONS connections open",
            Refusal::TooManyFromAddress => {
                "PROXY_MAX_CONNECTIONS_PER_IP connections open from its address"
            }
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const REFUSALS: usize = Refusal::ALL.len();

/// Why a UDP datagram was dropped (UDP has no backpressure: each datagram
/// the daemon does not take or pass on is counted here, by cause).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpDrop {
    /// From a new address not in PROXY_ALLOW (no session opened).
    NotAllowed,
    /// From a new address while PROXY_MAX_CONNECTIONS were held.
    TooManyConnections,
    /// From a new address while PROXY_MAX_CONNECTIONS_PER_IP were held.
    TooManyFromAddress,
    /// Over the per-session rate limit (a flooding device).
    RateLimit,
    /// Lost in a listening socket's receive buffer before the daemon could
    /// take it (the kernel's count, SO_RXQ_OVFL).
    ReceiveBufferOverflow,
    /// A device datagram that a target's socket did not take.
    TargetSendFailed,
    /// A target's reply that could not be sent to the device.
    ReplySendFailed,
}

impl UdpDrop {
    pub const ALL: [UdpDrop; 7] = [
        UdpDrop::NotAllowed,
        UdpDrop::TooManyConnections,
        UdpDrop::TooManyFromAddress,
        UdpDrop::RateLimit,
        UdpDrop::ReceiveBufferOverflow,
        UdpDrop::TargetSendFailed,
        UdpDrop::ReplySendFailed,
    ];

    /// The drop of a datagram from a new address that was not admitted.
    pub fn of_refusal(refusal: Refusal) -> UdpDrop {
        match refusal {
            Refusal::NotAllowed => UdpDrop::NotAllowed,
            Refusal::TooManyConnections => UdpDrop::TooManyConnections,
            Refusal::TooManyFromAddress => UdpDrop::TooManyFromAddress,
        }
    }

    /// Its label value in metrics and `ctl stats`.
    pub fn label(self) -> &'static str {
        match self {
            UdpDrop::NotAllowed => "not_allowed",
            UdpDrop::TooManyConnections => "too_many_connections",
            UdpDrop::TooManyFromAddress => "too_many_per_ip",
            UdpDrop::RateLimit => "rate_limit",
            UdpDrop::ReceiveBufferOverflow => "receive_buffer_overflow",
            UdpDrop::TargetSendFailed => "target_send_failed",
            UdpDrop::ReplySendFailed => "reply_send_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const UDP_DROPS: usize = UdpDrop::ALL.len();

/// One thread's counters; only that thread writes them.
#[derive(Debug, Default)]
pub struct Counters {
    /// Device connections taken over by this worker (or accepted, for the
    /// acceptor).
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Refused at accept (acceptor), in all and by cause.
    pub refused: AtomicU64,
    pub refusals: [AtomicU64; REFUSALS],
    pub bytes_received: [AtomicU64; SIDES],
    pub bytes_sent: [AtomicU64; SIDES],
    /// Reads that returned data, per side.
    pub packets: [AtomicU64; SIDES],
    /// Drops per side and kind (the device's drops at index 0; the
    /// acceptor's refusals too).
    pub drops: [[AtomicU64; KINDS]; SIDES],
    /// Messages handed to the writer (worker, acceptor) or written (writer).
    pub messages: AtomicU64,
    /// Failed writes of the message file (writer).
    pub write_errors: AtomicU64,
    /// UDP sessions opened and ended on this worker.
    pub udp_opened: AtomicU64,
    pub udp_closed: AtomicU64,
    /// Datagrams received from devices (dropped ones included) and sent to
    /// them (relayed replies).
    pub udp_datagrams_in: AtomicU64,
    pub udp_datagrams_out: AtomicU64,
    /// Datagrams dropped, per [`UdpDrop::ALL`] index.
    pub udp_drops: [AtomicU64; UDP_DROPS],
}

/// Adds to a counter that only the calling thread writes.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl Counters {
    pub fn refusal(&self, cause: Refusal) {
        add(&self.refused, 1);
        add(&self.refusals[cause.index()], 1);
    }

    pub fn udp_drop(&self, cause: UdpDrop, n: u64) {
        add(&self.udp_drops[cause.index()], n);
    }

    /// Counts a drop of `side` for `why`.
    pub fn drop_of(&self, side: Side, why: &Reason) {
        add(&self.drops[side.index()][why.kind().index()], 1);
    }
}

/// Every thread's counters, for the readers.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    pub workers: Vec<Arc<Counters>>,
    pub acceptor: Arc<Counters>,
    pub writer: Arc<Counters>,
    /// The catch-up threads' journals (their messages).
    pub catch_up_journals: Vec<Arc<Counters>>,
    pub catch_up: Arc<CatchUpStats>,
    /// Whether the daemon listens for UDP (its snapshot then has `udp`).
    pub udp: bool,
}

/// The sum of all counters at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub connections_open: u64,
    pub connections_total: u64,
    pub connections_refused: u64,
    /// Per [`Refusal::ALL`] index.
    #[serde(default)]
    pub refusals: [u64; REFUSALS],
    pub bytes_received: [u64; SIDES],
    pub bytes_sent: [u64; SIDES],
    pub packets: [u64; SIDES],
    pub connect_failures: [u64; SIDES],
    /// Per side, then per [`DropKind::ALL`] index.
    pub drops: [[u64; KINDS]; SIDES],
    pub messages_queued: u64,
    pub messages_written: u64,
    pub writer_queue_depth: u64,
    pub write_errors: u64,
    /// Per side (targets only): catch-up's backlog and deliveries; left
    /// out of the JSON while no target has catch-up on.
    #[serde(default, skip_serializing_if = "CatchUpCounts::all_off")]
    pub catch_up: [CatchUpCounts; SIDES],
    /// UDP sessions, when PROXY_LISTEN_UDP is set (absent otherwise, so a
    /// TCP-only daemon's stats stay as they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpSnapshot>,
}

/// The UDP sessions' counters summed over the workers.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UdpSnapshot {
    pub sessions_open: u64,
    pub sessions_total: u64,
    pub datagrams_received: u64,
    pub datagrams_sent: u64,
    /// Per [`UdpDrop::ALL`] index.
    pub drops: [u64; UDP_DROPS],
}

impl Registry {
    /// Sums everything; `writer_queue_depth` is the store channel's length.
    pub fn snapshot(&self, writer_queue_depth: usize) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = Snapshot {
            connections_total: get(&self.acceptor.opened),
            connections_refused: get(&self.acceptor.refused),
            refusals: self.acceptor.refusals.each_ref().map(get),
            messages_written: get(&self.writer.messages),
            writer_queue_depth: writer_queue_depth as u64,
            write_errors: get(&self.writer.write_errors),
            catch_up: self.catch_up.counts(),
            ..Snapshot::default()
        };
        let mut closed = 0;
        let mut opened = 0;
        for worker in &self.workers {
            opened += get(&worker.opened);
            closed += get(&worker.closed);
        }
        // The acceptor too: its messages, and its refusals' drops.
        for counters in self.workers.iter().chain([&self.acceptor]) {
            s.messages_queued += get(&counters.messages);
            for side in 0..SIDES {
                s.bytes_received[side] += get(&counters.bytes_received[side]);
                s.bytes_sent[side] += get(&counters.bytes_sent[side]);
                s.packets[side] += get(&counters.packets[side]);
                for kind in 0..KINDS {
                    s.drops[side][kind] += get(&counters.drops[side][kind]);
                }
            }
        }
        for journal in &self.catch_up_journals {
            s.messages_queued += get(&journal.messages);
        }
        s.connections_open = opened.saturating_sub(closed);
        if self.udp {
            s.udp = Some(self.udp_snapshot());
        }
        let connect_failed =
            [DropKind::ConnectFailed, DropKind::ConnectTimeout].map(DropKind::index);
        for side in 1..SIDES {
            s.connect_failures[side] = connect_failed.iter().map(|&i| s.drops[side][i]).sum();
        }
        s
    }
}

impl Registry {
    fn udp_snapshot(&self) -> UdpSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut u = UdpSnapshot::default();
        let mut closed = 0;
        for worker in &self.workers {
            u.sessions_total += get(&worker.udp_opened);
            closed += get(&worker.udp_closed);
            u.datagrams_received += get(&worker.udp_datagrams_in);
            u.datagrams_sent += get(&worker.udp_datagrams_out);
            for (sum, count) in u.drops.iter_mut().zip(&worker.udp_drops) {
                *sum += get(count);
            }
        }
        u.sessions_open = u.sessions_total.saturating_sub(closed);
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::reason::IoFailure;
    use crate::net::side::TargetId;

    #[test]
    fn kinds_sit_at_their_index() {
        for (index, kind) in DropKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), index, "{kind:?}");
        }
    }

    #[test]
    fn reasons_fall_into_their_kind() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let target = crate::net::side::TargetId::from_number(2).unwrap();
        assert_eq!(Reason::ClosedByPeer.kind(), DropKind::ClosedByPeer);
        assert_eq!(
            Reason::connect_failed(&refused).kind(),
            DropKind::ConnectFailed
        );
        assert_eq!(
            Reason::MandatoryFailed(target).kind(),
            DropKind::MandatoryTarget
        );
        assert_eq!(
            Reason::BadProxyHeader("not a PROXY header".into()).kind(),
            DropKind::BadProxyHeader
        );
        let other = Reason::Io(IoFailure::Other("no route to host".into()));
        assert_eq!(other.kind(), DropKind::Other);
    }

    #[test]
    fn a_snapshot_sums_every_worker() {
        let registry = Registry {
            workers: vec![Arc::new(Counters::default()), Arc::new(Counters::default())],
            ..Registry::default()
        };
        add(&registry.acceptor.opened, 3);
        for (i, worker) in registry.workers.iter().enumerate() {
            add(&worker.opened, 2);
            add(&worker.closed, i as u64);
            add(&worker.bytes_received[0], 100);
            worker.drop_of(
                Side::Target(TargetId::from_number(1).unwrap()),
                &Reason::ConnectTimeout,
            );
        }
        let s = registry.snapshot(5);
        assert_eq!(s.udp, None, "no UDP section without PROXY_LISTEN_UDP");
        assert_eq!(s.connections_total, 3);
        assert_eq!(s.connections_open, 3);
        assert_eq!(s.bytes_received[0], 200);
        assert_eq!(s.connect_failures[1], 2);
        assert_eq!(s.writer_queue_depth, 5);
    }

    #[test]
    fn udp_counts_sum_every_worker_when_udp_is_on() {
        let registry = Registry {
            workers: vec![Arc::new(Counters::default()), Arc::new(Counters::default())],
            udp: true,
            ..Registry::default()
        };
        add(&registry.workers[0].udp_opened, 2);
        add(&registry.workers[1].udp_opened, 1);
        add(&registry.workers[1].udp_closed, 1);
        registry.workers[0].udp_drop(UdpDrop::RateLimit, 3);
        registry.workers[1].udp_drop(UdpDrop::RateLimit, 4);
        let udp = registry.snapshot(0).udp.expect("a UDP section");
        assert_eq!((udp.sessions_total, udp.sessions_open), (3, 2));
        assert_eq!(udp.drops[UdpDrop::RateLimit.index()], 7);
    }
}
