//! A slow disk must not hold traffic up. Rotating a message file fsyncs it,
//! which on a disk taking 4 MB/s of writes (an SD card, say) takes about a
//! second and a half for a 6 MiB file; the writer must go on meanwhile, or
//! its queue fills and every worker, and every device's bytes towards its
//! targets, waits for the disk (measured with the fsync in the writer's
//! way: 0.87 s for one chunk; with the syncer thread: under 1 ms).

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use util::*;

/// Each chunk starts with its send time (microseconds since the test's
/// start) and is filled with its sequence number.
const CHUNK: usize = 12 * 1024;
const EVERY: Duration = Duration::from_millis(10);
/// 1.2 MB/s of device bytes, 2.4 MB/s of message file: well within the
/// disk's 4 MB/s, so only the rotations' fsyncs can be in the way.
const CHUNKS: usize = 1000;

#[test]
fn rotations_on_a_slow_disk_do_not_hold_traffic_up() {
    if !require(Need::ThrottledLoopDevice, "make a slow disk") {
        return;
    }
    let disk = SlowDisk::mount(4_000_000);
    let target = TcpListener::bind("127.0.0.1:0").expect("bind the target");
    let target_addr = target.local_addr().expect("target address");
    let started = Instant::now();
    let sink = thread::spawn(move || delays_at_target(&target, started));

    let mut daemon = Daemon::start_in(
        &disk.path().join("data"),
        &[
            ("PROXY_TARGET1", &target_addr.to_string()),
            ("PROXY_ROTATE_SIZE", "6MiB"),
        ],
    );
    let mut device = TcpStream::connect(daemon.addr()).expect("connect the device");
    for sequence in 0..CHUNKS {
        let due = started + EVERY * sequence as u32;
        thread::sleep(due.saturating_duration_since(Instant::now()));
        device
            .write_all(&chunk(sequence, started))
            .expect("send a chunk");
    }
    device
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let delays = sink.join().expect("the target thread");

    let rotations = daemon.log_lines_with("rotated").len();
    daemon.stop();
    assert_eq!(delays.len(), CHUNKS, "every chunk arrived whole");
    assert!(
        rotations >= 2,
        "the load rotated only {rotations} files: the test would prove nothing"
    );
    let worst = delays.iter().max().copied().unwrap_or_default();
    eprintln!("worst delay {worst:?} over {rotations} rotations");
    assert!(
        worst < Duration::from_millis(200),
        "a chunk took {worst:?} from the device to the target while {rotations} files were \
         rotated and synced on a 4 MB/s disk"
    );
}

fn chunk(sequence: usize, started: Instant) -> Vec<u8> {
    let mut bytes = vec![sequence as u8; CHUNK];
    let sent = started.elapsed().as_micros() as u64;
    bytes[..8].copy_from_slice(&sent.to_le_bytes());
    bytes
}

/// Accepts the daemon's connection and returns each chunk's delay from the
/// device's write to its arrival, checking the chunks' contents; bounded by
/// a 60 s read timeout.
fn delays_at_target(listener: &TcpListener, started: Instant) -> Vec<Duration> {
    let (mut conn, _) = listener.accept().expect("the daemon connects");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let mut delays = Vec::new();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        match conn.read_exact(&mut buffer) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return delays,
            Err(e) => panic!("target read: {e}"),
        }
        let arrived = started.elapsed();
        let sent = u64::from_le_bytes(buffer[..8].try_into().expect("8 bytes"));
        let sequence = delays.len();
        assert!(
            buffer[8..].iter().all(|&b| b == sequence as u8),
            "chunk {sequence} arrived with wrong bytes"
        );
        delays.push(arrived.saturating_sub(Duration::from_micros(sent)));
    }
}
