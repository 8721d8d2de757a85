//! proxy-channel: a self-hosted raw TCP proxy channel.
//!
//! Devices connect; their bytes go to up to three target servers, the
//! targets' replies come back, and every connect, disconnect and packet is
//! recorded as a JSON line in rotated files.
//!
//! The folders follow a packet: [`net`] (accept, worker, connection,
//! sockets), [`store`] (message, journal, writer, rotation), [`control`]
//! (the control socket, stats and metrics) and [`tools`] (viewer, replay).
//!
//! Threads and how data flows:
//! - the **acceptor** ([`net::acceptor`]) accepts device sockets, names each
//!   with an ident and hands it to a **worker** in turn, over the worker's
//!   command channel and its poll waker;
//! - each **worker** ([`net::worker`]) runs one mio poll loop over its
//!   connections; a [`net::connection`] (the device socket and its target
//!   sockets, see [`net::socket`]) lives on one worker for its whole life,
//!   and so does a UDP device's session ([`net::udp`]: each worker has its
//!   own socket on every PROXY_LISTEN_UDP address);
//! - workers (and the acceptor) turn events into JSON lines with their
//!   [`store::journal`] and push batches of lines onto one bounded channel;
//! - the **writer** ([`store::writer`]) drains that channel into
//!   `messages.jsonl`, rotating and pruning files ([`store::rotation`]); a
//!   **syncer** thread of its own fsyncs each rotated file meanwhile;
//! - the **control** thread ([`control::server`]) serves `proxy-channel ctl`
//!   on a Unix socket and writes the [`control::metrics`] file, from the
//!   per-thread [`control::stats`] counters;
//! - a **resolver** thread per target host name ([`net::resolver`]) keeps
//!   its address fresh so that workers never wait on DNS;
//! - a **catch-up** thread per target with PROXY_TARGETn_CATCH_UP
//!   ([`catchup`]) reads the message files back and delivers to its target
//!   what it missed while it was down, over connections of its own;
//! - the main thread ([`daemon`]) starts all of this, then waits for
//!   signals: SIGHUP rotates, SIGTERM/SIGINT shut down.
//!
//! The tools read the message files back ([`tools::reader`],
//! [`tools::filter`]): the traffic [`tools::viewer`] and [`tools::replay`];
//! [`cli`] parses their command lines.
#![deny(rust_2018_idioms)]
// The overview above and the folders' docs link internal modules: they are
// for maintainers, built with `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod catchup;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod net;
pub mod store;
pub mod tools;
pub(crate) mod units;
