//! `offloadd run`: opens the state, starts every task, reloads on request and
//! stops cleanly when `shutdown` completes (the signals themselves stay in
//! `main`, so the daemon also runs inside a test).
//!
//! Tasks, each joined on stop: the root guard, the HTTP listener (started
//! first, so `/r/` answers by predictable key while records are rebuilt), the
//! control socket, the status publisher, the watchdog heartbeat, the watcher
//! and the scheduler. On stop no new work starts; uploads in flight get
//! [`STOP_GRACE`]; the rest stays queued. Any of them that ends early (a
//! panic) stops the daemon with exit 1, for systemd to restart it.
//!
//! Reload: the new file is parsed and validated first; if it is invalid, or
//! changes `watch.root`, `state_dir`, `http.listen` or `control_socket`,
//! nothing of it is applied. Otherwise every other key takes effect at once:
//! uploads in flight finish on the provider they started with, later ones go
//! to the new active provider, and a paused provider is probed again.
//!
//! At start and at each reload that applies, the active provider's endpoint,
//! bucket and prefix are compared with those uploaded under before
//! (`statedir::prefix_history`), a nesting prefix is warned about, and they
//! are recorded before the scheduler may upload under them.

use crate::config::{self, Config, RootCheck};
use crate::control::{self, status::Report};
use crate::observe::{http, logging, systemd};
use crate::pipeline::budget::Pacer;
use crate::pipeline::detect::{self, Candidate};
use crate::pipeline::live::Live;
use crate::pipeline::plan::Target;
use crate::pipeline::queue::{Opened, Queue, StateError};
use crate::pipeline::rebuild;
use crate::pipeline::root::{RootGuard, RootStatus};
use crate::pipeline::schedule::{Command, Scheduler};
use crate::settings::{self, Settings, Shared};
use crate::shutdown::{Shutdown, Stop};
use crate::statedir::{self, prefix_history, Holder, Lock};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long uploads in flight may take to finish after a stop.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// Candidates waiting between the watcher and the scheduler.
const CANDIDATE_QUEUE: usize = 4096;

/// Why the daemon could not run; `main` turns it into one sentence and an
/// exit code (`crate::exit`).
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// Something in the configuration or the paths it names: exit 78.
    #[error("{0}")]
    Config(String),
    /// The state directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// Anything else that keeps it from running (a port in use, say).
    #[error("{0}")]
    Runtime(String),
}

