//! The first stage: finds new, finished files under the watch root and hands
//! them to the scheduler as [`Candidate`]s.
//!
//! Rules (DESIGN.md "What counts as a new, finished file"):
//! - inotify events (via notify: create, write, close-after-write, attribute
//!   and move events only, so readers such as nginx cause none) make a path a
//!   candidate; a directory created or moved in is walked at once;
//! - a path seen being written is finished only after it was closed after
//!   writing (or renamed into place) and then left untouched for `settle`; a
//!   file whose close was never seen (a hard link, a lost event) is probed
//!   for writers about once a second, and listed in `status` meanwhile;
//!   where the kernel will not answer, one seen written waits for its close
//!   (scans leave it alone, unless file events were lost since) for up to
//!   [`NO_CLOSE_AFTER_MIN`] minutes without an event, and one only seen
//!   created (a hard link, `O_TMPFILE`
//!   linked in) waits for its close or for a scan, which takes it over (by
//!   the scan rule below) and ends the wait;
//! - a file found by a scan is finished once its size and mtime stay the same
//!   for `settle` (at once if it is older than that; the scheduler's upload
//!   gate then checks for writers);
//! - directories are watched one by one as they are walked (symlinks never
//!   followed); a watch is re-added when the directory at a path is another
//!   one than the watched (removed and created again, moved away and back);
//! - when the root comes back after being unavailable, every watch is
//!   re-established and the tree rescanned.
//!
//! Channels, all bounded: notify → this loop holds [`EVENT_QUEUE`] events;
//! when it is full, events are dropped and a rescan is scheduled (and
//! logged). This loop → the scheduler: a settled file that does not fit is
//! held (up to [`HELD`]) and handed over as soon as there is room, by the
//! loop or, while a scan fills the channel, by the walker before its own
//! files; beyond that it is dropped and a rescan scheduled once the channel
//! drains. Scans hand their files over from one walker thread that waits for
//! room, so a big tree never overflows anything.
//!
//! Scans of the whole tree: one at most waits in the walk queue or runs, and
//! one at most is owed after it; asking for more merges into those. A
//! directory new in the tree while one runs is walked between its
//! directories, not after the whole tree.

use crate::keys::ItemKey;
use crate::pipeline::delete::{self, is_set_aside};
use crate::pipeline::filter::Rules;
use crate::pipeline::finished::{self, now_ns, FileIdentity};
use crate::pipeline::live::{Live, SAMPLE};
use crate::pipeline::queue::Queue;
use crate::pipeline::root::{self, RootStatus};
use crate::shutdown::Shutdown;
use crate::statedir::root_id::RootId;
use notify::event::{
    AccessKind, AccessMode, CreateKind, EventKind, EventKindMask, ModifyKind, RenameMode,
};
use notify::{RecursiveMode, Watcher as _};
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// File events held between notify's thread and this loop.
pub const EVENT_QUEUE: usize = 8192;
/// Directory walks waiting for the walker thread.
const WALK_QUEUE: usize = 1024;
/// Scanned files sent to this loop at once.
const WALK_BATCH: usize = 512;
/// A file seen written or created whose close is not seen, where the kernel
/// will not say whether a writer holds it, waits this long without an event
/// (minutes), then goes by the scan rule.
const NO_CLOSE_AFTER_MIN: u64 = 10;
const NO_CLOSE_AFTER: Duration = Duration::from_secs(NO_CLOSE_AFTER_MIN * 60);
/// How often a file whose close was never seen is probed for writers.
const WRITER_PROBE_EVERY: Duration = Duration::from_secs(1);
/// Files probed per tick at most.
const PROBES_PER_TICK: usize = 512;
/// Finished files held while the scheduler's channel is full.
const HELD: usize = 1024;
/// How often the tree is rescanned while some directories have no watch.
const LIMITED_RESCAN: Duration = Duration::from_secs(60);

/// How a candidate was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Event,
    Scan,
    /// Asked for by `backfill`: the managed-since mark does not apply.
    Backfill,
}

/// A path under the root that may be a new, finished file.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub abs: PathBuf,
    pub trigger: Trigger,
}

/// What the watcher knows of a path it has not handed on yet.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Seen created, nothing written since: a hard link, `O_TMPFILE` linked
    /// in, or a writer that has not written yet. Its close may never come.
    Created,
    /// Seen being written, and not closed after writing since: a writer has
    /// it open, however long it pauses, until its close is seen (or events
    /// were lost, which makes it `Created`).
    Writing,
    /// Closed after writing (or renamed into place).
    Closed,
    /// Found by a scan while recently changed: its size and mtime then.
    Scanned {
        size: u64,
        mtime_ns: i128,
        at: Instant,
    },
}

impl Phase {
    /// Seen created or written, its close not seen since.
    fn open(&self) -> bool {
        matches!(self, Phase::Created | Phase::Writing)
    }
}

#[derive(Debug)]
struct Pending {
    phase: Phase,
    last_event: Instant,
    last_probe: Instant,
}

/// Why a directory is walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Initial,
    Periodic,
    Overflow,
    RootBack,
    Requested,
    NewDirectory,
    MovedIn,
}

impl Why {
    fn text(self) -> &'static str {
        match self {
            Why::Initial => "initial scan",
            Why::Periodic => "periodic rescan",
            Why::Overflow => "rescan after dropped file events",
            Why::RootBack => "rescan after the root returned",
            Why::Requested => "rescan",
            Why::NewDirectory => "new directory",
            Why::MovedIn => "directory moved in",
        }
    }

    fn is_full_scan(self) -> bool {
        !matches!(self, Why::NewDirectory | Why::MovedIn)
    }
}

/// Inputs into the loop besides file events.
enum Input {
    /// Files a walk found that changed recently: (path, size, mtime).
    Walked(Vec<(PathBuf, u64, i128)>),
    /// A walk of this directory, begun then, ended (after its `Walked`).
    WalkEnded { dir: PathBuf, began: Instant },
    /// New rules and rescan interval (a reload).
    Reconfigure(Rules, Option<Duration>),
    /// Rescan the whole tree now.
    Rescan,
}

/// Handle to the running watcher.
pub struct Watcher {
    inputs: mpsc::Sender<Input>,
}

impl Watcher {
    /// Applies reloaded rules and rescan interval; the root stays the same.
    pub async fn reconfigure(&self, rules: Rules, rescan_interval: Option<Duration>) {
        // Waits for room: the rules must not be lost to a busy moment.
        let _ = self
            .inputs
            .send(Input::Reconfigure(rules, rescan_interval))
            .await;
    }

    /// Rescans the whole tree (e.g. when local mode ends, or the include and
    /// exclude rules changed: newly included folders get their watches).
    pub async fn rescan(&self) {
        let _ = self.inputs.send(Input::Rescan).await;
    }
}

/// Directories with a watch, and which directory (device, inode) each was.
type Watched = Arc<Mutex<HashMap<PathBuf, (u64, u64)>>>;

/// Finished files the scheduler's channel had no room for when the loop
/// (which cannot wait) had them: while a scan keeps the channel full, a
/// freed slot goes to the waiting walker first, so the loop would find no
/// room until the scan ends. Whichever of the loop and the walker has room
/// first hands them over, so they cost no rescan.
#[derive(Default)]
struct Held(Mutex<VecDeque<Candidate>>);

impl Held {
    /// Holds `c` (once per path); false when [`HELD`] are held already.
    fn hold(&self, c: Candidate) -> bool {
        let mut held = self.0.lock().expect("held lock");
        if let Some(h) = held.iter_mut().find(|h| h.abs == c.abs) {
            // An event retries a parked item; a scan does not.
            if c.trigger == Trigger::Event {
                h.trigger = Trigger::Event;
            }
            return true;
        }
        if held.len() >= HELD {
            return false;
        }
        held.push_back(c);
        true
    }

    fn take(&self) -> Option<Candidate> {
        self.0.lock().expect("held lock").pop_front()
    }

    /// Puts back a candidate taken that found no room: first again.
    fn put_back(&self, c: Candidate) {
        self.0.lock().expect("held lock").push_front(c);
    }

    fn is_empty(&self) -> bool {
        self.0.lock().expect("held lock").is_empty()
    }
}

/// Scans of the whole tree the walker began and ended, which the loop
/// compares with those it sent ([`FullScans::sent`]).
#[derive(Default)]
struct ScanProgress {
    begun: AtomicU64,
    done: AtomicU64,
}

/// The loop's side of the scans of the whole tree: at most one waits in the
/// walk queue or runs, and at most one is owed after it.
#[derive(Debug, Default)]
struct FullScans {
    /// Sent into the walk queue so far.
    sent: u64,
    /// Asked for while one ran (it may have passed the change by already),
    /// or when the walk queue was full: sent once none waits or runs and the
    /// queue has room. Any number of requests make one.
    owed: Option<Why>,
}

/// What the watcher looks for.
pub struct Watching {
    pub rules: Rules,
    pub rescan_interval: Option<Duration>,
    /// The managed-since mark: older files are left alone.
    pub min_changed_ns: i128,
}

/// What the watcher is connected to.
pub struct Links {
    /// Finished candidates, to the scheduler.
    pub out: mpsc::Sender<Candidate>,
    pub live: Arc<Live>,
    /// The root's presence: when it returns, watches are re-added.
    pub root: watch::Receiver<RootStatus>,
    /// The root guard's looks at the root: its identity, never looked up on
    /// the async loop (a hung mount would block it).
    pub root_seen: root::RootSightings,
    /// Each change asks for a full rescan.
    pub rescans: watch::Receiver<u64>,
    /// What is recorded at a path: a scan puts a file a crashed delete set
    /// aside back under its name only if it is not older than that.
    pub records: RecordsAt,
    pub shutdown: Shutdown,
}

/// Reads the upload recorded at a path (see [`delete::Recorded`]).
pub type RecordsAt = Arc<dyn Fn(&ItemKey) -> delete::Recorded + Send + Sync>;

/// [`RecordsAt`] from the queue's records.
pub fn records_in(queue: Arc<Queue>) -> RecordsAt {
    Arc::new(move |key| match queue.record(key) {
        Ok(Some(record)) if record.identity.was_seen() => delete::Recorded::File(record.identity),
        Ok(_) => delete::Recorded::Untold,
        Err(_) => delete::Recorded::Unreadable,
    })
}

