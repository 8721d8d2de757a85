//! [`Ident`]: a device's own identifier, and the one rule that says which
//! text can be one.
//!
//! Invariant: an `Ident` holds 1 to [`Ident::MAX_LEN`] bytes, each a
//! printable ASCII character other than space, `"`, `\` and `#`. So it
//! needs no escaping in JSON, stays on one log line, and can be written
//! in a device list file (where `#` starts a comment) exactly as it is.
//! Whatever a detector or the user regex reads that breaks the rule is no
//! match: nothing is truncated or escaped into an ident.

use std::borrow::Borrow;
use std::fmt;

/// A device ident (an IMEI, a serial, ...), checked; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(Box<str>);

impl Ident {
    /// The longest ident, in bytes.
    pub const MAX_LEN: usize = 64;

    /// `text` as an ident, or `None` if it breaks the rule.
    pub fn new(text: &str) -> Option<Ident> {
        Ident::from_bytes(text.as_bytes())
    }

    /// `bytes` as an ident, or `None` if they break the rule.
    pub fn from_bytes(bytes: &[u8]) -> Option<Ident> {
        if bytes.is_empty() || bytes.len() > Ident::MAX_LEN {
            return None;
        }
        if !bytes.iter().all(|&byte| Ident::allows(byte)) {
            return None;
        }
        // Every byte is ASCII, so this cannot fail.
        let text = std::str::from_utf8(bytes).ok()?;
        Some(Ident(text.into()))
    }

    /// Whether `byte` may appear in an ident.
    pub fn allows(byte: u8) -> bool {
        byte.is_ascii_graphic() && !matches!(byte, b'"' | b'\\' | b'#')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Ident {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Lets a `HashSet<Ident>` be asked about a `&str`.
impl Borrow<str> for Ident {
    fn borrow(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imeis_serials_and_meids_are_idents() {
        for text in ["359586015829802", "A1000012345678", "SN-42_x.7:b", "1"] {
            assert_eq!(Ident::new(text).map(|i| i.to_string()), Some(text.into()));
        }
    }

    #[test]
    fn text_that_needs_escaping_or_spans_words_is_not_an_ident() {
        for text in [
            "", "a b", "a\"b", "a\\b", "a#b", "a\nb", "a\tb", "é", "a\u{7f}",
        ] {
            assert_eq!(Ident::new(text), None, "{text:?}");
        }
    }

    #[test]
    fn an_ident_is_at_most_64_bytes() {
        assert!(Ident::new(&"7".repeat(64)).is_some());
        assert_eq!(Ident::new(&"7".repeat(65)), None);
    }
}
