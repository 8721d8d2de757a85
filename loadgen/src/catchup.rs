//! The catch-up cases (issue 16): live trackers through proxy-channel while
//! its catch-up thread delivers a backlog of about 1 GiB to a target that
//! was down, next to the same run with no backlog.
//!
//! Target 1 is mandatory and takes everything live; target 2 is
//! non-mandatory with PROXY_TARGET2_CATCH_UP=true; the store is in memory
//! (`/dev/shm`). In `catchup-live-backlog`, target 2's port is bound but
//! refuses connections while a few stream devices push about 1 GiB through
//! the daemon and close (so their device event 2 is in the file); then
//! target 2 listens, and the tracker fleet is connected and measured as in
//! the `trackers` case while catch-up delivers. In `catchup-live-base`,
//! target 2 listens before the proxy starts and there is no backlog; every
//! other step is the same. Target 2 stands for another machine, so its
//! thread runs at nice 19 in both cases.
//!
//! Figures: latency at target 1 over the whole window and over the part of
//! it before the whole backlog was delivered (`catchup_p99_us`...), the
//! proxy's CPU over the window, and catch-up's rate while it was sending,
//! from target 2's count of catch-up bytes.
//!
//! Both targets check every byte: target 1 gets the backlog and the
//! trackers live; target 2 gets the trackers live and each backlog
//! connection again from catch-up, whole and in order (a delivery still
//! under way when the run ends must be a prefix of what was sent). A
//! backlog run in which catch-up delivered nothing during the measured
//! window fails: it would measure nothing.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::device::Devices;
use crate::proxy::{Kind, Running, Setup, Store};
use crate::scenario::{
    CONNECT_DEADLINE, MB, Metric, Snapshot, finish_targets, quantiles, with_targets,
};
use crate::target::{ClosedPort, Outcome, Priority, Shared, Target};
use crate::trackers::{self, Fleet};
use crate::wire::{self, Mode};

/// Device bytes streamed through the daemon while target 2 is down.
const BACKLOG_BYTES: u64 = 1 << 30;
/// Connections that carry them: each becomes one catch-up delivery.
const BACKLOG_CONNS: usize = 4;
/// Their ids, well above the trackers' (1..=count).
const BACKLOG_FIRST_ID: u64 = 1 << 40;
/// Streaming 1 GiB into the store in memory takes a few seconds.
const BACKLOG_DEADLINE: Duration = Duration::from_secs(60);
/// Closing the trackers takes well under a second when all is well.
const CLOSE_DEADLINE: Duration = Duration::from_secs(30);
const MIB: f64 = 1024.0 * 1024.0;

/// Target 2: non-mandatory, caught up (the store is on).
const CATCH_UP_ON: &[(&str, &str)] = &[
    ("PROXY_TARGET2_MANDATORY", "false"),
    ("PROXY_TARGET2_CATCH_UP", "true"),
];

/// What the devices that made the backlog sent.
struct Backlog {
    /// Bytes after the header, by connection id.
    sent: HashMap<u64, u64>,
    secs: f64,
}

impl Backlog {
    fn bytes(&self) -> u64 {
        self.sent.values().sum()
    }
}

/// The measured window of the tracker fleet.
struct Window {
    before: Snapshot,
    after: Snapshot,
    /// When it started and ended, in [`wire::now_ns`] time.
    span: (u64, u64),
    connect_secs: f64,
    /// Catch-up bytes target 2 had read at its start and at its end.
    caught_up: (u64, u64),
    /// What each tracker sent after its header.
    sent: HashMap<u64, u64>,
}

/// Catch-up as target 2 saw it once the trackers had closed, in
/// [`wire::now_ns`] time.
struct Delivery {
    /// Target 2 listening again.
    up_ns: u64,
    /// Its first catch-up byte, if any came.
    first_ns: Option<u64>,
    /// The last delivery completed, if all did.
    done_ns: Option<u64>,
}

impl Delivery {
    fn read(second: &Shared, up_ns: u64) -> Delivery {
        let first = second.first_stream_byte_ns.load(Relaxed);
        let done = second.streams_finished.load(Relaxed) == BACKLOG_CONNS;
        Delivery {
            up_ns,
            first_ns: (first != 0).then_some(first),
            done_ns: done.then(|| second.last_stream_finished_ns.load(Relaxed)),
        }
    }

    /// The part of the window `(from, until)` before the whole backlog was
    /// delivered: catch-up reading the files or sending.
    fn pending_within(&self, (from, until): (u64, u64)) -> Option<(u64, u64)> {
        let end = self.done_ns.unwrap_or(until).min(until);
        (from < end).then_some((from, end))
    }

