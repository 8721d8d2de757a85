//! Reading back what proxy-channel stored: every `messages*.jsonl` file in
//! its data folder, after the daemon has exited (and so fsynced).
//!
//! A full JSON parse of gigabytes of hex would take longer than the run, so
//! each line is read only as far as needed: the small fields are found
//! before `proxy.payload.hex`, and the hex is then stepped over by its
//! announced size (which also checks that it has exactly 2 x size digits).
//! Only if a writer puts the size after the hex does a line get scanned
//! whole.

use std::path::Path;

/// What the message files hold.
#[derive(Debug, Default)]
pub struct Stored {
    pub files: usize,
    pub bytes: u64,
    pub lines: u64,
    /// Data messages from devices (event 0, source 0).
    pub device_messages: u64,
    /// Sum of their `proxy.payload.size`.
    pub device_payload: u64,
    /// Data messages from targets (event 0, source >= 1).
    pub target_messages: u64,
}

pub fn scan(dir: &Path) -> Result<Stored, String> {
    let mut stored = Stored::default();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !(name.starts_with("messages") && name.ends_with(".jsonl")) {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        stored.files += 1;
        stored.bytes += bytes.len() as u64;
        scan_file(&bytes, &mut stored).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(stored)
}

fn scan_file(mut rest: &[u8], stored: &mut Stored) -> Result<(), String> {
    const HEX: &[u8] = b"\"proxy.payload.hex\":\"";
    const SIZE: &[u8] = b"\"proxy.payload.size\":";
    while !rest.is_empty() {
        // Up to the end of the line or the start of the hex, whichever is first.
        let mut head_end = 0;
        let hex = loop {
            match rest.get(head_end) {
                None => return Err(format!("{} bytes after the last newline", rest.len())),
                Some(b'\n') => break false,
                Some(b'"') if rest[head_end..].starts_with(HEX) => break true,
                Some(_) => head_end += 1,
            }
        };
        let mut size = number(&rest[..head_end], SIZE);
        let mut line_end = head_end;
        if hex {
            let digits = head_end + HEX.len();
            let tail = match size {
                Some(size) if rest.get(digits + 2 * size as usize) == Some(&b'"') => {
                    digits + 2 * size as usize
                }
                Some(size) => return Err(format!("hex is not {} digits", 2 * size)),
                None => digits,
            };
            line_end = tail + find(&rest[tail..], b"\n").ok_or("a line without its newline")?;
            size = size.or_else(|| number(&rest[tail..line_end], SIZE));
        }
        let line = &rest[..line_end];
        let (event, source) = (
            number(line, b"\"proxy.event\":"),
            number(line, b"\"proxy.source\":"),
        );
        stored.lines += 1;
        match (event, source) {
            (Some(0), Some(0)) => {
                stored.device_messages += 1;
                stored.device_payload += size.ok_or("a data message without proxy.payload.size")?;
            }
            (Some(0), Some(_)) => stored.target_messages += 1,
            (Some(_), Some(_)) => {}
            _ => {
                return Err(format!(
                    "line {} lacks proxy.event or proxy.source",
                    stored.lines
                ));
            }
        }
        rest = &rest[line_end + 1..];
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The unsigned number after `key`.
fn number(line: &[u8], key: &[u8]) -> Option<u64> {
    let start = find(line, key)? + key.len();
    let digits = line[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&line[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_device_payload_and_steps_over_hex() {
        let text = concat!(
            "{\"ident\":\"a\",\"proxy.event\":1,\"proxy.source\":0}\n",
            "{\"proxy.event\":0,\"proxy.source\":0,\"proxy.payload.size\":2,\"proxy.payload.hex\":\"0a0b\",\"t\":1}\n",
            "{\"proxy.event\":0,\"proxy.source\":1,\"proxy.payload.size\":1,\"proxy.payload.hex\":\"0a\"}\n",
        );
        let mut stored = Stored::default();
        scan_file(text.as_bytes(), &mut stored).unwrap();
        assert_eq!(stored.lines, 3);
        assert_eq!((stored.device_messages, stored.device_payload), (1, 2));
        assert_eq!(stored.target_messages, 1);
        let bad = "{\"proxy.event\":0,\"proxy.source\":0,\"proxy.payload.size\":2,\"proxy.payload.hex\":\"0a\"}\n";
        assert!(scan_file(bad.as_bytes(), &mut Stored::default()).is_err());
    }
}
