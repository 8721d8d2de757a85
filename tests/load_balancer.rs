//! Issue 7, behind a load balancer: the PROXY protocol in and out, proved
//! against the real HAProxy (the Debian package, installed by the tests if
//! missing: `util::haproxy_binary`).
//!
//! - HAProxy balancing devices over two instances with `send-proxy-v2` (and
//!   `send-proxy`, v1), health checks on: every device's `peer` is its own
//!   ip:port, its bytes reach exactly one instance's target, both instances
//!   take connections, and the checks (LOCAL headers) do not disturb them.
//!   The example `conf/haproxy.cfg` runs the same way.
//! - A target behind PROXY_TARGET1_SEND_PROXY=v2 / v1 is HAProxy itself with
//!   an `accept-proxy` bind in front of a sink: the client address HAProxy
//!   parsed from the header (its log) is the device's, and the sink gets
//!   exactly the device's bytes.
//! - Malformed, cut, oversized and slow headers sent straight to a daemon:
//!   each connection ends with its documented reason, no target is ever
//!   connected, and a good connection afterwards works.
//!
//! Every HAProxy a test starts runs in the foreground (`-db`) as a child
//! process with its configuration in a temporary folder, on loopback ports
//! picked just before (a start that loses a port to a race is retried), and
//! is killed when the test ends.

mod util;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

// ---------------------------------------------------------------- HAProxy

/// `n` distinct loopback ports that were free a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    // All held at once, so that the ports differ; released on return.
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// How many times a start that lost one of its ports is tried again.
const HAPROXY_ATTEMPTS: usize = 5;
/// How long HAProxy may take to listen on every port of its configuration.
const HAPROXY_LISTEN_WITHIN: Duration = Duration::from_secs(10);

/// A HAProxy in the foreground, killed on drop. Its stdout (the log, with
/// `log stdout format raw`) and stderr (warnings, alerts) are collected.
struct Haproxy {
    child: Child,
    /// The `bind` ports of its configuration, in the order asked for.
    ports: Vec<u16>,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy on the configuration `render(ports)` gives for
    /// `listening` fresh loopback ports, and waits until it listens on each
    /// of them.
    fn start(listening: usize, render: impl Fn(&[u16]) -> String) -> Haproxy {
        let binary = haproxy_binary();
        let mut last_output = String::new();
        for _ in 0..HAPROXY_ATTEMPTS {
            let ports = free_ports(listening);
            let config = render(&ports);
            match Haproxy::try_start(&binary, ports, &config) {
                Ok(haproxy) => return haproxy,
                Err(output) if lost_a_port(&output) => last_output = output,
                Err(output) => {
                    panic!("haproxy did not start; configuration:\n{config}\noutput:\n{output}")
                }
            }
        }
        panic!(
            "haproxy lost one of its ports {HAPROXY_ATTEMPTS} times; last output:\n{last_output}"
        )
    }

    /// One start; the error is HAProxy's output when it exited instead of
    /// listening.
    fn try_start(binary: &Path, ports: Vec<u16>, config: &str) -> Result<Haproxy, String> {
        let dir = tempfile::tempdir().expect("temporary folder for haproxy");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write the haproxy configuration");
        let mut child = Command::new(binary)
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let output = Arc::new(Mutex::new(Vec::new()));
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout pipe"));
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr pipe"));
        let readers = [stdout, stderr]
            .into_iter()
            .map(|pipe| {
                let output = Arc::clone(&output);
                // Ends when haproxy exits and its pipes close.
                thread::spawn(move || {
                    for line in BufReader::new(pipe).lines() {
                        let Ok(line) = line else { break };
                        output.lock().unwrap().push(line);
                    }
                })
            })
            .collect();
        let mut haproxy = Haproxy {
            child,
            ports,
            output,
            readers,
            _dir: dir,
        };
        // Asked of the kernel, not by connecting: a connection would also
        // succeed if another process had taken the port in the meantime
        // (haproxy then exits, a moment later, on "cannot bind socket").
        let deadline = Instant::now() + HAPROXY_LISTEN_WITHIN;
        let pid = haproxy.child.id();
        while !haproxy.ports.iter().all(|&port| listens_on(pid, port)) {
            if haproxy.child.try_wait().expect("try_wait").is_some() {
                return Err(haproxy.output_after_exit());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on ports {:?} within {HAPROXY_LISTEN_WITHIN:?}; \
                 output:\n{}",
                haproxy.ports,
                haproxy.output_text()
            );
            thread::sleep(millis(10));
        }
        Ok(haproxy)
    }

