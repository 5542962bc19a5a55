//! `status` and `locate`: what the daemon is doing and where a file lives.
//!
//! While the daemon runs it answers `status` over the control socket from its
//! live figures; only when it could not bind the socket does it write a
//! snapshot (`status.json` in state_dir, mode 0640) for `status` to read. When
//! it does not run, both commands open the state directly.

use crate::config::{Active, Config};
use crate::keys::{ItemKey, ObjectKey, PublicUrl, RelPath};
use crate::pipeline::live::Live;
use crate::pipeline::queue::{PausedInfo, Queue, Stage, StateError};
use crate::settings::Settings;
use crate::statedir::{self, Holder, Lock};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// One item that will not be uploaded without an operator, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failed {
    pub path: String,
    pub reason: String,
}

/// Everything `status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub running: bool,
    pub pid: Option<u32>,
    pub active_provider: String,
    pub local_mode_reason: Option<String>,
    pub queue_depth: u64,
    pub in_flight: u64,
    /// Why nothing leaves the queue (the root or the state_dir is unavailable).
    #[serde(default)]
    pub pipeline_paused: Option<String>,
    pub paused: Vec<PausedInfo>,
    pub failed: Vec<Failed>,
    pub uploaded_count: u64,
    pub uploaded_bytes: u64,
    pub last_error: Option<String>,
    /// "n/m" while location records are being rebuilt after state loss.
    pub rebuilding: Option<String>,
    /// Files seen being written whose writer has not closed them yet, and
    /// some of their paths.
    #[serde(default)]
    pub waiting_for_writer: u64,
    #[serde(default)]
    pub waiting_for_writer_sample: Vec<String>,
    /// One-time notices, e.g. old files moved in that wait for `backfill`.
    #[serde(default)]
    pub notices: Vec<String>,
    /// The upload bandwidth limit in force (`unlimited`, `10 MiB/s`, with
    /// `(bandwidth_schedule)` when the weekly schedule sets it).
    #[serde(default)]
    pub bandwidth_limit: String,
    pub updated: String,
}

fn active_of(config: &Config) -> (String, Option<String>) {
    match config.active() {
        Active::Provider(p) => (p.name, None),
        Active::Local { reason } => ("local".into(), Some(reason)),
    }
}

/// The report of the running daemon, from its live figures.
pub fn live(queue: &Queue, live: &Live, settings: &Settings) -> Report {
    let (uploaded_count, uploaded_bytes) = queue.uploaded();
    let (queue_depth, in_flight) = live.depth();
    let shown = live.shown();
    Report {
        running: true,
        pid: Some(std::process::id()),
        active_provider: settings.active().to_string(),
        local_mode_reason: settings.local_reason.clone(),
        queue_depth,
        in_flight,
        pipeline_paused: shown.pipeline_paused,
        paused: shown.paused.into_iter().collect(),
        failed: shown
            .failed
            .iter()
            .map(|(k, r)| Failed {
                path: k.to_string(),
                reason: r.clone(),
            })
            .collect(),
        uploaded_count,
        uploaded_bytes,
        last_error: shown.last_error,
        rebuilding: shown.rebuild.as_ref().map(|p| {
            format!(
                "{}/{}",
                p.checked.load(Ordering::Relaxed),
                p.listed.load(Ordering::Relaxed)
            )
        }),
        waiting_for_writer: shown.writers_waiting,
        waiting_for_writer_sample: shown.writers_sample,
        notices: shown.notices,
        bandwidth_limit: shown.bandwidth,
        updated: statedir::rfc3339(statedir::now_ms()),
    }
}

