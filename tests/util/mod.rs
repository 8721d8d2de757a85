//! Shared helpers of the integration tests: the real `proxy-channel` binary
//! on a free loopback port, scriptable target servers, device clients with
//! deadlines, and an incremental reader of the messages file.
//!
//! Invariants every helper keeps: each wait is bounded in time and in
//! iterations, all traffic stays on 127.0.0.1, and every thread or process a
//! helper starts is stopped when its owner is dropped. Each test starts its
//! own daemon with its own temporary data folder, so tests run in parallel.
#![allow(dead_code)] // each test file uses its own subset of the helpers

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::Value;

/// The daemon binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_proxy-channel");

/// How often conditions are polled.
const POLL_EVERY: Duration = Duration::from_millis(10);
/// Socket reads in helper threads wake up this often to look at deadlines
/// and stop flags.
const READ_TICK: Duration = Duration::from_millis(50);

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------- waiting

/// Polls `condition` every 10 ms until it holds or `timeout` has passed;
/// returns whether it held. Bounded in rounds as well as in time.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let rounds = timeout.as_millis() / POLL_EVERY.as_millis() + 2;
    for _ in 0..rounds {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_EVERY);
    }
    condition()
}

/// Like [`poll_until`], but a timeout fails the test, naming `what`.
pub fn wait_until(timeout: Duration, what: &str, condition: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, condition),
        "timed out after {timeout:?} waiting for {what}"
    );
}

// ---------------------------------------------------------------- bytes

/// `len` reproducible random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut bytes = vec![0; len];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// Compares two byte streams and, when they differ, says where and how,
/// without printing megabytes.
pub fn assert_same_bytes(what: &str, expected: &[u8], seen: &[u8]) {
    if expected == seen {
        return;
    }
    let first_difference = expected
        .iter()
        .zip(seen)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(seen.len()));
    let around = |bytes: &[u8]| {
        let end = (first_difference + 16).min(bytes.len());
        hex::encode(&bytes[first_difference.min(end)..end])
    };
    panic!(
        "{what}: expected {} bytes, saw {} bytes; first difference at offset {first_difference} \
         (expected {}.., saw {}..)",
        expected.len(),
        seen.len(),
        around(expected),
        around(seen)
    );
}

// ---------------------------------------------------------------- socket options

fn set_int_option(fd: i32, level: i32, name: i32, value: i32) {
    // SAFETY: `fd` is an open socket owned by the caller and the option value
    // is a plain c_int whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast::<libc::c_void>(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt({level}, {name}, {value}) failed");
}

/// Caps a socket's kernel receive buffer (and turns off its autotuning), so
/// that a target which does not read fills up after a few KiB, not after the
/// tens of MiB Linux may otherwise grant. Set on a listener, accepted
/// sockets inherit it.
pub fn small_receive_buffer(fd: &impl AsRawFd) {
    set_int_option(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 16 * 1024);
}

/// A loopback port that is bound but not listening: connecting to it is
/// refused, and as long as this value lives no other socket (another test's
/// listener) can take the port. Closed on drop.
pub struct RefusedPort {
    _socket: OwnedFd,
    addr: SocketAddr,
}

impl RefusedPort {
    pub fn new() -> RefusedPort {
        // SAFETY: plain socket(2)/bind(2)/getsockname(2) calls on a socket we
        // own; the sockaddr structs are initialised and their sizes passed.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket() failed: {}", io::Error::last_os_error());
            let socket = OwnedFd::from_raw_fd(fd);
            let mut address: libc::sockaddr_in = std::mem::zeroed();
            address.sin_family = libc::AF_INET as libc::sa_family_t;
            address.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let mut length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let raw = (&mut address as *mut libc::sockaddr_in).cast::<libc::sockaddr>();
            assert_eq!(
                libc::bind(fd, raw, length),
                0,
                "bind() failed: {}",
                io::Error::last_os_error()
            );
            assert_eq!(
                libc::getsockname(fd, raw, &mut length),
                0,
                "getsockname() failed: {}",
                io::Error::last_os_error()
            );
            let port = u16::from_be(address.sin_port);
            RefusedPort {
                _socket: socket,
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            }
        }
    }

    /// The `host:port` to configure as a target.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }
}

