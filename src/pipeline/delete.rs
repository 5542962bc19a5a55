//! The last step: deleting the local copy of a verified, durably recorded
//! upload (guarantee 2), so that exactly the uploaded inode goes.
//!
//! The caller holds a [`DeletePermit`] (the record is durable and names this
//! file), has checked the running configuration (deletion on, not local mode)
//! and the root, and the file is at least `delete_after` old. Here:
//! 1. the name is opened (never through a symlink, nor below a folder that
//!    is one) and a read lease is taken
//!    on it: the kernel refuses one while any process has the file open for
//!    writing, and holds back new writers while we hold it. A writer means
//!    "later", and the name is left alone;
//! 2. under the lease, the open inode still shows the uploaded identity
//!    (device, inode, size, mtime, ctime), else the file changed and is
//!    uploaded again;
//! 3. it is renamed aside to a hidden name in the same directory (never over
//!    anything), and the hidden name must lead to the inode we hold;
//! 4. only then is the hidden name unlinked, unless a writer that found the
//!    name before the rename is waiting on our lease: then the file goes back
//!    under its name for it. If another file took the name between 1 and 3,
//!    that one is renamed back without overwriting anything (and stays
//!    hidden, never deleted, if a third took the name meanwhile).
//!
//! A delete cut short by a crash after 3 leaves the uploaded inode under a
//! hidden name; the next attempt finds the name gone, finds that inode among
//! the hidden names and finishes the delete. An unlink in 4 that fails puts
//! the file back under its name (left hidden, a newer file written at the
//! name meanwhile could later be overwritten in the bucket by this older
//! one). Still under the lease, the inode shows the uploaded bytes: it is
//! the uploaded file with the ctime the renames gave it, and its delete is
//! tried again with backoff as such ([`LocalOutcome::PutBack`]), not taken
//! for a changed file and uploaded again.
//! A delete refused for good (no permission, a read-only file system) keeps
//! the local copy under its name; one refused for a passing reason (a full
//! file system or quota, a disk error, a dropped-out mount) is tried again.
//! A crash before a file was put
//! back in 4 leaves a file that is not the uploaded one under a hidden name;
//! the hidden name carries the name it came from, and the next attempt puts
//! it back there (never over anything) and has it uploaded. Where no next
//! attempt comes (deletion turned off since), a scan of the tree puts such
//! files back ([`restore_leftover`]). Both put a file back only where the
//! upload recorded at its name is of that file, or of one changed before it
//! was set aside ([`may_go_back`]): else it may be an older version, which
//! uploaded again would replace the newer object in the bucket. It stays
//! under its hidden name, and the log (and, from a scan, `status`) says so.

use crate::pipeline::finished::{FileIdentity, Lease};
use crate::pipeline::localfs::{self, Call};
use crate::pipeline::queue::DeletePermit;
use crate::statedir::process_alive;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Names of files set aside for deletion start with this; the watcher never
/// treats them as results.
const ASIDE_PREFIX: &str = ".offloadd-del-";

/// Whether `abs` names a file set aside for deletion (offloadd's own working
/// file, never a result).
pub fn is_set_aside(abs: &Path) -> bool {
    abs.file_name()
        .is_some_and(|n| n.as_bytes().starts_with(ASIDE_PREFIX.as_bytes()))
}

/// How far the kernel's coarse clock (which stamps ctimes) may lag the
/// precise one: a tick at HZ=100 is 10 ms.
const COARSE_CLOCK_LAG_NS: i128 = 50_000_000;

/// The longest file name Linux file systems take, in bytes.
const NAME_MAX: usize = 255;

/// What happened to a local copy.
#[derive(Debug, PartialEq, Eq)]
pub enum LocalOutcome {
    Deleted,
    /// Already gone (deleted by the application, or by us before a crash).
    Gone,
    /// No longer the uploaded file (rewritten, replaced): upload it again.
    Changed,
    /// A process has it open for writing: look again later.
    WriterActive,
    /// Deleting it failed for a reason that may pass (a full file system, a
    /// quota, a disk error, a mount that dropped out): tried again with
    /// backoff; the reason, for `status`.
    Retry(String),
    /// The unlink failed for a reason that may pass, after the file was set
    /// aside: the uploaded file is back under its name, its bytes unchanged
    /// (checked under the lease) but its ctime moved by the two renames;
    /// `now` is its identity as it is now. Tried again with backoff, as the
    /// same uploaded file (not one changed since its upload); the reason, for
    /// `status`.
    PutBack {
        error: String,
        now: FileIdentity,
    },
    /// Deleting it failed for good (only an operator can fix it); the
    /// reason is recorded and shown once.
    Kept(String),
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths from the filesystem hold no NUL")
}

/// rename(2) that fails with EEXIST instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    localfs::fault(from, Call::Rename)?;
    let (f, t) = (c_path(from), c_path(to));
    // SAFETY: two valid C strings; AT_FDCWD resolves them like rename(2).
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A hidden name this process is using for a delete; while it exists, no
/// other delete takes the file under it (see [`gone`]).
struct Aside {
    path: PathBuf,
}

/// The hidden names in use by this process's deletes.
static IN_USE: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

