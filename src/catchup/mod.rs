//! Catch-up (PROXY_TARGETn_CATCH_UP): what a target missed while it was
//! down is delivered to it later, from the message files.
//!
//! A target is connected only when a device connection starts, so it gets
//! a prefix of that connection's bytes: its event 2 says how many
//! (`proxy.bytes.sent`, less its PROXY header). What it did not get in full
//! is delivered once the device connection has ended, on one new connection
//! to the target per device connection, in the order those connections
//! ended: the first device packet (the login) unless the missed part starts
//! with it, then every missed packet, read back from the files.
//!
//! One thread per catch-up target ([`runner`]), never a worker: it follows
//! the files like the viewer does ([`files`], [`lines`]), keeps an
//! [`index`] of offsets and counters (no payloads), delivers over a socket
//! of its own ([`deliver`], [`link`], [`source`]), writes its event 1 and
//! event 2 through a journal of its own, and remembers in `catchup-N.state`
//! ([`state`]) where it stands, so that a restart neither repeats a
//! completed delivery nor skips one. [`stats`] feeds `ctl stats` and the
//! metrics.
//!
//! Bounds: per open device connection a few hundred bytes; per missed
//! packet a few bytes, up to [`index::LIST_BUDGET`] per target (beyond it
//! deliveries find their packets by reading the files); reading pauses
//! while [`runner::MAX_PENDING`] deliveries wait; a delivery holds at most
//! one batch of payload (PROXY_TARGET_BUFFER, at most 256 KiB) plus one
//! packet.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, warn};

use crate::config::Config;
use crate::store::journal::Journal;
use crate::store::rotation::CURRENT;

pub mod deliver;
pub mod files;
pub mod index;
pub mod lines;
pub mod link;
pub mod packets;
pub mod runner;
pub mod source;
pub mod state;
pub mod stats;
pub mod target;

use files::{FileRef, Files, Pos};
use runner::Runner;
use stats::CatchUpStats;
use target::CatchUpTarget;

/// How long stopping waits for the catch-up threads (each notices a stop
/// within a tenth of a second, unless the message writer holds it up).
const JOIN_WAIT: Duration = Duration::from_secs(2);

/// Why catch-up cannot run.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error("cannot list the message files in {dir}: {source}")]
    Folder { dir: PathBuf, source: io::Error },
}

/// Where this run of the daemon starts writing: the end of
/// `messages.jsonl` before any of its lines. Connections still open there
/// in the files were cut by a crash. Taken before the writer starts.
#[derive(Debug, Clone)]
pub struct Boundary {
    file: Option<FileRef>,
    offset: u64,
}

impl Boundary {
    pub fn capture(dir: &Path) -> Boundary {
        let path = dir.join(CURRENT);
        let file = files::identify(&path).ok();
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Boundary { file, offset }
    }

    fn find(&self, files: &Files) -> Option<Pos> {
        let file = files.find(self.file.as_ref()?)?;
        Some(Pos {
            file,
            offset: self.offset,
        })
    }
}

/// What catch-up starts with.
pub struct CatchUpSetup<'a> {
    pub config: &'a Config,
    /// The addresses the daemon listens on, as bound.
    pub listening: Vec<SocketAddr>,
    pub boundary: Boundary,
    pub stats: Arc<CatchUpStats>,
}

/// The running catch-up threads.
pub struct CatchUpHandle {
    stop: Arc<AtomicBool>,
    threads: Vec<(u8, JoinHandle<()>)>,
}

/// Starts one thread per catch-up target; `journal` makes each its
/// journal.
pub fn start(
    setup: CatchUpSetup<'_>,
    mut journal: impl FnMut() -> Journal,
) -> io::Result<CatchUpHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for target in CatchUpTarget::all(setup.config, &setup.listening) {
        let number = target.number;
        let dir = setup.config.data_dir.clone();
        let boundary = setup.boundary.clone();
        let journal = journal();
        let stats = Arc::clone(&setup.stats);
        let stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("catchup-{number}"))
            .spawn(
                move || match Runner::new(target, dir, &boundary, journal, stats, stop) {
                    Ok(runner) => runner.run(),
                    Err(e) => error!("target {number}: catch-up cannot run: {e}"),
                },
            )?;
        threads.push((number, thread));
    }
    Ok(CatchUpHandle { stop, threads })
}

impl CatchUpHandle {
    /// Asks every catch-up thread to stop (a delivery under way ends with
    /// reason `shutdown` and is sent again after the restart).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for the threads, up to JOIN_WAIT in all.
    pub fn join(self) {
        self.stop();
        let deadline = Instant::now() + JOIN_WAIT;
        for (number, thread) in self.threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !thread.is_finished() {
                warn!("target {number}: catch-up did not stop in time");
                continue;
            }
            if thread.join().is_err() {
                error!("target {number}: the catch-up thread panicked");
            }
        }
    }
}
