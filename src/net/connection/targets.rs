//! The target side of a connection: connecting (to each of a target's
//! addresses in turn until one answers, within one connect timeout),
//! forwarding the device's bytes, reading replies, and dropping a target
//! with its event 2.
//!
//! A mandatory target's failure ends the whole connection; a
//! non-mandatory one is dropped alone (see the invariants in
//! `connection.rs`).

use std::io;
use std::sync::atomic::Ordering;

use mio::Interest;
use mio::net::TcpStream;

use super::{Connection, Context, Link, Settings, TargetSpec, token};
use crate::config::{MAX_TARGETS, SendProxyProtocol};
use crate::net::proxy_header;
use crate::net::reason::{self, Reason};
use crate::net::socket::{Endpoint, ReadOutcome};
use crate::store::journal::Closed;

impl Connection {
    pub(super) fn connect_target(&mut self, spec: &TargetSpec, ctx: &mut Context<'_>) {
        let index = usize::from(spec.number - 1);
        if let Some(used) = &spec.used {
            used.store(true, Ordering::Relaxed);
        }
        if ctx.addresses[index].is_empty() {
            let why = format!("connect failed: cannot resolve {}", spec.label);
            self.target_failed_early(spec, why.into(), ctx);
            return;
        }
        match self.start_connect(index, 0, ctx) {
            Ok((stream, address)) => {
                let mut endpoint = Endpoint::new(stream, false);
                if spec.send_proxy != SendProxyProtocol::Off {
                    let local = self.local.unwrap_or(self.origin.peer);
                    let header = proxy_header::build(spec.send_proxy, self.origin.peer, local);
                    // Queued (the socket is still connecting), so it cannot fail.
                    let _ = endpoint.send(&header);
                }
                self.targets[index] = Some(Link {
                    endpoint,
                    address,
                    connecting_since: Some(ctx.now),
                });
            }
            Err(e) => self.target_failed_early(spec, reason::connect_failed(&e), ctx),
        }
    }

