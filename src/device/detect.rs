//! Detection: the configured detectors ([`DetectorSet`]) and one
//! connection's run of them over its first bytes ([`Detection`]).
//!
//! Invariants of a [`Detection`]:
//! - it holds at most [`WINDOW_BYTES`] of the device's first bytes, in a
//!   buffer allocated only when a packet leaves it undecided (a login that
//!   arrives in one read is read in place) and freed when it ends;
//! - it reports its end exactly once; once ended, feeding it costs a branch;
//! - for the built-in detectors the outcome does not depend on how the bytes
//!   were split into reads (they answer monotonically, see `protocols`).
//!
//! The user regex is tried first, on everything that has arrived. Its
//! capture must be followed by at least one more byte before it counts
//! (unless the window is full or time is up), so a read that ends in the
//! middle of an ID cannot cut it short: end the pattern with what follows
//! the ID, as in `imei=(\d+);`.

use std::fmt;
use std::time::Instant;

use regex::bytes::{Regex, RegexBuilder};

use super::ident::Ident;
use super::protocols::{Builtin, Miss, Scan};
use super::{DETECTION_TIME, WINDOW_BYTES};

/// The detectors to run, from PROXY_DEVICE_IDENT and
/// PROXY_DEVICE_IDENT_REGEX. Built once, shared read-only by all workers.
#[derive(Debug, Clone)]
pub struct DetectorSet {
    regex: Option<Regex>,
    builtins: Vec<Builtin>,
}

/// A PROXY_DEVICE_IDENT or PROXY_DEVICE_IDENT_REGEX value that cannot be
/// used. Its text says what is expected, to follow `NAME=value: expected `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectorSetError {
    #[error("auto, off or a comma list of {}; {name:?} is not one", names())]
    UnknownDetector { name: String },
    #[error("a regular expression with exactly one capture group; {reason}")]
    BadRegex { reason: String },
}

impl DetectorSetError {
    /// The variable whose value was refused.
    pub fn variable(&self) -> &'static str {
        match self {
            DetectorSetError::UnknownDetector { .. } => "PROXY_DEVICE_IDENT",
            DetectorSetError::BadRegex { .. } => "PROXY_DEVICE_IDENT_REGEX",
        }
    }
}

fn names() -> String {
    let names: Vec<&str> = Builtin::ALL.iter().map(|b| b.name()).collect();
    names.join(", ")
}

impl DetectorSet {
    /// Parses PROXY_DEVICE_IDENT (`auto`, `off` or a comma list of detector
    /// names, any case) and PROXY_DEVICE_IDENT_REGEX (`None` when unset).
    /// `off` turns the built-in detectors off; a regex still runs.
    pub fn parse(names: &str, regex: Option<&str>) -> Result<DetectorSet, DetectorSetError> {
        Ok(DetectorSet {
            builtins: parse_names(names)?,
            regex: regex.map(compile_regex).transpose()?,
        })
    }

    /// True when nothing would be tried: connections need no [`Detection`].
    pub fn is_off(&self) -> bool {
        self.regex.is_none() && self.builtins.is_empty()
    }

    /// Reads the window: the ident, or whether more bytes could bring one.
    /// `last`: no more bytes will come.
    fn scan_stream(&self, window: &[u8], last: bool) -> Scan {
        self.scan(window, last, Builtin::scan_stream)
    }

    fn scan(&self, window: &[u8], last: bool, builtin: fn(Builtin, &[u8]) -> Scan) -> Scan {
        let mut miss = Miss::NoMatch;
        if let Some(regex) = &self.regex {
            match regex_scan(regex, window, last) {
                Ok(ident) => return Ok(ident),
                Err(Miss::NeedMore) => miss = Miss::NeedMore,
                Err(Miss::NoMatch) => {}
            }
        }
        for &detector in &self.builtins {
            match builtin(detector, window) {
                Ok(ident) => return Ok(ident),
                Err(Miss::NeedMore) => miss = Miss::NeedMore,
                Err(Miss::NoMatch) => {}
            }
        }
        Err(miss)
    }
}

