//! Faults between the daemon and a real bucket (DESIGN.md guarantees 1, 2
//! and 4): throttling, connections reset mid-body (single PUTs and parts of a
//! multipart upload), a hung request, clock skew, an outage, one object
//! the server always fails, and the requests each file costs.
//!
//! Each test runs s3s-fs (a real server that checks signatures and keeps its
//! objects on disk), the fault proxy of `fault_proxy.rs` in front of it, and
//! the real daemon with `delete_local: true`, with a [`DeleteWatch`] that
//! fails the test if a local file disappears before the bucket holds its
//! bytes. Each asserts the outcome: every object in the bucket has exactly
//! the bytes of its file, no local file went early, nothing is parked unless
//! the test says so, the provider is not paused at the end and the queue is
//! empty.
//!
//! Retry settings in every test: `initial_backoff: 200ms`, `max_backoff: 2s`
//! (the harness's defaults), 4 workers.

#[path = "fault_proxy.rs"]
mod fault_proxy;

use crate::common::*;
use fault_proxy::{Fault, FaultProxy, RequestHead};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const INITIAL_BACKOFF_MS: u64 = 200;
const MAX_BACKOFF_MS: u64 = 2_000;
const WORKERS: u32 = 4;

/// The key of the daemon's health probe object.
fn health_key() -> String {
    format!("{PREFIX}/.offloadd-health")
}

/// s3s-fs, the proxy in front of it, the daemon behind it, a delete monitor,
/// and the files written so far. Fields drop in order: the daemon first.
struct Rig {
    daemon: Option<Daemon>,
    watch: Option<DeleteWatch>,
    proxy: FaultProxy,
    s3: S3Server,
    env: TestEnv,
    files: Expected,
    started: Instant,
    /// `delete_local` as configured: whether finished files leave the disk.
    deletes: bool,
}

impl Rig {
    fn start(tweak: impl FnOnce(&mut Cfg)) -> Rig {
        let started = Instant::now();
        let env = TestEnv::new();
        let s3 = S3Server::start_for(&env);
        let proxy = FaultProxy::start(s3.addr());
        let mut cfg = Cfg::new(&proxy.endpoint());
        cfg.delete_local = true;
        cfg.settle = "300ms".into();
        cfg.rescan_interval = "0".into();
        cfg.workers = WORKERS;
        cfg.initial_backoff = format!("{INITIAL_BACKOFF_MS}ms");
        cfg.max_backoff = format!("{MAX_BACKOFF_MS}ms");
        tweak(&mut cfg);
        env.write_config(&cfg);
        let daemon = Daemon::start(&env, &[]);
        let watch = DeleteWatch::start(&env, &s3);
        Rig {
            daemon: Some(daemon),
            watch: Some(watch),
            proxy,
            s3,
            env,
            files: Vec::new(),
            started,
            deletes: cfg.delete_local,
        }
    }

    fn watch(&self) -> &DeleteWatch {
        self.watch.as_ref().unwrap()
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().unwrap()
    }

    /// Writes a file (after its bytes are known to the monitor's list).
    fn add(&mut self, rel: &str, bytes: Vec<u8>) {
        write_file(&self.env.path(rel), &bytes);
        self.watch().add(rel, &bytes);
        self.files.push((rel.to_string(), bytes));
    }

    /// `n` files of distinct content named `{dir}/{i % 4}/f{i}.jpg`.
    fn add_many(&mut self, dir: &str, n: usize, max_len: usize) -> Expected {
        let mut out = Vec::new();
        for i in 0..n {
            let rel = format!("{dir}/{}/f{i:03}.jpg", i % 4);
            let bytes = file_content(&rel, 100, max_len);
            self.add(&rel, bytes.clone());
            out.push((rel, bytes));
        }
        out
    }

