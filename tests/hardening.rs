//! Issue 13, hardening: the SPEC's "Security" and "Message files" promises,
//! each checked the way a user would see it break. PROXY_RETAIN_FILES=0
//! keeps every rotated file; the metrics file never follows a planted
//! symbolic link; the data folder and message files are private whatever
//! the umask; a write error never leaves a cut line behind; `view
//! --follow` shows every file when several rotations fall between two of
//! its looks; `view` prints no control character from a file as it is.

mod util;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

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

// ------------------------------------------------ the metrics file

const METRICS: &str = "proxy_channel.prom";
/// The name the temporary metrics file used to have.
const OLD_TEMPORARY: &str = "proxy_channel.prom.tmp";

/// Runs a daemon writing metrics into `dir`, where a symbolic link to
/// `link_to` is planted at the old temporary name, until the metrics file
/// has been replaced three times; checks that the link is still there as
/// it was and that no other file was left in `dir`.
fn metrics_beside_a_planted_link(dir: &Path, link_to: &str) {
    let metrics = dir.join(METRICS);
    let planted = dir.join(OLD_TEMPORARY);
    std::os::unix::fs::symlink(dir.join(link_to), &planted).expect("plant the link");
    let metrics_var = metrics.to_str().expect("a UTF-8 path").to_string();
    let mut daemon = Daemon::start(&[
        ("PROXY_METRICS_FILE", &metrics_var),
        ("PROXY_METRICS_INTERVAL", "50ms"),
    ]);
    let mut versions = HashSet::new();
    let replaced = poll_until(secs(10), || {
        if let Ok(m) = fs::symlink_metadata(&metrics) {
            versions.insert(m.ino());
        }
        versions.len() >= 3
    });
    daemon.stop();
    assert!(
        replaced,
        "the metrics file was not replaced three times within 10 s; log:\n{}",
        daemon.stderr_lines().join("\n")
    );
    let text = fs::read_to_string(&metrics).expect("the metrics file");
    assert!(
        text.contains("# TYPE proxy_channel_connections_open gauge\n"),
        "{text}"
    );
    let target = fs::read_link(&planted).expect("the planted link is still a link");
    assert_eq!(target, dir.join(link_to), "the planted link changed");
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list the folder")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let mut expected = vec![link_to, METRICS, OLD_TEMPORARY];
    expected.sort();
    expected.retain(|name| *name != "created-elsewhere");
    assert_eq!(names, expected, "files in the metrics folder");
}

/// Defect 3: a link planted at `<metrics>.tmp` to a message file got that
/// file truncated and overwritten with metrics.
#[test]
fn the_metrics_file_never_writes_through_a_planted_link() {
    const CONTENT: &str = "{\"a message file\":\"that must stay as it is\"}\n";
    let dir = tempfile::tempdir().expect("a folder for the metrics");
    let victim = dir.path().join("messages.jsonl");
    fs::write(&victim, CONTENT).expect("write the victim");
    metrics_beside_a_planted_link(dir.path(), "messages.jsonl");
    assert_eq!(
        fs::read_to_string(&victim).expect("the victim"),
        CONTENT,
        "the file behind the planted link changed"
    );
}

/// A planted link to a name that does not exist creates nothing there.
#[test]
fn the_metrics_file_never_creates_a_file_through_a_planted_link() {
    let dir = tempfile::tempdir().expect("a folder for the metrics");
    metrics_beside_a_planted_link(dir.path(), "created-elsewhere");
    assert!(
        fs::symlink_metadata(dir.path().join("created-elsewhere")).is_err(),
        "a file was created through the planted link"
    );
}
