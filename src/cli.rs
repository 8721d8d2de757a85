//! The command line: which command to run and its options.
//!
//! `proxy-channel [run]` is the daemon (configured by the environment, see
//! `config`); `view` and `replay` read message files. A usage error is a
//! [`UsageError`]: one line, exit status 2.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use lexopt::prelude::*;

use crate::config::{self, SETTINGS, parse_target_address};
use crate::control::client::{CtlOptions, Request};
use crate::tools::filter::Filter;
use crate::tools::replay::ReplayOptions;
use crate::tools::viewer::{self, Format, ViewOptions};
use crate::units::parse_duration;

pub enum Command {
    Run,
    Help,
    Version,
    View(ViewOptions),
    Replay(ReplayOptions),
    Ctl(CtlOptions),
}

/// A command line that cannot be used, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl From<lexopt::Error> for UsageError {
    fn from(e: lexopt::Error) -> Self {
        UsageError(e.to_string())
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: Vec<OsString>) -> Result<Command, UsageError> {
    // `proxy-channel view --help` (and so on): the one help page.
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        return Ok(Command::Help);
    }
    let mut parser = lexopt::Parser::from_args(args);
    let Some(first) = parser.next()? else {
        return Ok(Command::Run);
    };
    match first {
        Short('h') | Long("help") => Ok(Command::Help),
        Short('V') | Long("version") => Ok(Command::Version),
        Value(command) => match command.to_str() {
            Some("run") => expect_end(&mut parser).map(|()| Command::Run),
            Some("view") => parse_view(&mut parser).map(Command::View),
            Some("replay") => parse_replay(&mut parser).map(Command::Replay),
            Some("ctl") => parse_ctl(&mut parser).map(Command::Ctl),
            _ => Err(UsageError(format!(
                "unknown command {command:?}: expected run, view, replay or ctl"
            ))),
        },
        other => Err(other.unexpected().into()),
    }
}

fn expect_end(parser: &mut lexopt::Parser) -> Result<(), UsageError> {
    match parser.next()? {
        None => Ok(()),
        Some(other) => Err(other.unexpected().into()),
    }
}

fn parse_view(parser: &mut lexopt::Parser) -> Result<ViewOptions, UsageError> {
    let mut options = ViewOptions {
        paths: Vec::new(),
        filter: Filter::default(),
        format: Format::Hex,
        follow: false,
        color: std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
    };
    let now = viewer::now();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("text") => options.format = Format::Text,
            Long("json") => options.format = Format::Json,
            Short('f') | Long("follow") => options.follow = true,
            Long("no-color") => options.color = false,
            Long(name @ ("ident" | "peer" | "source" | "event" | "since" | "until" | "device")) => {
                let option = format!("--{name}");
                set_filter(&mut options.filter, &option, parser, now)?;
            }
            Value(path) => options.paths.push(PathBuf::from(path)),
            other => return Err(other.unexpected().into()),
        }
    }
    if options.paths.is_empty() {
        options.paths.push(config::data_dir_from_env());
    }
    Ok(options)
}

fn parse_replay(parser: &mut lexopt::Parser) -> Result<ReplayOptions, UsageError> {
    let mut target = None;
    let mut options = ReplayOptions {
        target: String::new(),
        paths: Vec::new(),
        filter: Filter::default(),
        speed: None,
        concurrency: 1,
        wait: Duration::from_millis(500),
    };
    let now = viewer::now();
    while let Some(arg) = parser.next()? {
        match arg {
            Long("target") => target = Some(string_value(parser)?),
            Long("speed") => {
                let value = string_value(parser)?;
                let speed = value
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0);
                options.speed = Some(speed.ok_or_else(|| {
                    invalid("--speed", &value, "a number above 0, such as 1 or 10")
                })?);
            }
            Long("concurrency") => {
                let value = string_value(parser)?;
                let n = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n));
                options.concurrency = n.ok_or_else(|| {
                    invalid("--concurrency", &value, "a whole number from 1 to 10000")
                })?;
            }
            Long("wait") => {
                let value = string_value(parser)?;
                options.wait = parse_duration(&value)
                    .ok_or_else(|| invalid("--wait", &value, "a duration such as 500ms or 2s"))?;
            }
            Long(name @ ("ident" | "peer" | "since" | "until" | "device")) => {
                let option = format!("--{name}");
                set_filter(&mut options.filter, &option, parser, now)?;
            }
            Value(path) => options.paths.push(PathBuf::from(path)),
            other => return Err(other.unexpected().into()),
        }
    }
    let target = target.ok_or_else(|| UsageError("replay needs --target HOST:PORT".into()))?;
    if parse_target_address(&target).is_none() {
        return Err(invalid(
            "--target",
            &target,
            "host:port, such as 10.0.0.7:21000",
        ));
    }
    options.target = target;
    if options.paths.is_empty() {
        options.paths.push(config::data_dir_from_env());
    }
    Ok(options)
}

