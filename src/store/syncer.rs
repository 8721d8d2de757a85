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
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, bounded};
use log::warn;

/// A file to make durable, and its name for the log.
struct Job {
    file: File,
    path: PathBuf,
}

impl Job {
    fn run(&self, dir: &Path) {
        sync_file(&self.file, &self.path);
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

    /// Fsyncs `file` (named `path` now) and then the folder, on the thread.
    pub fn sync(&mut self, file: File, path: &Path) {
        let job = Job {
            file,
            path: path.to_path_buf(),
        };
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
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the file sync thread failed");
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.finish();
    }
}

pub fn sync_file(file: &File, path: &Path) {
    if let Err(e) = file.sync_all() {
        warn!("cannot sync {}: {e}", path.display());
    }
}

pub fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!("cannot sync folder {}: {e}", dir.display());
    }
}
