//! Finds new, finished files under the watch root and hands them on as
//! [`Candidate`]s.
//!
//! Rules (DESIGN.md "What counts as a new, finished file"):
//! - inotify events (via notify, which on Linux subscribes to create, write,
//!   close-after-write, attribute and move events only, so readers such as nginx
//!   cause no events at all) make a path a candidate;
//! - a path seen being written is finished only after it was closed after writing
//!   (or renamed into place) and then left untouched for `settle`; one still open
//!   for writing is never finished;
//! - a file found by a scan is finished once its size and mtime stay unchanged for
//!   `settle` (immediately if both are already older than that);
//! - directories are watched one by one as they are walked, so symlinked
//!   directories are never followed; a directory created or moved in is walked at
//!   once; an event-queue overflow triggers a full rescan;
//! - include/exclude globs apply to the path relative to the root.

use globset::{Glob, GlobSet, GlobSetBuilder};
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

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

/// Which paths under the root are eligible, by their path relative to the root.
#[derive(Clone)]
pub struct Rules {
    pub root: PathBuf,
    include: GlobSet,
    exclude: GlobSet,
    pub settle: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid glob `{glob}`: {message}; fix it in watch.include or watch.exclude")]
pub struct GlobError {
    glob: String,
    message: String,
}

fn globset(patterns: &[String]) -> Result<GlobSet, GlobError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob = globset::GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .or_else(|_| Glob::new(p))
            .map_err(|e| GlobError {
                glob: p.clone(),
                message: e.to_string(),
            })?;
        b.add(glob);
    }
    b.build().map_err(|e| GlobError {
        glob: patterns.join(", "),
        message: e.to_string(),
    })
}

impl Rules {
    pub fn new(
        root: &Path,
        include: &[String],
        exclude: &[String],
        settle: Duration,
    ) -> Result<Rules, GlobError> {
        Ok(Rules {
            root: root.to_path_buf(),
            include: globset(include)?,
            exclude: globset(exclude)?,
            settle,
        })
    }

    /// True if the file at `abs` (under the root) is included and not excluded.
    pub fn matches(&self, abs: &Path) -> bool {
        let Ok(rel) = abs.strip_prefix(&self.root) else {
            return false;
        };
        if rel.as_os_str().is_empty() {
            return false;
        }
        self.include.is_match(rel) && !self.exclude.is_match(rel)
    }

    /// True if a directory should be walked: excluded directories (e.g. `.cache`
    /// under `**/.*`) are skipped with everything in them.
    fn walks(&self, abs: &Path) -> bool {
        match abs.strip_prefix(&self.root) {
            Ok(rel) if rel.as_os_str().is_empty() => true,
            Ok(rel) => !self.exclude.is_match(rel),
            Err(_) => false,
        }
    }
}

fn changed_ns(meta: &std::fs::Metadata) -> i128 {
    crate::state::FileIdentity::of(meta).changed_ns()
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128
}

/// What the watcher knows about a path it has not handed on yet.
#[derive(Debug)]
struct Pending {
    /// Seen being created or written, and not closed after writing since.
    writing: bool,
    last_event: Instant,
    /// For scan-found paths: size and mtime at the last look, and when.
    scanned: Option<(u64, i128, Instant)>,
}

/// Messages into the watcher's processing loop.
enum Input {
    Fs(notify::Result<notify::Event>),
    Walked(Vec<(PathBuf, Option<(u64, i128)>)>),
    /// New include/exclude/settle rules and rescan interval (a reload).
    Reconfigure(Rules, Option<Duration>),
}

/// Handle to the running watcher; dropping it stops the watching.
pub struct Watcher {
    _notify: Arc<Mutex<notify::RecommendedWatcher>>,
    tx: mpsc::UnboundedSender<Input>,
}

impl Watcher {
    /// Applies reloaded rules and rescan interval; the root stays the same.
    pub fn reconfigure(&self, rules: Rules, rescan_interval: Option<Duration>) {
        let _ = self.tx.send(Input::Reconfigure(rules, rescan_interval));
    }
}

