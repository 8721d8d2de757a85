//! The message: one JSON object per line, with flespi's parameter names.
//!
//! [`Message`] is the written form, borrowing everything it needs so that a
//! worker writes it straight into its batch, the payload's hex included,
//! never through a `String`. [`StoredMessage`]
//! is the read-back form used by the viewer, replay and tests. [`Ident`]s are
//! random-looking yet unique within a run (a bijective mix of a counter
//! that every clone of one generator shares, so TCP connections and UDP
//! sessions draw from one sequence).

use crate::store::address::write_address;
use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::net::side::Side;

/// `proxy.event`: what happened, written and read as its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A packet: what one read from a socket returned.
    Data = 0,
    /// The connection was established.
    Established = 1,
    /// The connection was dropped.
    Dropped = 2,
}

impl Event {
    /// Its `proxy.event` number.
    pub fn number(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u8> for Event {
    type Error = String;

    fn try_from(number: u8) -> Result<Event, String> {
        match number {
            0 => Ok(Event::Data),
            1 => Ok(Event::Established),
            2 => Ok(Event::Dropped),
            _ => Err(format!("proxy.event {number} is not 0, 1 or 2")),
        }
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Event, D::Error> {
        let number = u8::deserialize(deserializer)?;
        Event::try_from(number).map_err(serde::de::Error::custom)
    }
}

/// `proxy.transport` of a UDP session's messages (TCP ones have none).
pub const UDP: &str = "udp";

/// The random name of one device connection: 16 lowercase hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ident(pub u64);

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Hands out idents that look random and never repeat within a run: a random
/// key plus a counter, passed through a bijective 64-bit mix. Clones share
/// the key and the counter, so the idents of all of them (the acceptor's
/// and every worker's, for UDP sessions) never repeat either.
#[derive(Debug, Clone)]
pub struct IdentGenerator {
    key: u64,
    counter: Arc<AtomicU64>,
}

impl IdentGenerator {
    pub fn new() -> IdentGenerator {
        IdentGenerator {
            key: rand::random(),
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn next_ident(&mut self) -> Ident {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let mut x = self
            .key
            .wrapping_add(counter.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // splitmix64's finaliser: each step is invertible, so distinct inputs
        // give distinct idents.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Ident(x ^ (x >> 31))
    }
}

impl Default for IdentGenerator {
    fn default() -> Self {
        IdentGenerator::new()
    }
}

/// Who a message is about: the device connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub ident: Ident,
    pub peer: SocketAddr,
}

/// A moment, in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Micros(pub u64);

impl Micros {
    pub fn now() -> Micros {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Micros(u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX))
    }

    /// Seconds, as a float (what readers of the files get).
    pub fn as_seconds(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

/// One message as it is written.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    pub channel_id: u64,
    pub protocol_id: u64,
    pub ident: Ident,
    pub peer: SocketAddr,
    pub event: Event,
    pub source: Side,
    pub payload_size: Option<usize>,
    /// Written as `proxy.payload.hex`.
    pub payload: Option<&'a [u8]>,
    /// Both `server.timestamp` and `timestamp`.
    pub time: Micros,
    pub target: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub bytes_received: Option<u64>,
    pub bytes_sent: Option<u64>,
    /// `device.ident`: the device's own identifier, once recognised.
    pub device_ident: Option<&'a str>,
    /// `proxy.catchup: true` on the messages of a catch-up delivery.
    pub catchup: bool,
    /// `proxy.transport`: [`UDP`] for a UDP session, `None` for TCP.
    pub transport: Option<&'a str>,
}

impl Message<'_> {
    /// About the length of the message's JSON line: room to reserve so
    /// that a large packet's line grows its buffer once.
    pub fn json_len_hint(&self) -> usize {
        const KEYS_AND_NUMBERS: usize = 320;
        let text = |part: Option<&str>| part.map_or(0, str::len);
        let hex = self.payload.map_or(0, |payload| payload.len() * 2);
        KEYS_AND_NUMBERS
            + text(self.target)
            + text(self.reason)
            + text(self.device_ident)
            + text(self.transport)
            + hex
    }

    /// Appends the message to `out` as one JSON object, keys in the
    /// SPEC's order, without the newline.
    ///
    /// Written by hand rather than through serde: in store mode almost
    /// all of a line is the payload's hex, which needs no escaping and so
    /// goes straight into the line; a serde serialiser would scan every
    /// character of it for escapes (measured: half the worker's time).
    /// Strings that may need escaping go through [`write_json_string`].
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"channel.id\":");
        write_number(out, self.channel_id);
        out.extend_from_slice(b",\"protocol.id\":");
        write_number(out, self.protocol_id);
        out.extend_from_slice(b",\"ident\":\"");
        write_hex(out, &self.ident.0.to_be_bytes());
        out.extend_from_slice(b"\",\"peer\":");
        // An address prints only digits, hex letters, '.', ':', '[', ']'
        // and '%': no escaping.
        out.push(b'"');
        write_address(out, &self.peer);
        out.push(b'"');
        out.extend_from_slice(b",\"proxy.event\":");
        write_number(out, u64::from(self.event.number()));
        out.extend_from_slice(b",\"proxy.source\":");
        write_number(out, u64::from(self.source.source()));
        if let Some(size) = self.payload_size {
            out.extend_from_slice(b",\"proxy.payload.size\":");
            write_number(out, size as u64);
        }
        if let Some(payload) = self.payload {
            out.extend_from_slice(b",\"proxy.payload.hex\":\"");
            write_hex(out, payload);
            out.push(b'"');
        }
        // Both keys carry the same time: written once, copied once.
        out.extend_from_slice(b",\"server.timestamp\":");
        let time_start = out.len();
        write_time(out, self.time);
        let time_end = out.len();
        out.extend_from_slice(b",\"timestamp\":");
        out.extend_from_within(time_start..time_end);
        if let Some(target) = self.target {
            out.extend_from_slice(b",\"proxy.target\":");
            write_json_string(out, target);
        }
        if let Some(reason) = self.reason {
            out.extend_from_slice(b",\"proxy.reason\":");
            write_json_string(out, reason);
        }
        if let Some(received) = self.bytes_received {
            out.extend_from_slice(b",\"proxy.bytes.received\":");
            write_number(out, received);
        }
        if let Some(sent) = self.bytes_sent {
            out.extend_from_slice(b",\"proxy.bytes.sent\":");
            write_number(out, sent);
        }
        if let Some(device) = self.device_ident {
            out.extend_from_slice(b",\"device.ident\":");
            write_json_string(out, device);
        }
        if self.catchup {
            out.extend_from_slice(b",\"proxy.catchup\":true");
        }
        if let Some(transport) = self.transport {
            out.extend_from_slice(b",\"proxy.transport\":");
            write_json_string(out, transport);
        }
        out.push(b'}');
    }
}

fn write_number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Seconds with exactly six decimals: `1795000000.123456`.
fn write_time(out: &mut Vec<u8>, time: Micros) {
    write_number(out, time.0 / 1_000_000);
    let micros = time.0 % 1_000_000;
    let mut fraction = *b".000000";
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(micros).as_bytes();
    fraction[7 - digits.len()..].copy_from_slice(digits);
    out.extend_from_slice(&fraction);
}

/// Lowercase hex of `bytes`. faster-hex encodes with SIMD where the CPU
/// has it (measured on 256 KiB: 30 GB/s against 4.6 GB/s for a table of
/// digit pairs); in store mode every device byte goes through here.
pub fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + bytes.len() * 2, 0);
    faster_hex::hex_encode(bytes, &mut out[start..]).expect("sized for two digits a byte");
}

