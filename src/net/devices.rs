//! The device state every worker shares (SPEC, Devices): the detectors,
//! each target's device list (PROXY_TARGETn_DEVICES), and, with
//! PROXY_DEVICE_UNIQUE, the connection each device has open.
//!
//! Invariants kept here:
//! - the lists and the registry are looked at only when a connection's
//!   device is recognised and when it ends, never on the forwarding path
//!   (one lock and one hash probe each time);
//! - a list is replaced whole on SIGHUP ([`Devices::reload`]); a file that
//!   cannot be read or parsed then keeps the old list (and says why in
//!   the log);
//! - the registry names at most one connection per device, the newest
//!   opened of those recognised; an entry is removed only by the
//!   connection it names, so an older connection that ends late never
//!   unregisters a newer one.
//!   Older connections are closed through their worker's command channel,
//!   like `ctl close` does: nothing here touches another worker's
//!   connections.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::Instant;

use log::{debug, info, warn};

use crate::config::{Config, ConfigError, MAX_TARGETS};
use crate::control::stats::Counters;
use crate::device::{DetectorSet, DeviceList, DeviceListError, Ident};
use crate::net::connection::TargetSpec;
use crate::net::reason::Reason;
use crate::net::side::{Side, TargetId};
use crate::net::worker::{Command, WorkerHandle};
use crate::store::journal::{Closed, Journal, Tags};
use crate::store::message::{self, Origin};

/// What `PROXY_TARGETn_DEVICES` must name, for the error that refuses it.
const LIST_EXPECTED: &str = "a readable file of device idents, one per line";

/// The shared device state; one per daemon, read by every worker.
#[derive(Debug)]
pub struct Devices {
    detectors: DetectorSet,
    /// Indexed by [`TargetId::index`]; none for a target without a list.
    lists: [Option<SharedList>; MAX_TARGETS],
    /// With PROXY_DEVICE_UNIQUE only.
    unique: Option<Registry>,
}

/// One target's device list and where it comes from.
#[derive(Debug)]
struct SharedList {
    /// `PROXY_TARGETn_DEVICES`, for the log.
    variable: String,
    path: PathBuf,
    list: RwLock<DeviceList>,
}

/// The connection each device has open (PROXY_DEVICE_UNIQUE).
#[derive(Debug, Default)]
struct Registry {
    open: Mutex<HashMap<Ident, Owner>>,
    /// Every worker, by id, to close an older connection on its worker.
    workers: OnceLock<Vec<WorkerHandle>>,
}

/// A device connection (or UDP session), the worker it lives on, and
/// when it opened (which of two connections of a device is the older).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub connection: message::Ident,
    pub worker: usize,
    pub opened_at: Instant,
}

impl Devices {
    /// The detectors of `config`, its device lists read from their files,
    /// and a registry if PROXY_DEVICE_UNIQUE is on. A list that cannot be
    /// read stops the daemon: the error names its variable (and nothing
    /// is logged before it, so that it is the one line on stderr).
    pub fn load(config: &Config) -> Result<Devices, ConfigError> {
        let mut devices = Devices::without_lists(config)?;
        for target in &config.targets {
            let (Some(path), Some(id)) = (&target.devices, TargetId::from_number(target.number))
            else {
                continue;
            };
            let variable = format!("PROXY_TARGET{}_DEVICES", target.number);
            let list = DeviceList::load(path).map_err(|e| list_error(&variable, path, &e))?;
            devices.lists[id.index()] = Some(SharedList {
                variable,
                path: path.clone(),
                list: RwLock::new(list),
            });
        }
        Ok(devices)
    }

    /// Logs what recognises devices and what each list holds.
    pub fn log_start(&self) {
        info!("device detection: {}", self.detectors);
        for (index, shared) in self.lists.iter().enumerate() {
            if let Some(shared) = shared {
                info!(
                    "target {}: {} devices listed in {}",
                    index + 1,
                    read(&shared.list).len(),
                    shared.path.display()
                );
            }
        }
    }

    /// The detectors and the registry of `config`, with no device list
    /// (every target takes every device): for tests that drive workers
    /// without files.
    pub fn without_lists(config: &Config) -> Result<Devices, ConfigError> {
        Ok(Devices {
            detectors: config.detectors()?,
            lists: Default::default(),
            unique: config.device_unique.then(Registry::default),
        })
    }

    /// No detection, no list, no registry.
    pub fn off() -> Devices {
        Devices {
            detectors: DetectorSet::parse("off", None).expect("`off` is a detector setting"),
            lists: Default::default(),
            unique: None,
        }
    }