impl Default for RefusedPort {
    fn default() -> Self {
        RefusedPort::new()
    }
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

// ---------------------------------------------------------------- the daemon

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

// ---------------------------------------------------------------- messages

/// Reads `messages.jsonl` incrementally: each [`MessageLog::refresh`] parses
/// only the complete lines added since the last one. Every complete line
/// must be a JSON object, or the test fails.
pub struct MessageLog {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    lines: Vec<Value>,
}

/// Every key the SPEC's Messages table allows.
const KNOWN_KEYS: &[&str] = &[
    "channel.id",
    "protocol.id",
    "ident",
    "peer",
    "proxy.event",
    "proxy.source",
    "proxy.payload.size",
    "proxy.payload.hex",
    "server.timestamp",
    "timestamp",
    "proxy.target",
    "proxy.reason",
    "proxy.bytes.received",
    "proxy.bytes.sent",
];

impl MessageLog {
    pub fn new(path: PathBuf) -> MessageLog {
        MessageLog {
            path,
            offset: 0,
            partial: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Takes in the lines completed since the last call.
    pub fn refresh(&mut self) {
        let Ok(mut file) = File::open(&self.path) else {
            return; // not created yet
        };
        file.seek(SeekFrom::Start(self.offset)).expect("seek");
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh).expect("read messages");
        self.offset += fresh.len() as u64;
        self.partial.extend_from_slice(&fresh);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let value: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!(
                    "line {} of {} is not JSON ({e}): {}",
                    self.lines.len() + 1,
                    self.path.display(),
                    String::from_utf8_lossy(&line[..line.len().min(300)])
                )
            });
            assert!(value.is_object(), "a message must be an object: {value}");
            self.lines.push(value);
        }
    }

    /// Refreshes until `condition` holds; fails the test after `timeout`.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&MessageLog) -> bool,
    ) {
        let held = poll_until(timeout, || {
            self.refresh();
            condition(self)
        });
        assert!(
            held,
            "timed out after {timeout:?} waiting for {what}; the file has {} lines:\n{}",
            self.lines.len(),
            self.summary()
        );
    }

    /// Bytes after the last newline (a line being written, or cut short).
    pub fn unfinished_tail(&self) -> &[u8] {
        &self.partial
    }

    pub fn lines(&self) -> &[Value] {
        &self.lines
    }

    /// The ident of the device whose socket's local address is `peer`.
    pub fn ident_of_peer(&self, peer: &str) -> Option<String> {
        self.lines
            .iter()
            .find(|m| source(m) == 0 && event(m) == 1 && text(m, "peer") == peer)
            .map(|m| text(m, "ident").to_string())
    }

    /// Waits for the device's event 1 and returns its ident.
    pub fn wait_ident(&mut self, peer: &str, timeout: Duration) -> String {
        self.wait_for(timeout, &format!("event 1 of device {peer}"), |log| {
            log.ident_of_peer(peer).is_some()
        });
        self.ident_of_peer(peer).unwrap()
    }

    /// Every message of `ident`, in file order.
    pub fn of_ident(&self, ident: &str) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|m| text(m, "ident") == ident)
            .collect()
    }

    /// All messages grouped by ident, each group in file order.
    pub fn by_ident(&self) -> BTreeMap<String, Vec<&Value>> {
        let mut groups: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
        for message in &self.lines {
            groups
                .entry(text(message, "ident").to_string())
                .or_default()
                .push(message);
        }
        groups
    }

    /// The messages of `ident` from `source` with `event`.
    pub fn select(&self, ident: &str, source_n: u64, event_n: u64) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|m| text(m, "ident") == ident && source(m) == source_n && event(m) == event_n)
            .collect()
    }

    /// The event 2 of one side of a connection, if written yet.
    pub fn dropped(&self, ident: &str, source_n: u64) -> Option<&Value> {
        self.select(ident, source_n, 2).into_iter().next()
    }

    /// The `proxy.reason` of one side's event 2.
    pub fn reason(&self, ident: &str, source_n: u64) -> Option<String> {
        self.dropped(ident, source_n)
            .map(|m| text(m, "proxy.reason").to_string())
    }

    /// Waits for one side's event 2 and returns its reason.
    pub fn wait_reason(&mut self, ident: &str, source_n: u64, timeout: Duration) -> String {
        self.wait_for(
            timeout,
            &format!("event 2 of source {source_n} of {ident}"),
            |log| log.dropped(ident, source_n).is_some(),
        );
        self.reason(ident, source_n).unwrap()
    }

    /// The payloads of `source`'s event 0 messages of `ident`, concatenated.
    pub fn payload(&self, ident: &str, source_n: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        for message in self.select(ident, source_n, 0) {
            let hex_text = message
                .get("proxy.payload.hex")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("a data message without proxy.payload.hex: {message}"));
            bytes.extend(hex::decode(hex_text).expect("proxy.payload.hex is hex"));
        }
        bytes
    }

    /// Checks every line against the SPEC's Messages table: the keys always
    /// present, those of each event and source, and nothing else.
    pub fn assert_well_formed(&self) {
        for message in &self.lines {
            check_message(message);
        }
    }

    /// One line per message, short, for failure reports.
    pub fn summary(&self) -> String {
        let shown = 60;
        let skip = self.lines.len().saturating_sub(shown);
        let mut out = String::new();
        if skip > 0 {
            out.push_str(&format!("  ... {skip} earlier lines\n"));
        }
        for m in &self.lines[skip..] {
            out.push_str(&format!(
                "  {} {} src {} ev {} size {} reason {}\n",
                text(m, "ident"),
                text(m, "peer"),
                source(m),
                event(m),
                m.get("proxy.payload.size").unwrap_or(&Value::Null),
                m.get("proxy.reason").unwrap_or(&Value::Null),
            ));
        }
        out
    }
}

