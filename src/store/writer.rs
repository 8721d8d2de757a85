//! The file-writer thread: JSON lines into `messages.jsonl`, rotation,
//! retention and durability.
//!
//! It drains the bounded channel and writes the batches of whole lines it
//! took (with one vectored write, no copying) whenever the channel is empty
//! (so data reaches the file well within a second) or a megabyte waits. A write
//! that fails (disk full, folder gone) is logged once per kind and retried
//! with backoff while the channel fills up and holds the workers back:
//! nothing that entered the channel is dropped. A write that fails partway
//! through a line (a disk that fills up) never leaves that cut line
//! behind: its written part is cut off the file again (`set_len`) and the
//! whole line written at the next try, so every file ends on a whole line,
//! and a new file (after the old one was moved or removed) starts on one. Rotation and shutdown fsync
//! the file and the folder; a rotated file is synced by `store/syncer.rs`
//! on a thread of its own while the writer goes on with the new one. If
//! `messages.jsonl` is moved or deleted under it (logrotate), the writer
//! notices before its next write and starts a new one. SIGHUP sets a flag
//! that the writer looks at each time round its loop (the signal thread
//! never waits for the writer, which may be stuck on a full disk). One
//! exception to "nothing is dropped": when the daemon is stopping and writes have failed
//! for SHUTDOWN_GRACE, the rest is given up, logged and counted, so that a
//! full disk cannot keep the daemon from exiting. A lock file keeps a
//! second daemon out of the folder.
//!
//! Message files hold device payloads: a folder the writer creates is 0750
//! and a message file 0640, whatever the umask. An existing folder or file
//! keeps its mode (the operator's choice), with a warning for a folder
//! every local user can enter or read.

