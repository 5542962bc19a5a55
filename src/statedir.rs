//! What lives in `state_dir` besides the database: the instance lock, the
//! "managed since" mark, the identity of the watch root, the count of records
//! written, the places (endpoint, bucket, prefix) uploaded under, and the
//! status snapshot written when the control socket cannot be bound. Plus the
//! clock helpers every module shares.
//!
//! Guarantees: the lock file is taken before sled opens, so a second instance
//! on the same state_dir is refused with the pid of the first (a command
//! holding it for a moment is waited for instead); the mark, the root
//! identity and the places uploaded under are small files written atomically
//! (write, fsync, rename), kept outside the database so a database rebuild
//! never moves them.

use crate::pipeline::queue::StateError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The exclusive lock on a state directory: held by the daemon for the life
/// of the process, or by a command for the moment it works on the state of a
/// stopped daemon.
pub struct Lock {
    _file: File,
}

/// Who takes a state directory's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// `offloadd run`.
    Daemon,
    /// A command (status, locate, …) opening a stopped daemon's state: a
    /// daemon starting meanwhile waits for it ([`COMMAND_PATIENCE`]).
    Command,
}

/// How long taking the lock waits for a command that holds it. A monitoring
/// `status` while offloadd restarts must not fail the start.
pub const COMMAND_PATIENCE: Duration = Duration::from_secs(10);

/// What the lock file says after the pid of a command holding it.
const COMMAND_MARK: &str = "command";

impl Lock {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("offloadd.lock")
    }

    /// Takes the lock, or reports the pid of the instance holding it. A
    /// command holding it is waited for, up to [`COMMAND_PATIENCE`].
    pub fn acquire(state_dir: &Path, holder: Holder) -> Result<Lock, StateError> {
        let give_up = std::time::Instant::now() + COMMAND_PATIENCE;
        loop {
            match Self::try_acquire(state_dir, holder) {
                Err(StateError::Busy { .. }) if std::time::Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn try_acquire(state_dir: &Path, holder: Holder) -> Result<Lock, StateError> {
        // A full disk may clear (exit 1, systemd tries again); a denial
        // waits for ops.
        let unusable = |e: std::io::Error| StateError::of_io(state_dir, &e, e.to_string());
        std::fs::create_dir_all(state_dir).map_err(unusable)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(Self::path(state_dir))
            .map_err(unusable)?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut s = String::new();
                let _ = file.read_to_string(&mut s);
                let (pid, by) = parse_holder(&s);
                let dir = state_dir.to_path_buf();
                // A daemon pid that is gone: the previous daemon's, left in
                // the file by a command that holds the lock for a moment
                // (`Lock::holder`, or before it wrote its own pid).
                return Err(match by {
                    Holder::Daemon if pid > 0 && process_alive(pid) => {
                        StateError::AlreadyRunning { pid, dir }
                    }
                    Holder::Daemon | Holder::Command => StateError::Busy { pid, dir },
                });
            }
            return Err(unusable(err));
        }
        // Group-readable whatever the umask (the units set 0077): `status`
        // run by the offloadd group reads who holds it.
        let _ = file.set_permissions(group_readable());
        file.set_len(0).map_err(unusable)?;
        file.rewind().map_err(unusable)?;
        match holder {
            Holder::Daemon => writeln!(file, "{}", std::process::id()),
            Holder::Command => writeln!(file, "{} {COMMAND_MARK}", std::process::id()),
        }
        .map_err(unusable)?;
        Ok(Lock { _file: file })
    }

    /// The pid of the running daemon, if one holds the lock (a command
    /// holding it for a moment is no daemon).
    pub fn holder(state_dir: &Path) -> Option<u32> {
        let file = File::open(Self::path(state_dir)).ok()?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_SH | libc::LOCK_NB,
            )
        };
        if rc == 0 {
            return None;
        }
        let s = std::fs::read_to_string(Self::path(state_dir)).ok()?;
        match parse_holder(&s) {
            (pid, Holder::Daemon) => Some(pid),
            (_, Holder::Command) => None,
        }
    }
}

