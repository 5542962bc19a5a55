//! The scheduler between the durable queue and the workers.
//!
//! Owns: admitting candidates into the queue (deduplicated by relative path),
//! dispatching due items to at most `upload.workers` workers, the per-item
//! upload → verify → record → delete sequence, retries with backoff, and the
//! health of the active provider. A provider-wide error, or a run of transient
//! ones, pauses uploads to the provider: items stay pending and one probe at a time
//! (a real upload) is let through with backoff until one succeeds. The outage is
//! logged when it starts and when it ends, not once per item.

use crate::backoff::Backoff;
use crate::budget::{Budget, Pacer};
use crate::failpoint;
use crate::keys::{KeyError, RelPath};
use crate::state::{self, FileIdentity, PausedInfo, QueueItem, Record, Stage, State};
use crate::storage::{Client, ErrorClass, StorageError};
use crate::upload::{self, Job, Settings, UploadError, Uploader};
use crate::verify::{self, LocalOutcome};
use crate::watcher::{Candidate, Trigger};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Consecutive transient failures after which the provider counts as unreachable.
const OUTAGE_AFTER: u32 = 3;

/// Settings the pipeline reads when an item starts.
#[derive(Debug, Clone)]
pub struct Options {
    pub root: PathBuf,
    pub settle: Duration,
    pub delete_local: bool,
    pub delete_after: Duration,
    pub workers: usize,
    pub upload: Settings,
    pub retry: Backoff,
    /// The managed-since mark (ns); files changed before it are left alone.
    pub mark_ns: i128,
}

/// The upload target: a provider, or local mode with the reason.
#[derive(Clone)]
pub enum Target {
    Local { reason: String },
    Provider(Arc<Client>),
}

/// Live figures shared with `status`.
#[derive(Default)]
pub struct Live {
    pub queue_depth: AtomicU64,
    pub in_flight: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub failed: Mutex<HashMap<Vec<u8>, String>>,
    pub paused: Mutex<Option<PausedInfo>>,
    pub metrics: crate::metrics::Metrics,
    /// Unix ms when an upload last started or a request of one finished.
    pub last_progress_ms: Arc<AtomicU64>,
    /// Set while location records are rebuilt from the bucket after state loss.
    pub rebuild: Mutex<Option<Arc<crate::rebuild::Progress>>>,
}

#[derive(Debug)]
enum Health {
    Healthy {
        transient_run: u32,
    },
    Paused {
        reason: String,
        since: Instant,
        probe_attempt: u32,
        next_probe: Instant,
        probing: bool,
    },
}

/// Requests from the control socket.
pub enum Command {
    /// Queue parked items again (`None`: all of them); replies with the count.
    Retry {
        keys: Option<Vec<Vec<u8>>>,
        reply: oneshot::Sender<usize>,
    },
    /// Backfill: queue these paths regardless of the managed-since mark.
    Enqueue {
        keys: Vec<Vec<u8>>,
        dry_run: bool,
        reply: oneshot::Sender<usize>,
    },
    /// Take a path out of the pipeline while it is deleted through; refused while
    /// it is being uploaded.
    Hold {
        key: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Release {
        key: Vec<u8>,
        reply: oneshot::Sender<()>,
    },
    /// A reload: new settings, target and resources for uploads that start from
    /// now on; uploads in flight finish as they started.
    Reconfigure {
        opts: Options,
        target: Target,
        resources: (Budget, Pacer),
    },
}

/// What became of one dispatched item.
#[derive(Debug)]
enum Outcome {
    /// Uploaded (and deleted locally if asked), or dropped: the item is gone.
    Done {
        uploaded: bool,
    },
    /// Persisted with a later due time.
    Later {
        due_ms: u64,
        upload: bool,
    },
    Parked(String),
    /// The provider failed as a whole; the item is untouched and waits.
    ProviderDown(StorageError),
    /// This item hit a transient error and was backed off.
    Transient {
        due_ms: u64,
        error: StorageError,
    },
}

struct Completion {
    key: Vec<u8>,
    outcome: Outcome,
    probe: bool,
}

/// Due items, ordered by due time, in two lanes: uploads need a healthy provider,
/// local deletes do not.
#[derive(Default)]
struct Lanes {
    uploads: BTreeSet<(u64, Vec<u8>)>,
    deletes: BTreeSet<(u64, Vec<u8>)>,
    index: HashMap<Vec<u8>, (u64, bool)>,
}

impl Lanes {
    fn insert(&mut self, key: Vec<u8>, due_ms: u64, upload: bool) {
        self.remove(&key);
        let lane = if upload {
            &mut self.uploads
        } else {
            &mut self.deletes
        };
        lane.insert((due_ms, key.clone()));
        self.index.insert(key, (due_ms, upload));
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some((due, upload)) = self.index.remove(key) {
            let lane = if upload {
                &mut self.uploads
            } else {
                &mut self.deletes
            };
            lane.remove(&(due, key.to_vec()));
        }
    }

