//! The one table at the end: medians per figure for proxy-channel, haproxy
//! and direct, the ratio proxy-channel / haproxy, and each goal met or not.
//!
//! Input is the JSON lines `loadgen run` printed, one per run. A figure's
//! haproxy reference is normally the same case; where haproxy cannot run a
//! case (three targets, the store) the goal names another case, e.g.
//! haproxy's one-target goodput. Failed runs count for nothing but are
//! listed under the table, and make the report exit non-zero.

use std::collections::BTreeMap;

use serde_json::Value;

/// What a figure is judged against.
#[derive(Clone, Copy)]
enum Goal {
    None,
    /// proxy-channel / haproxy at least this.
    RatioAtLeast(f64),
    /// proxy-channel / haproxy at most this.
    RatioAtMost(f64),
    /// proxy-channel's own value at least this.
    AtLeast(f64),
    /// proxy-channel's own value at most this.
    AtMost(f64),
}

struct Row {
    label: &'static str,
    case: &'static str,
    metric: &'static str,
    /// haproxy's figure to compare with, if not the same case and metric.
    reference: Option<(&'static str, &'static str)>,
    goal: Goal,
    /// Whose figure the "haproxy" column holds: haproxy's; nginx's for UDP
    /// rows; proxy-channel's own in another case for "store on/off" rows.
    peer: &'static str,
}

const fn row(label: &'static str, case: &'static str, metric: &'static str, goal: Goal) -> Row {
    Row {
        label,
        case,
        metric,
        reference: None,
        goal,
        peer: "haproxy",
    }
}

/// A UDP trackers row: its peer is nginx (haproxy has no UDP).
const fn udp(label: &'static str, metric: &'static str, goal: Goal) -> Row {
    Row {
        label,
        case: "udp-trackers",
        metric,
        reference: None,
        goal,
        peer: "nginx",
    }
}

const fn vs(
    label: &'static str,
    case: &'static str,
    metric: &'static str,
    reference: (&'static str, &'static str),
    goal: Goal,
) -> Row {
    Row {
        label,
        case,
        metric,
        reference: Some(reference),
        goal,
        peer: "haproxy",
    }
}

/// A row whose reference is proxy-channel's own figure in another case; its
/// "haproxy" column shows that figure and the label says which it is.
const fn own(
    label: &'static str,
    case: &'static str,
    metric: &'static str,
    reference: (&'static str, &'static str),
    goal: Goal,
) -> Row {
    Row {
        label,
        case,
        metric,
        reference: Some(reference),
        goal,
        peer: "pc",
    }
}

const HA_1C: (&str, &str) = ("stream-1t-1c", "goodput_mbs");
const HA_8C: (&str, &str) = ("stream-1t-8c", "goodput_mbs");
const HA_1C_CPU: (&str, &str) = ("stream-1t-1c", "cpu_s_per_gib");
const HA_8C_CPU: (&str, &str) = ("stream-1t-8c", "cpu_s_per_gib");
const CATCHUP_BASE_P99: (&str, &str) = ("catchup-live-base", "p99_us");

