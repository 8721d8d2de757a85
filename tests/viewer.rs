//! Issue 5, the traffic viewer: `proxy-channel view` prints a recorded
//! session as exact headers and `hexdump -C` lines (or escaped text, or the
//! lines unchanged with `--json`), each filter selects exactly the expected
//! messages, a folder is read oldest file first, `--follow` goes on across a
//! SIGHUP rotation of a real daemon, colour shows only on a terminal, and bad
//! input gives one clear message and the documented exit status.
//!
//! The golden input is `tests/fixtures/view_session.jsonl`: three device
//! connections (one with text, binary and an unstored payload, one on IPv6,
//! one idle) with target events and replies. Times are printed in TZ=UTC.

mod util;

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Instant;

use util::*;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/view_session.jsonl"
);

/// `view` of the whole fixture, in TZ=UTC.
const GOLDEN_HEX: &str = "\
2026-11-18 11:06:40.123  9798c659ed9c141e  127.0.0.1:46090  device>    connected
2026-11-18 11:06:40.124  9798c659ed9c141e  127.0.0.1:46090  target 1>  connected to 127.0.0.1:21000
2026-11-18 11:06:40.124  9798c659ed9c141e  127.0.0.1:46090  target 2>  disconnected: connect failed: connection refused (received 0 B, sent 0 B)
2026-11-18 11:06:40.130  9798c659ed9c141e  127.0.0.1:46090  device>    data 40 B
00000000  47 45 54 20 2f 73 74 61  74 75 73 20 48 54 54 50  |GET /status HTTP|
00000010  2f 31 2e 31 0d 0a 48 6f  73 74 3a 20 6d 65 74 65  |/1.1..Host: mete|
00000020  72 2d 31 37 0d 0a 0d 0a                           |r-17....|
2026-11-18 11:06:40.131  9798c659ed9c141e  127.0.0.1:46090  <target 1  data 40 B
00000000  48 54 54 50 2f 31 2e 31  20 32 30 30 20 4f 4b 0d  |HTTP/1.1 200 OK.|
00000010  0a 43 6f 6e 74 65 6e 74  2d 4c 65 6e 67 74 68 3a  |.Content-Length:|
00000020  20 32 0d 0a 0d 0a 6f 6b                           | 2....ok|
2026-11-18 11:06:40.250  9798c659ed9c141e  127.0.0.1:46090  device>    data 31 B
00000000  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  |................|
00000010  7e 7f 80 fe ff 20 5c 09  22 7b 7d 1b 5b 30 6d     |~.... \\.\"{}.[0m|
2026-11-18 11:06:40.500  00abcdef01234567  [::1]:4000  device>    connected
2026-11-18 11:06:40.500  00abcdef01234567  [::1]:4000  target 1>  connected to 127.0.0.1:21000
2026-11-18 11:06:41.000  9798c659ed9c141e  127.0.0.1:46090  device>    data 3145728 B (payload not stored)
2026-11-18 11:06:41.200  00abcdef01234567  [::1]:4000  device>    data 3 B
00000000  68 69 0a                                          |hi.|
2026-11-18 11:06:41.200  00abcdef01234567  [::1]:4000  <target 1  data 3 B
00000000  48 49 0a                                          |HI.|
2026-11-18 11:06:42.000  9798c659ed9c141e  127.0.0.1:46090  target 1>  disconnected: closed by peer (received 40 B, sent 3145799 B)
2026-11-18 11:06:42.000  9798c659ed9c141e  127.0.0.1:46090  device>    disconnected: closed by peer (received 3145799 B, sent 40 B)
2026-11-18 11:06:43.000  c0ffee0000000001  127.0.0.1:51000  device>    connected
2026-11-18 11:07:41.250  00abcdef01234567  [::1]:4000  target 1>  disconnected: reset by peer (received 3 B, sent 3 B)
2026-11-18 11:07:41.250  00abcdef01234567  [::1]:4000  device>    disconnected: mandatory target 1 failed (received 3 B, sent 3 B)
2026-11-18 11:16:43.000  c0ffee0000000001  127.0.0.1:51000  device>    disconnected: idle timeout (received 0 B, sent 0 B)
";

