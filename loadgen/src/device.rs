//! Device clients for streams, request/reply and floods: one thread, one
//! mio poll over all of them.
//!
//! Each device sends its header, then (by [`Mode`]) its stream pattern, one
//! request at a time, or packets as fast as the socket takes them. Work per
//! device per turn is capped so that one fast socket cannot starve the
//! others. On [`Devices::finish`] every device completes what it has
//! started (a packet half written, a reply awaited), closes its sending
//! side, and waits until the proxy closes the connection: the close of the
//! target travelling back. Echo replies are checked byte for byte and their
//! round trip recorded while [`DevShared::measuring`] is set.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::wire::{self, HEADER_LEN, Mode, PACKET_LEN, PERIOD, Pattern};

/// How long devices may wait for the proxy to close after they stopped.
const CLOSE_DEADLINE: Duration = Duration::from_secs(20);
/// Stream writes per device per turn.
const STREAM_BUDGET: usize = 4;
/// Flood packets per device per turn.
const FLOOD_BUDGET: usize = 32;

/// What the orchestrator reads and sets while devices run.
#[derive(Default)]
pub struct DevShared {
    /// Completed request/reply round trips.
    pub requests: AtomicU64,
    /// Record round trips in the latency histogram.
    pub measuring: AtomicBool,
    stop: AtomicBool,
}

/// What the devices sent, once they have finished.
pub struct DevOutcome {
    /// Bytes sent after the header, by connection id.
    pub sent: HashMap<u64, u64>,
    /// Round trips while measuring, nanoseconds.
    pub latency: Histogram<u64>,
}

pub struct Devices {
    pub shared: Arc<DevShared>,
    thread: JoinHandle<Result<DevOutcome, String>>,
}

impl Devices {
    /// Connects `count` devices (ids 1..=count) and starts sending. `pace`
    /// (flood only) limits each device to that many packets per second, all
    /// devices in step; otherwise they send as fast as they can.
    pub fn start(
        mode: Mode,
        addr: SocketAddr,
        count: usize,
        pace: Option<f64>,
    ) -> Result<Devices, String> {
        Devices::start_numbered(mode, addr, count, pace, 1)
    }

    /// [`Devices::start`] with ids from `first_id`, so that two groups of
    /// devices can share one target.
    pub fn start_numbered(
        mode: Mode,
        addr: SocketAddr,
        count: usize,
        pace: Option<f64>,
        first_id: u64,
    ) -> Result<Devices, String> {
        let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
        let mut devs = Vec::with_capacity(count);
        for slot in 0..count {
            let id = slot as u64 + first_id;
            let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .and_then(|s| s.set_nodelay(true).and(s.set_nonblocking(true)).map(|()| s))
                .map_err(|e| format!("device {id}: connect to {addr}: {e}"))?;
            let mut stream = TcpStream::from_std(stream);
            poll.registry()
                .register(
                    &mut stream,
                    Token(slot),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map_err(|e| format!("register: {e}"))?;
            devs.push(Dev::new(stream, mode, id));
        }
        let shared = Arc::new(DevShared::default());
        let mut run = Run {
            poll,
            devs,
            mode,
            pace,
            shared: shared.clone(),
            latency: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("bounds"),
        };
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || run.run())
            .map_err(|e| format!("spawn: {e}"))?;
        Ok(Devices { shared, thread })
    }

    /// Stops sending, waits for every connection to close, and says what
    /// was sent.
    pub fn finish(self) -> Result<DevOutcome, String> {
        self.shared.stop.store(true, Relaxed);
        self.thread.join().expect("device thread panicked")
    }
}

struct Dev {
    stream: TcpStream,
    id: u64,
    header_sent: usize,
    pattern: Option<Pattern>,
    /// Bytes sent after the header.
    sent: u64,
    seq: u64,
    packet: [u8; PACKET_LEN],
    /// Bytes of `packet` not yet written.
    pending: usize,
    /// Echo: the request is out, its reply is not yet in.
    awaiting: bool,
    sent_at: u64,
    reply: [u8; PACKET_LEN],
    reply_len: usize,
    /// Writable as far as we know (edge-triggered: until WouldBlock).
    writable: bool,
    write_closed: bool,
    eof: bool,
}