    /// The part of the window `(from, until)` during which catch-up was
    /// sending.
    fn sending_within(&self, (from, until): (u64, u64)) -> Option<(u64, u64)> {
        let start = self.first_ns?.max(from);
        let end = self.done_ns.unwrap_or(until).min(until);
        (start < end).then_some((start, end))
    }
}

/// The proxy running, target 2 up and listening, and the backlog built
/// before, if any.
struct Started {
    proxy: Running,
    second: Target,
    backlog: Option<Backlog>,
    /// When target 2 started listening, in [`wire::now_ns`] time.
    up_ns: u64,
}

/// Runs one catch-up case: `count` trackers for `secs` seconds, with or
/// without the backlog.
pub fn live(setup: &Setup, count: usize, secs: u32, backlog: bool) -> Result<Vec<Metric>, String> {
    let first = Target::start().map_err(|e| format!("target 1: {e}"))?;
    let Started {
        mut proxy,
        second,
        backlog,
        up_ns,
    } = match start(setup, &first, backlog) {
        Ok(started) => started,
        Err(e) => return Err(with_targets(e, vec![first])),
    };
    let targets = vec![first, second];
    let measured = measure(&mut proxy, &targets, count, secs);
    let delivery = Delivery::read(&targets[1].shared, up_ns);
    let window = match measured {
        Ok(window) => window,
        Err(e) => return Err(with_targets(e, targets)),
    };
    let [first, second]: [Target; 2] = targets.try_into().map_err(|_| "two targets")?;
    let backlog_sent = backlog.as_ref().map(|b| b.sent.clone()).unwrap_or_default();
    let mut everything = window.sent.clone();
    everything.extend(&backlog_sent);
    let first = finish_targets(vec![first], &everything)?
        .pop()
        .ok_or("target 1 gave no outcome")?;
    check_second(&second.finish(), &window.sent, &backlog_sent)?;
    proxy.stop()?;

    let mut metrics = live_metrics(&first, &window, count, secs);
    if let Some(backlog) = &backlog {
        metrics.extend(catch_up_metrics(backlog, &window, &delivery)?);
        if let Some(pending) = delivery.pending_within(window.span) {
            let wanted = [
                ("catchup_p50_us", 0.5),
                ("catchup_p99_us", 0.99),
                ("catchup_p999_us", 0.999),
            ];
            metrics.extend(latency_between(&first, pending, &wanted));
        }
    }
    Ok(metrics)
}

/// With `backlog`: starts the proxy while target 2 is down, builds the
/// backlog, then brings target 2 up. Without: target 2 is up before the
/// proxy starts.
fn start(setup: &Setup, first: &Target, backlog: bool) -> Result<Started, String> {
    let port = ClosedPort::bind().map_err(|e| format!("target 2: {e}"))?;
    let addrs = [first.addr, port.addr];
    let start_proxy = || {
        Running::start_with(
            Kind::ProxyChannel,
            setup,
            &addrs,
            Store::Memory,
            CATCH_UP_ON,
        )
    };
    // Target 2 stands for another machine: at a low priority, its share of
    // the cores goes to the proxy first.
    let listen = |port: ClosedPort| {
        port.listen(Priority::Low)
            .map_err(|e| format!("target 2: {e}"))
    };
    if !backlog {
        let second = listen(port)?;
        return Ok(Started {
            proxy: start_proxy()?,
            second,
            backlog: None,
            up_ns: wire::now_ns(),
        });
    }
    let mut proxy = start_proxy()?;
    let built = build_backlog(&mut proxy, &first.shared)?;
    let second = listen(port)?;
    Ok(Started {
        proxy,
        second,
        backlog: Some(built),
        up_ns: wire::now_ns(),
    })
}

