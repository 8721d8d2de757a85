//! The daemon's life: start every thread in order, wait for signals, and
//! shut down cleanly.
//!
//! Start: the device lists are read (one that cannot be read is a
//! configuration error, exit 2), signals are caught (so an early SIGTERM is
//! not fatal), the data folder is opened, the open-file limit raised, the listeners bound;
//! only then does "listening on" appear in the log. Stop (SIGTERM/SIGINT):
//! the acceptor stops, each worker closes its connections with reason
//! `shutdown` and hands over its last messages, and the writer, once every
//! sender is gone, writes and fsyncs everything and returns. SIGHUP
//! rotates the message file and reads the device lists again.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use log::{error, info, warn};
use mio::net::TcpListener;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use socket2::{Domain, Protocol, Socket, Type};

use crate::catchup::{self, Boundary, CatchUpSetup};
use crate::config::{Config, ConfigError};
use crate::control::server::{self as control_server, Control, ControlSetup};
use crate::control::stats::{Counters, Registry};
use crate::net::acceptor::{Acceptor, AcceptorSetup};
use crate::net::admission::Admission;
use crate::net::connection::{Settings, TargetAddresses};
use crate::net::devices::Devices;
use crate::net::limits;
use crate::net::resolver;
use crate::net::udp::{self, UdpSetup};
use crate::net::worker::{Command, Worker, WorkerHandle, WorkerSetup};
use crate::store::journal::{BufferPool, Journal, JournalSettings, StoreCommand};
use crate::store::message::IdentGenerator;
use crate::store::writer::{self, Store, StoreError, StoreSettings};

/// The listening sockets' accept queue (capped by net.core.somaxconn).
const ACCEPT_QUEUE: i32 = 8192;

/// Batches the writer may hold back before the workers wait.
const STORE_QUEUE: usize = 64;

/// Why the daemon could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A setting that can only be checked at start (a device list file).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("cannot use the control socket {path}: {source}")]
    Control { path: PathBuf, source: io::Error },
    #[error("cannot start: {0}")]
    Io(#[from] io::Error),
    #[error("{0} messages could not be written before exiting (see the log)")]
    Lost(u64),
}

impl DaemonError {
    /// 2 for what the user must fix in the configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Config(_) | DaemonError::Store(_) => 2,
            DaemonError::Listen { .. }
            | DaemonError::Control { .. }
            | DaemonError::Io(_)
            | DaemonError::Lost(_) => 1,
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Before anything is touched: a device list that cannot be read is a
    // configuration error.
    let devices = Arc::new(Devices::load(&config)?);
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let mut registry = Registry::default();
    // Made private before the control socket, which may be made in it.
    writer::create_data_dir(&config.data_dir).map_err(|source| StoreError {
        dir: config.data_dir.clone(),
        source,
    })?;
    // The control socket first: a second daemon started by mistake on a live
    // one's folder stops here, before touching the folder.
    let control_socket = bind_control_socket(&config)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let rotate_requested = Arc::new(AtomicBool::new(false));
    let store = Store::open(
        StoreSettings::new(&config),
        Arc::clone(&registry.writer),
        Arc::clone(&stopping),
        Arc::clone(&rotate_requested),
    )?;
    info!("writing messages to {}", store.path().display());
    // Before the writer adds a line: where this run's lines start.
    let boundary = Boundary::capture(&config.data_dir);
    log_descriptor_room(&config);
    let listeners = bind_all(&config.listen)?;
    let listening: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let mut udp_listeners = bind_udp(&config.listen_udp, config.workers)?;
    registry.udp = !config.listen_udp.is_empty();
    // One generator for TCP connections and UDP sessions: no ident twice.
    let idents = IdentGenerator::new();