    /// Each file still local with its bytes and not in the bucket.
    fn assert_untouched(&self, files: &[(String, Vec<u8>)], why: &str) {
        for (rel, bytes) in files {
            assert_eq!(
                std::fs::read(self.env.path(rel)).ok().as_deref(),
                Some(bytes.as_slice()),
                "{rel}: the local file must stay as it is {why}"
            );
            assert!(!self.s3.has(rel), "{rel} cannot be in the bucket {why}");
        }
        self.watch().assert_clean();
    }

    /// The outcome, with the daemon still running: every file but `parked`
    /// in the bucket with equal bytes and its local copy deleted (never
    /// early); the bucket holds nothing else but the health probe's object;
    /// each of `parked` is in `failed`, still local, not in the bucket; the
    /// queue is empty and no provider is paused. Returns the final status.
    fn finish(&mut self, parked: &[&str]) -> Value {
        let uploaded: Expected = self
            .files
            .iter()
            .filter(|(r, _)| !parked.contains(&r.as_str()))
            .cloned()
            .collect();
        if !poll_until(LONG, || all_uploaded(&self.s3, &uploaded)) {
            let missing = missing_objects(&self.s3, &uploaded);
            panic!(
                "after {LONG:?}, {} of {} files are not in the bucket with equal bytes, e.g. {:?}; status: {}",
                missing.len(),
                uploaded.len(),
                &missing[..missing.len().min(10)],
                self.env.status()
            );
        }
        if self.deletes {
            wait_until(LONG, "local copies deleted after the upload", || {
                uploaded.iter().all(|(r, _)| !self.env.path(r).exists())
            });
        } else {
            for (rel, bytes) in &uploaded {
                assert_eq!(
                    std::fs::read(self.env.path(rel)).ok().as_deref(),
                    Some(bytes.as_slice()),
                    "{rel}: delete_local is off, its local copy stays"
                );
            }
        }
        let mut st = Value::Null;
        let settled = poll_until(LONG, || {
            st = self.env.status();
            let failed = json_array(&st, "failed");
            assert!(
                failed.len() <= parked.len(),
                "parked, but should not be: {st}"
            );
            json_u64(&st, "queue_depth") == 0
                && json_u64(&st, "in_flight") == 0
                && json_array(&st, "paused").is_empty()
                && failed.len() == parked.len()
        });
        assert!(
            settled,
            "status did not settle (queue empty, nothing paused, {} failed): {st}",
            parked.len()
        );
        let keys = self.s3.keys(BUCKET);
        let mut extra: BTreeSet<String> = keys.clone();
        extra.remove(&health_key());
        let expected: BTreeSet<String> = uploaded
            .iter()
            .map(|(r, _)| format!("{PREFIX}/{r}"))
            .collect();
        assert_eq!(
            extra, expected,
            "the bucket holds exactly the uploaded files (and the health probe)"
        );
        assert!(
            all_uploaded(&self.s3, &uploaded),
            "every object has the bytes of its file"
        );
        for rel in parked {
            let (_, bytes) = self
                .files
                .iter()
                .find(|(r, _)| r == rel)
                .unwrap_or_else(|| panic!("{rel} was never written"));
            assert_eq!(
                std::fs::read(self.env.path(rel)).ok().as_deref(),
                Some(bytes.as_slice()),
                "{rel} is parked: its local copy stays"
            );
            assert!(!self.s3.has(rel), "{rel} is parked, not uploaded");
            assert!(
                json_array(&st, "failed")
                    .iter()
                    .any(|f| f.get("path").and_then(Value::as_str) == Some(rel)),
                "{rel} is listed in failed: {st}"
            );
        }
        assert_eq!(
            json_u64(&st, "uploaded_count"),
            uploaded.len() as u64,
            "one record per uploaded file: {st}"
        );
        self.watch().assert_clean();
        assert_eq!(
            self.proxy.counts().unsupported,
            0,
            "the proxy understood every request"
        );
        assert!(self.daemon().alive(), "the daemon is still running");
        st
    }

