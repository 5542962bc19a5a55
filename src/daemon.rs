//! `offloadd run`: opens the state, starts the watcher, the pipeline, the control
//! socket and the HTTP listener, publishes status, reloads on SIGHUP and stops
//! cleanly on SIGTERM/SIGINT (uploads in flight get up to 30 s; the rest stays
//! queued).
//!
//! Reload: the new file is parsed and validated first; if it is invalid, or
//! changes `watch.root`, `state_dir`, `http.listen` or `control_socket`, nothing
//! of it is applied. Otherwise every other key takes effect at once without
//! dropping queued or in-flight work: uploads in flight finish on the provider
//! they started with, later ones go to the new active provider, and a paused
//! provider is probed again immediately.

use crate::backoff::Backoff;
use crate::budget::{Budget, Pacer};
use crate::config::{self, Active, Config};
use crate::pipeline::{self, Command as PipelineCommand, Live, Options, Pipeline, Target};
use crate::state::{self, Lock, State};
use crate::status::{self, Report};
use crate::storage::Client;
use crate::watcher::{self, Candidate, Rules};
use crate::{control, http, logging, rebuild, systemd};
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long uploads in flight may take to finish after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// Why the daemon could not run; `main` turns it into one sentence and an exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("{0}")]
    Setup(String),
}

/// The configuration in force and what follows from it; replaced as a whole by
/// a reload.
pub struct Current {
    pub config: Config,
    pub target: Target,
    pub active: String,
    pub local_reason: Option<String>,
    /// Public URL base and prefix of the active provider, for `/r/` of paths
    /// without a record.
    pub predictable: Option<(String, String)>,
}

/// Shared read access to [`Current`].
pub type Shared = Arc<RwLock<Arc<Current>>>;

pub fn current(shared: &Shared) -> Arc<Current> {
    shared.read().expect("config lock").clone()
}

impl Current {
    fn new(config: Config) -> Current {
        let target = match config.active() {
            Active::Provider(p) => match Client::new(&p) {
                Ok(c) => Target::Provider(Arc::new(c)),
                Err(e) => Target::Local {
                    reason: e.to_string(),
                },
            },
            Active::Local { reason } => Target::Local { reason },
        };
        let (active, local_reason, predictable) = match &target {
            Target::Provider(c) => (
                c.provider.name.clone(),
                None,
                c.provider
                    .public_url_base
                    .clone()
                    .map(|base| (base, c.provider.prefix.clone())),
            ),
            Target::Local { reason } => ("local".to_string(), Some(reason.clone()), None),
        };
        Current {
            config,
            target,
            active,
            local_reason,
            predictable,
        }
    }

    fn rules(&self) -> Result<Rules, RunError> {
        let w = &self.config.watch;
        Rules::new(&w.root, &w.include, &w.exclude, w.settle)
            .map_err(|e| RunError::Setup(e.to_string()))
    }

    fn options(&self, mark_ns: i128) -> Options {
        let c = &self.config;
        let up = &c.upload;
        Options {
            root: c.watch.root.clone(),
            settle: c.watch.settle,
            delete_local: c.storage.delete_local,
            delete_after: c.storage.delete_after,
            workers: up.workers.max(1),
            upload: pipeline::upload_settings(
                up.multipart_threshold,
                up.part_size,
                up.part_concurrency,
            ),
            retry: Backoff::new(up.retry.initial_backoff, up.retry.max_backoff),
            mark_ns,
        }
    }

    fn resources(&self) -> (Budget, Pacer) {
        let up = &self.config.upload;
        (Budget::new(up.memory_limit), Pacer::new(up.bandwidth_limit))
    }

    /// The managed-since mark: set on the first run with an active provider.
    fn mark(&self) -> Result<i128, RunError> {
        let dir = &self.config.state_dir;
        match &self.target {
            Target::Provider(_) => state::mark::ensure(dir).map_err(|e| {
                RunError::Setup(format!(
                    "cannot write the managed-since mark in {}: {e}; make state_dir writable",
                    dir.display()
                ))
            }),
            Target::Local { reason } => {
                tracing::warn!("local mode: nothing is offloaded because {reason}");
                Ok(state::mark::read(dir).unwrap_or(i128::MAX))
            }
        }
    }
}

