//! Failures of the local file system the pipeline reads and deletes in, and
//! how each counts against its item: a mount that dropped out (a FUSE or
//! sshfs daemon gone, a stale NFS handle), a failing disk or a full one must
//! not park a file, nor keep a local copy for good, nor pass for a file that
//! changed.
//!
//! The worker checks the root before it acts on any of these: a root that is
//! gone pauses the whole pipeline instead (see [`crate::pipeline::root`]).
//!
//! Unit tests inject errors that no file system at hand produces ([`fault`]);
//! in any other build the seam does nothing. [`may_write_in`] asks the
//! kernel beforehand whether a folder's entries may be removed.

use std::io;
use std::path::Path;

/// Whether this process may create and remove entries in `dir` (access(2)
/// with W_OK, by its real ids): what deleting a file there needs, asked
/// before anything is done.
pub fn may_write_in(dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    match unsafe { libc::access(c.as_ptr(), libc::W_OK) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// How a failure of the local file system counts against its item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// Not the file's doing (its mount dropped out or hangs, its device went,
    /// the process ran short of descriptors or memory): tried again with
    /// backoff, however long that takes.
    Never,
    /// Maybe the file's (a bad sector under it): tried again with backoff,
    /// and parked after the scheduler's `MAX_STRIKES`.
    Strike,
    /// Only an operator can fix it (permission denied, a name the kernel
    /// refuses): parked at once.
    Park,
}

/// What ends the message of a failure tried again.
pub const TRIED_AGAIN: &str = "; offloadd tries again later";

/// An errno that says nothing about the file itself.
fn elsewhere(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOTCONN
                | libc::ESTALE
                | libc::ETIMEDOUT
                | libc::ENODEV
                | libc::ENXIO
                | libc::ENOMEDIUM
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::ECONNRESET
                | libc::ECONNABORTED
                | libc::ECONNREFUSED
                | libc::ENOLINK
                | libc::EREMOTEIO
                | libc::EAGAIN
                | libc::EINTR
                | libc::EBUSY
                | libc::ENOMEM
                | libc::EMFILE
                | libc::ENFILE
        )
    )
}

/// Whether a failed rename or unlink may pass by itself: a full file system
/// or quota, a disk error, a mount that dropped out or hangs. Anything else
/// (no permission, a read-only mount, a name too long, a mount point) waits
/// for an operator.
pub fn delete_may_pass(e: &io::Error) -> bool {
    let errno = e.raw_os_error();
    matches!(errno, Some(libc::ENOSPC | libc::EDQUOT | libc::EIO))
        || (elsewhere(e) && errno != Some(libc::EBUSY))
}

/// A failed stat or open of a file: a passing trouble (an I/O error
/// included: a disk or a FUSE daemon failing for a while) is tried again,
/// anything else (permission denied…) parks the file.
pub fn of_open(e: &io::Error) -> Counts {
    if elsewhere(e) || e.raw_os_error() == Some(libc::EIO) {
        Counts::Never
    } else {
        Counts::Park
    }
}

/// A failed read of a file that is still the one the upload started with:
/// an I/O error (a bad sector) is the file's, after a few tries.
pub fn of_read(e: &io::Error) -> Counts {
    if elsewhere(e) {
        Counts::Never
    } else {
        Counts::Strike
    }
}

/// What the operator can do about `e`.
pub fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EIO) => "check the disk",
        Some(libc::ENOSPC | libc::EDQUOT) => "free some space (or quota) on its file system",
        Some(libc::EMFILE | libc::ENFILE) => {
            "raise offloadd's open-file limit (LimitNOFILE= in the unit)"
        }
        Some(libc::ENOMEM) => "the machine is short of memory",
        Some(libc::EBUSY) => "something else holds it",
        _ if elsewhere(e) => "check the mount it is on",
        _ => "check its file system",
    }
}

/// "{what} {path}: {e}; {hint}; offloadd tries again later".
pub fn tried_again(what: &str, path: &Path, e: &io::Error) -> String {
    format!("{what} {}: {e}; {}{TRIED_AGAIN}", path.display(), hint(e))
}

/// Which call on a file an injected error fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Stat,
    Open,
    Read,
    Rename,
    Remove,
}

#[cfg(test)]
static FAULTS: std::sync::Mutex<Vec<(std::path::PathBuf, Call, i32)>> =
    std::sync::Mutex::new(Vec::new());

/// Tests: `call` on the file at `path` fails with `errno` until [`heal`].
/// The delete's rename and unlink are keyed on the file's own name.
#[cfg(test)]
pub fn inject(path: &Path, call: Call, errno: i32) {
    let mut f = FAULTS.lock().unwrap();
    f.push((path.to_path_buf(), call, errno));
    if let Ok(real) = path.canonicalize() {
        f.push((real, call, errno));
    }
}

/// Tests: the file at `path` behaves again.
#[cfg(test)]
pub fn heal(path: &Path) {
    let real = path.canonicalize().ok();
    FAULTS
        .lock()
        .unwrap()
        .retain(|(p, _, _)| p != path && Some(p) != real.as_ref());
}

/// The error injected into `call` on `path`, if any (tests only).
#[inline]
pub fn fault(path: &Path, call: Call) -> io::Result<()> {
    #[cfg(test)]
    {
        let f = FAULTS.lock().unwrap();
        if let Some((_, _, errno)) = f.iter().find(|(p, c, _)| p == path && *c == call) {
            return Err(io::Error::from_raw_os_error(*errno));
        }
    }
    let _ = (path, call);
    Ok(())
}

/// [`fault`] for a call on an open file, found by the name it was opened
/// under (tests only).
#[inline]
pub fn fault_on(file: &std::fs::File, call: Call) -> io::Result<()> {
    #[cfg(test)]
    {
        use std::os::fd::AsRawFd;
        if let Ok(p) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            return fault(&p, call);
        }
    }
    let _ = (file, call);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_mount_is_never_the_files_and_permission_denied_parks() {
        let e = |n| io::Error::from_raw_os_error(n);
        for n in [libc::ENOTCONN, libc::ESTALE, libc::ETIMEDOUT, libc::ENODEV] {
            assert_eq!(of_open(&e(n)), Counts::Never, "{n}");
            assert_eq!(of_read(&e(n)), Counts::Never, "{n}");
        }
        assert_eq!(of_open(&e(libc::EIO)), Counts::Never);
        assert_eq!(of_read(&e(libc::EIO)), Counts::Strike);
        assert_eq!(of_open(&e(libc::EACCES)), Counts::Park);
        let m = tried_again("cannot read", Path::new("/r/a.png"), &e(libc::EIO));
        assert_eq!(
            m,
            "cannot read /r/a.png: Input/output error (os error 5); check the disk; offloadd tries again later"
        );
    }
}
