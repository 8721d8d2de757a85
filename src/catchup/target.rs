//! One catch-up target as catch-up needs it: where it is, how long to wait
//! for it, and the PROXY protocol header it is sent first.
//!
//! A live connection's event 2 counts the header in `proxy.bytes.sent`, so
//! catch-up needs the header's length to know how many device bytes a
//! target got. A v2 header's length depends only on the address family;
//! a v1 header spells out the address the device connected to, which the
//! messages do not record. [`HeaderRule`] rebuilds the header with the
//! same code the workers use, for each address the daemon listens on, and
//! takes the shortest: exact when the daemon listens on one specific
//! address, and otherwise never longer than the real one, so a target
//! that got everything is never taken for one that missed its last bytes
//! (the price: up to a few bytes of a packet cut at the drop may count as
//! delivered).

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, SendProxyProtocol, TargetAddress, TargetConfig};
use crate::net::proxy_header;

/// The PROXY protocol header sent to a target, rebuilt for a device.
#[derive(Debug, Clone)]
pub struct HeaderRule {
    version: SendProxyProtocol,
    /// The addresses the daemon listens on (as bound: real ports).
    listen: Vec<SocketAddr>,
}

impl HeaderRule {
    pub fn new(version: SendProxyProtocol, listen: Vec<SocketAddr>) -> HeaderRule {
        HeaderRule { version, listen }
    }

    /// The header for a device at `peer`: the shortest of those the
    /// listening addresses give (empty when the target gets none).
    pub fn header(&self, peer: SocketAddr) -> Vec<u8> {
        if self.version == SendProxyProtocol::Off {
            return Vec::new();
        }
        let fallback = SocketAddr::new(peer.ip(), 0);
        let candidates = match self.listen.is_empty() {
            true => std::slice::from_ref(&fallback),
            false => &self.listen[..],
        };
        candidates
            .iter()
            .map(|&local| proxy_header::build(self.version, peer, local))
            .min_by_key(Vec::len)
            .unwrap_or_default()
    }

    /// How many bytes of a live connection's `proxy.bytes.sent` were the
    /// header.
    pub fn length(&self, peer: SocketAddr) -> u64 {
        self.header(peer).len() as u64
    }
}

/// What one target's catch-up needs to know.
#[derive(Debug, Clone)]
pub struct CatchUpTarget {
    /// Its `proxy.source`.
    pub number: u8,
    /// Its `proxy.target`: the configured host:port.
    pub label: String,
    pub address: TargetAddress,
    pub header: HeaderRule,
    /// Connecting, and a delivery that makes no progress, give up after
    /// this long (PROXY_CONNECT_TIMEOUT).
    pub connect_timeout: Duration,
    /// The most payload one delivery holds (PROXY_TARGET_BUFFER).
    pub buffer: usize,
}

impl CatchUpTarget {
    /// The catch-up targets of `config`; `listen` are the addresses the
    /// daemon listens on, as bound.
    pub fn all(config: &Config, listen: &[SocketAddr]) -> Vec<CatchUpTarget> {
        config
            .targets
            .iter()
            .filter(|t| t.catch_up)
            .map(|t| CatchUpTarget::new(config, t, listen))
            .collect()
    }

    fn new(config: &Config, target: &TargetConfig, listen: &[SocketAddr]) -> CatchUpTarget {
        CatchUpTarget {
            number: target.number,
            label: target.address.to_string(),
            address: target.address.clone(),
            header: HeaderRule::new(target.send_proxy, listen.to_vec()),
            connect_timeout: config.connect_timeout,
            buffer: config.target_buffer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v2_lengths_follow_the_family_and_off_is_nothing() {
        let rule = HeaderRule::new(SendProxyProtocol::V2, vec![addr("127.0.0.1:5555")]);
        assert_eq!(rule.length(addr("10.0.0.1:4000")), 16 + 12);
        let six = HeaderRule::new(SendProxyProtocol::V2, vec![addr("[::1]:5555")]);
        assert_eq!(six.length(addr("[2001:db8::1]:4000")), 16 + 36);
        let off = HeaderRule::new(SendProxyProtocol::Off, vec![addr("127.0.0.1:5555")]);
        assert_eq!(off.length(addr("10.0.0.1:4000")), 0);
    }

    #[test]
    fn v1_is_rebuilt_exactly_for_one_listen_address_and_shortest_for_several() {
        let peer = addr("192.0.2.10:40000");
        let one = HeaderRule::new(SendProxyProtocol::V1, vec![addr("198.51.100.7:5555")]);
        let expected = "PROXY TCP4 192.0.2.10 198.51.100.7 40000 5555\r\n";
        assert_eq!(one.header(peer), expected.as_bytes());
        let several = HeaderRule::new(
            SendProxyProtocol::V1,
            vec![addr("198.51.100.7:5555"), addr("0.0.0.0:21")],
        );
        assert_eq!(
            several.header(peer),
            b"PROXY TCP4 192.0.2.10 0.0.0.0 40000 21\r\n"
        );
    }
}