    /// The address of its `index`th `bind`.
    fn addr(&self, index: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[index]))
    }

    fn output_lines(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    fn output_text(&self) -> String {
        self.output_lines().join("\n")
    }

    /// Everything it printed, once it has exited.
    fn output_after_exit(&mut self) -> String {
        for reader in self.readers.drain(..) {
            // A reader that failed only shortens the output shown.
            let _ = reader.join();
        }
        self.output_text()
    }

    /// Fails the test if HAProxy saw a server go down or logged an alert.
    fn assert_servers_stayed_up(&self) {
        let bad: Vec<String> = self
            .output_lines()
            .into_iter()
            .filter(|line| line.contains(" is DOWN") || line.contains("[ALERT]"))
            .collect();
        assert!(
            bad.is_empty(),
            "haproxy saw a server go down (a failed health check?): {bad:#?}"
        );
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // It may exit at the same moment; either way `wait` reaps it.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port`:
/// the listening sockets' inodes from /proc/net/tcp, among the process's
/// descriptors.
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // Lines: "sl local_address rem_address st ... uid timeout inode ...",
    // an address as the hex of its in-memory (network order) bytes.
    let inodes: HashSet<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (ip, local_port) = fields.get(1)?.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
            let local_port = u16::from_str_radix(local_port, 16).ok()?;
            let listening = fields.get(3) == Some(&"0A");
            let ours = listening && ip == [127, 0, 0, 1] && local_port == port;
            ours.then(|| fields.get(9).copied())?
        })
        .collect();
    let Ok(descriptors) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    !inodes.is_empty()
        && descriptors
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|link| {
                let link = link.to_string_lossy();
                link.strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .is_some_and(|inode| inodes.contains(inode))
            })
}

/// Whether HAProxy exited because a port it was to listen on was taken.
fn lost_a_port(output: &str) -> bool {
    output.contains("cannot bind") || output.contains("Address already in use")
}

/// The global and defaults sections every test configuration starts with:
/// the log on stdout, few connections, short timeouts.
const HAPROXY_COMMON: &str = "\
global
    log stdout format raw local0
    maxconn 64

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout check 1s
";

// ---------------------------------------------------------------- PROXY headers

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, PROXY command.
const V2_PROXY: u8 = 0x21;
/// Version 2, LOCAL command (a balancer's own connection, a health check).
const V2_LOCAL: u8 = 0x20;

/// Whether a header is a v2 LOCAL one.
fn is_local_header(header: &[u8]) -> bool {
    header.len() >= 16 && header.starts_with(b"\r\n\r\n\0\r\nQUIT\n") && header[12] == V2_LOCAL
}
/// TCP over IPv4, TCP over IPv6.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// PP2_TYPE_AUTHORITY and PP2_TYPE_NOOP.
const TLV_AUTHORITY: u8 = 0x02;
const TLV_NOOP: u8 = 0x04;

/// A v2 header with `body` (addresses, then TLVs) after its 16 fixed bytes.
fn v2_header(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let length = u16::try_from(body.len()).expect("a v2 body fits 64 KiB");
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[command, family]);
    header.extend_from_slice(&length.to_be_bytes());
    header.extend_from_slice(body);
    header
}

/// The address block of a v2 PROXY header for `source` and `destination`
/// (both IPv4 or both IPv6), then `tlvs`.
fn v2_proxy(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            TCP4
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            TCP6
        }
        _ => panic!("mixed address families in a test header"),
    };
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    body.extend_from_slice(tlvs);
    v2_header(V2_PROXY, family, &body)
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let length = u16::try_from(value.len()).expect("a TLV fits 64 KiB");
    let mut bytes = vec![kind];
    bytes.extend_from_slice(&length.to_be_bytes());
    bytes.extend_from_slice(value);
    bytes
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a test address")
}

// ---------------------------------------------------------------- devices

/// Device `index`'s bytes: reproducible random bytes whose first 16 name
/// the device, so a target connection can be matched to its device.
fn device_stream(index: usize, len: usize) -> Vec<u8> {
    let mut bytes = random_bytes(7700 + index as u64, len);
    let prefix = format!("device#{index:09}");
    bytes[..prefix.len()].copy_from_slice(prefix.as_bytes());
    bytes
}

/// A device that sent its whole stream, half-closed and saw the end.
struct Sent {
    name: String,
    stream: Vec<u8>,
}

/// `count` devices at once through `front`: each sends its stream in random
/// writes, closes its sending side, and must then see the connection closed
/// normally with no reply (the targets only record).
fn send_through(front: SocketAddr, count: usize, len: usize) -> Vec<Sent> {
    let devices: Vec<JoinHandle<Sent>> = (0..count)
        .map(|index| {
            thread::spawn(move || {
                let stream = device_stream(index, len);
                let mut device = Device::connect(front);
                device.send_in_random_writes(&stream, 99 + index as u64);
                device.shutdown_write();
                let received = device.read_until_end(secs(8));
                assert_eq!(
                    received.end,
                    End::Eof,
                    "device {} through {front}: expected a normal close",
                    device.name()
                );
                assert!(
                    received.bytes.is_empty(),
                    "device {}: the targets only record, yet it received {} bytes",
                    device.name(),
                    received.bytes.len()
                );
                Sent {
                    name: device.name().to_string(),
                    stream,
                }
            })
        })
        .collect();
    devices
        .into_iter()
        .map(|d| d.join().expect("device thread"))
        .collect()
}

/// Whether the device-side event 2 of every connection in `log` that
/// started is written.
fn every_device_dropped(log: &MessageLog) -> bool {
    log.by_ident()
        .keys()
        .all(|ident| log.dropped(ident, 0).is_some())
}