impl Aside {
    /// A new hidden name beside `abs`:
    /// `{ASIDE_PREFIX}{pid}-{ms}_{n}-{its name}` (ms: when it is set aside,
    /// see [`Aside::set_aside_at_ns`]), or without its name where that would
    /// be longer than a name may be.
    fn beside(abs: &Path) -> Aside {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = abs.parent().unwrap_or(Path::new("/"));
        let ms = crate::statedir::now_ms();
        let mut name = format!("{ASIDE_PREFIX}{}-{ms}_{n}", std::process::id()).into_bytes();
        let from = abs.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
        if name.len() + 1 + from.len() <= NAME_MAX {
            name.push(b'-');
            name.extend_from_slice(from);
        }
        let path = dir.join(std::ffi::OsStr::from_bytes(&name));
        Aside::claim(path).expect("a fresh hidden name is not in use")
    }

    /// Field `i` of a hidden name: `{pid}-{n}-{name}` after [`ASIDE_PREFIX`]
    /// (see [`Aside::beside`]; `n` is `{ms}_{count}` or, in older names, a
    /// count; the name may be missing).
    fn field(hidden: &[u8], i: usize) -> Option<&[u8]> {
        let rest = hidden.strip_prefix(ASIDE_PREFIX.as_bytes())?;
        rest.splitn(3, |&b| b == b'-').nth(i)
    }

    /// The name a hidden name says its file came from, if it says one.
    fn came_from(hidden: &[u8]) -> Option<&[u8]> {
        Aside::field(hidden, 2).filter(|name| !name.is_empty())
    }

    /// When the file under `hidden` was set aside, in ns since the epoch, as
    /// its name says (names of older versions do not say).
    fn set_aside_at_ns(hidden: &[u8]) -> Option<i128> {
        let n = std::str::from_utf8(Aside::field(hidden, 1)?).ok()?;
        let (ms, _) = n.split_once('_')?;
        Some(ms.parse::<i128>().ok()? * 1_000_000)
    }

    /// The process that set a file aside under `hidden`.
    fn set_aside_by(hidden: &[u8]) -> Option<u32> {
        std::str::from_utf8(Aside::field(hidden, 0)?)
            .ok()?
            .parse()
            .ok()
    }

    /// Claims an existing hidden name, unless another delete uses it.
    fn claim(path: PathBuf) -> Option<Aside> {
        let fresh = IN_USE.lock().expect("aside lock").insert(path.clone());
        fresh.then(|| Aside { path })
    }
}

impl Drop for Aside {
    fn drop(&mut self) {
        IN_USE.lock().expect("aside lock").remove(&self.path);
    }
}

/// A delete that failed: tried again later where the trouble may pass (a
/// full file system or quota, a disk error, a dropped-out mount), else kept
/// for good (no permission, a read-only file system, anything unknown).
fn kept(abs: &Path, e: &std::io::Error) -> LocalOutcome {
    if localfs::delete_may_pass(e) {
        return LocalOutcome::Retry(localfs::tried_again(
            "uploaded, but cannot delete the local copy",
            abs,
            e,
        ));
    }
    match e.raw_os_error() {
        Some(libc::EACCES) => LocalOutcome::Kept(format!(
            "uploaded, local copy kept: permission denied deleting {}; give the offloadd user write access to its directory (see /usr/share/doc/offloadd/README.md, packaging/README.md in the source)",
            abs.display()
        )),
        _ => LocalOutcome::Kept(format!(
            "uploaded, local copy kept: cannot delete {}: {e}; make it deletable (an immutable attribute, a sticky directory, a read-only mount) and delete it by hand if you wish",
            abs.display()
        )),
    }
}

/// Puts a file that is not the uploaded one back under its name, never over
/// another file; either way the file now at the name is uploaded again. If a
/// third file took the name meanwhile, the one set aside stays under its
/// hidden name: the application replaced it (it is never deleted).
fn put_back_other(aside: &Path, abs: &Path) -> LocalOutcome {
    if let Err(e) = rename_noreplace(aside, abs) {
        tracing::warn!(
            path = %abs.display(),
            aside = %aside.display(),
            error = %e,
            "while offloadd was deleting {}, the application replaced it twice; the file in between, never uploaded, stays as {}",
            abs.display(),
            aside.display()
        );
    }
    LocalOutcome::Changed
}

/// Puts the uploaded file, set aside, back under its name, never over
/// another file.
fn put_back(aside: &Path, abs: &Path, then: LocalOutcome) -> LocalOutcome {
    match rename_noreplace(aside, abs) {
        Ok(()) => then,
        Err(e) => {
            tracing::error!(
                path = %abs.display(),
                aside = %aside.display(),
                error = %e,
                "a file appeared at {} while offloadd was deleting the uploaded one; the uploaded file is kept as {}",
                abs.display(),
                aside.display()
            );
            LocalOutcome::Kept(format!(
                "uploaded, local copy kept as {}: another file took its name during the delete",
                aside.display()
            ))
        }
    }
}

/// Deletes `abs` (under `root`) if it is still the file `permit` names; see
/// the module docs. Blocking: run it off the async threads.
pub fn delete_local(root: &Path, abs: &Path, permit: &DeletePermit) -> LocalOutcome {
    delete_in_root(root, abs, permit.identity())
}