/// Runs the daemon until `shutdown` completes; each message on `reloads` is a
/// reload of the configuration file.
pub async fn run(
    config: Config,
    mut reloads: mpsc::Receiver<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Fatal> {
    let _lock = Lock::acquire(&config.state_dir, Holder::Daemon)?;
    statedir::mark::share_with_group(&config.state_dir);
    crate::pipeline::finished::ignore_lease_signals();
    let (queue, opened) = Queue::open(&config.state_dir)?;
    let queue = Arc::new(queue);
    for info in queue.paused() {
        // A pause from the last run is probed again at once.
        queue.set_paused(&info.provider, None)?;
    }
    let root = RootGuard::new(&config.watch.root, &config.state_dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            // A hung mount may answer again: exit 1, so systemd tries again.
            return Fatal::Runtime(e.to_string());
        }
        let root = config.watch.root.display();
        let what = format!("recording the identity of watch.root {root}: {e}");
        match StateError::of_io(&config.state_dir, &e, what) {
            // A full disk may clear: exit 1, and systemd tries again.
            full @ StateError::Failed { .. } => Fatal::State(full),
            _ => Fatal::Config(format!(
                "cannot record the identity of watch.root {root} in state_dir: {e}; check both paths"
            )),
        }
    })?;
    let root = Arc::new(root);
    let settings = Arc::new(Settings::build(config, None).map_err(Fatal::Config)?);
    let shared: Shared = Arc::new(RwLock::new(settings.clone()));
    let live = Arc::new(Live::default());
    // Before the scheduler, the only task that uploads, is spawned below: a
    // place is in the history before any upload under it can complete.
    let mut earlier = EarlierPlaces::load(&settings.config.state_dir);
    earlier.check_and_record(&settings, &live);
    let (stop, stopped) = Stop::new();
    let mut tasks = Tasks::default();

    {
        let (root, sd) = (root.clone(), stopped.clone());
        tasks.push(
            "root guard",
            tokio::spawn(async move { root.run(sd).await }),
        );
    }
    if let Some(addr) = settings.config.http.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Fatal::Runtime(format!(
                "cannot listen on {addr} (http.listen): {e}; pick a free address or set http.listen to \"\" to disable the listener"
            ))
        })?;
        let (sh, q) = (shared.clone(), queue.clone());
        let app = http::App {
            metrics: live.metrics.clone(),
            resolve: Arc::new(move |rel: &str| {
                let c = settings::current(&sh);
                control::status::public_url(&c.config, &q, c.predictable.as_ref(), rel)
                    .map_err(|e| e.to_string())
            }),
        };
        tasks.push(
            "http",
            tokio::spawn(http::serve(listener, app, stopped.clone())),
        );
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    // Published to the control socket once the scheduler runs.
    let commands = control::server::Commands::default();
    let socket = settings.config.control_socket.clone();
    let socket_bound = match control::server::bind(&socket) {
        Ok(listener) => {
            let handle = control::server::Handle {
                shared: shared.clone(),
                queue: queue.clone(),
                live: live.clone(),
                commands: commands.clone(),
            };
            tasks.push(
                "control socket",
                tokio::spawn(control::server::serve(listener, handle, stopped.clone())),
            );
            true
        }
        // Another instance (this state_dir's lock is ours) was given the
        // same socket: running on would leave this one without commands.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(Fatal::Config(format!(
                "control_socket {} is answered by another process, probably another offloadd instance; give each instance its own `control_socket` in {}",
                socket.display(),
                settings.config.source.display()
            )));
        }
        Err(e) => {
            tracing::warn!(
                socket = %socket.display(),
                error = %e,
                "cannot open the control socket {}: {e}; status is written to state_dir/status.json instead, and locate, retry, delete and backfill must wait until offloadd stops (check control_socket and RuntimeDirectory=)",
                socket.display()
            );
            false
        }
    };
    tasks.push(
        "status",
        tokio::spawn(publish_status(
            shared.clone(),
            queue.clone(),
            live.clone(),
            root.clone(),
            socket_bound,
            stopped.clone(),
        )),
    );

    tokio::pin!(shutdown);
    // Rebuild the records first when the database was lost; a stop meanwhile
    // ends it early.
    let mut rebuild_outcome = rebuild::Outcome::Complete;
    if let (Opened::Lost, Target::Local { .. }) = (opened, &settings.plan.target) {
        tracing::warn!("in local mode no bucket is listed: the location records are rebuilt at the first start with an active provider; until then locate and /r/ answer for files offloaded before as if they never were");
    }
    if let (Opened::Lost, Target::Provider(store)) = (opened, &settings.plan.target) {
        let progress = Arc::new(rebuild::Progress::default());
        live.update(|s| s.rebuild = Some(progress.clone()));
        let mut sd = stopped.clone();
        let config = &settings.config;
        // The active provider first, then the others; every listing must go
        // through, or the next start rebuilds again (what was restored
        // stays, but for a gone file's record a newer version replaces). A
        // provider that cannot be
        // used was named when the settings were built.
        let listings = std::iter::once((store, rebuild::Listing::Active(settings.plan.deletion())))
            .chain(
                settings
                    .plan
                    .others
                    .values()
                    .map(|s| (s, rebuild::Listing::Other)),
            );
        let managed = rebuild::Managed {
            rules: &settings.rules,
            mark_ns: settings.plan.options.mark_ns,
        };
        let rebuilt = async {
            let mut outcome = rebuild::Outcome::Complete;
            for (store, listing) in listings {
                let listed = rebuild::run(
                    store.as_ref(),
                    &root,
                    &queue,
                    listing,
                    &managed,
                    config.upload.part_size,
                    &progress,
                    &mut sd,
                )
                .await;
                let name = &store.provider().name;
                let retired = listing == rebuild::Listing::Other
                    && config
                        .storage
                        .providers
                        .get(name)
                        .is_some_and(|p| !p.enabled);
                match listed {
                    rebuild::Outcome::Complete => {}
                    // A retired provider's bucket may be gone for good: its
                    // records are lost, but a rebuild at every start would
                    // not bring them back.
                    rebuild::Outcome::Unlisted if retired => tracing::warn!(
                        provider = %name,
                        "the records of retired provider `{name}` are not rebuilt, since its bucket cannot be listed; locate and /r/ answer for those files as if they were never offloaded"
                    ),
                    rebuild::Outcome::Unlisted => {
                        tracing::error!(provider = %name, "files without a record are uploaded again, and the rebuild runs again at the next start");
                        outcome = rebuild::Outcome::Stopped;
                    }
                    rebuild::Outcome::Stopped => outcome = rebuild::Outcome::Stopped,
                }
                // The others only after the active one: for a path whose
                // local copy is still there, the first listing's record
                // stays, and an older object elsewhere must not be first.
                if listing != rebuild::Listing::Other && outcome != rebuild::Outcome::Complete {
                    break;
                }
            }
            outcome
        };
        // READY waits for the rebuild, which may read every large file once.
        let rebuilt = systemd::while_starting(rebuilt, systemd::EXTEND_EVERY);
        tokio::select! {
            outcome = rebuilt => rebuild_outcome = outcome,
            () = &mut shutdown => {
                systemd::stopping();
                stop.fire();
            }
        }
        live.update(|s| s.rebuild = None);
    }
    if stopped.is_shutdown() {
        return finish(stop, tasks, &queue, &settings).await;
    }
    // The database holds every record of this state_dir once it was created
    // here or rebuilt in full; a lost one that was not rebuilt (a rebuild
    // that stopped early, or local mode, which lists no bucket) is rebuilt
    // at the next start. A fresh one is marked even in local mode: a reload
    // to a provider fills it, and a later loss must be recognised.
    let complete = match opened {
        Opened::Lost => {
            matches!(settings.plan.target, Target::Provider(_))
                && rebuild_outcome == rebuild::Outcome::Complete
        }
        Opened::Fresh | Opened::Intact => true,
    };
    if complete {
        // Durable before the mark (written next, with a provider): a crash
        // between them would leave a marked state_dir with an uninitialized
        // database, which the next start takes for a lost one.
        queue.set_initialized()?;
        queue.flush()?;
    }

    let (cand_tx, cand_rx) = mpsc::channel::<Candidate>(CANDIDATE_QUEUE);
    let (rescan_tx, rescan_rx) = tokio::sync::watch::channel(0u64);
    let mut reloader = Reloader {
        shared: shared.clone(),
        live: live.clone(),
        root: root.clone(),
        commands: cmd_tx.clone(),
        candidates: cand_tx,
        watcher: None,
        rescans: rescan_rx,
        records: detect::records_in(queue.clone()),
        reloaded: None,
        earlier,
        stopped: stopped.clone(),
    };
    if let Target::Provider(_) = settings.plan.target {
        let prepared = reloader.prepare_watcher(&settings)?;
        settings.commit_mark().map_err(Fatal::State)?;
        tasks.push("watcher", reloader.launch_watcher(prepared));
    }
    let pacer = Pacer::new(settings.bandwidth_now().limit.bytes_per_sec());
    let (reloaded_tx, reloaded_rx) = tokio::sync::watch::channel(0u64);
    tasks.push(
        "bandwidth",
        tokio::spawn(follow_bandwidth(
            shared.clone(),
            pacer.clone(),
            live.clone(),
            reloaded_rx,
            stopped.clone(),
        )),
    );
    reloader.reloaded = Some(reloaded_tx);
    let scheduler = Scheduler::new(
        settings.plan.clone(),
        (settings.budget(), pacer),
        queue.clone(),
        root.clone(),
        live.clone(),
        rescan_tx,
    );
    let scheduler = tokio::spawn(scheduler.run(cand_rx, cmd_rx, stopped.clone(), STOP_GRACE));
    let _ = commands.set(cmd_tx);

    tracing::info!(
        root = %settings.config.watch.root.display(),
        provider = %settings.active(),
        pid = std::process::id(),
        "offloadd started"
    );
    if let Some(reason) = &settings.local_reason {
        tracing::warn!("local mode: nothing is offloaded because {reason}");
    }
    systemd::ready();
    let live_w = live.clone();
    let state_answered = Arc::new(AtomicU64::new(statedir::now_ms()));
    let answered = state_answered.clone();
    let watchdog = systemd::spawn_watchdog(stopped.clone(), move || {
        let now = statedir::now_ms();
        if now.saturating_sub(answered.load(Ordering::Relaxed)) > STATE_HUNG_AFTER_MS {
            Some("the state database stopped answering")
        } else if live_w.loop_stuck(LOOP_STUCK_AFTER_MS) {
            Some("the scheduler's loop stopped turning")
        } else if live_w.in_flight.load(Ordering::Relaxed) > 0 && live_w.progress.overdue(now) {
            Some("uploads in flight made no progress")
        } else {
            None
        }
    });
    // The database is pinged for the watchdog only.
    let answered = watchdog.is_some().then_some(state_answered);
    if let Some(task) = watchdog {
        tasks.push("watchdog", task);
    }
    tasks.push(
        "state probe",
        tokio::spawn(probe_state(queue.clone(), answered, stopped.clone())),
    );

    let mut scheduler = scheduler;
    // The scheduler ends only after a stop; if it ends before one (a
    // panic), nothing would be uploaded again while the process lived on,
    // so the daemon stops with an error and systemd restarts it. So it does
    // when the state failed for good: the restart moves aside or rebuilds.
    let mut state_lost = None;
    let ended_early = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            e = queue.restart_needed() => {
                state_lost = Some(e);
                break None;
            }
            ended = &mut scheduler => break Some(Early::Scheduler(match ended {
                Ok(()) => "the scheduler stopped before the daemon did".to_string(),
                Err(e) => format!("the scheduler failed: {e}"),
            })),
            Some(name) = tasks.panicked.recv() => break Some(Early::Task(name)),
            Some(()) = reloads.recv() => {
                if let Some(task) = reloader.reload().await {
                    tasks.push("watcher", task);
                }
            }
        }
    };
    tracing::info!("stopping: no new uploads start");
    systemd::stopping();
    stop.fire();
    // Why it ended before the stop, if it did.
    if !matches!(ended_early, Some(Early::Scheduler(_))) {
        if let Err(e) = scheduler.await {
            tracing::error!("the scheduler failed: {e}");
        }
    }
    let died = ended_early.map(|early| match early {
        Early::Scheduler(why) => why,
        Early::Task(name) => format!("the {name} task failed"),
    });
    drop(reloader);
    let finished = finish(stop, tasks, &queue, &settings).await;
    if let Some(e) = state_lost {
        return Err(Fatal::State(e));
    }
    finished?;
    match died {
        Some(why) => Err(Fatal::Runtime(format!(
            "{why}; offloadd exits so that it is restarted, and queued files are kept"
        ))),
        None => Ok(()),
    }
}

