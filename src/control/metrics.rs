//! The counters in the Prometheus text exposition format, and the file that
//! node_exporter's textfile collector reads.
//!
//! The file is replaced atomically: written to a temporary file next to it,
//! then renamed over it, so a scrape never sees half a file.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::path::Path;

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

/// Replaces `path` with `text` atomically.
pub fn write_file(path: &Path, text: &str) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = Path::new(&temporary);
    let mut file = fs::File::create(temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    fs::rename(temporary, path)
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
}
