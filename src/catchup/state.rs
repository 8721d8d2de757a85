//! The state file `catchup-N.state` in the data folder: where catch-up of
//! target N stands, so that a restart neither repeats nor skips anything.
//!
//! It holds, as JSON: the scan start (reading again from there rebuilds
//! every open and waiting connection), the last completed delivery (its
//! key: where its device connection ended and started; deliveries up to it
//! are never sent again), and where runs of the daemon started after the
//! scan start (connections open there were cut by a crash). A position is
//! a file (device, inode, first bytes in hex, and its name then, for
//! people) and an offset: a rotation renames files, it does not change
//! them. Its absence means catch-up was never on for target N.
//!
//! Written atomically: a temporary file created exclusively with
//! `O_EXCL|O_NOFOLLOW` (a planted link is never followed), fsynced, then
//! renamed over the old one, and the folder fsynced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::{FileRef, Files, Pos};
use super::index::Key;

pub const VERSION: u32 = 1;
/// A state file is a few hundred bytes; anything larger is not ours.
const MAX_SIZE: u64 = 1 << 20;

/// A position as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPos {
    pub dev: u64,
    pub ino: u64,
    pub name: String,
    /// The file's first bytes, hex.
    pub head: String,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedKey {
    pub end: SavedPos,
    pub start: SavedPos,
}

/// The file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    /// The target's `proxy.target` when it was written.
    pub target: String,
    pub scan: SavedPos,
    pub done: Option<SavedKey>,
    pub boundaries: Vec<SavedPos>,
}

/// A state file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a catch-up state file: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// `catchup-N.state` in `dir`.
pub fn path(dir: &Path, number: u8) -> PathBuf {
    dir.join(format!("catchup-{number}.state"))
}

/// Reads the state file; None if there is none.
pub fn load(path: &Path) -> Result<Option<Saved>, StateError> {
    let read_error = |source| StateError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_error(e)),
    };
    let mut text = Vec::new();
    file.take(MAX_SIZE)
        .read_to_end(&mut text)
        .map_err(read_error)?;
    let saved: Saved = serde_json::from_slice(&text).map_err(|e| StateError::Invalid {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if saved.version != VERSION {
        return Err(StateError::Invalid {
            path: path.to_path_buf(),
            why: format!("version {} (expected {VERSION})", saved.version),
        });
    }
    Ok(Some(saved))
}

/// Replaces the state file with `saved`, atomically and durably.
pub fn store(path: &Path, saved: &Saved) -> io::Result<()> {
    let text = serde_json::to_vec(saved).map_err(io::Error::other)?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = create_exclusive(&temporary)?;
    let written = file
        .write_all(&text)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(e) = written {
        // Leaving the temporary file would only stop the next write.
        let _ = fs::remove_file(&temporary);
        return Err(e);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A new file, never through a link: one left by a crash (or planted) is
/// removed (the link itself, not what it points to) and the create tried
/// once more.
fn create_exclusive(path: &Path) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(path)?;
            open()
        }
        other => other,
    }
}

/// A position in `files` as stored.
pub fn save_pos(files: &Files, pos: Pos) -> Option<SavedPos> {
    let file = files.file_ref(pos.file)?;
    Some(SavedPos {
        dev: file.dev,
        ino: file.ino,
        name: file.name.clone(),
        head: hex::encode(&file.head),
        offset: pos.offset,
    })
}

pub fn save_key(files: &Files, key: Key) -> Option<SavedKey> {
    Some(SavedKey {
        end: save_pos(files, key.end)?,
        start: save_pos(files, key.start)?,
    })
}

/// A stored position in `files`, if its file is still there.
pub fn find_pos(files: &Files, saved: &SavedPos) -> Option<Pos> {
    let file = FileRef {
        dev: saved.dev,
        ino: saved.ino,
        name: saved.name.clone(),
        head: hex::decode(&saved.head).ok()?,
    };
    files.find(&file).map(|file| Pos {
        file,
        offset: saved.offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn sample() -> Saved {
        let pos = SavedPos {
            dev: 1,
            ino: 2,
            name: "messages.jsonl".into(),
            head: "7b7d".into(),
            offset: 300,
        };
        Saved {
            version: VERSION,
            target: "127.0.0.1:7001".into(),
            scan: pos.clone(),
            done: Some(SavedKey {
                end: pos.clone(),
                start: pos.clone(),
            }),
            boundaries: vec![pos],
        }
    }

    #[test]
    fn a_stored_state_loads_back_and_no_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = path(dir.path(), 2);
        assert!(load(&path).unwrap().is_none());
        store(&path, &sample()).unwrap();
        store(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn a_planted_link_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = path(dir.path(), 1);
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        symlink(&victim, dir.path().join("catchup-1.state.tmp")).unwrap();
        store(&path, &sample()).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(load(&path).unwrap(), Some(sample()));
    }

    #[test]
    fn a_foreign_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = path(dir.path(), 3);
        fs::write(&path, "not json").unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(
            error.contains("catchup-3.state is not a catch-up state file"),
            "{error}"
        );
    }
}
