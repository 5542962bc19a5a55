//! The kill loop: a writer produces a mix of small files and files above
//! `multipart_threshold` while the daemon (with `delete_local: true`) is
//! SIGKILLed at random instants and restarted, `scale(5, 50)` times. A monitor
//! checks every 10 ms that no local file disappears unless its object is in
//! the bucket with equal bytes. At the end: nothing lost, nothing deleted
//! early, no object differs from its file, and `locate` answers the public
//! URL of every deleted file.

use crate::common::*;
use rand::Rng;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

#[test]
fn random_sigkills_lose_nothing_and_delete_nothing_early() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    cfg.multipart_threshold = Some("5MiB".into());
    cfg.part_size = Some("5MiB".into());
    cfg.workers = 8;
    env.write_config(&cfg);
    let watch = DeleteWatch::start(&env, &s3);
    let kills = crate::scale(5, 50);
    let started = Instant::now();
    let mut daemon = Daemon::start(&env, &[]);
    let writing = Arc::new(AtomicBool::new(true));

    let files: Expected = std::thread::scope(|scope| {
        let w = writing.clone();
        let watch = &watch;
        let env = &env;
        let writer = scope.spawn(move || {
            let mut files: Expected = Vec::new();
            let mut i = 0;
            let mut rng = rand::thread_rng();
            while w.load(Ordering::SeqCst) {
                let rel = format!("kill/{:02}/f-{i:05}.bin", i % 17);
                let bytes = if i % 25 == 7 {
                    // Above multipart_threshold: two or three parts.
                    file_content(&rel, 6 << 20, 12 << 20)
                } else {
                    file_content(&rel, 10, 120_000)
                };
                // Written whole under a temporary name, then renamed into place.
                let tmp = env.path(&format!("kill/.tmp-{i}"));
                write_file(&tmp, &bytes);
                std::fs::create_dir_all(env.path(&rel).parent().unwrap()).unwrap();
                std::fs::rename(&tmp, env.path(&rel)).unwrap();
                watch.add(&rel, &bytes);
                files.push((rel, bytes));
                i += 1;
                sleep(Duration::from_millis(rng.gen_range(5..40)));
            }
            files
        });
        for k in 0..kills {
            sleep(Duration::from_millis(
                rand::thread_rng().gen_range(300..2000),
            ));
            daemon.kill_in_place();
            watch.assert_clean();
            if k + 1 < kills {
                daemon = Daemon::start(env, &[]);
            }
        }
        writing.store(false, Ordering::SeqCst);
        let files = writer.join().unwrap();
        daemon = Daemon::start(env, &[]);
        files
    });

    wait_all_uploaded(&s3, &files, Duration::from_secs(600));
    wait_until(Duration::from_secs(300), "every local copy deleted", || {
        files.iter().all(|(rel, _)| !env.path(rel).exists())
    });
    let violations = watch.finish();
    daemon.stop();
    let lost = missing_objects(&s3, &files).len();
    let st = env.status();
    let mut unlocatable = 0;
    for (rel, _) in &files {
        if env.locate(rel) != (0, public_url(rel)) {
            unlocatable += 1;
        }
    }
    crate::figures(
        "kill_loop",
        &[
            ("files", files.len().to_string()),
            (
                "multipart_files",
                files
                    .iter()
                    .filter(|(_, b)| b.len() > 5 << 20)
                    .count()
                    .to_string(),
            ),
            ("kills", kills.to_string()),
            ("lost", lost.to_string()),
            ("early_deletes", violations.len().to_string()),
            ("unlocatable", unlocatable.to_string()),
            ("seconds", started.elapsed().as_secs().to_string()),
        ],
    );
    assert!(
        violations.is_empty(),
        "deleted before verified: {violations:#?}"
    );
    assert_eq!(lost, 0);
    assert_eq!(unlocatable, 0, "locate answers every deleted file");
    assert_eq!(
        json_u64(&st, "uploaded_count"),
        files.len() as u64,
        "one record per file: {st}"
    );
    assert_eq!(json_u64(&st, "queue_depth"), 0, "{st}");
    assert!(json_array(&st, "failed").is_empty(), "{st}");
}
