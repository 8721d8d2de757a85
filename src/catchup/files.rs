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
    /// Whether this (found now) is the file `known` (seen before): the
    /// same inode, and its first bytes start with those seen then (a
    /// message file only grows). A file created after `known` was deleted
    /// may get its inode, but not its first line (an ident and a time).
    fn is(&self, known: &FileRef) -> bool {
        self.dev == known.dev && self.ino == known.ino && self.head.starts_with(&known.head)
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
    /// Numbers the files in `dir` as they are now (all of them exist at
    /// once, so their inodes tell them apart).
    pub fn open_dir(dir: &Path) -> io::Result<Files> {
        let mut known = Vec::new();
        for path in list(dir)? {
            // A file deleted between the listing and now is simply not here.
            if let Ok(found) = identify(&path) {
                known.push(found);
            }
        }
        Ok(Files {
            dir: dir.to_path_buf(),
            known,
        })
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

    /// The number of the file `wanted` (as seen before) stands for, if it
    /// is still here.
    pub fn find(&self, wanted: &FileRef) -> Option<FileId> {
        let rotated = wanted.name != CURRENT;
        self.known
            .iter()
            .rposition(|known| known.is(wanted) && (!rotated || known.name == wanted.name))
            .map(to_id)
    }

    /// Looks for files newer than `id`, the newest known, which the caller
    /// holds open as `held` (so no other file can have its inode): rotated
    /// files of names not known yet, then `messages.jsonl` if it is another
    /// file. They get the next numbers, in reading order. Also learns
    /// `id`'s new name if it was rotated.
    pub fn discover(&mut self, id: FileId, held: &File) -> io::Result<()> {
        if self.last() != Some(id) {
            return Ok(());
        }
        let holding = self.learn(id, held)?;
        let mut fresh = Vec::new();
        for path in list(&self.dir)? {
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            if (metadata.dev(), metadata.ino()) == holding {
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let known = name
                .as_deref()
                .is_some_and(|name| name != CURRENT && self.known.iter().any(|k| k.name == name));
            if !known {
                if let Ok(found) = identify(&path) {
                    fresh.push(found);
                }
            }
        }
        self.known.extend(fresh);
        Ok(())
    }

    /// Records the name and first bytes of file `id` as it is now, from
    /// `held`, the caller's open copy of it; its device and inode.
    pub fn learn(&mut self, id: FileId, held: &File) -> io::Result<(u64, u64)> {
        let Some(known) = self.known.get_mut(id as usize) else {
            return Err(io::ErrorKind::NotFound.into());
        };
        let now = identify_open(held, Path::new(""))?;
        if now.head.len() > known.head.len() && now.is(known) {
            known.head = now.head;
        }
        let holding = (now.dev, now.ino);
        for path in list(&self.dir)? {
            let same = std::fs::metadata(&path).is_ok_and(|m| (m.dev(), m.ino()) == holding);
            if same {
                if let Some(name) = path.file_name() {
                    known.name = name.to_string_lossy().into_owned();
                }
                break;
            }
        }
        Ok(holding)
    }

    /// Opens file `id` for reading, checking that it is the file seen then
    /// (looking for its rotated name if it was rotated since); NotFound
    /// once it is gone.
    pub fn open(&mut self, id: FileId) -> io::Result<File> {
        let gone = || io::Error::new(io::ErrorKind::NotFound, format!("file {id} is gone"));
        let Some(known) = self.known.get(id as usize) else {
            return Err(gone());
        };
        // A file newer than it exists: `messages.jsonl` is not it any more.
        let stale = known.name == CURRENT && self.last() != Some(id);
        if !stale {
            let path = self.dir.join(&known.name);
            if let Ok(file) = File::open(&path) {
                if identify_open(&file, &path).is_ok_and(|found| found.is(known)) {
                    return Ok(file);
                }
            }
        }
        // Rotated since it was seen: its inode under a rotated name.
        for path in list(&self.dir)? {
            if path.file_name().is_some_and(|n| n == CURRENT) {
                continue;
            }
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if let Ok(found) = identify_open(&file, &path) {
                if found.is(known) {
                    self.known[id as usize].name = found.name;
                    return Ok(file);
                }
            }
        }
        Err(gone())
    }

    /// Whether `messages.jsonl` is still file `id`, which the caller holds
    /// open (not rotated away).
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_rotated_file_keeps_its_number_and_new_files_come_after() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join(CURRENT);
        fs::write(&current, "{\"first\":1}\n").unwrap();
        let mut files = Files::open_dir(dir.path()).unwrap();
        assert_eq!(files.last(), Some(0));
        let first = files.file_ref(0).unwrap().clone();
        let held = files.open(0).unwrap();
        fs::rename(&current, dir.path().join("messages-20261130T000000Z.jsonl")).unwrap();
        fs::write(&current, "{\"second\":2}\n").unwrap();
        assert!(!files.is_current(0));
        files.discover(0, &held).unwrap();
        assert_eq!(files.last(), Some(1));
        assert_eq!(files.name(0), "messages-20261130T000000Z.jsonl");
        assert_eq!(files.find(&first), Some(0));
        assert!(files.is_current(1));
        assert!(files.open(0).is_ok());
    }

    #[test]
    fn a_new_file_with_a_deleted_files_inode_is_not_taken_for_it() {
        let old = FileRef {
            dev: 1,
            ino: 7,
            name: CURRENT.into(),
            head: b"{\"ident\":\"00ab\"}".to_vec(),
        };
        let reused = |head: &[u8]| FileRef {
            head: head.to_vec(),
            ..old.clone()
        };
        assert!(!reused(b"").is(&old), "a new empty file");
        assert!(
            !reused(b"{\"ident\":\"77ff\"}").is(&old),
            "a new file with content"
        );
        assert!(
            reused(b"{\"ident\":\"00ab\"}\n{\"more\"").is(&old),
            "the same file, grown"
        );
    }
}
