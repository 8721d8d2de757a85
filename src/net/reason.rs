//! Why a socket ended, in the few words of `proxy.reason`.
//!
//! I/O errors are classified once, here: the ordinary ends of a TCP
//! connection (reset, refused, broken pipe) become short fixed phrases, and
//! anything else keeps the operating system's wording without its error
//! number. The fixed reasons the daemon itself decides on are constants.

use std::borrow::Cow;
use std::io;

pub type Reason = Cow<'static, str>;

pub const CLOSED_BY_PEER: &str = "closed by peer";
pub const RESET_BY_PEER: &str = "reset by peer";
pub const IDLE_TIMEOUT: &str = "idle timeout";
pub const CONNECT_TIMEOUT: &str = "connect timeout";
pub const TARGET_BUFFER_OVERFLOW: &str = "target buffer overflow";
pub const SHUTDOWN: &str = "shutdown";
pub const TOO_MANY_CONNECTIONS: &str = "too many connections";
pub const CLOSED_BY_OPERATOR: &str = "closed by operator";
/// A target closed because its device reset or failed.
pub const DEVICE_FAILED: &str = "device failed";
/// How a refused PROXY protocol header's reason starts (then `: why`).
pub const BAD_PROXY_HEADER: &str = "bad proxy protocol header";

/// The short description of an I/O error.
pub fn describe(error: &io::Error) -> Reason {
    use io::ErrorKind::*;
    match error.kind() {
        ConnectionReset | BrokenPipe => RESET_BY_PEER.into(),
        ConnectionRefused => "connection refused".into(),
        ConnectionAborted => "connection aborted".into(),
        TimedOut => "timed out".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        AddrNotAvailable => "address not available".into(),
        _ => {
            let text = error.to_string();
            let text = match text.find(" (os error") {
                Some(cut) => &text[..cut],
                None => &text,
            };
            text.to_lowercase().into()
        }
    }
}

/// `connect failed: ...` for a target that could not be reached.
pub fn connect_failed(error: &io::Error) -> Reason {
    format!("connect failed: {}", describe(error)).into()
}

/// The reason a whole connection gets when mandatory target `n` fails.
pub fn mandatory_failed(number: u8) -> Reason {
    format!("mandatory target {number} failed").into()
}

/// The reason a whole connection gets when mandatory target `n` closes.
pub fn mandatory_closed(number: u8) -> Reason {
    format!("mandatory target {number} closed").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_errors_get_short_fixed_words() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            connect_failed(&refused),
            "connect failed: connection refused"
        );
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(describe(&reset), RESET_BY_PEER);
    }

    #[test]
    fn other_errors_keep_the_system_words_without_the_number() {
        let error = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(describe(&error), "too many open files");
    }
}
