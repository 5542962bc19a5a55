//! The command line: global options and subcommands, as DESIGN.md spells them.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// offloadd keeps a media server's disk from filling up: it uploads every new,
/// finished file in a results directory to an S3-compatible bucket, records where
/// it lives, and can delete the local copy once the upload is verified.
#[derive(Debug, Parser)]
#[command(name = "offloadd", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "OFFLOADD_CONFIG",
        default_value = "/etc/offloadd/config.yaml",
        value_name = "PATH"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (what systemd starts).
    Run,
    /// Validate the configuration and print the effective settings per provider,
    /// secrets masked; exits 78 if it cannot offload.
    CheckConfig {
        /// A path relative to the root to show the object rule it hits (repeatable;
        /// default, when `rules:` is set: a few files found in the root).
        #[arg(long = "sample", value_name = "REL_PATH")]
        samples: Vec<String>,
    },
    /// Show queue depth, uploads in flight, paused providers, failed items and totals.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print where a file lives now: its public URL if offloaded (provider:key
    /// where the provider has no public URL), else its local path; exit 1 if
    /// unknown.
    Locate {
        /// Path relative to the watch root, e.g. images/2026/a.png.
        rel_path: String,
    },
    /// Probe a provider (default: the active one): put a tiny object under the
    /// prefix, read it back, compare, delete it; exit 1 with a diagnosis on
    /// failure, 78 if the provider cannot be used as configured.
    TestConnection {
        /// Provider name from storage.providers.
        provider: Option<String>,
    },
    /// Queue failed (parked) items again.
    Retry {
        /// One path relative to the watch root.
        rel_path: Option<String>,
        /// Every failed item.
        #[arg(long, conflicts_with = "rel_path")]
        all: bool,
    },
    /// Delete-through: remove the bucket object, the local copy and the record.
    Delete {
        /// Path relative to the watch root.
        rel_path: String,
    },
    /// Queue files that existed before offloadd managed the directory (opt-in,
    /// never automatic).
    Backfill {
        /// Only count what would be queued.
        #[arg(long)]
        dry_run: bool,
    },
}
