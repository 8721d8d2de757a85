//! One device connection and its up to three target connections: forwarding,
//! replies, backpressure, half-close and how it ends.
//!
//! A connection lives on one worker for its whole life and is only touched by
//! that worker's thread. The worker notes readiness on its sockets and calls
//! [`Connection::drive`], which moves bytes until nothing more can move (or a
//! per-wake-up budget is spent). Invariants kept here:
//! - bytes from the device go to every live target in order; a target's
//!   queue never holds more than `target_buffer` bytes: the device is not
//!   read while a mandatory target has anything queued (TCP holds the device
//!   back, and bytes mostly go from socket to socket without a queue), and
//!   a non-mandatory target that would go over is dropped;
//! - replies are not read from the targets while the device has replies
//!   queued;
//! - the device's event 1 is its first message and its event 2 its last; a
//!   target gets event 1 only once connected and always an event 2.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::config::{AcceptProxyProtocol, Config, MAX_TARGETS, SendProxyProtocol};
use crate::control::stats::{self, Counters};
use crate::net::reason::{self, Reason};
use crate::net::socket::{Endpoint, ReadOutcome};
use crate::store::journal::{Closed, Journal};
use crate::store::message::{DEVICE, Origin};

mod header;
mod report;
mod targets;

use header::HeaderWait;
pub use report::{ConnectionReport, TargetReport};
use targets::target_spec;

/// The most one read takes in store mode.
const STORE_MAX_READ: usize = 256 * 1024;

/// Rounds of reads and writes for one connection per wake-up, so that one
/// busy device cannot starve the others on its worker.
const ROUNDS_PER_WAKE: usize = 8;

/// A target as every connection sees it.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub number: u8,
    /// `proxy.target`: the configured host:port.
    pub label: String,
    pub mandatory: bool,
    pub replies: bool,
    pub send_proxy: SendProxyProtocol,
    /// For a target given by host name: set on each connect, so that the
    /// resolver knows the name is in use and looks it up again.
    pub used: Option<Arc<AtomicBool>>,
}

/// What connections need from the configuration, shared by the workers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Indexed by target number - 1.
    pub targets: [Option<TargetSpec>; MAX_TARGETS],
    pub target_buffer: usize,
    /// The most one read takes: in store mode a read becomes one message
    /// (twice its size in hex) waiting in the writer's queue, so reads are
    /// kept smaller there to bound that queue's memory.
    pub max_read: usize,
    pub idle_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    /// Whether device connections start with a PROXY protocol header.
    pub accept_proxy: AcceptProxyProtocol,
    /// Whether any target is sent a PROXY protocol header.
    pub sends_proxy_header: bool,
}

impl Settings {
    pub fn new(config: &Config) -> Settings {
        let mut targets: [Option<TargetSpec>; MAX_TARGETS] = Default::default();
        for target in &config.targets {
            targets[usize::from(target.number - 1)] = Some(TargetSpec {
                number: target.number,
                label: target.address.to_string(),
                mandatory: target.mandatory,
                replies: target.replies,
                send_proxy: target.send_proxy,
                used: match target.address.literal() {
                    Some(_) => None,
                    None => Some(Arc::new(AtomicBool::new(false))),
                },
            });
        }
        Settings {
            targets,
            target_buffer: config.target_buffer,
            max_read: match config.store {
                true => STORE_MAX_READ,
                false => usize::MAX,
            }
            .min(config.target_buffer),
            idle_timeout: config.idle_timeout,
            connect_timeout: config.connect_timeout,
            accept_proxy: config.accept_proxy_protocol,
            sends_proxy_header: config
                .targets
                .iter()
                .any(|t| t.send_proxy != SendProxyProtocol::Off),
        }
    }
}

/// The addresses of each target, tried in turn; none while a name does not
/// resolve.
pub type TargetAddresses = [Vec<SocketAddr>; MAX_TARGETS];

/// The worker's things a connection uses while it is driven.
pub struct Context<'a> {
    pub registry: &'a Registry,
    pub journal: &'a mut Journal,
    pub settings: &'a Settings,
    /// The current addresses of each target (names are resolved elsewhere).
    pub addresses: &'a TargetAddresses,
    pub counters: &'a Counters,
    pub now: Instant,
}

