//! Issue 13, defect 2: the shipped configuration works as shipped. The env
//! file is read the way systemd's `EnvironmentFile=` reads it (a `#` after
//! a value is part of the value there), every value in it parses, the built
//! binary started with exactly those variables listens instead of exiting
//! 2, every commented-out example is a known setting with a valid value,
//! and the unit neither restarts a configuration error forever nor keeps
//! the example metrics file from being written.

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use proxy_channel::config::Config;
use util::*;

const ENV_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/proxy-channel.env");
const UNIT_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/proxy-channel.service");

// ------------------------------------------------ systemd's reading

/// Where systemd's env-file reader is in a file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a key: blanks are skipped, `#` or `;` starts a comment.
    LineStart,
    Key,
    /// After `=` or a closing quote: blanks are skipped.
    BeforeValue,
    Value,
    /// After a backslash outside quotes: the next character as it is.
    ValueEscape,
    SingleQuoted,
    DoubleQuoted,
    DoubleQuotedEscape,
    Comment,
}

/// `KEY=VALUE` pairs of an env file as systemd's `EnvironmentFile=` reads
/// it (systemd's `parse_env_file_internal`): comments only where a key
/// could start; a value runs to the end of its line, `#` included, with
/// its blanks trimmed at both ends; single quotes take everything up to
/// the next one; double quotes take backslash escapes of `"`, `\`, `` ` ``
/// and `$`; a backslash-newline continues the line. Later keys replace
/// earlier ones; keys that are no variable name are dropped (systemd
/// ignores such assignments).
fn systemd_env_file(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    let (mut key, mut value) = (String::new(), String::new());
    // Length of `value` before its trailing blanks, when it ends in some.
    let mut value_end: Option<usize> = None;
    let mut state = State::LineStart;
    let mut push = |key: &mut String, value: &mut String, end: Option<usize>| {
        if let Some(end) = end {
            value.truncate(end);
        }
        let name = key.trim_end().to_string();
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if valid {
            vars.insert(name, std::mem::take(value));
        }
        key.clear();
        value.clear();
    };
    for c in text.chars() {
        let newline = c == '\n' || c == '\r';
        let blank = c == ' ' || c == '\t' || newline;
        state = match state {
            State::LineStart if c == '#' || c == ';' => State::Comment,
            State::LineStart if blank => State::LineStart,
            State::LineStart => {
                key.push(c);
                State::Key
            }
            State::Key if newline => {
                key.clear();
                State::LineStart
            }
            State::Key if c == '=' => State::BeforeValue,
            State::Key => {
                key.push(c);
                State::Key
            }
            State::BeforeValue if newline => {
                push(&mut key, &mut value, None);
                State::LineStart
            }
            State::BeforeValue if c == '\'' => State::SingleQuoted,
            State::BeforeValue if c == '"' => State::DoubleQuoted,
            State::BeforeValue if c == '\\' => State::ValueEscape,
            State::BeforeValue if blank => State::BeforeValue,
            State::BeforeValue | State::Value if !newline && c != '\\' => {
                if !blank {
                    value_end = None;
                } else if value_end.is_none() {
                    value_end = Some(value.len());
                }
                value.push(c);
                State::Value
            }
            State::Value if newline => {
                push(&mut key, &mut value, value_end.take());
                State::LineStart
            }
            State::Value => {
                value_end = None;
                State::ValueEscape
            }
            State::ValueEscape => {
                if !newline {
                    value.push(c);
                }
                State::Value
            }
            State::SingleQuoted if c == '\'' => State::BeforeValue,
            State::SingleQuoted => {
                value.push(c);
                State::SingleQuoted
            }
            State::DoubleQuoted if c == '"' => State::BeforeValue,
            State::DoubleQuoted if c == '\\' => State::DoubleQuotedEscape,
            State::DoubleQuoted => {
                value.push(c);
                State::DoubleQuoted
            }
            State::DoubleQuotedEscape => {
                if "\"\\`$".contains(c) {
                    value.push(c);
                } else if c != '\n' {
                    value.push('\\');
                    value.push(c);
                }
                State::DoubleQuoted
            }
            State::Comment if newline => State::LineStart,
            State::Comment => State::Comment,
            // Covered above: BeforeValue and Value with every character.
            other => other,
        };
        if state == State::BeforeValue {
            value_end = None;
        }
    }
    match state {
        State::Value => push(&mut key, &mut value, value_end),
        State::BeforeValue
        | State::ValueEscape
        | State::SingleQuoted
        | State::DoubleQuoted
        | State::DoubleQuotedEscape => push(&mut key, &mut value, None),
        State::LineStart | State::Key | State::Comment => {}
    }
    vars
}

