//! A `proxy-channel view --follow` process whose output is collected as it
//! comes, for tests of what the viewer shows while the daemon writes.

use std::fs;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{collect_lines, daemon_command, poll_until, secs, wait_until};

/// The viewer's times in UTC, so that expected headers do not depend on
/// the machine's zone.
pub const UTC: (&str, &str) = ("TZ", "UTC");

/// A `view` process started with `args`; its stdout and stderr lines are
/// collected by threads. Dropping it kills the process.
pub struct Follower {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    pub fn start(args: &[&str]) -> Follower {
        let mut child = daemon_command(&[UTC])
            .arg("view")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxy-channel view --follow");
        let stdout = collect_lines(child.stdout.take().expect("piped stdout"));
        let stderr = collect_lines(child.stderr.take().expect("piped stderr"));
        Follower {
            child,
            stdout,
            stderr,
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until a printed line contains `part`.
    pub fn wait_for_line_with(&mut self, part: &str, timeout: Duration) {
        let shown = poll_until(timeout, || {
            self.stdout.lock().unwrap().iter().any(|l| l.contains(part))
        });
        if !shown {
            let exited = self.child.try_wait().ok().flatten();
            panic!(
                "view --follow did not print a line with {part:?} within {timeout:?} \
                 (exited: {exited:?}); it printed:\n{}\nstderr:\n{}",
                self.lines().join("\n"),
                self.stderr().join("\n")
            );
        }
    }

    /// Waits until the viewer sleeps in its follow loop (the only place it
    /// sleeps), so that what is written next is new to it.
    pub fn wait_until_following(&self) {
        let path = format!("/proc/{}/syscall", self.child.id());
        let sleeping = [libc::SYS_clock_nanosleep, libc::SYS_nanosleep];
        wait_until(secs(5), "view --follow to wait for more lines", || {
            fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
                .is_some_and(|number| sleeping.contains(&number))
        });
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        // It may have exited by itself (a failure the test reports); the
        // collecting threads end as its pipes close.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
