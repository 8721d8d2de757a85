//! The benchmark's cases and how one run of a case goes.
//!
//! A run starts its target servers, the proxy under test in front of them
//! (or none, for direct), and the devices; lets the load warm up; takes a
//! snapshot of target bytes, requests and proxy CPU; waits the measured
//! window; takes another; then stops the devices, which close their
//! sending side and wait for the proxy to close back. Only then are the
//! targets' per-connection results compared with what the devices sent: a
//! byte lost, doubled, reordered or corrupted fails the run, whatever the
//! figures. Every figure is a [`Metric`]: a name and a value.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::capacity;
use crate::catchup;
use crate::device::Devices;
use crate::proxy::{self, Kind, Running, Setup, Store};
use crate::store;
use crate::target::{Outcome, Target};
use crate::trackers::Fleet;
use crate::udp::{UdpFleet, UdpTarget};
use crate::wire::{HEADER_LEN, Mode};

pub type Metric = (&'static str, f64);

/// What a case measures.
#[derive(Clone, Copy, Debug)]
pub enum What {
    /// Time to accept and to forward a first byte; binary size.
    Startup,
    /// Streams as fast as possible.
    Stream {
        targets: usize,
        conns: usize,
        store: Store,
        /// proxy-channel writes its metrics file every 100 ms.
        metrics: bool,
    },
    /// Store on: devices sending 100-byte packets, one per write, in total
    /// `rate` per second (all devices in step) or as fast as they can.
    StoreSmall { conns: usize, rate: Option<f64> },
    /// The store alone (journal and writer), fed 100-byte packets.
    StoreCapacity,
    /// `proxy-channel view` over a folder of about 256 MB of messages.
    ViewScan,
    /// 100-byte request, 100-byte echo, one at a time per connection.
    Echo { conns: usize },
    /// Store on, the file writer slowed to 200 ms a write (strace delays
    /// its writes): one device floods while another does request/reply;
    /// the quiet one's round trip is the figure.
    Fairness { workers: usize },
    /// Thousands of devices, one 100-byte packet per second each, with
    /// the store off (as haproxy, which records nothing) or on.
    Trackers {
        devices: usize,
        secs: u32,
        store: Store,
    },
    /// The same over UDP: one 116-byte datagram per second each.
    UdpTrackers { devices: usize, secs: u32 },
    /// Trackers as above, store in memory, with a second target that has
    /// catch-up on; with `backlog`, catch-up delivers about 1 GiB that
    /// target missed meanwhile ([`crate::catchup`]).
    CatchUpLive {
        devices: usize,
        secs: u32,
        backlog: bool,
    },
}

pub struct Case {
    pub name: &'static str,
    pub proxies: &'static [Kind],
    pub what: What,
}

const ALL: &[Kind] = &[Kind::ProxyChannel, Kind::Haproxy, Kind::Direct];
const BOTH: &[Kind] = &[Kind::ProxyChannel, Kind::Haproxy];
const PC: &[Kind] = &[Kind::ProxyChannel];
/// haproxy has no UDP: nginx's stream module is the peer.
const UDP: &[Kind] = &[Kind::ProxyChannel, Kind::Nginx, Kind::Direct];

const fn streams(targets: usize, conns: usize, store: Store) -> What {
    What::Stream {
        targets,
        conns,
        store,
        metrics: false,
    }
}

/// Every case, in the order bench.sh runs them within a round.
#[rustfmt::skip]
pub const CASES: &[Case] = &[
    Case { name: "startup", proxies: BOTH, what: What::Startup },
    Case { name: "stream-1t-1c", proxies: ALL, what: streams(1, 1, Store::Off) },
    Case { name: "stream-1t-8c", proxies: ALL, what: streams(1, 8, Store::Off) },
    Case { name: "stream-1t-8c-metrics", proxies: PC, what: What::Stream { targets: 1, conns: 8, store: Store::Off, metrics: true } },
    Case { name: "stream-3t-1c", proxies: PC, what: streams(3, 1, Store::Off) },
    Case { name: "stream-3t-8c", proxies: PC, what: streams(3, 8, Store::Off) },
    Case { name: "store-3t-1c", proxies: PC, what: streams(3, 1, Store::Memory) },
    Case { name: "store-3t-8c", proxies: PC, what: streams(3, 8, Store::Memory) },
    Case { name: "store-3t-8c-disk", proxies: PC, what: streams(3, 8, Store::Disk) },
    Case { name: "store-100b", proxies: PC, what: What::StoreSmall { conns: 1000, rate: Some(500_000.0) } },
    Case { name: "store-100b-max", proxies: PC, what: What::StoreSmall { conns: 100, rate: None } },
    Case { name: "store-capacity", proxies: PC, what: What::StoreCapacity },
    Case { name: "view-scan", proxies: PC, what: What::ViewScan },
    Case { name: "echo-1c", proxies: ALL, what: What::Echo { conns: 1 } },
    Case { name: "echo-50c", proxies: ALL, what: What::Echo { conns: 50 } },
    Case { name: "trackers", proxies: ALL, what: What::Trackers { devices: 9000, secs: 20, store: Store::Off } },
    Case { name: "fairness-1w", proxies: PC, what: What::Fairness { workers: 1 } },
    Case { name: "fairness-2w", proxies: PC, what: What::Fairness { workers: 2 } },
    Case { name: "trackers-store", proxies: PC, what: What::Trackers { devices: 9000, secs: 20, store: Store::Memory } },
    Case { name: "udp-trackers", proxies: UDP, what: What::UdpTrackers { devices: 9000, secs: 20 } },
    Case { name: "catchup-live-base", proxies: PC, what: What::CatchUpLive { devices: 6000, secs: 10, backlog: false } },
    Case { name: "catchup-live-backlog", proxies: PC, what: What::CatchUpLive { devices: 6000, secs: 10, backlog: true } },
];

pub fn find(name: &str) -> Option<&'static Case> {
    CASES.iter().find(|case| case.name == name)
}

