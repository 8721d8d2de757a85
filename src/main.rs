//! The `proxy-channel` command: parse the command line, start the logger,
//! run the daemon or a tool, and turn errors into an exit status.

use std::process::ExitCode;

use proxy_channel::config::{Config, SETTINGS};
use proxy_channel::daemon;

const USAGE: &str = "\
proxy-channel: a raw TCP proxy channel with traffic recording

Usage:
  proxy-channel [run]      run the daemon (configured by the environment)
  proxy-channel --help     this help
  proxy-channel --version  the version

Devices connect to PROXY_LISTEN; their bytes go to PROXY_TARGET1..3 and
the targets' replies come back; connects, disconnects and traffic are
written as JSON lines to $PROXY_DATA_DIR/messages.jsonl.

Environment (n is a target number, 1 to 3):";

fn main() -> ExitCode {
    let command = match parse_command() {
        Ok(command) => command,
        Err(message) => {
            eprintln!("proxy-channel: {message}; see proxy-channel --help");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print_help();
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("proxy-channel {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Run => run_daemon(),
    }
}

enum Command {
    Run,
    Help,
    Version,
}

fn parse_command() -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut command = None;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let next = match arg {
            Short('h') | Long("help") => Command::Help,
            Short('V') | Long("version") => Command::Version,
            Value(value) if value == "run" && command.is_none() => Command::Run,
            other => return Err(other.unexpected().to_string()),
        };
        if matches!(next, Command::Help | Command::Version) {
            return Ok(next);
        }
        command = Some(next);
    }
    Ok(command.unwrap_or(Command::Run))
}

fn print_help() {
    println!("{USAGE}");
    for setting in SETTINGS {
        println!(
            "  {:<28} {:<30} {}",
            setting.name, setting.default, setting.meaning
        );
    }
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
