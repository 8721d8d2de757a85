//! `proxy-channel view`: messages as a readable traffic log.
//!
//! Each message gets a header line (local time with milliseconds, ident,
//! peer, side, what happened) and, for data, its payload as a `hexdump -C`
//! style dump or, with `--text`, as escaped text; `--json` passes matching
//! lines through as the same JSON. No control character from a file is
//! printed as it is: header fields go through [`printable`], payloads are
//! escaped or dumped, and `--json` lines get JSON escapes for the few
//! controls JSON lets stand raw. Files are streamed line by line; a line that is
//! cut short or not ours is reported on stderr and skipped. `--follow`
//! keeps reading the current file and, when it is rotated, shows every
//! file rotated since (several rotations may fall between two looks), in
//! rotation order, before it moves on to the new current file.
//!
//! `--device D` shows whole connections: the files are read twice, first
//! to find the idents whose device was recognised as D, then to show
//! their messages (those from before the recognition too). When
//! following, a connection that is recognised as D later is shown from
//! the message that names its device on.

use std::borrow::Cow;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::tz::TimeZone;

use crate::net::side::Side;
use crate::store::message::{Event, Micros, StoredMessage};
use crate::store::rotation::CURRENT;
use crate::tools::filter::{DeviceConnections, Filter, may_name_device};
use crate::tools::reader::{
    LineReader, ReadError, RotationKey, identity_of, is_terminal_control, message_files, printable,
    report_skipped, rotated_since, rotation_key,
};

const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// How payloads are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Hex,
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ViewOptions {
    pub paths: Vec<PathBuf>,
    pub filter: Filter,
    pub format: Format,
    pub follow: bool,
    pub color: bool,
}

/// What a run saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ViewSummary {
    pub shown: u64,
    pub skipped: u64,
}

/// Shows the messages of `options.paths` on `out`.
pub fn run(options: &ViewOptions, out: &mut dyn Write) -> Result<ViewSummary, ReadError> {
    let files = message_files(&options.paths)?;
    let devices = match DeviceConnections::of(&options.filter) {
        Some(devices) => Some(find_device_connections(&files, devices)?),
        None => None,
    };
    let mut viewer = Viewer {
        options,
        printer: Printer::new(options.format, options.color),
        summary: ViewSummary::default(),
        devices,
        out,
    };
    let follow = options.follow.then(|| follow_path(&options.paths, &files));
    // The newest rotated file of the followed folder shown from the start.
    let seen = follow.as_ref().and_then(|path| {
        let dir = rotation_folder(path)?;
        let in_dir = files.iter().filter(|f| f.parent() == Some(dir));
        in_dir.filter_map(|f| rotation_key(f)).max()
    });
    let mut followed = None;
    for file in &files {
        let mut reader = LineReader::open(file)?;
        if !viewer.read_available(&mut reader)? {
            return Ok(viewer.summary);
        }
        if follow.as_ref() == Some(file) {
            // Shown up to here; the follow goes on from this point.
            followed = Some(reader);
        } else {
            viewer.report_partial(&reader);
        }
    }
    if let Some(path) = follow {
        viewer.follow(&path, followed, seen)?;
    }
    Ok(viewer.summary)
}

/// The first pass of `--device`: the connections of the device in `files`.
/// Lines that cannot be read are left to the second pass to report.
fn find_device_connections(
    files: &[PathBuf],
    mut devices: DeviceConnections,
) -> Result<DeviceConnections, ReadError> {
    for file in files {
        let mut reader = match LineReader::open(file) {
            Ok(reader) => reader,
            // Rotated away meanwhile: the second pass says so if it matters.
            Err(e) if e.source.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        while let Some(line) = reader.next_line()? {
            if !may_name_device(line.bytes) {
                continue;
            }
            if let Ok(message) = StoredMessage::parse(line.bytes) {
                devices.note(&message);
            }
        }
    }
    Ok(devices)
}

/// The folder whose rotated files the followed `path` becomes: its own
/// folder when it is a current file (`messages.jsonl`).
fn rotation_folder(path: &Path) -> Option<&Path> {
    let is_current = path.file_name().is_some_and(|name| name == CURRENT);
    is_current.then(|| path.parent()).flatten()
}

/// The file `--follow` keeps reading: the current file of the last folder
/// given, or the last file.
fn follow_path(paths: &[PathBuf], files: &[PathBuf]) -> PathBuf {
    match paths.last() {
        Some(last) if last.is_dir() => last.join(CURRENT),
        Some(last) => last.clone(),
        None => files
            .last()
            .cloned()
            .unwrap_or_else(|| PathBuf::from(CURRENT)),
    }
}

struct Viewer<'a> {
    options: &'a ViewOptions,
    printer: Printer,
    summary: ViewSummary,
    /// With `--device`: the device's connections found so far.
    devices: Option<DeviceConnections>,
    out: &'a mut dyn Write,
}

