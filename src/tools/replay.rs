//! `proxy-channel replay`: send recorded device traffic again, connection
//! by connection, to a target (a migration's backfill).
//!
//! First pass: read the files once and index, per recorded device
//! connection, where each of its source-0 data lines is (file and offset),
//! never the payloads themselves, and whether every byte it sent was stored.
//! Second pass: `--concurrency` threads each take the next connection,
//! connect to the target, read the connection's lines back by offset and
//! send the bytes in order (with `--speed`, at the recorded pace). Replies
//! are read and counted on a thread of the connection. A connection with a
//! gap (a payload over PROXY_MAX_PAYLOAD, store mode off, its start rotated
//! away) or a damaged line (cut short, or a `server.timestamp` that is not a
//! time) is skipped and reported, never sent with a hole in it.
//!
//! A UDP session (`proxy.transport: "udp"`) is replayed as datagrams, one
//! per recorded packet, from a UDP socket of its own; without `--speed` at
//! most one a millisecond (UDP has no flow control: faster, a target's
//! receive buffer would drop them, and a proxy-channel as the target allows
//! a session 1,000 a second).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::net::side::Side;
use crate::store::message::{Event, StoredMessage, UDP};
use crate::tools::filter::Filter;
use crate::tools::reader::{LineReader, ReadError, message_files, report_skipped};

/// A write that makes no progress for this long fails its connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies are read at most this long after the last byte was sent.
const REPLIES_AT_MOST: Duration = Duration::from_secs(30);
/// 10000-01-01T00:00:00Z: a device line's `server.timestamp` must be a
/// time from 1970 up to this (the daemon writes no other).
const YEAR_10000: f64 = 253_402_300_800.0;
/// The least time between two datagrams of a UDP session without `--speed`.
const DATAGRAM_GAP: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub target: String,
    pub paths: Vec<PathBuf>,
    pub filter: Filter,
    /// `None`: as fast as possible; `Some(n)`: recorded pace, n times faster.
    pub speed: Option<f64>,
    pub concurrency: usize,
    /// After the last byte, how long to wait for the target's replies.
    pub wait: Duration,
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub replayed: u64,
    pub failed: u64,
    pub skipped: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A recorded device connection, as found in the files.
#[derive(Debug, Default)]
struct Recorded {
    ident: String,
    peer: String,
    started: Option<f64>,
    packets: Vec<PacketAt>,
    stored_bytes: u64,
    /// From the device's event 2, if the recording has it.
    device_received: Option<u64>,
    gap: Option<String>,
    /// A UDP session: replayed as datagrams.
    udp: bool,
    /// Its `device.ident`, if its device was recognised.
    device: Option<String>,
}

/// Where one source-0 data line is.
#[derive(Debug, Clone, Copy)]
struct PacketAt {
    file: usize,
    offset: u64,
    time: f64,
}

/// Replays `options.paths` to `options.target`.
pub fn run(options: &ReplayOptions) -> Result<ReplaySummary, ReadError> {
    let files = message_files(&options.paths)?;
    let (connections, skipped) = index(&files, &options.filter)?;
    let total = connections.len();
    let progress = Progress::new(total, skipped);
    let queue = Mutex::new(connections.into_iter());
    let files = &files;
    std::thread::scope(|scope| {
        for _ in 0..options.concurrency.max(1) {
            scope.spawn(|| {
                while let Some(recorded) = next(&queue) {
                    let outcome = replay_one(&recorded, files, options);
                    progress.record(&recorded.ident, outcome);
                }
            });
        }
    });
    Ok(progress.finish())
}

fn next(queue: &Mutex<std::vec::IntoIter<Recorded>>) -> Option<Recorded> {
    queue.lock().map_or(None, |mut q| q.next())
}

