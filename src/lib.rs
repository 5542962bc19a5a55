//! offloadd: watches a results directory and offloads every new, finished file
//! to an S3-compatible bucket, durably and verifiably.
//!
//! # Layout
//!
//! - [`main`](../offloadd/index.html) parses the command line, turns signals
//!   into a stop and reloads, and maps errors to exit codes ([`exit`]).
//! - [`config`]: the YAML file as written (schema, validation, secrets,
//!   `check-config` probes); [`settings`]: what the daemon runs with, built
//!   once from it.
//! - [`daemon`]: `offloadd run`, every task started, joined and reloaded;
//!   [`shutdown`]: the one stop signal.
//! - [`pipeline`]: the flow of a file: detect → queue → schedule → upload →
//!   verify → record → delete (its module docs state the rules).
//! - [`remote`]: buckets: provider presets, the [`remote::store::Store`] seam,
//!   the rust-s3 client, errors, `test-connection`.
//! - [`control`]: the control socket and the CLI commands that use it.
//! - [`observe`]: HTTP (`/healthz`, `/metrics`, `/r/`), metrics, logs, systemd.
//! - [`keys`]: the names of a file (item key, relative path, object key,
//!   public URL); [`statedir`]: the files in state_dir beside the database;
//!   [`failpoint`]: crash points for tests.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod exit;
pub mod failpoint;
pub mod keys;
pub mod observe;
pub mod pipeline;
pub mod remote;
pub mod settings;
pub mod shutdown;
pub mod statedir;
