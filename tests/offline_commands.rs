//! Proof: the commands that open a stopped daemon's state themselves
//! (`status`, `locate`, `backfill`) leave it usable by the service: run as
//! root, they work as the state's owner and leave no root-owned file behind;
//! run by a user who may not open it, they say what to do; and an offline
//! backfill, however long, does not keep a starting daemon out.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;

/// A test directory whose config, secret, state and root belong to nobody
/// (the service user here), the state_dir 0750 as `StateDirectoryMode=`
/// makes it; `None` (skip) without root, except in CI.
fn served_as_nobody() -> Option<(TestEnv, S3Server)> {
    use std::os::unix::fs::chown;
    if !require(is_root(), "root (to run the daemon as nobody)") {
        return None;
    }
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    for p in [
        &env.config_path,
        &env.secret_file,
        &env.state_dir,
        &env.root,
    ] {
        chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    mode(env.dir.path(), 0o777);
    mode(&env.state_dir, 0o750);
    Some((env, s3))
}

fn mode(p: &Path, m: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
}

/// Everything under `dir` (itself included) that root owns.
fn owned_by_root(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.uid() == 0 {
            found.push(p.clone());
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
    found
}

/// `sudo offloadd status` (and `locate`, `backfill`) on a stopped daemon
/// leaves no file under state_dir that root owns, and the service starts
/// again. They used to: sled's new snapshot, `record-count`, a new database
/// were root's, and under the units' UMask=0077 the service then stopped at
/// its next start with "Permission denied" (exit 78, not restarted).
#[test]
fn commands_run_as_root_leave_the_state_to_the_service() {
    let Some((env, s3)) = served_as_nobody() else {
        return;
    };
    write_file(&env.path("pre/old.png"), b"there before offloadd");
    let mut daemon = Daemon::spawn_as_nobody(&env);
    daemon.wait_ready();
    write_and_wait(&env, &s3, "first.png", b"uploaded by the service");
    daemon.stop();
    assert_eq!(owned_by_root(&env.state_dir), Vec::<PathBuf>::new());

    let (code, out, err) = env.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("offloadd is not running"), "{out}");
    assert!(out.contains("uploaded: 1 files"), "{out}");
    assert_eq!(env.locate("first.png"), (0, public_url("first.png")));
    let (code, out, err) = env.cli(&["backfill"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("backfill: 1 of 1 file(s) queued; they upload when offloadd runs"),
        "{out}"
    );
    assert_eq!(
        owned_by_root(&env.state_dir),
        Vec::<PathBuf>::new(),
        "root-owned files in the state_dir"
    );

    let mut daemon = Daemon::spawn_as_nobody(&env);
    daemon.wait_ready();
    write_and_wait(&env, &s3, "second.png", b"uploaded after the commands");
    wait_until(LONG, "the backfilled file uploaded", || {
        s3.object_bytes("pre/old.png").as_deref() == Some(&b"there before offloadd"[..])
    });
    assert!(daemon.alive());
    daemon.stop();
}

/// A member of the service's group (not root, not the service user) on a
/// stopped daemon may read the lock but not open the state for writing: it
/// is told so and to run the command as root or as the service user, not
/// to "make it writable by the offloadd user" (the daemon's fix).
#[test]
fn a_group_member_is_told_to_run_the_command_as_root_or_the_service_user() {
    let Some((env, s3)) = served_as_nobody() else {
        return;
    };
    let mut daemon = Daemon::spawn_as_nobody(&env);
    daemon.wait_ready();
    write_and_wait(&env, &s3, "first.png", b"uploaded by the service");
    daemon.stop();
    mode(&env.config_path, 0o644);
    // uid 65533, in the service's group (nobody's, 65534) only.
    let as_member = |args: &[&str]| output_of(offloadd_as(&env, 65533, 65534).args(args));
    let expected = format!(
        "offloadd: offloadd is not running (nothing answers on its control socket) and this user may not open its state in {} (Permission denied (os error 13)); run the command as root or as the service user\n",
        env.state_dir.display()
    );
    for args in [&["status"][..], &["locate", "first.png"]] {
        let (code, out, err) = as_member(args);
        assert_eq!(code, Some(1), "{args:?}: {out}{err}");
        assert_eq!(err, expected, "{args:?}");
    }
}

/// Whether some process holds the state_dir's lock.
fn lock_held(state_dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(offloadd::statedir::Lock::path(state_dir)) else {
        return false;
    };
    // SAFETY: flock on a valid, owned file descriptor; closing it releases.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_SH | libc::LOCK_NB,
        )
    };
    rc != 0
}

/// An offline backfill longer than a starting daemon's patience (10 s) no
/// longer keeps it out: it holds the lock a moment at a time, the daemon
/// starts, backfill stops saying so, and run again it queues the rest
/// through the daemon; every file is uploaded. The daemon used to exit 1
/// ("kept state_dir open for more than 10 s") and, restarted every 5 s by
/// systemd, hit the start limit.
#[test]
fn a_daemon_starting_during_a_long_offline_backfill_starts() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let old: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| {
            let rel = format!("old/{i}.png");
            let bytes = file_content(&rel, 10, 200);
            write_file(&env.path(&rel), &bytes);
            (rel, bytes)
        })
        .collect();
    // The first run sets the managed-since mark after these files existed.
    Daemon::start(&env, &[]).stop();

    std::thread::scope(|scope| {
        // 50 ms a file: 20 s of admitting.
        let backfill = scope.spawn(|| {
            env.cli_os_env(
                &[std::ffi::OsStr::new("backfill")],
                &[("OFFLOADD_FAILPOINTS", "backfill_admits_slowly")],
            )
        });
        wait_until(LONG, "backfill holding the state", || {
            lock_held(&env.state_dir)
        });
        let started = Instant::now();
        let mut daemon = Daemon::spawn(&env, &[]);
        wait_until(LONG, "the daemon started", || {
            assert!(
                daemon.alive(),
                "the daemon exited while backfill ran:\n{}",
                daemon.stderr()
            );
            daemon.stderr().contains("offloadd started")
        });
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the daemon waited {:?} for backfill",
            started.elapsed()
        );
        let (code, out, err) = backfill.join().unwrap();
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.contains("offloadd: offloadd started while backfill ran (")
                && err.ends_with(
                    " file(s) queued by then); run backfill again to let the daemon queue the rest\n"
                ),
            "{err}"
        );
        let (code, out, err) = env.cli(&["backfill"]);
        assert_eq!(code, 0, "{out}{err}");
        wait_all_uploaded(&s3, &old, LONG);
        assert!(daemon.alive());
        daemon.stop();
    });
}
