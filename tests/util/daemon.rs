//! The daemon as a process: started on a free loopback port with its own
//! data folder, its stderr collected line by line, stopped when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{BIN, MessageLog, poll_until, secs};

/// A `proxy-channel` command with no inherited `PROXY_*` variable, RUST_LOG
/// at info, and then `vars`.
pub fn daemon_command(vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PROXY_") {
            command.env_remove(&name);
        }
    }
    command.env("RUST_LOG", "info");
    for (name, value) in vars {
        command.env(name, value);
    }
    command
}

/// What a process that ran to its end printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` and `vars` until it exits (killed after
/// `timeout`), collecting both outputs.
pub fn run_to_exit(args: &[&str], vars: &[(&str, &str)], timeout: Duration) -> Finished {
    let mut child = daemon_command(vars)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start proxy-channel");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            // A read error only shortens what the assertions see.
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout pipe")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr pipe")));
    let mut status = None;
    poll_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    let status = match status {
        Some(status) => status,
        None => {
            // It is still running: stop it so that the pipes close.
            let _ = child.kill();
            let status = child.wait().expect("wait after kill");
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "proxy-channel {args:?} with {vars:?} did not exit within {timeout:?} \
                 ({status}); stderr:\n{stderr}"
            );
        }
    };
    Finished {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// The daemon, started on a free loopback port with its own data folder.
/// Dropping it kills the process.
pub struct Daemon {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Starts the daemon with PROXY_LISTEN=127.0.0.1:0, a temporary
    /// PROXY_DATA_DIR, PROXY_CONTROL_SOCKET=off, then `vars` (which may
    /// override those), and waits for its "listening on" line.
    pub fn start(vars: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("temporary data folder");
        let data_dir = dir.path().to_str().expect("UTF-8 temp path").to_string();
        let mut all = vec![
            ("PROXY_LISTEN", "127.0.0.1:0"),
            ("PROXY_DATA_DIR", data_dir.as_str()),
            ("PROXY_CONTROL_SOCKET", "off"),
        ];
        all.extend_from_slice(vars);
        let mut child = daemon_command(&all)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxy-channel");
        let pipe = child.stderr.take().expect("stderr pipe");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (found, listening) = mpsc::channel();
        let lines = Arc::clone(&stderr);
        let stderr_thread = thread::spawn(move || {
            // Ends when the daemon's stderr closes, i.e. when it exits.
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_address(&line) {
                    // The receiver is gone once the first address was taken.
                    let _ = found.send(addr);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut daemon = Daemon {
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
            dir,
            stderr,
            stderr_thread: Some(stderr_thread),
        };
        match listening.recv_timeout(secs(15)) {
            Ok(addr) => daemon.addr = addr,
            Err(_) => {
                let status = daemon.child.try_wait().ok().flatten();
                panic!(
                    "the daemon did not log \"listening on\" within 15 s (exit: {status:?}); \
                     vars {vars:?}; stderr:\n{}",
                    daemon.stderr_lines().join("\n")
                );
            }
        }
        daemon
    }

    /// Where devices connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn messages_path(&self) -> PathBuf {
        self.dir.path().join("messages.jsonl")
    }

    /// A fresh reader of the messages file.
    pub fn log(&self) -> MessageLog {
        MessageLog::new(self.messages_path())
    }

    /// The daemon's stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Fails the test if the daemon logged an error or panicked.
    pub fn assert_no_errors(&self) {
        let lines = self.stderr_lines();
        let bad: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
            .collect();
        assert!(
            bad.is_empty(),
            "expected no error in the daemon's log, saw: {bad:#?}"
        );
    }

    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Waits for the daemon to exit on its own; `None` if it did not within
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        poll_until(timeout, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        if status.is_some() {
            if let Some(thread) = self.stderr_thread.take() {
                thread.join().expect("stderr reader");
            }
        }
        status
    }

    pub fn vm_rss_kib(&self) -> u64 {
        vm_rss_kib(self.pid())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // Killing a child that exits at the same moment may fail; either
            // way it is gone after `wait`.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(thread) = self.stderr_thread.take() {
            let _ = thread.join();
        }
    }
}

/// The address of a `... listening on 127.0.0.1:45501` log line.
fn listening_address(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("] listening on ")?;
    rest.trim().parse().ok()
}

/// The resident memory of a process in KiB, from /proc/PID/status.
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS line in /proc/{pid}/status"))
}
