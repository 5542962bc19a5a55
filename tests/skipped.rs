//! Proof: a non-UTF-8 file name and a symlink pointing outside the root are
//! skipped with a reason in `status`; a folder the service may not read is
//! named in the log and `status`, with the fix; the daemon keeps going.

mod common;
use common::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::thread::sleep;
use std::time::Duration;

#[test]
fn non_utf8_name_and_outside_symlink_are_skipped_with_reasons() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let mut daemon = Daemon::start(&env, &[]);

    std::fs::create_dir_all(env.path("odd")).unwrap();
    let bad = env.path("odd").join(OsStr::from_bytes(b"bad\xff.png"));
    std::fs::write(&bad, b"latin-1 name").unwrap();

    let target = env.outside().join("secret-plans.png");
    std::fs::write(&target, b"outside the root").unwrap();
    std::os::unix::fs::symlink(&target, env.path("odd/link.png")).unwrap();

    sleep(Duration::from_secs(1));
    let good = file_content("good", 100, 5000);
    write_and_wait(&env, &s3, "odd/good.png", &good);
    sleep(Duration::from_secs(2));
    assert!(daemon.alive(), "the daemon keeps going");
    let keys = s3.keys(BUCKET);
    assert_eq!(keys.len(), 1, "only the good file is uploaded: {keys:?}");
    assert!(bad.exists() && env.path("odd/link.png").symlink_metadata().is_ok() && target.exists());
    daemon.stop();

    let st = env.status();
    let f = failed_with(&st, "not valid UTF-8")
        .unwrap_or_else(|| panic!("a failed entry for the non-UTF-8 name: {st}"));
    assert!(
        f["path"].as_str().unwrap_or_default().contains("bad"),
        "failed entry path: {f}"
    );
    let f = failed_with(&st, "symbolic link")
        .unwrap_or_else(|| panic!("a failed entry for the symlink: {st}"));
    assert!(
        f["path"].as_str().unwrap_or_default().contains("link.png"),
        "failed entry path: {f}"
    );
    assert_eq!(json_u64(&st, "uploaded_count"), 1, "status: {st}");

    // `locate` on the skipped symlink is not an offloaded file.
    let (code, out) = env.locate("odd/link.png");
    assert_ne!(
        out,
        public_url("odd/link.png"),
        "a skipped file has no URL (exit {code})"
    );
}

/// A test directory whose config, secret, state and root belong to nobody,
/// for a daemon run as nobody (`Daemon::spawn_as_nobody`); `None` (skip)
/// without root, except in CI.
fn served_as_nobody() -> Option<(TestEnv, S3Server)> {
    use std::os::unix::fs::chown;
    if !require(is_root(), "root (to run the daemon as nobody)") {
        return None;
    }
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    const NOBODY: u32 = 65534;
    // What the service needs: its config and secret, its state and socket
    // directories, and the root.
    for p in [
        &env.config_path,
        &env.secret_file,
        &env.state_dir,
        &env.root,
    ] {
        chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    mode(env.dir.path(), 0o777);
    Some((env, s3))
}

fn mode(p: &std::path::Path, m: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
}

/// The service user may not read one folder of the root: the log and
/// `status` name it and say what to do, its file stays, and the rest of the
/// tree is offloaded as ever.
#[test]
fn a_folder_the_service_may_not_read_is_named_with_the_fix() {
    let Some((env, s3)) = served_as_nobody() else {
        return;
    };
    // The application's folder, private to it (root here).
    let private = env.path("private");
    std::fs::create_dir(&private).unwrap();
    mode(&private, 0o700);

    let mut daemon = Daemon::spawn_as_nobody(&env);
    daemon.wait_ready();
    std::fs::write(private.join("late.png"), b"written after the start").unwrap();
    write_and_wait(&env, &s3, "public.png", b"anyone may read this");
    let expected = format!(
        "cannot read {}: permission denied; files in it are not offloaded until the service may read it",
        private.display()
    );
    wait_until(LONG, "the unreadable folder named in the log", || {
        daemon.stderr().contains(&expected)
    });
    let st = env.status();
    assert!(
        st["notices"].as_array().is_some_and(|n| n
            .iter()
            .any(|n| n.as_str().unwrap_or_default().contains(&expected))),
        "status names the folder: {st}"
    );
    assert!(daemon.alive(), "the daemon keeps going");
    assert_eq!(
        s3.keys(BUCKET).len(),
        1,
        "only the readable file is uploaded"
    );
    assert!(private.join("late.png").exists());
    daemon.stop();
}

/// A file the service user may not read is parked with what to do; once
/// fixed, `offloadd retry` uploads it.
#[test]
fn a_file_the_service_may_not_read_is_parked_with_the_fix_and_retried() {
    let Some((env, s3)) = served_as_nobody() else {
        return;
    };

    let mut daemon = Daemon::spawn_as_nobody(&env);
    daemon.wait_ready();
    let private = env.path("private.png");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&private)
            .unwrap();
        f.write_all(b"the application's alone").unwrap();
    }
    wait_until(LONG, "the unreadable file parked", || {
        failed_with(&env.status(), "permission denied").is_some()
    });
    let st = env.status();
    let reason = failed_with(&st, "permission denied").unwrap()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("give the offloadd user read access")
            && reason.ends_with("then run `offloadd retry`"),
        "{st}"
    );
    assert!(!s3.has("private.png"));

    mode(&private, 0o644);
    let (code, out, err) = env.cli(&["retry", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(LONG, "uploaded after the retry", || {
        s3.object_bytes("private.png").as_deref() == Some(&b"the application's alone"[..])
    });
    assert!(daemon.alive());
    daemon.stop();
}
