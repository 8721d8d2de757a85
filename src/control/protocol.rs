//! The control socket's protocol, one set of types for both ends: the
//! [`server`](super::server) reads [`Request`]s and writes [`Reply`]s, `ctl`
//! ([`client`](super::client)) writes the requests and reads the replies.
//!
//! The wire is JSON Lines, one line each way per request:
//! - requests: `{"command":"list"}`, `{"command":"stats"}`,
//!   `{"command":"close","ident":"0123456789abcdef"}` and
//!   `{"command":"close","device":"D"}`; other keys are ignored;
//! - replies: `{"ok":false,"error":"..."}`, or `{"ok":true,...}` with the
//!   body of the request's kind ([`ListReply`], [`StatsReply`],
//!   [`ClosedReply`], [`ClosedDeviceReply`]).
//!
//! Invariants: no input makes these functions panic (whatever the bytes, the
//! nesting or the length: [`LineReader`] holds at most [`MAX_REQUEST`] bytes
//! of a line and then says [`TooLong`]); a reply line's keys are in
//! alphabetical order at every level, the order `ctl --json` has always
//! printed.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::control::stats::Snapshot;
use crate::net::connection::ConnectionReport;
use crate::store::message::Ident;

/// A request line longer than this is refused.
pub const MAX_REQUEST: usize = 64 * 1024;

/// What `ctl` asks of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Every open connection.
    List,
    /// The counters since start.
    Stats,
    /// Close the connection with this ident (as given: the server checks
    /// it, see [`parse_ident`]).
    Close(String),
    /// Close every open connection of this device ident.
    CloseDevice(String),
}

/// A request as it travels: a command and its arguments.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RequestLine {
    command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ident: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
}

/// Why a request line was refused; the text is the reply's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not a request: {0}")]
    NotARequest(String),
    #[error("unknown command {0:?}: expected list, close or stats")]
    UnknownCommand(String),
    #[error("close needs an ident")]
    CloseNeedsTarget,
    #[error("close takes an ident or a device, not both")]
    CloseTakesOneTarget,
}

impl Request {
    /// Reads one request line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
        let line: RequestLine =
            serde_json::from_slice(line).map_err(|e| RequestError::NotARequest(e.to_string()))?;
        match (line.command.as_str(), line.ident, line.device) {
            ("list", _, _) => Ok(Request::List),
            ("stats", _, _) => Ok(Request::Stats),
            ("close", Some(ident), None) => Ok(Request::Close(ident)),
            ("close", None, Some(device)) => Ok(Request::CloseDevice(device)),
            ("close", None, None) => Err(RequestError::CloseNeedsTarget),
            ("close", Some(_), Some(_)) => Err(RequestError::CloseTakesOneTarget),
            (other, _, _) => Err(RequestError::UnknownCommand(other.to_string())),
        }
    }

    /// The request line, newline included.
    pub fn to_line(&self) -> String {
        let line = match self {
            Request::List => RequestLine {
                command: "list".into(),
                ..RequestLine::default()
            },
            Request::Stats => RequestLine {
                command: "stats".into(),
                ..RequestLine::default()
            },
            Request::Close(ident) => RequestLine {
                command: "close".into(),
                ident: Some(ident.clone()),
                ..RequestLine::default()
            },
            Request::CloseDevice(device) => RequestLine {
                command: "close".into(),
                device: Some(device.clone()),
                ..RequestLine::default()
            },
        };
        // Only strings: serde_json has no way to fail on them.
        let mut text = serde_json::to_string(&line).expect("strings always encode as JSON");
        text.push('\n');
        text
    }
}

/// An ident as the messages write it: exactly 16 hex digits (lowercase;
/// uppercase is taken too, as `ctl close` always was), nothing else, not
/// even the sign `u64::from_str_radix` would allow.
pub fn parse_ident(text: &str) -> Option<Ident> {
    if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok().map(Ident)
}

/// The body of the answer to `list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListReply {
    /// Oldest first.
    pub connections: Vec<ConnectionReport>,
}

/// The body of the answer to `stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReply {
    pub stats: Snapshot,
    /// The configured target numbers.
    #[serde(default)]
    pub targets: Vec<u8>,
}

/// The body of the answer to `close IDENT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedReply {
    /// The ident as it was asked for.
    pub closed: String,
}

/// The body of the answer to `close --device DEVICE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedDeviceReply {
    pub device: String,
    /// The idents of the connections closed (at least one).
    pub closed: Vec<String>,
}

