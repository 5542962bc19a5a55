//! `test-connection`: put a tiny probe object under the prefix, read it back,
//! compare, delete it, and diagnose the first failure in one sentence.
//!
//! STUB: filled in by the providers work.

use crate::config::Config;
use std::process::ExitCode;

/// Runs the probe for `provider` (default: the active one) from the CLI.
pub fn command(_config: &Config, _provider: Option<&str>) -> ExitCode {
    eprintln!("offloadd: test-connection is not available yet");
    ExitCode::from(2)
}