// ---------------------------------------------------------------- balancing

/// One proxy-channel instance with its own recording target.
struct Instance {
    daemon: Daemon,
    target: Target,
}

impl Instance {
    fn start(accept: &str) -> Instance {
        let target = Target::start(Behaviour::Record);
        let daemon = Daemon::start(&[
            ("PROXY_TARGET1", &target.address()),
            ("PROXY_ACCEPT_PROXY_PROTOCOL", accept),
            ("PROXY_CONNECT_TIMEOUT", "2s"),
        ]);
        Instance { daemon, target }
    }
}

const BALANCED_DEVICES: usize = 8;
const BALANCED_STREAM: usize = 48 * 1024;

/// The configuration of a balancer over `instances` in round robin with
/// `send_proxy` (`send-proxy` or `send-proxy-v2`) and health checks.
fn balancer_config(ports: &[u16], instances: &[Instance], send_proxy: &str) -> String {
    let mut config = format!(
        "{HAPROXY_COMMON}
frontend devices
    bind 127.0.0.1:{}
    default_backend instances

backend instances
    balance roundrobin
",
        ports[0]
    );
    for (index, instance) in instances.iter().enumerate() {
        config.push_str(&format!(
            "    server pc{} {} {send_proxy} check inter 200ms\n",
            index + 1,
            instance.daemon.addr()
        ));
    }
    config
}

/// Devices through `balancer` reach the instances: each device's messages
/// are in exactly one instance's file with its own ip:port as `peer`, its
/// bytes stored and at that instance's target exactly, and every instance
/// took some. HAProxy's health checks reach every instance and pass.
fn assert_balanced(balancer: &Haproxy, instances: &[Instance]) {
    let sent = send_through(balancer.addr(0), BALANCED_DEVICES, BALANCED_STREAM);
    let names: HashSet<&str> = sent.iter().map(|d| d.name.as_str()).collect();

    let mut logs: Vec<MessageLog> = instances.iter().map(|i| i.daemon.log()).collect();
    // Every device's connection ended, and every instance saw a health
    // check (a connection from no device).
    let is_check = |m: &Value| !names.contains(text(m, "peer"));
    let ended = |log: &MessageLog, device: &Sent| {
        log.ident_of_peer(&device.name)
            .is_some_and(|ident| log.dropped(&ident, 0).is_some())
    };
    let settled = poll_until(secs(5), || {
        logs.iter_mut().for_each(MessageLog::refresh);
        let all_ended = sent
            .iter()
            .all(|device| logs.iter().any(|log| ended(log, device)));
        all_ended && logs.iter().all(|log| log.lines().iter().any(is_check))
    });
    if !settled {
        let missing: Vec<&str> = sent
            .iter()
            .filter(|device| !logs.iter().any(|log| ended(log, device)))
            .map(|device| device.name.as_str())
            .collect();
        let files: Vec<String> = logs.iter().map(MessageLog::summary).collect();
        panic!(
            "timed out waiting for every device's event 2 and a health check at every \
             instance; devices without an event 2: {missing:?}; the instances' files:\n{}\n\
             haproxy:\n{}",
            files.join("\n  ----\n"),
            balancer.output_text()
        );
    }

    let mut taken = vec![0; instances.len()];
    for device in &sent {
        let holders: Vec<usize> = (0..instances.len())
            .filter(|&i| logs[i].ident_of_peer(&device.name).is_some())
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "device {}: expected its connection in exactly one instance's file",
            device.name
        );
        let (index, log) = (holders[0], &logs[holders[0]]);
        taken[index] += 1;
        let ident = log.ident_of_peer(&device.name).unwrap();
        let messages = log.of_ident(&ident);
        for message in &messages {
            assert_eq!(
                text(message, "peer"),
                device.name,
                "instance {index}: every message of the device must carry its own address: \
                 {message}"
            );
        }
        assert_same_bytes(
            &format!(
                "instance {index}: stored payloads of device {}",
                device.name
            ),
            &device.stream,
            &log.payload(&ident, 0),
        );
        let dropped = log.dropped(&ident, 0).unwrap();
        assert_eq!(text(dropped, "proxy.reason"), "closed by peer", "{dropped}");
        assert_eq!(
            number(dropped, "proxy.bytes.received"),
            device.stream.len() as u64,
            "the PROXY header must not count as bytes received from the device: {dropped}"
        );
        let target_dropped = log.dropped(&ident, 1).expect("the target's event 2");
        assert_eq!(
            number(target_dropped, "proxy.bytes.sent"),
            device.stream.len() as u64,
            "{target_dropped}"
        );
    }
    for (index, log) in logs.iter().enumerate() {
        log.assert_well_formed();
        assert!(
            taken[index] > 0,
            "instance {index} took no device connection ({taken:?}); haproxy:\n{}",
            balancer.output_text()
        );
        // Health checks never turn into a bad header, and they are no
        // device: no data from them.
        for check in log.lines().iter().filter(|m| is_check(m)) {
            assert!(
                !text(check, "proxy.reason").starts_with("bad proxy protocol header"),
                "instance {index}: a health check was refused: {check}"
            );
            assert_ne!(event(check), 0, "data from a health check: {check}");
        }
    }

    // Each target got exactly the streams of its instance's devices; its
    // other connections (made for health checks) got nothing.
    for (index, instance) in instances.iter().enumerate() {
        let conns = instance.target.connections();
        let mut streams = Vec::new();
        for conn in &conns {
            conn.wait_done(secs(5));
            if conn.received_len() > 0 {
                streams.push(conn.received());
            }
        }
        assert_eq!(
            streams.len(),
            taken[index],
            "instance {index}'s target: one stream per device the instance took"
        );
        for stream in &streams {
            let device = sent
                .iter()
                .find(|d| stream.starts_with(&d.stream[..16]))
                .unwrap_or_else(|| panic!("instance {index}'s target got bytes of no device"));
            assert_same_bytes(
                &format!("instance {index}'s target, device {}", device.name),
                &device.stream,
                stream,
            );
            let ident = logs[index].ident_of_peer(&device.name);
            assert!(
                ident.is_some(),
                "device {}'s bytes reached instance {index}'s target, but another instance \
                 recorded it",
                device.name
            );
        }
    }
    balancer.assert_servers_stayed_up();
    for instance in instances {
        instance.daemon.assert_no_errors();
    }
}

