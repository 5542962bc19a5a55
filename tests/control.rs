//! Proof for the control API and the commands that act on the queue:
//! status/locate/retry live (over the socket) and stopped (on the state),
//! delete-through, backfill with and without --dry-run, and a caller of
//! another user refused.

mod common;
use common::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;

fn uploaded(env: &TestEnv, s3: &S3Server, rel: &str, bytes: &[u8]) {
    wait_until(LONG, &format!("{rel} uploaded"), || {
        s3.object_bytes(rel).as_deref() == Some(bytes)
    });
    wait_until(LONG, &format!("{rel} recorded"), || {
        env.locate(rel).1 == public_url(rel)
    });
}

#[test]
fn status_locate_and_retry_live_and_stopped() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);

    let ok = b"fine".to_vec();
    write_file(&env.path("a/ok.png"), &ok);
    let bad = std::ffi::OsStr::from_bytes(b"bad\xffname.png");
    fs::write(env.root.join(bad), b"x").unwrap();

    // Live: answered by the daemon over the socket (it holds the state).
    uploaded(&env, &s3, "a/ok.png", &ok);
    wait_until(LONG, "the bad name is listed as failed", || {
        env.status()["failed"]
            .as_array()
            .is_some_and(|f| f.len() == 1)
    });
    let st = env.status();
    assert_eq!(st["running"], true);
    assert_eq!(st["pid"], daemon.pid);
    assert_eq!(st["uploaded_count"], 1);
    assert_eq!(env.locate("a/ok.png"), (0, public_url("a/ok.png")));
    assert_eq!(env.locate("a/missing.png").0, 1);

    let (code, out, err) = env.cli(&["retry", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queued 1 failed item(s) again"), "{out}");
    let not_failed = "offloadd: a/ok.png is not a failed item, so nothing was queued again; `status` lists the failed ones\n";
    let (code, out, err) = env.cli(&["retry", "a/ok.png"]);
    assert_eq!((code, out.as_str(), err.as_str()), (1, "", not_failed));
    // The name is still not UTF-8, so it is parked again with its reason.
    wait_until(LONG, "re-parked after retry", || {
        env.status()["failed"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not valid UTF-8"))
    });
    daemon.stop();

    // Stopped: the same commands open the state directly.
    let st = env.status();
    assert_eq!(st["running"], false);
    assert_eq!(st["uploaded_count"], 1);
    assert_eq!(st["failed"].as_array().unwrap().len(), 1);
    assert_eq!(env.locate("a/ok.png"), (0, public_url("a/ok.png")));
    let (code, out, _) = env.cli(&["retry", "--all"]);
    assert_eq!(code, 0);
    assert!(out.contains("queued 1 failed item(s) again"), "{out}");
    assert_eq!(env.status()["failed"].as_array().unwrap().len(), 0);
    assert_eq!(env.status()["queue_depth"], 1);
    let (code, out, err) = env.cli(&["retry", "a/ok.png"]);
    assert_eq!((code, out.as_str(), err.as_str()), (1, "", not_failed));
}

#[test]
fn delete_through_removes_object_local_copy_and_record() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    let bytes = file_content("gone", 100, 1000);
    write_file(&env.path("x/gone.jpg"), &bytes);
    let keep = file_content("keep", 100, 1000);
    write_file(&env.path("x/keep.jpg"), &keep);
    uploaded(&env, &s3, "x/gone.jpg", &bytes);
    uploaded(&env, &s3, "x/keep.jpg", &keep);

    let (code, out, err) = env.cli(&["delete", "x/gone.jpg"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!s3.has("x/gone.jpg"), "object deleted");
    assert!(!env.path("x/gone.jpg").exists(), "local copy deleted");
    assert_eq!(env.locate("x/gone.jpg").0, 1, "record gone");
    assert!(s3.has("x/keep.jpg") && env.path("x/keep.jpg").exists());
    assert_eq!(env.status()["uploaded_count"], 1);
    let (code, _, err) = env.cli(&["delete", "x/never.jpg"]);
    assert_eq!(code, 1);
    assert!(err.contains("is unknown"), "{err}");
    // A folder inside the root that is a symlink to elsewhere is not followed.
    let outside = env.dir.path().join("outside");
    write_file(&outside.join("keep.jpg"), b"not ours");
    std::os::unix::fs::symlink(&outside, env.path("linked")).unwrap();
    let (code, _, err) = env.cli(&["delete", "linked/keep.jpg"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "a symlink, and offloadd does not follow symlinks inside the root; nothing was deleted"
        ),
        "{err}"
    );
    assert_eq!(fs::read(outside.join("keep.jpg")).unwrap(), b"not ours");
    daemon.stop();

    // Stopped: delete-through works on the state directly.
    let (code, out, err) = env.cli(&["delete", "x/keep.jpg"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!s3.has("x/keep.jpg") && !env.path("x/keep.jpg").exists());
    assert_eq!(env.status()["uploaded_count"], 0);
}

#[test]
fn backfill_queues_files_older_than_the_mark() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let old: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            let rel = format!("old/{i}.png");
            let bytes = file_content(&rel, 10, 500);
            write_file(&env.path(&rel), &bytes);
            (rel, bytes)
        })
        .collect();
    // The first run sets the managed-since mark after these files existed.
    let daemon = Daemon::start(&env, &[]);
    write_file(&env.path("new.png"), b"new");
    wait_until(LONG, "new file uploaded", || s3.has("new.png"));
    assert!(
        old.iter().all(|(r, _)| !s3.has(r)),
        "old files are left alone"
    );

    let (code, out, err) = env.cli(&["backfill", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("5 file(s) would be queued"), "{out}");
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(
        old.iter().all(|(r, _)| !s3.has(r)),
        "dry run uploads nothing"
    );

    // Live backfill; a second dry run then finds nothing left to queue.
    let (code, out, err) = env.cli(&["backfill"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("backfill: 5 of 5 file(s) queued"), "{out}");
    for (rel, bytes) in &old {
        wait_until(LONG, rel, || s3.object_bytes(rel).as_deref() == Some(bytes));
    }
    let (_, out, _) = env.cli(&["backfill", "--dry-run"]);
    assert!(out.contains("0 file(s) would be queued"), "{out}");
    daemon.stop();
}

#[test]
fn backfill_in_local_mode_is_refused_live_and_stopped() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let cfg = Cfg::new(&s3.endpoint());
    env.write_config(&cfg);
    write_file(&env.path("pre/a.png"), b"aaa");
    Daemon::start(&env, &[]).stop(); // sets the managed-since mark
    env.write_raw_config(
        &env.config_yaml(&cfg)
            .replace(&format!("  active: {PROVIDER}\n"), "  active: local\n"),
    );
    let refused = || {
        let (code, out, err) = env.cli(&["backfill"]);
        assert_eq!(code, 78, "{out}{err}");
        assert!(
            err.contains("backfill needs an active provider: `storage.active` is `local`"),
            "{err}"
        );
    };
    let daemon = Daemon::start(&env, &[]);
    refused();
    daemon.stop();
    refused();
    assert_eq!(env.status()["queue_depth"], 0);
}

#[test]
fn offline_backfill_is_uploaded_at_next_start() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    write_file(&env.path("pre/a.png"), b"aaa");
    let daemon = Daemon::start(&env, &[]);
    daemon.stop();
    let (code, out, err) = env.cli(&["backfill"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 of 1 file(s) queued; they upload when offloadd runs"),
        "{out}"
    );
    assert!(!s3.has("pre/a.png"));
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "backfilled file uploaded", || s3.has("pre/a.png"));
    daemon.stop();
}

