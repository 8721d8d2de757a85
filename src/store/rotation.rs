//! The names of message files, which rotated files to keep, and the rename
//! that never replaces one.
//!
//! The current file is `messages.jsonl`; a rotated one is
//! `messages-YYYYMMDDTHHMMSSZ.jsonl` (UTC), or `..Z_001.jsonl`, `..Z_002.jsonl`
//! when several fall in one second, so that plain name order is age order.
//! Only names of exactly this shape are ours: retention never touches any
//! other file in the folder.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;

pub const CURRENT: &str = "messages.jsonl";
const PREFIX: &str = "messages-";
const SUFFIX: &str = ".jsonl";
const STAMP_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// A rotated file found in the data folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotatedFile {
    pub path: PathBuf,
    /// When it was rotated (to the second), from its name.
    pub rotated_at: SystemTime,
    pub counter: u32,
}

/// `messages-20261126T101500Z.jsonl`, or with `_NNN` for a counter above 0.
pub fn rotated_name(rotated_at: SystemTime, counter: u32) -> String {
    let stamp = Timestamp::try_from(rotated_at)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .strftime(STAMP_FORMAT);
    match counter {
        0 => format!("{PREFIX}{stamp}{SUFFIX}"),
        n => format!("{PREFIX}{stamp}_{n:03}{SUFFIX}"),
    }
}

/// The time and counter of a name made by [`rotated_name`].
pub fn parse_rotated_name(name: &str) -> Option<(SystemTime, u32)> {
    let middle = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    let (stamp, counter) = match middle.split_once('_') {
        Some((stamp, counter)) if counter.len() >= 3 => (stamp, counter.parse().ok()?),
        Some(_) => return None,
        None => (middle, 0),
    };
    if stamp.len() != 16 {
        return None;
    }
    let civil = DateTime::strptime(STAMP_FORMAT, stamp).ok()?;
    let time = TimeZone::UTC.to_timestamp(civil).ok()?;
    let seconds = u64::try_from(time.as_second()).ok()?;
    Some((
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
        counter,
    ))
}

/// Our rotated files in `dir`, oldest first.
pub fn rotated_files(dir: &Path) -> io::Result<Vec<RotatedFile>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some((rotated_at, counter)) = name.to_str().and_then(parse_rotated_name) else {
            continue;
        };
        files.push(RotatedFile {
            path: entry.path(),
            rotated_at,
            counter,
        });
    }
    files.sort_by_key(|f| (f.rotated_at, f.counter));
    Ok(files)
}

/// Counters have three digits, so that names sort by age: a thousand
/// rotations within one second use up that second's names.
const LAST_COUNTER: u32 = 999;

/// The name for a file rotated now: a counter one past the highest of
/// this second's names still in `dir`, so that a name freed by retention
/// is never reused out of order. None once the second's names are used up
/// (rotation then waits for the next second). An error if `dir` cannot be
/// listed (say, out of descriptors): the counter is unknown then.
pub fn next_rotated_path(dir: &Path, now: SystemTime) -> io::Result<Option<PathBuf>> {
    let second = parse_rotated_name(&rotated_name(now, 0)).map(|(time, _)| time);
    let highest = rotated_files(dir)?
        .into_iter()
        .filter(|file| Some(file.rotated_at) == second)
        .map(|file| file.counter)
        .max();
    let counter = highest.map_or(0, |c| c.saturating_add(1));
    Ok((counter <= LAST_COUNTER).then(|| dir.join(rotated_name(now, counter))))
}

/// Renames `from` to `to` unless `to` exists (an AlreadyExists error then).
/// Checked just before the rename: the writer is the only one to make
/// rotated names in its (locked) folder.
pub fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    match fs::symlink_metadata(to) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", to.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(from, to),
        Err(e) => Err(e),
    }
}

/// The rotated files to delete: beyond the newest `keep` ones, or rotated
/// more than `max_age` before `now`; `None` is no limit of that kind (a
/// file is never deleted for it). Oldest first.
pub fn expired(
    files: &[RotatedFile],
    keep: Option<usize>,
    max_age: Option<Duration>,
    now: SystemTime,
) -> Vec<PathBuf> {
    let surplus = keep.map_or(0, |keep| files.len().saturating_sub(keep));
    files
        .iter()
        .enumerate()
        .filter(|(index, file)| {
            let age = now.duration_since(file.rotated_at).unwrap_or_default();
            *index < surplus || max_age.is_some_and(|max_age| age > max_age)
        })
        .map(|(_, file)| file.path.clone())
        .collect()
}

