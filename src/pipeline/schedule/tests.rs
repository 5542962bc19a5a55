//! The scheduler's rules against an in-memory store, on tokio's paused clock:
//! real files in a temp dir, a real queue, a fake bucket.

use super::*;
use crate::keys::ItemKey;
use crate::pipeline::backoff::Backoff;
use crate::pipeline::plan::{Options, Target};
use crate::pipeline::queue::{AfterUpload, Local, MultipartProgress, Record};
use crate::pipeline::upload;
use crate::remote::fake::{http_error, refused, FakeStore, Op, WRONG_ETAG};
use crate::shutdown::Stop;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use tokio::task::JoinHandle;

const MIB: u64 = 1024 * 1024;

struct Harness {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: Arc<FakeStore>,
    queue: Arc<Queue>,
    guard: Arc<RootGuard>,
    live: Arc<Live>,
    candidates: mpsc::Sender<Candidate>,
    commands: mpsc::Sender<Command>,
    stop: Stop,
    task: Option<JoinHandle<()>>,
    /// Items each lane holds in memory (the scheduler's default unless set).
    window: usize,
    /// `upload.memory_limit` ([`MEMORY_LIMIT`] unless set).
    memory_limit: u64,
    /// How far the scheduler's clock starts behind the wall clock (as after
    /// the wall clock was stepped forward while it ran).
    clock_behind_ms: u64,
}

fn plan(root: &std::path::Path, store: &Arc<FakeStore>, deletion: Deletion) -> Arc<Plan> {
    Arc::new(Plan {
        options: Options {
            root: root.to_path_buf(),
            settle: Duration::ZERO,
            deletion,
            workers: 4,
            upload: upload::Settings {
                multipart_threshold: 8 * MIB,
                part_size: 5 * MIB,
                part_concurrency: 2,
            },
            retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(8)),
            mark_ns: 0,
            object_rules: Arc::new(Default::default()),
        },
        target: Target::Provider(store.clone()),
        others: Default::default(),
    })
}

/// `upload.memory_limit` of the tests that do not set their own.
const MEMORY_LIMIT: u64 = 64 * MIB;

fn resources(memory_limit: u64) -> (Budget, Pacer) {
    (Budget::new(memory_limit), Pacer::new(0))
}

impl Harness {
    fn new(deletion: Deletion) -> Harness {
        crate::pipeline::finished::ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let (queue, _) = Queue::open(&state).unwrap();
        let guard = Arc::new(RootGuard::new(&root, &state).unwrap());
        let (candidates, _) = mpsc::channel(1);
        let (commands, _) = mpsc::channel(1);
        let (stop, _) = Stop::new();
        let mut h = Harness {
            _dir: dir,
            root,
            store: Arc::new(FakeStore::new()),
            queue: Arc::new(queue),
            guard,
            live: Arc::new(Live::default()),
            candidates,
            commands,
            stop,
            task: None,
            window: lanes::WINDOW,
            memory_limit: MEMORY_LIMIT,
            clock_behind_ms: 0,
        };
        h.start(deletion);
        h
    }

    fn start(&mut self, deletion: Deletion) {
        let (cand_tx, cand_rx) = mpsc::channel(64);
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let (stop, shutdown) = Stop::new();
        let mut s = Scheduler::new(
            plan(&self.root, &self.store, deletion),
            resources(self.memory_limit),
            self.queue.clone(),
            self.guard.clone(),
            self.live.clone(),
            watch::channel(0).0,
        );
        s.clock.base_ms -= self.clock_behind_ms;
        if self.window != lanes::WINDOW {
            s.lanes = Lanes::with_window(self.window);
            s.load_queue();
        }
        self.task = Some(tokio::spawn(s.run(
            cand_rx,
            cmd_rx,
            shutdown,
            Duration::from_secs(30),
        )));
        self.candidates = cand_tx;
        self.commands = cmd_tx;
        self.stop = stop;
    }

