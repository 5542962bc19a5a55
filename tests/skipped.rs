//! Proof: a non-UTF-8 file name and a symlink pointing outside the root are
//! skipped with a reason in `status`; the daemon keeps going.

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
