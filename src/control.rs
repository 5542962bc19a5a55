//! The local control API and the commands that change state: retry, delete,
//! backfill.
//!
//! STUB: filled in by the control work.

use crate::config::Config;
use std::process::ExitCode;

pub fn retry(_config: &Config, _rel: Option<&str>, _all: bool) -> ExitCode {
    eprintln!("offloadd: retry is not available yet");
    ExitCode::from(2)
}

pub fn delete(_config: &Config, _rel: &str) -> ExitCode {
    eprintln!("offloadd: delete is not available yet");
    ExitCode::from(2)
}

pub fn backfill(_config: &Config, _dry_run: bool) -> ExitCode {
    eprintln!("offloadd: backfill is not available yet");
    ExitCode::from(2)
}
