//! offloadd: watches a results directory and offloads every new, finished file
//! to an S3-compatible bucket, durably and verifiably.
//!
//! The data flows through the modules in this order:
//! [`watcher`] → [`state`] (durable queue) → [`pipeline`] (workers) →
//! [`upload`] (via [`storage`]) → [`verify`] → [`state`] (location records).

pub mod backoff;
pub mod budget;
pub mod cli;
pub mod config;
pub mod connection_test;
pub mod control;
pub mod daemon;
pub mod failpoint;
pub mod http;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod preflight;
pub mod provider;
pub mod rebuild;
pub mod state;
pub mod status;
pub mod storage;
pub mod systemd;
pub mod units;
pub mod upload;
pub mod verify;
pub mod watcher;
