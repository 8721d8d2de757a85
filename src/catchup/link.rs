//! One catch-up connection to a target: a non-blocking socket with a poll of
//! its own, driven by blocking calls that wait in short slices, so that the
//! catch-up thread notices a stop within a tenth of a second whatever the
//! target does. Replies are read (and thrown away) while writing, so a
//! target that answers every packet never blocks on us.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::net::reason::Reason;

/// How long one wait lasts before the stop flag is looked at again.
pub const SLICE: Duration = Duration::from_millis(100);
/// After the last byte: replies are read until the target closes, is quiet
/// this long ...
const LINGER_QUIET: Duration = Duration::from_secs(1);
/// ... or this long has passed.
const LINGER_MAX: Duration = Duration::from_secs(5);

const SOCKET: Token = Token(0);

/// Why a link ended early.
#[derive(Debug, PartialEq, Eq)]
pub enum Cut {
    /// The target closed, reset, failed or stalled: the reason.
    Target(String),
    /// The daemon is stopping.
    Stopped,
}

pub struct Link {
    stream: TcpStream,
    poll: Poll,
    events: Events,
    /// Bytes written to the socket.
    pub sent: u64,
    /// Reply bytes read (and thrown away).
    pub received: u64,
    /// A write that makes no progress for this long cuts the link.
    stall: Duration,
    replies: Vec<u8>,
}

impl Link {
    /// Connects to the first of `addresses` that answers within `timeout`
    /// each; the last failure's reason otherwise.
    pub fn connect(
        addresses: &[SocketAddr],
        timeout: Duration,
        stop: &AtomicBool,
    ) -> Result<Link, Cut> {
        let mut last = Cut::Target("connect failed: no address".into());
        for &address in addresses {
            match Link::connect_one(address, timeout, stop) {
                Ok(link) => return Ok(link),
                Err(Cut::Stopped) => return Err(Cut::Stopped),
                Err(cut) => last = cut,
            }
        }
        Err(last)
    }

    fn connect_one(address: SocketAddr, timeout: Duration, stop: &AtomicBool) -> Result<Link, Cut> {
        let failed = |e: io::Error| Cut::Target(Reason::connect_failed(&e).to_string());
        let mut stream = TcpStream::connect(address).map_err(failed)?;
        let poll = Poll::new().map_err(failed)?;
        poll.registry()
            .register(&mut stream, SOCKET, Interest::READABLE | Interest::WRITABLE)
            .map_err(failed)?;
        let mut link = Link {
            stream,
            poll,
            events: Events::with_capacity(4),
            sent: 0,
            received: 0,
            stall: timeout,
            replies: vec![0; 16 * 1024],
        };
        let deadline = Instant::now() + timeout;
        loop {
            if stop.load(Ordering::SeqCst) {
                return Err(Cut::Stopped);
            }
            match link.stream.take_error() {
                Ok(Some(e)) | Err(e) => return Err(failed(e)),
                Ok(None) => {}
            }
            match link.stream.peer_addr() {
                Ok(_) => {
                    // Best effort: small catch-up packets go out at once.
                    let _ = link.stream.set_nodelay(true);
                    return Ok(link);
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(e) => return Err(failed(e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Cut::Target(Reason::ConnectTimeout.to_string()));
            }
            link.wait(left.min(SLICE));
        }
    }

    /// Writes all of `bytes`, reading replies meanwhile.
    pub fn write_all(&mut self, mut bytes: &[u8], stop: &AtomicBool) -> Result<(), Cut> {
        let mut progress = Instant::now();
        while !bytes.is_empty() {
            if stop.load(Ordering::SeqCst) {
                return Err(Cut::Stopped);
            }
            match self.stream.write(bytes) {
                Ok(0) => return Err(Cut::Target(Reason::ClosedByPeer.to_string())),
                Ok(n) => {
                    self.sent += n as u64;
                    bytes = &bytes[n..];
                    progress = Instant::now();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Cut::Target(Reason::io(&e).to_string())),
            }
            if self.read_replies()? {
                return Err(Cut::Target(Reason::ClosedByPeer.to_string()));
            }
            if progress.elapsed() >= self.stall {
                return Err(Cut::Target("write timeout".into()));
            }
            self.wait(SLICE);
        }
        Ok(())
    }

    /// Everything was written: ends our side and reads what the target
    /// still answers, until it closes, falls quiet, or time is up.
    pub fn finish(&mut self, stop: &AtomicBool) {
        // A target gone already has all it will get.
        let _ = self.stream.shutdown(Shutdown::Write);
        let started = Instant::now();
        let mut heard = Instant::now();
        while started.elapsed() < LINGER_MAX && !stop.load(Ordering::SeqCst) {
            let before = self.received;
            match self.read_replies() {
                Ok(false) => {}
                Ok(true) | Err(_) => return,
            }
            if self.received > before {
                heard = Instant::now();
            } else if heard.elapsed() >= LINGER_QUIET {
                return;
            }
            self.wait(SLICE);
        }
    }

    /// Reads and throws away what the target sent; true once it closed.
    fn read_replies(&mut self) -> Result<bool, Cut> {
        loop {
            match self.stream.read(&mut self.replies) {
                Ok(0) => return Ok(true),
                Ok(n) => self.received += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Cut::Target(Reason::io(&e).to_string())),
            }
        }
    }

    /// Waits for the socket (or `limit`); an interrupted or failed poll
    /// just ends the wait early.
    fn wait(&mut self, limit: Duration) {
        if self.poll.poll(&mut self.events, Some(limit)).is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
