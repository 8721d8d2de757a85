//! Complete lines of the message files, from any position: [`Lines`] reads
//! one file, [`Tail`] follows all of them in order as they are written and
//! rotated.
//!
//! One reused buffer holds one line at most; a last line without its
//! newline waits (it is being written), and a line longer than
//! [`MAX_LINE`] is skipped (handed out empty), never held whole.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};

use log::warn;

use super::files::{FileId, Files, MAX_LINE, Pos};

/// The lines of one file from a position on.
pub struct Lines {
    reader: BufReader<File>,
    file: FileId,
    /// Where the line being read starts.
    offset: u64,
    /// Bytes of that line taken from the file so far (newline included).
    taken: u64,
    /// Its bytes, unless it is too long (then none are kept).
    buffer: Vec<u8>,
    /// The line is whole (it was handed out).
    complete: bool,
    /// The line is longer than MAX_LINE.
    skipping: bool,
}

impl Lines {
    pub fn new(file: File, id: FileId, offset: u64) -> io::Result<Lines> {
        let mut reader = BufReader::with_capacity(128 * 1024, file);
        reader.seek(SeekFrom::Start(offset))?;
        Ok(Lines {
            reader,
            file: id,
            offset,
            taken: 0,
            buffer: Vec::new(),
            complete: false,
            skipping: false,
        })
    }

    pub fn file(&self) -> FileId {
        self.file
    }

    /// The open file.
    pub fn handle(&self) -> &File {
        self.reader.get_ref()
    }

    /// Where the next line starts.
    pub fn position(&self) -> Pos {
        let offset = match self.complete {
            true => self.offset + self.taken,
            false => self.offset,
        };
        Pos {
            file: self.file,
            offset,
        }
    }

    /// Moves to `offset` of the same file (a partial line is dropped).
    pub fn seek(&mut self, offset: u64) -> io::Result<()> {
        let here = self.offset + self.taken;
        if offset != here {
            let delta = i128::from(offset) - i128::from(here);
            match i64::try_from(delta) {
                Ok(delta) => self.reader.seek_relative(delta)?,
                Err(_) => {
                    self.reader.seek(SeekFrom::Start(offset))?;
                }
            }
        }
        self.offset = offset;
        self.start_line();
        Ok(())
    }

    fn start_line(&mut self) {
        self.taken = 0;
        self.buffer.clear();
        self.complete = false;
        self.skipping = false;
    }

    /// Reads the next complete line; where it starts, or None at the end
    /// of what is written so far. [`Lines::line`] is its content.
    pub fn advance(&mut self) -> io::Result<Option<Pos>> {
        if self.complete {
            self.offset += self.taken;
            self.start_line();
        }
        loop {
            let available = match self.reader.fill_buf() {
                Ok(available) => available,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok(None);
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let take = newline.map_or(available.len(), |end| end + 1);
            if !self.skipping && self.buffer.len() + take > MAX_LINE + 1 {
                self.buffer = Vec::new();
                self.skipping = true;
            }
            if !self.skipping {
                self.buffer.extend_from_slice(&available[..take]);
            }
            self.reader.consume(take);
            self.taken += take as u64;
            if newline.is_some() {
                self.complete = true;
                return Ok(Some(Pos {
                    file: self.file,
                    offset: self.offset,
                }));
            }
        }
    }

    /// The line [`Lines::advance`] found, without its newline (empty if it
    /// was too long to keep).
    pub fn line(&self) -> &[u8] {
        match (self.complete, self.skipping) {
            (true, false) => &self.buffer[..self.buffer.len() - 1],
            _ => &[],
        }
    }

    /// Bytes of a last line that has no newline (yet).
    pub fn partial(&self) -> u64 {
        match self.complete {
            true => 0,
            false => self.taken,
        }
    }
}

/// Follows the message files in reading order from a position: to the end
/// of each file, then on to the next once a newer one exists.
pub struct Tail {
    lines: Lines,
    /// Since a newer file was seen, this one was read to its end once
    /// more (the writer finishes a file before it renames it).
    drained: bool,
}

impl Tail {
    /// Starts at `at`; an error (NotFound) if its file is gone.
    pub fn open(files: &mut Files, at: Pos) -> io::Result<Tail> {
        let file = files.open(at.file)?;
        Ok(Tail {
            lines: Lines::new(file, at.file, at.offset)?,
            drained: false,
        })
    }