#[test]
fn haproxy_with_send_proxy_v2_balances_devices_that_keep_their_own_address() {
    if !require(Need::Haproxy, "run a real HAProxy") {
        return;
    }
    let instances = [Instance::start("v2"), Instance::start("v2")];
    let balancer = Haproxy::start(1, |ports| {
        balancer_config(ports, &instances, "send-proxy-v2")
    });
    assert_balanced(&balancer, &instances);
}

#[test]
fn haproxy_with_send_proxy_v1_balances_devices_that_keep_their_own_address() {
    if !require(Need::Haproxy, "run a real HAProxy") {
        return;
    }
    // One instance accepts v1 only, the other either version.
    let instances = [Instance::start("v1"), Instance::start("any")];
    let balancer = Haproxy::start(1, |ports| balancer_config(ports, &instances, "send-proxy"));
    assert_balanced(&balancer, &instances);
}

/// The example conf/haproxy.cfg, with its addresses replaced by the test's.
fn example_config(ports: &[u16], instances: &[Instance]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/haproxy.cfg");
    let mut config = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let replacements = [
        ("bind :5555", format!("bind 127.0.0.1:{}", ports[0])),
        ("127.0.0.1:5601", instances[0].daemon.addr().to_string()),
        ("127.0.0.1:5602", instances[1].daemon.addr().to_string()),
        // Checks every 2 s at most would leave a short test without one.
        ("inter 2s", "inter 200ms".to_string()),
        // Few connections: HAProxy may not raise its descriptor limit here.
        ("maxconn 20000", "maxconn 64".to_string()),
    ];
    for (from, to) in replacements {
        let found = config.matches(from).count();
        assert!(
            found >= 1,
            "conf/haproxy.cfg no longer has {from:?}; update this test with it"
        );
        config = config.replace(from, &to);
    }
    config
}

#[test]
fn the_example_haproxy_cfg_balances_over_two_instances() {
    if !require(Need::Haproxy, "run a real HAProxy") {
        return;
    }
    let instances = [Instance::start("v2"), Instance::start("v2")];
    let balancer = Haproxy::start(1, |ports| example_config(ports, &instances));
    assert_balanced(&balancer, &instances);
}

// ---------------------------------------------------------------- sending headers

/// HAProxy as a target that speaks the PROXY protocol: an `accept-proxy`
/// bind in front of `sink`, logging for each session the client address
/// and destination it took from the header, and the bytes it passed on.
fn accept_proxy_config(ports: &[u16], sink: &Target) -> String {
    format!(
        "{HAPROXY_COMMON}
frontend from_proxy_channel
    bind 127.0.0.1:{} accept-proxy
    log-format \"parsed client=%ci:%cp destination=%fi:%fp uploaded=%U\"
    default_backend sink

backend sink
    server sink {}
",
        ports[0],
        sink.addr()
    )
}

/// The `parsed ...` log lines of `haproxy`.
fn parsed_lines(haproxy: &Haproxy) -> Vec<String> {
    haproxy
        .output_lines()
        .into_iter()
        .filter(|line| line.starts_with("parsed "))
        .collect()
}

