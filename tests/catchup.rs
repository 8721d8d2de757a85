//! Issue 16, catch-up: what a target with PROXY_TARGETn_CATCH_UP=true missed
//! while it was down is delivered to it later from the message files, one
//! connection per missed device connection, in the order they ended, never
//! twice and never skipped across restarts.

mod util;

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

// ---------------------------------------------------------------- helpers

/// A target at a fixed loopback address, started when a test brings it
/// "up" (before that the address refuses: see [`RefusedPort`]). It records
/// what each accepted connection received.
struct Recorder {
    conns: Arc<Mutex<Vec<Arc<Got>>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

#[derive(Default)]
struct Got {
    bytes: Mutex<Vec<u8>>,
    done: AtomicBool,
}

#[derive(Clone, Copy)]
enum Mode {
    Record,
    /// The first connection reads this many bytes, then closes.
    CloseFirstAfter(usize),
    /// Reads at most `chunk` bytes each `every`.
    Slow {
        chunk: usize,
        every: Duration,
    },
}

impl Recorder {
    fn start(addr: &str, mode: Mode) -> Recorder {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = bind(addr);
        if let Mode::Slow { .. } = mode {
            // Or the kernel takes megabytes for the slow reader.
            small_receive_buffer(&listener);
        }
        listener.set_nonblocking(true).unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (conns, stop) = (Arc::clone(&conns), Arc::clone(&stop));
            thread::spawn(move || accept(listener, mode, &conns, &stop))
        };
        Recorder {
            conns,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// What the connections that received something and ended got, in
    /// the order they were accepted, once `n` of them ended (or the test
    /// fails).
    fn wait_deliveries(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let held = poll_until(timeout, || self.delivered().len() >= n);
        let got = self.delivered();
        assert!(
            held,
            "expected {n} connections with bytes to end within {timeout:?}; saw {:?} bytes",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        got
    }

    fn received(&self) -> Vec<Vec<u8>> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .map(|c| c.bytes.lock().unwrap().clone())
            .collect()
    }

    /// What the ended connections that received something got.
    fn delivered(&self) -> Vec<Vec<u8>> {
        self.finished()
            .into_iter()
            .filter(|b| !b.is_empty())
            .collect()
    }

    fn finished(&self) -> Vec<Vec<u8>> {
        let conns = self.conns.lock().unwrap();
        conns
            .iter()
            .filter(|c| c.done.load(Ordering::SeqCst))
            .map(|c| c.bytes.lock().unwrap().clone())
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            for handler in acceptor.join().unwrap_or_default() {
                let _ = handler.join();
            }
        }
    }
}

/// Binds `addr`, which a [`RefusedPort`] held until just now.
fn bind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + secs(5);
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return listener,
            Err(e) if Instant::now() < deadline => {
                eprintln!("binding {addr} again: {e}");
                thread::sleep(millis(20));
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    }
}

