//! The message files as catch-up sees them: numbered in reading order, known
//! by their inode, and read line by line from any position.
//!
//! A rotation renames `messages.jsonl` (the inode stays, the name changes),
//! so a file is known by device and inode, plus its first bytes: a file
//! created after another was deleted may get its inode. Numbers ([`FileId`])
//! are given in reading order (rotated files oldest first, then the current
//! one) and only grow: a file that appears later is newer than every file
//! already known. A [`Pos`] (file number, byte offset) therefore orders
//! lines as they were written, across rotations.
//!
//! Reading never holds more than one line at a time; a line longer than
//! [`MAX_LINE`] (no message of ours is) is skipped, not buffered.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::store::rotation::{self, CURRENT};

/// A message file's number in reading order (within this process).
pub type FileId = u32;

/// Where a line starts: ordered as the lines were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub file: FileId,
    pub offset: u64,
}

/// The longest line read: a 4 MiB packet's hex and its keys (a packet is
/// at most one read, 256 KiB in store mode).
pub const MAX_LINE: usize = 8 << 20 | 64 << 10;

/// How many first bytes of a file tell it from another with its inode (the
/// first line holds an ident and a time to the microsecond).
const HEAD: usize = 256;

/// What identifies a file across renames and restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    pub dev: u64,
    pub ino: u64,
    /// Its name when last seen (for the log and the state file's reader).
    pub name: String,
    /// Its first bytes (fewer while the file is shorter).
    pub head: Vec<u8>,
}

impl FileRef {
    /// The same file: same inode, and neither head contradicts the other.
    fn same_file(&self, other: &FileRef) -> bool {
        let shared = self.head.len().min(other.head.len());
        self.dev == other.dev
            && self.ino == other.ino
            && self.head[..shared] == other.head[..shared]
    }
}

/// The identity of the file at `path` now.
pub fn identify(path: &Path) -> io::Result<FileRef> {
    let file = File::open(path)?;
    identify_open(&file, path)
}

fn identify_open(file: &File, path: &Path) -> io::Result<FileRef> {
    let metadata = file.metadata()?;
    let mut head = vec![0; HEAD];
    let mut filled = 0;
    while filled < HEAD {
        match file.read_at(&mut head[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    head.truncate(filled);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(FileRef {
        dev: metadata.dev(),
        ino: metadata.ino(),
        name,
        head,
    })
}

/// The message files of one folder, numbered in reading order.
pub struct Files {
    dir: PathBuf,
    known: Vec<FileRef>,
}

impl Files {
    /// Numbers the files in `dir` as they are now.
    pub fn open_dir(dir: &Path) -> io::Result<Files> {
        let mut files = Files {
            dir: dir.to_path_buf(),
            known: Vec::new(),
        };
        files.refresh()?;
        Ok(files)
    }

    /// The newest file known, if any.
    pub fn last(&self) -> Option<FileId> {
        self.known.len().checked_sub(1).map(to_id)
    }

    pub fn name(&self, id: FileId) -> &str {
        self.known
            .get(id as usize)
            .map_or("(unknown file)", |f| f.name.as_str())
    }

    /// What identifies file `id`, for the state file.
    pub fn file_ref(&self, id: FileId) -> Option<&FileRef> {
        self.known.get(id as usize)
    }

    /// The number of the file `wanted` stands for, if it is still here.
    pub fn find(&self, wanted: &FileRef) -> Option<FileId> {
        self.known
            .iter()
            .rposition(|known| known.same_file(wanted))
            .map(to_id)
    }

    /// Lists the folder again: renamed files keep their number, new files
    /// get the next ones, in reading order. A file it does not know that
    /// lists before the newest one it knows (put back by hand) is not ours
    /// to read.
    pub fn refresh(&mut self) -> io::Result<()> {
        // The newest known file and where it is in the listing.
        let mut newest: Option<(FileId, usize)> = None;
        let mut unknown = Vec::new();
        for (index, path) in list(&self.dir)?.into_iter().enumerate() {
            // A file deleted between the listing and now is simply not here.
            let Ok(found) = identify(&path) else { continue };
            match self.known.iter().rposition(|k| k.same_file(&found)) {
                Some(index_known) => {
                    let id = to_id(index_known);
                    let known = &mut self.known[index_known];
                    known.name = found.name;
                    if found.head.len() > known.head.len() {
                        known.head = found.head;
                    }
                    if newest.is_none_or(|(newest_id, _)| id > newest_id) {
                        newest = Some((id, index));
                    }
                }
                None => unknown.push((index, found)),
            }
        }
        let after = newest.map(|(_, index)| index);
        for (index, found) in unknown {
            if after.is_none_or(|after| index > after) {
                self.known.push(found);
            }
        }
        Ok(())
    }

    /// Opens file `id` for reading, checking that its name still stands
    /// for it (listing again if it was renamed); NotFound once it is gone.
    pub fn open(&mut self, id: FileId) -> io::Result<File> {
        for attempt in 0..2 {
            let Some(known) = self.known.get(id as usize) else {
                return Err(io::ErrorKind::NotFound.into());
            };
            let path = self.dir.join(&known.name);
            if let Ok(file) = File::open(&path) {
                if identify_open(&file, &path).is_ok_and(|found| found.same_file(known)) {
                    return Ok(file);
                }
            }
            if attempt == 0 {
                self.refresh()?;
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is gone", self.name(id)),
        ))
    }

    /// Whether `messages.jsonl` is still file `id` (not rotated away).
    pub fn is_current(&self, id: FileId) -> bool {
        let Some(known) = self.known.get(id as usize) else {
            return false;
        };
        std::fs::metadata(self.dir.join(CURRENT))
            .is_ok_and(|m| m.dev() == known.dev && m.ino() == known.ino)
    }
}

fn to_id(index: usize) -> FileId {
    FileId::try_from(index).unwrap_or(FileId::MAX)
}

/// Our message files in `dir`, in reading order.
fn list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = rotation::rotated_files(dir)?
        .into_iter()
        .map(|f| f.path)
        .collect();
    let current = dir.join(CURRENT);
    if current.exists() {
        paths.push(current);
    }
    Ok(paths)
}
