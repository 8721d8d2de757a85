//! `scripts/demo.sh`, the README's first look at the product, keeps
//! working: run with the built binary, it must show the tracker's ACKs,
//! both targets' copies of its lines, the recorded traffic and a clean stop.

mod util;

use std::process::Command;

use util::*;

#[test]
fn the_demo_runs_end_to_end() {
    let mut command = Command::new("bash");
    command
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .env("PROXY_CHANNEL_BIN", env!("CARGO_BIN_EXE_proxy-channel"));
    let finished = run_command_to_exit(command, "scripts/demo.sh", secs(60));
    let out = &finished.stdout;
    assert!(
        finished.status.success(),
        "demo.sh failed: {}\nstdout:\n{out}\nstderr:\n{}",
        finished.status,
        finished.stderr
    );
    let line = "$GPRMC,101502.00,A,5231.0020,N,01323.0040,E,4.3,90.0,261126,,,A*62";
    for expected in [
        "device received: ACK 1",
        "device received: ACK 3",
        "device: connection closed by the daemon after the targets closed",
        "connections total      1",
        "messages written       12",
        "device>    disconnected: closed by peer (received 203 B, sent 21 B)",
        "|ACK 3..|",
        &format!("{line}\\r\\n"),
        "proxy_channel::daemon] stopped",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
    // Each target got the three lines, in order (target 2 too, though it
    // is non-mandatory and its replies are off).
    let copies = out.matches(&format!("    {line}\r\n")).count();
    assert_eq!(copies, 2, "both targets show the last line:\n{out}");
}