fn accept(
    listener: TcpListener,
    mode: Mode,
    conns: &Mutex<Vec<Arc<Got>>>,
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let mut handlers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let got = Arc::new(Got::default());
                let index = {
                    let mut conns = conns.lock().unwrap();
                    conns.push(Arc::clone(&got));
                    conns.len() - 1
                };
                let stop = Arc::clone(stop);
                handlers.push(thread::spawn(move || {
                    serve(stream, &got, mode, index, &stop);
                    got.done.store(true, Ordering::SeqCst);
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(millis(2)),
            Err(e) => panic!("accept failed: {e}"),
        }
    }
    handlers
}

fn serve(mut stream: TcpStream, got: &Got, mode: Mode, index: usize, stop: &AtomicBool) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(millis(50))).unwrap();
    let limit = match mode {
        Mode::CloseFirstAfter(n) if index == 0 => n,
        _ => usize::MAX,
    };
    let mut buffer = vec![0; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let have = got.bytes.lock().unwrap().len();
        let mut want = (limit - have).min(buffer.len());
        if let Mode::Slow { chunk, .. } = mode {
            want = want.min(chunk);
        }
        if want == 0 {
            return;
        }
        match stream.read(&mut buffer[..want]) {
            Ok(0) => return,
            Ok(n) => {
                got.bytes.lock().unwrap().extend_from_slice(&buffer[..n]);
                if let Mode::Slow { every, .. } = mode {
                    thread::sleep(every);
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The variables of a daemon whose target 1, at `target`, is caught up.
fn catch_up_vars(target: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PROXY_TARGET1", target.to_string()),
        ("PROXY_TARGET1_MANDATORY", "false".into()),
        ("PROXY_TARGET1_CATCH_UP", "true".into()),
        ("PROXY_CONNECT_TIMEOUT", "2s".into()),
    ]
}

/// A third run over the same folder finds nothing left to deliver and
/// sends the target nothing beyond the `delivered` connections it has.
fn assert_nothing_sent_again(
    dir: &std::path::Path,
    vars: &[(&'static str, String)],
    target: &Recorder,
    delivered: usize,
    what: &str,
) {
    let mut third = Daemon::start_in(dir, &as_refs(vars));
    third.wait_log("0 missed connections (0 bytes) to deliver", 1, secs(5));
    assert!(
        !poll_until(secs(1), || target.received().len() > delivered),
        "{what}"
    );
    third.stop();
}

fn as_refs<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(n, v)| (*n, v.as_str())).collect()
}

/// A device connection and what it sent.
struct Sent {
    device: Device,
    ident: String,
    bytes: Vec<u8>,
}

impl Sent {
    /// Connects and waits for the device's event 1.
    fn connect(daemon: &Daemon, log: &mut MessageLog) -> Sent {
        let device = Device::connect(daemon.addr());
        let ident = log.wait_ident(device.name(), secs(5));
        Sent {
            device,
            ident,
            bytes: Vec::new(),
        }
    }

    /// Sends one packet and waits until it is in the file, so that each
    /// packet is a read (and a message) of its own.
    fn packet(&mut self, log: &mut MessageLog, bytes: &[u8]) {
        self.device.send(bytes);
        self.bytes.extend_from_slice(bytes);
        let total = self.bytes.len() as u64;
        let ident = self.ident.clone();
        log.wait_for(
            secs(5),
            &format!("{total} bytes of {ident} stored"),
            |log| {
                let stored: u64 = log
                    .select(&ident, 0, 0)
                    .iter()
                    .map(|m| number(m, "proxy.payload.size"))
                    .sum();
                stored == total
            },
        );
    }

    /// Closes, and waits for the device's event 2.
    fn close(mut self, log: &mut MessageLog) -> (String, Vec<u8>) {
        self.device.shutdown_write();
        let end = self.device.read_until_end(secs(5)).end;
        assert_eq!(
            end,
            End::Eof,
            "{}: expected the daemon to close",
            self.ident
        );
        log.wait_reason(&self.ident, 0, secs(5));
        (self.ident, self.bytes)
    }
}

/// A device that connects and leaves at once: its live connection to a
/// target that is back tells catch-up so (no need to wait out its pause).
fn poke(daemon: &Daemon) {
    let mut device = Device::connect(daemon.addr());
    device.shutdown_write();
    device.read_until_end(secs(5));
}

/// A login packet (Teltonika's IMEI packet) and two more for device `n`.
fn packets_of(n: u64) -> Vec<Vec<u8>> {
    let mut login = vec![0x00, 0x0f];
    login.extend_from_slice(format!("35630704244{n:04}").as_bytes());
    vec![
        login,
        random_bytes(n * 10 + 1, 700),
        random_bytes(n * 10 + 2, 1500),
    ]
}

/// A device connection that sends `packets` and ends.
fn connection(daemon: &Daemon, log: &mut MessageLog, packets: &[Vec<u8>]) -> (String, Vec<u8>) {
    let mut sent = Sent::connect(daemon, log);
    for packet in packets {
        sent.packet(log, packet);
    }
    sent.close(log)
}

/// The catch-up messages of `ident` for target 1: its event 1 lines and
/// its event 2 lines.
fn catch_up_messages<'a>(log: &'a MessageLog, ident: &str) -> (Vec<&'a Value>, Vec<&'a Value>) {
    let catch_up = |m: &&Value| m.get("proxy.catchup") == Some(&Value::Bool(true));
    let connects = log
        .select(ident, 1, 1)
        .into_iter()
        .filter(catch_up)
        .collect();
    let drops = log
        .select(ident, 1, 2)
        .into_iter()
        .filter(catch_up)
        .collect();
    (connects, drops)
}

/// Waits for `ident`'s completed catch-up (event 2 `caught up` or `reason`)
/// and checks its messages: one event 1 and one event 2 with the delivery's
/// byte count, after the device's own event 2.
fn assert_caught_up(log: &mut MessageLog, ident: &str, reason: &str, sent: u64) {
    log.wait_for(secs(10), &format!("catch-up event 2 of {ident}"), |log| {
        !catch_up_messages(log, ident).1.is_empty()
    });
    let (connects, drops) = catch_up_messages(log, ident);
    assert_eq!(
        (connects.len(), drops.len()),
        (1, 1),
        "{ident}: one catch-up each"
    );
    let drop = drops[0];
    assert_eq!(text(drop, "proxy.reason"), reason, "{drop}");
    assert_eq!(number(drop, "proxy.bytes.sent"), sent, "{drop}");
    let messages = log.of_ident(ident);
    let device_end = messages
        .iter()
        .position(|m| source(m) == 0 && event(m) == 2)
        .expect("the device's event 2");
    let catch_up_start = messages
        .iter()
        .position(|m| std::ptr::eq(*m, connects[0]))
        .unwrap();
    assert!(
        device_end < catch_up_start,
        "{ident}: catch-up comes after the device's end"
    );
}

fn catch_up_stats(daemon: &Daemon) -> Value {
    ctl_json(&daemon.control_socket(), &["stats"])["stats"]["catch_up"][1].clone()
}

// ---------------------------------------------------------------- tests

#[test]
fn a_target_down_during_several_connections_gets_each_later_in_the_order_they_ended() {
    let down = RefusedPort::new();
    let address = down.address();
    let vars = catch_up_vars(&address);
    let daemon = Daemon::start_with_control(&as_refs(&vars));
    let mut log = daemon.log();
    let mut open: Vec<Option<Sent>> = Vec::new();
    for n in 0..3 {
        let mut sent = Sent::connect(&daemon, &mut log);
        for packet in packets_of(n) {
            sent.packet(&mut log, &packet);
        }
        open.push(Some(sent));
    }
    // They end in another order than they started: 2, 0, 1.
    let mut ended = Vec::new();
    for n in [2, 0, 1] {
        let sent = open[n].take().expect("each ends once");
        ended.push(sent.close(&mut log));
    }
    let total: usize = ended.iter().map(|(_, bytes)| bytes.len()).sum();
    wait_until(secs(5), "ctl stats to show the backlog", || {
        let stats = catch_up_stats(&daemon);
        stats["backlog_connections"] == 3 && stats["backlog_bytes"] == total
    });
    let shown = daemon.ctl(&["stats"]).stdout;
    assert!(
        shown.contains(&format!(
            "target 1  catch-up backlog 3 connections ({total} B), delivered 0 connections (0 B)"
        )),
        "{shown}"
    );

    drop(down);
    let target = Recorder::start(&address, Mode::Record);
    poke(&daemon);
    let got = target.wait_deliveries(3, secs(10));
    assert_eq!(got.len(), 3, "one connection per missed device connection");
    for ((ident, bytes), got) in ended.iter().zip(&got) {
        assert_same_bytes(&format!("catch-up of {ident}"), bytes, got);
    }
    for (ident, bytes) in &ended {
        assert_caught_up(&mut log, ident, "caught up", bytes.len() as u64);
    }
    wait_until(secs(5), "ctl stats to show the deliveries", || {
        let stats = catch_up_stats(&daemon);
        stats["delivered_connections"] == 3
            && stats["delivered_bytes"] == total
            && stats["backlog_connections"] == 0
    });
    log.assert_well_formed();
    daemon.assert_no_errors();
}

/// A target that closes after the login and part of the next packet gets,
/// later, the login and every packet it had not been sent in full.
fn dropped_midway(send_proxy: &str) {
    let address = RefusedPort::new().address();
    let mut vars = catch_up_vars(&address);
    vars.push(("PROXY_TARGET1_SEND_PROXY", send_proxy.into()));
    let daemon = Daemon::start(&as_refs(&vars));
    // Within the second packet (the header of a device on 127.0.0.1 is at
    // most 44 bytes).
    let limit = 17 + 300 + if send_proxy == "v1" { 44 } else { 0 };
    let target = Recorder::start(&address, Mode::CloseFirstAfter(limit));
    let packets = packets_of(7);
    let mut log = daemon.log();
    let mut sent = Sent::connect(&daemon, &mut log);
    let header = match send_proxy {
        "v1" => proxy_v1_header(sent.device.name().parse().unwrap(), daemon.addr()).into_bytes(),
        _ => Vec::new(),
    };
    sent.packet(&mut log, &packets[0]);
    sent.packet(&mut log, &packets[1]);
    let ident = sent.ident.clone();
    log.wait_reason(&ident, 1, secs(5));
    sent.packet(&mut log, &packets[2]);
    sent.packet(&mut log, b"last words");
    let (_, all) = sent.close(&mut log);

    // What target 1 was sent in full, by its event 2.
    let live_drop = log.dropped(&ident, 1).unwrap().clone();
    let delivered = number(&live_drop, "proxy.bytes.sent") - header.len() as u64;
    let mut expected = Vec::new();
    let mut end = 0;
    for message in log.select(&ident, 0, 0) {
        let bytes = hex::decode(text(message, "proxy.payload.hex")).unwrap();
        end += bytes.len() as u64;
        if end > delivered {
            expected.extend_from_slice(&bytes);
        }
    }
    assert!(
        delivered >= 17,
        "the login was sent in full live ({delivered})"
    );
    let mut with_login = packets[0].clone();
    with_login.extend_from_slice(&expected);
    let got = target.wait_deliveries(2, secs(10));
    let live = &got[0];
    assert!(
        live.starts_with(&header) && all.starts_with(&live[header.len()..]),
        "the live connection got the header and a prefix of the device's bytes"
    );
    let catch_up = &got[1];
    assert!(
        catch_up.starts_with(&header),
        "the catch-up starts with the header"
    );
    assert_same_bytes(
        "the catch-up after its header",
        &with_login,
        &catch_up[header.len()..],
    );
    let sent_total = (header.len() + with_login.len()) as u64;
    assert_caught_up(&mut log, &ident, "caught up", sent_total);
    daemon.assert_no_errors();
}

#[test]
fn a_target_dropped_midway_gets_the_login_then_what_it_missed() {
    dropped_midway("off");
}

#[test]
fn a_target_dropped_midway_with_a_proxy_header_gets_it_again_and_what_it_missed() {
    dropped_midway("v1");
}

#[test]
fn a_backlog_waiting_at_sigterm_is_delivered_once_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let down = RefusedPort::new();
    let address = down.address();
    let vars = catch_up_vars(&address);
    let mut first = Daemon::start_in(dir.path(), &as_refs(&vars));
    let mut log = first.log();
    let ended: Vec<(String, Vec<u8>)> = (0..3)
        .map(|n| connection(&first, &mut log, &packets_of(n)))
        .collect();
    first.stop();
    drop(down);

    let target = Recorder::start(&address, Mode::Record);
    let mut second = Daemon::start_in(dir.path(), &as_refs(&vars));
    let got = target.wait_deliveries(3, secs(10));
    for ((ident, bytes), got) in ended.iter().zip(&got) {
        assert_same_bytes(&format!("catch-up of {ident}"), bytes, got);
    }
    let mut log = second.log();
    for (ident, bytes) in &ended {
        assert_caught_up(&mut log, ident, "caught up", bytes.len() as u64);
    }
    second.stop();

    assert_nothing_sent_again(
        dir.path(),
        &vars,
        &target,
        3,
        "a completed delivery was sent again",
    );
    assert_eq!(target.received().len(), 3);
}

#[test]
fn a_delivery_cut_by_sigterm_is_sent_again_in_full_and_the_stop_is_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let down = RefusedPort::new();
    let address = down.address();
    let vars = catch_up_vars(&address);
    let mut first = Daemon::start_in(dir.path(), &as_refs(&vars));
    let mut log = first.log();
    let mut sent = Sent::connect(&first, &mut log);
    let backlog = random_bytes(5, 8 << 20);
    sent.device.send_in_random_writes(&backlog, 5);
    sent.bytes = backlog.clone();
    let (ident, _) = sent.close(&mut log);
    drop(down);
    let slow = Recorder::start(
        &address,
        Mode::Slow {
            chunk: 8 * 1024,
            every: millis(10),
        },
    );
    poke(&first);
    wait_until(secs(10), "the catch-up to be under way", || {
        slow.received().iter().any(|b| b.len() > 64 * 1024)
    });
    let asked = Instant::now();
    first.stop();
    let took = asked.elapsed();
    eprintln!("SIGTERM to exit with a catch-up under way: {took:?}");
    assert!(
        took < secs(3),
        "SIGTERM took {took:?} with a delivery under way"
    );
    let folder = read_folder(dir.path());
    let (_, drops) = catch_up_messages(&folder, &ident);
    assert_eq!(drops.len(), 1);
    assert_eq!(text(drops[0], "proxy.reason"), "shutdown");
    drop(slow);

    let target = Recorder::start(&address, Mode::Record);
    let second = Daemon::start_in(dir.path(), &as_refs(&vars));
    let got = target.wait_deliveries(1, secs(10));
    assert_same_bytes("the delivery sent again in full", &backlog, &got[0]);
    let mut log = second.log();
    log.wait_for(secs(5), "the second catch-up's event 2", |log| {
        catch_up_messages(log, &ident).1.len() == 2
    });
    let (connects, drops) = catch_up_messages(&log, &ident);
    assert_eq!(connects.len(), 2, "two attempts, each with its event 1");
    assert_eq!(text(drops[1], "proxy.reason"), "caught up");
    assert_eq!(number(drops[1], "proxy.bytes.sent"), backlog.len() as u64);
    second.assert_no_errors();
}