fn delete_in_root(root: &Path, abs: &Path, expected: &FileIdentity) -> LocalOutcome {
    // A folder on the way replaced by a symlink (moved out to an archive and
    // linked back, say): the same inode, but outside the tree offloadd
    // manages, and not offloadd's to delete.
    if let Some(link) = crate::keys::symlinked_folder(root, abs) {
        return LocalOutcome::Kept(format!(
            "{} is below {}, a symbolic link, and offloadd deletes nothing through links: uploaded, local copy kept",
            abs.display(),
            link.display()
        ));
    }
    delete_if_same(abs, expected)
}

fn delete_if_same(abs: &Path, expected: &FileIdentity) -> LocalOutcome {
    use std::os::unix::fs::MetadataExt;
    let file = match open_held(abs) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return gone(abs, expected),
        Err(e) => return refused_open(abs, expected, &e),
    };
    // Held until the unlink is done; `None` where the kernel cannot tell.
    let lease = match Lease::take(&file) {
        Some(None) => return LocalOutcome::WriterActive,
        Some(Some(lease)) => Some(lease),
        None => None,
    };
    // Under the lease: a writer that closed just before it cannot hide.
    let held = match file.metadata() {
        Ok(m) if m.is_file() && FileIdentity::of(&m) == *expected => m,
        Ok(_) => return LocalOutcome::Changed,
        Err(e) => return kept(abs, &e),
    };
    let aside = Aside::beside(abs);
    if let Err(e) = rename_noreplace(abs, &aside.path) {
        return match e.kind() {
            std::io::ErrorKind::NotFound => gone(abs, expected),
            _ => kept(abs, &e),
        };
    }
    match std::fs::symlink_metadata(&aside.path) {
        Ok(m) if (m.dev(), m.ino()) == (held.dev(), held.ino()) => {}
        // Another file took the name after we opened it: put it back.
        _ => return put_back_other(&aside.path, abs),
    }
    // A writer that found the name before the rename waits on our lease; it
    // gets the file back under its name instead of an unlinked inode.
    if lease.as_ref().is_some_and(Lease::breaking) {
        drop(lease);
        return put_back(&aside.path, abs, LocalOutcome::WriterActive);
    }
    let removed =
        localfs::fault(abs, Call::Remove).and_then(|()| std::fs::remove_file(&aside.path));
    let outcome = match removed {
        Ok(()) => LocalOutcome::Deleted,
        Err(e) => {
            // Put back, whatever comes next. Left under the hidden name
            // while the item waits, a newer file the application writes at
            // the name meanwhile would be uploaded and deleted, and a scan
            // would then put this older one back, to be uploaded over the
            // newer object.
            return match kept(abs, &e) {
                LocalOutcome::Retry(error) => {
                    put_back_uploaded(&aside.path, abs, &file, lease, expected, error)
                }
                other => {
                    drop(lease);
                    put_back(&aside.path, abs, other)
                }
            };
        }
    };
    drop(lease);
    outcome
}

/// Puts the uploaded file back under its name after an unlink that failed
/// for a reason that may pass (`error`), still under `lease`: if no writer
/// waits on the lease and the inode held (`file`) shows the uploaded bytes,
/// it is the uploaded file with the ctime the renames gave it
/// ([`LocalOutcome::PutBack`]); the delete is tried again with backoff, not
/// taken for a changed file and uploaded again at once, for ever. Else
/// ([`LocalOutcome::Retry`]) the next attempt looks again, and finds it
/// changed if a writer changed it.
fn put_back_uploaded(
    aside: &Path,
    abs: &Path,
    file: &std::fs::File,
    lease: Option<Lease>,
    expected: &FileIdentity,
    error: String,
) -> LocalOutcome {
    let back = put_back(aside, abs, LocalOutcome::Retry(error));
    let LocalOutcome::Retry(error) = back else {
        return back;
    };
    if lease.as_ref().is_some_and(Lease::breaking) {
        return LocalOutcome::Retry(error);
    }
    let outcome = match file.metadata() {
        Ok(m) if FileIdentity::of(&m).same_contents(expected) => LocalOutcome::PutBack {
            error,
            now: FileIdentity::of(&m),
        },
        _ => LocalOutcome::Retry(error),
    };
    drop(lease);
    outcome
}

