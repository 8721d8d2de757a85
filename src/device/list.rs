//! [`DeviceList`]: the devices a target accepts (PROXY_TARGETn_DEVICES).
//!
//! The file holds one device ident per line; blank lines are skipped,
//! `#` starts a comment (idents never contain `#`) and whitespace around an
//! ident is trimmed. A line that is not a valid [`Ident`] refuses the whole
//! file, naming the line: a typo must not silently drop a device.
//!
//! Lookups are one hash probe. Memory: the set of boxed idents, shrunk to
//! fit after loading. 100,000 IMEIs ask the allocator for 37 bytes each
//! (16 for the box, 15 for the digits, the rest hash table; measured by
//! `tests/device_detect_props.rs`), 54 bytes each of resident memory with
//! glibc's malloc, which gives a 15-byte string a 32-byte chunk.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use super::ident::Ident;

/// The idents of a device list file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceList {
    idents: HashSet<Ident>,
}

/// Why a device list file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceListError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{} line {line}: {text:?} is not a device ident (expected 1 to {} printable ASCII characters without spaces, \", \\ or #)",
        path.display(),
        Ident::MAX_LEN
    )]
    BadLine {
        path: PathBuf,
        /// 1-based.
        line: usize,
        text: String,
    },
}

impl DeviceList {
    /// Reads the file at `path`.
    pub fn load(path: &Path) -> Result<DeviceList, DeviceListError> {
        let bytes = std::fs::read(path).map_err(|source| DeviceListError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        DeviceList::parse(&bytes).map_err(|(line, text)| DeviceListError::BadLine {
            path: path.to_path_buf(),
            line,
            text,
        })
    }

    /// Parses the file's contents; the error is a bad line's number and text.
    fn parse(bytes: &[u8]) -> Result<DeviceList, (usize, String)> {
        let mut idents = HashSet::new();
        for (index, line) in bytes.split(|&byte| byte == b'\n').enumerate() {
            let content = match line.iter().position(|&byte| byte == b'#') {
                Some(comment) => &line[..comment],
                None => line,
            };
            let text = content.trim_ascii();
            if text.is_empty() {
                continue;
            }
            match Ident::from_bytes(text) {
                Some(ident) => idents.insert(ident),
                None => return Err((index + 1, String::from_utf8_lossy(text).into_owned())),
            };
        }
        idents.shrink_to_fit();
        Ok(DeviceList { idents })
    }

    /// Whether the device `ident` is listed.
    pub fn contains(&self, ident: &str) -> bool {
        self.idents.contains(ident)
    }

    /// How many distinct idents are listed.
    pub fn len(&self) -> usize {
        self.idents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idents.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(contents: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(contents).expect("write temp file");
        file
    }

    #[test]
    fn lists_idents_skipping_blank_lines_comments_and_whitespace() {
        let file = file_with(
            b"# wave 1\n359586015829802\n\n  862170010000000  \r\n\t865205030001234 # truck 12\n#\n",
        );
        let list = DeviceList::load(file.path()).expect("valid list");
        assert_eq!(list.len(), 3);
        for ident in ["359586015829802", "862170010000000", "865205030001234"] {
            assert!(list.contains(ident), "{ident}");
        }
        assert!(!list.contains("35958601582980"));
        assert!(!list.contains("# wave 1"));
    }

    #[test]
    fn an_empty_file_lists_nobody() {
        let file = file_with(b"");
        let list = DeviceList::load(file.path()).expect("valid list");
        assert!(list.is_empty());
        assert!(!list.contains(""));
    }

    #[test]
    fn repeated_idents_count_once() {
        let file = file_with(b"123\n123\n");
        assert_eq!(DeviceList::load(file.path()).expect("valid").len(), 1);
    }

    #[test]
    fn a_line_that_is_not_an_ident_refuses_the_file_naming_the_line() {
        let file = file_with(b"359586015829802\n3595 8601\n");
        let error = DeviceList::load(file.path()).expect_err("bad line");
        assert!(
            matches!(error, DeviceListError::BadLine { line: 2, .. }),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("line 2: \"3595 8601\" is not a device ident"),
            "{text}"
        );
    }

    #[test]
    fn a_too_long_or_binary_line_is_refused() {
        let long = format!("{}\n", "7".repeat(Ident::MAX_LEN + 1));
        assert!(DeviceList::load(file_with(long.as_bytes()).path()).is_err());
        assert!(DeviceList::load(file_with(b"\xff\xfe\n").path()).is_err());
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("devices.txt");
        let error = DeviceList::load(&path).expect_err("missing file");
        assert!(matches!(error, DeviceListError::Read { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot read {}", path.display()))
        );
    }
}
