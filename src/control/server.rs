//! The control thread: the Unix socket `proxy-channel ctl` talks to, the
//! Prometheus metrics file, and a one-line summary in the log each minute.
//!
//! One thread with one mio poll serves every client (no thread per client).
//! Requests and replies are JSON lines of the
//! [`protocol`](crate::control::protocol): each request line gets one reply
//! line. A request that is not JSON, unknown, or longer than
//! [`MAX_REQUEST`] gets an error reply; it never stops the daemon. Listing
//! and closing ask every worker over its command channel and wait briefly
//! for the answers (`Control::ask_workers`).
//!
//! Bounds per client: a client is not read from while replies wait for it
//! to read them (the kernel's socket buffer is full), so it holds at most
//! one read of requests ([`MAX_REQUEST`] and a bit); answering those stops,
//! and the client is dropped, once more than [`MAX_UNREAD`] of its replies
//! wait. One reply may be larger (a `list` of many connections): it is
//! queued whole, as it is the answer to a request the client may read.
//! A client gets [`ROUNDS_PER_WAKE`] reads per turn, so that one that
//! keeps sending cannot starve the others.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{error, info, warn};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::control::metrics;
use crate::control::protocol::{
    ClosedDeviceReply, ClosedReply, LineReader, ListReply, MAX_REQUEST, Reply, Request, StatsReply,
    TooLong, parse_ident,
};
use crate::control::stats::{Registry, Snapshot};
use crate::net::connection::ConnectionReport;
use crate::net::worker::{Command, WorkerHandle};
use crate::store::journal::StoreCommand;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
const WORKER_ANSWER_WAIT: Duration = Duration::from_secs(2);
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// Replies a client may leave unread; past this it is dropped (SPEC,
/// Security).
pub const MAX_UNREAD: usize = 1 << 20;
/// Reads (each up to [`MAX_REQUEST`] and its answers) for one client before
/// the others' turn.
pub const ROUNDS_PER_WAKE: usize = 16;

/// Binds the control socket with mode 0600. A socket file left by a killed
/// daemon is replaced; one a live daemon answers on is an error.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(metadata) = fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another proxy-channel is running on it",
            ));
        }
        fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    // Bound with no permissions for others from the start (the daemon
    // creates no other file at this point of its start).
    // SAFETY: umask only changes the process's file-creation mask.
    let previous = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(previous) };
    let listener = listener?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Everything the control thread starts with.
pub struct ControlSetup {
    pub socket: Option<(PathBuf, UnixListener)>,
    pub workers: Vec<WorkerHandle>,
    pub registry: Registry,
    pub store: Sender<StoreCommand>,
    pub targets: Vec<u8>,
    pub metrics: Option<(PathBuf, Duration)>,
}

/// Stops the control thread.
pub struct ControlHandle {
    stop: Arc<AtomicBool>,
    waker: Waker,
}

impl ControlHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            error!("cannot wake the control thread: {e}");
        }
    }
}

struct Client {
    stream: UnixStream,
    input: LineReader,
    /// Replies the socket has not taken yet.
    output: Vec<u8>,
    /// No more requests (the client has finished, or sent an overlong
    /// one): close once the output is written.
    closing: bool,
}

/// What one read of a client's socket ended on.
enum ReadEnd {
    /// Nothing more to read for now.
    Waiting,
    /// [`MAX_REQUEST`] bytes are held; there may be more.
    Full,
    /// The client has finished sending.
    Ended,
    Failed,
}

/// What to do with a client after one round.
enum Round {
    /// Wait for its next event (more requests, or room for its replies).
    Wait,
    /// Go on: it may have more to read.
    More,
    /// Close it: done, failed, or dropped.
    Close,
}

pub struct Control {
    poll: Poll,
    socket: Option<(PathBuf, UnixListener)>,
    clients: Slab<Client>,
    workers: Vec<WorkerHandle>,
    registry: Registry,
    store: Sender<StoreCommand>,
    targets: Vec<u8>,
    metrics: Option<(PathBuf, Duration)>,
    stop: Arc<AtomicBool>,
    last_summary: Snapshot,
    /// Clients whose turn ended with more to read.
    again: Vec<usize>,
}

