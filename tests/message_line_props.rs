//! Property tests of the message-file line parser (issue 13), through the
//! library's own reading path: `StoredMessage::parse`, then `view` and
//! `replay` on files of such lines. Random bytes, valid lines cut short or
//! damaged, crafted values (huge numbers, wrong types, deep nesting) never
//! panic; every strict prefix of a line is refused; a written message reads
//! back as it was; `view` shows or reports every line and prints no
//! control character. Bounded: a fixed number of cases per property.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use proxy_channel::net::side::Side;
use proxy_channel::store::message::{Event, Ident, Message, Micros, StoredMessage};
use proxy_channel::tools::filter::Filter;
use proxy_channel::tools::replay::{self, ReplayOptions};
use proxy_channel::tools::viewer::{self, Format, ViewOptions};

// ------------------------------------------------ lines

/// One message as the daemon could write it.
#[derive(Debug, Clone)]
struct Written {
    ident: u64,
    peer: SocketAddr,
    event: u8,
    source: u8,
    payload: Option<Vec<u8>>,
    time: u64,
    target: Option<String>,
    reason: Option<String>,
    bytes: Option<(u64, u64)>,
}

impl Written {
    fn line(&self) -> Vec<u8> {
        let message = Message {
            channel_id: 1,
            protocol_id: 0,
            ident: Ident(self.ident),
            peer: self.peer,
            event: Event::try_from(self.event).expect("an event 0..=2"),
            source: Side::from_source(self.source).expect("a source 0..=3"),
            payload_size: self.payload.as_ref().map(Vec::len),
            payload: self.payload.as_deref(),
            time: Micros(self.time),
            target: self.target.as_deref(),
            reason: self.reason.as_deref(),
            bytes_received: self.bytes.map(|(received, _)| received),
            bytes_sent: self.bytes.map(|(_, sent)| sent),
            device_ident: None,
            catchup: false,
            transport: None,
        };
        let mut line = Vec::new();
        message.write_json(&mut line);
        line
    }
}

fn written() -> impl Strategy<Value = Written> {
    let address = prop_oneof![
        any::<([u8; 4], u16)>().prop_map(SocketAddr::from),
        any::<([u8; 16], u16)>().prop_map(SocketAddr::from),
    ];
    // Any text, control characters and quotes included.
    let text = proptest::option::of(any::<String>());
    // A few idents and peers often, so that a file holds connections of
    // several lines.
    let ident = prop_oneof![0u64..4, any::<u64>()];
    let address = prop_oneof![Just(SocketAddr::from(([127, 0, 0, 1], 4000))), address,];
    (
        ident,
        address,
        0u8..=2,
        0u8..=3,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
        // Up to the year 9999, in microseconds.
        0u64..253_402_300_800_000_000,
        text.clone(),
        text,
        proptest::option::of(any::<(u64, u64)>()),
    )
        .prop_map(
            |(ident, peer, event, source, payload, time, target, reason, bytes)| Written {
                ident,
                peer,
                event,
                source,
                payload,
                time,
                target,
                reason,
                bytes,
            },
        )
}

/// JSON values a crafted or damaged file may hold where a message has a
/// number or a string.
fn crafted_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("18446744073709551616".to_string()),
        Just("18446744073709551615".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just("-1e400".to_string()),
        Just("1.5".to_string()),
        Just("255.0".to_string()),
        Just("256".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("\"\\u001b]0;x\\u0007\\r\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("\"zz\"".to_string()),
        Just("\"abc\"".to_string()),
        Just("{}".to_string()),
        Just("[1,2]".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:e}")),
        (1usize..3000).prop_map(|depth| "[".repeat(depth) + &"]".repeat(depth)),
        (1usize..3000).prop_map(|depth| "{\"a\":".repeat(depth) + "1" + &"}".repeat(depth)),
    ]
}

/// The keys of a written line whose value may be replaced.
const KEYS: [&str; 10] = [
    "channel.id",
    "ident",
    "peer",
    "proxy.event",
    "proxy.source",
    "proxy.payload.size",
    "proxy.payload.hex",
    "server.timestamp",
    "proxy.reason",
    "proxy.bytes.received",
];