/// `view --text --ident 9798c659ed9c141e --event data` of the fixture.
const GOLDEN_TEXT: &str = "\
2026-11-18 11:06:40.130  9798c659ed9c141e  127.0.0.1:46090  device>    data 40 B
GET /status HTTP/1.1\\r\\nHost: meter-17\\r\\n\\r\\n
2026-11-18 11:06:40.131  9798c659ed9c141e  127.0.0.1:46090  <target 1  data 40 B
HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok
2026-11-18 11:06:40.250  9798c659ed9c141e  127.0.0.1:46090  device>    data 31 B
\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07\\x08\\t\\n\\x0b\\x0c\\r\\x0e\\x0f~\\x7f\\x80\\xfe\\xff \\\\\\t\"{}\\x1b[0m
2026-11-18 11:06:41.000  9798c659ed9c141e  127.0.0.1:46090  device>    data 3145728 B (payload not stored)
";

/// Runs `proxy-channel view ARGS` to its end with `vars`.
fn view(args: &[&str], vars: &[(&str, &str)]) -> Finished {
    let all: Vec<&str> = ["view"].iter().chain(args).copied().collect();
    run_to_exit(&all, vars, secs(10))
}

/// Fails with the first differing line (numbered) when two texts differ.
fn assert_same_text(what: &str, expected: &str, seen: &str) {
    if expected == seen {
        return;
    }
    let (expected_lines, seen_lines): (Vec<_>, Vec<_>) =
        (expected.lines().collect(), seen.lines().collect());
    let first = expected_lines
        .iter()
        .zip(&seen_lines)
        .position(|(a, b)| a != b)
        .unwrap_or(expected_lines.len().min(seen_lines.len()));
    panic!(
        "{what}: expected {} lines, saw {}; first difference at line {}:\n  expected {:?}\n  saw      {:?}\nwhole output:\n{seen}",
        expected_lines.len(),
        seen_lines.len(),
        first + 1,
        expected_lines.get(first),
        seen_lines.get(first),
    );
}

/// Fails unless the run exited 0 with an empty stderr.
fn assert_clean_exit(what: &str, run: &Finished) {
    assert!(
        run.status.success() && run.stderr.is_empty(),
        "{what}: expected exit 0 and nothing on stderr, saw {} and stderr:\n{}",
        run.status,
        run.stderr
    );
}

