//! Why a side of a connection ended: the few words of `proxy.reason`, the
//! drop kind counted in the stats, and how loud the log says it.
//!
//! I/O errors are classified once, here ([`IoFailure::of`]): the ordinary
//! ends of a TCP connection (reset, refused, broken pipe) become short fixed
//! phrases, and anything else keeps the operating system's wording without
//! its error number. Every wording is fixed by the SPEC and checked by
//! tests: a [`Reason`] prints exactly the text a message carries.

use std::borrow::Cow;
use std::fmt;
use std::io;

use crate::control::stats::DropKind;
use crate::net::side::TargetId;

/// An I/O error, in the words of a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoFailure {
    /// A reset, or a broken pipe (how Linux reports a reset after a FIN).
    ResetByPeer,
    Refused,
    Aborted,
    TimedOut,
    HostUnreachable,
    NetworkUnreachable,
    AddressNotAvailable,
    /// Anything else: the system's words, lowercase, without the number.
    Other(Box<str>),
}

impl IoFailure {
    /// The failure an I/O error stands for.
    pub fn of(error: &io::Error) -> IoFailure {
        use io::ErrorKind::*;
        match error.kind() {
            ConnectionReset | BrokenPipe => IoFailure::ResetByPeer,
            ConnectionRefused => IoFailure::Refused,
            ConnectionAborted => IoFailure::Aborted,
            TimedOut => IoFailure::TimedOut,
            HostUnreachable => IoFailure::HostUnreachable,
            NetworkUnreachable => IoFailure::NetworkUnreachable,
            AddrNotAvailable => IoFailure::AddressNotAvailable,
            _ => {
                let text = error.to_string();
                let text = match text.find(" (os error") {
                    Some(cut) => &text[..cut],
                    None => &text,
                };
                IoFailure::Other(text.to_lowercase().into())
            }
        }
    }

    /// Its words: fixed ones borrowed, the system's own copied.
    fn words(&self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            IoFailure::ResetByPeer => "reset by peer",
            IoFailure::Refused => "connection refused",
            IoFailure::Aborted => "connection aborted",
            IoFailure::TimedOut => "timed out",
            IoFailure::HostUnreachable => "host unreachable",
            IoFailure::NetworkUnreachable => "network unreachable",
            IoFailure::AddressNotAvailable => "address not available",
            IoFailure::Other(text) => return Cow::Owned(text.to_string()),
        })
    }

    fn severity(&self) -> Severity {
        match self {
            IoFailure::ResetByPeer | IoFailure::Refused | IoFailure::Aborted => Severity::Expected,
            IoFailure::TimedOut
            | IoFailure::HostUnreachable
            | IoFailure::NetworkUnreachable
            | IoFailure::AddressNotAvailable => Severity::Unreachable,
            IoFailure::Other(_) => Severity::Unexpected,
        }
    }
}

/// Why a side was dropped. Its [`Display`](fmt::Display) is its
/// `proxy.reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The peer ended its stream (and, for the device, everything after
    /// it went well).
    ClosedByPeer,
    /// A read or write failed.
    Io(IoFailure),
    IdleTimeout,
    /// A target's connect failed: `connect failed: ...`.
    ConnectFailed(IoFailure),
    /// A target's host name has no address: `connect failed: cannot
    /// resolve host:port`.
    Unresolved(Box<str>),
    ConnectTimeout,
    /// The connection's reason when a mandatory target failed.
    MandatoryFailed(TargetId),
    /// The connection's reason when a mandatory target closed before the
    /// device finished.
    MandatoryClosed(TargetId),
    TargetBufferOverflow,
    Shutdown,
    TooManyConnections,
    ClosedByOperator,
    /// A target's reason when its device reset or failed.
    DeviceFailed,
    /// A refused PROXY protocol header: `bad proxy protocol header: why`.
    BadProxyHeader(Box<str>),
    /// A target that is only for the devices of its list.
    DeviceNotListed,
    /// A device's older connection, closed for its newer one.
    Replaced,
    /// A catch-up delivery that delivered everything.
    CaughtUp,
    /// A catch-up delivery that stopped before a packet stored without
    /// its payload.
    PayloadNotStored,
}

/// How much a reason is worth telling the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// An ordinary end: devices and targets close, reset, go quiet.
    Expected,
    /// A peer that cannot be reached, answers too late, or cannot keep
    /// up: worth a warning when it is a target.
    Unreachable,
    /// Something that should not happen (the system's own words).
    Unexpected,
}

