//! What target N missed, found by reading the message files in order: the
//! index of device connections and the queue of deliveries.
//!
//! Per device connection whose event 1 was read, the index keeps a few
//! counters and offsets, never payloads: where it started, its first packet
//! (the login), the device bytes stored so far, and until target N's event
//! 2 the last [`RECENT`] packets (a target's queue is bounded, so what it
//! had not been sent in full when it was dropped is nearly always among
//! them). From target N's event 2 on, every further packet is missed and
//! listed (a few bytes each, see [`PacketList`]) until the lists of this
//! target hold [`LIST_BUDGET`]; beyond that, and when the last packets do
//! not reach back far enough, a delivery finds its packets by reading the
//! files from a known point instead ([`ScanFrom`]): slower, never wrong.
//!
//! Rules (the SPEC's "Catch-up"):
//! - target N got the first `proxy.bytes.sent - header` device bytes; a
//!   packet counts as delivered only if all its bytes are within them;
//! - no event 1 and an event 2 (connect failed): it got nothing;
//! - `device not listed`, UDP sessions (`proxy.transport`) and catch-up's
//!   own messages (`proxy.catchup`) are no misses;
//! - a connection is delivered once its device event 2 is read, in the
//!   order of those lines ([`Key`]); one whose stored bytes do not add up
//!   to its `proxy.bytes.received` lost lines (a deleted file) and is not
//!   sent with a hole: it is logged as lost;
//! - a connection still open where a run of the daemon started was cut by a
//!   crash (kill -9): it ends there; if target N had been dropped, what it
//!   missed up to the crash is delivered; if target N was still connected,
//!   what it got is unknown and nothing is sent (see docs/CATCHUP.md).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;

use log::warn;

use super::files::Pos;
use super::packets::{PacketAt, PacketList};
use super::target::HeaderRule;
use crate::net::side::Side;
use crate::store::message::{Event, StoredMessage};

/// Packets kept per connection until target N's fate is known.
pub const RECENT: usize = 16;

/// Memory all packet lists of one target may hold.
pub const LIST_BUDGET: usize = 16 << 20;

/// The reason of a target event 2 for a device that is not its to get.
const NOT_LISTED: &str = "device not listed";

/// A delivery's place in the queue: where its device connection ended,
/// then where it started (connections cut by a crash all end where the
/// next run started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub end: Pos,
    pub start: Pos,
}

/// Where a delivery's remaining packets are found by reading: from `pos`
/// on, the connection's data lines, `stored_before` device bytes into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanFrom {
    pub pos: Pos,
    pub stored_before: u64,
}

/// One missed device connection, ready to be delivered.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub key: Key,
    pub ident: u64,
    pub peer: SocketAddr,
    pub device: Option<Box<str>>,
    /// The connection's first packet, sent first because target N's
    /// missed part does not start with it.
    pub login: Option<PacketAt>,
    /// Device bytes target N got: packets that end within them are not
    /// sent again (the login aside).
    pub delivered: u64,
    /// The missed packets, in order ...
    pub listed: PacketList,
    /// ... then, if set, the rest as found by reading up to `key.end`.
    pub scan: Option<ScanFrom>,
    /// Device bytes to send, the login included (a lower bound while part
    /// of it is found by scanning).
    pub bytes: u64,
}

/// What is known of target N in an open connection.
enum Fate {
    /// Its event 2 is not read yet: the last packets, with the device
    /// bytes stored up to the end of each.
    Unknown {
        recent: VecDeque<(PacketAt, u64)>,
    },
    Missed(Miss),
}

/// What target N missed so far in an open connection.
struct Miss {
    delivered: u64,
    listed: PacketList,
    scan: Option<ScanFrom>,
    bytes: u64,
}

/// An open device connection.
struct Tracked {
    start: Pos,
    peer: SocketAddr,
    device: Option<Box<str>>,
    /// Device bytes of its data lines so far.
    stored: u64,
    packets: u64,
    first: Option<PacketAt>,
    fate: Fate,
}

/// The index of one catch-up target.
pub struct Index {
    number: u8,
    label: String,
    header: HeaderRule,
    open: HashMap<u64, Tracked>,
    pending: BTreeMap<Key, Delivery>,
    /// Start positions of `open` and `pending`.
    starts: BTreeSet<(Pos, u64)>,
    /// Deliveries up to this one are done.
    done: Option<Key>,
    /// Where runs of the daemon started, not passed yet, in order.
    boundaries: VecDeque<Pos>,
    list_memory: usize,
    /// Connections that could not be delivered because lines were missing.
    lost: u64,
    /// A live connection to target N was made since this was last taken.
    target_up: bool,
}

impl Index {
    pub fn new(
        number: u8,
        label: String,
        header: HeaderRule,
        done: Option<Key>,
        mut boundaries: Vec<Pos>,
    ) -> Index {
        boundaries.sort();
        boundaries.dedup();
        Index {
            number,
            label,
            header,
            open: HashMap::new(),
            pending: BTreeMap::new(),
            starts: BTreeSet::new(),
            done,
            boundaries: boundaries.into(),
            list_memory: 0,
            lost: 0,
            target_up: false,
        }
    }