    async fn stop(&mut self) {
        self.stop.fire();
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    async fn write(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        self.candidates
            .send(Candidate {
                abs: p.clone(),
                trigger: Trigger::Event,
            })
            .await
            .unwrap();
        p
    }

    /// Sends the command `make` builds around a reply channel; its answer.
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> T {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.unwrap();
        answer.await.unwrap()
    }

    fn count(&self, op: Op) -> usize {
        self.store.requests().iter().filter(|r| r.op == op).count()
    }

    fn key(rel: &str) -> ItemKey {
        ItemKey::from_bytes(rel.as_bytes().to_vec()).unwrap()
    }

    /// A scheduler on this harness's queue that is not running, to look at
    /// its decisions one by one.
    fn idle_scheduler(&self) -> Scheduler {
        Scheduler::new(
            plan(&self.root, &self.store, Deletion::Keep),
            resources(MEMORY_LIMIT),
            self.queue.clone(),
            self.guard.clone(),
            self.live.clone(),
            watch::channel(0).0,
        )
    }

    /// Writes `rel`, which the provider refuses (a 400) until it is parked,
    /// then holds it as a delete-through does; its key.
    async fn parked_and_held(&self, rel: &str) -> ItemKey {
        self.store
            .script(|r| (r.op == Op::Put).then(|| http_error(400, "InvalidRequest")));
        self.write(rel, rel.as_bytes()).await;
        let key = Harness::key(rel);
        until(300, "parked", || {
            self.live.shown().failed.contains_key(&key)
        })
        .await;
        self.store.script(|_| None);
        let k = key.clone();
        self.ask(|reply| Command::Hold { key: k, reply })
            .await
            .unwrap();
        key
    }
}

/// Lets virtual time run until `cond` holds: at most `secs` virtual seconds,
/// and at least a few real ones, since file reads and deletes run on real
/// blocking threads while virtual time jumps ahead.
async fn until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let (virtual_start, real_start) = (Instant::now(), std::time::Instant::now());
    loop {
        if cond() {
            return;
        }
        if virtual_start.elapsed() >= Duration::from_secs(secs)
            && real_start.elapsed() >= Duration::from_secs(10)
        {
            panic!("not within {secs} virtual seconds: {what}");
        }
        // Real time for the blocking threads, then virtual time for timers.
        std::thread::sleep(Duration::from_millis(1));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn uploads_verifies_and_records() {
    let mut h = Harness::new(Deletion::Keep);
    for i in 0..3 {
        h.write(&format!("a/{i}.png"), format!("file {i}").as_bytes())
            .await;
    }
    until(30, "all uploaded", || {
        (0..3).all(|i| h.store.object(&format!("pre/a/{i}.png")).is_some())
    })
    .await;
    until(5, "records written", || {
        (0..3).all(|i| {
            h.queue
                .record(&Harness::key(&format!("a/{i}.png")))
                .unwrap()
                .is_some()
        })
    })
    .await;
    assert_eq!(h.store.object("pre/a/1.png").unwrap(), b"file 1");
    assert!(h.queue.items().unwrap().is_empty());
    h.stop().await;
}

/// With the budget full, big files are sent one after another (the first
/// completes while the second's parts go), not all interleaved to complete
/// together at the end; a small file written meanwhile does not wait for them.
#[tokio::test(start_paused = true)]
async fn big_files_take_the_budget_in_turn_and_small_files_go_first() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    h.memory_limit = 10 * MIB; // two 5 MiB parts: what one file's two lanes use
    h.start(Deletion::Keep);
    let body = |seed: u8| -> Vec<u8> { (0..30 * MIB).map(|i| (i % 251) as u8 ^ seed).collect() };
    h.write("v/a.mp4", &body(1)).await;
    h.write("v/b.mp4", &body(2)).await;
    h.write("small.png", b"image").await;
    until(60, "both videos uploaded", || {
        ["pre/v/a.mp4", "pre/v/b.mp4"]
            .iter()
            .all(|k| h.store.object(k).is_some())
    })
    .await;
    assert_eq!(h.store.object("pre/v/a.mp4").unwrap(), body(1));
    assert_eq!(h.store.object("pre/v/b.mp4").unwrap(), body(2));
    let log = h.store.requests();
    let first_complete = log.iter().position(|r| r.op == Op::Complete).unwrap();
    let finished = &log[first_complete].key;
    let other_parts_before = log[..first_complete]
        .iter()
        .filter(|r| r.op == Op::Part && &r.key != finished)
        .count();
    assert!(
        other_parts_before <= 2,
        "{other_parts_before} of the other file's 6 parts went before {finished} completed"
    );
    let small = log.iter().position(|r| r.key == "pre/small.png").unwrap();
    let last_part = log.iter().rposition(|r| r.op == Op::Part).unwrap();
    assert!(small < last_part, "the small file waited for the videos");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_refusal_only_one_item_gets_parks_it_without_pausing_the_provider() {
    let mut h = Harness::new(Deletion::Keep);
    // A bucket policy that denies one prefix, say.
    h.store.script(|r| {
        (r.op == Op::Put && r.key.ends_with("long-name.png"))
            .then(|| http_error(400, "InvalidRequest"))
    });
    h.write("long-name.png", b"x").await;
    for i in 0..5 {
        h.write(&format!("ok{i}.png"), b"fine").await;
    }
    let bad = Harness::key("long-name.png");
    until(300, "the failing item parked", || {
        h.live.shown().failed.contains_key(&bad)
    })
    .await;
    assert!((0..5).all(|i| h.store.object(&format!("pre/ok{i}.png")).is_some()));
    let puts = h
        .store
        .requests()
        .iter()
        .filter(|r| r.op == Op::Put && r.key.ends_with("long-name.png"))
        .count();
    assert_eq!(puts, MAX_STRIKES as usize, "a bounded number of attempts");
    assert!(
        h.live.shown().paused.is_none(),
        "the provider was never paused"
    );
    let reason = h.live.shown().failed[&bad].clone();
    assert!(
        reason.contains("InvalidRequest") && reason.contains("offloadd retry"),
        "{reason}"
    );
    assert!(h.queue.item(&bad).unwrap().unwrap().is_parked());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn server_errors_only_one_item_gets_never_park_it() {
    let mut h = Harness::new(Deletion::Keep);
    let failures = Arc::new(AtomicUsize::new(0));
    let f = failures.clone();
    // Twelve 500s in a row for one big file, while the provider answers others.
    h.store.script(move |r| {
        (r.op == Op::Put && r.key.ends_with("flaky.mp4") && f.fetch_add(1, Ordering::SeqCst) < 12)
            .then(|| http_error(500, "InternalError"))
    });
    h.write("flaky.mp4", b"video").await;
    for i in 0..5 {
        h.write(&format!("ok{i}.png"), b"fine").await;
    }
    until(3600, "the flaky file uploaded", || {
        h.store.object("pre/flaky.mp4").is_some()
    })
    .await;
    assert_eq!(h.store.object("pre/flaky.mp4").unwrap(), b"video");
    assert!(failures.load(Ordering::SeqCst) > MAX_STRIKES as usize);
    assert!(h.live.shown().failed.is_empty(), "never parked");
    assert!(
        h.live.shown().paused.is_none(),
        "the provider was never paused"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_provider_wide_error_pauses_only_when_the_probe_fails_and_probes_are_paced() {
    let mut h = Harness::new(Deletion::Keep);
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    h.store.script(move |r| {
        (b.load(Ordering::SeqCst) && matches!(r.op, Op::Put | Op::Probe))
            .then(|| http_error(403, "SignatureDoesNotMatch"))
    });
    for i in 0..20 {
        h.write(&format!("f{i:02}.png"), b"data").await;
    }
    until(10, "paused", || h.live.shown().paused.is_some()).await;
    let reason = h.live.shown().paused.unwrap().reason;
    assert!(reason.contains("secret access key"), "{reason}");
    let puts_at_pause = h.count(Op::Put);
    assert!(
        puts_at_pause <= 4,
        "no storm: {puts_at_pause} uploads before the pause"
    );
    // A minute of outage: only paced probes.
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Equal jitter draws each wait from half to all of 1, 2, 4, 8, 8, ...
    // seconds: at the shortest, 0.5 + 1 + 2 + 4 s and then one every 4 s,
    // so 18 at most (14 was passed by an unlucky draw); a storm is hundreds.
    let probes = h.count(Op::Probe);
    assert!(
        (3..=18).contains(&probes),
        "{probes} probes in a minute with backoff 1s..8s"
    );
    assert_eq!(
        h.count(Op::Put),
        puts_at_pause,
        "nothing uploaded while paused"
    );
    assert!(
        h.live.shown().failed.is_empty(),
        "a paused provider parks nothing"
    );
    broken.store(false, Ordering::SeqCst);
    until(30, "everything drained", || {
        (0..20).all(|i| h.store.object(&format!("pre/f{i:02}.png")).is_some())
    })
    .await;
    assert!(h.live.shown().paused.is_none(), "resumed");
    h.stop().await;
}

/// A key that may write but not read: with deletion on, every upload's
/// verifying HEAD is refused. The probe reads too, so the provider pauses
/// with that reason instead of each file being sent again until it is
/// parked; with the permission granted, everything is verified.
#[tokio::test(start_paused = true)]
async fn a_key_that_cannot_read_pauses_the_provider_when_copies_are_deleted() {
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    h.store.script(move |r| {
        (b.load(Ordering::SeqCst) && r.op == Op::Head).then(crate::remote::fake::head_refused)
    });
    for i in 0..5 {
        h.write(&format!("f{i}.png"), b"data").await;
    }
    until(10, "paused", || h.live.shown().paused.is_some()).await;
    let reason = h.live.shown().paused.unwrap().reason;
    assert!(reason.contains("s3:GetObject"), "{reason}");
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(
        h.live.shown().failed.is_empty(),
        "a key that cannot read parks nothing"
    );
    let puts = h.count(Op::Put);
    assert!(puts <= 5, "{puts} uploads: each file sent at most once");
    broken.store(false, Ordering::SeqCst);
    until(60, "resumed", || h.live.shown().paused.is_none()).await;
    until(60, "all verified and deleted", || {
        (0..5).all(|i| !h.root.join(format!("f{i}.png")).exists())
    })
    .await;
    assert!(h.live.shown().failed.is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn throttling_and_connection_errors_never_park() {
    let mut h = Harness::new(Deletion::Keep);
    let mut n = 0;
    h.store.script(move |r| {
        if r.op != Op::Put {
            return None;
        }
        n += 1;
        match n % 3 {
            0 => Some(http_error(503, "SlowDown")),
            1 => Some(refused()),
            _ => None,
        }
    });
    for i in 0..10 {
        h.write(&format!("t{i}.png"), b"throttled").await;
    }
    until(600, "all uploaded despite throttling", || {
        (0..10).all(|i| h.store.object(&format!("pre/t{i}.png")).is_some())
    })
    .await;
    assert!(h.live.shown().failed.is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_resumed_upload_already_completed_is_recorded_without_sending_it_again() {
    let mut h = Harness::new(Deletion::Keep);
    let data: Vec<u8> = (0..(12 * MIB) as u32).map(|i| (i % 251) as u8).collect();
    let abs = h.write("big.mp4", &data).await;
    let key = Harness::key("big.mp4");
    until(60, "uploaded", || h.queue.record(&key).unwrap().is_some()).await;
    assert!(h.store.object("pre/big.mp4").is_some());
    h.stop().await;

    // As after a SIGKILL between CompleteMultipartUpload and the record: the
    // record is missing and the item still names an upload id the server no
    // longer knows.
    let identity = crate::pipeline::finished::FileIdentity::of(&std::fs::metadata(&abs).unwrap());
    h.queue.forget(&key).unwrap();
    h.queue
        .admit(&key, &identity, crate::pipeline::queue::Admit::Event)
        .unwrap();
    h.queue
        .save_multipart(
            &key,
            &MultipartProgress {
                provider: "fake".into(),
                key: "pre/big.mp4".into(),
                upload_id: "completed-before-the-crash".into(),
                part_size: 5 * MIB,
                identity,
                parts: Vec::new(),
                started_ms: 0,
            },
        )
        .await
        .unwrap();
    let before = h.store.requests().len();
    h.start(Deletion::Keep);
    until(60, "recorded again", || {
        h.queue.record(&key).unwrap().is_some()
    })
    .await;
    let after: Vec<Op> = h.store.requests()[before..].iter().map(|r| r.op).collect();
    assert!(
        !after.contains(&Op::Initiate),
        "not uploaded again: {after:?}"
    );
    assert!(after.contains(&Op::Head), "{after:?}");
    assert!(h.live.shown().paused.is_none());
    assert!(h.queue.item(&key).unwrap().is_none());
    h.stop().await;
}

/// A multipart upload that has to start again (the server answered `code` to
/// `op`) starts from scratch, and the upload it gives up is aborted, not
/// leaked.
async fn a_restart_aborts_the_upload_it_gives_up(op: Op, status: u16, code: &'static str) {
    let mut h = Harness::new(Deletion::Keep);
    let mut once = true;
    h.store.script(move |r| {
        (r.op == op && std::mem::take(&mut once)).then(|| http_error(status, code))
    });
    let data: Vec<u8> = (0..(12 * MIB) as u32).map(|i| (i % 241) as u8).collect();
    h.write("lost.mp4", &data).await;
    let key = Harness::key("lost.mp4");
    until(60, "uploaded", || h.queue.record(&key).unwrap().is_some()).await;
    assert_eq!(h.store.object("pre/lost.mp4").as_deref(), Some(&data[..]));
    assert_eq!(
        h.count(Op::Initiate),
        2,
        "{code}: started again from scratch"
    );
    assert_eq!(h.count(Op::Abort), 1, "{code}: the first upload is aborted");
    h.stop().await;
}

/// The server lost the upload (NoSuchUpload on a part).
#[tokio::test(start_paused = true)]
async fn a_lost_multipart_upload_starts_again_and_is_aborted() {
    a_restart_aborts_the_upload_it_gives_up(Op::Part, 404, "NoSuchUpload").await;
}

/// InvalidPart at the completion leaves the upload open at the server: it
/// used to be forgotten without an abort.
#[tokio::test(start_paused = true)]
async fn an_invalid_part_at_completion_aborts_the_upload_it_gives_up() {
    a_restart_aborts_the_upload_it_gives_up(Op::Complete, 400, "InvalidPart").await;
}

/// A key that lost its write permission refuses the parts of a resumed
/// upload: the provider pauses and the recorded upload with its parts is
/// kept, so that once the operator fixes the key only the missing parts
/// go. It used to be aborted and forgotten (its abort refused too, leaving
/// it at the server) and every part sent again.
#[tokio::test(start_paused = true)]
async fn a_refusal_while_resuming_keeps_the_recorded_upload() {
    let mut h = Harness::new(Deletion::Keep);
    let parts_ok = Arc::new(AtomicUsize::new(1));
    let denied = Arc::new(AtomicBool::new(false));
    let (ok, no) = (parts_ok.clone(), denied.clone());
    h.store.script(move |r| {
        if no.load(Ordering::SeqCst) {
            return (r.op != Op::Head).then(|| http_error(403, "AccessDenied"));
        }
        // One part is accepted, then every other fails for now.
        if r.op == Op::Part && ok.load(Ordering::SeqCst) > 0 {
            ok.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        (r.op == Op::Part).then(|| http_error(500, "InternalError"))
    });
    let data: Vec<u8> = (0..(12 * MIB) as u32).map(|i| (i % 233) as u8).collect();
    h.write("denied.mp4", &data).await;
    let key = Harness::key("denied.mp4");
    until(60, "a part accepted and more tried", || {
        h.count(Op::Part) >= 3
    })
    .await;
    h.stop().await;

    denied.store(true, Ordering::SeqCst);
    h.start(Deletion::Keep);
    until(60, "the provider paused", || {
        h.live.shown().paused.is_some()
    })
    .await;
    assert_eq!(h.count(Op::Abort), 0, "the recorded upload is kept");
    denied.store(false, Ordering::SeqCst);
    parts_ok.store(usize::MAX, Ordering::SeqCst);
    until(600, "uploaded", || h.queue.record(&key).unwrap().is_some()).await;
    assert_eq!(h.store.object("pre/denied.mp4").as_deref(), Some(&data[..]));
    assert_eq!(h.count(Op::Initiate), 1, "resumed, not started again");
    assert_eq!(h.count(Op::Abort), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn parking_an_item_aborts_its_multipart_upload() {
    let mut h = Harness::new(Deletion::Keep);
    h.store
        .script(|r| (r.op == Op::Part).then(|| http_error(400, "InvalidRequest")));
    let data = vec![7u8; (12 * MIB) as usize];
    h.write("refused.mp4", &data).await;
    let key = Harness::key("refused.mp4");
    until(600, "parked", || h.live.shown().failed.contains_key(&key)).await;
    // Each strike gave its upload up and started another (5363682); the
    // aborts go in the background, the last one filed by the park itself.
    until(10, "every multipart upload started aborted", || {
        h.count(Op::Abort) >= h.count(Op::Initiate)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.count(Op::Initiate) >= 1);
    assert_eq!(
        h.count(Op::Initiate),
        h.count(Op::Abort),
        "each upload aborted once"
    );
    h.stop().await;
}

/// `retry` of an item its worker has just parked on disk, before the
/// scheduler has that outcome, leaves it to the outcome: unparked and
/// queued then, a second worker could take it while the first still ran.
#[tokio::test]
async fn retry_leaves_an_item_in_flight_to_its_worker() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let p = h.root.join("busy.png");
    std::fs::write(&p, b"busy").unwrap();
    let identity = FileIdentity::of(&std::fs::metadata(&p).unwrap());
    let key = Harness::key("busy.png");
    h.queue.admit(&key, &identity, Admit::Event).unwrap();
    let mut s = h.idle_scheduler();
    let flight = Flight {
        started: Instant::now(),
        queued_ms: Some(s.clock.now_ms()),
    };
    // Taken by a worker, which parks it on disk.
    s.lanes.remove(&key);
    s.in_flight.insert(key.clone(), flight);
    h.queue.park(&key, "refused").unwrap();
    let (reply, answer) = oneshot::channel();
    s.command(Command::Retry {
        keys: Some(vec![key.clone()]),
        reply,
    });
    assert_eq!(answer.await.unwrap(), 0, "nothing retried");
    assert!(!s.lanes.contains(&key), "queued beside its worker");
    assert!(h.queue.item(&key).unwrap().unwrap().is_parked());
    // Once its outcome is in, it is retried like any parked item.
    s.in_flight.clear();
    let (reply, answer) = oneshot::channel();
    s.command(Command::Retry {
        keys: Some(vec![key.clone()]),
        reply,
    });
    assert_eq!(answer.await.unwrap(), 1);
    assert!(s.lanes.contains(&key));
}

/// A probe whose answer an upload's success made stale decides nothing,
/// and releases nothing while a newer probe is out: the items that failed
/// since wait for that one's verdict. They were put back at once, with no
/// verdict, no strike and no backoff.
#[tokio::test]
async fn a_stale_probe_leaves_the_items_awaiting_a_newer_one() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let mut s = h.idle_scheduler();
    let provider = s.current().target.name().to_string();
    let now = Instant::now();
    assert_eq!(s.health.item_failed(now), None);
    let first = s.health.want_probe(now).expect("a probe");
    assert_eq!(s.health.upload_succeeded(now), None);
    // Another item, started after that success, fails: a second probe goes
    // out, and the item awaits it.
    let later = now + Duration::from_millis(1);
    assert_eq!(s.health.item_failed(later), None);
    let second = s.health.want_probe(later).expect("a second probe");
    let flight = Flight {
        started: later,
        queued_ms: Some(s.clock.now_ms()),
    };
    let err = StorageError::new(ErrorClass::Transient, "timed out");
    s.awaiting
        .push((Harness::key("c.png"), err.clone(), flight));
    s.probed(&provider, first, Err(err.clone()));
    assert_eq!(s.awaiting.len(), 1, "released on a stale answer");
    assert!(s.health.paused().is_none(), "a stale answer paused it");
    s.probed(&provider, second, Err(err));
    assert!(s.awaiting.is_empty(), "the newer probe decides");
    assert!(s.health.paused().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_queued_file_replaced_by_a_directory_is_dropped() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let p = h.root.join("x.png");
    std::fs::write(&p, b"x").unwrap();
    let identity = FileIdentity::of(&std::fs::metadata(&p).unwrap());
    let key = Harness::key("x.png");
    h.queue.admit(&key, &identity, Admit::Event).unwrap();
    std::fs::remove_file(&p).unwrap();
    std::fs::create_dir(&p).unwrap();
    h.start(Deletion::Keep);
    until(30, "the item dropped", || {
        h.queue.item(&key).unwrap().is_none()
    })
    .await;
    assert_eq!(h.count(Op::Put), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_stepped_forward_delays_no_retry() {
    use std::io::Write;
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    h.clock_behind_ms = 3_600_000;
    h.start(Deletion::Keep);
    let p = h.root.join("open.png");
    let mut writer = std::fs::File::create(&p).unwrap();
    writer.write_all(b"still being written").unwrap();
    h.candidates
        .send(Candidate {
            abs: p.clone(),
            trigger: Trigger::Event,
        })
        .await
        .unwrap();
    // The worker finds the writer and asks to look again in a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(h.store.object("pre/open.png").is_none());
    drop(writer);
    until(60, "uploaded soon after the writer closed", || {
        h.store.object("pre/open.png").is_some()
    })
    .await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn turning_deletion_off_cancels_pending_deletes() {
    let mut h = Harness::new(Deletion::After(Duration::from_secs(3600)));
    let abs = h.write("keep.png", b"keep me").await;
    let key = Harness::key("keep.png");
    until(30, "uploaded and waiting for its delete", || {
        h.queue
            .item(&key)
            .unwrap()
            .is_some_and(|i| matches!(i.stage, Stage::Delete { .. }))
    })
    .await;
    let p = plan(&h.root, &h.store, Deletion::Keep);
    h.commands
        .send(Command::Replan {
            plan: p,
            memory_limit: MEMORY_LIMIT,
            applied: oneshot::channel().0,
        })
        .await
        .unwrap();
    until(5, "delete cancelled", || {
        h.queue.item(&key).unwrap().is_none()
    })
    .await;
    assert!(abs.exists());
    assert_eq!(h.queue.record(&key).unwrap().unwrap().local, Local::Present);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn deletes_only_after_the_durable_record() {
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    let abs = h.write("gone.png", b"bytes").await;
    let key = Harness::key("gone.png");
    until(30, "deleted", || !abs.exists()).await;
    assert_eq!(h.store.object("pre/gone.png").unwrap(), b"bytes");
    until(5, "marked", || {
        h.queue.record(&key).unwrap().unwrap().local == Local::Deleted
    })
    .await;
    h.stop().await;
}

/// A file written to again between its upload and its delete is not
/// deleted: it is uploaded again, and its local copy goes only once the new
/// content is in the bucket and recorded.
#[tokio::test(start_paused = true)]
async fn a_file_changed_after_its_upload_is_uploaded_again_before_its_delete() {
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    let abs = h.root.join("a.png");
    let path = abs.clone();
    let mut first = true;
    // The first PUT's body is read and sent: the file changes behind it.
    h.store.script(move |r| {
        if r.op == Op::Put && std::mem::take(&mut first) {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            std::io::Write::write_all(&mut f, b" and more").unwrap();
        }
        None
    });
    h.write("a.png", b"first").await;
    until(30, "the local copy deleted", || !abs.exists()).await;
    assert_eq!(h.store.object("pre/a.png").unwrap(), b"first and more");
    assert_eq!(h.count(Op::Put), 2, "{:?}", h.store.requests());
    let record = h.queue.record(&Harness::key("a.png")).unwrap().unwrap();
    assert_eq!(record.etag, md5_hex(b"first and more"));
    until(5, "marked", || {
        h.queue
            .record(&Harness::key("a.png"))
            .unwrap()
            .unwrap()
            .local
            == Local::Deleted
    })
    .await;
    h.stop().await;
}

/// A delete-through (`offloadd delete`) is refused while the item's failed
/// upload waits for the probe's verdict, as while it is in flight: the item
/// is still the scheduler's, and it comes back as soon as the verdict does.
#[tokio::test(start_paused = true)]
async fn a_hold_is_refused_while_an_upload_waits_for_the_probe() {
    let mut h = Harness::new(Deletion::Keep);
    h.store.hold_probes(true);
    h.store
        .script(|r| (r.op == Op::Put).then(|| http_error(403, "SignatureDoesNotMatch")));
    h.write("a.png", b"a").await;
    until(10, "the upload failed", || h.count(Op::Put) == 1).await;
    // Time for its outcome to reach the scheduler; the probe stays unanswered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.count(Op::Probe), 0);
    let key = Harness::key("a.png");
    let refused = h
        .ask(|reply| Command::Hold { key, reply })
        .await
        .unwrap_err();
    assert!(refused.contains("being uploaded right now"), "{refused}");

    h.store.script(|_| None);
    h.store.hold_probes(false);
    until(30, "uploaded once the verdict is in", || {
        h.store.object("pre/a.png").is_some()
    })
    .await;
    h.stop().await;
}

/// A hold whose caller hung up before its answer (a delete-through that
/// will not follow, so no release either) is undone at once; it used to
/// keep the item out of the pipeline until the next start.
#[tokio::test(start_paused = true)]
async fn a_hold_nobody_receives_is_undone() {
    let mut h = Harness::new(Deletion::Keep);
    h.store
        .script(|r| (r.op == Op::Put).then(|| http_error(400, "InvalidRequest")));
    h.write("a.png", b"a").await;
    let key = Harness::key("a.png");
    until(300, "parked", || h.live.shown().failed.contains_key(&key)).await;
    h.store.script(|_| None);
    let (reply, answer) = tokio::sync::oneshot::channel();
    drop(answer);
    let k = key.clone();
    h.commands
        .send(Command::Hold { key: k, reply })
        .await
        .unwrap();
    // Commands are handled in order: the hold is done with once this answers.
    let keys = Some(vec![key.clone()]);
    assert_eq!(h.ask(|reply| Command::Retry { keys, reply }).await, 1);
    until(30, "uploaded, as nothing holds it", || {
        h.store.object("pre/a.png").is_some()
    })
    .await;
    h.stop().await;
}

/// A held item (a delete-through under way) is not put back by anything
/// else: here `offloadd retry` of the parked item while it is held. Its
/// release resumes it.
#[tokio::test(start_paused = true)]
async fn nothing_requeues_a_held_item() {
    let mut h = Harness::new(Deletion::Keep);
    let key = h.parked_and_held("a.png").await;
    let keys = Some(vec![key.clone()]);
    h.ask(|reply| Command::Retry { keys, reply }).await;
    // Half a minute held, with real time for the blocking threads.
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        h.store.object("pre/a.png").is_none(),
        "not uploaded while held"
    );

    h.ask(|reply| Command::Release { key, reply }).await;
    until(30, "uploaded once released", || {
        h.store.object("pre/a.png").is_some()
    })
    .await;
    h.stop().await;
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(bytes))
}

/// A local copy that stays is verified by the server's answers: no HEAD, and
/// the record carries the ETag the PUT or the completion answered.
#[tokio::test(start_paused = true)]
async fn a_kept_local_copy_is_verified_by_the_answer_without_a_head() {
    let mut h = Harness::new(Deletion::Keep);
    let big: Vec<u8> = (0..9 * MIB).map(|i| (i % 251) as u8).collect();
    h.write("small.png", b"small").await;
    let big_path = h.write("big.mp4", &big).await;
    until(60, "both recorded", || {
        ["small.png", "big.mp4"]
            .iter()
            .all(|r| h.queue.record(&Harness::key(r)).unwrap().is_some())
    })
    .await;
    assert_eq!(h.count(Op::Head), 0, "{:?}", h.store.requests());
    let small = h.queue.record(&Harness::key("small.png")).unwrap().unwrap();
    assert_eq!(small.etag, md5_hex(b"small"));
    let big_etag = h
        .queue
        .record(&Harness::key("big.mp4"))
        .unwrap()
        .unwrap()
        .etag;
    let file = std::fs::File::open(&big_path).unwrap();
    assert_eq!(
        big_etag,
        upload::composite_etag(&file, 9 * MIB, 5 * MIB).unwrap()
    );
    assert_eq!(h.store.object("pre/big.mp4").unwrap(), big);
    h.stop().await;
}

/// An answer whose ETag is not the one computed from what was sent is never
/// recorded: the file is sent again, single PUT or multipart.
#[tokio::test(start_paused = true)]
async fn a_misreported_answer_is_never_recorded_and_the_file_goes_again() {
    let mut h = Harness::new(Deletion::Keep);
    h.store.misreport(Op::Put, 1);
    h.store.misreport(Op::Complete, 1);
    let big: Vec<u8> = (0..9 * MIB).map(|i| (i % 241) as u8).collect();
    h.write("small.png", b"small").await;
    h.write("big.mp4", &big).await;
    until(120, "both recorded", || {
        ["small.png", "big.mp4"]
            .iter()
            .all(|r| h.queue.record(&Harness::key(r)).unwrap().is_some())
    })
    .await;
    let ops: Vec<Op> = h.store.requests().iter().map(|r| r.op).collect();
    assert_eq!(ops.iter().filter(|o| **o == Op::Put).count(), 2, "{ops:?}");
    // The multipart upload was completed (under the misreport) before: the
    // next attempt finds it so by a HEAD and recomputing from the file, or
    // sends it again.
    assert!(
        ops.contains(&Op::Head) || ops.iter().filter(|o| **o == Op::Complete).count() == 2,
        "{ops:?}"
    );
    let small = h.queue.record(&Harness::key("small.png")).unwrap().unwrap();
    assert_eq!(small.etag, md5_hex(b"small"));
    let big_rec = h.queue.record(&Harness::key("big.mp4")).unwrap().unwrap();
    let file = std::fs::File::open(h.root.join("big.mp4")).unwrap();
    assert_eq!(
        big_rec.etag,
        upload::composite_etag(&file, 9 * MIB, 5 * MIB).unwrap()
    );
    h.stop().await;
}

/// An ETag that never matches what was sent (a bucket that encrypts with
/// SSE-KMS by default, which offloadd was not told) parks the file after a
/// bounded number of uploads, with a reason that says what to set. It used
/// to be blamed on the provider (our own check has no HTTP status) and sent
/// again every `max_backoff`, for ever, recording nothing.
#[tokio::test(start_paused = true)]
async fn an_etag_that_never_matches_parks_the_file_after_a_few_uploads() {
    let mut h = Harness::new(Deletion::Keep);
    h.store.misreport(Op::Put, 1_000);
    h.write("kms.png", b"encrypted by the bucket").await;
    let key = Harness::key("kms.png");
    until(600, "parked", || h.live.shown().failed.contains_key(&key)).await;
    let puts = h
        .store
        .requests()
        .iter()
        .filter(|r| r.op == Op::Put)
        .count();
    assert_eq!(puts, MAX_STRIKES as usize, "a bounded number of uploads");
    let reason = h.live.shown().failed[&key].clone();
    // Not "…; uploading it again (it failed…)": it is parked.
    assert_eq!(
        reason,
        format!(
            "object `pre/kms.png` answered ETag {WRONG_ETAG} after upload, expected {} (the MD5 of what was sent); if bucket `media` encrypts with SSE-KMS by default, set `server_side_encryption: aws:kms` for provider `fake` (it failed {MAX_STRIKES} times while the provider accepted other requests; fix the cause, then run `offloadd retry`)",
            md5_hex(b"encrypted by the bucket")
        )
    );
    assert!(h.queue.record(&key).unwrap().is_none());
    // Each upload counted once: the last as parked, not also as transient.
    let text = h.live.metrics.encode();
    assert!(
        text.contains(&format!(
            "offloadd_uploads_total{{result=\"transient\"}} {}\n",
            MAX_STRIKES - 1
        )) && text.contains("offloadd_uploads_total{result=\"parked\"} 1\n"),
        "{text}"
    );
    h.stop().await;
}

/// An upload that started on the provider before a switch and fails is
/// backed off without a strike, and the new provider's health is left
/// alone: no suspicion, no probe of it, no verdict awaited. It used to make
/// the new provider suspect (uploads to it waited for a probe) and, a 4xx,
/// cost the item a strike once that probe succeeded.
#[tokio::test(start_paused = true)]
async fn a_failure_on_the_provider_before_a_switch_is_not_held_against_the_new_one() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    queued(&h, "a.png", b"a");
    let key = Harness::key("a.png");
    let mut s = h.idle_scheduler();
    let flight = Flight {
        started: Instant::now(),
        queued_ms: None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let other = Arc::new(FakeStore::named("other"));
    let (applied, _) = oneshot::channel();
    s.command(Command::Replan {
        plan: plan(&h.root, &other, Deletion::Keep),
        memory_limit: MEMORY_LIMIT,
        applied,
    });
    assert_eq!(s.current().target.name(), "other");
    s.failed(key.clone(), http_error(403, "AccessDenied"), flight);
    assert!(
        s.awaiting.is_empty(),
        "no verdict of the new provider awaited"
    );
    assert!(s.health.want_probe(Instant::now()).is_none(), "not suspect");
    let item = h.queue.item(&key).unwrap().unwrap();
    assert_eq!((item.attempts, item.strikes), (1, 0), "{item:?}");
    assert!(s.lanes.contains(&key), "backed off in its lane");
}

/// A local copy to be deleted needs a HEAD that shows the object as sent,
/// whatever the PUT answered: a HEAD that misreports it means no delete and
/// the file goes again.
#[tokio::test(start_paused = true)]
async fn a_delete_waits_for_a_head_that_shows_the_object_as_sent() {
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    h.store.misreport(Op::Head, 1);
    let abs = h.write("gone.png", b"bytes").await;
    let key = Harness::key("gone.png");
    until(60, "deleted", || !abs.exists()).await;
    let ops: Vec<Op> = h.store.requests().iter().map(|r| r.op).collect();
    assert_eq!(
        ops.iter().filter(|o| **o == Op::Put).count(),
        2,
        "sent again after the misreporting HEAD: {ops:?}"
    );
    assert_eq!(
        ops.last(),
        Some(&Op::Head),
        "the delete followed a HEAD: {ops:?}"
    );
    assert_eq!(
        h.queue.record(&key).unwrap().unwrap().etag,
        md5_hex(b"bytes")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_state_failure_pauses_everything_until_it_recovers() {
    let mut h = Harness::new(Deletion::Keep);
    h.queue.inject_failure("No space left on device");
    let p = h.root.join("wait.png");
    std::fs::write(&p, b"w").unwrap();
    // Admitted before the failure, as if queued earlier.
    h.stop().await;
    h.queue.recover().unwrap();
    let id = crate::pipeline::finished::FileIdentity::of(&std::fs::metadata(&p).unwrap());
    h.queue
        .admit(
            &Harness::key("wait.png"),
            &id,
            crate::pipeline::queue::Admit::Event,
        )
        .unwrap();
    h.queue.inject_failure("No space left on device");
    h.start(Deletion::Keep);
    until(2, "paused", || h.live.shown().pipeline_paused.is_some()).await;
    let why = h.live.shown().pipeline_paused.unwrap();
    assert!(
        why.contains("state_dir") && why.contains("No space left"),
        "{why}"
    );
    assert!(
        h.live.shown().paused.is_none(),
        "the provider is not blamed"
    );
    assert_eq!(h.count(Op::Put), 0, "nothing leaves the queue");
    until(30, "recovered and uploaded", || {
        h.store.object("pre/wait.png").is_some()
    })
    .await;
    assert!(h.live.shown().pipeline_paused.is_none());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_missing_root_pauses_and_keeps_the_queue() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let p = h.root.join("kept.png");
    std::fs::write(&p, b"k").unwrap();
    let id = crate::pipeline::finished::FileIdentity::of(&std::fs::metadata(&p).unwrap());
    let key = Harness::key("kept.png");
    h.queue
        .admit(&key, &id, crate::pipeline::queue::Admit::Event)
        .unwrap();
    let away = h.root.with_file_name("away");
    std::fs::rename(&h.root, &away).unwrap();
    std::fs::create_dir(&h.root).unwrap();
    assert!(h.guard.check().await.is_err());
    h.start(Deletion::Keep);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.live.shown().pipeline_paused.is_some());
    assert!(
        h.queue.item(&key).unwrap().is_some(),
        "not dropped as vanished"
    );
    assert_eq!(h.count(Op::Put), 0);
    std::fs::remove_dir(&h.root).unwrap();
    std::fs::rename(&away, &h.root).unwrap();
    assert!(h.guard.check().await.is_ok());
    until(30, "uploaded after the root returned", || {
        h.store.object("pre/kept.png").is_some()
    })
    .await;
    h.stop().await;
}

/// Files put into the root and queued on disk (as a previous run left them),
/// without a scheduler running.
fn queue_on_disk(h: &Harness, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let rel = format!("q/{i:03}.png");
            let abs = h.root.join(&rel);
            std::fs::create_dir_all(abs.parent().unwrap()).unwrap();
            std::fs::write(&abs, format!("file {i}")).unwrap();
            let identity = FileIdentity::of(&std::fs::symlink_metadata(&abs).unwrap());
            let admitted = h.queue.admit(&Harness::key(&rel), &identity, Admit::Event);
            assert!(matches!(admitted, Ok(Admission::Queued(_))));
            abs
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_queue_longer_than_the_window_is_counted_and_drains_completely() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let files = queue_on_disk(&h, 40);
    h.window = 4;
    // The provider is down: nothing leaves the queue, all of it is counted.
    h.store.script(|_| Some(refused()));
    h.start(Deletion::Keep);
    until(60, "paused", || h.live.shown().paused.is_some()).await;
    assert_eq!(h.live.queue_depth.load(Ordering::Relaxed), 40);
    // New files while the window is full go to the backlog on disk.
    h.write("q/new.png", b"new").await;
    until(5, "the new file counted", || {
        h.live.queue_depth.load(Ordering::Relaxed) == 41
    })
    .await;
    let failed_puts = h.count(Op::Put);
    h.store.script(|_| None);
    until(600, "every file uploaded", || {
        h.queue.items().unwrap().is_empty()
    })
    .await;
    for (i, abs) in files.iter().enumerate() {
        let object = h.store.object(&format!("pre/q/{i:03}.png"));
        assert_eq!(object.unwrap(), std::fs::read(abs).unwrap());
    }
    assert_eq!(h.store.object("pre/q/new.png").unwrap(), b"new");
    until(5, "depth 0", || {
        h.live.queue_depth.load(Ordering::Relaxed) == 0
    })
    .await;
    // Each file was sent once: the backlog never hands out an item twice.
    assert_eq!(h.count(Op::Put) - failed_puts, 41);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn deletes_beyond_the_window_are_done_and_cancelled_too() {
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    h.stop().await;
    h.window = 2;
    let files = queue_on_disk(&h, 12);
    h.start(Deletion::After(Duration::from_secs(3600)));
    until(120, "all uploaded and waiting for their deletes", || {
        let items = h.queue.items().unwrap();
        items.len() == 12
            && items
                .iter()
                .all(|(_, i)| matches!(i.stage, Stage::Delete { .. }))
    })
    .await;
    until(5, "all counted, none in flight", || {
        h.live.queue_depth.load(Ordering::Relaxed) == 12
            && h.live.in_flight.load(Ordering::Relaxed) == 0
    })
    .await;
    // Turning deletion off cancels those on disk only as well.
    let p = plan(&h.root, &h.store, Deletion::Keep);
    h.ask(|applied| Command::Replan {
        plan: p,
        memory_limit: MEMORY_LIMIT,
        applied,
    })
    .await;
    let left = h.queue.items().unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(files.iter().all(|f| f.exists()));
    until(5, "depth 0", || {
        h.live.queue_depth.load(Ordering::Relaxed) == 0
    })
    .await;
    h.stop().await;

    // And with deletion on, the ones beyond the window are deleted.
    let files = queue_on_disk(&h, 12);
    h.start(Deletion::After(Duration::ZERO));
    until(120, "every local copy deleted", || {
        files.iter().all(|f| !f.exists())
    })
    .await;
    for i in 0..12 {
        let key = Harness::key(&format!("q/{i:03}.png"));
        assert_eq!(h.queue.record(&key).unwrap().unwrap().local, Local::Deleted);
    }
    h.stop().await;
}

/// Items due while nothing can take them do not wake the loop: with the
/// pipeline paused it looks once a second, with every worker busy when one
/// ends. It used to turn every 5 ms for as long as either lasted (a whole
/// outage of the root or of state_dir, every backlog drain).
#[tokio::test]
async fn due_items_that_cannot_be_dispatched_do_not_wake_the_loop() {
    let mut h = Harness::new(Deletion::Keep);
    let mut s = h.idle_scheduler();
    let now = s.clock.now_ms();
    let due = Entry {
        lane: Lane::Upload,
        due_ms: now,
        queued_ms: Some(now),
    };
    s.lanes.insert(Harness::key("due.png"), due);
    assert_eq!(s.next_wake(), Duration::from_millis(5));
    for i in 0..4 {
        let flight = Flight {
            started: Instant::now(),
            queued_ms: None,
        };
        s.in_flight
            .insert(Harness::key(&format!("busy{i}.png")), flight);
    }
    // Only the sweep of parked items is left to wake it.
    assert!(
        s.next_wake() >= SWEEP_PARKED_EVERY - Duration::from_secs(5),
        "{:?}",
        s.next_wake()
    );
    s.in_flight.clear();
    s.paused = Some("watch.root is not available".into());
    assert_eq!(s.next_wake(), Duration::from_secs(1));
    // A sweep falling due during a pause is put off, not left due (which
    // woke the loop at once for the rest of the pause).
    s.next_sweep = Instant::now() - Duration::from_secs(1);
    s.maintain().await;
    assert!(s.next_sweep > Instant::now());
    h.stop().await;
}

/// A delete-through that fails gives back what its hold took: a parked item
/// is listed again (it used to vanish from `status` and `retry --all` until a
/// restart), and a file event that came meanwhile is looked at (it used to
/// be dropped, leaving a rewritten file to the next rescan).
#[tokio::test(start_paused = true)]
async fn a_release_gives_back_what_the_hold_took() {
    let mut h = Harness::new(Deletion::Keep);
    let a = h.parked_and_held("a.png").await;
    let k = a.clone();
    h.ask(|reply| Command::Release { key: k, reply }).await;
    assert!(
        h.live.shown().failed.contains_key(&a),
        "the parked item is listed again"
    );

    let b = Harness::key("b.png");
    let k = b.clone();
    h.ask(|reply| Command::Hold { key: k, reply })
        .await
        .unwrap();
    h.write("b.png", b"b").await;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(h.store.object("pre/b.png").is_none(), "uploaded while held");
    h.ask(|reply| Command::Release { key: b, reply }).await;
    until(30, "uploaded once released", || {
        h.store.object("pre/b.png").is_some()
    })
    .await;
    h.stop().await;
}

/// A parked item whose file is gone is dropped by the next sweep: nothing
/// else finds it again, so it stayed in the database and in `status` for
/// good (every symbolic link the application ever made, say). One whose
/// file is there stays parked.
#[tokio::test(start_paused = true)]
async fn parked_items_whose_file_is_gone_are_dropped() {
    let mut h = Harness::new(Deletion::Keep);
    std::fs::write(h.root.join("target.png"), b"t").unwrap();
    for name in ["gone.png", "kept.png"] {
        let link = h.root.join(name);
        std::os::unix::fs::symlink("target.png", &link).unwrap();
        h.candidates
            .send(Candidate {
                abs: link,
                trigger: Trigger::Event,
            })
            .await
            .unwrap();
    }
    let (gone, kept) = (Harness::key("gone.png"), Harness::key("kept.png"));
    until(30, "both parked", || {
        let failed = h.live.shown().failed;
        failed.contains_key(&gone) && failed.contains_key(&kept)
    })
    .await;
    std::fs::remove_file(h.root.join("gone.png")).unwrap();
    tokio::time::sleep(SWEEP_PARKED_EVERY + Duration::from_secs(1)).await;
    until(5, "the gone one dropped", || {
        !h.live.shown().failed.contains_key(&gone)
    })
    .await;
    assert!(h.queue.item(&gone).unwrap().is_none());
    assert!(h.live.shown().failed.contains_key(&kept));
    assert!(h.queue.item(&kept).unwrap().unwrap().is_parked());
    h.stop().await;
}

/// The abort of a multipart upload given up stays filed until it goes
/// through: the provider fails it (a 500), and the next start sends it
/// again; failed again, the next sweep does. The upload id used to be
/// forgotten when the item was parked, whatever became of its abort (a
/// failure, or a stop before it went), leaving its parts billed for good.
#[tokio::test(start_paused = true)]
async fn an_abort_that_fails_is_sent_again() {
    let mut h = Harness::new(Deletion::Keep);
    let fail_aborts = Arc::new(AtomicBool::new(true));
    let fail = fail_aborts.clone();
    h.store.script(move |r| match r.op {
        Op::Part => Some(http_error(413, "EntityTooLarge")),
        Op::Abort if fail.load(Ordering::SeqCst) => Some(http_error(500, "InternalError")),
        _ => None,
    });
    h.write("refused.mp4", &vec![7u8; (12 * MIB) as usize])
        .await;
    let key = Harness::key("refused.mp4");
    until(600, "parked", || h.live.shown().failed.contains_key(&key)).await;
    until(10, "an abort tried", || h.count(Op::Abort) >= 1).await;
    h.stop().await;
    assert_eq!(h.queue.pending_aborts().len(), 1, "filed until it goes");

    // The next start sends it again; it fails once more.
    h.start(Deletion::Keep);
    until(10, "sent again at the start", || h.count(Op::Abort) >= 2).await;
    fail_aborts.store(false, Ordering::SeqCst);
    tokio::time::sleep(SWEEP_PARKED_EVERY + Duration::from_secs(1)).await;
    until(10, "aborted by the sweep", || {
        h.queue.pending_aborts().is_empty()
    })
    .await;
    assert_eq!(h.count(Op::Abort), 3);
    assert_eq!(h.count(Op::Initiate), 1);
    h.stop().await;
}

/// An item done, a delete as much as an upload, is progress for the
/// watchdog: a run of deletes that keeps every worker busy for minutes (a
/// day's uploads falling due together) made the watchdog take the daemon
/// for stalled, since only upload steps counted.
#[tokio::test]
async fn a_finished_delete_is_progress_for_the_watchdog() {
    let mut h = Harness::new(Deletion::Keep);
    let mut s = h.idle_scheduler();
    let key = Harness::key("deleted.png");
    let flight = Flight {
        started: Instant::now(),
        queued_ms: None,
    };
    s.in_flight.insert(key.clone(), flight);
    let progress = Arc::new(Live::default());
    s.live = progress.clone();
    let now = statedir::now_ms();
    assert!(progress.progress.overdue(now), "no step yet");
    let done = s.tasks.spawn(async move {
        Done::Item {
            key,
            outcome: Outcome::Settled,
        }
    });
    drop(done);
    let finished = s.tasks.join_next_with_id().await.unwrap();
    s.finished(finished);
    assert!(!progress.progress.overdue(now + 60_000));
    h.stop().await;
}

/// An item parked by an error only it can have is one parked upload in
/// `/metrics`, not two, and no retry.
#[tokio::test(start_paused = true)]
async fn a_parked_item_counts_once() {
    let mut h = Harness::new(Deletion::Keep);
    h.store
        .script(|r| (r.op == Op::Put).then(|| http_error(413, "EntityTooLarge")));
    h.write("big.png", b"too large for the proxy").await;
    let key = Harness::key("big.png");
    until(60, "parked", || h.live.shown().failed.contains_key(&key)).await;
    let text = h.live.metrics.encode();
    assert!(
        text.contains("offloadd_uploads_total{result=\"parked\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("offloadd_retries_total 0\n"), "{text}");
    h.stop().await;
}

/// `offloadd_queue_depth` counts uploads waiting, not local copies waiting
/// for `delete_after`: with a day's delay, a day of uploads kept the alerts
/// on the metric (backlog growing, no recent upload) firing on a daemon that
/// keeps up. `status` counts both.
#[tokio::test(start_paused = true)]
async fn the_queue_depth_metric_counts_uploads_only() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    h.start(Deletion::After(Duration::from_secs(86_400)));
    h.write("a.png", b"a").await;
    let key = Harness::key("a.png");
    until(30, "uploaded", || h.queue.record(&key).unwrap().is_some()).await;
    until(5, "waiting for its delete", || {
        h.live.queue_depth.load(Ordering::Relaxed) == 1
            && h.live.in_flight.load(Ordering::Relaxed) == 0
    })
    .await;
    let text = h.live.metrics.encode();
    assert!(text.contains("offloadd_queue_depth 0\n"), "{text}");
    h.stop().await;
}

/// A filed abort goes only once the item's giving up of the upload is on
/// disk: here the state_dir fails right after, and no abort is sent until it
/// works again. A SIGKILL in that window used to leave the item resuming an
/// upload already aborted, which the server refused for good (the file was
/// parked, never uploaded: torture's kill loop).
#[tokio::test(start_paused = true)]
async fn an_abort_waits_until_the_upload_is_given_up_on_disk() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    std::fs::write(h.root.join("v.mp4"), b"v").unwrap();
    let key = Harness::key("v.mp4");
    let identity = crate::pipeline::finished::FileIdentity::of(
        &std::fs::metadata(h.root.join("v.mp4")).unwrap(),
    );
    h.queue
        .admit(&key, &identity, crate::pipeline::queue::Admit::Event)
        .unwrap();
    let progress = MultipartProgress {
        provider: "fake".into(),
        key: "pre/v.mp4".into(),
        upload_id: "given-up".into(),
        part_size: 5 * MIB,
        identity,
        parts: Vec::new(),
        started_ms: 0,
    };
    h.queue.note_multipart(&key, &progress).unwrap();
    h.queue.park(&key, "refused").unwrap();
    h.queue.inject_failure("No space left on device");
    h.start(Deletion::Keep);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(h.count(Op::Abort), 0, "sent before it was durable");
    tokio::time::sleep(SWEEP_PARKED_EVERY + Duration::from_secs(1)).await;
    until(10, "sent once durable", || h.count(Op::Abort) == 1).await;
    h.stop().await;
}

/// A recorded upload the server forgot, refused (AccessDenied, as s3s-fs
/// answers for an id it no longer knows) while the provider accepts other
/// requests, starts again from scratch after its first strike. It used to be
/// kept until the file was parked, never uploaded (s3s-fs forgets an upload
/// whose completion a SIGKILL cut short: torture's kill loop).
#[tokio::test(start_paused = true)]
async fn a_forgotten_upload_refused_while_others_pass_starts_again() {
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let data: Vec<u8> = (0..(12 * MIB) as u32).map(|i| (i % 239) as u8).collect();
    let abs = h.root.join("v.mp4");
    std::fs::write(&abs, &data).unwrap();
    let key = Harness::key("v.mp4");
    let identity = crate::pipeline::finished::FileIdentity::of(&std::fs::metadata(&abs).unwrap());
    h.queue
        .admit(&key, &identity, crate::pipeline::queue::Admit::Event)
        .unwrap();
    let forgotten = MultipartProgress {
        provider: "fake".into(),
        key: "pre/v.mp4".into(),
        upload_id: "forgotten".into(),
        part_size: 5 * MIB,
        identity,
        parts: Vec::new(),
        started_ms: 0,
    };
    h.queue.save_multipart(&key, &forgotten).await.unwrap();
    let mut restarted = false;
    h.store.script(move |r| {
        restarted |= r.op == Op::Initiate;
        (r.op == Op::Part && !restarted).then(|| http_error(403, "AccessDenied"))
    });
    h.start(Deletion::Keep);
    until(600, "uploaded", || h.queue.record(&key).unwrap().is_some()).await;
    assert_eq!(h.store.object("pre/v.mp4").as_deref(), Some(&data[..]));
    assert!(!h.live.shown().failed.contains_key(&key));
    h.stop().await;
}

/// Lets `secs` virtual seconds pass, a second at a time, with real time for
/// the blocking threads (a delete) in between.
async fn idle(secs: u64) {
    for _ in 0..secs {
        std::thread::sleep(Duration::from_millis(5));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Queues `rel` on disk with `bytes` (as a previous run left it); its path.
fn queued(h: &Harness, rel: &str, bytes: &[u8]) -> PathBuf {
    let abs = h.root.join(rel);
    std::fs::write(&abs, bytes).unwrap();
    let identity = FileIdentity::of(&std::fs::metadata(&abs).unwrap());
    h.queue
        .admit(&Harness::key(rel), &identity, Admit::Event)
        .unwrap();
    abs
}

/// A mount that drops out (its FUSE daemon gone: ENOTCONN) fails every file
/// at once, before the root's poll sees it: the first file whose stat
/// fails, and the first whose open fails, pause the pipeline instead of
/// being parked, and go once the root is back. They used to be parked, and a
/// rescan left them so.
#[tokio::test(start_paused = true)]
async fn a_mount_that_drops_out_parks_nothing() {
    use crate::pipeline::localfs::{self, Call};
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let (a, b) = (queued(&h, "a.png", b"a"), queued(&h, "b.png", b"b"));
    // Another file system at the root now, holding files of the same
    // names, which the guard has not looked at yet.
    let away = h.root.with_file_name("away");
    std::fs::rename(&h.root, &away).unwrap();
    std::fs::create_dir(&h.root).unwrap();
    std::fs::write(&a, b"a").unwrap();
    std::fs::write(&b, b"b").unwrap();
    localfs::inject(&a, Call::Stat, libc::ENOTCONN);
    localfs::inject(&b, Call::Open, libc::ENOTCONN);
    h.start(Deletion::Keep);
    until(10, "paused", || h.live.shown().pipeline_paused.is_some()).await;
    idle(5).await;
    assert!(h.live.shown().failed.is_empty(), "{:?}", h.live.shown());
    for rel in ["a.png", "b.png"] {
        let item = h.queue.item(&Harness::key(rel)).unwrap().unwrap();
        assert!(!item.is_parked(), "{item:?}");
    }
    assert_eq!(h.count(Op::Put), 0);

    std::fs::remove_dir_all(&h.root).unwrap();
    std::fs::rename(&away, &h.root).unwrap();
    localfs::heal(&a);
    localfs::heal(&b);
    assert!(h.guard.check().await.is_ok());
    until(30, "both uploaded once the root is back", || {
        h.store.object("pre/a.png").is_some() && h.store.object("pre/b.png").is_some()
    })
    .await;
    h.stop().await;
}

/// A file whose stat or open fails for a reason that says nothing about it
/// (a mount below the root that hangs, an I/O error of a FUSE daemon) while
/// the root is there backs off, however many times, with the error in
/// `status`, and is uploaded once it passes. It used to be parked at once.
#[tokio::test(start_paused = true)]
async fn a_file_on_a_failing_mount_waits_and_is_never_parked() {
    use crate::pipeline::localfs::{self, Call};
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let (a, b) = (queued(&h, "a.png", b"a"), queued(&h, "b.png", b"b"));
    localfs::inject(&a, Call::Stat, libc::ENOTCONN);
    localfs::inject(&b, Call::Open, libc::EIO);
    h.start(Deletion::Keep);
    idle(120).await;
    assert!(h.live.shown().failed.is_empty(), "{:?}", h.live.shown());
    for (rel, error) in [
        ("a.png", "Transport endpoint is not connected"),
        ("b.png", "Input/output error"),
    ] {
        let item = h.queue.item(&Harness::key(rel)).unwrap().unwrap();
        assert!(!item.is_parked(), "{item:?}");
        assert!(item.attempts > MAX_STRIKES, "{item:?}");
        assert!(item.attempts < 40, "backed off: {item:?}");
        assert_eq!(item.strikes, 0);
        let why = item.last_error.unwrap();
        assert!(
            why.contains(error) && why.ends_with("offloadd tries again later"),
            "{why}"
        );
    }
    assert!(h.live.shown().last_error.is_some());
    localfs::heal(&a);
    localfs::heal(&b);
    until(60, "both uploaded once it passed", || {
        h.store.object("pre/a.png").is_some() && h.store.object("pre/b.png").is_some()
    })
    .await;
    h.stop().await;
}

/// The delete of an uploaded file whose mount dropped out (its open and its
/// stat fail with ENOTCONN) is tried again later: the file is not taken for
/// changed and uploaded again.
#[tokio::test(start_paused = true)]
async fn a_delete_on_a_mount_that_drops_out_uploads_nothing_again() {
    use crate::pipeline::localfs::{self, Call};
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    let abs = h.root.join("a.png");
    let path = abs.clone();
    // Right after the body is read: the mount drops out.
    h.store.script(move |r| {
        if r.op == Op::Put {
            localfs::inject(&path, Call::Open, libc::ENOTCONN);
            localfs::inject(&path, Call::Stat, libc::ENOTCONN);
        }
        None
    });
    h.write("a.png", b"first").await;
    let key = Harness::key("a.png");
    until(30, "uploaded", || h.queue.record(&key).unwrap().is_some()).await;
    idle(60).await;
    let item = h.queue.item(&key).unwrap().unwrap();
    assert!(matches!(item.stage, Stage::Delete { .. }), "{item:?}");
    assert!(item.attempts >= 3, "{item:?}");
    let why = item.last_error.unwrap();
    assert!(why.contains("cannot delete the local copy"), "{why}");
    assert_eq!(h.queue.record(&key).unwrap().unwrap().local, Local::Present);

    h.store.script(|_| None);
    localfs::heal(&abs);
    until(60, "deleted once the mount is back", || !abs.exists()).await;
    until(5, "marked", || {
        h.queue.record(&key).unwrap().unwrap().local == Local::Deleted
    })
    .await;
    assert_eq!(h.count(Op::Put), 1, "uploaded once");
    h.stop().await;
}

/// A file that cannot be read (EIO: a bad sector) while it is unchanged is
/// no file that changed: it backs off with a strike per attempt and is
/// parked after [`MAX_STRIKES`] with the reason, its multipart upload kept
/// between attempts and aborted when parked. It used to be taken for
/// changed: sent again every `settle`, for ever, never shown as failed.
async fn a_file_that_cannot_be_read_is_parked_after_a_few_tries(rel: &str, len: usize) {
    use crate::pipeline::localfs::{self, Call};
    let mut h = Harness::new(Deletion::Keep);
    h.stop().await;
    let abs = queued(&h, rel, &vec![3u8; len]);
    localfs::inject(&abs, Call::Read, libc::EIO);
    h.start(Deletion::Keep);
    let key = Harness::key(rel);
    // The clock is moved by hand: a file read again at once, for ever, keeps
    // a blocking read in flight, which holds a paused clock still.
    let start = Instant::now();
    while !h.live.shown().failed.contains_key(&key) {
        let item = h.queue.item(&key).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "not parked: {item:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    localfs::heal(&abs);
    let reason = h.live.shown().failed[&key].clone();
    assert_eq!(
        reason,
        format!(
            "cannot read {}: Input/output error (os error 5); check the disk, then run `offloadd retry` (it failed {MAX_STRIKES} times while the watch root was there)",
            abs.display()
        )
    );
    assert_eq!(h.count(Op::Put) + h.count(Op::Part), 0, "nothing sent");
    if len > 8 * MIB as usize {
        assert_eq!(h.count(Op::Initiate), 1, "the upload kept between tries");
        until(10, "aborted once parked", || h.count(Op::Abort) == 1).await;
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_small_file_that_cannot_be_read_is_parked_after_a_few_tries() {
    a_file_that_cannot_be_read_is_parked_after_a_few_tries("a.png", 1_000).await;
}

#[tokio::test(start_paused = true)]
async fn a_big_file_that_cannot_be_read_is_parked_after_a_few_tries() {
    a_file_that_cannot_be_read_is_parked_after_a_few_tries("v.mp4", 12 * MIB as usize).await;
}

/// A delete refused for a passing reason (no room to rename the file aside:
/// ext4's reserve, btrfs's metadata full) keeps the item in the delete lane,
/// backing off, with the reason in `status`, and the local copy goes once it
/// passes. It used to be recorded as "local copy kept" for good.
#[tokio::test(start_paused = true)]
async fn a_delete_refused_for_a_passing_reason_is_tried_again() {
    use crate::pipeline::localfs::{self, Call};
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    let abs = h.root.join("a.png");
    let path = abs.clone();
    h.store.script(move |r| {
        if r.op == Op::Put {
            localfs::inject(&path, Call::Rename, libc::ENOSPC);
        }
        None
    });
    h.write("a.png", b"first").await;
    let key = Harness::key("a.png");
    until(30, "uploaded", || h.queue.record(&key).unwrap().is_some()).await;
    idle(60).await;
    assert_eq!(h.queue.record(&key).unwrap().unwrap().local, Local::Present);
    let item = h.queue.item(&key).unwrap().unwrap();
    assert!(matches!(item.stage, Stage::Delete { .. }), "{item:?}");
    assert!((3..30).contains(&item.attempts), "backed off: {item:?}");
    let why = h.live.shown().last_error.unwrap();
    assert!(
        why.contains("No space left on device") && why.contains("free some space"),
        "{why}"
    );
    assert!(abs.exists());

    h.store.script(|_| None);
    localfs::heal(&abs);
    until(60, "deleted once there is room", || !abs.exists()).await;
    until(5, "marked", || {
        h.queue.record(&key).unwrap().unwrap().local == Local::Deleted
    })
    .await;
    assert_eq!(h.count(Op::Put), 1);
    h.stop().await;
}

/// A delete whose unlink keeps failing (EIO; a full btrfs) puts the file
/// back each time, and backs off as the same uploaded file: the error is
/// shown, and after [`MAX_STRIKES`] the item is parked with it; nothing is
/// uploaded, read or asked of the bucket again. `retry` then deletes it. It
/// used to come back as a changed file, re-read, HEADed and recorded again
/// every second, for ever, with the error never shown.
#[tokio::test(start_paused = true)]
async fn a_local_copy_that_cannot_be_unlinked_is_parked_not_uploaded_again() {
    use crate::pipeline::localfs::{self, Call};
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    let abs = h.root.join("a.png");
    let path = abs.clone();
    h.store.script(move |r| {
        if r.op == Op::Put {
            localfs::inject(&path, Call::Remove, libc::EIO);
        }
        None
    });
    h.write("a.png", b"first").await;
    let key = Harness::key("a.png");
    until(120, "parked", || h.live.shown().failed.contains_key(&key)).await;
    let reason = h.live.shown().failed[&key].clone();
    assert_eq!(
        reason,
        format!(
            "uploaded, but cannot delete the local copy {}: Input/output error (os error 5); check the disk, then run `offloadd retry` (it failed {MAX_STRIKES} times while the watch root was there)",
            abs.display()
        )
    );
    assert_eq!(h.count(Op::Put), 1);
    assert_eq!(h.count(Op::Head), 1, "only the verification's");
    let record = h.queue.record(&key).unwrap().unwrap();
    assert_eq!(record.local, Local::Present);
    assert_eq!(
        record.identity,
        FileIdentity::of(&std::fs::metadata(&abs).unwrap()),
        "the record names the file put back"
    );

    h.store.script(|_| None);
    localfs::heal(&abs);
    let k = key.clone();
    let retried = h
        .ask(|reply| Command::Retry {
            keys: Some(vec![k]),
            reply,
        })
        .await;
    assert_eq!(retried, 1);
    until(60, "deleted once retried", || !abs.exists()).await;
    until(5, "marked", || {
        h.queue.record(&key).unwrap().unwrap().local == Local::Deleted
    })
    .await;
    assert_eq!(h.count(Op::Put), 1, "never sent again");
    h.stop().await;
}

/// A file stamped with an mtime years ahead (a camera's clock, `touch -d`)
/// is deleted once it is `delete_after` old by its ctime: it used to keep
/// its local copy until that date, with no reason shown.
#[tokio::test(start_paused = true)]
async fn a_file_with_an_mtime_to_come_is_deleted_when_due() {
    let mut h = Harness::new(Deletion::After(Duration::from_secs(1)));
    h.stop().await;
    let abs = h.root.join("a.png");
    std::fs::write(&abs, b"from the future").unwrap();
    let ahead = std::time::SystemTime::now() + Duration::from_secs(10 * 365 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&abs)
        .unwrap()
        .set_modified(ahead)
        .unwrap();
    h.start(Deletion::After(Duration::from_secs(1)));
    h.candidates
        .send(Candidate {
            abs: abs.clone(),
            trigger: Trigger::Event,
        })
        .await
        .unwrap();
    let key = Harness::key("a.png");
    until(60, "uploaded", || h.queue.record(&key).unwrap().is_some()).await;
    until(600, "deleted a second after its upload", || !abs.exists()).await;
    h.stop().await;
}

/// A reload that raises `delete_after` while a delete waits for the gate
/// (behind the reload itself) is obeyed: the file, old enough under the
/// old setting, is not deleted before it is old enough under the new one.
#[tokio::test(start_paused = true)]
async fn a_delete_under_way_obeys_a_longer_delete_after_loaded_meanwhile() {
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    h.stop().await;
    let s = h.idle_scheduler();
    s.plan
        .send_replace(plan(&h.root, &h.store, Deletion::After(Duration::ZERO)));
    let abs = h.root.join("a.png");
    std::fs::write(&abs, b"uploaded").unwrap();
    let identity = FileIdentity::of(&std::fs::metadata(&abs).unwrap());
    let key = Harness::key("a.png");
    let record = Record {
        provider: "fake".into(),
        key: "pre/a.png".into(),
        size: identity.size,
        etag: "\"e\"".into(),
        uploaded_ms: statedir::now_ms(),
        identity,
        local: Local::Present,
    };
    h.queue
        .record_uploaded(&key, &record, AfterUpload::DeleteLocal)
        .unwrap();
    let worker = Worker {
        queue: h.queue.clone(),
        root: h.guard.clone(),
        plan: s.plan.subscribe(),
        deletes: s.deletes.clone(),
        started: s.current(),
        uploader: s.uploader.clone(),
        metrics: s.metrics().clone(),
    };
    // A reload waits for the gate: the delete looked at the plan already.
    let reload = s.deletes.clone().write_owned().await;
    let k = key.clone();
    let delete = tokio::spawn(async move { worker.process(&k).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!delete.is_finished(), "the delete waits for the gate");
    let week = Duration::from_secs(7 * 86_400);
    s.plan
        .send_replace(plan(&h.root, &h.store, Deletion::After(week)));
    drop(reload);
    let outcome = delete.await.unwrap();
    assert!(
        matches!(outcome, Outcome::Later { lane: Lane::Delete, due_ms } if due_ms >= statedir::now_ms() + week.as_millis() as u64 - 60_000),
        "{outcome:?}"
    );
    assert!(abs.exists());
    assert_eq!(h.queue.record(&key).unwrap().unwrap().local, Local::Present);
}

/// A key without AbortMultipartUpload: the refusal is said once for the
/// provider (log and `status`), not per abort nor per sweep, the aborts go
/// on at every sweep, and once the key may abort, they go through and the
/// notice goes. It used to be retried every sweep in silence.
#[tokio::test(start_paused = true)]
async fn a_provider_that_refuses_aborts_is_reported_once() {
    let mut h = Harness::new(Deletion::Keep);
    let refuse = Arc::new(AtomicBool::new(true));
    let r = refuse.clone();
    h.store.script(move |req| match req.op {
        Op::Part => Some(http_error(413, "EntityTooLarge")),
        Op::Abort if r.load(Ordering::SeqCst) => Some(http_error(403, "AccessDenied")),
        _ => None,
    });
    for rel in ["a.mp4", "b.mp4"] {
        h.write(rel, &vec![7u8; (12 * MIB) as usize]).await;
    }
    let parked = || {
        let failed = h.live.shown().failed;
        ["a.mp4", "b.mp4"]
            .iter()
            .all(|rel| failed.contains_key(&Harness::key(rel)))
    };
    until(600, "both parked", parked).await;
    until(10, "both aborts tried", || h.count(Op::Abort) >= 2).await;
    let refusals = || {
        h.live
            .shown()
            .notices
            .into_iter()
            .filter(|n| n.contains("AbortMultipartUpload"))
            .collect::<Vec<_>>()
    };
    let shown = refusals();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert!(
        shown[0].starts_with("provider `fake` refuses AbortMultipartUpload (AccessDenied): grant the key s3:AbortMultipartUpload"),
        "{shown:?}"
    );
    // The next sweep tries again, and says nothing new; a notice that
    // newer ones pushed out (here: withdrawn by hand) is shown again.
    h.live.withdraw(&shown[0]);
    tokio::time::sleep(SWEEP_PARKED_EVERY + Duration::from_secs(1)).await;
    until(10, "tried again", || h.count(Op::Abort) >= 4).await;
    assert_eq!(refusals(), shown);
    assert_eq!(h.queue.pending_aborts().len(), 2);

    refuse.store(false, Ordering::SeqCst);
    tokio::time::sleep(SWEEP_PARKED_EVERY + Duration::from_secs(1)).await;
    until(10, "aborted", || h.queue.pending_aborts().is_empty()).await;
    assert!(refusals().is_empty(), "the notice goes");
    h.stop().await;
}

/// A reload that turns deletion off is applied only once no delete that
/// read the old plan is still going (one holds the gate from its last look
/// at the plan through its unlink): after "reloaded", nothing is deleted.
#[tokio::test(start_paused = true)]
async fn a_new_plan_is_applied_once_the_deletes_that_read_the_old_one_are_done() {
    let mut h = Harness::new(Deletion::After(Duration::ZERO));
    h.stop().await;
    let mut s = h.idle_scheduler();
    let in_flight = s.deletes.clone().read_owned().await;
    let (applied, done) = oneshot::channel();
    s.command(Command::Replan {
        plan: plan(&h.root, &h.store, Deletion::Keep),
        memory_limit: MEMORY_LIMIT,
        applied,
    });
    assert_eq!(
        s.current().deletion(),
        Deletion::Keep,
        "in force for what follows"
    );
    let done = tokio::spawn(done);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        !done.is_finished(),
        "applied while a delete under the old plan went on"
    );
    // A delete that looks now waits behind the reload, then sees the new plan.
    let later = s.deletes.clone();
    let next = tokio::spawn(async move { later.read_owned().await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!next.is_finished());
    drop(in_flight);
    done.await.unwrap().unwrap();
    drop(next.await.unwrap());

    // A delete stuck in the kernel holds a reload up for DELETES_DRAIN only.
    let stuck = s.deletes.clone().read_owned().await;
    let (applied, done) = oneshot::channel();
    s.command(Command::Replan {
        plan: plan(&h.root, &h.store, Deletion::After(Duration::ZERO)),
        memory_limit: MEMORY_LIMIT,
        applied,
    });
    let done = tokio::spawn(done);
    tokio::time::sleep(DELETES_DRAIN - Duration::from_secs(1)).await;
    assert!(!done.is_finished());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(done.is_finished(), "applied without the stuck delete");
    drop(stuck);
}

/// A file whose only change after its upload is its ctime (a chmod) is
/// compared with its object (a HEAD, and its ETag recomputed from the
/// file), not sent again; a HEAD that fails for a passing reason is tried
/// again, never answered by sending the body.
#[tokio::test(start_paused = true)]
async fn a_file_only_chmoded_after_its_upload_is_compared_not_sent() {
    use std::os::unix::fs::PermissionsExt;
    let mut h = Harness::new(Deletion::Keep);
    let big: Vec<u8> = (0..9 * MIB).map(|i| (i % 251) as u8).collect();
    let files = [
        (h.write("small.png", b"small").await, "small.png"),
        (h.write("big.mp4", &big).await, "big.mp4"),
    ];
    until(60, "both recorded", || {
        files
            .iter()
            .all(|(_, r)| h.queue.record(&Harness::key(r)).unwrap().is_some())
    })
    .await;
    let sent = (h.count(Op::Put), h.count(Op::Part));
    assert_eq!(h.count(Op::Head), 0);
    let mut once = true;
    h.store.script(move |r| {
        (r.op == Op::Head && std::mem::take(&mut once)).then(|| http_error(503, "SlowDown"))
    });
    for (abs, _) in &files {
        std::fs::set_permissions(abs, std::fs::Permissions::from_mode(0o600)).unwrap();
        h.candidates
            .send(Candidate {
                abs: abs.clone(),
                trigger: Trigger::Scan,
            })
            .await
            .unwrap();
    }
    let identity_now = |abs: &PathBuf| {
        crate::pipeline::finished::FileIdentity::of(&std::fs::metadata(abs).unwrap())
    };
    until(60, "both recorded as they are now", || {
        files.iter().all(|(abs, r)| {
            h.queue
                .record(&Harness::key(r))
                .unwrap()
                .is_some_and(|rec| rec.identity == identity_now(abs))
        })
    })
    .await;
    assert_eq!(
        (h.count(Op::Put), h.count(Op::Part)),
        sent,
        "{:?}",
        h.store.requests()
    );
    assert_eq!(h.count(Op::Head), 3, "{:?}", h.store.requests());
    assert!(h.queue.items().unwrap().is_empty());
    assert_eq!(h.store.object("pre/big.mp4").unwrap(), big);
    h.stop().await;
}

/// Other bytes in the bucket under the recorded key (an ETag other than the
/// record's): the chmoded file is sent again.
#[tokio::test(start_paused = true)]
async fn a_chmoded_file_whose_object_changed_is_sent_again() {
    use crate::keys::ObjectKey;
    use crate::remote::store::Store;
    use md5::Digest;
    use std::os::unix::fs::PermissionsExt;
    let mut h = Harness::new(Deletion::Keep);
    let abs = h.write("a.png", b"first").await;
    let key = Harness::key("a.png");
    until(30, "recorded", || h.queue.record(&key).unwrap().is_some()).await;
    // Another writer of the bucket, behind offloadd's back.
    let other = ObjectKey::from_raw("pre/a.png".into());
    h.store
        .put(
            &other,
            bytes::Bytes::from_static(b"other"),
            md5::Md5::digest(b"other").into(),
            &crate::remote::object_options::Rules::default().options_for(
                &crate::keys::RelPath::parse("a.png").unwrap(),
                None,
                None,
            ),
        )
        .await
        .unwrap();
    std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(0o600)).unwrap();
    h.candidates
        .send(Candidate {
            abs: abs.clone(),
            trigger: Trigger::Scan,
        })
        .await
        .unwrap();
    until(30, "the file's bytes back", || {
        h.store.object("pre/a.png").as_deref() == Some(&b"first"[..])
    })
    .await;
    assert_eq!(h.count(Op::Put), 3, "{:?}", h.store.requests());
    assert_eq!(h.count(Op::Head), 1, "{:?}", h.store.requests());
    h.stop().await;
}

/// A file whose bytes the bucket already held (found by a HEAD after a
/// `chmod`: no body sent) proves only that the provider reads. When a key
/// that lost PutObject had a probe's verdict pending, such a file in flight
/// used to count as an upload: it answered for the probe, and the items
/// awaiting the verdict were struck as if they failed on their own.
#[tokio::test(start_paused = true)]
async fn a_file_found_in_the_bucket_does_not_answer_for_the_probe() {
    use std::os::unix::fs::PermissionsExt;
    let mut h = Harness::new(Deletion::Keep);
    // Big enough that hashing it takes longer than a refused PUT.
    let big: Vec<u8> = (0..4 * MIB).map(|i| (i % 251) as u8).collect();
    let kept = h.write("kept.png", &big).await;
    let kept_key = Harness::key("kept.png");
    // Its success counted (once its record is durable, which takes real
    // time on this paused clock), then a while later.
    until(30, "kept.png uploaded", || {
        h.live
            .metrics
            .encode()
            .contains("offloadd_uploads_total{result=\"success\"} 1")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // The key loses PutObject; a probe's verdict stays pending.
    h.store.hold_probes(true);
    h.store
        .script(|r| matches!(r.op, Op::Put | Op::Probe).then(|| http_error(403, "AccessDenied")));
    // A chmod (the bucket holds kept.png's bytes: compared, not sent) while
    // a new file is refused.
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600)).unwrap();
    let now = crate::pipeline::finished::FileIdentity::of(&std::fs::metadata(&kept).unwrap());
    h.candidates
        .send(Candidate {
            abs: kept.clone(),
            trigger: Trigger::Scan,
        })
        .await
        .unwrap();
    h.write("new.png", b"new").await;
    until(30, "kept.png recorded as it is now", || {
        h.queue
            .record(&kept_key)
            .unwrap()
            .is_some_and(|r| r.identity == now)
    })
    .await;
    assert_eq!(h.count(Op::Put), 2, "{:?}", h.store.requests());
    let new_key = Harness::key("new.png");
    let strikes = |h: &Harness| h.queue.item(&new_key).unwrap().map(|i| i.strikes);
    assert_eq!(strikes(&h), Some(0), "new.png was not blamed");
    // The verdict: the provider pauses, and new.png is not parked.
    h.store.hold_probes(false);
    until(30, "paused", || h.live.shown().paused.is_some()).await;
    assert_eq!(strikes(&h), Some(0));
    assert!(h.live.shown().failed.is_empty(), "nothing parked");
    h.stop().await;
}

/// A provider that asks to slow down gets fewer uploads at once, not only
/// each refused one later: with PUTs that take 100 ms, 16 workers and every
/// PUT answered SlowDown, the uploads in flight fall from 16 to a few within
/// seconds; once it accepts again they grow back.
#[tokio::test(start_paused = true)]
async fn throttling_lowers_the_uploads_in_flight_and_successes_raise_them() {
    let mut h = Harness::new(Deletion::Keep);
    let mut p = (*plan(&h.root, &h.store, Deletion::Keep)).clone();
    p.options.workers = 16;
    h.ask(|applied| Command::Replan {
        plan: Arc::new(p),
        memory_limit: MEMORY_LIMIT,
        applied,
    })
    .await;
    h.store.slow_puts(Duration::from_millis(100));
    let throttling = Arc::new(AtomicBool::new(true));
    let t = throttling.clone();
    h.store.script(move |r| {
        (t.load(Ordering::SeqCst) && r.op == Op::Put).then(|| http_error(503, "SlowDown"))
    });
    for i in 0..300 {
        h.write(&format!("s/{i:03}.png"), b"slow down").await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(h.store.most_puts_at_once() >= 12, "16 workers at first");
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.store.most_puts_at_once();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let throttled = h.store.most_puts_at_once();
    assert!(
        throttled <= 2,
        "{throttled} PUTs at once after 5 s of SlowDown"
    );

    throttling.store(false, Ordering::SeqCst);
    until(600, "all uploaded once it accepts again", || {
        (0..300).all(|i| h.store.object(&format!("pre/s/{i:03}.png")).is_some())
    })
    .await;
    assert!(h.live.shown().failed.is_empty());
    for i in 0..300 {
        h.write(&format!("t/{i:03}.png"), b"accepted").await;
    }
    until(600, "the second batch uploaded", || {
        (0..300).all(|i| h.store.object(&format!("pre/t/{i:03}.png")).is_some())
    })
    .await;
    assert!(
        h.store.most_puts_at_once() >= 12,
        "the room grew back to the 16 workers"
    );
    h.stop().await;
}
