//! The scheduler: between the watcher, the durable queue and the workers.
//!
//! Owns: admitting candidates into the queue, the due times of queued items
//! (two lanes: uploads need a healthy provider, deletes do not; a window of
//! each in memory, the rest read from disk as room frees, see `lanes`),
//! dispatching at most `upload.workers` items (and fewer uploads while the
//! provider asks to slow down: [`Health::upload_room`]), the provider's
//! [`Health`], and
//! the pause of the whole pipeline while the root or the state_dir is
//! unavailable.
//!
//! Policy for a failed upload: an error only this item can have parks it; any
//! other error is the provider's only if a request that involves no item fails
//! too (a probe, or a success of another upload since). An item refused (a
//! 4xx) again and again while the provider answers others is parked with its
//! reason after [`MAX_STRIKES`] attempts. Transient errors (connection
//! failures, timeouts, 5xx, throttling) never count against an item: it backs
//! off up to `max_backoff` and tries again, however long that takes. A
//! failure of an upload that started on the provider before a switch says
//! nothing of the active one: it backs off, without a strike, and leaves the
//! active provider's health alone.

use crate::keys::ItemKey;
use crate::observe::metrics::Metrics;
use crate::pipeline::budget::{Budget, Pacer};
use crate::pipeline::detect::{Candidate, Trigger};
use crate::pipeline::finished::FileIdentity;
use crate::pipeline::health::{Change, Health, ProbeTicket};
use crate::pipeline::live::Live;
use crate::pipeline::localfs;
use crate::pipeline::plan::{Deletion, Plan};
use crate::pipeline::queue::{
    Admission, Admit, Blame, GivenUp, PausedInfo, PendingAbort, Queue, QueueItem, Recovered, Ring,
    Stage,
};
use crate::pipeline::root::{RootGuard, RootStatus};
use crate::pipeline::upload::{self, AbortOutcome, Delivery, Uploader};
use crate::pipeline::worker::{delete_due_ms, Lane, Outcome, Then, Worker};
use crate::remote::error::{ErrorClass, StorageError};
use crate::remote::store::Probe;
use crate::shutdown::Shutdown;
use crate::statedir;
use lanes::{Entry, Lanes};
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;

/// Refusals of one item while the provider answered others, before it is parked.
pub const MAX_STRIKES: u32 = 5;

/// How long a stop waits for the aborts of multipart uploads given up (those
/// cut short stay filed and go at the next start).
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// How often parked items whose file is gone are dropped (see
/// [`Scheduler::sweep_parked`]); the loop wakes at least hourly anyway.
const SWEEP_PARKED_EVERY: Duration = Duration::from_secs(600);

/// Aborts of given-up multipart uploads sent at once.
const ABORTS_AT_ONCE: usize = 8;

/// How often a failed state_dir is tried again.
const RECOVER_EVERY: Duration = Duration::from_secs(5);

/// The loop turns at least this often, idle or not, so that the watchdog
/// can tell it still turns ([`Live::loop_stuck`]).
const TURN_EVERY: Duration = Duration::from_secs(1);

/// Candidates taken from the watcher per turn of the loop.
const ADMIT_BATCH: usize = 1024;

/// How often a lane whose items in memory are none of them due may read its
/// backlog for items due sooner.
const ROTATE_EVERY: Duration = Duration::from_secs(5);

mod lanes;

/// Requests from the control socket.
pub enum Command {
    /// Queue parked items again (`None`: all of them); replies with the count.
    Retry {
        keys: Option<Vec<ItemKey>>,
        reply: oneshot::Sender<usize>,
    },
    /// Backfill: queue these paths regardless of the managed-since mark, or
    /// only count them.
    Backfill {
        keys: Vec<ItemKey>,
        mode: BackfillMode,
        reply: oneshot::Sender<usize>,
    },
    /// Takes a path out of the pipeline while it is deleted through; refused
    /// while it is being worked on.
    Hold {
        key: ItemKey,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Release {
        key: ItemKey,
        reply: oneshot::Sender<()>,
    },
    /// A reload: the new plan, for items that start from now on (items in
    /// flight finish as they started), and the new `memory_limit`, which
    /// holds at once for every upload: all share one budget. (The bandwidth
    /// pacer stays; its rate follows the settings.)
    Replan {
        plan: Arc<Plan>,
        memory_limit: u64,
        applied: oneshot::Sender<()>,
    },
}

/// What backfill does with the paths it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackfillMode {
    /// Only counts what would be queued (`--dry-run`).
    Count,
    Queue,
}

/// The scheduler's clock in Unix ms: anchored to the wall clock at start and
/// advanced by tokio's monotonic clock, so due times and backoffs follow
/// tokio's (pausable) time.
struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            base_ms: statedir::now_ms(),
            base: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }

    /// A time a worker gave by the wall clock (a settle end, a file's delete
    /// age, a retry in so many seconds) on this clock: the same distance from
    /// now. The two part after the wall clock is stepped (NTP) or a suspended
    /// machine resumes, and a due time must not move by that much.
    fn on_this_clock(&self, wall_ms: u64) -> u64 {
        self.now_ms() + wall_ms.saturating_sub(statedir::now_ms())
    }
}

/// When an item was queued; now for items written before this was kept.
fn queued_or_now(item: &QueueItem) -> u64 {
    match item.queued_ms {
        0 => statedir::now_ms(),
        t => t,
    }
}

/// How a queue item read from disk is scheduled: a pending delete is not
/// due before its file is `delete_after` old.
fn entry_of(item: &QueueItem, deletion: Deletion, clock: &Clock) -> Option<Entry> {
    let lane = Lane::of(&item.stage)?;
    let due_ms = match (&item.stage, deletion) {
        (Stage::Delete { identity }, Deletion::After(min_age)) => item
            .next_attempt_ms
            .max(clock.on_this_clock(delete_due_ms(identity, min_age))),
        _ => item.next_attempt_ms,
    };
    Some(Entry {
        lane,
        due_ms,
        queued_ms: (lane == Lane::Upload).then(|| queued_or_now(item)),
    })
}

/// An item being worked on.
#[derive(Clone, Copy)]
struct Flight {
    started: Instant,
    /// When it was queued for its upload (Unix ms), kept for the age of the
    /// oldest when it comes back.
    queued_ms: Option<u64>,
}

impl Flight {
    /// An upload (a delete has no queue time: see [`entry_of`]).
    fn is_upload(&self) -> bool {
        self.queued_ms.is_some()
    }
}

/// What a finished task reports.
enum Done {
    Item {
        key: ItemKey,
        outcome: Outcome,
    },
    Probe {
        provider: String,
        ticket: ProbeTicket,
        result: Result<(), StorageError>,
    },
}

/// How long a new plan waits for the deletes that read the old one.
const DELETES_DRAIN: Duration = Duration::from_secs(30);