#[test]
fn control_socket_refuses_another_user() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "socket exists", || env.socket.exists());
    let as_nobody = || {
        let (code, _, err) = offloadd_as_nobody_output(&env, &["status"]);
        (code, err)
    };
    // The socket is 0660: the kernel refuses the connection.
    let (code, err) = as_nobody();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("permission denied on the control socket"),
        "{err}"
    );
    // Even with the file opened up, the daemon checks peer credentials.
    fs::set_permissions(&env.socket, fs::Permissions::from_mode(0o666)).unwrap();
    let (code, err) = as_nobody();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("only answers root and the offloadd user and group"),
        "{err}"
    );
    env.assert_no_secret("setpriv stderr", &err);
    daemon.stop();
}

#[test]
fn test_connection_runs_inside_the_daemon_with_its_credentials() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.with_secret_file = false;
    env.write_config(&cfg);
    // Only the daemon has the secret (as a systemd credential would be).
    let var = "OFFLOADD_LOCAL_S3_SECRET_ACCESS_KEY";
    let daemon = Daemon::start(&env, &[(var, env.secret.as_str())]);
    wait_until(LONG, "socket exists", || env.socket.exists());
    let (code, out, err) = env.cli(&["test-connection"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("passed"), "{out}");
    // backfill asks the daemon whether it offloads, not the CLI's own secret.
    let (code, out, err) = env.cli(&["backfill", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 file(s) would be queued"), "{out}");
    daemon.stop();
    // Without the daemon, the CLI has no secret: the provider is incomplete.
    let (code, out, err) = env.cli(&["test-connection"]);
    assert_eq!(code, 78, "{out}{err}");
    assert!(err.contains("secret"), "{err}");
    // Yet the service may have one the CLI cannot read: backfill still queues.
    let (code, out, err) = env.cli(&["backfill", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
}

/// Whatever is at the `control_socket` path and is not a socket (a file a
/// mistyped path points at) is left as it is: the daemon runs without its
/// socket, says so, and `status` answers from the snapshot. It used to be
/// deleted to make room for the socket.
#[test]
fn a_file_at_the_control_socket_path_is_never_deleted() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    fs::write(&env.socket, b"somebody's notes").unwrap();
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "a.png", b"uploaded all the same");
    assert_eq!(fs::read(&env.socket).unwrap(), b"somebody's notes");
    wait_until(LONG, "status from the snapshot", || {
        env.status()["running"] == true
    });
    let log = daemon.stop();
    assert!(
        log.contains("something other than a socket is there"),
        "{log}"
    );
    assert_eq!(fs::read(&env.socket).unwrap(), b"somebody's notes");
}

/// `backfill` run by a user who may not read the state_dir says so and
/// fails: it used to take the unreadable mark for none, answer "nothing to
/// backfill" and exit 0, so an operator took the migration for done.
#[test]
fn backfill_that_cannot_read_the_mark_says_so() {
    if !require(is_root(), "root (to run backfill as nobody)") {
        return;
    }
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    write_file(&env.path("pre/a.png"), b"aaa");
    let daemon = Daemon::start(&env, &[]);
    daemon.stop();
    // `nobody` reaches the config, but not into the state_dir.
    fs::set_permissions(&env.state_dir, fs::Permissions::from_mode(0o700)).unwrap();
    let (code, stdout, stderr) = offloadd_as_nobody_output(&env, &["backfill"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("cannot read ")
            && stderr.contains("managed-since: Permission denied")
            && stderr.contains("run backfill as root or as a member of the service's group"),
        "{stderr}"
    );
    assert!(!stdout.contains("nothing to backfill"), "{stdout}");
}

/// Sends one raw request line over the control socket, as a client other
/// than our CLI could, and reads the reply line (within `within`).
fn raw_request(
    env: &TestEnv,
    body: serde_json::Value,
    within: std::time::Duration,
) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut envelope = body;
    envelope["state_dir"] = serde_json::Value::from(env.state_dir.to_str().unwrap());
    let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(format!("{envelope}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut reply)
        .unwrap_or_else(|e| panic!("no answer within {within:?}: {e}"));
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

/// A backfill path with `..` sent over the socket is refused whole: it used
/// to be parked as a failed entry, telling whether a file outside the root
/// exists.
#[test]
fn backfill_paths_leaving_the_root_are_refused() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    fs::write(env.outside().join("secret.png"), b"outside").unwrap();
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "socket exists", || env.socket.exists());
    for dry_run in [false, true] {
        let reply = raw_request(
            &env,
            serde_json::json!({
                "op": "enqueue",
                "keys": [b"../outside/secret.png".to_vec()],
                "dry_run": dry_run,
            }),
            std::time::Duration::from_secs(30),
        );
        assert_eq!(reply["exit"], 2, "{reply}");
        assert_eq!(
            reply["err"],
            "offloadd: the path `../outside/secret.png` has an empty, `.` or `..` component; give a plain relative path, e.g. images/a.png\n",
            "{reply}"
        );
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    let st = env.status();
    assert_eq!(st["failed"].as_array().unwrap().len(), 0, "{st}");
    assert_eq!(st["queue_depth"], 0, "{st}");
    assert!(s3.keys(BUCKET).is_empty());
    daemon.stop();
}

/// What stops the local removal and can be known beforehand (here a
/// directory where the file was) is found before the bucket is touched: the
/// object and the record stay. It used to delete the object first and keep
/// a record naming a missing object.
#[test]
fn delete_through_checks_the_local_copy_before_the_bucket() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    let bytes = file_content("dir", 100, 1000);
    write_file(&env.path("x/a.jpg"), &bytes);
    uploaded(&env, &s3, "x/a.jpg", &bytes);
    fs::remove_file(env.path("x/a.jpg")).unwrap();
    write_file(&env.path("x/a.jpg/inside.txt"), b"not offloadd's");

    let (code, out, err) = env.cli(&["delete", "x/a.jpg"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "offloadd: cannot delete {}: it is a directory, and offloadd deletes only files; nothing was deleted\n",
            env.path("x/a.jpg").display()
        )
    );
    assert_eq!(s3.object_bytes("x/a.jpg").as_deref(), Some(&bytes[..]));
    assert_eq!(env.locate("x/a.jpg"), (0, public_url("x/a.jpg")));
    assert!(env.path("x/a.jpg/inside.txt").exists());
    daemon.stop();
}

/// Whether `chattr +i` works here (root, and a file system that has it).
fn chattr(flag: &str, path: &std::path::Path) -> bool {
    std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

/// Clears the immutable flag of its path when dropped.
struct Unchattr(std::path::PathBuf);

impl Drop for Unchattr {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

/// A local copy that cannot be removed once its object is gone (an
/// immutable file: nothing tells beforehand) loses its record too, and the
/// operator is told: the record used to stay, naming a missing object, so
/// `locate` and `/r/` handed out a dead URL and the file was never uploaded
/// again.
#[test]
fn delete_through_forgets_the_record_when_only_the_object_could_go() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    let bytes = file_content("stuck", 100, 1000);
    let local = env.path("x/stuck.jpg");
    write_file(&local, &bytes);
    uploaded(&env, &s3, "x/stuck.jpg", &bytes);
    if !require(
        chattr("+i", &local),
        "chattr +i (root, and a file system with the immutable flag)",
    ) {
        daemon.stop();
        return;
    }

    // Cleared however the test ends: an immutable file outlives its
    // temporary folder.
    let mutable_again = Unchattr(local.clone());
    let (code, out, err) = env.cli(&["delete", "x/stuck.jpg"]);
    drop(mutable_again);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(out, "");
    assert_eq!(
        err,
        format!(
            "deleted object {PREFIX}/x/stuck.jpg at provider {PROVIDER}\noffloadd: cannot delete {}: Operation not permitted (os error 1); its object is gone, so its record was removed too and offloadd treats the file as never offloaded (a scan may upload it again): delete it by hand\n",
            local.display()
        )
    );
    assert!(!s3.has("x/stuck.jpg"), "object deleted");
    assert_eq!(fs::read(&local).unwrap(), bytes, "local copy kept");
    // No record: locate names the local copy, not a dead URL.
    assert_eq!(env.locate("x/stuck.jpg"), (0, local.display().to_string()));
    assert_eq!(env.status()["uploaded_count"], 0);
    daemon.stop();
}

/// While the records are rebuilt (here a bucket that never answers its
/// listing), retry, delete and backfill are refused at once; they used to
/// wait for the scheduler, the CLI gave up, and the delete ran when the
/// rebuild ended, long after the operator saw it fail.
#[test]
fn commands_that_need_the_scheduler_are_refused_while_rebuilding() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "kept.png", b"still here");
    daemon.stop();
    fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    // Accepts connections (the kernel's backlog) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    env.write_config(&Cfg::new(&endpoint));
    let mut daemon = Daemon::spawn(&env, &[]);
    wait_until(LONG, "rebuilding", || {
        env.socket.exists() && env.status()["rebuilding"].as_str().is_some()
    });

    let refusal = "offloadd: offloadd is rebuilding its location records from the bucket (0/0); try again when `status` no longer says rebuilding\n";
    let at_once = std::time::Duration::from_secs(10);
    for request in [
        serde_json::json!({"op": "retry", "path": null, "all": true}),
        serde_json::json!({"op": "delete", "path": "kept.png"}),
        serde_json::json!({"op": "enqueue", "keys": [b"kept.png".to_vec()], "dry_run": true}),
    ] {
        let reply = raw_request(&env, request.clone(), at_once);
        assert_eq!(reply["exit"], 1, "{request}: {reply}");
        assert_eq!(reply["err"], refusal, "{request}: {reply}");
    }
    let (code, out, err) = env.cli(&["delete", "kept.png"]);
    assert_eq!((code, out.as_str(), err.as_str()), (1, "", refusal));

    // The listing fails, the rebuild ends, and nothing asked meanwhile runs.
    drop(silent);
    wait_until(LONG, "the rebuild ended", || {
        env.status()["rebuilding"].is_null()
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(fs::read(env.path("kept.png")).unwrap(), b"still here");
    assert!(daemon.alive());
    daemon.stop();
}