/// A device sends through a daemon whose target 1 is HAProxy with
/// `accept-proxy`: HAProxy must read from the header the device's address
/// (`client`, as it shows in `peer`) and `destination`, then pass exactly the
/// device's bytes to the sink. The daemon counts the header in target 1's
/// bytes sent: `header(device, destination)` tells how long it is.
fn assert_header_reaches_a_real_parser(
    send_proxy: &str,
    accept: &str,
    preamble: &[u8],
    expected_client: Option<SocketAddr>,
    expected_destination: Option<SocketAddr>,
    header: impl Fn(SocketAddr, SocketAddr) -> usize,
) {
    let sink = Target::start(Behaviour::Record);
    let parser = Haproxy::start(1, |ports| accept_proxy_config(ports, &sink));
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &parser.addr(0).to_string()),
        ("PROXY_TARGET1_SEND_PROXY", send_proxy),
        ("PROXY_ACCEPT_PROXY_PROTOCOL", accept),
    ]);
    let stream = device_stream(1, 100_000);
    let mut device = Device::connect(daemon.addr());
    let device_addr: SocketAddr = device.name().parse().unwrap();
    let client = expected_client.unwrap_or(device_addr);
    let destination = expected_destination.unwrap_or(daemon.addr());
    let mut first = preamble.to_vec();
    first.extend_from_slice(&stream[..1000]);
    device.send(&first);
    device.send_in_random_writes(&stream[1000..], 5);
    device.shutdown_write();
    let received = device.read_until_end(secs(8));
    assert_eq!(received.end, End::Eof, "the device must be closed normally");

    let conns = sink.wait_connections(1, secs(5));
    conns[0].wait_done(secs(5));
    assert_eq!(conns.len(), 1, "the sink must see one connection");
    assert_same_bytes(
        "what the sink behind haproxy received",
        &stream,
        &conns[0].received(),
    );

    wait_until(secs(5), "haproxy's log line of the session", || {
        !parsed_lines(&parser).is_empty()
    });
    let expected = format!(
        "parsed client={}:{} destination={}:{} uploaded={}",
        client.ip(),
        client.port(),
        destination.ip(),
        destination.port(),
        stream.len()
    );
    assert_eq!(
        parsed_lines(&parser),
        [expected],
        "haproxy's reading of the header; its output:\n{}",
        parser.output_text()
    );

    let mut log = daemon.log();
    let ident = log.wait_ident(&client.to_string(), secs(5));
    log.wait_reason(&ident, 0, secs(5));
    log.wait_reason(&ident, 1, secs(5));
    log.assert_well_formed();
    let target = log.dropped(&ident, 1).unwrap();
    assert_eq!(
        number(target, "proxy.bytes.sent"),
        (header(client, destination) + stream.len()) as u64,
        "target 1's bytes sent: the header, then the device's bytes: {target}"
    );
    let device_end = log.dropped(&ident, 0).unwrap();
    assert_eq!(
        number(device_end, "proxy.bytes.received"),
        stream.len() as u64,
        "{device_end}"
    );
    assert_same_bytes("stored payloads", &stream, &log.payload(&ident, 0));
    parser.assert_servers_stayed_up();
    daemon.assert_no_errors();
}

#[test]
fn a_target_behind_send_proxy_v2_gets_the_device_address_and_exactly_its_bytes() {
    if !require(Need::Haproxy, "run a real HAProxy") {
        return;
    }
    // 16 fixed bytes and 12 of IPv4 addresses.
    assert_header_reaches_a_real_parser("v2", "off", b"", None, None, |_, _| 28);
}

#[test]
fn a_target_behind_send_proxy_v1_gets_the_device_address_and_exactly_its_bytes() {
    if !require(Need::Haproxy, "run a real HAProxy") {
        return;
    }
    assert_header_reaches_a_real_parser("v1", "off", b"", None, None, |s, d| {
        proxy_v1_header(s, d).len()
    });
}

#[test]
fn the_address_a_balancer_gave_is_passed_on_to_the_target() {
    if !require(Need::Haproxy, "run a real HAProxy") {
        return;
    }
    // A device behind a balancer, from IPv6, with TLVs the daemon skips; the
    // target gets a v1 header with the balancer's source and destination.
    let client = addr("[2001:db8::10]:40000");
    let destination = addr("[2001:db8::20]:5555");
    let tlvs = [
        tlv(TLV_AUTHORITY, b"devices.example.com"),
        tlv(TLV_NOOP, &[0; 5]),
    ]
    .concat();
    let incoming = v2_proxy(client, destination, &tlvs);
    assert_header_reaches_a_real_parser(
        "v1",
        "v2",
        &incoming,
        Some(client),
        Some(destination),
        |s, d| proxy_v1_header(s, d).len(),
    );
}

// ---------------------------------------------------------------- bad headers

/// What a device does after sending its bytes.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// Keeps the connection open and sends nothing more.
    Wait,
    /// Closes its sending side.
    Close,
}

/// A connection that must be refused.
struct Bad {
    what: &'static str,
    bytes: Vec<u8>,
    then: Then,
    /// The reason after `bad proxy protocol header: `, whole or (ending in
    /// `...`) its start.
    why: String,
}

/// A connection that sends `bytes` and then waits.
fn waits(what: &'static str, bytes: impl Into<Vec<u8>>, why: &str) -> Bad {
    Bad {
        what,
        bytes: bytes.into(),
        then: Then::Wait,
        why: why.to_string(),
    }
}

/// A connection that sends `bytes` and then closes its sending side.
fn closes(what: &'static str, bytes: impl Into<Vec<u8>>, why: &str) -> Bad {
    Bad {
        then: Then::Close,
        ..waits(what, bytes, why)
    }
}

