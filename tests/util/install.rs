//! Software the interop tests run, installed on first use when it is
//! missing, so that `cargo test` passes on a fresh machine: HAProxy with
//! apt-get (Debian's package) and Python's prometheus-client with pip. The
//! tests run as root, here and in CI; if an install fails, the test fails
//! and says what to install.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The `haproxy` binary, installed with apt-get if none is found.
pub fn haproxy_binary() -> PathBuf {
    static HAPROXY: OnceLock<PathBuf> = OnceLock::new();
    HAPROXY
        .get_or_init(|| {
            find_haproxy().unwrap_or_else(|| {
                run_setup("apt-get", &["update", "-qq"]);
                run_setup("apt-get", &["install", "-y", "-qq", "haproxy"]);
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
        if !importable() {
            run_setup(
                "python3",
                &[
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "prometheus-client",
                ],
            );
        }
    });
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