/// What the walker thread shares with the loop.
struct WalkerShared {
    rules: Mutex<Rules>,
    notify: Mutex<notify::RecommendedWatcher>,
    watched: Watched,
    min_changed_ns: i128,
    out: mpsc::Sender<Candidate>,
    inputs: mpsc::Sender<Input>,
    stop: AtomicBool,
    live: Arc<Live>,
    /// Directories without a watch whose files only rescans find (beyond
    /// the watch limit, or an unexpected error).
    unwatched: AtomicU64,
    /// Directories that could not be read or watched, told once each until
    /// they are watched: in the log, and the first [`FOLDER_NOTICES`] with
    /// their notice in `status` (taken back once watched).
    unreachable: Mutex<HashMap<PathBuf, Option<String>>>,
    /// File events were lost: the next scan of the whole tree adds the
    /// watch of every directory again, those recorded as watched too (a
    /// lost removal leaves a record that may match a directory created
    /// again with the same inode number).
    rewatch_known: AtomicBool,
    /// The watch limit was reported.
    limit_warned: AtomicBool,
    /// The root came back: every watch is removed before the next walk adds
    /// them again. Done by the walker, so that the loop is not held up by
    /// tens of thousands of removals.
    unwatch_all: AtomicBool,
    held: Held,
    scans: ScanProgress,
    records: RecordsAt,
    /// Files the loop has seen being written and not closed since: a scan
    /// leaves them to their close, even where they look quiet (a writer
    /// paused for longer than `settle`) and the kernel will not say whether
    /// a writer holds them.
    writing: Mutex<HashSet<PathBuf>>,
}

/// A watcher with its kernel resources taken (the inotify instance, the
/// walker thread) that has not looked at anything yet: [`Prepared::launch`]
/// cannot fail, so a reload can take everything that might fail before it
/// changes anything.
pub struct Prepared {
    detect: Detect,
    events: mpsc::Receiver<notify::Result<notify::Event>>,
    inputs: (mpsc::Sender<Input>, mpsc::Receiver<Input>),
    root: watch::Receiver<RootStatus>,
    rescans: watch::Receiver<u64>,
    shutdown: Shutdown,
}

/// Takes what watching needs from the kernel; watches nothing yet.
pub fn prepare(what: Watching, links: Links) -> notify::Result<Prepared> {
    if crate::failpoint::fails(crate::failpoint::WATCH_START_FAILS) {
        return Err(notify::Error::io(std::io::Error::from_raw_os_error(
            libc::EMFILE,
        )));
    }
    let Watching {
        rules,
        rescan_interval,
        min_changed_ns,
    } = what;
    let Links {
        out,
        live,
        root,
        root_seen,
        rescans,
        records,
        shutdown,
    } = links;
    let (inputs_tx, inputs_rx) = mpsc::channel::<Input>(64);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let dropped = Arc::new(AtomicBool::new(false));
    let dropped_cb = dropped.clone();
    let on_event = move |ev: notify::Result<notify::Event>| {
        if events_tx.try_send(ev).is_err() {
            dropped_cb.store(true, Ordering::Relaxed);
        }
    };
    let notify = notify::RecommendedWatcher::new(on_event, watcher_config())?;
    let shared = Arc::new(WalkerShared {
        rules: Mutex::new(rules.clone()),
        notify: Mutex::new(notify),
        watched: Arc::new(Mutex::new(HashMap::new())),
        min_changed_ns,
        out: out.clone(),
        inputs: inputs_tx.clone(),
        stop: AtomicBool::new(false),
        live: live.clone(),
        unwatched: AtomicU64::new(0),
        unreachable: Mutex::default(),
        rewatch_known: AtomicBool::new(false),
        limit_warned: AtomicBool::new(false),
        unwatch_all: AtomicBool::new(false),
        held: Held::default(),
        scans: ScanProgress::default(),
        records,
        writing: Mutex::default(),
    });
    let (walks_tx, walks_rx) = std::sync::mpsc::sync_channel::<(PathBuf, Why)>(WALK_QUEUE);
    let walker_shared = shared.clone();
    let walker = std::thread::Builder::new()
        .name("offloadd-walk".into())
        .spawn(move || walker_thread(&walker_shared, walks_rx))
        .map_err(notify::Error::io)?;

    let d = Detect {
        root_id: root_seen.latest(),
        root_seen,
        root_lost_mark: None,
        rules,
        shared,
        walks: walks_tx,
        walker: Some(walker),
        pending: HashMap::new(),
        out,
        live,
        dropped,
        rescan_when_drained: false,
        full_scans: FullScans::default(),
        root_lost: false,
        probe_warned: false,
        rescan_every: rescan_interval,
        next_rescan: rescan_interval.map(|d| Instant::now() + d),
        last_publish: Instant::now(),
    };
    Ok(Prepared {
        detect: d,
        events: events_rx,
        inputs: (inputs_tx, inputs_rx),
        root,
        rescans,
        shutdown,
    })
}

impl Prepared {
    /// Starts watching: the initial walk (which adds the watches) runs at
    /// once in the background, and reports files changed at or after the
    /// managed-since mark.
    pub fn launch(self) -> (Watcher, JoinHandle<()>) {
        let Prepared {
            mut detect,
            events,
            inputs: (inputs_tx, inputs_rx),
            root,
            rescans,
            shutdown,
        } = self;
        detect.rescan(Why::Initial);
        let task = tokio::spawn(detect.run(events, inputs_rx, root, rescans, shutdown));
        (Watcher { inputs: inputs_tx }, task)
    }
}

/// How often the loop looks at what settles: a quarter of `settle`, within
/// 25 to 500 ms.
fn tick_for(settle: Duration) -> Duration {
    (settle / 4).clamp(Duration::from_millis(25), Duration::from_millis(500))
}

