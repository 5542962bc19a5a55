//! Prometheus metrics, names prefixed `offloadd_`, served on `/metrics`.
//!
//! STUB: the counters are kept by the pipeline through these methods; the
//! registry and encoding are filled in by the metrics work.

/// Cheap to clone; every clone updates the same metrics.
#[derive(Clone, Default)]
pub struct Metrics {}

impl Metrics {
    pub fn new() -> Self {
        Metrics {}
    }
    /// One upload verified and recorded.
    pub fn upload_succeeded(&self, _bytes: u64, _seconds: f64) {}
    /// One upload attempt that did not end in a record; `result` is one of
    /// `transient`, `provider`, `parked`, `changed`, `vanished`.
    pub fn upload_failed(&self, _result: &str) {}
    /// One retry scheduled after a transient error.
    pub fn retry(&self) {}
    pub fn set_queue_depth(&self, _n: u64) {}
    pub fn set_in_flight(&self, _n: u64) {}
    pub fn set_failed_items(&self, _n: u64) {}
    pub fn set_paused_providers(&self, _n: u64) {}
    /// One rescan of the tree (periodic, overflow or root return).
    pub fn rescan(&self) {}
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        String::new()
    }
}