    fn pop_due(&mut self, upload: bool, now_ms: u64) -> Option<Vec<u8>> {
        let lane = if upload {
            &mut self.uploads
        } else {
            &mut self.deletes
        };
        let first = lane.first()?.clone();
        if first.0 > now_ms {
            return None;
        }
        lane.remove(&first);
        self.index.remove(&first.1);
        Some(first.1)
    }

    fn next_due(&self, uploads_allowed: bool) -> Option<u64> {
        let d = self.deletes.first().map(|x| x.0);
        let u = if uploads_allowed {
            self.uploads.first().map(|x| x.0)
        } else {
            None
        };
        match (d, u) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

/// The scheduler; run it with [`Pipeline::run`].
pub struct Pipeline {
    opts: Options,
    target: Target,
    state: State,
    uploader: Arc<Uploader>,
    live: Arc<Live>,
    lanes: Lanes,
    in_flight: HashSet<Vec<u8>>,
    recheck: HashSet<Vec<u8>>,
    held: HashSet<Vec<u8>>,
    health: Health,
    done_tx: mpsc::UnboundedSender<Completion>,
    done_rx: mpsc::UnboundedReceiver<Completion>,
}

fn path_of(root: &Path, key: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(key))
}

fn shown(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

impl Pipeline {
    pub fn new(
        opts: Options,
        target: Target,
        state: State,
        (budget, pacer): (Budget, Pacer),
        live: Arc<Live>,
    ) -> Pipeline {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let uploader = Arc::new(Uploader {
            budget,
            pacer,
            progress: live.last_progress_ms.clone(),
            state: state.clone(),
        });
        let mut p = Pipeline {
            opts,
            target,
            state,
            uploader,
            live,
            lanes: Lanes::default(),
            in_flight: HashSet::new(),
            recheck: HashSet::new(),
            held: HashSet::new(),
            health: Health::Healthy { transient_run: 0 },
            done_tx,
            done_rx,
        };
        p.load_queue();
        p
    }

    /// Schedules everything the queue holds; items that were in flight when the
    /// last run ended are simply pending again.
    fn load_queue(&mut self) {
        let mut failed = HashMap::new();
        for (key, item) in self.state.queue_items() {
            match item.stage {
                Stage::Parked { reason } => {
                    failed.insert(key, reason);
                }
                Stage::Upload { .. } => self.lanes.insert(key, item.next_attempt_ms, true),
                Stage::Delete { .. } => self.lanes.insert(key, item.next_attempt_ms, false),
            }
        }
        if !self.lanes.index.is_empty() || !failed.is_empty() {
            tracing::info!(
                pending = self.lanes.len(),
                failed = failed.len(),
                "resuming the queue from the last run"
            );
        }
        *self.live.failed.lock().expect("live lock") = failed;
        self.publish();
    }

    fn publish(&self) {
        let depth = (self.lanes.len() + self.in_flight.len()) as u64;
        let in_flight = self.in_flight.len() as u64;
        self.live.queue_depth.store(depth, Ordering::Relaxed);
        self.live.in_flight.store(in_flight, Ordering::Relaxed);
        let m = &self.live.metrics;
        m.set_queue_depth(depth);
        m.set_in_flight(in_flight);
        m.set_failed_items(self.live.failed.lock().expect("live lock").len() as u64);
        m.set_paused_providers(matches!(self.health, Health::Paused { .. }) as u64);
    }

    fn client(&self) -> Option<Arc<Client>> {
        match &self.target {
            Target::Provider(c) => Some(c.clone()),
            Target::Local { .. } => None,
        }
    }

    /// Whether an upload may start now; `Some(true)` means it is a probe.
    fn upload_gate(&mut self) -> Option<bool> {
        self.client()?;
        match &mut self.health {
            Health::Healthy { .. } => Some(false),
            Health::Paused {
                next_probe,
                probing,
                ..
            } => {
                if *probing || Instant::now() < *next_probe {
                    None
                } else {
                    *probing = true;
                    Some(true)
                }
            }
        }
    }

    /// Runs until `shutdown` fires, then lets in-flight work finish for up to
    /// `grace`.
    pub async fn run(
        mut self,
        mut candidates: mpsc::UnboundedReceiver<Candidate>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        grace: Duration,
    ) {
        loop {
            self.dispatch();
            let wake = self.next_wake();
            tokio::select! {
                c = candidates.recv() => match c {
                    Some(c) => {
                        self.admit(c);
                        while let Ok(c) = candidates.try_recv() {
                            self.admit(c);
                        }
                    }
                    None => break,
                },
                Some(done) = self.done_rx.recv() => self.complete(done),
                Some(cmd) = commands.recv() => self.command(cmd),
                _ = tokio::time::sleep(wake) => {}
                _ = shutdown.changed() => break,
            }
        }
        let n = self.in_flight.len();
        if n > 0 {
            tracing::info!(
                in_flight = n,
                grace_s = grace.as_secs(),
                "stopping: letting uploads in flight finish"
            );
            let deadline = tokio::time::Instant::now() + grace;
            while !self.in_flight.is_empty() {
                match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                    Ok(Some(done)) => self.complete(done),
                    _ => break,
                }
            }
            if !self.in_flight.is_empty() {
                tracing::warn!(left = self.in_flight.len(), "stopping with uploads unfinished; they stay queued and resume at the next start");
            }
        }
    }

    fn next_wake(&self) -> Duration {
        let uploads_allowed = match &self.health {
            Health::Healthy { .. } => self.client().is_some(),
            Health::Paused { .. } => false,
        };
        let mut wake = Duration::from_secs(3600);
        if let Some(due) = self.lanes.next_due(uploads_allowed) {
            wake = wake.min(Duration::from_millis(due.saturating_sub(state::now_ms())));
        }
        if let Health::Paused {
            next_probe,
            probing: false,
            ..
        } = &self.health
        {
            wake = wake.min(next_probe.saturating_duration_since(Instant::now()));
        }
        wake.max(Duration::from_millis(5))
    }

    fn dispatch(&mut self) {
        let now = state::now_ms();
        while self.in_flight.len() < self.opts.workers {
            if let Some(key) = self.lanes.pop_due(false, now) {
                self.spawn(key, false);
                continue;
            }
            let due_upload = self
                .lanes
                .uploads
                .first()
                .is_some_and(|(due, _)| *due <= now);
            if !due_upload {
                break;
            }
            let Some(probe) = self.upload_gate() else {
                break;
            };
            let key = self.lanes.pop_due(true, now).expect("checked due above");
            self.spawn(key, probe);
            if probe {
                break;
            }
        }
        self.publish();
    }

    fn spawn(&mut self, key: Vec<u8>, probe: bool) {
        if self.in_flight.is_empty() {
            self.live
                .last_progress_ms
                .store(state::now_ms(), Ordering::Relaxed);
        }
        self.in_flight.insert(key.clone());
        let worker = Worker {
            metrics: self.live.metrics.clone(),
            opts: self.opts.clone(),
            client: self.client(),
            state: self.state.clone(),
            uploader: self.uploader.clone(),
        };
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let outcome = worker.process(&key).await;
            let _ = tx.send(Completion {
                key,
                outcome,
                probe,
            });
        });
    }

