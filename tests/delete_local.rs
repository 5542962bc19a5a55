//! Proof: `delete_local: true` → the local file disappears only after its
//! object is in the bucket with equal bytes; `false` → kept; a zero-byte file
//! → uploaded and kept locally.

mod common;
use common::*;
use std::thread::sleep;
use std::time::Duration;

#[test]
fn delete_local_true_deletes_only_after_verified_upload() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let watch = DeleteWatch::start(&env, &s3);

    let mut files: Expected = Vec::new();
    for i in 0..40 {
        let rel = format!("out/{}/img-{i:02}.webp", i % 4);
        // Mix of small and larger (up to 3 MiB) files.
        let bytes = if i % 10 == 0 {
            file_content(&rel, 1 << 20, 3 << 20)
        } else {
            file_content(&rel, 10, 30_000)
        };
        write_file(&env.path(&rel), &bytes);
        watch.add(&rel, &bytes);
        files.push((rel, bytes));
    }
    write_file(&env.path("out/empty.txt"), b"");

    wait_all_uploaded(&s3, &files, LONG);
    wait_until(LONG, "local copies deleted", || {
        files.iter().all(|(rel, _)| !env.path(rel).exists())
    });
    wait_until(LONG, "zero-byte file uploaded", || {
        s3.object_bytes("out/empty.txt").as_deref() == Some(&b""[..])
    });
    sleep(Duration::from_secs(2));
    assert!(
        env.path("out/empty.txt").exists(),
        "a zero-byte file is never deleted locally"
    );
    let v = watch.finish();
    assert!(
        v.is_empty(),
        "local files deleted before verified upload: {v:#?}"
    );
    daemon.stop();

    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 41, "status: {st}");
    assert!(json_array(&st, "failed").is_empty(), "status: {st}");
    // A deleted file is reachable by its URL.
    let (code, out) = env.locate(&files[3].0);
    assert_eq!(
        (code, out),
        (0, public_url(&files[3].0)),
        "locate of a deleted file"
    );
    let (code, out) = env.locate("out/empty.txt");
    assert_eq!(
        (code, out),
        (0, public_url("out/empty.txt")),
        "locate of the zero-byte file"
    );
}

#[test]
fn delete_local_false_keeps_files_and_zero_byte_is_uploaded() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint())); // delete_local: false
    let daemon = Daemon::start(&env, &[]);

    let mut files: Expected = Vec::new();
    for i in 0..10 {
        let rel = format!("keep/k{i}.png");
        let bytes = file_content(&rel, 10, 50_000);
        write_file(&env.path(&rel), &bytes);
        files.push((rel, bytes));
    }
    write_file(&env.path("keep/zero.png"), b"");
    files.push(("keep/zero.png".into(), Vec::new()));
    wait_all_uploaded(&s3, &files, LONG);
    sleep(Duration::from_secs(2));
    for (rel, bytes) in &files {
        assert_eq!(
            &std::fs::read(env.path(rel)).expect("kept locally"),
            bytes,
            "{rel} kept unchanged"
        );
    }
    daemon.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 11, "status: {st}");
}

/// `delete_after` counts from when a file came into the results directory
/// (its ctime), not from an old mtime it kept: a result moved in with a
/// two-hour-old mtime (`mv`, `rsync -t`) is uploaded and stays local for the
/// hour.
#[test]
fn delete_after_counts_from_when_a_file_was_moved_in() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    cfg.delete_after = Some("1h".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);

    let outside = env.dir.path().join("old.png");
    write_file(&outside, b"made two hours ago");
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&outside)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    std::fs::create_dir_all(env.path("moved")).unwrap();
    std::fs::rename(&outside, env.path("moved/old.png")).unwrap();

    wait_until(LONG, "moved/old.png uploaded", || {
        s3.object_bytes("moved/old.png").as_deref() == Some(&b"made two hours ago"[..])
    });
    sleep(Duration::from_secs(3));
    assert!(
        env.path("moved/old.png").exists(),
        "deleted although it came into the directory seconds ago"
    );
    daemon.stop();
}

