//! `test-connection`: put a tiny probe object under the prefix, read it back,
//! compare, delete it, and diagnose the first failure in one sentence.
//!
//! STUB: filled in by the providers work.

use crate::config::Config;
use crate::storage::Client;
use serde::{Deserialize, Serialize};
use std::process::ExitCode;

/// The outcome of a probe, step by step.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {}

impl Report {
    pub fn render(&self) -> String {
        String::new()
    }
    pub fn passed(&self) -> bool {
        false
    }
}

/// Probes one provider.
pub async fn run(_client: &Client) -> Report {
    Report {}
}

/// Runs the probe for `provider` (default: the active one) from the CLI.
pub fn command(_config: &Config, _provider: Option<&str>) -> ExitCode {
    eprintln!("offloadd: test-connection is not available yet");
    ExitCode::from(2)
}
