//! Proof: crash at each failpoint, restart → nothing lost, nothing deleted
//! early, no duplicate record. Plus SIGKILL at random instants during a burst,
//! restart each time → every file uploaded.

mod common;
use common::*;
use rand::Rng;
use std::os::unix::process::ExitStatusExt;
use std::thread::sleep;
use std::time::Duration;

fn crash_at(failpoint: &str) {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let watch = DeleteWatch::start(&env, &s3);

    let mut daemon = Daemon::start(&env, &[("OFFLOADD_FAILPOINTS", failpoint)]);
    let mut files: Expected = Vec::new();
    for i in 0..12 {
        let rel = format!("fp/{}/file-{i:02}.jpg", i % 3);
        let bytes = file_content(&rel, 100, 100_000);
        write_file(&env.path(&rel), &bytes);
        watch.add(&rel, &bytes);
        files.push((rel, bytes));
    }
    let st = daemon.wait_exit(LONG).unwrap_or_else(|| {
        panic!(
            "daemon did not reach failpoint {failpoint}:\n{}",
            daemon.stderr()
        )
    });
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "failpoint {failpoint} kills with SIGKILL: {st:?}\n{}",
        daemon.stderr()
    );
    daemon.check_no_secret();
    drop(daemon);
    watch.assert_clean();

    // Restart without the failpoint: everything drains.
    let daemon = Daemon::start(&env, &[]);
    wait_all_uploaded(&s3, &files, LONG);
    wait_until(LONG, "all local copies deleted after verification", || {
        files.iter().all(|(rel, _)| !env.path(rel).exists())
    });
    let v = watch.finish();
    assert!(v.is_empty(), "deleted before the object existed: {v:#?}");
    daemon.stop();

    let st = env.status();
    assert_eq!(
        json_u64(&st, "uploaded_count"),
        files.len() as u64,
        "no duplicate or missing record: {st}"
    );
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(json_u64(&st, "uploaded_bytes"), total, "status: {st}");
    assert_eq!(json_u64(&st, "queue_depth"), 0, "status: {st}");
    assert!(json_array(&st, "failed").is_empty(), "status: {st}");
    for (rel, _) in files.iter().take(3) {
        assert_eq!(env.locate(rel), (0, public_url(rel)), "locate {rel}");
    }
}

/// A scheduler that dies (a panic) takes the daemon down with it, exit 1 and
/// one line saying so, rather than leaving a process that serves `status`
/// but never uploads again; what it was handed is found again after the
/// restart.
#[test]
fn a_scheduler_that_dies_stops_the_daemon_and_loses_nothing() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let mut daemon = Daemon::start(&env, &[("OFFLOADD_FAILPOINTS", "scheduler_panics")]);
    let bytes = file_content("dies/first.jpg", 100, 10_000);
    write_file(&env.path("dies/first.jpg"), &bytes);
    let st = daemon.wait_exit(LONG).unwrap_or_else(|| {
        panic!(
            "the daemon lived on without its scheduler:\n{}",
            daemon.stderr()
        )
    });
    let log = daemon.stderr();
    assert_eq!(st.code(), Some(1), "{st:?}\n{log}");
    assert!(
        log.contains("the scheduler failed")
            && log.contains("offloadd exits so that it is restarted"),
        "{log}"
    );
    daemon.check_no_secret();
    drop(daemon);

    let daemon = Daemon::start(&env, &[]);
    wait_all_uploaded(&s3, &[("dies/first.jpg".to_string(), bytes)], LONG);
    daemon.stop();
}

/// Any other task that dies (here the status publisher) also takes the
/// daemon down, so that systemd restarts it, rather than leaving a process
/// that answers `/healthz` without, say, its watcher.
#[test]
fn a_task_that_dies_stops_the_daemon() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let mut daemon = Daemon::start(&env, &[("OFFLOADD_FAILPOINTS", "status_panics")]);
    let st = daemon.wait_exit(LONG).unwrap_or_else(|| {
        panic!(
            "the daemon lived on without its status task:\n{}",
            daemon.stderr()
        )
    });
    let log = daemon.stderr();
    assert_eq!(st.code(), Some(1), "{st:?}\n{log}");
    assert!(
        log.contains("offloadd: the status task failed; offloadd exits so that it is restarted"),
        "{log}"
    );
    // Once: on a terminal the sentence is not also a log line.
    assert_eq!(log.matches("the status task failed").count(), 1, "{log}");
}

#[test]
fn crash_after_upload_before_record() {
    crash_at("after_upload_before_record");
}

#[test]
fn crash_after_record_before_delete() {
    crash_at("after_record_before_delete");
}

#[test]
fn crash_after_delete_before_mark() {
    crash_at("after_delete_before_mark");
}

#[test]
fn sigkill_at_random_instants_during_a_burst() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let watch = DeleteWatch::start(&env, &s3);
    let mut daemon = Daemon::start(&env, &[]);

    let files: Expected = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut files: Expected = Vec::new();
            for i in 0..200 {
                let rel = format!("burst/{:02}/f-{i:03}.png", i % 9);
                let bytes = file_content(&rel, 100, 40_000);
                write_file(&env.path(&rel), &bytes);
                watch.add(&rel, &bytes);
                files.push((rel, bytes));
                sleep(Duration::from_millis(15));
            }
            files
        });
        let kills = rand::thread_rng().gen_range(3..=4);
        for _ in 0..kills {
            sleep(Duration::from_millis(
                rand::thread_rng().gen_range(200..1500),
            ));
            daemon.kill_in_place();
            watch.assert_clean();
            daemon = Daemon::start(&env, &[]);
        }
        writer.join().unwrap()
    });

    wait_all_uploaded(&s3, &files, Duration::from_secs(240));
    wait_until(LONG, "all local copies deleted", || {
        files.iter().all(|(rel, _)| !env.path(rel).exists())
    });
    let v = watch.finish();
    assert!(v.is_empty(), "deleted before the object existed: {v:#?}");
    daemon.stop();
    let st = env.status();
    assert_eq!(
        json_u64(&st, "uploaded_count"),
        200,
        "one record per file: {st}"
    );
    assert_eq!(json_u64(&st, "queue_depth"), 0, "status: {st}");
    assert!(json_array(&st, "failed").is_empty(), "status: {st}");
}
