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
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

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

// ------------------------------------------------ file modes

/// The daemon started by `sh -c 'umask U; exec proxy-channel'`, so that
/// what it creates is created under that umask; its stderr is collected.
/// Dropping it kills the process.
struct UmaskDaemon {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl UmaskDaemon {
    fn start(umask: &str, vars: &[(&str, &str)]) -> UmaskDaemon {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("umask {umask}; exec \"$0\""))
            .arg(BIN);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PROXY_") {
                command.env_remove(&name);
            }
        }
        command
            .env("RUST_LOG", "info")
            .env("PROXY_LISTEN", "127.0.0.1:0");
        command.envs(vars.iter().copied());
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sh -c 'umask ..; exec proxy-channel'");
        let pipe = child.stderr.take().expect("stderr pipe");
        let stderr = collect_lines(pipe);
        let mut daemon = UmaskDaemon {
            child,
            addr: "127.0.0.1:1".parse().unwrap(),
            stderr,
        };
        let mut found = None;
        poll_until(secs(15), || {
            found = daemon.lines().iter().find_map(|line| {
                let (_, rest) = line.split_once("] listening on ")?;
                rest.trim().parse().ok()
            });
            found.is_some()
        });
        daemon.addr = found.unwrap_or_else(|| {
            panic!(
                "the daemon under umask {umask} did not listen within 15 s; stderr:\n{}",
                daemon.lines().join("\n")
            )
        });
        daemon
    }

    fn lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    fn signal(&self, signal: i32) {
        signal_child(self.child.id(), signal);
    }

    /// SIGTERM, and the exit status 0 within 10 s.
    fn stop(&mut self) {
        let stderr = Arc::clone(&self.stderr);
        stop_child(&mut self.child, || stderr.lock().unwrap().clone());
    }
}