impl Control {
    pub fn spawn(setup: ControlSetup) -> io::Result<(ControlHandle, JoinHandle<()>)> {
        let poll = Poll::new()?;
        let mut socket = setup.socket;
        if let Some((_, listener)) = &mut socket {
            poll.registry()
                .register(listener, LISTENER, Interest::READABLE)?;
        }
        let waker = Waker::new(poll.registry(), WAKER)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut control = Control {
            poll,
            socket,
            clients: Slab::new(),
            workers: setup.workers,
            registry: setup.registry,
            store: setup.store,
            targets: setup.targets,
            metrics: setup.metrics,
            stop: Arc::clone(&stop),
            last_summary: Snapshot::default(),
            again: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control.run())?;
        Ok((ControlHandle { stop, waker }, thread))
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        let mut next_metrics = Instant::now();
        let mut next_summary = Instant::now() + SUMMARY_EVERY;
        loop {
            let next = match &self.metrics {
                Some(_) => next_metrics.min(next_summary),
                None => next_summary,
            };
            let timeout = match self.again.is_empty() {
                true => next.saturating_duration_since(Instant::now()),
                false => Duration::ZERO,
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("control: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if self.stop.load(Ordering::SeqCst) {
                self.write_metrics();
                self.remove_socket();
                return;
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.accept_clients(),
                    WAKER => {}
                    Token(slot) => self.serve(slot),
                }
            }
            for slot in std::mem::take(&mut self.again) {
                self.serve(slot);
            }
            let now = Instant::now();
            if let Some((_, every)) = &self.metrics {
                if now >= next_metrics {
                    next_metrics = now + *every;
                    self.write_metrics();
                }
            }
            if now >= next_summary {
                next_summary = now + SUMMARY_EVERY;
                self.log_summary();
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.registry.snapshot(self.store.len())
    }

    fn accept_clients(&mut self) {
        let Some((_, listener)) = &self.socket else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let entry = self.clients.vacant_entry();
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut stream, Token(entry.key()), interest)
                    {
                        warn!("control: cannot watch a client: {e}");
                        continue;
                    }
                    entry.insert(Client {
                        stream,
                        input: LineReader::default(),
                        output: Vec::new(),
                        closing: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("control: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Serves a client for one turn: rounds until it has nothing to read
    /// or unread replies, at most [`ROUNDS_PER_WAKE`].
    fn serve(&mut self, slot: usize) {
        for _ in 0..ROUNDS_PER_WAKE {
            match self.serve_round(slot) {
                Round::Wait => return,
                Round::More => {}
                Round::Close => return self.close_client(slot),
            }
        }
        self.again.push(slot);
    }

    /// Writes the client's replies; once it has taken them all, reads its
    /// requests (one [`ReadEnd`]) and answers the complete ones.
    fn serve_round(&mut self, slot: usize) -> Round {
        let Some(client) = self.clients.get_mut(slot) else {
            return Round::Wait;
        };
        if !write_output(client) {
            return Round::Close;
        }
        if !client.output.is_empty() {
            // Not read from again until it reads its replies.
            return Round::Wait;
        }
        if client.closing {
            return Round::Close;
        }
        let read = read_input(client);
        if matches!(read, ReadEnd::Failed) {
            return Round::Close;
        }
        client.closing = matches!(read, ReadEnd::Ended);
        for line in client.input.take_lines() {
            if !self.reply(slot, &line) {
                return Round::Close;
            }
        }
        match read {
            ReadEnd::Waiting => Round::Wait,
            // Full: read on; Ended: write the replies, then close.
            ReadEnd::Full | ReadEnd::Ended | ReadEnd::Failed => Round::More,
        }
    }

    /// Answers one request line of a client and queues the reply; false if
    /// the client is to be dropped: more than [`MAX_UNREAD`] of its replies
    /// wait already, or its socket failed.
    fn reply(&mut self, slot: usize, line: &Result<Vec<u8>, TooLong>) -> bool {
        let unread = self.clients.get(slot).map_or(0, |c| c.output.len());
        if unread > MAX_UNREAD {
            warn!(
                "control: a client left {unread} bytes of replies unread and sent more \
                 requests; it is dropped"
            );
            return false;
        }
        let reply = match line {
            Ok(request) => self.answer(request),
            Err(too_long) => Reply::Refused(too_long.to_string()),
        };
        let Some(client) = self.clients.get_mut(slot) else {
            return false;
        };
        client.closing |= line.is_err();
        client.output.extend_from_slice(reply.to_line().as_bytes());
        write_output(client)
    }

    fn close_client(&mut self, slot: usize) {
        if let Some(mut client) = self.clients.try_remove(slot) {
            // The client is dropped (closed) right after.
            let _ = self.poll.registry().deregister(&mut client.stream);
        }
    }

    fn answer(&self, line: &[u8]) -> Reply {
        match Request::parse(line) {
            Ok(Request::List) => match self.list() {
                Ok(connections) => Reply::List(ListReply { connections }),
                Err(busy) => Reply::Refused(busy.to_string()),
            },
            Ok(Request::Stats) => Reply::Stats(Box::new(StatsReply {
                stats: self.snapshot(),
                targets: self.targets.clone(),
            })),
            Ok(Request::Close(ident)) => self.close(&ident),
            Ok(Request::CloseDevice(device)) => self.close_device(&device),
            Err(e) => Reply::Refused(e.to_string()),
        }
    }

    /// Sends every worker the command `ask` makes around a reply channel;
    /// the answers come from [`Asked`].
    fn ask_workers<T>(&self, ask: impl Fn(Sender<T>) -> Command) -> Asked<T> {
        let (reply, answers) = crossbeam_channel::unbounded();
        let asked = self
            .workers
            .iter()
            .filter(|w| w.send(ask(reply.clone())))
            .count();
        Asked {
            answers,
            asked,
            answered: 0,
            deadline: Instant::now() + WORKER_ANSWER_WAIT,
        }
    }

    /// Every worker's connections, oldest first; an error if a worker did
    /// not answer in time (it is waiting for the message writer: a full
    /// disk?).
    fn list(&self) -> Result<Vec<ConnectionReport>, Busy> {
        let answers = self.ask_workers(|reply| Command::List { reply }).all()?;
        let mut all: Vec<ConnectionReport> = answers.into_iter().flatten().collect();
        all.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
        Ok(all)
    }

    fn close(&self, ident: &str) -> Reply {
        match self.close_one(ident) {
            Ok(true) => Reply::Closed(ClosedReply {
                closed: ident.to_string(),
            }),
            Ok(false) => Reply::Refused(format!("no open connection with ident {ident}")),
            Err(why) => Reply::Refused(why),
        }
    }

    /// Closes every open connection whose device ident is `device`.
    fn close_device(&self, device: &str) -> Reply {
        let connections = match self.list() {
            Ok(connections) => connections,
            Err(busy) => return Reply::Refused(busy.to_string()),
        };
        let of_device = connections
            .into_iter()
            .filter(|c| c.device.as_deref() == Some(device));
        let mut closed = Vec::new();
        for connection in of_device {
            match self.close_one(&connection.ident) {
                Ok(true) => closed.push(connection.ident),
                // Ended between the list and the close.
                Ok(false) => {}
                Err(why) => return Reply::Refused(why),
            }
        }
        match closed.is_empty() {
            true => Reply::Refused(format!("no connection of device {device}")),
            false => Reply::ClosedDevice(ClosedDeviceReply {
                device: device.to_string(),
                closed,
            }),
        }
    }

    /// Asks the workers to close `ident`: whether one had it, or why it
    /// is not known.
    fn close_one(&self, ident: &str) -> Result<bool, String> {
        let Some(parsed) = parse_ident(ident) else {
            return Err(format!("{ident:?} is not an ident (16 hex characters)"));
        };
        let mut answers = self.ask_workers(|reply| Command::Close {
            ident: parsed,
            reply,
        });
        while let Some(answer) = answers.next() {
            match answer {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(busy) => {
                    return Err(format!("{busy}; the close is queued and may still happen"));
                }
            }
        }
        Ok(false)
    }

    fn write_metrics(&self) {
        let Some((path, _)) = &self.metrics else {
            return;
        };
        let text = metrics::render(&self.snapshot(), &self.targets);
        if let Err(e) = metrics::write_file(path, &text) {
            warn!("cannot write metrics to {}: {e}", path.display());
        }
    }

    /// One line a minute, when something happened.
    fn log_summary(&mut self) {
        let now = self.snapshot();
        let last = std::mem::replace(&mut self.last_summary, now.clone());
        let opened = now.connections_total - last.connections_total;
        let received: u64 =
            now.bytes_received.iter().sum::<u64>() - last.bytes_received.iter().sum::<u64>();
        let sent: u64 = now.bytes_sent.iter().sum::<u64>() - last.bytes_sent.iter().sum::<u64>();
        let drops: u64 = count_drops(&now) - count_drops(&last);
        if opened == 0 && received == 0 && sent == 0 && drops == 0 {
            return;
        }
        info!(
            "last minute: {} connections open, {opened} new, {} refused, {received} B in, {sent} B out, \
             {drops} sides dropped, {} messages written",
            now.connections_open,
            now.connections_refused - last.connections_refused,
            now.messages_written - last.messages_written
        );
    }

    fn remove_socket(&mut self) {
        if let Some((path, _)) = self.socket.take() {
            // Gone already is fine.
            let _ = fs::remove_file(path);
        }
    }
}

/// The answers of the workers asked by [`Control::ask_workers`], as they
/// come, until each has answered or [`WORKER_ANSWER_WAIT`] has passed.
struct Asked<T> {
    answers: crossbeam_channel::Receiver<T>,
    asked: usize,
    answered: usize,
    deadline: Instant,
}

impl<T> Asked<T> {
    /// The next answer; `None` once every worker has answered.
    fn next(&mut self) -> Option<Result<T, Busy>> {
        if self.answered == self.asked {
            return None;
        }
        let answer = self.answers.recv_deadline(self.deadline).map_err(|_| Busy {
            silent: self.asked - self.answered,
            asked: self.asked,
        });
        self.answered += 1;
        Some(answer)
    }

    /// Every answer, or why not.
    fn all(mut self) -> Result<Vec<T>, Busy> {
        let mut all = Vec::with_capacity(self.asked);
        while let Some(answer) = self.next() {
            all.push(answer?);
        }
        Ok(all)
    }
}

/// Workers that did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "{silent} of {asked} workers did not answer within {}s (are they waiting for the \
     message writer? see the log, and `ctl stats` for write errors)",
    WORKER_ANSWER_WAIT.as_secs()
)]
struct Busy {
    silent: usize,
    asked: usize,
}

fn count_drops(snapshot: &Snapshot) -> u64 {
    snapshot.drops.iter().flatten().sum()
}

/// Reads what the client sent until nothing more is waiting or
/// [`MAX_REQUEST`] bytes are held.
fn read_input(client: &mut Client) -> ReadEnd {
    let mut buffer = [0u8; 4096];
    loop {
        match client.stream.read(&mut buffer) {
            Ok(0) => return ReadEnd::Ended,
            Ok(n) => {
                client.input.push(&buffer[..n]);
                if client.input.held() > MAX_REQUEST {
                    return ReadEnd::Full;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Waiting,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return ReadEnd::Failed,
        }
    }
}

/// Writes what is queued for the client; false if it failed.
fn write_output(client: &mut Client) -> bool {
    while !client.output.is_empty() {
        match client.stream.write(&client.output) {
            Ok(0) => return false,
            Ok(n) => {
                client.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}