    /// Stops the daemon (SIGTERM, exit 0) and the monitor.
    fn stop(mut self) {
        let v = self.watch.take().unwrap().finish();
        assert!(v.is_empty(), "deleted before the object existed: {v:#?}");
        self.daemon.take().unwrap().stop();
    }
}

/// The most requests a paced daemon makes in `secs` of a provider-wide
/// failure: the uploads in flight when the first one fails (one per
/// worker; after that the provider is suspect, then paused, and no upload
/// starts), then one probe at a time: the first at once, each next one
/// after a jittered delay of at least half its ceiling (200 ms doubling up
/// to 2 s: at least 100, 200, 400, 800 ms, then 1 s each); plus 3 for races
/// at the edges. A daemon that retried each of 50 files on its own backoff
/// would make hundreds.
fn paced_bound(secs: u64) -> usize {
    let mut t = 0u64;
    let mut probes = 1usize;
    let mut ceiling = INITIAL_BACKOFF_MS;
    loop {
        let min_delay = ceiling / 2;
        if t + min_delay > secs * 1000 {
            break;
        }
        t += min_delay;
        probes += 1;
        ceiling = (ceiling * 2).min(MAX_BACKOFF_MS);
    }
    WORKERS as usize + probes + 3
}

/// The S3 ETag of `bytes` uploaded in parts of `part` bytes.
fn multipart_etag_of(bytes: &[u8], part: usize) -> String {
    use md5::{Digest, Md5};
    let mut all = Vec::new();
    for c in bytes.chunks(part) {
        all.extend_from_slice(&Md5::digest(c));
    }
    format!(
        "{}-{}",
        hex::encode(Md5::digest(&all)),
        bytes.len().div_ceil(part)
    )
}

/// A file of `len` bytes of distinct content.
fn big_content(name: &str, len: usize) -> Vec<u8> {
    let mut v = format!("{name}\n").into_bytes();
    v.extend(random_bytes(len - v.len()));
    v
}

/// Throttling: every other PUT (probes included) is answered 503 SlowDown
/// or 429, alternately. Everything arrives, nothing is parked (throttling is
/// never an item's fault), the provider ends healthy.
#[test]
fn throttled_puts_all_arrive() {
    let mut rig = Rig::start(|_| {});
    // Two independent alternations, so that neither can lock onto the other
    // (with one shared count, a lone item's PUT and the probe its failure
    // triggers would take the failing and the passing turns for ever).
    let files = AtomicUsize::new(0);
    let probes = AtomicUsize::new(0);
    rig.proxy.set_rule(move |r: &RequestHead| {
        if !r.is_put() {
            return None;
        }
        let turn = if r.is_probe() { &probes } else { &files };
        match turn.fetch_add(1, Ordering::SeqCst) % 4 {
            1 => Some(Fault::Status503SlowDown),
            3 => Some(Fault::Status429),
            _ => None,
        }
    });
    let n = crate::scale(30, 200);
    rig.add_many("throttle", n, 60_000);
    rig.finish(&[]);
    let c = rig.proxy.counts();
    let (s503, s429) = (
        c.injected(Fault::Status503SlowDown),
        c.injected(Fault::Status429),
    );
    assert!(s503 >= 1 && s429 >= 1, "faults were injected: {c:?}");
    assert_eq!(
        c.faults.len(),
        2,
        "only the throttling faults were injected: {c:?}"
    );
    crate::figures(
        "faults_throttle",
        &[
            ("files", n.to_string()),
            ("requests", c.requests.to_string()),
            ("slowdown_503", s503.to_string()),
            ("too_many_429", s429.to_string()),
            ("seconds", rig.started.elapsed().as_secs().to_string()),
        ],
    );
    rig.stop();
}