/// A string field, or "" when missing.
pub fn text<'a>(message: &'a Value, key: &str) -> &'a str {
    message.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A whole-number field; fails the test when missing.
pub fn number(message: &Value, key: &str) -> u64 {
    message
        .get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("expected a whole number {key:?} in {message}"))
}

pub fn event(message: &Value) -> u64 {
    number(message, "proxy.event")
}

pub fn source(message: &Value) -> u64 {
    number(message, "proxy.source")
}

/// Whether `ident` is 16 lowercase hex characters.
pub fn is_ident(ident: &str) -> bool {
    ident.len() == 16
        && ident
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_message(m: &Value) {
    let object = m.as_object().expect("an object");
    for key in object.keys() {
        assert!(
            KNOWN_KEYS.contains(&key.as_str()),
            "unexpected key {key:?} in {m}"
        );
    }
    number(m, "channel.id");
    number(m, "protocol.id");
    assert!(is_ident(text(m, "ident")), "bad ident in {m}");
    assert!(
        text(m, "peer").parse::<SocketAddr>().is_ok(),
        "peer must be ip:port in {m}"
    );
    let (event_n, source_n) = (event(m), source(m));
    assert!(event_n <= 2, "proxy.event must be 0, 1 or 2 in {m}");
    assert!(source_n <= 3, "proxy.source must be 0..3 in {m}");
    let stamp = m.get("server.timestamp").and_then(Value::as_f64);
    assert!(
        stamp.is_some_and(|s| s > 1.5e9),
        "server.timestamp must be seconds since the epoch in {m}"
    );
    assert_eq!(
        stamp,
        m.get("timestamp").and_then(Value::as_f64),
        "timestamp must equal server.timestamp in {m}"
    );
    assert_eq!(
        m.get("proxy.target").is_some_and(Value::is_string),
        source_n >= 1,
        "proxy.target must be there exactly for sources 1..3 in {m}"
    );
    let is_data = event_n == 0;
    assert_eq!(
        m.get("proxy.payload.size").is_some(),
        is_data,
        "proxy.payload.size must be there exactly for event 0 in {m}"
    );
    if !is_data {
        assert!(
            m.get("proxy.payload.hex").is_none(),
            "hex outside event 0 in {m}"
        );
    }
    let is_drop = event_n == 2;
    for key in ["proxy.reason", "proxy.bytes.received", "proxy.bytes.sent"] {
        assert_eq!(
            m.get(key).is_some(),
            is_drop,
            "{key} must be there exactly for event 2 in {m}"
        );
    }
}

// ---------------------------------------------------------------- devices

/// How a device's reading ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The daemon closed the connection (FIN).
    Eof,
    /// The connection was reset or failed.
    Reset,
    /// The deadline passed with the connection still open.
    StillOpen,
}

