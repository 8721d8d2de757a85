//! Makes rotated message files durable without holding up the writer.
//!
//! At rotation the writer renames the current file, opens a new one and
//! hands the old one here: this thread fsyncs it, then the folder (so the
//! new name and the new file are on disk too). Syncing a whole rotated
//! file takes as long as the disk needs for it (seconds on an SD card), and
//! the writer meanwhile goes on writing the new file, so the channel does not
//! fill up and hold every worker back. One file waits at most while
//! another is synced; past that the writer waits, at the disk's pace.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use log::{info, warn};

/// A shutdown that waits longer than this for syncs says so.
const SLOW_FINISH: Duration = Duration::from_secs(1);

/// A file to make durable, and what to call it in the log.
struct Job {
    file: File,
    name: String,
}

impl Job {
    fn run(&self, dir: &Path) {
        // A file deleted meanwhile (retention, an operator) needs no sync.
        if self.file.metadata().is_ok_and(|m| m.nlink() == 0) {
            return;
        }
        sync_file(&self.file, &self.name);
        sync_dir(dir);
    }
}

pub struct Syncer {
    dir: PathBuf,
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread for files of the folder `dir`.
    pub fn start(dir: PathBuf) -> std::io::Result<Syncer> {
        let (jobs, receiver) = bounded::<Job>(1);
        let thread_dir = dir.clone();
        let thread = std::thread::Builder::new()
            .name("syncer".into())
            .spawn(move || {
                for job in receiver {
                    job.run(&thread_dir);
                }
            })?;
        Ok(Syncer {
            dir,
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Fsyncs `file` (called `name` in the log) and then the folder, on
    /// the thread.
    pub fn sync(&mut self, file: File, name: String) {
        let job = Job { file, name };
        let job = match &self.jobs {
            Some(jobs) => match jobs.send(job) {
                Ok(()) => return,
                // The thread is gone (it cannot panic on its own).
                Err(failed) => failed.into_inner(),
            },
            None => job,
        };
        job.run(&self.dir);
    }

    /// Waits until every file handed over is synced; later files are
    /// synced on the caller's thread.
    pub fn finish(&mut self) {
        self.jobs = None;
        let Some(thread) = self.thread.take() else {
            return;
        };
        let started = Instant::now();
        if thread.join().is_err() {
            warn!("the file sync thread failed");
        }
        let waited = started.elapsed();
        if waited >= SLOW_FINISH {
            info!(
                "waited {:.1} s for rotated files to reach the disk",
                waited.as_secs_f64()
            );
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.finish();
    }
}

pub fn sync_file(file: &File, name: &str) {
    if let Err(e) = file.sync_all() {
        warn!("cannot sync {name}: {e}");
    }
}

pub fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!("cannot sync folder {}: {e}", dir.display());
    }
}
