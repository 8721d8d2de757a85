//! The `proxy-channel` command: parse the command line, start the logger,
//! run the daemon or a tool, and turn the outcome into an exit status.

use std::io::Write;
use std::process::ExitCode;

use proxy_channel::cli::{self, Command};
use proxy_channel::config::Config;
use proxy_channel::control::client as ctl;
use proxy_channel::daemon;
use proxy_channel::tools::{replay, viewer};

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1).collect()) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("proxy-channel: {e}; see proxy-channel --help");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{}", cli::help());
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("proxy-channel {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run => run_daemon(),
        Command::View(options) => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
            let outcome = viewer::run(&options, &mut out);
            // A closed pipe (`| head`) is a normal end for a viewer.
            let _ = out.flush();
            match outcome {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Ctl(options) => match ctl::run(&options, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Replay(options) => match replay::run(&options) {
            Ok(summary) if summary.failed == 0 => ExitCode::SUCCESS,
            Ok(_) => ExitCode::from(1),
            Err(e) => fail(&e),
        },
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("proxy-channel: {error}");
    ExitCode::from(1)
}

fn run_daemon() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("proxy-channel: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy-channel: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
