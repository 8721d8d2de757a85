//! Talking to the daemon's control socket: the `ctl` command as a user
//! runs it, a raw client for requests the CLI would never send, and the
//! Prometheus client's own parser for the metrics file.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{Finished, daemon_command, millis, poll_until, run_command_to_exit, secs};

/// `proxy-channel ctl ARGS --socket SOCKET`, run to its end (10 s at most).
pub fn run_ctl(socket: &Path, args: &[&str]) -> Finished {
    let mut command = daemon_command(&[]);
    command.arg("ctl").args(args).arg("--socket").arg(socket);
    run_command_to_exit(command, &format!("proxy-channel ctl {args:?}"), secs(10))
}

/// `proxy-channel ctl ARGS --json` on `socket`: fails the test unless it
/// exits 0 with one JSON reply that says `"ok":true`, and returns it.
pub fn ctl_json(socket: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let finished = run_ctl(socket, &all);
    assert!(
        finished.status.success(),
        "ctl {all:?} failed ({}): {}",
        finished.status,
        finished.stderr
    );
    let reply: Value = serde_json::from_str(&finished.stdout)
        .unwrap_or_else(|e| panic!("ctl {all:?} printed no JSON ({e}): {}", finished.stdout));
    assert_eq!(
        reply["ok"],
        Value::Bool(true),
        "ctl {all:?} replied {reply}"
    );
    reply
}

/// A raw client of the control socket, one JSON line each way.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
}

impl ControlClient {
    pub fn connect(socket: &Path) -> ControlClient {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", socket.display()));
        stream.set_read_timeout(Some(secs(10))).unwrap();
        stream.set_write_timeout(Some(secs(10))).unwrap();
        ControlClient {
            reader: BufReader::new(stream),
        }
    }

    /// Sends raw bytes (a request, part of one, or several).
    pub fn send(&mut self, bytes: &[u8]) {
        self.reader
            .get_mut()
            .write_all(bytes)
            .expect("send to the control socket");
    }

    /// Reads one reply line; fails the test unless it is JSON.
    pub fn reply(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }

    /// Sends `request` and reads one reply.
    pub fn ask(&mut self, request: &[u8]) -> Value {
        self.send(request);
        self.reply()
    }

    /// Reads on after the replies: `Ok(0)` or an error once the daemon
    /// has hung up.
    pub fn read_more(&mut self) -> std::io::Result<usize> {
        let mut rest = String::new();
        self.reader.read_line(&mut rest)
    }
}

/// Parses a Prometheus text file with the Prometheus client's own parser
/// (python3 with the prometheus-client package, installed if missing):
/// one JSON object per family with its name, type, help and samples (name,
/// labels, value). Fails the test if the parser is missing or refuses it.
pub fn parse_prometheus(path: &Path) -> Vec<Value> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
families = []
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    families.append({
        "name": family.name,
        "type": family.type,
        "help": family.documentation,
        "samples": [{"name": s.name, "labels": s.labels, "value": s.value}
                    for s in family.samples],
    })
print(json.dumps(families))
"#;
    super::ensure_prometheus_client();
    let output = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("this test needs python3 with prometheus-client: {e}"));
    assert!(
        output.status.success(),
        "the Prometheus parser refused {} (or python3 -m pip install prometheus-client \
         is missing): {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the parser's JSON")
}

/// Waits until the workers wait for the writer: the count of messages
/// made (from `ctl stats`) stops growing while devices go on sending.
/// False if it kept growing for 10 s.
pub fn workers_stalled(socket: &Path) -> bool {
    let made = || ctl_json(socket, &["stats"])["stats"]["messages_queued"].as_u64();
    let mut last = made();
    poll_until(secs(10), || {
        std::thread::sleep(millis(250));
        let now = made();
        std::mem::replace(&mut last, now) == now
    })
}
