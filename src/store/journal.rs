//! A thread's side of the message store: it turns events into JSON lines in
//! a batch and hands batches to the file writer over the bounded channel.
//!
//! One journal belongs to one thread (a worker or the acceptor), so the lines
//! of a connection, which lives on one worker, reach the channel in the
//! order they happened.
//!
//! Batching by time: a batch goes to the writer once it is [`BATCH_AGE`]
//! old or [`BATCH_BYTES`] full, not at every turn of the poll loop; at
//! tracker rates a turn holds one packet, and a channel send and a writer
//! wake-up per message cost more than the message.
//!
//! Fairness when the writer is behind: the journal never blocks its worker.
//! A batch the full channel cannot take is held here, in order, and handed
//! over as the channel frees up. Meanwhile each connection's share of the
//! unwritten lines is counted ([`Recorded`]): a connection that has added
//! more than [`FAIR_SHARE`] since the writer last caught up is not read
//! ([`Journal::may_read`]) until it does, so the busiest devices are held
//! back (TCP holds them) while a device with little to record keeps being
//! forwarded. Past [`HELD_BYTES`] held, no device is read. Nothing is
//! dropped.

use crossbeam_channel::{Sender, TrySendError};
use log::error;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::control::stats::{self, Counters};
use crate::net::reason::Reason;
use crate::net::side::Side;
use crate::store::message::{Event, Message, Micros, Origin};

/// A batch is sent once it holds this many bytes, or once it is
/// [`BATCH_AGE`] old, whichever comes first.
pub const BATCH_BYTES: usize = 128 * 1024;
/// The age at which a batch goes to the writer: well within the SPEC's
/// "reaches the file within one second", long enough that a busy worker's
/// batch holds many messages.
pub const BATCH_AGE: Duration = Duration::from_millis(20);
/// How often held batches are offered to the channel again.
const HELD_RETRY: Duration = Duration::from_millis(5);
/// While the writer is behind, what one connection may add before it waits.
pub const FAIR_SHARE: usize = 64 * 1024;
/// About the bytes of a data line besides its payload's hex.
const LINE_OVERHEAD: usize = 250;
/// Unwritten bytes one journal holds at most before no device is read.
pub const HELD_BYTES: usize = 8 << 20;
/// A new batch starts this large (below malloc's mmap threshold) and grows.
const BATCH_START: usize = 16 * 1024;

/// Batch buffers going back from the writer to the journals, so that a busy
/// store reuses warm memory instead of allocating (and faulting in) a new
/// buffer for every batch. A batch holding one large packet's line is as
/// large as that line (up to twice PROXY_MAX_PAYLOAD): those are kept too,
/// or every such packet would cost a fresh mapping. Bounded: the buffers
/// waiting here hold at most `POOL_BYTES` in all.
#[derive(Clone)]
pub struct BufferPool {
    give: Sender<Vec<u8>>,
    take: crossbeam_channel::Receiver<Vec<u8>>,
    /// Capacity of the buffers waiting in the pool.
    pooled: Arc<AtomicUsize>,
}

const POOL: usize = 32;
const POOL_BYTES: usize = 32 << 20;

impl BufferPool {
    pub fn new() -> BufferPool {
        let (give, take) = crossbeam_channel::bounded(POOL);
        BufferPool {
            give,
            take,
            pooled: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A buffer back from the writer, or a new one.
    fn take(&self) -> Vec<u8> {
        match self.take.try_recv() {
            Ok(buffer) => {
                self.pooled.fetch_sub(buffer.capacity(), Ordering::Relaxed);
                buffer
            }
            Err(_) => Vec::with_capacity(BATCH_START),
        }
    }

    /// Hands a written batch's buffer back (dropped if the pool is full).
    pub fn give(&self, mut buffer: Vec<u8>) {
        let size = buffer.capacity();
        let before = self.pooled.fetch_add(size, Ordering::Relaxed);
        buffer.clear();
        if before + size > POOL_BYTES || self.give.try_send(buffer).is_err() {
            self.pooled.fetch_sub(size, Ordering::Relaxed);
        }
    }
}

impl Default for BufferPool {
    fn default() -> Self {
        BufferPool::new()
    }
}

/// Whole JSON lines, each ending in `\n`.
pub struct Batch {
    pub lines: Vec<u8>,
    pub count: usize,
}

/// What the file writer is asked to do.
pub enum StoreCommand {
    Write(Batch),
    /// Wakes the writer to look at its "rotate requested" flag (SIGHUP).
    Rotate,
}

/// The fixed parts of every message and the store-mode switches.
#[derive(Debug, Clone, Copy)]
pub struct JournalSettings {
    pub channel_id: u64,
    pub protocol_id: u64,
    pub store: bool,
    pub max_payload: u64,
}

pub struct Journal {
    sender: Sender<StoreCommand>,
    pool: BufferPool,
    settings: JournalSettings,
    counters: Arc<Counters>,
    batch: Vec<u8>,
    count: usize,
    /// When the first line of the batch was added.
    batch_started: Option<Instant>,
    /// Batches the channel could not take yet, oldest first.
    held: VecDeque<Batch>,
    held_bytes: usize,
    /// Grows each time every held batch has been handed over (the writer
    /// caught up): connections' shares count from the last change.
    epoch: u64,
    writer_gone_reported: bool,
}

/// What one connection has added to its journal's unwritten lines since the
/// writer last caught up.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recorded {
    epoch: u64,
    bytes: usize,
}

impl Journal {
    /// A journal that counts the messages it makes in `counters`.
    pub fn new(
        sender: Sender<StoreCommand>,
        pool: BufferPool,
        settings: JournalSettings,
        counters: Arc<Counters>,
    ) -> Journal {
        Journal {
            sender,
            pool,
            settings,
            counters,
            batch: Vec::new(),
            count: 0,
            batch_started: None,
            held: VecDeque::new(),
            held_bytes: 0,
            epoch: 0,
            writer_gone_reported: false,
        }
    }

