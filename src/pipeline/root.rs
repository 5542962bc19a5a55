//! The watch root's presence: is the directory offloadd manages still there,
//! and still the same filesystem and inode?
//!
//! Owns the root's expected identity (filesystem UUID or id, and inode, kept
//! in `state_dir/root-id` across runs; plus the device within a run). A root
//! that is missing, unmounted or replaced pauses the whole pipeline: the
//! scheduler dispatches nothing, and the queue drops an item as "vanished" or
//! marks a record "local deleted" only with a [`RootPresent`] proof taken
//! after the file was found missing. [`RootGuard::run`] polls once a second
//! and publishes changes, so the watcher re-establishes its watches and
//! rescans when the root comes back.
//!
//! Every look at the root (stat, statvfs, open) runs on a thread of its own,
//! one look at a time ([`RootSightings`]), never on the async runtime: a root
//! on a hung mount blocks that thread only. A look that does not return
//! within [`ANSWER_WITHIN`] makes the root unavailable ("does not answer"),
//! which pauses uploads and deletes like any other absence, until it returns.

use crate::shutdown::Shutdown;
use crate::statedir::root_id::{self, RootId};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Proof that the root was present and the same when it was checked; only
/// [`RootGuard::check`] makes one.
#[derive(Debug)]
pub struct RootPresent(());

/// What the watcher and `status` see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootStatus {
    Present,
    /// Why the pipeline is paused.
    Unavailable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    dev: u64,
    id: RootId,
}

fn look(path: &Path) -> std::io::Result<Seen> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("it is not a directory"));
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("the path holds a NUL byte"))?;
    // SAFETY: statvfs writes into the zeroed struct we pass; `c` is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Seen {
        dev: meta.dev(),
        id: RootId {
            fsid: s.f_fsid as u64,
            uuid: std::fs::File::open(path).ok().and_then(|dir| fs_uuid(&dir)),
            ino: meta.ino(),
        },
    })
}

/// The filesystem's UUID (`FS_IOC_GETFSUUID`, Linux 6.10+); `None` where the
/// kernel or the filesystem has none, or it is all zeros.
fn fs_uuid(dir: &std::fs::File) -> Option<[u8; 16]> {
    use std::os::fd::AsRawFd;
    /// `struct fsuuid2` of `linux/fs.h`.
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    /// `_IOR(0x15, 0, struct fsuuid2)`.
    const FS_IOC_GETFSUUID: libc::c_ulong =
        (2 << 30) | ((std::mem::size_of::<FsUuid2>() as libc::c_ulong) << 16) | (0x15 << 8);
    let mut out = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // SAFETY: the kernel writes at most `size_of::<FsUuid2>()` bytes into `out`.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FS_IOC_GETFSUUID as _, &mut out) };
    let len = usize::from(out.len);
    (rc == 0 && len > 0 && len <= 16 && out.uuid[..len].iter().any(|b| *b != 0)).then(|| {
        let mut uuid = [0u8; 16];
        uuid[..len].copy_from_slice(&out.uuid[..len]);
        uuid
    })
}

/// Which directory of which filesystem is at `path` now, as the guard
/// compares them ([`RootId::is`]); `None` if it is not there.
pub fn identity(path: &Path) -> Option<RootId> {
    look(path).ok().map(|s| s.id)
}

/// How long a look at the root may take: a root that does not answer within
/// this (a hung NFS hard mount, a hung FUSE daemon) counts as unavailable.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How the root is looked at; a test puts one that hangs in its place.
type Look = Arc<dyn Fn(&Path) -> std::io::Result<Seen> + Send + Sync>;

/// Runs `f` on a thread of its own and waits at most `limit` for it: `None`
/// if it has not returned by then (the thread is left to finish, or hang,
/// alone). For the few looks at the root made outside the looker thread.
pub fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("offloadd-root".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.recv_timeout(limit).ok()
}

/// The sentence for a root that does not answer.
pub fn does_not_answer(root: &Path) -> String {
    format!(
        "the watch root {} does not answer (a hung network mount?); uploads and deletes pause until it does",
        root.display()
    )
}

/// One finished look at the root.
#[derive(Debug, Clone)]
struct Sighting {
    /// The look's number: looks are numbered as they begin, from 1 (0 is
    /// the look made before the looker thread started).
    seq: u64,
    seen: Result<Seen, String>,
}

/// The looks at the root, made one at a time off the async runtime (in
/// `spawn_blocking`), so that a root that hangs blocks that one blocking
/// thread and never the runtime's workers. Cloned by whoever needs the
/// root's identity (the watcher).
#[derive(Clone)]
pub struct RootSightings {
    inner: Arc<Looker>,
    done: watch::Receiver<Sighting>,
}

