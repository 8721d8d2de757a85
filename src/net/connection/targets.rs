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

use super::lifecycle::{LinkState, Phase};
use super::{Connection, Context, Link, Settings, TargetSpec, token, warnings};
use crate::config::SendProxyProtocol;
use crate::net::proxy_header;
use crate::net::reason::Reason;
use crate::net::side::{Side, TargetId};
use crate::net::socket::{Endpoint, ReadOutcome};
use crate::store::journal::Closed;

impl Connection {
    /// The device is known (its event 1 written): a connect to every
    /// target at once. Once a mandatory target has failed at once, the
    /// targets after it are not connected, but each still gets its event 2.
    pub(super) fn connect_targets(&mut self, ctx: &mut Context<'_>) {
        for spec in ctx.settings.targets.iter().flatten() {
            match &self.phase {
                Phase::Ending(ending) => {
                    let why = ending.target_reason.clone();
                    self.target_failed_early(spec, why, ctx);
                }
                _ if ctx.settings.devices.has_list(spec.id) => self.await_device(spec, ctx),
                _ => self.connect_target(spec, ctx),
            }
        }
    }

    pub(super) fn connect_target(&mut self, spec: &TargetSpec, ctx: &mut Context<'_>) {
        if let Some(used) = &spec.used {
            used.store(true, Ordering::Relaxed);
        }
        if ctx.addresses[spec.id.index()].is_empty() {
            let why = Reason::Unresolved(spec.label.as_str().into());
            self.target_failed_early(spec, why, ctx);
            return;
        }
        match self.start_connect(spec.id, 0, ctx) {
            Ok((stream, address)) => {
                let mut endpoint = Endpoint::new(stream, false);
                if spec.send_proxy != SendProxyProtocol::Off {
                    let local = self.local.unwrap_or(self.origin.peer);
                    let header = proxy_header::build(spec.send_proxy, self.origin.peer, local);
                    // Queued (the socket is still connecting), so it cannot fail.
                    let _ = endpoint.send(&header);
                }
                self.targets[spec.id.index()] = Some(Link {
                    endpoint,
                    address,
                    state: LinkState::Connecting { since: ctx.now },
                });
            }
            Err(e) => self.target_failed_early(spec, Reason::connect_failed(&e), ctx),
        }
    }