/// What a crash between a delete's rename aside and its unlink leaves: the
/// uploaded file under a hidden name, set aside by a process that is gone.
/// With deletion turned off before the restart no delete attempt comes back
/// for it, so the start's scan puts it back under its name (its record names
/// that very file).
#[test]
fn a_file_a_crashed_delete_set_aside_is_back_after_a_restart() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "sub/a.png", b"set aside before the crash");
    daemon.stop();
    // The delete's rename aside, by pid 2147483646, above any pid_max: no
    // such process.
    let hidden = env.path("sub/.offloadd-del-2147483646-0-a.png");
    std::fs::rename(env.path("sub/a.png"), &hidden).unwrap();
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "sub/a.png back under its name", || {
        env.path("sub/a.png").exists()
    });
    assert_eq!(
        std::fs::read(env.path("sub/a.png")).unwrap(),
        b"set aside before the crash"
    );
    assert!(!hidden.exists());
    assert_eq!(
        s3.object_bytes("sub/a.png").as_deref(),
        Some(&b"set aside before the crash"[..])
    );
    daemon.stop();
}

/// A leftover whose version nothing tells (no upload recorded at its name:
/// `offloadd delete` removed it, or a lost database was not rebuilt) stays
/// hidden: put back, it could replace a newer object.
#[test]
fn a_leftover_no_record_tells_the_version_of_stays_hidden() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let hidden = env.path("sub/.offloadd-del-2147483646-0-a.png");
    write_file(&hidden, b"of no known version");
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "the scan to leave it, or not", || {
        daemon
            .stderr()
            .contains("the records no longer tell whether it is older")
            || env.path("sub/a.png").exists()
    });
    assert!(!env.path("sub/a.png").exists());
    assert_eq!(std::fs::read(&hidden).unwrap(), b"of no known version");
    assert!(!s3.has("sub/a.png"));
    // Maybe never uploaded: `status` says where it is.
    wait_until(LONG, "status to name it", || {
        env.status()["notices"].as_array().is_some_and(|n| {
            n.iter().any(|n| {
                n.as_str().is_some_and(|t| {
                    t.contains(&format!("{} holds a version of", hidden.display()))
                })
            })
        })
    });
    daemon.stop();
}

/// A crash between a delete's rename aside and its unlink leaves the
/// uploaded file hidden; the application then writes a newer file at the
/// name, which is uploaded and deleted in turn. The older one must not come
/// back: uploaded again, it would replace the newer object, whose only copy
/// is now the bucket's.
#[test]
fn an_older_version_a_crashed_delete_set_aside_never_replaces_a_newer_upload() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    // The crashed delete's process: alive while the newer file goes through
    // (so no scan takes its file back meanwhile), then gone.
    let mut crashed = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let hidden = env.path(&format!("sub/.offloadd-del-{}-0-a.png", crashed.id()));
    write_file(&hidden, b"the older version");
    sleep(Duration::from_millis(50));
    let daemon = Daemon::start(&env, &[]);
    write_file(&env.path("sub/a.png"), b"the newer version");
    wait_until(
        LONG,
        "the newer version uploaded and deleted locally",
        || {
            s3.object_bytes("sub/a.png").as_deref() == Some(&b"the newer version"[..])
                && !env.path("sub/a.png").exists()
        },
    );
    daemon.stop();
    crashed.kill().unwrap();
    crashed.wait().unwrap();

    let mut daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "the scan to leave the older version, or not", || {
        daemon
            .stderr()
            .contains("a newer file at that name was uploaded since")
            || s3.object_bytes("sub/a.png").as_deref() != Some(&b"the newer version"[..])
    });
    sleep(Duration::from_millis(500));
    assert_eq!(
        s3.object_bytes("sub/a.png").as_deref(),
        Some(&b"the newer version"[..])
    );
    assert!(!env.path("sub/a.png").exists());
    assert_eq!(std::fs::read(&hidden).unwrap(), b"the older version");
    daemon.check_no_secret();
    daemon.stop();

    // The database lost: the record rebuilt from the bucket has no file to
    // compare with, so nothing tells which version is newer.
    std::fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    let daemon = Daemon::start(&env, &[]);
    wait_until(
        LONG,
        "the scan after the rebuild to leave it, or not",
        || {
            daemon
                .stderr()
                .contains("the records no longer tell whether it is older")
                || s3.object_bytes("sub/a.png").as_deref() != Some(&b"the newer version"[..])
        },
    );
    sleep(Duration::from_millis(500));
    assert_eq!(
        s3.object_bytes("sub/a.png").as_deref(),
        Some(&b"the newer version"[..])
    );
    assert_eq!(std::fs::read(&hidden).unwrap(), b"the older version");
    daemon.stop();
}