impl Viewer<'_> {
    /// Shows every complete line available; false once the output is gone
    /// (a closed pipe), which ends the run quietly.
    fn read_available(&mut self, reader: &mut LineReader) -> Result<bool, ReadError> {
        let path = reader.path().to_path_buf();
        while let Some(line) = reader.next_line()? {
            let number = line.number;
            let shown = match StoredMessage::parse(line.bytes) {
                Ok(message) if self.selects(&message) => {
                    self.printer.print(&mut *self.out, &message, line.bytes)
                }
                Ok(_) => Ok(false),
                Err(e) => {
                    self.skip(&path, number, &format!("not a message: {e}"));
                    Ok(false)
                }
            };
            match shown {
                Ok(true) => self.summary.shown += 1,
                Ok(false) => {}
                Err(PrintError::Payload(why)) => self.skip(&path, number, &why),
                Err(PrintError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    return Ok(false);
                }
                Err(PrintError::Output(e)) => return Err(ReadError::new(Path::new("<stdout>"), e)),
            }
        }
        match self.out.flush() {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(ReadError::new(Path::new("<stdout>"), e)),
        }
    }

    /// Whether the message is shown: it passes the filters and, with
    /// `--device`, its connection is one of the device's (noting the ones
    /// that name it as they come, when following).
    fn selects(&mut self, message: &StoredMessage<'_>) -> bool {
        if let Some(devices) = &mut self.devices {
            devices.note(message);
            if !devices.contains(&message.ident) {
                return false;
            }
        }
        self.options.filter.matches(message)
    }

    fn report_partial(&mut self, reader: &LineReader) {
        if let Some((number, _)) = reader.partial_line() {
            self.skip(reader.path(), number, "cut short (no end of line)");
        }
    }

    fn skip(&mut self, path: &Path, number: u64, why: &str) {
        self.summary.skipped += 1;
        report_skipped("view", path, number, why);
    }

    /// Reads `path` as it grows, and its successors after each rotation;
    /// `reader` is the file already open (and shown so far), if it was;
    /// `seen` the newest rotated file shown already.
    fn follow(
        &mut self,
        path: &Path,
        reader: Option<LineReader>,
        mut seen: Option<RotationKey>,
    ) -> Result<(), ReadError> {
        let mut reader = match reader {
            Some(reader) => reader,
            None => wait_for(path)?,
        };
        loop {
            if !self.read_available(&mut reader)? {
                return Ok(());
            }
            if reader.replaced() {
                // The writer finishes a file before renaming it: take what
                // is left, then the files rotated since, then the new
                // current file.
                if !self.read_available(&mut reader)? {
                    return Ok(());
                }
                self.report_partial(&reader);
                match self.after_rotation(path, &mut seen, reader.identity())? {
                    Some(next) => reader = next,
                    None => return Ok(()),
                }
                continue;
            }
            std::thread::sleep(FOLLOW_POLL);
        }
    }

    /// Once the followed file (`finished`, shown to its end) was rotated:
    /// shows every file rotated after `seen`, oldest first, then opens the
    /// current file. If another rotation came meanwhile, the file just
    /// opened may be a rotated one already: nothing of it was shown, so the
    /// rotated files are looked at again first. None once the output is
    /// gone.
    fn after_rotation(
        &mut self,
        path: &Path,
        seen: &mut Option<RotationKey>,
        finished: (u64, u64),
    ) -> Result<Option<LineReader>, ReadError> {
        let Some(dir) = rotation_folder(path) else {
            return wait_for(path).map(Some);
        };
        loop {
            for (key, rotated) in rotated_since(dir, *seen)? {
                *seen = Some(key);
                if identity_of(&rotated) == Some(finished) {
                    continue;
                }
                let mut reader = match LineReader::open(&rotated) {
                    Ok(reader) => reader,
                    // Deleted meanwhile (retention): nothing left to show.
                    Err(e) if e.source.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                if !self.read_available(&mut reader)? {
                    return Ok(None);
                }
                self.report_partial(&reader);
            }
            let current = wait_for(path)?;
            if rotated_since(dir, *seen)?.is_empty() {
                return Ok(Some(current));
            }
        }
    }
}