fn new_ticker(settle: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(tick_for(settle));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

struct Detect {
    rules: Rules,
    shared: Arc<WalkerShared>,
    walks: std::sync::mpsc::SyncSender<(PathBuf, Why)>,
    walker: Option<std::thread::JoinHandle<()>>,
    pending: HashMap<PathBuf, Pending>,
    out: mpsc::Sender<Candidate>,
    live: Arc<Live>,
    /// Set by notify's thread when an event did not fit.
    dropped: Arc<AtomicBool>,
    /// A settled file did not fit into the scheduler's channel, nor among
    /// the held ones.
    rescan_when_drained: bool,
    full_scans: FullScans,
    /// The kernel dropped the root's watch (an unmount, say) while the root
    /// guard saw nothing change (a remount at once): every watch is added
    /// again once the root is the one watched before ([`Detect::root_id`]).
    root_lost: bool,
    /// The root's filesystem and inode when its watches were last added.
    root_id: Option<RootId>,
    root_seen: root::RootSightings,
    /// While `root_lost`: only looks begun after this tell whether the root
    /// is back.
    root_lost_mark: Option<u64>,
    /// The writer probe's silence was reported ([`Detect::warn_unanswered_probe`]).
    probe_warned: bool,
    rescan_every: Option<Duration>,
    next_rescan: Option<Instant>,
    last_publish: Instant,
}

impl Detect {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<notify::Result<notify::Event>>,
        mut inputs: mpsc::Receiver<Input>,
        mut root: watch::Receiver<RootStatus>,
        mut rescans: watch::Receiver<u64>,
        mut shutdown: Shutdown,
    ) {
        let mut ticker = new_ticker(self.rules.settle);
        let (mut root_open, mut rescans_open) = (true, true);
        loop {
            tokio::select! {
                Some(ev) = events.recv() => self.event(ev),
                Some(input) = inputs.recv() => {
                    self.input(input);
                    // A reload may have changed `settle`, and so the tick.
                    if ticker.period() != tick_for(self.rules.settle) {
                        ticker = new_ticker(self.rules.settle);
                    }
                }
                changed = root.changed(), if root_open => match changed {
                    Ok(()) => {
                        if *root.borrow_and_update() == RootStatus::Present {
                            self.rewatch();
                        }
                    }
                    Err(_) => root_open = false,
                },
                changed = rescans.changed(), if rescans_open => match changed {
                    Ok(()) => self.rescan(Why::Requested),
                    Err(_) => rescans_open = false,
                },
                _ = ticker.tick() => self.tick(),
                _ = shutdown.recv() => break,
            }
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        // Closed, so that a walker waiting for room in the loop's inputs
        // wakes and sees the stop instead of waiting for ever.
        drop(inputs);
        drop(self.walks);
        if let Some(w) = self.walker.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
    }

    /// Walks a directory new in the tree.
    fn walk(&mut self, dir: PathBuf, why: Why) {
        debug_assert!(!why.is_full_scan());
        if self.walks.try_send((dir, why)).is_err() {
            tracing::warn!(
                "too many directory walks are waiting; rescanning the whole tree instead"
            );
            self.rescan(Why::Overflow);
        }
    }

    /// Asks for a scan of the whole tree. One waiting in the walk queue has
    /// not looked at anything yet: it answers this request too. While one
    /// runs, the request is owed until it ends.
    fn rescan(&mut self, why: Why) {
        debug_assert!(why.is_full_scan());
        if self.full_scans.sent > self.shared.scans.begun.load(Ordering::SeqCst) {
            return;
        }
        self.full_scans.owed.get_or_insert(why);
        self.send_owed_scan();
    }

    /// Sends the owed scan once none waits or runs and the walk queue has room.
    fn send_owed_scan(&mut self) {
        let Some(why) = self.full_scans.owed else {
            return;
        };
        if self.shared.scans.done.load(Ordering::SeqCst) < self.full_scans.sent {
            return;
        }
        match self.walks.try_send((self.rules.root.clone(), why)) {
            Ok(()) => {
                self.full_scans.sent += 1;
                self.full_scans.owed = None;
                if why != Why::Initial {
                    self.shared.live.metrics.rescan();
                }
            }
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                tracing::debug!("the walk queue is full; the rescan is sent when it has room");
            }
            // The walker is gone: the loop is stopping.
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => self.full_scans.owed = None,
        }
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Walked(files) => {
                let now = Instant::now();
                for (abs, size, mtime_ns) in files {
                    match self.pending.get_mut(&abs) {
                        // Seen created or written and never closed: ask the
                        // kernel. Where it will not tell, one seen written
                        // waits for its close.
                        Some(p) if p.phase.open() => match finished::open_for_writing(&abs) {
                            Some(true) => {}
                            Some(false) => p.phase = Phase::Closed,
                            None if p.phase == Phase::Writing => {}
                            None => {
                                p.phase = Phase::Scanned {
                                    size,
                                    mtime_ns,
                                    at: now,
                                }
                            }
                        },
                        Some(_) => {}
                        None => {
                            self.pending.insert(
                                abs,
                                Pending {
                                    phase: Phase::Scanned {
                                        size,
                                        mtime_ns,
                                        at: now,
                                    },
                                    last_event: now,
                                    last_probe: now,
                                },
                            );
                        }
                    }
                }
            }
            Input::WalkEnded { dir, began } => self.walk_ended(&dir, began),
            Input::Reconfigure(rules, every) => {
                *self.shared.rules.lock().expect("rules lock") = rules.clone();
                self.rules = rules;
                self.forget_left_out();
                if every != self.rescan_every {
                    self.rescan_every = every;
                    self.next_rescan = every.map(|d| Instant::now() + d);
                }
            }
            Input::Rescan => self.rescan(Why::Requested),
        }
    }

    /// A walk of `dir` begun at `began` ended: it looked at every file under
    /// it that it could reach, handing the quiet ones over and passing the
    /// others on to settle (`Walked`, taken before this; there a recent one
    /// whose writer the kernel will not report became `Scanned`), except
    /// those seen being written (`Writing`), which wait for their close. A
    /// file seen created only before the walk began, whose writer the kernel
    /// will not report, waited for its close or for such a walk
    /// (`probe_writers`), which handed it over or left it alone (older than
    /// the managed-since mark, excluded, out of reach): it waits no more, so
    /// that it is neither kept nor listed in `status` for ever. One the
    /// kernel answers for is left to the probe.
    fn walk_ended(&mut self, dir: &Path, began: Instant) {
        self.pending.retain(|path, p| {
            p.phase != Phase::Created
                || p.last_event >= began
                || !path.starts_with(dir)
                || finished::open_for_writing(path).is_some()
        });
    }

    /// New rules (a reload): what they leave out is forgotten, except a file
    /// seen being written, whose events are still followed (its close ends
    /// the wait, and it is then dropped, not handed over) so that rules
    /// that leave it out and take it back meanwhile do not hand it to a scan
    /// while its writer pauses. Everything else keeps what is known of it:
    /// the events of paths both rules take were all seen.
    fn forget_left_out(&mut self) {
        let rules = &self.rules;
        self.pending
            .retain(|path, p| p.phase == Phase::Writing || rules.matches(path));
        self.share_writing();
    }

    /// File events were lost (an overflow, here or in the kernel): a close
    /// may be among them, so a file seen being written waits for its close no
    /// more than one seen created (a scan takes it over), and the tree is
    /// rescanned. So may the removal of a directory: one created again
    /// with the same inode number (ext4 reuses them) would look watched, so
    /// that rescan adds the watch of every directory again.
    fn events_lost(&mut self) {
        // Before the rescan asked for below (see `rewatch`).
        self.shared.rewatch_known.store(true, Ordering::SeqCst);
        self.closes_may_be_lost();
        self.rescan(Why::Overflow);
    }

    /// A file seen being written no longer waits for a close that may never
    /// come (events lost): it is `Created`, and the walker learns so before
    /// it next looks.
    fn closes_may_be_lost(&mut self) {
        for p in self.pending.values_mut() {
            if p.phase == Phase::Writing {
                p.phase = Phase::Created;
            }
        }
        self.share_writing();
    }

    /// The paths seen being written, for the walker (see
    /// [`WalkerShared::writing`]); refreshed every tick.
    fn share_writing(&self) {
        let writing: HashSet<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, p)| p.phase == Phase::Writing)
            .map(|(path, _)| path.clone())
            .collect();
        let mut shared = self.shared.writing.lock().expect("writing lock");
        if *shared != writing {
            *shared = writing;
        }
    }

    /// The root is back: every watch is added again and the tree rescanned.
    /// What waited to settle is found again by that rescan; a file seen
    /// being written keeps waiting for its close (its writer may hold it
    /// across a network share's brief error), unless the root is another
    /// filesystem or directory than before.
    fn rewatch(&mut self) {
        self.root_lost = false;
        // A look of this return must not end the next loss.
        self.root_lost_mark = None;
        let was = self.root_id;
        self.root_id = self.root_seen.latest();
        let same_root = matches!((self.root_id, was), (Some(now), Some(was)) if now.is(&was));
        // Before the rescan asked for below, which may be merged into one
        // that has not begun (and so has not looked at this yet).
        self.shared.unwatch_all.store(true, Ordering::SeqCst);
        self.pending
            .retain(|_, p| same_root && p.phase == Phase::Writing);
        self.share_writing();
        self.rescan(Why::RootBack);
    }

    fn touch(&mut self, path: &Path, phase: Option<Phase>) {
        // One the rules leave out is followed only if it waits already (see
        // `forget_left_out`).
        if !self.rules.matches(path) && !self.pending.contains_key(path) {
            return;
        }
        let now = Instant::now();
        let p = self.pending.entry(path.to_path_buf()).or_insert(Pending {
            phase: Phase::Closed,
            last_event: now,
            last_probe: now,
        });
        p.last_event = now;
        match phase {
            Some(phase) => p.phase = phase,
            // Any event ends the scan rule: the path is followed by events now.
            None if matches!(p.phase, Phase::Scanned { .. }) => p.phase = Phase::Closed,
            None => {}
        }
    }

    /// Forgets the watches of a directory that was removed or moved away.
    fn forget_dir(&mut self, path: &Path) {
        let mut w = self.shared.watched.lock().expect("watched lock");
        if w.remove(path).is_some() {
            w.retain(|p, _| !p.starts_with(path));
            // Files in it no longer wait here (a moved folder is walked
            // again where it went, if that is in the tree).
            self.pending.retain(|p, _| !p.starts_with(path));
        }
    }

    fn event(&mut self, ev: notify::Result<notify::Event>) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "file watching reported an error; rescanning");
                self.events_lost();
                return;
            }
        };
        if ev.need_rescan() {
            tracing::warn!("the kernel's file-event queue overflowed; rescanning the tree");
            self.events_lost();
            return;
        }
        match ev.kind {
            EventKind::Create(CreateKind::Folder) => {
                for p in &ev.paths {
                    self.walk(p.clone(), Why::NewDirectory);
                }
            }
            EventKind::Create(_) => {
                for p in &ev.paths {
                    match std::fs::symlink_metadata(p) {
                        Ok(m) if m.is_dir() => self.walk(p.clone(), Why::NewDirectory),
                        Ok(m) if m.file_type().is_symlink() => self.touch(p, Some(Phase::Closed)),
                        _ => self.touch(p, Some(Phase::Created)),
                    }
                }
            }
            EventKind::Modify(ModifyKind::Data(_)) | EventKind::Modify(ModifyKind::Any) => {
                for p in &ev.paths {
                    self.touch(p, Some(Phase::Writing));
                }
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for p in &ev.paths {
                    self.touch(p, Some(Phase::Closed));
                }
            }
            EventKind::Modify(ModifyKind::Metadata(_)) => {
                for p in &ev.paths {
                    if let Some(e) = self.pending.get_mut(p) {
                        e.last_event = Instant::now();
                    }
                }
            }
            EventKind::Modify(ModifyKind::Name(mode)) => {
                let (from, to) = match mode {
                    RenameMode::From => (ev.paths.first(), None),
                    RenameMode::To => (None, ev.paths.first()),
                    RenameMode::Both => (ev.paths.first(), ev.paths.get(1)),
                    _ => (None, None),
                };
                if let Some(from) = from {
                    // The root moved away (and maybe back before the root
                    // guard's next look): what waited is forgotten below,
                    // so the root's return rescans it.
                    if *from == self.rules.root && !self.root_lost {
                        tracing::warn!(root = %from.display(), "the root was moved away; watching again once it is back");
                        self.root_lost = true;
                    }
                    self.pending.remove(from);
                    self.forget_dir(from);
                }
                if let Some(to) = to {
                    match std::fs::symlink_metadata(to) {
                        Ok(m) if m.is_dir() => self.walk(to.clone(), Why::MovedIn),
                        Ok(_) => self.touch(to, Some(Phase::Closed)),
                        Err(_) => {}
                    }
                }
            }
            EventKind::Remove(_) => {
                for p in &ev.paths {
                    if *p == self.rules.root && !self.root_lost {
                        tracing::warn!(root = %p.display(), "the watch on the root was removed (unmounted or deleted); watching again once it is back");
                        self.root_lost = true;
                    }
                    self.pending.remove(p);
                    self.forget_dir(p);
                }
            }
            _ => {}
        }
    }

    fn tick(&mut self) {
        self.send_owed_scan();
        // Whether the same root is back, from the root guard's looks (off
        // this loop) begun after the loss was seen.
        if !self.root_lost {
            self.root_lost_mark = None;
        } else {
            let mark = *self
                .root_lost_mark
                .get_or_insert_with(|| self.root_seen.mark());
            self.root_seen.ask();
            let same_root =
                self.root_seen
                    .since(mark)
                    .is_some_and(|now| match (now, self.root_id) {
                        (Some(now), Some(was)) => now.is(&was),
                        (now, was) => now.is_none() && was.is_none(),
                    });
            if same_root {
                self.rewatch();
            }
        }
        if self.dropped.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                capacity = EVENT_QUEUE,
                "file events arrived faster than they could be handled and some were dropped; rescanning the tree"
            );
            self.events_lost();
        }
        if self.rescan_when_drained && self.out.capacity() * 2 >= self.out.max_capacity() {
            self.rescan_when_drained = false;
            self.rescan(Why::Overflow);
        }
        // Directories without a watch are covered by rescans at least every
        // LIMITED_RESCAN.
        let every = match (
            self.rescan_every,
            self.shared.unwatched.load(Ordering::Relaxed) > 0,
        ) {
            (Some(d), true) => Some(d.min(LIMITED_RESCAN)),
            (None, true) => Some(LIMITED_RESCAN),
            (d, false) => d,
        };
        // The sooner of the one planned and one `every` from now: directories
        // found without a watch pull a rescan planned an hour ahead in.
        self.next_rescan = match (self.next_rescan, every.map(|d| Instant::now() + d)) {
            (Some(planned), Some(soon)) => Some(planned.min(soon)),
            (planned, soon) => planned.or(soon),
        };
        if self.next_rescan.is_some_and(|t| Instant::now() >= t) {
            self.next_rescan = every.map(|d| Instant::now() + d);
            // The rescan counts the directories still without a watch afresh.
            self.shared.unwatched.store(0, Ordering::Relaxed);
            self.rescan(Why::Periodic);
        }
        self.probe_writers();
        self.hand_over_held();
        self.settle_due();
        self.share_writing();
        if self.last_publish.elapsed() >= Duration::from_secs(1) {
            self.last_publish = Instant::now();
            self.publish();
            self.warn_unanswered_probe();
        }
    }

    /// Files seen being written whose close was not seen for a while: asks
    /// the kernel whether a writer still has them open.
    fn probe_writers(&mut self) {
        let quiet = WRITER_PROBE_EVERY.max(self.rules.settle);
        let now = Instant::now();
        let mut probed = 0;
        let mut gone = Vec::new();
        for (path, p) in self.pending.iter_mut() {
            if probed >= PROBES_PER_TICK {
                break;
            }
            if !p.phase.open()
                || now.duration_since(p.last_event) < quiet
                || now.duration_since(p.last_probe) < WRITER_PROBE_EVERY
            {
                continue;
            }
            probed += 1;
            p.last_probe = now;
            match finished::open_for_writing(path) {
                Some(true) => {}
                Some(false) => {
                    tracing::debug!(path = %path.display(), "no writer holds the file any more; its close was not seen");
                    p.phase = Phase::Closed;
                }
                // The kernel will not tell: a regular file keeps waiting for
                // its close (or, `Created`, a scan: `walk_ended`); anything
                // else at the name, or nothing, is not waited for.
                None => match std::fs::symlink_metadata(path) {
                    // No event for this long, and no way to ask: a close
                    // lost without a trace (a watch re-added after it, say)
                    // must not keep it for ever. It goes by the scan rule.
                    Ok(m) if m.is_file() && now.duration_since(p.last_event) >= NO_CLOSE_AFTER => {
                        tracing::info!(path = %path.display(), "no close of {} seen in {NO_CLOSE_AFTER_MIN} minutes, and the kernel will not say whether a writer holds it; it counts as finished once its size and mtime stay the same for `settle`", path.display());
                        p.phase = Phase::Scanned {
                            size: m.len(),
                            mtime_ns: FileIdentity::of(&m).mtime_ns,
                            at: now,
                        };
                    }
                    Ok(m) if m.is_file() => {}
                    _ => gone.push(path.clone()),
                },
            }
        }
        for path in gone {
            self.pending.remove(&path);
        }
    }

    fn publish(&self) {
        let root = &self.rules.root;
        let writing: Vec<&PathBuf> = self
            .pending
            .iter()
            .filter(|(path, p)| p.phase.open() && self.rules.matches(path))
            .map(|(k, _)| k)
            .collect();
        let count = writing.len() as u64;
        let mut sample: Vec<String> = writing
            .into_iter()
            .take(SAMPLE)
            .map(|p| {
                p.strip_prefix(root)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        sample.sort();
        self.live.update(|s| {
            s.writers_waiting = count;
            s.writers_sample = sample;
        });
    }

    /// Says once, in the log and in `status`, that the writer probe cannot
    /// answer (the kernel grants no lease).
    fn warn_unanswered_probe(&mut self) {
        if self.probe_warned {
            return;
        }
        if let Some(why) = finished::unanswered_probe() {
            self.probe_warned = true;
            let text = format!(
                "cannot tell whether a file is still open for writing: the kernel grants no lease here ({why}); a file found by a scan counts as finished once it is left untouched for `settle` (one seen being written waits for its close, up to {NO_CLOSE_AFTER_MIN} minutes unchanged), so a writer pausing longer could have a torn copy uploaded; run offloadd with CAP_LEASE (its systemd unit has it), or have writers write `name.part` and rename it into place"
            );
            tracing::warn!("{text}");
            self.live.notice(text);
        }
    }

    /// Hands on every pending path that has been quiet (and closed) for `settle`.
    fn settle_due(&mut self) {
        let settle = self.rules.settle;
        let now = Instant::now();
        let mut done = Vec::new();
        for (path, p) in self.pending.iter_mut() {
            if now.duration_since(p.last_event) < settle {
                continue;
            }
            match p.phase {
                Phase::Created | Phase::Writing => {}
                Phase::Closed => done.push((path.clone(), Trigger::Event)),
                Phase::Scanned { size, mtime_ns, at } => {
                    if now.duration_since(at) < settle {
                        continue;
                    }
                    match std::fs::symlink_metadata(path) {
                        Ok(m) => {
                            let (s, t) = (m.len(), FileIdentity::of(&m).mtime_ns);
                            if (s, t) == (size, mtime_ns) {
                                done.push((path.clone(), Trigger::Scan));
                            } else {
                                p.phase = Phase::Scanned {
                                    size: s,
                                    mtime_ns: t,
                                    at: now,
                                };
                            }
                        }
                        Err(_) => done.push((path.clone(), Trigger::Scan)),
                    }
                }
            }
        }
        for (path, trigger) in done {
            // Left out by rules reloaded while it was being written.
            if !self.rules.matches(&path) {
                self.pending.remove(&path);
                continue;
            }
            if finished::open_for_writing(&path) == Some(true) {
                if let Some(p) = self.pending.get_mut(&path) {
                    p.phase = Phase::Writing;
                    p.last_event = now;
                }
                continue;
            }
            self.pending.remove(&path);
            self.hand_over(Candidate { abs: path, trigger });
        }
    }

    /// Hands a finished file to the scheduler, or holds it until there is
    /// room; only when too many are held is it dropped for a rescan.
    fn hand_over(&mut self, c: Candidate) {
        let held = &self.shared.held;
        // Behind those held already.
        let c = if held.is_empty() {
            match self.out.try_send(c) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(c)) => c,
            }
        } else {
            c
        };
        if !held.hold(c) {
            if !self.rescan_when_drained {
                tracing::warn!("the scheduler is behind and finished files were dropped from its queue; they are found by a rescan once it catches up");
            }
            self.rescan_when_drained = true;
        }
    }

    /// Hands over the files held, as many as there is room for.
    fn hand_over_held(&mut self) {
        let held = &self.shared.held;
        while let Some(c) = held.take() {
            if let Err(mpsc::error::TrySendError::Full(c)) = self.out.try_send(c) {
                held.put_back(c);
                break;
            }
        }
    }
}