/// Why the current file is to be rotated now, if it is: it reached
/// `rotate_size`, or it holds something and is `rotate_interval` old
/// (`None`: never for its age). An empty file is never rotated.
pub fn rotation_due(
    size: u64,
    age: Duration,
    rotate_size: u64,
    rotate_interval: Option<Duration>,
) -> Option<&'static str> {
    if size == 0 {
        None
    } else if size >= rotate_size {
        Some("size")
    } else if rotate_interval.is_some_and(|interval| age >= interval) {
        Some("interval")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn names_carry_utc_time_and_sort_by_age() {
        let t = at(1_795_000_000);
        assert_eq!(rotated_name(t, 0), "messages-20261118T110640Z.jsonl");
        let mut names = vec![
            rotated_name(at(1_795_000_001), 0),
            rotated_name(t, 2),
            rotated_name(t, 1),
            rotated_name(t, 0),
        ];
        let in_age_order = names.clone();
        names.sort();
        assert_eq!(names, in_age_order.into_iter().rev().collect::<Vec<_>>());
    }

    #[test]
    fn names_parse_back_and_foreign_names_do_not() {
        let t = at(1_795_000_000);
        assert_eq!(parse_rotated_name(&rotated_name(t, 0)), Some((t, 0)));
        assert_eq!(parse_rotated_name(&rotated_name(t, 12)), Some((t, 12)));
        for foreign in [
            "messages.jsonl",
            "messages-backup.jsonl",
            "messages-20261118T110640Z.jsonl.gz",
            "messages-20261118T110640Z_1.jsonl",
            "notes.txt",
        ] {
            assert_eq!(parse_rotated_name(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn a_name_freed_by_retention_in_the_same_second_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let now = at(1_795_000_000);
        for counter in [1, 2] {
            std::fs::File::create(dir.path().join(rotated_name(now, counter))).unwrap();
        }
        // Counter 0 was deleted by retention; the next must still sort last.
        assert_eq!(
            next_rotated_path(dir.path(), now).unwrap(),
            Some(dir.path().join(rotated_name(now, 3)))
        );
        let later = at(1_795_000_001);
        assert_eq!(
            next_rotated_path(dir.path(), later).unwrap(),
            Some(dir.path().join(rotated_name(later, 0)))
        );
    }

    #[test]
    fn a_second_has_a_thousand_names_and_they_sort_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let now = at(1_795_000_000);
        let mut names = Vec::new();
        while let Some(path) = next_rotated_path(dir.path(), now).unwrap() {
            std::fs::File::create(&path).unwrap();
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
            assert!(
                names.len() <= 1000,
                "more than a thousand names in a second"
            );
        }
        assert_eq!(names.len(), 1000);
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, names, "name order is rotation order");
        let later = at(1_795_000_001);
        assert_eq!(
            next_rotated_path(dir.path(), later).unwrap(),
            Some(dir.path().join(rotated_name(later, 0)))
        );
    }

    #[test]
    fn a_folder_that_cannot_be_listed_gives_no_name() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_folder = dir.path().join("a file");
        std::fs::File::create(&not_a_folder).unwrap();
        let now = at(1_795_000_000);
        // A name with counter 0 could replace a file rotated this second.
        for unlistable in [not_a_folder, dir.path().join("gone")] {
            let next = next_rotated_path(&unlistable, now);
            assert!(next.is_err(), "{}: {next:?}", unlistable.display());
        }
    }

    #[test]
    fn a_rename_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let (current, rotated) = (dir.path().join(CURRENT), dir.path().join("rotated"));
        std::fs::write(&current, "new").unwrap();
        std::fs::write(&rotated, "old").unwrap();
        let renamed = rename_no_replace(&current, &rotated);
        assert_eq!(
            renamed.map_err(|e| e.kind()),
            Err(io::ErrorKind::AlreadyExists)
        );
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "old");
        assert_eq!(std::fs::read_to_string(&current).unwrap(), "new");
        let free = dir.path().join("free");
        rename_no_replace(&current, &free).unwrap();
        assert_eq!(std::fs::read_to_string(&free).unwrap(), "new");
        assert!(!current.exists());
    }

    fn five_files() -> Vec<RotatedFile> {
        (0..5)
            .map(|i| RotatedFile {
                path: PathBuf::from(format!("f{i}")),
                rotated_at: at(1000 + i * 100),
                counter: 0,
            })
            .collect()
    }

    fn names(paths: &[&str]) -> Vec<PathBuf> {
        paths.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn retention_drops_the_oldest_beyond_the_count_and_the_too_old() {
        let files = five_files();
        let now = at(1500);
        assert_eq!(
            expired(&files, Some(3), Some(Duration::from_secs(10_000)), now),
            names(&["f0", "f1"])
        );
        assert_eq!(
            expired(&files, Some(10), Some(Duration::from_secs(250)), now),
            names(&["f0", "f1", "f2"])
        );
    }

    /// Issue 13: a limit of 0 is "no limit"; it never means "keep nothing".
    #[test]
    fn retention_without_a_limit_deletes_nothing_for_it() {
        let files = five_files();
        let now = at(1_000_000);
        assert!(expired(&files, None, None, now).is_empty());
        // Only the age limit: the count never deletes.
        assert_eq!(
            expired(&files, None, Some(Duration::from_secs(998_750)), now),
            names(&["f0", "f1", "f2"])
        );
        // Only the count limit: however old, the newest two stay.
        assert_eq!(
            expired(&files, Some(2), None, now),
            names(&["f0", "f1", "f2"])
        );
        assert!(expired(&[], None, None, now).is_empty());
    }

    #[test]
    fn rotation_is_due_by_size_or_interval_and_never_without_a_limit() {
        let hour = Duration::from_secs(3600);
        let day = Duration::from_secs(86_400);
        assert_eq!(rotation_due(100, day, 100, Some(hour)), Some("size"));
        assert_eq!(rotation_due(100, day, 100, None), Some("size"));
        assert_eq!(rotation_due(1, hour, 100, Some(hour)), Some("interval"));
        assert_eq!(rotation_due(1, hour, 100, None), None);
        assert_eq!(rotation_due(1, 365 * day, 100, None), None);
        assert_eq!(rotation_due(1, day - hour, 100, Some(day)), None);
        // An empty file is never rotated, whatever its age.
        assert_eq!(rotation_due(0, day, 100, Some(hour)), None);
    }
}
