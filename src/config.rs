//! `Config`: every setting of the daemon, parsed strictly from `PROXY_*`
//! environment variables.
//!
//! Parsing works on a list of `(name, value)` pairs rather than on the real
//! environment, so tests feed it a vector. Every `PROXY_*` variable must be
//! consumed by some setting; whatever is left over is unknown and refused.
//! One table, [`SETTINGS`], documents all of them for `--help` and the README.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::units::{parse_bool, parse_duration, parse_size};

/// Target numbers are 1..=3, and a message's `proxy.source` is that number.
pub const MAX_TARGETS: usize = 3;

/// One documented variable: its name, its default and what it means.
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

/// Every variable the daemon reads; `n` stands for a target number 1, 2 or 3.
#[rustfmt::skip]
pub const SETTINGS: &[Setting] = &[
    Setting { name: "PROXY_LISTEN", default: "127.0.0.1:5555", meaning: "comma-separated ip:port addresses to accept device connections on" },
    Setting { name: "PROXY_TARGETn", default: "unset", meaning: "host:port of target n (1..3); n is its proxy.source number" },
    Setting { name: "PROXY_TARGETn_MANDATORY", default: "true", meaning: "a failure of target n drops the device connection" },
    Setting { name: "PROXY_TARGETn_REPLIES", default: "true", meaning: "relay target n's replies to the device" },
    Setting { name: "PROXY_TARGETn_SEND_PROXY", default: "off", meaning: "off, v1 or v2: send target n a PROXY protocol header first" },
    Setting { name: "PROXY_STORE", default: "true", meaning: "store mode: record device traffic (and relayed replies) as event 0 messages" },
    Setting { name: "PROXY_DATA_DIR", default: "./data", meaning: "folder of the message log files" },
    Setting { name: "PROXY_CHANNEL_ID", default: "1", meaning: "channel.id of every message" },
    Setting { name: "PROXY_PROTOCOL_ID", default: "0", meaning: "protocol.id of every message" },
    Setting { name: "PROXY_MAX_PAYLOAD", default: "2MiB", meaning: "a packet larger than this is stored without proxy.payload.hex" },
    Setting { name: "PROXY_ROTATE_SIZE", default: "64MiB", meaning: "rotate the current message file once it reaches this size" },
    Setting { name: "PROXY_ROTATE_INTERVAL", default: "1h", meaning: "rotate the current message file once it is this old" },
    Setting { name: "PROXY_RETAIN_FILES", default: "168", meaning: "keep at most this many rotated files" },
    Setting { name: "PROXY_RETAIN_AGE", default: "30d", meaning: "delete rotated files older than this" },
    Setting { name: "PROXY_WORKERS", default: "number of CPUs", meaning: "worker threads" },
    Setting { name: "PROXY_IDLE_TIMEOUT", default: "10m", meaning: "close a device connection with no bytes either way for this long (0: never)" },
    Setting { name: "PROXY_CONNECT_TIMEOUT", default: "10s", meaning: "give up connecting to a target after this long" },
    Setting { name: "PROXY_MAX_CONNECTIONS", default: "100000", meaning: "device connections held at once; more are closed at accept" },
    Setting { name: "PROXY_TARGET_BUFFER", default: "4MiB", meaning: "bytes queued for one target (or for the device) at most" },
    Setting { name: "PROXY_CONTROL_SOCKET", default: "$PROXY_DATA_DIR/control.sock", meaning: "Unix socket for `proxy-channel ctl`; off disables it" },
    Setting { name: "PROXY_METRICS_FILE", default: "unset", meaning: "write Prometheus text metrics to this file" },
    Setting { name: "PROXY_METRICS_INTERVAL", default: "15s", meaning: "how often the metrics file is rewritten" },
    Setting { name: "PROXY_ACCEPT_PROXY_PROTOCOL", default: "off", meaning: "off, v1, v2 or any: device connections start with a PROXY protocol header" },
    Setting { name: "RUST_LOG", default: "info", meaning: "level of the daemon's own log on stderr" },
];

/// A setting that cannot be used, worded for the person who wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}={value:?}: expected {expected}")]
    Invalid {
        name: String,
        value: String,
        expected: String,
    },
    #[error(
        "{name}={value:?}: unknown variable, expected one of the PROXY_* settings listed by `proxy-channel --help`"
    )]
    Unknown { name: String, value: String },
    #[error("{name}={value:?}: {target} is not set, expected {target}=host:port as well")]
    TargetMissing {
        name: String,
        value: String,
        target: String,
    },
}

