//! The index's rules, fed message lines as the daemon writes them.

use super::*;
use crate::config::SendProxyProtocol;
use crate::store::message::{Ident, Message, Micros};

pub const PEER: &str = "10.1.2.3:4000";
pub const LABEL: &str = "127.0.0.1:7001";

/// A message line as the daemon writes it.
pub fn line<'a>(ident: u64, source: u8, event: u8, f: impl FnOnce(&mut Message<'a>)) -> Vec<u8> {
    let mut message = Message {
        channel_id: 1,
        protocol_id: 0,
        ident: Ident(ident),
        peer: PEER.parse().unwrap(),
        event: match event {
            0 => Event::Data,
            1 => Event::Established,
            _ => Event::Dropped,
        },
        source: Side::from_source(source).expect("a source 0..=3"),
        payload_size: None,
        payload: None,
        time: Micros(1_795_000_000_000_000),
        target: (source > 0).then_some(LABEL),
        reason: None,
        bytes_received: None,
        bytes_sent: None,
        device_ident: None,
        catchup: false,
        transport: None,
    };
    f(&mut message);
    let mut out = Vec::new();
    message.write_json(&mut out);
    out
}

pub fn data(ident: u64, payload: &[u8]) -> Vec<u8> {
    line(ident, 0, 0, |m| {
        m.payload_size = Some(payload.len());
        m.payload = Some(payload);
    })
}

pub fn dropped(ident: u64, source: u8, reason: &str, received: u64, sent: u64) -> Vec<u8> {
    line(ident, source, 2, |m| {
        m.reason = Some(reason);
        m.bytes_received = Some(received);
        m.bytes_sent = Some(sent);
    })
}

/// Feeds lines at made-up increasing offsets of file 0.
pub struct Feed {
    pub index: Index,
    offset: u64,
}

impl Feed {
    pub fn new(send_proxy: SendProxyProtocol, boundaries: Vec<Pos>) -> Feed {
        let header = HeaderRule::new(send_proxy, vec!["127.0.0.1:5555".parse().unwrap()]);
        Feed {
            index: Index::new(1, LABEL.into(), header, None, boundaries),
            offset: 0,
        }
    }

