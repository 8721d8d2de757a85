//! The catch-up thread of one target: it reads the message files as they
//! are written (into the [`Index`]), delivers what target N missed one
//! device connection at a time, in order, and keeps the state file.
//!
//! One round: read what is new (a bounded number of lines, and nothing
//! while [`MAX_PENDING`] deliveries wait, which bounds the memory), try the
//! next delivery unless its pause is on, publish the counters, save the
//! state when it moved (at once after each completed delivery, else at
//! most once a second), and sleep a tenth of a second when there was
//! nothing to do. Failed attempts pause the next one, doubling from one
//! second to a minute; a target that cannot be reached is logged at most
//! once a minute.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::deliver::{self, Outcome, PAYLOAD_NOT_STORED};
use super::files::{Files, Pos};
use super::index::{Index, Key};
use super::lines::Tail;
use super::state::{self, Saved};
use super::stats::{CatchUpStats, TargetCounters};
use super::target::CatchUpTarget;
use super::{Boundary, CatchUpError};
use crate::store::journal::Journal;
use crate::units::format_duration;

/// Deliveries waiting before reading pauses until some are done.
pub const MAX_PENDING: usize = 100_000;
/// Lines read per round before a delivery gets its turn.
const LINES_PER_ROUND: usize = 20_000;
/// The pause when there is nothing to do.
const IDLE: Duration = Duration::from_millis(100);
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a target that cannot be reached is logged again.
const UNREACHABLE_LOG_EVERY: Duration = Duration::from_secs(60);
const SAVE_EVERY: Duration = Duration::from_secs(1);
const STATS_EVERY: Duration = Duration::from_millis(500);
/// How often reading the files is tried again after an error.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

pub struct Runner {
    target: CatchUpTarget,
    files: Files,
    tail: Option<Tail>,
    /// Where to open the tail again after a read error, and when.
    reopen: Option<(Pos, Instant)>,
    index: Index,
    journal: Journal,
    stats: Arc<CatchUpStats>,
    stop: Arc<AtomicBool>,
    state_path: PathBuf,
    /// Where runs of the daemon started (kept in the state file while at
    /// or after the scan start).
    boundaries: Vec<Pos>,
    retry: Retry,
    /// The scan start and last delivery last written to the state file.
    saved: Option<(Pos, Option<Key>)>,
    save_failed: bool,
    last_save: Instant,
    last_stats: Instant,
    /// The files have been read to their end once since the start.
    read_up: bool,
    /// Connections and bytes delivered since the queue was last empty.
    cleared: (u64, u64),
}

/// When the next attempt may be made, and how failures are logged.
struct Retry {
    at: Option<Instant>,
    pause: Duration,
    /// Failed connects since the last success, and when one was logged.
    failures: u64,
    logged_at: Option<Instant>,
}

impl Retry {
    fn new() -> Retry {
        Retry {
            at: None,
            pause: RETRY_FIRST,
            failures: 0,
            logged_at: None,
        }
    }
}

impl Runner {
    /// Reads the state file (or starts one) and opens the files where
    /// reading must start.
    pub fn new(
        target: CatchUpTarget,
        dir: PathBuf,
        boundary: &Boundary,
        journal: Journal,
        stats: Arc<CatchUpStats>,
        stop: Arc<AtomicBool>,
    ) -> Result<Runner, CatchUpError> {
        let state_path = state::path(&dir, target.number);
        let files = Files::open_dir(&dir).map_err(|source| CatchUpError::Folder {
            dir: dir.clone(),
            source,
        })?;
        let here = boundary.find(&files);
        let saved = state::load(&state_path).unwrap_or_else(|e| {
            log::error!(
                "target {}: {e}; catch-up starts again from now (what waited in it is not sent)",
                target.number
            );
            None
        });
        let (scan, done, mut boundaries) = match &saved {
            Some(saved) => resume(&target, &files, saved),
            None => {
                info!(
                    "target {}: catch-up switched on: what {} misses from now on is delivered later",
                    target.number, target.label
                );
                let at = here.unwrap_or(Pos { file: 0, offset: 0 });
                (at, Some(Key { end: at, start: at }), Vec::new())
            }
        };
        boundaries.extend(here);
        boundaries.sort();
        boundaries.dedup();
        let index = Index::new(
            target.number,
            target.label.clone(),
            target.header.clone(),
            done,
            boundaries.clone(),
        );
        stats.targets[usize::from(target.number)]
            .enabled
            .store(true, Ordering::Relaxed);
        let mut runner = Runner {
            target,
            files,
            tail: None,
            reopen: None,
            index,
            journal,
            stats,
            stop,
            state_path,
            boundaries,
            retry: Retry::new(),
            saved: None,
            save_failed: false,
            last_save: Instant::now(),
            last_stats: Instant::now(),
            read_up: false,
            cleared: (0, 0),
        };
        runner.open_tail(scan);
        runner.save();
        Ok(runner)
    }

