//! `proxy-channel ctl`: the client of the control socket.
//!
//! Sends one request line, reads one reply line (both of
//! [`protocol`](super::protocol)), and prints it as a table (or unchanged
//! with `--json`). A daemon that is not running, or a socket this user may
//! not open, is a clear one-line error.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::control::protocol::{ClosedDeviceReply, ListReply, Reply, ReplyError, StatsReply};
use crate::control::stats::{DropKind, Refusal, UdpDrop, UdpSnapshot};

pub use crate::control::protocol::Request;

#[derive(Debug, Clone)]
pub struct CtlOptions {
    pub socket: PathBuf,
    pub request: Request,
    pub json: bool,
}

/// Why `ctl` failed, in one line.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(
        "cannot reach the daemon at {path}: {source} (is it running, and is PROXY_CONTROL_SOCKET the same?)"
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the daemon failed: {0}")]
    Io(#[from] io::Error),
    #[error("the daemon answered something unexpected: {0}")]
    Reply(String),
    #[error("{0}")]
    Refused(String),
}

/// Sends the request and prints the answer on `out`.
pub fn run(options: &CtlOptions, out: &mut dyn Write) -> Result<(), CtlError> {
    let line = ask(options)?;
    let reply = Reply::parse(&options.request, &line)?;
    if options.json {
        writeln!(out, "{}", line.trim_end())?;
        return Ok(());
    }
    match reply {
        Reply::List(list) => print_list(&list, out),
        Reply::Stats(stats) => print_stats(&stats, out),
        Reply::Closed(closed) => Ok(writeln!(out, "closed {}", closed.closed)?),
        Reply::ClosedDevice(closed) => print_closed(&closed, out),
        Reply::Refused(why) => Err(CtlError::Refused(why)),
    }
}

impl From<ReplyError> for CtlError {
    fn from(error: ReplyError) -> CtlError {
        match error {
            ReplyError::Unreadable(why) => CtlError::Reply(why),
            ReplyError::Refused(why) => CtlError::Refused(why),
        }
    }
}

fn ask(options: &CtlOptions) -> Result<String, CtlError> {
    let stream = UnixStream::connect(&options.socket).map_err(|source| CtlError::Connect {
        path: options.socket.clone(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = &stream;
    writer.write_all(options.request.to_line().as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(CtlError::Reply("no answer".into()));
    }
    Ok(reply)
}

fn print_list(list: &ListReply, out: &mut dyn Write) -> Result<(), CtlError> {
    let connections = &list.connections;
    writeln!(
        out,
        "{:<16}  {:<22}  {:>9}  {:>8}  {:>12}  {:>12}  {:<15}  targets",
        "ident", "peer", "age", "idle", "received", "sent", "device"
    )?;
    for c in connections {
        let targets: Vec<String> = c
            .targets
            .iter()
            .map(|t| {
                format!(
                    "{}:{} queued {} in {} out {}",
                    t.target, t.state, t.queued, t.bytes_received, t.bytes_sent
                )
            })
            .collect();
        // A UDP session's peer reads `ip:port/udp`, as services name ports.
        let peer = match &c.transport {
            Some(transport) => format!("{}/{transport}", c.peer),
            None => c.peer.clone(),
        };
        // Not recognised (yet): `-`, so the columns stay in place.
        let device = c.device.as_deref().unwrap_or("-");
        writeln!(
            out,
            "{:<16}  {:<22}  {:>8.1}s  {:>7.1}s  {:>12}  {:>12}  {:<15}  {}",
            c.ident,
            peer,
            c.age_seconds,
            c.idle_seconds,
            c.bytes_received,
            c.bytes_sent,
            device,
            targets.join(", ")
        )?;
    }
    writeln!(out, "{} connections", connections.len())?;
    Ok(())
}

fn print_stats(reply: &StatsReply, out: &mut dyn Write) -> Result<(), CtlError> {
    let s = &reply.stats;
    writeln!(out, "connections open       {}", s.connections_open)?;
    writeln!(out, "connections total      {}", s.connections_total)?;
    writeln!(out, "connections refused    {}", s.connections_refused)?;
    let causes: Vec<String> = Refusal::ALL
        .iter()
        .zip(s.refusals)
        .map(|(cause, n)| format!("{} {n}", cause.label()))
        .collect();
    writeln!(out, "refused by cause       {}", causes.join(", "))?;
    let sides = s.bytes_received.len();
    let targets = reply.targets.iter().map(|&n| usize::from(n));
    let targets = targets.filter(|&side| (1..sides).contains(&side));
    for side in std::iter::once(0).chain(targets) {
        let name = match side {
            0 => "device".to_string(),
            n => format!("target {n}"),
        };
        writeln!(
            out,
            "{name:<9} received {} B in {} packets, sent {} B",
            s.bytes_received[side], s.packets[side], s.bytes_sent[side]
        )?;
        let drops: Vec<String> = DropKind::ALL
            .iter()
            .zip(s.drops[side])
            .filter(|(_, n)| *n > 0)
            .map(|(kind, n)| format!("{} {n}", kind.label()))
            .collect();
        if !drops.is_empty() {
            writeln!(out, "{name:<9} dropped: {}", drops.join(", "))?;
        }
        let catch_up = s.catch_up[side];
        if catch_up.enabled {
            writeln!(
                out,
                "{name:<9} catch-up backlog {} connections ({} B), delivered {} connections ({} B)",
                catch_up.backlog_connections,
                catch_up.backlog_bytes,
                catch_up.delivered_connections,
                catch_up.delivered_bytes
            )?;
        }
    }
    writeln!(out, "messages made          {}", s.messages_queued)?;
    writeln!(out, "messages written       {}", s.messages_written)?;
    writeln!(out, "writer queue depth     {}", s.writer_queue_depth)?;
    writeln!(out, "write errors           {}", s.write_errors)?;
    match &s.udp {
        Some(udp) => print_udp_stats(udp, out),
        None => Ok(()),
    }
}

fn print_udp_stats(s: &UdpSnapshot, out: &mut dyn Write) -> Result<(), CtlError> {
    writeln!(
        out,
        "udp sessions           {} open, {} total",
        s.sessions_open, s.sessions_total
    )?;
    writeln!(
        out,
        "udp datagrams          {} received, {} sent",
        s.datagrams_received, s.datagrams_sent
    )?;
    let drops: Vec<String> = UdpDrop::ALL
        .iter()
        .zip(s.drops)
        .map(|(cause, n)| format!("{} {n}", cause.label()))
        .collect();
    writeln!(out, "udp dropped by cause   {}", drops.join(", "))?;
    Ok(())
}

fn print_closed(closed: &ClosedDeviceReply, out: &mut dyn Write) -> Result<(), CtlError> {
    for ident in &closed.closed {
        writeln!(out, "closed {ident}")?;
    }
    Ok(())
}