/// The table, top to bottom. Goals are issue 4's.
#[rustfmt::skip]
const ROWS: &[Row] = &[
    row("stream 1t 1c: goodput MB/s", "stream-1t-1c", "goodput_mbs", Goal::RatioAtLeast(1.3)),
    row("stream 1t 1c: proxy CPU s/GiB", "stream-1t-1c", "cpu_s_per_gib", Goal::RatioAtMost(0.7)),
    row("stream 1t 8c: goodput MB/s", "stream-1t-8c", "goodput_mbs", Goal::RatioAtLeast(1.3)),
    row("stream 1t 8c: proxy CPU s/GiB", "stream-1t-8c", "cpu_s_per_gib", Goal::RatioAtMost(0.7)),
    row("stream 1t 8c + metrics file: goodput MB/s", "stream-1t-8c-metrics", "goodput_mbs", Goal::None),
    row("stream 1t 8c + metrics file: CPU s/GiB", "stream-1t-8c-metrics", "cpu_s_per_gib", Goal::None),
    vs("stream 3t 1c: MB/s, slowest target", "stream-3t-1c", "goodput_min_mbs", HA_1C, Goal::RatioAtLeast(0.7)),
    vs("stream 3t 1c: proxy CPU s/GiB", "stream-3t-1c", "cpu_s_per_gib", HA_1C_CPU, Goal::None),
    vs("stream 3t 8c: MB/s, slowest target", "stream-3t-8c", "goodput_min_mbs", HA_8C, Goal::RatioAtLeast(0.7)),
    vs("stream 3t 8c: proxy CPU s/GiB", "stream-3t-8c", "cpu_s_per_gib", HA_8C_CPU, Goal::None),
    vs("store 3t 1c tmpfs: MB/s, slowest target", "store-3t-1c", "goodput_min_mbs", HA_1C, Goal::RatioAtLeast(0.35)),
    row("store 3t 1c tmpfs: proxy CPU s/GiB", "store-3t-1c", "cpu_s_per_gib", Goal::None),
    row("store 3t 1c tmpfs: file MB/s", "store-3t-1c", "file_mbs", Goal::None),
    row("store 3t 1c tmpfs: file msgs/s", "store-3t-1c", "file_msgs_per_s", Goal::None),
    vs("store 3t 8c tmpfs: MB/s, slowest target", "store-3t-8c", "goodput_min_mbs", HA_8C, Goal::RatioAtLeast(0.35)),
    row("store 3t 8c tmpfs: proxy CPU s/GiB", "store-3t-8c", "cpu_s_per_gib", Goal::None),
    row("store 3t 8c tmpfs: file MB/s", "store-3t-8c", "file_mbs", Goal::None),
    vs("store 3t 8c disk: MB/s, slowest target", "store-3t-8c-disk", "goodput_min_mbs", HA_8C, Goal::None),
    row("store 3t 8c disk: file MB/s", "store-3t-8c-disk", "file_mbs", Goal::None),
    row("disk alone: 1 GiB written+synced MB/s", "store-3t-8c-disk", "disk_write_mbs", Goal::None),
    row("view: scan MB/s (parse, select nothing)", "view-scan", "view_scan_mbs", Goal::None),
    row("view: hex dump MB/s (to /dev/null)", "view-scan", "view_dump_mbs", Goal::None),
    row("store alone, 100B packets: msgs/s", "store-capacity", "store_capacity_msgs_per_s", Goal::AtLeast(500_000.0)),
    row("store alone, 100B packets: file MB/s", "store-capacity", "file_mbs", Goal::None),
    row("store 100B 500k/s offered: msgs/s", "store-100b", "store_msgs_per_s", Goal::None),
    row("store 100B 500k/s offered: B/msg", "store-100b", "bytes_per_msg", Goal::None),
    row("store 100B 500k/s offered: pkts/s", "store-100b", "packets_per_s", Goal::None),
    row("store 100B 500k/s offered: file MB/s", "store-100b", "file_mbs", Goal::None),
    row("store 100B flat out: msgs/s", "store-100b-max", "store_msgs_per_s", Goal::None),
    row("store 100B flat out: B/msg", "store-100b-max", "bytes_per_msg", Goal::None),
    row("store 100B flat out: pkts/s", "store-100b-max", "packets_per_s", Goal::None),
    row("req/reply 1c: req/s", "echo-1c", "req_per_s", Goal::None),
    row("req/reply 1c: p50 us", "echo-1c", "p50_us", Goal::None),
    row("req/reply 1c: p99 us", "echo-1c", "p99_us", Goal::None),
    row("req/reply 1c: proxy CPU us/req", "echo-1c", "cpu_us_per_req", Goal::None),
    row("req/reply 50c: req/s", "echo-50c", "req_per_s", Goal::RatioAtLeast(1.2)),
    row("req/reply 50c: p50 us", "echo-50c", "p50_us", Goal::None),
    row("req/reply 50c: p99 us", "echo-50c", "p99_us", Goal::RatioAtMost(1.0)),
    row("req/reply 50c: proxy CPU us/req", "echo-50c", "cpu_us_per_req", Goal::RatioAtMost(0.7)),
    row("trackers: p50 us", "trackers", "p50_us", Goal::None),
    row("trackers: p99 us", "trackers", "p99_us", Goal::RatioAtMost(1.0)),
    row("trackers: p999 us", "trackers", "p999_us", Goal::None),
    row("trackers: PSS KiB/conn, sending", "trackers", "pss_kib_per_conn", Goal::AtMost(2.0)),
    row("trackers: PSS KiB/conn, idle", "trackers", "pss_idle_kib_per_conn", Goal::None),
    row("trackers: PSS MiB before connects", "trackers", "pss_base_mib", Goal::None),
    row("trackers: proxy CPU s, sending phase", "trackers", "cpu_s", Goal::RatioAtMost(0.7)),
    row("trackers: proxy CPU us/packet", "trackers", "cpu_us_per_packet", Goal::None),
    row("trackers: s to connect all", "trackers", "connect_s", Goal::None),
    row("fairness, writer 200 ms/write, 1 worker: quiet p99 us", "fairness-1w", "quiet_p99_us", Goal::AtMost(50_000.0)),
    row("fairness, writer 200 ms/write, 2 workers: quiet p99 us", "fairness-2w", "quiet_p99_us", Goal::AtMost(50_000.0)),
    row("fairness, 1 worker: quiet req/s", "fairness-1w", "quiet_req_per_s", Goal::None),
    vs("trackers store on: proxy CPU s", "trackers-store", "cpu_s", ("trackers", "cpu_s"), Goal::RatioAtMost(1.0)),
    own("trackers store on/off (pc): CPU s", "trackers-store", "cpu_s", ("trackers", "cpu_s"), Goal::RatioAtMost(1.15)),
    own("trackers store on/off (pc): p99 us", "trackers-store", "p99_us", ("trackers", "p99_us"), Goal::RatioAtMost(1.25)),
    row("trackers store on: p999 us", "trackers-store", "p999_us", Goal::None),
    udp("udp trackers: p50 us", "p50_us", Goal::None),
    udp("udp trackers: p99 us", "p99_us", Goal::None),
    udp("udp trackers: p999 us", "p999_us", Goal::None),
    udp("udp trackers: datagrams lost", "lost", Goal::None),
    udp("udp trackers: PSS KiB/session, sending", "pss_kib_per_conn", Goal::None),
    udp("udp trackers: proxy CPU s, sending", "cpu_s", Goal::None),
    udp("udp trackers: proxy CPU us/datagram", "cpu_us_per_packet", Goal::None),
    own("catch-up 1 GiB vs none (pc): p50 us", "catchup-live-backlog", "p50_us", ("catchup-live-base", "p50_us"), Goal::None),
    own("catch-up 1 GiB vs none (pc): p99 us", "catchup-live-backlog", "p99_us", CATCHUP_BASE_P99, Goal::None),
    own("catch-up 1 GiB vs none (pc): p99 us, backlog left", "catchup-live-backlog", "catchup_p99_us", CATCHUP_BASE_P99, Goal::None),
    own("catch-up 1 GiB vs none (pc): p999 us", "catchup-live-backlog", "p999_us", ("catchup-live-base", "p999_us"), Goal::None),
    own("catch-up 1 GiB vs none (pc): proxy CPU s", "catchup-live-backlog", "cpu_s", ("catchup-live-base", "cpu_s"), Goal::None),
    row("catch-up 1 GiB: MB/s delivered while sending", "catchup-live-backlog", "catchup_mbs", Goal::None),
    row("catch-up 1 GiB: share of window, backlog left", "catchup-live-backlog", "catchup_window_share", Goal::None),
    row("catch-up 1 GiB: s from target up to all sent", "catchup-live-backlog", "catchup_s", Goal::None),
    row("catch-up 1 GiB: all sent in window (1 = yes)", "catchup-live-backlog", "catchup_done", Goal::None),
    row("startup: ms to \"listening on\" log", "startup", "listening_ms", Goal::None),
    row("startup: ms to accept", "startup", "startup_ms", Goal::None),
    row("startup: ms to first byte forwarded", "startup", "first_byte_ms", Goal::None),
    row("binary MiB (as built)", "startup", "binary_mib", Goal::None),
    row("binary MiB (stripped)", "startup", "stripped_mib", Goal::None),
];

