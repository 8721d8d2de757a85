//! One non-blocking TCP socket of a connection: its cached readiness, its
//! bounded write queue, its byte counters, and how much of what was
//! written its peer has taken.
//!
//! Registration is edge-triggered, so readiness is remembered here: a flag is
//! set by a poll event and cleared only when the operation returns
//! `WouldBlock`. That lets the connection pause reading (backpressure) and
//! resume later without re-registering or waiting for an event that will
//! never come. Reads and writes return their outcome as a value; errors
//! that end a socket are ordinary values on this path, not panics.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

/// What one `read` did.
#[derive(Debug)]
pub enum ReadOutcome {
    /// This many bytes are at the front of the buffer.
    Data(usize),
    /// Nothing to read now; the readable flag is cleared.
    WouldBlock,
    /// The peer closed its sending side (end of stream).
    Closed,
    Failed(io::Error),
}

/// A TCP socket with what is queued for it.
pub struct Endpoint {
    pub stream: TcpStream,
    queue: OutQueue,
    /// May have bytes to read (or an error/EOF to report).
    pub readable: bool,
    /// May accept bytes.
    pub writable: bool,
    /// A poll event reported the peer's end of stream or an error: read
    /// until the read says so, even after a short read.
    pub hangup: bool,
    /// Bytes read from this socket.
    pub received: u64,
    /// Bytes written to this socket.
    pub sent: u64,
    /// Of those, the bytes the peer had acknowledged when last looked at
    /// (see [`Endpoint::peer_took_more`]).
    acknowledged: u64,
}

impl Endpoint {
    /// A socket that is (or will be) connected; `ready` sets the initial
    /// readiness hints, true for an accepted socket, false while connecting.
    pub fn new(stream: TcpStream, ready: bool) -> Endpoint {
        Endpoint {
            stream,
            queue: OutQueue::default(),
            readable: ready,
            writable: ready,
            hangup: false,
            received: 0,
            sent: 0,
            acknowledged: 0,
        }
    }

    /// Swaps in a new socket for a connect that is tried again elsewhere;
    /// what is queued stays queued for it.
    pub fn replace_stream(&mut self, stream: TcpStream) {
        self.stream = stream;
        self.readable = false;
        self.writable = false;
        self.hangup = false;
    }

    /// Reads once into `buf`.
    ///
    /// A read that returns less than asked for has drained the socket, so
    /// the readable flag is cleared without another read just to hear
    /// `WouldBlock`: on Linux an edge-triggered registration reports every
    /// arrival of new data. The end of stream is the exception, as it
    /// arrives with no new edge; `hangup` keeps reading until it is seen.
    pub fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        loop {
            match self.stream.read(buf) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    self.received += n as u64;
                    if n < buf.len() && !self.hangup {
                        self.readable = false;
                    }
                    return ReadOutcome::Data(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return ReadOutcome::WouldBlock;
                }
                Err(e) => return ReadOutcome::Failed(e),
            }
        }
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Sends `data` after what is already queued: written straight away
    /// when possible, the rest queued. Returns the bytes written now.
    pub fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut written = 0;
        if self.queue.is_empty() && self.writable {
            written = write_some(&mut self.stream, &mut self.writable, data)?;
            self.sent += written as u64;
        }
        if written < data.len() {
            self.queue.push(&data[written..]);
        }
        Ok(written)
    }

    /// Writes queued bytes until the queue is empty or the socket is full.
    /// Returns the bytes written.
    pub fn flush(&mut self) -> io::Result<usize> {
        let mut total = 0;
        while self.writable && !self.queue.is_empty() {
            let n = write_some(&mut self.stream, &mut self.writable, self.queue.front())?;
            if n == 0 {
                break;
            }
            self.sent += n as u64;
            self.queue.consume(n);
            total += n;
        }
        Ok(total)
    }

    /// Whether the peer acknowledged bytes since the last look: bytes
    /// written earlier still moving out of the kernel's send queue to a
    /// slow peer, though nothing is written or read here. One ioctl while
    /// bytes are in flight, none once the peer has them all.
    pub fn peer_took_more(&mut self) -> bool {
        if self.sent == self.acknowledged {
            return false;
        }
        let Ok(in_flight) = unacknowledged(&self.stream) else {
            return false;
        };
        let acknowledged = self.sent.saturating_sub(in_flight);
        let more = acknowledged > self.acknowledged;
        self.acknowledged = self.acknowledged.max(acknowledged);
        more
    }

    /// Shuts down our sending side (passes the peer's FIN on).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        match self.stream.shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        }
    }
}

/// Writes as much of `data` as the socket takes now; clears `writable`
/// when it is full (a short write means full: the next edge says when
/// there is room again).
fn write_some(stream: &mut TcpStream, writable: &mut bool, data: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match stream.write(&data[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if written + n < data.len() => {
                written += n;
                *writable = false;
                break;
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Bytes written to `stream` that its peer has not acknowledged yet (a
/// sent FIN counts as one).
#[cfg(target_os = "linux")]
fn unacknowledged(stream: &TcpStream) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut in_flight: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ's number) on an open TCP socket writes one
    // c_int, which `in_flight` is.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut in_flight) };
    match rc {
        0 => Ok(u64::try_from(in_flight).unwrap_or(0)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Elsewhere the kernel's send queue is not looked into: only writes and
/// reads count as activity.
#[cfg(not(target_os = "linux"))]
fn unacknowledged(_: &TcpStream) -> io::Result<u64> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Bytes a slow peer has not taken yet. Holds no allocation while empty, so
/// an idle connection costs no buffer memory.
#[derive(Default)]
pub struct OutQueue {
    bytes: Vec<u8>,
    /// Bytes before this offset have been written.
    head: usize,
}

impl OutQueue {
    pub fn len(&self) -> usize {
        self.bytes.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn front(&self) -> &[u8] {
        &self.bytes[self.head..]
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.head > 0 && self.head >= self.bytes.len() / 2 {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
        self.bytes.extend_from_slice(data);
    }

    pub fn consume(&mut self, n: usize) {
        self.head += n;
        if self.head >= self.bytes.len() {
            self.bytes = Vec::new();
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OutQueue;

    #[test]
    fn queue_keeps_order_across_partial_consumes() {
        let mut queue = OutQueue::default();
        queue.push(b"hello ");
        queue.consume(2);
        queue.push(b"world");
        assert_eq!(queue.front(), b"llo world");
        queue.consume(4);
        queue.push(b"!");
        assert_eq!(queue.front(), b"world!");
        assert_eq!(queue.len(), 6);
    }

    #[test]
    fn an_empty_queue_holds_no_memory() {
        let mut queue = OutQueue::default();
        queue.push(&[7; 4096]);
        queue.consume(4096);
        assert!(queue.is_empty());
        assert_eq!(queue.bytes.capacity(), 0);
    }
}
