//! The listening UDP sockets, and datagrams with their addresses.
//!
//! Every worker binds its own socket on each PROXY_LISTEN_UDP address with
//! SO_REUSEPORT; the kernel hashes a device's address to one socket of the
//! group, always the same one while the group is unchanged, so a device's
//! session lives on one worker.
//!
//! Datagrams are read with `recvmsg` for two things a plain `recv_from`
//! does not give: the kernel's count of datagrams lost in the socket's
//! full receive buffer (SO_RXQ_OVFL), so that every loss is counted; and,
//! on a socket bound to a wildcard address (`0.0.0.0`, `[::]`), the local
//! address the device sent to (IP_PKTINFO / IPV6_RECVPKTINFO), so that a
//! reply leaves from that very address on a host with several (a device,
//! or a NAT in front of it, drops replies from another address).
//!
//! Invariant: the `unsafe` blocks here only pass buffers that outlive the
//! call, sized as the kernel is told, and read control messages within the
//! control buffer the kernel filled (the CMSG_* walk checks the bounds).

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use mio::net::UdpSocket;
use socket2::{Domain, Protocol, Socket, Type};

/// The receive buffer asked for on each listening socket: room for a
/// burst of about 4,000 small datagrams while the worker is busy (the
/// kernel caps it at net.core.rmem_max; the start-up log says so).
pub const RECEIVE_BUFFER: usize = 4 << 20;

/// SO_MEMINFO (Linux 4.12): the socket's memory counters, its drops among
/// them. Not in the libc crate for Linux yet; the asm-generic value.
#[cfg(not(target_arch = "sparc64"))]
const SO_MEMINFO: libc::c_int = 55;
#[cfg(target_arch = "sparc64")]
const SO_MEMINFO: libc::c_int = 0x39;

/// A listening socket of one worker.
pub struct Listener {
    pub socket: UdpSocket,
    /// Bound to a wildcard address: replies carry the address each device
    /// sent to.
    pub wildcard: bool,
    /// The kernel's last seen count of datagrams dropped on it.
    overflow_seen: u32,
}

impl Listener {
    /// Takes in the kernel's count of datagrams dropped on this socket (from
    /// a datagram's SO_RXQ_OVFL, or [`Listener::read_drops`]); returns how
    /// many are new. A datagram's count may be older than one read since
    /// (it was taken when the datagram was queued): never counted backwards.
    pub fn note_drops(&mut self, count: u32) -> u64 {
        let new = count.wrapping_sub(self.overflow_seen);
        if new == 0 || new > u32::MAX / 2 {
            return 0;
        }
        self.overflow_seen = count;
        u64::from(new)
    }

    /// The kernel's count of datagrams dropped on this socket so far, read
    /// directly: drops at the end of a burst come with no later datagram.
    pub fn read_drops(&self) -> io::Result<u32> {
        let mut info = [0u32; 16];
        let mut len = mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `info`.
        let rc = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_MEMINFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let index = libc::SK_MEMINFO_DROPS as usize;
        match rc {
            0 if (len as usize) > index * 4 => Ok(info[index]),
            0 => Err(io::Error::other("SO_MEMINFO without a drop count")),
            _ => Err(io::Error::last_os_error()),
        }
    }
}

/// The local address a device sent its datagram to (wildcard sockets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalAddress {
    pub ip: IpAddr,
    /// The interface it came in on (needed for IPv6 link-local addresses).
    pub interface: u32,
}

/// One datagram read from a listening socket.
#[derive(Debug)]
pub struct Arrival {
    pub len: usize,
    pub peer: SocketAddr,
    pub local: Option<LocalAddress>,
    /// The kernel's count of datagrams dropped on this socket so far, when
    /// it has dropped any.
    pub dropped: Option<u32>,
}

/// Binds one socket on `address` for every worker, all on the same port
/// (a free one, when `address` asks for port 0).
///
/// SO_REUSEPORT would let a second daemon of the same user join the group
/// and silently take part of the devices; so the port is first bound once
/// without it, which fails while any socket holds the port (`address in
/// use`, as for TCP), and released just before the group binds it.
pub fn bind_group(address: SocketAddr, workers: usize) -> io::Result<Vec<Listener>> {
    let probe = new_socket(address)?;
    probe.bind(&address.into())?;
    let bound = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound to a non-IP address"))?;
    drop(probe);
    (0..workers).map(|_| bind_one(bound)).collect()
}

