//! One device connection and its up to three target connections: forwarding,
//! replies, backpressure, half-close and how it ends.
//!
//! A connection lives on one worker for its whole life and is only touched by
//! that worker's thread. The worker notes readiness on its sockets and calls
//! [`Connection::drive`], which does what `lifecycle::next_step` decides
//! from the connection's states until nothing more can move (or a per-wake-up
//! budget is spent). Invariants kept here:
//! - bytes from the device go to every live target in order; a target's
//!   queue never holds more than `target_buffer` bytes: the device is not
//!   read while a mandatory target has anything queued (TCP holds the device
//!   back, and bytes mostly go from socket to socket without a queue), nor,
//!   without a mandatory target, beyond what the non-mandatory target with
//!   the most room can queue; a non-mandatory target that would go over is
//!   dropped;
//! - replies are not read from the targets while the device has replies
//!   queued;
//! - the device's event 1 is its first message and its event 2 its last; a
//!   target gets event 1 only once connected and always an event 2;
//! - who the device is, and what that decides, is `identify`'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::config::{AcceptProxyProtocol, Config, MAX_TARGETS, SendProxyProtocol};
use crate::control::stats::{self, Counters};
use crate::net::devices::Devices;
use crate::net::reason::Reason;
use crate::net::side::{SIDES, Side, TargetId};
use crate::net::socket::Endpoint;
use crate::store::journal::{Closed, Journal, Recorded, Tags};
use crate::store::message::Origin;

mod device;
mod header;
mod identify;
mod lifecycle;
mod report;
mod targets;
mod warnings;

use header::HeaderWait;
use identify::Recognition;
use lifecycle::{Ending, LinkState, LinkStatus, Next, Phase, next_step};
pub use report::{ConnectionReport, TargetReport};

/// The most one read takes in store mode.
const STORE_MAX_READ: usize = 256 * 1024;

/// Rounds of reads and writes for one connection per wake-up, so that one
/// busy device cannot starve the others on its worker.
const ROUNDS_PER_WAKE: usize = 8;

/// A target as every connection sees it.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub id: TargetId,
    /// `proxy.target`: the configured host:port.
    pub label: String,
    pub mandatory: bool,
    pub replies: bool,
    pub send_proxy: SendProxyProtocol,
    /// For a target given by host name: set on each connect, so that the
    /// resolver knows the name is in use and looks it up again.
    pub used: Option<Arc<AtomicBool>>,
    /// The rate limit of its warnings, shared by every worker.
    pub warnings: Arc<warnings::Throttle>,
}

/// What connections need from the configuration, shared by the workers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Indexed by [`TargetId::index`]; see [`Settings::target`].
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
    /// Detectors, device lists and the registry of unique devices.
    pub devices: Arc<Devices>,
}

impl Settings {
    /// The settings of `config` (its detectors checked when it was parsed)
    /// without device lists: the daemon uses [`Settings::with_devices`].
    pub fn new(config: &Config) -> Settings {
        let devices = Devices::without_lists(config).unwrap_or_else(|_| Devices::off());
        Settings::with_devices(config, Arc::new(devices))
    }

    /// The settings of `config`, with `devices` (its lists loaded).
    pub fn with_devices(config: &Config, devices: Arc<Devices>) -> Settings {
        let mut targets: [Option<TargetSpec>; MAX_TARGETS] = Default::default();
        for target in &config.targets {
            let Some(id) = TargetId::from_number(target.number) else {
                continue;
            };
            targets[id.index()] = Some(TargetSpec {
                id,
                label: target.address.to_string(),
                mandatory: target.mandatory,
                replies: target.replies,
                send_proxy: target.send_proxy,
                used: match target.address.literal() {
                    Some(_) => None,
                    None => Some(Arc::new(AtomicBool::new(false))),
                },
                warnings: Arc::default(),
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
            devices,
        }
    }

    /// Target `id`, if it is configured.
    pub fn target(&self, id: TargetId) -> Option<&TargetSpec> {
        self.targets[id.index()].as_ref()
    }
}

/// The addresses of each target (indexed by [`TargetId::index`]), tried in
/// turn; none while a name does not resolve.
pub type TargetAddresses = [Vec<SocketAddr>; MAX_TARGETS];

/// The worker's things a connection uses while it is driven.
pub struct Context<'a> {
    pub registry: &'a Registry,
    pub journal: &'a mut Journal,
    pub settings: &'a Settings,
    /// The current addresses of each target (names are resolved elsewhere).
    pub addresses: &'a TargetAddresses,
    pub counters: &'a Counters,
    /// The worker's id, to name where a connection lives.
    pub worker: usize,
    pub now: Instant,
}

impl Context<'_> {
    /// Counts a read of `n` bytes from `side`.
    fn received(&self, side: Side, n: usize) {
        stats::add(&self.counters.bytes_received[side.index()], n as u64);
        stats::add(&self.counters.packets[side.index()], 1);
    }