    pub fn at(&self) -> Pos {
        Pos {
            file: 0,
            offset: self.offset,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Pos {
        let pos = self.at();
        self.index.line(pos, bytes);
        self.offset += bytes.len() as u64 + 1;
        pos
    }

    /// A connection with packets of `sizes`; target 1 dropped after
    /// `sent` bytes once `before` packets were in. Returns the packet
    /// positions.
    pub fn connection(
        &mut self,
        ident: u64,
        sizes: &[usize],
        before: usize,
        sent: u64,
    ) -> Vec<Pos> {
        self.feed(&line(ident, 0, 1, |_| {}));
        let mut positions = Vec::new();
        let mut total = 0;
        for (n, &size) in sizes.iter().enumerate() {
            if n == before {
                self.feed(&dropped(ident, 1, "reset by peer", 0, sent));
            }
            positions.push(self.feed(&data(ident, &vec![n as u8; size])));
            total += size as u64;
        }
        if before >= sizes.len() {
            self.feed(&dropped(ident, 1, "closed by peer", 0, sent));
        }
        self.feed(&dropped(ident, 0, "closed by peer", total, 0));
        positions
    }
}

fn sizes_of(delivery: &Delivery) -> Vec<u64> {
    delivery.listed.iter().map(|p| p.size).collect()
}

#[test]
fn a_target_that_never_connected_misses_every_packet() {
    let mut feed = Feed::new(SendProxyProtocol::Off, Vec::new());
    feed.feed(&line(7, 0, 1, |_| {}));
    feed.feed(&dropped(7, 1, "connect failed: connection refused", 0, 0));
    for size in [17, 5, 9] {
        feed.feed(&data(7, &vec![1; size]));
    }
    let end = feed.feed(&dropped(7, 0, "closed by peer", 31, 0));
    let delivery = feed.index.next_delivery().expect("a delivery");
    assert_eq!(delivery.key.end, end);
    assert_eq!(
        delivery.login, None,
        "the missed part starts with the login"
    );
    assert_eq!(sizes_of(delivery), [17, 5, 9]);
    assert_eq!(
        (delivery.delivered, delivery.bytes, delivery.scan),
        (0, 31, None)
    );
}

#[test]
fn a_packet_cut_at_the_drop_is_sent_again_after_the_login() {
    let mut feed = Feed::new(SendProxyProtocol::Off, Vec::new());
    let positions = feed.connection(7, &[10, 20, 30], 3, 25);
    let delivery = feed.index.next_delivery().expect("a delivery");
    assert_eq!(delivery.login.map(|l| l.pos), Some(positions[0]));
    assert_eq!(sizes_of(delivery), [20, 30]);
    assert_eq!(delivery.bytes, 10 + 50);
}

#[test]
fn the_proxy_header_does_not_count_as_device_bytes() {
    let mut feed = Feed::new(SendProxyProtocol::V2, Vec::new());
    feed.connection(7, &[10, 20, 30], 3, 28 + 30);
    let delivery = feed.index.next_delivery().expect("a delivery");
    assert_eq!(delivery.delivered, 30);
    assert_eq!(sizes_of(delivery), [30]);
    let mut full = Feed::new(SendProxyProtocol::V2, Vec::new());
    full.connection(8, &[10, 20, 30], 3, 28 + 60);
    assert!(full.index.next_delivery().is_none(), "got everything");
}

#[test]
fn packets_after_the_drop_are_missed_too() {
    let mut feed = Feed::new(SendProxyProtocol::Off, Vec::new());
    feed.connection(7, &[10, 20, 30, 40], 2, 30);
    let delivery = feed.index.next_delivery().expect("a delivery");
    assert_eq!(sizes_of(delivery), [30, 40]);
    assert!(delivery.login.is_some());
}

#[test]
fn not_listed_udp_other_targets_and_catch_up_lines_are_no_misses() {
    let mut feed = Feed::new(SendProxyProtocol::Off, Vec::new());
    feed.feed(&line(1, 0, 1, |_| {}));
    feed.feed(&dropped(1, 1, "device not listed", 0, 0));
    feed.feed(&data(1, b"imei"));
    feed.feed(&dropped(1, 0, "closed by peer", 4, 0));
    feed.feed(&line(2, 0, 1, |m| m.target = None));
    feed.feed(&dropped(2, 1, "connect failed: connection refused", 0, 0));
    // UDP: its messages carry proxy.transport (written here by hand).
    let udp = |bytes: Vec<u8>| {
        let mut text = String::from_utf8(bytes).unwrap();
        text.insert_str(text.len() - 1, ",\"proxy.transport\":\"udp\"");
        text.into_bytes()
    };
    feed.feed(&udp(line(3, 0, 1, |_| {})));
    feed.feed(&udp(dropped(
        3,
        1,
        "connect failed: connection refused",
        0,
        0,
    )));
    feed.feed(&udp(data(3, b"x")));
    feed.feed(&udp(dropped(3, 0, "idle timeout", 1, 0)));
    feed.feed(&line(4, 0, 1, |_| {}));
    feed.feed(&line(4, 1, 2, |m| {
        m.target = Some("10.9.9.9:1");
        m.reason = Some("connect failed: connection refused");
        m.bytes_received = Some(0);
        m.bytes_sent = Some(0);
    }));
    feed.feed(&data(4, b"x"));
    feed.feed(&dropped(4, 0, "closed by peer", 1, 0));
    feed.feed(&line(5, 1, 2, |m| {
        m.catchup = true;
        m.reason = Some("reset by peer");
    }));
    assert!(feed.index.next_delivery().is_none());
    assert_eq!(feed.index.backlog(), (0, 0));
}

#[test]
fn a_connection_with_missing_lines_is_lost_not_sent_with_a_hole() {
    let mut feed = Feed::new(SendProxyProtocol::Off, Vec::new());
    feed.feed(&line(7, 0, 1, |_| {}));
    feed.feed(&dropped(7, 1, "connect failed: connection refused", 0, 0));
    feed.feed(&data(7, b"abc"));
    feed.feed(&dropped(7, 0, "closed by peer", 10, 0));
    assert!(feed.index.next_delivery().is_none());
    assert_eq!(feed.index.lost(), 1);
}

#[test]
fn connections_open_where_a_run_started_end_there() {
    let boundary = Pos {
        file: 0,
        offset: 10_000,
    };
    let mut feed = Feed::new(SendProxyProtocol::Off, vec![boundary]);
    feed.feed(&line(1, 0, 1, |_| {}));
    feed.feed(&dropped(1, 1, "connect failed: connection refused", 0, 0));
    feed.feed(&data(1, b"lost target"));
    feed.feed(&line(2, 0, 1, |_| {}));
    feed.feed(&line(2, 1, 1, |_| {}));
    feed.feed(&data(2, b"target connected"));
    assert!(feed.index.next_delivery().is_none());
    feed.index.reached(boundary);
    let delivery = feed.index.next_delivery().expect("the crashed connection");
    assert_eq!((delivery.ident, delivery.key.end), (1, boundary));
    assert_eq!(
        feed.index.pending(),
        1,
        "target 2 was connected: nothing known missed"
    );
}

#[test]
fn deliveries_come_in_the_order_connections_ended_and_done_ones_are_skipped() {
    let mut feed = Feed::new(SendProxyProtocol::Off, Vec::new());
    for ident in [1, 2] {
        feed.feed(&line(ident, 0, 1, |_| {}));
        feed.feed(&dropped(
            ident,
            1,
            "connect failed: connection refused",
            0,
            0,
        ));
        feed.feed(&data(ident, b"x"));
    }
    let first_start = Pos { file: 0, offset: 0 };
    assert_eq!(feed.index.scan_start(feed.at()), first_start);
    feed.feed(&dropped(2, 0, "closed by peer", 1, 0));
    feed.feed(&dropped(1, 0, "closed by peer", 1, 0));
    let order: Vec<u64> = feed.index.pending.values().map(|d| d.ident).collect();
    assert_eq!(order, [2, 1]);
    let second = feed.index.next_delivery().unwrap().key;
    feed.index.complete(second);
    assert_eq!(feed.index.next_delivery().unwrap().ident, 1);
    assert_eq!(feed.index.scan_start(feed.at()), first_start);
    let last = feed.index.next_delivery().unwrap().key;
    feed.index.complete(last);
    assert_eq!(feed.index.scan_start(feed.at()), feed.at());

    // Read again from the start with the last delivery done: nothing.
    let mut again = Feed::new(SendProxyProtocol::Off, Vec::new());
    again.index.done = Some(last);
    for ident in [1, 2] {
        again.feed(&line(ident, 0, 1, |_| {}));
        again.feed(&dropped(
            ident,
            1,
            "connect failed: connection refused",
            0,
            0,
        ));
        again.feed(&data(ident, b"x"));
    }
    again.feed(&dropped(2, 0, "closed by peer", 1, 0));
    again.feed(&dropped(1, 0, "closed by peer", 1, 0));
    assert!(again.index.next_delivery().is_none());
}

#[test]
fn a_drop_further_back_than_the_last_packets_is_found_by_reading() {
    let mut feed = Feed::new(SendProxyProtocol::Off, Vec::new());
    let sizes = vec![10; RECENT + 4];
    let start = feed.at();
    feed.connection(7, &sizes, sizes.len(), 25);
    let delivery = feed.index.next_delivery().expect("a delivery");
    assert!(delivery.listed.is_empty());
    assert_eq!(
        delivery.scan,
        Some(ScanFrom {
            pos: start,
            stored_before: 0
        })
    );
    assert_eq!(delivery.delivered, 25);
    assert!(delivery.login.is_some());
}

#[test]
fn the_device_ident_is_taken_from_its_messages() {
    let mut feed = Feed::new(SendProxyProtocol::Off, Vec::new());
    feed.feed(&line(7, 0, 1, |_| {}));
    feed.feed(&dropped(7, 1, "connect failed: connection refused", 0, 0));
    feed.feed(&line(7, 0, 0, |m| {
        m.payload_size = Some(1);
        m.payload = Some(b"x");
        m.device_ident = Some("356307042441013");
    }));
    feed.feed(&dropped(7, 0, "closed by peer", 1, 0));
    let delivery = feed.index.next_delivery().unwrap();
    assert_eq!(delivery.device.as_deref(), Some("356307042441013"));
}