/// Opens `path` for reading, never through a symlink, without blocking.
fn open_held(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    localfs::fault(path, Call::Open)?;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// What a failed open of the name says.
fn refused_open(abs: &Path, expected: &FileIdentity, e: &std::io::Error) -> LocalOutcome {
    match e.raw_os_error() {
        // A symlink now stands at the name: not the uploaded file.
        Some(libc::ELOOP) => LocalOutcome::Changed,
        // Another party holds a write lease (Samba, NFS): later.
        Some(libc::EWOULDBLOCK) => LocalOutcome::WriterActive,
        // No longer readable (its mode changed, say): changed unless it is
        // still exactly the uploaded file. A name that cannot be looked at
        // either (its mount dropped out) says nothing: it is tried again,
        // never uploaded again for that.
        _ => match localfs::fault(abs, Call::Stat).and_then(|()| std::fs::symlink_metadata(abs)) {
            Ok(m) if m.is_file() && FileIdentity::of(&m) == *expected => kept(abs, e),
            Ok(_) => LocalOutcome::Changed,
            Err(le) if le.kind() == std::io::ErrorKind::NotFound => LocalOutcome::Changed,
            Err(_) => kept(abs, e),
        },
    }
}

/// The name is gone. If the uploaded inode waits under a hidden name no
/// delete of this process is using (a delete cut short by a crash), the
/// delete is finished now, with the same lease and checks. Else a file that
/// another file set aside from this name goes back under it (its delete was
/// cut short before it was put back), to be uploaded.
fn gone(abs: &Path, expected: &FileIdentity) -> LocalOutcome {
    let dir = abs.parent().unwrap_or(Path::new("/"));
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return LocalOutcome::Gone,
        // Not known to be gone: a file set aside there may wait for its
        // delete, which the next attempt finishes.
        Err(e) => return kept(dir, &e),
    };
    let name = abs.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
    let mut from_this_name = Vec::new();
    let recorded = Recorded::File(*expected);
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_bytes()
            .starts_with(ASIDE_PREFIX.as_bytes())
        {
            continue;
        }
        match entry.metadata() {
            Ok(m) if m.is_file() && FileIdentity::of(&m).same_contents(expected) => {}
            found => {
                // One that cannot be looked at is tried: the rename back tells.
                let goes_back = |m: &std::fs::Metadata| {
                    let aside = FileIdentity::of(m);
                    matches!(
                        may_go_back(&entry.path(), abs, &aside, &recorded),
                        GoBack::Yes
                    )
                };
                if Aside::came_from(entry.file_name().as_bytes()) == Some(name)
                    && found.as_ref().map_or(true, goes_back)
                {
                    from_this_name.push(entry.path());
                }
                continue;
            }
        }
        let Some(aside) = Aside::claim(entry.path()) else {
            continue;
        };
        let Ok(file) = open_held(&aside.path) else {
            continue;
        };
        let lease = match Lease::take(&file) {
            Some(None) => return LocalOutcome::WriterActive,
            Some(Some(lease)) => Some(lease),
            None => None,
        };
        match file.metadata() {
            Ok(m) if FileIdentity::of(&m).same_contents(expected) => {}
            _ => continue,
        }
        if lease.as_ref().is_some_and(Lease::breaking) {
            return LocalOutcome::WriterActive;
        }
        tracing::info!(path = %abs.display(), "finishing a delete cut short before a restart");
        let outcome = match std::fs::remove_file(&aside.path) {
            Ok(()) => LocalOutcome::Deleted,
            Err(e) => kept(&aside.path, &e),
        };
        drop(lease);
        return outcome;
    }
    for hidden in from_this_name {
        let Some(aside) = Aside::claim(hidden) else {
            continue;
        };
        if rename_noreplace(&aside.path, abs).is_ok() {
            tracing::warn!(path = %abs.display(), "a file that a delete cut short before a restart had set aside is back under its name; it is uploaded again");
            return LocalOutcome::Changed;
        }
    }
    LocalOutcome::Gone
}

/// What the records say of the name a file set aside would go back to.
#[derive(Debug, Clone, Copy)]
pub enum Recorded {
    /// The file whose upload is recorded at the name.
    File(FileIdentity),
    /// Nothing that tells the file's version: no upload recorded at the name
    /// any more (`offloadd delete`, a lost database not rebuilt), or one
    /// rebuilt from the bucket after its local copy was gone.
    Untold,
    /// The records cannot be read now: the file waits for a later scan.
    Unreadable,
}

/// Whether `aside` (the file under `hidden`, set aside from `to`) may go
/// back under its name: only where the upload recorded there is of this
/// very file, or of one last changed before this one was set aside (the
/// time its hidden name carries, or in older names the ctime the rename
/// aside gave; the same coarse tick counts as after). A file set aside is always one a record named, or one that
/// took that file's name during its delete: with no record to compare, or
/// a record of a file changed since (written, or moved in), it may be an
/// older version, which put back would be uploaded over the newer object.
/// That one stays hidden, and the log says so; where the records cannot be
/// read, it waits for a later scan.
fn may_go_back(hidden: &Path, to: &Path, aside: &FileIdentity, recorded: &Recorded) -> GoBack {
    // The time in its name, on the precise clock, less the coarse clock's
    // lag behind it (a file that took the name within it counts as after);
    // else its ctime, which a chmod since would have moved.
    let set_aside_ns = hidden
        .file_name()
        .and_then(|n| Aside::set_aside_at_ns(n.as_bytes()))
        .map_or(aside.ctime_ns, |ns| ns - COARSE_CLOCK_LAG_NS);
    let why = match recorded {
        Recorded::Unreadable => return GoBack::Later,
        Recorded::File(file) if file.same_contents(aside) || file.ctime_ns < set_aside_ns => {
            return GoBack::Yes
        }
        Recorded::File(_) => "a newer file at that name was uploaded since",
        Recorded::Untold => "the records no longer tell whether it is older than what was uploaded from there (a database rebuilt from the bucket, or `offloadd delete`)",
    };
    let text = kept_aside(hidden, to, why);
    tracing::warn!(path = %to.display(), aside = %hidden.display(), "{text}");
    GoBack::Kept(text)
}

