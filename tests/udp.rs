//! Issue 17, UDP devices: PROXY_LISTEN_UDP sessions, checked black-box with
//! real datagrams on loopback. A session is one device address; each
//! target gets its datagrams from a socket of the session's own, and the
//! replies reach the device from the address it sent to.

mod util;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

/// How long a device waits for one reply.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// The UDP address the daemon logged it listens on.
fn udp_address(daemon: &Daemon) -> SocketAddr {
    let lines = daemon.wait_log("listening for UDP datagrams on ", 1, secs(5));
    let (_, address) = lines[0]
        .rsplit_once(" on ")
        .expect("an address after \"on\"");
    address.trim().parse().expect("an ip:port")
}

/// Each datagram a target got, with its sender.
type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP target that sends every datagram back to its sender as it is,
/// and remembers who sent what. Stopped when dropped.
struct EchoTarget {
    address: SocketAddr,
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoTarget {
    fn start() -> EchoTarget {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the echo target");
        socket.set_read_timeout(Some(millis(20))).unwrap();
        let address = socket.local_addr().unwrap();
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, stopping) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut buffer = vec![0u8; 65_536];
            // Bounded by the stop flag, looked at every 20 ms at least.
            while !stopping.load(Ordering::SeqCst) {
                let Ok((n, from)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                log.lock().unwrap().push((from, buffer[..n].to_vec()));
                // A full send buffer loses the echo, as UDP may.
                let _ = socket.send_to(&buffer[..n], from);
            }
        });
        EchoTarget {
            address,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn address(&self) -> String {
        self.address.to_string()
    }

    fn seen(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for EchoTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP port that answers every datagram with ICMP port unreachable and
/// that no other test can take while this lives: a socket bound to it but
/// connected elsewhere takes no datagram from anyone else.
fn unreachable_port() -> (UdpSocket, String) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect("127.0.0.1:9").unwrap();
    let address = socket.local_addr().unwrap().to_string();
    (socket, address)
}

/// A device: one UDP socket of its own, talking to the daemon.
struct Device {
    socket: UdpSocket,
    daemon: SocketAddr,
}

impl Device {
    fn new(daemon: SocketAddr) -> Device {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        Device { socket, daemon }
    }

    /// `peer` in its messages.
    fn name(&self) -> String {
        self.socket.local_addr().unwrap().to_string()
    }

    fn send(&self, bytes: &[u8]) {
        self.socket
            .send_to(bytes, self.daemon)
            .expect("send a datagram");
    }

    /// The next datagram within `wait`, and where it came from.
    fn receive(&self, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buffer = vec![0u8; 65_536];
        match self.socket.recv_from(&mut buffer) {
            Ok((n, from)) => Some((buffer[..n].to_vec(), from)),
            Err(e) if is_timeout(&e) => None,
            Err(e) => panic!("device {} cannot receive: {e}", self.name()),
        }
    }

    /// Sends `bytes` and waits for the echo; fails the test without one.
    fn exchange(&self, bytes: &[u8]) -> (Vec<u8>, SocketAddr) {
        self.send(bytes);
        self.receive(REPLY_WAIT)
            .unwrap_or_else(|| panic!("no reply to {} within {REPLY_WAIT:?}", self.name()))
    }
}

fn transport(message: &Value) -> &str {
    text(message, "proxy.transport")
}

#[test]
fn datagrams_reach_the_target_byte_for_byte_and_replies_come_from_the_listening_address() {
    let echo = EchoTarget::start();
    let mut daemon = Daemon::start(&[
        ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
        ("PROXY_TARGET1", &echo.address()),
    ]);
    let udp = udp_address(&daemon);
    let device = Device::new(udp);
    let mut sent = Vec::new();
    for (seed, size) in [1, 100, 1400, 8000, 60_000].into_iter().enumerate() {
        let datagram = random_bytes(seed as u64, size);
        let (reply, from) = device.exchange(&datagram);
        assert_eq!(
            from, udp,
            "the reply comes from the address the device sent to"
        );
        assert_same_bytes("the echoed datagram", &datagram, &reply);
        sent.push(datagram);
    }
    let seen = echo.seen();
    let payloads: Vec<Vec<u8>> = seen.iter().map(|(_, bytes)| bytes.clone()).collect();
    assert_eq!(
        payloads, sent,
        "the target got each datagram whole, in order"
    );
    let session_socket = seen[0].0;
    assert!(seen.iter().all(|(from, _)| *from == session_socket));
    assert_ne!(session_socket, udp, "from a socket of the session's own");

    let other = Device::new(udp);
    assert_eq!(other.exchange(b"second device").0, b"second device");
    let other_socket = echo.seen().last().unwrap().0;
    assert_ne!(
        other_socket, session_socket,
        "each session has its own socket"
    );

    let mut log = daemon.log();
    log.wait_ident(&other.name(), secs(5));
    daemon.stop();
    log.refresh();
    log.assert_well_formed();
    let ident = log
        .ident_of_peer(&device.name())
        .expect("the device's event 1");
    let other_ident = log.ident_of_peer(&other.name()).expect("event 1");
    assert!(is_ident(&ident) && is_ident(&other_ident));
    assert_ne!(ident, other_ident);
    let messages = log.of_ident(&ident);
    assert!(
        messages.iter().all(|m| transport(m) == "udp"),
        "proxy.transport on every message:\n{}",
        log.summary()
    );
    let first = messages[0];
    assert_eq!((source(first), event(first)), (0, 1), "event 1 first");
    assert!(first.get("device.ident").is_none());
    let last = messages[messages.len() - 1];
    assert_eq!((source(last), event(last)), (0, 2), "event 2 last");
    let total: u64 = sent.iter().map(|d| d.len() as u64).sum();
    assert_eq!(text(last, "proxy.reason"), "shutdown");
    assert_eq!(number(last, "proxy.bytes.received"), total);
    assert_eq!(number(last, "proxy.bytes.sent"), total);
    assert_eq!(
        log.select(&ident, 0, 0).len(),
        sent.len(),
        "a datagram is a packet"
    );
    assert_eq!(log.payload(&ident, 0), sent.concat());
    assert_eq!(
        log.payload(&ident, 1),
        sent.concat(),
        "the replies, recorded"
    );
    assert_eq!(log.select(&ident, 1, 1).len(), 1, "target event 1");
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("shutdown"));
    let target_end = log.dropped(&ident, 1).unwrap();
    assert_eq!(number(target_end, "proxy.bytes.sent"), total);
    assert_eq!(number(target_end, "proxy.bytes.received"), total);
    assert_eq!(log.reason(&other_ident, 0).as_deref(), Some("shutdown"));
    daemon.assert_no_errors();
}

#[test]
fn a_silent_session_ends_with_idle_timeout_and_the_next_datagram_opens_another() {
    let echo = EchoTarget::start();
    let daemon = Daemon::start(&[
        ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
        ("PROXY_TARGET1", &echo.address()),
        ("PROXY_IDLE_TIMEOUT", "1s"),
    ]);
    let device = Device::new(udp_address(&daemon));
    device.exchange(b"hello");
    let last_datagram = Instant::now();
    let mut log = daemon.log();
    let ident = log.wait_ident(&device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(5)), "idle timeout");
    assert!(
        last_datagram.elapsed() >= millis(900),
        "ended after {:?}, before the idle timeout",
        last_datagram.elapsed()
    );
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("idle timeout"));
    let end = log.dropped(&ident, 0).unwrap();
    assert_eq!(transport(end), "udp");

    device.exchange(b"again");
    log.wait_for(secs(5), "a second session of the device", |log| {
        log.lines()
            .iter()
            .filter(|m| source(m) == 0 && event(m) == 1 && text(m, "peer") == device.name())
            .count()
            == 2
    });
    let idents: Vec<&str> = log
        .lines()
        .iter()
        .filter(|m| source(m) == 0 && event(m) == 1)
        .map(|m| text(m, "ident"))
        .collect();
    assert_ne!(idents[0], idents[1], "a new session, a new ident");
}

