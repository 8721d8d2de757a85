//! Issue 13 item 11: who may make the daemon write. PROXY_ALLOW and
//! PROXY_MAX_CONNECTIONS_PER_IP refuse at accept, before any message is
//! written, and every refusal is counted by cause in `ctl stats`; the log
//! says so at most once a minute. Peers come from several 127.0.0.0/8
//! addresses (Linux answers for the whole block on loopback).

mod util;

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};

use socket2::{Domain, Socket, Type};
use util::*;

/// A client socket from `source` (port chosen by the kernel) to `daemon`.
fn connect_from(source: &str, daemon: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let source: IpAddr = source.parse().expect("source address");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .expect("bind a loopback source address");
    socket
        .connect_timeout(&daemon.into(), secs(5))
        .expect("connect to the daemon");
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(secs(5)))
        .expect("read timeout");
    stream
}

/// Whether the daemon closed `stream` (EOF or reset) within five seconds.
fn closed_at_once(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !is_timeout(&e),
    }
}

fn local_name(stream: &TcpStream) -> String {
    stream.local_addr().expect("local address").to_string()
}

#[test]
fn peers_outside_proxy_allow_are_closed_unrecorded_and_counted() {
    let daemon = Daemon::start_with_control(&[("PROXY_ALLOW", "127.0.0.2, 127.0.1.0/24")]);
    let mut log = daemon.log();
    let mut refused = connect_from("127.0.0.1", daemon.addr());
    assert!(closed_at_once(&mut refused), "127.0.0.1 is not allowed");
    let mut also_refused = connect_from("127.0.2.1", daemon.addr());
    assert!(
        closed_at_once(&mut also_refused),
        "127.0.2.1 is not allowed"
    );

    let mut allowed = Vec::new();
    for source in ["127.0.0.2", "127.0.1.77"] {
        let stream = connect_from(source, daemon.addr());
        log.wait_ident(&local_name(&stream), secs(5));
        allowed.push(stream);
    }
    log.refresh();
    for stream in [&refused, &also_refused] {
        assert_eq!(
            log.ident_of_peer(&local_name(stream)),
            None,
            "a refused peer costs no message:\n{}",
            log.summary()
        );
    }
    let stats = ctl_json(&daemon.control_socket(), &["stats"]);
    assert_eq!(
        stats["stats"]["refusals"],
        serde_json::json!([2, 0, 0]),
        "{stats}"
    );
    assert_eq!(stats["stats"]["connections_refused"], 2, "{stats}");
    let warned = daemon.log_lines_with("refused a device connection");
    assert_eq!(warned.len(), 1, "one log line a minute at most: {warned:?}");
    assert!(warned[0].contains("not in PROXY_ALLOW"), "{warned:?}");
}

#[test]
fn connections_past_the_per_address_limit_are_refused_and_room_comes_back() {
    let daemon = Daemon::start_with_control(&[("PROXY_MAX_CONNECTIONS_PER_IP", "2")]);
    let mut log = daemon.log();
    let first = connect_from("127.0.0.1", daemon.addr());
    let second = connect_from("127.0.0.1", daemon.addr());
    for stream in [&first, &second] {
        log.wait_ident(&local_name(stream), secs(5));
    }
    let mut third = connect_from("127.0.0.1", daemon.addr());
    assert!(
        closed_at_once(&mut third),
        "a third connection from 127.0.0.1"
    );
    let other = connect_from("127.0.0.3", daemon.addr());
    log.wait_ident(&local_name(&other), secs(5));

    drop(first);
    log.wait_for(secs(5), "the first device's event 2", |log| {
        log.lines().iter().any(|m| event(m) == 2 && source(m) == 0)
    });
    let fourth = connect_from("127.0.0.1", daemon.addr());
    let fourth_ident = log.wait_ident(&local_name(&fourth), secs(5));
    log.refresh();
    assert!(
        log.dropped(&fourth_ident, 0).is_none(),
        "room again after one left"
    );
    assert_eq!(
        log.ident_of_peer(&local_name(&third)),
        None,
        "{}",
        log.summary()
    );
    let stats = ctl_json(&daemon.control_socket(), &["stats"]);
    assert_eq!(
        stats["stats"]["refusals"],
        serde_json::json!([0, 0, 1]),
        "{stats}"
    );
    drop((second, other, fourth));
    daemon.assert_no_errors();
}

#[test]
fn zero_per_address_means_no_limit() {
    let daemon = Daemon::start(&[("PROXY_MAX_CONNECTIONS_PER_IP", "0")]);
    let mut log = daemon.log();
    let streams: Vec<TcpStream> = (0..20)
        .map(|_| connect_from("127.0.0.1", daemon.addr()))
        .collect();
    for stream in &streams {
        let ident = log.wait_ident(&local_name(stream), secs(5));
        assert!(log.dropped(&ident, 0).is_none());
    }
}