    fn complete(&mut self, done: Completion) {
        self.in_flight.remove(&done.key);
        let key = done.key;
        match done.outcome {
            Outcome::Done { uploaded } => {
                self.live.failed.lock().expect("live lock").remove(&key);
                if uploaded {
                    self.healthy();
                } else if done.probe {
                    self.probe_inconclusive();
                }
            }
            Outcome::Later { due_ms, upload } => {
                if done.probe {
                    // A probe that did not reach the provider proves nothing.
                    self.probe_inconclusive();
                }
                self.lanes.insert(key.clone(), due_ms, upload);
            }
            Outcome::Parked(reason) => {
                if done.probe {
                    self.probe_inconclusive();
                }
                self.park_noted(&key, reason);
            }
            Outcome::ProviderDown(err) => {
                self.lanes.insert(key.clone(), state::now_ms(), true);
                self.unhealthy(&err, true);
            }
            Outcome::Transient { due_ms, error } => {
                self.lanes.insert(key.clone(), due_ms, true);
                self.unhealthy(&error, done.probe);
            }
        }
        if self.recheck.remove(&key) {
            let abs = path_of(&self.opts.root, &key);
            self.admit(Candidate {
                abs,
                trigger: Trigger::Event,
            });
        }
        self.publish();
    }

    fn park_noted(&mut self, key: &[u8], reason: String) {
        let mut failed = self.live.failed.lock().expect("live lock");
        if failed.get(key) != Some(&reason) {
            tracing::warn!(path = %shown(key), error = %reason, "not uploading {}: {reason}", shown(key));
        }
        failed.insert(key.to_vec(), reason.clone());
        *self.live.last_error.lock().expect("live lock") = Some(reason);
    }

