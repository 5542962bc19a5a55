//! Proof: 500 small files written into nested directories while the daemon
//! runs all land in the bucket under prefix + relative path with equal bytes;
//! records exist (status) and `locate` prints the public URL.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

#[test]
fn five_hundred_nested_files_are_uploaded_recorded_and_locatable() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);

    let mut files: Expected = Vec::new();
    for i in 0..500 {
        let rel = format!("day-{:02}/job-{:02}/out-{i:03}.bin", i % 7, i % 13);
        let bytes = file_content(&rel, 16, 8 * 1024);
        write_file(&env.path(&rel), &bytes);
        files.push((rel, bytes));
    }
    wait_all_uploaded(&s3, &files, Duration::from_secs(240));

    // Nothing else in the bucket: every key is prefix + relative path.
    let keys = s3.keys(BUCKET);
    let expected_keys: std::collections::BTreeSet<String> =
        files.iter().map(|(r, _)| format!("{PREFIX}/{r}")).collect();
    assert_eq!(
        keys, expected_keys,
        "bucket holds exactly prefix/relative-path keys"
    );

    // Local copies are kept (delete_local: false).
    for (rel, bytes) in &files {
        assert_eq!(
            &std::fs::read(env.path(rel)).unwrap(),
            bytes,
            "{rel} kept locally"
        );
    }
    daemon.stop();

    let st = env.status();
    assert_eq!(st["running"], Value::Bool(false), "status: {st}");
    assert!(st["pid"].is_null(), "pid is null when stopped: {st}");
    assert_eq!(st["active_provider"], PROVIDER, "status: {st}");
    assert!(st["local_mode_reason"].is_null(), "status: {st}");
    assert_eq!(
        json_u64(&st, "uploaded_count"),
        500,
        "one record per file: {st}"
    );
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(json_u64(&st, "uploaded_bytes"), total, "status: {st}");
    assert_eq!(json_u64(&st, "queue_depth"), 0, "status: {st}");
    assert_eq!(json_u64(&st, "in_flight"), 0, "status: {st}");
    assert!(json_array(&st, "failed").is_empty(), "status: {st}");
    assert!(json_array(&st, "paused").is_empty(), "status: {st}");
    assert!(
        st.get("last_error").is_some(),
        "status has last_error: {st}"
    );

    // locate (daemon stopped) prints the public URL and exits 0.
    for (rel, _) in files.iter().step_by(50) {
        let (code, out) = env.locate(rel);
        assert_eq!(code, 0, "locate {rel}: {out}");
        assert_eq!(out, public_url(rel), "locate {rel}");
    }
    // An unknown path is a negative answer.
    let (code, out) = env.locate("no/such/file.bin");
    assert_eq!(code, 1, "locate of an unknown path exits 1: {out}");
}

#[test]
fn locate_percent_encodes_each_segment() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    let rel = "a dir/ümlaut & co+#1.png";
    write_and_wait(&env, &s3, rel, b"png bytes");
    daemon.stop();
    let (code, out) = env.locate(rel);
    assert_eq!(code, 0, "locate: {out}");
    assert_eq!(
        out,
        format!("{PUBLIC_URL}/{PREFIX}/a%20dir/%C3%BCmlaut%20%26%20co%2B%231.png"),
        "segments percent-encoded, `/` kept"
    );
}