#[test]
fn kill_9_repeats_no_completed_delivery_and_open_connections_are_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let down = RefusedPort::new();
    let address = down.address();
    let vars = catch_up_vars(&address);
    let mut first = Daemon::start_in(dir.path(), &as_refs(&vars));
    let mut log = first.log();
    let (ended, ended_bytes) = connection(&first, &mut log, &packets_of(1));
    // Open at the kill: it never gets its event 2.
    let mut open = Sent::connect(&first, &mut log);
    for packet in packets_of(2) {
        open.packet(&mut log, &packet);
    }
    first.kill_9();
    drop(down);

    let target = Recorder::start(&address, Mode::Record);
    let mut second = Daemon::start_in(dir.path(), &as_refs(&vars));
    let got = target.wait_deliveries(2, secs(10));
    assert_same_bytes("the ended connection", &ended_bytes, &got[0]);
    assert_same_bytes("the connection open at the kill", &open.bytes, &got[1]);
    let mut log = second.log();
    assert_caught_up(&mut log, &ended, "caught up", ended_bytes.len() as u64);
    log.wait_for(secs(5), "the open connection's catch-up event 2", |log| {
        !catch_up_messages(log, &open.ident).1.is_empty()
    });
    second.kill_9();

    assert_nothing_sent_again(
        dir.path(),
        &vars,
        &target,
        2,
        "a completed delivery was sent again after kill -9",
    );
}

