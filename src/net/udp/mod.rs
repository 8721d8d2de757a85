//! UDP devices (PROXY_LISTEN_UDP): each worker's listening sockets and the
//! sessions that live on it.
//!
//! A session is one device address (ip:port) on one listening address. Its
//! first datagram opens it (an admission under PROXY_MAX_CONNECTIONS, shared
//! with TCP, and an ident from the generator the acceptor uses too); it ends
//! after PROXY_IDLE_TIMEOUT with no datagram either way (10 minutes when
//! that is 0: nothing else can end it), when a mandatory target is
//! unreachable, by `ctl close`, or at shutdown. The `session` module says
//! what a session does with each datagram.
//!
//! Every worker binds its own socket on each address with SO_REUSEPORT
//! ([`wire`]); the kernel sends a device's datagrams to the same socket
//! each time, so its session is on one worker, driven by that worker's
//! poll loop like its TCP connections. The worker calls in here through a
//! few hooks: [`UdpSessions::note`] for a token of this module's space,
//! [`UdpSessions::drive`] each loop, [`UdpSessions::check_timers`] on its
//! tick, and the list, close and shutdown commands.
//!
//! Fairness and bounds: each drive reads at most `LISTENER_BUDGET`
//! datagrams per listening socket and `TARGET_BUDGET` per target socket,
//! then lets the worker's TCP connections and other sockets have their
//! turn (edge-triggered readiness left over is remembered, and the worker
//! polls without waiting while any is). A flooding address is held to a
//! rate (see `session::Bucket`) and its excess costs one read each. A
//! session's memory is fixed (no queue: a datagram a socket does not take
//! at once is dropped and counted), so memory is bounded by
//! PROXY_MAX_CONNECTIONS.

mod session;
pub mod wire;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::control::stats::{self, Counters, UdpDrop};
use crate::net::admission::{Admission, RefusalLog};
use crate::net::connection::{ConnectionReport, Settings, TargetAddresses};
use crate::net::reason::Reason;
use crate::net::worker::close_level;
use crate::store::journal::Journal;
use crate::store::message::{Ident, IdentGenerator};

use session::{Ctx, Drained, Opening, Session};
pub use wire::{Listener, bind_group};

/// The bit that marks this module's tokens in the worker's poll: TCP
/// connection tokens (`slot << 2 | side`) never reach it. Below it: a
/// listening socket is `index << 2`, a session's target socket
/// `slot << 2 | target` (1..=3). The worker's waker, `usize::MAX`, is not
/// one of ours.
const TOKEN_BIT: usize = 1 << (usize::BITS - 1);

/// Datagrams read from one listening socket per drive.
const LISTENER_BUDGET: usize = 256;
/// Datagrams read from one target socket per drive.
const TARGET_BUDGET: usize = 32;
/// How long a silent session lasts when PROXY_IDLE_TIMEOUT is 0.
const SILENCE_LIMIT: Duration = Duration::from_secs(600);
/// The largest UDP payload (IPv6 without jumbograms: 65,527 bytes).
const MAX_DATAGRAM: usize = 65_536;

/// Whether `token` belongs to this module (the worker's dispatch).
pub fn is_udp_token(token: Token) -> bool {
    token.0 & TOKEN_BIT != 0 && token.0 != usize::MAX
}

fn listener_token(index: usize) -> Token {
    Token(TOKEN_BIT | index << 2)
}

fn target_token(slot: usize, index: usize) -> Token {
    Token(TOKEN_BIT | slot << 2 | (index + 1))
}

/// What a worker's UDP side starts with.
pub struct UdpSetup {
    /// This worker's socket on each PROXY_LISTEN_UDP address (none: UDP off).
    pub listeners: Vec<Listener>,
    pub admission: Arc<Admission>,
    /// A clone of the acceptor's generator: idents never repeat across TCP
    /// and UDP.
    pub idents: IdentGenerator,
}