    /// Whether a connection that has `recorded` this much may be read now.
    pub fn may_read(&self, recorded: &Recorded) -> bool {
        self.read_allowance(recorded) > 0
    }

    /// How many bytes a connection that has `recorded` this much may read
    /// now: any number while the writer keeps up; while it is behind, what
    /// is left of its share (as payload, whose line is twice as long), so
    /// that one large read cannot take more than the share either.
    pub fn read_allowance(&self, recorded: &Recorded) -> usize {
        if self.held.is_empty() || !self.settings.store {
            return usize::MAX;
        }
        if self.held_bytes >= HELD_BYTES {
            return 0;
        }
        let share = if recorded.epoch == self.epoch {
            recorded.bytes
        } else {
            0
        };
        FAIR_SHARE.saturating_sub(share) / 2
    }

    /// Counts the line of a packet of `size` bytes against a connection's
    /// share (nothing with the store off: no line is written).
    pub fn charge_packet(&self, recorded: &mut Recorded, size: usize) {
        if self.settings.store {
            self.charge(
                recorded,
                size.saturating_mul(2).saturating_add(LINE_OVERHEAD),
            );
        }
    }

    /// Counts `bytes` of lines against a connection's share.
    pub fn charge(&self, recorded: &mut Recorded, bytes: usize) {
        if recorded.epoch != self.epoch {
            *recorded = Recorded {
                epoch: self.epoch,
                bytes: 0,
            };
        }
        recorded.bytes = recorded.bytes.saturating_add(bytes);
    }

    /// Whether batches wait for the writer: connections may be held back.
    pub fn is_behind(&self) -> bool {
        !self.held.is_empty()
    }

    /// The writer's progress, as seen by [`Recorded`] shares: a change means
    /// connections held back may be read again.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Hands over held batches the channel takes now, and the batch if it
    /// is due; never blocks. Call it at every turn of the loop.
    pub fn settle(&mut self, now: Instant) {
        self.hand_over_held();
        let due = self
            .batch_started
            .is_some_and(|started| now.saturating_duration_since(started) >= BATCH_AGE);
        if due {
            self.seal_batch();
        }
    }

    /// When [`Journal::settle`] has work to do next, if ever.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let retry = (!self.held.is_empty()).then(|| now + HELD_RETRY);
        let batch = self.batch_started.map(|started| started + BATCH_AGE);
        match (retry, batch) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Event 1 of the device (`target` None) or of a target.
    pub fn connected(
        &mut self,
        origin: Origin,
        tags: Tags<'_>,
        source: Side,
        target: Option<&str>,
    ) {
        let message = self.message(origin, tags, Event::Established, source, target);
        self.write(&message);
    }

    /// Event 0: a packet, written only in store mode; its hex only when it
    /// is no larger than the maximum payload. Inlined: without store mode
    /// a packet costs its caller one test.
    #[inline]
    pub fn data(
        &mut self,
        origin: Origin,
        tags: Tags<'_>,
        source: Side,
        target: Option<&str>,
        payload: &[u8],
    ) {
        if self.settings.store {
            self.write_data(origin, tags, source, target, payload);
        }
    }