#[test]
fn an_unreachable_target_is_dropped_alone_unless_it_is_mandatory() {
    let echo = EchoTarget::start();
    let (_held, unreachable) = unreachable_port();

    // Non-mandatory: target 2 goes, the session and target 1 go on.
    let mut daemon = Daemon::start(&[
        ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
        ("PROXY_TARGET1", &echo.address()),
        ("PROXY_TARGET2", &unreachable),
        ("PROXY_TARGET2_MANDATORY", "false"),
    ]);
    let device = Device::new(udp_address(&daemon));
    device.exchange(b"one");
    let mut log = daemon.log();
    let ident = log.wait_ident(&device.name(), secs(5));
    assert_eq!(log.wait_reason(&ident, 2, secs(5)), "connection refused");
    assert_eq!(device.exchange(b"two").0, b"two", "target 1 still answers");
    assert!(log.dropped(&ident, 0).is_none(), "the session goes on");
    daemon.stop();
    log.refresh();
    log.assert_well_formed();
    assert_eq!(
        log.select(&ident, 2, 1).len(),
        1,
        "target 2 had its event 1"
    );
    assert_eq!(
        number(log.dropped(&ident, 2).unwrap(), "proxy.bytes.sent"),
        3
    );
    assert_eq!(log.reason(&ident, 0).as_deref(), Some("shutdown"));
    assert_eq!(log.reason(&ident, 1).as_deref(), Some("shutdown"));

    // Mandatory (the default): the session ends.
    let daemon = Daemon::start(&[
        ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
        ("PROXY_TARGET1", &echo.address()),
        ("PROXY_TARGET2", &unreachable),
    ]);
    let device = Device::new(udp_address(&daemon));
    device.send(b"one");
    let mut log = daemon.log();
    let ident = log.wait_ident(&device.name(), secs(5));
    let why = log.wait_reason(&ident, 0, secs(5));
    assert_eq!(why, "mandatory target 2 failed");
    assert_eq!(log.reason(&ident, 2).as_deref(), Some("connection refused"));
    assert_eq!(log.reason(&ident, 1).as_deref(), Some(why.as_str()));
    let messages = log.of_ident(&ident);
    let last = messages[messages.len() - 1];
    assert_eq!(
        (source(last), event(last)),
        (0, 2),
        "the device's event 2 last"
    );
}

