//! The torture suite: every rule of DESIGN.md's guarantees, on the rare paths.
//!
//! ```sh
//! cargo test --release --test torture                       # short version (CI)
//! OFFLOADD_TORTURE=full cargo test --release --test torture -- --test-threads=1
//! ```
//!
//! Each module is one kind of trouble:
//! - `defects`: one test per defect of the safety-core issue, each a path on
//!   which a file was lost or deleted too early;
//! - `kill_loop`: random SIGKILLs during a mixed burst, with a monitor that
//!   checks every 10 ms that no local file goes before its object is in the
//!   bucket with equal bytes;
//! - `faults`: a fault-injecting HTTP proxy in front of a real server;
//! - `privileged`: a full state_dir (tmpfs), an unmounted root (bind mount),
//!   an inotify overflow; these need root and fail under CI without it;
//! - `props`: property tests of config parsing and of path → key → URL.
//!
//! Figures go to stderr as `TORTURE <name> <key>=<value>…` lines;
//! `tests/torture/RESULTS.md` records them with the command.

#[path = "../common/mod.rs"]
mod common;

mod defects;
mod faults;
mod kill_loop;
mod privileged;
mod props;

/// Whether the long version runs (`OFFLOADD_TORTURE=full`).
pub fn full() -> bool {
    std::env::var("OFFLOADD_TORTURE").is_ok_and(|v| v == "full")
}

/// `short` in the CI version, `long` in the full one.
pub fn scale(short: usize, long: usize) -> usize {
    if full() {
        long
    } else {
        short
    }
}

/// Prints one line of figures for RESULTS.md.
pub fn figures(name: &str, pairs: &[(&str, String)]) {
    let mut line = format!("TORTURE {name}");
    for (k, v) in pairs {
        line.push_str(&format!(" {k}={v}"));
    }
    eprintln!("{line}");
}