impl Reason {
    /// The reason for a failed read or write.
    pub fn io(error: &io::Error) -> Reason {
        Reason::Io(IoFailure::of(error))
    }

    /// The reason for a failed connect. The kernel's own connect timeout
    /// (its SYN retries, about two minutes) is a `connect timeout` too,
    /// as the daemon's PROXY_CONNECT_TIMEOUT is.
    pub fn connect_failed(error: &io::Error) -> Reason {
        match IoFailure::of(error) {
            IoFailure::TimedOut => Reason::ConnectTimeout,
            failure => Reason::ConnectFailed(failure),
        }
    }

    /// The text of `proxy.reason`, borrowed for every fixed wording (no
    /// allocation for the common ends).
    pub fn text(&self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            Reason::ClosedByPeer => "closed by peer",
            Reason::Io(failure) => return failure.words(),
            Reason::IdleTimeout => "idle timeout",
            Reason::ConnectTimeout => "connect timeout",
            Reason::TargetBufferOverflow => "target buffer overflow",
            Reason::Shutdown => "shutdown",
            Reason::TooManyConnections => "too many connections",
            Reason::ClosedByOperator => "closed by operator",
            Reason::DeviceFailed => "device failed",
            Reason::DeviceNotListed => "device not listed",
            Reason::Replaced => "replaced by a newer connection",
            Reason::CaughtUp => "caught up",
            Reason::PayloadNotStored => "payload not stored",
            Reason::ConnectFailed(failure) => {
                return format!("connect failed: {}", failure.words()).into();
            }
            Reason::Unresolved(address) => {
                return format!("connect failed: cannot resolve {address}").into();
            }
            Reason::MandatoryFailed(target) => {
                return format!("mandatory target {target} failed").into();
            }
            Reason::MandatoryClosed(target) => {
                return format!("mandatory target {target} closed").into();
            }
            Reason::BadProxyHeader(why) => {
                return format!("bad proxy protocol header: {why}").into();
            }
        })
    }

    /// How it is counted in `ctl stats` and the metrics.
    pub fn kind(&self) -> DropKind {
        match self {
            Reason::ClosedByPeer => DropKind::ClosedByPeer,
            Reason::Io(IoFailure::ResetByPeer) => DropKind::ResetByPeer,
            Reason::Io(_) => DropKind::Other,
            Reason::IdleTimeout => DropKind::IdleTimeout,
            Reason::ConnectFailed(_) | Reason::Unresolved(_) => DropKind::ConnectFailed,
            Reason::ConnectTimeout => DropKind::ConnectTimeout,
            Reason::MandatoryFailed(_) | Reason::MandatoryClosed(_) => DropKind::MandatoryTarget,
            Reason::TargetBufferOverflow => DropKind::BufferOverflow,
            Reason::Shutdown => DropKind::Shutdown,
            Reason::TooManyConnections => DropKind::TooManyConnections,
            Reason::ClosedByOperator => DropKind::ClosedByOperator,
            Reason::DeviceFailed => DropKind::DeviceFailed,
            Reason::BadProxyHeader(_) => DropKind::BadProxyHeader,
            Reason::DeviceNotListed => DropKind::DeviceNotListed,
            Reason::Replaced => DropKind::Replaced,
            // Catch-up's ends are counted by catch-up itself.
            Reason::CaughtUp | Reason::PayloadNotStored => DropKind::Other,
        }
    }

    /// Whether it is an ordinary end, a peer out of reach, or a surprise.
    pub fn severity(&self) -> Severity {
        match self {
            Reason::Io(failure) => failure.severity(),
            // A target that refuses or resets a connect is out of reach too.
            Reason::ConnectFailed(IoFailure::Other(_)) => Severity::Unexpected,
            Reason::ConnectFailed(_) => Severity::Unreachable,
            Reason::Unresolved(_) | Reason::ConnectTimeout | Reason::TargetBufferOverflow => {
                Severity::Unreachable
            }
            Reason::ClosedByPeer
            | Reason::IdleTimeout
            | Reason::MandatoryFailed(_)
            | Reason::MandatoryClosed(_)
            | Reason::Shutdown
            | Reason::TooManyConnections
            | Reason::ClosedByOperator
            | Reason::DeviceFailed
            | Reason::BadProxyHeader(_)
            | Reason::DeviceNotListed
            | Reason::Replaced
            | Reason::CaughtUp
            | Reason::PayloadNotStored => Severity::Expected,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(number: u8) -> TargetId {
        TargetId::from_number(number).unwrap()
    }

    #[test]
    fn ordinary_errors_get_short_fixed_words() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            Reason::connect_failed(&refused).to_string(),
            "connect failed: connection refused"
        );
        let kernel_timeout = io::Error::from_raw_os_error(libc::ETIMEDOUT);
        assert_eq!(
            Reason::connect_failed(&kernel_timeout).to_string(),
            "connect timeout"
        );
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(Reason::io(&reset).to_string(), "reset by peer");
        let broken = io::Error::from_raw_os_error(libc::EPIPE);
        assert_eq!(Reason::io(&broken), Reason::Io(IoFailure::ResetByPeer));
    }

    #[test]
    fn other_errors_keep_the_system_words_without_the_number() {
        let error = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(Reason::io(&error).to_string(), "too many open files");
        assert_eq!(Reason::io(&error).severity(), Severity::Unexpected);
    }

    /// Every wording, byte for byte, with its drop kind and severity.
    #[rustfmt::skip]
    #[test]
    fn each_reason_has_its_words_kind_and_severity() {
        use DropKind as K;
        use Severity::*;
        let table: Vec<(Reason, &str, DropKind, Severity)> = vec![
            (Reason::ClosedByPeer, "closed by peer", K::ClosedByPeer, Expected),
            (Reason::Io(IoFailure::ResetByPeer), "reset by peer", K::ResetByPeer, Expected),
            (Reason::Io(IoFailure::Aborted), "connection aborted", K::Other, Expected),
            (Reason::Io(IoFailure::TimedOut), "timed out", K::Other, Unreachable),
            (Reason::Io(IoFailure::HostUnreachable), "host unreachable", K::Other, Unreachable),
            (Reason::Io(IoFailure::NetworkUnreachable), "network unreachable", K::Other, Unreachable),
            (Reason::Io(IoFailure::AddressNotAvailable), "address not available", K::Other, Unreachable),
            (Reason::Io(IoFailure::Other("no route to host".into())), "no route to host", K::Other, Unexpected),
            (Reason::IdleTimeout, "idle timeout", K::IdleTimeout, Expected),
            (Reason::ConnectFailed(IoFailure::Refused), "connect failed: connection refused", K::ConnectFailed, Unreachable),
            (Reason::ConnectFailed(IoFailure::Other("too many open files".into())), "connect failed: too many open files", K::ConnectFailed, Unexpected),
            (Reason::Unresolved("gps.example.com:21000".into()), "connect failed: cannot resolve gps.example.com:21000", K::ConnectFailed, Unreachable),
            (Reason::ConnectTimeout, "connect timeout", K::ConnectTimeout, Unreachable),
            (Reason::MandatoryFailed(target(2)), "mandatory target 2 failed", K::MandatoryTarget, Expected),
            (Reason::MandatoryClosed(target(1)), "mandatory target 1 closed", K::MandatoryTarget, Expected),
            (Reason::TargetBufferOverflow, "target buffer overflow", K::BufferOverflow, Unreachable),
            (Reason::Shutdown, "shutdown", K::Shutdown, Expected),
            (Reason::TooManyConnections, "too many connections", K::TooManyConnections, Expected),
            (Reason::ClosedByOperator, "closed by operator", K::ClosedByOperator, Expected),
            (Reason::DeviceFailed, "device failed", K::DeviceFailed, Expected),
            (Reason::BadProxyHeader("not a PROXY header".into()), "bad proxy protocol header: not a PROXY header", K::BadProxyHeader, Expected),
            (Reason::DeviceNotListed, "device not listed", K::DeviceNotListed, Expected),
            (Reason::Replaced, "replaced by a newer connection", K::Replaced, Expected),
            (Reason::CaughtUp, "caught up", K::Other, Expected),
            (Reason::PayloadNotStored, "payload not stored", K::Other, Expected),
        ];
        for (reason, words, kind, severity) in table {
            assert_eq!(reason.to_string(), words);
            assert_eq!(reason.text(), words);
            assert_eq!(reason.kind(), kind, "{words}");
            assert_eq!(reason.severity(), severity, "{words}");
        }
    }
}
