//! The device side of a connection: reading it, at the pace its targets
//! allow (see `device_read_limit` and the invariants in `connection.rs`),
//! noticing its end of stream and a reset after it, and flushing the
//! replies queued for it.

use super::lifecycle::Phase;
use super::{Connection, Context, Settings};
use crate::net::reason::Reason;
use crate::net::side::Side;
use crate::net::socket::ReadOutcome;

impl Connection {
    /// Reads the device once (in phase `Open`) and forwards what came.
    pub(super) fn read_device(&mut self, ctx: &mut Context<'_>, buffer: &mut [u8]) -> bool {
        if !self.device.readable {
            return false;
        }
        let limit = self.device_read_limit(ctx.settings, buffer.len());
        if limit == 0 {
            return false;
        }
        // While the writer is behind, at most what is left of its share.
        let limit = limit.min(ctx.journal.read_allowance(&self.recorded));
        if limit == 0 {
            self.held_back = true;
            return false;
        }
        match self.device.read(&mut buffer[..limit]) {
            ReadOutcome::Data(n) => {
                self.last_activity = ctx.now;
                ctx.received(Side::Device, n);
                ctx.journal.charge_packet(&mut self.recorded, n);
                let packet = &buffer[..n];
                self.recognise(packet, ctx);
                ctx.journal
                    .data(self.origin, self.tags(), Side::Device, None, packet);
                self.release_waiting(ctx);
                self.forward_to_targets(packet, ctx);
                true
            }
            ReadOutcome::WouldBlock => false,
            ReadOutcome::Closed => {
                self.phase = Phase::ReadClosed;
                self.stop_detection(ctx);
                true
            }
            ReadOutcome::Failed(e) => {
                self.end(Reason::io(&e), Reason::DeviceFailed, false);
                true
            }
        }
    }

    /// A device that resets after its end of stream is read no more, so
    /// only its socket's pending error tells: then everything closes at
    /// once, as for any device reset. Looked at once per poll event, in
    /// phase `ReadClosed`.
    pub(super) fn check_device_reset(&mut self) -> bool {
        if !self.device.hangup {
            return false;
        }
        self.device.hangup = false;
        match self.device.stream.take_error() {
            Ok(None) => false,
            // After the device's FIN the kernel reports its RST as EPIPE,
            // which names `reset by peer` too.
            Ok(Some(e)) | Err(e) => {
                self.end(Reason::io(&e), Reason::DeviceFailed, false);
                true
            }
        }
    }

    /// How much may be read from the device now, never more than a
    /// target's buffer at once:
    /// - with a mandatory target, nothing while one still has bytes
    ///   queued, so TCP holds the device back and a queue never holds more
    ///   than the rest of one read (bytes then go straight from one socket
    ///   to the other, not through a queue); a slower non-mandatory target
    ///   overflows and is dropped;
    /// - without one, as much as the non-mandatory target with the most
    ///   room can queue: the device goes at the pace of the fastest
    ///   target, which never overflows (nor does one alone);
    /// - with no target left, as much as one read takes.
    ///
    /// Targets waiting for the device to be recognised count with the
    /// bytes held for them, except that a mandatory one stops the device
    /// only once they fill a target's buffer: detection needs the bytes.
    fn device_read_limit(&self, settings: &Settings, buffer_len: usize) -> usize {
        let (mut mandatory, mut non_mandatory) = (false, false);
        let mut most_room = 0;
        let mut one_read = buffer_len.min(settings.max_read);
        if self.targets_wait() {
            let (waiting_mandatory, waiting_other, room) = self.waiting_room(settings);
            mandatory = waiting_mandatory;
            non_mandatory = waiting_other;
            if mandatory {
                one_read = one_read.min(room);
            }
            if non_mandatory {
                most_room = room;
            }
        }
        for (spec, link) in self.links(settings) {
            let queued = link.endpoint.queued();
            if spec.mandatory {
                if queued > 0 {
                    return 0;
                }
                mandatory = true;
            } else {
                non_mandatory = true;
                most_room = most_room.max(settings.target_buffer.saturating_sub(queued));
            }
        }
        match non_mandatory && !mandatory {
            true => one_read.min(most_room),
            false => one_read,
        }
    }

    pub(super) fn flush_device(&mut self, ctx: &mut Context<'_>) -> bool {
        if self.device.queued() == 0 {
            return false;
        }
        match self.device.flush() {
            Ok(0) => false,
            Ok(written) => {
                ctx.sent(Side::Device, written);
                self.last_activity = ctx.now;
                true
            }
            Err(e) => {
                self.end(Reason::io(&e), Reason::DeviceFailed, false);
                true
            }
        }
    }
}