    fn write_data(
        &mut self,
        origin: Origin,
        tags: Tags<'_>,
        source: Side,
        target: Option<&str>,
        payload: &[u8],
    ) {
        let mut message = self.message(origin, tags, Event::Data, source, target);
        message.payload_size = Some(payload.len());
        if payload.len() as u64 <= self.settings.max_payload {
            message.payload = Some(payload);
        }
        self.write(&message);
    }

    /// Event 2, with why and how many bytes went each way.
    pub fn dropped(
        &mut self,
        origin: Origin,
        tags: Tags<'_>,
        source: Side,
        target: Option<&str>,
        close: &Closed<'_>,
    ) {
        let reason = close.reason.text();
        let mut message = self.message(origin, tags, Event::Dropped, source, target);
        message.reason = Some(&reason);
        message.bytes_received = Some(close.received);
        message.bytes_sent = Some(close.sent);
        self.write(&message);
    }

    /// A catch-up delivery's event 1 (`close` None) or event 2, for
    /// target `source`: `proxy.catchup: true`, and the device's ident if
    /// it was recognised. Handed to the writer at once.
    pub fn catchup(
        &mut self,
        origin: Origin,
        number: u8,
        target: &str,
        device_ident: Option<&str>,
        close: Option<&CatchUpEnd<'_>>,
    ) {
        let Some(source) = Side::from_source(number) else {
            return;
        };
        let event = match close {
            Some(_) => Event::Dropped,
            None => Event::Established,
        };
        let tags = Tags {
            device: device_ident,
            transport: None,
        };
        let mut message = self.message(origin, tags, event, source, Some(target));
        message.catchup = true;
        if let Some(close) = close {
            message.reason = Some(close.reason);
            message.bytes_received = Some(close.received);
            message.bytes_sent = Some(close.sent);
        }
        self.write(&message);
        self.flush();
    }

    /// Hands everything to the writer, waiting for room in the channel as
    /// long as it takes: for the end of a thread (shutdown), where every
    /// line must reach the file and nothing else is left to do.
    pub fn flush(&mut self) {
        self.seal_batch();
        while let Some(batch) = self.held.pop_front() {
            self.held_bytes -= batch.lines.len();
            if self.sender.send(StoreCommand::Write(batch)).is_err() {
                self.report_writer_gone();
                self.held.clear();
                self.held_bytes = 0;
            }
        }
        self.epoch += 1;
    }

    /// Ends the current batch: into the channel, or held behind the
    /// batches already waiting.
    fn seal_batch(&mut self) {
        self.batch_started = None;
        if self.count == 0 {
            return;
        }
        let batch = Batch {
            lines: std::mem::replace(&mut self.batch, self.pool.take()),
            count: std::mem::take(&mut self.count),
        };
        self.held_bytes += batch.lines.len();
        self.held.push_back(batch);
        self.hand_over_held();
    }

    /// Offers held batches to the channel in order until it is full.
    fn hand_over_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        while let Some(batch) = self.held.pop_front() {
            let size = batch.lines.len();
            match self.sender.try_send(StoreCommand::Write(batch)) {
                Ok(()) => self.held_bytes -= size,
                Err(TrySendError::Full(command)) => {
                    if let StoreCommand::Write(batch) = command {
                        self.held.push_front(batch);
                    }
                    return;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.held_bytes -= size;
                    self.report_writer_gone();
                }
            }
        }
        // Every held batch is with the writer: shares start again.
        self.epoch += 1;
    }

    fn report_writer_gone(&mut self) {
        if !self.writer_gone_reported {
            self.writer_gone_reported = true;
            error!("the message writer has stopped; messages can no longer be stored");
        }
    }

    fn message<'a>(
        &self,
        origin: Origin,
        tags: Tags<'a>,
        event: Event,
        source: Side,
        target: Option<&'a str>,
    ) -> Message<'a> {
        let time = Micros::now();
        Message {
            channel_id: self.settings.channel_id,
            protocol_id: self.settings.protocol_id,
            ident: origin.ident,
            peer: origin.peer,
            event,
            source,
            payload_size: None,
            payload: None,
            time,
            target,
            reason: None,
            bytes_received: None,
            bytes_sent: None,
            device_ident: tags.device,
            catchup: false,
            transport: tags.transport,
        }
    }

    fn write(&mut self, message: &Message<'_>) {
        // A large packet's line grows the batch once, not by doubling.
        self.batch.reserve(message.json_len_hint());
        message.write_json(&mut self.batch);
        self.batch.push(b'\n');
        self.count += 1;
        stats::add(&self.counters.messages, 1);
        if self.batch_started.is_none() {
            self.batch_started = Some(Instant::now());
        }
        if self.batch.len() >= BATCH_BYTES {
            self.seal_batch();
        }
    }
}

