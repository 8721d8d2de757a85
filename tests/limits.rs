//! Limits of the host (issue 2): running out of file descriptors at accept
//! is logged, rate-limited, never spins and never crashes; once
//! descriptors are free again, waiting devices are taken in.

mod util;

use std::time::Instant;

use util::*;

/// The process's CPU time so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name, which is in parentheses.
    let after = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a constant of the system.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Lowers a running process's open-file limit (soft and hard).
fn limit_open_files(pid: u32, limit: u64) {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit reads `new` and writes nothing (old is null).
    let done = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn running_out_of_descriptors_at_accept_is_logged_once_and_does_not_spin() {
    let daemon = Daemon::start(&[("PROXY_STORE", "true")]);
    limit_open_files(daemon.pid(), 48);
    // Far more devices than descriptors: the kernel completes their
    // handshakes, the daemon cannot accept them all.
    let devices: Vec<Device> = (0..120).map(|_| Device::connect(daemon.addr())).collect();
    let warnings = daemon.wait_log("cannot accept device connections", 1, secs(5));
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("Too many open files"),
        "expected a warning naming the cause, saw {warnings:?}"
    );
    // Out of descriptors with devices waiting: no spinning.
    let cpu_before = cpu_seconds(daemon.pid());
    let started = Instant::now();
    std::thread::sleep(secs(2));
    let busy = (cpu_seconds(daemon.pid()) - cpu_before) / started.elapsed().as_secs_f64();
    assert!(
        busy < 0.25,
        "the daemon used {busy:.2} of a core while it could not accept"
    );
    let repeated = daemon
        .log_lines_with("cannot accept device connections")
        .len();
    assert!(
        repeated <= 1,
        "the warning must be rate-limited (at most every ten seconds), seen {repeated} times"
    );

    // Descriptors free again: the devices still waiting are taken in.
    drop(devices);
    let mut late = Device::connect(daemon.addr());
    late.send(b"after the shortage");
    let mut log = daemon.log();
    let ident = log.wait_ident(late.name(), secs(10));
    wait_until(secs(5), "the late device's bytes in the file", || {
        log.refresh();
        log.payload(&ident, 0) == b"after the shortage"
    });
    daemon.assert_no_errors();
}
