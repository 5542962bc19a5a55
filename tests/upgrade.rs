//! A state_dir written by the version before records and queue items shared
//! one entry per file (sled trees `records` and `queue`; the fixture was made
//! by that version: one file uploaded and deleted locally, one parked for a
//! key over 1,024 bytes) keeps its records and its failed items, offline and
//! live, and is not rebuilt.

mod common;
use common::*;
use std::fs;
use std::path::Path;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/state-split-trees"
);

fn copy_fixture(state_dir: &Path) {
    for rel in ["db/conf", "db/db", "managed-since", "record-count"] {
        let to = state_dir.join(rel);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(Path::new(FIXTURE).join(rel), &to).unwrap();
    }
}

#[test]
fn a_state_dir_in_the_older_layout_keeps_its_records_and_failed_items() {
    let env = TestEnv::new();
    copy_fixture(&env.state_dir);
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let old = "renders/uploaded.png";

    // Offline, on the state itself.
    assert_eq!(env.locate(old), (0, public_url(old)));
    let status = env.status();
    assert_eq!(status["uploaded_count"], 1, "{status}");
    let failed = status["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{status}");
    assert!(
        failed[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("/too-long.png")
            && failed[0]["reason"]
                .as_str()
                .unwrap()
                .contains("over the 1,024-byte limit"),
        "{status}"
    );

    // Live: nothing is rebuilt (the bucket is empty: a rebuild would lose the
    // record), and new files go up beside the old record.
    let daemon = Daemon::start(&env, &[]);
    let bytes = file_content("new", 100, 4_000);
    write_file(&env.path("renders/new.png"), &bytes);
    wait_until(LONG, "renders/new.png uploaded", || {
        s3.object_bytes("renders/new.png").as_deref() == Some(bytes.as_slice())
    });
    assert_eq!(env.locate(old), (0, public_url(old)));
    assert_eq!(env.status()["uploaded_count"], 2);
    let log = daemon.stop();
    assert!(!log.contains("rebuild"), "{log}");
}
