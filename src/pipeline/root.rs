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

use crate::shutdown::Shutdown;
use crate::statedir::root_id::{self, RootId};
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

/// See the module docs.
pub struct RootGuard {
    path: PathBuf,
    state_dir: PathBuf,
    /// The filesystem and inode the root must have.
    expected: RootId,
    /// The device seen while the root was present in this run.
    dev: Mutex<Option<u64>>,
    status: watch::Sender<RootStatus>,
}

impl RootGuard {
    /// Takes the root's identity from `state_dir/root-id` when it was written
    /// for this same path, else from the root as it is now (and writes it).
    /// A stored identity that the root still matches is brought up to date
    /// (a UUID it lacked, an `f_fsid` a new device number changed).
    pub fn new(path: &Path, state_dir: &Path) -> std::io::Result<RootGuard> {
        let now = look(path).ok().map(|s| s.id);
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
    #[test]
    fn a_root_whose_device_was_renumbered_is_the_same_root() {
        let Some((_dir, root, state, id)) = root_with_uuid() else {
            return;
        };
        let before_reboot = RootId {
            fsid: id.fsid ^ 0x0200_0000_0000,
            ..id
        };
        root_id::write(&state, &root, &before_reboot).unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g.check().is_ok(), "{:?}", g.status());
        assert_eq!(root_id::read(&state).unwrap().id, id, "brought up to date");

        // Another filesystem whose f_fsid happens to be the same is not.
        let other = RootId {
            uuid: Some([9; 16]),
            ..id
        };
        root_id::write(&state, &root, &other).unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g.check().unwrap_err().contains("unmounted or replaced"));
        assert_eq!(root_id::read(&state).unwrap().id, other, "left as it is");
    }

    /// A root-id written before the UUID was kept is compared by f_fsid, and
    /// gains the UUID.
    #[test]
    fn a_root_id_without_uuid_gains_it() {
        let Some((_dir, root, state, id)) = root_with_uuid() else {
            return;
        };
        let old = RootId { uuid: None, ..id };
        root_id::write(&state, &root, &old).unwrap();
        let g = RootGuard::new(&root, &state).unwrap();
        assert!(g.check().is_ok(), "{:?}", g.status());
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
        assert!(g.check().is_err());
    }
}
