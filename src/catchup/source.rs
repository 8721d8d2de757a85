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

use super::files::{Files, Pos};
use super::index::{Delivery, ScanFrom, parse_ident};
use super::lines::Lines;
use super::packets::{PacketAt, PacketIter};
use crate::store::message::StoredMessage;

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
}

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
    lines: Option<Lines>,
    stage: Stage<'a>,
}

impl<'a> Source<'a> {
    pub fn new(delivery: &'a Delivery, files: &'a mut Files) -> Source<'a> {
        Source {
            delivery,
            files,
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
            && message.source == 0
            && message.event == 0
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
        loop {
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
                && message.source == 0
                && message.event == 0
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