/// `line` with the value of `key` replaced by `value` (or the key added).
fn with_value(line: &[u8], key: &str, value: &str) -> Vec<u8> {
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(line).expect("a written line is a JSON object");
    object.remove(key);
    let mut text = serde_json::to_string(&object).expect("a map serialises");
    text.pop();
    let comma = if object.is_empty() { "" } else { "," };
    format!("{text}{comma}\"{key}\":{value}}}").into_bytes()
}

/// A line as a file may hold it: written, damaged, cut short or crafted.
fn file_line() -> impl Strategy<Value = Vec<u8>> {
    let damaged = (
        written(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    )
        .prop_map(|(message, flips)| {
            let mut line = message.line();
            for (at, byte) in flips {
                let i = at.index(line.len());
                line[i] = byte;
            }
            line
        });
    let cut = (written(), any::<prop::sample::Index>()).prop_map(|(message, at)| {
        let line = message.line();
        line[..at.index(line.len())].to_vec()
    });
    let crafted = (written(), 0..KEYS.len(), crafted_value())
        .prop_map(|(message, key, value)| with_value(&message.line(), KEYS[key], &value));
    prop_oneof![
        written().prop_map(|message| message.line()),
        damaged,
        cut,
        crafted,
        proptest::collection::vec(any::<u8>(), 0..200),
    ]
    // One line each: a newline would make it two.
    .prop_map(|line| {
        line.into_iter()
            .map(|b| if b == b'\n' { b' ' } else { b })
            .collect()
    })
}

/// Numbers at the edges of what the fields hold.
fn extreme_number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(u64::MAX.to_string()),
        Just((u64::MAX - 1).to_string()),
        Just(i64::MAX.to_string()),
        Just("0".to_string()),
        Just("1.7976931348623157e308".to_string()),
        Just("253402300799.999999".to_string()),
    ]
}

/// The lines of one recorded device connection (event 1, data, event 2,
/// one ident), with one numeric key crafted on every line.
fn crafted_connection() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let keys = prop_oneof![
        Just("proxy.payload.size"),
        Just("proxy.bytes.received"),
        Just("proxy.bytes.sent"),
        Just("server.timestamp"),
    ];
    (
        proptest::collection::vec(written(), 2..8),
        keys,
        proptest::collection::vec(extreme_number(), 8),
    )
        .prop_map(|(mut messages, key, values)| {
            let last = messages.len() - 1;
            for (index, message) in messages.iter_mut().enumerate() {
                message.ident = 7;
                message.source = 0;
                message.event = match index {
                    0 => 1,
                    i if i == last => 2,
                    _ => 0,
                };
            }
            messages
                .iter()
                .zip(values)
                .map(|(message, value)| with_value(&message.line(), key, &value))
                .collect()
        })
}

// ------------------------------------------------ the tools on files

/// A target that takes connections and reads them to their end, for
/// replay; one for the whole test binary.
fn sink() -> SocketAddr {
    static SINK: OnceLock<SocketAddr> = OnceLock::new();
    *SINK.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let address = listener.local_addr().expect("its address");
        // Lives as long as the test binary; each connection on a thread
        // that ends when replay closes it.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut buffer = [0u8; 4096];
                    while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
                });
            }
        });
        address
    })
}

/// A file holding `lines`, each ended by a newline.
fn file_of(lines: &[Vec<u8>]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("messages.jsonl");
    let mut file = std::fs::File::create(&path).expect("create the file");
    for line in lines {
        file.write_all(line)
            .and_then(|()| file.write_all(b"\n"))
            .expect("write a line");
    }
    (dir, path)
}