/// A UDP socket for `address`; an IPv6 one takes IPv6 only (as the TCP
/// listeners do), so that `0.0.0.0:p,[::]:p` can both be bound.
fn new_socket(address: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// The receive buffer the kernel actually gave (twice what it counts as
/// payload room), to warn when net.core.rmem_max cut it short.
pub fn receive_buffer(listener: &Listener) -> io::Result<usize> {
    get_int_option(
        listener.socket.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
    )
    .map(|size| usize::try_from(size).unwrap_or(0))
}

fn bind_one(address: SocketAddr) -> io::Result<Listener> {
    let socket = new_socket(address)?;
    let fd = socket.as_raw_fd();
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)?;
    let wildcard = address.ip().is_unspecified();
    if wildcard {
        match address {
            SocketAddr::V4(_) => set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?,
            SocketAddr::V6(_) => set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?,
        }
    }
    socket.set_recv_buffer_size(RECEIVE_BUFFER)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    Ok(Listener {
        socket: UdpSocket::from_std(socket.into()),
        wildcard,
        overflow_seen: 0,
    })
}

fn set_int_option(fd: RawFd, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a c_int that lives through the call, and
    // its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn get_int_option(fd: RawFd, level: i32, name: i32) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
    match rc {
        0 => Ok(value),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Room for the control messages asked for (a drop count and a packet
/// info), aligned as `cmsghdr` needs.
#[repr(C, align(8))]
struct ControlBuffer([u8; 128]);

/// Reads one datagram into `buffer`.
pub fn receive(socket: &UdpSocket, buffer: &mut [u8]) -> io::Result<Arrival> {
    let mut name = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut control = ControlBuffer([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut header: libc::msghdr = unsafe { mem::zeroed() };
    header.msg_name = name.as_mut_ptr().cast();
    header.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = control.0.len() as _;
    // SAFETY: every pointer in `header` points at a live buffer of the
    // length given beside it.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut header, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recvmsg filled in `msg_namelen` bytes of the (zeroed) name.
    let peer = socket_address(unsafe { name.assume_init_ref() })?;
    let mut arrival = Arrival {
        len: n as usize,
        peer,
        local: None,
        dropped: None,
    };
    read_control_messages(&header, &mut arrival);
    Ok(arrival)
}

fn read_control_messages(header: &libc::msghdr, arrival: &mut Arrival) {
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled,
    // within `msg_controllen`; each payload is read unaligned as the type
    // its level and type say it is.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(header);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                    arrival.dropped = Some(data.cast::<u32>().read_unaligned());
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = data.cast::<libc::in_pktinfo>().read_unaligned();
                    // ipi_spec_dst: the address the datagram was sent to,
                    // or for a broadcast one, the address to answer from.
                    arrival.local = Some(LocalAddress {
                        ip: IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr))),
                        interface: 0,
                    });
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = data.cast::<libc::in6_pktinfo>().read_unaligned();
                    arrival.local = Some(LocalAddress {
                        ip: IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)),
                        interface: info.ipi6_ifindex,
                    });
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
}

