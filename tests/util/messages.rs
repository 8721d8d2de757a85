//! Readers of the message files: every complete line must be a JSON object
//! with the keys the SPEC's Messages table allows.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{assert_same_bytes, poll_until};

/// Reads `messages.jsonl` incrementally: each [`MessageLog::refresh`] parses
/// only the complete lines added since the last one. Every complete line
/// must be a JSON object, or the test fails.
pub struct MessageLog {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    lines: Vec<Value>,
    /// For [`MessageLog::read_files`]: each file and the index of its first
    /// line.
    files: Vec<(PathBuf, usize)>,
}

/// Every key the SPEC's Messages table allows.
const KNOWN_KEYS: &[&str] = &[
    "channel.id",
    "protocol.id",
    "ident",
    "peer",
    "proxy.event",
    "proxy.source",
    "proxy.payload.size",
    "proxy.payload.hex",
    "server.timestamp",
    "timestamp",
    "proxy.target",
    "proxy.reason",
    "proxy.bytes.received",
    "proxy.bytes.sent",
    "device.ident",
    "proxy.catchup",
    "proxy.transport",
];

impl MessageLog {
    pub fn new(path: PathBuf) -> MessageLog {
        MessageLog {
            path,
            offset: 0,
            partial: Vec::new(),
            lines: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Reads `paths` whole, in this order (see [`message_files`]). Every
    /// file but the last must end with a whole line; the last one's cut
    /// tail, if any, is [`MessageLog::unfinished_tail`], and
    /// [`MessageLog::refresh`] goes on reading that file.
    pub fn read_files(paths: &[PathBuf]) -> MessageLog {
        let mut log = MessageLog::new(PathBuf::new());
        for path in paths {
            assert!(
                log.partial.is_empty(),
                "{} does not end with a whole line: {:?}",
                log.path.display(),
                String::from_utf8_lossy(&log.partial)
            );
            log.path = path.clone();
            log.offset = 0;
            log.files.push((path.clone(), log.lines.len()));
            assert!(path.exists(), "{} is gone", path.display());
            log.refresh();
        }
        log
    }

    /// Each file [`MessageLog::read_files`] read, with the index in
    /// [`MessageLog::lines`] of its first line.
    pub fn files(&self) -> &[(PathBuf, usize)] {
        &self.files
    }

    /// The file the line at `index` came from (after `read_files`).
    pub fn file_of_line(&self, index: usize) -> &Path {
        let at = self.files.partition_point(|(_, first)| *first <= index);
        assert!(at > 0, "line {index} is before the first file");
        &self.files[at - 1].0
    }

    /// Takes in the lines completed since the last call.
    pub fn refresh(&mut self) {
        let Ok(mut file) = File::open(&self.path) else {
            return; // not created yet
        };
        file.seek(SeekFrom::Start(self.offset)).expect("seek");
        let mut fresh = Vec::new();
        file.read_to_end(&mut fresh).expect("read messages");
        self.offset += fresh.len() as u64;
        self.partial.extend_from_slice(&fresh);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let value: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!(
                    "line {} of {} is not JSON ({e}): {}",
                    self.lines.len() + 1,
                    self.path.display(),
                    String::from_utf8_lossy(&line[..line.len().min(300)])
                )
            });
            assert!(value.is_object(), "a message must be an object: {value}");
            self.lines.push(value);
        }
    }

    /// Refreshes until `condition` holds; fails the test after `timeout`.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&MessageLog) -> bool,
    ) {
        let held = poll_until(timeout, || {
            self.refresh();
            condition(self)
        });
        assert!(
            held,
            "timed out after {timeout:?} waiting for {what}; the file has {} lines:\n{}",
            self.lines.len(),
            self.summary()
        );
    }

    /// Bytes after the last newline (a line being written, or cut short).
    pub fn unfinished_tail(&self) -> &[u8] {
        &self.partial
    }

    pub fn lines(&self) -> &[Value] {
        &self.lines
    }

    /// The ident of the device whose socket's local address is `peer`.
    pub fn ident_of_peer(&self, peer: &str) -> Option<String> {
        self.lines
            .iter()
            .find(|m| source(m) == 0 && event(m) == 1 && text(m, "peer") == peer)
            .map(|m| text(m, "ident").to_string())
    }

    /// Waits for the device's event 1 and returns its ident.
    pub fn wait_ident(&mut self, peer: &str, timeout: Duration) -> String {
        self.wait_for(timeout, &format!("event 1 of device {peer}"), |log| {
            log.ident_of_peer(peer).is_some()
        });
        self.ident_of_peer(peer).unwrap()
    }

    /// Every message of `ident`, in file order.
    pub fn of_ident(&self, ident: &str) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|m| text(m, "ident") == ident)
            .collect()
    }

    /// All messages grouped by ident, each group in file order.
    pub fn by_ident(&self) -> BTreeMap<String, Vec<&Value>> {
        let mut groups: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
        for message in &self.lines {
            groups
                .entry(text(message, "ident").to_string())
                .or_default()
                .push(message);
        }
        groups
    }

    /// The messages of `ident` from `source` with `event`.
    pub fn select(&self, ident: &str, source_n: u64, event_n: u64) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|m| text(m, "ident") == ident && source(m) == source_n && event(m) == event_n)
            .collect()
    }

    /// The event 2 of one side of a connection, if written yet.
    pub fn dropped(&self, ident: &str, source_n: u64) -> Option<&Value> {
        self.select(ident, source_n, 2).into_iter().next()
    }

    /// The `proxy.reason` of one side's event 2.
    pub fn reason(&self, ident: &str, source_n: u64) -> Option<String> {
        self.dropped(ident, source_n)
            .map(|m| text(m, "proxy.reason").to_string())
    }

    /// Waits for one side's event 2 and returns its reason.
    pub fn wait_reason(&mut self, ident: &str, source_n: u64, timeout: Duration) -> String {
        self.wait_for(
            timeout,
            &format!("event 2 of source {source_n} of {ident}"),
            |log| log.dropped(ident, source_n).is_some(),
        );
        self.reason(ident, source_n).unwrap()
    }

    /// The payloads of `source`'s event 0 messages of `ident`, concatenated.
    pub fn payload(&self, ident: &str, source_n: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        for message in self.select(ident, source_n, 0) {
            let hex_text = message
                .get("proxy.payload.hex")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("a data message without proxy.payload.hex: {message}"));
            bytes.extend(hex::decode(hex_text).expect("proxy.payload.hex is hex"));
        }
        bytes
    }

    /// Checks every line against the SPEC's Messages table: the keys always
    /// present, those of each event and source, and nothing else.
    pub fn assert_well_formed(&self) {
        for message in &self.lines {
            check_message(message);
        }
    }

    /// One line per message, short, for failure reports.
    pub fn summary(&self) -> String {
        let shown = 60;
        let skip = self.lines.len().saturating_sub(shown);
        let mut out = String::new();
        if skip > 0 {
            out.push_str(&format!("  ... {skip} earlier lines\n"));
        }
        for m in &self.lines[skip..] {
            out.push_str(&format!(
                "  {} {} src {} ev {} size {} reason {}\n",
                text(m, "ident"),
                text(m, "peer"),
                source(m),
                event(m),
                m.get("proxy.payload.size").unwrap_or(&Value::Null),
                m.get("proxy.reason").unwrap_or(&Value::Null),
            ));
        }
        out
    }
}