/// One reply line of the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    List(ListReply),
    /// Boxed: a snapshot is large beside the other replies.
    Stats(Box<StatsReply>),
    Closed(ClosedReply),
    ClosedDevice(ClosedDeviceReply),
    /// `{"ok":false,"error":...}`.
    Refused(String),
}

impl Reply {
    /// The reply line, newline included.
    pub fn to_line(&self) -> String {
        let encoded = match self {
            Reply::List(body) => ok_value(body),
            Reply::Stats(body) => ok_value(body.as_ref()),
            Reply::Closed(body) => ok_value(body),
            Reply::ClosedDevice(body) => ok_value(body),
            Reply::Refused(why) => Ok(refused_value(why)),
        };
        let value = encoded.unwrap_or_else(|e| refused_value(&format!("cannot encode: {e}")));
        let mut line = value.to_string();
        line.push('\n');
        line
    }
}

/// `body` with `"ok":true`, as a JSON value: its object's keys sort
/// themselves (serde_json's map), at every level.
fn ok_value<T: Serialize>(body: &T) -> Result<Value, serde_json::Error> {
    let mut value = serde_json::to_value(body)?;
    if let Value::Object(fields) = &mut value {
        fields.insert("ok".into(), Value::Bool(true));
    }
    Ok(value)
}

fn refused_value(why: &str) -> Value {
    serde_json::json!({"ok": false, "error": why})
}

impl Reply {
    /// Reads the reply line to `request`: its body if `"ok":true`, else
    /// the daemon's reason as [`ReplyError::Refused`] (never
    /// [`Reply::Refused`]).
    pub fn parse(request: &Request, line: &str) -> Result<Reply, ReplyError> {
        Ok(match request {
            Request::List => Reply::List(parse_body(line)?),
            Request::Stats => Reply::Stats(Box::new(parse_body(line)?)),
            Request::Close(_) => Reply::Closed(parse_body(line)?),
            Request::CloseDevice(_) => Reply::ClosedDevice(parse_body(line)?),
        })
    }
}

/// Why a reply line gives `ctl` nothing to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not a reply of this protocol.
    #[error("{0}")]
    Unreadable(String),
    /// The daemon refused the request; its reason.
    #[error("{0}")]
    Refused(String),
}

/// The first part of every reply.
#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

/// Reads a reply line: its body if `"ok":true`, else the daemon's reason.
fn parse_body<T: DeserializeOwned>(line: &str) -> Result<T, ReplyError> {
    let status: Status =
        serde_json::from_str(line).map_err(|e| ReplyError::Unreadable(e.to_string()))?;
    if !status.ok {
        let why = status.error.unwrap_or_else(|| "no reason given".into());
        return Err(ReplyError::Refused(why));
    }
    serde_json::from_str(line).map_err(|e| ReplyError::Unreadable(e.to_string()))
}

/// A line longer than [`MAX_REQUEST`] bytes; the rest of the input is
/// dropped with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request longer than {MAX_REQUEST} bytes")
    }
}

/// Cuts what a client sends into request lines. Holds the unfinished line
/// (at most [`MAX_REQUEST`] bytes once [`LineReader::take_lines`] has run)
/// and whatever was pushed since.
#[derive(Debug, Default)]
pub struct LineReader {
    buffer: Vec<u8>,
}

impl LineReader {
    /// Adds bytes as they were read.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes held: the unfinished line and what was pushed since.
    pub fn held(&self) -> usize {
        self.buffer.len()
    }