/// The recorded connections that match, oldest first, and how many were
/// skipped for gaps.
fn index(files: &[PathBuf], filter: &Filter) -> Result<(Vec<Recorded>, u64), ReadError> {
    let mut index = Index::default();
    for (file_index, path) in files.iter().enumerate() {
        let mut reader = LineReader::open(path)?;
        while let Some(line) = reader.next_line()? {
            match StoredMessage::parse(line.bytes) {
                Ok(message) => index.add(&message, path, line.number, file_index, line.offset),
                Err(why) => index.bad_line(
                    path,
                    line.number,
                    line.bytes,
                    &format!("not a message: {why}"),
                ),
            }
        }
        if let Some((number, bytes)) = reader.partial_line() {
            let bytes = bytes.to_vec();
            index.bad_line(path, number, &bytes, "cut short (no end of line)");
        }
    }
    Ok(index.select(filter))
}

/// What the first pass has found.
#[derive(Default)]
struct Index {
    by_ident: HashMap<String, Recorded>,
    /// A line that looked like a message of ours but could not be read, and
    /// whose connection is unknown: connections that never ended may have
    /// lost a packet to it.
    unattributed_damage: bool,
}

impl Index {
    fn add(
        &mut self,
        message: &StoredMessage<'_>,
        path: &Path,
        number: u64,
        file: usize,
        offset: u64,
    ) {
        if message.source != Side::Device {
            return;
        }
        let recorded = self.recorded(&message.ident, &message.peer);
        let time = message.server_timestamp;
        if !(0.0..YEAR_10000).contains(&time) {
            // Damage, or a crafted file: --speed cannot wait for it, and
            // the connection's lines are not what the daemon wrote.
            let why = format!("server.timestamp {time:?} is not a time from 1970 to 9999");
            report_skipped("replay", path, number, &why);
            let gap = format!("line {number} of {}: {why}", path.display());
            recorded.gap.get_or_insert(gap);
            return;
        }
        note(recorded, message, file, offset);
    }

    /// Reports a line that is skipped; if it was one of ours, cut short or
    /// damaged, its connection has a gap.
    fn bad_line(&mut self, path: &Path, number: u64, bytes: &[u8], why: &str) {
        report_skipped("replay", path, number, why);
        if !bytes.starts_with(b"{\"channel.id\":") {
            return;
        }
        let gap = format!("line {number} of {} is not a whole message", path.display());
        match ident_in(bytes) {
            Some(ident) => {
                self.recorded(&ident, "").gap.get_or_insert(gap);
            }
            None => self.unattributed_damage = true,
        }
    }

    fn recorded(&mut self, ident: &str, peer: &str) -> &mut Recorded {
        let recorded = self
            .by_ident
            .entry(ident.to_string())
            .or_insert_with(|| Recorded {
                ident: ident.to_string(),
                ..Recorded::default()
            });
        if recorded.peer.is_empty() {
            recorded.peer = peer.to_string();
        }
        recorded
    }

    fn select(self, filter: &Filter) -> (Vec<Recorded>, u64) {
        let mut connections = Vec::new();
        let mut skipped = 0;
        for (_, mut recorded) in self.by_ident {
            let started = recorded.started.unwrap_or(0.0);
            let device = recorded.device.as_deref();
            if !filter.matches_connection(&recorded.ident, &recorded.peer, started, device) {
                continue;
            }
            if self.unattributed_damage && recorded.device_received.is_none() {
                recorded.gap.get_or_insert_with(|| {
                    "it never ended and a damaged line in the files may be one of its packets"
                        .into()
                });
            }
            match gap_of(&recorded) {
                Some(gap) => {
                    skipped += 1;
                    eprintln!("proxy-channel replay: {}: skipped: {gap}", recorded.ident);
                }
                None => connections.push(recorded),
            }
        }
        connections.sort_by(|a, b| {
            a.started
                .unwrap_or(0.0)
                .total_cmp(&b.started.unwrap_or(0.0))
        });
        (connections, skipped)
    }
}

