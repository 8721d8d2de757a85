//! The store's own capacity: the daemon's journal and file writer (the
//! library's code, exactly as the daemon runs it), fed 100-byte packets by
//! as many producer threads as the daemon has workers, with no sockets in
//! between. End to end, one message is one read from a device socket, so
//! how many messages a second reach the file through the daemon depends on
//! the syscalls around it (the store-100b cases); this case measures what
//! the store itself sustains. Every message produced must be in the files,
//! whole: a message short is a failure, not a figure.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use proxy_channel::control::stats::Counters;
use proxy_channel::net::side::Side;
use proxy_channel::store::journal::{BufferPool, Journal, JournalSettings, StoreCommand, Tags};
use proxy_channel::store::message::{Ident, Origin};
use proxy_channel::store::writer::{Store, StoreSettings};

use crate::scenario::Metric;
use crate::store;

const PAYLOAD: usize = 100;
/// Messages between two hand-overs of a batch, like one busy poll-loop
/// iteration of a worker.
const PER_ITERATION: usize = 256;

/// Runs `producers` threads for `window`, then checks the files in `dir`.
pub fn run(dir: &Path, producers: usize, window: Duration) -> Result<Vec<Metric>, String> {
    let writer = start_store(dir, 64 << 20)?;
    let started = Instant::now();
    let deadline = started + window;
    let threads: Vec<_> = (0..producers)
        .map(|p| {
            let journal = writer.journal();
            std::thread::spawn(move || produce(journal, p, deadline))
        })
        .collect();
    let mut produced = 0u64;
    for thread in threads {
        produced += thread.join().map_err(|_| "a producer panicked")?;
    }
    let lost = writer.finish()?;
    let elapsed = started.elapsed().as_secs_f64();
    let stored = store::scan(dir)?;
    if lost > 0
        || stored.device_messages != produced
        || stored.device_payload != produced * PAYLOAD as u64
    {
        return Err(format!(
            "produced {produced} messages, the files hold {} ({} payload bytes), {lost} lost",
            stored.device_messages, stored.device_payload
        ));
    }
    Ok(vec![
        ("store_capacity_msgs_per_s", produced as f64 / elapsed),
        ("file_mbs", stored.bytes as f64 / elapsed / 1e6),
    ])
}

/// Messages for the viewer to scan: this many bytes of files.
const VIEW_FOLDER_BYTES: u64 = 256 << 20;

/// Writes a folder of about 256 MB of messages (payloads of 20 to 600
/// bytes, 4 files) with the store, then times `proxy-channel view` over it:
/// a scan that selects nothing (`--json --ident` of no connection: reading
/// and parsing only), and the hex dump of everything to /dev/null.
pub fn view_scan(dir: &Path, binary: &Path) -> Result<Vec<Metric>, String> {
    let writer = start_store(dir, VIEW_FOLDER_BYTES / 4)?;
    let mut journal = writer.journal();
    let payload: Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut written = 0u64;
    let mut n = 0u64;
    while written < VIEW_FOLDER_BYTES {
        let origin = Origin {
            ident: Ident(n / 20),
            peer: ([10, 0, (n >> 8) as u8, n as u8], 40_000).into(),
        };
        let size = 20 + (n as usize * 37) % 581;
        journal.data(
            origin,
            Tags::default(),
            Side::Device,
            None,
            &payload[..size],
        );
        written += 200 + 2 * size as u64;
        n += 1;
        if n % 256 == 0 {
            journal.flush();
        }
    }
    journal.flush();
    drop(journal);
    writer.finish()?;
    let bytes = store::scan(dir)?.bytes as f64;
    let scan = time_view(binary, &["--json", "--ident", "ffffffffffffffff"], dir)?;
    let dump = time_view(binary, &["--no-color"], dir)?;
    Ok(vec![
        ("view_scan_mbs", bytes / scan / 1e6),
        ("view_dump_mbs", bytes / dump / 1e6),
    ])
}

/// Seconds `proxy-channel view ARGS DIR > /dev/null` takes.
fn time_view(binary: &Path, args: &[&str], dir: &Path) -> Result<f64, String> {
    let started = Instant::now();
    let status = std::process::Command::new(binary)
        .arg("view")
        .args(args)
        .arg(dir)
        .env("TZ", "UTC")
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    if !status.success() {
        return Err(format!("view {args:?} exited with {status}"));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The daemon's writer on `dir`, on a thread of its own, as the daemon
/// runs it.
struct Writer {
    sender: Sender<StoreCommand>,
    pool: BufferPool,
    /// Returns the number of messages it lost.
    thread: JoinHandle<u64>,
}

impl Writer {
    /// A journal in store mode, as a worker has.
    fn journal(&self) -> Journal {
        let settings = JournalSettings {
            channel_id: 1,
            protocol_id: 0,
            store: true,
            max_payload: 2 << 20,
        };
        Journal::new(
            self.sender.clone(),
            self.pool.clone(),
            settings,
            Arc::new(Counters::default()),
        )
    }

    /// Waits for everything handed over to be written.
    fn finish(self) -> Result<u64, String> {
        drop(self.sender);
        self.thread
            .join()
            .map_err(|_| "the writer panicked".to_string())
    }
}

fn start_store(dir: &Path, rotate_size: u64) -> Result<Writer, String> {
    let settings = StoreSettings {
        dir: dir.to_path_buf(),
        rotate_size,
        rotate_interval: Some(Duration::from_secs(3600)),
        retain_files: Some(10_000),
        retain_age: Some(Duration::from_secs(86_400)),
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let store = Store::open(settings, Arc::default(), stopping, Arc::default())
        .map_err(|e| e.to_string())?;
    let (sender, receiver) = crossbeam_channel::bounded(64);
    let pool = BufferPool::new();
    let writer_pool = pool.clone();
    let thread = std::thread::spawn(move || store.run(receiver, writer_pool));
    Ok(Writer {
        sender,
        pool,
        thread,
    })
}

/// Makes messages until the deadline; returns how many.
fn produce(mut journal: Journal, producer: usize, deadline: Instant) -> u64 {
    let mut payload = [0u8; PAYLOAD];
    let origin = Origin {
        ident: Ident(0x5eed_0000_0000_0000 | producer as u64),
        peer: ([10, 0, 0, 1], 40_000 + producer as u16).into(),
    };
    let mut made = 0u64;
    while Instant::now() < deadline {
        for _ in 0..PER_ITERATION {
            payload[..8].copy_from_slice(&made.to_le_bytes());
            journal.data(origin, Tags::default(), Side::Device, None, &payload);
            made += 1;
        }
        journal.flush();
    }
    made
}