/// A string field, or "" when missing.
pub fn text<'a>(message: &'a Value, key: &str) -> &'a str {
    message.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A whole-number field; fails the test when missing.
pub fn number(message: &Value, key: &str) -> u64 {
    message
        .get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("expected a whole number {key:?} in {message}"))
}

pub fn event(message: &Value) -> u64 {
    number(message, "proxy.event")
}

pub fn source(message: &Value) -> u64 {
    number(message, "proxy.source")
}

/// Whether `ident` is 16 lowercase hex characters.
pub fn is_ident(ident: &str) -> bool {
    ident.len() == 16
        && ident
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_message(m: &Value) {
    let object = m.as_object().expect("an object");
    for key in object.keys() {
        assert!(
            KNOWN_KEYS.contains(&key.as_str()),
            "unexpected key {key:?} in {m}"
        );
    }
    number(m, "channel.id");
    number(m, "protocol.id");
    assert!(is_ident(text(m, "ident")), "bad ident in {m}");
    assert!(
        text(m, "peer").parse::<SocketAddr>().is_ok(),
        "peer must be ip:port in {m}"
    );
    let (event_n, source_n) = (event(m), source(m));
    assert!(event_n <= 2, "proxy.event must be 0, 1 or 2 in {m}");
    assert!(source_n <= 3, "proxy.source must be 0..3 in {m}");
    let stamp = m.get("server.timestamp").and_then(Value::as_f64);
    assert!(
        stamp.is_some_and(|s| s > 1.5e9),
        "server.timestamp must be seconds since the epoch in {m}"
    );
    assert_eq!(
        stamp,
        m.get("timestamp").and_then(Value::as_f64),
        "timestamp must equal server.timestamp in {m}"
    );
    assert_eq!(
        m.get("proxy.target").is_some_and(Value::is_string),
        source_n >= 1,
        "proxy.target must be there exactly for sources 1..3 in {m}"
    );
    let is_data = event_n == 0;
    assert_eq!(
        m.get("proxy.payload.size").is_some(),
        is_data,
        "proxy.payload.size must be there exactly for event 0 in {m}"
    );
    if !is_data {
        assert!(
            m.get("proxy.payload.hex").is_none(),
            "hex outside event 0 in {m}"
        );
    }
    let is_drop = event_n == 2;
    for key in ["proxy.reason", "proxy.bytes.received", "proxy.bytes.sent"] {
        assert_eq!(
            m.get(key).is_some(),
            is_drop,
            "{key} must be there exactly for event 2 in {m}"
        );
    }
    if let Some(device) = m.get("device.ident") {
        assert!(
            device.as_str().is_some_and(|d| !d.is_empty()),
            "device.ident must be a non-empty string in {m}"
        );
        assert!(
            !(source_n == 0 && event_n == 1),
            "the device's event 1 never names the device: {m}"
        );
    }
}

/// Whether `name` is a rotated file's name:
/// `messages-YYYYMMDDTHHMMSSZ.jsonl` or `messages-YYYYMMDDTHHMMSSZ_NNN.jsonl`.
pub fn is_rotated_name(name: &str) -> bool {
    let Some(middle) = name
        .strip_prefix("messages-")
        .and_then(|rest| rest.strip_suffix(".jsonl"))
    else {
        return false;
    };
    let (stamp, counter) = match middle.split_once('_') {
        Some((stamp, counter)) => (stamp, Some(counter)),
        None => (middle, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    stamp.len() == 16
        && digits(&stamp[..8])
        && &stamp[8..9] == "T"
        && digits(&stamp[9..15])
        && &stamp[15..] == "Z"
        && counter.is_none_or(|c| c.len() == 3 && digits(c) && c != "000")
}

/// The seconds since the Unix epoch that a rotated name carries (read as
/// UTC).
pub fn rotated_name_time(name: &str) -> u64 {
    assert!(is_rotated_name(name), "{name:?} is not a rotated name");
    let stamp = &name["messages-".len().."messages-".len() + 15];
    let field = |from: usize, to: usize| -> i64 { stamp[from..to].parse().unwrap() };
    let (year, month, day) = (field(0, 4), field(4, 6), field(6, 8));
    let (hour, minute, second) = (field(9, 11), field(11, 13), field(13, 15));
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).expect("after 1970")
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// The rotated files in `dir`, in name order (which is age order).
pub fn rotated_files(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a folder entry").file_name())
        .filter_map(|name| name.into_string().ok())
        .filter(|name| is_rotated_name(name))
        .collect();
    names.sort();
    names.into_iter().map(|name| dir.join(name)).collect()
}

/// The message files of `dir` in the order they were written: the rotated
/// ones by name, then `messages.jsonl` if it exists.
pub fn message_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = rotated_files(dir);
    let current = dir.join("messages.jsonl");
    if current.exists() {
        files.push(current);
    }
    files
}

/// Every message file of `dir` in writing order, read strictly: whole lines
/// only, every one a well-formed message.
pub fn read_folder(dir: &Path) -> MessageLog {
    let log = MessageLog::read_files(&message_files(dir));
    assert!(
        log.unfinished_tail().is_empty(),
        "the current file ends with a cut line: {:?}",
        String::from_utf8_lossy(log.unfinished_tail())
    );
    log.assert_well_formed();
    log
}

/// Checks one device's messages: its event 1 first and once, at most one
/// event 2 and last, timestamps in order, and its data payloads adding up
/// to exactly `sent`. Returns the event 2, if there is one.
pub fn assert_device_stream<'a>(log: &'a MessageLog, peer: &str, sent: &[u8]) -> Option<&'a Value> {
    let ident = log
        .ident_of_peer(peer)
        .unwrap_or_else(|| panic!("no event 1 for device {peer}"));
    let messages = log.of_ident(&ident);
    let connects = log.select(&ident, 0, 1);
    assert_eq!(connects.len(), 1, "{ident}: expected one event 1");
    assert!(
        std::ptr::eq(messages[0], connects[0]),
        "{ident}: expected its event 1 first, saw {}",
        messages[0]
    );
    let drops = log.select(&ident, 0, 2);
    assert!(drops.len() <= 1, "{ident}: {} event 2 lines", drops.len());
    if let Some(drop) = drops.first() {
        assert!(
            std::ptr::eq(*messages.last().unwrap(), *drop),
            "{ident}: expected its event 2 last"
        );
    }
    let stamps: Vec<f64> = messages
        .iter()
        .map(|m| m["server.timestamp"].as_f64().unwrap())
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "{ident}: timestamps out of order in reading order (files in name order)"
    );
    let sizes: u64 = log
        .select(&ident, 0, 0)
        .iter()
        .map(|m| number(m, "proxy.payload.size"))
        .sum();
    assert_eq!(
        sizes,
        sent.len() as u64,
        "{ident}: sum of proxy.payload.size"
    );
    assert_same_bytes(
        &format!("device {peer} ({ident}) in the files"),
        sent,
        &log.payload(&ident, 0),
    );
    drops.first().copied()
}

/// The device payloads in one file, concatenated.
pub fn device_bytes_in(path: &Path) -> Vec<u8> {
    let log = MessageLog::read_files(&[path.to_path_buf()]);
    let mut bytes = Vec::new();
    for message in log
        .lines()
        .iter()
        .filter(|m| event(m) == 0 && source(m) == 0)
    {
        bytes.extend(hex::decode(text(message, "proxy.payload.hex")).unwrap());
    }
    bytes
}

/// The complete lines of `bytes` and what follows the last newline.
pub fn split_lines(bytes: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let lines = bytes[..end]
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty());
    (lines.collect(), &bytes[end..])
}