/// How long the load runs.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
    /// Trackers: devices and seconds, overriding the case's.
    pub trackers: Option<(usize, u32)>,
}

impl Timing {
    pub fn full() -> Timing {
        Timing {
            warmup: Duration::from_millis(500),
            measure: Duration::from_millis(1500),
            trackers: None,
        }
    }

    pub fn quick() -> Timing {
        Timing {
            warmup: Duration::from_millis(300),
            measure: Duration::from_millis(700),
            trackers: Some((3000, 5)),
        }
    }
}

pub fn run(case: &Case, kind: Kind, setup: &Setup, timing: Timing) -> Result<Vec<Metric>, String> {
    if !case.proxies.contains(&kind) {
        return Err(format!(
            "case {} does not run with {}",
            case.name,
            kind.name()
        ));
    }
    match case.what {
        What::Startup => startup(kind, setup),
        What::Stream {
            targets,
            conns,
            store,
            metrics,
        } => stream(kind, setup, timing, (targets, conns), store, metrics),
        What::StoreSmall { conns, rate } => store_small(setup, timing, conns, rate),
        What::StoreCapacity => store_capacity(setup, timing),
        What::ViewScan => view_scan(setup),
        What::Echo { conns } => echo(kind, setup, timing, conns),
        What::Fairness { workers } => fairness(setup, timing, workers),
        What::Trackers {
            devices,
            secs,
            store,
        } => {
            let (devices, secs) = timing.trackers.unwrap_or((devices, secs));
            trackers(kind, setup, devices, secs, store)
        }
        What::UdpTrackers { devices, secs } => {
            let (devices, secs) = timing.trackers.unwrap_or((devices, secs));
            udp_trackers(kind, setup, devices, secs)
        }
        What::CatchUpLive {
            devices,
            secs,
            backlog,
        } => {
            let (devices, secs) = timing.trackers.unwrap_or((devices, secs));
            catchup::live(setup, devices, secs, backlog)
        }
    }
}

fn start_targets(count: usize) -> Result<Vec<Target>, String> {
    (0..count)
        .map(|_| Target::start().map_err(|e| format!("target: {e}")))
        .collect()
}