/// Whether process `pid` exists (as far as this process may tell).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid in a lock file and who wrote it.
fn parse_holder(s: &str) -> (u32, Holder) {
    let mut words = s.split_whitespace();
    let pid = words.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    match words.next() {
        Some(COMMAND_MARK) => (pid, Holder::Command),
        _ => (pid, Holder::Daemon),
    }
}

/// The "managed since" mark: files whose mtime and ctime are both older are left
/// for `backfill`. Kept in a small file outside the database so a database rebuild
/// never moves it.
pub mod mark {
    use super::*;

    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("managed-since")
    }

    /// The mark in nanoseconds since the epoch, if it has been set.
    pub fn read(state_dir: &Path) -> Option<i128> {
        load(state_dir).ok().flatten()
    }

    /// The mark, `None` if it has not been set, or why it cannot be read
    /// (a command run by a user who may not read the state_dir, say).
    pub fn load(state_dir: &Path) -> Result<Option<i128>, String> {
        let path = path(state_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                format!(
                    "{} does not hold a time; offloadd writes it again at its next start",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Now, as a mark would record it.
    pub fn now_ns() -> i128 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128
    }

    /// Makes a mark written before it was made group-readable (0600, under
    /// the units' UMask=0077) readable by the group too, for `backfill`.
    /// Best effort: the mark stays as it is if this fails.
    pub fn share_with_group(state_dir: &Path) {
        let path = path(state_dir);
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.permissions().mode() & 0o040 == 0 {
                let _ = std::fs::set_permissions(&path, group_readable());
            }
        }
    }

    /// Sets the mark to `ns` (durably) unless it is set already.
    pub fn set_once(state_dir: &Path, ns: i128) -> std::io::Result<()> {
        if read(state_dir).is_some() {
            return Ok(());
        }
        write_atomically(&path(state_dir), format!("{ns}\n").as_bytes())
    }
}

/// The mode of the files in state_dir that the offloadd group's commands
/// read (the lock, the status snapshot, the mark): 0640, set after creation,
/// since the units' UMask=0077 masks what `open` asks for.
fn group_readable() -> std::fs::Permissions {
    std::fs::Permissions::from_mode(0o640)
}

/// Writes a small file durably: a temporary beside it, fsync, rename, fsync
/// of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    // Group-readable whatever the umask (the units set 0077): commands run
    // by the offloadd group read these files (`backfill` the mark).
    f.set_permissions(group_readable())?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// The identity of the watch root the last run managed (`root-id`): its path,
/// inode and filesystem, which stay the same across reboots and remounts of
/// the same filesystem.
///
/// The filesystem is named twice: by its UUID where the kernel gives one
/// (`FS_IOC_GETFSUUID`), and by `statfs`'s `f_fsid`. The UUID decides when
/// both sides have one, because XFS and f2fs derive `f_fsid` from the device
/// number, which a reboot may change (LVM, NVMe ordering, loop devices).
/// The file is one line `{fsid} {ino}[ {uuid hex}]` and then the path; a file
/// written before the UUID was kept has no third field and is compared by
/// `f_fsid`.
pub mod root_id {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    /// Which filesystem and directory a root is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RootId {
        pub fsid: u64,
        /// `None` where the kernel or the filesystem gives no UUID (or an
        /// all-zero one).
        pub uuid: Option<[u8; 16]>,
        pub ino: u64,
    }

    impl RootId {
        /// Whether `self` and `other` are the same directory of the same
        /// filesystem: the UUIDs decide when both are known, else `f_fsid`.
        pub fn is(&self, other: &RootId) -> bool {
            self.ino == other.ino
                && match (self.uuid, other.uuid) {
                    (Some(a), Some(b)) => a == b,
                    _ => self.fsid == other.fsid,
                }
        }
    }

    /// What `root-id` holds.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Stored {
        pub path: PathBuf,
        pub id: RootId,
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("root-id")
    }

    pub fn read(state_dir: &Path) -> Option<Stored> {
        let bytes = std::fs::read(path(state_dir)).ok()?;
        let nl = bytes.iter().position(|b| *b == b'\n')?;
        let head = std::str::from_utf8(&bytes[..nl]).ok()?;
        let mut fields = head.split_whitespace();
        let fsid = fields.next()?.parse().ok()?;
        let ino = fields.next()?.parse().ok()?;
        let uuid = match fields.next() {
            None => None,
            Some(hex) => Some(parse_uuid(hex)?),
        };
        if fields.next().is_some() {
            return None;
        }
        let rest = &bytes[nl + 1..];
        let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
        Some(Stored {
            path: PathBuf::from(std::ffi::OsStr::from_bytes(rest)),
            id: RootId { fsid, uuid, ino },
        })
    }

    pub fn write(state_dir: &Path, root: &Path, id: &RootId) -> std::io::Result<()> {
        let mut head = format!("{} {}", id.fsid, id.ino);
        if let Some(uuid) = id.uuid {
            head.push(' ');
            head.extend(uuid.iter().map(|b| format!("{b:02x}")));
        }
        let mut bytes = head.into_bytes();
        bytes.push(b'\n');
        bytes.extend_from_slice(root.as_os_str().as_bytes());
        bytes.push(b'\n');
        write_atomically(&path(state_dir), &bytes)
    }

    fn parse_uuid(hex: &str) -> Option<[u8; 16]> {
        if hex.len() != 32 || !hex.is_ascii() {
            return None;
        }
        let mut uuid = [0u8; 16];
        for (i, b) in uuid.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(uuid)
    }
}

