//! One UDP session: a device address, its ident, and a connected UDP socket
//! of its own towards each target.
//!
//! Invariants kept here:
//! - the device's event 1 is the session's first message and its event 2
//!   its last; each target gets event 1 when its socket opens (or event 2
//!   alone when it cannot) and always an event 2;
//! - every message of the session carries `proxy.transport: "udp"`, and
//!   `device.ident` from the datagram that revealed it on (its event 0
//!   included; never its device's event 1);
//! - a datagram is never queued towards a socket: what a socket does not
//!   take at once is dropped and counted by cause (UDP has no backpressure
//!   to apply). The one exception is a target with a device list, which
//!   gets its socket only once the device is recognised as listed (each
//!   datagram is looked at until then, within the detection window): the
//!   datagrams before that are held for it (fewer than 1 KiB in all:
//!   detection ends once that many bytes have arrived), and it gets them
//!   first (see `identify`). A device not listed, or not recognised
//!   within the window, gives such a target one event 2,
//!   `device not listed`, with counts 0 and no event 1;
//! - a target whose socket reports ICMP unreachable is dropped like a failed
//!   TCP target: a mandatory one ends the session.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::debug;
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::wire::LocalAddress;
use crate::config::MAX_TARGETS;
use crate::control::stats::{self, Counters, UdpDrop};
use crate::device::Ident;
use crate::net::admission::Permit;
use crate::net::connection::{
    ConnectionReport, Settings, TargetAddresses, TargetReport, TargetSpec,
};
use crate::net::reason::Reason;
use crate::net::side::{Side, TargetId};
use crate::store::journal::{Closed, Journal};
use crate::store::message::{Origin, UDP};

/// Datagrams a session may send at most in a burst, and refilled at one
/// per millisecond (1,000 a second). A tracker sends one every few
/// seconds; a device address sending more is flooding, and its excess is
/// dropped (cause `rate_limit`) right after it is read, at the cost of one
/// system call, before it is recorded or forwarded. So a flood costs the
/// worker little, it keeps draining the shared receive buffer, and the
/// other devices' datagrams are not lost behind the flood's.
const BURST: u32 = 1_000;
const REFILL_EVERY_MS: u32 = 1;

/// The worker's things a session uses while it runs.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub journal: &'a mut Journal,
    pub settings: &'a Settings,
    pub counters: &'a Counters,
    /// The worker's id, to name where a session lives.
    pub worker: usize,
    pub now: Instant,
}

/// A token bucket of datagrams, in milliseconds of the sessions' clock.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: u32,
    refilled_at_ms: u32,
}

impl Bucket {
    pub fn full(now_ms: u32) -> Bucket {
        Bucket {
            tokens: BURST,
            refilled_at_ms: now_ms,
        }
    }

    /// Takes one datagram's token; false when the session is over its rate.
    pub fn take(&mut self, now_ms: u32) -> bool {
        // Wrapping: the clock is a u32 of milliseconds (49 days).
        let earned = now_ms.wrapping_sub(self.refilled_at_ms) / REFILL_EVERY_MS;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled_at_ms = self
                .refilled_at_ms
                .wrapping_add(earned.wrapping_mul(REFILL_EVERY_MS));
        }
        match self.tokens {
            0 => false,
            _ => {
                self.tokens -= 1;
                true
            }
        }
    }
}

/// The socket of one session towards one target.
struct TargetSocket {
    socket: UdpSocket,
    received: u64,
    sent: u64,
    /// Readiness noted and not yet read to `WouldBlock`.
    ready: bool,
    /// On the worker's list of target sockets to read.
    queued: bool,
}

/// Why and how a session ends.
struct Ending {
    reason: Reason,
    target_reason: Reason,
}

pub struct Session {
    pub origin: Origin,
    /// Which of the worker's listening sockets the device sends to.
    pub listener: usize,
    /// The address the device sent to, on a wildcard listening socket.
    pub local: Option<LocalAddress>,
    opened_at: Instant,
    pub last_activity: Instant,
    received: u64,
    sent: u64,
    targets: [Option<TargetSocket>; MAX_TARGETS],
    pub bucket: Bucket,
    /// Its slot on the worker and how its sockets' tokens are made, for
    /// the sockets opened once the device is recognised.
    slot: usize,
    token_of: TokenOf,
    /// The device's own identifier, once a detector recognised it.
    device: Option<Ident>,
    /// Datagrams are still looked at for the device's ident.
    detecting: bool,
    /// Targets with a device list waiting for detection to end, bit
    /// [`TargetId::index`](crate::net::side::TargetId::index) of each; never set once it has ended.
    waiting: u8,
    /// The datagrams so far, while a target waits.
    held: Vec<Vec<u8>>,
    ending: Option<Ending>,
    /// Its place under the connection limits, given back when it is dropped.
    _permit: Permit,
}

