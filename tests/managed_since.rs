//! Proof: files created while the daemon is stopped are uploaded after it
//! starts; files older than the managed-since mark (they existed before the
//! very first run) are left alone.

mod common;
use common::*;
use std::thread::sleep;
use std::time::Duration;

#[test]
fn files_created_while_stopped_are_uploaded_after_start() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));

    // First run sets the managed-since mark.
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "first.jpg", b"first");
    daemon.stop();

    let mut files: Expected = Vec::new();
    for i in 0..20 {
        let rel = format!("while-stopped/{}/s{i:02}.jpg", i % 4);
        let bytes = file_content(&rel, 10, 20_000);
        write_file(&env.path(&rel), &bytes);
        files.push((rel, bytes));
    }

    let daemon = Daemon::start(&env, &[]);
    wait_all_uploaded(&s3, &files, LONG);
    daemon.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 21, "status: {st}");
    assert_eq!(json_u64(&st, "queue_depth"), 0, "status: {st}");
    assert!(json_array(&st, "failed").is_empty(), "status: {st}");
}

#[test]
fn files_older_than_the_first_run_are_left_alone() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));

    let old = [
        "old.jpg",
        "archive/2023/old2.mp4",
        "archive/2024/deep/old3.png",
    ];
    for rel in old {
        write_file(&env.path(rel), format!("pre-existing {rel}").as_bytes());
    }
    // Keep clear of clock-granularity questions: the files are clearly older.
    sleep(Duration::from_millis(1500));

    let daemon = Daemon::start(&env, &[]);
    sleep(Duration::from_secs(1));
    write_and_wait(&env, &s3, "archive/new.jpg", b"new");
    sleep(Duration::from_secs(2));
    let keys = s3.keys(BUCKET);
    assert_eq!(
        keys.into_iter().collect::<Vec<_>>(),
        vec![format!("{PREFIX}/archive/new.jpg")],
        "files older than the managed-since mark must not be uploaded"
    );
    daemon.stop();

    // Also after a restart (catch-up scan) they stay alone.
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "archive/new2.jpg", b"new2");
    sleep(Duration::from_secs(2));
    assert_eq!(s3.keys(BUCKET).len(), 2, "keys: {:?}", s3.keys(BUCKET));
    daemon.stop();
    for rel in old {
        assert!(env.path(rel).exists(), "{rel} left alone locally");
    }
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 2, "status: {st}");
    assert_eq!(
        json_u64(&st, "queue_depth"),
        0,
        "old files are not queued: {st}"
    );
}

/// A reload refused on its way out of local mode sets no mark: what the
/// application writes in local mode after it is left to `backfill` at the
/// first good start, as if the refused reload had never been. It used to set
/// the mark, so those files were uploaded (and, with `delete_local`, deleted
/// locally) as new.
#[test]
fn a_refused_reload_out_of_local_mode_sets_no_mark() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let with_provider = env.config_yaml(&Cfg::new(&s3.endpoint()));
    env.write_raw_config(
        &with_provider.replace(&format!("  active: {PROVIDER}\n"), "  active: local\n"),
    );
    // The failpoint stands in for inotify out of file descriptors.
    let daemon = Daemon::start(&env, &[("OFFLOADD_FAILPOINTS", "watch_start_fails")]);
    env.write_raw_config(&with_provider);
    daemon.reload_and_wait("reload refused");
    daemon.stop();

    write_file(&env.path("local/era.jpg"), b"written in local mode");
    sleep(Duration::from_millis(1500));
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "new.jpg", b"new");
    sleep(Duration::from_secs(2));
    assert_eq!(
        s3.keys(BUCKET).into_iter().collect::<Vec<_>>(),
        vec![format!("{PREFIX}/new.jpg")],
        "a file written in local mode was uploaded as new"
    );
    assert!(env.path("local/era.jpg").exists());
    daemon.stop();
}