    pub fn detectors(&self) -> &DetectorSet {
        &self.detectors
    }

    /// Whether `target` takes only the devices of its list.
    pub fn has_list(&self, target: TargetId) -> bool {
        self.lists[target.index()].is_some()
    }

    /// Whether `target` takes the device `device` (`None`: not
    /// recognised): always without a list, only a listed device with one.
    pub fn admits(&self, target: TargetId, device: Option<&Ident>) -> bool {
        let Some(shared) = &self.lists[target.index()] else {
            return true;
        };
        let Some(device) = device else {
            return false;
        };
        read(&shared.list).contains(device.as_str())
    }

    /// Reads every device list again (SIGHUP). A file that cannot be read
    /// or parsed keeps its old list, and the log says why.
    pub fn reload(&self) {
        for (index, shared) in self.lists.iter().enumerate() {
            let Some(shared) = shared else {
                continue;
            };
            let target = index + 1;
            match DeviceList::load(&shared.path) {
                Ok(list) => {
                    let count = list.len();
                    let old = match shared.list.write() {
                        Ok(mut current) => std::mem::replace(&mut *current, list),
                        Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), list),
                    };
                    // The old set is freed here, out of the lock.
                    drop(old);
                    info!(
                        "target {target}: device list reloaded, {count} devices listed in {}",
                        shared.path.display()
                    );
                }
                Err(e) => warn!(
                    "target {target}: {} not reloaded, the old list stays in use: {e}",
                    shared.variable
                ),
            }
        }
    }

    /// Whether a device's newer connection closes its older ones.
    pub fn unique(&self) -> bool {
        self.unique.is_some()
    }

    /// Gives the registry every worker, by id (once they are started).
    pub fn set_workers(&self, workers: Vec<WorkerHandle>) {
        if let Some(registry) = &self.unique {
            // Set once by the daemon; a second call changes nothing.
            let _ = registry.workers.set(workers);
        }
    }

    /// `owner` is recognised as `device`: of it and the device's open
    /// connection, the older one is closed on its worker with reason
    /// `replaced by a newer connection`, and the newer one stays
    /// registered (an older connection can be recognised last, when its
    /// first bytes came in pieces). Does nothing without
    /// PROXY_DEVICE_UNIQUE.
    pub fn claim(&self, device: &Ident, owner: Owner) {
        let Some(registry) = &self.unique else {
            return;
        };
        let Some(older) = older_of_two(&mut lock(&registry.open), device, owner) else {
            return;
        };
        debug!(
            "device {device}: {} is replaced by a newer connection",
            older.connection
        );
        let worker = registry.workers.get().and_then(|w| w.get(older.worker));
        match worker {
            Some(worker) => {
                let ident = older.connection;
                // A stopped worker has closed its connections already.
                worker.send(Command::Replace { ident });
            }
            None => warn!(
                "device {device}: cannot close {} (worker {} unknown)",
                older.connection, older.worker
            ),
        }
    }

    /// `owner`, a connection of `device`, has ended: it is no longer the
    /// device's open connection (unless a newer one took its place).
    pub fn release(&self, device: &Ident, owner: Owner) {
        let Some(registry) = &self.unique else {
            return;
        };
        let mut open = lock(&registry.open);
        if open.get(device.as_str()) == Some(&owner) {
            open.remove(device.as_str());
        }
    }
}

/// Registers the newer of `owner` and `device`'s open connection; the
/// other one, if any, is returned to be closed.
fn older_of_two(open: &mut HashMap<Ident, Owner>, device: &Ident, owner: Owner) -> Option<Owner> {
    match open.get(device.as_str()) {
        Some(registered) if *registered == owner => None,
        Some(registered) if registered.opened_at > owner.opened_at => Some(owner),
        _ => open.insert(device.clone(), owner),
    }
}

/// Target `spec` does not take the device of `origin` (a TCP connection
/// or a UDP session): its one event 2, `device not listed` with counts 0.
/// Nothing else ends: a target is mandatory only for the devices it lists.
pub fn record_not_listed(
    journal: &mut Journal,
    counters: &Counters,
    origin: Origin,
    tags: Tags<'_>,
    spec: &TargetSpec,
) {
    let why = Reason::DeviceNotListed;
    let closed = Closed {
        reason: &why,
        received: 0,
        sent: 0,
    };
    let side = Side::Target(spec.id);
    journal.dropped(origin, tags, side, Some(&spec.label), &closed);
    counters.drop_of(side, &why);
}

