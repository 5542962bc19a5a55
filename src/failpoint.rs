//! Named failure points for tests: `OFFLOADD_FAILPOINTS=name[,name…]` makes
//! the process SIGKILL itself when it reaches one of the crash points
//! ([`hit`]), exactly like a crash, and makes the operations named by an
//! error point fail ([`fails`]).
//!
//! Only builds with the `failpoints` cargo feature have them (the tests turn
//! it on); in any other build, the Debian package's included, [`hit`] does
//! nothing and the variable is ignored entirely.

#[cfg(feature = "failpoints")]
use std::collections::HashSet;
#[cfg(feature = "failpoints")]
use std::sync::OnceLock;

/// After the object is uploaded and verified, before its location record is written.
pub const AFTER_UPLOAD_BEFORE_RECORD: &str = "after_upload_before_record";
/// After the location record is durable, before the local copy is deleted.
pub const AFTER_RECORD_BEFORE_DELETE: &str = "after_record_before_delete";
/// After the local copy is deleted, before the record is marked as such.
pub const AFTER_DELETE_BEFORE_MARK: &str = "after_delete_before_mark";
/// After the first part of a multipart upload is accepted.
pub const AFTER_FIRST_PART: &str = "after_first_part";
/// Error point: starting the watcher fails as if inotify were out of file
/// descriptors.
pub const WATCH_START_FAILS: &str = "watch_start_fails";
/// Error point: the scheduler panics when the watcher hands it its first file.
pub const SCHEDULER_PANICS: &str = "scheduler_panics";
/// Error point: the status publisher panics on its second turn (a second
/// after the start).
pub const STATUS_PANICS: &str = "status_panics";
/// Error point: an offline backfill takes 50 ms more for each file it
/// queues, as on a huge tree or a slow disk.
pub const BACKFILL_ADMITS_SLOWLY: &str = "backfill_admits_slowly";

pub const ENV: &str = "OFFLOADD_FAILPOINTS";

/// Whether this build has failpoints at all.
pub const COMPILED: bool = cfg!(feature = "failpoints");

#[cfg(feature = "failpoints")]
fn enabled() -> &'static HashSet<String> {
    static SET: OnceLock<HashSet<String>> = OnceLock::new();
    SET.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

/// Kills the process with SIGKILL if the failpoint `name` is switched on.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if enabled().contains(name) {
        eprintln!("failpoint {name} reached: killing the process");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Whether the error point `name` is switched on.
#[cfg(feature = "failpoints")]
pub fn fails(name: &str) -> bool {
    enabled().contains(name)
}

/// Without the `failpoints` feature: never.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fails(_name: &str) -> bool {
    false
}