/// What reading a target's socket left behind.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Read to `WouldBlock` (or the target is gone).
    Empty,
    /// The budget ran out with datagrams left.
    More,
}

/// The token of a session's socket towards target `index` (0-based).
pub type TokenOf = fn(slot: usize, index: usize) -> Token;

/// The addresses and limits a new session starts with.
pub struct Opening {
    pub origin: Origin,
    pub listener: usize,
    pub local: Option<LocalAddress>,
    pub permit: Permit,
    pub now_ms: u32,
}

impl Session {
    /// Opens a session: the device's event 1, then a socket to every target
    /// (event 1 each, or event 2 for one that cannot be opened).
    pub fn open(
        opening: Opening,
        slot: usize,
        token_of: TokenOf,
        addresses: &TargetAddresses,
        ctx: &mut Ctx<'_>,
    ) -> Session {
        let mut session = Session {
            origin: opening.origin,
            listener: opening.listener,
            local: opening.local,
            opened_at: ctx.now,
            last_activity: ctx.now,
            received: 0,
            sent: 0,
            targets: Default::default(),
            bucket: Bucket::full(opening.now_ms),
            slot,
            token_of,
            device: None,
            detecting: !ctx.settings.devices.detectors().is_off(),
            waiting: 0,
            held: Vec::new(),
            ending: None,
            _permit: opening.permit,
        };
        ctx.journal
            .connected(session.origin, session.tags(), Side::Device, None);
        stats::add(&ctx.counters.udp_opened, 1);
        for spec in ctx.settings.targets.iter().flatten() {
            match ctx.settings.devices.has_list(spec.id) {
                true if session.detecting => session.waiting |= identify::bit(spec.id),
                true => session.not_listed(spec, ctx),
                false => session.open_target(spec, addresses, ctx),
            }
        }
        session
    }

    fn open_target(&mut self, spec: &TargetSpec, addresses: &TargetAddresses, ctx: &mut Ctx<'_>) {
        let (slot, token_of) = (self.slot, self.token_of);
        let index = spec.id.index();
        if let Some(used) = &spec.used {
            used.store(true, Ordering::Relaxed);
        }
        if let Some(ending) = &self.ending {
            // A mandatory target failed already: no socket for this one.
            let why = ending.target_reason.clone();
            return self.target_failed_early(spec, why, ctx);
        }
        let Some(&address) = addresses[index].first() else {
            let why = Reason::Unresolved(spec.label.as_str().into());
            return self.target_failed_early(spec, why, ctx);
        };
        match open_socket(address, ctx.registry, token_of(slot, index)) {
            Ok(socket) => {
                self.targets[index] = Some(TargetSocket {
                    socket,
                    received: 0,
                    sent: 0,
                    ready: false,
                    queued: false,
                });
                ctx.journal.connected(
                    self.origin,
                    self.tags(),
                    Side::Target(spec.id),
                    Some(&spec.label),
                );
            }
            Err(e) => self.target_failed_early(spec, Reason::connect_failed(&e), ctx),
        }
    }

    /// A target that never had a socket: event 2 only.
    fn target_failed_early(&mut self, spec: &TargetSpec, why: Reason, ctx: &mut Ctx<'_>) {
        debug!("{}: UDP target {} {why}", self.origin.ident, spec.id);
        let closed = Closed {
            reason: &why,
            received: 0,
            sent: 0,
        };
        ctx.journal.dropped(
            self.origin,
            self.tags(),
            Side::Target(spec.id),
            Some(&spec.label),
            &closed,
        );
        ctx.counters.drop_of(Side::Target(spec.id), &why);
        if spec.mandatory {
            let whole = Reason::MandatoryFailed(spec.id);
            self.end(whole.clone(), whole);
        }
    }