    /// Takes every complete line (without its newline), in order. A line
    /// longer than [`MAX_REQUEST`], complete or not, ends the list as
    /// [`TooLong`] and everything held is dropped with it; otherwise the
    /// unfinished line stays for the next push.
    pub fn take_lines(&mut self) -> Vec<Result<Vec<u8>, TooLong>> {
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(length) = self.buffer[start..].iter().position(|&b| b == b'\n') {
            if length > MAX_REQUEST {
                break;
            }
            lines.push(Ok(self.buffer[start..start + length].to_vec()));
            start += length + 1;
        }
        let rest = &self.buffer[start..];
        if rest.len() > MAX_REQUEST {
            lines.push(Err(TooLong));
            self.buffer = Vec::new();
        } else {
            self.buffer.drain(..start);
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ident_is_exactly_sixteen_hex_digits() {
        assert_eq!(
            parse_ident("0123456789abcdef"),
            Some(Ident(0x0123_4567_89ab_cdef))
        );
        assert_eq!(parse_ident("FFFFFFFFFFFFFFFF"), Some(Ident(u64::MAX)));
        for bad in [
            "+fffffffffffffff",
            "-fffffffffffffff",
            " fffffffffffffff",
            "0x0123456789abcd",
            "0123456789abcdeg",
            "0123456789abcde",
            "0123456789abcdef0",
            "",
            "０123456789abcd",
        ] {
            assert_eq!(parse_ident(bad), None, "{bad:?}");
        }
    }

    /// The bytes `ctl` has always sent (serde_json's sorted map).
    #[test]
    fn requests_are_the_lines_ctl_always_sent_and_read_back() {
        let cases = [
            (Request::List, "{\"command\":\"list\"}\n"),
            (Request::Stats, "{\"command\":\"stats\"}\n"),
            (
                Request::Close("0123456789abcdef".into()),
                "{\"command\":\"close\",\"ident\":\"0123456789abcdef\"}\n",
            ),
            (
                Request::CloseDevice("356307042441013".into()),
                "{\"command\":\"close\",\"device\":\"356307042441013\"}\n",
            ),
        ];
        for (request, line) in cases {
            assert_eq!(request.to_line(), line);
            let read = Request::parse(line.trim_end().as_bytes());
            assert_eq!(read, Ok(request), "{line}");
        }
    }

    #[test]
    fn bad_requests_say_why() {
        let cases = [
            ("hello", "not a request: "),
            ("[1,2]", "not a request: "),
            ("{\"command\":\"list\",\"ident\":5}", "not a request: "),
            (
                "{\"command\":\"dance\"}",
                "unknown command \"dance\": expected list, close or stats",
            ),
            ("{\"command\":\"close\"}", "close needs an ident"),
            (
                "{\"command\":\"close\",\"ident\":\"a\",\"device\":\"b\"}",
                "close takes an ident or a device, not both",
            ),
        ];
        for (line, expected) in cases {
            let error = Request::parse(line.as_bytes()).expect_err(line);
            assert!(error.to_string().starts_with(expected), "{line}: {error}");
        }
    }

    /// The reply bytes are the ones the hand-built `json!` values made:
    /// keys sorted at every level.
    #[test]
    fn replies_keep_their_bytes() {
        let stats = StatsReply {
            stats: Snapshot::default(),
            targets: vec![1, 2],
        };
        let expected = serde_json::json!({
            "ok": true,
            "stats": Snapshot::default(),
            "targets": [1, 2],
        })
        .to_string()
            + "\n";
        assert_eq!(Reply::Stats(Box::new(stats.clone())).to_line(), expected);
        assert_eq!(
            Reply::Closed(ClosedReply {
                closed: "0123456789abcdef".into()
            })
            .to_line(),
            "{\"closed\":\"0123456789abcdef\",\"ok\":true}\n"
        );
        assert_eq!(
            Reply::Refused("no".into()).to_line(),
            "{\"error\":\"no\",\"ok\":false}\n"
        );
        let line = Reply::Stats(Box::new(stats.clone())).to_line();
        assert_eq!(
            Reply::parse(&Request::Stats, &line),
            Ok(Reply::Stats(Box::new(stats)))
        );
    }

    #[test]
    fn a_refused_reply_gives_its_reason() {
        let line = Reply::Refused("busy".into()).to_line();
        assert_eq!(
            parse_body::<ListReply>(&line),
            Err(ReplyError::Refused("busy".into()))
        );
        assert_eq!(
            parse_body::<ListReply>("{}"),
            Err(ReplyError::Refused("no reason given".into()))
        );
        assert!(matches!(
            parse_body::<ListReply>("nonsense"),
            Err(ReplyError::Unreadable(_))
        ));
    }

    #[test]
    fn lines_are_cut_at_newlines_and_an_overlong_one_ends_the_input() {
        let mut reader = LineReader::default();
        reader.push(b"a\n\nb");
        assert_eq!(reader.take_lines(), vec![Ok(b"a".to_vec()), Ok(Vec::new())]);
        reader.push(b"c\n");
        assert_eq!(reader.take_lines(), vec![Ok(b"bc".to_vec())]);
        assert_eq!(reader.held(), 0);

        reader.push(&vec![b'x'; MAX_REQUEST]);
        assert_eq!(reader.take_lines(), Vec::new(), "exactly the limit waits");
        reader.push(b"x");
        assert_eq!(reader.take_lines(), vec![Err(TooLong)]);
        assert_eq!(reader.held(), 0);

        let mut long = b"ok\n".to_vec();
        long.extend(vec![b'y'; MAX_REQUEST + 1]);
        long.extend_from_slice(b"\nnext\n");
        reader.push(&long);
        assert_eq!(reader.take_lines(), vec![Ok(b"ok".to_vec()), Err(TooLong)]);
        assert_eq!(reader.held(), 0, "what follows an overlong line is dropped");
    }
}
