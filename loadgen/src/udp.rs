//! UDP trackers: a fleet of UDP devices, each sending one datagram a
//! second, and the UDP target that checks every datagram and records its
//! latency.
//!
//! A datagram is a tracker's header ([`wire::header`], which names the
//! device) and then one packet ([`wire::packet`]: sequence number, send
//! time, filler). The target checks each byte, counts datagrams per device
//! and records the latency of every datagram but a device's first. UDP
//! may drop: a lost datagram is counted (the
//! run reports how many), a wrong or doubled one fails the run.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::wire::{self, HEADER_LEN, Mode, PACKET_LEN};

/// One datagram: header, then packet.
const DATAGRAM_LEN: usize = HEADER_LEN + PACKET_LEN;

/// The target's receive buffer, as proxy-channel's listening sockets have
/// (and nginx's, configured so): a burst must not be lost at the target
/// while its thread waits for a core.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Counters read while the target runs.
#[derive(Default)]
pub struct UdpShared {
    pub datagrams: AtomicU64,
    /// Devices seen at least once.
    pub identified: AtomicUsize,
    pub failed: AtomicUsize,
    stop: AtomicBool,
}

/// What the target saw, once stopped.
pub struct UdpOutcome {
    /// Per device id: datagrams received, and the next sequence number.
    pub per_device: HashMap<u64, (u64, u64)>,
    pub failures: Vec<String>,
    /// Nanoseconds from send to arrival.
    pub latency: Histogram<u64>,
}

pub struct UdpTarget {
    pub addr: SocketAddr,
    pub shared: Arc<UdpShared>,
    thread: JoinHandle<UdpOutcome>,
}

impl UdpTarget {
    pub fn start() -> io::Result<UdpTarget> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let size = RECEIVE_BUFFER;
        // SAFETY: setsockopt with a c_int that outlives the call, and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let addr = socket.local_addr()?;
        let shared = Arc::new(UdpShared::default());
        let seen = shared.clone();
        let thread = std::thread::Builder::new()
            .name("udp-target".into())
            .spawn(move || serve(&socket, &seen))?;
        Ok(UdpTarget {
            addr,
            shared,
            thread,
        })
    }

    pub fn finish(self) -> UdpOutcome {
        self.shared.stop.store(true, Relaxed);
        self.thread.join().expect("UDP target panicked")
    }
}

fn serve(socket: &UdpSocket, shared: &UdpShared) -> UdpOutcome {
    let mut outcome = UdpOutcome {
        per_device: HashMap::new(),
        failures: Vec::new(),
        latency: Histogram::new(3).expect("histogram"),
    };
    let mut buffer = [0u8; 2048];
    // Bounded by the stop flag, looked at every 50 ms at least.
    while !shared.stop.load(Relaxed) {
        let n = match socket.recv(&mut buffer) {
            Ok(n) => n,
            Err(_) => continue,
        };
        shared.datagrams.fetch_add(1, Relaxed);
        if let Err(failure) = take(&buffer[..n], &mut outcome, shared) {
            shared.failed.fetch_add(1, Relaxed);
            if outcome.failures.len() < 10 {
                outcome.failures.push(failure);
            }
        }
    }
    outcome
}

fn take(datagram: &[u8], outcome: &mut UdpOutcome, shared: &UdpShared) -> Result<(), String> {
    if datagram.len() != DATAGRAM_LEN {
        return Err(format!("a datagram of {} bytes", datagram.len()));
    }
    let header: &[u8; HEADER_LEN] = datagram[..HEADER_LEN].try_into().expect("sized");
    let (_, id) = wire::parse_header(header)?;
    let packet: &[u8; PACKET_LEN] = datagram[HEADER_LEN..].try_into().expect("sized");
    let seq = u64::from_le_bytes(packet[..8].try_into().expect("8 bytes"));
    let sent_ns = wire::check_packet(id, seq, packet)?;
    let (received, next) = outcome.per_device.entry(id).or_insert((0, 0));
    if *received == 0 {
        shared.identified.fetch_add(1, Relaxed);
    }
    // A gap is a loss (counted by the caller); going back is a fault.
    if seq < *next {
        return Err(format!("device {id}: datagram {seq} after {next}"));
    }
    *received += 1;
    *next = seq + 1;
    // The steady state only: a first datagram also opens a session (its
    // cost is the run's connect_s), as TCP trackers measure no connect.
    if seq > 0 {
        let latency = wire::now_ns().saturating_sub(sent_ns).max(1);
        // Values past the histogram's range are clamped, never an error.
        let _ = outcome.latency.record(latency);
    }
    Ok(())
}

/// The devices: one UDP socket each.
pub struct UdpFleet {
    devices: Vec<UdpSocket>,
    to: SocketAddr,
    /// Datagrams each device has sent.
    pub sent: u64,
}

impl UdpFleet {
    /// `count` devices (ids 1..=count), each sending its first datagram,
    /// paced so that the proxy opens about 10,000 sessions a second;
    /// returns when the target has seen all of them, or after a second
    /// more (a first datagram may be lost: the run counts it).
    pub fn open(
        to: SocketAddr,
        count: usize,
        target: &UdpShared,
        deadline: Duration,
    ) -> Result<UdpFleet, String> {
        let started = Instant::now();
        let mut fleet = UdpFleet {
            devices: Vec::with_capacity(count),
            to,
            sent: 0,
        };
        for index in 0..count {
            let socket =
                UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("device {index}: {e}"))?;
            fleet.devices.push(socket);
        }
        let pace = Duration::from_micros(100);
        for index in 0..count {
            let due = pace * index as u32;
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
            fleet.send_one(index)?;
        }
        fleet.sent = 1;
        let sent_all = Instant::now();
        while target.identified.load(Relaxed) < count {
            if target.failed.load(Relaxed) > 0 {
                return Err("opening the sessions: the target failed".into());
            }
            if started.elapsed() > deadline {
                return Err(format!(
                    "opening the sessions: {} of {count} devices reached the target",
                    target.identified.load(Relaxed)
                ));
            }
            if sent_all.elapsed() > Duration::from_secs(1) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(fleet)
    }

    fn send_one(&self, index: usize) -> Result<(), String> {
        let id = index as u64 + 1;
        let mut datagram = [0u8; DATAGRAM_LEN];
        datagram[..HEADER_LEN].copy_from_slice(&wire::header(Mode::Tracker, id));
        datagram[HEADER_LEN..].copy_from_slice(&wire::packet(id, self.sent, wire::now_ns()));
        self.devices[index]
            .send_to(&datagram, self.to)
            .map(|_| ())
            .map_err(|e| format!("device {id}: send: {e}"))
    }

    /// One datagram per device per second for `secs` seconds, device i at
    /// i/count of each second.
    pub fn send(&mut self, secs: u32) -> Result<(), String> {
        let count = self.devices.len() as u64;
        let start = Instant::now();
        for second in 0..u64::from(secs) {
            for index in 0..self.devices.len() {
                let due = Duration::from_nanos(
                    second * 1_000_000_000 + index as u64 * 1_000_000_000 / count,
                );
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                self.send_one(index)?;
            }
            self.sent += 1;
        }
        Ok(())
    }
}