/// What the reload handler needs and keeps.
struct Reloader {
    shared: Shared,
    live: Arc<Live>,
    pipeline: mpsc::UnboundedSender<PipelineCommand>,
    candidates: mpsc::UnboundedSender<Candidate>,
    watcher: Option<watcher::Watcher>,
}

impl Reloader {
    fn start_watcher(&mut self, cur: &Current, mark_ns: i128) -> Result<(), RunError> {
        let w = watcher::start(
            cur.rules()?,
            cur.config.watch.rescan_interval,
            mark_ns,
            self.candidates.clone(),
            self.live.metrics.clone(),
        )
        .map_err(|e| {
            RunError::Setup(format!(
                "cannot watch {}: {e}; check that it exists and is readable",
                cur.config.watch.root.display()
            ))
        })?;
        self.watcher = Some(w);
        Ok(())
    }

    /// Re-reads the config; applies all of it or nothing.
    fn reload(&mut self) {
        systemd::reloading();
        let old = current(&self.shared);
        match self.try_reload(&old) {
            Ok(()) => tracing::info!(
                provider = %current(&self.shared).active,
                "configuration reloaded"
            ),
            Err(why) => tracing::error!(
                error = %why,
                "reload refused: {why}; the running configuration stays in force"
            ),
        }
        systemd::ready();
    }