struct Looker {
    path: PathBuf,
    look: Look,
    /// Looks begun so far.
    started: AtomicU64,
    asked: Mutex<Asked>,
    done: watch::Sender<Sighting>,
}

#[derive(Default)]
struct Asked {
    /// A look runs (or is about to).
    looking: bool,
    /// Asked for while one ran: another look follows it.
    again: bool,
}

impl Looker {
    /// Looks until no look is asked for; at most one runs at a time.
    fn looks(&self) {
        loop {
            let seq = self.started.fetch_add(1, Ordering::SeqCst) + 1;
            let seen = (self.look)(&self.path).map_err(|e| e.to_string());
            self.done.send_replace(Sighting { seq, seen });
            let mut asked = self.asked.lock().expect("root looks lock");
            if !std::mem::take(&mut asked.again) {
                asked.looking = false;
                return;
            }
        }
    }
}

impl RootSightings {
    fn start(path: PathBuf, look: Look, first: Sighting) -> RootSightings {
        let (done_tx, done) = watch::channel(first);
        RootSightings {
            inner: Arc::new(Looker {
                path,
                look,
                started: AtomicU64::new(0),
                asked: Mutex::new(Asked::default()),
                done: done_tx,
            }),
            done,
        }
    }

    /// The looks at `path` (the watcher's tests).
    #[cfg(test)]
    pub fn of(path: &Path) -> RootSightings {
        let seen = look(path).map_err(|e| e.to_string());
        RootSightings::start(
            path.to_path_buf(),
            Arc::new(look),
            Sighting { seq: 0, seen },
        )
    }

    /// Asks for a look, begun after this call; asks made while one runs
    /// make one more look after it.
    pub fn ask(&self) {
        {
            let mut asked = self.inner.asked.lock().expect("root looks lock");
            if asked.looking {
                asked.again = true;
                return;
            }
            asked.looking = true;
        }
        let looker = self.inner.clone();
        let looks = move || looker.looks();
        // A blocking task (which a paused test clock waits for), or a
        // thread outside a runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(looks)),
            Err(_) => drop(std::thread::spawn(looks)),
        }
    }

    /// A mark of now: looks that [`RootSightings::since`] answers with began
    /// after it.
    pub fn mark(&self) -> u64 {
        self.inner.started.load(Ordering::SeqCst)
    }

    /// The identity the latest finished look saw (`Some(None)`: no root
    /// there), if that look began after `mark`; `None` if none has yet.
    pub fn since(&self, mark: u64) -> Option<Option<RootId>> {
        let s = self.done.borrow();
        (s.seq > mark).then(|| s.seen.as_ref().ok().map(|seen| seen.id))
    }

    /// The identity the latest finished look saw, however old.
    pub fn latest(&self) -> Option<RootId> {
        self.done.borrow().seen.as_ref().ok().map(|seen| seen.id)
    }

    /// Whether a look has begun and not returned.
    fn looking(&self) -> bool {
        self.mark() > self.done.borrow().seq
    }

    /// A look begun after `mark`, once it returns; `None` if none returns
    /// within `limit`.
    async fn after(&self, mark: u64, limit: Duration) -> Option<Result<Seen, String>> {
        let mut done = self.done.clone();
        let wait = async move {
            done.wait_for(|s| s.seq > mark)
                .await
                .ok()
                .map(|s| s.seen.clone())
        };
        tokio::time::timeout(limit, wait).await.ok().flatten()
    }
}

/// See the module docs.
pub struct RootGuard {
    path: PathBuf,
    state_dir: PathBuf,
    /// The filesystem and inode the root must have.
    expected: RootId,
    /// The device seen while the root was present in this run.
    dev: Mutex<Option<u64>>,
    status: watch::Sender<RootStatus>,
    sightings: RootSightings,
    /// A look did not return within `answer_within`: until it does, checks
    /// fail at once instead of waiting behind it.
    hung: AtomicBool,
    /// [`ANSWER_WITHIN`], shorter in tests.
    answer_within: Duration,
}

impl RootGuard {
    /// Takes the root's identity from `state_dir/root-id` when it was written
    /// for this same path, else from the root as it is now (and writes it).
    /// A stored identity that the root still matches is brought up to date
    /// (a UUID it lacked, an `f_fsid` a new device number changed).
    ///
    /// A root that does not answer within [`ANSWER_WITHIN`] starts the guard
    /// paused when its identity is stored, and is an error (kind
    /// `TimedOut`, one sentence) when it is not.
    pub fn new(path: &Path, state_dir: &Path) -> std::io::Result<RootGuard> {
        RootGuard::with_look(path, state_dir, Arc::new(look), ANSWER_WITHIN)
    }