/// The timeout for headers in these tests.
const HEADER_TIMEOUT: &str = "1s";

/// Opens every bad connection at once against a daemon that accepts
/// `accept`, and checks that each ends with its reason after its event 1
/// (with the socket's own peer), that nothing else is written for it, that
/// the device sees its connection closed, and that the target is never
/// connected. Then good connections (`good`, each a header for source
/// `peer` plus payload; `None` keeps the socket's address) work.
/// The index of "bad_proxy_header" among the stats' drop kinds.
const BAD_PROXY_HEADER_KIND: usize = 10;

fn assert_refused(accept: &str, cases: Vec<Bad>, good: Vec<(Vec<u8>, Option<SocketAddr>)>) {
    let target = Target::start(Behaviour::Record);
    let daemon = Daemon::start_with_control(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_ACCEPT_PROXY_PROTOCOL", accept),
        ("PROXY_CONNECT_TIMEOUT", HEADER_TIMEOUT),
    ]);
    let started = Instant::now();
    let mut devices: Vec<Device> = cases
        .iter()
        .map(|case| {
            let mut device = Device::connect(daemon.addr());
            if !case.bytes.is_empty() {
                device.send(&case.bytes);
            }
            if let Then::Close = case.then {
                device.shutdown_write();
            }
            device
        })
        .collect();

    let mut log = daemon.log();
    log.wait_for(secs(5), "every bad connection's event 2", |log| {
        devices.iter().all(|d| {
            log.ident_of_peer(d.name())
                .is_some_and(|ident| log.dropped(&ident, 0).is_some())
        })
    });
    let all_done = started.elapsed();
    log.assert_well_formed();
    for (case, device) in cases.iter().zip(&mut devices) {
        let ident = log.ident_of_peer(device.name()).unwrap();
        let messages = log.of_ident(&ident);
        let summary: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
        assert_eq!(
            messages.len(),
            2,
            "{}: expected only the device's event 1 and event 2, saw {summary:#?}",
            case.what
        );
        assert_eq!((source(messages[0]), event(messages[0])), (0, 1));
        assert_eq!(
            text(messages[0], "peer"),
            device.name(),
            "{}: with no header read, peer is the socket's",
            case.what
        );
        let reason = text(messages[1], "proxy.reason");
        let wanted = format!("bad proxy protocol header: {}", case.why);
        let matches = match wanted.strip_suffix("...") {
            Some(start) => reason.starts_with(start) && reason.len() > start.len(),
            None => reason == wanted,
        };
        assert!(
            matches,
            "{} ({:?}): expected reason {wanted:?}, saw {reason:?}",
            case.what, case.then
        );
        assert_eq!(
            number(messages[1], "proxy.bytes.sent"),
            0,
            "{}: {}",
            case.what,
            messages[1]
        );
        let end = device.read_until_end(secs(3));
        assert_ne!(
            end.end,
            End::StillOpen,
            "{}: the daemon must close the connection",
            case.what
        );
        assert!(
            end.bytes.is_empty(),
            "{}: the daemon sent {:?}",
            case.what,
            end.bytes
        );
    }
    assert!(
        target.connections().is_empty(),
        "a target was connected for a connection without a good header"
    );
    // Counted apart in `ctl stats` and the metrics (kind "bad_proxy_header").
    let stats = ctl_json(&daemon.control_socket(), &["stats"]);
    assert_eq!(
        stats["stats"]["drops"][0][BAD_PROXY_HEADER_KIND],
        cases.len(),
        "device drops by kind: {}",
        stats["stats"]["drops"][0]
    );
    // The slow ones end at the header timeout, not before and not much
    // later; the others at once, before any timeout.
    assert!(
        all_done >= secs(1) && all_done < secs(4),
        "refusing took {all_done:?} with a 1 s header timeout"
    );
    let refused_at = |case: &Bad, device: &Device| {
        let ident = log.ident_of_peer(device.name()).unwrap();
        let dropped = log.dropped(&ident, 0).unwrap();
        let at = dropped.get("server.timestamp").and_then(Value::as_f64);
        (
            at.expect("server.timestamp"),
            case.why.starts_with("none within"),
        )
    };
    let times: Vec<(f64, bool)> = cases
        .iter()
        .zip(&devices)
        .map(|(case, device)| refused_at(case, device))
        .collect();
    let first_timeout = times
        .iter()
        .filter(|t| t.1)
        .map(|t| t.0)
        .fold(f64::MAX, f64::min);
    for (case, (at, _)) in cases.iter().zip(&times).filter(|(_, t)| !t.1) {
        assert!(
            *at < first_timeout,
            "{}: refused at {at}, after the first header timeout ({first_timeout}): it must \
             not wait for the timeout",
            case.what
        );
    }

    // The daemon goes on: good connections work.
    for (index, (header, peer)) in good.iter().enumerate() {
        let payload = device_stream(index, 5000);
        let mut device = Device::connect(daemon.addr());
        let mut bytes = header.clone();
        bytes.extend_from_slice(&payload);
        device.send(&bytes);
        device.shutdown_write();
        assert_eq!(device.read_until_end(secs(5)).end, End::Eof);
        let peer = peer.map_or(device.name().to_string(), |p| p.to_string());
        let ident = log.wait_ident(&peer, secs(5));
        assert_eq!(log.wait_reason(&ident, 0, secs(5)), "closed by peer");
        assert_same_bytes(
            &format!("stored payload of good connection {index} ({peer})"),
            &payload,
            &log.payload(&ident, 0),
        );
        let reached = target
            .connections()
            .into_iter()
            .find(|c| c.received().starts_with(&payload[..16]));
        if is_local_header(header) {
            // A balancer's health check: recorded, but no target is connected.
            assert!(
                reached.is_none(),
                "a LOCAL (health check) connection must not reach a target"
            );
            continue;
        }
        let conn = reached
            .unwrap_or_else(|| panic!("good connection {index} ({peer}) never reached the target"));
        conn.wait_done(secs(5));
        assert_same_bytes(
            &format!("the target's bytes of good connection {index}"),
            &payload,
            &conn.received(),
        );
        let dropped = log.dropped(&ident, 0).unwrap();
        assert_eq!(
            number(dropped, "proxy.bytes.received"),
            payload.len() as u64,
            "{dropped}"
        );
    }
    wait_until(secs(5), "every good connection's end", || {
        log.refresh();
        every_device_dropped(&log)
    });
    let relayed = good
        .iter()
        .filter(|(header, _)| !is_local_header(header))
        .count();
    assert_eq!(target.connections().len(), relayed);
    daemon.assert_no_errors();
}