/// The report when no daemon answers on the socket: from the snapshot of a
/// daemon that could not bind its socket, or from the state itself.
pub fn report(config: &Config) -> anyhow::Result<Report> {
    if let Some(pid) = Lock::holder(&config.state_dir) {
        let bytes = std::fs::read(statedir::snapshot_path(&config.state_dir)).map_err(|e| {
            anyhow::anyhow!(
                "offloadd is running (pid {pid}) but does not answer on its control socket {} and wrote no status snapshot ({e}); check control_socket and RuntimeDirectory=, or wait a second and retry",
                config.control_socket.display()
            )
        })?;
        let mut r: Report = serde_json::from_slice(&bytes)?;
        r.running = true;
        r.pid = Some(pid);
        return Ok(r);
    }
    let command = |e: StateError| anyhow::anyhow!(e.for_command());
    let _lock = Lock::acquire(&config.state_dir, Holder::Command).map_err(command)?;
    let (queue, _) = Queue::open(&config.state_dir).map_err(command)?;
    let totals = queue.totals()?;
    let items = queue.items()?;
    let failed = items
        .iter()
        .filter_map(|(k, item)| match &item.stage {
            Stage::Parked { reason } => Some(Failed {
                path: k.to_string(),
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect();
    let last_error = items.iter().rev().find_map(|(_, i)| i.last_error.clone());
    let (active_provider, local_mode_reason) = active_of(config);
    Ok(Report {
        running: false,
        pid: None,
        active_provider,
        local_mode_reason,
        queue_depth: totals.queue_depth,
        in_flight: 0,
        pipeline_paused: None,
        paused: queue.paused(),
        failed,
        uploaded_count: totals.uploaded_count,
        uploaded_bytes: totals.uploaded_bytes,
        last_error,
        rebuilding: None,
        waiting_for_writer: 0,
        waiting_for_writer_sample: Vec::new(),
        notices: Vec::new(),
        bandwidth_limit: String::new(),
        updated: statedir::rfc3339(statedir::now_ms()),
    })
}

/// The human-readable form of a report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    match r.pid {
        Some(pid) => line(format!("offloadd is running (pid {pid})")),
        None => line("offloadd is not running".into()),
    }
    match &r.local_mode_reason {
        Some(reason) => line(format!("local mode: nothing is offloaded because {reason}")),
        None => line(format!("active provider: {}", r.active_provider)),
    }
    if let Some(why) = &r.pipeline_paused {
        line(format!("PAUSED: {why}"));
    }
    line(format!(
        "queued: {} (in flight: {})",
        r.queue_depth, r.in_flight
    ));
    line(format!(
        "uploaded: {} files, {} bytes",
        r.uploaded_count, r.uploaded_bytes
    ));
    if !r.bandwidth_limit.is_empty() {
        line(format!("bandwidth limit: {}", r.bandwidth_limit));
    }
    for p in &r.paused {
        line(format!(
            "PAUSED provider {} since {}: {}",
            p.provider, p.since, p.reason
        ));
    }
    if !r.failed.is_empty() {
        line(format!("failed: {}", r.failed.len()));
        for f in &r.failed {
            line(format!("  {}: {}", f.path, f.reason));
        }
    }
    if r.waiting_for_writer > 0 {
        line(format!(
            "waiting for a writer to close: {} file(s)",
            r.waiting_for_writer
        ));
        for p in &r.waiting_for_writer_sample {
            line(format!("  {p}"));
        }
    }
    for n in &r.notices {
        line(format!("note: {n}"));
    }
    if let Some(n) = &r.rebuilding {
        line(format!(
            "rebuilding {n}: location records from the bucket listing"
        ));
    }
    if let Some(e) = &r.last_error {
        line(format!("last error: {e}"));
    }
    out
}

/// Where a file lives: its public URL if offloaded, else its local path.
pub enum Location {
    Remote(String),
    /// Offloaded, but its provider has no public URL: the bucket and key.
    RemoteKey {
        provider: String,
        key: String,
    },
    Local(PathBuf),
}

/// Where `/r/` redirects: the recorded object's public URL, else the URL the
/// active provider would give the path (`predictable`: its public URL base and
/// prefix), else nothing. A state that cannot be read is an error, never
/// "no record": the guess would miss files recorded on another provider or
/// under an old prefix.
pub fn public_url(
    config: &Config,
    queue: &Queue,
    predictable: Option<&(String, String)>,
    rel: &str,
) -> Result<Option<String>, StateError> {
    let Ok(rel) = RelPath::parse(rel) else {
        return Ok(None);
    };
    if let Some(rec) = queue.record(&ItemKey::from_rel(&rel))? {
        return Ok(config
            .public_url_base(&rec.provider)
            .map(|base| PublicUrl::new(&base, &ObjectKey::from_raw(rec.key)).to_string()));
    }
    Ok(predictable.and_then(|(base, prefix)| {
        let key = ObjectKey::new(prefix, &rel).ok()?;
        Some(PublicUrl::new(base, &key).to_string())
    }))
}

/// Answers `locate` from an open state.
pub fn locate_in(
    config: &Config,
    queue: &Queue,
    rel: &RelPath,
) -> Result<Option<Location>, StateError> {
    if let Some(rec) = queue.record(&ItemKey::from_rel(rel))? {
        let key = ObjectKey::from_raw(rec.key.clone());
        let url = config
            .public_url_base(&rec.provider)
            .map(|base| PublicUrl::new(&base, &key));
        return Ok(Some(match url {
            Some(u) => Location::Remote(u.to_string()),
            None => Location::RemoteKey {
                provider: rec.provider,
                key: rec.key,
            },
        }));
    }
    let local = rel.to_local(&config.watch.root);
    Ok(std::fs::symlink_metadata(&local)
        .is_ok_and(|m| m.is_file())
        .then_some(Location::Local(local)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state that cannot be read is not "no record": `/r/` used to guess
    /// the active provider's URL, which misses files recorded elsewhere.
    #[test]
    fn public_url_of_an_unreadable_state_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::in_temp_dir(dir.path());
        let (queue, _) = Queue::open(&config.state_dir).unwrap();
        let guess = ("https://cdn.test".to_string(), "p".to_string());
        let url = public_url(&config, &queue, Some(&guess), "a.png").unwrap();
        assert!(url.is_some_and(|u| u.ends_with("/p/a.png")));

        queue.inject_closed("No space left on device");
        assert!(public_url(&config, &queue, Some(&guess), "a.png").is_err());
    }
}