fn fixture_lines() -> Vec<String> {
    fs::read_to_string(FIXTURE)
        .expect("read the fixture")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_recorded_session_prints_exact_headers_and_hex_dump_lines() {
    let run = view(&[FIXTURE], &[UTC]);
    assert_clean_exit("view of the fixture", &run);
    assert_same_text("view of the fixture", GOLDEN_HEX, &run.stdout);

    // Not a terminal: no colour, whether asked or not.
    let no_color = view(&["--no-color", FIXTURE], &[UTC, ("NO_COLOR", "1")]);
    assert_clean_exit("view --no-color", &no_color);
    assert_same_text("view --no-color", GOLDEN_HEX, &no_color.stdout);

    // The header's time is local time: TZ decides (a POSIX zone 5:30 east).
    let east = view(
        &["--source", "0", "--event", "1", FIXTURE],
        &[("TZ", "XYZ-5:30")],
    );
    assert_clean_exit("view in TZ=XYZ-5:30", &east);
    assert_eq!(
        east.stdout.lines().next(),
        Some("2026-11-18 16:36:40.123  9798c659ed9c141e  127.0.0.1:46090  device>    connected"),
        "the first header 5:30 east of UTC"
    );
}

#[test]
fn text_shows_payloads_as_escaped_text() {
    let run = view(
        &[
            "--text",
            "--ident",
            "9798c659ed9c141e",
            "--event",
            "data",
            FIXTURE,
        ],
        &[UTC],
    );
    assert_clean_exit("view --text", &run);
    assert_same_text("view --text", GOLDEN_TEXT, &run.stdout);
}

#[test]
fn filters_select_exactly_the_expected_messages() {
    let lines = fixture_lines();
    assert_eq!(lines.len(), 17, "the fixture's line count");
    const A: &[usize] = &[1, 2, 3, 4, 5, 6, 9, 12, 13];
    const B: &[usize] = &[7, 8, 10, 11, 15, 16];
    const C: &[usize] = &[14, 17];
    let all: Vec<usize> = (1..=17).collect();
    let a_and_c: Vec<usize> = (1..=17).filter(|n| !B.contains(n)).collect();
    // Each case: the filter options and the fixture lines (1-based) that
    // must come out, in file order.
    let cases: Vec<(Vec<&str>, Vec<usize>)> = vec![
        (vec![], all),
        (vec!["--ident", "9798c659ed9c141e"], A.to_vec()),
        (vec!["--ident", "9798C659ED9C141E"], A.to_vec()),
        (vec!["--ident", "00abcdef01234567"], B.to_vec()),
        (vec!["--ident", "0000000000000000"], vec![]),
        (vec!["--peer", "127.0.0.1:46090"], A.to_vec()),
        (vec!["--peer", "127.0.0.1:51000"], C.to_vec()),
        (vec!["--peer", "127.0.0.1"], a_and_c),
        (vec!["--peer", "127.0.0.1:4000"], vec![]),
        (vec!["--peer", "[::1]:4000"], B.to_vec()),
        (vec!["--peer", "::1"], B.to_vec()),
        (vec!["--peer", "10.0.0.9"], vec![]),
        (
            vec!["--source", "0"],
            vec![1, 4, 6, 7, 9, 10, 13, 14, 16, 17],
        ),
        (vec!["--source", "1"], vec![2, 5, 8, 11, 12, 15]),
        (vec!["--source", "2"], vec![3]),
        (vec!["--source", "3"], vec![]),
        (vec!["--event", "0"], vec![4, 5, 6, 9, 10, 11]),
        (vec!["--event", "data"], vec![4, 5, 6, 9, 10, 11]),
        (vec!["--event", "1"], vec![1, 2, 7, 8, 14]),
        (vec!["--event", "connected"], vec![1, 2, 7, 8, 14]),
        (vec!["--event", "2"], vec![3, 12, 13, 15, 16, 17]),
        (vec!["--event", "disconnected"], vec![3, 12, 13, 15, 16, 17]),
        // Line 7 is at exactly 11:06:40.500: --since includes it, --until
        // does not.
        (
            vec!["--since", "2026-11-18T11:06:40.5Z"],
            (7..=17).collect(),
        ),
        (vec!["--until", "2026-11-18T11:06:40.5Z"], (1..=6).collect()),
        // An offset is honoured; line 13 is at exactly 11:06:42.000125.
        (
            vec![
                "--since",
                "2026-11-18T12:06:41+01:00",
                "--until",
                "2026-11-18T11:06:42.000125Z",
            ],
            vec![9, 10, 11, 12],
        ),
        (
            vec![
                "--ident",
                "9798c659ed9c141e",
                "--source",
                "0",
                "--event",
                "data",
            ],
            vec![4, 6, 9],
        ),
        (
            vec![
                "--peer",
                "127.0.0.1",
                "--event",
                "disconnected",
                "--since",
                "2026-11-18T11:06:42Z",
            ],
            vec![12, 13, 17],
        ),
        (vec!["--peer", "::1", "--source", "2"], vec![]),
    ];
    for (options, expected) in cases {
        let mut args = vec!["--json"];
        args.extend(&options);
        args.push(FIXTURE);
        let run = view(&args, &[UTC]);
        assert_clean_exit(&format!("view {options:?}"), &run);
        let seen: Vec<usize> = run
            .stdout
            .lines()
            .map(|line| {
                1 + lines.iter().position(|l| l == line).unwrap_or_else(|| {
                    panic!("view --json {options:?} printed a line not in the fixture: {line}")
                })
            })
            .collect();
        assert_eq!(
            seen, expected,
            "view --json {options:?}: expected these fixture lines, saw others"
        );
    }
}

#[test]
fn filters_also_select_in_the_hex_format() {
    let run = view(&["--peer", "::1", "--source", "0", FIXTURE], &[UTC]);
    assert_clean_exit("view --peer ::1 --source 0", &run);
    let expected = "\
2026-11-18 11:06:40.500  00abcdef01234567  [::1]:4000  device>    connected
2026-11-18 11:06:41.200  00abcdef01234567  [::1]:4000  device>    data 3 B
00000000  68 69 0a                                          |hi.|
2026-11-18 11:07:41.250  00abcdef01234567  [::1]:4000  device>    disconnected: mandatory target 1 failed (received 3 B, sent 3 B)
";
    assert_same_text("view --peer ::1 --source 0", expected, &run.stdout);
}

/// One message line of `ident` at `time` (seconds since the epoch).
fn connected_line(ident: &str, time: f64) -> String {
    format!(
        r#"{{"channel.id":1,"protocol.id":0,"ident":"{ident}","peer":"127.0.0.1:40000","proxy.event":1,"proxy.source":0,"server.timestamp":{time:.6},"timestamp":{time:.6}}}"#
    )
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64()
}

#[test]
fn since_and_until_take_durations_back_from_now() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relative.jsonl");
    let now = now_seconds();
    let lines = [
        connected_line("0000000000000001", now - 7200.0),
        connected_line("0000000000000002", now - 1800.0),
        connected_line("0000000000000003", now - 300.0),
    ];
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    let file = path.to_str().unwrap();
    let cases: [(&[&str], &[usize]); 5] = [
        (&["--since", "15m"], &[3]),
        (&["--since", "1h"], &[2, 3]),
        (&["--until", "1h"], &[1]),
        (&["--since", "1h", "--until", "15m"], &[2]),
        (&["--since", "3h"], &[1, 2, 3]),
    ];
    for (options, expected) in cases {
        let mut args = vec!["--json"];
        args.extend(options);
        args.push(file);
        let run = view(&args, &[UTC]);
        assert_clean_exit(&format!("view {options:?}"), &run);
        let want: Vec<&str> = expected.iter().map(|n| lines[n - 1].as_str()).collect();
        let seen: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(seen, want, "view --json {options:?}");
    }
}

