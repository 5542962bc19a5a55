//! Exit codes, decided in one place (DESIGN.md "Command line"): 0 success;
//! 1 a negative answer or a failure that a retry may fix; 2 usage; 78
//! (EX_CONFIG) for what cannot run at all as configured.

use crate::daemon::Fatal;
use crate::pipeline::queue::StateError;

pub const SUCCESS: u8 = 0;
pub const NEGATIVE: u8 = 1;
pub const USAGE: u8 = 2;
pub const CONFIG: u8 = 78;

/// The exit code of `run` when the daemon cannot run.
pub fn of_fatal(e: &Fatal) -> u8 {
    match e {
        Fatal::Config(_) => CONFIG,
        // Another instance holds the lock: not a configuration error.
        Fatal::State(StateError::AlreadyRunning { .. } | StateError::Busy { .. }) => NEGATIVE,
        // A write that failed (a full disk, at start-up or in the last
        // flush of a stop): systemd's restart may find the space back.
        Fatal::State(StateError::Failed { .. }) => NEGATIVE,
        // Not fatal where it arises (a worker's upload); a retry may do.
        Fatal::State(StateError::NotQueued { .. }) => NEGATIVE,
        // The state failed for good while running (a corrupt or replaced
        // database): the restart moves aside or rebuilds it.
        Fatal::State(StateError::Restart { .. }) => NEGATIVE,
        // An unusable state_dir (missing, unwritable, a database that cannot
        // open): restarting does not help until ops fix it.
        Fatal::State(
            StateError::Unusable { .. } | StateError::Denied { .. } | StateError::Database { .. },
        ) => CONFIG,
        Fatal::Runtime(_) => NEGATIVE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn an_unusable_state_dir_is_a_configuration_error() {
        let e = Fatal::State(StateError::Unusable {
            dir: PathBuf::from("/x"),
            message: "Permission denied".into(),
        });
        assert_eq!(of_fatal(&e), CONFIG);
        let e = Fatal::State(StateError::AlreadyRunning {
            pid: 1,
            dir: PathBuf::from("/x"),
        });
        assert_eq!(of_fatal(&e), NEGATIVE);
        // A full disk is not a configuration: systemd restarts offloadd
        // (RestartPreventExitStatus=78 would keep it down for good).
        let e = Fatal::State(StateError::Failed {
            dir: PathBuf::from("/x"),
            message: "No space left on device".into(),
        });
        assert_eq!(of_fatal(&e), NEGATIVE);
        // The database failing to open on a full or failing disk too (it
        // was 78); a permission error stays a configuration error.
        let dir = std::path::Path::new("/x");
        for (errno, code) in [
            (libc::ENOSPC, NEGATIVE),
            (libc::EDQUOT, NEGATIVE),
            (libc::EIO, NEGATIVE),
            (libc::EACCES, CONFIG),
            (libc::EROFS, CONFIG),
        ] {
            let io = std::io::Error::from_raw_os_error(errno);
            let e = Fatal::State(StateError::of_io(dir, &io, io.to_string()));
            assert_eq!(of_fatal(&e), code, "{io}");
        }
    }
}