/// What ended the daemon's main loop before a stop.
enum Early {
    /// The scheduler ended (it runs until the stop), with why.
    Scheduler(String),
    /// Another task panicked.
    Task(&'static str),
}

/// The daemon's long-lived tasks (all but the scheduler, which the main
/// loop awaits itself): each is joined at the stop, and one that panics
/// before it is named on `panicked`, so that the daemon stops and is
/// restarted instead of living on without, say, its watcher while `status`
/// and `/healthz` answer as if all were well.
struct Tasks {
    running: Vec<(&'static str, JoinHandle<()>)>,
    report: mpsc::UnboundedSender<&'static str>,
    panicked: mpsc::UnboundedReceiver<&'static str>,
}

impl Default for Tasks {
    fn default() -> Self {
        let (report, panicked) = mpsc::unbounded_channel();
        Tasks {
            running: Vec::new(),
            report,
            panicked,
        }
    }
}

impl Tasks {
    /// Follows `task`: its end is awaited at the stop through a sentinel
    /// that reports a panic at once.
    fn push(&mut self, name: &'static str, task: JoinHandle<()>) {
        let report = self.report.clone();
        let sentinel = tokio::spawn(async move {
            if let Err(e) = task.await {
                tracing::error!(task = name, error = %e, "a task ended abnormally");
                if e.is_panic() {
                    let _ = report.send(name);
                }
            }
        });
        self.running.push((name, sentinel));
    }
}

/// Joins every task and makes the state durable.
async fn finish(stop: Stop, tasks: Tasks, queue: &Queue, settings: &Settings) -> Result<(), Fatal> {
    stop.fire();
    for (name, task) in tasks.running {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            // A failure was logged by the sentinel.
            Ok(_) => {}
            Err(_) => tracing::warn!(task = name, "a task did not stop in time"),
        }
    }
    queue.flush()?;
    let _ = std::fs::remove_file(statedir::snapshot_path(&settings.config.state_dir));
    tracing::info!("offloadd stopped");
    Ok(())
}

/// What a reload needs and keeps.
struct Reloader {
    shared: Shared,
    live: Arc<Live>,
    root: Arc<RootGuard>,
    commands: mpsc::Sender<Command>,
    candidates: mpsc::Sender<Candidate>,
    watcher: Option<detect::Watcher>,
    rescans: tokio::sync::watch::Receiver<u64>,
    records: detect::RecordsAt,
    /// Bumped after every applied reload.
    reloaded: Option<tokio::sync::watch::Sender<u64>>,
    earlier: EarlierPlaces,
    stopped: Shutdown,
}

impl Reloader {
    /// Takes what the watcher needs (the part that can fail); watches
    /// nothing yet.
    fn prepare_watcher(&self, s: &Settings) -> Result<detect::Prepared, Fatal> {
        detect::prepare(
            detect::Watching {
                rules: s.rules.clone(),
                rescan_interval: s.config.watch.rescan_interval,
                min_changed_ns: s.plan.options.mark_ns,
            },
            detect::Links {
                out: self.candidates.clone(),
                live: self.live.clone(),
                root: self.root.subscribe(),
                root_seen: self.root.sightings(),
                rescans: self.rescans.clone(),
                records: self.records.clone(),
                shutdown: self.stopped.clone(),
            },
        )
        // Only the kernel's inotify instance is taken here (the root was
        // checked when the config loaded): out of instances or of file
        // descriptors, which may clear, so not a configuration error (78
        // would keep systemd from trying again).
        .map_err(|e| {
            Fatal::Runtime(format!(
                "cannot watch {}: {e}; let offloadd open more files (LimitNOFILE=) or raise fs.inotify.max_user_instances",
                s.config.watch.root.display()
            ))
        })
    }

