//! Property tests of the PROXY protocol header parser (issue 7): random and
//! mutated headers never panic, never claim more bytes than they were given
//! or than the cap, and a header that parses says exactly how long it was.
//! Bounded: a fixed number of cases per property.

use proptest::prelude::*;
use proxy_channel::config::{AcceptProxyProtocol, SendProxyProtocol};
use proxy_channel::net::proxy_header::{MAX_HEADER, Parsed, build, parse};

const MODES: [AcceptProxyProtocol; 3] = [
    AcceptProxyProtocol::V1,
    AcceptProxyProtocol::V2,
    AcceptProxyProtocol::Any,
];

/// What every answer must respect, whatever the input.
fn check_invariants(input: &[u8], mode: AcceptProxyProtocol) -> Result<(), TestCaseError> {
    match parse(input, mode) {
        Parsed::Header { length, .. } => {
            prop_assert!(
                length <= input.len(),
                "header of {length} B from {} B",
                input.len()
            );
            prop_assert!(length <= MAX_HEADER);
            prop_assert!(length >= 16 || input.starts_with(b"PROXY "));
        }
        Parsed::Local { length } => prop_assert!((16..=input.len()).contains(&length)),
        Parsed::Incomplete => prop_assert!(input.len() < MAX_HEADER),
        Parsed::Invalid(why) => prop_assert!(!why.is_empty()),
    }
    Ok(())
}

fn addresses() -> impl Strategy<Value = (std::net::SocketAddr, std::net::SocketAddr)> {
    let address = prop_oneof![
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port))),
        any::<([u8; 16], u16)>().prop_map(|(ip, port)| std::net::SocketAddr::from((ip, port))),
    ];
    (address.clone(), address)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..300), mode in 0usize..3) {
        check_invariants(&input, MODES[mode])?;
    }

    #[test]
    fn random_bytes_after_a_signature_never_panic(
        v2 in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut input = match v2 {
            true => b"\r\n\r\n\0\r\nQUIT\n".to_vec(),
            false => b"PROXY ".to_vec(),
        };
        input.extend_from_slice(&tail);
        check_invariants(&input, AcceptProxyProtocol::Any)?;
    }

    #[test]
    fn mutated_and_cut_headers_never_panic(
        (source, destination) in addresses(),
        v2 in any::<bool>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let version = if v2 { SendProxyProtocol::V2 } else { SendProxyProtocol::V1 };
        let mut header = build(version, source, destination);
        let length = header.len();
        for (at, byte) in flips {
            let i = at.index(length);
            header[i] = byte;
        }
        header.extend_from_slice(&payload);
        check_invariants(&header, AcceptProxyProtocol::Any)?;
        let cut = cut.index(header.len() + 1);
        check_invariants(&header[..cut], AcceptProxyProtocol::Any)?;
    }

    #[test]
    fn built_headers_parse_to_their_length_with_payload_after(
        (source, destination) in addresses(),
        v2 in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let version = if v2 { SendProxyProtocol::V2 } else { SendProxyProtocol::V1 };
        let header = build(version, source, destination);
        let mut input = header.clone();
        input.extend_from_slice(&payload);
        match parse(&input, AcceptProxyProtocol::Any) {
            Parsed::Header { length, source: Some(seen), .. } => {
                prop_assert_eq!(length, header.len());
                prop_assert_eq!(seen.port(), source.port());
                prop_assert_eq!(seen.ip().to_canonical(), source.ip().to_canonical());
            }
            other => prop_assert!(false, "{:?} header did not parse: {:?}", version, other),
        }
        // Every strict prefix of a valid header asks for more bytes.
        for cut in 0..header.len() {
            prop_assert_eq!(parse(&header[..cut], AcceptProxyProtocol::Any), Parsed::Incomplete, "cut at {}", cut);
        }
    }
}
