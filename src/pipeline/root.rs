//! The watch root's presence: is the directory offloadd manages still there,
//! and still the same filesystem and inode?
//!
//! Owns the root's expected identity (filesystem id and inode, kept in
//! `state_dir/root-id` across runs; plus the device within a run). A root
//! that is missing, unmounted or replaced pauses the whole pipeline: the
//! scheduler dispatches nothing, and the queue drops an item as "vanished" or
//! marks a record "local deleted" only with a [`RootPresent`] proof taken
//! after the file was found missing. [`RootGuard::run`] polls once a second
//! and publishes changes, so the watcher re-establishes its watches and
//! rescans when the root comes back.

use crate::shutdown::Shutdown;
use crate::statedir::root_id;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
    ino: u64,
    fsid: u64,
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
        ino: meta.ino(),
        fsid: s.f_fsid as u64,
    })
}

/// File system id and inode of the directory at `path`, as the guard
/// compares them; `None` if it is not there.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    look(path).ok().map(|s| (s.fsid, s.ino))
}

/// See the module docs.
pub struct RootGuard {
    path: PathBuf,
    state_dir: PathBuf,
    /// Filesystem id and inode the root must have.
    expected: (u64, u64),
    /// The device seen while the root was present in this run.
    dev: Mutex<Option<u64>>,
    status: watch::Sender<RootStatus>,
}

impl RootGuard {
    /// Takes the root's identity from `state_dir/root-id` when it was written
    /// for this same path, else from the root as it is now (and writes it).
    pub fn new(path: &Path, state_dir: &Path) -> std::io::Result<RootGuard> {
        let now = look(path).ok();
        let stored = root_id::read(state_dir).filter(|s| s.path == path);
        let expected = match (stored, now) {
            (Some(s), _) => (s.fsid, s.ino),
            (None, Some(seen)) => {
                root_id::write(state_dir, path, seen.fsid, seen.ino)?;
                (seen.fsid, seen.ino)
            }
            (None, None) => {
                return Err(std::io::Error::other(format!(
                    "the watch root {} cannot be inspected",
                    path.display()
                )))
            }
        };
        let guard = RootGuard {
            path: path.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            expected,
            dev: Mutex::new(None),
            status: watch::channel(RootStatus::Present).0,
        };
        let _ = guard.check();
        Ok(guard)
    }

    /// The root's path, as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the root now; publishes (and logs) a change.
    pub fn check(&self) -> Result<RootPresent, String> {
        let verdict = match look(&self.path) {
            Err(e) => Err(format!(
                "the watch root {} is not available ({e}); offloadd pauses until it is back (mount it, or check RequiresMountsFor=)",
                self.path.display()
            )),
            Ok(seen) => {
                let mut dev = self.dev.lock().expect("root lock");
                if (seen.fsid, seen.ino) != self.expected || dev.is_some_and(|d| d != seen.dev) {
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

    /// Polls the root once a second until shutdown.
    pub async fn run(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { let _ = self.check(); }
                _ = shutdown.recv() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_root_is_refused_until_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g.check().is_ok());
        // Replaced by another directory of the same name.
        std::fs::rename(&root, dir.path().join("away")).unwrap();
        let e = g.check().unwrap_err();
        assert!(e.contains("is not available"), "{e}");
        std::fs::create_dir_all(&root).unwrap();
        let e = g.check().unwrap_err();
        assert!(e.contains("unmounted or replaced"), "{e}");
        assert!(matches!(g.status(), RootStatus::Unavailable(_)));
        std::fs::remove_dir(&root).unwrap();
        std::fs::rename(dir.path().join("away"), &root).unwrap();
        assert!(g.check().is_ok());
        assert_eq!(g.status(), RootStatus::Present);

        // A new run remembers the root it managed.
        std::fs::rename(&root, dir.path().join("away")).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let g2 = RootGuard::new(&root, &state).unwrap();
        assert!(g2.check().is_err(), "a different root at start is refused");
    }
}
