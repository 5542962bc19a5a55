//! `offloadd run`: opens the state, starts the watcher and the pipeline, publishes
//! status, and stops cleanly on SIGTERM/SIGINT (uploads in flight get up to 30 s;
//! the rest stays queued).

use crate::backoff::Backoff;
use crate::budget::{Budget, Pacer};
use crate::config::{Active, Config};
use crate::pipeline::{self, Live, Options, Pipeline, Target};
use crate::state::{self, Lock, State};
use crate::status::{self, Failed, Report};
use crate::storage::Client;
use crate::watcher::{self, Rules};
use crate::{http, rebuild, systemd};
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::atomic::Ordering;
use std::sync::Arc;
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

pub async fn run(config: Config) -> Result<(), RunError> {
    let _lock = Lock::acquire(&config.state_dir)?;
    watcher::ignore_lease_signals();
    crate::budget::return_large_buffers_to_os();
    let (state, rebuilt) = State::open(&config.state_dir)?;
    if rebuilt {
        tracing::warn!("the state database was rebuilt; files already offloaded will be checked against the bucket as they are found");
    }

    let target = match config.active() {
        Active::Provider(p) => match Client::new(&p) {
            Ok(c) => Target::Provider(Arc::new(c)),
            Err(e) => Target::Local {
                reason: e.to_string(),
            },
        },
        Active::Local { reason } => Target::Local { reason },
    };
    let (active_name, local_reason) = match &target {
        Target::Provider(c) => (c.provider.name.clone(), None),
        Target::Local { reason } => ("local".to_string(), Some(reason.clone())),
    };
    let mark_ns = match &target {
        Target::Provider(_) => state::mark::ensure(&config.state_dir).map_err(|e| {
            RunError::Setup(format!(
                "cannot write the managed-since mark in {}: {e}; make state_dir writable",
                config.state_dir.display()
            ))
        })?,
        Target::Local { reason } => {
            tracing::warn!("local mode: nothing is offloaded because {reason}");
            state::mark::read(&config.state_dir).unwrap_or(i128::MAX)
        }
    };

    let live = Arc::new(Live::default());
    for info in state.paused() {
        // A pause from the last run is probed again at once.
        let _ = state.set_paused(&info.provider, None);
    }
    let up = &config.upload;
    let opts = Options {
        root: config.watch.root.clone(),
        settle: config.watch.settle,
        delete_local: config.storage.delete_local,
        delete_after: config.storage.delete_after,
        workers: up.workers.max(1),
        upload: pipeline::upload_settings(
            up.multipart_threshold,
            up.part_size,
            up.part_concurrency,
        ),
        retry: Backoff::new(up.retry.initial_backoff, up.retry.max_backoff),
        mark_ns,
    };
    let resources = (Budget::new(up.memory_limit), Pacer::new(up.bandwidth_limit));
    let pipeline = Pipeline::new(opts, target.clone(), state.clone(), resources, live.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let snapshot = tokio::spawn(publish_status(
        config.clone(),
        state.clone(),
        live.clone(),
        active_name.clone(),
        local_reason,
        stop_rx.clone(),
    ));
    if let (true, Target::Provider(client)) = (rebuilt, &target) {
        let progress = Arc::new(rebuild::Progress::default());
        *live.rebuild.lock().expect("live lock") = Some(progress.clone());
        rebuild::run(client, &config.watch.root, &state, &progress).await;
        *live.rebuild.lock().expect("live lock") = None;
    }

    let (cand_tx, cand_rx) = mpsc::unbounded_channel();
    let watcher = match &target {
        Target::Provider(_) => {
            let rules = Rules::new(
                &config.watch.root,
                &config.watch.include,
                &config.watch.exclude,
                config.watch.settle,
            )
            .map_err(|e| RunError::Setup(e.to_string()))?;
            Some(
                watcher::start(rules, mark_ns, cand_tx.clone(), live.metrics.clone()).map_err(
                    |e| {
                        RunError::Setup(format!(
                            "cannot watch {}: {e}; check that it exists and is readable",
                            config.watch.root.display()
                        ))
                    },
                )?,
            )
        }
        Target::Local { .. } => None,
    };

    if let (Some(w), Some(every)) = (&watcher, config.watch.rescan_interval) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let rescan = w_rescan(w);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tick.tick() => rescan(),
                    _ = stop.changed() => break,
                }
            }
        });
    }

    if let Some(addr) = config.http.listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            RunError::Setup(format!(
                "cannot listen on {addr} (http.listen): {e}; pick a free address or set http.listen to \"\" to disable the listener"
            ))
        })?;
        let predictable = match &target {
            Target::Provider(c) => c
                .provider
                .public_url_base
                .clone()
                .map(|base| (base, c.provider.prefix.clone())),
            Target::Local { .. } => None,
        };
        let (cfg, st) = (config.clone(), state.clone());
        let app = http::App {
            metrics: live.metrics.clone(),
            resolve: Arc::new(move |rel: &str| {
                status::public_url(&cfg, &st, predictable.as_ref(), rel)
            }),
        };
        tokio::spawn(http::serve(listener, app, stop_rx.clone()));
    }

    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| RunError::Setup(format!("cannot install signal handlers: {e}")))?;
    let stopper = tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            if sig == SIGHUP {
                tracing::warn!("SIGHUP received: live reload is not supported yet; restart offloadd to apply a new config");
                continue;
            }
            tracing::info!(signal = sig, "stopping: no new uploads start");
            systemd::stopping();
            let _ = stop_tx.send(true);
            break;
        }
    });

    tracing::info!(
        root = %config.watch.root.display(),
        provider = %active_name,
        pid = std::process::id(),
        "offloadd started"
    );
    systemd::ready();
    systemd::spawn_watchdog();
    pipeline.run(cand_rx, stop_rx, STOP_GRACE).await;
    drop(watcher);
    stopper.abort();
    let _ = snapshot.await;
    state
        .flush()
        .map_err(|e| RunError::Setup(format!("cannot flush the state on exit: {e}")))?;
    let _ = std::fs::remove_file(status::snapshot_path(&config.state_dir));
    tracing::info!("offloadd stopped");
    Ok(())
}

