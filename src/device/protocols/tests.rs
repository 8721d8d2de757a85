//! Each built-in detector on real frames, built byte for byte from the
//! protocols' documents, read whole, byte by byte and split in two at
//! every position; and on near misses.

use std::time::Instant;

use super::*;
use crate::device::{Detection, DetectorSet, GiveUp, Outcome, detect_datagram};

fn set(names: &str) -> DetectorSet {
    DetectorSet::parse(names, None).expect("valid detector names")
}

/// The one outcome of a detection fed `pieces` as successive reads.
fn outcome_of(set: &DetectorSet, pieces: &[&[u8]]) -> Option<Outcome> {
    let now = Instant::now();
    let mut detection = Detection::new(now);
    let mut outcomes = pieces.iter().filter_map(|p| detection.feed(set, p, now));
    let outcome = outcomes.next();
    assert_eq!(outcomes.next(), None, "a detection ends once");
    outcome
}

/// The frame yields `ident` with detector `name` alone and with `auto`,
/// however it is split into reads.
fn assert_found_however_split(name: &str, frame: &[u8], ident: &str) {
    let expected = Some(Outcome::Found(Ident::new(ident).expect("valid ident")));
    for set in [set(name), set("auto")] {
        assert_eq!(outcome_of(&set, &[frame]), expected, "{name} whole");
        let bytes: Vec<&[u8]> = frame.chunks(1).collect();
        assert_eq!(outcome_of(&set, &bytes), expected, "{name} byte by byte");
        for at in 0..=frame.len() {
            let (head, tail) = frame.split_at(at);
            assert_eq!(
                outcome_of(&set, &[head, tail]),
                expected,
                "{name} split at {at}"
            );
        }
    }
}

/// `bytes` can never match detector `name`, and detection says so at once.
fn assert_no_match(name: &str, bytes: &[u8]) {
    let builtin = Builtin::ALL.into_iter().find(|b| b.name() == name);
    let builtin = builtin.expect("a built-in name");
    assert_eq!(
        builtin.scan_stream(bytes),
        Err(Miss::NoMatch),
        "{name}: {bytes:02x?}"
    );
    let outcome = outcome_of(&set(name), &[bytes]);
    assert_eq!(outcome, Some(Outcome::GaveUp(GiveUp::NoMatchPossible)));
}

/// `bytes` could still become a match for detector `name`.
fn assert_needs_more(name: &str, bytes: &[u8]) {
    let builtin = Builtin::ALL.into_iter().find(|b| b.name() == name);
    let builtin = builtin.expect("a built-in name");
    assert_eq!(
        builtin.scan_stream(bytes),
        Err(Miss::NeedMore),
        "{name}: {bytes:02x?}"
    );
}

/// Teltonika's IMEI packet: 2-byte length, then the IMEI's digits.
fn teltonika_imei_packet(imei: &str) -> Vec<u8> {
    let length = u16::try_from(imei.len()).expect("short IMEI");
    [&length.to_be_bytes()[..], imei.as_bytes()].concat()
}

#[test]
fn teltonika_imei_packet_gives_the_imei() {
    let packet = teltonika_imei_packet("356307042441013");
    assert_eq!(&packet[..2], [0x00, 0x0F]);
    assert_found_however_split("teltonika", &packet, "356307042441013");
}

#[test]
fn teltonika_imei_packet_after_ff_keep_alives_gives_the_imei() {
    let packet = [
        &[0xFF, 0xFF, 0xFF][..],
        &teltonika_imei_packet("356307042441013"),
    ]
    .concat();
    assert_found_however_split("teltonika", &packet, "356307042441013");
}

#[test]
fn teltonika_lengths_outside_1_to_20_do_not_match() {
    assert_no_match("teltonika", b"\x00\x00");
    assert_no_match("teltonika", &teltonika_imei_packet(&"1".repeat(21)));
    assert_no_match("teltonika", b"\x01\x0F");
    assert_found_however_split("teltonika", &teltonika_imei_packet("1"), "1");
    let twenty = "12345678901234567890";
    assert_found_however_split("teltonika", &teltonika_imei_packet(twenty), twenty);
}

#[test]
fn teltonika_non_digits_or_a_short_imei_do_not_match() {
    assert_no_match("teltonika", b"\x00\x0F35630704244101X");
    assert_no_match("teltonika", b"\x00\x0F3563 ");
    assert_needs_more("teltonika", b"\x00\x0F35630704244101");
    assert_needs_more("teltonika", b"\xFF\xFF\x00");
    assert_needs_more("teltonika", b"");
}

/// Teltonika's UDP example: length 003D, packet id CAFE, byte 01, AVL packet
/// id 05, IMEI length 000F, IMEI 352093086403655, then the Codec 8 data.
const TELTONIKA_UDP: &str = "003DCAFE0105000F33353230393330383634303336353508010000016B4F815B30010000000000000000000000000000000103021503010101425DBC000001";

