//! Which messages a viewer or replay run looks at: `--ident`, `--peer`,
//! `--source`, `--event`, `--since`, `--until`, `--device`, combined with
//! "and".
//!
//! Times are RFC 3339 (`2026-11-26T10:00:00Z`, or with an offset) or a
//! duration back from now (`15m`, `2h`, `7d`). `--since` is inclusive and
//! `--until` exclusive.
//!
//! `--device D` takes whole connections: every message of an ident whose
//! device was recognised as D, its messages from before the recognition
//! (event 1, the first packets) included. A message carries
//! `device.ident` only from the recognition on, so the idents of D are
//! found first ([`DeviceConnections`], a first pass over the files) and
//! the messages are then matched by ident.

use std::collections::HashSet;

use crate::net::side::Side;
use crate::store::message::{Event, StoredMessage};
use crate::units::parse_duration;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub ident: Option<String>,
    pub peer: Option<String>,
    pub source: Option<Side>,
    pub event: Option<Event>,
    /// Seconds since the epoch.
    pub since: Option<f64>,
    pub until: Option<f64>,
    /// `--device`: matched by connection, through [`DeviceConnections`],
    /// not by [`Filter::matches`].
    pub device: Option<String>,
}

/// A filter value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{option} {value:?}: expected {expected}")]
pub struct FilterError {
    pub option: String,
    pub value: String,
    pub expected: &'static str,
}

