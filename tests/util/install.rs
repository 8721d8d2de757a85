//! Software the interop tests run, installed on first use when it is
//! missing, so that `cargo test` passes on a fresh machine: HAProxy with
//! apt-get (Debian's package) and Python's prometheus-client with pip (or
//! Debian's python3-prometheus-client where pip is refused). The tests run
//! as root, here and in CI; if an install fails, the test fails and says
//! what to install.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The `haproxy` binary, installed with apt-get if none is found.
pub fn haproxy_binary() -> PathBuf {
    static HAPROXY: OnceLock<PathBuf> = OnceLock::new();
    HAPROXY
        .get_or_init(|| {
            find_haproxy().unwrap_or_else(|| {
                apt_install("haproxy");
                find_haproxy().unwrap_or_else(|| {
                    panic!(
                        "haproxy is not installed and apt-get did not install it: the \
                         load-balancer interop tests run a real HAProxy \
                         (Debian/Ubuntu: apt-get install haproxy)"
                    )
                })
            })
        })
        .clone()
}

/// Makes sure python3 can import prometheus_client (pip installs it).
pub fn ensure_prometheus_client() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let importable = || {
            Command::new("python3")
                .args(["-c", "import prometheus_client"])
                .output()
                .is_ok_and(|out| out.status.success())
        };
        if importable() {
            return;
        }
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
        assert!(
            importable(),
            "python3 cannot import prometheus_client after installing it"
        );
    });
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

fn find_haproxy() -> Option<PathBuf> {
    let mut folders: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    folders.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    folders
        .into_iter()
        .map(|folder| folder.join("haproxy"))
        .find(|candidate| candidate.is_file())
}

/// Runs a command that sets up what a test needs (the tests run as root);
/// fails the test with its stderr if it fails; returns its stdout, trimmed.
pub fn run_setup(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (a test needs it, and root): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed (the tests set up what they need as root): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}