    /// One datagram from the device: looked at by detection, recorded,
    /// then sent on to each target (unless the session is ending: a
    /// mandatory target could not be opened for its first datagram).
    pub fn take_device_datagram(
        &mut self,
        payload: &[u8],
        addresses: &TargetAddresses,
        ctx: &mut Ctx<'_>,
    ) {
        self.last_activity = ctx.now;
        self.received += payload.len() as u64;
        stats::add(&ctx.counters.bytes_received[0], payload.len() as u64);
        stats::add(&ctx.counters.packets[0], 1);
        if self.detecting {
            self.detect(payload, ctx);
        }
        ctx.journal
            .data(self.origin, self.tags(), Side::Device, None, payload);
        self.settle_waiting(addresses, ctx);
        if self.ending.is_some() {
            return;
        }
        for index in 0..MAX_TARGETS {
            self.send_to_target(index, payload, ctx);
        }
        if self.waiting != 0 {
            self.held.push(payload.to_vec());
        }
    }

    fn send_to_target(&mut self, index: usize, payload: &[u8], ctx: &mut Ctx<'_>) {
        let Some(target) = &mut self.targets[index] else {
            return;
        };
        match target.socket.send(payload) {
            Ok(n) => {
                target.sent += n as u64;
                stats::add(&ctx.counters.bytes_sent[index + 1], n as u64);
            }
            Err(e) if is_unreachable(&e) => self.target_failed(index, Reason::io(&e), ctx),
            Err(e) => {
                debug!(
                    "{}: a datagram for UDP target {} was dropped: {e}",
                    self.origin.ident,
                    index + 1
                );
                ctx.counters.udp_drop(UdpDrop::TargetSendFailed, 1);
            }
        }
    }

    /// Notes a readiness event of target `index`'s socket; true when it
    /// should be put on the list of sockets to read.
    pub fn note_target(&mut self, index: usize) -> bool {
        match &mut self.targets[index] {
            Some(target) => {
                target.ready = true;
                !std::mem::replace(&mut target.queued, true)
            }
            None => false,
        }
    }

    /// Takes target `index` off the list of sockets to read; true when it
    /// has datagrams to read.
    pub fn unqueue_target(&mut self, index: usize) -> bool {
        match &mut self.targets[index] {
            Some(target) => {
                target.queued = false;
                target.ready
            }
            None => false,
        }
    }