    let (store_sender, store_receiver) = crossbeam_channel::bounded(STORE_QUEUE);
    let pool = BufferPool::new();
    let writer_pool = pool.clone();
    let writer = std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || store.run(store_receiver, writer_pool))?;
    let journal_settings = JournalSettings {
        channel_id: config.channel_id,
        protocol_id: config.protocol_id,
        store: config.store,
        max_payload: config.max_payload,
    };
    let settings = Arc::new(Settings::with_devices(&config, Arc::clone(&devices)));
    let addresses = initial_addresses(&config);
    let admission = Admission::new(&config);

    let mut handles = Vec::new();
    let mut worker_threads = Vec::new();
    for id in 0..config.workers {
        let counters = Arc::new(Counters::default());
        registry.workers.push(Arc::clone(&counters));
        let udp = udp_listeners.pop().map(|listeners| UdpSetup {
            listeners,
            admission: Arc::clone(&admission),
            idents: idents.clone(),
        });
        let setup = WorkerSetup {
            id,
            settings: Arc::clone(&settings),
            journal: Journal::new(
                store_sender.clone(),
                pool.clone(),
                journal_settings,
                Arc::clone(&counters),
            ),
            addresses: addresses.clone(),
            counters,
        };
        let (handle, thread) = Worker::spawn_with_udp(setup, udp)?;
        handles.push(handle);
        worker_threads.push(thread);
    }
    devices.set_workers(handles.clone());
    start_resolvers(&config, &settings, &addresses, &handles)?;
    let catch_up = catchup::start(
        CatchUpSetup {
            config: &config,
            listening,
            boundary,
            stats: Arc::clone(&registry.catch_up),
        },
        || {
            let counters = Arc::new(Counters::default());
            registry.catch_up_journals.push(Arc::clone(&counters));
            Journal::new(
                store_sender.clone(),
                pool.clone(),
                journal_settings,
                counters,
            )
        },
    )?;
    let (control, control_thread) = Control::spawn(ControlSetup {
        socket: control_socket,
        workers: handles.clone(),
        registry: registry.clone(),
        store: store_sender.clone(),
        targets: config.targets.iter().map(|t| t.number).collect(),
        metrics: config
            .metrics_file
            .clone()
            .map(|path| (path, config.metrics_interval)),
    })?;
    let (acceptor, acceptor_thread) = Acceptor::spawn(AcceptorSetup {
        listeners,
        workers: handles.clone(),
        admission,
        counters: Arc::clone(&registry.acceptor),
        idents,
    })?;
    devices.log_start();
    info!(
        "proxy-channel {} running: {}, {}, store {}",
        env!("CARGO_PKG_VERSION"),
        counted(config.workers, "worker"),
        counted(config.targets.len(), "target"),
        if config.store { "on" } else { "off" }
    );

    for signal in signals.forever() {
        if signal == SIGHUP {
            info!("SIGHUP: rotating the message file");
            // Never wait here (a writer stuck on a full disk would keep
            // SIGTERM from being handled): the flag is the request, the
            // command only wakes the writer. A full queue means the writer
            // loops soon anyway and sees the flag.
            rotate_requested.store(true, Ordering::SeqCst);
            let _ = store_sender.try_send(StoreCommand::Rotate);
            devices.reload();
        } else {
            info!("signal {signal}: shutting down");
            break;
        }
    }

    stopping.store(true, Ordering::SeqCst);
    catch_up.stop();
    acceptor.stop();
    join("acceptor", acceptor_thread);
    for handle in &handles {
        handle.send(Command::Shutdown);
    }
    for thread in worker_threads {
        join("worker", thread);
    }
    catch_up.join();
    control.stop();
    join("control", control_thread);
    drop(handles);
    drop(store_sender);
    let lost = writer.join().unwrap_or_else(|_| {
        error!("the writer thread panicked");
        0
    });
    info!("stopped");
    match lost {
        0 => Ok(()),
        lost => Err(DaemonError::Lost(lost)),
    }
}

fn bind_control_socket(
    config: &Config,
) -> Result<Option<(PathBuf, mio::net::UnixListener)>, DaemonError> {
    let Some(path) = &config.control_socket else {
        return Ok(None);
    };
    let listener = control_server::bind(path).map_err(|source| DaemonError::Control {
        path: path.clone(),
        source,
    })?;
    info!("control socket on {}", path.display());
    Ok(Some((path.clone(), listener)))
}