/// Walks directories one at a time, adding a watch to each; files that
/// changed long enough ago go straight to the scheduler (waiting for room),
/// the others to the loop to settle.
fn walker_thread(shared: &WalkerShared, walks: std::sync::mpsc::Receiver<(PathBuf, Why)>) {
    while let Ok((dir, why)) = walks.recv() {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let between = match why.is_full_scan() {
            true => Between::DirectoryWalks(&walks),
            false => Between::Nothing,
        };
        walk_and_report(shared, &dir, why, &between);
    }
}

/// The walker's queue. While a scan of the whole tree runs, it holds
/// directory walks only: the loop sends no other such scan until that one
/// is done.
type Walks = std::sync::mpsc::Receiver<(PathBuf, Why)>;

/// What a walk does between its directories.
enum Between<'a> {
    /// A scan of the whole tree walks the directories new in the tree that
    /// are waiting (every [`DIRECTORY_WALKS_EVERY`] files, too), so that
    /// their files, which no watch reports until they are walked, do not
    /// wait for the whole tree.
    DirectoryWalks(&'a Walks),
    Nothing,
}

/// In a scan of the whole tree, waiting directory walks are taken at least
/// this often (in files), in a folder of many files.
const DIRECTORY_WALKS_EVERY: usize = 1024;

impl Between<'_> {
    fn take_walks(&self, shared: &WalkerShared) {
        if let Between::DirectoryWalks(walks) = self {
            while let Ok((dir, why)) = walks.try_recv() {
                walk_and_report(shared, &dir, why, &Between::Nothing);
            }
        }
    }
}

/// One walk of the walker thread, with what it owes first (removing every
/// watch) and what it tells after.
fn walk_and_report(shared: &WalkerShared, dir: &Path, why: Why, between: &Between) {
    // Counted before it looks at anything (the rules, the watches, the
    // tree): a request the loop merges into it until then is met by it.
    if why.is_full_scan() {
        shared.scans.begun.fetch_add(1, Ordering::SeqCst);
    }
    if shared.unwatch_all.swap(false, Ordering::SeqCst) {
        unwatch_all(shared);
    }
    let known = if why.is_full_scan() && shared.rewatch_known.swap(false, Ordering::SeqCst) {
        Known::Rewatch
    } else {
        Known::Trust
    };
    let started = Instant::now();
    let (found, old) = walk(shared, dir, between, known);
    // A walk cut short by a stop is not heard of (the loop has ended); one
    // cut short because the scheduler is gone hands nothing over any more.
    let _ = shared.inputs.blocking_send(Input::WalkEnded {
        dir: dir.to_path_buf(),
        began: started,
    });
    if why.is_full_scan() {
        shared.scans.done.fetch_add(1, Ordering::SeqCst);
        tracing::info!(dir = %dir.display(), files = found, elapsed_ms = started.elapsed().as_millis() as u64, "{} done", why.text());
    } else if old > 0 {
        let rules = shared.rules.lock().expect("rules lock").clone();
        let rel = dir
            .strip_prefix(&rules.root)
            .unwrap_or(dir)
            .display()
            .to_string();
        let text = format!(
            "{old} file(s) in {rel} ({}) are older than the managed-since mark and were left alone; run `offloadd backfill` to upload them",
            why.text()
        );
        tracing::warn!(dir = %dir.display(), files = old, "{text}");
        shared.live.notice(text);
    }
}

/// What a walk makes of a directory recorded as watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Watched already, if it is the same directory (device, inode).
    Trust,
    /// Its watch is added again: the record may be stale (events lost).
    Rewatch,
}