/// How many location records the database had written (held, plus removed
/// by delete-through) by a flush that went through (`record-count`), to
/// recognise a database that lost some.
pub mod record_count {
    use super::*;

    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("record-count")
    }

    pub fn read(state_dir: &Path) -> Option<u64> {
        std::fs::read_to_string(path(state_dir))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Written without fsync: a stale count is a smaller one (the count only
    /// grows), which only makes a rebuild less likely.
    pub fn write(state_dir: &Path, count: u64) -> std::io::Result<()> {
        let tmp = state_dir.join("record-count.tmp");
        std::fs::write(&tmp, format!("{count}\n"))?;
        std::fs::rename(tmp, path(state_dir))
    }
}

/// The places offloadd has uploaded under (`prefix-history`): endpoint,
/// bucket and prefix of each active provider, so that a prefix nesting with
/// one used earlier on the same bucket is warned about after a restart too,
/// not only at the reload that changes it. Advisory: a file that cannot be
/// read or parsed is taken for an empty history (and replaced at the next
/// write); it holds no credentials ([`KeySpace`]).
///
/// The file is a JSON array, oldest first, without duplicates, of at most
/// [`MAX_KEPT`] entries: the least recently used are dropped.
pub mod prefix_history {
    use super::*;
    use crate::remote::provider::KeySpace;

    /// Most places kept.
    pub const MAX_KEPT: usize = 256;

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("prefix-history")
    }

    /// See the module docs. Held in memory by the daemon, which writes it
    /// through on each change (unless the file could not be read: see
    /// [`History::load`]).
    #[derive(Debug)]
    pub struct History {
        path: PathBuf,
        /// Oldest first.
        used: Vec<KeySpace>,
        kept: Kept,
    }

    /// Where a [`History`] keeps what it is told.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kept {
        /// In its file too.
        InFile,
        /// In memory only: the file could not be read, and a write would
        /// replace the places it holds.
        InMemory,
    }

    impl History {
        /// The history in `state_dir` (none yet: an empty one), and why the
        /// file could not be read if it could not (an empty one then).
        pub fn load(state_dir: &Path) -> (History, Option<String>) {
            let path = path(state_dir);
            const UNTIL: &str =
                "a prefix nesting with one used before is not warned about until it is used again";
            let (used, trouble, kept) = match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice::<Vec<KeySpace>>(&bytes) {
                    Ok(used) => (used, None, Kept::InFile),
                    Err(e) => (
                        Vec::new(),
                        Some(format!(
                            "{} is damaged ({e}); offloadd starts it afresh, so {UNTIL}",
                            path.display()
                        )),
                        Kept::InFile,
                    ),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    (Vec::new(), None, Kept::InFile)
                }
                // Left as it is (its places may come back once it can be
                // read): this run remembers its own in memory only.
                Err(e) => (
                    Vec::new(),
                    Some(format!(
                        "cannot read {}: {e}; offloadd leaves it as it is and remembers this run's prefixes in memory only, so {UNTIL}",
                        path.display()
                    )),
                    Kept::InMemory,
                ),
            };
            let mut history = History {
                path,
                used: Vec::new(),
                kept,
            };
            // A file edited by hand may repeat a place or hold too many.
            for space in used {
                history.add(space);
            }
            (history, trouble)
        }

        /// Oldest first.
        pub fn used(&self) -> &[KeySpace] {
            &self.used
        }

        /// The places used earlier that share keys with `now`.
        pub fn nesting_with<'a>(
            &'a self,
            now: &'a KeySpace,
        ) -> impl Iterator<Item = &'a KeySpace> + 'a {
            self.used.iter().filter(move |u| u.shares_keys_with(now))
        }

        /// Makes `now` the latest place used, in memory and durably in the
        /// file (unless it is the latest already, or the file could not be
        /// read at load, when it is left as it is). In memory even if the
        /// write fails.
        pub fn record(&mut self, now: KeySpace) -> std::io::Result<()> {
            if self.used.last() == Some(&now) {
                return Ok(());
            }
            self.add(now);
            if self.kept == Kept::InMemory {
                return Ok(());
            }
            let json = serde_json::to_vec_pretty(&self.used).expect("places serialize");
            write_atomically(&self.path, &json)
        }

        fn add(&mut self, now: KeySpace) {
            self.used.retain(|u| *u != now);
            self.used.push(now);
            if self.used.len() > MAX_KEPT {
                let over = self.used.len() - MAX_KEPT;
                self.used.drain(..over);
            }
        }
    }
}

