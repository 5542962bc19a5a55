//! Proof: wrong secret → provider paused with a reason naming the credentials
//! (status after stopping), items pending, local files untouched, daemon kept
//! running; with the secret fixed and a restart, everything drains.
//! s3s-fs checks signatures (wrong secret → 403 SignatureDoesNotMatch).
//! Also: no secret appears in any captured output (checked by the harness on
//! every daemon teardown and CLI call of the whole suite).

mod common;
use common::*;
use serde_json::Value;
use std::thread::sleep;
use std::time::Duration;

#[test]
fn wrong_secret_pauses_provider_then_fixed_secret_drains() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env); // knows env.secret
    let wrong = env.new_secret();
    env.set_secret_file(&wrong);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);

    let mut daemon = Daemon::start(&env, &[]);
    let watch = DeleteWatch::start(&env, &s3);
    let mut files: Expected = Vec::new();
    let mut mtimes = Vec::new();
    for i in 0..10 {
        let rel = format!("creds/c{i}.jpg");
        let bytes = file_content(&rel, 100, 20_000);
        write_file(&env.path(&rel), &bytes);
        watch.add(&rel, &bytes);
        mtimes.push(
            std::fs::metadata(env.path(&rel))
                .unwrap()
                .modified()
                .unwrap(),
        );
        files.push((rel, bytes));
    }
    sleep(Duration::from_secs(8));
    assert!(
        daemon.alive(),
        "a bad secret must not stop the daemon:\n{}",
        daemon.stderr()
    );
    assert!(
        s3.keys(BUCKET).is_empty(),
        "nothing can be uploaded with a wrong secret"
    );
    for ((rel, bytes), mtime) in files.iter().zip(&mtimes) {
        assert_eq!(
            std::fs::read(env.path(rel)).ok().as_deref(),
            Some(bytes.as_slice()),
            "{rel} untouched"
        );
        assert_eq!(
            std::fs::metadata(env.path(rel))
                .unwrap()
                .modified()
                .unwrap(),
            *mtime,
            "{rel} untouched"
        );
    }
    watch.assert_clean();
    daemon.stop();

    let st = env.status();
    let paused = json_array(&st, "paused");
    let entry = paused
        .iter()
        .find(|p| p["provider"] == PROVIDER)
        .unwrap_or_else(|| panic!("provider {PROVIDER} should be listed as paused: {st}"));
    let reason = entry["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        reason.contains("secret access key"),
        "pause reason names the credentials: {entry}"
    );
    assert!(
        entry.get("since").map(|s| !s.is_null()).unwrap_or(false),
        "paused entry has `since`: {entry}"
    );
    assert_eq!(
        json_u64(&st, "queue_depth"),
        10,
        "all ten items stay pending: {st}"
    );
    assert!(
        json_array(&st, "failed").is_empty(),
        "a provider-wide error parks no item: {st}"
    );
    assert_eq!(json_u64(&st, "uploaded_count"), 0, "status: {st}");

    // Fix the secret and restart: everything drains.
    env.set_secret_file(&env.secret);
    let daemon = Daemon::start(&env, &[]);
    wait_all_uploaded(&s3, &files, LONG);
    wait_until(LONG, "local copies deleted", || {
        files.iter().all(|(r, _)| !env.path(r).exists())
    });
    let v = watch.finish();
    assert!(v.is_empty(), "{v:#?}");
    daemon.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 10, "status: {st}");
    assert_eq!(json_u64(&st, "queue_depth"), 0, "status: {st}");
    assert!(
        json_array(&st, "paused").is_empty(),
        "no longer paused: {st}"
    );
    assert_eq!(st["active_provider"], Value::from(PROVIDER));
}

#[test]
fn secret_never_printed_by_check_config_or_status() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    // cli() asserts the secret is absent from stdout and stderr.
    let (code, out, err) = env.cli(&["check-config"]);
    assert_eq!(code, 0, "check-config on a valid config: {out}{err}");
    assert!(
        out.contains(PROVIDER) || err.contains(PROVIDER),
        "check-config describes the provider: {out}{err}"
    );
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "s.jpg", b"s");
    daemon.stop();
    let _ = env.status();
    let _ = env.cli(&["status"]);
    let _ = env.locate("s.jpg");
}

#[test]
fn secret_from_environment_variable_works() {
    // OFFLOADD_<PROVIDER>_SECRET_ACCESS_KEY: `local-s3` → LOCAL_S3.
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.with_secret_file = false;
    env.write_config(&cfg);
    let daemon = Daemon::start(
        &env,
        &[("OFFLOADD_LOCAL_S3_SECRET_ACCESS_KEY", env.secret.as_str())],
    );
    write_and_wait(&env, &s3, "env-secret.jpg", b"via env");
    daemon.stop();
}