/// `ctl stats --json`'s UDP section.
fn udp_stats(daemon: &Daemon) -> Value {
    ctl_json(&daemon.control_socket(), &["stats"])["stats"]["udp"].clone()
}

/// Index of a cause in `udp.drops` (the order of the metrics' labels).
const TOO_MANY_CONNECTIONS: usize = 1;
const RATE_LIMIT: usize = 3;

#[test]
fn max_connections_counts_tcp_connections_and_udp_sessions_together() {
    let daemon = Daemon::start_with_control(&[
        ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
        ("PROXY_MAX_CONNECTIONS", "2"),
    ]);
    let udp = udp_address(&daemon);
    let mut log = daemon.log();
    let tcp = TcpStream::connect(daemon.addr()).unwrap();
    log.wait_ident(&tcp.local_addr().unwrap().to_string(), secs(5));
    let first = Device::new(udp);
    first.send(b"first");
    let first_ident = log.wait_ident(&first.name(), secs(5));

    // A third device address: over the limit, dropped unrecorded, counted.
    let late = Device::new(udp);
    for _ in 0..3 {
        late.send(b"late");
    }
    let mut stats = Value::Null;
    wait_until(
        secs(5),
        "3 datagrams counted as too_many_connections",
        || {
            stats = udp_stats(&daemon);
            stats["drops"][TOO_MANY_CONNECTIONS] == 3
        },
    );
    assert_eq!(stats["sessions_open"], 1);
    assert_eq!(stats["datagrams_received"], 4);
    log.refresh();
    assert!(
        log.lines().iter().all(|m| text(m, "peer") != late.name()),
        "a refused address costs no message"
    );
    let table = daemon.ctl(&["stats"]);
    assert!(
        table
            .stdout
            .contains("udp dropped by cause   not_allowed 0, too_many_connections 3,"),
        "ctl stats:\n{}",
        table.stdout
    );

    // ctl list shows the session as UDP; ctl close ends it.
    let list = ctl_json(&daemon.control_socket(), &["list"]);
    let listed: Vec<&Value> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ident"] == first_ident.as_str())
        .collect();
    assert_eq!(listed.len(), 1, "{list}");
    assert_eq!(listed[0]["transport"], "udp");
    assert_eq!(listed[0]["peer"], first.name().as_str());
    let table = daemon.ctl(&["list"]);
    assert!(
        table.stdout.contains(&format!("{}/udp", first.name())),
        "{}",
        table.stdout
    );
    assert!(daemon.ctl(&["close", &first_ident]).status.success());
    assert_eq!(
        log.wait_reason(&first_ident, 0, secs(5)),
        "closed by operator"
    );

    // Its place is free again: the late device gets a session.
    late.send(b"now");
    let late_ident = log.wait_ident(&late.name(), secs(5));
    assert_eq!(log.payload(&late_ident, 0), b"now");
    let stats = udp_stats(&daemon);
    assert_eq!(stats["sessions_total"], 2);
    assert_eq!(stats["sessions_open"], 1);
    drop(tcp);
}

