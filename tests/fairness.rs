//! Issue 14: one device flooding while the file writer is slow (200 ms a
//! write, made with strace's fault injection on the writer thread alone)
//! does not hold a quiet device up: its round trips stay fast, and at the
//! end every byte of both devices is in the message files.

mod util;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use util::*;

/// The quiet device's round trips: one every 50 ms.
const ROUND_TRIPS: usize = 40;
/// The writer's queue of batches when full (daemon.rs's STORE_QUEUE).
const WRITER_QUEUE: u64 = 64;
/// The goal of issue 14 for the quiet device's round trip, at p99.
const QUIET_P99: Duration = Duration::from_millis(50);

/// strace attached to the daemon's writer thread, delaying each of its
/// writes by 200 ms; detached when dropped.
struct SlowWriter(Child);

impl SlowWriter {
    fn attach(pid: u32) -> SlowWriter {
        let writer = wait_for_writer_thread(pid);
        let child = Command::new("strace")
            .args(["-qq", "-o", "/dev/null", "-p", &writer.to_string()])
            .args(["-e", "trace=write,writev,pwrite64,pwritev"])
            .args([
                "-e",
                "inject=write,writev,pwrite64,pwritev:delay_enter=200000",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("strace starts");
        // Attached once the writer's next write takes 200 ms: give it a moment.
        thread::sleep(millis(500));
        SlowWriter(child)
    }
}

impl Drop for SlowWriter {
    fn drop(&mut self) {
        // SAFETY: kill with the pid of a child we spawned.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// The thread id of the daemon's `writer` thread.
fn wait_for_writer_thread(pid: u32) -> u32 {
    let mut found = None;
    poll_until(secs(5), || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
        found = tasks.flatten().find_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            (comm.trim() == "writer").then(|| task.file_name().to_string_lossy().parse().ok())?
        });
        found.is_some()
    });
    found.expect("a thread named writer")
}

fn quiet_device_keeps_its_latency_while_another_floods(workers: &str) {
    if !require(Need::Strace, "slow the writer thread down") {
        return;
    }
    let target = Target::start(Behaviour::Reply { tag: 1 });
    let daemon = Daemon::start_with_control(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_WORKERS", workers),
    ]);
    let slow = SlowWriter::attach(daemon.pid());

    // The flooder: as fast as TCP lets it, for a few seconds (bounded).
    let mut flooder = Device::connect(daemon.addr());
    let flooder_name = flooder.name().to_string();
    let mut flood_replies = flooder.stream().try_clone().expect("clone");
    let stop = Arc::new(AtomicBool::new(false));
    let drain = thread::spawn(move || {
        let mut sink = [0u8; 64 * 1024];
        while let Ok(n) = flood_replies.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    });
    let flooding = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            let mut sent = Vec::new();
            let deadline = Instant::now() + secs(20);
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
                && sent.len() < 256 << 20
            {
                flooder.send(&chunk);
                sent.extend_from_slice(&chunk);
            }
            flooder.shutdown_write();
            (flooder, sent)
        })
    };

    // Measured once the writer is behind: its queue is full.
    let socket = daemon.control_socket();
    let behind = poll_until(secs(20), || {
        ctl_json(&socket, &["stats"])["stats"]["writer_queue_depth"]
            .as_u64()
            .is_some_and(|depth| depth >= WRITER_QUEUE - 1)
    });
    assert!(behind, "the writer never fell behind the flood");

    // The quiet device: small requests, each answered by the target.
    let mut quiet = Device::connect(daemon.addr());
    let mut quiet_sent = Vec::new();
    let mut round_trips = Vec::new();
    for round in 0..ROUND_TRIPS {
        let request = format!("q{round:08}");
        let started = Instant::now();
        quiet.send(request.as_bytes());
        let reply = quiet.read_at_least(b"t1:9;".len(), secs(10));
        round_trips.push(started.elapsed());
        assert_eq!(reply, b"t1:9;", "round {round}: the target's answer");
        quiet_sent.extend_from_slice(request.as_bytes());
        thread::sleep(millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    drop(slow);
    let (flooder, flood_sent) = flooding.join().expect("the flooder");
    quiet.shutdown_write();

    round_trips.sort();
    let p99 = round_trips[round_trips.len() * 99 / 100 - 1];
    assert!(
        p99 < QUIET_P99,
        "the quiet device's round trip p99 was {p99:?} while another flooded a slow writer \
         (all: {round_trips:?})"
    );
    assert!(
        flood_sent.len() >= 64 * 1024,
        "the flooder sent {} bytes",
        flood_sent.len()
    );

    // Nothing lost: every byte of both devices is in the files.
    let mut log = daemon.log();
    log.wait_for(secs(60), "both devices' event 2", |log| {
        [&flooder_name, quiet.name()].iter().all(|peer| {
            log.ident_of_peer(peer)
                .is_some_and(|ident| log.dropped(&ident, 0).is_some())
        })
    });
    assert_device_stream(&log, &flooder_name, &flood_sent);
    assert_device_stream(&log, quiet.name(), &quiet_sent);
    drop(flooder);
    drain.join().expect("the flooder's reader");
}

#[test]
fn a_quiet_device_is_not_held_up_by_a_flood_into_a_slow_writer_one_worker() {
    quiet_device_keeps_its_latency_while_another_floods("1");
}

#[test]
fn a_quiet_device_is_not_held_up_by_a_flood_into_a_slow_writer_two_workers() {
    quiet_device_keeps_its_latency_while_another_floods("2");
}