/// Stops the targets and checks that each got exactly what was sent.
pub(crate) fn finish_targets(
    targets: Vec<Target>,
    sent: &HashMap<u64, u64>,
) -> Result<Vec<Outcome>, String> {
    let outcomes: Vec<Outcome> = targets.into_iter().map(Target::finish).collect();
    for (index, outcome) in outcomes.iter().enumerate() {
        let target = index + 1;
        if let Some(first) = outcome.failures.first() {
            return Err(format!(
                "target {target}: {first} ({} failures in all)",
                outcome.failures.len()
            ));
        }
        for (id, &bytes) in sent {
            match outcome.conns.get(id) {
                None => return Err(format!("target {target}: connection {id} never arrived")),
                Some(got) if got.bytes != bytes => {
                    return Err(format!(
                        "target {target}: connection {id} delivered {} of the {bytes} bytes sent",
                        got.bytes
                    ));
                }
                Some(got) if !got.finished => {
                    return Err(format!(
                        "target {target}: connection {id} was not closed cleanly"
                    ));
                }
                Some(_) => {}
            }
        }
        if outcome.conns.len() != sent.len() {
            return Err(format!(
                "target {target}: {} connections arrived, {} were sent",
                outcome.conns.len(),
                sent.len()
            ));
        }
    }
    Ok(outcomes)
}

/// A device-side failure often has its cause at a target, which closes a
/// connection on the first wrong byte: name the targets' failures first.
pub(crate) fn with_targets(error: String, targets: Vec<Target>) -> String {
    let causes: Vec<String> = targets
        .into_iter()
        .enumerate()
        .filter_map(|(index, target)| {
            let first = target.finish().failures.into_iter().next()?;
            Some(format!("target {}: {first}", index + 1))
        })
        .collect();
    if causes.is_empty() {
        error
    } else {
        format!("{}; then {error}", causes.join("; "))
    }
}

/// Counters at one moment.
pub(crate) struct Snapshot {
    at: Instant,
    /// The proxy's CPU-seconds.
    pub(crate) cpu: f64,
    /// CPU-seconds of everything but the proxy and loadgen: other
    /// processes and kernel threads, the noise on a shared machine.
    others: f64,
    bytes: Vec<u64>,
}

impl Snapshot {
    pub(crate) fn take(proxy: &mut Running, targets: &[Target]) -> Result<Snapshot, String> {
        proxy.check_alive()?;
        let cpu = proxy.cpu_seconds();
        let own = proxy::cpu_seconds(std::process::id()).unwrap_or(0.0);
        Ok(Snapshot {
            at: Instant::now(),
            cpu,
            others: proxy::busy_seconds().unwrap_or(0.0) - own - cpu,
            bytes: targets
                .iter()
                .map(|t| t.shared.bytes.load(Relaxed))
                .collect(),
        })
    }

    /// Seconds from `self` to `later`.
    pub(crate) fn secs(&self, later: &Snapshot) -> f64 {
        later.at.duration_since(self.at).as_secs_f64()
    }

    /// Cores busy outside the proxy and loadgen from `self` to `later`.
    pub(crate) fn others(&self, later: &Snapshot) -> Metric {
        (
            "other_cores",
            (later.others - self.others) / self.secs(later),
        )
    }
}