    /// Starts a non-blocking connect to target `index`, to the first of its
    /// addresses from `from` on that does not fail at once; returns the
    /// socket and which address it is, or the last error.
    fn start_connect(
        &self,
        index: usize,
        from: usize,
        ctx: &Context<'_>,
    ) -> io::Result<(TcpStream, usize)> {
        let mut last_error = io::Error::from(io::ErrorKind::AddrNotAvailable);
        for (n, address) in ctx.addresses[index].iter().enumerate().skip(from) {
            let connected = TcpStream::connect(*address).and_then(|mut stream| {
                stream.set_nodelay(true)?;
                let interest = Interest::READABLE | Interest::WRITABLE;
                ctx.registry
                    .register(&mut stream, token(self.slot, index + 1), interest)?;
                Ok(stream)
            });
            match connected {
                Ok(stream) => return Ok((stream, n)),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// A connect that failed moves on to the target's next address, with
    /// what is queued for it; false when there is none left.
    fn try_next_address(&mut self, index: usize, ctx: &mut Context<'_>) -> bool {
        let Some(from) = self.targets[index].as_ref().map(|link| link.address + 1) else {
            return false;
        };
        let Ok((stream, address)) = self.start_connect(index, from, ctx) else {
            return false;
        };
        let Some(link) = &mut self.targets[index] else {
            return false;
        };
        log::debug!(
            "{}: target {} moves on to address {address}",
            self.origin.ident,
            index + 1
        );
        // The old socket is closed right after; a failed deregister changes nothing.
        let _ = ctx.registry.deregister(&mut link.endpoint.stream);
        link.endpoint.replace_stream(stream);
        link.address = address;
        true
    }

    /// A target that failed before it had a socket: event 2 only.
    pub(super) fn target_failed_early(
        &mut self,
        spec: &TargetSpec,
        why: Reason,
        ctx: &mut Context<'_>,
    ) {
        log::debug!("{}: target {} {why}", self.origin.ident, spec.number);
        let closed = Closed {
            reason: &why,
            received: 0,
            sent: 0,
        };
        ctx.journal
            .dropped(self.origin, spec.number, Some(&spec.label), &closed);
        ctx.counters.drop_of(usize::from(spec.number), &why);
        if spec.mandatory {
            let whole = reason::mandatory_failed(spec.number);
            self.end(whole.clone(), whole, false);
        }
    }

    pub(super) fn finish_connects(&mut self, ctx: &mut Context<'_>) -> bool {
        let mut moved = false;
        for index in 0..MAX_TARGETS {
            let Some(link) = &mut self.targets[index] else {
                continue;
            };
            if link.connecting_since.is_none() || !link.endpoint.writable {
                continue;
            }
            let stream = &link.endpoint.stream;
            let outcome = match stream.take_error() {
                Ok(Some(e)) | Err(e) => Err(e),
                Ok(None) => stream.peer_addr().map(|_| ()),
            };
            match outcome {
                Ok(()) => {
                    link.connecting_since = None;
                    let spec = target_spec(ctx.settings, index);
                    ctx.journal
                        .connected(self.origin, spec.number, Some(&spec.label));
                    moved = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {
                    link.endpoint.writable = false;
                }
                Err(e) => {
                    if !self.try_next_address(index, ctx) {
                        self.target_failed(index, reason::connect_failed(&e), ctx);
                    }
                    moved = true;
                }
            }
        }
        moved
    }

    pub(super) fn flush_targets(&mut self, ctx: &mut Context<'_>) -> bool {
        let mut moved = false;
        for index in 0..MAX_TARGETS {
            let Some(link) = &mut self.targets[index] else {
                continue;
            };
            if link.connecting_since.is_some() || link.endpoint.queued() == 0 {
                continue;
            }
            match link.endpoint.flush() {
                Ok(written) => {
                    ctx.sent(index + 1, written);
                    moved |= written > 0;
                }
                Err(e) => {
                    self.target_failed(index, reason::describe(&e), ctx);
                    moved = true;
                }
            }
        }
        moved
    }

    pub(super) fn forward_to_targets(&mut self, packet: &[u8], ctx: &mut Context<'_>) {
        for index in 0..MAX_TARGETS {
            let Some(link) = &mut self.targets[index] else {
                continue;
            };
            let spec = target_spec(ctx.settings, index);
            if !spec.mandatory && link.endpoint.queued() + packet.len() > ctx.settings.target_buffer
            {
                self.target_failed(index, reason::TARGET_BUFFER_OVERFLOW.into(), ctx);
                continue;
            }
            match link.endpoint.send(packet) {
                Ok(written) => ctx.sent(index + 1, written),
                Err(e) => self.target_failed(index, reason::describe(&e), ctx),
            }
        }
    }

    pub(super) fn read_targets(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> bool {
        let mut moved = false;
        for index in 0..MAX_TARGETS {
            if self.ending.is_some() {
                break;
            }
            let device_behind = self.device.queued() > 0;
            let Some(link) = &mut self.targets[index] else {
                continue;
            };
            if link.connecting_since.is_some() || !link.endpoint.readable {
                continue;
            }
            let spec = target_spec(ctx.settings, index);
            // Replies wait while the device has not taken the last ones.
            let limit = match spec.replies {
                true if device_behind => continue,
                true => ctx.settings.max_read.min(buffer.len()),
                false => buffer.len(),
            };
            let outcome = link.endpoint.read(&mut buffer[..limit]);
            if let ReadOutcome::Data(n) = outcome {
                ctx.received(index + 1, n);
            }
            match outcome {
                ReadOutcome::Data(n) if spec.replies => {
                    moved = true;
                    self.relay_reply(spec, &buffer[..n], ctx);
                }
                ReadOutcome::Data(_) => moved = true,
                ReadOutcome::WouldBlock => {}
                ReadOutcome::Closed => {
                    moved = true;
                    self.target_closed(index, ctx);
                }
                ReadOutcome::Failed(e) => {
                    moved = true;
                    self.target_failed(index, reason::describe(&e), ctx);
                }
            }
        }
        moved
    }

    pub(super) fn relay_reply(&mut self, spec: &TargetSpec, packet: &[u8], ctx: &mut Context<'_>) {
        self.last_activity = ctx.now;
        ctx.journal
            .data(self.origin, spec.number, Some(&spec.label), packet);
        match self.device.send(packet) {
            Ok(written) => ctx.sent(0, written),
            Err(e) => self.end(reason::describe(&e), reason::DEVICE_FAILED.into(), false),
        }
    }

    /// A target ended its stream. Once the device has ended its own, that
    /// is the normal end of the exchange; before, it is a failure for a
    /// mandatory target (whose replies are still delivered first).
    pub(super) fn target_closed(&mut self, index: usize, ctx: &mut Context<'_>) {
        self.drop_target(index, reason::CLOSED_BY_PEER.into(), ctx);
        let spec = target_spec(ctx.settings, index);
        if spec.mandatory && !self.device.read_closed {
            let why = reason::mandatory_closed(spec.number);
            self.end(why.clone(), why, true);
        }
    }

    pub(super) fn target_failed(&mut self, index: usize, why: Reason, ctx: &mut Context<'_>) {
        let spec = target_spec(ctx.settings, index);
        log::debug!("{}: target {} {why}", self.origin.ident, spec.number);
        self.drop_target(index, why.clone(), ctx);
        if spec.mandatory {
            let whole = reason::mandatory_failed(spec.number);
            self.end(whole.clone(), whole, false);
        }
    }

    /// Closes one target's socket and writes its event 2.
    pub(super) fn drop_target(&mut self, index: usize, why: Reason, ctx: &mut Context<'_>) {
        let Some(mut link) = self.targets[index].take() else {
            return;
        };
        // The socket is closed right after; a failed deregister changes nothing.
        let _ = ctx.registry.deregister(&mut link.endpoint.stream);
        let spec = target_spec(ctx.settings, index);
        let closed = Closed {
            reason: &why,
            received: link.endpoint.received,
            sent: link.endpoint.sent,
        };
        ctx.journal
            .dropped(self.origin, spec.number, Some(&spec.label), &closed);
        ctx.counters.drop_of(index + 1, &why);
    }
}

/// The spec of a target that has a link (targets only exist where configured).
pub(super) fn target_spec(settings: &Settings, index: usize) -> &TargetSpec {
    settings.targets[index]
        .as_ref()
        .expect("a connection only has links to configured targets")
}