/// The scheduler; run it with [`Scheduler::run`].
pub struct Scheduler {
    queue: Arc<Queue>,
    root: Arc<RootGuard>,
    live: Arc<Live>,
    plan: watch::Sender<Arc<Plan>>,
    /// Held (shared) by each delete from its last look at the plan through
    /// its unlink; a new plan is applied once it can be held alone.
    deletes: Arc<tokio::sync::RwLock<()>>,
    uploader: Arc<Uploader>,
    /// Due items in memory, and how many more wait on disk only.
    lanes: Lanes,
    /// Where the next read of the backlog starts (path order, wrapping).
    backlog_cursor: Vec<u8>,
    /// When a lane with nothing due may next read its backlog.
    next_rotate: Instant,
    /// When parked items whose file is gone are next dropped.
    next_sweep: Instant,
    /// Items being worked on.
    in_flight: HashMap<ItemKey, Flight>,
    tasks: JoinSet<Done>,
    task_keys: HashMap<Id, ItemKey>,
    /// Aborts of the multipart uploads of items parked (one request each).
    aborts: JoinSet<(PendingAbort, AbortOutcome)>,
    /// The aborts under way.
    aborting: HashSet<PendingAbort>,
    /// Aborts tried since the last sweep that could not go yet: not tried
    /// again before the next one.
    aborts_tried: HashSet<PendingAbort>,
    /// Providers that refuse aborts (AccessDenied), with the notice shown
    /// for each until one of its aborts goes through.
    abort_refusals: HashMap<String, String>,
    /// Paths seen again while in flight: admitted again when they finish.
    recheck: HashSet<ItemKey>,
    /// Paths being deleted through: out of the pipeline.
    held: HashSet<ItemKey>,
    /// Items whose failure waits for the probe's verdict.
    awaiting: Vec<(ItemKey, StorageError, Flight)>,
    next_age: Instant,
    health: Health,
    /// Why nothing leaves the queue (root or state_dir), as published.
    paused: Option<String>,
    /// The state_dir failed; recovery is tried at `next_recover`.
    state_paused: bool,
    /// Candidates that came while the state_dir could not be written (at
    /// most one batch: no more are taken from the watcher meanwhile).
    deferred: Vec<Candidate>,
    /// Asks the watcher for a full rescan (bumped after the database was
    /// reopened).
    rescans: watch::Sender<u64>,
    next_recover: Instant,
    clock: Clock,
}

/// The result a failed attempt counts under; `None` for one that parks its
/// item, which [`Scheduler::park`] counts.
fn metrics_label(class: ErrorClass) -> Option<&'static str> {
    match class {
        ErrorClass::ProviderWide => Some("provider"),
        ErrorClass::Item => None,
        ErrorClass::Transient | ErrorClass::RestartUpload => Some("transient"),
    }
}

/// What offloadd does next, as the end of an error message says it: said
/// of a parked item, it would contradict the reason.
const NEXT_STEPS: [&str; 3] = [
    "; will retry",
    "; uploading it again",
    "; starting it again",
];

/// An error message without what offloadd does next ([`NEXT_STEPS`]).
fn without_next_step(message: &str) -> &str {
    NEXT_STEPS
        .iter()
        .find_map(|tail| message.strip_suffix(tail))
        .unwrap_or(message)
}

impl Scheduler {
    pub fn new(
        plan: Arc<Plan>,
        (budget, pacer): (Budget, Pacer),
        queue: Arc<Queue>,
        root: Arc<RootGuard>,
        live: Arc<Live>,
        rescans: watch::Sender<u64>,
    ) -> Scheduler {
        let uploader = Arc::new(Uploader {
            budget,
            hashing: upload::hashing_turns(),
            pacer,
            progress: live.progress.clone(),
            queue: queue.clone(),
        });
        let health = Health::new(plan.options.retry);
        live.turned();
        let mut s = Scheduler {
            queue,
            root,
            live,
            plan: watch::channel(plan).0,
            deletes: Arc::default(),
            uploader,
            lanes: Lanes::default(),
            backlog_cursor: Vec::new(),
            next_rotate: Instant::now(),
            next_sweep: Instant::now() + SWEEP_PARKED_EVERY,
            in_flight: HashMap::new(),
            tasks: JoinSet::new(),
            aborts: JoinSet::new(),
            aborting: HashSet::new(),
            aborts_tried: HashSet::new(),
            abort_refusals: HashMap::new(),
            task_keys: HashMap::new(),
            recheck: HashSet::new(),
            held: HashSet::new(),
            awaiting: Vec::new(),
            next_age: Instant::now(),
            health,
            paused: None,
            state_paused: false,
            deferred: Vec::new(),
            rescans,
            next_recover: Instant::now(),
            clock: Clock::new(),
        };
        s.load_queue();
        if let Some(store) = s.current().target.store() {
            s.live
                .metrics
                .set_provider_paused(&store.provider().name, false);
        }
        s
    }

    fn current(&self) -> Arc<Plan> {
        self.plan.borrow().clone()
    }

    fn metrics(&self) -> &Metrics {
        &self.live.metrics
    }

    /// Whether a worker has the item, or it waits for a probe's verdict:
    /// its outcome, not a command, decides what comes next.
    fn busy(&self, key: &ItemKey) -> bool {
        self.in_flight.contains_key(key) || self.awaiting.iter().any(|a| a.0 == *key)
    }

    /// Schedules everything the queue holds (the items due first in memory,
    /// the rest counted in the backlogs); items in flight when the last run
    /// ended are simply pending again.
    fn load_queue(&mut self) {
        let mut lanes = Lanes::with_window(self.lanes.window());
        let deletion = self.current().deletion();
        let mut failed = std::collections::BTreeMap::new();
        let loaded = self.queue.for_each_item(|key, item| {
            // Items in flight, held, or awaiting a probe's verdict come back
            // through their own path. (Awaiting ones could not run twice
            // today, since nothing is dispatched until the verdict; they are
            // skipped so that this holds without that.)
            if self.busy(&key) || self.held.contains(&key) {
                return;
            }
            if let Stage::Parked { reason } = &item.stage {
                failed.insert(key, reason.clone());
            } else if let Some(entry) = entry_of(&item, deletion, &self.clock) {
                lanes.insert(key, entry);
            }
        });
        if let Err(e) = loaded {
            tracing::error!(error = %e, "cannot read the queue: {e}");
            return;
        }
        self.lanes = lanes;
        self.backlog_cursor.clear();
        if self.lanes.len() > 0 || !failed.is_empty() {
            tracing::info!(
                pending = self.lanes.len(),
                failed = failed.len(),
                "resuming the queue"
            );
        }
        self.live.update(|s| s.failed = failed);
        self.cancel_deletes_if_off();
        self.publish();
    }

    /// With deletion off (or in local mode), pending deletes are dropped, in
    /// memory and in the backlog (read from disk a window at a time).
    fn cancel_deletes_if_off(&mut self) {
        if self.current().deletion() != Deletion::Keep || self.lanes.pending(Lane::Delete) == 0 {
            return;
        }
        let mut n = 0;
        'rounds: loop {
            let mut keys = Vec::new();
            let read = self.queue.scan_ring(&[], |key, item| {
                let idle = !self.in_flight.contains_key(&key) && !self.held.contains(&key);
                if idle && matches!(item.stage, Stage::Delete { .. }) {
                    keys.push(key);
                }
                if keys.len() < self.lanes.window() {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            });
            if let Err(e) = read {
                tracing::error!(error = %e, "cannot cancel pending deletes: {e}");
                break;
            }
            if keys.is_empty() {
                self.lanes.set_backlog(Lane::Delete, 0);
                break;
            }
            for key in keys {
                if let Err(e) = self.queue.cancel_delete(&key) {
                    tracing::error!(error = %e, "cannot cancel pending deletes: {e}");
                    break 'rounds;
                }
                self.lanes.remove(&key);
                n += 1;
            }
        }
        if n == 0 {
            return;
        }
        tracing::info!(
            cancelled = n,
            "deletion of local copies is off: {n} pending delete(s) cancelled; those files stay local"
        );
    }