/// What every message of one connection (or UDP session) carries besides
/// its origin, the same on each of them: `device.ident` once the device is
/// recognised (borrowed from the connection, which allocated it once), and
/// `proxy.transport` for a UDP session. Two words, passed by value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tags<'a> {
    pub device: Option<&'a str>,
    pub transport: Option<&'static str>,
}

/// How a catch-up delivery ended, for its event 2.
pub struct CatchUpEnd<'a> {
    pub reason: &'a str,
    pub received: u64,
    pub sent: u64,
}

/// How one side of a connection ended, for its event 2.
pub struct Closed<'a> {
    pub reason: &'a Reason,
    pub received: u64,
    pub sent: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_gives_back_large_buffers_within_its_byte_budget() {
        let pool = BufferPool::new();
        let large = 4 << 20;
        for _ in 0..POOL {
            pool.give(Vec::with_capacity(large));
        }
        let kept = POOL_BYTES / large;
        assert_eq!(pool.pooled.load(Ordering::Relaxed), kept * large);
        for _ in 0..kept {
            assert!(pool.take().capacity() >= large, "a kept buffer comes back");
        }
        assert_eq!(pool.pooled.load(Ordering::Relaxed), 0);
        assert_eq!(pool.take().capacity(), BATCH_START, "then new ones");
    }

    #[test]
    fn pool_keeps_at_most_its_count_of_small_buffers() {
        let pool = BufferPool::new();
        for _ in 0..POOL * 2 {
            pool.give(Vec::with_capacity(1024));
        }
        assert_eq!(pool.take.len(), POOL);
        assert_eq!(pool.pooled.load(Ordering::Relaxed), POOL * 1024);
    }

    fn journal(capacity: usize) -> (Journal, crossbeam_channel::Receiver<StoreCommand>) {
        let (sender, receiver) = crossbeam_channel::bounded(capacity);
        let settings = JournalSettings {
            channel_id: 1,
            protocol_id: 0,
            store: true,
            max_payload: 1 << 20,
        };
        let journal = Journal::new(sender, BufferPool::new(), settings, Arc::default());
        (journal, receiver)
    }

    fn origin() -> Origin {
        Origin {
            ident: crate::store::message::Ident(7),
            peer: "127.0.0.1:9".parse().expect("address"),
        }
    }

    #[test]
    fn a_batch_waits_for_its_age_then_goes() {
        let (mut journal, receiver) = journal(4);
        journal.connected(origin(), Tags::default(), Side::Device, None);
        let start = Instant::now();
        journal.settle(start);
        assert!(receiver.is_empty(), "a young batch stays");
        assert!(journal.next_deadline(start).is_some());
        journal.settle(start + BATCH_AGE + Duration::from_millis(1));
        assert_eq!(receiver.len(), 1, "an old batch goes");
        assert_eq!(journal.next_deadline(start), None, "nothing left to do");
    }

    #[test]
    fn a_full_channel_holds_batches_and_the_busiest_connection_back() {
        let (mut journal, receiver) = journal(1);
        let (mut busy, quiet) = (Recorded::default(), Recorded::default());
        let payload = vec![7u8; 16 * 1024];
        let later = Instant::now() + BATCH_AGE * 2;
        for _ in 0..2 {
            journal.data(origin(), Tags::default(), Side::Device, None, &payload);
            journal.charge(&mut busy, payload.len() * 2);
            journal.settle(later);
        }
        assert!(
            journal.is_behind(),
            "the second batch waits: the channel holds one"
        );
        journal.charge(&mut busy, FAIR_SHARE);
        assert!(
            !journal.may_read(&busy),
            "past its share, the busy one waits"
        );
        assert!(journal.may_read(&quiet), "the quiet one goes on");

        // The writer takes a batch: the held one goes, shares start again.
        assert!(matches!(receiver.try_recv(), Ok(StoreCommand::Write(_))));
        journal.settle(later);
        assert!(!journal.is_behind());
        assert!(journal.may_read(&busy));
        assert_eq!(receiver.len(), 1, "nothing lost, nothing doubled");
    }

    #[test]
    fn past_the_held_bound_no_connection_is_read() {
        let (mut journal, _receiver) = journal(1);
        let payload = vec![1u8; 256 * 1024];
        let later = Instant::now() + BATCH_AGE * 2;
        while journal.held_bytes < HELD_BYTES {
            journal.data(origin(), Tags::default(), Side::Device, None, &payload);
            journal.settle(later);
        }
        assert!(!journal.may_read(&Recorded::default()));
    }
}