struct Listening {
    listener: Listener,
    /// Readiness noted and not yet read to `WouldBlock`.
    ready: bool,
}

/// What every session of the worker uses, lent to it as a [`Ctx`].
struct Shared {
    worker: usize,
    registry: Registry,
    settings: Arc<Settings>,
    counters: Arc<Counters>,
}

impl Shared {
    /// The context of a session's turn; a field apart from the sessions,
    /// so that it can be lent while one of them is borrowed.
    fn ctx<'a>(&'a self, journal: &'a mut Journal, now: Instant) -> Ctx<'a> {
        Ctx {
            registry: &self.registry,
            journal,
            settings: &self.settings,
            counters: &self.counters,
            worker: self.worker,
            now,
        }
    }
}

/// One worker's listening sockets and UDP sessions.
pub struct UdpSessions {
    shared: Shared,
    /// None with UDP off (no listening socket, so no session either).
    admission: Option<Arc<Admission>>,
    idents: IdentGenerator,
    listeners: Vec<Listening>,
    sessions: Slab<Session>,
    /// Each session's slot, by listening socket and device address.
    by_peer: HashMap<(usize, SocketAddr), usize>,
    /// Target sockets with datagrams left to read: (slot, target index).
    ready_targets: Vec<(usize, usize)>,
    idle_limit: Duration,
    /// The start of the sessions' millisecond clock (rate buckets).
    clock: Instant,
    buffer: Vec<u8>,
    refusals: RefusalLog,
}

impl UdpSessions {
    /// Watches the listening sockets in the worker's poll; `setup` None:
    /// UDP is off, and every call here does nothing.
    pub fn new(
        setup: Option<UdpSetup>,
        worker: usize,
        registry: &Registry,
        settings: Arc<Settings>,
        counters: Arc<Counters>,
    ) -> io::Result<UdpSessions> {
        let registry = registry.try_clone()?;
        let (sockets, admission, idents) = match setup {
            Some(setup) => (setup.listeners, Some(setup.admission), setup.idents),
            None => (Vec::new(), None, IdentGenerator::new()),
        };
        let mut listeners = Vec::new();
        for (index, mut listener) in sockets.into_iter().enumerate() {
            registry.register(
                &mut listener.socket,
                listener_token(index),
                Interest::READABLE,
            )?;
            // Datagrams may have arrived before the registration.
            listeners.push(Listening {
                listener,
                ready: true,
            });
        }
        let buffer = match listeners.is_empty() {
            true => Vec::new(),
            false => vec![0; MAX_DATAGRAM],
        };
        Ok(UdpSessions {
            idle_limit: settings.idle_timeout.unwrap_or(SILENCE_LIMIT),
            shared: Shared {
                worker,
                registry,
                settings,
                counters,
            },
            admission,
            idents,
            listeners,
            sessions: Slab::new(),
            by_peer: HashMap::new(),
            ready_targets: Vec::new(),
            clock: Instant::now(),
            buffer,
            refusals: RefusalLog::new("dropped a UDP datagram"),
        })
    }

    /// Notes a poll event for one of this module's tokens.
    pub fn note(&mut self, token: Token) {
        let bits = token.0 & !TOKEN_BIT;
        let (slot, side) = (bits >> 2, bits & 3);
        if side == 0 {
            if let Some(listening) = self.listeners.get_mut(slot) {
                listening.ready = true;
            }
        } else if let Some(session) = self.sessions.get_mut(slot) {
            if session.note_target(side - 1) {
                self.ready_targets.push((slot, side - 1));
            }
        }
    }

    /// Whether sockets are left with datagrams to read (the worker then
    /// polls without waiting).
    pub fn has_work(&self) -> bool {
        !self.ready_targets.is_empty() || self.listeners.iter().any(|l| l.ready)
    }