    /// Where the next line starts.
    pub fn position(&self) -> Pos {
        self.lines.position()
    }

    /// The line [`Tail::advance`] found.
    pub fn line(&self) -> &[u8] {
        self.lines.line()
    }

    /// Reads the next line of any file: where it starts, or None while
    /// nothing more is written.
    pub fn advance(&mut self, files: &mut Files) -> io::Result<Option<Pos>> {
        loop {
            if let Some(pos) = self.lines.advance()? {
                return Ok(Some(pos));
            }
            let id = self.lines.file();
            if files.last().is_some_and(|last| last > id) {
                if !self.drained {
                    self.drained = true;
                    continue;
                }
                if !self.move_on(files)? {
                    return Ok(None);
                }
                continue;
            }
            if files.is_current(id) {
                return Ok(None);
            }
            // Rotated or moved away: the newer file shows once listed.
            files.discover(id, self.lines.handle())?;
            if files.last().is_none_or(|last| last <= id) {
                return Ok(None);
            }
        }
    }

    /// Opens the file after this one (skipping deleted ones); false if
    /// none can be opened yet.
    fn move_on(&mut self, files: &mut Files) -> io::Result<bool> {
        let from = self.lines.file();
        if self.lines.partial() > 0 {
            warn!(
                "catch-up: the last line of {} is cut short (a crash?); skipped",
                files.name(from)
            );
        }
        // Its rotated name, for deliveries that read it later.
        files.learn(from, self.lines.handle())?;
        let Some(last) = files.last() else {
            return Ok(false);
        };
        for next in from + 1..=last {
            match files.open(next) {
                Ok(file) => {
                    self.lines = Lines::new(file, next, 0)?;
                    self.drained = false;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => warn!(
                    "catch-up: {} was deleted before it was read (retention?): the backlog \
                     in it is lost",
                    files.name(next)
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lines_of(path: &std::path::Path, offset: u64) -> Lines {
        Lines::new(File::open(path).unwrap(), 0, offset).unwrap()
    }

    #[test]
    fn lines_come_whole_with_their_offsets_and_a_partial_tail_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.jsonl");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"one\ntwo\nthr").unwrap();
        let mut lines = lines_of(&path, 4);
        assert_eq!(lines.advance().unwrap().map(|p| p.offset), Some(4));
        assert_eq!(lines.line(), b"two");
        assert_eq!(lines.advance().unwrap(), None);
        assert_eq!(lines.partial(), 3);
        assert_eq!(lines.position().offset, 8);
        file.write_all(b"ee\n").unwrap();
        assert_eq!(lines.advance().unwrap().map(|p| p.offset), Some(8));
        assert_eq!(lines.line(), b"three");
        assert_eq!(lines.position().offset, 14);
        lines.seek(0).unwrap();
        assert_eq!(lines.advance().unwrap().map(|p| p.offset), Some(0));
        assert_eq!(lines.line(), b"one");
    }

    #[test]
    fn an_overlong_line_is_skipped_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.jsonl");
        let mut bytes = vec![b'x'; MAX_LINE + 10];
        bytes.extend_from_slice(b"\nnext\n");
        std::fs::write(&path, &bytes).unwrap();
        let mut lines = lines_of(&path, 0);
        assert_eq!(lines.advance().unwrap().map(|p| p.offset), Some(0));
        assert!(lines.line().is_empty(), "an over-long line is not kept");
        let next = lines.advance().unwrap().unwrap();
        assert_eq!(next.offset as usize, MAX_LINE + 11);
        assert_eq!(lines.line(), b"next");
    }
}
