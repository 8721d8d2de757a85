//! Reading message files back, for the viewer and replay: which files a path
//! stands for, and their complete lines one by one.
//!
//! A folder stands for its rotated files, oldest first, then the current
//! `messages.jsonl`. Lines are read through one reused buffer (never a whole
//! file in memory). A last line without its newline is held back: when
//! following a file it may still be being written; otherwise it is a line
//! cut short by a crash, and the caller reports and skips it. Text taken
//! from a file is shown through [`printable`]: a crafted file cannot move
//! the cursor or rename the terminal.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::store::rotation::{self, CURRENT};

/// A path that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}: {source}")]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl ReadError {
    pub fn new(path: &Path, source: io::Error) -> ReadError {
        ReadError {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The files `paths` stand for, in reading order.
pub fn message_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ReadError> {
    let mut files = Vec::new();
    for path in paths {
        let metadata = std::fs::metadata(path).map_err(|e| ReadError::new(path, e))?;
        if !metadata.is_dir() {
            files.push(path.clone());
            continue;
        }
        let rotated = rotation::rotated_files(path).map_err(|e| ReadError::new(path, e))?;
        files.extend(rotated.into_iter().map(|f| f.path));
        let current = path.join(CURRENT);
        if current.exists() {
            files.push(current);
        }
    }
    Ok(files)
}

/// Tells the user about a line that is skipped, on stderr.
pub fn report_skipped(tool: &str, path: &Path, number: u64, why: &str) {
    eprintln!(
        "proxy-channel {tool}: {}:{number}: skipped: {}",
        printable_report(&path.display().to_string()),
        printable_report(why)
    );
}

/// Whether a terminal would act on `c` instead of showing it: the control
/// characters (C0, DEL, C1) and the marks that reorder text on screen
/// (bidirectional controls).
pub fn is_terminal_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` as it may be printed on a terminal: every control character
/// escaped, `\xNN` below 0x80 (ESC is `\x1b`; `\n`, `\r` and `\t` by
/// name) and `\u{NN}` above, and `\` as `\\` so that no escape in a file
/// passes for one of ours. Borrowed when nothing needs it.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape_controls(text, true)
}

/// Like [`printable`] but with backslashes as they are: for our own
/// reports, which quote what they found with Rust's escapes already.
fn printable_report(text: &str) -> Cow<'_, str> {
    escape_controls(text, false)
}

fn escape_controls(text: &str, backslash: bool) -> Cow<'_, str> {
    let escaped = |c: char| (backslash && c == '\\') || is_terminal_control(c);
    if !text.chars().any(escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\\' if backslash => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if is_terminal_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// One complete line and where it was.
pub struct Line<'a> {
    /// Without its newline.
    pub bytes: &'a [u8],
    /// 1-based.
    pub number: u64,
    /// Where the line starts in the file.
    pub offset: u64,
}

/// Complete lines of one file.
pub struct LineReader {
    path: PathBuf,
    reader: BufReader<File>,
    /// Device and inode of the open file.
    identity: (u64, u64),
    buffer: Vec<u8>,
    /// The buffer holds a whole line that was handed out last time.
    buffer_done: bool,
    number: u64,
    /// Where the buffered line starts in the file.
    offset: u64,
}

impl LineReader {
    pub fn open(path: &Path) -> Result<LineReader, ReadError> {
        let file = File::open(path).map_err(|e| ReadError::new(path, e))?;
        let metadata = file.metadata().map_err(|e| ReadError::new(path, e))?;
        Ok(LineReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(256 * 1024, file),
            identity: (metadata.dev(), metadata.ino()),
            buffer: Vec::new(),
            buffer_done: false,
            number: 0,
            offset: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next complete line, or `None` at the end of what is written so
    /// far. A partial last line stays buffered and is completed by later
    /// calls if more is written.
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>, ReadError> {
        if self.buffer_done {
            self.offset += self.buffer.len() as u64;
            self.buffer.clear();
            self.buffer_done = false;
        }
        self.reader
            .read_until(b'\n', &mut self.buffer)
            .map_err(|e| ReadError::new(&self.path, e))?;
        if self.buffer.last() != Some(&b'\n') {
            return Ok(None);
        }
        self.buffer_done = true;
        self.number += 1;
        Ok(Some(Line {
            bytes: &self.buffer[..self.buffer.len() - 1],
            number: self.number,
            offset: self.offset,
        }))
    }

    /// The bytes of a last line that has no newline (yet), if any.
    pub fn partial_line(&self) -> Option<(u64, &[u8])> {
        let pending = !self.buffer_done && !self.buffer.is_empty();
        pending.then_some((self.number + 1, &self.buffer[..]))
    }

    /// Whether the path now names another file than the one open (it was
    /// rotated or replaced).
    pub fn replaced(&self) -> bool {
        identity_of(&self.path).is_some_and(|identity| identity != self.identity)
    }

    /// Device and inode of the open file.
    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }
}

/// Device and inode of the file at `path`, if there is one.
pub fn identity_of(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.dev(), metadata.ino()))
}

/// Where a rotated file stands in rotation order: its time, then counter.
pub type RotationKey = (std::time::SystemTime, u32);

/// The rotated files of `dir` that come after `seen` in rotation order
/// (all of them for `None`), oldest first.
pub fn rotated_since(
    dir: &Path,
    seen: Option<RotationKey>,
) -> Result<Vec<(RotationKey, PathBuf)>, ReadError> {
    let files = rotation::rotated_files(dir).map_err(|e| ReadError::new(dir, e))?;
    Ok(files
        .into_iter()
        .map(|file| ((file.rotated_at, file.counter), file.path))
        .filter(|(key, _)| seen.is_none_or(|seen| *key > seen))
        .collect())
}

/// The rotation key of a path named as a rotated file, if it is one.
pub fn rotation_key(path: &Path) -> Option<RotationKey> {
    rotation::parse_rotated_name(path.file_name()?.to_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_come_whole_and_a_partial_tail_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("messages.jsonl");
        let mut file = File::create(&path).unwrap();
        file.write_all(b"one\ntwo\nthr").unwrap();
        let mut reader = LineReader::open(&path).unwrap();
        assert_eq!(reader.next_line().unwrap().unwrap().bytes, b"one");
        let two = reader.next_line().unwrap().unwrap();
        assert_eq!((two.bytes, two.number, two.offset), (&b"two"[..], 2, 4));
        assert!(reader.next_line().unwrap().is_none());
        assert_eq!(reader.partial_line(), Some((3, &b"thr"[..])));
        file.write_all(b"ee\n").unwrap();
        assert_eq!(reader.next_line().unwrap().unwrap().bytes, b"three");
        assert!(reader.next_line().unwrap().is_none());
        assert_eq!(reader.partial_line(), None);
    }

    #[test]
    fn a_folder_means_rotated_files_oldest_first_then_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "messages.jsonl",
            "messages-20261126T101500Z_001.jsonl",
            "notes.txt",
            "messages-20261126T101500Z.jsonl",
            "messages-20261125T090000Z.jsonl",
        ] {
            File::create(dir.path().join(name)).unwrap();
        }
        let files = message_files(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "messages-20261125T090000Z.jsonl",
                "messages-20261126T101500Z.jsonl",
                "messages-20261126T101500Z_001.jsonl",
                "messages.jsonl"
            ]
        );
    }

    #[test]
    fn rotated_files_since_a_key_are_the_newer_ones_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "messages-20261126T101500Z_001.jsonl",
            "messages-20261125T090000Z.jsonl",
            "messages-20261126T101500Z.jsonl",
            "messages.jsonl",
            "notes.txt",
        ];
        for name in names {
            File::create(dir.path().join(name)).unwrap();
        }
        let since = |seen| {
            rotated_since(dir.path(), seen)
                .unwrap()
                .into_iter()
                .map(|(_, p)| p.file_name().unwrap().to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(since(None), [names[1], names[2], names[0]]);
        let key = rotation_key(&dir.path().join(names[2]));
        assert!(key.is_some());
        assert_eq!(since(key), [names[0]]);
        assert_eq!(since(rotation_key(&dir.path().join(names[0]))), [""; 0]);
        assert_eq!(rotation_key(Path::new("messages.jsonl")), None);
    }

    #[test]
    fn printable_text_escapes_every_control_character() {
        assert!(matches!(printable("peer [::1]:4000 é"), Cow::Borrowed(_)));
        assert_eq!(
            printable("\u{1b}]0;x\u{7}\r\n\t\u{0}\u{7f}\u{9b}2J\u{85}\u{202e}a\\x1b"),
            "\\x1b]0;x\\x07\\r\\n\\t\\x00\\x7f\\u{9b}2J\\u{85}\\u{202e}a\\\\x1b"
        );
        assert_eq!(printable_report("\"\\u{1b}\"\u{1b}"), "\"\\u{1b}\"\\x1b");
        for c in (0..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let shown = printable(&c.to_string()).into_owned();
            assert!(!shown.chars().any(|c| c.is_control()), "{c:?} -> {shown:?}");
        }
    }

    #[test]
    fn a_missing_path_is_an_error_naming_it() {
        let error = message_files(&[PathBuf::from("/nonexistent/data")]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("cannot read /nonexistent/data: ")
        );
    }
}
