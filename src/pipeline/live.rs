//! Live figures of the running pipeline, for `status`, `/metrics` and the
//! watchdog. Each field has one writer (named on it); everyone else reads.

use crate::keys::ItemKey;
use crate::observe::metrics::Metrics;
use crate::pipeline::queue::PausedInfo;
use crate::pipeline::rebuild;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// One-time notices for operators, e.g. old files moved in (watcher).
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
    /// Unix ms when an upload last started or a request of one finished
    /// (uploader); the watchdog reads it.
    pub last_progress_ms: Arc<AtomicU64>,
    /// Items queued, in flight included (scheduler).
    pub queue_depth: AtomicU64,
    /// Items being worked on (scheduler).
    pub in_flight: AtomicU64,
    shown: Mutex<Shown>,
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
}
