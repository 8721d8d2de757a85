//! Keeps the address of each target given by host name fresh, off the
//! workers: a slow DNS server must never stall traffic.
//!
//! One thread per named target. Workers flag that they connected to it; once
//! a second the thread looks at the flag and, if set (or while the name has
//! never resolved), resolves the name again and tells every worker when the
//! address changed. A failed lookup keeps the last good address.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{info, warn};

use crate::config::TargetAddress;
use crate::worker::{Command, WorkerHandle};

const RESOLVE_EVERY: Duration = Duration::from_secs(1);

/// Resolves a target now (blocking); the first address wins.
pub fn resolve(address: &TargetAddress) -> std::io::Result<SocketAddr> {
    if let Some(literal) = address.literal() {
        return Ok(literal);
    }
    (address.host.as_str(), address.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address found"))
}

/// Starts the thread that follows `address` for target `number`.
pub fn spawn(
    number: u8,
    address: TargetAddress,
    current: Option<SocketAddr>,
    used: Arc<AtomicBool>,
    workers: Vec<WorkerHandle>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("resolver-{number}"))
        .spawn(move || follow(number, &address, current, &used, &workers))?;
    Ok(())
}

fn follow(
    number: u8,
    address: &TargetAddress,
    mut current: Option<SocketAddr>,
    used: &AtomicBool,
    workers: &[WorkerHandle],
) {
    let mut failing = false;
    loop {
        std::thread::sleep(RESOLVE_EVERY);
        if current.is_some() && !used.swap(false, Ordering::Relaxed) {
            continue;
        }
        let found = match resolve(address) {
            Ok(found) => found,
            Err(e) => {
                if !failing {
                    warn!("target {number}: cannot resolve {address}: {e}; keeping {current:?}");
                }
                failing = true;
                continue;
            }
        };
        failing = false;
        if current == Some(found) {
            continue;
        }
        info!("target {number}: {address} now resolves to {found}");
        current = Some(found);
        for worker in workers {
            if !worker.send(Command::TargetAddress {
                number,
                address: current,
            }) {
                return;
            }
        }
    }
}
