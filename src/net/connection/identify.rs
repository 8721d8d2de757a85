//! Who the device is: the connection's run of the detectors over the
//! device's first bytes (SPEC, Devices), and what the answer decides.
//!
//! Invariants kept here:
//! - `device.ident` is on every message written once the device is
//!   recognised, the event 0 of the packet that revealed it included (a
//!   packet is fed here before its event 0 is written), and never on the
//!   device's event 1 (no byte has been read by then);
//! - a target with a device list is connected only for a listed device.
//!   Until detection ends it waits, and the device's bytes are held for it
//!   (`held`: fewer than [`WINDOW_BYTES`], since detection ends once that
//!   many have arrived); then it is connected and given everything from
//!   the first byte, or it gets its one event 2, `device not listed`, with
//!   byte counts 0 and no event 1. So does a waiting target when the
//!   connection ends first. A waiting mandatory target holds the device
//!   back at PROXY_TARGET_BUFFER like a connecting one, but fails nothing:
//!   it is mandatory only for a listed device;
//! - with PROXY_DEVICE_UNIQUE, the device's older connection is closed
//!   once this one is recognised, and this one is unregistered when it
//!   ends.
//!
//! Cost: once detection has ended, a branch per device read; nothing is
//! allocated but the ident, once, when it is found.
//!
//! [`WINDOW_BYTES`]: crate::device::WINDOW_BYTES

use std::time::Instant;

use super::lifecycle::Phase;
use super::{Connection, Context, Settings, TargetSpec};
use crate::device::{Detection, Ident, Outcome};
use crate::net::devices::{Devices, Owner, record_not_listed};
use crate::net::side::TargetId;
use crate::store::journal::Tags;

/// A connection's knowledge of its device.
pub(super) struct Recognition {
    /// Running until it ends, then `None`; `None` from the start when
    /// detection is off.
    detection: Option<Detection>,
    /// The device's ident, once recognised.
    ident: Option<Ident>,
    /// Listed targets waiting for detection to end: bit
    /// [`TargetId::index`] of each. Never set once detection has ended.
    waiting: u8,
    /// The device's bytes from its first, while a target waits.
    held: Vec<u8>,
}

impl Recognition {
    /// Detection starts at accept (`now`), unless it is off.
    pub(super) fn new(devices: &Devices, now: Instant) -> Recognition {
        Recognition {
            detection: (!devices.detectors().is_off()).then(|| Detection::new(now)),
            ident: None,
            waiting: 0,
            held: Vec::new(),
        }
    }

    pub(super) fn ident(&self) -> Option<&Ident> {
        self.ident.as_ref()
    }

    /// What each message of the connection carries: `device.ident` once
    /// the device is known.
    pub(super) fn tags(&self) -> Tags<'_> {
        Tags {
            device: self.ident.as_ref().map(Ident::as_str),
            transport: None,
        }
    }
}

fn bit(target: TargetId) -> u8 {
    1 << target.index()
}

