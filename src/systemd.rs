//! systemd integration: sd_notify READY/STATUS/STOPPING/RELOADING and watchdog
//! pings. Every call is a no-op when not started by systemd.
//!
//! STUB: filled in by the operations work.

pub fn ready() {}
pub fn status(_line: &str) {}
pub fn stopping() {}
pub fn reloading() {}