/// A JSON string, escaped as serde_json does: `\"`, `\\`, `\n`, `\r`,
/// `\t`, and `\u00XX` for other control characters; everything else as
/// it is (UTF-8). The strings of a message (a target's label, a reason, a
/// device ident) rarely need an escape: those are copied whole (measured
/// with callgrind: a device ident's 15 digits byte by byte cost 300
/// instructions a line).
pub fn write_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let plain = |byte: &u8| !matches!(byte, b'"' | b'\\' | 0..=0x1f);
    if text.as_bytes().iter().all(plain) {
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
        return;
    }
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                write_hex(out, &[byte]);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

/// One message as it is read back from a file, borrowing its strings from
/// the line where it can (a payload is never copied just to be looked at).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StoredMessage<'a> {
    #[serde(rename = "channel.id")]
    pub channel_id: u64,
    #[serde(rename = "protocol.id")]
    pub protocol_id: u64,
    #[serde(borrow)]
    pub ident: Cow<'a, str>,
    #[serde(borrow)]
    pub peer: Cow<'a, str>,
    #[serde(rename = "proxy.event")]
    pub event: Event,
    #[serde(rename = "proxy.source")]
    pub source: Side,
    #[serde(rename = "proxy.payload.size")]
    pub payload_size: Option<u64>,
    /// Hex never needs JSON escapes, so it is always borrowed.
    #[serde(rename = "proxy.payload.hex", borrow)]
    pub payload_hex: Option<&'a str>,
    #[serde(rename = "server.timestamp")]
    pub server_timestamp: f64,
    pub timestamp: f64,
    #[serde(rename = "proxy.target", borrow)]
    pub target: Option<Cow<'a, str>>,
    #[serde(rename = "proxy.reason", borrow)]
    pub reason: Option<Cow<'a, str>>,
    #[serde(rename = "proxy.bytes.received")]
    pub bytes_received: Option<u64>,
    #[serde(rename = "proxy.bytes.sent")]
    pub bytes_sent: Option<u64>,
    #[serde(rename = "device.ident", borrow)]
    pub device_ident: Option<Cow<'a, str>>,
    /// True on the messages of a catch-up delivery.
    #[serde(rename = "proxy.catchup", default)]
    pub catchup: bool,
    /// `udp` for a UDP session's messages; absent for TCP.
    #[serde(rename = "proxy.transport", borrow, default)]
    pub transport: Option<Cow<'a, str>>,
}

