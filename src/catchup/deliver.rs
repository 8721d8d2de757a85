//! One delivery: a new connection to target N that sends what it missed of
//! one device connection, with its event 1 and event 2.
//!
//! Order on the wire: the PROXY protocol header (if target N has one), the
//! login if it is resent, then the missed packets, batched up to
//! PROXY_TARGET_BUFFER (one packet is never more than one read). An attempt
//! that cannot connect writes no message; one that is cut short (the
//! target closes, resets, or stalls past PROXY_CONNECT_TIMEOUT) gets its
//! event 2 with the reason, and is sent again in full later. A packet
//! stored without its payload ends the delivery before it, with reason
//! `payload not stored`; otherwise it ends with `caught up`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::files::Files;
use super::index::Delivery;
use super::link::{Cut, Link, SLICE};
use super::source::{Source, SourceError, Step};
use super::target::CatchUpTarget;
use crate::config::TargetAddress;
use crate::net::reason::Reason;
use crate::net::resolver;
use crate::store::journal::{CatchUpEnd, Journal};
use crate::store::message::{Ident, Origin};

pub const CAUGHT_UP: &str = "caught up";
pub const PAYLOAD_NOT_STORED: &str = "payload not stored";

/// The most payload batched into one write.
const BATCH: usize = 256 * 1024;
/// Catch-up sends at most this many bytes a second to a target, so that
/// live traffic keeps its CPU (measured on 2 cores: delivering unpaced, at
/// about 450 MB/s, raised live trackers' p99 fourfold). Still 300 times
/// what a fleet of 10,000 trackers sends at 100 B/s.
const RATE: u64 = 32 << 20;

/// How one attempt went.
pub enum Outcome {
    /// Everything was written in full (`caught up`), or everything up to
    /// a packet stored without its payload (`payload not stored`): done
    /// for good. [`Finish::close`] then reads the last replies and writes
    /// the event 2, once the caller has recorded it as done.
    Completed {
        device_bytes: u64,
        finish: Box<Finish>,
    },
    /// The target cut it short (its event 2 is written); it is sent again
    /// in full later.
    CutShort(String),
    /// No connection (nothing written).
    Unreachable(String),
    /// Its lines are gone or changed: it can never be delivered.
    Lost(String),
    /// The daemon is stopping (the event 2 says `shutdown`).
    Stopped,
}

/// A delivery written in full, still to be closed.
pub struct Finish {
    link: Link,
    origin: Origin,
    device: Option<Box<str>>,
    pub reason: &'static str,
}

impl Finish {
    /// Ends our side, reads the target's last replies (a few seconds at
    /// most) and writes the event 2.
    pub fn close(mut self, target: &CatchUpTarget, journal: &mut Journal, stop: &AtomicBool) {
        self.link.finish(stop);
        let closed = CatchUpEnd {
            reason: self.reason,
            received: self.link.received,
            sent: self.link.sent,
        };
        let device = self.device.as_deref();
        journal.catchup(
            self.origin,
            target.number,
            &target.label,
            device,
            Some(&closed),
        );
    }
}

