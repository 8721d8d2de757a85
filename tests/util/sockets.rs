//! Socket options the tests need, and a loopback port that refuses.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn set_int_option(fd: i32, level: i32, name: i32, value: i32) {
    // SAFETY: `fd` is an open socket owned by the caller and the option value
    // is a plain c_int whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast::<libc::c_void>(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt({level}, {name}, {value}) failed");
}

/// Caps a socket's kernel receive buffer (and turns off its autotuning), so
/// that a target which does not read fills up after a few KiB, not after the
/// tens of MiB Linux may otherwise grant. Set on a listener, accepted
/// sockets inherit it.
pub fn small_receive_buffer(fd: &impl AsRawFd) {
    set_int_option(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 16 * 1024);
}

/// A loopback port that is bound but not listening: connecting to it is
/// refused, and as long as this value lives no other socket (another test's
/// listener) can take the port. Closed on drop.
pub struct RefusedPort {
    _socket: OwnedFd,
    addr: SocketAddr,
}

impl RefusedPort {
    pub fn new() -> RefusedPort {
        // SAFETY: plain socket(2)/bind(2)/getsockname(2) calls on a socket we
        // own; the sockaddr structs are initialised and their sizes passed.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket() failed: {}", io::Error::last_os_error());
            let socket = OwnedFd::from_raw_fd(fd);
            let mut address: libc::sockaddr_in = std::mem::zeroed();
            address.sin_family = libc::AF_INET as libc::sa_family_t;
            address.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
            let mut length = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let raw = (&mut address as *mut libc::sockaddr_in).cast::<libc::sockaddr>();
            assert_eq!(
                libc::bind(fd, raw, length),
                0,
                "bind() failed: {}",
                io::Error::last_os_error()
            );
            assert_eq!(
                libc::getsockname(fd, raw, &mut length),
                0,
                "getsockname() failed: {}",
                io::Error::last_os_error()
            );
            let port = u16::from_be(address.sin_port);
            RefusedPort {
                _socket: socket,
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            }
        }
    }

    /// The `host:port` to configure as a target.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }
}

impl Default for RefusedPort {
    fn default() -> Self {
        RefusedPort::new()
    }
}
