//! Live figures of the running pipeline, for `status`, `/metrics` and the
//! watchdog. Each field has one writer (named on it); everyone else reads.

use crate::keys::ItemKey;
use crate::observe::metrics::Metrics;
use crate::pipeline::queue::PausedInfo;
use crate::pipeline::rebuild;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many paths `status` lists of each kind.
pub const SAMPLE: usize = 20;

/// What `status` shows beyond the counters.
#[derive(Debug, Default, Clone)]
pub struct Shown {
    /// Parked items and why (scheduler).
    pub failed: BTreeMap<ItemKey, String>,
    /// The paused provider and why (scheduler).
    pub paused: Option<PausedInfo>,
    /// Why nothing leaves the queue: the root or the state_dir (scheduler).
    pub pipeline_paused: Option<String>,
    /// The last error of any kind (scheduler).
    pub last_error: Option<String>,
    /// Files seen being written and not closed yet: how many, and some of
    /// their paths (watcher).
    pub writers_waiting: u64,
    pub writers_sample: Vec<String>,
    /// One-time notices for operators, e.g. old files moved in (watcher), a
    /// provider that refuses aborts (scheduler).
    pub notices: Vec<String>,
    /// The upload bandwidth limit in force, as text (daemon).
    pub bandwidth: String,
    /// Set while location records are rebuilt from the bucket (daemon).
    pub rebuild: Option<Arc<rebuild::Progress>>,
}

/// See the module docs.
#[derive(Default)]
pub struct Live {
    pub metrics: Metrics,
    /// When uploads in flight must next show progress (uploader, and the
    /// scheduler as the first upload starts); the watchdog reads it.
    pub progress: Arc<Progress>,
    /// Items queued, in flight included (scheduler).
    pub queue_depth: AtomicU64,
    /// Items being worked on (scheduler).
    pub in_flight: AtomicU64,
    /// When the scheduler's loop last turned, on [`mono_ms`]'s clock
    /// (scheduler); see [`Live::loop_stuck`].
    loop_turned_ms: AtomicU64,
    shown: Mutex<Shown>,
}

/// When uploads in flight must next show progress, for the watchdog: after
/// that, they are stalled ([`Progress::overdue`]).
///
/// Each step of an upload moves the deadline later, never earlier. A request
/// allows three times its own timeout from when it may start, so a body held
/// back by `bandwidth_limit`, or one large part sent at a slow but moving
/// rate (parts grow past 500 MiB for the largest files), is not a stall. A
/// finished step allows a few minutes for the next one.
#[derive(Debug, Default)]
pub struct Progress {
    due_ms: AtomicU64,
}

/// What a step of an upload allows for the next one: three timeouts of a
/// request with a 16 MiB body (the default `multipart_threshold`).
fn between_steps() -> Duration {
    3 * crate::remote::client::request_timeout(16 * 1024 * 1024)
}

impl Progress {
    /// A step was made now (a request finished, an upload started).
    pub fn step(&self, now_ms: u64) {
        self.allow(now_ms, between_steps());
    }

    /// A request with timeout `timeout` starts `starts_in` from now.
    pub fn request(&self, now_ms: u64, starts_in: Duration, timeout: Duration) {
        self.allow(now_ms, starts_in + 3 * timeout);
    }

    fn allow(&self, now_ms: u64, within: Duration) {
        let due = now_ms.saturating_add(u64::try_from(within.as_millis()).unwrap_or(u64::MAX));
        self.due_ms.fetch_max(due, Ordering::Relaxed);
    }

    /// Whether the deadline has passed.
    pub fn overdue(&self, now_ms: u64) -> bool {
        now_ms > self.due_ms.load(Ordering::Relaxed)
    }
}

/// Milliseconds on a clock that is never stepped (unlike the wall clock,
/// which NTP may move by minutes), counted from its first reading; never 0.
fn mono_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// Most notices kept; older ones are dropped.
const MAX_NOTICES: usize = 20;

impl Live {
    pub fn update<T>(&self, f: impl FnOnce(&mut Shown) -> T) -> T {
        f(&mut self.shown.lock().expect("live lock"))
    }

    pub fn shown(&self) -> Shown {
        self.shown.lock().expect("live lock").clone()
    }

    pub fn depth(&self) -> (u64, u64) {
        (
            self.queue_depth.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed),
        )
    }

    /// The scheduler's loop turns now (it turns at least every second).
    pub fn turned(&self) {
        self.turned_at(mono_ms());
    }

    fn turned_at(&self, now_ms: u64) {
        self.loop_turned_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Whether the scheduler's loop has not turned for more than `after_ms`:
    /// it is blocked, spins, or has died, and the watchdog stops vouching
    /// for the daemon.
    pub fn loop_stuck(&self, after_ms: u64) -> bool {
        self.stuck_since(mono_ms(), after_ms).is_some()
    }

    /// When the loop last turned, if that is more than `after_ms` before
    /// `now_ms`. Before its first turn it is not stuck.
    fn stuck_since(&self, now_ms: u64, after_ms: u64) -> Option<u64> {
        match self.loop_turned_ms.load(Ordering::Relaxed) {
            0 => None,
            t => (now_ms.saturating_sub(t) > after_ms).then_some(t),
        }
    }

    /// Adds a notice unless it is already shown.
    pub fn notice(&self, text: String) {
        self.update(|s| {
            if !s.notices.contains(&text) {
                if s.notices.len() >= MAX_NOTICES {
                    s.notices.remove(0);
                }
                s.notices.push(text);
            }
        });
    }

    /// Takes back a notice that no longer holds.
    pub fn withdraw(&self, text: &str) {
        self.update(|s| s.notices.retain(|n| n != text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_is_stuck_only_after_it_turned_and_then_stopped() {
        let live = Live::default();
        assert_eq!(live.stuck_since(u64::MAX, 60_000), None, "not started yet");
        live.turned_at(1_000);
        assert_eq!(live.stuck_since(61_000, 60_000), None);
        assert_eq!(live.stuck_since(61_001, 60_000), Some(1_000));
        live.turned_at(61_001);
        assert_eq!(live.stuck_since(61_002, 60_000), None);
        live.turned();
        assert!(!live.loop_stuck(60_000));
    }

    #[test]
    fn a_long_request_moves_the_deadline_and_a_short_step_does_not_shorten_it() {
        let p = Progress::default();
        let t = 1_000_000_000;
        p.step(t);
        let step_ms = between_steps().as_millis() as u64;
        assert!(!p.overdue(t + step_ms) && p.overdue(t + step_ms + 1));
        // A body that waits 10 min for bandwidth_limit, then a 30 s timeout.
        p.request(t, Duration::from_secs(600), Duration::from_secs(30));
        let due = t + 600_000 + 90_000;
        assert!(!p.overdue(due) && p.overdue(due + 1));
        // Another upload's request finishes meanwhile: still that long.
        p.step(t + 1_000);
        assert!(!p.overdue(due));
        // Nothing for a step's allowance after that: stalled.
        p.step(due);
        assert!(p.overdue(due + step_ms + 1));
    }
}
