//! Target servers on 127.0.0.1: one thread per accepted connection, each
//! recording what it received and sent; dropping a [`Target`] stops and
//! joins them all.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{READ_TICK, is_timeout, millis, poll_until, secs, small_receive_buffer};

/// What a target server does with each connection it accepts.
#[derive(Clone)]
pub enum Behaviour {
    /// Reads and records everything; closes after the end of stream.
    Record,
    /// Records, and answers every read of n bytes with `t{tag}:{n};`.
    Reply { tag: u8 },
    /// Records until the end of stream, then sends this (in 64 KiB writes)
    /// and closes.
    ReplyAtEof(Vec<u8>),
    /// Reads exactly `bytes` bytes, sends `farewell`, then closes (FIN).
    CloseAfter { bytes: usize, farewell: Vec<u8> },
    /// Accepts and never reads; holds the socket until the target is dropped.
    NeverRead,
    /// Reads nothing until the flag is set, then behaves like `Record`.
    Gated(Arc<AtomicBool>),
    /// Like `Record`, reading at most this many bytes a second.
    Paced { bytes_per_second: usize },
}

/// What happened on one accepted connection.
#[derive(Default)]
struct ConnState {
    received: Vec<u8>,
    sent: Vec<u8>,
    eof: bool,
    done: bool,
    error: Option<String>,
}

/// One connection a target accepted (from the daemon).
pub struct TargetConn {
    pub peer: SocketAddr,
    state: Mutex<ConnState>,
}

impl TargetConn {
    pub fn received(&self) -> Vec<u8> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn received_len(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    pub fn sent(&self) -> Vec<u8> {
        self.state.lock().unwrap().sent.clone()
    }

    pub fn sent_len(&self) -> usize {
        self.state.lock().unwrap().sent.len()
    }

    /// Whether it read the end of stream.
    pub fn eof(&self) -> bool {
        self.state.lock().unwrap().eof
    }

    /// Whether its handler finished (the socket is closed).
    pub fn done(&self) -> bool {
        self.state.lock().unwrap().done
    }

    /// A read or write error, if one ended it.
    pub fn error(&self) -> Option<String> {
        self.state.lock().unwrap().error.clone()
    }

    /// Waits until it received at least `n` bytes.
    pub fn wait_received(&self, n: usize, timeout: Duration) {
        let held = poll_until(timeout, || self.received_len() >= n);
        assert!(
            held,
            "target connection from {} expected {n} bytes within {timeout:?}, has {}",
            self.peer,
            self.received_len()
        );
    }

    /// Waits until its handler finished (end of stream, error or close).
    pub fn wait_done(&self, timeout: Duration) {
        let held = poll_until(timeout, || self.done());
        assert!(
            held,
            "target connection from {} still open after {timeout:?} (eof {}, received {})",
            self.peer,
            self.eof(),
            self.received_len()
        );
    }
}

/// A target server on 127.0.0.1 with one thread per accepted connection.
/// Dropping it stops and joins every thread.
pub struct Target {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<TargetConn>>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Target {
    pub fn start(behaviour: Behaviour) -> Target {
        Target::start_with(behaviour, false)
    }

    /// A target whose accepted sockets have a small kernel receive buffer.
    pub fn start_small_buffer(behaviour: Behaviour) -> Target {
        Target::start_with(behaviour, true)
    }

    fn start_with(behaviour: Behaviour, small_buffer: bool) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a target");
        if small_buffer {
            small_receive_buffer(&listener);
        }
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let conns = Arc::clone(&conns);
            let stop = Arc::clone(&stop);
            thread::spawn(move || accept_loop(listener, behaviour, conns, stop))
        };
        Target {
            addr,
            conns,
            stop,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `host:port` to configure as PROXY_TARGETn.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn connections(&self) -> Vec<Arc<TargetConn>> {
        self.conns.lock().unwrap().clone()
    }

    /// Waits until it accepted `n` connections and returns them.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> Vec<Arc<TargetConn>> {
        let held = poll_until(timeout, || self.conns.lock().unwrap().len() >= n);
        let conns = self.connections();
        assert!(
            held,
            "target {} expected {n} connections within {timeout:?}, has {}",
            self.addr,
            conns.len()
        );
        conns
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        for handler in acceptor.join().unwrap_or_default() {
            // A handler that panicked has already printed its message.
            let _ = handler.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    behaviour: Behaviour,
    conns: Arc<Mutex<Vec<Arc<TargetConn>>>>,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let mut handlers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(READ_TICK)).unwrap();
                stream.set_write_timeout(Some(secs(15))).unwrap();
                let conn = Arc::new(TargetConn {
                    peer,
                    state: Mutex::new(ConnState::default()),
                });
                conns.lock().unwrap().push(Arc::clone(&conn));
                let behaviour = behaviour.clone();
                let stop = Arc::clone(&stop);
                handlers.push(thread::spawn(move || {
                    serve(stream, &conn, behaviour, &stop);
                    conn.state.lock().unwrap().done = true;
                }));
            }
            Err(e) if is_timeout(&e) => thread::sleep(millis(2)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("target accept failed: {e}"),
        }
    }
    handlers
}

