//! A target server: one thread, one mio poll, every connection checked.
//!
//! It accepts connections (from the proxy, or from devices directly), reads
//! each one's header and then checks every byte against what the device must
//! have sent ([`crate::wire`]). Echo connections get each packet back;
//! tracker packets have their latency recorded. When a connection's peer
//! closes its sending side, the target closes the connection (after flushing
//! any echo), which lets the proxy close the device. Live counters sit in
//! [`Shared`]; the per-connection results come back from [`Target::finish`].
//! A connection that closes without sending a byte is a readiness probe and
//! is ignored. A target can also start as a [`ClosedPort`]: its port is
//! bound but refuses connections until [`ClosedPort::listen`] (a target
//! that is down, then back), and can serve at a low CPU priority (a target
//! that stands for another machine: here it shares the cores with the
//! proxy under test).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use hdrhistogram::Histogram;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::wire::{self, HEADER_LEN, Mode, PACKET_LEN, Pattern};

const LISTENER: Token = Token(usize::MAX);
const READ_SIZE: usize = 256 * 1024;

/// Counters the orchestrator reads while the target runs.
#[derive(Default)]
pub struct Shared {
    /// Every byte read, headers included.
    pub bytes: AtomicU64,
    /// Packets checked (echo, tracker and flood modes).
    pub packets: AtomicU64,
    /// Connections whose header has arrived.
    pub identified: AtomicUsize,
    /// Connections closed cleanly by their peer and then by us.
    pub finished: AtomicUsize,
    /// Failures so far (wrong bytes, errors): waiting on more is pointless.
    pub failed: AtomicUsize,
    /// Bytes after the header of [`Mode::Stream`] connections.
    pub stream_bytes: AtomicU64,
    /// When the first of those bytes came, in [`wire::now_ns`] time (0:
    /// not yet).
    pub first_stream_byte_ns: AtomicU64,
    /// Stream connections closed cleanly (counted in `finished` too).
    pub streams_finished: AtomicUsize,
    /// When the last of them closed, in [`wire::now_ns`] time.
    pub last_stream_finished_ns: AtomicU64,
    stop: AtomicBool,
}

/// What one connection delivered.
#[derive(Debug, Default, Clone)]
pub struct ConnResult {
    /// Bytes after the header.
    pub bytes: u64,
    pub packets: u64,
    /// The peer closed its side cleanly and every echo was written.
    pub finished: bool,
}

/// Everything a target saw, once it has stopped.
pub struct Outcome {
    pub conns: HashMap<u64, ConnResult>,
    pub failures: Vec<String>,
    /// Tracker packets' latency, nanoseconds.
    pub latency: Histogram<u64>,
    /// The same, each with its send time ([`wire::now_ns`]), in order of
    /// arrival: the latency of any stretch of a run.
    pub tracked: Vec<(u64, u64)>,
}

pub struct Target {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    thread: JoinHandle<Outcome>,
}

impl Target {
    /// Listens on a free loopback port and serves on a new thread.
    pub fn start() -> io::Result<Target> {
        ClosedPort::bind()?.listen(Priority::Normal)
    }

    /// Serves on `listener` (listening already) on a new thread.
    fn serve(listener: StdListener, priority: Priority) -> io::Result<Target> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let mut server = Server::new(TcpListener::from_std(listener), shared.clone())?;
        let thread = std::thread::Builder::new()
            .name("target".into())
            .spawn(move || {
                priority.apply();
                server.run()
            })?;
        Ok(Target {
            addr,
            shared,
            thread,
        })
    }

    /// Stops serving and returns what every connection delivered.
    pub fn finish(self) -> Outcome {
        self.shared.stop.store(true, Relaxed);
        self.thread.join().expect("target thread panicked")
    }
}

/// A free loopback port, bound so that nobody else takes it, but not
/// listening: a connect to it is refused, as to a target that is down.
pub struct ClosedPort {
    socket: StdListener,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn bind() -> io::Result<ClosedPort> {
        let socket = bind_loopback()?;
        let addr = socket.local_addr()?;
        Ok(ClosedPort { socket, addr })
    }

    /// Starts listening (with a deep backlog: std and mio use 128, too few
    /// for thousands of trackers connecting at once) and serving.
    pub fn listen(self, priority: Priority) -> io::Result<Target> {
        // SAFETY: listen on a bound socket we own.
        if unsafe { libc::listen(self.socket.as_raw_fd(), 4096) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Target::serve(self.socket, priority)
    }
}

/// The CPU priority of a target's thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Normal,
    /// nice 19: it gets the CPU the proxy and the other threads leave.
    Low,
}