    /// Starts the prepared watcher; returns its task.
    fn launch_watcher(&mut self, prepared: detect::Prepared) -> JoinHandle<()> {
        let (watcher, task) = prepared.launch();
        self.watcher = Some(watcher);
        task
    }

    /// Re-reads the config; applies all of it or nothing. Returns the task of
    /// a watcher it started.
    async fn reload(&mut self) -> Option<JoinHandle<()>> {
        systemd::reloading();
        let old = settings::current(&self.shared);
        let started = match self.try_reload(&old).await {
            Ok(task) => {
                tracing::info!(
                    provider = %settings::current(&self.shared).active(),
                    "configuration reloaded"
                );
                task
            }
            Err(why) => {
                tracing::error!(
                    error = %why,
                    "reload refused: {why}; the running configuration stays in force"
                );
                None
            }
        };
        systemd::ready();
        started
    }

    async fn try_reload(&mut self, old: &Settings) -> Result<Option<JoinHandle<()>>, String> {
        let file = &old.config.source;
        let loaded = config::load(file, RootCheck::MayBeAway).map_err(|e| e.to_string())?;
        let mut new = loaded.config;
        // A root that is away (unmounted) keeps its path as written, which
        // differs from the resolved one in force when it goes through a
        // symbolic link: then the written paths tell.
        // Bounded: a root on a hung mount never answers, and counts as away.
        let root_away = {
            let written = new.watch.root_as_written.clone();
            crate::pipeline::root::within(crate::pipeline::root::ANSWER_WITHIN, move || {
                std::fs::canonicalize(written).is_ok()
            }) != Some(true)
        };
        let root_changed = if root_away {
            new.watch.root_as_written != old.config.watch.root_as_written
        } else {
            new.watch.root != old.config.watch.root
        };
        for (key, changed) in [
            ("watch.root", root_changed),
            ("state_dir", new.state_dir != old.config.state_dir),
            ("http.listen", new.http.listen != old.config.http.listen),
            (
                "control_socket",
                new.control_socket != old.config.control_socket,
            ),
        ] {
            if changed {
                return Err(format!(
                    "{}: `{key}` changed, which only a restart can apply; restart offloadd (nothing of this reload was applied)",
                    file.display()
                ));
            }
        }
        // Unchanged: the resolved root stays in force (the rules, keys and
        // the watcher go by it), not a link path loaded while it was away,
        // which the next reload would take for a change.
        new.watch.root = old.config.watch.root.clone();
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        let cur = Arc::new(Settings::build(new, old.mark())?);
        // All or nothing: what can fail (a watcher needs inotify and a
        // thread) is taken before anything changes. Leaving local mode for
        // the first time needs a watcher.
        let prepared = match (&self.watcher, &cur.plan.target) {
            (None, Target::Provider(_)) => {
                Some(self.prepare_watcher(&cur).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        cur.commit_mark().map_err(|e| e.to_string())?;
        // Before the scheduler has the new plan: a place is in the history
        // before any upload under it can complete. The old target is in it
        // already, so a prefix changed by this reload is compared too.
        self.earlier.check_and_record(&cur, &self.live);
        // The scheduler takes the new plan first, so that what the watcher
        // finds from now on is judged by it.
        let (applied, done) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::Replan {
                plan: cur.plan.clone(),
                memory_limit: cur.config.upload.memory_limit,
                applied,
            })
            .await
            .map_err(|_| "the scheduler is stopping".to_string())?;
        done.await
            .map_err(|_| "the scheduler is stopping".to_string())?;
        let mut started = None;
        if let Some(prepared) = prepared {
            started = Some(self.launch_watcher(prepared));
        } else if let Some(w) = &self.watcher {
            w.reconfigure(cur.rules.clone(), cur.config.watch.rescan_interval)
                .await;
            // Files written while in local mode are found now, and so are
            // those in folders the new rules include.
            let from_local = matches!(
                (&old.plan.target, &cur.plan.target),
                (Target::Local { .. }, Target::Provider(_))
            );
            let rules_changed = cur.config.watch.include != old.config.watch.include
                || cur.config.watch.exclude != old.config.watch.exclude;
            if from_local || rules_changed {
                w.rescan().await;
            }
        }
        if let Some(reason) = &cur.local_reason {
            tracing::warn!("local mode: nothing is offloaded because {reason}");
        }
        logging::set_level(&cur.config.log.level);
        if cur.config.log.format != old.config.log.format {
            logging::set_format(cur.config.log.format);
        }
        *self.shared.write().expect("settings lock") = cur;
        if let Some(r) = &self.reloaded {
            r.send_modify(|n| *n += 1);
        }
        Ok(started)
    }
}

/// The places uploaded under before ([`prefix_history`]), and the notices
/// `status` shows about those the active provider's prefix nests with.
struct EarlierPlaces {
    history: prefix_history::History,
    shown: Vec<String>,
}

impl EarlierPlaces {
    /// The history in `state_dir`; one that cannot be read is an empty one,
    /// said once (it is advisory).
    fn load(state_dir: &Path) -> EarlierPlaces {
        let (history, trouble) = prefix_history::History::load(state_dir);
        if let Some(why) = trouble {
            tracing::warn!("{why}");
        }
        EarlierPlaces {
            history,
            shown: Vec::new(),
        }
    }

    /// Warns, in the log and in `status`, about each earlier place that the
    /// active provider of `s` shares keys with, then records the provider's.
    /// Places of the config's other sections are left out: building `s`
    /// warned about those already.
    fn check_and_record(&mut self, s: &Settings, live: &Live) {
        for text in self.shown.drain(..) {
            live.withdraw(&text);
        }
        let Target::Provider(store) = &s.plan.target else {
            return;
        };
        let now = store.provider();
        let place = now.key_space();
        let configured: Vec<_> = s
            .plan
            .others
            .values()
            .map(|o| o.provider().key_space())
            .collect();
        for earlier in self.history.nesting_with(&place) {
            if configured.contains(earlier) {
                continue;
            }
            let text = now.earlier_keys_warning(earlier);
            tracing::warn!(provider = %now.name, "{text}");
            live.notice(text.clone());
            self.shown.push(text);
        }
        if let Err(e) = self.history.record(place) {
            let file = prefix_history::path(&s.config.state_dir);
            tracing::warn!(
                error = %e,
                "cannot write {}: {e}; after a restart, a prefix that nests with provider `{}`'s is not warned about",
                file.display(),
                now.name
            );
        }
    }
}

/// Keeps the pacer at the bandwidth limit in force (the flat limit, or the
/// weekly schedule), and says so in the log, `status` and `/metrics`.
async fn follow_bandwidth(
    shared: Shared,
    pacer: Pacer,
    live: Arc<Live>,
    mut reloaded: tokio::sync::watch::Receiver<u64>,
    mut stopped: Shutdown,
) {
    let mut shown = String::new();
    loop {
        let bw = settings::current(&shared).bandwidth_now();
        pacer.set_rate(bw.limit.bytes_per_sec());
        live.metrics.set_bandwidth_limit(bw.limit.bytes_per_sec());
        let text = bw.to_string();
        if text != shown {
            if !shown.is_empty() || bw.scheduled {
                tracing::info!(limit = %text, "upload bandwidth limit now {text}");
            }
            live.update(|s| s.bandwidth = text.clone());
            shown = text;
        }
        // Look again at the next change, and at least every minute (the
        // clock or the time zone may change meanwhile).
        let wait = bw
            .next_change
            .map_or(Duration::from_secs(60), |d| d.min(Duration::from_secs(60)))
            .max(Duration::from_millis(200));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = reloaded.changed() => if changed.is_err() { return },
            _ = stopped.recv() => return,
        }
    }
}

/// How long the state database may take to answer [`probe_state`] before
/// the watchdog lets systemd restart the daemon.
const STATE_HUNG_AFTER_MS: u64 = 60_000;

/// How long the scheduler's loop may go without turning (it turns at least
/// every second, idle or not) before the watchdog takes it for stuck: a
/// blocked or endlessly spinning scheduler uploads nothing.
const LOOP_STUCK_AFTER_MS: u64 = 60_000;

/// Every few seconds, off the runtime: checks that state_dir and the
/// database are still those opened ([`Queue::check_place`]: one removed or
/// replaced fails the state for good, and the daemon exits), and, with the
/// watchdog on, asks the database for one small write and notes when it
/// answered (an error is an answer). A database that hangs (sled can, under
/// load) leaves `answered` stale, and the watchdog stops its pings. Only one
/// probe is outstanding at a time.
async fn probe_state(queue: Arc<Queue>, answered: Option<Arc<AtomicU64>>, mut stopped: Shutdown) {
    let mut tick = tokio::time::interval(PROBE_STATE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.recv() => return,
        }
        let q = queue.clone();
        let ping = answered.is_some();
        let probe = tokio::task::spawn_blocking(move || {
            let _ = q.check_place();
            if ping {
                let _ = q.ping();
            }
        });
        tokio::select! {
            _ = probe => if let Some(a) = &answered {
                a.store(statedir::now_ms(), Ordering::Relaxed);
            },
            _ = stopped.recv() => return,
        }
    }
}

/// How often [`probe_state`] looks.
const PROBE_STATE_EVERY: Duration = Duration::from_secs(5);

/// Keeps systemd's `STATUS=` current, and writes the status snapshot when the
/// control socket could not be bound.
async fn publish_status(
    shared: Shared,
    queue: Arc<Queue>,
    live: Arc<Live>,
    root: Arc<RootGuard>,
    socket_bound: bool,
    mut stopped: Shutdown,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let started = statedir::now_ms();
    loop {
        let cur = settings::current(&shared);
        let report = control::status::live(&queue, &live, &cur);
        publish_gauges(&live, &report, &cur, started, &root.status());
        systemd::status(&status_line(&report));
        if !socket_bound {
            let json = serde_json::to_vec_pretty(&report).expect("report serializes");
            if let Err(e) = statedir::write_snapshot(&cur.config.state_dir, &json) {
                tracing::debug!(error = %e, "cannot write the status snapshot");
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.recv() => break,
        }
        if crate::failpoint::fails(crate::failpoint::STATUS_PANICS) {
            panic!("failpoint {} reached", crate::failpoint::STATUS_PANICS);
        }
    }
}

/// The gauges `/metrics` reads once a second.
fn publish_gauges(
    live: &Live,
    report: &Report,
    cur: &Settings,
    started_ms: u64,
    root: &RootStatus,
) {
    let m = &live.metrics;
    let now_ms = statedir::now_ms();
    m.set_pipeline_paused(report.pipeline_paused.is_some());
    // From the root guard itself, not the pause's text: a state_dir failure
    // at the same time names only itself there.
    m.set_root_available(*root == RootStatus::Present);
    m.set_waiting_for_writer(report.waiting_for_writer);
    if let Some(free) = statedir::free_bytes(&cur.config.state_dir) {
        m.set_state_dir_free(free);
    }
    let last_ms = (m.last_success_secs() * 1000.0) as u64;
    let since = if last_ms == 0 { started_ms } else { last_ms };
    m.set_last_success_age(now_ms.saturating_sub(since) / 1000);
}

/// The one-line `STATUS=` systemd shows.
fn status_line(r: &Report) -> String {
    let mut s = match &r.local_mode_reason {
        Some(_) => "local mode".to_string(),
        None => format!("provider {}", r.active_provider),
    };
    s.push_str(&format!(
        "; queued {}, in flight {}",
        r.queue_depth, r.in_flight
    ));
    if let Some(n) = &r.rebuilding {
        s.push_str(&format!("; rebuilding {n}"));
    }
    if let Some(why) = &r.pipeline_paused {
        s.push_str(&format!("; PAUSED: {why}"));
    } else if let Some(p) = r.paused.first() {
        s.push_str(&format!("; PAUSED: {}", p.reason));
    } else if let Some(e) = &r.last_error {
        s.push_str(&format!("; last error: {e}"));
    }
    s
}
