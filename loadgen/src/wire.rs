//! What loadgen's devices send and its targets check, byte for byte.
//!
//! Every device connection starts with a 16-byte [`header`]: a magic, the
//! [`Mode`] and the connection's id. After it comes either a stream or
//! packets, both fully determined by the id, so a target can check every
//! byte without being told what was sent:
//! - a stream is the id's [`Pattern`] repeated: a block of [`PERIOD`]
//!   pseudo-random bytes (a length that is no power of two, so a lost or
//!   doubled read shows as a mismatch);
//! - a packet is [`PACKET_LEN`] bytes: sequence number, send time
//!   ([`now_ns`]) and filler derived from (id, sequence).

use std::sync::OnceLock;
use std::time::Instant;

pub const HEADER_LEN: usize = 16;
const MAGIC: &[u8; 4] = b"PCLG";

/// Size of one request, reply or tracker packet.
pub const PACKET_LEN: usize = 100;

/// Length of a stream's repeating block (256 KiB - 5).
pub const PERIOD: usize = 262_139;

/// What a connection carries after its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The id's pattern, as fast as possible; the target replies nothing.
    Stream,
    /// Request packets; the target echoes each one back.
    Echo,
    /// Packets now and then; the target records their latency.
    Tracker,
    /// Packets as fast as possible; the target replies nothing.
    Flood,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Mode::Stream => 1,
            Mode::Echo => 2,
            Mode::Tracker => 3,
            Mode::Flood => 4,
        }
    }

    fn from_code(code: u8) -> Option<Mode> {
        [Mode::Stream, Mode::Echo, Mode::Tracker, Mode::Flood]
            .into_iter()
            .find(|mode| mode.code() == code)
    }
}

/// The first bytes of a device connection.
pub fn header(mode: Mode, id: u64) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = mode.code();
    header[8..].copy_from_slice(&id.to_le_bytes());
    header
}

pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(Mode, u64), String> {
    let mode = Mode::from_code(header[4]).filter(|_| &header[..4] == MAGIC);
    let id = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
    mode.map(|mode| (mode, id))
        .ok_or_else(|| format!("bad header {header:02x?}"))
}

/// splitmix64: a cheap, well-mixed function of a counter.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The repeating block of one stream, stored twice over so that any window
/// of up to [`PERIOD`] bytes is one contiguous slice.
pub struct Pattern {
    bytes: Box<[u8]>,
}

impl Pattern {
    pub fn new(id: u64) -> Pattern {
        let mut bytes = vec![0u8; 2 * PERIOD];
        let seed = mix(id);
        for (i, chunk) in bytes[..PERIOD].chunks_mut(8).enumerate() {
            let word = mix(seed ^ (i as u64)).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        bytes.copy_within(..PERIOD, PERIOD);
        Pattern {
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// The stream's bytes from `offset` on: `len` of them, at most PERIOD.
    pub fn at(&self, offset: u64, len: usize) -> &[u8] {
        let start = (offset % PERIOD as u64) as usize;
        &self.bytes[start..start + len.min(PERIOD)]
    }

    /// Checks that `data` is the stream at `offset`; on a mismatch, returns
    /// the stream offset of the first wrong byte.
    pub fn check(&self, offset: u64, data: &[u8]) -> Result<(), u64> {
        let mut done = 0;
        while done < data.len() {
            let here = offset + done as u64;
            let part = &data[done..data.len().min(done + PERIOD)];
            let expected = self.at(here, part.len());
            if part != expected {
                let wrong = part.iter().zip(expected).position(|(a, b)| a != b);
                return Err(here + wrong.unwrap_or(0) as u64);
            }
            done += part.len();
        }
        Ok(())
    }
}

/// Nanoseconds since this process first asked: one clock for devices and
/// targets, which live in the same process.
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Packet number `seq` of connection `id`, stamped with `sent_ns`.
pub fn packet(id: u64, seq: u64, sent_ns: u64) -> [u8; PACKET_LEN] {
    let mut packet = [0; PACKET_LEN];
    packet[..8].copy_from_slice(&seq.to_le_bytes());
    packet[8..16].copy_from_slice(&sent_ns.to_le_bytes());
    fill(id, seq, &mut packet[16..]);
    packet
}

/// Checks packet number `seq` of connection `id`; returns its send time.
pub fn check_packet(id: u64, seq: u64, packet: &[u8; PACKET_LEN]) -> Result<u64, String> {
    let got_seq = u64::from_le_bytes(packet[..8].try_into().expect("8 bytes"));
    let sent_ns = u64::from_le_bytes(packet[8..16].try_into().expect("8 bytes"));
    let mut filler = [0; PACKET_LEN - 16];
    fill(id, seq, &mut filler);
    if got_seq != seq || packet[16..] != filler {
        return Err(format!(
            "connection {id}: packet {seq} is wrong (sequence number {got_seq})"
        ));
    }
    Ok(sent_ns)
}

fn fill(id: u64, seq: u64, out: &mut [u8]) {
    let seed = mix(id) ^ seq.rotate_left(32);
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let word = mix(seed.wrapping_add(i as u64)).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_windows_agree_across_the_period() {
        let pattern = Pattern::new(7);
        let long: Vec<u8> = (0..3 * PERIOD as u64)
            .map(|i| pattern.at(i, 1)[0])
            .collect();
        assert!(pattern.check(0, &long).is_ok());
        assert!(pattern.check(5, &long[5..]).is_ok());
        assert_eq!(pattern.check(1, &long[..100]), Err(1));
    }

    #[test]
    fn packets_and_headers_round_trip() {
        let p = packet(3, 9, 1234);
        assert_eq!(check_packet(3, 9, &p), Ok(1234));
        assert!(check_packet(3, 10, &p).is_err());
        assert!(check_packet(4, 9, &p).is_err());
        assert_eq!(parse_header(&header(Mode::Echo, 42)), Ok((Mode::Echo, 42)));
    }
}
