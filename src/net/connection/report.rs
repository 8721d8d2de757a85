//! What `proxy-channel ctl list` shows of a connection.

use std::time::Instant;

use super::Connection;
use super::lifecycle::LinkState;
use crate::net::side::TargetId;

/// One device connection as `ctl list` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionReport {
    pub ident: String,
    pub peer: String,
    /// The device's ident, once recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub age_seconds: f64,
    pub idle_seconds: f64,
    /// Bytes received from the device.
    pub bytes_received: u64,
    /// Bytes sent to the device.
    pub bytes_sent: u64,
    /// Bytes queued for the device.
    pub queued: usize,
    pub targets: Vec<TargetReport>,
    /// `udp` for a UDP session; absent for a TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// One target connection as `ctl list` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TargetReport {
    pub target: u8,
    /// `waiting` (for the device to be recognised: a device list),
    /// `connecting`, `connected`, or `draining` (the device has finished).
    pub state: String,
    pub queued: usize,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl TargetReport {
    /// A listed target waiting for the device to be recognised, with the
    /// device bytes held for it.
    pub fn waiting(target: TargetId, held: usize) -> TargetReport {
        TargetReport {
            target: target.number(),
            state: "waiting".to_string(),
            queued: held,
            bytes_received: 0,
            bytes_sent: 0,
        }
    }
}

impl Connection {
    /// What the control socket shows of this connection.
    pub fn report(&self, now: Instant) -> ConnectionReport {
        let targets = TargetId::all()
            .filter_map(|target| match &self.targets[target.index()] {
                Some(link) => Some(TargetReport {
                    target: target.number(),
                    state: match link.state {
                        LinkState::Connecting { .. } => "connecting",
                        LinkState::Open => "connected",
                        LinkState::WriteClosed => "draining",
                    }
                    .to_string(),
                    queued: link.endpoint.queued(),
                    bytes_received: link.endpoint.received,
                    bytes_sent: link.endpoint.sent,
                }),
                None => self
                    .waits_for(target)
                    .map(|held| TargetReport::waiting(target, held)),
            })
            .collect();
        ConnectionReport {
            ident: self.origin.ident.to_string(),
            peer: self.origin.peer.to_string(),
            device: self.recognition.ident().map(ToString::to_string),
            age_seconds: now.duration_since(self.opened_at).as_secs_f64(),
            idle_seconds: now.duration_since(self.last_activity).as_secs_f64(),
            bytes_received: self.device.received,
            bytes_sent: self.device.sent,
            queued: self.device.queued(),
            targets,
            transport: None,
        }
    }
}
