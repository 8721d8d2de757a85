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

use crate::device::DetectorSet;
use crate::net::allow::AllowList;
use crate::units::{parse_bool, parse_duration, parse_size};

/// Target numbers are 1..=3, and a message's `proxy.source` is that number.
pub const MAX_TARGETS: usize = 3;

/// One variable: its name, its default, what a value must look like, and
/// what it means. The default is written here once: parsing takes it from
/// this table when the variable is unset, and `--help` and the README show it.
pub struct Setting {
    pub name: &'static str,
    /// The value used when the variable is unset (`""`: unset).
    pub default: &'static str,
    /// How `--help` shows the default when it is not a plain value.
    pub shown: Option<&'static str>,
    /// What a value must look like, for the one-line error of a bad value.
    pub expected: &'static str,
    pub meaning: &'static str,
}

impl Setting {
    /// The default as `--help` and the README's table show it.
    pub fn shown_default(&self) -> &'static str {
        match (self.shown, self.default) {
            (Some(shown), _) => shown,
            (None, "") => "unset",
            (None, default) => default,
        }
    }
}

const fn setting(
    name: &'static str,
    default: &'static str,
    expected: &'static str,
    meaning: &'static str,
) -> Setting {
    Setting {
        name,
        default,
        shown: None,
        expected,
        meaning,
    }
}

const LISTEN_EXPECTED: &str = "comma-separated ip:port addresses, such as 0.0.0.0:5555,[::]:5555";
const LISTEN_UDP_EXPECTED: &str = "comma-separated ip:port addresses, such as 0.0.0.0:5556";
const BOOL_EXPECTED: &str = "true/false, 1/0, yes/no or on/off";
const NUMBER_EXPECTED: &str = "a whole number";
const LIMIT_EXPECTED: &str = "a whole number (0: no limit)";
const POSITIVE_NUMBER: &str = "a whole number above 0";
const SIZE_EXPECTED: &str = "a size such as 4096, 64KiB, 2MiB or 1GB";
const POSITIVE_SIZE: &str = "a size above 0, such as 64KiB, 2MiB or 1GB";
const BUFFER_EXPECTED: &str = "a size from 1KiB to 1GiB, such as 64KiB or 4MiB";
const LIMIT_DURATION: &str = "a duration such as 500ms, 30s, 10m, 1h or 7d (0: no limit)";
const POSITIVE_DURATION: &str = "a duration above 0, such as 500ms, 30s, 10m, 1h or 7d";
const WORKERS_EXPECTED: &str = "a whole number from 1 to 1024";
const PATH_EXPECTED: &str = "a file path";
const CONTROL_EXPECTED: &str = "a file path, or off";
const TARGET_EXPECTED: &str =
    "host:port with a port from 1 to 65535, such as 10.0.0.7:5000 or gps.example.com:21000";
const ACCEPT_PROXY_EXPECTED: &str = "off, v1, v2 or any";
const SEND_PROXY_EXPECTED: &str = "off, v1 or v2";
const ALLOW_EXPECTED: &str =
    "comma-separated addresses or CIDR blocks, such as 10.0.0.0/8,2001:db8::/32,192.0.2.7";
const DEVICE_IDENT_EXPECTED: &str =
    "auto, off, or a comma list of detectors: teltonika, gt06, h02, queclink, coban, meitrack";
const REGEX_EXPECTED: &str = "a regular expression with one capture group";