/// What a device read until its connection ended.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub end: End,
}

/// A device: a blocking client socket whose reads wake up every 50 ms.
pub struct Device {
    stream: TcpStream,
    name: String,
}

impl Device {
    pub fn connect(addr: SocketAddr) -> Device {
        let stream = TcpStream::connect_timeout(&addr, secs(5))
            .unwrap_or_else(|e| panic!("device cannot connect to {addr}: {e}"));
        stream.set_read_timeout(Some(READ_TICK)).unwrap();
        stream.set_write_timeout(Some(secs(15))).unwrap();
        stream.set_nodelay(true).unwrap();
        let name = stream.local_addr().unwrap().to_string();
        Device { stream, name }
    }

    /// The `peer` the daemon records for this device: its local ip:port.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("device {} cannot send: {e}", self.name));
    }

    /// Sends `bytes` in writes of random sizes from 1 byte to 64 KiB.
    pub fn send_in_random_writes(&mut self, bytes: &[u8], seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut offset = 0;
        while offset < bytes.len() {
            let size = rng.random_range(1..=64 * 1024).min(bytes.len() - offset);
            self.send(&bytes[offset..offset + size]);
            offset += size;
        }
    }

    pub fn shutdown_write(&self) {
        self.stream
            .shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("device {} cannot shut down writing: {e}", self.name));
    }

    /// Reads until the connection ends or `timeout` passes.
    pub fn read_until_end(&mut self, timeout: Duration) -> Received {
        let deadline = Instant::now() + timeout;
        let mut bytes = Vec::new();
        let mut buffer = vec![0; 64 * 1024];
        while Instant::now() < deadline {
            match self.stream.read(&mut buffer) {
                Ok(0) => {
                    return Received {
                        bytes,
                        end: End::Eof,
                    };
                }
                Ok(n) => bytes.extend_from_slice(&buffer[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    return Received {
                        bytes,
                        end: End::Reset,
                    };
                }
            }
        }
        Received {
            bytes,
            end: End::StillOpen,
        }
    }

    /// Reads until at least `n` bytes came; fails the test if the
    /// connection ends or `timeout` passes first.
    pub fn read_at_least(&mut self, n: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut bytes = Vec::new();
        let mut buffer = vec![0; 64 * 1024];
        while bytes.len() < n {
            assert!(
                Instant::now() < deadline,
                "device {} expected {n} bytes within {timeout:?}, got {} ({:?})",
                self.name,
                bytes.len(),
                String::from_utf8_lossy(&bytes)
            );
            match self.stream.read(&mut buffer) {
                Ok(0) => panic!(
                    "device {} expected {n} bytes, the connection closed after {} ({:?})",
                    self.name,
                    bytes.len(),
                    String::from_utf8_lossy(&bytes)
                ),
                Ok(got) => bytes.extend_from_slice(&buffer[..got]),
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("device {} read failed: {e}", self.name),
            }
        }
        bytes
    }

    /// Closes with SO_LINGER 0, so that the daemon sees a reset.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the socket is open and `linger` is the struct SO_LINGER
        // expects, with its size passed along.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast::<libc::c_void>(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt(SO_LINGER) failed");
        drop(self.stream);
    }
}

