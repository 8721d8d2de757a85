//! The built-in detectors: one pure function per device family, reading a
//! device's first bytes.
//!
//! Each reads the bytes from the first byte of the connection (or of the
//! datagram) and answers with a [`Scan`]: the ident, [`Miss::NeedMore`]
//! (these bytes are the start of a match, more may complete it) or
//! [`Miss::NoMatch`] (no continuation can match). The answers are
//! monotone, which makes detection independent of how the bytes were split
//! into reads: once a detector found an ident or said `NoMatch` on some
//! bytes, it says the same on any longer run starting with them.
//!
//! The families start with different bytes (`00`/`FF`, `78 78`, `*`, `+`,
//! `#` or `i`, `$`), so at most one of them can match a given stream.
//! An ID field ends at a `,`: one that has not ended within
//! [`Ident::MAX_LEN`] bytes is no match.

use super::ident::Ident;

/// Why a detector has no ident for these bytes (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Miss {
    /// The bytes so far could start a match.
    NeedMore,
    /// No continuation of these bytes can match.
    NoMatch,
}

/// What a detector reads from a device's first bytes.
pub(super) type Scan = Result<Ident, Miss>;

/// A built-in detector, by its PROXY_DEVICE_IDENT name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Builtin {
    Teltonika,
    Gt06,
    H02,
    Queclink,
    Coban,
    Meitrack,
}

impl Builtin {
    /// Every built-in detector, in the order they are tried.
    pub(super) const ALL: [Builtin; 6] = [
        Builtin::Teltonika,
        Builtin::Gt06,
        Builtin::H02,
        Builtin::Queclink,
        Builtin::Coban,
        Builtin::Meitrack,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Builtin::Teltonika => "teltonika",
            Builtin::Gt06 => "gt06",
            Builtin::H02 => "h02",
            Builtin::Queclink => "queclink",
            Builtin::Coban => "coban",
            Builtin::Meitrack => "meitrack",
        }
    }

    /// Reads the first bytes of a TCP stream.
    pub(super) fn scan_stream(self, bytes: &[u8]) -> Scan {
        match self {
            Builtin::Teltonika => teltonika_tcp(bytes),
            Builtin::Gt06 => gt06(bytes),
            Builtin::H02 => h02(bytes),
            Builtin::Queclink => queclink(bytes),
            Builtin::Coban => coban(bytes),
            Builtin::Meitrack => meitrack(bytes),
        }
    }

    /// Reads one whole UDP datagram: Teltonika frames it differently over
    /// UDP, the others send the same bytes as over TCP.
    pub(super) fn scan_datagram(self, bytes: &[u8]) -> Scan {
        match self {
            Builtin::Teltonika => teltonika_udp(bytes),
            other => other.scan_stream(bytes),
        }
    }
}

/// The longest IMEI a Teltonika device sends.
const TELTONIKA_MAX_DIGITS: u16 = 20;

/// Any number of `FF` (a keep-alive), a 2-byte big-endian length L in
/// 1..=20, then L ASCII digits: the IMEI packet of Codec 8/8E/16.
fn teltonika_tcp(bytes: &[u8]) -> Scan {
    let start = bytes
        .iter()
        .position(|&byte| byte != 0xFF)
        .ok_or(Miss::NeedMore)?;
    length_and_digits(bytes, start)
}

/// 2-byte length, 2-byte packet id, 1 byte, 1-byte AVL packet id, then the
/// IMEI as in TCP: a 2-byte length L in 1..=20 and L ASCII digits.
fn teltonika_udp(bytes: &[u8]) -> Scan {
    length_and_digits(bytes, 6)
}

/// A 2-byte big-endian length L (1..=20) at `at`, then L ASCII digits.
fn length_and_digits(bytes: &[u8], at: usize) -> Scan {
    let rest = bytes.get(at..).unwrap_or_default();
    let length = match rest {
        [high, low, ..] => u16::from_be_bytes([*high, *low]),
        [0] | [] => return Err(Miss::NeedMore),
        [_] => return Err(Miss::NoMatch),
    };
    if !(1..=TELTONIKA_MAX_DIGITS).contains(&length) {
        return Err(Miss::NoMatch);
    }
    let digits = &rest[2..rest.len().min(2 + usize::from(length))];
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(Miss::NoMatch);
    }
    if digits.len() < usize::from(length) {
        return Err(Miss::NeedMore);
    }
    Ident::from_bytes(digits).ok_or(Miss::NoMatch)
}

/// The GT06 login frame: start `78 78`, a length byte, protocol `01`.
const GT06_LOGIN: [u8; 2] = [0x78, 0x78];
const GT06_PROTOCOL_LOGIN: u8 = 0x01;
/// Where the 8 BCD bytes of the terminal ID start.
const GT06_ID_AT: usize = 4;
const GT06_ID_BYTES: usize = 8;

/// `78 78`, length, protocol `01`, 8 bytes of terminal ID in BCD: the ID's
/// digits without leading zeros.
fn gt06(bytes: &[u8]) -> Scan {
    after_prefix(bytes, &GT06_LOGIN, false)?;
    match bytes.get(3) {
        Some(&GT06_PROTOCOL_LOGIN) => {}
        Some(_) => return Err(Miss::NoMatch),
        None => return Err(Miss::NeedMore),
    }
    let end = bytes.len().min(GT06_ID_AT + GT06_ID_BYTES);
    let id = bytes.get(GT06_ID_AT..end).unwrap_or_default();
    if !id.iter().all(|&byte| byte >> 4 <= 9 && byte & 0x0F <= 9) {
        return Err(Miss::NoMatch);
    }
    if id.len() < GT06_ID_BYTES {
        return Err(Miss::NeedMore);
    }
    let digits: Vec<u8> = id
        .iter()
        .flat_map(|&byte| [b'0' + (byte >> 4), b'0' + (byte & 0x0F)])
        .skip_while(|&digit| digit == b'0')
        .collect();
    Ident::from_bytes(&digits).ok_or(Miss::NoMatch)
}