    fn with_look(
        path: &Path,
        state_dir: &Path,
        look: Look,
        answer_within: Duration,
    ) -> std::io::Result<RootGuard> {
        let first = {
            let (path, look) = (path.to_path_buf(), look.clone());
            within(answer_within, move || {
                look(&path).map_err(|e| e.to_string())
            })
        };
        let now = first
            .as_ref()
            .and_then(|seen| seen.as_ref().ok().map(|s| s.id));
        let stored = root_id::read(state_dir).filter(|s| s.path == path);
        let expected = match (stored, now) {
            (Some(s), Some(seen)) if s.id.is(&seen) => {
                let current = RootId {
                    uuid: seen.uuid.or(s.id.uuid),
                    ..seen
                };
                if current != s.id {
                    if let Err(e) = root_id::write(state_dir, path, &current) {
                        tracing::warn!(
                            file = %root_id::path(state_dir).display(),
                            error = %e,
                            "could not bring the watch root's stored identity up to date; the next start reads the old one"
                        );
                    }
                }
                current
            }
            (Some(s), _) => s.id,
            (None, Some(seen)) => {
                root_id::write(state_dir, path, &seen)?;
                seen
            }
            (None, None) if first.is_none() => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the watch root {} does not answer within {} s (a hung network mount?); offloadd cannot start until it does",
                        path.display(),
                        answer_within.as_secs()
                    ),
                ))
            }
            (None, None) => {
                return Err(std::io::Error::other(format!(
                    "the watch root {} cannot be inspected",
                    path.display()
                )))
            }
        };
        let seen = first.clone().unwrap_or_else(|| Err(does_not_answer(path)));
        let sightings = RootSightings::start(path.to_path_buf(), look, Sighting { seq: 0, seen });
        let guard = RootGuard {
            path: path.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            expected,
            dev: Mutex::new(None),
            status: watch::channel(RootStatus::Present).0,
            sightings,
            hung: AtomicBool::new(false),
            answer_within,
        };
        let _ = match first {
            Some(seen) => guard.judge(seen),
            None => guard.publish(Err(does_not_answer(path))),
        };
        Ok(guard)
    }

    /// The root's path, as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The looks at the root, for the watcher.
    pub fn sightings(&self) -> RootSightings {
        self.sightings.clone()
    }

    /// Checks the root now, with a look begun after this call, off the
    /// async runtime; publishes (and logs) a change. A root that does not
    /// answer within [`ANSWER_WITHIN`] is unavailable, and so is every check
    /// until that look returns.
    pub async fn check(&self) -> Result<RootPresent, String> {
        let mark = self.sightings.mark();
        if self.hung.load(Ordering::SeqCst) && self.sightings.looking() {
            return self.publish(Err(does_not_answer(&self.path)));
        }
        self.sightings.ask();
        match self.sightings.after(mark, self.answer_within).await {
            Some(seen) => {
                self.hung.store(false, Ordering::SeqCst);
                self.judge(seen)
            }
            None => {
                self.hung.store(true, Ordering::SeqCst);
                self.publish(Err(does_not_answer(&self.path)))
            }
        }
    }

    /// The verdict on what a look saw; published.
    fn judge(&self, seen: Result<Seen, String>) -> Result<RootPresent, String> {
        let verdict = match seen {
            Err(e) => Err(format!(
                "the watch root {} is not available ({e}); offloadd pauses until it is back (mount it, or check RequiresMountsFor=)",
                self.path.display()
            )),
            Ok(seen) => {
                let mut dev = self.dev.lock().expect("root lock");
                if !self.expected.is(&seen.id) || dev.is_some_and(|d| d != seen.dev) {
                    Err(format!(
                        "the watch root {} is not the directory offloadd manages: it was unmounted or replaced by another filesystem; offloadd pauses until it is back (if it was replaced on purpose, remove {} and restart offloadd)",
                        self.path.display(),
                        root_id::path(&self.state_dir).display()
                    ))
                } else {
                    *dev = Some(seen.dev);
                    Ok(())
                }
            }
        };
        self.publish(verdict)
    }

    /// Publishes (and logs) a verdict that changes the status.
    fn publish(&self, verdict: Result<(), String>) -> Result<RootPresent, String> {
        let status = match &verdict {
            Ok(()) => RootStatus::Present,
            Err(why) => RootStatus::Unavailable(why.clone()),
        };
        self.status.send_if_modified(|old| {
            if *old == status {
                return false;
            }
            match &status {
                RootStatus::Present => tracing::info!(
                    root = %self.path.display(),
                    "the watch root is back; the pipeline resumes and the tree is rescanned"
                ),
                RootStatus::Unavailable(why) => tracing::error!(
                    root = %self.path.display(),
                    error = %why,
                    "{why}"
                ),
            }
            *old = status.clone();
            true
        });
        verdict.map(|()| RootPresent(()))
    }

    /// The last published status.
    pub fn status(&self) -> RootStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<RootStatus> {
        self.status.subscribe()
    }

    /// Checks the root once a second until shutdown.
    pub async fn run(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.recv() => return,
            }
            tokio::select! {
                _ = self.check() => {}
                _ = shutdown.recv() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replaced_root_is_refused_until_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g.check().await.is_ok());
        // Replaced by another directory of the same name.
        std::fs::rename(&root, dir.path().join("away")).unwrap();
        let e = g.check().await.unwrap_err();
        assert!(e.contains("is not available"), "{e}");
        std::fs::create_dir_all(&root).unwrap();
        let e = g.check().await.unwrap_err();
        assert!(e.contains("unmounted or replaced"), "{e}");
        assert!(matches!(g.status(), RootStatus::Unavailable(_)));
        std::fs::remove_dir(&root).unwrap();
        std::fs::rename(dir.path().join("away"), &root).unwrap();
        assert!(g.check().await.is_ok());
        assert_eq!(g.status(), RootStatus::Present);

        // A new run remembers the root it managed.
        std::fs::rename(&root, dir.path().join("away")).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let g2 = RootGuard::new(&root, &state).unwrap();
        assert!(
            g2.check().await.is_err(),
            "a different root at start is refused"
        );
    }

    /// A root on a filesystem with a UUID (tmpfs has one since Linux 6.10);
    /// `None`, or a failure under CI, where this kernel gives none.
    fn root_with_uuid() -> Option<(tempfile::TempDir, PathBuf, PathBuf, RootId)> {
        let dir = tempfile::tempdir_in("/dev/shm").ok()?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let id = identity(&root).unwrap();
        if id.uuid.is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "this kernel gives /dev/shm no filesystem UUID (FS_IOC_GETFSUUID, Linux 6.10+)"
            );
            eprintln!("skipped: no filesystem UUID on /dev/shm");
            return None;
        }
        Some((dir, root, state, id))
    }

    /// XFS and f2fs derive f_fsid from the device number, which a reboot may
    /// change: the same filesystem (same UUID) is still the root, and
    /// root-id follows the new f_fsid.
    #[tokio::test]
    async fn a_root_whose_device_was_renumbered_is_the_same_root() {
        let Some((_dir, root, state, id)) = root_with_uuid() else {
            return;
        };
        let before_reboot = RootId {
            fsid: id.fsid ^ 0x0200_0000_0000,
            ..id
        };
        root_id::write(&state, &root, &before_reboot).unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g.check().await.is_ok(), "{:?}", g.status());
        assert_eq!(root_id::read(&state).unwrap().id, id, "brought up to date");

        // Another filesystem whose f_fsid happens to be the same is not.
        let other = RootId {
            uuid: Some([9; 16]),
            ..id
        };
        root_id::write(&state, &root, &other).unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g
            .check()
            .await
            .unwrap_err()
            .contains("unmounted or replaced"));
        assert_eq!(root_id::read(&state).unwrap().id, other, "left as it is");
    }

    /// A root-id written before the UUID was kept is compared by f_fsid, and
    /// gains the UUID.
    #[tokio::test]
    async fn a_root_id_without_uuid_gains_it() {
        let Some((_dir, root, state, id)) = root_with_uuid() else {
            return;
        };
        let old = RootId { uuid: None, ..id };
        root_id::write(&state, &root, &old).unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g.check().await.is_ok(), "{:?}", g.status());
        assert_eq!(root_id::read(&state).unwrap().id, id);

        // Not the same f_fsid, no UUID to say otherwise: not the root.
        root_id::write(
            &state,
            &root,
            &RootId {
                fsid: id.fsid ^ 1,
                ..old
            },
        )
        .unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g.check().await.is_err());
    }
}

