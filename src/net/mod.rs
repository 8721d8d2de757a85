//! The network side: from an accepted device socket to its target sockets.
//!
//! The [`acceptor`] accepts device sockets (refusing over the [`limits`]) and
//! hands each to a [`worker`]; a worker's poll loop drives each
//! [`connection`]: the device and its targets, each a non-blocking
//! [`socket`] with a bounded queue. [`proxy_header`] reads and writes HAProxy
//! PROXY protocol headers, the [`resolver`] keeps target host names fresh
//! off the workers, [`side`] names a connection's sides (the device, target
//! n) and [`reason`] says why a side was dropped. [`devices`] holds what
//! the workers share about devices: detectors, device lists, and who has a
//! connection open. [`udp`] holds the UDP
//! devices' sessions, which live on the workers too.

pub(crate) mod acceptor;
pub mod admission;
pub(crate) mod allow;
pub mod connection;
pub(crate) mod devices;
pub mod limits;
pub mod proxy_header;
pub mod reason;
pub(crate) mod resolver;
pub mod side;
pub(crate) mod socket;
pub(crate) mod udp;
pub mod worker;