impl Context<'_> {
    /// Counts a read of `n` bytes from `side` (0 the device, 1..=3 a target).
    fn received(&self, side: usize, n: usize) {
        stats::add(&self.counters.bytes_received[side], n as u64);
        stats::add(&self.counters.packets[side], 1);
    }

    /// Counts `n` bytes written to `side`.
    fn sent(&self, side: usize, n: usize) {
        if n > 0 {
            stats::add(&self.counters.bytes_sent[side], n as u64);
        }
    }
}

/// What the worker should do with the connection after driving it.
#[derive(Debug, PartialEq, Eq)]
pub enum Drive {
    /// Waiting for readiness.
    Idle,
    /// Budget spent with work left: drive again soon.
    Busy,
    /// Closed and journaled: remove it.
    Finished,
}

/// The token of one socket: the connection's slot and the side (0 device,
/// 1..=3 target).
pub fn token(slot: usize, side: usize) -> Token {
    Token(slot << 2 | side)
}

/// The slot and side a token stands for.
pub fn slot_and_side(token: Token) -> (usize, usize) {
    (token.0 >> 2, token.0 & 3)
}

/// A connection to one target.
struct Link {
    endpoint: Endpoint,
    /// Which of the target's addresses this connection is to.
    address: usize,
    /// When the connect started, while it has not finished.
    connecting_since: Option<Instant>,
}

/// Why and how the connection is ending.
struct Ending {
    reason: Reason,
    /// The reason written for the targets still open.
    target_reason: Reason,
    /// Deliver what is queued for the device before closing it.
    linger: bool,
}

pub struct Connection {
    slot: usize,
    origin: Origin,
    /// The address the device connected to, for PROXY headers to targets.
    local: Option<SocketAddr>,
    device: Endpoint,
    targets: [Option<Link>; MAX_TARGETS],
    /// While the device's PROXY protocol header is awaited.
    header: Option<HeaderWait>,
    opened_at: Instant,
    last_activity: Instant,
    ending: Option<Ending>,
    /// On the worker's list of connections to drive.
    pub scheduled: bool,
}

impl Connection {
    /// Takes over an accepted device socket: event 1, then a connect to
    /// every target at once.
    pub fn open(
        slot: usize,
        mut stream: TcpStream,
        origin: Origin,
        ctx: &mut Context<'_>,
    ) -> Connection {
        let registered = stream.set_nodelay(true).and_then(|()| {
            ctx.registry.register(
                &mut stream,
                token(slot, 0),
                Interest::READABLE | Interest::WRITABLE,
            )
        });
        let local = match ctx.settings.sends_proxy_header {
            true => stream.local_addr().ok(),
            false => None,
        };
        let mut connection = Connection {
            slot,
            origin,
            local,
            device: Endpoint::new(stream, true),
            targets: Default::default(),
            header: None,
            opened_at: ctx.now,
            last_activity: ctx.now,
            ending: None,
            scheduled: false,
        };
        if let Err(e) = registered {
            log::warn!("{}: cannot watch the device socket: {e}", origin.ident);
            ctx.journal.connected(origin, DEVICE, None);
            connection.end(reason::describe(&e), reason::DEVICE_FAILED.into(), false);
            return connection;
        }
        match ctx.settings.accept_proxy {
            AcceptProxyProtocol::Off => {
                ctx.journal.connected(origin, DEVICE, None);
                connection.connect_targets(ctx);
            }
            _ => connection.header = Some(HeaderWait::new(ctx.now)),
        }
        connection
    }