    /// Starts a non-blocking connect to `target`, to the first of its
    /// addresses from `from` on that does not fail at once; returns the
    /// socket and which address it is, or the last error.
    fn start_connect(
        &self,
        target: TargetId,
        from: usize,
        ctx: &Context<'_>,
    ) -> io::Result<(TcpStream, usize)> {
        let mut last_error = io::Error::from(io::ErrorKind::AddrNotAvailable);
        for (n, address) in ctx.addresses[target.index()].iter().enumerate().skip(from) {
            let connected = TcpStream::connect(*address).and_then(|mut stream| {
                stream.set_nodelay(true)?;
                let interest = Interest::READABLE | Interest::WRITABLE;
                let token = token(self.slot, Side::Target(target));
                ctx.registry.register(&mut stream, token, interest)?;
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
    fn try_next_address(&mut self, target: TargetId, ctx: &mut Context<'_>) -> bool {
        let Some(from) = self.targets[target.index()]
            .as_ref()
            .map(|link| link.address + 1)
        else {
            return false;
        };
        let Ok((stream, address)) = self.start_connect(target, from, ctx) else {
            return false;
        };
        let Some(link) = &mut self.targets[target.index()] else {
            return false;
        };
        log::debug!(
            "{}: target {target} moves on to address {address}",
            self.origin.ident
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
        warnings::target_dropped(self.origin, spec, &why, ctx.now);
        let closed = Closed {
            reason: &why,
            received: 0,
            sent: 0,
        };
        let side = Side::Target(spec.id);
        ctx.journal
            .dropped(self.origin, self.tags(), side, Some(&spec.label), &closed);
        ctx.counters.drop_of(side, &why);
        if spec.mandatory {
            let whole = Reason::MandatoryFailed(spec.id);
            self.end(whole.clone(), whole, false);
        }
    }

    pub(super) fn finish_connects(&mut self, ctx: &mut Context<'_>) -> bool {
        let mut moved = false;
        for target in TargetId::all() {
            let Some(link) = &mut self.targets[target.index()] else {
                continue;
            };
            if !matches!(link.state, LinkState::Connecting { .. }) || !link.endpoint.writable {
                continue;
            }
            let stream = &link.endpoint.stream;
            let outcome = match stream.take_error() {
                Ok(Some(e)) | Err(e) => Err(e),
                Ok(None) => stream.peer_addr().map(|_| ()),
            };
            match outcome {
                Ok(()) => {
                    link.state = LinkState::Open;
                    self.last_activity = ctx.now;
                    let spec = target_spec(ctx.settings, target);
                    let side = Side::Target(target);
                    // The link is borrowed: the tags from their own field.
                    let tags = self.recognition.tags();
                    ctx.journal
                        .connected(self.origin, tags, side, Some(&spec.label));
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    link.endpoint.writable = false;
                }
                Err(e) => {
                    if !self.try_next_address(target, ctx) {
                        self.target_failed(target, Reason::connect_failed(&e), ctx);
                    }
                    moved = true;
                }
            }
        }
        moved
    }

    pub(super) fn flush_targets(&mut self, ctx: &mut Context<'_>) -> bool {
        let mut moved = false;
        for target in TargetId::all() {
            let Some(link) = &mut self.targets[target.index()] else {
                continue;
            };
            if matches!(link.state, LinkState::Connecting { .. }) || link.endpoint.queued() == 0 {
                continue;
            }
            match link.endpoint.flush() {
                Ok(0) => {}
                Ok(written) => {
                    ctx.sent(Side::Target(target), written);
                    self.last_activity = ctx.now;
                    moved = true;
                }
                Err(e) => {
                    self.target_failed(target, Reason::io(&e), ctx);
                    moved = true;
                }
            }
        }
        moved
    }

    pub(super) fn forward_to_targets(&mut self, packet: &[u8], ctx: &mut Context<'_>) {
        for target in TargetId::all() {
            let Some(link) = &mut self.targets[target.index()] else {
                continue;
            };
            let spec = target_spec(ctx.settings, target);
            if !spec.mandatory && link.endpoint.queued() + packet.len() > ctx.settings.target_buffer
            {
                self.target_failed(target, Reason::TargetBufferOverflow, ctx);
                continue;
            }
            match link.endpoint.send(packet) {
                Ok(written) => ctx.sent(Side::Target(target), written),
                Err(e) => self.target_failed(target, Reason::io(&e), ctx),
            }
        }
        self.hold(packet);
    }

    pub(super) fn read_targets(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> bool {
        let mut moved = false;
        for target in TargetId::all() {
            let device_behind = self.device.queued() > 0;
            let Some(link) = &mut self.targets[target.index()] else {
                continue;
            };
            if matches!(link.state, LinkState::Connecting { .. }) || !link.endpoint.readable {
                continue;
            }
            let spec = target_spec(ctx.settings, target);
            // Replies wait while the device has not taken the last ones.
            let limit = match spec.replies {
                true if device_behind => continue,
                true => ctx.settings.max_read.min(buffer.len()),
                false => buffer.len(),
            };
            // Recorded replies wait while the writer is behind too.
            if spec.replies && !ctx.journal.may_read(&self.recorded) {
                self.held_back = true;
                continue;
            }
            let outcome = link.endpoint.read(&mut buffer[..limit]);
            if let ReadOutcome::Data(n) = outcome {
                ctx.received(Side::Target(target), n);
                self.last_activity = ctx.now;
                if spec.replies {
                    ctx.journal.charge_packet(&mut self.recorded, n);
                }
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
                    self.target_closed(target, ctx);
                }
                ReadOutcome::Failed(e) => {
                    moved = true;
                    self.target_failed(target, Reason::io(&e), ctx);
                }
            }
            // A reply the device could not take, or a mandatory target's
            // end, ends the connection: nothing more is read.
            if !self.phase.relays() {
                break;
            }
        }
        moved
    }

    fn relay_reply(&mut self, spec: &TargetSpec, packet: &[u8], ctx: &mut Context<'_>) {
        let side = Side::Target(spec.id);
        ctx.journal
            .data(self.origin, self.tags(), side, Some(&spec.label), packet);
        match self.device.send(packet) {
            Ok(written) => ctx.sent(Side::Device, written),
            Err(e) => self.end(Reason::io(&e), Reason::DeviceFailed, false),
        }
    }

    /// A target ended its stream. Once the device has ended its own, that
    /// is the normal end of the exchange; before, it is a failure for a
    /// mandatory target (whose replies are still delivered first).
    fn target_closed(&mut self, target: TargetId, ctx: &mut Context<'_>) {
        self.drop_target(target, &Reason::ClosedByPeer, ctx);
        let spec = target_spec(ctx.settings, target);
        if spec.mandatory && matches!(self.phase, Phase::Open) {
            let why = Reason::MandatoryClosed(target);
            self.end(why.clone(), why, true);
        }
    }

    pub(super) fn target_failed(&mut self, target: TargetId, why: Reason, ctx: &mut Context<'_>) {
        let spec = target_spec(ctx.settings, target);
        warnings::target_dropped(self.origin, spec, &why, ctx.now);
        self.drop_target(target, &why, ctx);
        if spec.mandatory {
            let whole = Reason::MandatoryFailed(target);
            self.end(whole.clone(), whole, false);
        }
    }

    /// Closes one target's socket and writes its event 2.
    pub(super) fn drop_target(&mut self, target: TargetId, why: &Reason, ctx: &mut Context<'_>) {
        let Some(mut link) = self.targets[target.index()].take() else {
            return;
        };
        // The socket is closed right after; a failed deregister changes nothing.
        let _ = ctx.registry.deregister(&mut link.endpoint.stream);
        let spec = target_spec(ctx.settings, target);
        let closed = Closed {
            reason: why,
            received: link.endpoint.received,
            sent: link.endpoint.sent,
        };
        let side = Side::Target(target);
        ctx.journal
            .dropped(self.origin, self.tags(), side, Some(&spec.label), &closed);
        ctx.counters.drop_of(side, why);
    }

    /// Each live target link with its spec.
    pub(super) fn links<'a>(
        &'a self,
        settings: &'a Settings,
    ) -> impl Iterator<Item = (&'a TargetSpec, &'a Link)> {
        TargetId::all().filter_map(move |target| {
            let link = self.targets[target.index()].as_ref()?;
            Some((target_spec(settings, target), link))
        })
    }
}

/// The spec of a target that has a link (targets only exist where configured).
fn target_spec(settings: &Settings, target: TargetId) -> &TargetSpec {
    settings
        .target(target)
        .expect("a connection only has links to configured targets")
}