    /// Counts `n` bytes written to `side`.
    fn sent(&self, side: Side, n: usize) {
        if n > 0 {
            stats::add(&self.counters.bytes_sent[side.index()], n as u64);
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

/// Bits of a token that hold the side; the slot is in the bits above.
const SIDE_BITS: u32 = 2;
const _: () = assert!(
    SIDES <= 1 << SIDE_BITS,
    "the token's side bits hold every side"
);

/// The token of one socket: the connection's slot and the side.
pub fn token(slot: usize, side: Side) -> Token {
    Token(slot << SIDE_BITS | side.index())
}

/// The slot and side a token stands for (no side for bits that name none).
pub fn slot_and_side(token: Token) -> (usize, Option<Side>) {
    let side = Side::from_index(token.0 & ((1 << SIDE_BITS) - 1));
    (token.0 >> SIDE_BITS, side)
}

/// A connection to one target.
struct Link {
    endpoint: Endpoint,
    /// Which of the target's addresses this connection is to.
    address: usize,
    state: LinkState,
}

impl LinkStatus for Link {
    fn state(&self) -> LinkState {
        self.state
    }

    fn queued(&self) -> bool {
        self.endpoint.queued() > 0
    }
}

pub struct Connection {
    slot: usize,
    origin: Origin,
    /// The address the device connected to, for PROXY headers to targets.
    local: Option<SocketAddr>,
    device: Endpoint,
    /// Indexed by [`TargetId::index`].
    targets: [Option<Link>; MAX_TARGETS],
    phase: Phase,
    opened_at: Instant,
    /// When a byte last moved on any side, or a target got connected.
    last_activity: Instant,
    /// When the kernel's send queues were last looked into.
    looked_at: Instant,
    /// Who the device is, and the targets waiting to know it.
    recognition: Recognition,
    /// On the worker's list of connections to drive.
    pub scheduled: bool,
    /// Its share of the journal's unwritten lines (fairness while the
    /// writer is behind).
    recorded: Recorded,
    /// Not read because the writer is behind: the worker drives it again
    /// once the writer has caught up (nothing else would wake it).
    pub held_back: bool,
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
                token(slot, Side::Device),
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
            phase: Phase::Open,
            opened_at: ctx.now,
            last_activity: ctx.now,
            looked_at: ctx.now,
            recognition: Recognition::new(&ctx.settings.devices, ctx.now),
            scheduled: false,
            recorded: Recorded::default(),
            held_back: false,
        };
        if let Err(e) = registered {
            // Its end is logged, as an error, when it finishes.
            log::debug!("{}: cannot watch the device socket: {e}", origin.ident);
            ctx.journal
                .connected(origin, Tags::default(), Side::Device, None);
            connection.end(Reason::io(&e), Reason::DeviceFailed, false);
            return connection;
        }
        match ctx.settings.accept_proxy {
            AcceptProxyProtocol::Off => {
                ctx.journal
                    .connected(origin, Tags::default(), Side::Device, None);
                connection.connect_targets(ctx);
            }
            _ => connection.phase = Phase::AwaitingHeader(HeaderWait::new(ctx.now)),
        }
        connection
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Records a poll event's hints for one side; `hangup` when the event
    /// reported the peer's end of stream or an error.
    pub fn note_readiness(&mut self, side: Side, readable: bool, writable: bool, hangup: bool) {
        let endpoint = match side {
            Side::Device => &mut self.device,
            Side::Target(target) => match &mut self.targets[target.index()] {
                Some(link) => &mut link.endpoint,
                None => return,
            },
        };
        endpoint.readable |= readable || hangup;
        endpoint.writable |= writable || hangup;
        endpoint.hangup |= hangup;
    }

    /// Does what the connection's states call for until nothing more can
    /// move now.
    pub fn drive(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> Drive {
        for _ in 0..ROUNDS_PER_WAKE {
            let moved = match self.next() {
                Next::ReadHeader => self.read_header(ctx, buffer),
                Next::Relay => self.relay(ctx, buffer),
                Next::PassEof(target) => {
                    self.pass_eof(target, ctx);
                    true
                }
                Next::EndExchange => {
                    // No target is left to be given a reason.
                    self.end(Reason::ClosedByPeer, Reason::ClosedByPeer, true);
                    true
                }
                Next::Linger => self.linger(ctx),
                Next::Finish => {
                    self.finish(ctx);
                    return Drive::Finished;
                }
            };
            if !moved {
                return Drive::Idle;
            }
        }
        Drive::Busy
    }

    /// What [`next_step`] decides for this connection now.
    fn next(&self) -> Next {
        next_step(&self.phase, &self.targets, self.device.queued() > 0)
    }

    /// Enforces the connect and idle timeouts; returns whether anything
    /// changed, so that the connection needs driving (it is ending, or
    /// lost a target).
    pub fn check_timers(&mut self, ctx: &mut Context<'_>) -> bool {
        let mut changed = self.check_header_timeout(ctx) | self.check_detection(ctx);
        for target in TargetId::all() {
            let expired = matches!(
                self.targets[target.index()],
                Some(Link { state: LinkState::Connecting { since }, .. })
                    if ctx.now >= since + ctx.settings.connect_timeout
            );
            if expired {
                self.target_failed(target, Reason::ConnectTimeout, ctx);
                changed = true;
            }
        }
        if let Some(limit) = ctx.settings.idle_timeout {
            self.notice_deliveries(limit, ctx.now);
            if ctx.now >= self.last_activity + limit {
                self.end_now(Reason::IdleTimeout);
                changed = true;
            }
        }
        changed
    }

    /// Bytes written earlier may still be moving out of the kernel's send
    /// queue to a slow peer: that is activity too, though nothing is read
    /// or written meanwhile (megabytes drain for seconds). Looked into
    /// only once the connection has been quiet for a tenth of the idle
    /// timeout, so a busy connection costs nothing; a movement seen is
    /// dated at the previous look, the earliest it can have happened.
    fn notice_deliveries(&mut self, limit: Duration, now: Instant) {
        if now < self.last_activity + limit / 10 {
            return;
        }
        let mut moved = self.device.peer_took_more();
        for link in self.targets.iter_mut().flatten() {
            moved |= link.endpoint.peer_took_more();
        }
        if moved {
            self.last_activity = self.last_activity.max(self.looked_at);
        }
        self.looked_at = now;
    }

    /// Ends the connection for a reason decided outside it (shutdown, an
    /// operator); the caller then drives it to finish.
    pub fn close(&mut self, why: Reason) {
        self.end_now(why);
    }

    /// One round of relaying: each side is read or written at most once,
    /// and nothing more is read once the connection ends.
    fn relay(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> bool {
        let mut moved = self.finish_connects(ctx);
        moved |= self.flush_targets(ctx);
        moved |= match self.phase {
            Phase::Open => self.read_device(ctx, buffer),
            Phase::ReadClosed => self.check_device_reset(),
            _ => false,
        };
        moved |= self.phase.relays() && self.read_targets(ctx, buffer);
        moved |= self.phase.relays() && self.flush_device(ctx);
        moved
    }

    /// Passes the device's end of stream on to `target`, which has been
    /// given everything the device sent.
    fn pass_eof(&mut self, target: TargetId, ctx: &mut Context<'_>) {
        let Some(link) = &mut self.targets[target.index()] else {
            return;
        };
        link.state = LinkState::WriteClosed;
        if let Err(e) = link.endpoint.shutdown_write() {
            self.target_failed(target, Reason::io(&e), ctx);
        }
    }

    /// Decides the connection ends; the first reason given is kept.
    fn end(&mut self, why: Reason, target_reason: Reason, linger: bool) {
        if let Phase::Ending(_) | Phase::Closed = self.phase {
            return;
        }
        let unannounced = matches!(self.phase, Phase::AwaitingHeader(_));
        self.phase = Phase::Ending(Ending {
            reason: why,
            target_reason,
            linger,
            unannounced,
        });
    }

    /// Ends the connection at once: a connection already ending stops
    /// waiting for its device to take its replies.
    fn end_now(&mut self, why: Reason) {
        match &mut self.phase {
            Phase::Ending(ending) => ending.linger = false,
            _ => self.end(why.clone(), why, false),
        }
    }

    /// Delivers replies queued for the device before it closes; false
    /// while the device has not taken them all.
    fn linger(&mut self, ctx: &mut Context<'_>) -> bool {
        match self.device.flush() {
            Ok(written) => {
                ctx.sent(Side::Device, written);
                self.device.queued() == 0
            }
            Err(e) => {
                log::debug!("{}: device write failed: {e}", self.origin.ident);
                if let Phase::Ending(ending) = &mut self.phase {
                    ending.linger = false;
                }
                true
            }
        }
    }

    /// Closes every socket left, targets first, and writes their events 2.
    fn finish(&mut self, ctx: &mut Context<'_>) {
        let Phase::Ending(ending) = std::mem::replace(&mut self.phase, Phase::Closed) else {
            return;
        };
        if ending.unannounced {
            // Closed while its PROXY header was awaited (shutdown, an
            // operator, the idle timeout): its event 1 still comes first.
            ctx.journal
                .connected(self.origin, self.tags(), Side::Device, None);
        }
        self.forget_device(ctx);
        for target in TargetId::all() {
            self.drop_target(target, &ending.target_reason, ctx);
        }
        // The socket is closed right after; a failed deregister changes nothing.
        let _ = ctx.registry.deregister(&mut self.device.stream);
        let closed = Closed {
            reason: &ending.reason,
            received: self.device.received,
            sent: self.device.sent,
        };
        ctx.journal
            .dropped(self.origin, self.tags(), Side::Device, None, &closed);
        ctx.counters.drop_of(Side::Device, &ending.reason);
        warnings::device_dropped(self.origin, &ending.reason);
    }
}
