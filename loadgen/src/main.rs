//! loadgen: the load generator behind `scripts/bench.sh`.
//!
//! `loadgen run CASE PROXY` runs one case once against proxy-channel
//! (`pc`), haproxy or no proxy (`direct`) and prints one JSON line with its
//! figures, or with `"ok":false` and the reason when anything sent was not
//! delivered exactly (exit status 1). `loadgen cases` lists the cases and
//! the proxies each runs with; `loadgen report FILE` turns the JSON lines of
//! many runs into the benchmark's table.
//!
//! Modules: [`wire`] (what is sent and how it is checked), [`target`] (the
//! checking target servers), [`device`] and [`trackers`] (the clients),
//! [`udp`] (UDP trackers and their target), [`proxy`] (starting and measuring the proxy), [`store`] (reading back
//! proxy-channel's message files), [`scenario`] (the cases; [`catchup`]
//! runs the catch-up ones) and [`report`].
//! Everything runs on loopback, on std threads and mio, each load bounded
//! in time.

mod capacity;
mod catchup;
mod device;
mod proxy;
mod report;
mod scenario;
mod store;
mod target;
mod trackers;
mod udp;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;

use proxy::{Kind, Setup};
use scenario::Timing;

const USAGE: &str = "\
usage: loadgen run CASE PROXY [options]   run one case once; PROXY is pc, haproxy, nginx or direct
       loadgen cases [--only CASE,...]      list cases and the proxies each runs with
       loadgen report FILE                  print the table of a file of run results

run options:
  --round N                 round number to record (default 1)
  --quick                   short warm-up and window, fewer trackers
  --proxy-channel PATH      default target/release/proxy-channel
  --haproxy PATH            default haproxy (on PATH)
  --haproxy-template PATH   default scripts/haproxy-bench.cfg.template
  --nginx PATH              default nginx (on PATH), the UDP cases' peer
  --threads N               PROXY_WORKERS and haproxy nbthread (default 2)
  --work-dir DIR            scratch folder, removed afterwards (default in $TMPDIR)";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(message) => {
            eprintln!("loadgen: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut positional: Vec<String> = Vec::new();
    let mut round = 1u32;
    let mut quick = false;
    let mut only: Option<String> = None;
    let mut setup = Setup {
        proxy_channel: PathBuf::from("target/release/proxy-channel"),
        haproxy: PathBuf::from("haproxy"),
        haproxy_template: PathBuf::from("scripts/haproxy-bench.cfg.template"),
        nginx: PathBuf::from("nginx"),
        threads: 2,
        work_dir: std::env::temp_dir().join(format!("loadgen-{}", std::process::id())),
    };
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let text = |parser: &mut lexopt::Parser| -> Result<String, String> {
            parser
                .value()
                .map_err(|e| e.to_string())?
                .string()
                .map_err(|e| e.to_string())
        };
        match arg {
            Long("round") => {
                round = text(&mut parser)?
                    .parse()
                    .map_err(|_| "--round: a number")?
            }
            Long("quick") => quick = true,
            Long("only") => only = Some(text(&mut parser)?),
            Long("proxy-channel") => setup.proxy_channel = text(&mut parser)?.into(),
            Long("haproxy") => setup.haproxy = text(&mut parser)?.into(),
            Long("haproxy-template") => setup.haproxy_template = text(&mut parser)?.into(),
            Long("nginx") => setup.nginx = text(&mut parser)?.into(),
            Long("threads") => {
                setup.threads = text(&mut parser)?
                    .parse()
                    .map_err(|_| "--threads: a number")?
            }
            Long("work-dir") => setup.work_dir = text(&mut parser)?.into(),
            Short('h') | Long("help") => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            Value(value) => positional.push(value.string().map_err(|e| e.to_string())?),
            other => return Err(format!("{}\n{USAGE}", other.unexpected())),
        }
    }
    match positional
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["run", case, proxy] => {
            let case =
                scenario::find(case).ok_or_else(|| format!("no case {case}; see loadgen cases"))?;
            let kind = Kind::parse(proxy)
                .ok_or_else(|| format!("no proxy {proxy}: pc, haproxy, nginx or direct"))?;
            let timing = if quick {
                Timing::quick()
            } else {
                Timing::full()
            };
            Ok(run_case(case, kind, &setup, timing, round))
        }
        ["cases"] => {
            let wanted: Option<Vec<&str>> = only.as_deref().map(|list| list.split(',').collect());
            for case in scenario::CASES {
                if wanted
                    .as_ref()
                    .is_none_or(|names| names.contains(&case.name))
                {
                    let proxies: Vec<&str> = case.proxies.iter().map(|kind| kind.name()).collect();
                    println!("{} {}", case.name, proxies.join(" "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ["report", file] => {
            let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
            let clean = report::print(&text)?;
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        _ => Err(USAGE.into()),
    }
}

/// Runs one case and prints its JSON line; failure is exit status 1.
fn run_case(
    case: &scenario::Case,
    kind: Kind,
    setup: &Setup,
    timing: Timing,
    round: u32,
) -> ExitCode {
    if let Err(e) = proxy_channel::net::limits::raise_open_file_limit() {
        eprintln!("loadgen: cannot raise the open-file limit: {e}");
    }
    let result = std::fs::create_dir_all(&setup.work_dir)
        .map_err(|e| format!("{}: {e}", setup.work_dir.display()))
        .and_then(|()| scenario::run(case, kind, setup, timing));
    if let Err(e) = std::fs::remove_dir_all(&setup.work_dir) {
        eprintln!("loadgen: cannot remove {}: {e}", setup.work_dir.display());
    }
    // Only store cases in memory make it.
    let _ = std::fs::remove_dir_all(setup.memory_dir());
    let mut line = serde_json::json!({ "case": case.name, "proxy": kind.name(), "round": round });
    let code = match result {
        Ok(metrics) => {
            let figures: serde_json::Map<String, serde_json::Value> = metrics
                .iter()
                .map(|&(name, value)| {
                    (
                        name.to_string(),
                        serde_json::json!((value * 1000.0).round() / 1000.0),
                    )
                })
                .collect();
            let summary: Vec<String> = metrics.iter().map(|(n, v)| format!("{n}={v:.1}")).collect();
            eprintln!(
                "{} {} round {round}: {}",
                case.name,
                kind.name(),
                summary.join(" ")
            );
            line["ok"] = true.into();
            line["metrics"] = figures.into();
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "{} {} round {round}: FAILED: {error}",
                case.name,
                kind.name()
            );
            line["ok"] = false.into();
            line["error"] = error.into();
            ExitCode::FAILURE
        }
    };
    println!("{line}");
    code
}