fn w_rescan(w: &watcher::Watcher) -> impl Fn() + Send + 'static {
    let tx = w.rescan_handle();
    move || {
        let _ = tx.send(());
    }
}

async fn publish_status(
    config: Config,
    state: State,
    live: Arc<Live>,
    active: String,
    local_reason: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let (uploaded_count, uploaded_bytes) = state.uploaded();
        let report = Report {
            running: true,
            pid: Some(std::process::id()),
            active_provider: active.clone(),
            local_mode_reason: local_reason.clone(),
            queue_depth: live.queue_depth.load(Ordering::Relaxed),
            in_flight: live.in_flight.load(Ordering::Relaxed),
            paused: live
                .paused
                .lock()
                .expect("live lock")
                .iter()
                .cloned()
                .collect(),
            failed: live
                .failed
                .lock()
                .expect("live lock")
                .iter()
                .map(|(k, r)| Failed {
                    path: String::from_utf8_lossy(k).into_owned(),
                    reason: r.clone(),
                })
                .collect(),
            uploaded_count,
            uploaded_bytes,
            last_error: live.last_error.lock().expect("live lock").clone(),
            rebuilding: live.rebuild.lock().expect("live lock").as_ref().map(|p| {
                format!(
                    "{}/{}",
                    p.matched.load(Ordering::Relaxed),
                    p.listed.load(Ordering::Relaxed)
                )
            }),
            updated: state::rfc3339(state::now_ms()),
        };
        systemd::status(&status_line(&report));
        if let Err(e) = status::write_snapshot(&config.state_dir, &report) {
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