#[test]
fn a_folder_is_read_rotated_files_oldest_first_then_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    // Written newest first, so that neither creation order nor the
    // messages' times can explain the order seen; only the names can.
    let files = [
        ("messages.jsonl", "0000000000000004", 1.0),
        ("messages-20261118T120000Z.jsonl", "0000000000000003", 2.0),
        (
            "messages-20261118T110000Z_001.jsonl",
            "0000000000000002",
            3.0,
        ),
        ("messages-20261118T110000Z.jsonl", "0000000000000001", 4.0),
        ("notes.jsonl", "00000000000000ff", 5.0),
        ("messages-old.jsonl", "00000000000000fe", 6.0),
    ];
    for (name, ident, time) in files {
        fs::write(
            dir.path().join(name),
            connected_line(ident, 1_795_000_000.0 + time) + "\n",
        )
        .unwrap();
    }
    let folder = dir.path().to_str().unwrap();
    let idents = |run: &Finished| -> Vec<String> {
        run.stdout
            .lines()
            .map(|line| line.split("  ").nth(1).unwrap_or(line).to_string())
            .collect()
    };
    let expected = [
        "0000000000000001",
        "0000000000000002",
        "0000000000000003",
        "0000000000000004",
    ];

    let named = view(&[folder], &[UTC]);
    assert_clean_exit("view FOLDER", &named);
    assert_eq!(idents(&named), expected, "idents of view FOLDER, in order");

    // No path: $PROXY_DATA_DIR.
    let default = view(&[], &[UTC, ("PROXY_DATA_DIR", folder)]);
    assert_clean_exit("view with PROXY_DATA_DIR", &default);
    assert_eq!(
        idents(&default),
        expected,
        "idents of view with PROXY_DATA_DIR, in order"
    );

    // Files are read in the order given; a folder among them as above.
    let notes = dir.path().join("notes.jsonl");
    let mixed = view(&[notes.to_str().unwrap(), folder], &[UTC]);
    assert_clean_exit("view FILE FOLDER", &mixed);
    let mut with_notes = vec!["00000000000000ff"];
    with_notes.extend(expected);
    assert_eq!(idents(&mixed), with_notes, "idents of view FILE FOLDER");
}