/// A 200 answer to CompleteMultipartUpload that carries an error document
/// (the first two completes): the upload is not taken as done, no record
/// says the file is in the bucket while it is not, and the file arrives whole
/// once a complete succeeds, without sending its parts again (the error is
/// transient). Local copies are kept here, so nothing but the answer itself
/// can tell the daemon the object is missing.
#[test]
fn an_error_document_in_a_200_answer_is_an_error() {
    let mut rig = Rig::start(|c| {
        c.delete_local = false;
        c.multipart_threshold = Some("8MiB".into());
        c.part_size = Some("5MiB".into());
    });
    let completes = AtomicUsize::new(0);
    rig.proxy.set_rule(move |r: &RequestHead| {
        let complete = r.method == "POST" && r.has_param("uploadId");
        (complete && completes.fetch_add(1, Ordering::SeqCst) < 2).then_some(Fault::Status200Error)
    });
    rig.add("video/completed-late.mp4", random_bytes(11 * 1024 * 1024));
    rig.finish(&[]);
    let c = rig.proxy.counts();
    assert_eq!(c.injected(Fault::Status200Error), 2, "{c:?}");
    let parts = rig
        .proxy
        .log()
        .iter()
        .filter(|s| s.method == "PUT" && s.path.contains("partNumber="))
        .count();
    assert_eq!(
        parts, 3,
        "a transient answer keeps the upload: its 3 parts are sent once"
    );
    rig.stop();
}

/// Connections reset mid-body: the first 4 single PUTs of files, and the
/// 1st, 3rd and 4th part PUTs of a multipart upload (a 12 MiB file in 5 MiB
/// parts, so the upload is interrupted, resumed with some parts done,
/// interrupted again, resumed again). Everything arrives intact: the
/// multipart object has the composite ETag of 5 MiB parts of its bytes.
#[test]
fn resets_mid_body_then_all_arrive_intact() {
    let mut rig = Rig::start(|c| {
        c.multipart_threshold = Some("8MiB".into());
        c.part_size = Some("5MiB".into());
    });
    let objects = AtomicUsize::new(0);
    let parts = AtomicUsize::new(0);
    rig.proxy.set_rule(move |r: &RequestHead| {
        if r.is_part() {
            let i = parts.fetch_add(1, Ordering::SeqCst);
            return [0, 2, 3].contains(&i).then_some(Fault::ResetMidBody);
        }
        if r.is_object_put() && !r.is_probe() {
            let i = objects.fetch_add(1, Ordering::SeqCst);
            return (i < 4).then_some(Fault::ResetMidBody);
        }
        None
    });
    let big_rel = "video/big.mp4";
    let big = big_content(big_rel, 12 * MIB + 12_345);
    rig.add(big_rel, big.clone());
    let n = crate::scale(10, 40);
    rig.add_many("reset", n, 300_000);
    rig.finish(&[]);

    let (code, etag, len) = rig.s3.head(BUCKET, &format!("{PREFIX}/{big_rel}"));
    assert_eq!((code, len), (200, Some(big.len() as i64)));
    assert_eq!(
        etag.as_deref(),
        Some(multipart_etag_of(&big, 5 * MIB).as_str()),
        "the big file went up as a multipart upload of 5 MiB parts"
    );
    let log = rig.proxy.log();
    let resets: Vec<_> = log
        .iter()
        .filter(|s| s.fault == Some(Fault::ResetMidBody))
        .collect();
    assert_eq!(
        resets.len(),
        7,
        "4 single PUTs and 3 parts were reset: {resets:#?}"
    );
    let exactly_half = |s: &fault_proxy::Seen| s.body_read == s.body_len / 2;
    let is_part = |s: &fault_proxy::Seen| s.path.contains("partNumber=");
    assert_eq!(
        resets.iter().filter(|s| is_part(s)).count(),
        3,
        "{resets:#?}"
    );
    // Mid-body: after half of it, or less for a part whose upload was given
    // up (the other parts of an attempt are cancelled when one fails).
    for s in &resets {
        assert!(
            s.body_read <= s.body_len / 2 && s.body_len > 0,
            "reset mid-body: {s:?}"
        );
    }
    assert_eq!(
        resets
            .iter()
            .filter(|s| !is_part(s) && exactly_half(s))
            .count(),
        4,
        "each single PUT was reset after half its body: {resets:#?}"
    );
    assert!(
        resets.iter().any(|s| is_part(s) && exactly_half(s)),
        "a part was reset after half its body: {resets:#?}"
    );
    let part_puts = log.iter().filter(|s| is_part(s)).count();
    let upload_ids: BTreeSet<&str> = log
        .iter()
        .filter(|s| is_part(s))
        .filter_map(|s| s.path.split("uploadId=").nth(1))
        .map(|id| id.split('&').next().unwrap_or(id))
        .collect();
    crate::figures(
        "faults_reset",
        &[
            ("files", (n + 1).to_string()),
            ("resets", resets.len().to_string()),
            ("part_puts", part_puts.to_string()),
            ("upload_ids", upload_ids.len().to_string()),
            ("requests", log.len().to_string()),
            ("seconds", rig.started.elapsed().as_secs().to_string()),
        ],
    );
    rig.stop();
}

