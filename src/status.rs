//! `status` and `locate`: what the daemon is doing and where a file lives.
//!
//! While the daemon runs it holds the database, so it publishes a snapshot
//! (`status.json` in state_dir, refreshed every second) that `status` reads; when
//! it does not run, both commands open the state directly.

use crate::config::{Active, Config};
use crate::keys::{ObjectKey, PublicUrl, RelPath};
use crate::pipeline::Live;
use crate::state::{Lock, PausedInfo, Stage, State};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
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
    pub paused: Vec<PausedInfo>,
    pub failed: Vec<Failed>,
    pub uploaded_count: u64,
    pub uploaded_bytes: u64,
    pub last_error: Option<String>,
    /// "n/m" while location records are being rebuilt after state loss.
    pub rebuilding: Option<String>,
    pub updated: String,
}

pub fn snapshot_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// Writes the snapshot atomically (write, then rename).
pub fn write_snapshot(state_dir: &Path, report: &Report) -> std::io::Result<()> {
    let tmp = state_dir.join("status.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(report)?)?;
    std::fs::rename(tmp, snapshot_path(state_dir))
}

fn active_of(config: &Config) -> (String, Option<String>) {
    match config.active() {
        Active::Provider(p) => (p.name, None),
        Active::Local { reason } => ("local".into(), Some(reason)),
    }
}

/// The report of the running daemon, from its live figures.
pub fn live(state: &State, live: &Live, active: &str, local_reason: Option<&str>) -> Report {
    let (uploaded_count, uploaded_bytes) = state.uploaded();
    Report {
        running: true,
        pid: Some(std::process::id()),
        active_provider: active.to_string(),
        local_mode_reason: local_reason.map(str::to_string),
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
        updated: crate::state::rfc3339(crate::state::now_ms()),
    }
}

/// Builds the report, from the live daemon's snapshot or from the state itself.
pub fn report(config: &Config) -> anyhow::Result<Report> {
    if let Some(pid) = Lock::holder(&config.state_dir) {
        let bytes = std::fs::read(snapshot_path(&config.state_dir)).map_err(|e| {
            anyhow::anyhow!(
                "offloadd is running (pid {pid}) but its status snapshot in {} cannot be read: {e}; wait a second and retry",
                config.state_dir.display()
            )
        })?;
        let mut r: Report = serde_json::from_slice(&bytes)?;
        r.running = true;
        r.pid = Some(pid);
        return Ok(r);
    }
    let _lock = Lock::acquire(&config.state_dir)?;
    let (state, _) = State::open(&config.state_dir)?;
    let totals = state.totals();
    let failed = state
        .queue_items()
        .filter_map(|(k, item)| match item.stage {
            Stage::Parked { reason } => Some(Failed {
                path: String::from_utf8_lossy(&k).into_owned(),
                reason,
            }),
            _ => None,
        })
        .collect();
    let last_error = state.queue_items().filter_map(|(_, i)| i.last_error).last();
    let (active_provider, local_mode_reason) = active_of(config);
    Ok(Report {
        running: false,
        pid: None,
        active_provider,
        local_mode_reason,
        queue_depth: totals.queue_depth,
        in_flight: 0,
        paused: state.paused(),
        failed,
        uploaded_count: totals.uploaded_count,
        uploaded_bytes: totals.uploaded_bytes,
        last_error,
        rebuilding: None,
        updated: crate::state::rfc3339(crate::state::now_ms()),
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
    line(format!(
        "queued: {} (in flight: {})",
        r.queue_depth, r.in_flight
    ));
    line(format!(
        "uploaded: {} files, {} bytes",
        r.uploaded_count, r.uploaded_bytes
    ));
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
    if let Some(n) = &r.rebuilding {
        line(format!("rebuilding location records from the bucket: {n}"));
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
/// prefix), else nothing.
pub fn public_url(
    config: &Config,
    state: &State,
    predictable: Option<&(String, String)>,
    rel: &str,
) -> Option<String> {
    let rel = RelPath::parse(rel).ok()?;
    if let Some(rec) = state.record(rel.as_str().as_bytes()).ok().flatten() {
        let base = config.public_url_base(&rec.provider)?;
        return Some(PublicUrl::new(&base, &ObjectKey::from_raw(rec.key)).to_string());
    }
    let (base, prefix) = predictable?;
    let key = ObjectKey::new(prefix, &rel).ok()?;
    Some(PublicUrl::new(base, &key).to_string())
}

/// Answers `locate` from an open state.
pub fn locate_in(config: &Config, state: &State, rel: &str) -> anyhow::Result<Option<Location>> {
    let rel = RelPath::parse(rel)?;
    if let Some(rec) = state.record(rel.as_str().as_bytes())? {
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
