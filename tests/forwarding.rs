//! Issue 2, forwarding: device bytes reach every target byte for byte, and
//! the messages file records them exactly (or, with store mode off or for
//! packets over PROXY_MAX_PAYLOAD, records what the SPEC says and no more).

mod util;

use std::collections::{HashMap, HashSet};
use std::thread;

use util::*;

const DEVICES: usize = 20;
const STREAM: usize = 1 << 20;
const PREFIX: usize = 16;

/// Device `index`'s 1 MiB: random bytes whose first 16 name the device, so
/// a target connection can be matched to its device by content.
fn device_stream(index: usize) -> Vec<u8> {
    let mut bytes = random_bytes(1000 + index as u64, STREAM);
    let prefix = format!("device#{index:09}");
    assert_eq!(prefix.len(), PREFIX);
    bytes[..PREFIX].copy_from_slice(prefix.as_bytes());
    bytes
}

#[test]
fn twenty_devices_reach_three_targets_byte_for_byte_and_the_file_has_every_byte() {
    let targets = [
        Target::start(Behaviour::Record),
        Target::start(Behaviour::Record),
        Target::start(Behaviour::Record),
    ];
    let addresses: Vec<String> = targets.iter().map(Target::address).collect();
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &addresses[0]),
        ("PROXY_TARGET2", &addresses[1]),
        ("PROXY_TARGET3", &addresses[2]),
    ]);
    let addr = daemon.addr();

    let devices: Vec<_> = (0..DEVICES)
        .map(|index| {
            thread::spawn(move || {
                let stream = device_stream(index);
                let mut device = Device::connect(addr);
                device.send_in_random_writes(&stream, 7000 + index as u64);
                device.shutdown_write();
                let received = device.read_until_end(secs(40));
                (device.name().to_string(), stream, received)
            })
        })
        .collect();
    let devices: Vec<(String, Vec<u8>, Received)> = devices
        .into_iter()
        .map(|d| d.join().expect("device thread"))
        .collect();

    for (name, _, received) in &devices {
        assert_eq!(
            received.end,
            End::Eof,
            "device {name}: expected the daemon to close after the targets did"
        );
        assert!(
            received.bytes.is_empty(),
            "device {name}: recording targets send nothing, yet it received {} bytes",
            received.bytes.len()
        );
    }

    // Every target got every device's stream on its own connection.
    for (number, target) in targets.iter().enumerate() {
        let conns = target.wait_connections(DEVICES, secs(10));
        assert_eq!(conns.len(), DEVICES, "target {} connections", number + 1);
        for conn in &conns {
            conn.wait_done(secs(10));
            assert!(
                conn.eof(),
                "target {}: connection from {} ended without an end of stream ({:?})",
                number + 1,
                conn.peer,
                conn.error()
            );
        }
        let by_prefix: HashMap<Vec<u8>, Vec<u8>> = conns
            .iter()
            .map(|c| {
                let bytes = c.received();
                (bytes[..PREFIX.min(bytes.len())].to_vec(), bytes)
            })
            .collect();
        for (name, stream, _) in &devices {
            let seen = by_prefix.get(&stream[..PREFIX]).unwrap_or_else(|| {
                panic!(
                    "target {} has no connection starting with {:?} (device {name})",
                    number + 1,
                    String::from_utf8_lossy(&stream[..PREFIX])
                )
            });
            assert_same_bytes(
                &format!("target {} stream of device {name}", number + 1),
                stream,
                seen,
            );
        }
    }

    // The file: one ident per device, in order, with every byte.
    let mut log = daemon.log();
    log.wait_for(secs(20), "a source-0 event 2 for every device", |log| {
        devices.iter().all(|(name, ..)| {
            log.ident_of_peer(name)
                .is_some_and(|ident| log.dropped(&ident, 0).is_some())
        })
    });
    log.assert_well_formed();
    let mut idents = HashSet::new();
    for (name, stream, _) in &devices {
        let ident = log.ident_of_peer(name).unwrap();
        assert!(is_ident(&ident), "ident {ident:?} is not 16 lowercase hex");
        assert!(idents.insert(ident.clone()), "ident {ident} used twice");
        let messages = log.of_ident(&ident);
        let first = messages.first().unwrap();
        let last = messages.last().unwrap();
        assert_eq!(
            (source(first), event(first)),
            (0, 1),
            "{ident}: expected source-0 event 1 first, saw {first}"
        );
        assert_eq!(
            (source(last), event(last)),
            (0, 2),
            "{ident}: expected source-0 event 2 last, saw {last}"
        );
        for message in &messages {
            assert_eq!(text(message, "peer"), name, "{ident}: peer of {message}");
        }
        assert_same_bytes(
            &format!("stored source-0 payload of {ident} (device {name})"),
            stream,
            &log.payload(&ident, 0),
        );
        let device_drop = log.dropped(&ident, 0).unwrap();
        assert_eq!(text(device_drop, "proxy.reason"), "closed by peer");
        assert_eq!(number(device_drop, "proxy.bytes.received"), STREAM as u64);
        assert_eq!(number(device_drop, "proxy.bytes.sent"), 0);
        for (index, address) in addresses.iter().enumerate() {
            let n = index as u64 + 1;
            let connected = log.select(&ident, n, 1);
            let dropped = log.select(&ident, n, 2);
            assert_eq!(connected.len(), 1, "{ident}: event 1 of target {n}");
            assert_eq!(dropped.len(), 1, "{ident}: event 2 of target {n}");
            assert_eq!(text(connected[0], "proxy.target"), address);
            assert_eq!(text(dropped[0], "proxy.target"), address);
            assert_eq!(
                text(dropped[0], "proxy.reason"),
                "closed by peer",
                "{ident}: reason of target {n}"
            );
            assert_eq!(
                number(dropped[0], "proxy.bytes.sent"),
                STREAM as u64,
                "{ident}: bytes sent to target {n}"
            );
            assert!(
                log.select(&ident, n, 0).is_empty(),
                "{ident}: target {n} sent nothing, yet has data messages"
            );
        }
    }
    daemon.assert_no_errors();
}

