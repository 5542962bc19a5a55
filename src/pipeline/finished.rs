//! The finished-file rule, checked at the moment an upload attempt starts and
//! again at the moment of a delete: what makes a file "the same file"
//! ([`FileIdentity`]), whether a process holds it open for writing
//! ([`open_for_writing`]), and whether it is ready now ([`check`]).
//!
//! Guarantee: [`check`] answers [`Readiness::Ready`] only for a regular file
//! (never a symlink) that no process has open for writing and whose mtime is
//! at least `settle` old, so a timer alone never starts an upload.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What makes a file "the same file": device, inode, size, mtime and ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }

    /// The identity of a file that was not there to be looked at (a record
    /// rebuilt from the bucket after its local copy was gone): inode 0,
    /// which no file has.
    pub fn unseen(size: u64) -> Self {
        FileIdentity {
            dev: 0,
            ino: 0,
            size,
            mtime_ns: 0,
            ctime_ns: 0,
        }
    }

    /// Whether this is a file that was looked at (see [`FileIdentity::unseen`]).
    pub fn was_seen(&self) -> bool {
        self.ino != 0
    }

    /// The later of mtime and ctime, in nanoseconds since the epoch.
    pub fn changed_ns(&self) -> i128 {
        self.mtime_ns.max(self.ctime_ns)
    }

    /// The same inode with the same contents (size and mtime): what a rename
    /// leaves of an identity (it changes only the ctime).
    pub fn same_contents(&self, other: &FileIdentity) -> bool {
        (self.dev, self.ino, self.size, self.mtime_ns)
            == (other.dev, other.ino, other.size, other.mtime_ns)
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128
}

/// Whether some process has the file open for writing: `Some(true)` if so,
/// `Some(false)` if not, `None` if the kernel will not tell us.
///
/// Asks by trying to take a read lease, which the kernel refuses with EAGAIN
/// while the file is open for writing anywhere. Taking a lease needs the file's
/// owner or CAP_LEASE; without either the answer is `None` and the stat rule
/// alone decides. The lease is released at once; SIGIO (sent if a writer opens
/// the file in that instant) is ignored by the daemon.
pub fn open_for_writing(path: &Path) -> Option<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let lease = Lease::take(&f)?;
    let writing = lease.is_none();
    Some(writing)
}

/// The errno of the last lease the kernel refused for another reason than a
/// writer (no CAP_LEASE, a file system without leases); 0 if none was.
static UNANSWERED: AtomicI32 = AtomicI32::new(0);

/// [`UNANSWERED`] for a network file system's refusal (see
/// [`refusal_means_a_writer`]); errnos are positive.
const NETWORK_FS: i32 = -2;

/// File systems whose refused read lease says nothing about writers: NFSv4
/// refuses one whenever the server granted no read delegation, SMB whenever
/// the client holds no read oplock (both with EAGAIN, the writer's answer),
/// so on a NAS that grants neither every file would wait for ever.
const NETWORK_FS_TYPES: [u64; 4] = [
    0x6969,      // NFS
    0xFF53_4D42, // CIFS
    0xFE53_4D42, // SMB2
    0x517B,      // SMB
];

/// Whether an EAGAIN from `F_SETLEASE` on `file` means a writer holds it:
/// everywhere but on [`NETWORK_FS_TYPES`].
fn refusal_means_a_writer(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs fills the zeroed struct we pass, on a valid descriptor.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut s) } != 0 {
        return true;
    }
    is_local_lease_fs(s.f_type as u64)
}

fn is_local_lease_fs(f_type: u64) -> bool {
    !NETWORK_FS_TYPES.contains(&(f_type & 0xFFFF_FFFF))
}

/// Why the writer probe could not answer, if it ever could not: the daemon
/// says so in `status`, since finished then means quiet for `settle` only.
pub fn unanswered_probe() -> Option<String> {
    match UNANSWERED.load(Ordering::Relaxed) {
        0 => None,
        NETWORK_FS => Some(
            "a network file system (NFS or SMB), whose refused lease does not mean a writer".into(),
        ),
        libc::EACCES | libc::EPERM => {
            Some("no permission: neither the files' owner nor CAP_LEASE".into())
        }
        libc::EINVAL => Some("the file system does not support leases".into()),
        -1 => Some("an unknown error".into()),
        errno => Some(std::io::Error::from_raw_os_error(errno).to_string()),
    }
}

/// A read lease held on an open file: while it is held, a process that opens
/// the file for writing blocks until it is released (closing the file).
pub struct Lease<'a> {
    file: &'a std::fs::File,
}