#[test]
fn a_backlog_spread_over_rotated_files_arrives_exactly() {
    let down = RefusedPort::new();
    let address = down.address();
    let mut vars = catch_up_vars(&address);
    vars.push(("PROXY_ROTATE_SIZE", "4KiB".into()));
    let daemon = Daemon::start(&as_refs(&vars));
    let mut log = daemon.log();
    let mut open: Vec<Sent> = (0..2).map(|_| Sent::connect(&daemon, &mut log)).collect();
    for round in 0..8u64 {
        for (n, sent) in open.iter_mut().enumerate() {
            // The log reader follows the current file only: packets are
            // checked in the folder at the end.
            sent.device.send(&random_bytes(round * 2 + n as u64, 300));
            sent.bytes
                .extend_from_slice(&random_bytes(round * 2 + n as u64, 300));
            thread::sleep(millis(20));
        }
    }
    // One after the other: deliveries follow the order of the device
    // event 2 lines.
    let dir = daemon.data_dir().to_path_buf();
    let mut ended = Vec::new();
    for mut sent in open {
        sent.device.shutdown_write();
        assert_eq!(sent.device.read_until_end(secs(5)).end, End::Eof);
        wait_until(secs(5), "the device's event 2", || {
            let folder = MessageLog::read_files(&message_files(&dir));
            folder.dropped(&sent.ident, 0).is_some()
        });
        ended.push((sent.ident, sent.bytes));
    }
    assert!(
        rotated_files(&dir).len() >= 3,
        "the backlog spans rotated files"
    );
    drop(down);
    let target = Recorder::start(&address, Mode::Record);
    poke(&daemon);
    let got = target.wait_deliveries(2, secs(10));
    for ((ident, bytes), got) in ended.iter().zip(&got) {
        assert_same_bytes(&format!("catch-up of {ident} across rotations"), bytes, got);
    }
    daemon.assert_no_errors();
}

