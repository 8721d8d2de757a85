//! The proxy under test: start it, watch its CPU and memory, stop it.
//!
//! [`Kind::ProxyChannel`] is configured by environment variables (every
//! inherited `PROXY_*` removed first), [`Kind::Haproxy`] by a config file
//! made from a template, [`Kind::Nginx`] (the UDP cases' peer: haproxy has
//! no UDP) by a config file written here, and [`Kind::Direct`] is no proxy
//! at all: devices connect to the first target. The child gets `PR_SET_PDEATHSIG`, so it
//! dies with loadgen whatever happens. Startup time is from spawn until a
//! TCP connect to the listening port succeeds (and, for proxy-channel,
//! until it logs `listening on`). CPU is utime+stime from `/proc/<pid>/stat`;
//! memory is `Pss` from `/proc/<pid>/smaps_rollup`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Which proxy sits between devices and targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ProxyChannel,
    Haproxy,
    /// nginx's stream module, UDP only (one process: `master_process off`).
    Nginx,
    Direct,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::ProxyChannel => "pc",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::Direct => "direct",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        [Kind::ProxyChannel, Kind::Haproxy, Kind::Nginx, Kind::Direct]
            .into_iter()
            .find(|kind| kind.name() == name)
    }
}

/// proxy-channel's store mode, and where its message files go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Off,
    /// Files on the work folder's file system (a disk, usually): the
    /// figures are bound by how fast that disk takes writes.
    Disk,
    /// Files on tmpfs (`/dev/shm`): the daemon's own cost, with no disk.
    Memory,
}

/// Where [`Store::Memory`] data folders go.
const TMPFS: &str = "/dev/shm";

/// How to start either proxy.
#[derive(Clone, Debug)]
pub struct Setup {
    pub proxy_channel: PathBuf,
    pub haproxy: PathBuf,
    pub haproxy_template: PathBuf,
    pub nginx: PathBuf,
    /// proxy-channel's PROXY_WORKERS and haproxy's nbthread.
    pub threads: usize,
    /// Where proxy-channel's data folders and haproxy's config go.
    pub work_dir: PathBuf,
}

/// Lines the proxy wrote on stderr, the last few kept for failure reports.
type Tail = Arc<Mutex<VecDeque<String>>>;

/// When the proxy logged "listening on", if it did.
type Listening = Arc<OnceLock<Instant>>;

pub struct Running {
    pub kind: Kind,
    pub listen: SocketAddr,
    /// When it was spawned, and how long until a connect succeeded.
    pub spawned: Instant,
    pub startup: Duration,
    pub data_dir: Option<PathBuf>,
    child: Option<Child>,
    tail: Tail,
    listening: Listening,
}

impl Running {
    /// Starts `kind` in front of `targets` and waits until it accepts.
    pub fn start(
        kind: Kind,
        setup: &Setup,
        targets: &[SocketAddr],
        store: Store,
    ) -> Result<Running, String> {
        Running::start_with(kind, setup, targets, store, &[])
    }

