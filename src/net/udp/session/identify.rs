//! Who a UDP session's device is: each datagram is looked at until one
//! names it, within the detection window (the device's first
//! [`WINDOW_BYTES`], [`DETECTION_TIME`] from the session's start), and
//! what the answer decides: `device.ident` on the session's messages from
//! then on, a socket for each target whose device list names it (with the
//! datagrams held for it), `device not listed` for the others, and, with
//! PROXY_DEVICE_UNIQUE, the end of the device's older connection.

use log::debug;

use super::{Ctx, Session};
use crate::device::{self, DETECTION_TIME, Ident, WINDOW_BYTES};
use crate::net::connection::{TargetAddresses, TargetSpec};
use crate::net::devices::{Owner, record_not_listed};
use crate::net::side::TargetId;
use crate::store::journal::Tags;
use crate::store::message::UDP;

impl Session {
    /// What each message of the session carries.
    pub(super) fn tags(&self) -> Tags<'_> {
        Tags {
            device: self.device.as_ref().map(Ident::as_str),
            transport: Some(UDP),
        }
    }

    /// Looks for the device's ident in a datagram, within the detection
    /// window: the first [`WINDOW_BYTES`] the device sent, and
    /// [`DETECTION_TIME`] from the session's start. The waiting targets are
    /// settled after the datagram's event 0 (`settle_waiting`), so that
    /// lines keep the order of events.
    pub(super) fn detect(&mut self, payload: &[u8], ctx: &mut Ctx<'_>) {
        if ctx.now >= self.opened_at + DETECTION_TIME {
            return self.decided(None, ctx);
        }
        match device::detect_datagram(ctx.settings.devices.detectors(), payload) {
            Some(found) => self.decided(Some(found), ctx),
            None if self.received >= WINDOW_BYTES as u64 => self.decided(None, ctx),
            None => {}
        }
    }

    /// Ends detection when its time is up (from the worker's timer).
    pub fn check_detection(&mut self, addresses: &TargetAddresses, ctx: &mut Ctx<'_>) {
        if self.detecting && ctx.now >= self.opened_at + DETECTION_TIME {
            self.decided(None, ctx);
            self.settle_waiting(addresses, ctx);
        }
    }

    /// Detection has ended with the device's ident, or without: the ident
    /// is kept (and claimed, with PROXY_DEVICE_UNIQUE).
    pub(super) fn decided(&mut self, found: Option<Ident>, ctx: &mut Ctx<'_>) {
        self.detecting = false;
        match found {
            Some(device) => {
                debug!("{}: device {device}", self.origin.ident);
                ctx.settings.devices.claim(&device, self.owner(ctx.worker));
                self.device = Some(device);
            }
            None => debug!("{}: device not recognised", self.origin.ident),
        }
    }

    /// Once detection has ended, each waiting target gets its socket and
    /// the datagrams held for it, or is told the device is not listed.
    pub(super) fn settle_waiting(&mut self, addresses: &TargetAddresses, ctx: &mut Ctx<'_>) {
        if self.detecting || self.waiting == 0 {
            return;
        }
        let waiting = std::mem::take(&mut self.waiting);
        let held = std::mem::take(&mut self.held);
        for spec in ctx.settings.targets.iter().flatten() {
            if waiting & bit(spec.id) == 0 {
                continue;
            }
            if !ctx.settings.devices.admits(spec.id, self.device.as_ref()) {
                self.not_listed(spec, ctx);
                continue;
            }
            self.open_target(spec, addresses, ctx);
            for datagram in &held {
                self.send_to_target(spec.id.index(), datagram, ctx);
            }
        }
    }

    /// A target with a device list that does not take this device: its
    /// one event 2, with counts 0; nothing else ends.
    pub(super) fn not_listed(&mut self, spec: &TargetSpec, ctx: &mut Ctx<'_>) {
        record_not_listed(ctx.journal, ctx.counters, self.origin, self.tags(), spec);
    }

    pub(super) fn owner(&self, worker: usize) -> Owner {
        Owner {
            connection: self.origin.ident,
            worker,
            opened_at: self.opened_at,
        }
    }

    /// At the session's end: the targets still waiting are told the
    /// device is not listed, and the device's registration ends.
    pub(super) fn forget_device(&mut self, ctx: &mut Ctx<'_>) {
        let waiting = std::mem::take(&mut self.waiting);
        self.held = Vec::new();
        for spec in ctx.settings.targets.iter().flatten() {
            if waiting & bit(spec.id) != 0 {
                self.not_listed(spec, ctx);
            }
        }
        if let Some(device) = &self.device {
            ctx.settings.devices.release(device, self.owner(ctx.worker));
        }
    }
}

/// The bit of `target` in a set of waiting targets.
pub(super) fn bit(target: TargetId) -> u8 {
    1 << target.index()
}
