//! A small tmpfs to fill up, for write-failure tests. It needs root (the
//! tests run as root, here and in CI); it is unmounted when dropped.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size mounted on a fresh temporary folder.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=`, e.g. "4m"); fails the
    /// test, saying why, if it cannot.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("a mount point");
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "cannot mount a tmpfs on {} (this test needs root): {}",
            dir.path().display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file of zeros at `name` until the tmpfs is full; returns
    /// its path and size. Bounded by the tmpfs's size.
    pub fn fill(&self, name: &str) -> (PathBuf, u64) {
        let path = self.path().join(name);
        let mut file = File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 16 * 1024];
        let mut written = 0u64;
        // 64 MiB at most: far more than the tmpfs of a test holds.
        for _ in 0..4096 {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("filling {} failed: {e}", path.display()),
            }
        }
        (path, written)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy, so that a file still open (a daemon that failed to stop)
        // does not keep the mount; a failure leaves a mount in /tmp only.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