/// "1 target", "2 targets", "0 targets": a count and its noun for the log.
fn counted(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

fn log_descriptor_room(config: &Config) {
    match limits::raise_open_file_limit() {
        Ok(descriptors) => info!(
            "open-file limit {descriptors}: room for about {} devices with {} each",
            limits::devices_allowed(descriptors, config.targets.len()),
            counted(config.targets.len(), "target")
        ),
        Err(e) => warn!("cannot raise the open-file limit: {e}"),
    }
}

fn bind_all(addresses: &[SocketAddr]) -> Result<Vec<TcpListener>, DaemonError> {
    let mut listeners = Vec::new();
    for &address in addresses {
        let listener = listen(address).map_err(|source| DaemonError::Listen { address, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| DaemonError::Listen { address, source })?;
        info!("listening on {local}");
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Every worker's socket on each UDP address, as one list per worker (the
/// last worker's first, to be popped); no list at all without addresses.
fn bind_udp(
    addresses: &[SocketAddr],
    workers: usize,
) -> Result<Vec<Vec<udp::Listener>>, DaemonError> {
    if addresses.is_empty() {
        return Ok(Vec::new());
    }
    let mut per_worker: Vec<Vec<udp::Listener>> = (0..workers).map(|_| Vec::new()).collect();
    for &address in addresses {
        let group = udp::bind_group(address, workers)
            .map_err(|source| DaemonError::Listen { address, source })?;
        let local = group[0]
            .socket
            .local_addr()
            .map_err(|source| DaemonError::Listen { address, source })?;
        info!("listening for UDP datagrams on {local}");
        // The kernel reports twice the room it counts for data.
        let given = udp::wire::receive_buffer(&group[0]).unwrap_or(0) / 2;
        if given < udp::wire::RECEIVE_BUFFER {
            info!(
                "UDP {local}: receive buffers of {given} bytes, not the {} asked for (raise \
                 net.core.rmem_max so that bursts are not dropped)",
                udp::wire::RECEIVE_BUFFER
            );
        }
        for (worker, listener) in group.into_iter().enumerate() {
            per_worker[worker].push(listener);
        }
    }
    per_worker.reverse();
    Ok(per_worker)
}

/// A listening socket with a long accept queue: when a fleet reconnects at
/// once (after a network outage or a restart), a short queue drops SYNs and
/// devices wait seconds for their retransmits. The kernel caps the length
/// at net.core.somaxconn. An IPv6 address takes IPv6 only (as nginx does),
/// so that `0.0.0.0:5555,[::]:5555` can both be listened on.
fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(ACCEPT_QUEUE)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Each target's addresses at start; a name that does not resolve yet is
/// retried by its resolver.
fn initial_addresses(config: &Config) -> TargetAddresses {
    let mut addresses = TargetAddresses::default();
    for target in &config.targets {
        match resolver::resolve(&target.address) {
            Ok(found) => {
                if target.address.literal().is_none() {
                    info!(
                        "target {}: {} resolves to {found:?}",
                        target.number, target.address
                    );
                }
                addresses[usize::from(target.number - 1)] = found;
            }
            Err(e) => warn!(
                "target {}: cannot resolve {}: {e}; connections fail until it does",
                target.number, target.address
            ),
        }
    }
    addresses
}

fn start_resolvers(
    config: &Config,
    settings: &Settings,
    addresses: &TargetAddresses,
    workers: &[WorkerHandle],
) -> io::Result<()> {
    for target in &config.targets {
        let index = usize::from(target.number - 1);
        let Some(used) = settings.targets[index]
            .as_ref()
            .and_then(|s| s.used.clone())
        else {
            continue;
        };
        resolver::spawn(
            target.number,
            target.address.clone(),
            addresses[index].clone(),
            used,
            workers.to_vec(),
        )?;
    }
    Ok(())
}

fn join(name: &str, thread: JoinHandle<()>) {
    if thread.join().is_err() {
        error!("the {name} thread panicked");
    }
}
