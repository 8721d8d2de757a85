//! Who may hold a device connection: PROXY_ALLOW, PROXY_MAX_CONNECTIONS and
//! PROXY_MAX_CONNECTIONS_PER_IP, checked at accept.
//!
//! A refused peer costs no disk: the acceptor closes it before any message
//! is written, and only counts it by cause. An admitted connection holds a
//! [`Permit`] for its whole life; dropping the permit (when the worker
//! removes the connection) gives its place back. The per-address counts
//! exist only when PROXY_MAX_CONNECTIONS_PER_IP is set, and hold an entry
//! only for addresses with a connection open, so their memory is bounded by
//! PROXY_MAX_CONNECTIONS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::warn;

use crate::config::Config;
use crate::control::stats::Refusal;
use crate::net::allow::{AllowList, canonical};

/// The limits, and the connections holding a place under them.
#[derive(Debug)]
pub struct Admission {
    allow: Option<AllowList>,
    max_connections: usize,
    max_per_address: Option<usize>,
    open: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    address: IpAddr,
}

impl Admission {
    pub fn new(config: &Config) -> Arc<Admission> {
        Arc::new(Admission {
            allow: config.allow.clone(),
            max_connections: config.max_connections,
            max_per_address: config.max_connections_per_ip,
            open: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
        })
    }

    /// Connections (and UDP sessions) open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A place for a connection from `peer`, or why there is none.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refusal> {
        let address = canonical(peer);
        if self
            .allow
            .as_ref()
            .is_some_and(|list| !list.allows(address))
        {
            return Err(Refusal::NotAllowed);
        }
        if self.open.load(Ordering::Relaxed) >= self.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        if let Some(limit) = self.max_per_address {
            let mut counts = self.counts();
            let count = counts.entry(address).or_insert(0);
            if *count >= limit {
                return Err(Refusal::TooManyFromAddress);
            }
            *count += 1;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            admission: Arc::clone(self),
            address,
        })
    }

    /// The per-address counts; a panic elsewhere while holding the lock
    /// leaves counts that are still whole numbers, so they stay usable.
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, address: IpAddr) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if self.max_per_address.is_some() {
            let mut counts = self.counts();
            if let Some(count) = counts.get_mut(&address) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&address);
                }
            }
        }
    }
}

/// Refusals are logged at most this often: a flood must not fill the log.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Logs refusals at most once a minute, saying how many went unlogged
/// (`ctl stats` and the metrics count every one).
pub struct RefusalLog {
    /// What a refusal does: "refused a device connection".
    what: &'static str,
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    pub fn new(what: &'static str) -> RefusalLog {
        RefusalLog {
            what,
            last: None,
            unlogged: 0,
        }
    }

    pub fn note(&mut self, peer: SocketAddr, cause: Refusal) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + REFUSAL_LOG_EVERY) {
            self.unlogged += 1;
            return;
        }
        let earlier = std::mem::take(&mut self.unlogged);
        self.last = Some(now);
        warn!(
            "{} from {peer}: {} ({earlier} more since the last such line; ctl stats counts them \
             by cause)",
            self.what,
            cause.describe()
        );
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(pairs: &[(&str, &str)]) -> Arc<Admission> {
        let vars = pairs.iter().map(|(n, v)| (n.to_string(), v.to_string()));
        Admission::new(&Config::from_vars(vars).expect("test config"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn places_are_given_back_when_permits_drop() {
        let admission = admission(&[("PROXY_MAX_CONNECTIONS", "2")]);
        let first = admission.admit(ip("127.0.0.1")).expect("first");
        let _second = admission.admit(ip("127.0.0.2")).expect("second");
        assert_eq!(
            admission.admit(ip("127.0.0.3")).err(),
            Some(Refusal::TooManyConnections)
        );
        drop(first);
        assert!(admission.admit(ip("127.0.0.3")).is_ok());
    }

    #[test]
    fn one_address_is_limited_and_mapped_addresses_count_as_ipv4() {
        let admission = admission(&[("PROXY_MAX_CONNECTIONS_PER_IP", "1")]);
        let held = admission.admit(ip("127.0.0.1")).expect("first");
        assert_eq!(
            admission.admit(ip("::ffff:127.0.0.1")).err(),
            Some(Refusal::TooManyFromAddress)
        );
        assert!(admission.admit(ip("127.0.0.2")).is_ok());
        drop(held);
        assert!(admission.admit(ip("127.0.0.1")).is_ok());
        assert!(
            admission.counts().len() <= 1,
            "entries of closed addresses are removed"
        );
    }

    #[test]
    fn peers_outside_the_allow_list_are_refused() {
        let admission = admission(&[("PROXY_ALLOW", "127.0.0.0/8")]);
        let held = admission.admit(ip("::ffff:127.0.0.9")).expect("allowed");
        assert_eq!(admission.admit(ip("::1")).err(), Some(Refusal::NotAllowed));
        assert_eq!(admission.open(), 1);
        drop(held);
        assert_eq!(admission.open(), 0);
    }
}