/// (case, proxy, metric) -> the round and value of every successful run.
type Figures = BTreeMap<(String, String, String), Vec<(u64, f64)>>;

/// Prints the table; false if any run failed.
pub fn print(text: &str) -> Result<bool, String> {
    let mut figures = Figures::new();
    let mut failures = Vec::new();
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let run: Value =
            serde_json::from_str(line).map_err(|e| format!("results line {}: {e}", number + 1))?;
        let field = |name: &str| run[name].as_str().unwrap_or("?").to_string();
        let (case, proxy) = (field("case"), field("proxy"));
        if run["ok"] != Value::Bool(true) {
            failures.push(format!(
                "{case} {proxy} round {}: {}",
                run["round"],
                run["error"].as_str().unwrap_or("?")
            ));
            continue;
        }
        *runs.entry(proxy.clone()).or_default() += 1;
        let round = run["round"].as_u64().unwrap_or(0);
        for (metric, value) in run["metrics"].as_object().into_iter().flatten() {
            if let Some(value) = value.as_f64() {
                let key = (case.clone(), proxy.clone(), metric.clone());
                figures.entry(key).or_default().push((round, value));
            }
        }
    }
    let figure = |case: &str, proxy: &str, metric: &str| {
        let values: Vec<f64> = runs_of(&figures, case, proxy, metric)
            .iter()
            .map(|&(_, v)| v)
            .collect();
        (!values.is_empty()).then(|| median(&values))
    };

    println!(
        "{:<38} {:>11} {:>11} {:>7} {:>11}  {:<10} met",
        "figure (median)", "pc", "haproxy", "pc/ha", "direct", "goal"
    );
    println!("{}", "-".repeat(100));
    for row in ROWS {
        let pc = figure(row.case, "pc", row.metric);
        let (ref_case, ref_metric) = row.reference.unwrap_or((row.case, row.metric));
        let ha = figure(ref_case, row.peer, ref_metric);
        let direct = figure(row.case, "direct", row.metric);
        if pc.is_none() && ha.is_none() && direct.is_none() {
            continue;
        }
        let ratio = pc.zip(ha).map(|(pc, ha)| pc / ha);
        let (goal, met) = judge(row.goal, pc, ratio);
        println!(
            "{:<38} {:>11} {:>11} {:>7} {:>11}  {:<10} {}",
            row.label,
            show(pc),
            show(ha),
            ratio.map_or("-".into(), |r| format!("{r:.2}")),
            show(direct),
            goal,
            met
        );
    }
    println!("{}", "-".repeat(100));
    print_round_ratios(&figures);
    let counts: Vec<String> = runs
        .iter()
        .map(|(proxy, n)| format!("{proxy} {n}"))
        .collect();
    println!(
        "successful runs: {}; failed runs: {}",
        counts.join(", "),
        failures.len()
    );
    println!(
        "haproxy column of \"3t\" and \"store 3t\" rows: haproxy's one-target figure (haproxy has no fan-out, no store)"
    );
    println!(
        "\"store on/off (pc)\" rows: the haproxy column holds proxy-channel's own figure with the store off"
    );
    println!(
        "\"catch-up vs none (pc)\" rows: the haproxy column holds proxy-channel's own figure in catchup-live-base (same run, no backlog); \"backlog left\": packets sent before all of it was delivered"
    );
    println!(
        "haproxy column of \"udp trackers\" rows: nginx's stream module (one process), since haproxy has no UDP"
    );
    println!(
        "store \"tmpfs\" rows: message files in /dev/shm (the daemon's own cost); \"disk\" rows: on the work folder's disk (a short run fits in its page cache)"
    );
    let noise: Vec<f64> = figures
        .iter()
        .filter(|((_, _, metric), _)| metric == "other_cores")
        .flat_map(|(_, values)| values.iter().map(|&(_, v)| v))
        .collect();
    if !noise.is_empty() {
        let max = noise.iter().copied().fold(0.0, f64::max);
        println!(
            "CPU busy outside the proxy and loadgen during measured windows: median {:.2} cores, max {max:.2}",
            median(&noise).max(0.0)
        );
    }
    for failure in &failures {
        println!("FAILED: {failure}");
    }
    Ok(failures.is_empty())
}

