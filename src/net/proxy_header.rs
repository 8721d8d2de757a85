//! HAProxy's PROXY protocol header, in (device connections behind a load
//! balancer) and out (to targets that want the device's address).
//!
//! Parsing and building are done by the `ppp` crate; this module adds what
//! the daemon needs around it: one call that says "need more bytes", "here is
//! the header and how long it was" or "this is not a valid header, because",
//! for the versions the configuration accepts, and a hard cap on how many
//! bytes a header may take, whatever length it declares.

use std::net::{IpAddr, SocketAddr};

use ppp::{PartialResult, v1, v2};

use crate::config::{AcceptProxyProtocol, SendProxyProtocol};

/// The longest header accepted: a v1 header is at most 107 bytes; a v2
/// header may declare up to 64 KiB of addresses and TLVs, but nothing a
/// balancer sends needs more than this.
pub const MAX_HEADER: usize = 4096;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// The longest v1 header, "\r\n" included.
const V1_MAX: usize = 107;

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A valid header could still come: read more.
    Incomplete,
    /// A header of `length` bytes; `source` is the client's address, `None`
    /// for a LOCAL (health check) or UNKNOWN header, which carries none.
    Header {
        length: usize,
        source: Option<SocketAddr>,
        destination: Option<SocketAddr>,
    },
    /// A v2 LOCAL header of `length` bytes: the balancer's own connection
    /// (a health check), relaying no client.
    Local { length: usize },
    /// Not a header the configuration accepts; the reason, in a few words.
    Invalid(String),
}

/// Parses the start of a device connection.
pub fn parse(input: &[u8], accept: AcceptProxyProtocol) -> Parsed {
    let v1_allowed = matches!(accept, AcceptProxyProtocol::V1 | AcceptProxyProtocol::Any);
    let v2_allowed = matches!(accept, AcceptProxyProtocol::V2 | AcceptProxyProtocol::Any);
    let could_be = |signature: &[u8]| {
        let n = input.len().min(signature.len());
        input[..n] == signature[..n]
    };
    if v2_allowed && could_be(V2_SIGNATURE) {
        return parse_v2(input);
    }
    if v1_allowed && could_be(V1_SIGNATURE) {
        return parse_v1(input);
    }
    let wanted = match accept {
        AcceptProxyProtocol::V1 => "a v1 header",
        AcceptProxyProtocol::V2 => "a v2 header",
        _ => "a v1 or v2 header",
    };
    Parsed::Invalid(format!("expected {wanted}"))
}

fn parse_v1(input: &[u8]) -> Parsed {
    // A v1 header ends at its first "\n". Wait for it before parsing: ppp
    // takes some cut headers (one ending right after a space) for invalid.
    let searched = &input[..input.len().min(V1_MAX)];
    if !searched.contains(&b'\n') {
        return match input.len() < V1_MAX {
            true => Parsed::Incomplete,
            false => Parsed::Invalid(format!("v1: no end of line within {V1_MAX} bytes")),
        };
    }
    match v1::Header::try_from(input) {
        Ok(header) => {
            let (source, destination) = match header.addresses {
                v1::Addresses::Tcp4(a) => (
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
                    Some(SocketAddr::new(
                        IpAddr::V4(a.destination_address),
                        a.destination_port,
                    )),
                ),
                v1::Addresses::Tcp6(a) => (
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
                    Some(SocketAddr::new(
                        IpAddr::V6(a.destination_address),
                        a.destination_port,
                    )),
                ),
                v1::Addresses::Unknown => (None, None),
            };
            Parsed::Header {
                length: header.header.len(),
                source,
                destination,
            }
        }
        Err(e) => Parsed::Invalid(format!("v1: {}", tidy(&e.to_string()))),
    }
}

fn parse_v2(input: &[u8]) -> Parsed {
    // The declared length is checked against the cap before waiting for
    // the bytes it promises.
    if input.len() >= 16 {
        let declared = 16 + usize::from(u16::from_be_bytes([input[14], input[15]]));
        if declared > MAX_HEADER {
            return Parsed::Invalid(format!("v2: longer than {MAX_HEADER} bytes ({declared})"));
        }
    }
    match v2::Header::try_from(input) {
        Ok(header) if header.command == v2::Command::Local => Parsed::Local {
            length: header.header.len(),
        },
        Ok(header) => {
            let (source, destination) = match (header.command, header.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => (
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
                    Some(SocketAddr::new(
                        IpAddr::V4(a.destination_address),
                        a.destination_port,
                    )),
                ),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => (
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
                    Some(SocketAddr::new(
                        IpAddr::V6(a.destination_address),
                        a.destination_port,
                    )),
                ),
                // UNIX or unspecified addresses: the connection's own peer
                // stands.
                _ => (None, None),
            };
            Parsed::Header {
                length: header.header.len(),
                source,
                destination,
            }
        }
        Err(e) if e.is_incomplete() => Parsed::Incomplete,
        Err(e) => Parsed::Invalid(format!("v2: {}", tidy(&e.to_string()))),
    }
}