    fn publish(&self) {
        let depth = (self.lanes.len() + self.in_flight.len() + self.awaiting.len()) as u64;
        let in_flight = self.in_flight.len() as u64;
        self.live.queue_depth.store(depth, Ordering::Relaxed);
        self.live.in_flight.store(in_flight, Ordering::Relaxed);
        let m = self.metrics();
        // The metric counts uploads only (its alerts ask whether uploads keep
        // up): with `delete_after: 24h`, a day of local copies waiting for
        // their delete is no backlog. `status` counts both.
        let uploads_in_flight = self.in_flight.values().filter(|f| f.is_upload()).count();
        let waiting_uploads =
            self.lanes.pending(Lane::Upload) + uploads_in_flight + self.awaiting.len();
        m.set_queue_depth(waiting_uploads as u64);
        m.set_in_flight(in_flight);
        let (failed, paused) = self.live.update(|s| (s.failed.len(), s.paused.is_some()));
        m.set_failed_items(failed as u64);
        m.set_paused_providers(paused as u64);
    }

    /// The age of the oldest item waiting for its upload, for `/metrics`
    /// (a scan of all of them, so at most every few seconds).
    fn publish_age(&mut self) {
        if Instant::now() < self.next_age {
            return;
        }
        self.next_age = Instant::now() + Duration::from_secs(5);
        let now = self.clock.now_ms();
        let flights = self
            .in_flight
            .values()
            .chain(self.awaiting.iter().map(|a| &a.2));
        let age = flights
            .filter_map(|f| f.queued_ms)
            .chain(self.lanes.oldest_queued_ms())
            .min()
            .map_or(0, |t| now.saturating_sub(t) / 1000);
        self.metrics().set_oldest_pending_age(age);
    }