/// For each row with a ratio goal, the ratio within each round (the two
/// runs of a round are minutes apart, so a machine that drifts between
/// rounds moves both): how far a single round can land from the median.
fn print_round_ratios(figures: &Figures) {
    let mut printed_header = false;
    for row in ROWS {
        if !matches!(row.goal, Goal::RatioAtLeast(_) | Goal::RatioAtMost(_)) {
            continue;
        }
        let (ref_case, ref_metric) = row.reference.unwrap_or((row.case, row.metric));
        let reference = runs_of(figures, ref_case, row.peer, ref_metric);
        let ratios: Vec<String> = runs_of(figures, row.case, "pc", row.metric)
            .iter()
            .filter_map(|&(round, pc)| {
                let (_, peer) = reference.iter().find(|&&(r, _)| r == round)?;
                Some(format!("{:.2}", pc / peer))
            })
            .collect();
        if ratios.len() < 2 {
            continue;
        }
        if !printed_header {
            println!("pc/ha within each round, rounds in order (rows with a ratio goal):");
            printed_header = true;
        }
        println!("  {:<52} {}", row.label, ratios.join(" "));
    }
}

/// The round and value of each successful run of a figure.
fn runs_of<'a>(figures: &'a Figures, case: &str, proxy: &str, metric: &str) -> &'a [(u64, f64)] {
    let key = (case.to_string(), proxy.to_string(), metric.to_string());
    figures.get(&key).map_or(&[], Vec::as_slice)
}

fn judge(goal: Goal, pc: Option<f64>, ratio: Option<f64>) -> (String, &'static str) {
    let verdict = |value: Option<f64>, ok: &dyn Fn(f64) -> bool| match value {
        None => "n/a",
        Some(v) if ok(v) => "yes",
        Some(_) => "NO",
    };
    match goal {
        Goal::None => (String::new(), ""),
        Goal::RatioAtLeast(x) => (format!(">= {x}x"), verdict(ratio, &|r| r >= x)),
        Goal::RatioAtMost(x) => (format!("<= {x}x"), verdict(ratio, &|r| r <= x)),
        Goal::AtLeast(x) => (format!(">= {}", show(Some(x))), verdict(pc, &|v| v >= x)),
        Goal::AtMost(x) => (format!("<= {}", show(Some(x))), verdict(pc, &|v| v <= x)),
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Three significant digits or so, without exponent.
fn show(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}