#[test]
fn store_off_writes_connection_events_only() {
    let target = Target::start(Behaviour::Reply { tag: 1 });
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_STORE", "false"),
    ]);
    let mut device = Device::connect(daemon.addr());
    let request = random_bytes(5, 10_000);
    device.send(&request);
    let reply = device.read_at_least(3, secs(5));
    assert!(reply.starts_with(b"t1:"), "unexpected reply {reply:?}");
    device.shutdown_write();
    let rest = device.read_until_end(secs(10));
    assert_eq!(rest.end, End::Eof);
    let conn = &target.wait_connections(1, secs(5))[0];
    conn.wait_done(secs(5));
    assert_same_bytes("target stream", &request, &conn.received());

    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(5)), "closed by peer");
    log.assert_well_formed();
    let data: Vec<_> = log.lines().iter().filter(|m| event(m) == 0).collect();
    assert!(
        data.is_empty(),
        "store mode off: expected no event 0 at all, saw {} such as {}",
        data.len(),
        data[0]
    );
    for n in [0, 1] {
        assert_eq!(log.select(&ident, n, 1).len(), 1, "event 1 of source {n}");
        assert_eq!(log.select(&ident, n, 2).len(), 1, "event 2 of source {n}");
    }
    let device_drop = log.dropped(&ident, 0).unwrap();
    assert_eq!(
        number(device_drop, "proxy.bytes.received"),
        request.len() as u64
    );
    assert_eq!(
        number(device_drop, "proxy.bytes.sent"),
        conn.sent().len() as u64
    );
    daemon.assert_no_errors();
}

#[test]
fn packets_over_max_payload_are_stored_without_hex() {
    const MAX: usize = 100;
    let daemon = Daemon::start(&[("PROXY_MAX_PAYLOAD", "100")]);
    let mut device = Device::connect(daemon.addr());
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));

    let small = random_bytes(1, 60);
    device.send(&small);
    log.wait_for(secs(5), "the small packet", |log| {
        log.select(&ident, 0, 0)
            .iter()
            .map(|m| number(m, "proxy.payload.size"))
            .sum::<u64>()
            == small.len() as u64
    });
    // One write of 5000 bytes on loopback arrives as one segment, so the
    // daemon reads it in one packet (at least one over 100 bytes).
    let big = random_bytes(2, 5000);
    device.send(&big);
    device.shutdown_write();
    assert_eq!(device.read_until_end(secs(5)).end, End::Eof);
    log.wait_for(secs(5), "the device's event 2", |log| {
        log.dropped(&ident, 0).is_some()
    });
    log.assert_well_formed();

    let data = log.select(&ident, 0, 0);
    let total: u64 = data.iter().map(|m| number(m, "proxy.payload.size")).sum();
    assert_eq!(
        total,
        (small.len() + big.len()) as u64,
        "sum of packet sizes"
    );
    let mut over = 0;
    let mut stored = Vec::new();
    for message in &data {
        let size = number(message, "proxy.payload.size") as usize;
        let hex_text = message.get("proxy.payload.hex").and_then(|h| h.as_str());
        if size > MAX {
            over += 1;
            assert!(
                hex_text.is_none(),
                "a {size}-byte packet over PROXY_MAX_PAYLOAD=100 must have no hex: {message}"
            );
        } else {
            let hex_text = hex_text.unwrap_or_else(|| {
                panic!("a {size}-byte packet within PROXY_MAX_PAYLOAD needs hex: {message}")
            });
            assert_eq!(hex_text.len(), size * 2, "hex length of {message}");
            stored.extend(hex::decode(hex_text).unwrap());
        }
    }
    assert!(
        over >= 1,
        "expected a packet over 100 bytes, saw sizes {:?}",
        data.iter()
            .map(|m| number(m, "proxy.payload.size"))
            .collect::<Vec<_>>()
    );
    assert!(
        stored.starts_with(&small),
        "the small packet's hex must be stored exactly"
    );
    daemon.assert_no_errors();
}