#[test]
fn cut_off_and_foreign_lines_are_reported_and_skipped() {
    let fixture = fixture_lines();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("messages.jsonl");
    let cut = &fixture[3][..fixture[3].len() / 2];
    let bad_hex = fixture[9].replace("\"68690a\"", "\"68zz0a\"");
    let odd_hex = fixture[9].replace("\"68690a\"", "\"68690\"");
    let body = [
        fixture[0].as_str(),    // 1 shown
        r#"{"hello":"world"}"#, // 2 JSON, not ours
        "GET / HTTP/1.1",       // 3 not JSON
        fixture[6].as_str(),    // 4 shown
        bad_hex.as_str(),       // 5 a message with bad hex
        cut,                    // 6 cut short, ended by a restart
        "[1,2,3]",              // 7 JSON, not an object
        odd_hex.as_str(),       // 8 hex with an odd length
        fixture[16].as_str(),   // 9 shown
        &fixture[12][..40],     // 10 the last line, cut short
    ]
    .join("\n");
    fs::write(&path, body).unwrap();
    let file = path.to_str().unwrap();

    let run = view(&[file], &[UTC]);
    assert!(
        run.status.success(),
        "bad lines are skipped, not fatal: expected exit 0, saw {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    let expected_stdout = "\
2026-11-18 11:06:40.123  9798c659ed9c141e  127.0.0.1:46090  device>    connected
2026-11-18 11:06:40.500  00abcdef01234567  [::1]:4000  device>    connected
2026-11-18 11:16:43.000  c0ffee0000000001  127.0.0.1:51000  device>    disconnected: idle timeout (received 0 B, sent 0 B)
";
    assert_same_text(
        "the messages around the bad lines",
        expected_stdout,
        &run.stdout,
    );
    let expected_why = [
        (2, "not a message"),
        (3, "not a message"),
        (5, "bad proxy.payload.hex"),
        (6, "not a message"),
        (7, "not a message"),
        (8, "bad proxy.payload.hex"),
        (10, "cut short"),
    ];
    let reports: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        reports.len(),
        expected_why.len(),
        "one stderr line per bad line, saw:\n{}",
        run.stderr
    );
    for ((number, why), report) in expected_why.iter().zip(&reports) {
        let start = format!("proxy-channel view: {file}:{number}: skipped: {why}");
        assert!(
            report.starts_with(&start),
            "expected a report starting {start:?}, saw {report:?}"
        );
    }

    // --json passes messages through unchanged; the lines with bad hex
    // are messages, so each is either passed through or reported.
    let json = view(&["--json", file], &[UTC]);
    assert!(json.status.success(), "view --json: {}", json.status);
    let printed: Vec<&str> = json.stdout.lines().collect();
    let reported: Vec<&str> = json
        .stderr
        .lines()
        .map(|r| r.split(':').nth(2).unwrap_or("?"))
        .collect();
    let printed_good: Vec<&str> = printed
        .iter()
        .copied()
        .filter(|l| *l != bad_hex && *l != odd_hex)
        .collect();
    assert_eq!(
        printed_good,
        [
            fixture[0].as_str(),
            fixture[6].as_str(),
            fixture[16].as_str()
        ],
        "view --json of the file with bad lines: the good lines unchanged"
    );
    for (number, line) in [
        (2, ""),
        (3, ""),
        (5, &*bad_hex),
        (6, ""),
        (7, ""),
        (8, &*odd_hex),
        (10, ""),
    ] {
        let was_reported = reported.contains(&number.to_string().as_str());
        let was_printed = !line.is_empty() && printed.contains(&line);
        assert!(
            was_reported != was_printed,
            "view --json: line {number} must be either reported or printed unchanged, once; \
             stdout:\n{}\nstderr:\n{}",
            json.stdout,
            json.stderr
        );
    }
    assert_eq!(
        reported.len() + printed.len(),
        10,
        "view --json: every line printed or reported once; stdout:\n{}\nstderr:\n{}",
        json.stdout,
        json.stderr
    );
}