/// The ident in a damaged line of ours, if the damage left it whole.
fn ident_in(bytes: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\"ident\":\"";
    let start = bytes.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let ident = bytes.get(start..start + 16)?;
    let whole = ident.iter().all(u8::is_ascii_hexdigit) && bytes.get(start + 16) == Some(&b'"');
    whole.then(|| String::from_utf8_lossy(ident).into_owned())
}

fn note(recorded: &mut Recorded, message: &StoredMessage<'_>, file: usize, offset: u64) {
    recorded.udp |= message.transport.as_deref() == Some(UDP);
    if recorded.device.is_none() {
        recorded.device = message.device_ident.as_deref().map(str::to_string);
    }
    match message.event {
        Event::Established => recorded.started = Some(message.server_timestamp),
        Event::Data => {
            if message.payload_hex.is_none() {
                recorded.gap.get_or_insert_with(|| {
                    let size = message.payload_size.unwrap_or(0);
                    format!("a packet of {size} B was stored without its payload")
                });
            }
            // A crafted size must not overflow the sum (a panic in debug).
            let size = message.payload_size.unwrap_or(0);
            recorded.stored_bytes = recorded.stored_bytes.saturating_add(size);
            recorded.packets.push(PacketAt {
                file,
                offset,
                time: message.server_timestamp,
            });
        }
        Event::Dropped => recorded.device_received = message.bytes_received,
    }
}

fn gap_of(recorded: &Recorded) -> Option<String> {
    if let Some(gap) = &recorded.gap {
        return Some(gap.clone());
    }
    if recorded.started.is_none() {
        return Some("its connect event is not in the files (rotated away?)".into());
    }
    match recorded.device_received {
        Some(received) if received != recorded.stored_bytes => Some(format!(
            "{} of its {received} bytes were stored (store mode off?)",
            recorded.stored_bytes
        )),
        _ => None,
    }
}

/// How one connection's replay went.
enum Outcome {
    Done { sent: u64, received: u64 },
    Failed(String),
}

fn replay_one(recorded: &Recorded, files: &[PathBuf], options: &ReplayOptions) -> Outcome {
    if recorded.udp {
        return replay_datagrams(recorded, files, options);
    }
    let stream = match connect(&options.target) {
        Ok(stream) => stream,
        Err(e) => return Outcome::Failed(format!("cannot connect to {}: {e}", options.target)),
    };
    let sending_done = Arc::new(AtomicBool::new(false));
    let replies = match stream.try_clone() {
        Ok(reader) => {
            let (wait, done) = (options.wait, Arc::clone(&sending_done));
            let mut reader = reader;
            std::thread::spawn(move || match reader.set_read_timeout(reply_timeout(wait)) {
                Ok(()) => count_replies(&done, |buffer| Look::of(reader.read(buffer), true)),
                Err(_) => 0,
            })
        }
        Err(e) => return Outcome::Failed(format!("cannot read replies: {e}")),
    };
    let mut writer = &stream;
    let sent = send_packets(recorded, files, options, &mut |payload| {
        writer.write_all(payload)
    });
    // Tell the target we are done; it may already be gone.
    let _ = stream.shutdown(Shutdown::Write);
    sending_done.store(true, Ordering::SeqCst);
    let received = replies.join().unwrap_or(0);
    match sent {
        Ok(sent) => Outcome::Done { sent, received },
        Err(why) => Outcome::Failed(why),
    }
}