impl<'a> Lease<'a> {
    /// `Some(Some(lease))` when taken, `Some(None)` when the file is open for
    /// writing somewhere, `None` when the kernel will not tell us.
    pub fn take(file: &'a std::fs::File) -> Option<Option<Lease<'a>>> {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a valid, borrowed descriptor.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        if rc == 0 {
            return Some(Some(Lease { file }));
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) if refusal_means_a_writer(file) => Some(None),
            Some(libc::EAGAIN) => {
                UNANSWERED.store(NETWORK_FS, Ordering::Relaxed);
                None
            }
            errno => {
                // A FIFO or socket refuses leases wherever it is: only a
                // regular file's refusal says something about the probe.
                if file.metadata().is_ok_and(|m| m.is_file()) {
                    UNANSWERED.store(errno.unwrap_or(-1), Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// Whether a process is waiting to open the file for writing: the
    /// kernel is breaking the lease (it no longer reads as a read lease).
    pub fn breaking(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: as in `take`.
        let kind = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETLEASE) };
        kind != libc::F_RDLCK
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as in `take`.
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
}

/// Ignores SIGIO, which a lease break would otherwise deliver with a fatal default.
pub fn ignore_lease_signals() {
    // SAFETY: installing SIG_IGN for SIGIO has no preconditions.
    unsafe {
        libc::signal(libc::SIGIO, libc::SIG_IGN);
    }
}

/// Whether a file may be uploaded now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Finished: regular, closed by every writer, quiet for `settle`.
    Ready(FileIdentity),
    /// A process holds it open for writing.
    Writing,
    /// Changed less than `settle` ago; look again at this time (Unix ms).
    Settling { until_ms: u64 },
    /// No file at that path.
    Gone,
    /// A symlink: never followed.
    Symlink,
    /// Something else than a regular file (a directory, a socket…).
    NotAFile,
    /// It cannot be inspected: why, and how that counts against it.
    Unreadable {
        reason: String,
        counts: crate::pipeline::localfs::Counts,
    },
}

/// The finished-file rule at this moment.
pub fn check(path: &Path, settle: Duration) -> Readiness {
    use crate::pipeline::localfs::{self, Call, Counts};
    let meta = match localfs::fault(path, Call::Stat).and_then(|()| std::fs::symlink_metadata(path))
    {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Readiness::Gone,
        Err(e) => {
            let counts = localfs::of_open(&e);
            let reason = match counts {
                Counts::Park => format!("cannot inspect {}: {e}", path.display()),
                _ => localfs::tried_again("cannot inspect", path, &e),
            };
            return Readiness::Unreadable { reason, counts };
        }
    };
    if meta.file_type().is_symlink() {
        return Readiness::Symlink;
    }
    if !meta.is_file() {
        return Readiness::NotAFile;
    }
    let identity = FileIdentity::of(&meta);
    let now = now_ns();
    let settle_ns = settle.as_nanos() as i128;
    // A future mtime (a writer's skewed clock, `touch -d`) says nothing of
    // when the file last changed: its ctime, the kernel's, does. Both ahead
    // (this clock set back) tell nothing; the writer probe below decides.
    let last_change = if identity.mtime_ns <= now {
        identity.mtime_ns
    } else if identity.ctime_ns <= now {
        identity.ctime_ns
    } else {
        now - settle_ns
    };
    let quiet_at = last_change + settle_ns;
    if quiet_at > now {
        return Readiness::Settling {
            until_ms: (quiet_at / 1_000_000) as u64,
        };
    }
    match open_for_writing(path) {
        Some(true) => Readiness::Writing,
        _ => Readiness::Ready(identity),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose mtime lies ten years ahead settles from its ctime; it
    /// used to wait one settle from "now" at every look, so for ever.
    #[test]
    fn a_future_mtime_settles_from_the_ctime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ahead.png");
        std::fs::write(&path, b"from a skewed clock").unwrap();
        let ahead = std::time::SystemTime::now() + Duration::from_secs(10 * 365 * 86_400);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(ahead)
            .unwrap();
        let settle = Duration::from_millis(200);
        assert!(matches!(check(&path, settle), Readiness::Settling { .. }));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            matches!(check(&path, settle), Readiness::Ready(_)),
            "{:?}",
            check(&path, settle)
        );
    }

    #[test]
    fn a_refused_lease_means_a_writer_on_local_file_systems_only() {
        for local in [0xEF53u64, 0x5846_5342, 0x0102_1994, 0x9123_683E] {
            assert!(is_local_lease_fs(local), "{local:#x}");
        }
        for network in [0x6969u64, 0xFF53_4D42, 0xFE53_4D42, 0x517B] {
            assert!(!is_local_lease_fs(network), "{network:#x}");
        }
        // Where f_type is a signed 32-bit field, CIFS's magic comes sign-extended.
        assert!(!is_local_lease_fs(0xFF53_4D42u32 as i32 as i64 as u64));
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
    fn readiness_follows_the_rule() {
        ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        assert_eq!(check(&p, Duration::ZERO), Readiness::Gone);
        let w = std::fs::File::create(&p).unwrap();
        assert!(matches!(
            check(&p, Duration::from_secs(60)),
            Readiness::Settling { .. }
        ));
        assert_eq!(check(&p, Duration::ZERO), Readiness::Writing);
        drop(w);
        assert!(matches!(check(&p, Duration::ZERO), Readiness::Ready(_)));
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert_eq!(check(&l, Duration::ZERO), Readiness::Symlink);
        assert_eq!(check(dir.path(), Duration::ZERO), Readiness::NotAFile);
    }
}
