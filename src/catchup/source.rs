//! The payloads of one delivery, read back from the message files in the
//! order they are sent: the login (if it is resent), the listed packets by
//! offset, then the packets found by reading from the scan point up to where
//! the device connection ended.
//!
//! Each line read is checked to be the packet expected (same ident, a
//! device data line, the same size): a file that changed or went away
//! ends the delivery as lost, never with a hole. One line and its decoded
//! payload are held at a time.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use super::files::{Files, Pos};
use super::index::{Delivery, ScanFrom, parse_ident};
use super::lines::Lines;
use super::packets::{PacketAt, PacketIter};
use crate::net::side::Side;
use crate::store::message::{Event, StoredMessage};

/// What the next step of a delivery is.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A packet's payload was appended to the buffer.
    Packet,
    /// The next packet was stored without its payload: the delivery ends
    /// before it.
    NotStored,
    /// Everything was read.
    End,
}

/// Why the payloads cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0} is gone (deleted by retention?)")]
    Gone(String),
    #[error("{file} changed under catch-up: {why}")]
    Changed { file: String, why: String },
    #[error("cannot read {file}: {source}")]
    Io { file: String, source: io::Error },
    /// The daemon is stopping (a long scan looks at the flag).
    #[error("stopped")]
    Stopped,
}

/// Lines a scan reads between two looks at the stop flag.
const LINES_PER_LOOK: u32 = 1024;

enum Stage<'a> {
    Login,
    Listed(PacketIter<'a>),
    Scan { started: bool, stored: u64 },
    Done,
}

/// Reads one delivery's payloads in order.
pub struct Source<'a> {
    delivery: &'a Delivery,
    files: &'a mut Files,
    stop: &'a AtomicBool,
    lines: Option<Lines>,
    stage: Stage<'a>,
}

