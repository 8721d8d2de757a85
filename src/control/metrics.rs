//! The counters in the Prometheus text exposition format, and the file that
//! node_exporter's textfile collector reads.
//!
//! The file is replaced atomically: written to a temporary file next to it,
//! then renamed over it, so a scrape never sees half a file. The temporary
//! file has a random name and is created exclusively without following
//! links (`O_CREAT|O_EXCL|O_NOFOLLOW`): a symbolic link planted at any name
//! is never followed, so nothing is truncated or created elsewhere.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::control::stats::{DropKind, Refusal, Snapshot, UdpDrop, UdpSnapshot};

/// Reads one per-target counter out of a snapshot.
type PerTarget = fn(&Snapshot, usize) -> u64;

/// The exposition text for `snapshot`; `targets` are the configured target
/// numbers (only they get series).
pub fn render(snapshot: &Snapshot, targets: &[u8]) -> String {
    let mut text = String::with_capacity(8 * 1024);
    let s = snapshot;
    family(
        &mut text,
        "connections_open",
        "gauge",
        "Device connections open now.",
    );
    sample(&mut text, "connections_open", "", s.connections_open);
    family(
        &mut text,
        "connections_total",
        "counter",
        "Device connections accepted and handed to a worker.",
    );
    sample(&mut text, "connections_total", "", s.connections_total);
    family(
        &mut text,
        "connections_refused_total",
        "counter",
        "Device connections closed at accept, with no message written (all causes).",
    );
    sample(
        &mut text,
        "connections_refused_total",
        "",
        s.connections_refused,
    );
    family(
        &mut text,
        "connections_refused_by_cause_total",
        "counter",
        "Device connections closed at accept, by cause: not in PROXY_ALLOW, \
         PROXY_MAX_CONNECTIONS or PROXY_MAX_CONNECTIONS_PER_IP reached.",
    );
    for (cause, count) in Refusal::ALL.iter().zip(s.refusals) {
        let labels = format!("cause=\"{}\"", cause.label());
        sample(
            &mut text,
            "connections_refused_by_cause_total",
            &labels,
            count,
        );
    }

    family(
        &mut text,
        "device_bytes_received_total",
        "counter",
        "Bytes received from devices.",
    );
    sample(
        &mut text,
        "device_bytes_received_total",
        "",
        s.bytes_received[0],
    );
    family(
        &mut text,
        "device_bytes_sent_total",
        "counter",
        "Bytes sent to devices (relayed replies).",
    );
    sample(&mut text, "device_bytes_sent_total", "", s.bytes_sent[0]);
    family(
        &mut text,
        "device_packets_total",
        "counter",
        "Reads from devices that returned data.",
    );
    sample(&mut text, "device_packets_total", "", s.packets[0]);
    family(
        &mut text,
        "device_drops_total",
        "counter",
        "Device connections closed, by reason.",
    );
    for (index, kind) in DropKind::ALL.iter().enumerate() {
        let labels = format!("reason=\"{}\"", kind.label());
        sample(&mut text, "device_drops_total", &labels, s.drops[0][index]);
    }

    let per_target: [(&str, &str, PerTarget); 4] = [
        (
            "target_bytes_received_total",
            "Bytes received from the target (its replies).",
            |s, n| s.bytes_received[n],
        ),
        (
            "target_bytes_sent_total",
            "Bytes sent to the target.",
            |s, n| s.bytes_sent[n],
        ),
        (
            "target_packets_total",
            "Reads from the target that returned data.",
            |s, n| s.packets[n],
        ),
        (
            "target_connect_failures_total",
            "Connects to the target that failed or timed out.",
            |s, n| s.connect_failures[n],
        ),
    ];
    for (name, help, value) in per_target {
        family(&mut text, name, "counter", help);
        for &target in targets {
            let n = usize::from(target);
            sample(
                &mut text,
                name,
                &format!("target=\"{target}\""),
                value(s, n),
            );
        }
    }
    family(
        &mut text,
        "target_drops_total",
        "counter",
        "Target connections closed, by reason.",
    );
    for &target in targets {
        for (index, kind) in DropKind::ALL.iter().enumerate() {
            let labels = format!("target=\"{target}\",reason=\"{}\"", kind.label());
            sample(
                &mut text,
                "target_drops_total",
                &labels,
                s.drops[usize::from(target)][index],
            );
        }
    }

    catch_up(&mut text, s, targets);

    family(
        &mut text,
        "messages_total",
        "counter",
        "Messages made by the workers and the acceptor.",
    );
    sample(&mut text, "messages_total", "", s.messages_queued);
    family(
        &mut text,
        "messages_written_total",
        "counter",
        "Messages written to the message file.",
    );
    sample(&mut text, "messages_written_total", "", s.messages_written);
    family(
        &mut text,
        "writer_queue_depth",
        "gauge",
        "Batches of messages waiting for the file writer.",
    );
    sample(&mut text, "writer_queue_depth", "", s.writer_queue_depth);
    family(
        &mut text,
        "write_errors_total",
        "counter",
        "Failed writes of the message file (each is retried).",
    );
    sample(&mut text, "write_errors_total", "", s.write_errors);
    if let Some(udp) = &s.udp {
        render_udp(&mut text, udp);
    }
    text
}

