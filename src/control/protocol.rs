//! The control socket's wire format: one JSON line from the CLI, a
//! [`Request`] in an [`Envelope`] naming the instance it is meant for, and
//! one JSON [`Reply`] line back.

use serde::{Deserialize, Serialize};
use std::process::ExitCode;

/// The largest request line the daemon reads (backfill sends paths in batches).
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024 * 1024;

/// One request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status {
        json: bool,
    },
    Locate {
        path: String,
    },
    Retry {
        path: Option<String>,
        all: bool,
    },
    Delete {
        path: String,
    },
    /// Backfill: queue these paths (raw bytes, relative to the root) regardless
    /// of the managed-since mark.
    Enqueue {
        keys: Vec<Vec<u8>>,
        dry_run: bool,
    },
    TestConnection {
        provider: Option<String>,
    },
}

impl Request {
    /// What it is called in a log line; `Some` only for a request that
    /// changes something (a delete-through, a retry, a backfill that is no
    /// dry run), whose outcome is logged if its caller is gone.
    pub fn changes(&self) -> Option<&'static str> {
        match self {
            Request::Delete { .. } => Some("delete"),
            Request::Retry { .. } => Some("retry"),
            Request::Enqueue { dry_run: false, .. } => Some("backfill"),
            Request::Enqueue { dry_run: true, .. }
            | Request::Status { .. }
            | Request::Locate { .. }
            | Request::TestConnection { .. } => None,
        }
    }

    /// How long the CLI waits for the answer: a delete-through, a backfill
    /// batch and a connection test talk to the bucket meanwhile.
    pub fn patience(&self) -> std::time::Duration {
        match self {
            Request::Status { .. } | Request::Locate { .. } | Request::Retry { .. } => {
                std::time::Duration::from_secs(60)
            }
            Request::Delete { .. } | Request::Enqueue { .. } | Request::TestConnection { .. } => {
                std::time::Duration::from_secs(600)
            }
        }
    }
}

/// A request and the instance it is meant for: the `state_dir` of the config
/// the CLI read. A daemon of another instance that answers on the same
/// socket path refuses it rather than act on its own files.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<R = Request> {
    pub state_dir: std::path::PathBuf,
    #[serde(flatten)]
    pub request: R,
}

/// What the CLI prints and its exit code.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub exit: u8,
    pub out: String,
    pub err: String,
}

impl Reply {
    pub fn ok(out: String) -> Reply {
        Reply {
            exit: 0,
            out,
            err: String::new(),
        }
    }

    pub fn fail(exit: u8, err: String) -> Reply {
        Reply {
            exit,
            out: String::new(),
            err,
        }
    }

    /// Prints the reply and turns it into the process exit code.
    pub fn finish(self) -> ExitCode {
        if !self.out.is_empty() {
            print!("{}", self.out);
        }
        if !self.err.is_empty() {
            eprint!("{}", self.err);
        }
        ExitCode::from(self.exit)
    }
}

/// A line of output.
pub fn line(s: impl std::fmt::Display) -> String {
    format!("{s}\n")
}

/// A line of error output, prefixed `offloadd: `.
pub fn err_line(s: impl std::fmt::Display) -> String {
    format!("offloadd: {s}\n")
}
