//! The commands ops run against a daemon: `status`, `locate`, `retry`,
//! `delete`, `backfill`, `test-connection`.
//!
//! - [`protocol`]: the socket's request and reply lines;
//! - [`server`]: the daemon side (peer-credential checked), changes go through
//!   the scheduler;
//! - [`client`]: the CLI side, over the socket or on a stopped daemon's state;
//! - [`commands`]: what each command does against an open state;
//! - [`owner`]: a command run as root on a stopped daemon's state works as
//!   the state's owner;
//! - [`status`]: the status report and `locate`'s answer.

pub mod client;
pub mod commands;
pub mod owner;
pub mod protocol;
pub mod server;
pub mod status;