#[test]
fn teltonika_udp_datagram_gives_the_imei() {
    let datagram = hex::decode(TELTONIKA_UDP).expect("hex");
    let ident = detect_datagram(&set("teltonika"), &datagram);
    assert_eq!(ident.as_ref().map(Ident::as_str), Some("352093086403655"));
    assert_eq!(detect_datagram(&set("auto"), &datagram), ident);
    // Over TCP the same bytes are no IMEI packet.
    assert_no_match("teltonika", &datagram);
}

#[test]
fn teltonika_udp_near_misses_do_not_match() {
    let datagram = hex::decode(TELTONIKA_UDP).expect("hex");
    let cut = &datagram[..8 + 14];
    assert_eq!(
        detect_datagram(&set("teltonika"), cut),
        None,
        "IMEI cut short"
    );
    let mut long = datagram.clone();
    long[7] = 21;
    assert_eq!(detect_datagram(&set("teltonika"), &long), None, "length 21");
    let mut letter = datagram.clone();
    letter[10] = b'A';
    assert_eq!(
        detect_datagram(&set("teltonika"), &letter),
        None,
        "a letter"
    );
    // A TCP IMEI packet sent as a datagram is not Teltonika's UDP framing.
    let tcp = teltonika_imei_packet("356307042441013");
    assert_eq!(detect_datagram(&set("teltonika"), &tcp), None);
}