/// One PUT hangs (the server reads it and never answers): the daemon's
/// request times out (about 30 s), the file is sent again and arrives; the
/// other files are not held up meanwhile.
#[test]
fn hung_put_times_out_and_the_file_still_arrives() {
    let mut rig = Rig::start(|_| {});
    let hung = AtomicBool::new(false);
    rig.proxy.set_rule(move |r: &RequestHead| {
        (r.is_put() && r.path.contains("/hang/") && !hung.swap(true, Ordering::SeqCst))
            .then_some(Fault::Hang)
    });
    let t0 = Instant::now();
    rig.add(
        "hang/stuck.jpg",
        file_content("hang/stuck.jpg", 1000, 20_000),
    );
    let others = rig.add_many("beside", 6, 20_000);
    wait_all_uploaded(&rig.s3, &others, LONG);
    let others_s = t0.elapsed().as_secs_f64();
    rig.finish(&[]);
    let arrival_s = t0.elapsed().as_secs_f64();
    assert_eq!(
        rig.proxy.injected(Fault::Hang),
        1,
        "the hang was injected: {:?}",
        rig.proxy.counts()
    );
    let stuck_puts = rig
        .proxy
        .log()
        .iter()
        .filter(|s| s.method == "PUT" && s.path.contains("/hang/"))
        .count();
    assert!(stuck_puts >= 2, "the hung PUT was sent again");
    crate::figures(
        "faults_hang",
        &[
            ("others_arrived_s", format!("{others_s:.1}")),
            ("hung_file_arrived_s", format!("{arrival_s:.1}")),
            ("hung_file_puts", stuck_puts.to_string()),
        ],
    );
    rig.stop();
}