/// Returns (candidate files found, files left alone as older than the mark).
fn walk(shared: &WalkerShared, dir: &Path, between: &Between, known: Known) -> (usize, usize) {
    let rules = shared.rules.lock().expect("rules lock").clone();
    let settle_ns = rules.settle.as_nanos() as i128;
    let mut batch = Vec::new();
    let (mut found, mut old) = (0, 0);
    let it = walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| !e.file_type().is_dir() || rules.walks(e.path()));
    for entry in it {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let denied = e
                    .io_error()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied);
                match e.path() {
                    Some(p) if denied => report_denied(shared, p),
                    // Gone while walked, say: nothing to tell an operator.
                    _ => tracing::debug!(error = %e, "cannot read part of the tree; skipping it"),
                }
                continue;
            }
        };
        let ft = entry.file_type();
        if ft.is_dir() {
            watch_dir(shared, entry.path(), known);
            between.take_walks(shared);
            continue;
        }
        if ft.is_file() && is_set_aside(entry.path()) {
            let kept = delete::restore_leftover(entry.path(), |to| {
                ItemKey::of(&rules.root, to)
                    .map_or(delete::Recorded::Untold, |key| (shared.records)(&key))
            });
            // Not uploaded, maybe: `status` says where it is (guarantee 1).
            if let Some(text) = kept {
                shared.live.notice(text);
            }
            continue;
        }
        if !(ft.is_file() || ft.is_symlink()) || !rules.matches(entry.path()) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let identity = FileIdentity::of(&meta);
        if identity.changed_ns() < shared.min_changed_ns {
            old += 1;
            continue;
        }
        found += 1;
        if found % DIRECTORY_WALKS_EVERY == 0 {
            between.take_walks(shared);
        }
        let quiet = now_ns() - identity.mtime_ns >= settle_ns;
        if quiet
            && shared
                .writing
                .lock()
                .expect("writing lock")
                .contains(entry.path())
        {
            continue;
        }
        if quiet || ft.is_symlink() {
            let c = Candidate {
                abs: entry.into_path(),
                trigger: Trigger::Scan,
            };
            if !hand_over(shared, c) {
                break;
            }
        } else {
            batch.push((entry.into_path(), meta.len(), identity.mtime_ns));
            if batch.len() >= WALK_BATCH
                && shared
                    .inputs
                    .blocking_send(Input::Walked(std::mem::take(&mut batch)))
                    .is_err()
            {
                break;
            }
        }
    }
    if !batch.is_empty() {
        let _ = shared.inputs.blocking_send(Input::Walked(batch));
    }
    (found, old)
}

/// Hands a scanned file to the scheduler, waiting for room; the files the
/// loop holds go first (the room the walker waits for would otherwise be
/// its own until the scan ends). False when the scheduler is gone.
fn hand_over(shared: &WalkerShared, c: Candidate) -> bool {
    while let Some(h) = shared.held.take() {
        if shared.out.blocking_send(h).is_err() {
            return false;
        }
    }
    shared.out.blocking_send(c).is_ok()
}

/// Removes every watch, so that the walks after it add them again.
fn unwatch_all(shared: &WalkerShared) {
    let paths: Vec<PathBuf> = {
        let mut w = shared.watched.lock().expect("watched lock");
        w.drain().map(|(p, _)| p).collect()
    };
    let mut n = shared.notify.lock().expect("notify lock");
    for p in paths {
        let _ = n.unwatch(&p);
    }
}

/// Why a directory's watch could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchFailure {
    /// The inotify watch limit: its files are found by rescans, which come
    /// at least every [`LIMITED_RESCAN`] meanwhile.
    Limit,
    /// The service may not read it: nothing in it can be offloaded, by
    /// events or by rescans.
    Denied,
    /// Gone since it was listed: its removal is an event of its parent.
    Gone,
    /// Anything else (ENOMEM, say): its new files are found by rescans,
    /// at least every [`LIMITED_RESCAN`], as beyond the limit.
    Other,
}

impl WatchFailure {
    fn of(e: &notify::Error) -> WatchFailure {
        match &e.kind {
            notify::ErrorKind::MaxFilesWatch => WatchFailure::Limit,
            notify::ErrorKind::PathNotFound => WatchFailure::Gone,
            notify::ErrorKind::Io(io) => match io.kind() {
                std::io::ErrorKind::PermissionDenied => WatchFailure::Denied,
                std::io::ErrorKind::NotFound => WatchFailure::Gone,
                _ => WatchFailure::Other,
            },
            _ => WatchFailure::Other,
        }
    }
}

/// Tells once (until it is watched) that the service may not read `dir`.
fn report_denied(shared: &WalkerShared, dir: &Path) {
    report_once(shared, dir, || {
        format!(
        "cannot read {}: permission denied; files in it are not offloaded until the service may read it (see the README on the group or default-ACL recipe)",
        dir.display()
    )
    });
}

/// Logs and shows in `status` what `text` says of `dir`, unless that was
/// told of it already since it was last watched.
fn report_once(shared: &WalkerShared, dir: &Path, text: impl FnOnce() -> String) {
    let mut unreachable = shared.unreachable.lock().expect("unreachable lock");
    if unreachable.contains_key(dir) {
        return;
    }
    let text = text();
    tracing::warn!("{text}");
    // A tree of private folders must not push every other notice out.
    let shown = unreachable.values().flatten().count() < FOLDER_NOTICES;
    if shown {
        shared.live.notice(text.clone());
    } else {
        shared.live.notice(more_folders());
    }
    unreachable.insert(dir.to_path_buf(), shown.then_some(text));
}

/// The notice for the folders beyond the named ones.
fn more_folders() -> String {
    format!("more than {FOLDER_NOTICES} folders cannot be read or watched; the log names each")
}

/// Folders named one by one among `status` notices.
const FOLDER_NOTICES: usize = 5;

/// Adds a watch unless this very directory (device, inode) is watched
/// already (and `known` trusts that record).
fn watch_dir(shared: &WalkerShared, dir: &Path, known: Known) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    let id = (meta.dev(), meta.ino());
    // Held until the watch is recorded: the loop's `forget_dir` of a
    // removal meanwhile comes before the check or after the record, never
    // between them (which would leave a stale record).
    let mut watched = shared.watched.lock().expect("watched lock");
    if known == Known::Trust && watched.get(dir) == Some(&id) {
        return;
    }
    let result = shared
        .notify
        .lock()
        .expect("notify lock")
        .watch(dir, RecursiveMode::NonRecursive);
    let e = match result {
        Ok(()) => {
            watched.insert(dir.to_path_buf(), id);
            drop(watched);
            let mut unreachable = shared.unreachable.lock().expect("unreachable lock");
            match unreachable.remove(dir) {
                Some(Some(text)) => shared.live.withdraw(&text),
                // The last of those beyond the named ones.
                Some(None) if !unreachable.values().any(Option::is_none) => {
                    shared.live.withdraw(&more_folders())
                }
                _ => {}
            }
            return;
        }
        Err(e) => e,
    };
    // Whatever the record said, this directory has no watch of ours.
    watched.remove(dir);
    drop(watched);
    match WatchFailure::of(&e) {
        WatchFailure::Limit => {
            shared.unwatched.fetch_add(1, Ordering::Relaxed);
            if !shared.limit_warned.swap(true, Ordering::Relaxed) {
                let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
                let text = format!(
                    "the inotify watch limit is reached (fs.inotify.max_user_watches = {limit}): directories beyond it are not watched, and their new files are found by a rescan every {} s instead of at once; raise the limit (sysctl fs.inotify.max_user_watches=…)",
                    LIMITED_RESCAN.as_secs()
                );
                tracing::warn!(dir = %dir.display(), "{text}");
                shared.live.notice(text);
            } else {
                tracing::debug!(dir = %dir.display(), "cannot watch directory: the watch limit is reached");
            }
        }
        WatchFailure::Denied => report_denied(shared, dir),
        WatchFailure::Gone => {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory: it is gone")
        }
        WatchFailure::Other => {
            shared.unwatched.fetch_add(1, Ordering::Relaxed);
            report_once(shared, dir, || {
                format!(
                    "cannot watch directory {}: {e}; its new files are found by rescans only, at least every {} s",
                    dir.display(),
                    LIMITED_RESCAN.as_secs()
                )
            })
        }
    }
}