/// A v2 header of `total` bytes: IPv4 addresses and a NOOP TLV filling the
/// rest.
fn v2_header_of_length(total: usize, source: SocketAddr) -> Vec<u8> {
    let padding = total - 16 - 12 - 3;
    v2_proxy(
        source,
        addr("192.0.2.99:5555"),
        &tlv(TLV_NOOP, &vec![0; padding]),
    )
}

fn v2_garbage_after_signature(rest: &[u8]) -> Vec<u8> {
    [V2_SIGNATURE, rest].concat()
}

#[test]
fn bad_v2_headers_are_refused_with_their_reason_and_reach_no_target() {
    let good_v1 = proxy_v1_header(addr("192.0.2.1:1000"), addr("192.0.2.2:2000"));
    let cases = vec![
        waits(
            "no header",
            "GET / HTTP/1.1\r\n\r\n",
            "expected a v2 header",
        ),
        waits("a v1 header", good_v1.as_str(), "expected a v2 header"),
        waits(
            "version 3",
            v2_garbage_after_signature(&[0x31, TCP4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            "v2: ...",
        ),
        waits(
            "command 0xf",
            v2_garbage_after_signature(&[0x2f, TCP4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            "v2: ...",
        ),
        waits(
            "IPv4 addresses in 4 bytes",
            v2_header(V2_PROXY, TCP4, &[127, 0, 0, 1]),
            "v2: ...",
        ),
        waits(
            "declares 64 KiB",
            v2_garbage_after_signature(&[V2_PROXY, TCP4, 0xff, 0xff]),
            "v2: longer than 4096 bytes (65551)",
        ),
        waits(
            "one byte over the cap",
            v2_header_of_length(4097, addr("192.0.2.1:1")),
            "v2: longer than 4096 bytes (4097)",
        ),
        closes(
            "cut in the signature",
            &V2_SIGNATURE[..7],
            "the connection closed before it",
        ),
        closes(
            "cut in the addresses",
            v2_proxy(addr("192.0.2.1:1"), addr("192.0.2.2:2"), b"")[..22].to_vec(),
            "the connection closed before it",
        ),
        closes(
            "nothing, then the end",
            Vec::new(),
            "the connection closed before it",
        ),
        waits(
            "half a header, then silence",
            &V2_SIGNATURE[..9],
            "none within 1s",
        ),
        waits("silence", Vec::new(), "none within 1s"),
    ];
    let good = vec![
        (
            v2_proxy(
                addr("192.0.2.10:40000"),
                addr("192.0.2.20:5555"),
                &tlv(TLV_AUTHORITY, b"devices.example.com"),
            ),
            Some(addr("192.0.2.10:40000")),
        ),
        // A LOCAL header (a balancer's health check) keeps the socket's
        // address.
        (v2_header(V2_LOCAL, 0, b""), None),
        // The longest header accepted.
        (
            v2_header_of_length(4096, addr("192.0.2.11:41000")),
            Some(addr("192.0.2.11:41000")),
        ),
        (
            v2_proxy(addr("[2001:db8::1]:40001"), addr("[2001:db8::2]:5555"), b""),
            Some(addr("[2001:db8::1]:40001")),
        ),
    ];
    assert_refused("v2", cases, good);
}

#[test]
fn bad_v1_headers_are_refused_with_their_reason_and_reach_no_target() {
    let good_v2 = v2_proxy(addr("192.0.2.1:1000"), addr("192.0.2.2:2000"), b"");
    let cases = vec![
        waits(
            "no header",
            "GET / HTTP/1.1\r\n\r\n",
            "expected a v1 header",
        ),
        waits("a v2 header", good_v2, "expected a v1 header"),
        waits(
            "lower case",
            "proxy TCP4 192.0.2.1 192.0.2.2 1000 2000\r\n",
            "expected a v1 header",
        ),
        waits(
            "not an address",
            "PROXY TCP4 192.0.2.1 example.com 1000 2000\r\n",
            "v1: ...",
        ),
        waits(
            "an unknown family",
            "PROXY TCP5 192.0.2.1 192.0.2.2 1000 2000\r\n",
            "v1: ...",
        ),
        waits(
            "a port over 65535",
            "PROXY TCP4 192.0.2.1 192.0.2.2 1000 70000\r\n",
            "v1: ...",
        ),
        waits(
            "IPv6 addresses under TCP4",
            "PROXY TCP4 2001:db8::1 2001:db8::2 1000 2000\r\n",
            "v1: ...",
        ),
        waits(
            "a port missing",
            "PROXY TCP4 192.0.2.1 192.0.2.2 1000\r\n",
            "v1: ...",
        ),
        waits(
            "no end of line in 107 bytes",
            format!("PROXY TCP4 {}", "1".repeat(200)),
            "v1: no end of line within 107 bytes",
        ),
        closes(
            "cut in the addresses",
            "PROXY TCP4 192.0.2.1 19",
            "the connection closed before it",
        ),
        waits(
            "half a header, then silence",
            "PROXY TCP4 192.0.2.1 ",
            "none within 1s",
        ),
        waits("silence", Vec::new(), "none within 1s"),
    ];
    let good = vec![
        (
            proxy_v1_header(addr("192.0.2.10:40000"), addr("192.0.2.20:5555")).into_bytes(),
            Some(addr("192.0.2.10:40000")),
        ),
        (
            proxy_v1_header(addr("[2001:db8::1]:40001"), addr("[2001:db8::2]:5555")).into_bytes(),
            Some(addr("[2001:db8::1]:40001")),
        ),
        // UNKNOWN keeps the socket's address.
        (b"PROXY UNKNOWN\r\n".to_vec(), None),
    ];
    assert_refused("v1", cases, good);
}

#[test]
fn with_any_version_both_are_read_and_the_rest_refused() {
    let cases = vec![
        waits(
            "no header",
            "GET / HTTP/1.1\r\n\r\n",
            "expected a v1 or v2 header",
        ),
        waits(
            "a v2 signature gone wrong",
            b"\r\n\r\n\0\r\nQUAT\n".to_vec(),
            "expected a v1 or v2 header",
        ),
        waits(
            "a bad v1 header",
            "PROXY TCP4 192.0.2.1 192.0.2.2 x 2000\r\n",
            "v1: ...",
        ),
        waits(
            "a v2 header over the cap",
            v2_garbage_after_signature(&[V2_PROXY, TCP6, 0x10, 0x00]),
            "v2: longer than 4096 bytes (4112)",
        ),
        closes("cut short", "PROXY", "the connection closed before it"),
        waits("silence", Vec::new(), "none within 1s"),
    ];
    let good = vec![
        (
            proxy_v1_header(addr("192.0.2.10:40000"), addr("192.0.2.20:5555")).into_bytes(),
            Some(addr("192.0.2.10:40000")),
        ),
        (
            v2_proxy(addr("192.0.2.11:40001"), addr("192.0.2.20:5555"), b""),
            Some(addr("192.0.2.11:40001")),
        ),
    ];
    assert_refused("any", cases, good);
}

#[test]
fn a_header_that_comes_slowly_but_in_time_is_read() {
    let target = Target::start(Behaviour::Record);
    let daemon = Daemon::start(&[
        ("PROXY_TARGET1", &target.address()),
        ("PROXY_ACCEPT_PROXY_PROTOCOL", "any"),
        ("PROXY_CONNECT_TIMEOUT", HEADER_TIMEOUT),
    ]);
    let client = addr("192.0.2.10:40000");
    let header = v2_proxy(client, addr("192.0.2.20:5555"), &tlv(TLV_NOOP, &[0; 40]));
    let mut device = Device::connect(daemon.addr());
    // A byte at a time over about half the header timeout, then the
    // payload in the same write as the header's last byte.
    for byte in &header[..header.len() - 1] {
        device.send(&[*byte]);
        thread::sleep(millis(500 / header.len() as u64));
    }
    let payload = device_stream(3, 2000);
    device.send(&[&header[header.len() - 1..], &payload[..]].concat());
    device.shutdown_write();
    assert_eq!(device.read_until_end(secs(5)).end, End::Eof);

    let mut log = daemon.log();
    let ident = log.wait_ident(&client.to_string(), secs(5));
    assert_eq!(log.wait_reason(&ident, 0, secs(5)), "closed by peer");
    assert_same_bytes("stored payload", &payload, &log.payload(&ident, 0));
    let conns = target.wait_connections(1, secs(5));
    conns[0].wait_done(secs(5));
    assert_same_bytes("the target's bytes", &payload, &conns[0].received());
}