/// For the startup log: `regex, teltonika, gt06` or `off`.
impl fmt::Display for DetectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let regex = self.regex.as_ref().map(|_| "regex");
        let builtins = self.builtins.iter().map(|b| b.name());
        let names: Vec<&str> = regex.into_iter().chain(builtins).collect();
        match names.is_empty() {
            true => f.write_str("off"),
            false => f.write_str(&names.join(", ")),
        }
    }
}

fn parse_names(text: &str) -> Result<Vec<Builtin>, DetectorSetError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => return Ok(Builtin::ALL.to_vec()),
        "off" => return Ok(Vec::new()),
        _ => {}
    }
    let mut chosen = Vec::new();
    for word in text.split(',') {
        let name = word.trim();
        let builtin = Builtin::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| DetectorSetError::UnknownDetector { name: name.into() })?;
        chosen.push(builtin);
    }
    // The built-ins never match the same bytes: keep one order, no repeats.
    Ok(Builtin::ALL
        .into_iter()
        .filter(|b| chosen.contains(b))
        .collect())
}

fn compile_regex(pattern: &str) -> Result<Regex, DetectorSetError> {
    let regex = RegexBuilder::new(pattern)
        .build()
        .map_err(|error| DetectorSetError::BadRegex {
            reason: format!("it does not compile: {}", one_line(&error.to_string())),
        })?;
    // Group 0 is the whole match.
    match regex.captures_len() - 1 {
        1 => Ok(regex),
        groups => Err(DetectorSetError::BadRegex {
            reason: format!(
                "this one has {groups} (use (?:...) for a group that captures nothing)"
            ),
        }),
    }
}

/// The regex crate explains a syntax error over several lines, with the
/// reason on the one that starts with `error:`; a config error is one line.
fn one_line(message: &str) -> String {
    match message
        .lines()
        .find_map(|l| l.trim().strip_prefix("error:"))
    {
        Some(reason) => reason.trim().to_string(),
        None => message.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// The first match whose group is a valid ident and, unless `last`, is
/// followed by a byte. A regex can always match later bytes: never
/// `NoMatch` before `last`.
fn regex_scan(regex: &Regex, window: &[u8], last: bool) -> Scan {
    for captures in regex.captures_iter(window) {
        let Some(group) = captures.get(1) else {
            continue;
        };
        if group.end() == window.len() && !last {
            return Err(Miss::NeedMore);
        }
        if let Some(ident) = Ident::from_bytes(group.as_bytes()) {
            return Ok(ident);
        }
    }
    Err(if last { Miss::NoMatch } else { Miss::NeedMore })
}

/// The device ident of one UDP datagram (its first [`WINDOW_BYTES`]), or
/// `None`. Teltonika is read in its UDP framing; the regex and the other
/// detectors as for TCP, the datagram being all there is.
pub fn detect_datagram(set: &DetectorSet, datagram: &[u8]) -> Option<Ident> {
    let window = &datagram[..datagram.len().min(WINDOW_BYTES)];
    set.scan(window, true, Builtin::scan_datagram).ok()
}

/// How a [`Detection`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The device ident: `device.ident` from the packet that revealed it on.
    Found(Ident),
    /// The device stays unrecognised.
    GaveUp(GiveUp),
}

/// Why a [`Detection`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Every detector has seen bytes it cannot match.
    NoMatchPossible,
    /// [`WINDOW_BYTES`] arrived without a match.
    WindowFull,
    /// [`DETECTION_TIME`] passed without a match.
    TimedOut,
    /// The device ended its stream before a match.
    StreamEnded,
}

/// For the log: why the device stays unrecognised.
impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUp::NoMatchPossible => f.write_str("no detector matches its first bytes"),
            GiveUp::WindowFull => write!(f, "no match in its first {WINDOW_BYTES} bytes"),
            GiveUp::TimedOut => write!(f, "no match within {:?} of accept", DETECTION_TIME),
            GiveUp::StreamEnded => f.write_str("its stream ended before a match"),
        }
    }
}

/// One TCP connection's device detection, from accept until it ends.
#[derive(Debug)]
pub struct Detection {
    state: State,
}

