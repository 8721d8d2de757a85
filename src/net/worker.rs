//! A worker thread: one mio `Poll` over all of its connections.
//!
//! The worker owns its poll, its connections (in a slab, so a token maps to a
//! slot), one read buffer shared by all of them, and its journal. Nothing in
//! the loop is shared with other threads: new sockets, target addresses and
//! the shutdown order arrive as [`Command`]s on a channel, announced by the
//! poll's waker. Each iteration: wait for events, note them on the
//! connections, drive the connections that have work, check timers about
//! ten times per timeout, and hand the iteration's messages to the writer.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use log::{debug, error, warn};
use mio::net::TcpStream;
use mio::{Events, Poll, Token, Waker};
use slab::Slab;

use crate::control::stats::{self, Counters};
use crate::net::admission::Permit;
use crate::net::connection::{
    Connection, ConnectionReport, Context, Drive, Settings, TargetAddresses, slot_and_side,
};
use crate::net::reason::Reason;
use crate::net::side::TargetId;
use crate::net::udp::{self, UdpSessions, UdpSetup};
use crate::store::journal::Journal;
use crate::store::message::{Ident, Origin};

/// The worker's read buffer: one read returns at most this much (less in
/// store mode, see `Settings::max_read`, and never more than a target's
/// buffer). Large reads mean fewer system calls per byte (measured with 3
/// targets: 256 KiB 0.42, 1 MiB 0.34, 4 MiB 0.30 proxy CPU s/GiB with one
/// connection). Its pages are only touched as far as reads fill it.
pub const READ_BUFFER: usize = 4 << 20;

const WAKER: Token = Token(usize::MAX);

/// What other threads ask of a worker.
pub enum Command {
    /// A new device connection to take over.
    Adopt {
        stream: TcpStream,
        origin: Origin,
        /// Its place under the connection limits, given back when it ends.
        permit: Permit,
    },
    /// Target `number` now lives at these addresses (none: not resolvable).
    TargetAddress {
        number: u8,
        addresses: Vec<SocketAddr>,
    },
    /// Report every connection.
    List {
        reply: Sender<Vec<ConnectionReport>>,
    },
    /// Close the connection with this ident (reason `closed by operator`);
    /// the reply says whether this worker had it.
    Close { ident: Ident, reply: Sender<bool> },
    /// Close the connection (or UDP session) with this ident, if it is
    /// still here: its device has a newer one (PROXY_DEVICE_UNIQUE).
    Replace { ident: Ident },
    /// Close every connection with reason `shutdown` and stop.
    Shutdown,
}

/// How other threads reach a worker.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    sender: Sender<Command>,
    waker: Arc<Waker>,
}

impl WorkerHandle {
    /// Queues a command without waking the worker; returns false when the
    /// worker has stopped.
    pub fn post(&self, command: Command) -> bool {
        self.sender.send(command).is_ok()
    }

    /// Makes the worker look at its commands.
    pub fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            error!("cannot wake a worker: {e}");
        }
    }

    /// Posts and wakes.
    pub fn send(&self, command: Command) -> bool {
        let posted = self.post(command);
        self.wake();
        posted
    }
}

pub struct Worker {
    id: usize,
    poll: Poll,
    inbox: Receiver<Command>,
    connections: Slab<Connection>,
    /// Slots of connections that have work (events or budget left over).
    scheduled: Vec<usize>,
    settings: Arc<Settings>,
    journal: Journal,
    buffer: Vec<u8>,
    addresses: TargetAddresses,
    /// Each connection's place under the connection limits, by slot.
    permits: Vec<Option<Permit>>,
    /// Connections not read while the writer is behind, to drive again
    /// when the journal's epoch moves on.
    held_back: Vec<usize>,
    held_back_epoch: u64,
    counters: Arc<Counters>,
    tick: Duration,
    /// UDP: this worker's listening sockets and sessions (net::udp).
    udp: UdpSessions,
}

/// Everything a worker starts with.
pub struct WorkerSetup {
    pub id: usize,
    pub settings: Arc<Settings>,
    pub journal: Journal,
    pub addresses: TargetAddresses,
    pub counters: Arc<Counters>,
}

impl Worker {
    /// Creates the worker's poll and waker here, so errors reach the caller,
    /// then runs the loop on a new thread.
    pub fn spawn(setup: WorkerSetup) -> io::Result<(WorkerHandle, JoinHandle<()>)> {
        Worker::spawn_with_udp(setup, None)
    }