impl Drop for UmaskDaemon {
    fn drop(&mut self) {
        // It may have exited already; either way it is gone after `wait`.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// Defect 4: with a umask of 000 the folder was 0777 and the message files
/// 0666, device payloads readable by every local user. Whatever the umask,
/// the folder is created 0750 and the message files 0640 (rotated ones
/// too), and the control socket is 0600.
#[test]
fn the_data_folder_is_0750_and_message_files_0640_whatever_the_umask() {
    for umask in ["000", "077", "022"] {
        let base = tempfile::tempdir().expect("a temporary folder");
        let dir = base.path().join("not").join("yet");
        let data_dir = dir.to_str().expect("a UTF-8 path");
        let mut daemon = UmaskDaemon::start(umask, &[("PROXY_DATA_DIR", data_dir)]);
        let mut device = Device::connect(daemon.addr);
        device.send(b"a device payload");
        let current = dir.join("messages.jsonl");
        let hex_text = hex::encode(b"a device payload");
        wait_until(secs(5), "the payload in the file", || {
            fs::read_to_string(&current).is_ok_and(|t| t.contains(&hex_text))
        });
        daemon.signal(libc::SIGHUP);
        wait_until(secs(5), "a rotated file", || rotated_files(&dir).len() == 1);
        device.send(b"after the rotation");
        let hex_text = hex::encode(b"after the rotation");
        wait_until(secs(5), "a new current file", || {
            fs::read_to_string(&current).is_ok_and(|t| t.contains(&hex_text))
        });
        daemon.stop();
        let rotated = &rotated_files(&dir)[0];
        let modes = [&dir, &current, rotated].map(|path| format!("{:o}", mode_of(path)));
        assert_eq!(
            modes,
            ["750", "640", "640"],
            "umask {umask}: modes of the folder, the current file and the rotated one"
        );
        for entry in fs::read_dir(&dir).expect("list the folder") {
            let path = entry.expect("an entry").path();
            assert_eq!(
                mode_of(&path) & 0o007,
                0,
                "umask {umask}: {} is open to other users ({:o})",
                path.display(),
                mode_of(&path)
            );
        }
    }
}

/// An existing folder's and message file's mode is the operator's choice:
/// each is left as it is, with a warning when every local user can read it.
#[test]
fn an_existing_folder_open_to_everyone_is_kept_with_a_warning() {
    let base = tempfile::tempdir().expect("a temporary folder");
    let dir = base.path().join("shared");
    fs::create_dir(&dir).expect("create the folder");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    let current = dir.join("messages.jsonl");
    fs::write(&current, "").expect("an existing messages.jsonl");
    fs::set_permissions(&current, fs::Permissions::from_mode(0o644)).expect("chmod 0644");
    let data_dir = dir.to_str().expect("a UTF-8 path");
    let mut daemon = UmaskDaemon::start("000", &[("PROXY_DATA_DIR", data_dir)]);
    daemon.stop();
    assert_eq!(mode_of(&dir), 0o755, "the existing folder's mode changed");
    assert_eq!(mode_of(&current), 0o644, "the existing file's mode changed");
    let warnings: Vec<String> = daemon
        .lines()
        .into_iter()
        .filter(|l| l.contains(" WARN ") && l.contains("every local user"))
        .collect();
    assert_eq!(
        warnings.len(),
        2,
        "expected a warning about the open folder and one about the file; stderr:\n{}",
        daemon.lines().join("\n")
    );
    assert!(
        warnings.iter().any(|w| w.contains("data folder")),
        "{warnings:?}"
    );
    let file = current.to_str().expect("a UTF-8 path");
    assert!(warnings.iter().any(|w| w.contains(file)), "{warnings:?}");
    // A private existing folder and file get no warning.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod 0700");
    fs::set_permissions(&current, fs::Permissions::from_mode(0o640)).expect("chmod 0640");
    let mut daemon = UmaskDaemon::start("000", &[("PROXY_DATA_DIR", data_dir)]);
    daemon.stop();
    assert_eq!(mode_of(&dir), 0o700);
    assert!(
        !daemon
            .lines()
            .iter()
            .any(|l| l.contains("every local user")),
        "{:#?}",
        daemon.lines()
    );
}

// ------------------------------------------------ a write error and a cut line

/// Packets whose lines are longer than a page: a write that runs out of
/// room partway always cuts a line.
fn long_lines() -> Pace {
    Pace {
        every: millis(20),
        sizes: 3000..=6000,
        threads: 1,
        limit: secs(30),
    }
}

/// Defect 6: the disk filled up partway through a line; `messages.jsonl`
/// was then removed (an operator freeing room) and the new file began with
/// the rest of the cut line. Here the removed file is kept under another
/// name (a hard link made just before), so that every message can be
/// counted: each file must end on a whole line, every line must parse, and
/// every device's bytes must be there, once, in order.
#[test]
fn a_write_error_leaves_no_cut_line_when_the_file_is_then_removed() {
    if !require(Need::Root, "mount a tmpfs to fill") {
        return;
    }
    let disk = Tmpfs::mount("4m");
    let mut daemon = disk.start_daemon();
    let current = daemon.messages_path();
    let devices: Vec<Device> = (0..4).map(|_| Device::connect(daemon.addr())).collect();
    let load = Load::start(devices, &long_lines(), 6_100);
    wait_until(secs(10), "some lines in the file", || {
        fs::metadata(&current).is_ok_and(|m| m.len() > 64 * 1024)
    });
    let (filler, _) = disk.fill("filler.bin");
    daemon.wait_log("cannot write messages to ", 1, secs(10));

    let kept = disk.path().join("kept.jsonl");
    fs::hard_link(&current, &kept).expect("keep the current file under another name");
    fs::remove_file(&current).expect("remove messages.jsonl");
    daemon.wait_log("was moved or removed; started a new one", 1, secs(10));
    fs::remove_file(&filler).expect("remove the filler");
    let again = format!("writing messages to {} again", current.display());
    daemon.wait_log(&again, 1, secs(10));
    wait_until(secs(10), "lines in the new file", || {
        fs::metadata(&current).is_ok_and(|m| m.len() > 64 * 1024)
    });
    let mut sent = load.finish();
    close_all(&mut sent);
    daemon.stop();

    let log = MessageLog::read_files(&[kept, current]);
    assert!(
        log.unfinished_tail().is_empty(),
        "the new file ends with a cut line"
    );
    log.assert_well_formed();
    assert_eq!(
        log.lines().len(),
        daemon.lines_written(),
        "lines in the files"
    );
    for one in &sent {
        assert_eq!(one.failed, None, "device {} failed to send", one.peer);
        assert!(assert_device_stream(&log, &one.peer, &one.bytes).is_some());
    }
    // Not a test that passed by luck: a line was cut, and put right.
    assert!(
        !daemon
            .log_lines_with("cut short by the failed write")
            .is_empty(),
        "no write failed partway through a line; stderr:\n{}",
        daemon.stderr_lines().join("\n")
    );
}

/// SIGTERM while the disk is full: what cannot be written is given up
/// (and said), but the file is not left with a cut line at its end.
#[test]
fn a_write_error_at_shutdown_leaves_no_cut_line() {
    if !require(Need::Root, "mount a tmpfs to fill") {
        return;
    }
    let disk = Tmpfs::mount("4m");
    let mut daemon = disk.start_daemon();
    let current = daemon.messages_path();
    let devices: Vec<Device> = (0..4).map(|_| Device::connect(daemon.addr())).collect();
    let load = Load::start(devices, &long_lines(), 6_200);
    wait_until(secs(10), "some lines in the file", || {
        fs::metadata(&current).is_ok_and(|m| m.len() > 64 * 1024)
    });
    let (_filler, _) = disk.fill("filler.bin");
    daemon.wait_log("cannot write messages to ", 1, secs(10));
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(secs(20));
    drop(load);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "exit status on a full disk"
    );
    let log = MessageLog::read_files(&[current]);
    assert!(
        log.unfinished_tail().is_empty(),
        "the file ends with a cut line of {} bytes",
        log.unfinished_tail().len()
    );
    log.assert_well_formed();
}

// ------------------------------------------------ view --follow

/// A message line: a device packet of `text` (so `--text` prints `text`).
fn data_line(ident: &str, peer: &str, text: &str) -> String {
    format!(
        "{{\"channel.id\":1,\"protocol.id\":0,\"ident\":\"{ident}\",\"peer\":\"{peer}\",\
         \"proxy.event\":0,\"proxy.source\":0,\"proxy.payload.size\":{},\
         \"proxy.payload.hex\":\"{}\",\"server.timestamp\":1795000000.5,\
         \"timestamp\":1795000000.5}}\n",
        text.len(),
        hex::encode(text)
    )
}

fn packet_line(n: usize) -> String {
    data_line("00000000000000aa", "127.0.0.1:4000", &format!("packet {n}"))
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// A `proxy-channel view ARGS` process whose stdout lines are collected.
/// Dropping it kills the process.
struct Viewer {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Viewer {
    fn start(args: &[&str]) -> Viewer {
        let mut child = daemon_command(&[("TZ", "UTC")])
            .arg("view")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start proxy-channel view");
        let pipe = child.stdout.take().expect("stdout pipe");
        let stdout = collect_lines(pipe);
        Viewer { child, stdout }
    }

    fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn wait_for_line(&self, line: &str) {
        let shown = poll_until(secs(5), || self.lines().iter().any(|l| l == line));
        assert!(
            shown,
            "the viewer did not print {line:?} within 5 s; it printed:\n{}",
            self.lines().join("\n")
        );
    }

    fn signal(&self, signal: i32) {
        signal_child(self.child.id(), signal);
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Defect 7: two rotations between two looks of `view --follow`, and the
/// file rotated in between was never shown. The viewer is stopped
/// (SIGSTOP) while the files are rotated as the writer does it, so that
/// both rotations certainly fall between two of its looks.
#[test]
fn view_follow_shows_every_file_of_several_rotations_between_two_looks() {
    let dir = tempfile::tempdir().expect("a data folder");
    let current = dir.path().join("messages.jsonl");
    append(&current, &packet_line(1));
    let folder = dir.path().to_str().expect("a UTF-8 path");
    let viewer = Viewer::start(&["--follow", "--text", folder]);
    viewer.wait_for_line("packet 1");

    viewer.signal(libc::SIGSTOP);
    let rotate = |name: &str| {
        fs::rename(&current, dir.path().join(name)).expect("rotate");
    };
    append(&current, &packet_line(2));
    rotate("messages-20261118T110640Z.jsonl");
    append(&current, &packet_line(3));
    append(&current, &packet_line(4));
    rotate("messages-20261118T110640Z_001.jsonl");
    append(&current, &packet_line(5));
    rotate("messages-20261118T110641Z.jsonl");
    append(&current, &packet_line(6));
    viewer.signal(libc::SIGCONT);

    viewer.wait_for_line("packet 6");
    append(&current, &packet_line(7));
    viewer.wait_for_line("packet 7");
    let payloads: Vec<String> = viewer
        .lines()
        .into_iter()
        .filter(|l| !l.contains("device>"))
        .collect();
    let expected: Vec<String> = (1..=7).map(|n| format!("packet {n}")).collect();
    assert_eq!(
        payloads,
        expected,
        "every packet once, in order; the viewer printed:\n{}",
        viewer.lines().join("\n")
    );
}

// ------------------------------------------------ control characters in view

/// The control characters of `text` (C0 but the newline, DEL, C1).
fn control_characters(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect()
}

/// Defect 9: a crafted message file renamed the terminal (OSC), cleared
/// the screen (CSI, also as the one-character C1 CSI), and forged a line
/// with a CR. `view` must print every field it takes from a file with its
/// control characters escaped, in every format, and in its reports of
/// foreign lines too.
#[test]
fn view_prints_no_control_character_from_a_file() {
    let dir = tempfile::tempdir().expect("a folder");
    let file = dir.path().join("crafted.jsonl");
    // JSON escapes for C0; DEL and C1 may stand in a JSON string as they are.
    let lines = [
        "{\"channel.id\":1,\"protocol.id\":0,\"ident\":\"\\u001b]0;pwned\\u0007\",\
         \"peer\":\"\\u001b[2J\u{9b}2J\",\"proxy.event\":1,\"proxy.source\":1,\
         \"server.timestamp\":1795000000.5,\"timestamp\":1795000000.5,\
         \"proxy.target\":\"gps\u{7f}\\u001b[1A.example.com:1\"}",
        "{\"channel.id\":1,\"protocol.id\":0,\"ident\":\"00000000000000aa\",\
         \"peer\":\"127.0.0.1:4000\",\"proxy.event\":2,\"proxy.source\":0,\
         \"server.timestamp\":1795000000.5,\"timestamp\":1795000000.5,\
         \"proxy.reason\":\"closed\\r2026-11-18 11:06:40.000  forged  line\\u001b[K\",\
         \"proxy.bytes.received\":0,\"proxy.bytes.sent\":0}",
        "{\"channel.id\":1,\"protocol.id\":0,\"ident\":\"00000000000000aa\",\
         \"peer\":\"127.0.0.1:4000\",\"proxy.event\":0,\"proxy.source\":0,\
         \"proxy.payload.size\":5,\"proxy.payload.hex\":\"1b5b324a0d\",\
         \"server.timestamp\":1795000000.5,\"timestamp\":1795000000.5}",
        // Foreign lines: the error reports quote what they found.
        "{\"channel.id\":\"\\u001b]0;title\\u0007\",\"x\":1}",
        "{\"channel.id\":1,\"protocol.id\":0,\"ident\":\"a\",\"peer\":\"b\",\
         \"proxy.event\":0,\"proxy.source\":0,\"proxy.payload.hex\":\"\u{9b}2J\\u001b\",\
         \"server.timestamp\":1,\"timestamp\":1}",
        "\u{1b}]0;not json at all\u{7}\r",
        // CR as JSON whitespace: `--json` must not pass it through.
        "{\"channel.id\":1,\r\"protocol.id\":0,\"ident\":\"\u{7f}\u{85}\",\"peer\":\"b\",\
         \"proxy.event\":1,\"proxy.source\":0,\"server.timestamp\":1,\"timestamp\":1}",
    ];
    fs::write(&file, lines.join("\n") + "\n").expect("write the crafted file");
    let path = file.to_str().expect("a UTF-8 path");
    for format in [&[][..], &["--text"], &["--json"]] {
        let args: Vec<&str> = ["view"]
            .iter()
            .chain(format)
            .chain(&[path])
            .copied()
            .collect();
        let run = run_to_exit(&args, &[("TZ", "UTC")], secs(10));
        for (name, output) in [("stdout", &run.stdout), ("stderr", &run.stderr)] {
            assert_eq!(
                control_characters(output),
                [],
                "view {format:?}: control characters on {name}:\n{output:?}"
            );
        }
        assert_eq!(
            run.stdout.lines().filter(|l| l.contains("forged")).count(),
            1,
            "the forged line is part of one line:\n{}",
            run.stdout
        );
        if format.is_empty() {
            for escaped in [
                "\\x1b]0;pwned\\x07",
                "\\x1b[2J\\u{9b}2J",
                "gps\\x7f\\x1b[1A.example.com:1",
                "closed\\r2026-11-18 11:06:40.000  forged  line\\x1b[K",
            ] {
                assert!(
                    run.stdout.contains(escaped),
                    "expected {escaped:?} in:\n{}",
                    run.stdout
                );
            }
        }
        if format == ["--json"] {
            // Still the same JSON, escaped the JSON way.
            for line in run.stdout.lines() {
                let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("--json printed a line that is not JSON ({e}): {line:?}")
                });
                assert!(value.is_object(), "{line}");
            }
            assert!(
                run.stdout
                    .contains("\"gps\\u007f\\u001b[1A.example.com:1\""),
                "{}",
                run.stdout
            );
        }
    }
}
