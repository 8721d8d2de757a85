//! Keeps the address of each target given by host name fresh, off the
//! workers: a slow DNS server must never stall traffic.
//!
//! One thread per named target. Workers flag that they connected to it; once
//! a second the thread looks at the flag and, if set (or while the name has
//! never resolved), resolves the name again and tells every worker when the
//! addresses changed. A failed lookup keeps the last good addresses.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{info, warn};

use crate::config::TargetAddress;
use crate::net::worker::{Command, WorkerHandle};

const RESOLVE_EVERY: Duration = Duration::from_secs(1);

/// Resolves a target now (blocking): every address, in the resolver's
/// order (connects try them in turn).
pub fn resolve(address: &TargetAddress) -> std::io::Result<Vec<SocketAddr>> {
    if let Some(literal) = address.literal() {
        return Ok(vec![literal]);
    }
    let mut found: Vec<SocketAddr> = Vec::new();
    for candidate in (address.host.as_str(), address.port).to_socket_addrs()? {
        if !found.contains(&candidate) {
            found.push(candidate);
        }
    }
    match found.is_empty() {
        true => Err(std::io::Error::other("no address found")),
        false => Ok(found),
    }
}

/// Starts the thread that follows `address` for target `number`.
pub fn spawn(
    number: u8,
    address: TargetAddress,
    current: Vec<SocketAddr>,
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
    mut current: Vec<SocketAddr>,
    used: &AtomicBool,
    workers: &[WorkerHandle],
) {
    let mut failing = false;
    loop {
        std::thread::sleep(RESOLVE_EVERY);
        if !current.is_empty() && !used.swap(false, Ordering::Relaxed) {
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
        if current == found {
            continue;
        }
        info!("target {number}: {address} now resolves to {found:?}");
        current = found;
        for worker in workers {
            if !worker.send(Command::TargetAddress {
                number,
                addresses: current.clone(),
            }) {
                return;
            }
        }
    }
}