/// Whether device connections start with a HAProxy PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptProxyProtocol {
    Off,
    V1,
    V2,
    Any,
}

/// Which PROXY protocol header, if any, to send a target first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendProxyProtocol {
    Off,
    V1,
    V2,
}

/// A target's configured `host:port`; the host may be a name or an IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetAddress {
    pub host: String,
    pub port: u16,
}

impl TargetAddress {
    /// The socket address when the host is an IP literal (no lookup needed).
    pub fn literal(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One of the up to three targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// 1..=3: its `proxy.source`.
    pub number: u8,
    pub address: TargetAddress,
    pub mandatory: bool,
    pub replies: bool,
    pub send_proxy: SendProxyProtocol,
}

/// Everything the daemon needs to know, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub targets: Vec<TargetConfig>,
    pub store: bool,
    pub data_dir: PathBuf,
    pub channel_id: u64,
    pub protocol_id: u64,
    pub max_payload: u64,
    pub rotate_size: u64,
    pub rotate_interval: Duration,
    pub retain_files: usize,
    pub retain_age: Duration,
    pub workers: usize,
    /// `None`: connections never time out for idleness.
    pub idle_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub max_connections: usize,
    pub target_buffer: usize,
    /// `None`: no control socket.
    pub control_socket: Option<PathBuf>,
    pub metrics_file: Option<PathBuf>,
    pub metrics_interval: Duration,
    pub accept_proxy_protocol: AcceptProxyProtocol,
}

impl Config {
    /// Reads the real environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let mut vars = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().filter(|n| n.starts_with("PROXY_")) else {
                continue;
            };
            match value.into_string() {
                Ok(value) => vars.push((name.to_string(), value)),
                Err(raw) => return Err(invalid(name, &raw.to_string_lossy(), "UTF-8 text")),
            }
        }
        Config::from_vars(vars)
    }

    /// Parses `PROXY_*` variables; any other names are ignored.
    pub fn from_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut vars = Vars(
            vars.into_iter()
                .filter(|(name, _)| name.starts_with("PROXY_"))
                .collect(),
        );
        let data_dir = vars.parse("PROXY_DATA_DIR", "./data", non_empty_path, PATH_EXPECTED)?;
        let config = Config {
            listen: vars.parse(
                "PROXY_LISTEN",
                "127.0.0.1:5555",
                parse_listen,
                LISTEN_EXPECTED,
            )?,
            targets: parse_targets(&mut vars)?,
            store: vars.parse("PROXY_STORE", "true", parse_bool, BOOL_EXPECTED)?,
            channel_id: vars.parse("PROXY_CHANNEL_ID", "1", parse_u64, NUMBER_EXPECTED)?,
            protocol_id: vars.parse("PROXY_PROTOCOL_ID", "0", parse_u64, NUMBER_EXPECTED)?,
            max_payload: vars.parse("PROXY_MAX_PAYLOAD", "2MiB", parse_size, SIZE_EXPECTED)?,
            rotate_size: vars.parse("PROXY_ROTATE_SIZE", "64MiB", positive_size, POSITIVE_SIZE)?,
            rotate_interval: vars.parse(
                "PROXY_ROTATE_INTERVAL",
                "1h",
                positive_duration,
                POSITIVE_DURATION,
            )?,
            retain_files: vars.parse("PROXY_RETAIN_FILES", "168", parse_usize, NUMBER_EXPECTED)?,
            retain_age: vars.parse(
                "PROXY_RETAIN_AGE",
                "30d",
                positive_duration,
                POSITIVE_DURATION,
            )?,
            workers: vars.parse(
                "PROXY_WORKERS",
                &default_workers(),
                parse_workers,
                WORKERS_EXPECTED,
            )?,
            idle_timeout: vars.parse(
                "PROXY_IDLE_TIMEOUT",
                "10m",
                optional_duration,
                DURATION_EXPECTED,
            )?,
            connect_timeout: vars.parse(
                "PROXY_CONNECT_TIMEOUT",
                "10s",
                positive_duration,
                POSITIVE_DURATION,
            )?,
            max_connections: vars.parse(
                "PROXY_MAX_CONNECTIONS",
                "100000",
                positive_usize,
                POSITIVE_NUMBER,
            )?,
            target_buffer: vars.parse(
                "PROXY_TARGET_BUFFER",
                "4MiB",
                buffer_size,
                BUFFER_EXPECTED,
            )?,
            control_socket: vars.parse(
                "PROXY_CONTROL_SOCKET",
                "",
                |v| optional_path(v, &data_dir),
                PATH_EXPECTED,
            )?,
            metrics_file: vars.parse(
                "PROXY_METRICS_FILE",
                "",
                |v| Some(non_empty_path(v)),
                PATH_EXPECTED,
            )?,
            metrics_interval: vars.parse(
                "PROXY_METRICS_INTERVAL",
                "15s",
                positive_duration,
                POSITIVE_DURATION,
            )?,
            accept_proxy_protocol: vars.parse(
                "PROXY_ACCEPT_PROXY_PROTOCOL",
                "off",
                parse_accept_proxy,
                ACCEPT_PROXY_EXPECTED,
            )?,
            data_dir,
        };
        vars.refuse_leftovers()?;
        Ok(config)
    }

    /// The configured target with this number, if any.
    pub fn target(&self, number: u8) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.number == number)
    }
}

