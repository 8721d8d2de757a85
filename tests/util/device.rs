//! Device clients: blocking sockets with short read ticks, so that every
//! read loop can look at its deadline.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use super::{READ_TICK, is_timeout, secs};

/// How a device's reading ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The daemon closed the connection (FIN).
    Eof,
    /// The connection was reset or failed.
    Reset,
    /// The deadline passed with the connection still open.
    StillOpen,
}

/// What a device read until its connection ended.
#[derive(Debug)]
pub struct Received {
    pub bytes: Vec<u8>,
    pub end: End,
}

/// A device: a blocking client socket whose reads wake up every 50 ms.
pub struct Device {
    stream: TcpStream,
    name: String,
}

impl Device {
    pub fn connect(addr: SocketAddr) -> Device {
        let stream = TcpStream::connect_timeout(&addr, secs(5))
            .unwrap_or_else(|e| panic!("device cannot connect to {addr}: {e}"));
        stream.set_read_timeout(Some(READ_TICK)).unwrap();
        stream.set_write_timeout(Some(secs(15))).unwrap();
        stream.set_nodelay(true).unwrap();
        let name = stream.local_addr().unwrap().to_string();
        Device { stream, name }
    }

    /// The `peer` the daemon records for this device: its local ip:port.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("device {} cannot send: {e}", self.name));
    }

    /// Sends `bytes` in writes of random sizes from 1 byte to 64 KiB.
    pub fn send_in_random_writes(&mut self, bytes: &[u8], seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut offset = 0;
        while offset < bytes.len() {
            let size = rng.random_range(1..=64 * 1024).min(bytes.len() - offset);
            self.send(&bytes[offset..offset + size]);
            offset += size;
        }
    }

    pub fn shutdown_write(&self) {
        self.stream
            .shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("device {} cannot shut down writing: {e}", self.name));
    }

    /// Reads until the connection ends or `timeout` passes.
    pub fn read_until_end(&mut self, timeout: Duration) -> Received {
        let deadline = Instant::now() + timeout;
        let mut bytes = Vec::new();
        let mut buffer = vec![0; 64 * 1024];
        while Instant::now() < deadline {
            match self.stream.read(&mut buffer) {
                Ok(0) => {
                    return Received {
                        bytes,
                        end: End::Eof,
                    };
                }
                Ok(n) => bytes.extend_from_slice(&buffer[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    return Received {
                        bytes,
                        end: End::Reset,
                    };
                }
            }
        }
        Received {
            bytes,
            end: End::StillOpen,
        }
    }

    /// Reads until at least `n` bytes came; fails the test if the
    /// connection ends or `timeout` passes first.
    pub fn read_at_least(&mut self, n: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut bytes = Vec::new();
        let mut buffer = vec![0; 64 * 1024];
        while bytes.len() < n {
            assert!(
                Instant::now() < deadline,
                "device {} expected {n} bytes within {timeout:?}, got {} ({:?})",
                self.name,
                bytes.len(),
                String::from_utf8_lossy(&bytes)
            );
            match self.stream.read(&mut buffer) {
                Ok(0) => panic!(
                    "device {} expected {n} bytes, the connection closed after {} ({:?})",
                    self.name,
                    bytes.len(),
                    String::from_utf8_lossy(&bytes)
                ),
                Ok(got) => bytes.extend_from_slice(&buffer[..got]),
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("device {} read failed: {e}", self.name),
            }
        }
        bytes
    }

    /// Closes with SO_LINGER 0, so that the daemon sees a reset.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the socket is open and `linger` is the struct SO_LINGER
        // expects, with its size passed along.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast::<libc::c_void>(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt(SO_LINGER) failed");
        drop(self.stream);
    }
}

/// A balancer's PROXY protocol v1 header for a device at `source` that
/// connected to `destination`, as the daemon and HAProxy write it.
pub fn proxy_v1_header(source: SocketAddr, destination: SocketAddr) -> String {
    let family = match source {
        SocketAddr::V4(_) => "TCP4",
        SocketAddr::V6(_) => "TCP6",
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
}
