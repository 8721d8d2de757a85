//! Devices: who is on the other end of a connection.
//!
//! A device names itself in its first bytes (an IMEI packet, a login frame,
//! a report that carries its ID). This module reads that name, the device
//! ident, and keeps the lists of devices a target accepts. It is pure: no
//! sockets, no threads, no clock of its own (callers pass `now`).
//!
//! - [`DetectorSet`]: which detectors run, parsed from PROXY_DEVICE_IDENT and
//!   PROXY_DEVICE_IDENT_REGEX; built once at start and shared read-only.
//! - [`Detection`]: one TCP connection's detection, fed each packet as read.
//!   It ends at the first match, once [`WINDOW_BYTES`] have arrived without
//!   one, or [`DETECTION_TIME`] after accept, whichever comes first, and
//!   reports that end exactly once as an [`Outcome`].
//! - [`detect_datagram`]: the same for one UDP datagram, which is complete
//!   in itself.
//! - [`Ident`]: a device ident, checked to be safe in JSON, logs and a
//!   device list file (see its documentation for the characters allowed).
//! - [`DeviceList`]: the idents of a PROXY_TARGETn_DEVICES file.
//!
//! Bounds: a detection holds at most [`WINDOW_BYTES`] of the device's bytes,
//! allocated only once a packet leaves it undecided and freed when it ends;
//! once ended it does nothing and allocates nothing. A user regex is run by
//! the `regex` crate, whose matching time is linear in the input.

mod detect;
mod ident;
mod list;
mod protocols;

pub use detect::{Detection, DetectorSet, DetectorSetError, GiveUp, Outcome, detect_datagram};
pub use ident::Ident;
pub use list::{DeviceList, DeviceListError};

use std::time::Duration;

/// Detection reads at most this many of a device's first bytes.
pub const WINDOW_BYTES: usize = 1024;

/// Detection ends this long after the connection was accepted.
pub const DETECTION_TIME: Duration = Duration::from_secs(5);