impl Filter {
    /// Sets one filter from its command-line option; `Ok(false)` when the
    /// option is not a filter.
    pub fn set(&mut self, option: &str, value: &str, now: f64) -> Result<bool, FilterError> {
        let error = |expected| FilterError {
            option: option.to_string(),
            value: value.to_string(),
            expected,
        };
        match option {
            "--ident" => self.ident = Some(value.to_ascii_lowercase()),
            "--peer" => self.peer = Some(value.to_string()),
            "--device" => self.device = Some(value.to_string()),
            "--source" => {
                let source = value.parse().ok().and_then(Side::from_source);
                self.source =
                    Some(source.ok_or_else(|| error("0 (device) or 1, 2, 3 (a target)"))?);
            }
            "--event" => {
                let event = parse_event(value);
                self.event =
                    Some(event.ok_or_else(|| error("0/data, 1/connected or 2/disconnected"))?);
            }
            "--since" | "--until" => {
                let time = parse_time(value, now).ok_or_else(|| error(TIME_EXPECTED))?;
                match option {
                    "--since" => self.since = Some(time),
                    _ => self.until = Some(time),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    pub fn matches(&self, message: &StoredMessage<'_>) -> bool {
        self.ident.as_deref().is_none_or(|i| message.ident == i)
            && self
                .peer
                .as_deref()
                .is_none_or(|p| peer_matches(&message.peer, p))
            && self.source.is_none_or(|s| message.source == s)
            && self.event.is_none_or(|e| message.event == e)
            && self.in_time(message.server_timestamp)
    }

    /// For replay: whether a recorded connection, by its ident, peer,
    /// start time and device (if it was recognised), is selected.
    pub fn matches_connection(
        &self,
        ident: &str,
        peer: &str,
        started: f64,
        device: Option<&str>,
    ) -> bool {
        self.ident.as_deref().is_none_or(|i| ident == i)
            && self.peer.as_deref().is_none_or(|p| peer_matches(peer, p))
            && self.in_time(started)
            && self.device.as_deref().is_none_or(|d| device == Some(d))
    }

    /// Whether a time falls within `--since` and `--until`.
    pub fn in_time(&self, time: f64) -> bool {
        self.since.is_none_or(|since| time >= since) && self.until.is_none_or(|until| time < until)
    }
}

/// The connections (idents) whose device was recognised as `--device`'s.
#[derive(Debug, Clone, Default)]
pub struct DeviceConnections {
    device: String,
    idents: HashSet<String>,
}

impl DeviceConnections {
    /// `None` without `--device`.
    pub fn of(filter: &Filter) -> Option<DeviceConnections> {
        let device = filter.device.clone()?;
        Some(DeviceConnections {
            device,
            idents: HashSet::new(),
        })
    }

    /// Notes the message's connection if the message names the device.
    pub fn note(&mut self, message: &StoredMessage<'_>) {
        if message.device_ident.as_deref() == Some(self.device.as_str())
            && !self.idents.contains(message.ident.as_ref())
        {
            self.idents.insert(message.ident.to_string());
        }
    }

    /// Whether the connection `ident` is one of the device's.
    pub fn contains(&self, ident: &str) -> bool {
        self.idents.contains(ident)
    }
}

/// Whether a raw message line may name a device: the first pass over the
/// files parses only those.
pub fn may_name_device(line: &[u8]) -> bool {
    const KEY: &[u8] = b"\"device.ident\":";
    line.windows(KEY.len()).any(|window| window == KEY)
}

const TIME_EXPECTED: &str =
    "an RFC 3339 time such as 2026-11-26T10:00:00Z, or a duration back from now such as 15m";

/// `ip:port` matches exactly; a bare address matches every port of it.
fn peer_matches(peer: &str, wanted: &str) -> bool {
    if peer == wanted {
        return true;
    }
    let address = peer.rsplit_once(':').map_or(peer, |(address, _)| address);
    address == wanted || address.trim_start_matches('[').trim_end_matches(']') == wanted
}

fn parse_event(text: &str) -> Option<Event> {
    match text.to_ascii_lowercase().as_str() {
        "0" | "data" => Some(Event::Data),
        "1" | "connected" | "connect" => Some(Event::Established),
        "2" | "disconnected" | "disconnect" | "dropped" => Some(Event::Dropped),
        _ => None,
    }
}

/// RFC 3339, or a duration back from `now` (seconds since the epoch).
pub fn parse_time(text: &str, now: f64) -> Option<f64> {
    if let Ok(time) = text.parse::<jiff::Timestamp>() {
        return Some(time.as_microsecond() as f64 / 1e6);
    }
    parse_duration(text).map(|ago| now - ago.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(peer: &str, source: u8, event: u8, time: f64) -> StoredMessage<'static> {
        let line = format!(
            r#"{{"channel.id":1,"protocol.id":0,"ident":"00000000000000aa","peer":"{peer}","proxy.event":{event},"proxy.source":{source},"server.timestamp":{time},"timestamp":{time}}}"#
        );
        let leaked: &'static str = Box::leak(line.into_boxed_str());
        serde_json::from_str(leaked).unwrap()
    }

    fn filter(options: &[(&str, &str)]) -> Filter {
        let mut filter = Filter::default();
        for (option, value) in options {
            assert!(filter.set(option, value, 2_000_000_000.0).unwrap());
        }
        filter
    }

    #[test]
    fn filters_combine_with_and() {
        let m = message("10.0.0.5:4000", 1, 0, 1_795_000_000.5);
        assert!(filter(&[]).matches(&m));
        assert!(filter(&[("--ident", "00000000000000AA"), ("--source", "1")]).matches(&m));
        assert!(!filter(&[("--ident", "00000000000000aa"), ("--source", "0")]).matches(&m));
        assert!(filter(&[("--event", "data")]).matches(&m));
        assert!(!filter(&[("--event", "connected")]).matches(&m));
    }

    #[test]
    fn a_bare_address_matches_every_port() {
        assert!(filter(&[("--peer", "10.0.0.5")]).matches(&message("10.0.0.5:4000", 0, 1, 1.0)));
        assert!(filter(&[("--peer", "10.0.0.5:4000")]).matches(&message(
            "10.0.0.5:4000",
            0,
            1,
            1.0
        )));
        assert!(!filter(&[("--peer", "10.0.0.5:4001")]).matches(&message(
            "10.0.0.5:4000",
            0,
            1,
            1.0
        )));
        assert!(filter(&[("--peer", "::1")]).matches(&message("[::1]:4000", 0, 1, 1.0)));
    }

    #[test]
    fn times_are_rfc3339_or_back_from_now() {
        assert_eq!(
            parse_time("2026-11-18T11:06:40Z", 0.0),
            Some(1_795_000_000.0)
        );
        assert_eq!(
            parse_time("2026-11-18T12:06:40+01:00", 0.0),
            Some(1_795_000_000.0)
        );
        assert_eq!(parse_time("15m", 10_000.0), Some(9_100.0));
        assert_eq!(parse_time("yesterday", 0.0), None);
        let since_until = filter(&[
            ("--since", "2026-11-18T11:06:40Z"),
            ("--until", "2026-11-18T11:06:41Z"),
        ]);
        assert!(since_until.matches(&message("a:1", 0, 1, 1_795_000_000.0)));
        assert!(!since_until.matches(&message("a:1", 0, 1, 1_795_000_001.0)));
        assert!(!since_until.matches(&message("a:1", 0, 1, 1_794_999_999.9)));
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        let mut f = Filter::default();
        let error = f.set("--source", "4", 0.0).unwrap_err();
        assert_eq!(
            error.to_string(),
            "--source \"4\": expected 0 (device) or 1, 2, 3 (a target)"
        );
        assert!(
            f.set("--since", "soon", 0.0)
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
        assert_eq!(f.set("--text", "", 0.0), Ok(false));
    }

    #[test]
    fn a_device_is_matched_by_connection() {
        let filter = filter(&[("--device", "359586015829802")]);
        assert!(filter.matches(&message("a:1", 0, 1, 1.0)), "not by message");
        let mut devices = DeviceConnections::of(&filter).expect("--device");
        let line = r#"{"channel.id":1,"protocol.id":0,"ident":"00000000000000bb","peer":"a:1","proxy.event":0,"proxy.source":0,"server.timestamp":1.0,"timestamp":1.0,"device.ident":"359586015829802"}"#;
        assert!(may_name_device(line.as_bytes()));
        assert!(!may_name_device(b"{\"ident\":\"00000000000000bb\"}"));
        let named: StoredMessage<'_> = serde_json::from_str(line).unwrap();
        devices.note(&message("a:1", 0, 1, 1.0));
        devices.note(&named);
        assert!(devices.contains("00000000000000bb"));
        assert!(!devices.contains("00000000000000aa"));
        assert!(filter.matches_connection("00000000000000bb", "a:1", 1.0, Some("359586015829802")));
        assert!(!filter.matches_connection("00000000000000bb", "a:1", 1.0, Some("1")));
        assert!(!filter.matches_connection("00000000000000bb", "a:1", 1.0, None));
    }
}