fn serve(mut stream: TcpStream, conn: &TargetConn, behaviour: Behaviour, stop: &AtomicBool) {
    match behaviour {
        Behaviour::Record => {
            read_loop(&mut stream, conn, stop, |_, _| true);
        }
        Behaviour::Reply { tag } => {
            read_loop(&mut stream, conn, stop, |stream, n| {
                send(stream, conn, format!("t{tag}:{n};").as_bytes())
            });
        }
        Behaviour::ReplyAtEof(reply) => {
            if read_loop(&mut stream, conn, stop, |_, _| true) {
                // In pieces, so that `sent` shows how far a slow reader let it.
                for piece in reply.chunks(64 * 1024) {
                    if stop.load(Ordering::SeqCst) || !send(&mut stream, conn, piece) {
                        break;
                    }
                }
            }
        }
        Behaviour::CloseAfter { bytes, farewell } => {
            read_loop(&mut stream, conn, stop, |_, _| conn.received_len() < bytes);
            send(&mut stream, conn, &farewell);
        }
        Behaviour::NeverRead => {
            while !stop.load(Ordering::SeqCst) {
                thread::sleep(millis(20));
            }
        }
        Behaviour::Paced { bytes_per_second } => {
            let started = Instant::now();
            read_loop(&mut stream, conn, stop, |_, _| {
                let due = conn.received_len() as f64 / bytes_per_second as f64;
                thread::sleep(Duration::from_secs_f64(due).saturating_sub(started.elapsed()));
                true
            });
        }
        Behaviour::Gated(gate) => {
            while !stop.load(Ordering::SeqCst) && !gate.load(Ordering::SeqCst) {
                thread::sleep(millis(5));
            }
            read_loop(&mut stream, conn, stop, |_, _| true);
        }
    }
}

/// Reads and records until the end of stream (returns true), an error, a
/// stop, or `on_data` returning false (returns false).
fn read_loop(
    stream: &mut TcpStream,
    conn: &TargetConn,
    stop: &AtomicBool,
    mut on_data: impl FnMut(&mut TcpStream, usize) -> bool,
) -> bool {
    let mut buffer = vec![0; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buffer) {
            Ok(0) => {
                conn.state.lock().unwrap().eof = true;
                return true;
            }
            Ok(n) => {
                conn.state
                    .lock()
                    .unwrap()
                    .received
                    .extend_from_slice(&buffer[..n]);
                if !on_data(stream, n) {
                    return false;
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                conn.state.lock().unwrap().error = Some(e.to_string());
                return false;
            }
        }
    }
    false
}

/// Writes and records; false on error.
fn send(stream: &mut TcpStream, conn: &TargetConn, bytes: &[u8]) -> bool {
    match stream.write_all(bytes) {
        Ok(()) => {
            conn.state.lock().unwrap().sent.extend_from_slice(bytes);
            true
        }
        Err(e) => {
            conn.state.lock().unwrap().error = Some(e.to_string());
            false
        }
    }
}

/// What a device received from targets that [`Behaviour::Reply`]: for the
/// target tagged `tag`, the bytes of its replies and the byte counts they
/// add up to (the bytes that target has answered for). A reply cut short
/// at the end is left out.
pub fn tagged_replies(received: &[u8], tag: u8) -> (usize, usize) {
    let text = std::str::from_utf8(received).expect("replies are ASCII");
    let complete = &text[..text.rfind(';').map_or(0, |i| i + 1)];
    let (mut bytes, mut answered) = (0, 0);
    for reply in complete.split_terminator(';') {
        let (who, n) = reply
            .split_once(':')
            .unwrap_or_else(|| panic!("not a reply: {reply:?} in {text:?}"));
        if who == format!("t{tag}") {
            bytes += reply.len() + 1;
            answered += n.parse::<usize>().expect("a count");
        }
    }
    (bytes, answered)
}