    /// [`Running::start`], with more environment for proxy-channel, as
    /// (name, value relative to the data folder) pairs: a value starting
    /// with `{data}` gets the data folder in its place. nginx takes the
    /// address to listen for datagrams on from the same PROXY_LISTEN_UDP.
    pub fn start_with(
        kind: Kind,
        setup: &Setup,
        targets: &[SocketAddr],
        store: Store,
        extra: &[(&str, &str)],
    ) -> Result<Running, String> {
        if kind == Kind::Direct {
            return Ok(Running {
                kind,
                listen: targets[0],
                spawned: Instant::now(),
                startup: Duration::ZERO,
                data_dir: None,
                child: None,
                tail: Tail::default(),
                listening: Listening::default(),
            });
        }
        let listen = free_port()?;
        let mut data_dir = None;
        let mut command = match kind {
            Kind::ProxyChannel => {
                let dir = data_folder(setup, store, listen)?;
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let mut command = Command::new(&setup.proxy_channel);
                for (name, _) in std::env::vars_os() {
                    if name.to_string_lossy().starts_with("PROXY_") {
                        command.env_remove(name);
                    }
                }
                command
                    .env("PROXY_LISTEN", listen.to_string())
                    .env("PROXY_STORE", (store != Store::Off).to_string())
                    .env("PROXY_DATA_DIR", &dir)
                    .env("PROXY_WORKERS", setup.threads.to_string())
                    .env("PROXY_CONTROL_SOCKET", "off")
                    .env("RUST_LOG", "info");
                for (n, target) in targets.iter().enumerate() {
                    command.env(format!("PROXY_TARGET{}", n + 1), target.to_string());
                }
                for (name, value) in extra {
                    let data = dir.to_string_lossy();
                    command.env(name, value.replace("{data}", &data));
                }
                data_dir = Some(dir);
                command
            }
            Kind::Haproxy => {
                if targets.len() != 1 || store != Store::Off {
                    return Err("haproxy runs only with one target and no store".into());
                }
                let config = haproxy_config(setup, listen, targets[0])?;
                let mut command = Command::new(&setup.haproxy);
                command.arg("-f").arg(config).arg("-db");
                command
            }
            Kind::Nginx => {
                let udp = extra
                    .iter()
                    .find(|(name, _)| *name == "PROXY_LISTEN_UDP")
                    .and_then(|(_, value)| value.parse().ok())
                    .ok_or("nginx runs only the UDP cases")?;
                if targets.len() != 1 || store != Store::Off {
                    return Err("nginx runs only with one target and no store".into());
                }
                let config = nginx_config(setup, listen, udp, targets[0])?;
                let mut command = Command::new(&setup.nginx);
                command
                    .arg("-c")
                    .arg(config)
                    .arg("-p")
                    .arg(&setup.work_dir)
                    .arg("-e")
                    .arg("stderr");
                command
            }
            Kind::Direct => unreachable!("handled above"),
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it asks the kernel to kill the
        // child when loadgen's main thread (which spawns it) ends.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", kind.name()))?;
        let tail = Tail::default();
        let stderr = child.stderr.take().expect("piped");
        let lines = tail.clone();
        let listening = Listening::default();
        let logged = listening.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    // Only the first time counts.
                    let _ = logged.set(Instant::now());
                }
                let mut lines = lines.lock().expect("tail lock");
                if lines.len() == 20 {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
        let mut running = Running {
            kind,
            listen,
            spawned,
            startup: Duration::ZERO,
            data_dir,
            child: Some(child),
            tail,
            listening,
        };
        loop {
            if TcpStream::connect_timeout(&listen, Duration::from_millis(100)).is_ok() {
                running.startup = spawned.elapsed();
                return Ok(running);
            }
            running.check_alive()?;
            if spawned.elapsed() > Duration::from_secs(10) {
                return Err(running.failure("did not listen within 10 s"));
            }
            std::thread::sleep(Duration::from_micros(250));
        }
    }

    /// From spawn until the proxy logged "listening on" (proxy-channel does).
    pub fn listening_after(&self) -> Option<Duration> {
        Some(self.listening.get()?.duration_since(self.spawned))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The proxy must still be running.
    pub fn check_alive(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failure(&format!("exited unexpectedly ({status})"))),
            Err(e) => Err(format!("cannot watch {}: {e}", self.kind.name())),
        }
    }

    /// CPU-seconds the proxy has used (0 for direct).
    pub fn cpu_seconds(&self) -> f64 {
        self.pid()
            .map_or(0.0, |pid| cpu_seconds(pid).unwrap_or(f64::NAN))
    }

    /// The proxy's proportional set size in KiB (0 for direct).
    pub fn pss_kib(&self) -> f64 {
        self.pid()
            .map_or(0.0, |pid| pss_kib(pid).unwrap_or(f64::NAN))
    }

