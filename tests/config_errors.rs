//! Issue 2, configuration: every kind of bad configuration stops the daemon
//! before it listens with exit status 2 and one stderr line naming the
//! variable and its value; `--help` documents every variable and
//! `--version` prints the version.

mod util;

use util::*;

/// Runs the daemon with `vars` and checks the one-line refusal: exit 2,
/// exactly one line, starting with `proxy-channel: `, containing every
/// string of `names`. Returns the line.
fn refused(vars: &[(&str, &str)], names: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_string();
    let mut all = vec![
        ("PROXY_LISTEN", "127.0.0.1:0"),
        ("PROXY_DATA_DIR", data_dir.as_str()),
        ("PROXY_CONTROL_SOCKET", "off"),
    ];
    all.extend_from_slice(vars);
    let run = run_to_exit(&[], &all, secs(10));
    assert_eq!(
        run.status.code(),
        Some(2),
        "{vars:?}: expected exit status 2, saw {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{vars:?}: expected exactly one line on stderr, saw {lines:#?}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("proxy-channel: "),
        "{vars:?}: the line should start with the program name: {line}"
    );
    for name in names {
        assert!(
            line.contains(name),
            "{vars:?}: expected the line to name {name:?}: {line}"
        );
    }
    line.to_string()
}

#[test]
fn bad_values_stop_the_daemon_with_one_line_naming_variable_and_value() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "PROXY_IDLE_TIMEOUT",
            "10x",
            "a duration such as 500ms, 30s, 10m, 1h or 7d",
        ),
        ("PROXY_CONNECT_TIMEOUT", "soon", "duration"),
        ("PROXY_ROTATE_INTERVAL", "-1h", "duration"),
        ("PROXY_RETAIN_AGE", "30 days", "duration"),
        ("PROXY_STORE", "perhaps", "true/false"),
        ("PROXY_MAX_PAYLOAD", "big", "size"),
        ("PROXY_ROTATE_SIZE", "64 MiB?", "size"),
        ("PROXY_TARGET_BUFFER", "10", "1KiB"),
        ("PROXY_LISTEN", "localhost", "ip:port"),
        ("PROXY_WORKERS", "0", "whole number"),
        ("PROXY_MAX_CONNECTIONS", "many", "whole number"),
        ("PROXY_RETAIN_FILES", "-3", "whole number"),
        ("PROXY_CHANNEL_ID", "one", "whole number"),
        ("PROXY_PROTOCOL_ID", "1.5", "whole number"),
        ("PROXY_ACCEPT_PROXY_PROTOCOL", "v3", "off, v1, v2 or any"),
        ("PROXY_TARGET1", "10.0.0.7", "host:port"),
        ("PROXY_TARGET3", "10.0.0.7:99999", "host:port"),
        ("PROXY_TARGET2", "10.0.0.7:+80", "host:port"),
        ("PROXY_CHANNEL_ID", "+5", "whole number"),
        ("PROXY_WORKERS", "+2", "whole number"),
    ];
    for (name, value, expected) in cases {
        let line = refused(&[(name, value)], &[name, &format!("{value:?}"), expected]);
        assert!(
            line.contains(&format!("{name}={value:?}")),
            "expected `{name}={value:?}` in {line}"
        );
    }
}

#[test]
fn bad_target_options_name_the_option_and_its_value() {
    refused(
        &[
            ("PROXY_TARGET1", "127.0.0.1:9"),
            ("PROXY_TARGET1_MANDATORY", "maybe"),
        ],
        &["PROXY_TARGET1_MANDATORY", "\"maybe\"", "true/false"],
    );
    refused(
        &[
            ("PROXY_TARGET2", "127.0.0.1:9"),
            ("PROXY_TARGET2_REPLIES", "2"),
        ],
        &["PROXY_TARGET2_REPLIES", "\"2\"", "true/false"],
    );
}

#[test]
fn an_unknown_proxy_variable_is_refused() {
    refused(
        &[("PROXY_FOO", "1")],
        &["PROXY_FOO=\"1\"", "unknown variable"],
    );
    refused(
        &[("PROXY_IDEL_TIMEOUT", "5s")],
        &["PROXY_IDEL_TIMEOUT=\"5s\"", "unknown variable"],
    );
    refused(
        &[("PROXY_TARGET4", "127.0.0.1:9")],
        &["PROXY_TARGET4", "unknown variable"],
    );
}

#[test]
fn a_target_option_without_its_target_names_both() {
    let line = refused(
        &[("PROXY_TARGET2_MANDATORY", "false")],
        &["PROXY_TARGET2_MANDATORY", "\"false\""],
    );
    let rest = line.replace("PROXY_TARGET2_MANDATORY", "");
    assert!(
        rest.contains("PROXY_TARGET2"),
        "expected the line to name PROXY_TARGET2 as well: {line}"
    );
}

/// Every variable of the SPEC's configuration table; `n` is a target number.
const SPEC_VARIABLES: &[&str] = &[
    "PROXY_LISTEN",
    "PROXY_TARGETn",
    "PROXY_TARGETn_MANDATORY",
    "PROXY_TARGETn_REPLIES",
    "PROXY_STORE",
    "PROXY_DATA_DIR",
    "PROXY_CHANNEL_ID",
    "PROXY_PROTOCOL_ID",
    "PROXY_MAX_PAYLOAD",
    "PROXY_ROTATE_SIZE",
    "PROXY_ROTATE_INTERVAL",
    "PROXY_RETAIN_FILES",
    "PROXY_RETAIN_AGE",
    "PROXY_WORKERS",
    "PROXY_IDLE_TIMEOUT",
    "PROXY_CONNECT_TIMEOUT",
    "PROXY_MAX_CONNECTIONS",
    "PROXY_TARGET_BUFFER",
    "PROXY_CONTROL_SOCKET",
    "PROXY_METRICS_FILE",
    "PROXY_METRICS_INTERVAL",
    "PROXY_ACCEPT_PROXY_PROTOCOL",
    "PROXY_TARGETn_SEND_PROXY",
    "RUST_LOG",
];

#[test]
fn help_lists_every_variable_of_the_spec() {
    let run = run_to_exit(&["--help"], &[], secs(10));
    assert!(run.status.success(), "--help exit status {}", run.status);
    let words: std::collections::HashSet<&str> = run
        .stdout
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    for variable in SPEC_VARIABLES {
        // PROXY_TARGETn may also be spelled out as PROXY_TARGET1..3.
        let spelled_out = (1..=3)
            .all(|n| words.contains(variable.replace("TARGETn", &format!("TARGET{n}")).as_str()));
        assert!(
            words.contains(variable) || (variable.contains("TARGETn") && spelled_out),
            "--help does not list {variable}; it printed:\n{}",
            run.stdout
        );
    }
}

#[test]
fn version_prints_the_version() {
    let run = run_to_exit(&["--version"], &[], secs(10));
    assert!(run.status.success(), "--version exit status {}", run.status);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        run.stdout.trim(),
        format!("proxy-channel {version}"),
        "--version output"
    );
}

#[test]
fn an_unusable_data_dir_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let data_dir = file.join("data");
    let data_dir = data_dir.to_str().unwrap();
    refused(
        &[("PROXY_DATA_DIR", data_dir)],
        &["PROXY_DATA_DIR", data_dir],
    );
}