fn connect(target: &str) -> io::Result<TcpStream> {
    let mut last_error = io::Error::other("no address");
    for address in target.to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, Duration::from_secs(10)) {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                // A target that stops reading fails the connection, not the run.
                stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
                return Ok(stream);
            }
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// A UDP session: each recorded packet as one datagram, from a socket of
/// its own, whose replies are counted.
fn replay_datagrams(recorded: &Recorded, files: &[PathBuf], options: &ReplayOptions) -> Outcome {
    let socket = match connect_udp(&options.target) {
        Ok(socket) => socket,
        Err(e) => return Outcome::Failed(format!("cannot reach {}: {e}", options.target)),
    };
    let sending_done = Arc::new(AtomicBool::new(false));
    let replies = match socket.try_clone() {
        Ok(reader) => {
            let (wait, done) = (options.wait, Arc::clone(&sending_done));
            std::thread::spawn(move || match reader.set_read_timeout(reply_timeout(wait)) {
                Ok(()) => count_replies(&done, |buffer| Look::of(reader.recv(buffer), false)),
                Err(_) => 0,
            })
        }
        Err(e) => return Outcome::Failed(format!("cannot read replies: {e}")),
    };
    let mut last_sent: Option<Instant> = None;
    let sent = send_packets(recorded, files, options, &mut |payload| {
        if options.speed.is_none() {
            if let Some(wait) = last_sent.and_then(|at| DATAGRAM_GAP.checked_sub(at.elapsed())) {
                std::thread::sleep(wait);
            }
        }
        last_sent = Some(Instant::now());
        socket.send(payload).map(|_| ())
    });
    sending_done.store(true, Ordering::SeqCst);
    let received = replies.join().unwrap_or(0);
    match sent {
        Ok(sent) => Outcome::Done { sent, received },
        Err(why) => Outcome::Failed(why),
    }
}