/// Streams [`BACKLOG_BYTES`] through the daemon on [`BACKLOG_CONNS`]
/// connections while target 2 refuses, then closes them; target 1 takes
/// it all.
fn build_backlog(proxy: &mut Running, first: &Shared) -> Result<Backlog, String> {
    let started = Instant::now();
    let at_start = first.stream_bytes.load(Relaxed);
    let devices = Devices::start_numbered(
        Mode::Stream,
        proxy.listen,
        BACKLOG_CONNS,
        None,
        BACKLOG_FIRST_ID,
    )?;
    while first.stream_bytes.load(Relaxed) - at_start < BACKLOG_BYTES {
        if first.failed.load(Relaxed) > 0 {
            break; // finishing the devices names the failure
        }
        proxy.check_alive()?;
        if started.elapsed() > BACKLOG_DEADLINE {
            return Err(format!(
                "building the backlog: {} MiB of {} MiB after {BACKLOG_DEADLINE:?}",
                (first.stream_bytes.load(Relaxed) - at_start) >> 20,
                BACKLOG_BYTES >> 20
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let outcome = devices.finish()?;
    Ok(Backlog {
        sent: outcome.sent,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Connects the fleet, lets it settle, measures `secs` seconds of it, and
/// closes it at both targets.
fn measure(
    proxy: &mut Running,
    targets: &[Target],
    count: usize,
    secs: u32,
) -> Result<Window, String> {
    let (first, second) = (&targets[0].shared, &targets[1].shared);
    let connecting = Instant::now();
    let mut fleet = Fleet::connect(proxy.listen, count, first, CONNECT_DEADLINE)?;
    let connect_secs = connecting.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let caught_up_before = second.stream_bytes.load(Relaxed);
    let start_ns = wire::now_ns();
    let before = Snapshot::take(proxy, targets)?;
    fleet.send(secs)?;
    let after = Snapshot::take(proxy, targets)?;
    let end_ns = wire::now_ns();
    let caught_up_after = second.stream_bytes.load(Relaxed);
    let sent = fleet.close(first, CLOSE_DEADLINE)?;
    // Target 2 has the trackers live too: their closes reach it as well.
    trackers::wait_for(
        second,
        Instant::now() + CLOSE_DEADLINE,
        "closing the trackers at target 2",
        || second.finished.load(Relaxed) - second.streams_finished.load(Relaxed) == count,
    )?;
    Ok(Window {
        before,
        after,
        span: (start_ns, end_ns),
        connect_secs,
        caught_up: (caught_up_before, caught_up_after),
        sent,
    })
}

/// Target 2 got every tracker byte live, and of each backlog connection a
/// prefix, all of it if the delivery completed; nothing else, nothing
/// wrong.
fn check_second(
    outcome: &Outcome,
    trackers: &HashMap<u64, u64>,
    backlog: &HashMap<u64, u64>,
) -> Result<(), String> {
    if let Some(first) = outcome.failures.first() {
        return Err(format!(
            "target 2: {first} ({} failures in all)",
            outcome.failures.len()
        ));
    }
    for (id, &sent) in trackers {
        match outcome.conns.get(id) {
            None => return Err(format!("target 2: tracker {id} never arrived")),
            Some(got) if got.bytes != sent || !got.finished => {
                return Err(format!(
                    "target 2: tracker {id} delivered {} of the {sent} bytes sent{}",
                    got.bytes,
                    if got.finished { "" } else { ", not closed" }
                ));
            }
            Some(_) => {}
        }
    }
    for (id, got) in &outcome.conns {
        if trackers.contains_key(id) {
            continue;
        }
        let Some(&sent) = backlog.get(id) else {
            return Err(format!("target 2: connection {id} was never sent"));
        };
        if got.bytes > sent || (got.finished && got.bytes != sent) {
            return Err(format!(
                "target 2: catch-up of connection {id} delivered {} of the {sent} bytes sent{}",
                got.bytes,
                if got.finished { " and closed" } else { "" }
            ));
        }
    }
    Ok(())
}

/// Latency at target 1 and the proxy's CPU, as the `trackers` case reports
/// them.
fn live_metrics(first: &Outcome, window: &Window, count: usize, secs: u32) -> Vec<Metric> {
    let cpu = window.after.cpu - window.before.cpu;
    let mut metrics = quantiles(
        &first.latency,
        &[("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)],
    );
    metrics.push(("connect_s", window.connect_secs));
    metrics.push(window.before.others(&window.after));
    metrics.push(("cpu_s", cpu));
    metrics.push((
        "cpu_us_per_packet",
        cpu * 1e6 / (count as f64 * f64::from(secs)),
    ));
    metrics
}

/// What catch-up delivered: during the window (which must be something)
/// and at what rate while it was sending, how much of the window it had
/// backlog left, whether the whole backlog was delivered by the window's
/// end, and when.
fn catch_up_metrics(
    backlog: &Backlog,
    window: &Window,
    delivery: &Delivery,
) -> Result<Vec<Metric>, String> {
    let since_up = |ns: u64| ns.saturating_sub(delivery.up_ns) as f64 / 1e9;
    let (at_start, at_end) = window.caught_up;
    let sending = delivery
        .sending_within(window.span)
        .filter(|_| at_end > at_start);
    let Some((sending_from, sending_until)) = sending else {
        return Err(match delivery.done_ns {
            Some(done) if done <= window.span.0 => format!(
                "catch-up delivered the whole backlog {:.1} s after target 2 came up, before \
                 the measured window began: nothing measured",
                since_up(done)
            ),
            _ => format!(
                "catch-up delivered nothing during the measured window (it ended {:.1} s after \
                 target 2 came up)",
                since_up(window.span.1)
            ),
        });
    };
    let window_ns = (window.span.1 - window.span.0) as f64;
    let pending_ns = delivery
        .pending_within(window.span)
        .map_or(0, |(from, until)| until - from);
    let sending_secs = (sending_until - sending_from) as f64 / 1e9;
    let done_in_window = delivery.done_ns.is_some_and(|done| done <= window.span.1);
    let total = backlog.bytes();
    let mut metrics = vec![
        ("backlog_mib", total as f64 / MIB),
        ("backlog_build_s", backlog.secs),
        ("catchup_before_mib", at_start as f64 / MIB),
        ("catchup_window_mib", (at_end - at_start) as f64 / MIB),
        (
            "catchup_mbs",
            (at_end - at_start) as f64 / sending_secs / MB,
        ),
        ("catchup_window_share", pending_ns as f64 / window_ns),
        ("catchup_done", f64::from(u8::from(done_in_window))),
        (
            "catchup_left_mib",
            total.saturating_sub(at_end) as f64 / MIB,
        ),
    ];
    if let Some(first) = delivery.first_ns {
        metrics.push(("catchup_start_s", since_up(first)));
    }
    if let Some(done) = delivery.done_ns {
        metrics.push(("catchup_s", since_up(done)));
    }
    Ok(metrics)
}

/// Quantiles of the latency of the tracker packets sent from `from` to
/// `until` ([`wire::now_ns`] time); none if no packet was.
fn latency_between(
    outcome: &Outcome,
    (from, until): (u64, u64),
    wanted: &[(&'static str, f64)],
) -> Vec<Metric> {
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds");
    for &(sent, latency) in &outcome.tracked {
        if (from..until).contains(&sent) {
            histogram.saturating_record(latency);
        }
    }
    match histogram.is_empty() {
        true => Vec::new(),
        false => quantiles(&histogram, wanted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::ConnResult;

    #[test]
    fn the_window_splits_into_pending_and_sending_parts() {
        let done = Delivery {
            up_ns: 0,
            first_ns: Some(30),
            done_ns: Some(70),
        };
        assert_eq!(done.pending_within((50, 100)), Some((50, 70)));
        assert_eq!(done.sending_within((10, 100)), Some((30, 70)));
        assert_eq!(done.pending_within((80, 100)), None);
        assert_eq!(done.sending_within((80, 100)), None);
        let unfinished = Delivery {
            done_ns: None,
            ..done
        };
        assert_eq!(unfinished.sending_within((10, 100)), Some((30, 100)));
        let silent = Delivery {
            first_ns: None,
            ..unfinished
        };
        assert_eq!(silent.pending_within((10, 100)), Some((10, 100)));
        assert_eq!(silent.sending_within((10, 100)), None);
    }

    fn outcome(conns: &[(u64, u64, bool)]) -> Outcome {
        Outcome {
            conns: conns
                .iter()
                .map(|&(id, bytes, finished)| {
                    let result = ConnResult {
                        bytes,
                        packets: 0,
                        finished,
                    };
                    (id, result)
                })
                .collect(),
            failures: Vec::new(),
            latency: Histogram::new(3).expect("sigfig"),
            tracked: Vec::new(),
        }
    }

    #[test]
    fn target_two_gets_trackers_whole_and_deliveries_as_prefixes() {
        let trackers = HashMap::from([(1, 500), (2, 500)]);
        let backlog = HashMap::from([(BACKLOG_FIRST_ID, 1000), (BACKLOG_FIRST_ID + 1, 1000)]);
        let check = |conns: &[(u64, u64, bool)]| check_second(&outcome(conns), &trackers, &backlog);
        let first = BACKLOG_FIRST_ID;
        assert!(
            check(&[
                (1, 500, true),
                (2, 500, true),
                (first, 1000, true),
                (first + 1, 10, false)
            ])
            .is_ok()
        );
        assert!(check(&[(1, 500, true), (2, 500, true)]).is_ok());
        // A tracker short, a delivery closed short or too long, a stranger.
        assert!(check(&[(1, 400, true), (2, 500, true)]).is_err());
        assert!(check(&[(1, 500, true), (2, 500, true), (first, 999, true)]).is_err());
        assert!(check(&[(1, 500, true), (2, 500, true), (first, 1001, false)]).is_err());
        assert!(check(&[(1, 500, true), (2, 500, true), (7, 1, true)]).is_err());
        let mut failed = outcome(&[(1, 500, true), (2, 500, true)]);
        failed
            .failures
            .push("connection 1: packet 3 is wrong".into());
        assert!(check_second(&failed, &trackers, &backlog).is_err());
    }
}