    /// [`Worker::spawn`], with this worker's UDP listening sockets (UDP:
    /// PROXY_LISTEN_UDP set).
    pub fn spawn_with_udp(
        setup: WorkerSetup,
        udp: Option<UdpSetup>,
    ) -> io::Result<(WorkerHandle, JoinHandle<()>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (sender, inbox) = crossbeam_channel::unbounded();
        let tick = timer_tick(&setup.settings);
        // UDP: hook 1 of 7, the sessions' side is created with the poll.
        let udp = UdpSessions::new(
            udp,
            setup.id,
            poll.registry(),
            Arc::clone(&setup.settings),
            Arc::clone(&setup.counters),
        )?;
        let mut worker = Worker {
            id: setup.id,
            poll,
            inbox,
            connections: Slab::new(),
            scheduled: Vec::new(),
            settings: setup.settings,
            journal: setup.journal,
            buffer: vec![0; READ_BUFFER],
            addresses: setup.addresses,
            permits: Vec::new(),
            held_back: Vec::new(),
            held_back_epoch: 0,
            counters: setup.counters,
            tick,
            udp,
        };
        let thread = std::thread::Builder::new()
            .name(format!("worker-{}", setup.id))
            .spawn(move || worker.run())?;
        Ok((WorkerHandle { sender, waker }, thread))
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + self.tick;
        loop {
            // UDP: hook 2, sockets with datagrams left mean no waiting.
            let timeout = match self.scheduled.is_empty() && !self.udp.has_work() {
                true => {
                    let now = Instant::now();
                    let wake = self
                        .journal
                        .next_deadline(now)
                        .map_or(next_tick, |due| due.min(next_tick));
                    wake.saturating_duration_since(now)
                }
                false => Duration::ZERO,
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("[worker {}] poll failed: {e}", self.id);
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let now = Instant::now();
            let mut stop = false;
            for event in &events {
                if event.token() == WAKER {
                    stop |= self.take_commands(now);
                    continue;
                }
                // UDP: hook 3, tokens with the UDP bit are the sessions'.
                if udp::is_udp_token(event.token()) {
                    self.udp.note(event.token());
                    continue;
                }
                let hangup = event.is_read_closed() || event.is_error();
                self.note(
                    event.token(),
                    event.is_readable(),
                    event.is_writable(),
                    hangup,
                );
            }
            if stop {
                self.close_all(Reason::Shutdown, now);
                // UDP: hook 4, sessions end with `shutdown` too.
                self.udp.close_all(Reason::Shutdown, &mut self.journal, now);
                self.journal.flush();
                return;
            }
            self.drive_scheduled(now);
            // UDP: hook 5, read the datagrams waiting, within budgets.
            self.udp.drive(&mut self.journal, &self.addresses, now);
            if now >= next_tick {
                self.check_timers(now);
                // UDP: hook 6, idle sessions end.
                self.udp
                    .check_timers(&mut self.journal, &self.addresses, now);
                next_tick = now + self.tick;
            }
            self.journal.settle(Instant::now());
            self.release_held_back();
        }
    }

    fn note(&mut self, token: Token, readable: bool, writable: bool, hangup: bool) {
        let (slot, Some(side)) = slot_and_side(token) else {
            return;
        };
        if let Some(connection) = self.connections.get_mut(slot) {
            connection.note_readiness(side, readable, writable, hangup);
            schedule(&mut self.scheduled, connection, slot);
        }
    }

    /// Handles queued commands; returns true on shutdown.
    fn take_commands(&mut self, now: Instant) -> bool {
        loop {
            match self.inbox.try_recv() {
                Ok(Command::Adopt {
                    stream,
                    origin,
                    permit,
                }) => self.adopt(stream, origin, permit, now),
                Ok(Command::TargetAddress { number, addresses }) => {
                    if let Some(target) = TargetId::from_number(number) {
                        self.addresses[target.index()] = addresses;
                    }
                }
                Ok(Command::List { reply }) => {
                    // UDP: hook 7 (with the close below), sessions are listed
                    // and closed like connections.
                    let reports = self
                        .connections
                        .iter()
                        .map(|(_, c)| c.report(now))
                        .chain(self.udp.reports(now))
                        .collect();
                    // The asker may have given up waiting; nothing to do then.
                    let _ = reply.send(reports);
                }
                Ok(Command::Close { ident, reply }) => {
                    let closed = self.close_ident(ident, Reason::ClosedByOperator, now);
                    let _ = reply.send(closed);
                }
                Ok(Command::Replace { ident }) => {
                    self.close_ident(ident, Reason::Replaced, now);
                }
                Ok(Command::Shutdown) => return true,
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
    }

    /// Closes the connection or UDP session with `ident` for `why`, if
    /// it is here.
    fn close_ident(&mut self, ident: Ident, why: Reason, now: Instant) -> bool {
        let found = self
            .connections
            .iter_mut()
            .find(|(_, c)| c.origin().ident == ident);
        match found {
            Some((slot, connection)) => {
                log::log!(close_level(&why), "[worker {}] {ident}: {why}", self.id);
                connection.close(why);
                schedule(&mut self.scheduled, connection, slot);
                true
            }
            None => self.udp.close_ident(ident, why, &mut self.journal, now),
        }
    }

    fn adopt(&mut self, stream: TcpStream, origin: Origin, permit: Permit, now: Instant) {
        debug!(
            "[worker {}] {}: connected from {}",
            self.id, origin.ident, origin.peer
        );
        let entry = self.connections.vacant_entry();
        let slot = entry.key();
        let mut ctx = Context {
            registry: self.poll.registry(),
            journal: &mut self.journal,
            settings: &self.settings,
            addresses: &self.addresses,
            counters: &self.counters,
            worker: self.id,
            now,
        };
        let connection = entry.insert(Connection::open(slot, stream, origin, &mut ctx));
        keep_permit(&mut self.permits, slot, permit);
        schedule(&mut self.scheduled, connection, slot);
        stats::add(&self.counters.opened, 1);
    }

    fn drive_scheduled(&mut self, now: Instant) {
        let mut ctx = Context {
            registry: self.poll.registry(),
            journal: &mut self.journal,
            settings: &self.settings,
            addresses: &self.addresses,
            counters: &self.counters,
            worker: self.id,
            now,
        };
        let slots = std::mem::take(&mut self.scheduled);
        for &slot in &slots {
            let Some(connection) = self.connections.get_mut(slot) else {
                continue;
            };
            connection.scheduled = false;
            let drive = connection.drive(&mut ctx, &mut self.buffer);
            if std::mem::take(&mut connection.held_back) {
                self.held_back.push(slot);
            }
            match drive {
                Drive::Idle => {}
                Drive::Busy => schedule(&mut self.scheduled, connection, slot),
                Drive::Finished => {
                    self.connections.remove(slot);
                    // Gives the connection's place back.
                    self.permits[slot] = None;
                    stats::add(&self.counters.closed, 1);
                }
            }
        }
        // Reuse the list's allocation for the next iteration.
        let mut slots = slots;
        slots.clear();
        if self.scheduled.is_empty() {
            self.scheduled = slots;
        }
    }

    /// Drives again the connections held back for the writer, once it has
    /// caught up with what this worker handed it (their shares start again).
    fn release_held_back(&mut self) {
        if self.held_back.is_empty() || self.journal.epoch() == self.held_back_epoch {
            return;
        }
        self.held_back_epoch = self.journal.epoch();
        for slot in std::mem::take(&mut self.held_back) {
            if let Some(connection) = self.connections.get_mut(slot) {
                schedule(&mut self.scheduled, connection, slot);
            }
        }
    }

    fn check_timers(&mut self, now: Instant) {
        let ctx = Context {
            registry: self.poll.registry(),
            journal: &mut self.journal,
            settings: &self.settings,
            addresses: &self.addresses,
            counters: &self.counters,
            worker: self.id,
            now,
        };
        let mut ctx = ctx;
        for (slot, connection) in self.connections.iter_mut() {
            if connection.check_timers(&mut ctx) {
                schedule(&mut self.scheduled, connection, slot);
            }
        }
        if !self.scheduled.is_empty() {
            self.drive_scheduled(now);
        }
    }

    fn close_all(&mut self, why: Reason, now: Instant) {
        for (slot, connection) in self.connections.iter_mut() {
            connection.close(why.clone());
            schedule(&mut self.scheduled, connection, slot);
        }
        let open = self.connections.len();
        self.drive_scheduled(now);
        if !self.connections.is_empty() {
            warn!(
                "[worker {}] {} of {open} connections did not close",
                self.id,
                self.connections.len()
            );
        }
    }
}

/// How loud a close decided outside a connection is logged: an
/// operator's at info, a replaced connection's (every reconnect of a
/// device, with PROXY_DEVICE_UNIQUE) at debug.
pub fn close_level(why: &Reason) -> log::Level {
    match why {
        Reason::ClosedByOperator => log::Level::Info,
        _ => log::Level::Debug,
    }
}

/// Keeps a connection's permit beside it, at its slot.
fn keep_permit(permits: &mut Vec<Option<Permit>>, slot: usize, permit: Permit) {
    if permits.len() <= slot {
        permits.resize_with(slot + 1, || None);
    }
    permits[slot] = Some(permit);
}

fn schedule(scheduled: &mut Vec<usize>, connection: &mut Connection, slot: usize) {
    if !connection.scheduled {
        connection.scheduled = true;
        scheduled.push(slot);
    }
}

/// Timers are checked about ten times per shortest timeout, between 10 ms
/// and 1 s apart.
fn timer_tick(settings: &Settings) -> Duration {
    let shortest = match settings.idle_timeout {
        Some(idle) => idle.min(settings.connect_timeout),
        None => settings.connect_timeout,
    };
    (shortest / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
}