    /// Runs until `shutdown` fires, then lets work in flight finish for up to
    /// `grace`; what is left stays queued (multipart uploads resumable).
    pub async fn run(
        mut self,
        mut candidates: mpsc::Receiver<Candidate>,
        mut commands: mpsc::Receiver<Command>,
        mut shutdown: Shutdown,
        grace: Duration,
    ) {
        let mut commands_open = true;
        // A root that goes away or comes back pauses or resumes the pipeline
        // at once, and `status` says so, however idle the queue.
        let mut root_changes = self.root.subscribe();
        // Aborts filed before a stop (or a crash) go again.
        self.send_aborts();
        let mut turn = tokio::time::interval(TURN_EVERY);
        turn.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutdown.is_shutdown() {
                // No new work once the stop is signalled.
                break;
            }
            self.live.turned();
            self.maintain().await;
            self.read_backlog();
            self.dispatch();
            self.publish_age();
            let wake = self.next_wake();
            tokio::select! {
                // While paused, candidates wait in the channel (the watcher
                // drops and rescans when it is full).
                c = candidates.recv(), if self.paused.is_none() => match c {
                    Some(c) => {
                        if crate::failpoint::fails(crate::failpoint::SCHEDULER_PANICS) {
                            panic!("failpoint {} reached", crate::failpoint::SCHEDULER_PANICS);
                        }
                        self.admit(c);
                        for _ in 0..ADMIT_BATCH {
                            if !self.deferred.is_empty() {
                                break;
                            }
                            match candidates.try_recv() {
                                Ok(c) => self.admit(c),
                                Err(_) => break,
                            }
                        }
                        self.publish();
                    }
                    None => {
                        // The watcher stopped (local mode); keep serving.
                        candidates = mpsc::channel(1).1;
                    }
                },
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.finished(done),
                Some(done) = self.aborts.join_next(), if !self.aborts.is_empty() => self.aborted(done),
                cmd = commands.recv(), if commands_open => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => commands_open = false,
                },
                Ok(()) = root_changes.changed() => {}
                _ = tokio::time::sleep(wake) => {}
                _ = turn.tick() => {}
                _ = shutdown.recv() => break,
            }
        }
        self.stop(grace).await;
    }

    async fn stop(&mut self, grace: Duration) {
        let n = self.in_flight.len();
        if n > 0 {
            tracing::info!(
                in_flight = n,
                grace_s = grace.as_secs(),
                "stopping: letting uploads in flight finish"
            );
            let deadline = Instant::now() + grace;
            while !self.in_flight.is_empty() {
                match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                    Ok(Some(done)) => self.finished(done),
                    _ => break,
                }
            }
            if !self.in_flight.is_empty() {
                tracing::warn!(
                    left = self.in_flight.len(),
                    "stopping with uploads unfinished; they stay queued and resume at the next start"
                );
            }
        }
        self.tasks.shutdown().await;
        let deadline = Instant::now() + grace.min(ABORT_GRACE);
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, self.aborts.join_next()).await
        {
            self.aborted(done);
        }
        self.aborts.shutdown().await;
    }

    /// The pause of the whole pipeline (state_dir, root), and recovery: a
    /// failed state_dir is tried again every [`RECOVER_EVERY`].
    async fn maintain(&mut self) {
        if self.queue.failure().is_some() {
            let now = Instant::now();
            if !self.state_paused {
                self.state_paused = true;
                self.next_recover = now + RECOVER_EVERY;
            } else if now >= self.next_recover {
                self.next_recover = now + RECOVER_EVERY;
                if let Ok(recovered) = self.queue.recover() {
                    self.state_paused = false;
                    if recovered == Recovered::Reopened {
                        // Admissions not yet on disk are gone: look again.
                        self.rescans.send_modify(|n| *n += 1);
                    }
                    self.resume_after_state_failure();
                }
            }
        } else if self.state_paused {
            self.state_paused = false;
            self.resume_after_state_failure();
        }
        if Instant::now() >= self.next_sweep {
            // Moved on while paused too, or the loop would wake at once for
            // it for the rest of the pause.
            self.next_sweep = Instant::now() + SWEEP_PARKED_EVERY;
            if self.paused.is_none() {
                self.sweep_parked().await;
            }
            // Aborts that could not reach the provider go again.
            self.aborts_tried.clear();
            self.send_aborts();
        } else if self.queue.take_filed_aborts() {
            self.send_aborts();
        }
        let paused = match (self.queue.failed_state(), self.root.status()) {
            (Some(e), _) => Some(e.to_string()),
            (None, RootStatus::Unavailable(why)) => Some(why),
            (None, RootStatus::Present) => None,
        };
        if paused != self.paused {
            self.live.update(|s| s.pipeline_paused = paused.clone());
            if let Some(why) = &paused {
                self.live.update(|s| s.last_error = Some(why.clone()));
            }
            self.paused = paused;
        }
    }

    /// Drops parked items whose file is gone (a symbolic link removed, a
    /// folder with an unreadable file deleted): nothing finds them again, so
    /// they would stay in the database and in `status` for good. Only while
    /// the root is there, which proves the file gone.
    async fn sweep_parked(&mut self) {
        let root = self.current().options.root.clone();
        let parked: Vec<ItemKey> = self.live.update(|s| s.failed.keys().cloned().collect());
        let gone: Vec<ItemKey> = parked
            .into_iter()
            .filter(|key| !self.held.contains(key) && !self.in_flight.contains_key(key))
            .filter(|key| {
                matches!(
                    std::fs::symlink_metadata(key.to_local(&root)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound
                )
            })
            .collect();
        // The root there after the files were found missing proves them gone
        // (an unmount meanwhile would make every one look missing).
        let Ok(present) = self.root.check().await else {
            return;
        };
        let mut dropped = 0;
        for key in gone {
            let still_parked = matches!(
                self.queue.item(&key),
                Ok(Some(item)) if item.is_parked()
            );
            if !still_parked {
                continue;
            }
            if let Err(e) = self.queue.drop_vanished(&key, &present) {
                tracing::error!(path = %key, error = %e, "{e}");
                return;
            }
            self.live.update(|s| s.failed.remove(&key));
            dropped += 1;
        }
        if dropped > 0 {
            tracing::info!(dropped, "dropped {dropped} parked items whose file is gone");
            self.publish();
        }
    }

    /// Sends the aborts filed for multipart uploads given up (one request
    /// each, in the background, [`ABORTS_AT_ONCE`] at most; see
    /// [`Queue::pending_aborts`]).
    fn send_aborts(&mut self) {
        let plan = self.current();
        for p in self.queue.pending_aborts() {
            if self.aborting.len() >= ABORTS_AT_ONCE {
                break;
            }
            if self.aborts_tried.contains(&p) || !self.aborting.insert(p.clone()) {
                continue;
            }
            let (plan, queue) = (plan.clone(), self.queue.clone());
            self.aborts.spawn(async move {
                // Only once the item no longer names the upload on disk: a
                // crash before would resume an upload already aborted, which
                // the server then refuses for good.
                if queue.durable().await.is_err() {
                    return (p, AbortOutcome::Later);
                }
                let outcome = upload::abort_filed(&plan, &p).await;
                (p, outcome)
            });
        }
    }

    /// An abort came back: a settled one is unfiled, one that could not go
    /// waits for the next sweep, and the next filed one goes.
    fn aborted(&mut self, done: Result<(PendingAbort, AbortOutcome), tokio::task::JoinError>) {
        let Ok((pending, outcome)) = done else {
            return;
        };
        self.aborting.remove(&pending);
        match outcome {
            AbortOutcome::Settled => {
                self.abort_allowed(&pending.provider);
                if let Err(e) = self.queue.abort_done(&pending) {
                    // Sent again after the next sweep (and answered gone).
                    tracing::debug!(error = %e, "cannot unfile an abort");
                    self.aborts_tried.insert(pending);
                }
            }
            AbortOutcome::Later => {
                self.aborts_tried.insert(pending);
            }
            AbortOutcome::Refused => {
                self.abort_refused(&pending.provider);
                self.aborts_tried.insert(pending);
            }
        }
        self.send_aborts();
    }

    /// `provider` refused an abort (AccessDenied): said once per provider,
    /// in the log and in `status`, not per abort nor per sweep; the aborts
    /// keep going at every sweep.
    fn abort_refused(&mut self, provider: &str) {
        if let Some(notice) = self.abort_refusals.get(provider) {
            // Shown again should newer notices have pushed it out.
            self.live.notice(notice.clone());
            return;
        }
        let n = self
            .queue
            .pending_aborts()
            .iter()
            .filter(|p| p.provider == provider)
            .count();
        let notice = format!(
            "provider `{provider}` refuses AbortMultipartUpload (AccessDenied): grant the key s3:AbortMultipartUpload, or the parts of {n} given-up upload(s) stay billed until the bucket's lifecycle rule removes them"
        );
        tracing::warn!(provider = %provider, "{notice}");
        self.live.notice(notice.clone());
        self.abort_refusals.insert(provider.to_string(), notice);
    }

    /// An abort on `provider` went through: a refusal said before no longer
    /// holds.
    fn abort_allowed(&mut self, provider: &str) {
        if let Some(notice) = self.abort_refusals.remove(provider) {
            self.live.withdraw(&notice);
            tracing::info!(provider = %provider, "provider `{provider}` accepts AbortMultipartUpload again; its given-up uploads are aborted as the sweeps reach them");
        }
    }

    /// The state_dir works again: the queue as it is on disk, then the
    /// candidates that waited.
    fn resume_after_state_failure(&mut self) {
        self.load_queue();
        for c in std::mem::take(&mut self.deferred) {
            self.admit(c);
        }
    }

    /// When the loop must look again by itself (a worker's end, a candidate
    /// or a command wake it anyway): when an item falls due that could be
    /// dispatched then, or a probe is due. Items due while nothing can take
    /// them (the pipeline paused, every worker busy) do not count, or the loop
    /// would turn every few milliseconds for as long as that lasts.
    fn next_wake(&self) -> Duration {
        let now = self.clock.now_ms();
        let mut wake = Duration::from_secs(3600);
        let plan = self.current();
        let mut lanes = vec![];
        if self.paused.is_some() {
            wake = wake.min(Duration::from_secs(1));
        } else if self.in_flight.len() < plan.options.workers.max(1) {
            lanes.push(Lane::Delete);
            if self.upload_may_start(&plan) {
                lanes.push(Lane::Upload);
            }
        }
        for lane in lanes {
            if let Some(due) = self.lanes.first_due(lane) {
                wake = wake.min(Duration::from_millis(due.saturating_sub(now)));
            }
        }
        if let Some(at) = self.health.next_probe() {
            wake = wake.min(at.saturating_duration_since(Instant::now()));
        }
        wake = wake.min(self.next_sweep.saturating_duration_since(Instant::now()));
        wake.max(Duration::from_millis(5))
    }

    /// Reads items that wait on disk into the lanes that want them (see
    /// [`Lanes::wants_items`]), at most a window's worth, from where the last
    /// read stopped. A read round the whole queue also recounts the backlogs.
    fn read_backlog(&mut self) {
        if self.paused.is_some() {
            return;
        }
        let now_ms = self.clock.now_ms();
        let rotate = Instant::now() >= self.next_rotate;
        let want = [Lane::Upload, Lane::Delete].map(|l| self.lanes.wants_items(l, now_ms, rotate));
        if want == [false, false] {
            return;
        }
        if rotate {
            self.next_rotate = Instant::now() + ROTATE_EVERY;
        }
        let slot = |lane| (lane == Lane::Delete) as usize;
        let deletion = self.current().deletion();
        let Scheduler {
            queue,
            lanes,
            in_flight,
            held,
            awaiting,
            backlog_cursor,
            clock,
            ..
        } = self;
        // Per lane: its items on disk that are in no other hands.
        let mut on_disk = [0usize; 2];
        let (mut taken, mut stopped_at) = (0, None);
        let read = queue.scan_ring(backlog_cursor, |key, item| {
            let Some(entry) = entry_of(&item, deletion, clock) else {
                return ControlFlow::Continue(());
            };
            if in_flight.contains_key(&key)
                || held.contains(&key)
                || awaiting.iter().any(|a| a.0 == key)
            {
                return ControlFlow::Continue(());
            }
            on_disk[slot(entry.lane)] += 1;
            if lanes.contains(&key) || !want[slot(entry.lane)] {
                return ControlFlow::Continue(());
            }
            if taken == lanes.window() {
                stopped_at = Some(key);
                return ControlFlow::Break(());
            }
            lanes.take_from_backlog(key, entry);
            taken += 1;
            ControlFlow::Continue(())
        });
        match read {
            Ok(Ring::Whole) => {
                for lane in [Lane::Upload, Lane::Delete] {
                    let in_memory = lanes.pending(lane) - lanes.backlog(lane);
                    lanes.set_backlog(lane, on_disk[slot(lane)].saturating_sub(in_memory));
                }
            }
            Ok(Ring::Stopped) => {
                if let Some(key) = stopped_at {
                    *backlog_cursor = key.as_bytes().to_vec();
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the queue: {e}"),
        }
    }

    fn dispatch(&mut self) {
        self.maybe_probe();
        if self.paused.is_some() {
            return;
        }
        let plan = self.current();
        let workers = plan.options.workers.max(1);
        let now = self.clock.now_ms();
        while self.in_flight.len() < workers {
            if let Some((key, entry)) = self.lanes.pop_due(Lane::Delete, now) {
                self.spawn(key, entry, &plan);
                continue;
            }
            if !self.upload_may_start(&plan) {
                break;
            }
            match self.lanes.pop_due(Lane::Upload, now) {
                Some((key, entry)) => self.spawn(key, entry, &plan),
                None => break,
            }
        }
        self.publish();
    }

    /// Whether one more upload may start: a target, a healthy provider, and
    /// room in the window throttling left (see `health`).
    fn upload_may_start(&self, plan: &Plan) -> bool {
        plan.target.store().is_some()
            && self.health.uploads_allowed()
            && self.uploads_in_flight() < self.health.upload_room(plan.options.workers.max(1))
    }

    fn uploads_in_flight(&self) -> usize {
        self.in_flight.values().filter(|f| f.is_upload()).count()
    }

    fn spawn(&mut self, key: ItemKey, entry: Entry, plan: &Arc<Plan>) {
        if self.in_flight.is_empty() {
            self.live.progress.step(statedir::now_ms());
        }
        let flight = Flight {
            started: Instant::now(),
            queued_ms: entry.queued_ms,
        };
        self.in_flight.insert(key.clone(), flight);
        let worker = Worker {
            queue: self.queue.clone(),
            root: self.root.clone(),
            plan: self.plan.subscribe(),
            deletes: self.deletes.clone(),
            started: plan.clone(),
            uploader: self.uploader.clone(),
            metrics: self.metrics().clone(),
        };
        let k = key.clone();
        let handle = self.tasks.spawn(async move {
            let outcome = worker.process(&k).await;
            Done::Item { key: k, outcome }
        });
        self.task_keys.insert(handle.id(), key);
    }

    fn maybe_probe(&mut self) {
        let plan = self.current();
        let Some(store) = plan.target.store() else {
            return;
        };
        let Some(ticket) = self.health.want_probe(Instant::now()) else {
            return;
        };
        // Uploads whose local copy goes are verified by a HEAD: the probe
        // reads too, or a key that may not read fails every item instead.
        let check = match plan.deletion() {
            Deletion::Keep => Probe::Write,
            Deletion::After(_) => Probe::WriteAndRead,
        };
        let store = store.clone();
        let provider = store.provider().name.clone();
        tracing::debug!(provider = %provider, "probing the provider");
        self.tasks.spawn(async move {
            let result = store.probe(check).await;
            Done::Probe {
                provider,
                ticket,
                result,
            }
        });
    }

    fn finished(&mut self, done: Result<(Id, Done), tokio::task::JoinError>) {
        match done {
            Ok((id, Done::Item { key, outcome })) => {
                // Any item done is progress for the watchdog: a long run of
                // deletes (a day's uploads falling due together) keeps
                // workers busy without an upload step to show.
                self.live.progress.step(statedir::now_ms());
                self.task_keys.remove(&id);
                let flight = self.in_flight.remove(&key).unwrap_or(Flight {
                    started: Instant::now(),
                    queued_ms: None,
                });
                self.complete(key, outcome, flight);
            }
            Ok((
                _,
                Done::Probe {
                    provider,
                    ticket,
                    result,
                },
            )) => self.probed(&provider, ticket, result),
            Err(e) => {
                // A worker that panicked: its item stays queued as it was.
                if let Some(key) = self.task_keys.remove(&e.id()) {
                    let flight = self.in_flight.remove(&key);
                    tracing::error!(path = %key, error = %e, "an upload task failed; the item stays queued");
                    let due = self.clock.now_ms() + 60_000;
                    self.requeue(key, Lane::Upload, due, flight);
                } else if !e.is_cancelled() {
                    let ticket = self.health.latest_ticket();
                    self.health.probe_abandoned(ticket);
                }
            }
        }
        self.publish();
    }

    /// Schedules an item that is back from a worker (or never left) in
    /// `lane`; an upload keeps the time it was first queued.
    fn requeue(&mut self, key: ItemKey, lane: Lane, due_ms: u64, flight: Option<Flight>) {
        if self.held.contains(&key) {
            // Being deleted through; its release puts it back if it stays.
            return;
        }
        let queued_ms = match lane {
            Lane::Upload => Some(
                flight
                    .and_then(|f| f.queued_ms)
                    .unwrap_or_else(|| self.clock.now_ms()),
            ),
            Lane::Delete => None,
        };
        let entry = Entry {
            lane,
            due_ms,
            queued_ms,
        };
        self.lanes.insert(key, entry);
    }

    fn complete(&mut self, key: ItemKey, outcome: Outcome, flight: Flight) {
        match outcome {
            Outcome::Uploaded { then, delivery } => {
                self.live.update(|s| s.failed.remove(&key));
                // An upload to the provider before a switch says nothing
                // of the active one; nor does an object found to hold the
                // bytes already, which took a HEAD, not a write.
                if delivery == Delivery::Sent && self.health.is_current(flight.started) {
                    let change = self.health.upload_succeeded(Instant::now());
                    self.health_changed(change);
                    // It answers for the probe the items awaiting a verdict
                    // wait on (that probe's answer no longer counts): the
                    // provider works, so each failed for a reason of its own.
                    for (key, err, flight) in std::mem::take(&mut self.awaiting) {
                        self.blame_item(key, err, flight);
                    }
                }
                match then {
                    Then::Done => {}
                    Then::At { lane, due_ms } => {
                        let due = self.clock.on_this_clock(due_ms);
                        self.requeue(key.clone(), lane, due, None);
                    }
                    // Logged, shown and backed off like any other.
                    Then::LocalError { error, blame } => {
                        let flight = Flight {
                            queued_ms: None,
                            ..flight
                        };
                        self.local_failed(key.clone(), Lane::Delete, error, blame, flight)
                    }
                }
            }
            Outcome::Settled => {
                self.live.update(|s| s.failed.remove(&key));
            }
            Outcome::Later { due_ms, lane } => {
                let due = self.clock.on_this_clock(due_ms);
                self.requeue(key.clone(), lane, due, Some(flight))
            }
            Outcome::Parked(reason) => self.park_noted(&key, reason),
            Outcome::Failed(err) => self.failed(key.clone(), err, flight),
            Outcome::LocalError { lane, error, blame } => {
                self.local_failed(key.clone(), lane, error, blame, flight)
            }
            Outcome::State(e) => {
                self.live.update(|s| s.last_error = Some(e.to_string()));
                // The queue is failed now; it is reloaded once it recovers.
                let due = self.clock.now_ms() + 1_000;
                self.requeue(key.clone(), Lane::Upload, due, Some(flight));
            }
            Outcome::RootGone(why) => {
                self.live.update(|s| s.last_error = Some(why));
                self.reinsert_from_queue(&key);
            }
        }
        self.recheck_if_asked(&key);
    }

    /// Admits a path again whose file events came while it was in other
    /// hands (in flight, held).
    fn recheck_if_asked(&mut self, key: &ItemKey) {
        if self.recheck.remove(key) {
            let abs = key.to_local(&self.current().options.root);
            self.admit(Candidate {
                abs,
                trigger: Trigger::Event,
            });
        }
    }

    /// Ends a [`Command::Hold`].
    fn release(&mut self, key: &ItemKey) {
        self.held.remove(key);
        // Still queued (the delete-through did not finish): resume it.
        self.reinsert_from_queue(key);
        // A file written meanwhile (its object deleted, or not).
        self.recheck_if_asked(key);
    }

    /// Puts an item back as the queue has it: into its lane, or, parked, into
    /// the list `status` and `retry --all` show.
    fn reinsert_from_queue(&mut self, key: &ItemKey) {
        let Ok(Some(item)) = self.queue.item(key) else {
            return;
        };
        if let Stage::Parked { reason } = &item.stage {
            self.live
                .update(|s| s.failed.insert(key.clone(), reason.clone()));
        } else if let Some(entry) = entry_of(&item, self.current().deletion(), &self.clock) {
            let due_ms = self.clock.now_ms() + 1_000;
            self.lanes.insert(key.clone(), Entry { due_ms, ..entry });
        }
    }

    /// The policy for a failed storage request (see the module docs).
    /// Each failed attempt is counted once, under the result it comes to:
    /// `parked` if it parks its item, else its class ([`metrics_label`]);
    /// one that awaits a probe's verdict, once the verdict is in.
    fn failed(&mut self, key: ItemKey, err: StorageError, flight: Flight) {
        self.live
            .update(|s| s.last_error = Some(err.message.clone()));
        // Fewer uploads at once, not only this one later (see `health`).
        if err.is_throttle() && self.health.is_current(flight.started) {
            let out = self.uploads_in_flight() + 1;
            if let Some(room) = self.health.slow_down(out, Instant::now()) {
                tracing::info!(
                    uploads_at_once = room,
                    "provider `{}` asked to slow down: at most {room} uploads at once until it accepts more",
                    self.current().target.name()
                );
            }
        }
        match err.class {
            ErrorClass::Item => self.park(key, err.message),
            // An upload to the provider before a switch says nothing of the
            // active one (as on success): it backs off, not held against
            // the item, and the active provider's health is left alone.
            ErrorClass::Transient | ErrorClass::ProviderWide
                if !self.health.is_current(flight.started) =>
            {
                self.back_off_upload(key, err, flight, Blame::Provider)
            }
            ErrorClass::RestartUpload => {
                // InvalidPart leaves the upload open at the server.
                let given_up = match err.code.as_deref() {
                    Some("InvalidPart" | "InvalidPartOrder") => GivenUp::Open,
                    _ => GivenUp::Gone,
                };
                if let Err(e) = self.queue.clear_multipart(&key, given_up) {
                    tracing::error!(error = %e, "{e}");
                }
                tracing::warn!(path = %key, error = %err.message, "restarting the upload");
                self.blame_item(key, err, flight);
            }
            // The server asked us to slow down: this item backs off, and only
            // a run of such answers makes the provider suspect.
            ErrorClass::Transient if err.is_throttle() && !self.health.throttled() => {
                self.blame_item(key, err, flight)
            }
            ErrorClass::Transient | ErrorClass::ProviderWide => {
                match self.health.item_failed(flight.started) {
                    Some(true) => self.blame_item(key, err, flight),
                    Some(false) => {
                        self.count_failed(&err);
                        let now = self.clock.now_ms();
                        self.requeue(key, Lane::Upload, now, Some(flight))
                    }
                    None => {
                        self.awaiting.push((key, err, flight));
                        self.maybe_probe();
                    }
                }
            }
        }
    }

    /// The local file system failed while the root was there (see
    /// [`Outcome::LocalError`]): the item backs off in its lane, up to
    /// `max_backoff`, however long that takes; a failure that may be the
    /// file's (a bad sector) is a strike, and parks it after [`MAX_STRIKES`].
    /// Logged when an item's error is new, not at every attempt.
    fn local_failed(
        &mut self,
        key: ItemKey,
        lane: Lane,
        error: String,
        blame: Blame,
        flight: Flight,
    ) {
        self.live.update(|s| s.last_error = Some(error.clone()));
        let soon = self.clock.now_ms() + 1_000;
        let Some((item, due)) = self.failed_item(&key, lane, flight) else {
            return;
        };
        let due = match self.queue.back_off(&key, due, &error, blame) {
            Ok(strikes) if blame == Blame::Item && strikes >= MAX_STRIKES => {
                let reason = format!(
                    "{}, then run `offloadd retry` (it failed {strikes} times while the watch root was there)",
                    error.trim_end_matches(localfs::TRIED_AGAIN)
                );
                return self.park(key, reason);
            }
            Ok(_) => due,
            Err(_) => soon,
        };
        if lane == Lane::Upload {
            self.metrics().upload_failed("transient");
        }
        self.metrics().retry();
        if item.last_error.as_deref() == Some(error.as_str()) {
            tracing::debug!(path = %key, attempt = item.attempts + 1, error = %error, "{error}");
        } else {
            tracing::warn!(path = %key, attempt = item.attempts + 1, error = %error, "{error}");
        }
        self.requeue(key, lane, due, Some(flight));
    }

    /// The item of a failed attempt and when its next attempt is due (the
    /// retry backoff for its attempts); `None` once handled otherwise: the
    /// item is gone, or the state could not be read (then it goes again in
    /// `lane` in a second).
    fn failed_item(
        &mut self,
        key: &ItemKey,
        lane: Lane,
        flight: Flight,
    ) -> Option<(QueueItem, u64)> {
        let item = match self.queue.item(key) {
            Ok(Some(i)) => i,
            Ok(None) => return None,
            Err(_) => {
                let soon = self.clock.now_ms() + 1_000;
                self.requeue(key.clone(), lane, soon, Some(flight));
                return None;
            }
        };
        let retry = self.current().options.retry;
        let due = self.clock.now_ms() + retry.jittered(item.attempts + 1).as_millis() as u64;
        Some((item, due))
    }

    /// Counts a failed upload attempt that does not park its item.
    fn count_failed(&self, err: &StorageError) {
        if let Some(label) = metrics_label(err.class) {
            self.metrics().upload_failed(label);
        }
    }

    /// The provider answered other requests: the failure was this item's.
    fn blame_item(&mut self, key: ItemKey, err: StorageError, flight: Flight) {
        // Transient errors are never the item's fault. An upload that has
        // to start again is, whether the server said so or our check after
        // it did (an ETag that never matches): it must not go round for ever.
        let blame = if err.class == ErrorClass::Transient
            || (err.status.is_none() && err.class != ErrorClass::RestartUpload)
        {
            Blame::Provider
        } else {
            Blame::Item
        };
        self.back_off_upload(key, err, flight, blame);
    }

    /// Backs a failed upload off, with a strike if `blame` is the item's;
    /// parks it after [`MAX_STRIKES`].
    fn back_off_upload(&mut self, key: ItemKey, err: StorageError, flight: Flight, blame: Blame) {
        let soon = self.clock.now_ms() + 1_000;
        let Some((item, due)) = self.failed_item(&key, Lane::Upload, flight) else {
            return;
        };
        match self.queue.back_off(&key, due, &err.message, blame) {
            Ok(strikes) if blame == Blame::Item && strikes >= MAX_STRIKES => {
                let reason = format!(
                    "{} (it failed {strikes} times while the provider accepted other requests; fix the cause, then run `offloadd retry`)",
                    without_next_step(&err.message)
                );
                self.park(key, reason);
            }
            Ok(_) => {
                self.count_failed(&err);
                self.metrics().retry();
                tracing::warn!(path = %key, attempt = item.attempts + 1, error = %err.message, "upload of {key} failed: {}", err.message);
                self.requeue(key, Lane::Upload, due, Some(flight));
            }
            Err(_) => {
                self.count_failed(&err);
                self.metrics().retry();
                self.requeue(key, Lane::Upload, soon, Some(flight))
            }
        }
    }

    fn probed(&mut self, provider: &str, ticket: ProbeTicket, result: Result<(), StorageError>) {
        if self.current().target.name() != provider || ticket != self.health.latest_ticket() {
            // Sent before a reload or a switch, or answered for by an upload
            // since: its answer decides nothing. The items that waited for
            // it go again, under the new settings (a new failure starts a
            // fresh probe), without a strike, unless a newer probe is out:
            // they wait for its verdict.
            self.health.probe_abandoned(ticket);
            if !self.health.probe_out() {
                self.release_awaiting();
            }
            return;
        }
        match result {
            Ok(()) => {
                let change = self.health.probe_succeeded(ticket, Instant::now());
                self.health_changed(change);
                for (key, err, flight) in std::mem::take(&mut self.awaiting) {
                    self.blame_item(key, err, flight);
                }
            }
            Err(e) => {
                let change = self.health.probe_failed(ticket, &e.message, Instant::now());
                self.live.update(|s| s.last_error = Some(e.message.clone()));
                self.health_changed(change);
                self.release_awaiting();
            }
        }
    }

    /// Puts the items that waited for a probe's verdict back in the upload
    /// lane, due now, without blaming them: the provider was at fault, or
    /// the verdict no longer counts.
    fn release_awaiting(&mut self) {
        let now = self.clock.now_ms();
        for (key, err, flight) in std::mem::take(&mut self.awaiting) {
            self.count_failed(&err);
            self.requeue(key, Lane::Upload, now, Some(flight));
        }
    }

    fn health_changed(&mut self, change: Option<Change>) {
        let Some(change) = change else { return };
        let provider = self.current().target.name().to_string();
        let waiting = self.lanes.pending(Lane::Upload) + self.awaiting.len();
        match change {
            Change::Paused(reason) => {
                tracing::error!(
                    provider = %provider,
                    error = %reason,
                    waiting,
                    "provider {provider} paused: {reason}; uploads wait and one probe at a time retries with backoff"
                );
                self.set_paused_info(&provider, Some(reason));
            }
            Change::Reason(reason) => {
                // Shown in status; one log line per outage, not per probe.
                tracing::debug!(provider = %provider, error = %reason, "provider {provider} is still paused: {reason}");
                self.set_paused_info(&provider, Some(reason));
            }
            Change::Resumed { reason, paused_s } => {
                tracing::info!(
                    provider = %provider,
                    paused_for_s = paused_s,
                    waiting,
                    "provider {provider} is back; uploads resume (it was paused: {reason})"
                );
                self.set_paused_info(&provider, None);
            }
        }
    }

    fn set_paused_info(&mut self, provider: &str, reason: Option<String>) {
        let info = reason.map(|reason| PausedInfo {
            provider: provider.to_string(),
            reason,
            since: statedir::rfc3339(statedir::now_ms()),
        });
        let info = self.live.update(|s| {
            if let (Some(old), Some(new)) = (&s.paused, &info) {
                if old.provider == new.provider {
                    // Keep when the pause began.
                    s.paused = Some(PausedInfo {
                        since: old.since.clone(),
                        ..new.clone()
                    });
                    return s.paused.clone();
                }
            }
            s.paused = info.clone();
            info
        });
        self.metrics().set_provider_paused(provider, info.is_some());
        if let Err(e) = self.queue.set_paused(provider, info.as_ref()) {
            tracing::debug!(error = %e, "cannot remember the provider pause");
        }
    }

    fn park_noted(&mut self, key: &ItemKey, reason: String) {
        self.live.update(|s| {
            if s.failed.get(key) != Some(&reason) {
                tracing::warn!(path = %key, error = %reason, "not uploading {key}: {reason}");
            }
            s.failed.insert(key.clone(), reason.clone());
            s.last_error = Some(reason);
        });
    }

    /// Parks an item with its reason; a multipart upload it had started is
    /// aborted, so that its parts do not stay billed in the bucket.
    fn park(&mut self, key: ItemKey, reason: String) {
        let item = self.queue.item(&key).ok().flatten();
        let same = item
            .as_ref()
            .is_some_and(|i| matches!(&i.stage, Stage::Parked { reason: r } if *r == reason));
        self.lanes.remove(&key);
        if !same {
            if let Err(e) = self.queue.park(&key, &reason) {
                tracing::error!(path = %key, error = %e, "cannot park {key}: {e}");
                return;
            }
            self.metrics().upload_failed("parked");
        }
        self.park_noted(&key, reason);
    }

    /// Decides whether a candidate path goes into the queue.
    fn admit(&mut self, c: Candidate) {
        if self.queue.failure().is_some() {
            // Admitted once the state_dir is writable again.
            self.deferred.push(c);
            return;
        }
        let plan = self.current();
        let Some(store) = plan.target.store() else {
            return;
        };
        let opts = &plan.options;
        let Some(key) = ItemKey::of(&opts.root, &c.abs) else {
            return;
        };
        if self.held.contains(&key) || self.in_flight.contains_key(&key) {
            self.recheck.insert(key);
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(&c.abs) else {
            return;
        };
        let identity = FileIdentity::of(&meta);
        if identity.changed_ns() < opts.mark_ns && c.trigger != Trigger::Backfill {
            return;
        }
        if meta.file_type().is_symlink() {
            let reason = format!(
                "{key} is a symbolic link; offloadd does not follow links (upload the target itself, or copy the file in)"
            );
            return self.park(key, reason);
        }
        // Reported under a path that now goes through a symlink (a watched
        // folder moved away and linked back): not in the tree offloadd manages.
        if crate::keys::symlinked_folder(&opts.root, &c.abs).is_some() {
            return;
        }
        if !meta.is_file() {
            return;
        }
        let rel = match key.rel(&opts.root) {
            Ok(r) => r,
            Err(e) => return self.park(key, e.to_string()),
        };
        if let Err(e) = store.provider().object_key(&rel) {
            return self.park(key, e.to_string());
        }
        let why = match c.trigger {
            Trigger::Scan => Admit::Scan,
            Trigger::Event | Trigger::Backfill => Admit::Event,
        };
        let abs = c.abs.clone();
        match self.queue.admit(&key, &identity, why) {
            Ok(Admission::Queued(item)) => {
                self.live.update(|s| s.failed.remove(&key));
                if let Some(entry) = entry_of(&item, plan.deletion(), &self.clock) {
                    self.lanes.insert(key, entry);
                }
            }
            Ok(Admission::AlreadyQueued(item)) => {
                let scheduled =
                    self.lanes.contains(&key) || self.awaiting.iter().any(|a| a.0 == key);
                if let (false, Some(entry)) =
                    (scheduled, entry_of(&item, plan.deletion(), &self.clock))
                {
                    // It waited on disk only: now it is due to be looked at.
                    self.lanes.take_from_backlog(key, entry);
                }
            }
            Ok(Admission::AlreadyOffloaded | Admission::StillParked) => {}
            Err(_) => self.deferred.push(Candidate {
                abs,
                trigger: c.trigger,
            }),
        }
    }

    /// Whether backfill would add this path: a regular file, not queued, not
    /// in flight, and not recorded as it is now.
    fn would_queue(&self, key: &ItemKey) -> bool {
        let root = &self.current().options.root;
        let Ok(meta) = std::fs::symlink_metadata(key.to_local(root)) else {
            return false;
        };
        let queued = |i: QueueItem| Lane::of(&i.stage).is_some();
        if !meta.is_file()
            || self.in_flight.contains_key(key)
            || self.queue.item(key).ok().flatten().is_some_and(queued)
        {
            return false;
        }
        let identity = FileIdentity::of(&meta);
        !self
            .queue
            .record(key)
            .ok()
            .flatten()
            .is_some_and(|r| r.identity == identity)
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Retry { keys, reply } => {
                let keys = keys
                    .unwrap_or_else(|| self.live.update(|s| s.failed.keys().cloned().collect()));
                let mut n = 0;
                for key in keys {
                    // Parked on disk by its worker, whose outcome is not in
                    // yet: unparked now it would run twice at once.
                    if self.busy(&key) {
                        continue;
                    }
                    match self.queue.unpark(&key) {
                        Ok(true) => {
                            self.live.update(|s| s.failed.remove(&key));
                            self.requeue(key, Lane::Upload, 0, None);
                            n += 1;
                        }
                        Ok(false) => {}
                        Err(e) => tracing::error!(error = %e, "cannot retry {key}: {e}"),
                    }
                }
                let _ = reply.send(n);
            }
            Command::Backfill {
                keys,
                mode: BackfillMode::Count,
                reply,
            } => {
                let n = keys.iter().filter(|k| self.would_queue(k)).count();
                let _ = reply.send(n);
            }
            Command::Backfill { keys, reply, .. } => {
                let before = self.lanes.len();
                let root = self.current().options.root.clone();
                for key in keys {
                    self.admit(Candidate {
                        abs: key.to_local(&root),
                        trigger: Trigger::Backfill,
                    });
                }
                let _ = reply.send(self.lanes.len().saturating_sub(before));
            }
            Command::Hold { key, reply } => {
                if self.busy(&key) {
                    let _ = reply.send(Err(format!(
                        "{key} is being uploaded right now; try again in a few seconds"
                    )));
                } else if self.held.contains(&key) {
                    // The first one's release would end this one's hold too.
                    let _ = reply.send(Err(format!(
                        "another `offloadd delete` of {key} is in progress; try again once it is done"
                    )));
                } else {
                    self.lanes.remove(&key);
                    self.live.update(|s| s.failed.remove(&key));
                    self.held.insert(key.clone());
                    // Its caller hung up meanwhile: no delete-through follows,
                    // and no release would.
                    if reply.send(Ok(())).is_err() {
                        self.release(&key);
                    }
                }
            }
            Command::Release { key, reply } => {
                self.release(&key);
                let _ = reply.send(());
            }
            Command::Replan {
                plan,
                memory_limit,
                applied,
            } => {
                self.replan(plan, memory_limit);
                // Applied once no delete that read the old plan is still
                // going (see `Worker::deletes`); waited for off the loop.
                // A delete stuck in the kernel (a hung mount) holds it up
                // for [`DELETES_DRAIN`] at most, and is named.
                let deletes = self.deletes.clone();
                tokio::spawn(async move {
                    if tokio::time::timeout(DELETES_DRAIN, deletes.write())
                        .await
                        .is_err()
                    {
                        tracing::warn!("a delete begun under the old configuration has not ended in {} s (a hung file system?); the new one is applied without waiting for it", DELETES_DRAIN.as_secs());
                    }
                    let _ = applied.send(());
                });
            }
        }
        self.publish();
    }

    fn replan(&mut self, plan: Arc<Plan>, memory_limit: u64) {
        let old = self.current();
        if old.target.name() != plan.target.name() {
            let change = self.health.reset();
            if change.is_some() {
                self.set_paused_info(old.target.name(), None);
            }
            self.release_awaiting();
        } else {
            // A reload may have fixed the cause: probe at once.
            self.health.probe_now(Instant::now());
        }
        self.health.set_backoff(plan.options.retry);
        if let Some(store) = plan.target.store() {
            let paused = self.live.update(|s| s.paused.is_some());
            self.metrics()
                .set_provider_paused(&store.provider().name, paused);
        }
        // A provider gone from the config refuses nothing any more.
        let live = &self.live;
        self.abort_refusals.retain(|provider, notice| {
            let known = plan.target.name() == provider || plan.others.contains_key(provider);
            if !known {
                live.withdraw(notice);
            }
            known
        });
        self.plan.send_replace(plan);
        let budget = self.uploader.budget.clone();
        budget.set_limit(memory_limit);
        self.uploader = Arc::new(Uploader {
            budget,
            hashing: self.uploader.hashing.clone(),
            pacer: self.uploader.pacer.clone(),
            progress: self.live.progress.clone(),
            queue: self.queue.clone(),
        });
        self.cancel_deletes_if_off();
    }
}

#[cfg(test)]
mod tests;