/// A parser's error as a reason: one line (control characters written as
/// escapes), lower case first, no closing full stop.
fn tidy(text: &str) -> String {
    let mut tidy = String::with_capacity(text.len());
    for (i, c) in text.trim_end_matches('.').chars().enumerate() {
        match c {
            '\r' => tidy.push_str("\\r"),
            '\n' => tidy.push_str("\\n"),
            c if c.is_control() => tidy.push(' '),
            c if i == 0 => tidy.extend(c.to_lowercase()),
            c => tidy.push(c),
        }
    }
    tidy
}

/// The header to send a target first: `source` is the device, and
/// `destination` the address it connected to.
pub fn build(version: SendProxyProtocol, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    match version {
        SendProxyProtocol::Off => Vec::new(),
        SendProxyProtocol::V1 => {
            let addresses = match (source, destination) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                    v1::Addresses::new_tcp4(*s.ip(), *d.ip(), s.port(), d.port())
                }
                (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                    v1::Addresses::new_tcp6(*s.ip(), *d.ip(), s.port(), d.port())
                }
                _ => v1::Addresses::Unknown,
            };
            addresses.to_string().into_bytes()
        }
        SendProxyProtocol::V2 => {
            let version_command = v2::Version::Two as u8 | v2::Command::Proxy as u8;
            let addresses: v2::Addresses = (source, destination).into();
            let family = addresses.address_family() as u8 | v2::Protocol::Stream as u8;
            // Building into memory only fails if the addresses do not fit,
            // which they always do; fall back to a LOCAL header regardless.
            v2::Builder::with_addresses(version_command, v2::Protocol::Stream, addresses)
                .build()
                .unwrap_or_else(|_| {
                    let local = v2::Version::Two as u8 | v2::Command::Local as u8;
                    v2::Builder::new(local, family & 0x0f)
                        .build()
                        .unwrap_or_default()
                })
        }
    }
}

/// Both addresses as IPv4 if both can be, otherwise both as IPv6.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (source, destination) = (canonical(source), canonical(destination));
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (source, destination),
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
                IpAddr::V6(_) => a,
            };
            (v6(source), v6(destination))
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
    fn a_v1_header_gives_the_client_and_its_length() {
        let input = b"PROXY TCP4 10.1.2.3 192.168.0.1 40000 5555\r\nHELLO";
        assert_eq!(
            parse(input, AcceptProxyProtocol::V1),
            Parsed::Header {
                length: input.len() - 5,
                source: Some(addr("10.1.2.3:40000")),
                destination: Some(addr("192.168.0.1:5555")),
            }
        );
    }

    #[test]
    fn a_partial_header_asks_for_more_and_garbage_is_refused() {
        assert_eq!(
            parse(b"PROXY TCP4 10.1.", AcceptProxyProtocol::Any),
            Parsed::Incomplete
        );
        assert_eq!(
            parse(b"\r\n\r\n\0", AcceptProxyProtocol::Any),
            Parsed::Incomplete
        );
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n", AcceptProxyProtocol::Any),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 10.1.2.3 x 1 2\r\n", AcceptProxyProtocol::V1),
            Parsed::Invalid(_)
        ));
        // A v2 header where only v1 is accepted.
        let v2 = build(
            SendProxyProtocol::V2,
            addr("10.0.0.1:1"),
            addr("10.0.0.2:2"),
        );
        assert_eq!(
            parse(&v2, AcceptProxyProtocol::V1),
            Parsed::Invalid("expected a v1 header".into())
        );
    }

    #[test]
    fn built_headers_parse_back() {
        for (source, destination) in [
            (addr("10.0.0.1:4000"), addr("10.0.0.2:5555")),
            (addr("[2001:db8::1]:4000"), addr("[2001:db8::2]:5555")),
            (addr("10.0.0.1:4000"), addr("[::1]:5555")),
        ] {
            for version in [SendProxyProtocol::V1, SendProxyProtocol::V2] {
                let header = build(version, source, destination);
                let Parsed::Header {
                    length,
                    source: seen,
                    ..
                } = parse(&header, AcceptProxyProtocol::Any)
                else {
                    panic!("{version:?} header for {source} does not parse");
                };
                assert_eq!(length, header.len());
                assert_eq!(
                    seen.map(|s| s.ip().to_canonical()),
                    Some(source.ip().to_canonical())
                );
                assert_eq!(seen.map(|s| s.port()), Some(source.port()));
            }
        }
    }

    #[test]
    fn a_declared_length_over_the_cap_is_refused_before_reading_it() {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(
            matches!(parse(&header, AcceptProxyProtocol::V2), Parsed::Invalid(why) if why.contains("longer than"))
        );
    }

    #[test]
    fn a_local_command_is_a_balancer_health_check() {
        let local = v2::Builder::new(0x20, 0x00).build().unwrap();
        assert_eq!(
            parse(&local, AcceptProxyProtocol::V2),
            Parsed::Local { length: 16 }
        );
    }

    #[test]
    fn reasons_stay_on_one_line() {
        let header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 2000 \r\n";
        let Parsed::Invalid(why) = parse(header, AcceptProxyProtocol::V1) else {
            panic!("a trailing space must be refused");
        };
        assert!(
            !why.contains(['\r', '\n']) && !why.ends_with('.'),
            "{why:?}"
        );
    }
}