impl Dev {
    fn new(stream: TcpStream, mode: Mode, id: u64) -> Dev {
        Dev {
            stream,
            id,
            header_sent: 0,
            pattern: (mode == Mode::Stream).then(|| Pattern::new(id)),
            sent: 0,
            seq: 0,
            packet: [0; PACKET_LEN],
            pending: 0,
            awaiting: false,
            sent_at: 0,
            reply: [0; PACKET_LEN],
            reply_len: 0,
            writable: true,
            write_closed: false,
            eof: false,
        }
    }

    /// Writes `bytes`; Ok(None) on WouldBlock (and notes it).
    fn write(&mut self, bytes: &[u8]) -> Result<Option<usize>, String> {
        let written = try_write(&mut self.stream, bytes)
            .map_err(|e| format!("device {}: write: {e}", self.id))?;
        self.writable &= written.is_some();
        Ok(written)
    }

    /// Finishes the header; true when it is out.
    fn write_header(&mut self, mode: Mode) -> Result<bool, String> {
        while self.header_sent < HEADER_LEN {
            let header = wire::header(mode, self.id);
            match self.write(&header[self.header_sent..])? {
                Some(n) => self.header_sent += n,
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Finishes the packet in hand; true when it is out.
    fn write_pending(&mut self) -> Result<bool, String> {
        while self.pending > 0 {
            let packet = self.packet;
            match self.write(&packet[PACKET_LEN - self.pending..])? {
                Some(n) => {
                    self.pending -= n;
                    self.sent += n as u64;
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    fn next_packet(&mut self) {
        self.sent_at = wire::now_ns();
        self.packet = wire::packet(self.id, self.seq, self.sent_at);
        self.seq += 1;
        self.pending = PACKET_LEN;
    }

    /// One turn of writing, sending packets up to number `allowed`; true if
    /// the device could write more right now.
    fn write_turn(&mut self, mode: Mode, allowed: u64) -> Result<bool, String> {
        if !self.write_header(mode)? {
            return Ok(false);
        }
        match mode {
            Mode::Stream => {
                let pattern = self.pattern.as_ref().expect("a stream has a pattern");
                for _ in 0..STREAM_BUDGET {
                    let chunk = pattern.at(self.sent, PERIOD);
                    match try_write(&mut self.stream, chunk)
                        .map_err(|e| format!("device {}: write: {e}", self.id))?
                    {
                        Some(n) => self.sent += n as u64,
                        None => {
                            self.writable = false;
                            return Ok(false);
                        }
                    }
                }
                Ok(true)
            }
            Mode::Flood => {
                for _ in 0..FLOOD_BUDGET {
                    if self.pending == 0 {
                        if self.seq >= allowed {
                            return Ok(false);
                        }
                        self.next_packet();
                    }
                    if !self.write_pending()? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Mode::Echo | Mode::Tracker => {
                if !self.awaiting {
                    if self.pending == 0 {
                        if self.seq >= allowed {
                            return Ok(false);
                        }
                        self.next_packet();
                    }
                    self.awaiting = self.write_pending()?;
                }
                Ok(false)
            }
        }
    }

    /// Reads until WouldBlock or end of stream; checks echoes.
    fn read_all(
        &mut self,
        mode: Mode,
        shared: &DevShared,
        latency: &mut Histogram<u64>,
    ) -> Result<(), String> {
        let mut buf = [0u8; 4096];
        while !self.eof {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    if !self.write_closed {
                        return Err(format!(
                            "device {}: the proxy closed the connection",
                            self.id
                        ));
                    }
                }
                Ok(n) => self.take_reply(&buf[..n], mode, shared, latency)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("device {}: read: {e}", self.id)),
            }
        }
        Ok(())
    }

    fn take_reply(
        &mut self,
        bytes: &[u8],
        mode: Mode,
        shared: &DevShared,
        latency: &mut Histogram<u64>,
    ) -> Result<(), String> {
        let room = PACKET_LEN - self.reply_len;
        if mode != Mode::Echo || !self.awaiting || self.pending > 0 || bytes.len() > room {
            return Err(format!(
                "device {}: {} unexpected bytes from the proxy",
                self.id,
                bytes.len()
            ));
        }
        self.reply[self.reply_len..self.reply_len + bytes.len()].copy_from_slice(bytes);
        self.reply_len += bytes.len();
        if self.reply_len == PACKET_LEN {
            if self.reply != self.packet {
                return Err(format!(
                    "device {}: reply {} differs from its request",
                    self.id,
                    self.seq - 1
                ));
            }
            self.reply_len = 0;
            self.awaiting = false;
            shared.requests.fetch_add(1, Relaxed);
            if shared.measuring.load(Relaxed) {
                latency.saturating_record(wire::now_ns().saturating_sub(self.sent_at).max(1));
            }
        }
        Ok(())
    }
}

/// One write; Ok(None) on WouldBlock.
fn try_write(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.write(bytes) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

struct Run {
    poll: Poll,
    devs: Vec<Dev>,
    mode: Mode,
    /// Packets per second per device, if paced.
    pace: Option<f64>,
    shared: Arc<DevShared>,
    latency: Histogram<u64>,
}

impl Run {
    fn run(&mut self) -> Result<DevOutcome, String> {
        let mut events = Events::with_capacity(1024);
        let mut timeout = Duration::ZERO;
        let started = Instant::now();
        let mut stopped_at: Option<Instant> = None;
        loop {
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("device poll: {e}"));
                }
            }
            for event in events.iter() {
                let dev = &mut self.devs[event.token().0];
                if event.is_writable() {
                    dev.writable = true;
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    dev.read_all(self.mode, &self.shared, &mut self.latency)?;
                }
            }
            let stopping = self.shared.stop.load(Relaxed);
            if stopping && stopped_at.is_none() {
                stopped_at = Some(Instant::now());
            }
            let elapsed = started.elapsed().as_secs_f64();
            let allowed = self
                .pace
                .map_or(u64::MAX, |rate| (rate * elapsed) as u64 + 1);
            let mut more = false;
            for dev in &mut self.devs {
                if dev.write_closed {
                    continue;
                }
                if stopping {
                    // Finish the header and any packet in hand first.
                    if dev.writable && dev.write_header(self.mode)? {
                        dev.write_pending()?;
                    }
                    if dev.header_sent == HEADER_LEN && dev.pending == 0 && !dev.awaiting {
                        dev.stream
                            .shutdown(Shutdown::Write)
                            .map_err(|e| format!("device {}: shutdown: {e}", dev.id))?;
                        dev.write_closed = true;
                    }
                } else if dev.writable {
                    more |= dev.write_turn(self.mode, allowed)?;
                }
            }
            if self.devs.iter().all(|dev| dev.eof) {
                break;
            }
            timeout = match self.pace {
                _ if more => Duration::ZERO,
                Some(rate) if !stopping => {
                    // Until the next packet is due. mio's poll rounds up to
                    // whole milliseconds, so the last stretch is a sleep.
                    let due = Duration::from_secs_f64(allowed as f64 / rate);
                    let wait = due.saturating_sub(started.elapsed());
                    if wait < Duration::from_millis(2) {
                        std::thread::sleep(wait);
                        Duration::ZERO
                    } else {
                        wait - Duration::from_millis(1)
                    }
                }
                _ => Duration::from_millis(10),
            };
            if let Some(at) = stopped_at {
                if at.elapsed() > CLOSE_DEADLINE {
                    let open = self.devs.iter().filter(|dev| !dev.eof).count();
                    return Err(format!(
                        "{open} device connections still open {CLOSE_DEADLINE:?} after the devices stopped sending"
                    ));
                }
            }
        }
        Ok(DevOutcome {
            sent: self.devs.iter().map(|dev| (dev.id, dev.sent)).collect(),
            latency: self.latency.clone(),
        })
    }
}
