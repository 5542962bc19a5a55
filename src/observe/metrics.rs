//! Prometheus metrics, names prefixed `offloadd_`, served on `/metrics`.
//!
//! Owns the registry (prometheus-client, OpenMetrics text). Every clone of
//! [`Metrics`] updates the same values; updating never blocks or fails.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Values of the `result` label of `offloadd_uploads_total`.
pub const RESULTS: &[&str] = &[
    "success",
    "transient",
    "provider",
    "parked",
    "changed",
    "vanished",
    "unchanged",
];

type ResultLabel = [(&'static str, String); 1];
type ProviderLabel = [(&'static str, String); 1];

struct Inner {
    registry: Registry,
    queue_depth: Gauge,
    in_flight: Gauge,
    uploads: Family<ResultLabel, Counter>,
    bytes: Counter,
    duration: Histogram,
    failed_items: Gauge,
    retries: Counter,
    paused_providers: Gauge,
    last_success: Gauge<f64, AtomicU64>,
    rescans: Counter,
    oldest_pending_age: Gauge,
    last_success_age: Gauge,
    provider_paused: Family<ProviderLabel, Gauge>,
    pipeline_paused: Gauge,
    root_available: Gauge,
    state_dir_free: Gauge,
    waiting_for_writer: Gauge,
    bandwidth_limit: Gauge,
}

/// Cheap to clone; every clone updates the same metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("offloadd");
        let queue_depth = Gauge::default();
        let in_flight = Gauge::default();
        let uploads = Family::<ResultLabel, Counter>::default();
        let bytes = Counter::default();
        // 10 ms .. ~164 s
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 15));
        let failed_items = Gauge::default();
        let retries = Counter::default();
        let paused_providers = Gauge::default();
        let last_success = Gauge::<f64, AtomicU64>::default();
        let rescans = Counter::default();
        let oldest_pending_age = Gauge::default();
        let last_success_age = Gauge::default();
        let provider_paused = Family::<ProviderLabel, Gauge>::default();
        let pipeline_paused = Gauge::default();
        let root_available = Gauge::default();
        let state_dir_free = Gauge::default();
        let waiting_for_writer = Gauge::default();
        let bandwidth_limit = Gauge::default();
        for r in RESULTS {
            // Every result shows up (at 0) from the first scrape.
            let _ = uploads.get_or_create(&[("result", (*r).to_owned())]);
        }
        registry.register(
            "queue_depth",
            "Files waiting to be uploaded, in flight included (not local copies waiting for their delete)",
            queue_depth.clone(),
        );
        registry.register("in_flight", "Uploads in progress", in_flight.clone());
        registry.register(
            "uploads",
            "Upload attempts by result (success, transient, provider, parked, changed, vanished, unchanged: only the file's metadata changed and the bucket already held its bytes, not sent again)",
            uploads.clone(),
        );
        registry.register_with_unit(
            "uploaded",
            "Bytes of files uploaded, verified and recorded",
            Unit::Bytes,
            bytes.clone(),
        );
        registry.register_with_unit(
            "upload_duration",
            "Time from upload start to record, per successful file",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "failed_items",
            "Files given up on until `offloadd retry`",
            failed_items.clone(),
        );
        registry.register(
            "retries",
            "Retries scheduled after transient errors",
            retries.clone(),
        );
        registry.register(
            "paused_providers",
            "Providers paused after an outage or a provider error",
            paused_providers.clone(),
        );
        registry.register_with_unit(
            "last_success_timestamp",
            "Unix time of the last successful upload, or of a file found already in the bucket (0 = none since start)",
            Unit::Seconds,
            last_success.clone(),
        );
        registry.register(
            "rescans",
            "Rescans of the watched tree (periodic, overflow or root return)",
            rescans.clone(),
        );
        registry.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest file waiting in the queue (0 when it is empty)",
            Unit::Seconds,
            oldest_pending_age.clone(),
        );
        registry.register_with_unit(
            "last_success_age",
            "Time since the last successful upload, or file found already in the bucket (or since start, if none yet)",
            Unit::Seconds,
            last_success_age.clone(),
        );
        registry.register(
            "provider_paused",
            "1 while a provider is paused after a provider-wide error (label provider)",
            provider_paused.clone(),
        );
        registry.register(
            "pipeline_paused",
            "1 while nothing leaves the queue because the root or state_dir is unavailable",
            pipeline_paused.clone(),
        );
        registry.register(
            "root_available",
            "1 while the watch root is present and the same filesystem",
            root_available.clone(),
        );
        registry.register_with_unit(
            "state_dir_free",
            "Free space in state_dir",
            Unit::Bytes,
            state_dir_free.clone(),
        );
        registry.register(
            "waiting_for_writer",
            "Files seen being written whose writer has not closed them",
            waiting_for_writer.clone(),
        );
        registry.register(
            "bandwidth_limit_bytes_per_second",
            "Upload bandwidth limit in force now (0 = unlimited)",
            bandwidth_limit.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                queue_depth,
                in_flight,
                uploads,
                bytes,
                duration,
                failed_items,
                retries,
                paused_providers,
                last_success,
                rescans,
                oldest_pending_age,
                last_success_age,
                provider_paused,
                pipeline_paused,
                root_available,
                state_dir_free,
                waiting_for_writer,
                bandwidth_limit,
            }),
        }
    }

    /// One upload verified and recorded.
    pub fn upload_succeeded(&self, bytes: u64, seconds: f64) {
        let m = &self.inner;
        m.bytes.inc_by(bytes);
        m.duration.observe(seconds.max(0.0));
        self.recorded("success");
    }

    /// One file recorded again without sending its body: only its metadata
    /// (ctime) changed, and the bucket already held its bytes. The pipeline
    /// is making progress, as after an upload.
    pub fn upload_not_needed(&self) {
        self.recorded("unchanged");
    }

    /// A file recorded as in the bucket, counted under `result`, now.
    fn recorded(&self, result: &str) {
        let m = &self.inner;
        m.uploads
            .get_or_create(&[("result", result.to_owned())])
            .inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        m.last_success.set(now);
    }

    /// One upload attempt that did not end in a record; `result` is one of
    /// `transient`, `provider`, `parked`, `changed`, `vanished`.
    pub fn upload_failed(&self, result: &str) {
        self.inner
            .uploads
            .get_or_create(&[("result", result.to_owned())])
            .inc();
    }

    /// One retry scheduled after a transient error.
    pub fn retry(&self) {
        self.inner.retries.inc();
    }

    pub fn set_queue_depth(&self, n: u64) {
        self.inner.queue_depth.set(gauge(n));
    }

    pub fn set_in_flight(&self, n: u64) {
        self.inner.in_flight.set(gauge(n));
    }

    pub fn set_failed_items(&self, n: u64) {
        self.inner.failed_items.set(gauge(n));
    }

    pub fn set_paused_providers(&self, n: u64) {
        self.inner.paused_providers.set(gauge(n));
    }

    /// Unix time of the last successful upload (0: none since start).
    pub fn last_success_secs(&self) -> f64 {
        self.inner.last_success.get()
    }

    pub fn set_oldest_pending_age(&self, seconds: u64) {
        self.inner.oldest_pending_age.set(gauge(seconds));
    }

    pub fn set_last_success_age(&self, seconds: u64) {
        self.inner.last_success_age.set(gauge(seconds));
    }

    /// Whether `provider` is paused now.
    pub fn set_provider_paused(&self, provider: &str, paused: bool) {
        self.inner
            .provider_paused
            .get_or_create(&[("provider", provider.to_owned())])
            .set(paused as i64);
    }

    pub fn set_pipeline_paused(&self, paused: bool) {
        self.inner.pipeline_paused.set(paused as i64);
    }

    pub fn set_root_available(&self, available: bool) {
        self.inner.root_available.set(available as i64);
    }

    pub fn set_state_dir_free(&self, bytes: u64) {
        self.inner.state_dir_free.set(gauge(bytes));
    }

    pub fn set_waiting_for_writer(&self, n: u64) {
        self.inner.waiting_for_writer.set(gauge(n));
    }

    pub fn set_bandwidth_limit(&self, bytes_per_sec: u64) {
        self.inner.bandwidth_limit.set(gauge(bytes_per_sec));
    }

    /// One rescan of the tree (periodic, overflow or root return).
    pub fn rescan(&self) {
        self.inner.rescans.inc();
    }

    /// The exposition in OpenMetrics text (see [`CONTENT_TYPE`]), which
    /// Prometheus scrapes as is.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn fresh_metrics_list_every_name_at_zero() {
        let text = Metrics::default().encode();
        for series in [
            "offloadd_queue_depth",
            "offloadd_in_flight",
            "offloadd_uploaded_bytes_total",
            "offloadd_upload_duration_seconds_count",
            "offloadd_failed_items",
            "offloadd_retries_total",
            "offloadd_paused_providers",
            "offloadd_last_success_timestamp_seconds",
            "offloadd_rescans_total",
            "offloadd_oldest_pending_age_seconds",
            "offloadd_last_success_age_seconds",
            "offloadd_pipeline_paused",
            "offloadd_root_available",
            "offloadd_state_dir_free_bytes",
            "offloadd_waiting_for_writer",
            "offloadd_bandwidth_limit_bytes_per_second",
        ] {
            assert_eq!(value(&text, series), 0.0, "{series}");
        }
        for r in RESULTS {
            let series = format!("offloadd_uploads_total{{result=\"{r}\"}}");
            assert_eq!(value(&text, &series), 0.0, "{series}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .all(|l| l.starts_with("offloadd_")),
            "every series is prefixed offloadd_:\n{text}"
        );
    }

    #[test]
    fn updates_show_in_encode_and_clones_share_values() {
        let m = Metrics::new();
        let c = m.clone();
        c.upload_succeeded(1000, 0.5);
        m.upload_succeeded(24, 2.0);
        m.upload_failed("transient");
        m.upload_failed("vanished");
        m.upload_failed("vanished");
        m.retry();
        m.rescan();
        m.set_queue_depth(7);
        m.set_in_flight(3);
        m.set_failed_items(2);
        m.set_paused_providers(1);
        m.set_provider_paused("r2", true);
        m.set_provider_paused("s3", false);
        m.set_oldest_pending_age(42);
        let text = c.encode();
        assert_eq!(
            value(&text, "offloadd_provider_paused{provider=\"r2\"}"),
            1.0
        );
        assert_eq!(
            value(&text, "offloadd_provider_paused{provider=\"s3\"}"),
            0.0
        );
        assert_eq!(value(&text, "offloadd_oldest_pending_age_seconds"), 42.0);
        assert_eq!(
            value(&text, "offloadd_uploads_total{result=\"success\"}"),
            2.0
        );
        assert_eq!(
            value(&text, "offloadd_uploads_total{result=\"transient\"}"),
            1.0
        );
        assert_eq!(
            value(&text, "offloadd_uploads_total{result=\"vanished\"}"),
            2.0
        );
        assert_eq!(
            value(&text, "offloadd_uploads_total{result=\"parked\"}"),
            0.0
        );
        assert_eq!(value(&text, "offloadd_uploaded_bytes_total"), 1024.0);
        assert_eq!(value(&text, "offloadd_upload_duration_seconds_count"), 2.0);
        assert_eq!(value(&text, "offloadd_upload_duration_seconds_sum"), 2.5);
        assert_eq!(
            value(
                &text,
                "offloadd_upload_duration_seconds_bucket{le=\"0.64\"}"
            ),
            1.0
        );
        assert_eq!(value(&text, "offloadd_retries_total"), 1.0);
        assert_eq!(value(&text, "offloadd_rescans_total"), 1.0);
        assert_eq!(value(&text, "offloadd_queue_depth"), 7.0);
        assert_eq!(value(&text, "offloadd_in_flight"), 3.0);
        assert_eq!(value(&text, "offloadd_failed_items"), 2.0);
        assert_eq!(value(&text, "offloadd_paused_providers"), 1.0);
        let last = value(&text, "offloadd_last_success_timestamp_seconds");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            now - last < 60.0 && last <= now,
            "last success {last}, now {now}"
        );
        assert!(text.contains("# TYPE offloadd_upload_duration_seconds histogram"));
        assert!(text.contains("# UNIT offloadd_upload_duration_seconds seconds"));
    }
}