pub fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

// ---------------------------------------------------------------- targets

/// What a target server does with each connection it accepts.
#[derive(Clone)]
pub enum Behaviour {
    /// Reads and records everything; closes after the end of stream.
    Record,
    /// Records, and answers every read of n bytes with `t{tag}:{n};`.
    Reply { tag: u8 },
    /// Records until the end of stream, then sends this (in 64 KiB writes)
    /// and closes.
    ReplyAtEof(Vec<u8>),
    /// Reads exactly `bytes` bytes, sends `farewell`, then closes (FIN).
    CloseAfter { bytes: usize, farewell: Vec<u8> },
    /// Accepts and never reads; holds the socket until the target is dropped.
    NeverRead,
    /// Reads nothing until the flag is set, then behaves like `Record`.
    Gated(Arc<AtomicBool>),
}

/// What happened on one accepted connection.
#[derive(Default)]
struct ConnState {
    received: Vec<u8>,
    sent: Vec<u8>,
    eof: bool,
    done: bool,
    error: Option<String>,
}

/// One connection a target accepted (from the daemon).
pub struct TargetConn {
    pub peer: SocketAddr,
    state: Mutex<ConnState>,
}

impl TargetConn {
    pub fn received(&self) -> Vec<u8> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn received_len(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    pub fn sent(&self) -> Vec<u8> {
        self.state.lock().unwrap().sent.clone()
    }

    pub fn sent_len(&self) -> usize {
        self.state.lock().unwrap().sent.len()
    }

    /// Whether it read the end of stream.
    pub fn eof(&self) -> bool {
        self.state.lock().unwrap().eof
    }

    /// Whether its handler finished (the socket is closed).
    pub fn done(&self) -> bool {
        self.state.lock().unwrap().done
    }

    /// A read or write error, if one ended it.
    pub fn error(&self) -> Option<String> {
        self.state.lock().unwrap().error.clone()
    }

    /// Waits until it received at least `n` bytes.
    pub fn wait_received(&self, n: usize, timeout: Duration) {
        let held = poll_until(timeout, || self.received_len() >= n);
        assert!(
            held,
            "target connection from {} expected {n} bytes within {timeout:?}, has {}",
            self.peer,
            self.received_len()
        );
    }

    /// Waits until its handler finished (end of stream, error or close).
    pub fn wait_done(&self, timeout: Duration) {
        let held = poll_until(timeout, || self.done());
        assert!(
            held,
            "target connection from {} still open after {timeout:?} (eof {}, received {})",
            self.peer,
            self.eof(),
            self.received_len()
        );
    }
}

/// A target server on 127.0.0.1 with one thread per accepted connection.
/// Dropping it stops and joins every thread.
pub struct Target {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<TargetConn>>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl Target {
    pub fn start(behaviour: Behaviour) -> Target {
        Target::start_with(behaviour, false)
    }

    /// A target whose accepted sockets have a small kernel receive buffer.
    pub fn start_small_buffer(behaviour: Behaviour) -> Target {
        Target::start_with(behaviour, true)
    }