/// `*HQ,` or `*TH,` in any case, then the ID up to the next `,`.
fn h02(bytes: &[u8]) -> Scan {
    let at = after_any_prefix(bytes, &[b"*HQ,", b"*TH,"], true)?;
    let (id, _) = id_field(bytes, at, Ident::allows)?;
    Ok(id)
}

/// `+RESP:GT`, `+BUFF:GT` or `+ACK:GT`, the report type, `,`, then the
/// first of the next two fields that is an IMEI (15 digits) or a MEID (14
/// hexadecimal characters), as it is.
fn queclink(bytes: &[u8]) -> Scan {
    let at = after_any_prefix(bytes, &[b"+RESP:GT", b"+BUFF:GT", b"+ACK:GT"], false)?;
    let (report_type, at) = field(bytes, at)?;
    if report_type.is_empty() || !report_type.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Miss::NoMatch);
    }
    let (first, at) = field(bytes, at)?;
    if is_imei_or_meid(first) {
        return Ident::from_bytes(first).ok_or(Miss::NoMatch);
    }
    let (second, _) = field(bytes, at)?;
    if is_imei_or_meid(second) {
        return Ident::from_bytes(second).ok_or(Miss::NoMatch);
    }
    Err(Miss::NoMatch)
}

fn is_imei_or_meid(field: &[u8]) -> bool {
    let imei = field.len() == 15 && field.iter().all(u8::is_ascii_digit);
    let meid = field.len() == 14 && field.iter().all(u8::is_ascii_hexdigit);
    imei || meid
}

/// `##,imei:` (the login) or `imei:` (a TK103/GPS103 report), then digits
/// up to `,`.
fn coban(bytes: &[u8]) -> Scan {
    let at = after_any_prefix(bytes, &[b"##,imei:", b"imei:"], false)?;
    let (id, _) = id_field(bytes, at, |byte| byte.is_ascii_digit())?;
    Ok(id)
}

/// `$$`, one flag character, the length digits, `,`, the IMEI up to `,`.
fn meitrack(bytes: &[u8]) -> Scan {
    after_prefix(bytes, b"$$", false)?;
    match bytes.get(2) {
        Some(flag) if flag.is_ascii_graphic() && *flag != b',' => {}
        Some(_) => return Err(Miss::NoMatch),
        None => return Err(Miss::NeedMore),
    }
    let (_length, at) = id_field(bytes, 3, |byte| byte.is_ascii_digit())?;
    let (imei, _) = id_field(bytes, at, Ident::allows)?;
    Ok(imei)
}

/// Where `prefix` ends if `bytes` start with it; `NeedMore` if `bytes` are
/// shorter and start it.
fn after_prefix(bytes: &[u8], prefix: &[u8], any_case: bool) -> Result<usize, Miss> {
    let common = bytes.len().min(prefix.len());
    let same = if any_case {
        bytes[..common].eq_ignore_ascii_case(&prefix[..common])
    } else {
        bytes[..common] == prefix[..common]
    };
    match (same, common == prefix.len()) {
        (false, _) => Err(Miss::NoMatch),
        (true, true) => Ok(prefix.len()),
        (true, false) => Err(Miss::NeedMore),
    }
}

/// [`after_prefix`] for the first of `prefixes` that fits.
fn after_any_prefix(bytes: &[u8], prefixes: &[&[u8]], any_case: bool) -> Result<usize, Miss> {
    let mut miss = Miss::NoMatch;
    for prefix in prefixes {
        match after_prefix(bytes, prefix, any_case) {
            Ok(at) => return Ok(at),
            Err(Miss::NeedMore) => miss = Miss::NeedMore,
            Err(Miss::NoMatch) => {}
        }
    }
    Err(miss)
}

/// The bytes from `at` up to the next `,` and where the next field starts;
/// a field longer than any ident is `NoMatch`.
fn field(bytes: &[u8], at: usize) -> Result<(&[u8], usize), Miss> {
    let rest = bytes.get(at..).unwrap_or_default();
    let searched = &rest[..rest.len().min(Ident::MAX_LEN + 1)];
    match searched.iter().position(|&byte| byte == b',') {
        Some(comma) => Ok((&rest[..comma], at + comma + 1)),
        None if searched.len() > Ident::MAX_LEN => Err(Miss::NoMatch),
        None => Err(Miss::NeedMore),
    }
}

/// An ident field from `at` up to the next `,`, every byte `allowed`; a
/// byte that is not is `NoMatch` at once.
fn id_field(bytes: &[u8], at: usize, allowed: fn(u8) -> bool) -> Result<(Ident, usize), Miss> {
    let rest = bytes.get(at..).unwrap_or_default();
    let searched = &rest[..rest.len().min(Ident::MAX_LEN + 1)];
    for (index, &byte) in searched.iter().enumerate() {
        if byte == b',' {
            let id = Ident::from_bytes(&rest[..index]).ok_or(Miss::NoMatch)?;
            return Ok((id, at + index + 1));
        }
        if !allowed(byte) || index == Ident::MAX_LEN {
            return Err(Miss::NoMatch);
        }
    }
    Err(Miss::NeedMore)
}

#[cfg(test)]
mod tests;