pub(crate) const MB: f64 = 1e6;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn startup(kind: Kind, setup: &Setup) -> Result<Vec<Metric>, String> {
    let targets = start_targets(1)?;
    let proxy = Running::start(kind, setup, &[targets[0].addr], Store::Off)?;
    let devices = Devices::start(Mode::Stream, proxy.listen, 1, None)?;
    while targets[0].shared.bytes.load(Relaxed) == 0 {
        if proxy.spawned.elapsed() > Duration::from_secs(10) {
            return Err(proxy.failure("forwarded nothing within 10 s"));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let first_byte = proxy.spawned.elapsed();
    let startup = proxy.startup;
    let listening = proxy.listening_after();
    let outcome = match devices.finish() {
        Ok(outcome) => outcome,
        Err(e) => return Err(with_targets(e, targets)),
    };
    finish_targets(targets, &outcome.sent)?;
    proxy.stop()?;
    let binary = match kind {
        Kind::Haproxy => &setup.haproxy,
        _ => &setup.proxy_channel,
    };
    let mut metrics = vec![
        ("startup_ms", startup.as_secs_f64() * 1e3),
        ("first_byte_ms", first_byte.as_secs_f64() * 1e3),
    ];
    if let Some(listening) = listening {
        metrics.push(("listening_ms", listening.as_secs_f64() * 1e3));
    }
    if let Some(size) = proxy::executable_size(binary) {
        metrics.push(("binary_mib", size as f64 / 1048576.0));
    }
    if let Some(size) = proxy::stripped_size(binary, &setup.work_dir) {
        metrics.push(("stripped_mib", size as f64 / 1048576.0));
    }
    Ok(metrics)
}

fn stream(
    kind: Kind,
    setup: &Setup,
    timing: Timing,
    (target_count, conns): (usize, usize),
    store: Store,
    metrics: bool,
) -> Result<Vec<Metric>, String> {
    let targets = start_targets(target_count)?;
    let addrs: Vec<_> = targets.iter().map(|t| t.addr).collect();
    let extra: &[(&str, &str)] = match metrics {
        true => &[
            ("PROXY_METRICS_FILE", "{data}/metrics.prom"),
            ("PROXY_METRICS_INTERVAL", "100ms"),
        ],
        false => &[],
    };
    let mut proxy = Running::start_with(kind, setup, &addrs, store, extra)?;
    let started = Instant::now();
    let devices = Devices::start(Mode::Stream, proxy.listen, conns, None)?;
    std::thread::sleep(timing.warmup);
    let before = Snapshot::take(&mut proxy, &targets)?;
    std::thread::sleep(timing.measure);
    let after = Snapshot::take(&mut proxy, &targets)?;
    let outcome = match devices.finish() {
        Ok(outcome) => outcome,
        Err(e) => return Err(with_targets(e, targets)),
    };
    let traffic = started.elapsed().as_secs_f64();
    finish_targets(targets, &outcome.sent)?;
    let data_dir = proxy.data_dir.clone();
    proxy.stop()?;

    let secs = before.secs(&after);
    let delivered: Vec<f64> = (0..target_count)
        .map(|t| (after.bytes[t] - before.bytes[t]) as f64)
        .collect();
    if delivered.contains(&0.0) {
        return Err("a target received nothing during the measured window: stalled".into());
    }
    let mean = delivered.iter().sum::<f64>() / target_count as f64;
    let min = delivered.iter().cloned().fold(f64::INFINITY, f64::min);
    let mut metrics = vec![
        ("goodput_mbs", mean / secs / MB),
        ("goodput_min_mbs", min / secs / MB),
        before.others(&after),
    ];
    if kind != Kind::Direct {
        metrics.push(("cpu_s_per_gib", (after.cpu - before.cpu) / (mean / GIB)));
        metrics.push(("cpu_cores", (after.cpu - before.cpu) / secs));
    }
    if store != Store::Off {
        let dir = data_dir.ok_or("store on needs proxy-channel")?;
        let stored = store::scan(&dir)?;
        check_stored(&stored, &outcome.sent)?;
        metrics.push(("file_mbs", stored.bytes as f64 / traffic / MB));
        metrics.push(("file_msgs_per_s", stored.lines as f64 / traffic));
        remove_dir(&dir);
    }
    if store == Store::Disk {
        metrics.push(("disk_write_mbs", disk_write_rate(&setup.work_dir)?));
    }
    Ok(metrics)
}

/// The reference for store cases on disk: MB/s of writing 1 GiB in 1 MiB
/// writes to a new file in `dir` and syncing it (what `dd conv=fdatasync`
/// measures).
fn disk_write_rate(dir: &std::path::Path) -> Result<f64, String> {
    use std::io::Write;
    const TOTAL: usize = 1 << 30;
    let path = dir.join("disk-write-rate");
    let fail = |e: std::io::Error| format!("{}: {e}", path.display());
    let chunk = vec![0x5a_u8; 1 << 20];
    let started = Instant::now();
    let mut file = std::fs::File::create(&path).map_err(fail)?;
    for _ in 0..TOTAL / chunk.len() {
        file.write_all(&chunk).map_err(fail)?;
    }
    file.sync_data().map_err(fail)?;
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_file(&path).map_err(fail)?;
    Ok(TOTAL as f64 / secs / MB)
}

/// Checks that the message files hold exactly the device bytes sent
/// (headers included); returns that count.
fn check_stored(stored: &store::Stored, sent: &HashMap<u64, u64>) -> Result<u64, String> {
    let sent: u64 = sent.values().map(|bytes| bytes + HEADER_LEN as u64).sum();
    if stored.device_payload != sent {
        return Err(format!(
            "the store holds {} device bytes, the devices sent {sent}",
            stored.device_payload
        ));
    }
    Ok(sent)
}

fn store_small(
    setup: &Setup,
    timing: Timing,
    conns: usize,
    rate: Option<f64>,
) -> Result<Vec<Metric>, String> {
    let targets = start_targets(1)?;
    let mut proxy = Running::start(Kind::ProxyChannel, setup, &[targets[0].addr], Store::Disk)?;
    let pace = rate.map(|rate| rate / conns as f64);
    let devices = Devices::start(Mode::Flood, proxy.listen, conns, pace)?;
    let started = Instant::now();
    std::thread::sleep(timing.warmup + timing.measure);
    proxy.check_alive()?;
    let outcome = match devices.finish() {
        Ok(outcome) => outcome,
        Err(e) => return Err(with_targets(e, targets)),
    };
    let traffic = started.elapsed().as_secs_f64();
    finish_targets(targets, &outcome.sent)?;
    let dir = proxy.data_dir.clone().ok_or("no data folder")?;
    proxy.stop()?;
    let stored = store::scan(&dir)?;
    remove_dir(&dir);
    let sent = check_stored(&stored, &outcome.sent)?;
    let messages = stored.device_messages as f64;
    Ok(vec![
        ("store_msgs_per_s", messages / traffic),
        ("bytes_per_msg", stored.device_payload as f64 / messages),
        ("packets_per_s", (sent as f64 / 100.0) / traffic),
        ("file_mbs", stored.bytes as f64 / traffic / MB),
    ])
}

fn store_capacity(setup: &Setup, timing: Timing) -> Result<Vec<Metric>, String> {
    let dir = setup.work_dir.join("store-capacity");
    let figures = capacity::run(&dir, setup.threads, timing.measure);
    remove_dir(&dir);
    figures
}

fn view_scan(setup: &Setup) -> Result<Vec<Metric>, String> {
    let dir = setup.work_dir.join("view-scan");
    let figures = capacity::view_scan(&dir, &setup.proxy_channel);
    remove_dir(&dir);
    figures
}

fn echo(kind: Kind, setup: &Setup, timing: Timing, conns: usize) -> Result<Vec<Metric>, String> {
    let targets = start_targets(1)?;
    let mut proxy = Running::start(kind, setup, &[targets[0].addr], Store::Off)?;
    let devices = Devices::start(Mode::Echo, proxy.listen, conns, None)?;
    std::thread::sleep(timing.warmup);
    devices.shared.measuring.store(true, Relaxed);
    let before = Snapshot::take(&mut proxy, &targets)?;
    let requests_before = devices.shared.requests.load(Relaxed);
    std::thread::sleep(timing.measure);
    let requests = devices.shared.requests.load(Relaxed) - requests_before;
    let after = Snapshot::take(&mut proxy, &targets)?;
    devices.shared.measuring.store(false, Relaxed);
    let outcome = match devices.finish() {
        Ok(outcome) => outcome,
        Err(e) => return Err(with_targets(e, targets)),
    };
    finish_targets(targets, &outcome.sent)?;
    proxy.stop()?;
    if requests == 0 {
        return Err("no request completed during the measured window: stalled".into());
    }
    let secs = before.secs(&after);
    let mut metrics = vec![("req_per_s", requests as f64 / secs), before.others(&after)];
    metrics.extend(quantiles(
        &outcome.latency,
        &[("p50_us", 0.5), ("p99_us", 0.99)],
    ));
    if kind != Kind::Direct {
        metrics.push((
            "cpu_us_per_req",
            (after.cpu - before.cpu) * 1e6 / requests as f64,
        ));
    }
    Ok(metrics)
}

/// The quiet device's round trips a second: a chatty tracker.
const QUIET_RATE: f64 = 20.0;
/// How long a slowed writer's every write takes.
const SLOW_WRITE_US: u32 = 200_000;

fn fairness(setup: &Setup, timing: Timing, workers: usize) -> Result<Vec<Metric>, String> {
    let targets = start_targets(1)?;
    let workers = workers.to_string();
    let extra = [("PROXY_WORKERS", workers.as_str())];
    let proxy = Running::start_with(
        Kind::ProxyChannel,
        setup,
        &[targets[0].addr],
        Store::Memory,
        &extra,
    )?;
    let slowed = SlowWriter::attach(&proxy)?;
    let flood = Devices::start_numbered(Mode::Flood, proxy.listen, 1, None, 1)?;
    let quiet = Devices::start_numbered(Mode::Echo, proxy.listen, 1, Some(QUIET_RATE), 2)?;
    std::thread::sleep(timing.warmup);
    quiet.shared.measuring.store(true, Relaxed);
    let requests_before = quiet.shared.requests.load(Relaxed);
    let window = timing.measure.max(Duration::from_secs(5));
    std::thread::sleep(window);
    let requests = quiet.shared.requests.load(Relaxed) - requests_before;
    quiet.shared.measuring.store(false, Relaxed);
    drop(slowed);
    let finished = quiet
        .finish()
        .and_then(|quiet| Ok((quiet, flood.finish()?)));
    let (quiet, flood) = match finished {
        Ok(outcomes) => outcomes,
        Err(e) => return Err(with_targets(e, targets)),
    };
    let mut sent = quiet.sent.clone();
    sent.extend(flood.sent.iter().map(|(id, bytes)| (*id, *bytes)));
    finish_targets(targets, &sent)?;
    proxy.stop()?;
    if requests == 0 {
        return Err("the quiet device completed no request while the writer was slow".into());
    }
    let mut metrics = vec![("quiet_req_per_s", requests as f64 / window.as_secs_f64())];
    metrics.extend(quantiles(
        &quiet.latency,
        &[("quiet_p50_us", 0.5), ("quiet_p99_us", 0.99)],
    ));
    Ok(metrics)
}

/// strace attached to the daemon's writer thread, delaying each of its
/// writes; detached (and the writer fast again) when dropped.
struct SlowWriter(std::process::Child);

impl SlowWriter {
    fn attach(proxy: &Running) -> Result<SlowWriter, String> {
        let pid = proxy.pid().ok_or("no proxy process")?;
        // A thread names itself once it runs: look again for a moment.
        let mut found = writer_thread(pid);
        for _ in 0..30 {
            if found.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            found = writer_thread(pid);
        }
        let writer = found?;
        let delay = format!("inject=write,writev,pwrite64,pwritev:delay_enter={SLOW_WRITE_US}");
        let child = std::process::Command::new("strace")
            .args(["-qq", "-o", "/dev/null", "-p", &writer.to_string()])
            .args(["-e", "trace=write,writev,pwrite64,pwritev", "-e", &delay])
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("strace (apt-get install strace): {e}"))?;
        // strace needs a moment to attach.
        std::thread::sleep(Duration::from_millis(300));
        Ok(SlowWriter(child))
    }
}

impl Drop for SlowWriter {
    fn drop(&mut self) {
        // SIGINT makes strace detach cleanly; waiting reaps it.
        // SAFETY: kill with a pid we spawned.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

/// The thread id of the daemon's thread named `writer`.
fn writer_thread(pid: u32) -> Result<u32, String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("{e}"))?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "writer" {
            return task
                .file_name()
                .to_string_lossy()
                .parse()
                .map_err(|e| format!("{e}"));
        }
    }
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|task| std::fs::read_to_string(task.path().join("comm")).unwrap_or_default())
        .collect();
    Err(format!(
        "no thread named writer in process {pid}: {names:?}"
    ))
}