#[test]
fn the_systemd_reader_reads_as_systemd_does() {
    let text = "# a comment\n ; another\nA=1 # not a comment\n  B = two words  \n\
                C='single # quoted'\nD=\"x\\\"y\\$z\\q\"\nE=con\\\ntinued\nnot a line\n\
                9BAD=x\nF=\nA=last";
    let vars = systemd_env_file(text);
    let expected: BTreeMap<String, String> = [
        ("A", "last"),
        ("B", "two words"),
        ("C", "single # quoted"),
        ("D", "x\"y$z\\q"),
        ("E", "continued"),
        ("F", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(vars, expected);
    let first = systemd_env_file("A=1 # not a comment\n");
    assert_eq!(first["A"], "1 # not a comment");
}

// ------------------------------------------------ the env file

fn env_file_text() -> String {
    std::fs::read_to_string(ENV_FILE).unwrap_or_else(|e| panic!("{ENV_FILE}: {e}"))
}

/// The variables systemd passes from the env file as shipped.
fn shipped_vars() -> BTreeMap<String, String> {
    systemd_env_file(&env_file_text())
}

/// The env file with each commented-out example (`#PROXY_...=value`)
/// switched on, as systemd would read it.
fn every_example_vars() -> BTreeMap<String, String> {
    let text: String = env_file_text()
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.starts_with("PROXY_") && rest.contains('=') => rest,
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect();
    systemd_env_file(&text)
}

/// The commented-out examples alone.
fn examples() -> Vec<(String, String)> {
    let shipped = shipped_vars();
    every_example_vars()
        .into_iter()
        .filter(|(name, value)| shipped.get(name) != Some(value))
        .collect()
}

fn parse(vars: &BTreeMap<String, String>) -> Result<Config, String> {
    Config::from_vars(vars.clone()).map_err(|e| e.to_string())
}

/// Defect 2: two values had a comment after them, which systemd keeps as
/// part of the value; the daemon refused them and exited 2.
#[test]
fn the_env_file_as_systemd_reads_it_is_a_valid_configuration() {
    let vars = shipped_vars();
    assert!(
        vars.contains_key("PROXY_LISTEN"),
        "no PROXY_LISTEN in {vars:?}"
    );
    for (name, value) in &vars {
        assert!(
            !value.contains('#'),
            "{name}={value:?}: systemd keeps a comment after a value as part of it"
        );
    }
    if let Err(e) = parse(&vars) {
        panic!("the env file as systemd reads it does not parse: {e}");
    }
}

/// Every commented-out example is a known PROXY_ setting whose value
/// parses, once switched on: alone, and all of them together.
#[test]
fn every_commented_out_example_is_a_known_setting_with_a_valid_value() {
    let examples = examples();
    assert!(
        examples.len() >= 10,
        "expected the defaults as examples, saw {examples:?}"
    );
    let shipped = shipped_vars();
    for (name, value) in &examples {
        let mut vars = shipped.clone();
        vars.insert(name.clone(), value.clone());
        if let Err(e) = parse(&vars) {
            panic!("the example {name}={value:?}, switched on, does not parse: {e}");
        }
    }
    if let Err(e) = parse(&every_example_vars()) {
        panic!("the env file with every example switched on does not parse: {e}");
    }
}

/// The daemon started the way systemd starts it, with exactly the file's
/// variables (and nothing else), but on a loopback port and temporary
/// paths.
struct Started {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Started {
    fn start(mut vars: BTreeMap<String, String>, dir: &Path) -> Started {
        let path = |name: &str| dir.join(name).to_str().expect("UTF-8").to_string();
        vars.insert("PROXY_LISTEN".into(), "127.0.0.1:0".into());
        vars.insert("PROXY_DATA_DIR".into(), path("data"));
        vars.insert("PROXY_CONTROL_SOCKET".into(), path("control.sock"));
        if vars.contains_key("PROXY_METRICS_FILE") {
            vars.insert("PROXY_METRICS_FILE".into(), path("proxy_channel.prom"));
        }
        let mut child = Command::new(BIN)
            .env_clear()
            .envs(&vars)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start proxy-channel");
        let pipe = child.stderr.take().expect("stderr pipe");
        let stderr = collect_lines(pipe);
        Started { child, stderr }
    }

    fn lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until it listens (true) or exits (false).
    fn listens(&mut self) -> bool {
        let mut exited = false;
        poll_until(secs(15), || {
            exited = matches!(self.child.try_wait(), Ok(Some(_)));
            exited || self.lines().iter().any(|l| l.contains("] listening on "))
        });
        !exited && self.lines().iter().any(|l| l.contains("] listening on "))
    }

    /// SIGTERM, and exit status 0 within 10 s.
    fn stop(&mut self) {
        let stderr = std::sync::Arc::clone(&self.stderr);
        stop_child(&mut self.child, || stderr.lock().unwrap().clone());
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // It may have exited already; either way it is gone after `wait`.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_starts(vars: BTreeMap<String, String>, what: &str) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let mut daemon = Started::start(vars, dir.path());
    let listening = daemon.listens();
    let status = daemon.child.try_wait().ok().flatten();
    assert!(
        listening,
        "the daemon with {what} did not listen (exit {status:?}); stderr:\n{}",
        daemon.lines().join("\n")
    );
    daemon.stop();
}

/// Defect 2, as systemd saw it: the daemon exited 2 at every start.
#[test]
fn the_daemon_listens_with_exactly_the_env_file_variables() {
    assert_starts(shipped_vars(), "the env file's variables");
}

#[test]
fn the_daemon_listens_with_every_example_switched_on() {
    assert_starts(every_example_vars(), "every example switched on");
}

// ------------------------------------------------ the unit

/// The `[Service]` settings of the unit, each with all its values.
fn service_settings() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(UNIT_FILE).unwrap_or_else(|e| panic!("{UNIT_FILE}: {e}"));
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with(['#', ';']) {
            if let Some((key, value)) = line.split_once('=') {
                let entry = settings.entry(key.trim().to_string()).or_default();
                entry.push(value.trim().to_string());
            }
        }
    }
    settings
}

/// A configuration error is no reason to restart: exit status 2 stops
/// `Restart=on-failure` from starting the daemon again every 2 s forever.
#[test]
fn the_unit_does_not_restart_a_configuration_error() {
    let settings = service_settings();
    assert_eq!(
        settings.get("Restart").map(Vec::as_slice),
        Some(&["on-failure".to_string()][..])
    );
    let prevent: Vec<&str> = settings
        .get("RestartPreventExitStatus")
        .into_iter()
        .flatten()
        .flat_map(|v| v.split_whitespace())
        .collect();
    assert!(
        prevent.contains(&"2"),
        "RestartPreventExitStatus= does not name 2: {prevent:?}"
    );
}

/// The folders the unit lets the daemon write in (`ProtectSystem=strict`
/// makes everything else read-only): its state and runtime folders and
/// `ReadWritePaths=`.
fn writable_folders(settings: &BTreeMap<String, Vec<String>>) -> Vec<PathBuf> {
    let mut folders = Vec::new();
    let names = |key: &str| -> Vec<String> {
        let values = settings.get(key).into_iter().flatten();
        values
            .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    for (key, root) in [("StateDirectory", "/var/lib"), ("RuntimeDirectory", "/run")] {
        folders.extend(names(key).iter().map(|name| Path::new(root).join(name)));
    }
    folders.extend(
        names("ReadWritePaths")
            .iter()
            .map(|p| PathBuf::from(p.trim_start_matches('-'))),
    );
    folders
}

/// The data folder and the example metrics file are in folders the unit
/// lets the daemon write in, and the env file is where the unit reads it.
#[test]
fn the_unit_lets_the_daemon_write_its_data_and_the_example_metrics_file() {
    let settings = service_settings();
    assert_eq!(
        settings.get("ProtectSystem").map(Vec::as_slice),
        Some(&["strict".to_string()][..])
    );
    assert_eq!(
        settings.get("EnvironmentFile").map(Vec::as_slice),
        Some(&["/etc/proxy-channel.env".to_string()][..])
    );
    let writable = writable_folders(&settings);
    let vars = every_example_vars();
    for name in ["PROXY_DATA_DIR", "PROXY_METRICS_FILE"] {
        let value = vars
            .get(name)
            .unwrap_or_else(|| panic!("the env file has no example of {name}"));
        let path = Path::new(value);
        let folder = match name {
            "PROXY_METRICS_FILE" => path.parent().expect("a file in a folder"),
            _ => path,
        };
        assert!(
            writable.iter().any(|w| folder.starts_with(w)),
            "{name}={value}: {} is read-only under the unit (writable: {writable:?})",
            folder.display()
        );
    }
}
