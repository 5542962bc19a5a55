//! Proof that a key which may write but not read pauses the provider with
//! one reason when local copies are deleted (their uploads are verified by a
//! HEAD), instead of uploading every file again and again and parking it.
//! Uses moto_server, which enforces a bucket policy's Deny (s3s-fs has no
//! policies): PUT is allowed, HEAD and GET are refused with a bare 403.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Denies reading objects of [`BUCKET`] to everyone.
const DENY_READ: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Principal":"*","Action":["s3:GetObject","s3:HeadObject"],"Resource":"arn:aws:s3:::media/*"}]}"#;

/// `METHOD /media?policy` with `body`, unsigned (moto allows it); the status line.
fn bucket_policy(moto: &MotoServer, method: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", moto.port)).unwrap();
    write!(
        s,
        "{method} /{BUCKET}?policy HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        moto.port,
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_key_that_cannot_read_pauses_the_provider_when_copies_are_deleted() {
    let env = TestEnv::new();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let status = bucket_policy(&moto, "PUT", DENY_READ);
    assert!(status.contains(" 20"), "put bucket policy: {status}");
    let mut cfg = Cfg::new(&moto.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);

    let daemon = Daemon::start(&env, &[]);
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| {
            let rel = format!("img/r{i}.png");
            let bytes = file_content(&rel, 100, 5_000);
            write_file(&env.path(&rel), &bytes);
            (rel, bytes)
        })
        .collect();
    let reason = format!(
        "provider `{PROVIDER}` refused to show an object of bucket `{BUCKET}` (HTTP 403), so an upload cannot be verified before its local copy is deleted; grant the key s3:GetObject on the bucket"
    );
    wait_until(
        Duration::from_secs(60),
        "the provider paused for the read permission",
        || {
            json_array(&env.status(), "paused")
                .iter()
                .any(|p| p["provider"] == PROVIDER && p["reason"] == reason.as_str())
        },
    );
    // Strikes would park an item within a few seconds at this backoff.
    std::thread::sleep(Duration::from_secs(5));
    let st = env.status();
    assert!(
        json_array(&st, "failed").is_empty(),
        "a key that cannot read parks no item: {st}"
    );
    assert_eq!(json_u64(&st, "queue_depth"), 3, "status: {st}");
    for (rel, bytes) in &files {
        assert_eq!(
            std::fs::read(env.path(rel)).ok().as_deref(),
            Some(bytes.as_slice()),
            "{rel} stays while its upload cannot be verified"
        );
    }

    // The permission granted: the probe passes, uploads are verified and
    // local copies go.
    let status = bucket_policy(&moto, "DELETE", "");
    assert!(status.contains(" 20"), "delete bucket policy: {status}");
    wait_until(LONG, "local copies deleted", || {
        files.iter().all(|(r, _)| !env.path(r).exists())
    });
    for (rel, bytes) in &files {
        let key = format!("{PREFIX}/{rel}");
        let head = moto
            .head(BUCKET, &key)
            .unwrap_or_else(|| panic!("{key} in the bucket"));
        assert_eq!(head.content_length, Some(bytes.len() as i64), "{key}");
    }
    daemon.stop();
    let st = env.status();
    assert!(json_array(&st, "paused").is_empty(), "resumed: {st}");
    assert!(json_array(&st, "failed").is_empty(), "status: {st}");
    assert_eq!(json_u64(&st, "uploaded_count"), 3, "status: {st}");
}