#[cfg(test)]
mod hung {
    use super::*;
    use std::sync::Condvar;

    /// A look that waits while the gate is shut, as on a hung mount.
    #[derive(Default)]
    struct Gate {
        shut: Mutex<bool>,
        opened: Condvar,
        /// Looks begun.
        looks: AtomicU64,
    }

    impl Gate {
        fn set(&self, shut: bool) {
            *self.shut.lock().unwrap() = shut;
            self.opened.notify_all();
        }
    }

    fn guard(root: &Path, state: &Path, gate: &Arc<Gate>) -> RootGuard {
        let g = gate.clone();
        let hanging: Look = Arc::new(move |p: &Path| {
            g.looks.fetch_add(1, Ordering::SeqCst);
            let mut shut = g.shut.lock().unwrap();
            while *shut {
                shut = g.opened.wait(shut).unwrap();
            }
            drop(shut);
            look(p)
        });
        RootGuard::with_look(root, state, hanging, Duration::from_millis(300)).unwrap()
    }

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        (dir, root, state)
    }

    /// A look that never returns makes the root unavailable, with the reason,
    /// and gives no proof of presence (which every delete and every "gone"
    /// verdict needs); one look at a time; once it returns, checks resume.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_root_that_does_not_answer_is_unavailable_until_it_does() {
        let (_dir, root, state) = dirs();
        let gate = Arc::new(Gate::default());
        let g = guard(&root, &state, &gate);
        assert!(g.check().await.is_ok());
        assert_eq!(g.status(), RootStatus::Present);

        gate.set(true);
        let looks_before = gate.looks.load(Ordering::SeqCst);
        let why = g.check().await.unwrap_err();
        assert_eq!(why, does_not_answer(&root));
        assert!(
            why.contains("does not answer (a hung network mount?)"),
            "{why}"
        );
        assert_eq!(g.status(), RootStatus::Unavailable(why.clone()));
        // Later checks fail at once, and ask for no second look.
        let at = std::time::Instant::now();
        for _ in 0..5 {
            assert_eq!(g.check().await.unwrap_err(), why);
        }
        assert!(
            at.elapsed() < Duration::from_millis(250),
            "{:?}",
            at.elapsed()
        );
        assert_eq!(gate.looks.load(Ordering::SeqCst), looks_before + 1);

        // The mount answers again: the next check proceeds normally.
        gate.set(false);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while g.check().await.is_err() {
            assert!(std::time::Instant::now() < until, "{:?}", g.status());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(g.status(), RootStatus::Present);
        gate.set(false);
    }

    /// The watcher's sightings: a look begun after a mark answers; one that
    /// hangs answers nothing (no identity is made up meanwhile).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sightings_answer_only_with_looks_begun_after_the_mark() {
        let (_dir, root, state) = dirs();
        let gate = Arc::new(Gate::default());
        let g = guard(&root, &state, &gate);
        let seen = g.sightings();
        let id = identity(&root);
        assert_eq!(seen.latest(), id, "the first look, made at start");
        let mark = seen.mark();
        assert_eq!(seen.since(mark), None);
        gate.set(true);
        seen.ask();
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen.ask();
        assert_eq!(seen.since(mark), None, "the look hangs");
        gate.set(false);
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while seen.since(mark).is_none() {
            assert!(std::time::Instant::now() < until);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(seen.since(mark), Some(id));
        // The ask made while it hung gets a look of its own after it.
        while gate.looks.load(Ordering::SeqCst) < 2 {
            assert!(std::time::Instant::now() < until);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What is looked at outside the guard (the root's path at start and at
    /// a reload) is given up after the limit.
    #[test]
    fn within_gives_up_on_a_call_that_hangs() {
        assert_eq!(within(Duration::from_secs(5), || 7), Some(7));
        let (_tx, rx) = std::sync::mpsc::channel::<()>();
        let at = std::time::Instant::now();
        let hangs = within(Duration::from_millis(100), move || rx.recv().is_ok());
        assert_eq!(hangs, None);
        assert!(at.elapsed() < Duration::from_secs(2));
    }

    /// A root that does not answer at start: with its identity stored, the
    /// guard starts paused; without, it is an error of kind TimedOut.
    #[test]
    fn a_root_that_does_not_answer_at_start() {
        let (_dir, root, state) = dirs();
        let gate = Arc::new(Gate::default());
        drop(guard(&root, &state, &gate)); // stores the identity
        gate.set(true);
        let g = guard(&root, &state, &gate);
        assert_eq!(g.status(), RootStatus::Unavailable(does_not_answer(&root)));
        std::fs::remove_file(root_id::path(&state)).unwrap();
        let g = gate.clone();
        let hanging: Look = Arc::new(move |p: &Path| {
            let mut shut = g.shut.lock().unwrap();
            while *shut {
                shut = g.opened.wait(shut).unwrap();
            }
            drop(shut);
            look(p)
        });
        let e = RootGuard::with_look(&root, &state, hanging, Duration::from_millis(100))
            .err()
            .unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("does not answer"), "{e}");
        gate.set(false);
    }
}