#[test]
fn a_missing_folder_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-data");
    let missing = missing.to_str().unwrap();
    let expected = format!("proxy-channel: cannot read {missing}: No such file or directory");
    for (args, vars) in [
        (vec![missing], vec![UTC]),
        (vec!["--follow", missing], vec![UTC]),
        (vec![], vec![UTC, ("PROXY_DATA_DIR", missing)]),
        (vec![FIXTURE, missing], vec![UTC]),
    ] {
        let run = view(&args, &vars);
        assert_eq!(
            run.status.code(),
            Some(1),
            "view {args:?} {vars:?}: expected exit 1, saw {}; stderr:\n{}",
            run.status,
            run.stderr
        );
        assert!(
            run.stderr.lines().count() == 1 && run.stderr.starts_with(&expected),
            "view {args:?} {vars:?}: expected one line starting {expected:?}, saw:\n{}",
            run.stderr
        );
        assert!(
            run.stdout.is_empty(),
            "view {args:?}: expected nothing on stdout, saw:\n{}",
            run.stdout
        );
    }
}

#[test]
fn a_bad_filter_value_is_a_usage_error_naming_option_and_value() {
    let cases: [(&[&str], &str); 9] = [
        (&["--source", "4"], "--source \"4\""),
        (&["--source", "device"], "--source \"device\""),
        (&["--event", "3"], "--event \"3\""),
        (&["--event", "sent"], "--event \"sent\""),
        (&["--since", "soon"], "--since \"soon\""),
        (
            &["--since", "2026-13-01T00:00:00Z"],
            "--since \"2026-13-01T00:00:00Z\"",
        ),
        (&["--until", "15 minutes"], "--until \"15 minutes\""),
        (&["--until", "-5m"], "--until \"-5m\""),
        (&["--colour", "always"], "--colour"),
    ];
    for (options, named) in cases {
        let mut args = options.to_vec();
        args.push(FIXTURE);
        let run = view(&args, &[UTC]);
        assert_eq!(
            run.status.code(),
            Some(2),
            "view {options:?}: expected exit 2, saw {}; stderr:\n{}",
            run.status,
            run.stderr
        );
        assert!(
            run.stderr.lines().count() == 1 && run.stderr.contains(named),
            "view {options:?}: expected one stderr line naming {named}, saw:\n{}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("panicked") && run.stdout.is_empty(),
            "view {options:?}: expected no output and no panic, saw stdout:\n{}\nstderr:\n{}",
            run.stdout,
            run.stderr
        );
    }
}

// ---------------------------------------------------------------- --follow

/// Sends `text` in one write and, when `close`, ends the device's side and
/// waits for the daemon to close.
fn send_text(device: &mut Device, text: &str, close: bool) {
    device.send(text.as_bytes());
    if close {
        device.shutdown_write();
        let end = device.read_until_end(secs(5)).end;
        assert_eq!(
            end,
            End::Eof,
            "device {}: the daemon's close",
            device.name()
        );
    }
}

fn rotated_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .expect("read the data folder")
        .map(|e| e.expect("a folder entry").path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("messages-") && name.ends_with(".jsonl")
        })
        .collect()
}

fn connected(device: &Device) -> String {
    format!("  {}  device>    connected", device.name())
}

fn data(device: &Device, text: &str) -> String {
    format!("  {}  device>    data {} B", device.name(), text.len())
}

fn closed(device: &Device) -> String {
    format!(
        "  {}  device>    disconnected: closed by peer",
        device.name()
    )
}

/// Fails unless each of `expected` is in exactly one printed line, in this
/// order, and nothing else was printed.
fn assert_each_once_in_order(what: &str, lines: &[String], expected: &[String]) {
    let mut last_index = None;
    for wanted in expected {
        let at: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(wanted.as_str()))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            at.len(),
            1,
            "{what}: expected exactly one line with {wanted:?}, saw {}:\n{}",
            at.len(),
            lines.join("\n")
        );
        assert!(
            last_index.is_none_or(|last| at[0] > last),
            "{what}: {wanted:?} is out of order:\n{}",
            lines.join("\n")
        );
        last_index = Some(at[0]);
    }
    assert_eq!(
        lines.len(),
        expected.len(),
        "{what}: other lines were printed too:\n{}",
        lines.join("\n")
    );
}