    fn try_reload(&mut self, old: &Current) -> Result<(), String> {
        let file = &old.config.source;
        let loaded = config::load(file).map_err(|e| e.to_string())?;
        let new = loaded.config;
        for (key, changed) in [
            ("watch.root", new.watch.root != old.config.watch.root),
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
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        let cur = Current::new(new);
        let rules = cur.rules().map_err(|e| e.to_string())?;
        let mark_ns = cur.mark().map_err(|e| e.to_string())?;
        match (&self.watcher, &cur.target) {
            (Some(w), _) => w.reconfigure(rules, cur.config.watch.rescan_interval),
            (None, Target::Provider(_)) => self
                .start_watcher(&cur, mark_ns)
                .map_err(|e| e.to_string())?,
            (None, Target::Local { .. }) => {}
        }
        logging::set_level(&cur.config.log.level);
        let _ = self.pipeline.send(PipelineCommand::Reconfigure {
            opts: cur.options(mark_ns),
            target: cur.target.clone(),
            resources: cur.resources(),
        });
        *self.shared.write().expect("config lock") = Arc::new(cur);
        Ok(())
    }
}

pub async fn run(config: Config) -> Result<(), RunError> {
    let _lock = Lock::acquire(&config.state_dir)?;
    watcher::ignore_lease_signals();
    crate::budget::return_large_buffers_to_os();
    let (state, rebuilt) = State::open(&config.state_dir)?;
    if rebuilt {
        tracing::warn!("the state database was rebuilt; files already offloaded will be checked against the bucket as they are found");
    }
    for info in state.paused() {
        // A pause from the last run is probed again at once.
        let _ = state.set_paused(&info.provider, None);
    }

    let cur = Current::new(config);
    let mark_ns = cur.mark()?;
    let live = Arc::new(Live::default());
    let pipeline = Pipeline::new(
        cur.options(mark_ns),
        cur.target.clone(),
        state.clone(),
        cur.resources(),
        live.clone(),
    );
    let shared: Shared = Arc::new(RwLock::new(Arc::new(cur)));
    let cur = current(&shared);

    let (stop_tx, stop_rx) = watch::channel(false);
    let snapshot = tokio::spawn(publish_status(
        shared.clone(),
        state.clone(),
        live.clone(),
        stop_rx.clone(),
    ));
    if let (true, Target::Provider(client)) = (rebuilt, &cur.target) {
        let progress = Arc::new(rebuild::Progress::default());
        *live.rebuild.lock().expect("live lock") = Some(progress.clone());
        rebuild::run(client, &cur.config.watch.root, &state, &progress).await;
        *live.rebuild.lock().expect("live lock") = None;
    }
    if let Target::Provider(_) = cur.target {
        state.set_initialized().map_err(state::StateError::from)?;
    }

    let (cand_tx, cand_rx) = mpsc::unbounded_channel();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let mut reloader = Reloader {
        shared: shared.clone(),
        live: live.clone(),
        pipeline: cmd_tx.clone(),
        candidates: cand_tx,
        watcher: None,
    };
    if let Target::Provider(_) = cur.target {
        reloader.start_watcher(&cur, mark_ns)?;
    }

    if let Some(addr) = cur.config.http.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            RunError::Setup(format!(
                "cannot listen on {addr} (http.listen): {e}; pick a free address or set http.listen to \"\" to disable the listener"
            ))
        })?;
        let (sh, st) = (shared.clone(), state.clone());
        let app = http::App {
            metrics: live.metrics.clone(),
            resolve: Arc::new(move |rel: &str| {
                let c = current(&sh);
                status::public_url(&c.config, &st, c.predictable.as_ref(), rel)
            }),
        };
        tokio::spawn(http::serve(listener, app, stop_rx.clone()));
    }

    let control = control::Daemon {
        shared: shared.clone(),
        state: state.clone(),
        live: live.clone(),
        pipeline: cmd_tx,
    };
    let socket = cur.config.control_socket.clone();
    match control::bind(&socket) {
        Ok(listener) => {
            tokio::spawn(control::serve(listener, control, stop_rx.clone()));
        }
        Err(e) => tracing::warn!(
            socket = %socket.display(),
            error = %e,
            "cannot open the control socket; status, locate and retry must wait until offloadd stops (check control_socket and RuntimeDirectory=)"
        ),
    }

    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| RunError::Setup(format!("cannot install signal handlers: {e}")))?;
    let signal_task = tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            if sig == SIGHUP {
                reloader.reload();
                continue;
            }
            tracing::info!(signal = sig, "stopping: no new uploads start");
            systemd::stopping();
            let _ = stop_tx.send(true);
            break;
        }
        reloader
    });

    tracing::info!(
        root = %cur.config.watch.root.display(),
        provider = %cur.active,
        pid = std::process::id(),
        "offloadd started"
    );
    systemd::ready();
    let (progress, live_w) = (live.last_progress_ms.clone(), live.clone());
    let up = &cur.config.upload;
    let stall_after = 3 * crate::storage::request_timeout(up.multipart_threshold.max(up.part_size))
        .as_millis() as u64;
    systemd::spawn_watchdog(move || {
        live_w.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0
            && state::now_ms().saturating_sub(progress.load(std::sync::atomic::Ordering::Relaxed))
                > stall_after
    });
    pipeline.run(cand_rx, cmd_rx, stop_rx, STOP_GRACE).await;
    // Dropping the reloader stops the watcher.
    signal_task.abort();
    let _ = signal_task.await;
    let _ = snapshot.await;
    state
        .flush()
        .map_err(|e| RunError::Setup(format!("cannot flush the state on exit: {e}")))?;
    let _ = std::fs::remove_file(status::snapshot_path(&cur.config.state_dir));
    tracing::info!("offloadd stopped");
    Ok(())
}

async fn publish_status(
    shared: Shared,
    state: State,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let cur = current(&shared);
        let report = status::live(&state, &live, &cur.active, cur.local_reason.as_deref());
        systemd::status(&status_line(&report));
        if let Err(e) = status::write_snapshot(&cur.config.state_dir, &report) {
            tracing::debug!(error = %e, "cannot write the status snapshot");
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
    }
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
    if let Some(p) = r.paused.first() {
        s.push_str(&format!("; PAUSED: {}", p.reason));
    } else if let Some(e) = &r.last_error {
        s.push_str(&format!("; last error: {e}"));
    }
    s
}
