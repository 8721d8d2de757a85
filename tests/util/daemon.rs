//! The daemon as a process: started on a free loopback port with its own
//! data folder, its stderr collected line by line, stopped when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{BIN, MessageLog, poll_until, run_ctl, secs};

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
    let mut command = daemon_command(vars);
    command.args(args);
    run_command_to_exit(
        command,
        &format!("proxy-channel {args:?} with {vars:?}"),
        timeout,
    )
}

/// Runs `command` (named `what` in failures) until it exits (killed after
/// `timeout`), collecting both outputs.
pub fn run_command_to_exit(mut command: Command, what: &str, timeout: Duration) -> Finished {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
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
            panic!("{what} did not exit within {timeout:?} ({status}); stderr:\n{stderr}");
        }
    };
    Finished {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Where a daemon keeps its messages: a temporary folder it owns, or a
/// folder the test owns (to restart on it, or a mount).
enum DataDir {
    Owned(tempfile::TempDir),
    Given(PathBuf),
}

impl DataDir {
    fn path(&self) -> &Path {
        match self {
            DataDir::Owned(dir) => dir.path(),
            DataDir::Given(path) => path,
        }
    }
}

/// The daemon, started on a free loopback port with its own data folder.
/// Dropping it kills the process.
pub struct Daemon {
    child: Child,
    addr: SocketAddr,
    dir: DataDir,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Starts the daemon with PROXY_LISTEN=127.0.0.1:0, a temporary
    /// PROXY_DATA_DIR, PROXY_CONTROL_SOCKET=off, then `vars` (which may
    /// override those), and waits for its "listening on" line.
    pub fn start(vars: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("temporary data folder");
        Daemon::spawn(DataDir::Owned(dir), vars, true)
    }

    /// Like [`Daemon::start`], with the data folder `dir`, which the test
    /// owns (the daemon may be started on it again).
    pub fn start_in(dir: &Path, vars: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(DataDir::Given(dir.to_path_buf()), vars, true)
    }

    /// Like [`Daemon::start`], with the control socket where it is by
    /// default: PROXY_CONTROL_SOCKET unset, so at
    /// [`Daemon::control_socket`].
    pub fn start_with_control(vars: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("temporary data folder");
        Daemon::spawn(DataDir::Owned(dir), vars, false)
    }

    fn spawn(dir: DataDir, vars: &[(&str, &str)], control_off: bool) -> Daemon {
        let data_dir = dir.path().to_str().expect("UTF-8 data path").to_string();
        let mut all = vec![
            ("PROXY_LISTEN", "127.0.0.1:0"),
            ("PROXY_DATA_DIR", data_dir.as_str()),
        ];
        if control_off {
            all.push(("PROXY_CONTROL_SOCKET", "off"));
        }
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

    /// The control socket's default place, `$PROXY_DATA_DIR/control.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// `proxy-channel ctl ARGS` on [`Daemon::control_socket`].
    pub fn ctl(&self, args: &[&str]) -> Finished {
        run_ctl(&self.control_socket(), args)
    }

    /// A fresh reader of the messages file.
    pub fn log(&self) -> MessageLog {
        MessageLog::new(self.messages_path())
    }

    /// The daemon's stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The daemon's log lines so far that contain `needle`.
    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        let lines = self.stderr.lock().unwrap();
        lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits until the daemon logged `count` lines containing `needle` and
    /// returns them; fails the test after `timeout`.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> Vec<String> {
        let held = poll_until(timeout, || self.log_lines_with(needle).len() >= count);
        assert!(
            held,
            "expected {count} log lines with {needle:?} within {timeout:?}, saw {}; stderr:\n{}",
            self.log_lines_with(needle).len(),
            self.stderr_lines().join("\n")
        );
        self.log_lines_with(needle)
    }

    /// The N of the daemon's last log line, `message writer stopped after
    /// N lines` (logged when it stopped).
    pub fn lines_written(&self) -> usize {
        let lines = self.log_lines_with("message writer stopped after ");
        let line = lines.last().unwrap_or_else(|| {
            panic!(
                "no \"message writer stopped\" line; stderr:\n{}",
                self.stderr_lines().join("\n")
            )
        });
        line.rsplit_once("after ")
            .and_then(|(_, rest)| rest.trim_end_matches(" lines").parse().ok())
            .unwrap_or_else(|| panic!("cannot read the count in {line:?}"))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits (10 s at most) for exit status 0.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "expected the daemon to exit 0 within 10 s of SIGTERM, saw {status:?}; stderr:\n{}",
            self.stderr_lines().join("\n")
        );
    }

    /// SIGKILL (`kill -9`), and waits for the process to be gone.
    pub fn kill_9(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.wait_exit(secs(10));
        assert!(status.is_some(), "the daemon outlived SIGKILL by 10 s");
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
        signal_child(self.pid(), signal);
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
/// Sends `signal` to a child process of the test.
pub fn signal_child(pid: u32, signal: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Sends a daemon started by hand SIGTERM and asserts it exits with
/// status 0 within 10 s; `stderr` gives its log for the failure message.
pub fn stop_child(child: &mut Child, stderr: impl Fn() -> Vec<String>) {
    signal_child(child.id(), libc::SIGTERM);
    let mut status = None;
    poll_until(secs(10), || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    assert!(
        status.is_some_and(|s| s.success()),
        "expected exit 0 within 10 s of SIGTERM, saw {status:?}; stderr:\n{}",
        stderr().join("\n")
    );
}

pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS line in /proc/{pid}/status"))
}