#[test]
fn follow_prints_new_messages_also_across_a_sighup_rotation() {
    let daemon = Daemon::start(&[("PROXY_ROTATE_SIZE", "1GiB")]);
    let dir = daemon.data_dir().to_str().unwrap().to_string();
    let mut viewer = Follower::start(&["--follow", "--text", &dir]);
    viewer.wait_until_following();

    // Device 1 connects and sends while the viewer follows, and stays
    // connected across the rotation.
    let mut first = Device::connect(daemon.addr());
    send_text(&mut first, "written while following", false);
    viewer.wait_for_line_with("written while following", secs(5));

    daemon.signal(libc::SIGHUP);
    wait_until(secs(5), "a rotated file after SIGHUP", || {
        rotated_files(daemon.data_dir()).len() == 1
    });
    send_text(&mut first, "after the rotation", true);
    viewer.wait_for_line_with("after the rotation", secs(5));
    let mut second = Device::connect(daemon.addr());
    send_text(&mut second, "a second device says hi", true);
    viewer.wait_for_line_with("a second device says hi", secs(5));
    viewer.wait_for_line_with(&closed(&first), secs(5));
    viewer.wait_for_line_with(&closed(&second), secs(5));

    let expected = [
        connected(&first),
        data(&first, "written while following"),
        "written while following".to_string(),
        data(&first, "after the rotation"),
        "after the rotation".to_string(),
        closed(&first),
        connected(&second),
        data(&second, "a second device says hi"),
        "a second device says hi".to_string(),
        closed(&second),
    ];
    assert_each_once_in_order("view --follow", &viewer.lines(), &expected);
    let stderr = viewer.stderr();
    assert!(stderr.is_empty(), "view --follow stderr: {stderr:#?}");
    daemon.assert_no_errors();
}

/// What is in the current file when `--follow` starts is shown once, then
/// what comes after; for a folder and for the file named.
#[test]
fn follow_shows_what_was_there_at_the_start_once() {
    let daemon = Daemon::start(&[("PROXY_ROTATE_SIZE", "1GiB")]);
    let mut before = Device::connect(daemon.addr());
    send_text(&mut before, "before the viewer", true);
    let mut log = daemon.log();
    let ident = log.wait_ident(before.name(), secs(5));
    log.wait_reason(&ident, 0, secs(5));

    let folder = daemon.data_dir().to_str().unwrap().to_string();
    let file = daemon.messages_path().to_str().unwrap().to_string();
    let mut viewers = [
        Follower::start(&["--follow", "--text", &folder]),
        Follower::start(&["--follow", "--text", &file]),
    ];
    for viewer in &mut viewers {
        viewer.wait_for_line_with(&closed(&before), secs(5));
        viewer.wait_until_following();
    }
    let mut after = Device::connect(daemon.addr());
    send_text(&mut after, "after the viewer started", true);
    let expected = [
        connected(&before),
        data(&before, "before the viewer"),
        "before the viewer".to_string(),
        closed(&before),
        connected(&after),
        data(&after, "after the viewer started"),
        "after the viewer started".to_string(),
        closed(&after),
    ];
    for (viewer, path) in viewers.iter_mut().zip([&folder, &file]) {
        viewer.wait_for_line_with(&closed(&after), secs(5));
        assert_each_once_in_order(&format!("view --follow {path}"), &viewer.lines(), &expected);
    }
}

// ---------------------------------------------------------------- colour