    fn start_with(behaviour: Behaviour, small_buffer: bool) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a target");
        if small_buffer {
            small_receive_buffer(&listener);
        }
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let conns = Arc::clone(&conns);
            let stop = Arc::clone(&stop);
            thread::spawn(move || accept_loop(listener, behaviour, conns, stop))
        };
        Target {
            addr,
            conns,
            stop,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `host:port` to configure as PROXY_TARGETn.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn connections(&self) -> Vec<Arc<TargetConn>> {
        self.conns.lock().unwrap().clone()
    }

    /// Waits until it accepted `n` connections and returns them.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> Vec<Arc<TargetConn>> {
        let held = poll_until(timeout, || self.conns.lock().unwrap().len() >= n);
        let conns = self.connections();
        assert!(
            held,
            "target {} expected {n} connections within {timeout:?}, has {}",
            self.addr,
            conns.len()
        );
        conns
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        for handler in acceptor.join().unwrap_or_default() {
            // A handler that panicked has already printed its message.
            let _ = handler.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    behaviour: Behaviour,
    conns: Arc<Mutex<Vec<Arc<TargetConn>>>>,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let mut handlers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                stream.set_read_timeout(Some(READ_TICK)).unwrap();
                stream.set_write_timeout(Some(secs(15))).unwrap();
                let conn = Arc::new(TargetConn {
                    peer,
                    state: Mutex::new(ConnState::default()),
                });
                conns.lock().unwrap().push(Arc::clone(&conn));
                let behaviour = behaviour.clone();
                let stop = Arc::clone(&stop);
                handlers.push(thread::spawn(move || {
                    serve(stream, &conn, behaviour, &stop);
                    conn.state.lock().unwrap().done = true;
                }));
            }
            Err(e) if is_timeout(&e) => thread::sleep(millis(2)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("target accept failed: {e}"),
        }
    }
    handlers
}

fn serve(mut stream: TcpStream, conn: &TargetConn, behaviour: Behaviour, stop: &AtomicBool) {
    match behaviour {
        Behaviour::Record => {
            read_loop(&mut stream, conn, stop, |_, _| true);
        }
        Behaviour::Reply { tag } => {
            read_loop(&mut stream, conn, stop, |stream, n| {
                send(stream, conn, format!("t{tag}:{n};").as_bytes())
            });
        }
        Behaviour::ReplyAtEof(reply) => {
            if read_loop(&mut stream, conn, stop, |_, _| true) {
                // In pieces, so that `sent` shows how far a slow reader let it.
                for piece in reply.chunks(64 * 1024) {
                    if stop.load(Ordering::SeqCst) || !send(&mut stream, conn, piece) {
                        break;
                    }
                }
            }
        }
        Behaviour::CloseAfter { bytes, farewell } => {
            read_loop(&mut stream, conn, stop, |_, _| conn.received_len() < bytes);
            send(&mut stream, conn, &farewell);
        }
        Behaviour::NeverRead => {
            while !stop.load(Ordering::SeqCst) {
                thread::sleep(millis(20));
            }
        }
        Behaviour::Gated(gate) => {
            while !stop.load(Ordering::SeqCst) && !gate.load(Ordering::SeqCst) {
                thread::sleep(millis(5));
            }
            read_loop(&mut stream, conn, stop, |_, _| true);
        }
    }
}

/// Reads and records until the end of stream (returns true), an error, a
/// stop, or `on_data` returning false (returns false).
fn read_loop(
    stream: &mut TcpStream,
    conn: &TargetConn,
    stop: &AtomicBool,
    mut on_data: impl FnMut(&mut TcpStream, usize) -> bool,
) -> bool {
    let mut buffer = vec![0; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buffer) {
            Ok(0) => {
                conn.state.lock().unwrap().eof = true;
                return true;
            }
            Ok(n) => {
                conn.state
                    .lock()
                    .unwrap()
                    .received
                    .extend_from_slice(&buffer[..n]);
                if !on_data(stream, n) {
                    return false;
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                conn.state.lock().unwrap().error = Some(e.to_string());
                return false;
            }
        }
    }
    false
}

/// Writes and records; false on error.
fn send(stream: &mut TcpStream, conn: &TargetConn, bytes: &[u8]) -> bool {
    match stream.write_all(bytes) {
        Ok(()) => {
            conn.state.lock().unwrap().sent.extend_from_slice(bytes);
            true
        }
        Err(e) => {
            conn.state.lock().unwrap().error = Some(e.to_string());
            false
        }
    }
}