impl<'a> Source<'a> {
    pub fn new(delivery: &'a Delivery, files: &'a mut Files, stop: &'a AtomicBool) -> Source<'a> {
        Source {
            delivery,
            files,
            stop,
            lines: None,
            stage: Stage::Login,
        }
    }

    /// Where the first line to read is, to check before connecting that
    /// it is still there.
    pub fn check_first(&mut self) -> Result<(), SourceError> {
        let d = self.delivery;
        let first = d
            .login
            .map(|p| p.pos)
            .or_else(|| d.listed.iter().next().map(|p| p.pos))
            .or(d.scan.map(|s| s.pos));
        match first {
            Some(pos) => self.open(pos.file).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Appends the next packet's payload to `out`.
    pub fn next(&mut self, out: &mut Vec<u8>) -> Result<Step, SourceError> {
        loop {
            let stage = std::mem::replace(&mut self.stage, Stage::Done);
            match stage {
                Stage::Login => {
                    self.stage = Stage::Listed(self.delivery.listed.iter());
                    if let Some(login) = self.delivery.login {
                        return self.expected(login, out);
                    }
                }
                Stage::Listed(mut packets) => match packets.next() {
                    Some(packet) => {
                        self.stage = Stage::Listed(packets);
                        return self.expected(packet, out);
                    }
                    None => {
                        self.stage = Stage::Scan {
                            started: false,
                            stored: 0,
                        };
                    }
                },
                Stage::Scan { started, stored } => {
                    let Some(scan) = self.delivery.scan else {
                        return Ok(Step::End);
                    };
                    return self.scan(scan, started, stored, out);
                }
                Stage::Done => return Ok(Step::End),
            }
        }
    }

    /// Reads a listed packet's line.
    fn expected(&mut self, packet: PacketAt, out: &mut Vec<u8>) -> Result<Step, SourceError> {
        let ident = self.delivery.ident;
        let lines = self.open(packet.pos.file)?;
        lines
            .seek(packet.pos.offset)
            .map_err(|e| io_error(packet.pos, e))?;
        let found = lines.advance().map_err(|e| io_error(packet.pos, e))?;
        let name = || format!("file {} offset {}", packet.pos.file, packet.pos.offset);
        if found != Some(packet.pos) {
            return Err(SourceError::Changed {
                file: name(),
                why: "the line is not there".into(),
            });
        }
        let message = StoredMessage::parse(lines.line())
            .map_err(|why| SourceError::Changed { file: name(), why })?;
        let same = parse_ident(&message.ident) == Some(ident)
            && message.source == Side::Device
            && message.event == Event::Data
            && message.payload_size == Some(packet.size);
        if !same {
            return Err(SourceError::Changed {
                file: name(),
                why: "another message is at the packet's place".into(),
            });
        }
        decode(&message, out).map_err(|why| SourceError::Changed { file: name(), why })
    }

    /// Reads on from the scan point to the next packet of the connection
    /// that target N had not been sent in full.
    fn scan(
        &mut self,
        scan: ScanFrom,
        started: bool,
        mut stored: u64,
        out: &mut Vec<u8>,
    ) -> Result<Step, SourceError> {
        let end = self.delivery.key.end;
        let (ident, delivered) = (self.delivery.ident, self.delivery.delivered);
        if !started {
            stored = scan.stored_before;
            let lines = self.open(scan.pos.file)?;
            lines
                .seek(scan.pos.offset)
                .map_err(|e| io_error(scan.pos, e))?;
        }
        let mut read = 0u32;
        loop {
            read = read.wrapping_add(1);
            if read % LINES_PER_LOOK == 0 && self.stop.load(Ordering::SeqCst) {
                return Err(SourceError::Stopped);
            }
            let Some(lines) = self.lines.as_mut() else {
                return Ok(Step::End);
            };
            let here = lines.position();
            let Some(pos) = lines.advance().map_err(|e| io_error(here, e))? else {
                // The end of a file before the connection's end: the next.
                if here.file >= end.file {
                    return Ok(Step::End);
                }
                self.open(here.file + 1)?
                    .seek(0)
                    .map_err(|e| io_error(here, e))?;
                continue;
            };
            if pos >= end {
                return Ok(Step::End);
            }
            let Ok(message) = StoredMessage::parse(lines.line()) else {
                continue;
            };
            let ours = parse_ident(&message.ident) == Some(ident)
                && message.source == Side::Device
                && message.event == Event::Data
                && !message.catchup
                && message.transport.is_none();
            if !ours {
                continue;
            }
            stored += message.payload_size.unwrap_or(0);
            if stored <= delivered {
                continue;
            }
            self.stage = Stage::Scan {
                started: true,
                stored,
            };
            let name = format!("file {} offset {}", pos.file, pos.offset);
            return decode(&message, out).map_err(|why| SourceError::Changed { file: name, why });
        }
    }

    /// The reader of file `id`, opened if it is not the one open.
    fn open(&mut self, id: u32) -> Result<&mut Lines, SourceError> {
        if self.lines.as_ref().is_none_or(|l| l.file() != id) {
            let name = self.files.name(id).to_string();
            let file = self.files.open(id).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => SourceError::Gone(name.clone()),
                _ => SourceError::Io {
                    file: name.clone(),
                    source: e,
                },
            })?;
            let lines =
                Lines::new(file, id, 0).map_err(|source| SourceError::Io { file: name, source })?;
            self.lines = Some(lines);
        }
        match self.lines.as_mut() {
            Some(lines) => Ok(lines),
            None => Err(SourceError::Gone(format!("file {id}"))),
        }
    }
}

/// The payload of a data line, appended to `out`; NotStored without hex.
fn decode(message: &StoredMessage<'_>, out: &mut Vec<u8>) -> Result<Step, String> {
    let Some(hex) = message.payload_hex else {
        return Ok(Step::NotStored);
    };
    if hex.len() % 2 != 0 {
        return Err("a payload of an odd number of hex digits".into());
    }
    let start = out.len();
    out.resize(start + hex.len() / 2, 0);
    if faster_hex::hex_decode(hex.as_bytes(), &mut out[start..]).is_err() {
        out.truncate(start);
        return Err("a payload that is not hex".into());
    }
    Ok(Step::Packet)
}

fn io_error(pos: Pos, source: io::Error) -> SourceError {
    SourceError::Io {
        file: format!("file {}", pos.file),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catchup::files::Files;
    use crate::catchup::index::tests::{data, dropped, line};
    use crate::catchup::index::{Index, RECENT};
    use crate::catchup::lines::Tail;
    use crate::catchup::target::HeaderRule;
    use crate::config::SendProxyProtocol;
    use crate::store::message::Message;

    fn write(path: &std::path::Path, lines: &[Vec<u8>]) {
        let mut bytes = Vec::new();
        for line in lines {
            bytes.extend_from_slice(line);
            bytes.push(b'\n');
        }
        std::fs::write(path, bytes).unwrap();
    }

    /// Indexes the folder and returns the bytes of its first delivery, and
    /// how it ended.
    fn deliver_first(dir: &std::path::Path) -> (Vec<u8>, Step) {
        let mut files = Files::open_dir(dir).unwrap();
        let header = HeaderRule::new(SendProxyProtocol::Off, Vec::new());
        let mut index = Index::new(1, "127.0.0.1:7001".into(), header, None, Vec::new());
        let mut tail = Tail::open(&mut files, Pos { file: 0, offset: 0 }).unwrap();
        while let Some(pos) = tail.advance(&mut files).unwrap() {
            index.line(pos, tail.line());
        }
        let delivery = index.next_delivery().expect("a delivery").clone();
        let stop = AtomicBool::new(false);
        let mut source = Source::new(&delivery, &mut files, &stop);
        source.check_first().unwrap();
        let mut bytes = Vec::new();
        loop {
            match source.next(&mut bytes).unwrap() {
                Step::Packet => {}
                end => return (bytes, end),
            }
        }
    }

    #[test]
    fn a_delivery_reads_its_packets_back_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let other = |m: &mut Message<'_>| m.ident = crate::store::message::Ident(9);
        write(
            &dir.path().join("messages-20260101T000000Z.jsonl"),
            &[
                line(7, 0, 1, |_| {}),
                line(9, 0, 1, other),
                dropped(7, 1, "connect failed: connection refused", 0, 0),
                data(7, b"IMEI123"),
                data(9, b"not mine"),
            ],
        );
        write(
            &dir.path().join("messages.jsonl"),
            &[
                data(7, b"-two"),
                data(7, b"-three"),
                dropped(7, 0, "closed by peer", 17, 0),
            ],
        );
        let (bytes, end) = deliver_first(dir.path());
        assert_eq!(
            (bytes.as_slice(), end),
            (&b"IMEI123-two-three"[..], Step::End)
        );
    }

    #[test]
    fn a_drop_found_by_reading_sends_the_login_then_what_was_missed() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = vec![line(7, 0, 1, |_| {}), data(7, b"LOGIN")];
        for n in 0..RECENT + 3 {
            lines.push(data(7, format!("<{n:02}>").as_bytes()));
        }
        let total = 5 + 4 * (RECENT + 3) as u64;
        // The target got the login and the first three packets, and a
        // byte of the fourth.
        lines.push(dropped(7, 1, "target buffer overflow", 0, 5 + 12 + 1));
        lines.push(dropped(7, 0, "closed by peer", total, 0));
        write(&dir.path().join("messages.jsonl"), &lines);
        let (bytes, end) = deliver_first(dir.path());
        let mut expected = b"LOGIN".to_vec();
        for n in 3..RECENT + 3 {
            expected.extend_from_slice(format!("<{n:02}>").as_bytes());
        }
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            String::from_utf8(expected).unwrap()
        );
        assert_eq!(end, Step::End);
    }

    #[test]
    fn a_packet_stored_without_its_payload_ends_the_delivery_before_it() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("messages.jsonl"),
            &[
                line(7, 0, 1, |_| {}),
                dropped(7, 1, "connect failed: connection refused", 0, 0),
                data(7, b"LOGIN"),
                line(7, 0, 0, |m| m.payload_size = Some(5000)),
                data(7, b"after"),
                dropped(7, 0, "closed by peer", 5010, 0),
            ],
        );
        let (bytes, end) = deliver_first(dir.path());
        assert_eq!((bytes.as_slice(), end), (&b"LOGIN"[..], Step::NotStored));
    }
}