/// Clock skew: for about 10 s every request is answered 403
/// RequestTimeTooSkewed. The provider is paused with a reason that names the
/// clock (a provider-wide error), requests stay paced, nothing is uploaded
/// or deleted; when the clock is "fixed" everything drains and the pause
/// ends by itself.
#[test]
fn clock_skew_pauses_the_provider_then_drains() {
    let mut rig = Rig::start(|_| {});
    let warm = rig.add_many("warm", 3, 10_000);
    wait_all_uploaded(&rig.s3, &warm, LONG);
    wait_until(LONG, "warm-up files deleted", || {
        warm.iter().all(|(r, _)| !rig.env.path(r).exists())
    });

    let skew_s = 10;
    rig.proxy.set_rule(|_| Some(Fault::ClockSkew));
    rig.proxy.reset();
    let t0 = Instant::now();
    let n = crate::scale(10, 50);
    let skewed = rig.add_many("skew", n, 30_000);
    let mut st = Value::Null;
    let paused = poll_until(LONG, || {
        st = rig.env.status();
        json_array(&st, "paused").iter().any(|p| {
            p.get("reason")
                .and_then(Value::as_str)
                .is_some_and(|r| r.to_lowercase().contains("clock"))
        })
    });
    assert!(
        paused,
        "status shows the provider paused for the clock: {st}"
    );
    let p = &json_array(&st, "paused")[0];
    assert_eq!(p.get("provider").and_then(Value::as_str), Some(PROVIDER));
    let paused_after = t0.elapsed().as_secs_f64();
    if let Some(rest) = Duration::from_secs(skew_s).checked_sub(t0.elapsed()) {
        sleep(rest);
    }
    let during = rig.proxy.requests();
    let window = t0.elapsed().as_secs();
    rig.assert_untouched(&skewed, "while the clock is skewed");
    assert!(
        json_array(&rig.env.status(), "failed").is_empty(),
        "clock skew parks nothing"
    );
    let bound = paced_bound(window + 1);
    assert!(
        during <= bound,
        "{during} requests in {window} s of clock skew: not paced (bound {bound})"
    );
    assert!(rig.daemon().alive());

    rig.proxy.clear_rule();
    let t1 = Instant::now();
    rig.finish(&[]);
    crate::figures(
        "faults_clock_skew",
        &[
            ("skew_s", window.to_string()),
            ("paused_after_s", format!("{paused_after:.1}")),
            ("requests_during_skew", during.to_string()),
            ("bound", bound.to_string()),
            ("files", n.to_string()),
            ("drain_s", format!("{:.1}", t1.elapsed().as_secs_f64())),
        ],
    );
    rig.stop();
}

/// An outage: every connection is closed at once (60 s; 15 s in the short
/// version) while 50 files wait. The daemon stays up, probes the bucket at a
/// paced rate (bound: [`paced_bound`]), uploads and deletes nothing
/// meanwhile, and drains everything once the bucket is back.
#[test]
fn outage_is_paced_and_drains() {
    let mut rig = Rig::start(|_| {});
    let warm = rig.add_many("warm", 5, 10_000);
    wait_all_uploaded(&rig.s3, &warm, LONG);
    wait_until(LONG, "warm-up files deleted", || {
        warm.iter().all(|(r, _)| !rig.env.path(r).exists())
    });

    let outage_s = crate::scale(15, 60) as u64;
    rig.proxy.set_down(true);
    rig.proxy.reset();
    let t0 = Instant::now();
    let n = 50;
    let waiting = rig.add_many("outage", n, 20_000);
    sleep(Duration::from_secs(outage_s).saturating_sub(t0.elapsed()));
    let during = rig.proxy.requests();
    let window = t0.elapsed().as_secs();
    assert!(
        rig.daemon().alive(),
        "the daemon keeps running in an outage"
    );
    rig.assert_untouched(&waiting, "while the bucket is unreachable");
    let bound = paced_bound(window + 1);
    assert!(during >= 1, "the daemon probes the bucket during an outage");
    assert!(
        during <= bound,
        "{during} requests in {window} s of outage with {n} files waiting: not paced (bound {bound})"
    );
    assert_eq!(
        rig.proxy.counts().forwarded,
        0,
        "nothing got through during the outage"
    );

    // Logged as one outage, not once per item.
    let log = rig.daemon().stderr();
    let started_lines = log
        .lines()
        .filter(|l| l.contains(&format!("provider {PROVIDER} paused:")))
        .count();
    assert_eq!(started_lines, 1, "the outage start is logged once:\n{log}");
    let per_item = log
        .lines()
        .filter(|l| l.contains("outage/") && !l.contains("uploaded"))
        .count();
    assert_eq!(per_item, 0, "no log line per waiting item:\n{log}");

    rig.proxy.set_down(false);
    let t1 = Instant::now();
    let st = rig.finish(&[]);
    assert!(
        json_array(&st, "failed").is_empty(),
        "an outage parks nothing"
    );
    crate::figures(
        "outage",
        &[
            ("outage_s", window.to_string()),
            ("requests_during_outage", during.to_string()),
            ("bound", bound.to_string()),
            ("files", n.to_string()),
            ("drain_s", format!("{:.1}", t1.elapsed().as_secs_f64())),
        ],
    );
    rig.stop();
}

