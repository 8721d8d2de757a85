//! Listening addresses: the example of the PROXY_LISTEN hint,
//! `0.0.0.0:PORT,[::]:PORT`, starts, because an IPv6 address listens on
//! IPv6 only. Here with 127.0.0.1 for IPv4, so that IPv4 stays on loopback.

mod util;

use std::net::{SocketAddr, TcpListener};

use util::*;

/// A port free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

#[test]
fn an_ipv6_wildcard_and_ipv4_on_the_same_port_both_listen() {
    if let Err(e) = TcpListener::bind("[::1]:0") {
        panic!("this machine has no usable IPv6 loopback (::1: {e}); this test cannot run here");
    }
    let target = Target::start(Behaviour::Record);
    let port = free_port();
    let listen = format!("127.0.0.1:{port},[::]:{port}");
    let mut daemon = Daemon::start(&[
        ("PROXY_LISTEN", listen.as_str()),
        ("PROXY_TARGET1", target.address().as_str()),
    ]);
    daemon.wait_log(&format!("listening on [::]:{port}"), 1, secs(5));

    let addresses: [SocketAddr; 2] = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ];
    for (index, address) in addresses.into_iter().enumerate() {
        let mut device = Device::connect(address);
        let bytes = format!("hello over {address}").into_bytes();
        device.send(&bytes);
        let conn = &target.wait_connections(index + 1, secs(5))[index];
        conn.wait_received(bytes.len(), secs(5));
        assert_same_bytes(
            &format!("what the target got from {address}"),
            &bytes,
            &conn.received(),
        );
    }
    daemon.stop();
}