impl Priority {
    /// Sets the calling thread's priority.
    fn apply(self) {
        if self == Priority::Low {
            // SAFETY: gettid and setpriority on the calling thread only
            // change its scheduling priority; failing leaves it at nice 0.
            let rc = unsafe {
                let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, thread, 19)
            };
            if rc != 0 {
                eprintln!(
                    "loadgen: cannot lower a target's priority: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

/// A non-blocking TCP socket bound to a free loopback port, not listening.
fn bind_loopback() -> io::Result<StdListener> {
    // SAFETY: plain socket calls on a descriptor we own; on error it is
    // closed by the StdListener wrapper created right after socket().
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let listener = StdListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0, // the kernel picks a free port
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let bound = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            && libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) == 0;
        if bound {
            Ok(listener)
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

struct Conn {
    stream: TcpStream,
    header: [u8; HEADER_LEN],
    header_len: usize,
    mode: Option<(Mode, u64)>,
    pattern: Option<Pattern>,
    result: ConnResult,
    packet: [u8; PACKET_LEN],
    packet_len: usize,
    /// Echoes not yet written.
    echo: Vec<u8>,
    read_closed: bool,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    shared: Arc<Shared>,
    buffer: Vec<u8>,
    outcome: Outcome,
}

impl Server {
    fn new(mut listener: TcpListener, shared: Arc<Shared>) -> io::Result<Server> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(Server {
            poll,
            listener,
            conns: Slab::new(),
            shared,
            buffer: vec![0; READ_SIZE],
            outcome: Outcome {
                conns: HashMap::new(),
                failures: Vec::new(),
                latency: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("bounds"),
                // Grown while a run goes on: room for a 20 s run of 9,000
                // trackers up front.
                tracked: Vec::with_capacity(1 << 18),
            },
        })
    }

    fn run(&mut self) -> Outcome {
        let mut events = Events::with_capacity(1024);
        while !self.shared.stop.load(Relaxed) {
            if let Err(e) = self.poll.poll(&mut events, Some(Duration::from_millis(20))) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.fail(format!("target poll: {e}"));
                    break;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(slot) => self.serve(slot),
                }
            }
        }
        // Connections still open have not finished; note what they got.
        for conn in self.conns.drain() {
            if let Some((_, id)) = conn.mode {
                self.outcome.conns.insert(id, conn.result);
            }
        }
        std::mem::replace(
            &mut self.outcome,
            Outcome {
                conns: HashMap::new(),
                failures: Vec::new(),
                latency: Histogram::new(3).expect("sigfig"),
                tracked: Vec::new(),
            },
        )
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let entry = self.conns.vacant_entry();
                    let token = Token(entry.key());
                    let registered = stream.set_nodelay(true).and_then(|()| {
                        self.poll.registry().register(
                            &mut stream,
                            token,
                            Interest::READABLE | Interest::WRITABLE,
                        )
                    });
                    if let Err(e) = registered {
                        self.fail(format!("target register: {e}"));
                        continue;
                    }
                    entry.insert(Conn {
                        stream,
                        header: [0; HEADER_LEN],
                        header_len: 0,
                        mode: None,
                        pattern: None,
                        result: ConnResult::default(),
                        packet: [0; PACKET_LEN],
                        packet_len: 0,
                        echo: Vec::new(),
                        read_closed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: say so and stop accepting for now.
                    self.fail(format!("target accept: {e}"));
                    return;
                }
            }
        }
    }

    /// Reads until WouldBlock, checks, echoes, and closes when done.
    fn serve(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let mut failure = None;
        while !conn.read_closed {
            match conn.stream.read(&mut self.buffer) {
                Ok(0) => conn.read_closed = true,
                Ok(n) => {
                    self.shared.bytes.fetch_add(n as u64, Relaxed);
                    let chunk = &self.buffer[..n];
                    if let Err(e) = take(conn, chunk, &self.shared, &mut self.outcome) {
                        failure = Some(e);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failure = Some(format!("{}: read: {e}", describe(conn)));
                    break;
                }
            }
        }
        if failure.is_none() {
            failure = flush_echo(conn).err();
        }
        if failure.is_none() && conn.read_closed && conn.echo.is_empty() {
            failure = check_end(conn).err();
            if failure.is_none() {
                self.close(slot, true);
                return;
            }
        }
        if let Some(failure) = failure {
            self.fail(failure);
            self.close(slot, false);
        }
    }

    fn fail(&mut self, failure: String) {
        self.shared.failed.fetch_add(1, Relaxed);
        self.outcome.failures.push(failure);
    }

    fn close(&mut self, slot: usize, finished: bool) {
        let mut conn = self.conns.remove(slot);
        // Deregistering can only fail if the socket is already gone; the
        // drop below closes it either way.
        let _ = self.poll.registry().deregister(&mut conn.stream);
        let Some((_, id)) = conn.mode else {
            return; // a probe: nothing was sent
        };
        conn.result.finished = finished;
        if finished {
            self.shared.finished.fetch_add(1, Relaxed);
            if conn.pattern.is_some() {
                self.shared
                    .last_stream_finished_ns
                    .store(wire::now_ns(), Relaxed);
                self.shared.streams_finished.fetch_add(1, Relaxed);
            }
        }
        if self.outcome.conns.insert(id, conn.result).is_some() {
            self.fail(format!("connection {id} arrived twice"));
        }
    }
}

fn describe(conn: &Conn) -> String {
    match conn.mode {
        Some((mode, id)) => format!("connection {id} ({mode:?})"),
        None => "unidentified connection".into(),
    }
}

/// Takes in one chunk read from a connection and checks it.
fn take(
    conn: &mut Conn,
    mut chunk: &[u8],
    shared: &Shared,
    outcome: &mut Outcome,
) -> Result<(), String> {
    if conn.mode.is_none() {
        let want = (HEADER_LEN - conn.header_len).min(chunk.len());
        conn.header[conn.header_len..conn.header_len + want].copy_from_slice(&chunk[..want]);
        conn.header_len += want;
        chunk = &chunk[want..];
        if conn.header_len < HEADER_LEN {
            return Ok(());
        }
        let (mode, id) = wire::parse_header(&conn.header)?;
        conn.mode = Some((mode, id));
        if mode == Mode::Stream {
            conn.pattern = Some(Pattern::new(id));
        }
        shared.identified.fetch_add(1, Relaxed);
    }
    let (mode, id) = conn.mode.expect("identified above");
    if let Some(pattern) = &conn.pattern {
        if let Err(at) = pattern.check(conn.result.bytes, chunk) {
            return Err(format!("connection {id}: stream byte {at} is wrong"));
        }
        conn.result.bytes += chunk.len() as u64;
        let before = shared.stream_bytes.fetch_add(chunk.len() as u64, Relaxed);
        if before == 0 && !chunk.is_empty() {
            shared.first_stream_byte_ns.store(wire::now_ns(), Relaxed);
        }
        return Ok(());
    }
    conn.result.bytes += chunk.len() as u64;
    while !chunk.is_empty() {
        let want = (PACKET_LEN - conn.packet_len).min(chunk.len());
        conn.packet[conn.packet_len..conn.packet_len + want].copy_from_slice(&chunk[..want]);
        conn.packet_len += want;
        chunk = &chunk[want..];
        if conn.packet_len < PACKET_LEN {
            break;
        }
        conn.packet_len = 0;
        let sent_ns = wire::check_packet(id, conn.result.packets, &conn.packet)?;
        conn.result.packets += 1;
        shared.packets.fetch_add(1, Relaxed);
        match mode {
            Mode::Echo => conn.echo.extend_from_slice(&conn.packet),
            Mode::Tracker => {
                let latency = wire::now_ns().saturating_sub(sent_ns).max(1);
                outcome.latency.saturating_record(latency);
                outcome.tracked.push((sent_ns, latency));
            }
            Mode::Flood | Mode::Stream => {}
        }
    }
    Ok(())
}

fn flush_echo(conn: &mut Conn) -> Result<(), String> {
    while !conn.echo.is_empty() {
        match conn.stream.write(&conn.echo) {
            Ok(n) => {
                conn.echo.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{}: echo: {e}", describe(conn))),
        }
    }
    Ok(())
}

/// The peer closed: it must not have stopped inside a header or a packet.
fn check_end(conn: &Conn) -> Result<(), String> {
    if conn.header_len > 0 && conn.mode.is_none() {
        return Err("connection closed inside its header".into());
    }
    if conn.packet_len > 0 {
        return Err(format!(
            "{}: closed inside a packet ({} of {PACKET_LEN} bytes)",
            describe(conn),
            conn.packet_len
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_refuses_until_it_listens() {
        let port = ClosedPort::bind().expect("bind");
        let addr = port.addr;
        let refused = std::net::TcpStream::connect(addr).expect_err("nobody listens yet");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        let target = port.listen(Priority::Low).expect("listen");
        let mut device = std::net::TcpStream::connect(addr).expect("listening now");
        device
            .write_all(&wire::header(Mode::Stream, 9))
            .expect("header");
        device
            .write_all(Pattern::new(9).at(0, 1000))
            .expect("stream");
        device
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while target.shared.streams_finished.load(Relaxed) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the stream never finished"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(target.shared.stream_bytes.load(Relaxed), 1000);
        assert_ne!(target.shared.first_stream_byte_ns.load(Relaxed), 0);
        let outcome = target.finish();
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        assert_eq!(outcome.conns[&9].bytes, 1000);
    }
}