    pub fn run(mut self) {
        lower_priority(self.target.number);
        while !self.stop.load(Ordering::SeqCst) {
            let read = self.read_files();
            let delivered = self.deliver_due();
            if self.last_stats.elapsed() >= STATS_EVERY {
                self.publish();
            }
            if self.last_save.elapsed() >= SAVE_EVERY {
                self.save();
            }
            if !read && !delivered {
                std::thread::sleep(self.idle_pause());
            }
        }
        self.save();
        self.publish();
        debug!("target {}: catch-up stopped", self.target.number);
    }

    /// Reads new lines into the index; true if there were any.
    fn read_files(&mut self) -> bool {
        if self.index.pending() >= MAX_PENDING {
            return false;
        }
        if self.tail.is_none() {
            match self.reopen {
                Some((at, when)) if when.elapsed() >= REOPEN_EVERY => self.open_tail(at),
                _ => return false,
            }
        }
        let Some(tail) = self.tail.as_mut() else {
            return false;
        };
        let mut read = 0;
        while read < LINES_PER_ROUND {
            match tail.advance(&mut self.files) {
                Ok(Some(pos)) => {
                    self.index.line(pos, tail.line());
                    read += 1;
                }
                Ok(None) => {
                    self.index.reached(tail.position());
                    if !self.read_up {
                        self.read_up = true;
                        let (connections, bytes) = self.index.backlog();
                        info!(
                            "target {}: catch-up read the message files up to now: \
                             {connections} missed connections ({bytes} bytes) to deliver",
                            self.target.number
                        );
                    }
                    break;
                }
                Err(e) => {
                    warn!(
                        "target {}: catch-up cannot read the message files: {e}; trying again",
                        self.target.number
                    );
                    self.reopen = Some((tail.position(), Instant::now()));
                    self.tail = None;
                    break;
                }
            }
        }
        // A live connection reached the target: it is back, no need to
        // wait out the pause of a failed connect.
        if self.index.take_target_up() && self.retry.failures > 0 {
            self.retry.at = None;
        }
        read > 0
    }