/// A list, also after a thread panicked holding it: a reload replaces
/// it in one move, so it is never left half done.
fn read(list: &RwLock<DeviceList>) -> std::sync::RwLockReadGuard<'_, DeviceList> {
    list.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The registry, also after a thread panicked holding it (every change
/// to it is one map operation: it is never left half done).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn list_error(variable: &str, path: &std::path::Path, error: &DeviceListError) -> ConfigError {
    ConfigError::Invalid {
        name: variable.to_string(),
        value: path.display().to_string(),
        expected: format!("{LIST_EXPECTED} ({error})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn config(pairs: &[(&str, &str)]) -> Config {
        Config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .expect("valid config")
    }

    fn ident(text: &str) -> Ident {
        Ident::new(text).expect("an ident")
    }

    #[test]
    fn a_target_with_a_list_admits_listed_devices_only_and_reload_replaces_it() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "111").unwrap();
        let path = file.path().to_str().unwrap().to_string();
        let config = config(&[
            ("PROXY_TARGET1", "127.0.0.1:1"),
            ("PROXY_TARGET2", "127.0.0.1:2"),
            ("PROXY_TARGET2_DEVICES", &path),
        ]);
        let devices = Devices::load(&config).unwrap();
        let (one, two) = (
            TargetId::from_number(1).unwrap(),
            TargetId::from_number(2).unwrap(),
        );
        assert!(!devices.has_list(one) && devices.has_list(two));
        assert!(devices.admits(one, None), "no list: everyone");
        assert!(devices.admits(two, Some(&ident("111"))));
        assert!(!devices.admits(two, Some(&ident("222"))));
        assert!(
            !devices.admits(two, None),
            "a list: never an unknown device"
        );

        std::fs::write(file.path(), "222\n").unwrap();
        devices.reload();
        assert!(devices.admits(two, Some(&ident("222"))));
        assert!(!devices.admits(two, Some(&ident("111"))));

        std::fs::write(file.path(), "not an ident\n").unwrap();
        devices.reload();
        assert!(
            devices.admits(two, Some(&ident("222"))),
            "the old list stays"
        );
    }

    #[test]
    fn an_unreadable_list_is_a_config_error_naming_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.txt");
        let config = config(&[
            ("PROXY_TARGET3", "127.0.0.1:3"),
            ("PROXY_TARGET3_DEVICES", path.to_str().unwrap()),
        ]);
        let error = Devices::load(&config).unwrap_err().to_string();
        let start = format!(
            "PROXY_TARGET3_DEVICES={:?}: expected {LIST_EXPECTED} (cannot read ",
            path.display().to_string()
        );
        assert!(error.starts_with(&start), "{error}");
    }

    /// Two connections of one device on two workers, the second opened
    /// a millisecond after the first.
    fn older_and_newer() -> (Owner, Owner) {
        let opened = Instant::now();
        let owner = |n: u64, worker: usize, opened_at: Instant| Owner {
            connection: message::Ident(n),
            worker,
            opened_at,
        };
        (
            owner(1, 0, opened),
            owner(2, 1, opened + std::time::Duration::from_millis(1)),
        )
    }

    #[test]
    fn the_registry_keeps_the_newest_owner_and_only_it_releases() {
        let config = config(&[("PROXY_DEVICE_UNIQUE", "true")]);
        let devices = Devices::without_lists(&config).unwrap();
        let device = ident("359586015829802");
        let (first, second) = older_and_newer();
        devices.claim(&device, first);
        devices.claim(&device, second);
        devices.release(&device, first);
        let open = lock(&devices.unique.as_ref().unwrap().open)
            .get("359586015829802")
            .copied();
        assert_eq!(open, Some(second), "the older one's end keeps the newer");
        devices.release(&device, second);
        assert!(lock(&devices.unique.as_ref().unwrap().open).is_empty());
    }

    #[test]
    fn of_two_connections_the_older_goes_whichever_is_recognised_last() {
        let device = ident("359586015829802");
        let (older, newer) = older_and_newer();
        let mut open = HashMap::new();
        assert_eq!(older_of_two(&mut open, &device, newer), None);
        assert_eq!(older_of_two(&mut open, &device, newer), None, "again");
        assert_eq!(older_of_two(&mut open, &device, older), Some(older));
        assert_eq!(open.get("359586015829802"), Some(&newer));

        let mut open = HashMap::new();
        older_of_two(&mut open, &device, older);
        assert_eq!(older_of_two(&mut open, &device, newer), Some(older));
        assert_eq!(open.get("359586015829802"), Some(&newer));
    }
}