/// Starts watching. Finished candidates go to `out`. The initial walk (which adds
/// the watches) runs in the background and reports candidates newer than
/// `min_changed_ns` (the managed-since mark).
pub fn start(
    rules: Rules,
    rescan_interval: Option<Duration>,
    min_changed_ns: i128,
    out: mpsc::UnboundedSender<Candidate>,
    metrics: crate::metrics::Metrics,
) -> notify::Result<Watcher> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let fs_tx = tx.clone();
    let notify = notify::recommended_watcher(move |ev| {
        let _ = fs_tx.send(Input::Fs(ev));
    })?;
    let notify = Arc::new(Mutex::new(notify));

    let mut walker = Walker {
        rules: rules.clone(),
        notify: notify.clone(),
        watched: Arc::new(Mutex::new(HashSet::new())),
        min_changed_ns,
        tx: tx.clone(),
    };
    walker.spawn_walk(rules.root.clone(), "initial scan");

    let tick = (rules.settle / 4).clamp(Duration::from_millis(25), Duration::from_millis(500));
    let mut rescan_every = rescan_interval;
    let mut next_rescan = rescan_every.map(|d| Instant::now() + d);
    tokio::spawn(async move {
        let mut pending: HashMap<PathBuf, Pending> = HashMap::new();
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut root_gone = false;
        let mut last_root_check = Instant::now();
        loop {
            tokio::select! {
                input = rx.recv() => {
                    let Some(input) = input else { break };
                    match input {
                        Input::Fs(Ok(ev)) => {
                            if ev.need_rescan() {
                                tracing::warn!("the file-event queue overflowed; rescanning the tree");
                                metrics.rescan();
                                walker.spawn_walk(walker.rules.root.clone(), "rescan after event overflow");
                                continue;
                            }
                            if ev.paths.iter().any(|p| p == &walker.rules.root)
                                && matches!(ev.kind, EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)))
                            {
                                tracing::error!(root = %walker.rules.root.display(), "the watch root disappeared or was unmounted; keeping the queue and waiting for it to return");
                                root_gone = true;
                                continue;
                            }
                            on_event(&walker, &mut pending, ev);
                        }
                        Input::Fs(Err(e)) => {
                            tracing::warn!(error = %e, "file watching reported an error; rescanning");
                            walker.spawn_walk(walker.rules.root.clone(), "rescan after watch error");
                        }
                        Input::Reconfigure(rules, every) => {
                            walker.rules = rules;
                            if every != rescan_every {
                                rescan_every = every;
                                next_rescan = every.map(|d| Instant::now() + d);
                            }
                        }
                        Input::Walked(files) => {
                            let now = Instant::now();
                            for (abs, stat) in files {
                                if pending.get(&abs).is_some_and(|p| p.writing) {
                                    continue;
                                }
                                match stat {
                                    None if open_for_writing(&abs) != Some(true) => {
                                        let _ = out.send(Candidate { abs, trigger: Trigger::Scan });
                                    }
                                    None => {
                                        pending.entry(abs).or_insert(Pending {
                                            writing: false,
                                            last_event: now,
                                            scanned: None,
                                        });
                                    }
                                    Some((size, mtime)) => {
                                        pending.entry(abs).or_insert(Pending {
                                            writing: false,
                                            last_event: now,
                                            scanned: Some((size, mtime, now)),
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
                _ = ticker.tick() => {
                    if next_rescan.is_some_and(|t| Instant::now() >= t) {
                        next_rescan = rescan_every.map(|d| Instant::now() + d);
                        metrics.rescan();
                        walker.spawn_walk(walker.rules.root.clone(), "periodic rescan");
                    }
                    if root_gone && last_root_check.elapsed() >= Duration::from_secs(2) {
                        last_root_check = Instant::now();
                        if walker.rules.root.is_dir() {
                            tracing::info!(root = %walker.rules.root.display(), "the watch root is back; rescanning");
                            root_gone = false;
                            walker.watched.lock().expect("watched lock").clear();
                            walker.spawn_walk(walker.rules.root.clone(), "rescan after the root returned");
                        }
                    }
                    settle_due(&mut pending, walker.rules.settle, &out);
                }
            }
        }
    });

    Ok(Watcher {
        _notify: notify,
        tx,
    })
}

fn on_event(walker: &Walker, pending: &mut HashMap<PathBuf, Pending>, ev: notify::Event) {
    let now = Instant::now();
    let touch = |pending: &mut HashMap<PathBuf, Pending>, path: &Path, writing: Option<bool>| {
        if !walker.rules.matches(path) {
            return;
        }
        let p = pending.entry(path.to_path_buf()).or_insert(Pending {
            writing: false,
            last_event: now,
            scanned: None,
        });
        p.last_event = now;
        p.scanned = None;
        if let Some(w) = writing {
            p.writing = w;
        }
    };
    match ev.kind {
        EventKind::Create(CreateKind::Folder) => {
            for p in &ev.paths {
                walker.spawn_walk(p.clone(), "new directory");
            }
        }
        EventKind::Create(_) => {
            for p in &ev.paths {
                match std::fs::symlink_metadata(p) {
                    Ok(m) if m.is_dir() => walker.spawn_walk(p.clone(), "new directory"),
                    Ok(m) if m.file_type().is_symlink() => touch(pending, p, Some(false)),
                    _ => touch(pending, p, Some(true)),
                }
            }
        }
        EventKind::Modify(ModifyKind::Data(_)) | EventKind::Modify(ModifyKind::Any) => {
            for p in &ev.paths {
                touch(pending, p, Some(true));
            }
        }
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            for p in &ev.paths {
                touch(pending, p, Some(false));
            }
        }
        EventKind::Modify(ModifyKind::Metadata(_)) => {
            for p in &ev.paths {
                if let Some(e) = pending.get_mut(p) {
                    e.last_event = now;
                }
            }
        }
        EventKind::Modify(ModifyKind::Name(mode)) => {
            let (from, to): (Option<&PathBuf>, Option<&PathBuf>) = match mode {
                RenameMode::From => (ev.paths.first(), None),
                RenameMode::To => (None, ev.paths.first()),
                RenameMode::Both => (ev.paths.first(), ev.paths.get(1)),
                _ => (None, None),
            };
            if let Some(from) = from {
                pending.remove(from);
            }
            if let Some(to) = to {
                match std::fs::symlink_metadata(to) {
                    Ok(m) if m.is_dir() => walker.spawn_walk(to.clone(), "directory moved in"),
                    Ok(_) => touch(pending, to, Some(false)),
                    Err(_) => {}
                }
            }
        }
        EventKind::Remove(_) => {
            for p in &ev.paths {
                pending.remove(p);
            }
        }
        _ => {}
    }
}

/// Whether some process has `path` open for writing: `Some(true)` if so,
/// `Some(false)` if not, `None` if the kernel will not tell us.
///
/// Asks by trying to take a read lease, which the kernel refuses with EAGAIN while
/// the file is open for writing anywhere. Taking a lease needs the file's owner or
/// CAP_LEASE; without either the answer is `None` and the stat rule alone decides.
/// The lease is released at once; SIGIO (sent if a writer opens the file in that
/// instant) is ignored by the daemon.
pub fn open_for_writing(path: &Path) -> Option<bool> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    // SAFETY: fcntl on a valid, owned descriptor.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if rc == 0 {
        // SAFETY: as above.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// Ignores SIGIO, which a lease break would otherwise deliver with a fatal default.
pub fn ignore_lease_signals() {
    // SAFETY: installing SIG_IGN for SIGIO has no preconditions.
    unsafe {
        libc::signal(libc::SIGIO, libc::SIG_IGN);
    }
}

/// Hands on every pending path that has been quiet (and closed) for `settle`.
fn settle_due(
    pending: &mut HashMap<PathBuf, Pending>,
    settle: Duration,
    out: &mpsc::UnboundedSender<Candidate>,
) {
    let now = Instant::now();
    let mut done = Vec::new();
    for (path, p) in pending.iter_mut() {
        if p.writing || now.duration_since(p.last_event) < settle {
            continue;
        }
        match p.scanned {
            None => done.push((path.clone(), Trigger::Event)),
            Some((size, mtime, at)) => {
                if now.duration_since(at) < settle {
                    continue;
                }
                match std::fs::symlink_metadata(path) {
                    Ok(m) => {
                        let (s, t) = (m.len(), crate::state::FileIdentity::of(&m).mtime_ns);
                        if (s, t) == (size, mtime) {
                            done.push((path.clone(), Trigger::Scan));
                        } else {
                            p.scanned = Some((s, t, now));
                        }
                    }
                    Err(_) => done.push((path.clone(), Trigger::Scan)),
                }
            }
        }
    }
    for (path, trigger) in done {
        if open_for_writing(&path) == Some(true) {
            if let Some(p) = pending.get_mut(&path) {
                p.last_event = now;
                p.scanned = None;
            }
            continue;
        }
        pending.remove(&path);
        let _ = out.send(Candidate { abs: path, trigger });
    }
}

/// Walks directories (adding a watch to each) on a blocking thread.
#[derive(Clone)]
struct Walker {
    rules: Rules,
    notify: Arc<Mutex<notify::RecommendedWatcher>>,
    watched: Arc<Mutex<HashSet<PathBuf>>>,
    min_changed_ns: i128,
    tx: mpsc::UnboundedSender<Input>,
}

const WALK_BATCH: usize = 512;

impl Walker {
    fn spawn_walk(&self, dir: PathBuf, why: &'static str) {
        let w = self.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let n = w.walk(&dir);
            if why != "new directory" && why != "directory moved in" {
                tracing::info!(dir = %dir.display(), files = n, elapsed_ms = started.elapsed().as_millis() as u64, "{why} done");
            }
        });
    }

    /// Returns the number of candidate files found.
    fn walk(&self, dir: &Path) -> usize {
        let settle_ns = self.rules.settle.as_nanos() as i128;
        let mut batch = Vec::new();
        let mut found = 0;
        let it = walkdir::WalkDir::new(dir)
            .follow_links(false)
            .into_iter()
            .filter_entry(|e| !e.file_type().is_dir() || self.rules.walks(e.path()));
        for entry in it {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read part of the tree; skipping it");
                    continue;
                }
            };
            let ft = entry.file_type();
            if ft.is_dir() {
                self.watch_dir(entry.path());
                continue;
            }
            if !(ft.is_file() || ft.is_symlink()) || !self.rules.matches(entry.path()) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if changed_ns(&meta) < self.min_changed_ns {
                continue;
            }
            let quiet = now_ns() - changed_ns(&meta) >= settle_ns;
            let stat = if quiet || ft.is_symlink() {
                None
            } else {
                Some((meta.len(), crate::state::FileIdentity::of(&meta).mtime_ns))
            };
            batch.push((entry.into_path(), stat));
            found += 1;
            if batch.len() >= WALK_BATCH {
                let _ = self.tx.send(Input::Walked(std::mem::take(&mut batch)));
            }
        }
        if !batch.is_empty() {
            let _ = self.tx.send(Input::Walked(batch));
        }
        found
    }

    fn watch_dir(&self, dir: &Path) {
        if !self
            .watched
            .lock()
            .expect("watched lock")
            .insert(dir.to_path_buf())
        {
            return;
        }
        if let Err(e) = self
            .notify
            .lock()
            .expect("notify lock")
            .watch(dir, RecursiveMode::NonRecursive)
        {
            self.watched.lock().expect("watched lock").remove(dir);
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; its files are found by rescans only (raise fs.inotify.max_user_watches if the limit is reached)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::new(
            Path::new("/r"),
            &["**".into()],
            &[
                "**/.*".into(),
                "**/*.tmp".into(),
                "**/*.part".into(),
                "**/*~".into(),
            ],
            Duration::from_secs(2),
        )
        .unwrap()
    }

    #[test]
    fn default_excludes() {
        let r = rules();
        assert!(r.matches(Path::new("/r/a.png")));
        assert!(r.matches(Path::new("/r/x/y/z.mp4")));
        assert!(!r.matches(Path::new("/r/.hidden")));
        assert!(!r.matches(Path::new("/r/x/.hidden")));
        assert!(!r.matches(Path::new("/r/a.tmp")));
        assert!(!r.matches(Path::new("/r/x/b.part")));
        assert!(!r.matches(Path::new("/r/c~")));
        assert!(!r.matches(Path::new("/other/a.png")));
        assert!(!r.walks(Path::new("/r/.cache")));
        assert!(r.walks(Path::new("/r/images")));
    }

    #[test]
    fn include_narrows() {
        let r = Rules::new(Path::new("/r"), &["images/**".into()], &[], Duration::ZERO).unwrap();
        assert!(r.matches(Path::new("/r/images/a/b.png")));
        assert!(!r.matches(Path::new("/r/videos/a.mp4")));
    }

    #[test]
    fn lease_probe_sees_a_writer() {
        ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let w = std::fs::File::create(&p).unwrap();
        assert_eq!(open_for_writing(&p), Some(true));
        drop(w);
        assert_eq!(open_for_writing(&p), Some(false));
    }

    #[test]
    fn settle_waits_for_close_and_quiet() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut pending = HashMap::new();
        let old = Instant::now() - Duration::from_secs(10);
        pending.insert(
            PathBuf::from("/r/open"),
            Pending {
                writing: true,
                last_event: old,
                scanned: None,
            },
        );
        pending.insert(
            PathBuf::from("/r/closed"),
            Pending {
                writing: false,
                last_event: old,
                scanned: None,
            },
        );
        pending.insert(
            PathBuf::from("/r/recent"),
            Pending {
                writing: false,
                last_event: Instant::now(),
                scanned: None,
            },
        );
        settle_due(&mut pending, Duration::from_secs(2), &tx);
        let c = rx.try_recv().unwrap();
        assert_eq!(c.abs, PathBuf::from("/r/closed"));
        assert!(rx.try_recv().is_err());
        assert!(pending.contains_key(Path::new("/r/open")));
        assert!(pending.contains_key(Path::new("/r/recent")));
    }
}