/// The events asked of the kernel: creation, removal, changes and renames,
/// and closes after writing (a finished file). Not opens, nor closes after
/// reading: a results directory served by a web server sees thousands of
/// those a second, and each would cross the kernel's event queue, wake
/// notify's thread and could fill the bounded channel (forcing a rescan).
/// notify also drops any event outside this mask before calling us.
fn watcher_config() -> notify::Config {
    notify::Config::default().with_event_kinds(EventKindMask::CORE | EventKindMask::ACCESS_CLOSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_left_out_and_writes_kept() {
        let asked = watcher_config().event_kinds();
        assert!(!asked.matches(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!asked.matches(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(asked.matches(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(asked.matches(&EventKind::Create(CreateKind::File)));
        assert!(asked.matches(&EventKind::Modify(ModifyKind::Name(RenameMode::To))));
    }

    fn detect() -> (Detect, mpsc::Receiver<Candidate>) {
        let (d, rx, _walks) = detect_at(Path::new("/r"));
        (d, rx)
    }

    /// A `Detect` on `root` whose walk queue holds one walk.
    fn detect_at(root: &Path) -> (Detect, mpsc::Receiver<Candidate>, Walks) {
        let (d, rx, walks, _inputs) = detect_with_inputs(root, 4);
        (d, rx, walks)
    }

    /// As [`detect_at`], also giving the loop's inputs, which hold `room`.
    fn detect_with_inputs(
        root: &Path,
        room: usize,
    ) -> (
        Detect,
        mpsc::Receiver<Candidate>,
        Walks,
        mpsc::Receiver<Input>,
    ) {
        let (out, rx) = mpsc::channel(16);
        let (inputs, irx) = mpsc::channel(room);
        let rules = Rules::new(root, &["**".into()], &[], Duration::from_secs(2)).unwrap();
        let notify = notify::recommended_watcher(|_| {}).unwrap();
        let live = Arc::new(Live::default());
        let shared = Arc::new(WalkerShared {
            rules: Mutex::new(rules.clone()),
            notify: Mutex::new(notify),
            watched: Arc::new(Mutex::new(HashMap::new())),
            min_changed_ns: 0,
            out: out.clone(),
            inputs,
            stop: AtomicBool::new(false),
            live: live.clone(),
            unwatched: AtomicU64::new(0),
            unreachable: Mutex::default(),
            rewatch_known: AtomicBool::new(false),
            limit_warned: AtomicBool::new(false),
            unwatch_all: AtomicBool::new(false),
            held: Held::default(),
            scans: ScanProgress::default(),
            records: Arc::new(|_| delete::Recorded::Untold),
            writing: Mutex::default(),
        });
        let (walks, wrx) = std::sync::mpsc::sync_channel(1);
        let d = Detect {
            root_id: root::identity(root),
            root_seen: root::RootSightings::of(root),
            root_lost_mark: None,
            root_lost: false,
            full_scans: FullScans::default(),
            probe_warned: false,
            rules,
            shared,
            walks,
            walker: None,
            pending: HashMap::new(),
            out,
            live,
            dropped: Arc::new(AtomicBool::new(false)),
            rescan_when_drained: false,
            rescan_every: None,
            next_rescan: None,
            last_publish: Instant::now(),
        };
        (d, rx, wrx, irx)
    }

    fn pending(phase: Phase, last_event: Instant) -> Pending {
        Pending {
            phase,
            last_event,
            last_probe: last_event,
        }
    }

    #[tokio::test]
    async fn settle_waits_for_close_and_quiet() {
        let (mut d, mut rx) = detect();
        let old = Instant::now() - Duration::from_secs(10);
        d.pending
            .insert(PathBuf::from("/r/open"), pending(Phase::Writing, old));
        d.pending
            .insert(PathBuf::from("/r/closed"), pending(Phase::Closed, old));
        d.pending.insert(
            PathBuf::from("/r/recent"),
            pending(Phase::Closed, Instant::now()),
        );
        d.settle_due();
        let c = rx.try_recv().unwrap();
        assert_eq!(c.abs, PathBuf::from("/r/closed"));
        assert!(rx.try_recv().is_err());
        assert!(d.pending.contains_key(Path::new("/r/open")));
        assert!(d.pending.contains_key(Path::new("/r/recent")));
        d.publish();
        assert_eq!(d.live.shown().writers_waiting, 1);
        assert_eq!(d.live.shown().writers_sample, vec!["open".to_string()]);
    }

    #[tokio::test]
    async fn a_full_scheduler_queue_holds_finished_files_then_drops_and_rescans() {
        let (mut d, mut rx) = detect();
        let old = Instant::now() - Duration::from_secs(10);
        let settle = |d: &mut Detect, n: usize| {
            for i in 0..n {
                d.pending.insert(
                    PathBuf::from(format!("/r/f{i}")),
                    pending(Phase::Closed, old),
                );
            }
            d.settle_due();
            assert!(d.pending.is_empty());
        };
        let read = |rx: &mut mpsc::Receiver<Candidate>| {
            let mut n = 0;
            while rx.try_recv().is_ok() {
                n += 1;
            }
            n
        };
        settle(&mut d, 20);
        assert_eq!(read(&mut rx), 16);
        assert!(!d.rescan_when_drained, "nothing was dropped");
        d.hand_over_held();
        assert_eq!(read(&mut rx), 4, "the held ones, once there is room");
        // Beyond what may be held: dropped, and found by a rescan instead.
        settle(&mut d, 16 + HELD + 1);
        assert!(d.rescan_when_drained, "a rescan is owed");
        assert_eq!(read(&mut rx), 16);
    }

    #[tokio::test]
    async fn a_writer_never_seen_closing_is_probed() {
        crate::pipeline::finished::ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx) = detect();
        let f = dir.path().join("linked");
        let w = std::fs::File::create(&f).unwrap();
        let old = Instant::now() - Duration::from_secs(10);
        d.pending.insert(f.clone(), pending(Phase::Writing, old));
        d.probe_writers();
        assert_eq!(d.pending[&f].phase, Phase::Writing, "still open");
        drop(w);
        d.pending.get_mut(&f).unwrap().last_probe = old;
        d.probe_writers();
        assert_eq!(d.pending[&f].phase, Phase::Closed);
    }

    #[tokio::test]
    async fn a_rescan_that_finds_the_walk_queue_full_is_sent_later() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx, walks) = detect_at(dir.path());
        let root = d.rules.root.clone();
        d.walk(root.join("a"), Why::NewDirectory); // fills the queue
        d.rescan(Why::Overflow);
        d.tick();
        assert_eq!(walks.try_recv().unwrap().1, Why::NewDirectory);
        assert!(walks.try_recv().is_err());
        d.tick();
        assert_eq!(walks.try_recv().unwrap(), (root, Why::Overflow));
        d.tick();
        assert!(walks.try_recv().is_err(), "sent once");
    }

    #[tokio::test]
    async fn a_root_whose_watch_the_kernel_dropped_is_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx, walks) = detect_at(dir.path());
        let root = d.rules.root.clone();
        let unmount = notify::Event::new(EventKind::Remove(notify::event::RemoveKind::Other))
            .add_path(root.clone());
        // Another file system at the path for now: wait.
        d.root_id = Some(RootId {
            fsid: 0,
            uuid: None,
            ino: 0,
        });
        d.event(Ok(unmount.clone()));
        d.tick();
        assert!(walks.try_recv().is_err());
        // The same root again (a remount at once): every watch comes back,
        // once the root guard's thread has looked.
        d.root_id = root::identity(&root);
        assert_eq!(
            tick_until_walk(&mut d, &walks).await,
            (root.clone(), Why::RootBack)
        );
        assert!(!d.root_lost);
        d.tick();
        assert!(walks.try_recv().is_err(), "once");
    }

    /// Ticks until a walk is asked for (the root's looks run on a thread of
    /// their own).
    async fn tick_until_walk(
        d: &mut Detect,
        walks: &std::sync::mpsc::Receiver<(PathBuf, Why)>,
    ) -> (PathBuf, Why) {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            d.tick();
            if let Ok(w) = walks.try_recv() {
                return w;
            }
            assert!(Instant::now() < until, "no walk was asked for");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The root moved away and back at once (before the root guard looked):
    /// the files that waited to settle were forgotten with its watches, so
    /// its return rescans the tree.
    #[tokio::test]
    async fn a_root_moved_away_and_back_is_rescanned() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx, walks) = detect_at(dir.path());
        let root = d.rules.root.clone();
        walk(&d.shared, &root, &Between::Nothing, Known::Trust);
        let waiting = root.join("a.png");
        d.pending
            .insert(waiting.clone(), pending(Phase::Closed, Instant::now()));
        let moved = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::From)))
            .add_path(root.clone());
        d.event(Ok(moved));
        assert!(!d.pending.contains_key(&waiting));
        assert_eq!(
            tick_until_walk(&mut d, &walks).await,
            (root.clone(), Why::RootBack)
        );
    }

    /// The root is back (the root guard says so): every watch is removed
    /// and added again, the removals by the walker thread before its walk,
    /// not by the loop.
    #[test]
    fn a_root_back_is_watched_again_by_the_walker() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let (mut d, _rx, walks) = detect_at(dir.path());
        let root = d.rules.root.clone();
        walk(&d.shared, &root, &Between::Nothing, Known::Trust);
        let stale = root.join("gone");
        d.shared
            .watched
            .lock()
            .unwrap()
            .insert(stale.clone(), (0, 0));
        let watched = |d: &Detect| {
            let mut w: Vec<PathBuf> = d.shared.watched.lock().unwrap().keys().cloned().collect();
            w.sort();
            w
        };
        assert_eq!(watched(&d), [root.clone(), root.join("a"), stale.clone()]);

        d.rewatch();
        assert_eq!(watched(&d).len(), 3, "the loop removes nothing itself");
        let (dir, why) = walks.try_recv().unwrap();
        assert_eq!((&dir, why), (&root, Why::RootBack));
        walk_and_report(&d.shared, &dir, why, &Between::Nothing);
        assert_eq!(watched(&d), [root.clone(), root.join("a")]);
    }

    #[tokio::test]
    async fn directories_without_a_watch_bring_the_next_rescan_in() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx, _walks) = detect_at(dir.path());
        d.rescan_every = Some(Duration::from_secs(3600));
        d.next_rescan = Some(Instant::now() + Duration::from_secs(3600));
        d.shared.unwatched.store(3, Ordering::Relaxed);
        d.tick();
        let next = d.next_rescan.unwrap();
        assert!(
            next <= Instant::now() + LIMITED_RESCAN,
            "{:?}",
            next - Instant::now()
        );
    }

    #[tokio::test]
    async fn a_writer_probe_the_kernel_will_not_answer_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx, _walks) = detect_at(dir.path());
        // procfs grants no leases: the probe cannot answer there.
        assert_eq!(
            finished::open_for_writing(Path::new("/proc/self/status")),
            None
        );
        d.last_publish = Instant::now() - Duration::from_secs(2);
        d.tick();
        let notices = d.live.shown().notices;
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].starts_with("cannot tell whether a file is still open for writing: the kernel grants no lease here ("), "{notices:?}");
        assert!(notices[0].contains("CAP_LEASE"));
        d.last_publish = Instant::now() - Duration::from_secs(2);
        d.tick();
        assert_eq!(d.live.shown().notices.len(), 1);
    }

    #[tokio::test]
    async fn a_writer_entry_whose_file_went_away_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx, _walks) = detect_at(dir.path());
        let old = Instant::now() - Duration::from_secs(10);
        let moved = dir.path().join("a/moved.png");
        d.pending
            .insert(moved.clone(), pending(Phase::Writing, old));
        d.probe_writers();
        assert!(
            !d.pending.contains_key(&moved),
            "nothing there: not waited for"
        );
        // A folder moved away takes the files waiting in it along.
        let inside = dir.path().join("b/x.png");
        d.pending
            .insert(inside.clone(), pending(Phase::Writing, Instant::now()));
        d.shared
            .watched
            .lock()
            .unwrap()
            .insert(dir.path().join("b"), (0, 0));
        d.forget_dir(&dir.path().join("b"));
        assert!(d.pending.is_empty());
        d.publish();
        assert_eq!(d.live.shown().writers_waiting, 0);
    }

    /// A stop while the walker thread waits for room in the loop's inputs
    /// (a catch-up walk of a big tree, every file still settling) ends the
    /// walker: the loop's end must not wait for it for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_while_the_walker_waits_for_the_loop_ends_the_walker() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..8 * WALK_BATCH {
            std::fs::write(dir.path().join(format!("{i}.jpg")), b"x").unwrap();
        }
        let (mut d, _rx, walks, inputs) = detect_with_inputs(dir.path(), 1);
        // However slow the writes above, every file is still settling.
        *d.shared.rules.lock().unwrap() =
            Rules::new(dir.path(), &["**".into()], &[], Duration::from_secs(600)).unwrap();
        let shared = d.shared.clone();
        d.walker = Some(std::thread::spawn(move || walker_thread(&shared, walks)));
        d.rescan(Why::Initial);
        // The first batch fills the inputs; the walker waits with the next.
        let full = Instant::now() + Duration::from_secs(10);
        while d.shared.inputs.capacity() > 0 {
            assert!(Instant::now() < full, "the walker never filled the inputs");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;

        let (stop, shutdown) = crate::shutdown::Stop::new();
        stop.fire();
        let (_events_tx, events) = mpsc::channel(1);
        let (_root_tx, root) = watch::channel(RootStatus::Present);
        let (_rescans_tx, rescans) = watch::channel(0);
        let run = d.run(events, inputs, root, rescans, shutdown);
        // On a timeout the inputs go with the dropped future, so a failure
        // does not hang the test.
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the loop's end waited for a walker that was waiting for the loop");
    }

    /// Files in `dir` that changed an hour ago: a scan hands them straight
    /// to the scheduler's channel.
    fn quiet_files(dir: &Path, n: usize) {
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for i in 0..n {
            let f = std::fs::File::create(dir.join(format!("{i}.jpg"))).unwrap();
            f.set_modified(hour_ago).unwrap();
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads the scheduler's channel, ticking, until nothing more comes for
    /// a while: the candidates handed over, as (path, trigger).
    fn read_all(d: &mut Detect, rx: &mut mpsc::Receiver<Candidate>) -> Vec<(PathBuf, Trigger)> {
        let mut got = Vec::new();
        let mut quiet_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(20);
        while quiet_since.elapsed() < Duration::from_millis(500) && Instant::now() < deadline {
            d.tick();
            while let Ok(c) = rx.try_recv() {
                got.push((c.abs, c.trigger));
                quiet_since = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        got
    }

    /// A scan keeps the scheduler's channel full (the walker waits for room,
    /// and a freed slot goes to it first): a file that finishes settling
    /// meanwhile is handed over once there is room, and costs no other scan
    /// of the whole tree (which would fill the channel again, and so on).
    #[test]
    fn a_file_settling_while_a_scan_fills_the_scheduler_queue_costs_no_rescan() {
        let dir = tempfile::tempdir().unwrap();
        quiet_files(dir.path(), 64);
        let (mut d, mut rx, walks, _inputs) = detect_with_inputs(dir.path(), 4);
        let shared = d.shared.clone();
        let walker = std::thread::spawn(move || walker_thread(&shared, walks));
        d.rescan(Why::Periodic);
        wait_for("the scan to fill the channel", || d.out.capacity() == 0);
        std::thread::sleep(Duration::from_millis(50));
        // Its close was seen and it has been quiet for `settle`.
        let settled = dir.path().join("0.jpg");
        let old = Instant::now() - Duration::from_secs(10);
        d.pending
            .insert(settled.clone(), pending(Phase::Closed, old));
        d.tick();

        let got = read_all(&mut d, &mut rx);
        let scanned = got.iter().filter(|c| c.1 == Trigger::Scan).count();
        assert_eq!(scanned, 64, "one scan of the tree, not two");
        let at = got
            .iter()
            .position(|c| *c == (settled.clone(), Trigger::Event));
        // The walker hands it over before its next file.
        assert!(
            at.is_some_and(|at| at < 32),
            "the settled file was handed over during the scan: {at:?}"
        );
        drop(rx);
        drop(d);
        walker.join().unwrap();
    }

    /// A directory new in the tree while a scan of the whole tree runs: no
    /// watch reports its files until it is walked, so it is walked between
    /// the scan's directories instead of after the whole tree.
    #[test]
    fn a_new_directory_is_walked_while_a_scan_of_the_whole_tree_runs() {
        let dir = tempfile::tempdir().unwrap();
        for d in 0..50 {
            let folder = dir.path().join(format!("d{d:02}"));
            std::fs::create_dir(&folder).unwrap();
            quiet_files(&folder, 4);
        }
        let (mut d, mut rx, walks, _inputs) = detect_with_inputs(dir.path(), 4);
        let shared = d.shared.clone();
        let walker = std::thread::spawn(move || walker_thread(&shared, walks));
        d.rescan(Why::Periodic);
        // A folder the scan is done with: it has gone on to another.
        let mut got = Vec::new();
        let folder = |p: &PathBuf| p.parent().unwrap().to_path_buf();
        let done_with = loop {
            got.push(rx.blocking_recv().unwrap().abs);
            if folder(&got[got.len() - 1]) != folder(&got[0]) {
                break folder(&got[0]);
            }
        };
        let new_dir = done_with.join("new");
        std::fs::create_dir(&new_dir).unwrap();
        quiet_files(&new_dir, 1);
        d.walk(new_dir.clone(), Why::NewDirectory);

        let new_file = new_dir.join("0.jpg");
        let mut after = 0;
        while let Some(c) = rx.blocking_recv() {
            if c.abs == new_file {
                break;
            }
            after += 1;
        }
        // The channel (16) and the rest of a folder (4) were ahead of it;
        // after the whole tree, about 180 would be.
        assert!(
            after < 40,
            "the new folder's file came after {after} files of the scan"
        );
        drop(rx);
        drop(d);
        walker.join().unwrap();
    }

    /// Asking for scans of the whole tree while one waits in the walk queue
    /// asks for nothing more; while one runs, for one more after it.
    #[test]
    fn scans_of_the_whole_tree_asked_for_together_are_merged() {
        let dir = tempfile::tempdir().unwrap();
        quiet_files(dir.path(), 64);
        let (mut d, mut rx, walks, _inputs) = detect_with_inputs(dir.path(), 4);
        d.rescan(Why::Periodic);
        d.rescan(Why::Overflow);
        d.rescan(Why::Requested);
        d.dropped.store(true, Ordering::Relaxed);
        d.tick();
        let shared = d.shared.clone();
        let walker = std::thread::spawn(move || walker_thread(&shared, walks));
        wait_for("the scan to fill the channel", || d.out.capacity() == 0);
        d.tick();
        // Running now: these may come after it passed the change by.
        d.rescan(Why::Overflow);
        d.dropped.store(true, Ordering::Relaxed);
        d.tick();
        d.rescan(Why::Requested);

        let got = read_all(&mut d, &mut rx);
        assert_eq!(
            got.len(),
            2 * 64,
            "the scan asked for before it began, and one after"
        );
        drop(rx);
        drop(d);
        walker.join().unwrap();
    }

    /// Makes the writer probe unable to answer for `file` in this thread,
    /// as for a daemon without CAP_LEASE that does not own the files: the
    /// file goes to another owner and the thread drops CAP_LEASE
    /// (capabilities are per thread). Needs root: false (skip) without it,
    /// except in CI, which runs as root.
    fn probe_cannot_answer(file: &Path) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "this test needs root");
            eprintln!("SKIP: needs root");
            return false;
        }
        std::os::unix::fs::chown(file, Some(65534), Some(65534)).unwrap();
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_LEASE: u32 = 28;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: version 3 reads one header and reads or writes two data
        // structs; pid 0 is this thread.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
        data[0].effective &= !(1 << CAP_LEASE);
        // SAFETY: as above.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
        true
    }

    /// A file seen created whose close is never seen (a finished file
    /// hard-linked into the tree, say), where the kernel will not tell
    /// whether a writer holds it: it waits, listed in `status`, until a scan
    /// hands it over, and then waits no more.
    #[test]
    fn a_writer_the_probe_cannot_answer_for_waits_no_more_once_a_scan_hands_it_over() {
        // In a thread of its own: it drops a capability.
        std::thread::spawn(|| {
            let dir = tempfile::tempdir().unwrap();
            quiet_files(dir.path(), 1);
            let linked = dir.path().join("0.jpg");
            if !probe_cannot_answer(&linked) {
                return;
            }
            assert_eq!(finished::open_for_writing(&linked), None);
            let (mut d, mut rx, walks, mut inputs) = detect_with_inputs(dir.path(), 4);
            let old = Instant::now() - Duration::from_secs(10);
            d.pending
                .insert(linked.clone(), pending(Phase::Created, old));
            d.tick();
            assert!(
                d.pending.contains_key(&linked),
                "waits for its close or a scan"
            );

            d.rescan(Why::Periodic);
            let (root, why) = walks.try_recv().unwrap();
            walk_and_report(&d.shared, &root, why, &Between::Nothing);
            while let Ok(input) = inputs.try_recv() {
                d.input(input);
            }
            assert_eq!(rx.try_recv().unwrap().abs, linked, "the scan hands it over");
            d.tick();
            assert!(!d.pending.contains_key(&linked), "and it waits no more");
            d.publish();
            assert_eq!(d.live.shown().writers_waiting, 0);
        })
        .join()
        .unwrap();
    }
    /// A file seen being written whose writer paused for longer than
    /// `settle`, where the kernel will not tell whether a writer holds it:
    /// a scan finds it quiet but leaves it to its close (taken, it would be
    /// uploaded torn, and deleted under its writer); once file events were
    /// lost, its close may be among them, and the next scan takes it over.
    #[test]
    fn a_paused_writer_the_probe_cannot_answer_for_keeps_its_file_from_scans() {
        std::thread::spawn(|| {
            let dir = tempfile::tempdir().unwrap();
            quiet_files(dir.path(), 1);
            let written = dir.path().join("0.jpg");
            if !probe_cannot_answer(&written) {
                return;
            }
            let (mut d, mut rx, walks, mut inputs) = detect_with_inputs(dir.path(), 4);
            let old = Instant::now() - Duration::from_secs(10);
            d.pending
                .insert(written.clone(), pending(Phase::Writing, old));
            let scan = |d: &mut Detect, inputs: &mut mpsc::Receiver<Input>| {
                d.tick();
                d.rescan(Why::Periodic);
                d.tick();
                let (root, why) = walks.try_recv().unwrap();
                walk_and_report(&d.shared, &root, why, &Between::Nothing);
                while let Ok(input) = inputs.try_recv() {
                    d.input(input);
                }
                d.tick();
            };
            scan(&mut d, &mut inputs);
            assert!(rx.try_recv().is_err(), "the scan left it to its close");
            assert_eq!(d.pending[&written].phase, Phase::Writing);
            d.publish();
            assert_eq!(d.live.shown().writers_waiting, 1, "listed as waiting");

            // Nothing heard of it for ten minutes: it goes by the scan rule.
            let long_ago = Instant::now() - NO_CLOSE_AFTER - Duration::from_secs(1);
            let p = d.pending.get_mut(&written).unwrap();
            (p.last_event, p.last_probe) = (long_ago, long_ago);
            d.tick();
            assert!(
                matches!(d.pending[&written].phase, Phase::Scanned { .. }),
                "{:?}",
                d.pending[&written]
            );
            d.pending
                .insert(written.clone(), pending(Phase::Writing, old));
            d.tick();
            assert!(d.shared.writing.lock().unwrap().contains(&written));
            // A reload (of anything: the rules take it still) loses no
            // event of it: it keeps waiting for its close.
            let rules = d.rules.clone();
            d.input(Input::Reconfigure(rules.clone(), None));
            scan(&mut d, &mut inputs);
            assert!(rx.try_recv().is_err(), "a reload left it to its close");
            assert_eq!(d.pending[&written].phase, Phase::Writing);
            // Rules that leave it out, then take it back: its events were
            // followed meanwhile, and it still waits for its close.
            let without =
                Rules::new(dir.path(), &["**".into()], &["*.jpg".into()], rules.settle).unwrap();
            d.input(Input::Reconfigure(without, None));
            d.tick();
            d.input(Input::Reconfigure(rules, None));
            scan(&mut d, &mut inputs);
            assert!(
                rx.try_recv().is_err(),
                "rules out and in left it to its close"
            );
            assert_eq!(d.pending[&written].phase, Phase::Writing);
            // The root back after a moment away (a network share's error):
            // the same root, and the same writer may hold the file.
            d.rewatch();
            scan(&mut d, &mut inputs);
            assert!(
                rx.try_recv().is_err(),
                "the root's return left it to its close"
            );
            assert_eq!(d.pending[&written].phase, Phase::Writing);
            assert!(d.shared.writing.lock().unwrap().contains(&written));

            d.dropped.store(true, Ordering::Relaxed);
            scan(&mut d, &mut inputs);
            assert_eq!(rx.try_recv().unwrap().abs, written, "events were lost");
        })
        .join()
        .unwrap();
    }

    /// Rules reloaded that leave out a file being written: its events are
    /// still followed, it is not listed as waiting, and its close drops it
    /// (it is not handed over). Other files they leave out are forgotten;
    /// those they take are kept as they were.
    #[tokio::test]
    async fn a_file_being_written_that_reloaded_rules_leave_out_is_followed_to_its_close_and_dropped(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, mut rx, _walks) = detect_at(dir.path());
        let root = d.rules.root.clone();
        let old = Instant::now() - Duration::from_secs(10);
        let (written, created, kept) = (root.join("a.jpg"), root.join("b.jpg"), root.join("c.png"));
        d.pending
            .insert(written.clone(), pending(Phase::Writing, old));
        d.pending
            .insert(created.clone(), pending(Phase::Created, old));
        d.pending.insert(kept.clone(), pending(Phase::Writing, old));
        let without = Rules::new(&root, &["**".into()], &["*.jpg".into()], d.rules.settle).unwrap();
        d.input(Input::Reconfigure(without, None));
        assert!(!d.pending.contains_key(&created), "left out: forgotten");
        assert_eq!(d.pending[&written].phase, Phase::Writing);
        assert_eq!(d.pending[&kept].phase, Phase::Writing);
        d.publish();
        assert_eq!(
            d.live.shown().writers_waiting,
            1,
            "only the one still taken"
        );

        let close = notify::Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write)))
            .add_path(written.clone());
        d.event(Ok(close));
        assert_eq!(d.pending[&written].phase, Phase::Closed);
        d.pending.get_mut(&written).unwrap().last_event = old;
        d.settle_due();
        assert!(rx.try_recv().is_err(), "left out: not handed over");
        assert!(!d.pending.contains_key(&written));
        assert_eq!(d.pending[&kept].phase, Phase::Writing);
    }

    /// The root back: a file seen being written keeps waiting if it is the
    /// same root; on another filesystem (or directory) nothing known holds.
    #[tokio::test]
    async fn the_root_back_keeps_files_being_written_only_if_it_is_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx, walks) = detect_at(dir.path());
        let root = d.rules.root.clone();
        let old = Instant::now() - Duration::from_secs(10);
        let (written, closed) = (root.join("a.jpg"), root.join("b.jpg"));
        d.pending
            .insert(written.clone(), pending(Phase::Writing, old));
        d.pending
            .insert(closed.clone(), pending(Phase::Closed, old));
        d.rewatch();
        assert_eq!(walks.try_recv().unwrap(), (root.clone(), Why::RootBack));
        assert!(d.pending.contains_key(&written));
        assert!(
            !d.pending.contains_key(&closed),
            "found again by the rescan"
        );
        assert!(d.shared.writing.lock().unwrap().contains(&written));

        d.root_id = Some(RootId {
            fsid: 0,
            uuid: None,
            ino: 0,
        });
        d.rewatch();
        assert!(d.pending.is_empty(), "another root: {:?}", d.pending);
        assert!(d.shared.writing.lock().unwrap().is_empty());
    }

    /// After lost events, a folder whose record matches (removed, its
    /// removal lost, and created again with the same inode number, as ext4
    /// does) but that has no watch is watched again by the rescan.
    #[test]
    fn after_lost_events_a_folder_recorded_as_watched_is_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, _rx, walks, _inputs) = detect_with_inputs(dir.path(), 64);
        let (tx, events) = std::sync::mpsc::channel();
        *d.shared.notify.lock().unwrap() = notify::RecommendedWatcher::new(
            move |ev: notify::Result<notify::Event>| {
                let _ = tx.send(ev);
            },
            watcher_config(),
        )
        .unwrap();
        let root = d.rules.root.clone();
        walk(&d.shared, &root, &Between::Nothing, Known::Trust);
        let current = root.join("current");
        std::fs::create_dir(&current).unwrap();
        let m = std::fs::metadata(&current).unwrap();
        d.shared
            .watched
            .lock()
            .unwrap()
            .insert(current.clone(), (m.dev(), m.ino()));

        d.events_lost();
        let (scanned, why) = walks.try_recv().unwrap();
        assert_eq!((&scanned, why), (&root, Why::Overflow));
        walk_and_report(&d.shared, &scanned, why, &Between::Nothing);
        while events.try_recv().is_ok() {}
        let file = current.join("a.png");
        std::fs::write(&file, b"x").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(Ok(ev)) if ev.paths.contains(&file) => break,
                Ok(_) => {}
                Err(_) => panic!("no event from the folder: it has no watch"),
            }
        }
        assert!(!d.shared.rewatch_known.load(Ordering::SeqCst), "once");
    }

    #[test]
    fn watch_failures_by_cause() {
        let io = |errno| notify::Error::io(std::io::Error::from_raw_os_error(errno));
        let limit = notify::Error::new(notify::ErrorKind::MaxFilesWatch);
        assert_eq!(WatchFailure::of(&limit), WatchFailure::Limit);
        assert_eq!(WatchFailure::of(&io(libc::EACCES)), WatchFailure::Denied);
        let gone = notify::Error::new(notify::ErrorKind::PathNotFound);
        assert_eq!(WatchFailure::of(&gone), WatchFailure::Gone);
        assert_eq!(WatchFailure::of(&io(libc::ENOENT)), WatchFailure::Gone);
        assert_eq!(WatchFailure::of(&io(libc::ENOMEM)), WatchFailure::Other);
    }

    /// Sets the permission bits of `p`.
    fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Runs `f` on a watcher of `root` in a thread of its own that becomes
    /// nobody (notify's thread, started by it, too), with a function that
    /// walks the whole tree once. `None` without root (a failure under CI).
    fn as_nobody<T: Send + 'static>(
        root: &Path,
        f: impl FnOnce(&mut Detect, &dyn Fn(&mut Detect)) -> T + Send + 'static,
    ) -> Option<std::thread::JoinHandle<T>> {
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "this test needs root");
            eprintln!("SKIP: needs root");
            return None;
        }
        let root = root.to_path_buf();
        Some(std::thread::spawn(move || {
            // SAFETY: the raw syscall changes this thread's ids only.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (mut d, _rx, walks, _inputs) = detect_with_inputs(&root, 64);
            let _guard = rt.enter();
            let scan = |d: &mut Detect| {
                d.rescan(Why::Periodic);
                let (dir, why) = walks.try_recv().unwrap();
                walk_and_report(&d.shared, &dir, why, &Between::Nothing);
            };
            f(&mut d, &scan)
        }))
    }

    /// A folder the service may not read (`lost+found` at a mount point's
    /// root): named once, in the log and `status`, and no cause for
    /// rescans every minute (its files cannot be read by them either).
    /// Needs root, to run the watcher as another user.
    #[test]
    fn a_folder_the_service_may_not_read_is_named_once_and_brings_no_rescans() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let private = dir.path().join("lost+found");
        std::fs::create_dir(&private).unwrap();
        chmod(&private, 0o700);
        let watcher = as_nobody(dir.path(), move |d, scan| {
            scan(d);
            scan(d);
            assert_eq!(d.shared.unwatched.load(Ordering::Relaxed), 0);
            let notices = d.live.shown().notices;
            assert_eq!(notices.len(), 1, "{notices:?}");
            assert!(
                notices[0].starts_with(&format!(
                    "cannot read {}: permission denied",
                    private.display()
                )),
                "{notices:?}"
            );
            d.tick();
            assert_eq!(d.next_rescan, None, "no rescans: rescan_interval is 0");
        });
        if let Some(w) = watcher {
            w.join().unwrap();
        }
    }

    /// Many such folders name five among `status` notices, and say there
    /// are more, so that they do not push every other notice out; a folder
    /// that can be watched again has its notice taken back. Needs root.
    #[test]
    fn private_folders_take_at_most_six_notices_taken_back_once_readable() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let private: Vec<PathBuf> = (0..8).map(|i| dir.path().join(format!("p{i}"))).collect();
        for p in &private {
            std::fs::create_dir(p).unwrap();
            chmod(p, 0o700);
        }
        let (scanned_tx, scanned) = std::sync::mpsc::channel();
        let (opened_tx, opened) = std::sync::mpsc::channel::<()>();
        let Some(watcher) = as_nobody(dir.path(), move |d, scan| {
            scan(d);
            scanned_tx.send(d.live.shown().notices).unwrap();
            opened.recv().unwrap();
            scan(d);
            d.live.shown().notices
        }) else {
            return;
        };
        let notices = scanned.recv().unwrap();
        assert_eq!(notices.len(), FOLDER_NOTICES + 1, "{notices:?}");
        assert!(notices[FOLDER_NOTICES].starts_with("more than 5 folders cannot be read"));
        for p in &private {
            chmod(p, 0o755);
        }
        opened_tx.send(()).unwrap();
        let notices = watcher.join().unwrap();
        assert!(notices.is_empty(), "taken back: {notices:?}");
    }
}