const LISTEN_EXPECTED: &str = "comma-separated ip:port addresses, such as 0.0.0.0:5555,[::]:5555";
const BOOL_EXPECTED: &str = "true/false, 1/0, yes/no or on/off";
const NUMBER_EXPECTED: &str = "a whole number";
const POSITIVE_NUMBER: &str = "a whole number above 0";
const SIZE_EXPECTED: &str = "a size such as 4096, 64KiB, 2MiB or 1GB";
const POSITIVE_SIZE: &str = "a size above 0, such as 64KiB, 2MiB or 1GB";
const BUFFER_EXPECTED: &str = "a size from 1KiB to 1GiB, such as 64KiB or 4MiB";
const DURATION_EXPECTED: &str = "a duration such as 500ms, 30s, 10m, 1h or 7d";
const POSITIVE_DURATION: &str = "a duration above 0, such as 500ms, 30s, 10m, 1h or 7d";
const WORKERS_EXPECTED: &str = "a whole number from 1 to 1024";
const PATH_EXPECTED: &str = "a file path";
const TARGET_EXPECTED: &str =
    "host:port with a port from 1 to 65535, such as 10.0.0.7:5000 or gps.example.com:21000";
const ACCEPT_PROXY_EXPECTED: &str = "off, v1, v2 or any";
const SEND_PROXY_EXPECTED: &str = "off, v1 or v2";

/// The `PROXY_*` variables not yet consumed by a setting.
struct Vars(BTreeMap<String, String>);