/// CRC-ITU (CRC-16/X-25) as the GT06 protocol document computes it.
fn crc_itu(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &byte in bytes {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x8408
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A GT06 login: `78 78`, length 0D, protocol 01, the terminal ID in BCD,
/// serial number 0001, CRC-ITU of length..serial, stop `0D 0A`.
fn gt06_login(terminal_id: [u8; 8]) -> Vec<u8> {
    let checked = [&[0x0D, 0x01][..], &terminal_id, &[0x00, 0x01]].concat();
    let crc = crc_itu(&checked).to_be_bytes();
    [&[0x78, 0x78][..], &checked, &crc, &[0x0D, 0x0A]].concat()
}

#[test]
fn gt06_login_gives_the_terminal_id_without_leading_zeros() {
    // The protocol document's own example, CRC 8CDD included.
    let login = gt06_login([0x01, 0x23, 0x45, 0x67, 0x89, 0x01, 0x23, 0x45]);
    assert_eq!(&login[14..16], [0x8C, 0xDD]);
    assert_found_however_split("gt06", &login, "123456789012345");
    let imei = gt06_login([0x03, 0x53, 0x41, 0x90, 0x57, 0x39, 0x18, 0x21]);
    assert_found_however_split("gt06", &imei, "353419057391821");
}

#[test]
fn gt06_near_misses_do_not_match() {
    let login = gt06_login([0x03, 0x53, 0x41, 0x90, 0x57, 0x39, 0x18, 0x21]);
    let mut location = login.clone();
    location[3] = 0x12;
    assert_no_match("gt06", &location);
    let mut not_bcd = login.clone();
    not_bcd[6] = 0x4A;
    assert_no_match("gt06", &not_bcd);
    assert_no_match("gt06", &gt06_login([0; 8]));
    assert_no_match("gt06", b"\x79\x79");
    assert_no_match("gt06", b"\x78\x77");
    assert_needs_more("gt06", &login[..11]);
}

const H02_REPORT: &[u8] = b"*HQ,865205030001234,V1,121532,A,2235.0887,N,11406.0105,E,000.00,000,150817,FFFFFBFF,460,00,0,0,6#";

#[test]
fn h02_report_gives_the_id_in_any_case() {
    assert_found_however_split("h02", H02_REPORT, "865205030001234");
    assert_found_however_split("h02", b"*hq,865205030001234,V1,#", "865205030001234");
    assert_found_however_split("h02", b"*Th,4209950057,V1,#", "4209950057");
}

#[test]
fn h02_near_misses_do_not_match() {
    assert_no_match("h02", b"*HQ,,V1,#");
    assert_no_match("h02", b"*HX,865205030001234,");
    assert_no_match("h02", b"*HQ;865205030001234,");
    assert_no_match("h02", b"*HQ,8652 05030001234,");
    let too_long = format!("*HQ,{},V1", "8".repeat(Ident::MAX_LEN + 1));
    assert_no_match("h02", too_long.as_bytes());
    // No `,` after the ID yet: maybe later, not now.
    assert_needs_more("h02", b"*HQ,865205030001234");
}

const QUECLINK_FRI: &[u8] = b"+RESP:GTFRI,060228,862170010000000,,0,0,1,1,0.0,0,0.0,0.000000,0.000000,20100214093254,0460,0000,18d8,6141,00,20100214093254,11F0$";

#[test]
fn queclink_report_gives_the_imei_after_the_version() {
    assert_found_however_split("queclink", QUECLINK_FRI, "862170010000000");
}

#[test]
fn queclink_report_without_the_version_gives_the_imei() {
    let report =
        b"+RESP:GTFRI,862170010000000,,0,0,1,1,0.0,0,0.0,0.000000,0.000000,20100214093254,11F0$";
    assert_found_however_split("queclink", report, "862170010000000");
}

#[test]
fn queclink_buffered_reports_acks_and_meids_match() {
    let buffered =
        b"+BUFF:GTFRI,060228,862170010000000,,0,0,1,1,0.0,0,0.0,0,0,20100214093254,11F0$";
    assert_found_however_split("queclink", buffered, "862170010000000");
    let ack = b"+ACK:GTHBD,060228,862170010000000,,20100214093254,11F0$";
    assert_found_however_split("queclink", ack, "862170010000000");
    let meid = b"+RESP:GTFRI,060228,A1000012345AbC,,0$";
    assert_found_however_split("queclink", meid, "A1000012345AbC");
}

#[test]
fn queclink_near_misses_do_not_match() {
    // Neither of the two fields after the report type is an IMEI or MEID.
    assert_no_match("queclink", b"+RESP:GTFRI,060228,8621700100000,");
    assert_no_match("queclink", b"+RESP:GTFRI,060228,8621700100000000,");
    assert_no_match("queclink", b"+RESP:GTFRI,060228,,862170010000000,");
    assert_no_match("queclink", b"+RESP:GTFRI,060228,G1000012345678,");
    assert_no_match("queclink", b"+RESP:GT,060228,862170010000000,");
    assert_no_match("queclink", b"+resp:GTFRI,060228,862170010000000,");
    assert_no_match("queclink", b"+RESP:XXFRI,060228,862170010000000,");
    // The IMEI field has not ended yet.
    assert_needs_more("queclink", b"+RESP:GTFRI,060228,862170010000000");
}

#[test]
fn coban_login_and_report_give_the_imei() {
    assert_found_however_split("coban", b"##,imei:359586015829802,A;", "359586015829802");
    let report = b"imei:359586015829802,tracker,0809231929,13554900601,F,112909.397,A,2234.4669,N,11354.3287,E,0.11,;";
    assert_found_however_split("coban", report, "359586015829802");
}

#[test]
fn coban_near_misses_do_not_match() {
    assert_no_match("coban", b"##,imei:,A;");
    assert_no_match("coban", b"##,imei:35958601582980X,A;");
    assert_no_match("coban", b"##,IMEI:359586015829802,A;");
    assert_no_match("coban", b"##imei:359586015829802,A;");
    assert_no_match("coban", b"imei 359586015829802,");
    assert_needs_more("coban", b"##,imei:359586015829802");
}

/// A Meitrack frame: `$$`, the flag, the length (from the `,` after it to
/// the closing CR LF), the IMEI, the command and data, `*`, the checksum
/// (sum of every byte before it, mod 256, in hexadecimal) and CR LF.
fn meitrack_frame(flag: char, imei: &str, rest: &str) -> Vec<u8> {
    let body = format!(",{imei},{rest}*");
    let length = body.len() + 2 + 2;
    let checked = format!("$${flag}{length}{body}");
    let sum = checked
        .bytes()
        .fold(0u8, |sum, byte| sum.wrapping_add(byte));
    format!("{checked}{sum:02X}\r\n").into_bytes()
}

#[test]
fn meitrack_frame_gives_the_imei() {
    let data = "AAA,35,22.536226,114.026186,100301113008,A,7,21,0,205,1.0,23,119,1039,460|0|E166|A08B,0000,0006|0000|0000|019D|0000,";
    let frame = meitrack_frame('A', "862170010000000", data);
    assert!(
        frame.starts_with(b"$$A138,862170010000000,AAA,"),
        "{frame:?}"
    );
    assert_found_however_split("meitrack", &frame, "862170010000000");
    let login = meitrack_frame('Q', "353358017784062", "A10");
    assert_found_however_split("meitrack", &login, "353358017784062");
}

#[test]
fn meitrack_near_misses_do_not_match() {
    assert_no_match("meitrack", b"$$A,862170010000000,AAA");
    assert_no_match("meitrack", b"$$A1x8,862170010000000,AAA");
    assert_no_match("meitrack", b"$$,138,862170010000000,AAA");
    assert_no_match("meitrack", b"$$A138,,AAA");
    assert_no_match("meitrack", b"$A138,862170010000000,AAA");
    assert_needs_more("meitrack", b"$$A138,862170010000000");
}

#[test]
fn an_id_field_without_its_comma_in_the_window_gives_up() {
    // 1 KiB of digits never ends Coban's IMEI field: it is too long.
    let mut bytes = b"imei:".to_vec();
    bytes.resize(1024, b'7');
    assert_no_match("coban", &bytes);
}

#[test]
fn each_family_matches_only_its_own_first_bytes() {
    let frames: [&[u8]; 5] = [
        H02_REPORT,
        QUECLINK_FRI,
        b"##,imei:359586015829802,A;",
        b"$$A138,862170010000000,AAA,",
        b"\x78\x78\x0D\x01\x03\x53\x41\x90\x57\x39\x18\x21",
    ];
    for frame in frames {
        let matching: Vec<&str> = Builtin::ALL
            .into_iter()
            .filter(|b| b.scan_stream(frame).is_ok())
            .map(Builtin::name)
            .collect();
        assert_eq!(matching.len(), 1, "{frame:?}: {matching:?}");
    }
}
