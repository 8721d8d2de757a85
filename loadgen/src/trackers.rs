//! A fleet of tracker devices: thousands of connections, each sending one
//! timestamped packet per second.
//!
//! Connecting is paced by what the target has seen: at most
//! [`IN_FLIGHT`] devices may be connected but not yet identified at the
//! target, so neither proxy's accept backlog overflows (a dropped SYN would
//! cost a one-second retransmit, not a measure of the proxy). Sending
//! spreads the devices evenly over each second; each packet carries its send
//! time and the target records the latency. A socket that cannot take 100
//! bytes means the proxy stopped reading: that fails the run.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::target::Shared;
use crate::wire::{self, Mode, PACKET_LEN};

/// Devices connected but not yet seen by the target.
const IN_FLIGHT: usize = 64;

pub struct Fleet {
    devices: Vec<TcpStream>,
    /// Packets each device has sent.
    packets: u64,
    /// Connections the target had closed before the fleet connected
    /// (other devices of the same run).
    finished_before: usize,
}

impl Fleet {
    /// Connects `count` devices (ids 1..=count); each sends its header at
    /// once. Returns when the target has seen all of them. Connections the
    /// target saw before (other devices of the run, closed by now) do not
    /// count.
    pub fn connect(
        addr: SocketAddr,
        count: usize,
        target: &Shared,
        deadline: Duration,
    ) -> Result<Fleet, String> {
        let started = Instant::now();
        let identified_before = target.identified.load(Relaxed);
        let finished_before = target.finished.load(Relaxed);
        let identified = || target.identified.load(Relaxed) - identified_before;
        let mut devices = Vec::with_capacity(count);
        for index in 0..count {
            wait_for(
                target,
                started + deadline,
                "connecting the trackers",
                || index < identified() + IN_FLIGHT,
            )?;
            let id = index as u64 + 1;
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("tracker {id}: connect: {e}"))?;
            stream
                .set_nodelay(true)
                .and_then(|()| stream.write_all(&wire::header(Mode::Tracker, id)))
                .and_then(|()| stream.set_nonblocking(true))
                .map_err(|e| format!("tracker {id}: {e}"))?;
            devices.push(stream);
        }
        wait_for(
            target,
            started + deadline,
            "connecting the trackers",
            || identified() == count,
        )?;
        Ok(Fleet {
            devices,
            packets: 0,
            finished_before,
        })
    }

    /// Sends one packet per device per second for `secs` seconds, device i
    /// at i/count of each second.
    pub fn send(&mut self, secs: u32) -> Result<(), String> {
        let count = self.devices.len() as u64;
        let start = Instant::now();
        for second in 0..secs as u64 {
            for (index, device) in self.devices.iter_mut().enumerate() {
                let due = Duration::from_nanos(
                    second * 1_000_000_000 + index as u64 * 1_000_000_000 / count,
                );
                let now = start.elapsed();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let id = index as u64 + 1;
                let packet = wire::packet(id, self.packets, wire::now_ns());
                match device.write(&packet) {
                    Ok(PACKET_LEN) => {}
                    Ok(_) => {
                        return Err(format!(
                            "tracker {id}: socket full (the proxy is not reading)"
                        ));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(format!(
                            "tracker {id}: socket full (the proxy is not reading)"
                        ));
                    }
                    Err(e) => return Err(format!("tracker {id}: write: {e}")),
                }
            }
            self.packets += 1;
        }
        Ok(())
    }

    /// Closes every device's sending side, waits until the target saw all
    /// of them close, and returns the bytes each sent after its header.
    pub fn close(self, target: &Shared, deadline: Duration) -> Result<HashMap<u64, u64>, String> {
        for device in &self.devices {
            // A device the proxy already closed fails the count check below.
            let _ = device.shutdown(Shutdown::Write);
        }
        let count = self.devices.len();
        wait_for(
            target,
            Instant::now() + deadline,
            "closing the trackers",
            || target.finished.load(Relaxed) - self.finished_before == count,
        )?;
        let bytes = self.packets * PACKET_LEN as u64;
        Ok((1..=self.devices.len() as u64)
            .map(|id| (id, bytes))
            .collect())
    }
}

/// Waits until `done`, failing at `deadline` or as soon as the target has
/// seen something wrong.
pub(crate) fn wait_for(
    target: &Shared,
    deadline: Instant,
    what: &str,
    done: impl Fn() -> bool,
) -> Result<(), String> {
    while !done() {
        if target.failed.load(Relaxed) > 0 {
            return Err(format!("{what}: the target failed"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what}: stalled ({} connections identified, {} closed at the target)",
                target.identified.load(Relaxed),
                target.finished.load(Relaxed)
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}