impl Vars {
    fn text(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    /// Takes `name` (or its default) and parses it; `None` from `parse`
    /// becomes an error naming the variable, its value and `expected`.
    fn parse<T>(
        &mut self,
        name: &str,
        default: &str,
        parse: impl Fn(&str) -> Option<T>,
        expected: &str,
    ) -> Result<T, ConfigError> {
        let value = self.0.remove(name).unwrap_or_else(|| default.to_string());
        parse(&value).ok_or_else(|| invalid(name, &value, expected))
    }

    fn refuse_leftovers(self) -> Result<(), ConfigError> {
        match self.0.into_iter().next() {
            None => Ok(()),
            Some((name, value)) => Err(ConfigError::Unknown { name, value }),
        }
    }
}

fn invalid(name: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::Invalid {
        name: name.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

fn parse_targets(vars: &mut Vars) -> Result<Vec<TargetConfig>, ConfigError> {
    let mut targets = Vec::new();
    for number in 1..=MAX_TARGETS as u8 {
        let name = format!("PROXY_TARGET{number}");
        let options = ["MANDATORY", "REPLIES", "SEND_PROXY"].map(|o| format!("{name}_{o}"));
        if vars.text(&name).is_none() {
            if let Some(option) = options.iter().find(|o| vars.0.contains_key(*o)) {
                return Err(ConfigError::TargetMissing {
                    name: option.clone(),
                    value: vars.text(option).unwrap_or_default(),
                    target: name,
                });
            }
            continue;
        }
        targets.push(TargetConfig {
            number,
            address: vars.parse(&name, "", parse_target_address, TARGET_EXPECTED)?,
            mandatory: vars.parse(&options[0], "true", parse_bool, BOOL_EXPECTED)?,
            replies: vars.parse(&options[1], "true", parse_bool, BOOL_EXPECTED)?,
            send_proxy: vars.parse(&options[2], "off", parse_send_proxy, SEND_PROXY_EXPECTED)?,
        });
    }
    Ok(targets)
}

fn parse_listen(text: &str) -> Option<Vec<SocketAddr>> {
    let addresses: Option<Vec<SocketAddr>> = text
        .split(',')
        .map(|part| part.trim().parse().ok())
        .collect();
    addresses.filter(|list| !list.is_empty())
}

/// `host:port` or `[v6]:port`; the host is an IP or a DNS name.
pub fn parse_target_address(text: &str) -> Option<TargetAddress> {
    let (host, port) = text.trim().rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = match host.strip_prefix('[') {
        Some(bracketed) => {
            let inner = bracketed.strip_suffix(']')?;
            inner.parse::<std::net::Ipv6Addr>().ok()?;
            inner
        }
        None if is_host_name(host) => host,
        None => return None,
    };
    Some(TargetAddress {
        host: host.to_string(),
        port,
    })
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

fn parse_usize(text: &str) -> Option<usize> {
    text.trim().parse().ok()
}

fn positive_usize(text: &str) -> Option<usize> {
    parse_usize(text).filter(|n| *n > 0)
}

fn parse_workers(text: &str) -> Option<usize> {
    parse_usize(text).filter(|n| (1..=1024).contains(n))
}

fn default_workers() -> String {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string()
}

fn positive_size(text: &str) -> Option<u64> {
    parse_size(text).filter(|n| *n > 0)
}

fn buffer_size(text: &str) -> Option<usize> {
    let size = parse_size(text).filter(|n| (1024..=1 << 30).contains(n))?;
    usize::try_from(size).ok()
}

fn positive_duration(text: &str) -> Option<Duration> {
    parse_duration(text).filter(|d| !d.is_zero())
}

/// A duration where 0 means "never".
fn optional_duration(text: &str) -> Option<Option<Duration>> {
    parse_duration(text).map(|d| Some(d).filter(|d| !d.is_zero()))
}

/// Empty means the default under the data folder; `off` means none.
fn optional_path(text: &str, data_dir: &std::path::Path) -> Option<Option<PathBuf>> {
    match text.trim() {
        "" => Some(Some(data_dir.join("control.sock"))),
        t if t.eq_ignore_ascii_case("off") => Some(None),
        t => Some(Some(PathBuf::from(t))),
    }
}

fn non_empty_path(text: &str) -> Option<PathBuf> {
    Some(text.trim())
        .filter(|t| !t.is_empty())
        .map(PathBuf::from)
}

fn parse_accept_proxy(text: &str) -> Option<AcceptProxyProtocol> {
    match text.trim().to_ascii_lowercase().as_str() {
        "off" => Some(AcceptProxyProtocol::Off),
        "v1" => Some(AcceptProxyProtocol::V1),
        "v2" => Some(AcceptProxyProtocol::V2),
        "any" => Some(AcceptProxyProtocol::Any),
        _ => None,
    }
}

fn parse_send_proxy(text: &str) -> Option<SendProxyProtocol> {
    match text.trim().to_ascii_lowercase().as_str() {
        "off" => Some(SendProxyProtocol::Off),
        "v1" => Some(SendProxyProtocol::V1),
        "v2" => Some(SendProxyProtocol::V2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())))
    }

    fn error_line(pairs: &[(&str, &str)]) -> String {
        parse(pairs).expect_err("must be refused").to_string()
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = parse(&[]).expect("defaults parse");
        assert_eq!(config.listen, vec!["127.0.0.1:5555".parse().unwrap()]);
        assert!(config.targets.is_empty());
        assert!(config.store);
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.max_payload, 2 << 20);
        assert_eq!(config.rotate_size, 64 << 20);
        assert_eq!(config.rotate_interval, Duration::from_secs(3600));
        assert_eq!(config.retain_files, 168);
        assert_eq!(config.retain_age, Duration::from_secs(30 * 86_400));
        assert_eq!(config.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(config.connect_timeout, Duration::from_secs(10));
        assert_eq!(config.max_connections, 100_000);
        assert_eq!(config.target_buffer, 4 << 20);
        assert_eq!(
            config.control_socket,
            Some(PathBuf::from("./data/control.sock"))
        );
        assert!(config.workers >= 1);
    }

    #[test]
    fn targets_carry_their_number_and_options() {
        let config = parse(&[
            ("PROXY_TARGET1", "10.0.0.7:5000"),
            ("PROXY_TARGET3", "[::1]:7000"),
            ("PROXY_TARGET3_MANDATORY", "no"),
            ("PROXY_TARGET3_REPLIES", "OFF"),
        ])
        .expect("targets parse");
        assert_eq!(config.targets.len(), 2);
        let first = config.target(1).expect("target 1");
        assert!(first.mandatory && first.replies);
        assert_eq!(
            first.address.literal(),
            Some("10.0.0.7:5000".parse().unwrap())
        );
        let third = config.target(3).expect("target 3");
        assert!(!third.mandatory && !third.replies);
        assert_eq!(third.address.to_string(), "[::1]:7000");
    }

    #[test]
    fn a_target_may_be_a_host_name() {
        let config = parse(&[("PROXY_TARGET2", "gps.example.com:21000")]).unwrap();
        let target = config.target(2).unwrap();
        assert_eq!(target.address.host, "gps.example.com");
        assert_eq!(target.address.literal(), None);
    }

    #[test]
    fn a_target_without_a_port_names_variable_value_and_expectation() {
        let line = error_line(&[("PROXY_TARGET1", "10.0.0.7")]);
        assert!(
            line.starts_with("PROXY_TARGET1=\"10.0.0.7\": expected host:port"),
            "{line}"
        );
    }

    #[test]
    fn target_options_without_the_target_are_refused() {
        let line = error_line(&[("PROXY_TARGET2_MANDATORY", "false")]);
        assert!(line.contains("PROXY_TARGET2_MANDATORY=\"false\""), "{line}");
        assert!(line.contains("PROXY_TARGET2 is not set"), "{line}");
    }

    #[test]
    fn unknown_proxy_variables_are_refused_and_others_ignored() {
        let line = error_line(&[("PROXY_IDEL_TIMEOUT", "5s")]);
        assert!(
            line.contains("PROXY_IDEL_TIMEOUT=\"5s\": unknown variable"),
            "{line}"
        );
        assert!(parse(&[("HOME", "/root")]).is_ok());
        assert!(error_line(&[("PROXY_TARGET4", "1.2.3.4:5")]).contains("unknown"));
    }

    #[test]
    fn bad_values_name_what_is_expected() {
        let cases = [
            ("PROXY_IDLE_TIMEOUT", "10x", "expected a duration"),
            ("PROXY_ROTATE_SIZE", "big", "expected a size"),
            ("PROXY_STORE", "perhaps", "expected true/false"),
            ("PROXY_WORKERS", "0", "expected a whole number from 1"),
            (
                "PROXY_LISTEN",
                "localhost",
                "expected comma-separated ip:port",
            ),
            ("PROXY_TARGET_BUFFER", "10", "expected a size from 1KiB"),
            ("PROXY_CONNECT_TIMEOUT", "0", "expected a duration above 0"),
            (
                "PROXY_ACCEPT_PROXY_PROTOCOL",
                "v3",
                "expected off, v1, v2 or any",
            ),
        ];
        for (name, value, expected) in cases {
            let line = error_line(&[(name, value)]);
            assert!(
                line.starts_with(&format!("{name}={value:?}: {expected}")),
                "{line}"
            );
        }
    }

    #[test]
    fn zero_idle_timeout_means_never_and_control_socket_can_be_off() {
        let config = parse(&[
            ("PROXY_IDLE_TIMEOUT", "0"),
            ("PROXY_CONTROL_SOCKET", "off"),
            ("PROXY_LISTEN", "127.0.0.1:0, [::1]:0"),
        ])
        .unwrap();
        assert_eq!(config.idle_timeout, None);
        assert_eq!(config.control_socket, None);
        assert_eq!(config.listen.len(), 2);
    }
}
