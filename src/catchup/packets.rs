//! Where a device packet's line is, and a compact list of them.
//!
//! A [`PacketList`] keeps packets in file order as variable-length
//! integers: the step from the previous packet's file, the step from its
//! offset (or the offset itself in a new file) and the size with the
//! "stored with its hex" flag. A packet of a device takes about five bytes
//! this way, against a line of a few hundred in the file.

use super::files::Pos;

/// One device data line (`proxy.event` 0, `proxy.source` 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketAt {
    pub pos: Pos,
    /// `proxy.payload.size`.
    pub size: u64,
    /// Whether the line holds `proxy.payload.hex` (false above
    /// PROXY_MAX_PAYLOAD).
    pub stored: bool,
}

/// Packets in file order, a few bytes each.
#[derive(Debug, Clone, Default)]
pub struct PacketList {
    encoded: Vec<u8>,
    count: usize,
    last: Option<Pos>,
}

impl PacketList {
    /// Appends a packet after every one already in (positions grow).
    pub fn push(&mut self, packet: PacketAt) {
        let (file_step, offset) = match self.last {
            Some(last) if last.file == packet.pos.file => {
                (0, packet.pos.offset.saturating_sub(last.offset))
            }
            Some(last) => (
                u64::from(packet.pos.file.saturating_sub(last.file)),
                packet.pos.offset,
            ),
            None => (u64::from(packet.pos.file), packet.pos.offset),
        };
        write_varint(&mut self.encoded, file_step);
        write_varint(&mut self.encoded, offset);
        write_varint(
            &mut self.encoded,
            packet.size << 1 | u64::from(packet.stored),
        );
        self.count += 1;
        self.last = Some(packet.pos);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.count
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The memory it holds.
    pub fn memory(&self) -> usize {
        self.encoded.capacity()
    }

    pub fn iter(&self) -> PacketIter<'_> {
        PacketIter {
            encoded: &self.encoded,
            last: None,
        }
    }
}

/// The packets of a [`PacketList`], in order.
pub struct PacketIter<'a> {
    encoded: &'a [u8],
    last: Option<Pos>,
}

impl Iterator for PacketIter<'_> {
    type Item = PacketAt;

    fn next(&mut self) -> Option<PacketAt> {
        let file_step = read_varint(&mut self.encoded)?;
        let offset = read_varint(&mut self.encoded)?;
        let size_flag = read_varint(&mut self.encoded)?;
        let step = u32::try_from(file_step).unwrap_or(u32::MAX);
        let pos = match self.last {
            Some(last) if step == 0 => Pos {
                file: last.file,
                offset: last.offset + offset,
            },
            Some(last) => Pos {
                file: last.file.saturating_add(step),
                offset,
            },
            None => Pos { file: step, offset },
        };
        self.last = Some(pos);
        Some(PacketAt {
            pos,
            size: size_flag >> 1,
            stored: size_flag & 1 == 1,
        })
    }
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(file: u32, offset: u64, size: u64, stored: bool) -> PacketAt {
        PacketAt {
            pos: Pos { file, offset },
            size,
            stored,
        }
    }

    #[test]
    fn packets_come_back_as_pushed_across_files() {
        let packets = [
            at(0, 0, 17, true),
            at(0, 300, 1, true),
            at(0, 1 << 40, 300_000, false),
            at(2, 5, 9, true),
            at(2, 7, u64::MAX >> 1, true),
            at(7, 0, 0, false),
        ];
        let mut list = PacketList::default();
        for packet in packets {
            list.push(packet);
        }
        assert_eq!(list.len(), packets.len());
        assert_eq!(list.iter().collect::<Vec<_>>(), packets);
    }

    #[test]
    fn a_small_packet_takes_a_few_bytes() {
        let mut list = PacketList::default();
        for n in 0..1000 {
            list.push(at(3, 1_000_000 + n * 400, 100, true));
        }
        assert!(list.encoded.len() <= 1000 * 5 + 8, "{}", list.encoded.len());
    }
}