#[derive(Debug)]
enum State {
    Pending {
        /// The device's first bytes while undecided; empty (unallocated)
        /// until a packet leaves detection pending.
        window: Vec<u8>,
        deadline: Instant,
    },
    Ended,
}

impl Detection {
    /// Starts detection for a connection accepted at `accepted`.
    pub fn new(accepted: Instant) -> Detection {
        let deadline = accepted + DETECTION_TIME;
        let window = Vec::new();
        Detection {
            state: State::Pending { window, deadline },
        }
    }

    /// Reads a packet from the device, as read. `Some` exactly once: when
    /// detection ends (with this packet, or because `now` is past the
    /// deadline, in which case the packet came too late to count).
    pub fn feed(&mut self, set: &DetectorSet, packet: &[u8], now: Instant) -> Option<Outcome> {
        let State::Pending { window, deadline } = &mut self.state else {
            return None;
        };
        if now >= *deadline {
            return self.expire(set, now);
        }
        let room = WINDOW_BYTES - window.len();
        let packet = &packet[..packet.len().min(room)];
        let full = packet.len() == room;
        let scan = if window.is_empty() {
            // Read the packet in place: no copy when it decides.
            let scan = set.scan_stream(packet, full);
            if scan == Err(Miss::NeedMore) && !full {
                grow(window, packet);
            }
            scan
        } else {
            grow(window, packet);
            set.scan_stream(window, full)
        };
        match scan {
            Ok(ident) => self.end(Outcome::Found(ident)),
            Err(Miss::NoMatch) => self.end(Outcome::GaveUp(GiveUp::NoMatchPossible)),
            Err(Miss::NeedMore) if full => self.end(Outcome::GaveUp(GiveUp::WindowFull)),
            Err(Miss::NeedMore) => None,
        }
    }

    /// Ends detection if `now` is past its deadline (call it from the
    /// connection's timer). The regex gets a last look at the window, now
    /// that no more bytes will count. `Some` exactly once, as for `feed`.
    pub fn expire(&mut self, set: &DetectorSet, now: Instant) -> Option<Outcome> {
        let State::Pending { window, deadline } = &self.state else {
            return None;
        };
        if now < *deadline {
            return None;
        }
        let outcome = match set.scan_stream(window, true) {
            Ok(ident) => Outcome::Found(ident),
            Err(_) => Outcome::GaveUp(GiveUp::TimedOut),
        };
        self.end(outcome)
    }

    /// Ends detection now: the device has ended its stream, no more bytes
    /// will come. The regex gets a last look at the window, as at the
    /// deadline. `Some` exactly once, as for `feed`.
    pub fn finish(&mut self, set: &DetectorSet) -> Option<Outcome> {
        let State::Pending { window, .. } = &self.state else {
            return None;
        };
        let outcome = match set.scan_stream(window, true) {
            Ok(ident) => Outcome::Found(ident),
            Err(_) => Outcome::GaveUp(GiveUp::StreamEnded),
        };
        self.end(outcome)
    }

    /// When detection ends at the latest; `None` once it has ended.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Pending { deadline, .. } => Some(*deadline),
            State::Ended => None,
        }
    }

    pub fn is_pending(&self) -> bool {
        matches!(self.state, State::Pending { .. })
    }

    /// Heap bytes held for the window: at most [`WINDOW_BYTES`], 0 once
    /// ended.
    pub fn held_bytes(&self) -> usize {
        match &self.state {
            State::Pending { window, .. } => window.capacity(),
            State::Ended => 0,
        }
    }

    fn end(&mut self, outcome: Outcome) -> Option<Outcome> {
        self.state = State::Ended;
        Some(outcome)
    }
}

/// Appends `bytes` (the caller keeps the total within [`WINDOW_BYTES`]),
/// growing the buffer by doubling but never past [`WINDOW_BYTES`].
fn grow(window: &mut Vec<u8>, bytes: &[u8]) {
    let needed = window.len() + bytes.len();
    if needed > window.capacity() {
        let doubled = (window.capacity() * 2).max(64);
        let capacity = needed.max(doubled).min(WINDOW_BYTES);
        window.reserve_exact(capacity - window.len());
    }
    window.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests;