/// Free bytes on the filesystem of `dir` (for unprivileged users).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we pass; `c` is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Where the status snapshot goes when the control socket cannot be bound.
pub fn snapshot_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// Writes the status snapshot atomically, readable by owner and group only.
pub fn write_snapshot(state_dir: &Path, json: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = state_dir.join("status.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&tmp)?;
    // The mode above passes through the umask (the units set 0077).
    f.set_permissions(group_readable())?;
    f.write_all(json)?;
    drop(f);
    std::fs::rename(tmp, snapshot_path(state_dir))
}

/// Formats a time for humans and JSON (RFC 3339, UTC, seconds).
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How long ago `ms` was, for log lines.
pub fn since(ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn second_lock_reports_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _l = Lock::acquire(dir.path(), Holder::Daemon).unwrap();
        assert_eq!(Lock::holder(dir.path()), Some(std::process::id()));
        // flock locks are per open file description, so a second acquire in the
        // same process is refused too, at once.
        let asked = std::time::Instant::now();
        match Lock::acquire(dir.path(), Holder::Daemon) {
            Err(StateError::AlreadyRunning { pid, .. }) => assert_eq!(pid, std::process::id()),
            other => panic!("expected AlreadyRunning, got {:?}", other.err()),
        }
        assert!(asked.elapsed() < COMMAND_PATIENCE);
    }

    /// A command that holds the lock for a moment before it writes its mark
    /// (or `Lock::holder` looking): the file still names the previous,
    /// stopped daemon. That is no running instance: waited for too.
    #[test]
    fn a_dead_daemon_named_in_the_lock_file_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Lock::path(dir.path()), "999999999\n").unwrap();
        let looking = File::open(Lock::path(dir.path())).unwrap();
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&looking), libc::LOCK_SH) };
        assert_eq!(rc, 0);
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(looking);
        });
        Lock::acquire(dir.path(), Holder::Daemon).unwrap();
        release.join().unwrap();
    }

    /// A command holding the lock (a `status` while the daemon is stopped)
    /// is waited for: a daemon starting meanwhile gets the lock once the
    /// command lets go, instead of failing with "already running" and the
    /// command's pid.
    #[test]
    fn a_command_holding_the_lock_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let command = Lock::acquire(dir.path(), Holder::Command).unwrap();
        assert_eq!(Lock::holder(dir.path()), None, "a command is no daemon");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(command);
        });
        let daemon = Lock::acquire(dir.path(), Holder::Daemon).unwrap();
        release.join().unwrap();
        assert_eq!(Lock::holder(dir.path()), Some(std::process::id()));
        drop(daemon);
        assert_eq!(parse_holder("12 command\n"), (12, Holder::Command));
        assert_eq!(parse_holder("12\n"), (12, Holder::Daemon));
    }

    #[test]
    fn root_id_round_trips() {
        use root_id::RootId;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(root_id::read(dir.path()), None);
        for id in [
            RootId {
                fsid: 77,
                uuid: None,
                ino: 2,
            },
            RootId {
                fsid: 77,
                uuid: Some(*b"0123456789abcdef"),
                ino: 2,
            },
        ] {
            root_id::write(dir.path(), Path::new("/srv/r"), &id).unwrap();
            let s = root_id::read(dir.path()).unwrap();
            assert_eq!((s.path.as_path(), s.id), (Path::new("/srv/r"), id));
        }
    }

    #[test]
    fn a_root_id_written_before_uuids_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(root_id::path(dir.path()), "77 2\n/srv/r\n").unwrap();
        let s = root_id::read(dir.path()).unwrap();
        assert_eq!(
            s.id,
            root_id::RootId {
                fsid: 77,
                uuid: None,
                ino: 2
            }
        );
        std::fs::write(root_id::path(dir.path()), "77 2 not-hex\n/srv/r\n").unwrap();
        assert_eq!(root_id::read(dir.path()), None, "a damaged file is no id");
    }

    #[test]
    fn the_uuid_decides_where_both_roots_have_one() {
        use root_id::RootId;
        let uuid = Some([7u8; 16]);
        let stored = RootId {
            fsid: 1,
            uuid,
            ino: 128,
        };
        // XFS after a reboot that renumbered its device: another f_fsid.
        assert!(stored.is(&RootId { fsid: 2, ..stored }));
        assert!(!stored.is(&RootId {
            uuid: Some([8; 16]),
            ..stored
        }));
        assert!(!stored.is(&RootId { ino: 129, ..stored }));
        // One side has no UUID (a file from before, a kernel without the
        // ioctl): f_fsid decides.
        let old = RootId {
            uuid: None,
            ..stored
        };
        assert!(old.is(&stored) && stored.is(&old));
        assert!(!old.is(&RootId { fsid: 2, ..stored }));
    }

    /// The units run offloadd with `UMask=0077`; the status snapshot and the
    /// lock file must still be readable by the offloadd group, for `status`,
    /// and the managed-since mark, for `backfill`.
    #[test]
    fn status_files_are_group_readable_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: umask only swaps the process's file mode mask.
        let old = unsafe { libc::umask(0o077) };
        let lock = Lock::acquire(dir.path(), Holder::Daemon);
        let snapshot = write_snapshot(dir.path(), b"{}");
        let marked = mark::set_once(dir.path(), 7);
        unsafe { libc::umask(old) };
        let (_lock, (), ()) = (lock.unwrap(), snapshot.unwrap(), marked.unwrap());
        // The mark too: `backfill` run by the group reads it.
        let marked = dir.path().join("managed-since");
        for path in [Lock::path(dir.path()), snapshot_path(dir.path()), marked] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o640, "{}", path.display());
        }
    }

    #[test]
    fn mark_is_set_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(mark::read(dir.path()), None);
        mark::set_once(dir.path(), 7).unwrap();
        mark::set_once(dir.path(), 8).unwrap();
        assert_eq!(mark::read(dir.path()), Some(7));
        // One an earlier version wrote 0600 is shared at the next start.
        let path = dir.path().join("managed-since");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        mark::share_with_group(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    /// `backfill` must not take a mark it cannot read for no mark at all
    /// ("nothing to backfill").
    #[test]
    fn a_mark_that_cannot_be_read_is_an_error_not_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(mark::load(dir.path()), Ok(None));
        std::fs::create_dir(dir.path().join("managed-since")).unwrap();
        let err = mark::load(dir.path()).unwrap_err();
        assert!(
            err.starts_with("cannot read ") && err.contains("managed-since"),
            "{err}"
        );
        std::fs::remove_dir(dir.path().join("managed-since")).unwrap();
        std::fs::write(dir.path().join("managed-since"), "garbage\n").unwrap();
        assert!(mark::load(dir.path())
            .unwrap_err()
            .contains("does not hold a time"));
    }

    fn place(bucket: &str, prefix: &str) -> crate::remote::provider::KeySpace {
        crate::remote::provider::KeySpace {
            endpoint: "https://s3.example".into(),
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn prefix_history_round_trips_and_dedupes() {
        use prefix_history::History;
        let dir = tempfile::tempdir().unwrap();
        let (mut h, trouble) = History::load(dir.path());
        assert_eq!((h.used(), trouble), (&[][..], None), "none yet");
        h.record(place("m", "pre")).unwrap();
        h.record(place("m", "pre/sub")).unwrap();
        h.record(place("m", "pre")).unwrap();
        h.record(place("m", "pre")).unwrap();
        let (back, trouble) = History::load(dir.path());
        assert_eq!(trouble, None);
        // Once each, the latest last.
        assert_eq!(back.used(), &[place("m", "pre/sub"), place("m", "pre")]);
        let now = place("m", "pre/sub/deeper");
        let nesting: Vec<_> = back.nesting_with(&now).collect();
        assert_eq!(nesting, [&place("m", "pre/sub"), &place("m", "pre")]);
        let mode = std::fs::metadata(prefix_history::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640, "group-readable like the other files");
        let text = std::fs::read_to_string(prefix_history::path(dir.path())).unwrap();
        assert!(
            text.contains("\"endpoint\": \"https://s3.example\""),
            "{text}"
        );
    }

    #[test]
    fn prefix_history_keeps_the_latest_places() {
        use prefix_history::{History, MAX_KEPT};
        let dir = tempfile::tempdir().unwrap();
        let (mut h, _) = History::load(dir.path());
        for i in 0..MAX_KEPT + 5 {
            h.record(place("m", &format!("p{i}"))).unwrap();
        }
        let (back, _) = History::load(dir.path());
        assert_eq!(back.used().len(), MAX_KEPT);
        assert_eq!(back.used()[0], place("m", "p5"), "the oldest dropped");
        assert_eq!(
            back.used()[MAX_KEPT - 1],
            place("m", &format!("p{}", MAX_KEPT + 4))
        );
    }

    /// The history is advisory: a damaged or unreadable file is an empty
    /// history and a reason. The next write replaces a damaged file; one
    /// that cannot be read is left as it is (its places may be read again
    /// later), and the history is kept in memory.
    #[test]
    fn a_damaged_prefix_history_is_an_empty_one() {
        use prefix_history::History;
        let dir = tempfile::tempdir().unwrap();
        let path = prefix_history::path(dir.path());
        std::fs::write(&path, b"\0garbage{").unwrap();
        let (mut h, trouble) = History::load(dir.path());
        assert!(h.used().is_empty());
        let trouble = trouble.unwrap();
        assert!(trouble.contains("prefix-history is damaged"), "{trouble}");
        h.record(place("m", "pre")).unwrap();
        let (back, trouble) = History::load(dir.path());
        assert_eq!((back.used(), trouble), (&[place("m", "pre")][..], None));

        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        let (mut h, trouble) = History::load(dir.path());
        assert!(h.used().is_empty());
        assert!(trouble.unwrap().starts_with("cannot read "));
        h.record(place("m", "pre/sub")).unwrap();
        assert_eq!(
            h.nesting_with(&place("m", "pre")).count(),
            1,
            "kept in memory"
        );
        assert!(path.join("inside").exists(), "left as it is");
    }
}