    /// Reads up to `budget` datagrams from target `index`: each is recorded
    /// and relayed to the device from its listening socket (replies on), or
    /// thrown away (replies off).
    pub fn read_target(
        &mut self,
        index: usize,
        budget: usize,
        buffer: &mut [u8],
        listener: &UdpSocket,
        ctx: &mut Ctx<'_>,
    ) -> Drained {
        for _ in 0..budget {
            let Some(target) = &mut self.targets[index] else {
                return Drained::Empty;
            };
            let n = match target.socket.recv(buffer) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    target.ready = false;
                    return Drained::Empty;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.target_failed(index, Reason::io(&e), ctx);
                    return Drained::Empty;
                }
            };
            target.received += n as u64;
            self.last_activity = ctx.now;
            stats::add(&ctx.counters.bytes_received[index + 1], n as u64);
            stats::add(&ctx.counters.packets[index + 1], 1);
            let spec = target_spec(ctx.settings, index);
            if spec.replies {
                let reply = &buffer[..n];
                ctx.journal.data(
                    self.origin,
                    self.tags(),
                    Side::Target(spec.id),
                    Some(&spec.label),
                    reply,
                );
                self.relay_to_device(reply, listener, ctx);
            }
        }
        match &self.targets[index] {
            Some(target) if target.ready => Drained::More,
            _ => Drained::Empty,
        }
    }

    fn relay_to_device(&mut self, reply: &[u8], listener: &UdpSocket, ctx: &mut Ctx<'_>) {
        match super::wire::send(listener, reply, self.origin.peer, self.local) {
            Ok(n) => {
                self.sent += n as u64;
                stats::add(&ctx.counters.bytes_sent[0], n as u64);
                stats::add(&ctx.counters.udp_datagrams_out, 1);
            }
            Err(e) => {
                debug!(
                    "{}: a reply to the device was dropped: {e}",
                    self.origin.ident
                );
                ctx.counters.udp_drop(UdpDrop::ReplySendFailed, 1);
            }
        }
    }

    /// Drops target `index` (event 2 with `why`); a mandatory one ends the
    /// session.
    fn target_failed(&mut self, index: usize, why: Reason, ctx: &mut Ctx<'_>) {
        let spec = target_spec(ctx.settings, index);
        debug!("{}: UDP target {} {why}", self.origin.ident, spec.id);
        self.drop_target(index, &why, ctx);
        if spec.mandatory {
            let whole = Reason::MandatoryFailed(spec.id);
            self.end(whole.clone(), whole);
        }
    }

    fn drop_target(&mut self, index: usize, why: &Reason, ctx: &mut Ctx<'_>) {
        let Some(mut target) = self.targets[index].take() else {
            return;
        };
        // The socket is closed right after; a failed deregister changes nothing.
        let _ = ctx.registry.deregister(&mut target.socket);
        let spec = target_spec(ctx.settings, index);
        let closed = Closed {
            reason: why,
            received: target.received,
            sent: target.sent,
        };
        ctx.journal.dropped(
            self.origin,
            self.tags(),
            Side::Target(spec.id),
            Some(&spec.label),
            &closed,
        );
        ctx.counters.drop_of(Side::Target(spec.id), why);
    }

    /// Decides the session ends; the first reason given is kept.
    pub fn end(&mut self, why: Reason, target_reason: Reason) {
        if self.ending.is_none() {
            self.ending = Some(Ending {
                reason: why,
                target_reason,
            });
        }
    }

    pub fn is_ending(&self) -> bool {
        self.ending.is_some()
    }

    /// Whether nothing moved either way for `limit`.
    pub fn is_idle(&self, now: Instant, limit: Duration) -> bool {
        now >= self.last_activity + limit
    }

    /// Closes every target socket and writes the events 2, the device's
    /// last. Call once the session is ending.
    pub fn finish(mut self, ctx: &mut Ctx<'_>) {
        let ending = self.ending.take().unwrap_or(Ending {
            reason: Reason::Shutdown,
            target_reason: Reason::Shutdown,
        });
        // Ended before its device was known: not listed where it waited.
        self.forget_device(ctx);
        for index in 0..MAX_TARGETS {
            self.drop_target(index, &ending.target_reason, ctx);
        }
        let closed = Closed {
            reason: &ending.reason,
            received: self.received,
            sent: self.sent,
        };
        ctx.journal
            .dropped(self.origin, self.tags(), Side::Device, None, &closed);
        ctx.counters.drop_of(Side::Device, &ending.reason);
        stats::add(&ctx.counters.udp_closed, 1);
    }

    /// What `ctl list` shows of the session.
    pub fn report(&self, now: Instant) -> ConnectionReport {
        let held = self.held.iter().map(Vec::len).sum();
        let targets = TargetId::all()
            .filter_map(|id| match &self.targets[id.index()] {
                Some(target) => Some(TargetReport {
                    target: id.number(),
                    state: "connected".to_string(),
                    queued: 0,
                    bytes_received: target.received,
                    bytes_sent: target.sent,
                }),
                None => {
                    (self.waiting & identify::bit(id) != 0).then(|| TargetReport::waiting(id, held))
                }
            })
            .collect();
        ConnectionReport {
            ident: self.origin.ident.to_string(),
            peer: self.origin.peer.to_string(),
            age_seconds: now.duration_since(self.opened_at).as_secs_f64(),
            idle_seconds: now.duration_since(self.last_activity).as_secs_f64(),
            bytes_received: self.received,
            bytes_sent: self.sent,
            queued: 0,
            targets,
            device: self.device.as_ref().map(ToString::to_string),
            transport: Some(UDP.to_string()),
        }
    }
}

/// A UDP socket connected to `address`, watched for replies and errors.
fn open_socket(address: SocketAddr, registry: &Registry, token: Token) -> io::Result<UdpSocket> {
    let any = match address {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let mut socket = UdpSocket::bind(any)?;
    socket.connect(address)?;
    registry.register(&mut socket, token, Interest::READABLE)?;
    Ok(socket)
}

/// An error by which a connected UDP socket reports that the target is not
/// there: the ICMP unreachable messages it got back.
fn is_unreachable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENETDOWN
        )
    )
}

/// The spec of a target that has a socket (only configured targets do).
fn target_spec(settings: &Settings, index: usize) -> &TargetSpec {
    settings.targets[index]
        .as_ref()
        .expect("a session only has sockets to configured targets")
}

mod identify;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_a_burst_then_one_datagram_a_millisecond() {
        let mut bucket = Bucket::full(u32::MAX - 5);
        let passed = (0..BURST + 10)
            .filter(|_| bucket.take(u32::MAX - 5))
            .count();
        assert_eq!(passed, BURST as usize);
        // 10 ms later, across the clock's wrap: 10 more.
        let later = (u32::MAX - 5).wrapping_add(10);
        let passed = (0..100).filter(|_| bucket.take(later)).count();
        assert_eq!(passed, 10);
        // Long idle: a full burst again, no more.
        let passed = (0..BURST * 2)
            .filter(|_| bucket.take(later + 60_000))
            .count();
        assert_eq!(passed, BURST as usize);
    }
}