    /// Reads what the sockets hold, within the budgets.
    pub fn drive(&mut self, journal: &mut Journal, addresses: &TargetAddresses, now: Instant) {
        for index in 0..self.listeners.len() {
            if self.listeners[index].ready {
                self.drain_listener(index, journal, addresses, now);
            }
        }
        self.drain_targets(journal, now);
    }

    fn drain_listener(
        &mut self,
        index: usize,
        journal: &mut Journal,
        addresses: &TargetAddresses,
        now: Instant,
    ) {
        for _ in 0..LISTENER_BUDGET {
            let listening = &mut self.listeners[index];
            let arrival = match wire::receive(&listening.listener.socket, &mut self.buffer) {
                Ok(arrival) => arrival,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    listening.ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("[worker {}] UDP receive failed: {e}", self.shared.worker);
                    continue;
                }
            };
            if let Some(dropped) = arrival.dropped {
                let lost = listening.listener.note_drops(dropped);
                self.shared
                    .counters
                    .udp_drop(UdpDrop::ReceiveBufferOverflow, lost);
            }
            stats::add(&self.shared.counters.udp_datagrams_in, 1);
            self.take_datagram(index, &arrival, journal, addresses, now);
        }
    }

    /// One device datagram: to its session, opened for it if new.
    fn take_datagram(
        &mut self,
        listener: usize,
        arrival: &wire::Arrival,
        journal: &mut Journal,
        addresses: &TargetAddresses,
        now: Instant,
    ) {
        let now_ms = self.millis(now);
        let slot = match self.by_peer.get(&(listener, arrival.peer)) {
            Some(&slot) => slot,
            None => match self.open(listener, arrival, journal, addresses, now) {
                Some(slot) => slot,
                None => return,
            },
        };
        let session = &mut self.sessions[slot];
        if !session.bucket.take(now_ms) {
            self.shared.counters.udp_drop(UdpDrop::RateLimit, 1);
            return;
        }
        let mut ctx = self.shared.ctx(journal, now);
        session.take_device_datagram(&self.buffer[..arrival.len], addresses, &mut ctx);
        if session.is_ending() {
            self.finish(slot, journal, now);
        }
    }

    /// Opens a session for a new device address, or counts the datagram
    /// dropped when the address is not admitted (nothing is written).
    fn open(
        &mut self,
        listener: usize,
        arrival: &wire::Arrival,
        journal: &mut Journal,
        addresses: &TargetAddresses,
        now: Instant,
    ) -> Option<usize> {
        let admission = self.admission.as_ref()?;
        let permit = match admission.admit(arrival.peer.ip()) {
            Ok(permit) => permit,
            Err(cause) => {
                self.shared.counters.udp_drop(UdpDrop::of_refusal(cause), 1);
                self.refusals.note(arrival.peer, cause);
                return None;
            }
        };
        let opening = Opening {
            origin: crate::store::message::Origin {
                ident: self.idents.next_ident(),
                peer: arrival.peer,
            },
            listener,
            local: arrival.local,
            permit,
            now_ms: self.millis(now),
        };
        debug!(
            "[worker {}] {}: UDP session from {}",
            self.shared.worker, opening.origin.ident, arrival.peer
        );
        let entry = self.sessions.vacant_entry();
        let slot = entry.key();
        let mut ctx = self.shared.ctx(journal, now);
        entry.insert(Session::open(
            opening,
            slot,
            target_token,
            addresses,
            &mut ctx,
        ));
        self.by_peer.insert((listener, arrival.peer), slot);
        Some(slot)
    }

    /// Reads the target sockets that have datagrams, each within its budget.
    fn drain_targets(&mut self, journal: &mut Journal, now: Instant) {
        let queued = std::mem::take(&mut self.ready_targets);
        for &(slot, index) in &queued {
            let Some(session) = self.sessions.get_mut(slot) else {
                continue;
            };
            if !session.unqueue_target(index) {
                continue;
            }
            let mut ctx = self.shared.ctx(journal, now);
            let listener = &self.listeners[session.listener].listener.socket;
            let drained =
                session.read_target(index, TARGET_BUDGET, &mut self.buffer, listener, &mut ctx);
            if drained == Drained::More && session.note_target(index) {
                self.ready_targets.push((slot, index));
            }
            if session.is_ending() {
                self.finish(slot, journal, now);
            }
        }
    }

    /// Ends the sessions silent for the idle limit (`idle timeout`) and
    /// the detection of devices not recognised in time, and counts the
    /// datagrams the kernel dropped since the last look.
    pub fn check_timers(
        &mut self,
        journal: &mut Journal,
        addresses: &TargetAddresses,
        now: Instant,
    ) {
        for listening in &mut self.listeners {
            // A kernel without SO_MEMINFO: the datagrams' own counts remain.
            if let Ok(count) = listening.listener.read_drops() {
                let lost = listening.listener.note_drops(count);
                self.shared
                    .counters
                    .udp_drop(UdpDrop::ReceiveBufferOverflow, lost);
            }
        }
        let expired: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, session)| session.is_idle(now, self.idle_limit))
            .map(|(slot, _)| slot)
            .collect();
        for slot in expired {
            self.sessions[slot].end(Reason::IdleTimeout, Reason::IdleTimeout);
            self.finish(slot, journal, now);
        }
        let mut ctx = self.shared.ctx(journal, now);
        for (_, session) in self.sessions.iter_mut() {
            session.check_detection(addresses, &mut ctx);
        }
    }

    /// Ends every session (reason `why`): at shutdown.
    pub fn close_all(&mut self, why: Reason, journal: &mut Journal, now: Instant) {
        let slots: Vec<usize> = self.sessions.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            self.sessions[slot].end(why.clone(), why.clone());
            self.finish(slot, journal, now);
        }
    }

    /// Ends the session with `ident` for `why` (`closed by operator`,
    /// `replaced by a newer connection`), if it is here.
    pub fn close_ident(
        &mut self,
        ident: Ident,
        why: Reason,
        journal: &mut Journal,
        now: Instant,
    ) -> bool {
        let found = self
            .sessions
            .iter()
            .find(|(_, session)| session.origin.ident == ident)
            .map(|(slot, _)| slot);
        let Some(slot) = found else {
            return false;
        };
        log::log!(
            close_level(&why),
            "[worker {}] {ident}: {why}",
            self.shared.worker
        );
        self.sessions[slot].end(why.clone(), why);
        self.finish(slot, journal, now);
        true
    }

    /// Every session, as `ctl list` shows it.
    pub fn reports(&self, now: Instant) -> impl Iterator<Item = ConnectionReport> + '_ {
        self.sessions.iter().map(move |(_, s)| s.report(now))
    }

    /// Removes an ending session and writes its events 2; its permit goes
    /// with it.
    fn finish(&mut self, slot: usize, journal: &mut Journal, now: Instant) {
        let session = self.sessions.remove(slot);
        self.by_peer
            .remove(&(session.listener, session.origin.peer));
        let mut ctx = self.shared.ctx(journal, now);
        session.finish(&mut ctx);
    }

    /// Milliseconds since the sessions' clock started, wrapping (49 days).
    fn millis(&self, now: Instant) -> u32 {
        now.duration_since(self.clock).as_millis() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_of_this_module_never_meet_tcp_tokens_or_the_waker() {
        assert!(is_udp_token(listener_token(0)));
        assert!(is_udp_token(target_token(1 << 40, 2)));
        assert!(!is_udp_token(Token(usize::MAX)), "the worker's waker");
        // A TCP token: slot << 2 | side, for any slot a slab can reach.
        assert!(!is_udp_token(Token((1 << 40) << 2 | 3)));
        let bits = target_token(77, 2).0 & !TOKEN_BIT;
        assert_eq!((bits >> 2, bits & 3), (77, 3));
    }
}