/// Catch-up's backlog and deliveries, for the targets that have it on.
fn catch_up(text: &mut String, s: &Snapshot, targets: &[u8]) {
    let on: Vec<u8> = targets
        .iter()
        .copied()
        .filter(|&n| s.catch_up.get(usize::from(n)).is_some_and(|c| c.enabled))
        .collect();
    let families: [(&str, &str, &str, PerTarget); 4] = [
        (
            "catchup_backlog_connections",
            "gauge",
            "Device connections whose missed bytes catch-up has not delivered to the target yet.",
            |s, n| s.catch_up[n].backlog_connections,
        ),
        (
            "catchup_backlog_bytes",
            "gauge",
            "Device bytes the target missed that catch-up has not delivered yet.",
            |s, n| s.catch_up[n].backlog_bytes,
        ),
        (
            "catchup_delivered_connections_total",
            "counter",
            "Catch-up deliveries completed to the target.",
            |s, n| s.catch_up[n].delivered_connections,
        ),
        (
            "catchup_delivered_bytes_total",
            "counter",
            "Device bytes catch-up delivered to the target.",
            |s, n| s.catch_up[n].delivered_bytes,
        ),
    ];
    for (name, kind, help, value) in families {
        if on.is_empty() {
            continue;
        }
        family(text, name, kind, help);
        for &target in &on {
            let labels = format!("target=\"{target}\"");
            sample(text, name, &labels, value(s, usize::from(target)));
        }
    }
}

/// The UDP sessions' series (only with PROXY_LISTEN_UDP set).
fn render_udp(text: &mut String, s: &UdpSnapshot) {
    let plain: [(&str, &str, &str, u64); 4] = [
        (
            "udp_sessions_open",
            "gauge",
            "UDP device sessions open now.",
            s.sessions_open,
        ),
        (
            "udp_sessions_total",
            "counter",
            "UDP device sessions opened.",
            s.sessions_total,
        ),
        (
            "udp_datagrams_received_total",
            "counter",
            "Datagrams received from UDP devices, dropped ones included.",
            s.datagrams_received,
        ),
        (
            "udp_datagrams_sent_total",
            "counter",
            "Datagrams sent to UDP devices (relayed replies).",
            s.datagrams_sent,
        ),
    ];
    for (name, kind, help, value) in plain {
        family(text, name, kind, help);
        sample(text, name, "", value);
    }
    family(
        text,
        "udp_datagrams_dropped_total",
        "counter",
        "UDP datagrams dropped, by cause: a new address refused (not_allowed, \
         too_many_connections, too_many_per_ip), over a session's rate limit, lost in a \
         full receive buffer, or not taken by a target's or the device's socket.",
    );
    for (cause, count) in UdpDrop::ALL.iter().zip(s.drops) {
        let labels = format!("cause=\"{}\"", cause.label());
        sample(text, "udp_datagrams_dropped_total", &labels, count);
    }
}

fn family(text: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(text, "# HELP proxy_channel_{name} {help}");
    let _ = writeln!(text, "# TYPE proxy_channel_{name} {kind}");
}

fn sample(text: &mut String, name: &str, labels: &str, value: u64) {
    let _ = match labels {
        "" => writeln!(text, "proxy_channel_{name} {value}"),
        _ => writeln!(text, "proxy_channel_{name}{{{labels}}} {value}"),
    };
}

/// Names tried for the temporary file before giving up (a name taken by
/// someone else's file is never reused).
const TEMPORARY_TRIES: usize = 8;

/// Replaces `path` with `text` atomically, through a new temporary file in
/// the same folder that nothing else can have opened or linked.
pub fn write_file(path: &Path, text: &str) -> io::Result<()> {
    let (temporary, mut file) = create_temporary(path)?;
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temporary, path));
    if written.is_err() {
        // Ours, made just now: nothing else to clean up if this fails too.
        let _ = fs::remove_file(&temporary);
    }
    written
}

/// Creates `.<name>.<random>.tmp` beside `path`, exclusively and without
/// following a link; another random name if that one is taken.
fn create_temporary(path: &Path) -> io::Result<(PathBuf, File)> {
    let mut last_error = io::Error::new(io::ErrorKind::AlreadyExists, "no free name");
    for _ in 0..TEMPORARY_TRIES {
        let temporary = temporary_name(path, rand::random());
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temporary);
        match created {
            Ok(file) => return Ok((temporary, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = e,
            Err(e) => return Err(e),
        }
    }
    Err(last_error)
}

/// `dir/.name.0123456789abcdef.tmp` for `dir/name`: hidden, and not a name
/// node_exporter's textfile collector reads (it takes `*.prom`).
fn temporary_name(path: &Path, random: u64) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{random:016x}.tmp"));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_follows_its_help_and_type() {
        let mut snapshot = Snapshot::default();
        snapshot.bytes_sent[2] = 42;
        let text = render(&snapshot, &[2]);
        assert!(text.contains("# TYPE proxy_channel_target_bytes_sent_total counter\n"));
        assert!(text.contains("proxy_channel_target_bytes_sent_total{target=\"2\"} 42\n"));
        assert!(!text.contains("target=\"1\""));
        assert!(
            !text.contains("catchup"),
            "no catch-up series while it is off"
        );
        snapshot.catch_up[2].enabled = true;
        snapshot.catch_up[2].backlog_bytes = 7;
        let text = render(&snapshot, &[2]);
        assert!(text.contains("proxy_channel_catchup_backlog_bytes{target=\"2\"} 7\n"));
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} has no TYPE before it");
            }
        }
    }

    #[test]
    fn the_temporary_file_is_hidden_beside_the_target() {
        let path = Path::new("/var/lib/node/proxy_channel.prom");
        assert_eq!(
            temporary_name(path, 0xab),
            Path::new("/var/lib/node/.proxy_channel.prom.00000000000000ab.tmp")
        );
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "kept").unwrap();
        let path = dir.path().join("metrics.prom");
        let planted = temporary_name(&path, 7);
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let error = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&planted)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
        write_file(&path, "text\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "text\n");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "kept");
        assert!(fs::symlink_metadata(&planted).unwrap().is_symlink());
    }
}