    /// The device is known (its event 1 written): a connect to every
    /// target at once. Once a mandatory target has failed at once, the
    /// targets after it are not connected, but each still gets its event 2.
    fn connect_targets(&mut self, ctx: &mut Context<'_>) {
        for spec in ctx.settings.targets.iter().flatten() {
            match self
                .ending
                .as_ref()
                .map(|ending| ending.target_reason.clone())
            {
                Some(why) => self.target_failed_early(spec, why, ctx),
                None => self.connect_target(spec, ctx),
            }
        }
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Records a poll event's hints for one side; `hangup` when the event
    /// reported the peer's end of stream or an error.
    pub fn note_readiness(&mut self, side: usize, readable: bool, writable: bool, hangup: bool) {
        let endpoint = match side {
            0 => &mut self.device,
            n => match &mut self.targets[n - 1] {
                Some(link) => &mut link.endpoint,
                None => return,
            },
        };
        endpoint.readable |= readable || hangup;
        endpoint.writable |= writable || hangup;
        endpoint.hangup |= hangup;
    }

    /// Moves bytes until nothing more can move now.
    pub fn drive(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> Drive {
        for _ in 0..ROUNDS_PER_WAKE {
            if self.ending.is_some() {
                return self.linger_or_finish(ctx);
            }
            if !self.step(ctx, buffer) {
                return match self.ending {
                    Some(_) => self.linger_or_finish(ctx),
                    None => Drive::Idle,
                };
            }
        }
        Drive::Busy
    }

    /// Enforces the connect and idle timeouts; returns whether the
    /// connection now needs driving (it is ending, or lost a target).
    pub fn check_timers(&mut self, ctx: &mut Context<'_>) -> bool {
        self.check_header_timeout(ctx);
        let mut dropped_a_target = false;
        for index in 0..MAX_TARGETS {
            let expired = self.targets[index]
                .as_ref()
                .and_then(|link| link.connecting_since)
                .is_some_and(|since| ctx.now >= since + ctx.settings.connect_timeout);
            if expired {
                self.target_failed(index, reason::CONNECT_TIMEOUT.into(), ctx);
                dropped_a_target = true;
            }
        }
        let idle = ctx
            .settings
            .idle_timeout
            .is_some_and(|limit| ctx.now >= self.last_activity + limit);
        if idle {
            match &mut self.ending {
                // Lingering for a device that takes nothing: give up.
                Some(ending) => ending.linger = false,
                None => self.end(
                    reason::IDLE_TIMEOUT.into(),
                    reason::IDLE_TIMEOUT.into(),
                    false,
                ),
            }
        }
        // A dropped target may have been the last one after the device's
        // end of stream: driving the connection then ends it.
        dropped_a_target || self.ending.is_some()
    }

    /// Ends the connection for a reason decided outside it (shutdown, an
    /// operator); the caller then drives it to finish.
    pub fn close(&mut self, why: &'static str) {
        match &mut self.ending {
            // Already ending (lingering for the device): stop waiting.
            Some(ending) => ending.linger = false,
            None => self.end(why.into(), why.into(), false),
        }
    }

    /// One round: each side is read or written at most once.
    fn step(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> bool {
        if self.header.is_some() {
            return self.read_header(ctx, buffer);
        }
        let mut moved = self.finish_connects(ctx);
        moved |= self.flush_targets(ctx);
        moved |= self.check_device_reset();
        moved |= self.read_device(ctx, buffer);
        moved |= self.read_targets(ctx, buffer);
        moved |= self.flush_device(ctx);
        self.pass_on_device_eof(ctx);
        moved
    }

    fn read_device(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> bool {
        if self.ending.is_some() || !self.device.readable || self.device.read_closed {
            return false;
        }
        let limit = self.device_read_limit(ctx.settings, buffer.len());
        if limit == 0 {
            return false;
        }
        match self.device.read(&mut buffer[..limit]) {
            ReadOutcome::Data(n) => {
                self.last_activity = ctx.now;
                ctx.received(0, n);
                let packet = &buffer[..n];
                ctx.journal.data(self.origin, DEVICE, None, packet);
                self.forward_to_targets(packet, ctx);
                true
            }
            ReadOutcome::WouldBlock => false,
            ReadOutcome::Closed => true,
            ReadOutcome::Failed(e) => {
                self.end(reason::describe(&e), reason::DEVICE_FAILED.into(), false);
                true
            }
        }
    }

    /// A device that resets after its end of stream is read no more, so
    /// only its socket's pending error tells: then everything closes at
    /// once, as for any device reset. Looked at once per poll event.
    fn check_device_reset(&mut self) -> bool {
        if !self.device.read_closed || !self.device.hangup || self.ending.is_some() {
            return false;
        }
        self.device.hangup = false;
        match self.device.stream.take_error() {
            Ok(None) => false,
            // After the device's FIN the kernel reports its RST as EPIPE,
            // which `describe` names `reset by peer` too.
            Ok(Some(e)) | Err(e) => {
                self.end(reason::describe(&e), reason::DEVICE_FAILED.into(), false);
                true
            }
        }
    }

    /// How much may be read from the device now: nothing while a mandatory
    /// target still has bytes queued, so TCP holds the device back and a
    /// queue never holds more than the rest of one read (bytes then go
    /// straight from one socket to the other, not through a queue); and
    /// never more than a target's buffer at once.
    fn device_read_limit(&self, settings: &Settings, buffer_len: usize) -> usize {
        let mandatory_behind = self.targets.iter().enumerate().any(|(index, link)| {
            link.as_ref().is_some_and(|link| {
                target_spec(settings, index).mandatory && link.endpoint.queued() > 0
            })
        });
        match mandatory_behind {
            true => 0,
            false => buffer_len.min(settings.max_read),
        }
    }

    fn flush_device(&mut self, ctx: &mut Context<'_>) -> bool {
        if self.ending.is_some() || self.device.queued() == 0 {
            return false;
        }
        match self.device.flush() {
            Ok(0) => false,
            Ok(written) => {
                ctx.sent(0, written);
                self.last_activity = ctx.now;
                true
            }
            Err(e) => {
                self.end(reason::describe(&e), reason::DEVICE_FAILED.into(), false);
                true
            }
        }
    }

    /// After the device's end of stream: pass the FIN on to each target once
    /// its queue is delivered, and end once no target is left.
    fn pass_on_device_eof(&mut self, ctx: &mut Context<'_>) {
        if !self.device.read_closed || self.ending.is_some() {
            return;
        }
        for index in 0..MAX_TARGETS {
            let Some(link) = &mut self.targets[index] else {
                continue;
            };
            if link.connecting_since.is_some() || link.endpoint.queued() > 0 {
                continue;
            }
            if let Err(e) = link.endpoint.shutdown_write() {
                self.target_failed(index, reason::describe(&e), ctx);
            }
        }
        if self.targets.iter().all(Option::is_none) && self.ending.is_none() {
            // No target is left to be given a reason.
            let why: Reason = reason::CLOSED_BY_PEER.into();
            self.end(why.clone(), why, true);
        }
    }

    /// Decides the connection ends; the first reason given is kept.
    fn end(&mut self, why: Reason, target_reason: Reason, linger: bool) {
        if self.ending.is_none() {
            self.ending = Some(Ending {
                reason: why,
                target_reason,
                linger,
            });
        }
    }

    fn linger_or_finish(&mut self, ctx: &mut Context<'_>) -> Drive {
        let lingering = self.ending.as_ref().is_some_and(|e| e.linger);
        if lingering && self.device.queued() > 0 {
            let flushed = self.device.flush();
            if let Ok(written) = flushed {
                ctx.sent(0, written);
            }
            match flushed {
                Ok(_) if self.device.queued() > 0 => return Drive::Idle,
                Ok(_) => {}
                Err(e) => log::debug!("{}: device write failed: {e}", self.origin.ident),
            }
        }
        self.finish(ctx);
        Drive::Finished
    }

    /// Closes every socket left, targets first, and writes their events 2.
    fn finish(&mut self, ctx: &mut Context<'_>) {
        let Some(ending) = self.ending.take() else {
            return;
        };
        if self.header.take().is_some() {
            // Closed while its PROXY header was awaited (shutdown, an
            // operator, the idle timeout): its event 1 still comes first.
            ctx.journal.connected(self.origin, DEVICE, None);
        }
        for index in 0..MAX_TARGETS {
            self.drop_target(index, ending.target_reason.clone(), ctx);
        }
        // The socket is closed right after; a failed deregister changes nothing.
        let _ = ctx.registry.deregister(&mut self.device.stream);
        let closed = Closed {
            reason: &ending.reason,
            received: self.device.received,
            sent: self.device.sent,
        };
        ctx.journal.dropped(self.origin, DEVICE, None, &closed);
        ctx.counters.drop_of(0, &ending.reason);
    }
}
