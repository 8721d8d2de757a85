//! The control thread: the Unix socket `proxy-channel ctl` talks to, the
//! Prometheus metrics file, and a one-line summary in the log each minute.
//!
//! One thread with one mio poll serves every client (no thread per client).
//! The protocol is JSON Lines: a request `{"command":"list"}`,
//! `{"command":"close","ident":"..."}` or `{"command":"stats"}` gets one
//! reply line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`. A request
//! that is not JSON, unknown, or longer than 64 KiB gets an error reply; it
//! never stops the daemon. Listing and closing ask every worker over its
//! command channel and wait briefly for the answers.

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
use serde::Deserialize;
use serde_json::{Value, json};
use slab::Slab;

use crate::control::metrics;
use crate::control::stats::{Registry, Snapshot};
use crate::net::connection::ConnectionReport;
use crate::net::worker::{Command, WorkerHandle};
use crate::store::journal::StoreCommand;
use crate::store::message::Ident;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
/// A request line longer than this is refused.
pub const MAX_REQUEST: usize = 64 * 1024;
const WORKER_ANSWER_WAIT: Duration = Duration::from_secs(2);
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

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
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once the output is written.
    closing: bool,
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
}

#[derive(Deserialize)]
struct Request {
    command: String,
    ident: Option<String>,
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
            let timeout = next.saturating_duration_since(Instant::now());
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
                        input: Vec::new(),
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

    /// Reads a client's requests, answers complete ones, writes replies.
    fn serve(&mut self, slot: usize) {
        let Some(client) = self.clients.get_mut(slot) else {
            return;
        };
        let open = client.closing || read_input(client);
        let mut requests = Vec::new();
        while let Some(end) = client.input.iter().position(|&b| b == b'\n') {
            requests.push(client.input.drain(..=end).collect::<Vec<u8>>());
        }
        if client.input.len() > MAX_REQUEST {
            client.input.clear();
            client.closing = true;
            requests.push(Vec::new());
        }
        for request in requests {
            let reply = match request.is_empty() {
                true => error_reply(&format!("request longer than {MAX_REQUEST} bytes")),
                false => self.answer(&request),
            };
            if let Some(client) = self.clients.get_mut(slot) {
                client
                    .output
                    .extend_from_slice(reply.to_string().as_bytes());
                client.output.push(b'\n');
            }
        }
        let Some(client) = self.clients.get_mut(slot) else {
            return;
        };
        client.closing |= !open;
        let flushed = write_output(client);
        if !flushed || (client.closing && client.output.is_empty()) {
            let mut client = self.clients.remove(slot);
            // The client is dropped (closed) right after.
            let _ = self.poll.registry().deregister(&mut client.stream);
        }
    }

    fn answer(&self, line: &[u8]) -> Value {
        let request: Request = match serde_json::from_slice(line) {
            Ok(request) => request,
            Err(e) => return error_reply(&format!("not a request: {e}")),
        };
        match (request.command.as_str(), request.ident) {
            ("list", _) => match self.list() {
                Ok(connections) => json!({"ok": true, "connections": connections}),
                Err(why) => error_reply(&why),
            },
            ("stats", _) => json!({"ok": true, "stats": self.snapshot(), "targets": self.targets}),
            ("close", Some(ident)) => self.close(&ident),
            ("close", None) => error_reply("close needs an ident"),
            (other, _) => error_reply(&format!(
                "unknown command {other:?}: expected list, close or stats"
            )),
        }
    }

    /// Every worker's connections; an error if a worker did not answer in
    /// time (it is waiting for the message writer: a full disk?).
    fn list(&self) -> Result<Vec<ConnectionReport>, String> {
        let (reply, answers) = crossbeam_channel::unbounded();
        let asked = self
            .workers
            .iter()
            .filter(|w| {
                w.send(Command::List {
                    reply: reply.clone(),
                })
            })
            .count();
        let deadline = Instant::now() + WORKER_ANSWER_WAIT;
        let mut all = Vec::new();
        for answered in 0..asked {
            match answers.recv_deadline(deadline) {
                Ok(reports) => all.extend(reports),
                Err(_) => return Err(busy_workers(asked - answered, asked)),
            }
        }
        all.sort_by(|a: &ConnectionReport, b| b.age_seconds.total_cmp(&a.age_seconds));
        Ok(all)
    }

    fn close(&self, ident: &str) -> Value {
        let Some(parsed) = parse_ident(ident) else {
            return error_reply(&format!("{ident:?} is not an ident (16 hex characters)"));
        };
        let (reply, answers) = crossbeam_channel::unbounded();
        let asked = self
            .workers
            .iter()
            .filter(|w| {
                w.send(Command::Close {
                    ident: parsed,
                    reply: reply.clone(),
                })
            })
            .count();
        let deadline = Instant::now() + WORKER_ANSWER_WAIT;
        for answered in 0..asked {
            match answers.recv_deadline(deadline) {
                Ok(true) => return json!({"ok": true, "closed": ident}),
                Ok(false) => {}
                Err(_) => {
                    let busy = busy_workers(asked - answered, asked);
                    return error_reply(&format!(
                        "{busy}; the close is queued and may still happen"
                    ));
                }
            }
        }
        error_reply(&format!("no open connection with ident {ident}"))
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

/// An ident as the messages write it: exactly 16 hex digits (lowercase;
/// uppercase is taken too, as `ctl close` always was), nothing else, not
/// even the sign `u64::from_str_radix` would allow.
fn parse_ident(text: &str) -> Option<Ident> {
    if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok().map(Ident)
}

fn busy_workers(silent: usize, asked: usize) -> String {
    format!(
        "{silent} of {asked} workers did not answer within {}s (are they waiting for the \
         message writer? see the log, and `ctl stats` for write errors)",
        WORKER_ANSWER_WAIT.as_secs()
    )
}

fn count_drops(snapshot: &Snapshot) -> u64 {
    snapshot.drops.iter().flatten().sum()
}

fn error_reply(why: &str) -> Value {
    json!({"ok": false, "error": why})
}

/// Reads what the client sent; false once it has closed or failed.
fn read_input(client: &mut Client) -> bool {
    let mut buffer = [0u8; 4096];
    loop {
        match client.stream.read(&mut buffer) {
            Ok(0) => return false,
            Ok(n) => {
                client.input.extend_from_slice(&buffer[..n]);
                if client.input.len() > MAX_REQUEST {
                    return true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ident_is_exactly_sixteen_hex_digits() {
        assert_eq!(
            parse_ident("0123456789abcdef"),
            Some(Ident(0x0123_4567_89ab_cdef))
        );
        assert_eq!(parse_ident("FFFFFFFFFFFFFFFF"), Some(Ident(u64::MAX)));
        for bad in [
            "+fffffffffffffff",
            "-fffffffffffffff",
            " fffffffffffffff",
            "0x0123456789abcd",
            "0123456789abcdeg",
            "0123456789abcde",
            "0123456789abcdef0",
            "",
            "０123456789abcd",
        ] {
            assert_eq!(parse_ident(bad), None, "{bad:?}");
        }
    }
}
