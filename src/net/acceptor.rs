//! The acceptor thread: the listening sockets, accepted until `WouldBlock`,
//! each new device handed to a worker in turn.
//!
//! It gives every connection its ident and enforces the [`Admission`]
//! limits (PROXY_ALLOW, PROXY_MAX_CONNECTIONS, PROXY_MAX_CONNECTIONS_PER_IP):
//! a refused peer is closed at once with no message written (a connect flood
//! must not fill the disk), counted by cause, and logged at most once a
//! minute. It survives running out of file descriptors: it warns at most
//! every ten seconds and pauses accepting for a moment instead of spinning
//! on the ready listener.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::control::stats::{self, Counters};
use crate::net::admission::{Admission, RefusalLog};
use crate::net::worker::{Command, WorkerHandle};
use crate::store::message::{IdentGenerator, Origin};

const WAKER: Token = Token(usize::MAX);
/// How long accepting pauses after the process ran out of descriptors.
const EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);
const EXHAUSTED_WARN_EVERY: Duration = Duration::from_secs(10);

/// Stops the acceptor from another thread.
pub struct AcceptorHandle {
    stop: Arc<AtomicBool>,
    waker: Waker,
}

impl AcceptorHandle {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            error!("cannot wake the acceptor: {e}");
        }
    }
}

pub struct Acceptor {
    poll: Poll,
    listeners: Vec<TcpListener>,
    workers: Vec<WorkerHandle>,
    to_wake: Vec<bool>,
    next_worker: usize,
    idents: IdentGenerator,
    admission: Arc<Admission>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    paused_until: Option<Instant>,
    last_exhausted_warning: Option<Instant>,
    refusal_log: RefusalLog,
}

/// Everything the acceptor starts with.
pub struct AcceptorSetup {
    pub listeners: Vec<TcpListener>,
    pub workers: Vec<WorkerHandle>,
    pub admission: Arc<Admission>,
    pub counters: Arc<Counters>,
    /// Shared with the workers' UDP sessions: no ident is given twice.
    pub idents: IdentGenerator,
}

impl Acceptor {
    pub fn spawn(setup: AcceptorSetup) -> io::Result<(AcceptorHandle, JoinHandle<()>)> {
        let poll = Poll::new()?;
        let mut listeners = setup.listeners;
        for (index, listener) in listeners.iter_mut().enumerate() {
            poll.registry()
                .register(listener, Token(index), Interest::READABLE)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let waker = Waker::new(poll.registry(), WAKER)?;
        let mut acceptor = Acceptor {
            poll,
            listeners,
            to_wake: vec![false; setup.workers.len()],
            workers: setup.workers,
            next_worker: 0,
            idents: setup.idents,
            admission: setup.admission,
            counters: setup.counters,
            stop: Arc::clone(&stop),
            paused_until: None,
            last_exhausted_warning: None,
            refusal_log: RefusalLog::new("refused a device connection"),
        };
        let thread = std::thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || acceptor.run())?;
        Ok((AcceptorHandle { stop, waker }, thread))
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = self
                .paused_until
                .map(|until| until.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("acceptor: poll failed: {e}");
                    std::thread::sleep(EXHAUSTED_PAUSE);
                }
                continue;
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if self
                .paused_until
                .is_some_and(|until| Instant::now() >= until)
            {
                // Connections may wait in the backlog with no new event.
                self.paused_until = None;
                for index in 0..self.listeners.len() {
                    self.accept_all(index);
                }
            }
            for event in &events {
                if event.token() != WAKER {
                    self.accept_all(event.token().0);
                }
            }
            self.wake_workers();
        }
    }

    fn accept_all(&mut self, index: usize) {
        while self.paused_until.is_none() {
            match self.listeners[index].accept() {
                Ok((stream, peer)) => self.dispatch(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_exhaustion(&e) => self.pause_exhausted(&e),
                Err(e) => debug!("accept failed: {e}"),
            }
        }
    }

    fn dispatch(&mut self, stream: TcpStream, peer: SocketAddr) {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let permit = match self.admission.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(cause) => {
                // Dropping the socket closes it; nothing is written.
                self.counters.refusal(cause);
                self.refusal_log.note(peer, cause);
                return;
            }
        };
        let origin = Origin {
            ident: self.idents.next_ident(),
            peer,
        };
        let index = self.next_worker;
        self.next_worker = (self.next_worker + 1) % self.workers.len();
        let adopt = Command::Adopt {
            stream,
            origin,
            permit,
        };
        if self.workers[index].post(adopt) {
            self.to_wake[index] = true;
            stats::add(&self.counters.opened, 1);
        } else {
            error!(
                "{}: worker {index} has stopped; connection closed",
                origin.ident
            );
        }
    }

    fn pause_exhausted(&mut self, error: &io::Error) {
        let now = Instant::now();
        self.paused_until = Some(now + EXHAUSTED_PAUSE);
        let due = self
            .last_exhausted_warning
            .is_none_or(|last| now >= last + EXHAUSTED_WARN_EVERY);
        if due {
            self.last_exhausted_warning = Some(now);
            warn!(
                "cannot accept device connections: {error} ({} open); raise the open-file limit \
                 (LimitNOFILE) or lower PROXY_MAX_CONNECTIONS",
                self.admission.open()
            );
        }
    }

    fn wake_workers(&mut self) {
        for (index, wake) in self.to_wake.iter_mut().enumerate() {
            if std::mem::take(wake) {
                self.workers[index].wake();
            }
        }
    }
}

/// Out of descriptors or kernel memory: retrying at once would only spin.
fn is_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
