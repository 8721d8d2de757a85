//! A socket address as the `peer` of a message line: the same text as
//! std's `Display` (`1.2.3.4:5`, `[::1]:5`, `[fe80::1%2]:5`), written
//! straight into the line.
//!
//! Every message carries its device's address. Through `core::fmt` it cost
//! about 2,200 instructions a message, three quarters of what store mode
//! added to a 100-byte packet (callgrind, one connection, request and
//! reply); written here it costs about a hundred. The unit tests hold it to
//! std's text for every kind of address.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

/// Appends `address` as std's `Display` writes it.
pub fn write_address(out: &mut Vec<u8>, address: &SocketAddr) {
    match address {
        SocketAddr::V4(v4) => {
            write_ipv4(out, v4.ip());
        }
        SocketAddr::V6(v6) => {
            out.push(b'[');
            write_ipv6(out, v6.ip());
            if v6.scope_id() != 0 {
                out.push(b'%');
                write_decimal(out, u64::from(v6.scope_id()));
            }
            out.push(b']');
        }
    }
    out.push(b':');
    write_decimal(out, u64::from(address.port()));
}

fn write_ipv4(out: &mut Vec<u8>, ip: &Ipv4Addr) {
    for (index, octet) in ip.octets().into_iter().enumerate() {
        if index > 0 {
            out.push(b'.');
        }
        write_octet(out, octet);
    }
}

/// An octet in decimal, without leading zeros.
fn write_octet(out: &mut Vec<u8>, octet: u8) {
    if octet >= 100 {
        out.push(b'0' + octet / 100);
    }
    if octet >= 10 {
        out.push(b'0' + octet / 10 % 10);
    }
    out.push(b'0' + octet % 10);
}

/// RFC 5952 as std writes it: lowercase hex groups without leading zeros,
/// the first longest run of two or more zero groups as `::`, and an
/// IPv4-mapped address as `::ffff:a.b.c.d`.
fn write_ipv6(out: &mut Vec<u8>, ip: &Ipv6Addr) {
    if let Some(v4) = ip.to_ipv4_mapped() {
        out.extend_from_slice(b"::ffff:");
        write_ipv4(out, &v4);
        return;
    }
    let groups = ip.segments();
    let (start, len) = longest_zero_run(&groups);
    if len > 1 {
        write_groups(out, &groups[..start]);
        out.extend_from_slice(b"::");
        write_groups(out, &groups[start + len..]);
    } else {
        write_groups(out, &groups);
    }
}

/// Where the first longest run of zero groups starts, and its length.
fn longest_zero_run(groups: &[u16; 8]) -> (usize, usize) {
    let (mut longest, mut current) = ((0, 0), (0, 0));
    for (index, &group) in groups.iter().enumerate() {
        if group != 0 {
            current = (0, 0);
            continue;
        }
        if current.1 == 0 {
            current.0 = index;
        }
        current.1 += 1;
        if current.1 > longest.1 {
            longest = current;
        }
    }
    longest
}

fn write_groups(out: &mut Vec<u8>, groups: &[u16]) {
    for (index, &group) in groups.iter().enumerate() {
        if index > 0 {
            out.push(b':');
        }
        write_group(out, group);
    }
}

/// One group in lowercase hex, without leading zeros.
fn write_group(out: &mut Vec<u8>, group: u16) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (16 - group.leading_zeros() as usize).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        out.push(DIGITS[usize::from((group >> (shift * 4)) & 0xf)]);
    }
}

fn write_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{SocketAddrV4, SocketAddrV6};

    fn text(address: SocketAddr) -> String {
        let mut out = Vec::new();
        write_address(&mut out, &address);
        String::from_utf8(out).expect("ASCII")
    }

    #[test]
    fn the_kinds_of_address_read_as_std_writes_them() {
        for address in [
            "1.2.3.4:5",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::]:1",
            "[::1]:4000",
            "[1::]:4000",
            "[2001:db8::1:0:0:1]:80",
            "[2001:db8:0:1:1:1:1:1]:80",
            "[1:0:0:2:0:0:0:3]:9",
            "[::ffff:192.0.2.7]:5555",
            "[::192.0.2.7]:5555",
            "[fe80::1%2]:5555",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let address: SocketAddr = address.parse().expect("an address");
            assert_eq!(text(address), address.to_string());
        }
    }

    /// Groups drawn mostly from zero and a few values, so that runs of
    /// zeros of every length and position come up.
    fn group() -> impl Strategy<Value = u16> {
        prop_oneof![4 => Just(0u16), 1 => Just(0xffff), 1 => any::<u16>(), 1 => 0u16..0x100]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn any_ipv4_address_reads_as_std_writes_it(ip in any::<u32>(), port in any::<u16>()) {
            let address = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port));
            prop_assert_eq!(text(address), address.to_string());
        }

        #[test]
        fn any_ipv6_address_reads_as_std_writes_it(
            groups in proptest::array::uniform8(group()),
            port in any::<u16>(),
            scope in prop_oneof![Just(0u32), any::<u32>()],
        ) {
            let ip = Ipv6Addr::from(groups);
            let address = SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope));
            prop_assert_eq!(text(address), address.to_string());
        }
    }
}