/// Connecting all trackers takes well under a second when all is well.
pub(crate) const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

fn trackers(
    kind: Kind,
    setup: &Setup,
    count: usize,
    secs: u32,
    store: Store,
) -> Result<Vec<Metric>, String> {
    let targets = start_targets(1)?;
    let mut proxy = Running::start(kind, setup, &[targets[0].addr], store)?;
    std::thread::sleep(Duration::from_millis(300));
    let pss_before = proxy.pss_kib();
    let connecting = Instant::now();
    let shared = targets[0].shared.clone();
    let connected = Fleet::connect(proxy.listen, count, &shared, CONNECT_DEADLINE);
    let mut fleet = match connected {
        Ok(fleet) => fleet,
        Err(e) => return Err(with_targets(e, targets)),
    };
    let connect_secs = connecting.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    proxy.check_alive()?;
    let pss_idle = proxy.pss_kib();
    let sampler = PssSampler::start(proxy.pid());
    let before = Snapshot::take(&mut proxy, &targets)?;
    if let Err(e) = fleet.send(secs) {
        return Err(with_targets(e, targets));
    }
    let after = Snapshot::take(&mut proxy, &targets)?;
    let cpu = after.cpu - before.cpu;
    let pss_max = sampler.finish().max(proxy.pss_kib());
    proxy.check_alive()?;
    let sent = match fleet.close(&shared, Duration::from_secs(30)) {
        Ok(sent) => sent,
        Err(e) => return Err(with_targets(e, targets)),
    };
    let outcomes = finish_targets(targets, &sent)?;
    proxy.stop()?;
    let latency = &outcomes[0].latency;
    let mut metrics = quantiles(
        latency,
        &[("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)],
    );
    metrics.push(("connect_s", connect_secs));
    metrics.push(before.others(&after));
    if kind != Kind::Direct {
        let per_conn = |pss: f64| (pss - pss_before) / count as f64;
        metrics.push(("pss_kib_per_conn", per_conn(pss_max)));
        metrics.push(("pss_idle_kib_per_conn", per_conn(pss_idle)));
        metrics.push(("pss_base_mib", pss_before / 1024.0));
        metrics.push(("cpu_s", cpu));
        metrics.push((
            "cpu_us_per_packet",
            cpu * 1e6 / (count as f64 * secs as f64),
        ));
    }
    Ok(metrics)
}

/// UDP trackers through proxy-channel (PROXY_LISTEN_UDP), nginx or
/// nothing: latency from device to target, CPU per datagram, memory per
/// session, and datagrams lost (UDP may lose; the run fails only on a
/// wrong, doubled or reordered datagram, or on more than 1% lost).
fn udp_trackers(kind: Kind, setup: &Setup, count: usize, secs: u32) -> Result<Vec<Metric>, String> {
    let target = UdpTarget::start().map_err(|e| format!("UDP target: {e}"))?;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map_err(|e| format!("no free UDP port: {e}"))?;
    let listen = udp.to_string();
    let extra = [("PROXY_LISTEN_UDP", listen.as_str())];
    let mut proxy = Running::start_with(kind, setup, &[target.addr], Store::Off, &extra)?;
    let to = match kind {
        Kind::Direct => target.addr,
        _ => udp,
    };
    std::thread::sleep(Duration::from_millis(300));
    let pss_before = proxy.pss_kib();
    let opening = Instant::now();
    let mut fleet = UdpFleet::open(to, count, &target.shared, CONNECT_DEADLINE)?;
    let open_secs = opening.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    proxy.check_alive()?;
    let pss_idle = proxy.pss_kib();
    let sampler = PssSampler::start(proxy.pid());
    let before = Snapshot::take(&mut proxy, &[])?;
    fleet.send(secs)?;
    let after = Snapshot::take(&mut proxy, &[])?;
    let cpu = after.cpu - before.cpu;
    let pss_max = sampler.finish().max(proxy.pss_kib());
    let sent = fleet.sent * count as u64;
    let settle = Instant::now();
    while target.shared.datagrams.load(Relaxed) < sent && settle.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    proxy.check_alive()?;
    proxy.stop()?;
    let outcome = target.finish();
    if let Some(failure) = outcome.failures.first() {
        return Err(format!("UDP target: {failure}"));
    }
    let received: u64 = outcome.per_device.values().map(|(n, _)| n).sum();
    let lost = sent.saturating_sub(received);
    if lost * 100 > sent {
        return Err(format!("{lost} of {sent} datagrams lost"));
    }
    let mut metrics = quantiles(
        &outcome.latency,
        &[("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)],
    );
    metrics.push(("lost", lost as f64));
    metrics.push(("connect_s", open_secs));
    metrics.push(before.others(&after));
    if kind != Kind::Direct {
        let per_session = |pss: f64| (pss - pss_before) / count as f64;
        metrics.push(("pss_kib_per_conn", per_session(pss_max)));
        metrics.push(("pss_idle_kib_per_conn", per_session(pss_idle)));
        metrics.push(("cpu_s", cpu));
        metrics.push((
            "cpu_us_per_packet",
            cpu * 1e6 / (count as f64 * f64::from(secs)),
        ));
    }
    Ok(metrics)
}

pub(crate) fn quantiles(histogram: &Histogram<u64>, wanted: &[(&'static str, f64)]) -> Vec<Metric> {
    wanted
        .iter()
        .map(|&(name, q)| (name, histogram.value_at_quantile(q) as f64 / 1e3))
        .collect()
}

fn remove_dir(dir: &std::path::Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("loadgen: cannot remove {}: {e}", dir.display());
    }
}

/// Samples a process's PSS every 500 ms on its own thread; keeps the peak.
struct PssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl PssSampler {
    fn start(pid: Option<u32>) -> PssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while let Some(pid) = pid.filter(|_| !flag.load(Relaxed)) {
                peak = peak.max(proxy::pss_kib(pid).unwrap_or(0.0));
                std::thread::sleep(Duration::from_millis(500));
            }
            peak
        });
        PssSampler { stop, thread }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, Relaxed);
        self.thread.join().expect("sampler panicked")
    }
}