/// Every variable the daemon reads; `n` stands for a target number 1, 2 or 3.
#[rustfmt::skip]
pub const SETTINGS: &[Setting] = &[
    setting("PROXY_LISTEN", "127.0.0.1:5555", LISTEN_EXPECTED, "comma-separated ip:port addresses to accept device connections on"),
    setting("PROXY_TARGETn", "", TARGET_EXPECTED, "host:port of target n (1..3); n is its proxy.source number"),
    setting("PROXY_TARGETn_MANDATORY", "true", BOOL_EXPECTED, "a failure of target n drops the device connection"),
    setting("PROXY_TARGETn_REPLIES", "true", BOOL_EXPECTED, "relay target n's replies to the device"),
    setting("PROXY_TARGETn_SEND_PROXY", "off", SEND_PROXY_EXPECTED, "off, v1 or v2: send target n a PROXY protocol header first"),
    setting("PROXY_TARGETn_DEVICES", "", PATH_EXPECTED, "file of device idents: target n gets only these devices' connections"),
    setting("PROXY_TARGETn_CATCH_UP", "false", BOOL_EXPECTED, "deliver to target n later, from the message files, what it missed while down"),
    setting("PROXY_STORE", "true", BOOL_EXPECTED, "store mode: record device traffic (and relayed replies) as event 0 messages"),
    setting("PROXY_DATA_DIR", "./data", PATH_EXPECTED, "folder of the message log files"),
    setting("PROXY_CHANNEL_ID", "1", NUMBER_EXPECTED, "channel.id of every message"),
    setting("PROXY_PROTOCOL_ID", "0", NUMBER_EXPECTED, "protocol.id of every message"),
    setting("PROXY_MAX_PAYLOAD", "2MiB", SIZE_EXPECTED, "a packet larger than this is stored without proxy.payload.hex"),
    setting("PROXY_ROTATE_SIZE", "64MiB", POSITIVE_SIZE, "rotate the current message file once it reaches this size"),
    setting("PROXY_ROTATE_INTERVAL", "1h", LIMIT_DURATION, "rotate the current message file once it is this old (0: never)"),
    setting("PROXY_RETAIN_FILES", "168", LIMIT_EXPECTED, "keep at most this many rotated files (0: no limit)"),
    setting("PROXY_RETAIN_AGE", "30d", LIMIT_DURATION, "delete rotated files older than this (0: no limit)"),
    Setting { shown: Some("number of CPUs"), ..setting("PROXY_WORKERS", "", WORKERS_EXPECTED, "worker threads") },
    setting("PROXY_IDLE_TIMEOUT", "10m", LIMIT_DURATION, "close a device connection with no bytes either way for this long (0: never)"),
    setting("PROXY_CONNECT_TIMEOUT", "10s", POSITIVE_DURATION, "give up connecting to a target after this long"),
    setting("PROXY_MAX_CONNECTIONS", "100000", POSITIVE_NUMBER, "device connections (and UDP sessions) held at once; more are closed at accept"),
    setting("PROXY_MAX_CONNECTIONS_PER_IP", "0", LIMIT_EXPECTED, "device connections held at once from one address (0: no limit)"),
    setting("PROXY_ALLOW", "", ALLOW_EXPECTED, "addresses or CIDR blocks that may connect (unset: everyone); others are closed at accept"),
    setting("PROXY_TARGET_BUFFER", "4MiB", BUFFER_EXPECTED, "bytes queued for one target (or for the device) at most"),
    Setting { shown: Some("$PROXY_DATA_DIR/control.sock"), ..setting("PROXY_CONTROL_SOCKET", "", CONTROL_EXPECTED, "Unix socket for `proxy-channel ctl`; off disables it") },
    setting("PROXY_METRICS_FILE", "", PATH_EXPECTED, "write Prometheus text metrics to this file"),
    setting("PROXY_METRICS_INTERVAL", "15s", POSITIVE_DURATION, "how often the metrics file is rewritten"),
    setting("PROXY_ACCEPT_PROXY_PROTOCOL", "off", ACCEPT_PROXY_EXPECTED, "off, v1, v2 or any: device connections start with a PROXY protocol header"),
    setting("PROXY_DEVICE_IDENT", "auto", DEVICE_IDENT_EXPECTED, "how a device is recognised from its first bytes: auto, off, or detector names"),
    setting("PROXY_DEVICE_IDENT_REGEX", "", REGEX_EXPECTED, "a regular expression with one capture group tried first on a device's first bytes"),
    setting("PROXY_DEVICE_UNIQUE", "false", BOOL_EXPECTED, "a new connection of a device closes that device's older open connections"),
    setting("PROXY_LISTEN_UDP", "", LISTEN_UDP_EXPECTED, "comma-separated ip:port addresses to accept device datagrams on"),
    Setting { shown: Some("info"), ..setting("RUST_LOG", "info", "", "level of the daemon's own log on stderr") },
];