    /// Takes in the line that starts at `pos`.
    pub fn line(&mut self, pos: Pos, bytes: &[u8]) {
        self.reached(pos);
        // A damaged line is no message; if it was a packet, its
        // connection's byte count shows the hole.
        let Ok(message) = StoredMessage::parse(bytes) else {
            return;
        };
        if message.catchup || message.transport.is_some() {
            return;
        }
        let Some(ident) = parse_ident(&message.ident) else {
            return;
        };
        let ours = message.source.source() == self.number && self.is_ours(&message);
        match (message.source, message.event) {
            (Side::Device, Event::Established) => self.opened(ident, &message, pos),
            (Side::Device, Event::Data) => self.packet(ident, &message, pos),
            (Side::Device, Event::Dropped) => self.ended(ident, &message, pos),
            (Side::Target(_), Event::Dropped) if ours => self.target_dropped(ident, &message),
            (Side::Target(_), Event::Established) if ours => self.target_up = true,
            _ => {}
        }
        if let (Some(tracked), Some(device)) = (self.open.get_mut(&ident), &message.device_ident) {
            tracked.device.get_or_insert_with(|| device.as_ref().into());
        }
    }

    /// Everything before `pos` has been read: connections open where a run
    /// started before it were cut by a crash.
    pub fn reached(&mut self, pos: Pos) {
        while let Some(&boundary) = self.boundaries.front() {
            if boundary > pos {
                return;
            }
            self.boundaries.pop_front();
            self.crashed_at(boundary);
        }
    }

    /// Whether a live connection to target N was made since the last call
    /// (it accepts connections again).
    pub fn take_target_up(&mut self) -> bool {
        std::mem::take(&mut self.target_up)
    }

    /// The next delivery, in order.
    pub fn next_delivery(&self) -> Option<&Delivery> {
        self.pending.values().next()
    }

    /// The delivery `key` is done (delivered, or given up for good).
    pub fn complete(&mut self, key: Key) {
        if let Some(delivery) = self.pending.remove(&key) {
            self.list_memory = self.list_memory.saturating_sub(delivery.listed.memory());
            self.starts.remove(&(key.start, delivery.ident));
        }
        self.done = Some(self.done.map_or(key, |done| done.max(key)));
    }

    pub fn done(&self) -> Option<Key> {
        self.done
    }