fn control_characters(bytes: &[u8]) -> Vec<char> {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(line in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = StoredMessage::parse(&line);
    }

    #[test]
    fn lines_of_a_file_never_panic(line in file_line()) {
        if let Ok(message) = StoredMessage::parse(&line) {
            prop_assert!(message.event.number() <= 2 && message.source.source() <= 3);
        }
    }

    #[test]
    fn a_written_message_reads_back_as_it_was(message in written()) {
        let line = message.line();
        let stored = StoredMessage::parse(&line);
        prop_assert!(stored.is_ok(), "{:?}: {}", stored, String::from_utf8_lossy(&line));
        let stored = stored.unwrap();
        prop_assert_eq!(stored.ident.as_ref(), format!("{:016x}", message.ident));
        prop_assert_eq!(stored.peer.as_ref(), message.peer.to_string());
        prop_assert_eq!(
            (stored.event.number(), stored.source.source()),
            (message.event, message.source)
        );
        let payload = stored.payload_hex.map(|h| hex::decode(h).expect("hex"));
        prop_assert_eq!(&payload, &message.payload);
        prop_assert_eq!(stored.payload_size, message.payload.as_ref().map(|p| p.len() as u64));
        let micros = (stored.server_timestamp * 1e6).round() as u64;
        // A double holds 15-16 digits: microseconds of the year 9999 are 17.
        prop_assert!(micros.abs_diff(message.time) <= 64, "{} vs {}", micros, message.time);
        prop_assert_eq!(stored.timestamp, stored.server_timestamp);
        prop_assert_eq!(stored.target.as_deref(), message.target.as_deref());
        prop_assert_eq!(stored.reason.as_deref(), message.reason.as_deref());
        prop_assert_eq!(stored.bytes_received, message.bytes.map(|b| b.0));
        prop_assert_eq!(stored.bytes_sent, message.bytes.map(|b| b.1));
    }

    #[test]
    fn every_strict_prefix_of_a_line_is_refused(message in written()) {
        let line = message.line();
        for cut in 0..line.len() {
            prop_assert!(StoredMessage::parse(&line[..cut]).is_err(), "cut at {}", cut);
        }
    }
}

proptest! {
    // Each case runs `view` three times and `replay` once on a file.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn view_shows_or_reports_every_line_and_prints_no_control_character(
        lines in proptest::collection::vec(file_line(), 1..24),
    ) {
        let (_dir, path) = file_of(&lines);
        for format in [Format::Hex, Format::Text, Format::Json] {
            let options = ViewOptions {
                paths: vec![path.clone()],
                filter: Filter::default(),
                format,
                follow: false,
                color: false,
            };
            let mut out = Vec::new();
            let summary = viewer::run(&options, &mut out);
            prop_assert!(summary.is_ok(), "{:?}", summary);
            let summary = summary.unwrap();
            prop_assert_eq!(summary.shown + summary.skipped, lines.len() as u64, "{:?}", format);
            prop_assert_eq!(control_characters(&out), Vec::<char>::new(), "{:?}", format);
        }
    }

    #[test]
    fn replay_takes_any_file_without_panicking(
        lines in proptest::collection::vec(file_line(), 1..24),
    ) {
        let (_dir, path) = file_of(&lines);
        let options = ReplayOptions {
            target: sink().to_string(),
            paths: vec![path],
            filter: Filter::default(),
            speed: None,
            concurrency: 2,
            wait: Duration::from_millis(1),
        };
        let summary = replay::run(&options);
        prop_assert!(summary.is_ok(), "{:?}", summary);
    }

    #[test]
    fn replay_and_view_take_a_connection_with_extreme_numbers(lines in crafted_connection()) {
        let (_dir, path) = file_of(&lines);
        let options = ReplayOptions {
            target: sink().to_string(),
            paths: vec![path.clone()],
            filter: Filter::default(),
            speed: Some(1e12),
            concurrency: 1,
            wait: Duration::from_millis(1),
        };
        let summary = replay::run(&options);
        prop_assert!(summary.is_ok(), "{:?}", summary);
        let options = ViewOptions {
            paths: vec![path],
            filter: Filter::default(),
            format: Format::Text,
            follow: false,
            color: false,
        };
        let summary = viewer::run(&options, &mut Vec::new());
        prop_assert!(summary.is_ok(), "{:?}", summary);
    }
}