#[test]
fn a_flood_from_one_address_does_not_starve_another_session() {
    let echo = EchoTarget::start();
    // One worker: the flood and the other device share one socket.
    let daemon = Daemon::start_with_control(&[
        ("PROXY_LISTEN_UDP", "127.0.0.1:0"),
        ("PROXY_TARGET1", &echo.address()),
        ("PROXY_WORKERS", "1"),
    ]);
    let udp = udp_address(&daemon);
    // At least FLOOD datagrams, and on until the other device is done (at
    // most ten times as many), so that all its requests meet the flood.
    const FLOOD: usize = 200_000;
    let flooded = Arc::new(AtomicUsize::new(0));
    let device_done = Arc::new(AtomicBool::new(false));
    let flood = {
        let (flooded, device_done) = (Arc::clone(&flooded), Arc::clone(&device_done));
        thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            for sent in 0..FLOOD * 10 {
                if sent >= FLOOD && device_done.load(Ordering::Relaxed) {
                    break;
                }
                // A full send buffer skips one; the flood goes on.
                if socket.send_to(b"flood flood flood", udp).is_ok() {
                    flooded.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    wait_until(secs(5), "the flood to start", || {
        flooded.load(Ordering::Relaxed) >= 10_000
    });
    let device = Device::new(udp);
    let started = Instant::now();
    let mut resent = 0;
    let mut slowest = Duration::ZERO;
    for n in 0..100 {
        let request = format!("request {n}").into_bytes();
        let asked = Instant::now();
        // UDP may lose a datagram anywhere; three tries, then it starved.
        let answered = (0..3).any(|attempt| {
            resent += usize::from(attempt > 0);
            device.send(&request);
            let deadline = Instant::now() + secs(1);
            // Skips late answers to earlier tries; bounded by the deadline.
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match device.receive(left) {
                    Some((reply, _)) if reply == request => return true,
                    Some(_) => {}
                    None => return false,
                }
            }
            false
        });
        assert!(answered, "request {n} got no reply in three tries");
        slowest = slowest.max(asked.elapsed());
    }
    let flood_done_after = flooded.load(Ordering::Relaxed);
    device_done.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let mut stats = Value::Null;
    wait_until(secs(10), "the flood to be held to its rate", || {
        stats = udp_stats(&daemon);
        stats["drops"][RATE_LIMIT].as_u64().unwrap() > (FLOOD / 2) as u64
    });
    eprintln!(
        "100 replies in {:?} (slowest {slowest:?}, {resent} resent) while the flood sent \
         {flood_done_after} of {FLOOD}; stats {stats}",
        started.elapsed()
    );
}

#[test]
fn a_recorded_udp_session_replays_as_datagrams_and_views_as_udp() {
    let mut daemon = Daemon::start(&[("PROXY_LISTEN_UDP", "127.0.0.1:0")]);
    let device = Device::new(udp_address(&daemon));
    let datagrams = [
        b"first".to_vec(),
        b"second!".to_vec(),
        random_bytes(7, 2000),
    ];
    for datagram in &datagrams {
        device.send(datagram);
    }
    let mut log = daemon.log();
    let ident = log.wait_ident(&device.name(), secs(5));
    log.wait_for(secs(5), "three packets", |log| {
        log.select(&ident, 0, 0).len() == 3
    });
    daemon.stop();

    let target = UdpSocket::bind("127.0.0.1:0").unwrap();
    target.set_read_timeout(Some(secs(5))).unwrap();
    let address = target.local_addr().unwrap().to_string();
    let folder = daemon.data_dir().to_str().unwrap().to_string();
    let replay = run_to_exit(&["replay", "--target", &address, &folder], &[], secs(20));
    assert!(replay.status.success(), "replay: {}", replay.stderr);
    let mut buffer = vec![0u8; 65_536];
    for datagram in &datagrams {
        let (n, _) = target.recv_from(&mut buffer).expect("a replayed datagram");
        assert_same_bytes("a replayed datagram", datagram, &buffer[..n]);
    }
    let total: usize = datagrams.iter().map(Vec::len).sum();
    assert!(
        replay
            .stderr
            .contains(&format!("replayed 1 connections ({total} bytes sent")),
        "{}",
        replay.stderr
    );

    let view = run_to_exit(&["view", &folder], &[], secs(20));
    assert!(view.status.success(), "view: {}", view.stderr);
    let header = format!("{ident}  {}/udp  device>", device.name());
    assert!(view.stdout.contains(&header), "{}", view.stdout);
}
