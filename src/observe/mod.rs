//! How ops see the daemon: the HTTP listener ([`http`]: `/healthz`,
//! `/metrics`, `/r/`), Prometheus [`metrics`], [`logging`] (text, JSON,
//! journald) and [`systemd`] notifications and the watchdog.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod systemd;
