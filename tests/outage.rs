//! Proof: bucket unreachable mid-run → nothing lost or deleted meanwhile,
//! requests paced (no storm), everything drains when it returns.
//! A fault-injecting TCP proxy sits between the daemon and s3s-fs (which keeps
//! its data on disk).

mod common;
use common::*;
use std::thread::sleep;
use std::time::Duration;

/// Connections the daemon may open during an 8 s outage with 50 pending
/// files and max_backoff 2 s: paced probing, not one storm per file.
const MAX_ATTEMPTS_DURING_OUTAGE: usize = 30;

#[test]
fn bucket_unreachable_mid_run_then_drains() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let proxy = Proxy::start(s3.addr());
    let mut cfg = Cfg::new(&proxy.endpoint());
    cfg.delete_local = true;
    cfg.initial_backoff = "200ms".into();
    cfg.max_backoff = "2s".into();
    env.write_config(&cfg);
    let mut daemon = Daemon::start(&env, &[]);
    let watch = DeleteWatch::start(&env, &s3);

    // Warm up: the path works through the proxy.
    let mut before: Expected = Vec::new();
    for i in 0..5 {
        let rel = format!("warm/w{i}.jpg");
        let bytes = file_content(&rel, 100, 10_000);
        write_file(&env.path(&rel), &bytes);
        watch.add(&rel, &bytes);
        before.push((rel, bytes));
    }
    wait_all_uploaded(&s3, &before, LONG);
    wait_until(LONG, "warm-up files deleted", || {
        before.iter().all(|(r, _)| !env.path(r).exists())
    });

    // Outage.
    proxy.set_enabled(false);
    proxy.reset_attempts();
    let mut files: Expected = Vec::new();
    for i in 0..50 {
        let rel = format!("outage/{}/o{i:02}.jpg", i % 5);
        let bytes = file_content(&rel, 100, 20_000);
        write_file(&env.path(&rel), &bytes);
        watch.add(&rel, &bytes);
        files.push((rel, bytes));
    }
    sleep(Duration::from_secs(8));
    let attempts = proxy.attempts();
    eprintln!("connection attempts during the 8 s outage: {attempts}");
    assert!(daemon.alive(), "the daemon keeps running during an outage");
    for (rel, bytes) in &files {
        assert_eq!(
            std::fs::read(env.path(rel)).ok().as_deref(),
            Some(bytes.as_slice()),
            "{rel}: local file must stay untouched while the bucket is unreachable"
        );
        assert!(!s3.has(rel), "{rel} cannot be in the bucket yet");
    }
    watch.assert_clean();
    assert!(
        attempts <= MAX_ATTEMPTS_DURING_OUTAGE,
        "{attempts} connection attempts in 8 s of outage with 50 pending files: requests are not paced \
         (bound {MAX_ATTEMPTS_DURING_OUTAGE})"
    );
    assert!(
        attempts >= 1,
        "the daemon should probe the bucket during the outage"
    );

    // Back.
    proxy.set_enabled(true);
    wait_all_uploaded(&s3, &files, LONG);
    wait_until(LONG, "all local copies deleted", || {
        files.iter().all(|(r, _)| !env.path(r).exists())
    });
    let v = watch.finish();
    assert!(v.is_empty(), "deleted before the object existed: {v:#?}");
    daemon.stop();

    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 55, "status: {st}");
    assert_eq!(json_u64(&st, "queue_depth"), 0, "status: {st}");
    assert!(
        json_array(&st, "failed").is_empty(),
        "an outage parks nothing: {st}"
    );
    assert!(
        json_array(&st, "paused").is_empty(),
        "resumed after the outage: {st}"
    );
}

#[test]
fn server_restart_mid_run_loses_nothing() {
    // The server process itself goes away and comes back on the same port
    // and data directory.
    let env = TestEnv::new();
    let mut s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let mut daemon = Daemon::start(&env, &[]);
    let watch = DeleteWatch::start(&env, &s3);

    write_and_wait(&env, &s3, "pre.jpg", b"before the outage");
    s3.stop();
    let mut files: Expected = Vec::new();
    for i in 0..20 {
        let rel = format!("down/d{i:02}.jpg");
        let bytes = file_content(&rel, 100, 20_000);
        write_file(&env.path(&rel), &bytes);
        watch.add(&rel, &bytes);
        files.push((rel, bytes));
    }
    sleep(Duration::from_secs(5));
    assert!(
        daemon.alive(),
        "the daemon keeps running while the server is down"
    );
    assert!(
        files.iter().all(|(r, _)| env.path(r).exists()),
        "nothing deleted while the server is down"
    );
    s3.restart();
    wait_all_uploaded(&s3, &files, LONG);
    wait_until(LONG, "local copies deleted", || {
        files.iter().all(|(r, _)| !env.path(r).exists())
    });
    assert!(watch.finish().is_empty());
    daemon.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 21, "status: {st}");
}