fn parse_ctl(parser: &mut lexopt::Parser) -> Result<CtlOptions, UsageError> {
    let mut words = Vec::new();
    let mut json = false;
    let mut socket = None;
    let mut device = None;
    while let Some(arg) = parser.next()? {
        match arg {
            Long("json") => json = true,
            Long("socket") => socket = Some(PathBuf::from(string_value(parser)?)),
            Long("device") => device = Some(string_value(parser)?),
            Value(word) => words.push(word.string()?),
            other => return Err(other.unexpected().into()),
        }
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let request = match (&words[..], device) {
        (["list"], None) => Request::List,
        (["stats"], None) => Request::Stats,
        (["close", ident], None) => Request::Close(ident.to_ascii_lowercase()),
        (["close"], Some(device)) => Request::CloseDevice(device),
        _ => {
            return Err(UsageError(
                "expected ctl list, ctl close IDENT, ctl close --device DEVICE or ctl stats".into(),
            ));
        }
    };
    Ok(CtlOptions {
        socket: socket.unwrap_or_else(default_control_socket),
        request,
        json,
    })
}

/// $PROXY_CONTROL_SOCKET, or control.sock in the data folder, by the
/// daemon's own rule.
fn default_control_socket() -> PathBuf {
    config::control_socket_from_env()
        .unwrap_or_else(|| config::data_dir_from_env().join("control.sock"))
}

/// Takes the value of filter `option` into `filter`.
fn set_filter(
    filter: &mut Filter,
    option: &str,
    parser: &mut lexopt::Parser,
    now: f64,
) -> Result<(), UsageError> {
    let value = string_value(parser)?;
    filter
        .set(option, &value, now)
        .map(drop)
        .map_err(|e| UsageError(e.to_string()))
}

fn string_value(parser: &mut lexopt::Parser) -> Result<String, UsageError> {
    Ok(parser.value()?.string()?)
}

fn invalid(option: &str, value: &str, expected: &str) -> UsageError {
    UsageError(format!("{option} {value:?}: expected {expected}"))
}

/// The text of `--help`.
pub fn help() -> String {
    let mut text = String::from(HELP);
    for setting in SETTINGS {
        text.push_str(&format!(
            "  {:<28} {:<30} {}\n",
            setting.name,
            setting.shown_default(),
            setting.meaning
        ));
    }
    text
}

const HELP: &str = "\
proxy-channel: a raw TCP proxy channel with traffic recording

Usage:
  proxy-channel [run]                   run the daemon (configured by the environment)
  proxy-channel view [OPTIONS] [PATH..] show recorded messages (default: $PROXY_DATA_DIR)
  proxy-channel replay --target HOST:PORT [OPTIONS] [PATH..]
                                        send recorded device traffic again
  proxy-channel ctl list|close IDENT|close --device DEVICE|stats [--json] [--socket PATH]
                                        talk to a running daemon
  proxy-channel --help | --version

Devices connect to PROXY_LISTEN; their bytes go to PROXY_TARGET1..3 and the
targets' replies come back; connects, disconnects and traffic are written as
JSON lines to $PROXY_DATA_DIR/messages.jsonl. SIGHUP rotates that file and
reads the device lists (PROXY_TARGETn_DEVICES) again, SIGTERM closes every
connection and exits.

view options:
  --text                payloads as escaped text instead of a hex dump
  --json                the matching lines unchanged (for jq)
  -f, --follow          keep reading the current file, across rotations
  --no-color            no colours (also when NO_COLOR is set or not a terminal)
  --ident ID            one device connection
  --peer ADDR           a device address: ip:port, or ip for any port
  --source N            0 the device, 1..3 a target
  --event E             0/data, 1/connected, 2/disconnected
  --device D            whole connections of the device recognised as D (device.ident);
                        with --follow, a connection shows from when its device is known
  --since T, --until T  RFC 3339 time (2026-11-26T10:00:00Z) or back from now (15m)

replay options:
  --target HOST:PORT    where to send (required)
  --speed N             keep the recorded timing, N times faster (default: as fast as possible)
  --concurrency N       connections replayed at once (default 1)
  --wait D              after the last byte, wait this long for replies (default 500ms)
  --ident, --peer, --since, --until   which recorded connections (by their start)
  --device D            the recorded connections of the device recognised as D

ctl:
  list                  open device connections, with bytes, device ident and targets
  close IDENT           close one connection (reason: closed by operator)
  close --device DEVICE close every connection (and UDP session) of that device
  stats                 counters since start
  --json                the daemon's JSON reply unchanged
  --socket PATH         default: $PROXY_CONTROL_SOCKET, or $PROXY_DATA_DIR/control.sock

Exit status: 0 done, 1 a file could not be read, a replayed connection
failed or the daemon could not be reached, 2 a usage or configuration error.

Environment of the daemon (n is a target number, 1 to 3):
";