/// The table's row for `name`; a target's `PROXY_TARGET2_...` is found as
/// `PROXY_TARGETn_...`.
fn lookup(name: &str) -> &'static Setting {
    let generic: String = match name.strip_prefix("PROXY_TARGET") {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
            format!("PROXY_TARGETn{}", &rest[1..])
        }
        _ => name.to_string(),
    };
    SETTINGS
        .iter()
        .find(|s| s.name == generic)
        .unwrap_or_else(|| panic!("{name} is not in SETTINGS"))
}

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
    /// PROXY_TARGETn_DEVICES: only these devices' connections reach it.
    pub devices: Option<PathBuf>,
    /// PROXY_TARGETn_CATCH_UP: what it missed is delivered later.
    pub catch_up: bool,
}

/// PROXY_DEVICE_IDENT: which detectors recognise a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceIdent {
    /// No detection at all.
    Off,
    /// Every built-in detector.
    Auto,
    /// These built-in detectors, by name, in the order given.
    Only(Vec<String>),
}

/// The names of the built-in device detectors.
pub const DETECTORS: &[&str] = &["teltonika", "gt06", "h02", "queclink", "coban", "meitrack"];

/// Everything the daemon needs to know, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub listen_udp: Vec<SocketAddr>,
    pub targets: Vec<TargetConfig>,
    pub store: bool,
    pub data_dir: PathBuf,
    pub channel_id: u64,
    pub protocol_id: u64,
    pub max_payload: u64,
    pub rotate_size: u64,
    /// `None`: never rotate by age.
    pub rotate_interval: Option<Duration>,
    /// `None`: no limit on the number of rotated files.
    pub retain_files: Option<usize>,
    /// `None`: rotated files are never deleted for their age.
    pub retain_age: Option<Duration>,
    pub workers: usize,
    /// `None`: connections never time out for idleness.
    pub idle_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// `None`: no limit per address.
    pub max_connections_per_ip: Option<usize>,
    /// `None`: everyone may connect.
    pub allow: Option<AllowList>,
    pub target_buffer: usize,
    /// `None`: no control socket.
    pub control_socket: Option<PathBuf>,
    pub metrics_file: Option<PathBuf>,
    pub metrics_interval: Duration,
    pub accept_proxy_protocol: AcceptProxyProtocol,
    pub device_ident: DeviceIdent,
    /// PROXY_DEVICE_IDENT_REGEX, as written (compiled by the detectors).
    pub device_ident_regex: Option<String>,
    pub device_unique: bool,
}

