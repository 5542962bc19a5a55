//! Proof: a file whose only change after its upload is its ctime (chmod,
//! chown, setfacl, a rename back) is examined again, but its body is not
//! sent again when the bucket holds exactly its bytes (the object is not
//! rewritten); other bytes in the bucket are replaced by the file's; with
//! `delete_local: true` the local copy still goes after `delete_after`.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn not_sent_line(rel: &str) -> String {
    format!("{rel} only changed its metadata; the bucket already holds these bytes, not sent again")
}

/// What changes when s3s-fs writes an object again: the inode and mtime of
/// its file.
fn object_stamp(s3: &S3Server, rel: &str) -> (u64, i64, i64) {
    let m = std::fs::metadata(s3.obj(rel)).expect("object file");
    (m.ino(), m.mtime(), m.mtime_nsec())
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// PUTs `body` to `rel`'s key through the S3 API, as another writer of the
/// bucket would.
fn put_object(s3: &S3Server, rel: &str, body: &[u8]) {
    let key = format!("{PREFIX}/{rel}");
    let status = common::put_object(
        &s3.endpoint(),
        &s3.access_key,
        &s3.secret_key,
        BUCKET,
        &key,
        body,
    );
    assert_eq!(status, 200);
}

fn wait_uploaded_line(daemon: &Daemon, rel: &str) {
    let line = format!("uploaded {rel}");
    wait_until(LONG, &line, || daemon.stderr().contains(&line));
}

#[test]
fn a_file_only_chmoded_after_its_upload_is_not_sent_again() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint()); // delete_local: false
    cfg.rescan_interval = "1s".into();
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);

    let rel = "meta/a.png";
    let bytes = file_content(rel, 20_000, 60_000);
    write_and_wait(&env, &s3, rel, &bytes);
    wait_uploaded_line(&daemon, rel);
    let stamp = object_stamp(&s3, rel);

    chmod(&env.path(rel), 0o600);
    let line = not_sent_line(rel);
    wait_until(LONG, "the not-sent line", || {
        daemon.stderr().contains(&line)
    });
    // The new identity is recorded: the next scans find the file offloaded
    // as it is, and look at the bucket no more.
    sleep(Duration::from_secs(3));
    let err = daemon.stop();
    assert_eq!(err.matches(&line).count(), 1, "{err}");
    assert_eq!(
        err.matches(&format!("uploaded {rel}")).count(),
        1,
        "uploaded once: {err}"
    );
    assert_eq!(
        object_stamp(&s3, rel),
        stamp,
        "the object was written again"
    );
    assert_eq!(s3.object_bytes(rel).as_deref(), Some(&bytes[..]));
    assert_eq!(std::fs::read(env.path(rel)).unwrap(), bytes, "kept locally");
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 1, "status: {st}");
    assert_eq!(json_u64(&st, "uploaded_bytes"), bytes.len() as u64);
}

/// Other bytes of the same size in the bucket (an ETag other than the
/// record's): the file is sent again and the bucket ends up with its bytes.
#[test]
fn a_chmoded_file_whose_object_was_replaced_is_sent_again() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.rescan_interval = "1s".into();
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);

    let rel = "meta/b.png";
    let bytes = file_content(rel, 20_000, 60_000);
    write_and_wait(&env, &s3, rel, &bytes);
    wait_uploaded_line(&daemon, rel);
    let marker = vec![b'M'; bytes.len()];
    put_object(&s3, rel, &marker);
    assert_eq!(s3.object_bytes(rel).as_deref(), Some(&marker[..]));

    chmod(&env.path(rel), 0o600);
    wait_until(LONG, "the file's bytes back in the bucket", || {
        s3.object_bytes(rel).as_deref() == Some(&bytes[..])
    });
    let err = daemon.stop();
    assert!(!err.contains(&not_sent_line(rel)), "{err}");
    assert_eq!(
        err.matches(&format!("uploaded {rel}")).count(),
        2,
        "uploaded again: {err}"
    );
}

/// `delete_local: true`: a chmod between the upload and its delete changes
/// nothing in the bucket, and the local copy still goes, `delete_after`
/// after the chmod (its ctime).
#[test]
fn a_file_chmoded_before_its_delete_is_deleted_without_being_sent_again() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    cfg.delete_after = Some("4s".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);

    let rel = "meta/c.png";
    let bytes = file_content(rel, 20_000, 60_000);
    write_and_wait(&env, &s3, rel, &bytes);
    wait_uploaded_line(&daemon, rel);
    let stamp = object_stamp(&s3, rel);
    chmod(&env.path(rel), 0o600);
    assert!(env.path(rel).exists(), "deleted before delete_after");

    wait_until(LONG, "the local copy deleted", || !env.path(rel).exists());
    let err = daemon.stop();
    assert!(err.contains(&not_sent_line(rel)), "{err}");
    assert_eq!(err.matches(&format!("uploaded {rel}")).count(), 1, "{err}");
    assert_eq!(
        object_stamp(&s3, rel),
        stamp,
        "the object was written again"
    );
    assert_eq!(s3.object_bytes(rel).as_deref(), Some(&bytes[..]));
    let (code, out) = env.locate(rel);
    assert_eq!((code, out), (0, public_url(rel)));
}

/// A multipart object: its composite ETag, with the part size the object
/// carries, is recomputed from the file.
#[test]
fn a_multipart_file_only_chmoded_is_not_sent_again() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.rescan_interval = "1s".into();
    cfg.multipart_threshold = Some("6MiB".into());
    cfg.part_size = Some("5MiB".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);

    let rel = "meta/big.mp4";
    let size = 12 * MIB + 321; // three parts
    write_big_file(&env.path(rel), size);
    wait_uploaded_line(&daemon, rel);
    let (_, etag, _) = s3.head(BUCKET, &format!("{PREFIX}/{rel}"));
    assert!(
        etag.as_deref().is_some_and(|e| e.ends_with("-3")),
        "{etag:?}"
    );
    let stamp = object_stamp(&s3, rel);

    chmod(&env.path(rel), 0o600);
    let line = not_sent_line(rel);
    wait_until(LONG, "the not-sent line", || {
        daemon.stderr().contains(&line)
    });
    sleep(Duration::from_secs(2));
    let err = daemon.stop();
    assert_eq!(err.matches(&line).count(), 1, "{err}");
    assert_eq!(err.matches(&format!("uploaded {rel}")).count(), 1, "{err}");
    assert_eq!(
        object_stamp(&s3, rel),
        stamp,
        "the object was written again"
    );
    assert!(files_equal(&env.path(rel), &s3.obj(rel)));
}