fn socket_address(storage: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4 =
                unsafe { *(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6 =
                unsafe { *(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(v6.sin6_addr.s6_addr),
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        family => Err(io::Error::other(format!(
            "a datagram from address family {family}"
        ))),
    }
}

/// Sends `payload` to `to` from the listening socket; from `from` when the
/// socket is bound to a wildcard address and the device's datagram said
/// which address it went to.
pub fn send(
    socket: &UdpSocket,
    payload: &[u8],
    to: SocketAddr,
    from: Option<LocalAddress>,
) -> io::Result<usize> {
    let Some(from) = from else {
        return socket.send_to(payload, to);
    };
    let to = socket2::SockAddr::from(to);
    let mut control = ControlBuffer([0; 128]);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut header: libc::msghdr = unsafe { mem::zeroed() };
    header.msg_name = to.as_ptr().cast_mut().cast();
    header.msg_namelen = to.len();
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = control.0.len() as _;
    // SAFETY: the control buffer is large enough for one packet-info
    // message (CMSG_SPACE of the larger, in6_pktinfo, is 40 bytes); the
    // message is written within it, and `msg_controllen` is then cut to
    // its size. The kernel only reads through the pointers.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        let data = libc::CMSG_DATA(cmsg);
        let size = match from.ip {
            IpAddr::V4(ip) => {
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                data.cast::<libc::in_pktinfo>().write_unaligned(info);
                mem::size_of::<libc::in_pktinfo>()
            }
            IpAddr::V6(ip) => {
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: from.interface,
                };
                data.cast::<libc::in6_pktinfo>().write_unaligned(info);
                mem::size_of::<libc::in6_pktinfo>()
            }
        };
        (*cmsg).cmsg_len = libc::CMSG_LEN(size as u32) as _;
        header.msg_controllen = libc::CMSG_SPACE(size as u32) as _;
        libc::sendmsg(socket.as_raw_fd(), &header, 0)
    };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n => Ok(n as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_port(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 0)
    }

    fn receive_within(listener: &Listener, buffer: &mut [u8]) -> Arrival {
        for _ in 0..500 {
            match receive(&listener.socket, buffer) {
                Ok(arrival) => return arrival,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(2))
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
        panic!("no datagram within a second");
    }

    #[test]
    fn a_group_shares_one_port() {
        let group = bind_group(any_port("127.0.0.1"), 3).unwrap();
        let ports: Vec<u16> = group
            .iter()
            .map(|l| l.socket.local_addr().unwrap().port())
            .collect();
        assert!(ports.iter().all(|&p| p == ports[0] && p != 0), "{ports:?}");
    }

    #[test]
    fn a_port_in_use_is_refused_even_to_another_group() {
        let group = bind_group(any_port("127.0.0.1"), 2).unwrap();
        let taken = group[0].socket.local_addr().unwrap();
        let again = bind_group(taken, 2).err().expect("the port is taken");
        assert_eq!(again.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn ipv4_and_ipv6_wildcards_share_a_port() {
        let v4 = bind_group(any_port("0.0.0.0"), 2).unwrap();
        let port = v4[0].socket.local_addr().unwrap().port();
        let v6 = bind_group(SocketAddr::new("::".parse().unwrap(), port), 2);
        // A host without IPv6 cannot bind [::] at all; that is no failure here.
        if let Err(e) = &v6 {
            assert_ne!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        }
    }

    #[test]
    fn a_wildcard_socket_learns_the_address_sent_to_and_answers_from_it() {
        let group = bind_group(any_port("0.0.0.0"), 1).unwrap();
        let listener = &group[0];
        let port = listener.socket.local_addr().unwrap().port();
        let device = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // 127.0.0.2 is a local address too: the reply must come from it.
        device.send_to(b"hello", ("127.0.0.2", port)).unwrap();
        let mut buffer = [0u8; 64];
        let arrival = receive_within(listener, &mut buffer);
        assert_eq!(&buffer[..arrival.len], b"hello");
        assert_eq!(arrival.peer, device.local_addr().unwrap());
        let local = arrival.local.expect("packet info on a wildcard socket");
        assert_eq!(local.ip, "127.0.0.2".parse::<IpAddr>().unwrap());
        send(&listener.socket, b"back", arrival.peer, Some(local)).unwrap();
        device
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let (n, from) = device.recv_from(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"back");
        assert_eq!(from, SocketAddr::new(local.ip, port));
    }

    #[test]
    fn a_full_receive_buffer_reports_its_drops_once() {
        let mut group = bind_group(any_port("127.0.0.1"), 1).unwrap();
        let listener = &mut group[0];
        let to = listener.socket.local_addr().unwrap();
        let device = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Far more than the buffer holds, never read meanwhile.
        let capacity = receive_buffer(listener).unwrap();
        let sent = capacity / 64 + 10_000;
        for _ in 0..sent {
            // A send refused for a full send buffer is no loss to count.
            let _ = device.send_to(b"x", to);
        }
        let dropped = listener.read_drops().unwrap();
        assert!(dropped > 0, "no drop counted");
        assert_eq!(listener.note_drops(dropped), u64::from(dropped));
        let mut buffer = [0u8; 64];
        for _ in 0..sent {
            if receive(&listener.socket, &mut buffer).is_err() {
                break;
            }
        }
        // The count comes again with the first datagram queued after the
        // drops, and is not counted twice.
        device.send_to(b"after", to).unwrap();
        let arrival = receive_within(listener, &mut buffer);
        assert_eq!(&buffer[..arrival.len], b"after");
        assert_eq!(arrival.dropped, Some(dropped));
        assert_eq!(listener.note_drops(dropped), 0);
        assert_eq!(listener.note_drops(dropped - 1), 0, "never backwards");
        assert_eq!(listener.note_drops(dropped + 2), 2);
    }
}