impl<'a> StoredMessage<'a> {
    /// Parses one line; a line that is valid JSON but not one of our
    /// messages (an unknown event or source included) is an error too.
    pub fn parse(line: &'a [u8]) -> Result<StoredMessage<'a>, String> {
        serde_json::from_slice(line).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn sample<'a>(payload: &'a [u8]) -> Message<'a> {
        Message {
            channel_id: 7,
            protocol_id: 0,
            ident: Ident(0x00ab_cdef_0123_4567),
            peer: "[::1]:4000".parse().unwrap(),
            event: Event::Data,
            source: Side::Device,
            payload_size: Some(payload.len()),
            payload: Some(payload),
            time: Micros(1_795_000_000_012_300),
            target: None,
            reason: None,
            bytes_received: None,
            bytes_sent: None,
            device_ident: None,
            catchup: false,
            transport: None,
        }
    }

    fn line(message: &Message<'_>) -> String {
        let mut out = Vec::new();
        message.write_json(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_data_message_has_flespi_keys_in_order() {
        assert_eq!(
            line(&sample(b"\x00\xffAB")),
            r#"{"channel.id":7,"protocol.id":0,"ident":"00abcdef01234567","peer":"[::1]:4000","proxy.event":0,"proxy.source":0,"proxy.payload.size":4,"proxy.payload.hex":"00ff4142","server.timestamp":1795000000.012300,"timestamp":1795000000.012300}"#
        );
    }

    #[test]
    fn a_written_message_reads_back() {
        let payload: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let text = line(&sample(&payload));
        let stored: StoredMessage<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(hex::decode(stored.payload_hex.unwrap()).unwrap(), payload);
        assert_eq!(stored.ident, "00abcdef01234567");
        assert_eq!(stored.server_timestamp, 1_795_000_000.012_3);
    }

    #[test]
    fn events_and_sources_read_back_from_their_numbers() {
        let mut message = sample(b"x");
        message.event = Event::Established;
        message.source = Side::from_source(3).unwrap();
        let text = line(&message);
        assert!(
            text.contains(r#""proxy.event":1,"proxy.source":3,"#),
            "{text}"
        );
        let stored = StoredMessage::parse(text.as_bytes()).unwrap();
        assert_eq!(
            (stored.event, stored.source),
            (message.event, message.source)
        );
        let bad_event = text.replace(r#""proxy.event":1"#, r#""proxy.event":3"#);
        let error = StoredMessage::parse(bad_event.as_bytes()).unwrap_err();
        assert!(error.contains("proxy.event 3 is not 0, 1 or 2"), "{error}");
        let bad_source = text.replace(r#""proxy.source":3"#, r#""proxy.source":4"#);
        let error = StoredMessage::parse(bad_source.as_bytes()).unwrap_err();
        assert!(error.contains("proxy.source 4 is not 0 to 3"), "{error}");
    }

    #[test]
    fn strings_are_escaped_as_serde_json_would() {
        let mut message = sample(b"");
        message.event = Event::Dropped;
        message.payload = None;
        message.payload_size = None;
        let reason = "quote \" backslash \\ newline \n tab \t nul \u{0} é";
        message.reason = Some(reason);
        message.target = Some("gps.example.com:21000");
        message.bytes_received = Some(u64::MAX);
        message.bytes_sent = Some(0);
        let text = line(&message);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["proxy.reason"], reason);
        assert_eq!(value["proxy.bytes.received"], u64::MAX);
        let mut escaped = Vec::new();
        write_json_string(&mut escaped, reason);
        assert_eq!(
            String::from_utf8(escaped).unwrap(),
            serde_json::to_string(reason).unwrap()
        );
    }

    #[test]
    fn catch_up_keys_follow_the_byte_counts_and_read_back() {
        let mut message = sample(b"");
        message.event = Event::Dropped;
        message.source = Side::from_source(2).expect("target 2");
        message.payload = None;
        message.payload_size = None;
        message.target = Some("10.0.0.7:5000");
        message.reason = Some("caught up");
        message.bytes_received = Some(0);
        message.bytes_sent = Some(17);
        message.device_ident = Some("356307042441013");
        message.catchup = true;
        let text = line(&message);
        assert!(
            text.ends_with(
                r#","proxy.bytes.sent":17,"device.ident":"356307042441013","proxy.catchup":true}"#
            ),
            "{text}"
        );
        let stored = StoredMessage::parse(text.as_bytes()).unwrap();
        assert!(stored.catchup);
        assert_eq!(stored.device_ident.as_deref(), Some("356307042441013"));
        assert_eq!(stored.transport, None);
        let live = line(&sample(b"x"));
        let stored = StoredMessage::parse(live.as_bytes()).unwrap();
        assert!(!stored.catchup && stored.device_ident.is_none());
    }

    #[test]
    fn idents_are_sixteen_hex_digits_and_unique() {
        let mut generator = IdentGenerator::new();
        let mut seen = HashSet::new();
        for _ in 0..100_000 {
            let ident = generator.next_ident().to_string();
            assert_eq!(ident.len(), 16);
            assert!(
                ident
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
            assert!(seen.insert(ident));
        }
    }

    #[test]
    fn a_udp_message_says_so_last_and_reads_back() {
        let mut message = sample(b"ab");
        message.transport = Some(UDP);
        let text = line(&message);
        assert!(text.ends_with(r#","proxy.transport":"udp"}"#), "{text}");
        let stored = StoredMessage::parse(text.as_bytes()).unwrap();
        assert_eq!(stored.transport.as_deref(), Some("udp"));
        let tcp = line(&sample(b"ab"));
        assert_eq!(
            StoredMessage::parse(tcp.as_bytes()).unwrap().transport,
            None
        );
    }

    #[test]
    fn clones_of_a_generator_never_repeat_each_other() {
        let mut first = IdentGenerator::new();
        let mut clones: Vec<IdentGenerator> = (0..3).map(|_| first.clone()).collect();
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(first.next_ident()));
            for clone in &mut clones {
                assert!(seen.insert(clone.next_ident()));
            }
        }
    }

    #[test]
    fn timestamps_have_six_decimals() {
        let mut out = Vec::new();
        write_time(&mut out, Micros(1_795_000_000_000_007));
        assert_eq!(out, b"1795000000.000007");
        assert!(Micros::now().as_seconds() > 1.7e9);
    }

    #[test]
    fn hex_is_lowercase_pairs_for_every_byte_and_length() {
        // Every byte value, at every length up to past the widest SIMD
        // block, and appended after what the line already holds.
        let bytes: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        for len in 0..=bytes.len() {
            let mut out = b"x".to_vec();
            write_hex(&mut out, &bytes[..len]);
            assert_eq!(&out[1..], hex::encode(&bytes[..len]).as_bytes(), "{len}");
        }
    }
}