impl Config {
    /// Reads the real environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_vars(proxy_vars_from_env()?)
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
        let data_dir = vars.take("PROXY_DATA_DIR", non_empty_path)?;
        let config = Config {
            listen: vars.take("PROXY_LISTEN", parse_listen)?,
            listen_udp: vars.take("PROXY_LISTEN_UDP", parse_optional_listen)?,
            targets: parse_targets(&mut vars)?,
            store: vars.take("PROXY_STORE", parse_bool)?,
            channel_id: vars.take("PROXY_CHANNEL_ID", parse_u64)?,
            protocol_id: vars.take("PROXY_PROTOCOL_ID", parse_u64)?,
            max_payload: vars.take("PROXY_MAX_PAYLOAD", parse_size)?,
            rotate_size: vars.take("PROXY_ROTATE_SIZE", positive_size)?,
            rotate_interval: vars.take("PROXY_ROTATE_INTERVAL", optional_duration)?,
            retain_files: vars.take("PROXY_RETAIN_FILES", optional_limit)?,
            retain_age: vars.take("PROXY_RETAIN_AGE", optional_duration)?,
            workers: vars.take_or("PROXY_WORKERS", &default_workers(), parse_workers)?,
            idle_timeout: vars.take("PROXY_IDLE_TIMEOUT", optional_duration)?,
            connect_timeout: vars.take("PROXY_CONNECT_TIMEOUT", positive_duration)?,
            max_connections: vars.take("PROXY_MAX_CONNECTIONS", positive_usize)?,
            max_connections_per_ip: vars.take("PROXY_MAX_CONNECTIONS_PER_IP", optional_limit)?,
            allow: vars.take("PROXY_ALLOW", parse_allow)?,
            target_buffer: vars.take("PROXY_TARGET_BUFFER", buffer_size)?,
            control_socket: vars.take("PROXY_CONTROL_SOCKET", |v| optional_path(v, &data_dir))?,
            metrics_file: vars.take("PROXY_METRICS_FILE", |v| Some(non_empty_path(v)))?,
            metrics_interval: vars.take("PROXY_METRICS_INTERVAL", positive_duration)?,
            accept_proxy_protocol: vars.take("PROXY_ACCEPT_PROXY_PROTOCOL", parse_accept_proxy)?,
            device_ident: vars.take("PROXY_DEVICE_IDENT", parse_device_ident)?,
            device_ident_regex: vars
                .take("PROXY_DEVICE_IDENT_REGEX", |v| Some(non_empty_text(v)))?,
            device_unique: vars.take("PROXY_DEVICE_UNIQUE", parse_bool)?,
            data_dir,
        };
        vars.refuse_leftovers()?;
        config.check_combinations()?;
        Ok(config)
    }

    /// The configured target with this number, if any.
    pub fn target(&self, number: u8) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.number == number)
    }

    /// The device detectors these settings ask for (checked when parsed).
    pub fn detectors(&self) -> Result<DetectorSet, ConfigError> {
        let names = match &self.device_ident {
            DeviceIdent::Off => "off".to_string(),
            DeviceIdent::Auto => "auto".to_string(),
            DeviceIdent::Only(names) => names.join(","),
        };
        DetectorSet::parse(&names, self.device_ident_regex.as_deref()).map_err(|e| {
            let value = match e.variable() {
                "PROXY_DEVICE_IDENT_REGEX" => self.device_ident_regex.clone().unwrap_or_default(),
                _ => names.clone(),
            };
            invalid(e.variable(), &value, &e.to_string())
        })
    }

    /// Rules between variables: a device list needs detection, catch-up
    /// needs the message files and a target that may fail alone.
    fn check_combinations(&self) -> Result<(), ConfigError> {
        self.detectors()?;
        for target in &self.targets {
            let n = target.number;
            if let Some(path) = &target.devices {
                if self.device_ident == DeviceIdent::Off {
                    return Err(invalid(
                        &format!("PROXY_TARGET{n}_DEVICES"),
                        &path.display().to_string(),
                        "no device list while PROXY_DEVICE_IDENT=off (devices are never recognised)",
                    ));
                }
            }
            if target.catch_up && (!self.store || target.mandatory) {
                return Err(invalid(
                    &format!("PROXY_TARGET{n}_CATCH_UP"),
                    "true",
                    &format!(
                        "false unless PROXY_STORE is on and PROXY_TARGET{n}_MANDATORY=false (catch-up reads the message files, for a target that may fail alone)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The `PROXY_*` variables of the real environment, as text.
fn proxy_vars_from_env() -> Result<Vec<(String, String)>, ConfigError> {
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
    Ok(vars)
}

/// The data folder the daemon would use, by the daemon's own rule, for the
/// tools (`view`, `replay`) run beside it. A bad value falls back to the
/// default: the tools then say what they cannot read.
pub fn data_dir_from_env() -> PathBuf {
    let value = std::env::var("PROXY_DATA_DIR").unwrap_or_default();
    non_empty_path(&value).unwrap_or_else(|| PathBuf::from(lookup("PROXY_DATA_DIR").default))
}

/// The control socket the daemon would use, by the daemon's own rule;
/// `None` when it is `off`.
pub fn control_socket_from_env() -> Option<PathBuf> {
    let value = std::env::var("PROXY_CONTROL_SOCKET").unwrap_or_default();
    optional_path(&value, &data_dir_from_env()).flatten()
}

/// The `PROXY_*` variables not yet consumed by a setting.
struct Vars(BTreeMap<String, String>);

impl Vars {
    fn text(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    /// Takes `name` (or its default from [`SETTINGS`]) and parses it; `None`
    /// from `parse` becomes an error naming the variable, its value and what
    /// the table says is expected.
    fn take<T>(&mut self, name: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T, ConfigError> {
        self.take_or(name, lookup(name).default, parse)
    }

    /// [`Vars::take`] with a default computed at run time.
    fn take_or<T>(
        &mut self,
        name: &str,
        default: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T, ConfigError> {
        let value = self.0.remove(name).unwrap_or_else(|| default.to_string());
        parse(&value).ok_or_else(|| invalid(name, &value, lookup(name).expected))
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

/// The options every target may have, after `PROXY_TARGETn_`.
const TARGET_OPTIONS: [&str; 5] = ["MANDATORY", "REPLIES", "SEND_PROXY", "DEVICES", "CATCH_UP"];

fn parse_targets(vars: &mut Vars) -> Result<Vec<TargetConfig>, ConfigError> {
    let mut targets = Vec::new();
    for number in 1..=MAX_TARGETS as u8 {
        let name = format!("PROXY_TARGET{number}");
        let option = |o: &str| format!("{name}_{o}");
        if vars.text(&name).is_none() {
            let given = TARGET_OPTIONS
                .iter()
                .map(|o| option(o))
                .find(|o| vars.0.contains_key(o));
            if let Some(given) = given {
                return Err(ConfigError::TargetMissing {
                    value: vars.text(&given).unwrap_or_default(),
                    name: given,
                    target: name,
                });
            }
            continue;
        }
        targets.push(TargetConfig {
            number,
            address: vars.take(&name, parse_target_address)?,
            mandatory: vars.take(&option("MANDATORY"), parse_bool)?,
            replies: vars.take(&option("REPLIES"), parse_bool)?,
            send_proxy: vars.take(&option("SEND_PROXY"), parse_send_proxy)?,
            devices: vars.take(&option("DEVICES"), |v| Some(non_empty_path(v)))?,
            catch_up: vars.take(&option("CATCH_UP"), parse_bool)?,
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
    let port: u16 = digits(port)?.parse().ok().filter(|p| *p != 0)?;
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

/// `text` if it is one or more ASCII digits: what the SPEC calls a whole
/// number (Rust's integer parsing also takes a leading `+`).
fn digits(text: &str) -> Option<&str> {
    let all_digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    all_digits.then_some(text)
}

fn parse_u64(text: &str) -> Option<u64> {
    digits(text.trim())?.parse().ok()
}

fn parse_usize(text: &str) -> Option<usize> {
    digits(text.trim())?.parse().ok()
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

fn parse_optional_listen(text: &str) -> Option<Vec<SocketAddr>> {
    if text.trim().is_empty() {
        return Some(Vec::new());
    }
    parse_listen(text)
}

/// A limit where 0 means "no limit".
fn optional_limit(text: &str) -> Option<Option<usize>> {
    parse_usize(text).map(|n| Some(n).filter(|n| *n > 0))
}

fn parse_allow(text: &str) -> Option<Option<AllowList>> {
    if text.trim().is_empty() {
        return Some(None);
    }
    AllowList::parse(text).map(Some)
}

fn parse_device_ident(text: &str) -> Option<DeviceIdent> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Some(DeviceIdent::Auto),
        "off" => Some(DeviceIdent::Off),
        list => {
            let names: Vec<String> = list.split(',').map(|n| n.trim().to_string()).collect();
            let known = names.iter().all(|n| DETECTORS.contains(&n.as_str()));
            known.then_some(DeviceIdent::Only(names))
        }
    }
}

fn non_empty_text(text: &str) -> Option<String> {
    Some(text).filter(|t| !t.is_empty()).map(str::to_string)
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
        assert_eq!(config.rotate_interval, Some(Duration::from_secs(3600)));
        assert_eq!(config.retain_files, Some(168));
        assert_eq!(config.retain_age, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(config.max_connections_per_ip, None);
        assert_eq!(config.allow, None);
        assert_eq!(config.device_ident, DeviceIdent::Auto);
        assert_eq!(config.device_ident_regex, None);
        assert!(!config.device_unique);
        assert!(config.listen_udp.is_empty());
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

    #[test]
    fn zero_turns_limits_off_where_the_spec_says_so() {
        let config = parse(&[
            ("PROXY_ROTATE_INTERVAL", "0"),
            ("PROXY_RETAIN_FILES", "0"),
            ("PROXY_RETAIN_AGE", "0"),
            ("PROXY_MAX_CONNECTIONS_PER_IP", "0"),
        ])
        .expect("zeros parse");
        assert_eq!(config.rotate_interval, None);
        assert_eq!(config.retain_files, None);
        assert_eq!(config.retain_age, None);
        assert_eq!(config.max_connections_per_ip, None);
        for name in [
            "PROXY_TARGET_BUFFER",
            "PROXY_MAX_CONNECTIONS",
            "PROXY_ROTATE_SIZE",
        ] {
            assert!(error_line(&[(name, "0")]).starts_with(&format!("{name}=\"0\"")));
        }
    }

    #[test]
    fn new_variables_parse() {
        let config = parse(&[
            ("PROXY_TARGET1", "127.0.0.1:7001"),
            ("PROXY_TARGET1_MANDATORY", "false"),
            ("PROXY_TARGET1_CATCH_UP", "yes"),
            ("PROXY_TARGET1_DEVICES", "/etc/proxy-channel/wave1.txt"),
            ("PROXY_ALLOW", "10.0.0.0/8,::1"),
            ("PROXY_MAX_CONNECTIONS_PER_IP", "20"),
            ("PROXY_DEVICE_IDENT", "teltonika, gt06"),
            ("PROXY_DEVICE_IDENT_REGEX", "^ID=(\\d+)"),
            ("PROXY_DEVICE_UNIQUE", "on"),
            ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
        ])
        .expect("new variables parse");
        let target = config.target(1).expect("target 1");
        assert!(target.catch_up);
        assert_eq!(
            target.devices,
            Some(PathBuf::from("/etc/proxy-channel/wave1.txt"))
        );
        assert!(config.allow.is_some());
        assert_eq!(config.max_connections_per_ip, Some(20));
        assert_eq!(
            config.device_ident,
            DeviceIdent::Only(vec!["teltonika".into(), "gt06".into()])
        );
        assert!(config.device_unique);
        assert_eq!(config.listen_udp.len(), 1);
    }

    #[test]
    fn combinations_that_cannot_work_are_refused_naming_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("PROXY_TARGET1", "127.0.0.1:7001"),
                    ("PROXY_TARGET1_CATCH_UP", "true"),
                ],
                "PROXY_TARGET1_CATCH_UP=\"true\": expected false unless",
            ),
            (
                &[
                    ("PROXY_TARGET2", "127.0.0.1:7001"),
                    ("PROXY_TARGET2_MANDATORY", "false"),
                    ("PROXY_TARGET2_CATCH_UP", "true"),
                    ("PROXY_STORE", "false"),
                ],
                "PROXY_TARGET2_CATCH_UP=\"true\"",
            ),
            (
                &[
                    ("PROXY_TARGET1", "127.0.0.1:7001"),
                    ("PROXY_TARGET1_DEVICES", "/tmp/list"),
                    ("PROXY_DEVICE_IDENT", "off"),
                ],
                "PROXY_TARGET1_DEVICES=\"/tmp/list\": expected no device list while PROXY_DEVICE_IDENT=off",
            ),
            (
                &[("PROXY_TARGET3_DEVICES", "/tmp/list")],
                "PROXY_TARGET3 is not set",
            ),
            (
                &[("PROXY_DEVICE_IDENT", "teltonika,tk103")],
                "PROXY_DEVICE_IDENT=\"teltonika,tk103\": expected auto, off",
            ),
            (
                &[("PROXY_ALLOW", "10.0.0.1/8")],
                "PROXY_ALLOW=\"10.0.0.1/8\": expected comma-separated",
            ),
            (
                &[("PROXY_LISTEN_UDP", "udp")],
                "PROXY_LISTEN_UDP=\"udp\": expected",
            ),
        ];
        for (pairs, start) in cases {
            let line = error_line(pairs);
            assert!(line.contains(start), "{line}");
        }
    }

    #[test]
    fn every_setting_in_the_table_is_read() {
        // Setting each documented variable to its own default must parse:
        // a row the parser does not take would be refused as unknown.
        let mut pairs = vec![("PROXY_TARGET1".to_string(), "127.0.0.1:9".to_string())];
        for setting in SETTINGS.iter().filter(|s| s.name.starts_with("PROXY_")) {
            let name = setting.name.replace("TARGETn", "TARGET1");
            if name != "PROXY_TARGET1" && !setting.default.is_empty() {
                pairs.push((name, setting.default.to_string()));
            }
        }
        Config::from_vars(pairs).expect("every default parses");
    }
}
