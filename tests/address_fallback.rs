//! A target name that resolves to several addresses (say an IPv6 one a host
//! cannot reach and an IPv4 one): a connect that fails moves on to the next
//! address, with the device's bytes still queued for it. Driven through a
//! real worker thread of the library with real loopback sockets, since no
//! resolver here gives one name two loopback addresses. Also: a name is
//! resolved and reached through the daemon.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_channel::config::Config;
use proxy_channel::control::stats::Counters;
use proxy_channel::net::admission::Admission;
use proxy_channel::net::connection::Settings;
use proxy_channel::net::worker::{Command, Worker, WorkerSetup};
use proxy_channel::store::journal::{BufferPool, Journal, JournalSettings, StoreCommand};
use proxy_channel::store::message::{Ident, Origin};
use util::*;

/// Reads everything one accepted connection sends, until it closes.
fn sink() -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let reader = std::thread::spawn(move || {
        let mut accepted = None;
        let connected = poll_until(secs(10), || {
            accepted = listener.accept().ok();
            accepted.is_some()
        });
        let Some((mut stream, _)) = accepted.filter(|_| connected) else {
            return b"<no connection within 10 s>".to_vec();
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(secs(10))).unwrap();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).unwrap();
        bytes
    });
    (address, reader)
}

#[test]
fn a_refused_address_gives_way_to_the_next_with_nothing_lost() {
    let refused = RefusedPort::new();
    let refused: SocketAddr = refused.address().parse().unwrap();
    let (good, received) = sink();
    let config = Config::from_vars([(
        "PROXY_TARGET1".to_string(),
        "gps.example.com:21000".to_string(),
    )])
    .unwrap();
    let (store, lines) = crossbeam_channel::bounded(64);
    let counters = Arc::new(Counters::default());
    let journal_settings = JournalSettings {
        channel_id: 1,
        protocol_id: 0,
        store: false,
        max_payload: 1024,
    };
    let (worker, thread) = Worker::spawn(WorkerSetup {
        id: 0,
        settings: Arc::new(Settings::new(&config)),
        journal: Journal::new(
            store,
            BufferPool::new(),
            journal_settings,
            Arc::clone(&counters),
        ),
        addresses: [vec![refused, good], Vec::new(), Vec::new()],
        counters,
    })
    .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut device = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, peer) = listener.accept().unwrap();
    accepted.set_nonblocking(true).unwrap();
    let origin = Origin {
        ident: Ident(0x0123_4567_89ab_cdef),
        peer,
    };
    let stream = mio::net::TcpStream::from_std(accepted);
    let permit = Admission::new(&config)
        .admit(peer.ip())
        .expect("a place for the device");
    assert!(worker.send(Command::Adopt {
        stream,
        origin,
        permit
    }));
    device
        .write_all(b"bytes sent before any target answered")
        .unwrap();
    device.shutdown(std::net::Shutdown::Write).unwrap();

    let got = String::from_utf8_lossy(&received.join().unwrap()).into_owned();
    assert_eq!(got, "bytes sent before any target answered");
    let mut end = Vec::new();
    device.set_read_timeout(Some(secs(10))).unwrap();
    device.read_to_end(&mut end).unwrap();
    worker.send(Command::Shutdown);
    thread.join().unwrap();

    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(StoreCommand::Write(batch)) = lines.recv_deadline(deadline) {
        text.push_str(std::str::from_utf8(&batch.lines).unwrap());
    }
    let target_events: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"proxy.source\":1"))
        .collect();
    assert_eq!(
        target_events.len(),
        2,
        "expected target 1's event 1 and event 2 only:\n{text}"
    );
    assert!(target_events[0].contains("\"proxy.event\":1"), "{text}");
    assert!(
        target_events[1].contains("\"proxy.reason\":\"closed by peer\""),
        "{text}"
    );
}

#[test]
fn a_target_given_by_host_name_is_resolved_and_reached() {
    let (good, received) = sink();
    let name = format!("localhost:{}", good.port());
    let daemon = Daemon::start(&[("PROXY_TARGET1", name.as_str())]);
    let mut device = Device::connect(daemon.addr());
    device.send(b"by name");
    device.shutdown_write();
    assert_eq!(received.join().unwrap(), b"by name");
    let mut log = daemon.log();
    let ident = log.wait_ident(device.name(), secs(5));
    wait_until(secs(5), "target 1's event 1", || {
        log.refresh();
        !log.select(&ident, 1, 1).is_empty()
    });
    assert_eq!(text(log.select(&ident, 1, 1)[0], "proxy.target"), name);
}
