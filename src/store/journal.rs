//! A thread's side of the message store: it turns events into JSON lines in
//! a batch and hands full batches to the file writer over the bounded channel.
//!
//! One journal belongs to one thread (a worker or the acceptor), so the lines
//! of a connection, which lives on one worker, reach the channel in the
//! order they happened. `send` blocks when the channel is full: the worker
//! waits for the writer and TCP holds the devices back; nothing is dropped.

use crossbeam_channel::Sender;
use log::error;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::control::stats::{self, Counters};
use crate::net::reason::Reason;
use crate::net::side::Side;
use crate::store::message::{Event, Message, Micros, Origin};

/// A batch is sent once it holds this many bytes (or at the end of a loop
/// iteration, whichever comes first).
const BATCH_BYTES: usize = 128 * 1024;
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
    writer_gone_reported: bool,
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
            writer_gone_reported: false,
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

    /// Hands the batch to the writer; called at the end of every loop
    /// iteration so that lines reach the file promptly.
    pub fn flush(&mut self) {
        if self.count == 0 {
            return;
        }
        let batch = Batch {
            lines: std::mem::replace(&mut self.batch, self.pool.take()),
            count: std::mem::take(&mut self.count),
        };
        if self.sender.send(StoreCommand::Write(batch)).is_err() && !self.writer_gone_reported {
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
        if self.batch.len() >= BATCH_BYTES {
            self.flush();
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
}
