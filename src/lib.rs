//! proxy-channel: a self-hosted raw TCP proxy channel.
//!
//! Devices connect; their bytes go to up to three target servers, the
//! targets' replies come back, and every connect, disconnect and packet is
//! recorded as a JSON line in rotated files.
//!
//! Threads and how data flows:
//! - the **acceptor** ([`acceptor`]) accepts device sockets, names each with
//!   an ident and hands it to a **worker** in turn, over the worker's command
//!   channel and its poll waker;
//! - each **worker** ([`worker`]) runs one mio poll loop over its
//!   connections; a [`connection`] (the device socket and its target
//!   sockets, see [`socket`]) lives on one worker for its whole life;
//! - workers (and the acceptor) turn events into JSON lines with their
//!   [`journal`] and push batches of lines onto one bounded channel;
//! - the **writer** ([`store`]) drains that channel into
//!   `messages.jsonl`, rotating and pruning files ([`rotation`]); a
//!   **syncer** thread of its own fsyncs each rotated file meanwhile;
//! - the **control** thread ([`control`]) serves `proxy-channel ctl` on a
//!   Unix socket and writes the [`metrics`] file, from the per-thread
//!   [`stats`] counters;
//! - a **resolver** thread per target host name ([`resolver`]) keeps its
//!   address fresh so that workers never wait on DNS;
//! - the main thread ([`daemon`]) starts all of this, then waits for
//!   signals: SIGHUP rotates, SIGTERM/SIGINT shut down.
//!
//! The tools read the message files back ([`reader`], [`filter`]): the
//! traffic [`viewer`] and [`replay`]; [`cli`] parses their command lines.
#![deny(rust_2018_idioms)]

pub mod acceptor;
pub mod cli;
pub mod config;
pub mod connection;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod filter;
pub mod journal;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod proxy_header;
pub mod reader;
pub mod reason;
pub mod replay;
pub mod resolver;
pub mod rotation;
pub mod socket;
pub mod stats;
pub mod store;
pub mod units;
pub mod viewer;
pub mod worker;