/// Opens `path`, waiting for it to appear.
fn wait_for(path: &Path) -> Result<LineReader, ReadError> {
    loop {
        match LineReader::open(path) {
            Ok(reader) => return Ok(reader),
            Err(e) if e.source.kind() == io::ErrorKind::NotFound => std::thread::sleep(FOLLOW_POLL),
            Err(e) => return Err(e),
        }
    }
}

enum PrintError {
    /// The payload of a line cannot be shown (bad hex).
    Payload(String),
    Output(io::Error),
}

impl From<io::Error> for PrintError {
    fn from(e: io::Error) -> Self {
        PrintError::Output(e)
    }
}

/// Formats messages.
struct Printer {
    format: Format,
    color: bool,
    zone: TimeZone,
    payload: Vec<u8>,
}

impl Printer {
    fn new(format: Format, color: bool) -> Printer {
        Printer {
            format,
            color,
            zone: TimeZone::system(),
            payload: Vec::new(),
        }
    }

    /// Prints one message; true when something was printed.
    fn print(
        &mut self,
        out: &mut dyn Write,
        message: &StoredMessage<'_>,
        raw: &[u8],
    ) -> Result<bool, PrintError> {
        if self.format == Format::Json {
            out.write_all(&json_without_controls(raw))?;
            out.write_all(b"\n")?;
            return Ok(true);
        }
        let has_payload = self.decode_payload(message)?;
        self.header(out, message)?;
        if has_payload {
            match self.format {
                Format::Text => write_text(out, &self.payload)?,
                _ => write_hex_dump(out, &self.payload)?,
            }
        }
        Ok(true)
    }

    fn decode_payload(&mut self, message: &StoredMessage<'_>) -> Result<bool, PrintError> {
        let Some(hex_text) = message.payload_hex.filter(|_| message.event == Event::Data) else {
            return Ok(false);
        };
        self.payload.resize(hex_text.len() / 2, 0);
        hex::decode_to_slice(hex_text, &mut self.payload)
            .map_err(|e| PrintError::Payload(format!("bad proxy.payload.hex: {e}")))?;
        Ok(true)
    }

    fn header(&self, out: &mut dyn Write, message: &StoredMessage<'_>) -> io::Result<()> {
        let time =
            jiff::Timestamp::from_microsecond((message.server_timestamp * 1e6).round() as i64)
                .map(|t| {
                    self.zone
                        .to_datetime(t)
                        .strftime("%Y-%m-%d %H:%M:%S%.3f")
                        .to_string()
                })
                .unwrap_or_else(|_| format!("{:.3}", message.server_timestamp));
        let side = side_label(message);
        let what = event_words(message);
        let (start, end) = match self.color {
            true => (color_of(message.source), "\x1b[0m"),
            false => ("", ""),
        };
        // A UDP session's peer reads `ip:port/udp`, as `ctl list` shows it.
        let transport = match &message.transport {
            // Escaped: a crafted file must not reach the terminal as is.
            Some(transport) => format!("/{}", transport.escape_debug()),
            None => String::new(),
        };
        writeln!(
            out,
            "{start}{time}  {}  {}{transport}  {side:<9}  {what}{end}",
            printable(&message.ident),
            printable(&message.peer)
        )
    }
}

/// A line that parsed as a message, for `--json`: the same JSON, with the
/// control characters JSON lets stand as they are written as escapes
/// instead. In a valid line a raw DEL, C1 or bidirectional control can only
/// be inside a string (`\u` escape), a raw CR or tab only between tokens
/// (a space).
fn json_without_controls(raw: &[u8]) -> Cow<'_, [u8]> {
    let Ok(text) = std::str::from_utf8(raw) else {
        return Cow::Owned(
            String::from_utf8_lossy(raw)
                .replace(is_terminal_control, " ")
                .into_bytes(),
        );
    };
    if !text.chars().any(is_terminal_control) {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\r' | '\t' => out.push(' '),
            c if is_terminal_control(c) => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out.into_bytes())
}

/// `device>` for the device, `<target N` for a target's replies,
/// `target N>` for a target's connection events.
fn side_label(message: &StoredMessage<'_>) -> String {
    match (message.source, message.event) {
        (Side::Device, _) => "device>".to_string(),
        (Side::Target(n), Event::Data) => format!("<target {n}"),
        (Side::Target(n), _) => format!("target {n}>"),
    }
}

