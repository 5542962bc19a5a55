//! A command run as root on a stopped daemon's state works as the state's
//! owner (the service user): the files it creates there (the lock, sled's
//! snapshots and log segments, a new database) are then the service's, and
//! the service starts again afterwards. Run as root, they were root's, and
//! the service stopped at its next start with "Permission denied" (exit 78,
//! which systemd does not restart).

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The user a command works as on `state_dir`, once [`become_state_owner`]
/// has run.
struct Owner {
    uid: libc::uid_t,
    gid: libc::gid_t,
    /// The user's name, when the password database knows the uid.
    name: Option<CString>,
}

impl Owner {
    /// What `sudo -u` takes for this user.
    fn for_sudo(&self) -> String {
        match &self.name {
            Some(name) => name.to_string_lossy().into_owned(),
            None => format!("#{}", self.uid),
        }
    }
}

/// Makes this process the owner of `state_dir` (uid, primary gid and that
/// user's groups) when it runs as root and the directory belongs to another
/// user; does nothing otherwise (another user, or a state_dir root owns or
/// that does not exist yet). An error is the sentence to print: this
/// process then must not open the state.
///
/// Call it before the process starts any thread: the commands run on the
/// main thread alone until they open the state (`delete` builds its runtime
/// afterwards). glibc applies setuid and setgid to every thread of the
/// process anyway (nptl's setxid), so a thread started earlier would not
/// keep root either. Nothing a command does afterwards needs root: the
/// config is read already, the control socket was tried already, and the
/// secret file and the results tree are read as the service reads them.
pub fn become_state_owner(state_dir: &Path) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(state_dir) else {
        return Ok(());
    };
    if meta.uid() == 0 {
        return Ok(());
    }
    let owner = owner_of(meta.uid(), meta.gid());
    switch_to(&owner).map_err(|e| {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!(
            "offloadd is not running, and root may not open its state in {} (the service could not use what it writes there) nor switch to its owner ({e}); run it as the service user: sudo -u {} offloadd {}",
            state_dir.display(),
            owner.for_sudo(),
            args.join(" ")
        )
    })
}

/// The user `uid` as the password database knows it; `dir_gid` (the
/// state_dir's group) where it does not.
fn owner_of(uid: libc::uid_t, dir_gid: libc::gid_t) -> Owner {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwuid_r to fill.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the use of
    // `pwd`'s strings below.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
        return Owner {
            uid,
            gid: dir_gid,
            name: None,
        };
    }
    // SAFETY: getpwuid_r succeeded: pw_name is a C string in `buf`.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned();
    Owner {
        uid,
        gid: pwd.pw_gid,
        name: Some(name),
    }
}

/// Groups, then gid, then uid (after setuid, root's right to change the
/// others is gone).
fn switch_to(owner: &Owner) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain system calls on values; the name is a valid C string.
    unsafe {
        check(match &owner.name {
            Some(name) => libc::initgroups(name.as_ptr(), owner.gid),
            None => libc::setgroups(1, &owner.gid),
        })?;
        check(libc::setgid(owner.gid))?;
        check(libc::setuid(owner.uid))?;
    }
    Ok(())
}