    /// Where reading must start again after a restart for nothing to be
    /// missed: the start of the oldest connection still open or waiting,
    /// else `read` (where reading stands).
    pub fn scan_start(&self, read: Pos) -> Pos {
        self.starts.first().map_or(read, |(pos, _)| *pos).min(read)
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Connections lost for missing lines so far.
    #[cfg(test)]
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Connections with something missed (ended or still open), and
    /// their missed device bytes.
    pub fn backlog(&self) -> (u64, u64) {
        let mut connections = self.pending.len() as u64;
        let mut bytes: u64 = self.pending.values().map(|d| d.bytes).sum();
        for tracked in self.open.values() {
            if let Fate::Missed(miss) = &tracked.fate {
                if miss.bytes > 0 {
                    connections += 1;
                    bytes += miss.bytes;
                }
            }
        }
        (connections, bytes)
    }

    fn is_ours(&self, message: &StoredMessage<'_>) -> bool {
        message.target.as_deref() == Some(self.label.as_str())
    }

    fn opened(&mut self, ident: u64, message: &StoredMessage<'_>, pos: Pos) {
        let Ok(peer) = message.peer.parse::<SocketAddr>() else {
            return;
        };
        if let Some(old) = self.open.remove(&ident) {
            // An ident seen again (a run that crashed, then the same
            // random ident): the older connection ended unseen.
            self.forget(ident, old);
        }
        self.starts.insert((pos, ident));
        self.open.insert(
            ident,
            Tracked {
                start: pos,
                peer,
                device: message.device_ident.as_deref().map(Into::into),
                stored: 0,
                packets: 0,
                first: None,
                fate: Fate::Unknown {
                    recent: VecDeque::new(),
                },
            },
        );
    }

    fn packet(&mut self, ident: u64, message: &StoredMessage<'_>, pos: Pos) {
        let Some(tracked) = self.open.get_mut(&ident) else {
            return;
        };
        let packet = PacketAt {
            pos,
            size: message.payload_size.unwrap_or(0),
            stored: message.payload_hex.is_some(),
        };
        let before = tracked.stored;
        tracked.stored += packet.size;
        tracked.packets += 1;
        tracked.first.get_or_insert(packet);
        match &mut tracked.fate {
            Fate::Unknown { recent } => {
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back((packet, tracked.stored));
            }
            Fate::Missed(miss) => {
                miss.bytes += packet.size;
                if miss.scan.is_none() {
                    list(miss, packet, before, &mut self.list_memory);
                }
            }
        }
    }

    fn target_dropped(&mut self, ident: u64, message: &StoredMessage<'_>) {
        if message.reason.as_deref() == Some(NOT_LISTED) {
            if let Some(tracked) = self.open.remove(&ident) {
                self.forget(ident, tracked);
            }
            return;
        }
        let Some(tracked) = self.open.get_mut(&ident) else {
            return;
        };
        let Fate::Unknown { recent } = &mut tracked.fate else {
            return;
        };
        let header = self.header.length(tracked.peer);
        let sent = message.bytes_sent.unwrap_or(0);
        let delivered = sent.saturating_sub(header).min(tracked.stored);
        let recent = std::mem::take(recent);
        let miss = missed_so_far(tracked, recent, delivered, &mut self.list_memory);
        tracked.fate = Fate::Missed(miss);
    }

    fn ended(&mut self, ident: u64, message: &StoredMessage<'_>, pos: Pos) {
        let Some(tracked) = self.open.remove(&ident) else {
            return;
        };
        let whole = message
            .bytes_received
            .is_none_or(|received| received == tracked.stored);
        let missed = matches!(&tracked.fate, Fate::Missed(miss) if miss.bytes > 0);
        if missed && !whole {
            self.lost += 1;
            warn!(
                "target {}: catch-up of {ident:016x} is lost: {} of its {} device bytes are in \
                 the message files (a file was deleted, or a line damaged)",
                self.number,
                tracked.stored,
                message.bytes_received.unwrap_or(0)
            );
            self.forget(ident, tracked);
            return;
        }
        self.queue(ident, tracked, pos);
    }

    /// Connections open where a run started end there.
    fn crashed_at(&mut self, boundary: Pos) {
        let cut: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, tracked)| tracked.start < boundary)
            .map(|(ident, _)| *ident)
            .collect();
        for ident in cut {
            if let Some(tracked) = self.open.remove(&ident) {
                self.queue(ident, tracked, boundary);
            }
        }
    }

    /// Queues what target N missed of a connection that ended at `end`.
    fn queue(&mut self, ident: u64, tracked: Tracked, end: Pos) {
        let key = Key {
            end,
            start: tracked.start,
        };
        let already = self.done.is_some_and(|done| key <= done);
        let Fate::Missed(miss) = tracked.fate else {
            self.starts.remove(&(tracked.start, ident));
            return;
        };
        if miss.bytes == 0 || already {
            self.list_memory = self.list_memory.saturating_sub(miss.listed.memory());
            self.starts.remove(&(tracked.start, ident));
            return;
        }
        let login = tracked
            .first
            .filter(|first| first.size <= miss.delivered && first.size > 0);
        let bytes = miss.bytes + login.map_or(0, |l| l.size);
        self.pending.insert(
            key,
            Delivery {
                key,
                ident,
                peer: tracked.peer,
                device: tracked.device,
                login,
                delivered: miss.delivered,
                listed: miss.listed,
                scan: miss.scan,
                bytes,
            },
        );
    }

    fn forget(&mut self, ident: u64, tracked: Tracked) {
        if let Fate::Missed(miss) = &tracked.fate {
            self.list_memory = self.list_memory.saturating_sub(miss.listed.memory());
        }
        self.starts.remove(&(tracked.start, ident));
    }
}

/// What target N missed of `tracked` up to its drop, having got the first
/// `delivered` device bytes: the last packets if they reach back that far,
/// else everything from the connection's start, found by reading.
fn missed_so_far(
    tracked: &Tracked,
    recent: VecDeque<(PacketAt, u64)>,
    delivered: u64,
    memory: &mut usize,
) -> Miss {
    let mut miss = Miss {
        delivered,
        listed: PacketList::default(),
        scan: None,
        bytes: 0,
    };
    let reaches_back = recent.len() as u64 == tracked.packets
        || recent
            .front()
            .is_some_and(|(packet, end)| end - packet.size <= delivered);
    if !reaches_back {
        miss.scan = Some(ScanFrom {
            pos: tracked.start,
            stored_before: 0,
        });
        // A lower bound: the first missed packet may start before.
        miss.bytes = tracked.stored - delivered;
        return miss;
    }
    for (packet, end) in recent.into_iter().filter(|(_, end)| *end > delivered) {
        miss.bytes += packet.size;
        if miss.scan.is_none() {
            list(&mut miss, packet, end - packet.size, memory);
        }
    }
    miss
}

/// Lists a missed packet, or from it on has the rest found by reading
/// once the target's lists are at their budget.
fn list(miss: &mut Miss, packet: PacketAt, stored_before: u64, memory: &mut usize) {
    if *memory >= LIST_BUDGET {
        miss.scan = Some(ScanFrom {
            pos: packet.pos,
            stored_before,
        });
        return;
    }
    let before = miss.listed.memory();
    miss.listed.push(packet);
    *memory += miss.listed.memory() - before;
}

/// An ident as written: 16 hex digits.
pub fn parse_ident(text: &str) -> Option<u64> {
    if text.len() != 16 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

#[cfg(test)]
pub(crate) mod tests;