    fn probe_inconclusive(&mut self) {
        if let Health::Paused { probing, .. } = &mut self.health {
            *probing = false;
        }
    }

    fn healthy(&mut self) {
        if let Health::Paused { reason, since, .. } = &self.health {
            let provider = self.provider_name();
            tracing::info!(
                provider = %provider,
                paused_for_s = since.elapsed().as_secs(),
                waiting = self.lanes.uploads.len(),
                "provider is back; uploads resume (it was paused: {reason})"
            );
            let _ = self.state.set_paused(&provider, None);
            *self.live.paused.lock().expect("live lock") = None;
        }
        self.health = Health::Healthy { transient_run: 0 };
    }

    fn provider_name(&self) -> String {
        self.client()
            .map(|c| c.provider.name.clone())
            .unwrap_or_default()
    }

    fn unhealthy(&mut self, err: &StorageError, force: bool) {
        *self.live.last_error.lock().expect("live lock") = Some(err.message.clone());
        let backoff = self.opts.retry;
        match &mut self.health {
            Health::Healthy { transient_run } => {
                *transient_run += 1;
                if !(force || *transient_run >= OUTAGE_AFTER) {
                    return;
                }
                let provider = self.provider_name();
                tracing::error!(
                    provider = %provider,
                    error = %err.message,
                    waiting = self.lanes.uploads.len(),
                    "provider {provider} paused: {}; uploads wait and one probe at a time retries with backoff",
                    err.message
                );
                let info = PausedInfo {
                    provider: provider.clone(),
                    reason: err.message.clone(),
                    since: state::rfc3339(state::now_ms()),
                };
                let _ = self.state.set_paused(&provider, Some(&info));
                *self.live.paused.lock().expect("live lock") = Some(info);
                self.health = Health::Paused {
                    reason: err.message.clone(),
                    since: Instant::now(),
                    probe_attempt: 1,
                    next_probe: Instant::now() + backoff.jittered(1),
                    probing: false,
                };
            }
            Health::Paused {
                reason,
                probe_attempt,
                next_probe,
                probing,
                ..
            } => {
                if *probing {
                    *probe_attempt += 1;
                    *next_probe = Instant::now() + backoff.jittered(*probe_attempt);
                    *probing = false;
                    tracing::debug!(attempt = *probe_attempt, error = %err.message, "probe failed; provider stays paused");
                }
                if *reason != err.message {
                    *reason = err.message.clone();
                    if let Some(info) = self.live.paused.lock().expect("live lock").as_mut() {
                        info.reason = err.message.clone();
                        let _ = self.state.set_paused(&info.provider, Some(info));
                    }
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Retry { keys, reply } => {
                let keys: Vec<Vec<u8>> = match keys {
                    Some(k) => k,
                    None => self
                        .live
                        .failed
                        .lock()
                        .expect("live lock")
                        .keys()
                        .cloned()
                        .collect(),
                };
                let mut n = 0;
                for key in keys {
                    if self
                        .state
                        .queue_item(&key)
                        .ok()
                        .flatten()
                        .is_some_and(|i| i.is_parked())
                    {
                        self.enqueue(key);
                        n += 1;
                    }
                }
                let _ = reply.send(n);
            }
            Command::Enqueue {
                keys,
                dry_run: true,
                reply,
            } => {
                let n = keys.iter().filter(|k| self.would_queue(k)).count();
                let _ = reply.send(n);
            }
            Command::Enqueue { keys, reply, .. } => {
                let before = self.lanes.len();
                for key in keys {
                    let abs = path_of(&self.opts.root, &key);
                    self.admit(Candidate {
                        abs,
                        trigger: Trigger::Backfill,
                    });
                }
                let _ = reply.send(self.lanes.len().saturating_sub(before));
            }
            Command::Hold { key, reply } => {
                if self.in_flight.contains(&key) {
                    let _ = reply.send(Err(format!(
                        "{} is being uploaded right now; try again in a few seconds",
                        shown(&key)
                    )));
                } else {
                    self.lanes.remove(&key);
                    self.live.failed.lock().expect("live lock").remove(&key);
                    self.held.insert(key);
                    let _ = reply.send(Ok(()));
                }
            }
            Command::Release { key, reply } => {
                self.held.remove(&key);
                let _ = reply.send(());
            }
            Command::Reconfigure {
                opts,
                target,
                resources: (budget, pacer),
            } => {
                let same_provider = match (&self.target, &target) {
                    (Target::Provider(a), Target::Provider(b)) => {
                        a.provider.name == b.provider.name
                    }
                    _ => false,
                };
                if !same_provider {
                    if let Health::Paused { .. } = self.health {
                        let old = self.provider_name();
                        let _ = self.state.set_paused(&old, None);
                        *self.live.paused.lock().expect("live lock") = None;
                    }
                    self.health = Health::Healthy { transient_run: 0 };
                } else if let Health::Paused {
                    next_probe,
                    probing,
                    ..
                } = &mut self.health
                {
                    // A reload may have fixed the cause: probe at once.
                    *next_probe = Instant::now();
                    *probing = false;
                }
                self.opts = opts;
                self.target = target;
                self.uploader = Arc::new(Uploader {
                    budget,
                    pacer,
                    progress: self.live.last_progress_ms.clone(),
                    state: self.state.clone(),
                });
            }
        }
        self.publish();
    }

    /// Whether backfill would add this path: a regular file, not queued, not in
    /// flight, and not recorded as it is now.
    fn would_queue(&self, key: &[u8]) -> bool {
        let Ok(meta) = std::fs::symlink_metadata(path_of(&self.opts.root, key)) else {
            return false;
        };
        if !meta.is_file() || self.in_flight.contains(key) || self.lanes.index.contains_key(key) {
            return false;
        }
        let identity = FileIdentity::of(&meta);
        !self
            .state
            .record(key)
            .ok()
            .flatten()
            .is_some_and(|r| r.identity == identity)
    }

    /// Decides whether a candidate path goes into the queue.
    fn admit(&mut self, c: Candidate) {
        let Some(client) = self.client() else { return };
        let Ok(rel_os) = c.abs.strip_prefix(&self.opts.root) else {
            return;
        };
        let key = rel_os.as_os_str().as_bytes().to_vec();
        if key.is_empty() {
            return;
        }
        if self.held.contains(&key) {
            return;
        }
        if self.in_flight.contains(&key) {
            self.recheck.insert(key);
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(&c.abs) else {
            return;
        };
        let identity = FileIdentity::of(&meta);
        if identity.changed_ns() < self.opts.mark_ns && c.trigger != Trigger::Backfill {
            return;
        }
        if meta.file_type().is_symlink() {
            let reason = format!(
                "{} is a symbolic link; offloadd does not follow links (upload the target itself, or copy the file in)",
                shown(&key)
            );
            return self.park(key, reason);
        }
        if !meta.is_file() {
            return;
        }
        let rel = match RelPath::from_fs(&self.opts.root, &c.abs) {
            Ok(r) => r,
            Err(e) => return self.park(key, e.to_string()),
        };
        if let Err(e @ KeyError::TooLong { .. }) = client.provider.object_key(&rel) {
            return self.park(key, e.to_string());
        }
        if let Ok(Some(rec)) = self.state.record(&key) {
            if rec.identity == identity {
                return;
            }
        }
        let existing = self.state.queue_item(&key).ok().flatten();
        match existing {
            Some(item) => match &item.stage {
                Stage::Upload { .. } => {
                    if !self.lanes.index.contains_key(&key) {
                        self.lanes.insert(key, item.next_attempt_ms, true);
                    }
                }
                Stage::Delete { identity: id, .. } if *id == identity => {
                    if !self.lanes.index.contains_key(&key) {
                        self.lanes.insert(key, item.next_attempt_ms, false);
                    }
                }
                Stage::Parked { .. } if c.trigger == Trigger::Scan => {}
                _ => self.enqueue(key),
            },
            None => self.enqueue(key),
        }
    }

    fn enqueue(&mut self, key: Vec<u8>) {
        match self.state.put_queue_item(&key, &QueueItem::upload_now()) {
            Ok(()) => {
                self.live.failed.lock().expect("live lock").remove(&key);
                self.lanes.insert(key, 0, true);
            }
            Err(e) => {
                tracing::error!(path = %shown(&key), error = %e, "cannot queue file; it will be found again by the next scan")
            }
        }
    }

    fn park(&mut self, key: Vec<u8>, reason: String) {
        if let Ok(Some(item)) = self.state.queue_item(&key) {
            if matches!(&item.stage, Stage::Parked { reason: r } if *r == reason) {
                return;
            }
        }
        self.lanes.remove(&key);
        let _ = self
            .state
            .put_queue_item(&key, &QueueItem::parked(reason.clone()));
        self.park_noted(&key, reason);
    }
}

/// Everything one dispatched item needs.
struct Worker {
    metrics: crate::metrics::Metrics,
    opts: Options,
    client: Option<Arc<Client>>,
    state: State,
    uploader: Arc<Uploader>,
}

impl Worker {
    async fn process(&self, key: &[u8]) -> Outcome {
        let item = match self.state.queue_item(key) {
            Ok(Some(i)) => i,
            Ok(None) => return Outcome::Done { uploaded: false },
            Err(e) => {
                tracing::error!(path = %shown(key), error = %e, "cannot read the queue: {e}");
                return Outcome::Later {
                    due_ms: state::now_ms() + 5_000,
                    upload: true,
                };
            }
        };
        match item.stage.clone() {
            Stage::Parked { reason } => Outcome::Parked(reason),
            Stage::Delete { identity, .. } => self.delete_local(key, item, identity).await,
            Stage::Upload { .. } => match &self.client {
                Some(client) => self.upload(key, item, client).await,
                None => Outcome::Later {
                    due_ms: state::now_ms() + 60_000,
                    upload: true,
                },
            },
        }
    }

    fn park(&self, key: &[u8], reason: String) -> Outcome {
        let _ = self
            .state
            .put_queue_item(key, &QueueItem::parked(reason.clone()));
        Outcome::Parked(reason)
    }

    fn retry_later(&self, key: &[u8], mut item: QueueItem, err: StorageError) -> Outcome {
        item.attempts += 1;
        let due_ms = state::now_ms() + self.opts.retry.jittered(item.attempts).as_millis() as u64;
        item.next_attempt_ms = due_ms;
        item.last_error = Some(err.message.clone());
        let _ = self.state.put_queue_item(key, &item);
        self.metrics.retry();
        tracing::warn!(path = %shown(key), attempt = item.attempts, error = %err.message, "upload of {} failed: {}", shown(key), err.message);
        Outcome::Transient { due_ms, error: err }
    }

    fn storage_failed(&self, key: &[u8], item: QueueItem, err: StorageError) -> Outcome {
        self.metrics.upload_failed(match err.class {
            ErrorClass::ProviderWide => "provider",
            ErrorClass::Item => "parked",
            ErrorClass::Transient | ErrorClass::RestartUpload => "transient",
        });
        match err.class {
            ErrorClass::ProviderWide => Outcome::ProviderDown(err),
            ErrorClass::Item => self.park(key, err.message),
            ErrorClass::Transient => self.retry_later(key, item, err),
            ErrorClass::RestartUpload => {
                let mut item = item;
                item.stage = Stage::Upload { multipart: None };
                if item.attempts < 3 {
                    item.attempts += 1;
                    item.last_error = Some(err.message.clone());
                    let _ = self.state.put_queue_item(key, &item);
                    tracing::warn!(path = %shown(key), error = %err.message, "restarting the upload");
                    Outcome::Later {
                        due_ms: state::now_ms(),
                        upload: true,
                    }
                } else {
                    self.retry_later(key, item, err)
                }
            }
        }
    }

    async fn upload(&self, key: &[u8], item: QueueItem, client: &Client) -> Outcome {
        let abs = path_of(&self.opts.root, key);
        let rel = match RelPath::from_fs(&self.opts.root, &abs) {
            Ok(r) => r,
            Err(e) => return self.park(key, e.to_string()),
        };
        let object_key = match client.provider.object_key(&rel) {
            Ok(k) => k,
            Err(e) => return self.park(key, e.to_string()),
        };
        let content_type = mime_guess::from_path(&abs)
            .first_or_octet_stream()
            .essence_str()
            .to_string();
        let started = Instant::now();
        let job = Job {
            client,
            key: &object_key,
            abs: &abs,
            queue_key: key,
            content_type: &content_type,
            item: &item,
        };
        let sent = match self.uploader.send(&job, self.opts.upload).await {
            Ok(s) => s,
            Err(UploadError::Vanished) => {
                if let Stage::Upload { multipart: Some(p) } = &item.stage {
                    upload::abort_stale(client, p).await;
                }
                self.metrics.upload_failed("vanished");
                tracing::debug!(path = %rel, "file deleted before its upload; dropped");
                let _ = self.state.remove_queue_item(key);
                return Outcome::Done { uploaded: false };
            }
            Err(UploadError::Changed) => {
                let mut item = self.state.queue_item(key).ok().flatten().unwrap_or(item);
                let due_ms = state::now_ms() + self.opts.settle.as_millis() as u64;
                item.next_attempt_ms = due_ms;
                let _ = self.state.put_queue_item(key, &item);
                self.metrics.upload_failed("changed");
                tracing::info!(path = %rel, "file changed while being read; will upload it again once it settles");
                return Outcome::Later {
                    due_ms,
                    upload: true,
                };
            }
            Err(UploadError::Park(reason)) => {
                self.metrics.upload_failed("parked");
                if let Stage::Upload { multipart: Some(p) } = &item.stage {
                    upload::abort_stale(client, p).await;
                }
                return self.park(key, reason);
            }
            Err(UploadError::Storage(e)) => {
                let item = self.state.queue_item(key).ok().flatten().unwrap_or(item);
                return self.storage_failed(key, item, e);
            }
        };
        let etag = match verify::remote(client, &object_key, &sent).await {
            Ok(e) => e,
            Err(e) => {
                let item = self.state.queue_item(key).ok().flatten().unwrap_or(item);
                return self.storage_failed(key, item, e);
            }
        };
        failpoint::hit(failpoint::AFTER_UPLOAD_BEFORE_RECORD);

        let size = sent.identity.size;
        let record = Record {
            provider: client.provider.name.clone(),
            key: object_key.as_str().to_string(),
            size,
            etag,
            uploaded_ms: state::now_ms(),
            identity: sent.identity,
            local_deleted: false,
            local_kept: None,
        };
        let next = (self.opts.delete_local && size > 0).then_some(QueueItem {
            stage: Stage::Delete {
                identity: sent.identity,
                not_before_ms: 0,
            },
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
        });
        if let Err(e) = self.state.record_uploaded(key, &record, next.as_ref()) {
            return self.retry_later(
                key,
                item,
                StorageError::new(
                    ErrorClass::Transient,
                    format!("cannot write the location record: {e}"),
                ),
            );
        }
        if let Err(e) = self.state.durable().await {
            tracing::error!(error = %e, "cannot make the state durable; the local copy is kept until it is");
            return Outcome::Later {
                due_ms: state::now_ms() + 5_000,
                upload: false,
            };
        }
        self.metrics
            .upload_succeeded(size, started.elapsed().as_secs_f64());
        tracing::info!(
            path = %rel,
            key = %object_key,
            bytes = size,
            duration_ms = started.elapsed().as_millis() as u64,
            provider = %client.provider.name,
            "uploaded {rel}"
        );
        failpoint::hit(failpoint::AFTER_RECORD_BEFORE_DELETE);
        match next {
            Some(item) => match self.delete_local(key, item, sent.identity).await {
                Outcome::Done { .. } => Outcome::Done { uploaded: true },
                Outcome::Later { due_ms, upload } => {
                    // Uploaded fine; only the delete waits.
                    Outcome::Later { due_ms, upload }
                }
                other => other,
            },
            None => Outcome::Done { uploaded: true },
        }
    }

    async fn delete_local(
        &self,
        key: &[u8],
        mut item: QueueItem,
        identity: FileIdentity,
    ) -> Outcome {
        let abs = path_of(&self.opts.root, key);
        let min_age = self.opts.delete_after;
        let path = abs.clone();
        let outcome =
            tokio::task::spawn_blocking(move || verify::delete_local(&path, &identity, min_age))
                .await
                .unwrap_or_else(|_| {
                    LocalOutcome::Kept("uploaded, local copy kept: the delete task failed".into())
                });
        match outcome {
            LocalOutcome::Deleted => {
                failpoint::hit(failpoint::AFTER_DELETE_BEFORE_MARK);
                let _ = self.state.finish_local(key, None);
                tracing::debug!(path = %shown(key), "local copy deleted");
                Outcome::Done { uploaded: false }
            }
            LocalOutcome::AlreadyGone => {
                let _ = self.state.finish_local(key, None);
                Outcome::Done { uploaded: false }
            }
            LocalOutcome::TooYoung { retry_at_ms } => {
                item.next_attempt_ms = retry_at_ms;
                let _ = self.state.put_queue_item(key, &item);
                Outcome::Later {
                    due_ms: retry_at_ms,
                    upload: false,
                }
            }
            LocalOutcome::Changed => {
                item.stage = Stage::Upload { multipart: None };
                let due_ms = state::now_ms() + self.opts.settle.as_millis() as u64;
                item.next_attempt_ms = due_ms;
                let _ = self.state.put_queue_item(key, &item);
                tracing::info!(path = %shown(key), "file changed after its upload; uploading it again");
                Outcome::Later {
                    due_ms,
                    upload: true,
                }
            }
            LocalOutcome::Kept(reason) => {
                tracing::warn!(path = %shown(key), "{reason}");
                let _ = self.state.finish_local(key, Some(reason));
                Outcome::Done { uploaded: false }
            }
        }
    }
}

/// The parts of [`upload`] the daemon needs to build [`Options`].
pub fn upload_settings(
    multipart_threshold: u64,
    part_size: u64,
    part_concurrency: usize,
) -> Settings {
    Settings {
        multipart_threshold: multipart_threshold.min(upload::MAX_PART_SIZE),
        part_size,
        part_concurrency,
    }
}