#[test]
fn a_backlog_past_retention_is_lost_and_logged() {
    let down = RefusedPort::new();
    let address = down.address();
    let mut vars = catch_up_vars(&address);
    vars.push(("PROXY_ROTATE_SIZE", "2KiB".into()));
    vars.push(("PROXY_RETAIN_FILES", "1".into()));
    let daemon = Daemon::start(&as_refs(&vars));
    let mut device = Device::connect(daemon.addr());
    for n in 0..12 {
        device.send(&random_bytes(n, 600));
        thread::sleep(millis(20));
    }
    device.shutdown_write();
    device.read_until_end(secs(5));
    // Lost for a delivery whose file is gone, or for a file deleted
    // before catch-up read it: either way the log says so.
    daemon.wait_log("is lost", 1, secs(10));
    drop(down);
    let target = Recorder::start(&address, Mode::Record);
    poke(&daemon);
    assert!(
        !poll_until(secs(1), || !target.received().iter().all(Vec::is_empty)),
        "nothing is sent with a hole in it"
    );
}

#[test]
fn switching_catch_up_on_over_an_old_folder_sends_nothing_old() {
    let dir = tempfile::tempdir().unwrap();
    let down = RefusedPort::new();
    let address = down.address();
    let mut vars = catch_up_vars(&address);
    vars.retain(|(name, _)| *name != "PROXY_TARGET1_CATCH_UP");
    let mut before = Daemon::start_in(dir.path(), &as_refs(&vars));
    let mut log = before.log();
    for n in 0..2 {
        connection(&before, &mut log, &packets_of(n));
    }
    before.stop();

    let vars = catch_up_vars(&address);
    let after = Daemon::start_in(dir.path(), &as_refs(&vars));
    after.wait_log("catch-up switched on", 1, secs(5));
    after.wait_log("0 missed connections (0 bytes) to deliver", 1, secs(5));
    let mut log = after.log();
    let (ident, bytes) = connection(&after, &mut log, &packets_of(5));
    drop(down);
    let target = Recorder::start(&address, Mode::Record);
    poke(&after);
    let got = target.wait_deliveries(1, secs(10));
    assert_same_bytes("the only delivery: the new connection", &bytes, &got[0]);
    assert_caught_up(&mut log, &ident, "caught up", bytes.len() as u64);
    assert!(
        !poll_until(secs(1), || target.delivered().len() > 1),
        "history from before catch-up was switched on was sent"
    );
}

