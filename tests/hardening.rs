//! Issue 13, hardening: the SPEC's "Security" and "Message files" promises,
//! each checked the way a user would see it break. PROXY_RETAIN_FILES=0
//! keeps every rotated file; the metrics file never follows a planted
//! symbolic link; the data folder and message files are private whatever
//! the umask; a write error never leaves a cut line behind; `view
//! --follow` shows every file when several rotations fall between two of
//! its looks; `view` prints no control character from a file as it is.

mod util;

use std::fs;

use util::*;

/// Whether the current file holds `marker` (in some payload's hex).
fn current_file_has(daemon: &Daemon, marker: &[u8]) -> bool {
    let hex = hex::encode(marker);
    fs::read_to_string(daemon.messages_path()).is_ok_and(|text| text.contains(&hex))
}

/// Sends `marker`, waits until it is in the current file, then rotates with
/// SIGHUP and waits for the rotated file count to reach `rotated`.
fn send_and_rotate(daemon: &Daemon, device: &mut Device, marker: &str, rotated: usize) {
    device.send(marker.as_bytes());
    wait_until(secs(5), "the marker in the current file", || {
        current_file_has(daemon, marker.as_bytes())
    });
    daemon.signal(libc::SIGHUP);
    let dir = daemon.data_dir();
    let reached = poll_until(secs(5), || rotated_files(dir).len() >= rotated);
    assert!(
        reached,
        "expected {rotated} rotated files after {marker:?}, saw {:?}; log:\n{}",
        rotated_files(dir),
        daemon.stderr_lines().join("\n")
    );
}

// ------------------------------------------------ PROXY_RETAIN_FILES=0

/// Defect 8: `0` turns the limit off; it never means "keep nothing".
#[test]
fn retain_files_0_keeps_every_rotated_file() {
    let mut daemon = Daemon::start(&[("PROXY_RETAIN_FILES", "0")]);
    let mut device = Device::connect(daemon.addr());
    for round in 1..=3 {
        send_and_rotate(&daemon, &mut device, &format!("<round {round}>"), round);
    }
    daemon.stop();
    let rotated = rotated_files(daemon.data_dir());
    assert_eq!(rotated.len(), 3, "rotated files: {rotated:?}");
    assert!(
        daemon.log_lines_with("(retention)").is_empty(),
        "nothing is deleted without a limit: {:#?}",
        daemon.log_lines_with("(retention)")
    );
    let log = read_folder(daemon.data_dir());
    log.assert_well_formed();
    let mut all = Vec::new();
    for round in 1..=3 {
        all.extend_from_slice(format!("<round {round}>").as_bytes());
    }
    assert_same_bytes(
        "the device's bytes over the rotated files",
        &all,
        &device_bytes_of(&log, device.name()),
    );
}

/// The payloads of `peer`'s source-0 data messages, in file order.
fn device_bytes_of(log: &MessageLog, peer: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for message in log.lines() {
        if text(message, "peer") == peer && source(message) == 0 && event(message) == 0 {
            let hex_text = text(message, "proxy.payload.hex");
            bytes.extend(hex::decode(hex_text).expect("payload hex"));
        }
    }
    bytes
}