    /// SIGTERM, then wait. proxy-channel must exit 0 within 15 s; haproxy
    /// is only waited for.
    pub fn stop(mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let asked = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if self.kind == Kind::ProxyChannel && !status.success() {
                        return Err(self.failure(&format!("exited with {status} after SIGTERM")));
                    }
                    return Ok(());
                }
                Ok(None) if asked.elapsed() < Duration::from_secs(15) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(None) => {
                    // Killing and reaping a hung child; the error is the news.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self.failure("still running 15 s after SIGTERM"));
                }
                Err(e) => return Err(format!("cannot wait for {}: {e}", self.kind.name())),
            }
        }
    }

    /// A failure message with the proxy's last log lines.
    pub fn failure(&self, what: &str) -> String {
        let tail = self.tail.lock().expect("tail lock");
        let log: Vec<&str> = tail.iter().map(String::as_str).collect();
        format!(
            "{} {what}; its last log lines: {}",
            self.kind.name(),
            log.join(" | ")
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Cleanup on an error path: nothing to report if it fails.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Setup {
    /// The folder under tmpfs for [`Store::Memory`] data, named after this
    /// process (`loadgen-PID`); removed with the work folder.
    pub fn memory_dir(&self) -> PathBuf {
        Path::new(TMPFS).join(format!("loadgen-{}", std::process::id()))
    }
}

/// What a store case in memory may write at the most (8 connections at
/// full speed for the warm-up and the window write about 7 GB).
const MEMORY_NEEDED: u64 = 8 << 30;

/// proxy-channel's data folder for a proxy listening on `listen`.
fn data_folder(setup: &Setup, store: Store, listen: SocketAddr) -> Result<PathBuf, String> {
    let root = match store {
        Store::Memory => {
            let free = free_bytes(Path::new(TMPFS))?;
            if free < MEMORY_NEEDED {
                return Err(format!(
                    "{TMPFS} has {} MiB free; a store case in memory needs {} MiB",
                    free >> 20,
                    MEMORY_NEEDED >> 20
                ));
            }
            setup.memory_dir()
        }
        Store::Off | Store::Disk => setup.work_dir.clone(),
    };
    Ok(root.join(format!("data-{}", listen.port())))
}

/// Bytes an unprivileged writer may still write on the file system at `path`.
fn free_bytes(path: &Path) -> Result<u64, String> {
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statvfs fills on success.
    if unsafe { libc::statvfs(name.as_ptr(), stats.as_mut_ptr()) } != 0 {
        return Err(format!(
            "{}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stats = unsafe { stats.assume_init() };
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

fn haproxy_config(
    setup: &Setup,
    listen: SocketAddr,
    target: SocketAddr,
) -> Result<PathBuf, String> {
    let template = std::fs::read_to_string(&setup.haproxy_template)
        .map_err(|e| format!("{}: {e}", setup.haproxy_template.display()))?;
    let config = template
        .replace("{{THREADS}}", &setup.threads.to_string())
        .replace("{{LISTEN}}", &listen.to_string())
        .replace("{{TARGET}}", &target.to_string());
    let path = setup
        .work_dir
        .join(format!("haproxy-{}.cfg", listen.port()));
    std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// Debian's nginx has its stream module apart (libnginx-mod-stream).
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// One nginx process (no master: its CPU is one process's) relaying
/// datagrams on `udp` to `target`, as proxy-channel does: a session per
/// device address, kept for 10 minutes; `listen` answers TCP connects so
/// that readiness is probed as for the others.
fn nginx_config(
    setup: &Setup,
    listen: SocketAddr,
    udp: SocketAddr,
    target: SocketAddr,
) -> Result<PathBuf, String> {
    let module = match Path::new(NGINX_STREAM_MODULE).exists() {
        true => format!("load_module {NGINX_STREAM_MODULE};\n"),
        false => String::new(),
    };
    let work = setup.work_dir.display();
    let port = listen.port();
    let config = format!(
        "{module}daemon off;\nmaster_process off;\nworker_rlimit_nofile 200000;\n\
         error_log stderr warn;\npid {work}/nginx-{port}.pid;\n\
         events {{ worker_connections 100000; }}\n\
         stream {{\n\
         server {{ listen {listen}; return ok; }}\n\
         server {{ listen {udp} udp rcvbuf=4m; proxy_pass {target}; proxy_timeout 10m; }}\n\
         }}\n"
    );
    let path = setup.work_dir.join(format!("nginx-{port}.conf"));
    std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / per_second)
}

/// CPU-seconds the whole machine has been busy (all CPUs together), from
/// the `cpu` line of `/proc/stat`: user, nice, system, irq, softirq, steal.
pub fn busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0.0))
        .collect();
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| ticks.get(i))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(busy / per_second)
}

/// Pss of a process in KiB.
pub fn pss_kib(pid: u32) -> Option<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = rollup.lines().find(|line| line.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// An executable's path, looked up on PATH if it has no slash.
fn resolve(path: &Path) -> Option<PathBuf> {
    if path.components().count() > 1 {
        return Some(path.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(path))
        .find(|candidate| candidate.is_file())
}

/// Size of an executable file.
pub fn executable_size(path: &Path) -> Option<u64> {
    Some(std::fs::metadata(resolve(path)?).ok()?.len())
}

/// Size of an executable once `strip` has removed its symbols and debug
/// information (Debian ships haproxy stripped; cargo keeps line tables).
pub fn stripped_size(path: &Path, work_dir: &Path) -> Option<u64> {
    let out = work_dir.join("stripped");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(resolve(path)?)
        .stderr(Stdio::null())
        .status()
        .ok()?
        .success();
    let size = std::fs::metadata(&out)
        .ok()
        .filter(|_| stripped)
        .map(|m| m.len());
    // A leftover copy is removed with the work folder anyway.
    let _ = std::fs::remove_file(&out);
    size
}
