//! PROXY_ALLOW: the addresses and CIDR blocks that may connect.
//!
//! Checked at accept, before any message is written, so a refused peer costs
//! no disk. An IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`) is matched as the
//! IPv4 address it carries, so IPv4 blocks hold for it too.

use std::net::IpAddr;

/// One address block: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    network: IpAddr,
    prefix: u8,
}

impl Block {
    /// `192.0.2.7`, `10.0.0.0/8`, `2001:db8::/32`; host bits must be zero.
    fn parse(text: &str) -> Option<Block> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().ok()?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= bits)?,
            None => bits,
        };
        let block = Block { network, prefix };
        (block.masked(network) == Some(network)).then_some(block)
    }

    /// `address` with the bits past the prefix cleared, if the families match.
    fn masked(&self, address: IpAddr) -> Option<IpAddr> {
        match (self.network, address) {
            (IpAddr::V4(_), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                Some(IpAddr::from(std::net::Ipv4Addr::from(u32::from(a) & mask)))
            }
            (IpAddr::V6(_), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                Some(IpAddr::from(std::net::Ipv6Addr::from(u128::from(a) & mask)))
            }
            _ => None,
        }
    }

    fn contains(&self, address: IpAddr) -> bool {
        self.masked(address) == Some(self.network)
    }
}

/// The parsed PROXY_ALLOW list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    blocks: Vec<Block>,
}

impl AllowList {
    /// A comma-separated list; `None` if any entry is not an address or a
    /// block with its host bits zero, or the list is empty.
    pub fn parse(text: &str) -> Option<AllowList> {
        let blocks: Option<Vec<Block>> = text.split(',').map(|b| Block::parse(b.trim())).collect();
        blocks
            .filter(|b| !b.is_empty())
            .map(|blocks| AllowList { blocks })
    }

    /// Whether `peer` may connect.
    pub fn allows(&self, peer: IpAddr) -> bool {
        let peer = canonical(peer);
        self.blocks.iter().any(|block| block.contains(peer))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn blocks_and_single_addresses_match() {
        let list = AllowList::parse("10.0.0.0/8, 2001:db8::/32,192.0.2.7").expect("list");
        assert!(list.allows(ip("10.200.3.4")));
        assert!(list.allows(ip("192.0.2.7")));
        assert!(!list.allows(ip("192.0.2.8")));
        assert!(list.allows(ip("2001:db8:1::5")));
        assert!(!list.allows(ip("2001:db9::1")));
        assert!(!list.allows(ip("11.0.0.1")));
    }

    #[test]
    fn an_ipv4_mapped_peer_matches_ipv4_blocks() {
        let list = AllowList::parse("127.0.0.0/8").expect("list");
        assert!(list.allows(ip("::ffff:127.0.0.1")));
        assert!(!list.allows(ip("::1")));
    }

    #[test]
    fn zero_prefix_allows_the_whole_family() {
        let list = AllowList::parse("0.0.0.0/0").expect("list");
        assert!(list.allows(ip("203.0.113.9")));
        assert!(!list.allows(ip("2001:db8::1")));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "",
            "10.0.0.1/33",
            "10.0.0.1/8",
            "example.com",
            "10.0.0.0/8,",
            "::1/129",
            "1.2.3.4/x",
        ] {
            assert_eq!(AllowList::parse(bad), None, "{bad}");
        }
    }
}
