//! Software the interop tests run: HAProxy and Python's prometheus-client.
//! A test asks for it with `require(Need::Haproxy, ..)` (or
//! `Need::PrometheusClient`) first, which skips the test where it is
//! missing. Only a privileged run (`PROXY_CHANNEL_TEST_PRIVILEGED=1`, as
//! root, as in CI) installs what is missing: HAProxy with apt-get
//! (Debian's package), prometheus-client with pip (or Debian's
//! python3-prometheus-client where pip is refused); if that fails, the
//! test fails and says what to install.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use super::is_privileged;

/// The `haproxy` binary; installed with apt-get if none is found and the
/// run is privileged, else the test fails saying what to install.
pub fn haproxy_binary() -> PathBuf {
    static HAPROXY: OnceLock<PathBuf> = OnceLock::new();
    HAPROXY
        .get_or_init(|| {
            if find_program("haproxy").is_none() && is_privileged() {
                apt_install("haproxy");
            }
            find_program("haproxy").unwrap_or_else(|| {
                panic!(
                    "haproxy is not installed: the load-balancer interop tests run a real \
                     HAProxy (Debian/Ubuntu: apt-get install haproxy)"
                )
            })
        })
        .clone()
}

/// Makes sure `strace` is there; installs it with apt-get if the run is
/// privileged, else the test fails saying what to install.
pub fn ensure_strace() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if find_program("strace").is_none() && is_privileged() {
            apt_install("strace");
        }
        assert!(
            find_program("strace").is_some(),
            "strace is not installed: the fairness tests slow the writer with it \
             (Debian/Ubuntu: apt-get install strace)"
        );
    });
}

/// Makes sure python3 can import prometheus_client; installs it (pip, else
/// apt-get) if the run is privileged, else the test fails saying what to
/// install.
pub fn ensure_prometheus_client() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if !prometheus_client_importable() && is_privileged() {
            install_prometheus_client();
        }
        assert!(
            prometheus_client_importable(),
            "python3 cannot import prometheus_client (pip install prometheus-client, or \
             apt-get install python3-prometheus-client)"
        );
    });
}

/// Whether python3 can import prometheus_client.
pub fn prometheus_client_importable() -> bool {
    Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .is_ok_and(|out| out.status.success())
}

fn install_prometheus_client() {
    // pip where python3 is a Python of its own (pyenv, as on CI's
    // machines); Debian's system Python refuses pip, so then its package.
    let pip = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("prometheus-client")
        .output();
    if !pip.is_ok_and(|out| out.status.success()) {
        apt_install("python3-prometheus-client");
    }
}

/// Installs a Debian package, waiting up to five minutes for a dpkg lock
/// held by another apt (unattended upgrades on a fresh machine).
fn apt_install(package: &str) {
    const LOCK_WAIT: &str = "DPkg::Lock::Timeout=300";
    run_setup("apt-get", &["-o", LOCK_WAIT, "update", "-qq"]);
    run_setup(
        "apt-get",
        &["-o", LOCK_WAIT, "install", "-y", "-qq", package],
    );
}

/// Where `program` is: in PATH, or in one of the sbin folders a normal
/// user's PATH may leave out.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let mut folders: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    folders.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    folders
        .into_iter()
        .map(|folder| folder.join(program))
        .find(|candidate| candidate.is_file())
}

/// Runs a command that sets up what a test needs (as root: the test has
/// passed its `require` guard); fails the test with its stderr if it
/// fails; returns its stdout, trimmed.
pub fn run_setup(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (a test needs it, and root): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed (this test sets up what it needs as root): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}