#[test]
fn a_packet_over_the_max_payload_ends_the_delivery_before_it() {
    let down = RefusedPort::new();
    let address = down.address();
    let mut vars = catch_up_vars(&address);
    vars.push(("PROXY_MAX_PAYLOAD", "1KiB".into()));
    let daemon = Daemon::start(&as_refs(&vars));
    let mut log = daemon.log();
    let packets = packets_of(3);
    let mut sent = Sent::connect(&daemon, &mut log);
    sent.packet(&mut log, &packets[0]);
    sent.packet(&mut log, &packets[1]);
    sent.packet(&mut log, &packets[2]);
    sent.packet(&mut log, b"after the big one");
    let (ident, _) = sent.close(&mut log);
    drop(down);
    let target = Recorder::start(&address, Mode::Record);
    poke(&daemon);
    let got = target.wait_deliveries(1, secs(10));
    let expected = [packets[0].clone(), packets[1].clone()].concat();
    assert_same_bytes(
        "what comes before the packet stored without hex",
        &expected,
        &got[0],
    );
    assert_caught_up(
        &mut log,
        &ident,
        "payload not stored",
        expected.len() as u64,
    );
    daemon.wait_log("stored without its payload", 1, secs(5));
}

#[test]
fn a_slow_catch_up_does_not_slow_live_round_trips() {
    let live = Target::start(Behaviour::Reply { tag: 1 });
    let down = RefusedPort::new();
    let address = down.address();
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &live.address()),
        ("PROXY_TARGET2", &address),
        ("PROXY_TARGET2_MANDATORY", "false"),
        ("PROXY_TARGET2_CATCH_UP", "true"),
        ("PROXY_TARGET2_REPLIES", "false"),
    ]);
    let mut log = daemon.log();
    let backlog = random_bytes(99, 8 << 20);
    let mut device = Device::connect(daemon.addr());
    let ident = log.wait_ident(device.name(), secs(5));
    device.send_in_random_writes(&backlog, 5);
    device.shutdown_write();
    device.read_until_end(secs(10));
    log.wait_reason(&ident, 0, secs(10));
    drop(down);
    let slow = Recorder::start(
        &address,
        Mode::Slow {
            chunk: 16 * 1024,
            every: millis(10),
        },
    );

    // Live round trips through target 1 while target 2 is caught up.
    let mut device = Device::connect(daemon.addr());
    let started = Instant::now();
    wait_until(secs(5), "the catch-up to start", || {
        slow.received().iter().any(|b| b.len() > 64 * 1024)
    });
    let mut rounds = Vec::new();
    for _ in 0..300 {
        let at = Instant::now();
        device.send(b"0123456789abcdef");
        device.read_at_least(6, secs(5));
        rounds.push(at.elapsed());
    }
    let still_delivering = slow.finished().iter().all(|b| b.len() < backlog.len());
    rounds.sort();
    let p99 = rounds[rounds.len() * 99 / 100];
    eprintln!(
        "live round trips during catch-up: p50 {:?}, p99 {p99:?}, max {:?} (catch-up still running: {still_delivering})",
        rounds[rounds.len() / 2],
        rounds[rounds.len() - 1]
    );
    assert!(
        still_delivering,
        "the round trips must overlap the catch-up"
    );
    assert!(p99 < millis(50), "live p99 {p99:?} during catch-up");
    let got = slow.wait_deliveries(1, secs(15).saturating_sub(started.elapsed()).max(secs(5)));
    assert_same_bytes("the slow catch-up", &backlog, &got[0]);
    daemon.assert_no_errors();
}
