//! The first phase of a device connection behind a load balancer: reading
//! its PROXY protocol header (PROXY_ACCEPT_PROXY_PROTOCOL).
//!
//! Nothing is written and no target is connected until the header is read:
//! the device's event 1 must carry the address the header gives. The header
//! bytes are never forwarded, stored, or counted as received from the
//! device; bytes after it in the same read are the device's first packet.
//! A bad, oversized, cut or late header ends the connection with reason
//! `bad proxy protocol header: ...` (after its event 1, with the socket's
//! own peer). A v2 LOCAL header is the balancer's health check: its events
//! are written, but no target is connected for it.

use std::net::SocketAddr;
use std::time::Instant;

use super::lifecycle::Phase;
use super::{Connection, Context};
use crate::net::proxy_header::{self, MAX_HEADER, Parsed};
use crate::net::reason::Reason;
use crate::net::side::Side;
use crate::net::socket::ReadOutcome;
use crate::units::format_duration;

/// The header bytes read so far.
pub struct HeaderWait {
    bytes: Vec<u8>,
    since: Instant,
}

impl HeaderWait {
    pub fn new(now: Instant) -> HeaderWait {
        HeaderWait {
            bytes: Vec::new(),
            since: now,
        }
    }
}

impl Connection {
    /// Reads towards the header; true when something happened.
    pub(super) fn read_header(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> bool {
        let Phase::AwaitingHeader(wait) = &mut self.phase else {
            return false;
        };
        if !self.device.readable {
            return false;
        }
        let room = MAX_HEADER.saturating_sub(wait.bytes.len()).max(1);
        match self.device.read(&mut buffer[..room]) {
            ReadOutcome::Data(n) => {
                wait.bytes.extend_from_slice(&buffer[..n]);
                match proxy_header::parse(&wait.bytes, ctx.settings.accept_proxy) {
                    Parsed::Incomplete if wait.bytes.len() >= MAX_HEADER => {
                        self.header_failed(format!("longer than {MAX_HEADER} bytes"), ctx);
                    }
                    Parsed::Incomplete => {}
                    Parsed::Invalid(why) => self.header_failed(why, ctx),
                    Parsed::Header {
                        length,
                        source,
                        destination,
                    } => self.header_read(length, source, destination, true, ctx),
                    Parsed::Local { length } => self.header_read(length, None, None, false, ctx),
                }
                true
            }
            ReadOutcome::WouldBlock => false,
            ReadOutcome::Closed => {
                self.header_failed("the connection closed before it".into(), ctx);
                true
            }
            ReadOutcome::Failed(e) => {
                self.header_failed(Reason::io(&e).to_string(), ctx);
                true
            }
        }
    }

    /// Ends a connection whose header did not arrive in time; returns
    /// whether it did.
    pub(super) fn check_header_timeout(&mut self, ctx: &mut Context<'_>) -> bool {
        let late = matches!(
            &self.phase,
            Phase::AwaitingHeader(wait) if ctx.now >= wait.since + ctx.settings.connect_timeout
        );
        if late {
            let limit = format_duration(ctx.settings.connect_timeout);
            self.header_failed(format!("none within {limit}"), ctx);
        }
        late
    }

    /// A header of `length` bytes was read. `relayed` is false for a v2
    /// LOCAL header, a balancer's health check: it is recorded like any
    /// connection, but no target is connected for it.
    fn header_read(
        &mut self,
        length: usize,
        source: Option<SocketAddr>,
        destination: Option<SocketAddr>,
        relayed: bool,
        ctx: &mut Context<'_>,
    ) {
        let Phase::AwaitingHeader(wait) = std::mem::replace(&mut self.phase, Phase::Open) else {
            return;
        };
        if let Some(source) = source {
            self.origin.peer = SocketAddr::new(source.ip().to_canonical(), source.port());
        }
        if destination.is_some() && ctx.settings.sends_proxy_header {
            self.local = destination;
        }
        // The header is the balancer's, not the device's.
        self.device.received = self.device.received.saturating_sub(length as u64);
        ctx.journal
            .connected(self.origin, self.tags(), Side::Device, None);
        // Device bytes that came with the header were received before any
        // target was tried: looked at by detection and stored first,
        // forwarded once targets exist.
        let rest = &wait.bytes[length..];
        if !rest.is_empty() {
            self.last_activity = ctx.now;
            ctx.received(Side::Device, rest.len());
            self.recognise(rest, ctx);
            ctx.journal
                .data(self.origin, self.tags(), Side::Device, None, rest);
        }
        if relayed {
            self.connect_targets(ctx);
        }
        // Not once a mandatory target failed at once: the connection ends.
        if !rest.is_empty() && self.phase.relays() {
            self.forward_to_targets(rest, ctx);
        }
    }

    fn header_failed(&mut self, why: String, ctx: &mut Context<'_>) {
        // Its event 1 is written here, not when it finishes.
        self.phase = Phase::Open;
        log::debug!(
            "{}: bad proxy protocol header from {}: {why}",
            self.origin.ident,
            self.origin.peer
        );
        ctx.journal
            .connected(self.origin, self.tags(), Side::Device, None);
        let why = Reason::BadProxyHeader(why.into());
        self.end(why.clone(), why, false);
    }
}