use std::collections::{HashSet, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{error, info, warn};

use crate::config::Config;
use crate::control::stats::{self, Counters};
use crate::store::journal::{BATCH_AGE, BufferPool, StoreCommand};
use crate::store::rotation::{self, CURRENT};

use super::syncer::{Syncer, sync_dir, sync_file};

/// Write once this much is buffered, even if more is waiting.
const WRITE_CHUNK: usize = 1 << 20;
/// How long after SIGHUP the file is rotated: a worker hands its batch
/// over once it is [`BATCH_AGE`] old, so the lines of what happened before
/// the signal land in the file it rotates, not in the next one.
const ROTATE_SETTLE: Duration = BATCH_AGE.saturating_mul(2);
/// How often the writer looks at the file and the folder when idle.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// While stopping, how long failing writes are retried before the rest is
/// given up (a full disk must not keep the daemon from exiting forever).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Held locked by the daemon that writes in the folder.
const LOCK_FILE: &str = ".lock";
/// A data folder the writer creates: for the daemon's user and group only.
const FOLDER_MODE: u32 = 0o750;
/// A message file the writer creates.
const FILE_MODE: u32 = 0o640;

/// The data folder cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("PROXY_DATA_DIR={:?}: expected a folder the daemon can create and write in ({source})", dir.display().to_string())]
pub struct StoreError {
    pub dir: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Where and how the writer keeps its files. A `None` limit is no limit
/// (the SPEC's `0`): never a reason to rotate or to delete.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub dir: PathBuf,
    pub rotate_size: u64,
    /// `None`: no rotation by age.
    pub rotate_interval: Option<Duration>,
    /// `None`: rotated files are not deleted for their number.
    pub retain_files: Option<usize>,
    /// `None`: rotated files are not deleted for their age.
    pub retain_age: Option<Duration>,
}

impl StoreSettings {
    pub fn new(config: &Config) -> StoreSettings {
        StoreSettings {
            dir: config.data_dir.clone(),
            rotate_size: config.rotate_size,
            rotate_interval: config.rotate_interval,
            retain_files: config.retain_files,
            retain_age: config.retain_age,
        }
    }
}

/// The open current file and what is known about it.
struct Current {
    file: File,
    /// Device and inode, to notice the file being moved away.
    identity: (u64, u64),
    size: u64,
    opened_at: SystemTime,
}

pub struct Store {
    settings: StoreSettings,
    path: PathBuf,
    current: Current,
    /// Batches not written yet, whole lines each; the first may be
    /// partly written already.
    pending: Pending,
    /// Error kinds already logged since the last successful write.
    reported: HashSet<io::ErrorKind>,
    /// A cut line was removed since the last successful write (and logged).
    cut_reported: bool,
    rotate_retry_at: Option<Instant>,
    /// Set by the daemon when it starts to stop.
    stopping: Arc<AtomicBool>,
    /// Set by the daemon on SIGHUP; the writer clears it and rotates
    /// [`ROTATE_SETTLE`] later, at `rotate_at`.
    rotate_requested: Arc<AtomicBool>,
    rotate_at: Option<Instant>,
    stopping_seen: Option<Instant>,
    lost: u64,
    /// The folder's lock, held for the writer's life.
    _lock: File,
    /// Lines in `pending`.
    pending_lines: u64,
    lines_written: u64,
    counters: Arc<Counters>,
    syncer: Syncer,
}

impl Store {
    /// Creates the folder if needed and opens the current file for append.
    pub fn open(
        settings: StoreSettings,
        counters: Arc<Counters>,
        stopping: Arc<AtomicBool>,
        rotate_requested: Arc<AtomicBool>,
    ) -> Result<Store, StoreError> {
        let fail = |source| StoreError {
            dir: settings.dir.clone(),
            source,
        };
        create_data_dir(&settings.dir).map_err(fail)?;
        let lock = lock_folder(&settings.dir).map_err(fail)?;
        warn_if_open_to_everyone(&settings.dir);
        let path = settings.dir.join(CURRENT);
        let current = open_current(&path).map_err(fail)?;
        let syncer = Syncer::start(settings.dir.clone()).map_err(fail)?;
        let mut store = Store {
            settings,
            path,
            current,
            pending: Pending::default(),
            reported: HashSet::new(),
            cut_reported: false,
            rotate_retry_at: None,
            stopping,
            rotate_requested,
            rotate_at: None,
            stopping_seen: None,
            lost: 0,
            _lock: lock,
            pending_lines: 0,
            lines_written: 0,
            counters,
            syncer,
        };
        store.apply_retention();
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer loop; returns once every sender is gone and all is
    /// synced, with the number of messages that could not be written (only
    /// ever above 0 when writes kept failing while the daemon was stopping).
    /// Written batches' buffers go back to the journals through `pool`.
    pub fn run(mut self, receiver: Receiver<StoreCommand>, pool: BufferPool) -> u64 {
        self.pending.pool = Some(pool);
        let mut last_housekeeping = Instant::now();
        loop {
            let wait = self.rotate_at.map_or(HOUSEKEEPING_EVERY, |at| {
                at.saturating_duration_since(Instant::now())
            });
            match receiver.recv_timeout(wait) {
                Ok(command) => self.apply(command),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while self.pending.bytes < WRITE_CHUNK {
                match receiver.try_recv() {
                    Ok(command) => self.apply(command),
                    Err(_) => break,
                }
            }
            self.write_pending();
            self.rotate_when_asked();
            self.rotate_if_due();
            if last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
                last_housekeeping = Instant::now();
                self.follow_moved_file();
                self.apply_retention();
            }
        }
        self.write_pending();
        if self.rotate_at.take().is_some() {
            self.rotate("SIGHUP");
        }
        self.syncer.finish();
        self.sync_current();
        info!("message writer stopped after {} lines", self.lines_written);
        self.lost
    }

    fn apply(&mut self, command: StoreCommand) {
        match command {
            StoreCommand::Write(batch) => {
                self.pending.push(batch.lines);
                self.pending_lines += batch.count as u64;
            }
            // Only a wake-up: the loop looks at `rotate_requested`.
            StoreCommand::Rotate => {}
        }
    }

    /// Writes the whole buffer, retrying with backoff until it is done.
    fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // Lines written into a file that was deleted would be lost.
        self.follow_moved_file();
        let mut backoff = RETRY_FIRST;
        while !self.pending.is_empty() {
            let error = match self.pending.write_to(&mut self.current.file) {
                Ok(0) => io::ErrorKind::WriteZero.into(),
                Ok(n) => {
                    self.current.size += n as u64;
                    // Writing again once a whole line is: a write cut short
                    // by a full disk succeeds in part before it fails.
                    if !self.reported.is_empty() && self.pending.cut_len() == 0 {
                        self.reported.clear();
                        self.cut_reported = false;
                        info!("writing messages to {} again", self.path.display());
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            self.remove_cut_line();
            if self.out_of_grace() {
                self.give_up(&error);
                return;
            }
            self.write_failed(error, &mut backoff);
        }
        self.lines_written += self.pending_lines;
        stats::add(
            &self.counters.messages,
            std::mem::take(&mut self.pending_lines),
        );
    }

    /// After a failed write: cuts the part of a line the file got off it
    /// again, so that the file ends on a whole line, and takes that part
    /// back to be written with the rest of its line. False if the file
    /// could not be cut (the part then stays pending as written).
    fn remove_cut_line(&mut self) -> bool {
        let cut = self.pending.cut_len();
        if cut == 0 {
            return true;
        }
        let whole = self.current.size - cut as u64;
        if let Err(e) = self.current.file.set_len(whole) {
            error!(
                "cannot remove the {cut} bytes of a line cut short by the failed write from {}: {e}",
                self.path.display()
            );
            return false;
        }
        self.current.size = whole;
        self.pending.unwrite(cut);
        if !self.cut_reported {
            self.cut_reported = true;
            warn!(
                "removed the {cut} bytes of a line cut short by the failed write from {}; \
                 the line is written again",
                self.path.display()
            );
        }
        true
    }

    /// Whether the daemon is stopping and writes have failed for longer
    /// than SHUTDOWN_GRACE since: then waiting on would never end.
    fn out_of_grace(&mut self) -> bool {
        if !self.stopping.load(Ordering::SeqCst) {
            return false;
        }
        let since = *self.stopping_seen.get_or_insert_with(Instant::now);
        since.elapsed() >= SHUTDOWN_GRACE
    }

    /// Drops what cannot be written at shutdown, and says so.
    fn give_up(&mut self, error: &io::Error) {
        error!(
            "stopping: {} messages could not be written to {}: {error}",
            self.pending_lines,
            self.path.display()
        );
        self.lost += std::mem::take(&mut self.pending_lines);
        self.pending.clear();
    }

    fn write_failed(&mut self, error: io::Error, backoff: &mut Duration) {
        stats::add(&self.counters.write_errors, 1);
        if self.reported.insert(error.kind()) {
            error!(
                "cannot write messages to {}: {error}; retrying, nothing is dropped",
                self.path.display()
            );
        }
        if self.stopping.load(Ordering::SeqCst) {
            // Check the shutdown grace often.
            *backoff = (*backoff).min(Duration::from_millis(200));
        }
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(RETRY_MAX);
        self.follow_moved_file();
    }

    /// SIGHUP: the rotation is set for [`ROTATE_SETTLE`] later, and done
    /// once that time has come (with what was written by then).
    fn rotate_when_asked(&mut self) {
        if self.rotate_requested.swap(false, Ordering::SeqCst) && self.rotate_at.is_none() {
            self.rotate_at = Some(Instant::now() + ROTATE_SETTLE);
        }
        if self.rotate_at.is_some_and(|at| Instant::now() >= at) {
            self.rotate_at = None;
            self.follow_moved_file();
            if self.current.size == 0 {
                info!(
                    "SIGHUP: {} is empty, nothing to rotate",
                    self.path.display()
                );
            }
            self.rotate("SIGHUP");
        }
    }

    fn rotate_if_due(&mut self) {
        if self.rotate_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let age = self.current.opened_at.elapsed().unwrap_or_default();
        let due = rotation::rotation_due(
            self.current.size,
            age,
            self.settings.rotate_size,
            self.settings.rotate_interval,
        );
        if let Some(why) = due {
            self.rotate(why);
        }
    }

    /// Renames the current file to its rotated name and starts a new one.
    fn rotate(&mut self, why: &str) {
        if self.current.size == 0 {
            return;
        }
        let now = SystemTime::now();
        let target = match rotation::next_rotated_path(&self.settings.dir, now) {
            Ok(Some(target)) => target,
            Ok(None) => {
                warn!(
                    "a thousand files were rotated this second; rotating in the next one ({why})"
                );
                self.rotate_retry_at = Some(Instant::now() + until_next_second(now));
                return;
            }
            Err(e) => {
                // Guessing the name could replace a file rotated this second.
                warn!(
                    "cannot list {} to name the rotated file: {e}; rotating in the next second ({why})",
                    self.settings.dir.display()
                );
                self.rotate_retry_at = Some(Instant::now() + until_next_second(now));
                return;
            }
        };
        let renamed = rotation::rename_no_replace(&self.path, &target)
            .and_then(|()| open_current(&self.path));
        match renamed {
            Ok(current) => {
                info!(
                    "rotated {} to {} ({why}, {} bytes)",
                    CURRENT,
                    target.display(),
                    self.current.size
                );
                let rotated = std::mem::replace(&mut self.current, current);
                self.syncer.sync(rotated.file, target.display().to_string());
                self.rotate_retry_at = None;
                self.apply_retention();
            }
            Err(e) => {
                warn!("cannot rotate {}: {e}; will retry", self.path.display());
                self.rotate_retry_at = Some(Instant::now() + Duration::from_secs(10));
            }
        }
    }

    /// If `messages.jsonl` is no longer our open file (moved or deleted),
    /// opens a new one at the path and has ours synced.
    fn follow_moved_file(&mut self) {
        let ours =
            fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.current.identity);
        if ours {
            return;
        }
        let reopened = create_data_dir(&self.settings.dir).and_then(|()| open_current(&self.path));
        match reopened {
            Ok(current) => {
                info!(
                    "{} was moved or removed; started a new one",
                    self.path.display()
                );
                if !self.remove_cut_line() {
                    // The new file starts on a whole line all the same.
                    let cut = self.pending.cut_len();
                    self.pending.unwrite(cut);
                    warn!("the file moved away keeps a cut line of {cut} bytes at its end");
                }
                let moved = std::mem::replace(&mut self.current, current);
                let name = format!("the file moved away from {}", self.path.display());
                self.syncer.sync(moved.file, name);
            }
            Err(e) => {
                if self.reported.insert(e.kind()) {
                    error!("cannot reopen {}: {e}", self.path.display());
                }
            }
        }
    }

    fn apply_retention(&mut self) {
        let files = match rotation::rotated_files(&self.settings.dir) {
            Ok(files) => files,
            Err(e) => {
                warn!("cannot list {}: {e}", self.settings.dir.display());
                return;
            }
        };
        let expired = rotation::expired(
            &files,
            self.settings.retain_files,
            self.settings.retain_age,
            SystemTime::now(),
        );
        for path in expired {
            match fs::remove_file(&path) {
                Ok(()) => info!("deleted {} (retention)", path.display()),
                Err(e) => warn!("cannot delete {}: {e}", path.display()),
            }
        }
    }

    fn sync_current(&self) {
        sync_file(&self.current.file, &self.path.display().to_string());
        sync_dir(&self.settings.dir);
    }
}

/// Batches waiting to be written, written without copying them together.
#[derive(Default)]
struct Pending {
    batches: VecDeque<Vec<u8>>,
    /// Where written batches' buffers go.
    pool: Option<BufferPool>,
    /// Bytes of the first batch already written.
    written: usize,
    /// Bytes not written yet.
    bytes: usize,
}

impl Pending {
    fn push(&mut self, batch: Vec<u8>) {
        self.bytes += batch.len();
        self.batches.push_back(batch);
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    fn clear(&mut self) {
        self.batches.clear();
        self.written = 0;
        self.bytes = 0;
    }

    /// One vectored write of (up to 64 of) the batches.
    fn write_to(&mut self, file: &mut File) -> io::Result<usize> {
        let slices: Vec<IoSlice<'_>> = self
            .batches
            .iter()
            .take(64)
            .enumerate()
            .map(|(i, batch)| {
                IoSlice::new(if i == 0 {
                    &batch[self.written..]
                } else {
                    batch
                })
            })
            .collect();
        let n = file.write_vectored(&slices)?;
        self.consume(n);
        Ok(n)
    }

    /// Bytes of the line written in part: the first batch's bytes written
    /// since its last newline (a batch holds whole lines, so a line never
    /// starts in an earlier batch).
    fn cut_len(&self) -> usize {
        let Some(front) = self.batches.front() else {
            return 0;
        };
        let written = &front[..self.written];
        match written.iter().rposition(|&byte| byte == b'\n') {
            Some(end) => written.len() - end - 1,
            None => written.len(),
        }
    }

    /// Takes back the last `n` bytes written of the first batch, to be
    /// written again.
    fn unwrite(&mut self, n: usize) {
        self.written -= n;
        self.bytes += n;
    }

    fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        while let Some(front) = self.batches.front() {
            let left = front.len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.written = 0;
            if let (Some(done), Some(pool)) = (self.batches.pop_front(), &self.pool) {
                pool.give(done);
            }
        }
    }
}

/// How long from `now` until the next whole second.
fn until_next_second(now: SystemTime) -> Duration {
    let into = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    Duration::from_nanos(u64::from(1_000_000_000 - into))
}

/// Opens (or creates) the current file for append. A last line cut short
/// by a crash is ended with a newline, so the next line stays whole.
fn open_current(path: &Path) -> io::Result<Current> {
    let mut file = open_message_file(path)?;
    let metadata = file.metadata()?;
    warn_if_readable_by_everyone(path, &metadata);
    let mut size = metadata.len();
    if size > 0 {
        let mut last = [0u8];
        file.seek(SeekFrom::End(-1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            warn!(
                "the last line of {} was cut short (a crash?); it is kept and ended",
                path.display()
            );
            file.write_all(b"\n")?;
            size += 1;
        }
    }
    let opened_at = metadata.created().unwrap_or_else(|_| SystemTime::now());
    Ok(Current {
        file,
        identity: (metadata.dev(), metadata.ino()),
        size,
        opened_at,
    })
}

/// Opens the message file `path` for append (and read); one that does not
/// exist is created 0640, whatever the umask.
fn open_message_file(path: &Path) -> io::Result<File> {
    let mut existing = OpenOptions::new();
    existing.append(true).read(true);
    let mut new = existing.clone();
    new.create_new(true).mode(FILE_MODE);
    // A file removed between the two opens is created at the second round.
    for _ in 0..2 {
        match new.open(path) {
            Ok(file) => {
                file.set_permissions(Permissions::from_mode(FILE_MODE))?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        match existing.open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            opened => return opened,
        }
    }
    existing.create(true).mode(FILE_MODE).open(path)
}

/// Creates the data folder `dir`, and the folders above it that are
/// missing, 0750 whatever the umask. An existing folder is left as it is.
/// Public so that the daemon makes it before its control socket, which
/// may be made in it.
pub fn create_data_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(FOLDER_MODE)
        .create(dir)?;
    fs::set_permissions(dir, Permissions::from_mode(FOLDER_MODE))
}

/// Says so when a message file that was there before (created 0640 by
/// us otherwise) may be read by every local user: like an existing
/// folder, its mode is left as the operator set it.
fn warn_if_readable_by_everyone(path: &Path, metadata: &fs::Metadata) {
    let mode = metadata.mode() & 0o7777;
    if mode & 0o004 != 0 {
        warn!(
            "{} may be read by every local user (mode {mode:04o}), and it holds device \
             payloads: `chmod o-rwx` it unless that is meant",
            path.display()
        );
    }
}

/// Says so when every local user may enter or read the data folder.
fn warn_if_open_to_everyone(dir: &Path) {
    let Ok(metadata) = fs::metadata(dir) else {
        return;
    };
    let mode = metadata.mode() & 0o7777;
    if mode & 0o007 != 0 {
        warn!(
            "the data folder {} is open to every local user (mode {mode:04o}), and message \
             files hold device payloads: `chmod o-rwx` it unless that is meant",
            dir.display()
        );
    }
}

/// Takes the folder's lock file, so that two daemons never write one
/// folder (the second one stops at start).
fn lock_folder(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(FILE_MODE)
        .open(dir.join(LOCK_FILE))?;
    // SAFETY: flock on a descriptor we own; it is released when the file closes.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "another proxy-channel is writing in it",
            ));
        }
        return Err(error);
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_written_in_part_is_taken_back_whole() {
        let mut pending = Pending::default();
        pending.push(b"one\ntwo\n".to_vec());
        pending.push(b"three\n".to_vec());
        assert_eq!(pending.cut_len(), 0);
        pending.consume(6);
        assert_eq!((pending.cut_len(), pending.bytes), (2, 8));
        pending.unwrite(2);
        assert_eq!((pending.cut_len(), pending.bytes), (0, 10));
        // Into the second batch: its line started at its first byte.
        pending.consume(6);
        assert_eq!((pending.cut_len(), pending.bytes), (2, 4));
        pending.unwrite(2);
        pending.consume(6);
        assert!(pending.is_empty());
        assert_eq!(pending.cut_len(), 0);
    }
}