fn event_words(message: &StoredMessage<'_>) -> String {
    match message.event {
        Event::Data => {
            let size = message.payload_size.unwrap_or(0);
            match message.payload_hex {
                Some(_) => format!("data {size} B"),
                None => format!("data {size} B (payload not stored)"),
            }
        }
        Event::Established => match &message.target {
            Some(target) => format!("connected to {}", printable(target)),
            None => "connected".to_string(),
        },
        Event::Dropped => format!(
            "disconnected: {} (received {} B, sent {} B)",
            printable(message.reason.as_deref().unwrap_or("no reason given")),
            message.bytes_received.unwrap_or(0),
            message.bytes_sent.unwrap_or(0)
        ),
    }
}

fn color_of(side: Side) -> &'static str {
    match side {
        Side::Device => "\x1b[36m",
        Side::Target(target) => match target.number() {
            1 => "\x1b[33m",
            2 => "\x1b[35m",
            _ => "\x1b[32m",
        },
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `hexdump -C` lines, without its closing offset line.
pub fn write_hex_dump(out: &mut dyn Write, bytes: &[u8]) -> io::Result<()> {
    let mut line = Vec::with_capacity(80);
    for (index, chunk) in bytes.chunks(16).enumerate() {
        line.clear();
        write!(line, "{:08x}  ", index * 16)?;
        for i in 0..16 {
            if i == 8 {
                line.push(b' ');
            }
            match chunk.get(i) {
                Some(&byte) => line.extend_from_slice(&[
                    HEX_DIGITS[usize::from(byte >> 4)],
                    HEX_DIGITS[usize::from(byte & 0xf)],
                    b' ',
                ]),
                None => line.extend_from_slice(b"   "),
            }
        }
        line.extend_from_slice(b" |");
        line.extend(
            chunk
                .iter()
                .map(|&b| if (0x20..0x7f).contains(&b) { b } else { b'.' }),
        );
        line.extend_from_slice(b"|\n");
        out.write_all(&line)?;
    }
    Ok(())
}

/// The payload as one line of text: printable ASCII as is, `\n`, `\r`,
/// `\t`, `\\` and `\xNN` for the rest.
pub fn write_text(out: &mut dyn Write, bytes: &[u8]) -> io::Result<()> {
    let mut text = Vec::with_capacity(bytes.len() + 8);
    for &byte in bytes {
        match byte {
            b'\n' => text.extend_from_slice(b"\\n"),
            b'\r' => text.extend_from_slice(b"\\r"),
            b'\t' => text.extend_from_slice(b"\\t"),
            b'\\' => text.extend_from_slice(b"\\\\"),
            0x20..=0x7e => text.push(byte),
            _ => text.extend_from_slice(&[
                b'\\',
                b'x',
                HEX_DIGITS[usize::from(byte >> 4)],
                HEX_DIGITS[usize::from(byte & 0xf)],
            ]),
        }
    }
    text.push(b'\n');
    out.write_all(&text)
}

/// Seconds since the epoch now, for relative `--since`/`--until`.
pub fn now() -> f64 {
    Micros::now().as_seconds()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        write_hex_dump(&mut out, bytes).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn hex_dump_lines_match_hexdump_c() {
        assert_eq!(
            dump(b"hello world\n"),
            "00000000  68 65 6c 6c 6f 20 77 6f  72 6c 64 0a              |hello world.|\n"
        );
        assert_eq!(
            dump(b"abc"),
            "00000000  61 62 63                                          |abc|\n"
        );
        let sixteen_and_two: Vec<u8> = (0x40..0x52).collect();
        assert_eq!(
            dump(&sixteen_and_two),
            "00000000  40 41 42 43 44 45 46 47  48 49 4a 4b 4c 4d 4e 4f  |@ABCDEFGHIJKLMNO|\n\
             00000010  50 51                                             |PQ|\n"
        );
    }

    #[test]
    fn json_lines_keep_their_meaning_without_raw_controls() {
        let raw = "{\"a\":\"x\u{7f}\u{9b}\\u001b\",\r\t\"b\":1}";
        let shown = json_without_controls(raw.as_bytes());
        let shown = std::str::from_utf8(&shown).unwrap();
        assert_eq!(shown, "{\"a\":\"x\\u007f\\u009b\\u001b\",  \"b\":1}");
        let before: serde_json::Value = serde_json::from_str(raw).unwrap();
        let after: serde_json::Value = serde_json::from_str(shown).unwrap();
        assert_eq!(before, after);
        let plain = b"{\"a\":1}";
        assert!(matches!(json_without_controls(plain), Cow::Borrowed(_)));
    }

    #[test]
    fn text_escapes_what_is_not_printable() {
        let mut out = Vec::new();
        write_text(&mut out, b"GET /\r\n\x00\xff\\ok\t").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /\\r\\n\\x00\\xff\\\\ok\\t\n"
        );
    }
}