    /// Opens the files at `at`, or at the next file that is still there
    /// (what was in the deleted ones is lost, and logged).
    fn open_tail(&mut self, at: Pos) {
        let last = self.files.last().unwrap_or(at.file).max(at.file);
        for file in at.file..=last {
            let from = match file == at.file {
                true => at,
                false => Pos { file, offset: 0 },
            };
            match Tail::open(&mut self.files, from) {
                Ok(tail) => {
                    self.tail = Some(tail);
                    self.reopen = None;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => warn!(
                    "target {}: {} is gone (retention?): the catch-up backlog in it is lost",
                    self.target.number,
                    self.files.name(file)
                ),
                Err(e) => {
                    warn!(
                        "target {}: catch-up cannot open {}: {e}; trying again",
                        self.target.number,
                        self.files.name(file)
                    );
                    break;
                }
            }
        }
        self.reopen = Some((at, Instant::now()));
    }

    /// Attempts the next delivery if one waits and its pause is over;
    /// true if one was attempted.
    fn deliver_due(&mut self) -> bool {
        if self.retry.at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        let Some(delivery) = self.index.next_delivery() else {
            return false;
        };
        let (key, ident) = (delivery.key, delivery.ident);
        let outcome = deliver::deliver(
            &self.target,
            delivery,
            &mut self.files,
            &mut self.journal,
            &self.stop,
        );
        self.after(key, ident, outcome);
        self.publish();
        true
    }

    fn after(&mut self, key: Key, ident: u64, outcome: Outcome) {
        let number = self.target.number;
        let ident = format!("{ident:016x}");
        match outcome {
            Outcome::Completed {
                device_bytes,
                finish,
            } => {
                self.reached_again();
                self.counters().delivered(device_bytes);
                // Done in the state file before anything else can happen:
                // a completed delivery is never sent again.
                self.index.complete(key);
                self.save();
                let reason = finish.reason;
                finish.close(&self.target, &mut self.journal, &self.stop);
                if reason == PAYLOAD_NOT_STORED {
                    warn!(
                        "target {number}: catch-up of {ident} ended before a packet stored \
                         without its payload (over PROXY_MAX_PAYLOAD): it and the rest of the \
                         connection cannot be delivered"
                    );
                } else {
                    debug!("target {number}: caught up {ident} ({device_bytes} device bytes)");
                }
                self.cleared.0 += 1;
                self.cleared.1 += device_bytes;
                if self.index.pending() == 0 {
                    let (connections, bytes) = std::mem::take(&mut self.cleared);
                    info!(
                        "target {number}: catch-up backlog cleared: {connections} connections \
                         ({bytes} bytes) delivered"
                    );
                }
            }
            Outcome::CutShort(why) => {
                self.reached_again();
                let pause = self.pause_next();
                info!(
                    "target {number}: catch-up delivery of {ident} cut short ({why}); \
                     it is sent again in full in {}",
                    format_duration(pause)
                );
            }
            Outcome::Unreachable(why) => {
                let pause = self.pause_next();
                self.unreachable(&why, pause);
            }
            Outcome::Lost(why) => {
                warn!("target {number}: catch-up of {ident} is lost: {why}");
                self.index.complete(key);
                self.save();
            }
            Outcome::Stopped => {}
        }
    }

    /// Pauses the next attempt, longer each time; the pause.
    fn pause_next(&mut self) -> Duration {
        let pause = self.retry.pause;
        self.retry.at = Some(Instant::now() + pause);
        self.retry.pause = (pause * 2).min(RETRY_MAX);
        pause
    }

    fn unreachable(&mut self, why: &str, pause: Duration) {
        self.retry.failures += 1;
        let due = self
            .retry
            .logged_at
            .is_none_or(|at| at.elapsed() >= UNREACHABLE_LOG_EVERY);
        if !due {
            return;
        }
        self.retry.logged_at = Some(Instant::now());
        let (connections, bytes) = self.index.backlog();
        warn!(
            "target {}: catch-up cannot connect to {} ({why}, attempt {}): {connections} \
             missed connections ({bytes} bytes) wait; next attempt in {}",
            self.target.number,
            self.target.label,
            self.retry.failures,
            format_duration(pause)
        );
    }

    /// A connection was made: the pauses start over.
    fn reached_again(&mut self) {
        if self.retry.failures > 0 {
            info!(
                "target {}: catch-up connects to {} again (after {} failed attempts)",
                self.target.number, self.target.label, self.retry.failures
            );
        }
        self.retry = Retry::new();
    }

    fn idle_pause(&self) -> Duration {
        match (self.retry.at, self.index.pending()) {
            (Some(at), 1..) => at
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), IDLE),
            _ => IDLE,
        }
    }

    fn publish(&mut self) {
        let (connections, bytes) = self.index.backlog();
        self.counters().set_backlog(connections, bytes);
        self.last_stats = Instant::now();
    }

    fn counters(&self) -> &TargetCounters {
        &self.stats.targets[usize::from(self.target.number)]
    }

    /// Where reading stands (or will start again).
    fn read_position(&self) -> Option<Pos> {
        match (&self.tail, self.reopen) {
            (Some(tail), _) => Some(tail.position()),
            (None, Some((at, _))) => Some(at),
            (None, None) => None,
        }
    }

    /// Writes the state file if the scan start or the last delivery moved.
    fn save(&mut self) {
        self.last_save = Instant::now();
        let Some(read) = self.read_position() else {
            return;
        };
        let scan = self.index.scan_start(read);
        let done = self.index.done();
        if self.saved == Some((scan, done)) {
            return;
        }
        self.boundaries.retain(|boundary| *boundary >= scan);
        let Some(scan_saved) = state::save_pos(&self.files, scan) else {
            return;
        };
        let saved = Saved {
            version: state::VERSION,
            target: self.target.label.clone(),
            scan: scan_saved,
            done: done.and_then(|key| state::save_key(&self.files, key)),
            boundaries: self
                .boundaries
                .iter()
                .filter_map(|pos| state::save_pos(&self.files, *pos))
                .collect(),
        };
        match state::store(&self.state_path, &saved) {
            Ok(()) => {
                self.saved = Some((scan, done));
                self.save_failed = false;
            }
            Err(e) => {
                if !self.save_failed {
                    warn!(
                        "target {}: cannot write {}: {e}; a restart may repeat deliveries \
                         until it can",
                        self.target.number,
                        self.state_path.display()
                    );
                }
                self.save_failed = true;
            }
        }
    }
}

/// The scan start, last delivery and run starts of a saved state, in
/// today's files.
fn resume(target: &CatchUpTarget, files: &Files, saved: &Saved) -> (Pos, Option<Key>, Vec<Pos>) {
    let number = target.number;
    if saved.target != target.label {
        info!(
            "target {number} was {} and is now {}: catch-up goes on where it was, with the \
             messages of {}",
            saved.target, target.label, target.label
        );
    }
    let scan = state::find_pos(files, &saved.scan).unwrap_or_else(|| {
        warn!(
            "target {number}: {} is gone (retention?): the catch-up backlog in it and in older \
             files is lost",
            saved.scan.name
        );
        Pos { file: 0, offset: 0 }
    });
    // A last delivery whose file is gone is older than every file here.
    let done = saved.done.as_ref().and_then(|key| {
        let end = state::find_pos(files, &key.end)?;
        let start = state::find_pos(files, &key.start).unwrap_or(Pos { file: 0, offset: 0 });
        Some(Key { end, start })
    });
    let boundaries = saved
        .boundaries
        .iter()
        .filter_map(|pos| state::find_pos(files, pos))
        .collect();
    info!(
        "target {number}: catch-up goes on from {} at byte {}",
        files.name(scan.file),
        scan.offset
    );
    (scan, done, boundaries)
}

/// Catch-up yields the CPU to the traffic: its thread runs at nice 10.
fn lower_priority(number: u8) {
    // SAFETY: gettid and setpriority on the calling thread only change its
    // scheduling priority; no memory is involved.
    let rc = unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS as _, thread, 10)
    };
    if rc != 0 {
        debug!(
            "target {number}: catch-up cannot lower its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