/// Delivers `delivery` to `target`.
pub fn deliver(
    target: &CatchUpTarget,
    delivery: &Delivery,
    files: &mut Files,
    journal: &mut Journal,
    stop: &AtomicBool,
) -> Outcome {
    let mut source = Source::new(delivery, files, stop);
    if let Err(e) = source.check_first() {
        return Outcome::Lost(e.to_string());
    }
    let addresses = match resolve(&target.address, stop) {
        Ok(addresses) => addresses,
        Err(outcome) => return outcome,
    };
    let mut link = match Link::connect(&addresses, target.connect_timeout, stop) {
        Ok(link) => link,
        Err(Cut::Stopped) => return Outcome::Stopped,
        Err(Cut::Target(why)) => return Outcome::Unreachable(why),
    };
    let origin = Origin {
        ident: Ident(delivery.ident),
        peer: delivery.peer,
    };
    let device = delivery.device.as_deref();
    journal.catchup(origin, target.number, &target.label, device, None);
    let header = target.header.header(delivery.peer);
    let sent = link
        .write_all(&header, stop)
        .map_err(Ending::Cut)
        .and_then(|()| send_packets(&mut source, &mut link, target.buffer, stop));
    let (why, outcome) = match sent {
        Ok((reason, device_bytes)) => {
            let finish = Finish {
                link,
                origin,
                device: delivery.device.clone(),
                reason,
            };
            return Outcome::Completed {
                device_bytes,
                finish: Box::new(finish),
            };
        }
        Err(Ending::Cut(Cut::Target(why))) => (why.clone(), Outcome::CutShort(why)),
        Err(Ending::Cut(Cut::Stopped) | Ending::Source(SourceError::Stopped)) => {
            (Reason::Shutdown.to_string(), Outcome::Stopped)
        }
        Err(Ending::Source(e)) => (
            "message file gone".to_string(),
            Outcome::Lost(e.to_string()),
        ),
    };
    let closed = CatchUpEnd {
        reason: &why,
        received: link.received,
        sent: link.sent,
    };
    journal.catchup(origin, target.number, &target.label, device, Some(&closed));
    outcome
}

enum Ending {
    Cut(Cut),
    Source(SourceError),
}

/// Sends the packets in batches; the reason it ended and the device bytes
/// sent.
fn send_packets(
    source: &mut Source<'_>,
    link: &mut Link,
    buffer: usize,
    stop: &AtomicBool,
) -> Result<(&'static str, u64), Ending> {
    let limit = buffer.clamp(1, BATCH);
    let mut batch = Vec::with_capacity(limit.min(64 * 1024));
    let mut device_bytes = 0;
    let started = Instant::now();
    loop {
        pace(started, device_bytes, stop);
        let step = source.next(&mut batch).map_err(Ending::Source)?;
        let ends = match step {
            Step::Packet if batch.len() < limit => continue,
            Step::Packet => None,
            Step::NotStored => Some(PAYLOAD_NOT_STORED),
            Step::End => Some(CAUGHT_UP),
        };
        link.write_all(&batch, stop).map_err(Ending::Cut)?;
        device_bytes += batch.len() as u64;
        batch.clear();
        if batch.capacity() > limit {
            batch.shrink_to(limit);
        }
        if let Some(reason) = ends {
            return Ok((reason, device_bytes));
        }
    }
}

/// Waits until `sent` bytes since `started` are within [`RATE`] (in short
/// naps, so that a stop is seen at once).
fn pace(started: Instant, sent: u64, stop: &AtomicBool) {
    let due = Duration::from_secs_f64(sent as f64 / RATE as f64);
    while !stop.load(Ordering::Relaxed) {
        let ahead = due.saturating_sub(started.elapsed());
        if ahead.is_zero() {
            return;
        }
        std::thread::sleep(ahead.min(Duration::from_millis(50)));
    }
}

/// The target's addresses; a host name is looked up on a thread of its
/// own, so that a slow DNS server cannot delay a stop.
fn resolve(address: &TargetAddress, stop: &AtomicBool) -> Result<Vec<SocketAddr>, Outcome> {
    if let Some(literal) = address.literal() {
        return Ok(vec![literal]);
    }
    let (answer, answered) = crossbeam_channel::bounded(1);
    let wanted = address.clone();
    let spawned = std::thread::Builder::new()
        .name("catchup-dns".into())
        .spawn(move || {
            // Nobody listens any more if catch-up stopped meanwhile.
            let _ = answer.send(resolver::resolve(&wanted));
        });
    if let Err(e) = spawned {
        return Err(Outcome::Unreachable(format!(
            "cannot look up {address}: {e}"
        )));
    }
    loop {
        match answered.recv_timeout(SLICE) {
            Ok(Ok(found)) => return Ok(found),
            Ok(Err(e)) => {
                return Err(Outcome::Unreachable(format!(
                    "connect failed: cannot resolve {address}: {e}"
                )));
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::SeqCst) {
                    return Err(Outcome::Stopped);
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(Outcome::Unreachable(format!("cannot look up {address}")));
            }
        }
    }
}