fn connect_udp(target: &str) -> io::Result<UdpSocket> {
    let mut last_error = io::Error::other("no address");
    for address in target.to_socket_addrs()? {
        let any: std::net::SocketAddr = match address {
            std::net::SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
            std::net::SocketAddr::V6(_) => ([0u16; 8], 0).into(),
        };
        match UdpSocket::bind(any).and_then(|socket| socket.connect(address).map(|()| socket)) {
            Ok(socket) => return Ok(socket),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

/// Sends the connection's stored packets in order to `sink`, at the
/// recorded pace if asked.
fn send_packets(
    recorded: &Recorded,
    files: &[PathBuf],
    options: &ReplayOptions,
    sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
) -> Result<u64, String> {
    let mut readers: HashMap<usize, BufReader<File>> = HashMap::new();
    let mut line = Vec::new();
    let mut payload = Vec::new();
    let start = Instant::now();
    let recorded_start = recorded.started.unwrap_or(0.0);
    let mut sent = 0u64;
    for packet in &recorded.packets {
        read_payload(&mut readers, files, *packet, &mut line, &mut payload)?;
        if let Some(speed) = options.speed {
            // Times are checked when indexing; only a --speed near 0 can
            // make the wait too long for a Duration, and then it is.
            let due =
                Duration::try_from_secs_f64(((packet.time - recorded_start) / speed).max(0.0))
                    .unwrap_or(Duration::MAX);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        sink(&payload).map_err(|e| format!("sending to {} failed: {e}", options.target))?;
        sent += payload.len() as u64;
    }
    Ok(sent)
}

fn read_payload(
    readers: &mut HashMap<usize, BufReader<File>>,
    files: &[PathBuf],
    packet: PacketAt,
    line: &mut Vec<u8>,
    payload: &mut Vec<u8>,
) -> Result<(), String> {
    let path = &files[packet.file];
    let reader = match readers.entry(packet.file) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => {
            let file =
                File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            entry.insert(BufReader::new(file))
        }
    };
    line.clear();
    reader
        .seek(SeekFrom::Start(packet.offset))
        .and_then(|_| reader.read_until(b'\n', line))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let message = StoredMessage::parse(line.trim_ascii_end())
        .map_err(|e| format!("{} changed while replaying: {e}", path.display()))?;
    let hex_text = message.payload_hex.unwrap_or_default();
    payload.resize(hex_text.len() / 2, 0);
    hex::decode_to_slice(hex_text, payload)
        .map_err(|e| format!("bad payload in {}: {e}", path.display()))
}

/// What one read of the target's replies gave.
enum Look {
    Bytes(usize),
    /// Nothing within the read timeout.
    Quiet,
    /// Interrupted: read again.
    Again,
    /// A datagram target's ICMP error for an earlier datagram: the sender
    /// reports it, so it ends the counting only once sending is done.
    Refused,
    /// End of stream or a read error.
    End,
}

impl Look {
    fn of(read: io::Result<usize>, stream: bool) -> Look {
        match read {
            Ok(0) if stream => Look::End,
            Ok(n) => Look::Bytes(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Look::Again,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Look::Quiet
            }
            Err(_) if stream => Look::End,
            Err(_) => Look::Refused,
        }
    }
}

/// Reads and counts replies until the target closes, has been quiet for
/// `wait` once the sender is done, or has gone on for REPLIES_AT_MOST since.
/// `read` reads the stream or the datagram socket, whose read timeout is
/// already `wait`.
fn count_replies(sending_done: &AtomicBool, mut read: impl FnMut(&mut [u8]) -> Look) -> u64 {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let mut done_at: Option<Instant> = None;
    loop {
        if done_at.is_none() && sending_done.load(Ordering::SeqCst) {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|at| at.elapsed() >= REPLIES_AT_MOST) {
            return received;
        }
        match read(&mut buffer) {
            Look::Bytes(n) => received += n as u64,
            Look::Again => {}
            Look::Quiet | Look::Refused if done_at.is_none() => {}
            Look::Quiet | Look::Refused | Look::End => return received,
        }
    }
}

/// The read timeout of a reply reader: `wait`, at least a millisecond.
fn reply_timeout(wait: Duration) -> Option<Duration> {
    Some(wait.max(Duration::from_millis(1)))
}

/// Counts outcomes and shows a progress line on a terminal.
struct Progress {
    total: usize,
    done: AtomicUsize,
    failed: AtomicU64,
    skipped: u64,
    sent: AtomicU64,
    received: AtomicU64,
    on_terminal: bool,
    print_lock: Mutex<()>,
}

impl Progress {
    fn new(total: usize, skipped: u64) -> Progress {
        Progress {
            total,
            done: AtomicUsize::new(0),
            failed: AtomicU64::new(0),
            skipped,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            on_terminal: io::stderr().is_terminal(),
            print_lock: Mutex::new(()),
        }
    }

    fn record(&self, ident: &str, outcome: Outcome) {
        let _guard = self.print_lock.lock();
        match outcome {
            Outcome::Done { sent, received } => {
                self.sent.fetch_add(sent, Ordering::Relaxed);
                self.received.fetch_add(received, Ordering::Relaxed);
            }
            Outcome::Failed(why) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "{}proxy-channel replay: {ident}: failed: {why}",
                    self.clear()
                );
            }
        }
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if self.on_terminal {
            eprint!(
                "\r{done}/{} connections, {} bytes sent, {} failed",
                self.total,
                self.sent.load(Ordering::Relaxed),
                self.failed.load(Ordering::Relaxed)
            );
        }
    }

    fn clear(&self) -> &'static str {
        if self.on_terminal { "\r\x1b[K" } else { "" }
    }

    fn finish(self) -> ReplaySummary {
        let failed = self.failed.load(Ordering::Relaxed);
        let summary = ReplaySummary {
            replayed: self.done.load(Ordering::Relaxed) as u64 - failed,
            failed,
            skipped: self.skipped,
            bytes_sent: self.sent.load(Ordering::Relaxed),
            bytes_received: self.received.load(Ordering::Relaxed),
        };
        eprintln!(
            "{}replayed {} connections ({} bytes sent, {} bytes of replies), {} failed, {} skipped",
            self.clear(),
            summary.replayed,
            summary.bytes_sent,
            summary.bytes_received,
            summary.failed,
            summary.skipped
        );
        summary
    }
}
