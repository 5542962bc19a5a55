//! Proof for guarantee 8: when the database is lost, the location records are
//! rebuilt from the bucket listing, so offloaded files (even those whose local
//! copy is gone) are still located, and nothing is uploaded again.

mod common;
use common::*;
use std::fs;

#[test]
fn lost_database_is_rebuilt_from_the_bucket() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let rel = format!("r/{i}.png");
            let bytes = file_content(&rel, 100, 5_000);
            write_file(&env.path(&rel), &bytes);
            (rel, bytes)
        })
        .collect();
    for (rel, bytes) in &files {
        wait_until(LONG, rel, || {
            s3.object_bytes(rel).as_deref() == Some(bytes.as_slice()) && !env.path(rel).exists()
        });
    }
    daemon.stop();
    let stamps: Vec<_> = files
        .iter()
        .map(|(r, _)| fs::metadata(s3.obj(r)).unwrap().modified().unwrap())
        .collect();

    // Lose the database (the managed-since mark stays in state_dir).
    fs::remove_dir_all(env.state_dir.join("db")).unwrap();

    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "records rebuilt", || {
        env.status()["uploaded_count"] == files.len()
    });
    for (rel, _) in &files {
        assert_eq!(env.locate(rel), (0, public_url(rel)));
    }
    let again: Vec<_> = files
        .iter()
        .map(|(r, _)| fs::metadata(s3.obj(r)).unwrap().modified().unwrap())
        .collect();
    assert_eq!(stamps, again, "nothing was uploaded again");
    daemon.stop();
}