/// What [`may_go_back`] decides.
enum GoBack {
    Yes,
    /// The records cannot be read now.
    Later,
    /// It may be an older version; what to tell an operator.
    Kept(String),
}

/// What [`may_go_back`] says of a file it keeps under its hidden name.
fn kept_aside(hidden: &Path, to: &Path, why: &str) -> String {
    format!(
        "{} holds a version of {} set aside by an earlier delete; {why}, so it is not put back (it could replace a newer object in the bucket); it stays there: delete it, or move it back by hand if it is the version you want",
        hidden.display(),
        to.display()
    )
}

/// A hidden name found by a scan of the tree. If the process that set the
/// file aside is gone (a crash cut its delete short) and no delete of this
/// process uses the name, the file goes back under the name it came from,
/// never over anything, where the records (`recorded_at` the name it would
/// go back to) show it is not an older version ([`may_go_back`]): the watcher
/// then sees it moved in, and it is uploaded again and deleted by the rules
/// in force. This covers what the next attempt of the delete does not see:
/// deletion turned off since, or the item gone. One set aside by a live
/// process (another instance), or whose name is taken or unknown, stays;
/// the log says where. Returns, for `status`, what it says of a file it
/// keeps because it may be an older version.
pub fn restore_leftover(
    hidden: &Path,
    recorded_at: impl FnOnce(&Path) -> Recorded,
) -> Option<String> {
    let name = hidden.file_name().map(OsStrExt::as_bytes)?;
    let pid = Aside::set_aside_by(name)?;
    if pid != std::process::id() && process_alive(pid) {
        return None;
    }
    let aside = Aside::claim(hidden.to_path_buf())?;
    let Some(from) = Aside::came_from(name) else {
        tracing::warn!(aside = %hidden.display(), "{} was set aside by a delete that a crash cut short, and its name is too long to say where it came from; it stays there", hidden.display());
        return None;
    };
    let to = hidden.with_file_name(std::ffi::OsStr::from_bytes(from));
    let Ok(meta) = std::fs::symlink_metadata(&aside.path) else {
        return None;
    };
    match may_go_back(hidden, &to, &FileIdentity::of(&meta), &recorded_at(&to)) {
        GoBack::Yes => {}
        GoBack::Later => return None,
        GoBack::Kept(text) => return Some(text),
    }
    match rename_noreplace(&aside.path, &to) {
        Ok(()) => {
            tracing::warn!(path = %to.display(), "a file that a delete cut short by a crash had set aside is back under its name {}", to.display())
        }
        // Finished or put back meanwhile.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            path = %to.display(),
            aside = %hidden.display(),
            error = %e,
            "a file that a delete cut short by a crash had set aside cannot go back to {} ({e}); it stays as {}",
            to.display(),
            hidden.display()
        ),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn identity(p: &Path) -> FileIdentity {
        FileIdentity::of(&std::fs::symlink_metadata(p).unwrap())
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A folder moved out of the root and linked back (an archive, say):
    /// the uploaded inode is there through the link, but outside the tree
    /// offloadd manages, so it is kept.
    #[test]
    fn nothing_is_deleted_through_a_symlinked_folder() {
        crate::pipeline::finished::ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let (root, archive) = (dir.path().join("root"), dir.path().join("archive"));
        std::fs::create_dir_all(root.join("2023")).unwrap();
        let f = root.join("2023/a.png");
        std::fs::write(&f, b"uploaded").unwrap();
        let id = identity(&f);
        std::fs::rename(root.join("2023"), &archive).unwrap();
        std::os::unix::fs::symlink(&archive, root.join("2023")).unwrap();
        let out = delete_in_root(&root, &f, &id);
        assert!(
            matches!(&out, LocalOutcome::Kept(why) if why.contains("a symbolic link")),
            "{out:?}"
        );
        assert_eq!(std::fs::read(archive.join("a.png")).unwrap(), b"uploaded");
    }

    /// A delete refused for a passing reason (no room for the rename aside,
    /// a quota, a disk error, a dropped-out mount) is tried again; what needs
    /// an operator (no permission, a read-only file system, a mount point)
    /// keeps the local copy for good. Every failure used to keep it for good.
    #[test]
    fn only_what_needs_an_operator_keeps_the_local_copy() {
        crate::pipeline::finished::ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.png");
        std::fs::write(&f, b"uploaded").unwrap();
        let id = identity(&f);
        let why = |errno| {
            localfs::inject(&f, Call::Rename, errno);
            let out = delete_if_same(&f, &id);
            localfs::heal(&f);
            match out {
                LocalOutcome::Kept(why) => why,
                other => panic!("{errno}: {other:?}"),
            }
        };
        assert!(why(libc::EACCES).contains("permission denied"));
        assert!(why(libc::EPERM).contains("Operation not permitted"));
        assert!(why(libc::EROFS).contains("Read-only file system"));
        // A mount point, a name too long once hidden: no better later.
        assert!(why(libc::EBUSY).contains("Device or resource busy"));
        assert!(why(libc::ENAMETOOLONG).contains("File name too long"));
        for (call, errno) in [
            (Call::Rename, libc::ENOSPC),
            (Call::Rename, libc::EDQUOT),
            (Call::Open, libc::ENOTCONN),
        ] {
            localfs::inject(&f, call, errno);
            if call == Call::Open {
                localfs::inject(&f, Call::Stat, errno);
            }
            let out = delete_if_same(&f, &id);
            localfs::heal(&f);
            let LocalOutcome::Retry(why) = &out else {
                panic!("{call:?} {errno}: {out:?}");
            };
            assert!(why.ends_with(localfs::TRIED_AGAIN), "{why}");
        }
    }

    /// An unlink that fails for a passing reason puts the uploaded file back
    /// under its name, nothing left aside (where a scan could later put it
    /// back over a newer upload), and says what it is now: the same bytes
    /// with the ctime the renames gave it, which the next attempt deletes.
    /// It used to come back as a file changed since its upload, uploaded
    /// again at once, and failed again, for ever.
    #[test]
    fn an_unlink_that_fails_puts_back_the_uploaded_file_as_it_is_now() {
        crate::pipeline::finished::ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.png");
        std::fs::write(&f, b"uploaded").unwrap();
        let id = identity(&f);
        std::thread::sleep(std::time::Duration::from_millis(20));
        localfs::inject(&f, Call::Remove, libc::EIO);
        let out = delete_if_same(&f, &id);
        localfs::heal(&f);
        let LocalOutcome::PutBack { error, now } = out else {
            panic!("{out:?}");
        };
        assert_eq!(
            error,
            format!(
                "uploaded, but cannot delete the local copy {}: Input/output error (os error 5); check the disk{}",
                f.display(),
                localfs::TRIED_AGAIN
            )
        );
        assert_eq!(listing(dir.path()), ["a.png"]);
        assert_eq!(now, identity(&f));
        assert!(now.same_contents(&id) && now.ctime_ns > id.ctime_ns);
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Changed);
        assert_eq!(delete_if_same(&f, &now), LocalOutcome::Deleted);
        assert!(listing(dir.path()).is_empty());
    }

    #[test]
    fn deletes_only_the_uploaded_inode() {
        crate::pipeline::finished::ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"one").unwrap();
        let id = identity(&f);
        std::fs::write(&f, b"two!").unwrap();
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Changed);
        assert!(f.exists());

        // Another file renamed over the name: not deleted.
        let other = dir.path().join("b");
        std::fs::write(&other, b"two!").unwrap();
        let id = identity(&f);
        std::fs::rename(&other, &f).unwrap();
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Changed);
        assert_eq!(std::fs::read(&f).unwrap(), b"two!");

        let id = identity(&f);
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Deleted);
        assert!(!f.exists());
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Gone);
        assert!(listing(dir.path()).is_empty(), "nothing left aside");
    }

    #[test]
    fn a_writer_keeps_the_file() {
        crate::pipeline::finished::ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"one").unwrap();
        let id = identity(&f);
        let mut w = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::WriterActive);
        assert_eq!(listing(dir.path()), vec!["a".to_string()]);
        w.write_all(b" more").unwrap();
        drop(w);
        assert_eq!(std::fs::read(&f).unwrap(), b"one more");
    }

    #[test]
    fn a_delete_cut_short_after_the_rename_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"uploaded").unwrap();
        let id = identity(&f);
        // Another hidden leftover that is not this file stays.
        let other = dir.path().join(format!("{ASIDE_PREFIX}1-7"));
        std::fs::write(&other, b"else").unwrap();
        // The crash: set aside by a run that died before the unlink.
        std::fs::rename(&f, dir.path().join(format!("{ASIDE_PREFIX}1-8"))).unwrap();
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Deleted);
        assert_eq!(listing(dir.path()), vec![format!("{ASIDE_PREFIX}1-7")]);
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Gone);
    }

    /// Another file took the name and was set aside in its place; the crash
    /// came before it was put back. The next attempt puts it back (the
    /// uploaded file is long gone: it was replaced) and has it uploaded.
    #[test]
    fn a_file_set_aside_but_not_put_back_before_a_crash_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a-1.png");
        std::fs::write(&f, b"uploaded").unwrap();
        let id = identity(&f);
        // Its upload and `settle` take that long at least.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let newer = dir.path().join("tmp");
        std::fs::write(&newer, b"the application's newer file").unwrap();
        std::fs::rename(&newer, &f).unwrap();
        // A leftover set aside from another name stays where it is.
        let other = dir.path().join(format!("{ASIDE_PREFIX}1-7-b.png"));
        std::fs::write(&other, b"else").unwrap();
        let aside = Aside::beside(&f);
        let hidden = aside.path.clone();
        drop(aside);
        assert_eq!(
            Aside::came_from(hidden.file_name().unwrap().as_bytes()),
            Some(&b"a-1.png"[..])
        );
        std::fs::rename(&f, &hidden).unwrap(); // the crash
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Changed);
        assert_eq!(std::fs::read(&f).unwrap(), b"the application's newer file");
        assert_eq!(
            listing(dir.path()),
            vec![format!("{ASIDE_PREFIX}1-7-b.png"), "a-1.png".to_string()]
        );
    }

    #[test]
    fn a_hidden_name_says_where_its_file_came_from_when_it_fits() {
        assert_eq!(
            Aside::came_from(format!("{ASIDE_PREFIX}12-3-x-y.png").as_bytes()),
            Some(&b"x-y.png"[..])
        );
        assert_eq!(
            Aside::came_from(format!("{ASIDE_PREFIX}12-3").as_bytes()),
            None
        );
        assert_eq!(Aside::came_from(b"x-y.png"), None);
        let dir = tempfile::tempdir().unwrap();
        let long = dir.path().join("n".repeat(NAME_MAX));
        let aside = Aside::beside(&long);
        let hidden = aside.path.file_name().unwrap().as_bytes();
        assert!(hidden.len() <= NAME_MAX);
        assert_eq!(Aside::came_from(hidden), None);
    }

    #[test]
    fn a_hidden_name_in_use_by_another_delete_is_left_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"uploaded").unwrap();
        let id = identity(&f);
        let hidden = dir.path().join(format!("{ASIDE_PREFIX}1-9"));
        std::fs::rename(&f, &hidden).unwrap();
        let in_use = Aside::claim(hidden.clone()).unwrap();
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Gone);
        assert!(hidden.exists());
        drop(in_use);
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Deleted);
        assert!(!hidden.exists());
    }

    #[test]
    fn a_writer_waiting_on_the_lease_is_seen() {
        crate::pipeline::finished::ignore_lease_signals();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"uploaded").unwrap();
        let file = open_held(&f).unwrap();
        let Some(Some(lease)) = Lease::take(&file) else {
            panic!("no lease on our own file");
        };
        assert!(!lease.breaking());
        let path = f.clone();
        let writer = std::thread::spawn(move || {
            std::fs::OpenOptions::new().append(true).open(path).unwrap();
        });
        let t = std::time::Instant::now();
        while !lease.breaking() {
            assert!(
                t.elapsed().as_secs() < 10,
                "the writer's open never broke the lease"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(lease);
        writer.join().unwrap();
    }

    #[test]
    fn a_symlink_at_the_name_is_not_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"uploaded").unwrap();
        let id = identity(&f);
        let target = dir.path().join("t");
        std::fs::rename(&f, &target).unwrap();
        std::os::unix::fs::symlink(&target, &f).unwrap();
        assert_eq!(delete_if_same(&f, &id), LocalOutcome::Changed);
        assert!(target.exists() && f.symlink_metadata().is_ok());
    }

    #[test]
    fn never_overwrites_a_newcomer() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"x").unwrap();
        std::fs::write(&b, b"y").unwrap();
        assert_eq!(
            rename_noreplace(&a, &b).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        // The uploaded file, set aside as `a`: kept there, and said so.
        let out = put_back(&a, &b, LocalOutcome::WriterActive);
        assert!(
            matches!(&out, LocalOutcome::Kept(why) if why.contains("uploaded, local copy kept as")),
            "{out:?}"
        );
        assert_eq!(std::fs::read(&b).unwrap(), b"y");
        assert_eq!(std::fs::read(&a).unwrap(), b"x");
        // Another file, never uploaded, set aside as `a`: not called
        // uploaded; the file at the name goes again.
        assert_eq!(put_back_other(&a, &b), LocalOutcome::Changed);
        assert_eq!(std::fs::read(&b).unwrap(), b"y");
        assert_eq!(std::fs::read(&a).unwrap(), b"x");
        std::fs::remove_file(&b).unwrap();
        assert_eq!(put_back_other(&a, &b), LocalOutcome::Changed);
        assert_eq!(std::fs::read(&b).unwrap(), b"x", "back under its name");
        assert!(!a.exists());
    }

    /// A scan finds files set aside by a delete that a crash cut short.
    #[test]
    fn a_scan_puts_back_what_a_dead_process_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        // A pid above pid_max: no such process.
        let dead = 2_147_483_646u32;
        assert!(!process_alive(dead) && process_alive(1));

        // What the records name at each name: a file changed before any
        // of these were set aside (the upload whose delete a crash cut
        // short, with another file taking its name meanwhile).
        let recorded_file = at("recorded");
        std::fs::write(&recorded_file, b"v0").unwrap();
        let before = Recorded::File(identity(&recorded_file));
        std::thread::sleep(std::time::Duration::from_millis(30));

        let hidden = at(&format!(".offloadd-del-{dead}-0-a.png"));
        std::fs::write(&hidden, b"a").unwrap();
        assert!(is_set_aside(&hidden));
        restore_leftover(&hidden, |_| before);
        assert_eq!(
            std::fs::read(at("a.png")).unwrap(),
            b"a",
            "back under its name"
        );
        assert!(!hidden.exists());

        // Its name taken meanwhile: both stay as they are.
        std::fs::write(&hidden, b"old").unwrap();
        restore_leftover(&hidden, |_| before);
        assert_eq!(std::fs::read(at("a.png")).unwrap(), b"a");
        assert_eq!(std::fs::read(&hidden).unwrap(), b"old");

        // Set aside by a live process (another instance): left to it.
        let live = at(".offloadd-del-1-0-b.png");
        std::fs::write(&live, b"b").unwrap();
        restore_leftover(&live, |_| before);
        assert!(live.exists() && !at("b.png").exists());

        // This very pid (a container restarted): only when no delete of
        // this process uses the name.
        let ours = at(&format!(".offloadd-del-{}-999-c.png", std::process::id()));
        std::fs::write(&ours, b"c").unwrap();
        let in_use = Aside::claim(ours.clone()).unwrap();
        restore_leftover(&ours, |_| before);
        assert!(ours.exists());
        drop(in_use);
        restore_leftover(&ours, |_| before);
        assert_eq!(std::fs::read(at("c.png")).unwrap(), b"c");

        // A name too long to say where it came from: stays.
        let nameless = at(&format!(".offloadd-del-{dead}-1"));
        std::fs::write(&nameless, b"d").unwrap();
        restore_leftover(&nameless, |_| before);
        assert!(nameless.exists());
    }

    /// A file set aside before a newer file's upload was recorded at its
    /// name is an older version: put back, it would be uploaded over the
    /// newer object. One set aside after the recorded upload (another file
    /// that took the name during the delete) goes back.
    #[test]
    fn an_older_version_set_aside_is_not_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        let dead = 2_147_483_646u32;
        let wait = || std::thread::sleep(std::time::Duration::from_millis(30));
        let recorded_file = at("recorded-before");
        std::fs::write(&recorded_file, b"v0").unwrap();
        let before = identity(&recorded_file);
        wait();
        let hidden = at(&format!(".offloadd-del-{dead}-0-a.png"));
        std::fs::write(&hidden, b"v1").unwrap();
        wait();
        let newer_file = at("recorded-after");
        std::fs::write(&newer_file, b"v2").unwrap();
        let newer = identity(&newer_file);
        assert!(newer.ctime_ns > identity(&hidden).ctime_ns);

        let mut asked = None;
        restore_leftover(&hidden, |to| {
            asked = Some(to.to_path_buf());
            Recorded::File(newer)
        });
        assert_eq!(asked.as_deref(), Some(at("a.png").as_path()));
        assert!(!at("a.png").exists(), "an older version is not put back");
        assert_eq!(std::fs::read(&hidden).unwrap(), b"v1");
        restore_leftover(&hidden, |_| Recorded::Unreadable);
        assert!(!at("a.png").exists(), "records unread: it waits");
        restore_leftover(&hidden, |_| Recorded::Untold);
        assert!(!at("a.png").exists(), "nothing tells its version");
        // A newer file that took the name in the same coarse tick as the
        // rename aside.
        let same_tick = FileIdentity {
            ino: newer.ino,
            ..identity(&hidden)
        };
        restore_leftover(&hidden, |_| Recorded::File(same_tick));
        assert!(!at("a.png").exists(), "the same tick counts as after");

        // The same under a delete of the newer file's record that finds the
        // name gone.
        assert_eq!(gone(&at("a.png"), &newer), LocalOutcome::Gone);
        assert_eq!(std::fs::read(&hidden).unwrap(), b"v1");
        assert!(!at("a.png").exists());

        // Recorded before it was set aside: it goes back.
        assert_eq!(gone(&at("a.png"), &before), LocalOutcome::Changed);
        assert_eq!(std::fs::read(at("a.png")).unwrap(), b"v1");
        std::fs::rename(at("a.png"), &hidden).unwrap();
        restore_leftover(&hidden, |_| Recorded::File(before));
        assert_eq!(std::fs::read(at("a.png")).unwrap(), b"v1");
        // Its own record (deletion turned off since) goes back whatever the
        // ctimes say (a wall clock stepped back, say).
        std::fs::rename(at("a.png"), &hidden).unwrap();
        let own = FileIdentity {
            ctime_ns: identity(&hidden).ctime_ns + 1_000_000_000,
            ..identity(&hidden)
        };
        restore_leftover(&hidden, |_| Recorded::File(own));
        assert_eq!(std::fs::read(at("a.png")).unwrap(), b"v1");
    }
    /// The time a file was set aside is in its hidden name: a metadata
    /// change since (a chmod, a `setfacl -R`) that moves its ctime does not
    /// make an older version look newer than the upload recorded since.
    #[test]
    fn the_time_in_a_hidden_name_outlasts_a_chmod() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        let dead = 2_147_483_646u32;
        let set_aside_ms = crate::statedir::now_ms();
        let hidden = at(&format!(".offloadd-del-{dead}-{set_aside_ms}_0-a.png"));
        std::fs::write(&hidden, b"older").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::write(at("newer"), b"newer").unwrap();
        let newer = identity(&at("newer"));
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(identity(&hidden).ctime_ns > newer.ctime_ns);
        restore_leftover(&hidden, |_| Recorded::File(newer));
        assert!(!at("a.png").exists(), "an older version is not put back");
        assert_eq!(
            Aside::set_aside_at_ns(hidden.file_name().unwrap().as_bytes()),
            Some(set_aside_ms as i128 * 1_000_000)
        );
    }
}