/// One object is answered 500 InternalError on every PUT while the others
/// upload. A 5xx is transient (DESIGN, guarantee 4): the object is never
/// parked, it backs off (no storm: its PUTs are spaced out by the backoff up
/// to `max_backoff`), the provider is not paused, `status` names the error,
/// and once the server takes it again it is uploaded without any `retry`.
#[test]
fn a_poisoned_object_backs_off_and_is_uploaded_once_the_server_takes_it() {
    let mut rig = Rig::start(|_| {});
    rig.proxy.set_rule(|r: &RequestHead| {
        (r.is_put() && r.path.contains("poison")).then_some(Fault::Status500)
    });
    let poison = "poison/bad.jpg";
    rig.add(poison, file_content(poison, 1000, 20_000));
    let n = crate::scale(20, 100);
    let good = rig.add_many("good", n, 40_000);
    wait_until(LONG, "the other files uploaded", || {
        all_uploaded(&rig.s3, &good)
    });
    // Over a window of several max_backoff, attempts go on, spaced out.
    let before = rig.proxy.injected(Fault::Status500);
    let window = Duration::from_millis(5 * MAX_BACKOFF_MS);
    sleep(window);
    let during = rig.proxy.injected(Fault::Status500) - before;
    assert!(
        // A delay is half to all of its ceiling: 1-2 s at max_backoff.
        (1..=12).contains(&during),
        "{during} PUTs of the poisoned object in {window:?}: retried, never parked, at the backoff's pace"
    );
    let st = rig.env.status();
    assert!(json_array(&st, "failed").is_empty(), "never parked: {st}");
    assert!(json_array(&st, "paused").is_empty(), "status: {st}");
    let last = st["last_error"].as_str().unwrap_or("");
    assert!(
        last.contains("InternalError"),
        "status names the error: {st}"
    );
    let puts = rig.proxy.injected(Fault::Status500);
    // The server takes it again: uploaded on its own.
    rig.proxy.clear_rule();
    rig.finish(&[]);
    crate::figures(
        "faults_poison",
        &[
            ("files", (n + 1).to_string()),
            ("poisoned_puts", puts.to_string()),
            ("seconds", rig.started.elapsed().as_secs().to_string()),
        ],
    );
    rig.stop();
}

/// What each file costs the bucket, counted at the proxy: with the local
/// copy kept, one PUT and nothing else (the server checked our Content-MD5
/// and its answer's ETag is checked); with the local copy deleted, a PUT and
/// then the HEAD that guarantee 2 asks for before the delete.
#[test]
fn a_kept_file_costs_one_put_and_a_deleted_one_a_put_and_a_head() {
    for delete_local in [false, true] {
        let mut rig = Rig::start(|c| c.delete_local = delete_local);
        let files = rig.add_many("cost", 12, 50_000);
        if delete_local {
            rig.finish(&[]);
        } else {
            wait_all_uploaded(&rig.s3, &files, LONG);
            wait_until(LONG, "every upload recorded", || {
                json_u64(&rig.env.status(), "uploaded_count") == files.len() as u64
            });
        }
        let log = rig.proxy.log();
        for (rel, bytes) in &files {
            let object = format!("/{BUCKET}/{PREFIX}/{rel}");
            let methods: Vec<&str> = log
                .iter()
                .filter(|s| s.path.split('?').next() == Some(object.as_str()))
                .map(|s| s.method.as_str())
                .collect();
            let expected = if delete_local {
                vec!["PUT", "HEAD"]
            } else {
                vec!["PUT"]
            };
            assert_eq!(methods, expected, "{rel} (delete_local: {delete_local})");
            let local = std::fs::read(rig.env.path(rel)).ok();
            assert_eq!(
                local.as_deref(),
                (!delete_local).then_some(bytes.as_slice()),
                "{rel}: the local copy stays exactly when it is kept"
            );
        }
        rig.stop();
    }
}
