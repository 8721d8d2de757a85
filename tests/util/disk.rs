//! Disks for the store's tests: a small tmpfs to fill up (write failures)
//! and a slow disk (a throttled loop device). Both need root, so a test
//! using them starts with its `require` guard (`Need::Root`,
//! `Need::ThrottledLoopDevice`); both are unmounted when dropped.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Daemon, run_setup};

/// A tmpfs of a given size mounted on a fresh temporary folder.
pub struct Tmpfs {
    dir: tempfile::TempDir,
    /// Where a daemon on this disk gets its control socket: a full disk
    /// has no room for the socket file.
    elsewhere: tempfile::TempDir,
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
        let elsewhere = tempfile::tempdir().expect("a folder for the control socket");
        Tmpfs { dir, elsewhere }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A daemon writing its messages on this disk, its control socket at
    /// [`Tmpfs::control_socket`].
    pub fn start_daemon(&self) -> Daemon {
        let socket = self.control_socket();
        let socket = socket.to_str().expect("a UTF-8 temporary path");
        Daemon::start_in(self.path(), &[("PROXY_CONTROL_SOCKET", socket)])
    }

    /// The control socket of [`Tmpfs::start_daemon`]'s daemon, off this disk.
    pub fn control_socket(&self) -> PathBuf {
        self.elsewhere.path().join("control.sock")
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

/// Where cgroup v1 throttles writes to a block device for every task.
pub const WRITE_THROTTLE: &str = "/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device";

/// A slow disk: ext4 on a loop device whose writes the kernel throttles
/// (cgroup v1 blkio, for every task) to a given rate, like an SD card.
/// Needs root; unmounted and detached when dropped.
pub struct SlowDisk {
    mount_point: tempfile::TempDir,
    /// Holds the loop device's backing file.
    _image_dir: tempfile::TempDir,
    device: String,
    /// `major:minor` of the loop device.
    numbers: String,
}

impl SlowDisk {
    /// A 256 MiB file system taking `bytes_per_sec` of writes; fails the
    /// test, saying why, if it cannot be made.
    pub fn mount(bytes_per_sec: u64) -> SlowDisk {
        let image_dir = tempfile::tempdir().expect("a folder for the image");
        let image = image_dir.path().join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(256 << 20))
            .expect("create the disk image");
        let device = run_setup("losetup", &["-f", "--show", &image.to_string_lossy()]);
        let mount_point = tempfile::tempdir().expect("a mount point");
        let disk = SlowDisk {
            numbers: device_numbers(&device),
            device,
            mount_point,
            _image_dir: image_dir,
        };
        // Everything initialised now, not by a background thread eating the
        // throttled bandwidth later.
        let no_lazy_init = "lazy_itable_init=0,lazy_journal_init=0";
        run_setup("mkfs.ext4", &["-q", "-E", no_lazy_init, &disk.device]);
        run_setup(
            "mount",
            &[&disk.device, &disk.mount_point.path().to_string_lossy()],
        );
        disk.throttle(bytes_per_sec);
        disk
    }

    pub fn path(&self) -> &Path {
        self.mount_point.path()
    }

    /// 0 lifts the limit.
    fn throttle(&self, bytes_per_sec: u64) {
        let rule = format!("{} {bytes_per_sec}", self.numbers);
        if let Err(e) = std::fs::write(WRITE_THROTTLE, &rule) {
            if bytes_per_sec > 0 {
                panic!(
                    "cannot throttle {} ({WRITE_THROTTLE}: {e}; this test needs cgroup v1 blkio and root)",
                    self.device
                );
            }
        }
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        self.throttle(0);
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mount_point.path())
            .status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// `major:minor` of a block device.
fn device_numbers(device: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device)
        .unwrap_or_else(|e| panic!("{device}: {e}"))
        .rdev();
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}
