//! Talking to a running daemon: the control socket's [`server`] thread and
//! its [`client`] (`proxy-channel ctl`), which speak the [`protocol`]; the
//! per-thread [`stats`] counters they report, and the Prometheus
//! [`metrics`] file written from them.

pub mod client;
pub(crate) mod metrics;
pub mod protocol;
pub(crate) mod server;
pub mod stats;
