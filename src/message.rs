//! The message: one JSON object per line, with flespi's parameter names.
//!
//! [`Message`] is the written form, borrowing everything it needs so that a
//! worker serialises it straight into its batch: the payload is hex-encoded
//! through a small stack buffer, never through a `String`. [`StoredMessage`]
//! is the read-back form used by the viewer, replay and tests. [`Ident`]s are
//! random-looking yet unique within a run (a bijective mix of a counter).

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize, Serializer};

/// `proxy.event`: what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Data = 0,
    Connected = 1,
    Dropped = 2,
}

/// `proxy.source` of the device side; targets are 1..=3.
pub const DEVICE: u8 = 0;

/// The random name of one device connection: 16 lowercase hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ident(pub u64);

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for Ident {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Hands out idents that look random and never repeat within a run: a random
/// key plus a counter, passed through a bijective 64-bit mix.
pub struct IdentGenerator {
    key: u64,
    counter: u64,
}

impl IdentGenerator {
    pub fn new() -> IdentGenerator {
        IdentGenerator {
            key: rand::random(),
            counter: 0,
        }
    }

    pub fn next_ident(&mut self) -> Ident {
        self.counter += 1;
        let mut x = self
            .key
            .wrapping_add(self.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15));
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

/// A payload written as lowercase hex, straight into the serialiser.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chunk = [0u8; 512];
        for bytes in self.0.chunks(chunk.len() / 2) {
            let out = &mut chunk[..bytes.len() * 2];
            hex::encode_to_slice(bytes, out).map_err(|_| fmt::Error)?;
            f.write_str(std::str::from_utf8(out).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl Serialize for Hex<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One message as it is written.
#[derive(Serialize)]
pub struct Message<'a> {
    #[serde(rename = "channel.id")]
    pub channel_id: u64,
    #[serde(rename = "protocol.id")]
    pub protocol_id: u64,
    pub ident: Ident,
    pub peer: SocketAddr,
    #[serde(rename = "proxy.event")]
    pub event: u8,
    #[serde(rename = "proxy.source")]
    pub source: u8,
    #[serde(rename = "proxy.payload.size", skip_serializing_if = "Option::is_none")]
    pub payload_size: Option<usize>,
    #[serde(rename = "proxy.payload.hex", skip_serializing_if = "Option::is_none")]
    pub payload_hex: Option<Hex<'a>>,
    #[serde(rename = "server.timestamp")]
    pub server_timestamp: f64,
    pub timestamp: f64,
    #[serde(rename = "proxy.target", skip_serializing_if = "Option::is_none")]
    pub target: Option<&'a str>,
    #[serde(rename = "proxy.reason", skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(
        rename = "proxy.bytes.received",
        skip_serializing_if = "Option::is_none"
    )]
    pub bytes_received: Option<u64>,
    #[serde(rename = "proxy.bytes.sent", skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
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
    pub event: u8,
    #[serde(rename = "proxy.source")]
    pub source: u8,
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
}

impl<'a> StoredMessage<'a> {
    /// Parses one line; a line that is valid JSON but not one of our
    /// messages is an error too.
    pub fn parse(line: &'a [u8]) -> Result<StoredMessage<'a>, String> {
        let message: StoredMessage<'a> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        if message.event > Event::Dropped as u8 {
            return Err(format!("proxy.event {} is not 0, 1 or 2", message.event));
        }
        if message.source > 3 {
            return Err(format!("proxy.source {} is not 0 to 3", message.source));
        }
        Ok(message)
    }
}

/// Now, as seconds since the Unix epoch with microsecond precision.
pub fn now_timestamp() -> f64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Exact: micros fit in f64's 53 bits, and the division rounds to the
    // double nearest the decimal, which then prints as that decimal.
    since_epoch.as_micros() as f64 / 1e6
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
            event: Event::Data as u8,
            source: DEVICE,
            payload_size: Some(payload.len()),
            payload_hex: Some(Hex(payload)),
            server_timestamp: 1_795_000_000.123_456,
            timestamp: 1_795_000_000.123_456,
            target: None,
            reason: None,
            bytes_received: None,
            bytes_sent: None,
        }
    }

    #[test]
    fn a_data_message_has_flespi_keys_in_order() {
        let line = serde_json::to_string(&sample(b"\x00\xffAB")).unwrap();
        assert_eq!(
            line,
            r#"{"channel.id":7,"protocol.id":0,"ident":"00abcdef01234567","peer":"[::1]:4000","proxy.event":0,"proxy.source":0,"proxy.payload.size":4,"proxy.payload.hex":"00ff4142","server.timestamp":1795000000.123456,"timestamp":1795000000.123456}"#
        );
    }

    #[test]
    fn a_written_message_reads_back() {
        let payload: Vec<u8> = (0..=255).cycle().take(3000).collect();
        let line = serde_json::to_string(&sample(&payload)).unwrap();
        let stored: StoredMessage<'_> = serde_json::from_str(&line).unwrap();
        assert_eq!(hex::decode(stored.payload_hex.unwrap()).unwrap(), payload);
        assert_eq!(stored.ident, "00abcdef01234567");
        assert_eq!(stored.server_timestamp, 1_795_000_000.123_456);
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
    fn timestamps_have_microseconds() {
        let t = now_timestamp();
        let text = serde_json::to_string(&t).unwrap();
        let decimals = text.split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 6, "{text}");
        assert!(t > 1.7e9);
    }
}