/// Runs `view ARGS` with its stdout on a new pseudo-terminal and returns
/// its exit status and what the terminal showed (with `\r\n` as `\n`).
fn view_on_terminal(args: &[&str], no_color: Option<&str>) -> (ExitStatus, String) {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a descriptor we
    // own; the name buffer's length is passed along.
    let (master, slave_path) = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            fd >= 0,
            "posix_openpt failed: {}",
            std::io::Error::last_os_error()
        );
        let master = OwnedFd::from_raw_fd(fd);
        assert_eq!(libc::grantpt(fd), 0, "grantpt failed");
        assert_eq!(libc::unlockpt(fd), 0, "unlockpt failed");
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(fd, name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r failed"
        );
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_str()
            .unwrap()
            .to_string();
        (master, path)
    };
    let slave = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)
        .unwrap_or_else(|e| panic!("cannot open the terminal {slave_path}: {e}"));
    let mut command = daemon_command(&[UTC]);
    command.env_remove("NO_COLOR");
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    let mut child = command
        .arg("view")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::null())
        .spawn()
        .expect("start proxy-channel view on a terminal");
    // Our copy of the terminal's end must close, or reading never ends.
    drop(command);

    let deadline = Instant::now() + secs(10);
    let mut shown = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        let mut poll_fd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its count passed along.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, 100) };
        if ready <= 0 {
            continue;
        }
        // SAFETY: reading into a buffer we own, its length passed along.
        let n = unsafe {
            libc::read(
                master.as_raw_fd(),
                buffer.as_mut_ptr().cast::<libc::c_void>(),
                buffer.len(),
            )
        };
        if n <= 0 {
            break; // EIO: the viewer closed the terminal.
        }
        shown.extend_from_slice(&buffer[..n as usize]);
    }
    let status = match poll_until(secs(5), || child.try_wait().unwrap().is_some()) {
        true => child.wait().unwrap(),
        false => {
            let _ = child.kill();
            panic!("view {args:?} on a terminal did not exit");
        }
    };
    let text = String::from_utf8(shown).expect("UTF-8 output");
    (status, text.replace("\r\n", "\n"))
}

/// `text` without `ESC [ ... m` sequences.
fn strip_colour(text: &str) -> String {
    let mut plain = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("\x1b[") {
        plain.push_str(&rest[..at]);
        let after = &rest[at..];
        let end = after.find('m').expect("a colour sequence ends with m");
        rest = &after[end + 1..];
    }
    plain.push_str(rest);
    plain
}

/// The colour sequence a header line starts with, if any.
fn colour_of(line: &str) -> Option<&str> {
    line.strip_prefix("\x1b[")
        .and_then(|rest| rest.find('m'))
        .map(|end| &line[..end + 3])
}

#[test]
fn colour_shows_on_a_terminal_unless_no_color_or_no_color_option() {
    let (status, coloured) = view_on_terminal(&[FIXTURE], None);
    assert!(status.success(), "view on a terminal: {status}");
    assert_same_text(
        "view on a terminal, colours removed",
        GOLDEN_HEX,
        &strip_colour(&coloured),
    );
    let colour_of_side = |side: &str| -> Vec<Option<String>> {
        coloured
            .lines()
            .filter(|l| l.contains(side))
            .map(|l| colour_of(l).map(str::to_string))
            .collect()
    };
    let device = colour_of_side("  device>  ");
    let target1 = [
        colour_of_side("  target 1>  "),
        colour_of_side("  <target 1  "),
    ]
    .concat();
    let target2 = colour_of_side("  target 2>  ");
    for (side, colours) in [
        ("device", &device),
        ("target 1", &target1),
        ("target 2", &target2),
    ] {
        assert!(
            !colours.is_empty() && colours.iter().all(|c| c.is_some() && *c == colours[0]),
            "every {side} header must start with one colour, saw {colours:?}"
        );
    }
    assert!(
        device[0] != target1[0] && device[0] != target2[0] && target1[0] != target2[0],
        "device, target 1 and target 2 need different colours, saw {:?}, {:?}, {:?}",
        device[0],
        target1[0],
        target2[0]
    );
    for line in coloured.lines().filter(|l| l.starts_with("\x1b[")) {
        assert!(
            line.ends_with("\x1b[0m"),
            "a coloured header must end with a reset: {line:?}"
        );
    }

    for (args, no_color) in [
        (vec![FIXTURE], Some("1")),
        (vec!["--no-color", FIXTURE], None),
    ] {
        let (status, plain) = view_on_terminal(&args, no_color);
        assert!(
            status.success(),
            "view {args:?} NO_COLOR={no_color:?}: {status}"
        );
        assert_same_text(
            &format!("view {args:?} on a terminal with NO_COLOR={no_color:?}"),
            GOLDEN_HEX,
            &plain,
        );
    }
}