impl Connection {
    /// What each message of this connection carries.
    pub(super) fn tags(&self) -> Tags<'_> {
        self.recognition.tags()
    }

    /// Feeds a device packet to detection; call it before the packet's
    /// event 0 is written and before it is forwarded. Once detection has
    /// ended this is one test, inlined into the device's read.
    #[inline]
    pub(super) fn recognise(&mut self, packet: &[u8], ctx: &mut Context<'_>) {
        if self.recognition.detection.is_some() {
            self.feed_detection(packet, ctx);
        }
    }

    /// Out of line: it runs for a connection's first packets only.
    #[inline(never)]
    fn feed_detection(&mut self, packet: &[u8], ctx: &mut Context<'_>) {
        let Some(detection) = &mut self.recognition.detection else {
            return;
        };
        let detectors = ctx.settings.devices.detectors();
        if let Some(outcome) = detection.feed(detectors, packet, ctx.now) {
            // The waiting targets are settled once the packet's event 0 is
            // written (`release_waiting`): lines keep the order of events.
            self.decided(outcome, ctx);
        }
    }

    /// After a device packet's event 0: once detection has ended, each
    /// waiting target is connected or told the device is not listed. One
    /// test while nothing waits.
    #[inline]
    pub(super) fn release_waiting(&mut self, ctx: &mut Context<'_>) {
        if self.recognition.waiting != 0 && self.recognition.detection.is_none() {
            self.settle_waiting(ctx);
        }
    }

    /// Ends detection at its deadline (from the worker's timer); true
    /// when it ended now.
    pub(super) fn check_detection(&mut self, ctx: &mut Context<'_>) -> bool {
        let Some(detection) = &mut self.recognition.detection else {
            return false;
        };
        match detection.expire(ctx.settings.devices.detectors(), ctx.now) {
            Some(outcome) => {
                self.decided(outcome, ctx);
                self.settle_waiting(ctx);
                true
            }
            None => false,
        }
    }

    /// The device ended its stream: no later byte can say who it is.
    pub(super) fn stop_detection(&mut self, ctx: &mut Context<'_>) {
        let Some(detection) = &mut self.recognition.detection else {
            return;
        };
        if let Some(outcome) = detection.finish(ctx.settings.devices.detectors()) {
            self.decided(outcome, ctx);
            self.settle_waiting(ctx);
        }
    }

    /// Detection has ended: the ident is kept (and claimed, with
    /// PROXY_DEVICE_UNIQUE); the waiting targets are settled by the caller.
    #[cold]
    fn decided(&mut self, outcome: Outcome, ctx: &mut Context<'_>) {
        self.recognition.detection = None;
        match outcome {
            Outcome::Found(device) => {
                log::debug!("{}: device {device}", self.origin.ident);
                ctx.settings.devices.claim(&device, self.owner(ctx.worker));
                self.recognition.ident = Some(device);
            }
            Outcome::GaveUp(why) => {
                log::debug!("{}: device not recognised: {why}", self.origin.ident);
            }
        }
    }

    /// Each waiting target is connected (with the bytes held for it) or
    /// told the device is not listed.
    #[cold]
    fn settle_waiting(&mut self, ctx: &mut Context<'_>) {
        let waiting = std::mem::take(&mut self.recognition.waiting);
        let held = std::mem::take(&mut self.recognition.held);
        for spec in ctx.settings.targets.iter().flatten() {
            if waiting & bit(spec.id) != 0 {
                self.connect_if_listed(spec, &held, ctx);
            }
        }
    }

    /// A target with a device list, at the connection's start: connected
    /// now if detection has ended, else it waits for the outcome.
    pub(super) fn await_device(&mut self, spec: &TargetSpec, ctx: &mut Context<'_>) {
        match self.recognition.detection {
            Some(_) => self.recognition.waiting |= bit(spec.id),
            None => self.connect_if_listed(spec, &[], ctx),
        }
    }

    /// Connects a target with a device list if it lists the device, and
    /// queues `held` (the device's bytes so far) for it.
    fn connect_if_listed(&mut self, spec: &TargetSpec, held: &[u8], ctx: &mut Context<'_>) {
        let listed = ctx
            .settings
            .devices
            .admits(spec.id, self.recognition.ident.as_ref());
        if !listed {
            return self.not_listed(spec, ctx);
        }
        if let Phase::Ending(ending) = &self.phase {
            let why = ending.target_reason.clone();
            return self.target_failed_early(spec, why, ctx);
        }
        self.connect_target(spec, ctx);
        if let Some(link) = &mut self.targets[spec.id.index()] {
            if !held.is_empty() {
                // Queued (the socket is still connecting), so it cannot fail.
                let _ = link.endpoint.send(held);
            }
        }
    }

    /// Target `spec` does not take this device: its one event 2, with
    /// counts 0. Nothing else ends: a target is mandatory only for the
    /// devices it lists.
    fn not_listed(&mut self, spec: &TargetSpec, ctx: &mut Context<'_>) {
        record_not_listed(ctx.journal, ctx.counters, self.origin, self.tags(), spec);
    }

    /// Keeps a device packet for the targets still waiting, if any.
    #[inline]
    pub(super) fn hold(&mut self, packet: &[u8]) {
        if self.recognition.waiting != 0 {
            self.recognition.held.extend_from_slice(packet);
        }
    }

    /// Whether listed target `target` waits for the device to be
    /// recognised, and the device bytes held for it meanwhile.
    pub(super) fn waits_for(&self, target: TargetId) -> Option<usize> {
        (self.recognition.waiting & bit(target) != 0).then_some(self.recognition.held.len())
    }

    /// Whether listed targets wait for the device (see `waiting_room`).
    #[inline]
    pub(super) fn targets_wait(&self) -> bool {
        self.recognition.waiting != 0
    }

    /// For the device's read limit while targets wait: whether a waiting
    /// target is mandatory, whether one is not, and the room left in
    /// their (shared) queue.
    #[inline(never)]
    pub(super) fn waiting_room(&self, settings: &Settings) -> (bool, bool, usize) {
        let (mut mandatory, mut non_mandatory) = (false, false);
        for spec in settings.targets.iter().flatten() {
            if self.recognition.waiting & bit(spec.id) != 0 {
                mandatory |= spec.mandatory;
                non_mandatory |= !spec.mandatory;
            }
        }
        let room = settings
            .target_buffer
            .saturating_sub(self.recognition.held.len());
        (mandatory, non_mandatory, room)
    }

    /// At the connection's end: the targets still waiting are told the
    /// device is not listed, and the device's registration ends.
    #[inline(never)]
    pub(super) fn forget_device(&mut self, ctx: &mut Context<'_>) {
        self.recognition.detection = None;
        let waiting = std::mem::take(&mut self.recognition.waiting);
        self.recognition.held = Vec::new();
        for spec in ctx.settings.targets.iter().flatten() {
            if waiting & bit(spec.id) != 0 {
                self.not_listed(spec, ctx);
            }
        }
        if let Some(device) = &self.recognition.ident {
            ctx.settings.devices.release(device, self.owner(ctx.worker));
        }
    }

    fn owner(&self, worker: usize) -> Owner {
        Owner {
            connection: self.origin.ident,
            worker,
            opened_at: self.opened_at,
        }
    }
}
