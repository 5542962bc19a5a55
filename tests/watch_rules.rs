//! Proof: what counts as a new, finished file.
//! - a file written slowly in several writes → only its final content uploaded
//! - a file renamed into place → uploaded under its final name only
//! - a directory moved in → all its files uploaded
//! - excluded names → never uploaded
//! - a file deleted before its upload → dropped quietly

mod common;
use common::*;
use std::fs;
use std::io::Write;
use std::thread::sleep;
use std::time::Duration;

#[test]
fn slow_writer_only_final_content_is_uploaded() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint())); // settle 300ms
    let rel = "renders/slow.mp4";
    let path = env.path(rel);
    // The directory exists (and is watched) before the writer starts, so the
    // daemon sees the file being created and written. (A file in a directory
    // created a moment earlier may be found by that directory's walk instead,
    // and scan-found files follow the size+mtime rule.)
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let daemon = Daemon::start(&env, &[]);
    let chunks: Vec<Vec<u8>> = (0..4)
        .map(|i| file_content(&format!("chunk {i}"), 64 * 1024, 64 * 1024))
        .collect();
    let mut f = fs::File::create(&path).unwrap();
    for (i, c) in chunks.iter().enumerate() {
        f.write_all(c).unwrap();
        f.flush().unwrap();
        // The writer pauses for much longer than `settle` while the file is open.
        sleep(Duration::from_secs(1));
        assert!(
            !s3.has(rel),
            "file still open for writing was uploaded after chunk {i} (pause longer than settle)"
        );
    }
    drop(f); // close after writing
    let full: Vec<u8> = chunks.concat();
    write_and_wait(&env, &s3, "renders/sentinel-after-slow.txt", b"sentinel");
    wait_until(LONG, "slow file uploaded", || s3.has(rel));
    // Give any torn re-upload a chance to show, then check the final bytes.
    sleep(Duration::from_secs(1));
    assert_eq!(
        s3.object_bytes(rel).unwrap(),
        full,
        "object has the final full content"
    );
    daemon.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 2, "status: {st}");
}

#[test]
fn renamed_into_place_uploaded_under_final_name_only() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);

    // Inside the tree: name.part (excluded) renamed to its final name.
    let bytes = file_content("x", 10_000, 50_000);
    write_file(&env.path("batch/x.part"), &bytes);
    sleep(Duration::from_secs(1)); // longer than settle: .part must still not go up
    fs::rename(env.path("batch/x.part"), env.path("batch/x.bin")).unwrap();

    // From outside the tree (same filesystem): a single file moved in.
    let outside = env.outside();
    let ybytes = file_content("y", 10_000, 50_000);
    write_file(&outside.join("y.bin"), &ybytes);
    sleep(Duration::from_millis(500));
    fs::rename(outside.join("y.bin"), env.path("batch/y.bin")).unwrap();

    wait_until(LONG, "x.bin uploaded", || {
        s3.object_bytes("batch/x.bin").as_deref() == Some(&bytes[..])
    });
    wait_until(LONG, "y.bin uploaded", || {
        s3.object_bytes("batch/y.bin").as_deref() == Some(&ybytes[..])
    });
    write_and_wait(&env, &s3, "batch/sentinel.txt", b"s");
    sleep(Duration::from_secs(1));
    let keys = s3.keys(BUCKET);
    assert!(
        !keys.iter().any(|k| k.ends_with(".part")),
        "a .part name was uploaded: {keys:?}"
    );
    assert_eq!(keys.len(), 3, "only x.bin, y.bin, sentinel: {keys:?}");
    daemon.stop();
}

#[test]
fn directory_moved_in_has_all_files_uploaded() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);

    // Prepared outside the root, on the same filesystem, after the daemon
    // started (so the files are new), then moved in with one rename.
    let staging = env.outside().join("batch-42");
    let mut files: Expected = Vec::new();
    for i in 0..30 {
        let sub = format!("{}/{}", ["a", "b", "c"][i % 3], ["x", "y"][i % 2]);
        let rel_in_batch = format!("{sub}/f{i:02}.jpg");
        let bytes = file_content(&rel_in_batch, 100, 20_000);
        write_file(&staging.join(&rel_in_batch), &bytes);
        files.push((format!("incoming/batch-42/{rel_in_batch}"), bytes));
    }
    sleep(Duration::from_millis(500));
    fs::create_dir_all(env.path("incoming")).unwrap();
    fs::rename(&staging, env.path("incoming/batch-42")).unwrap();

    wait_all_uploaded(&s3, &files, LONG);
    daemon.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 30, "status: {st}");
}

#[test]
fn excluded_names_are_never_uploaded() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);

    let excluded = [
        ".hidden",
        "a.tmp",
        "b.part",
        "c~",
        "sub/.hidden2",
        "sub/d.tmp",
        "sub/e.part",
        "sub/f.jpg~",
    ];
    for rel in excluded {
        write_file(&env.path(rel), format!("excluded {rel}").as_bytes());
    }
    sleep(Duration::from_secs(1)); // several times `settle`
    write_and_wait(&env, &s3, "sub/sentinel.jpg", b"sentinel");
    sleep(Duration::from_secs(2));
    let keys = s3.keys(BUCKET);
    assert_eq!(
        keys.into_iter().collect::<Vec<_>>(),
        vec![format!("{PREFIX}/sub/sentinel.jpg")],
        "only the sentinel may be in the bucket"
    );
    daemon.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 1, "status: {st}");
    assert_eq!(
        json_u64(&st, "queue_depth"),
        0,
        "excluded files are not queued: {st}"
    );
    for rel in excluded {
        assert!(env.path(rel).exists(), "{rel} left alone locally");
    }
}

#[test]
fn file_deleted_before_upload_is_dropped_quietly() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.settle = "1s".into();
    env.write_config(&cfg);
    let mut daemon = Daemon::start(&env, &[]);

    for i in 0..5 {
        let p = env.path(&format!("gone/vanish-{i}.png"));
        write_file(&p, b"short-lived");
        fs::remove_file(&p).unwrap();
    }
    write_and_wait(&env, &s3, "gone/sentinel.png", b"sentinel");
    sleep(Duration::from_secs(2));
    assert!(daemon.alive(), "daemon keeps running");
    let keys = s3.keys(BUCKET);
    assert_eq!(keys.len(), 1, "only the sentinel: {keys:?}");
    daemon.stop();
    let st = env.status();
    assert!(
        json_array(&st, "failed").is_empty(),
        "no failed entry for a vanished file: {st}"
    );
    assert_eq!(json_u64(&st, "queue_depth"), 0, "status: {st}");
    assert_eq!(json_u64(&st, "uploaded_count"), 1, "status: {st}");
}

#[test]
fn slow_writer_in_a_new_directory_ends_with_final_content() {
    // The directory is created just before the file, so the daemon finds the
    // file by walking the new directory (no events seen for it yet). The file
    // is still open for writing, so it must not be uploaded until it is
    // closed, however long the writer pauses.
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    let rel = "fresh-dir/slow.mp4";
    let path = env.path(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = fs::File::create(&path).unwrap();
    let mut full = Vec::new();
    for i in 0..4 {
        let c = file_content(&format!("chunk {i}"), 32 * 1024, 32 * 1024);
        f.write_all(&c).unwrap();
        full.extend_from_slice(&c);
        sleep(Duration::from_secs(1));
        assert!(
            !s3.has(rel),
            "{rel} was uploaded while still open for writing"
        );
    }
    drop(f);
    wait_until(LONG, "final content in the bucket", || {
        s3.object_bytes(rel).as_deref() == Some(&full[..])
    });
    daemon.stop();
}

/// A results directory is read all the time (a web server serving it): the
/// readers' opens and closes must not even reach the daemon (its inotify
/// watches do not ask for them), nor fill the event channel (that would drop
/// events and force rescans); a file finished meanwhile is found by its own
/// event.
#[test]
fn a_read_storm_drops_no_events() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let mut daemon = Daemon::start(&env, &[]);
    let served: Vec<_> = (0..20)
        .map(|i| {
            let p = env.path(&format!("served/{i}.jpg"));
            write_file(&p, &file_content(&format!("served {i}"), 1024, 4096));
            p
        })
        .collect();
    wait_until(Duration::from_secs(20), "the served files uploaded", || {
        (0..20).all(|i| s3.has(&format!("served/{i}.jpg")))
    });
    let masks = inotify_masks(daemon.pid);
    assert!(
        masks.len() >= 2,
        "expected watches on the root and served/, found {masks:x?}"
    );
    for mask in &masks {
        assert_eq!(
            mask & (IN_OPEN | IN_CLOSE_NOWRITE | IN_ACCESS),
            0,
            "an inotify watch asks for readers' events (mask {mask:#x})"
        );
        assert_ne!(
            mask & IN_CLOSE_WRITE,
            0,
            "a watch misses closes after writing (mask {mask:#x})"
        );
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                let mut opens = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for p in &served {
                        drop(fs::File::open(p).unwrap());
                        opens += 1;
                    }
                }
                opens
            })
        })
        .collect();
    sleep(Duration::from_secs(2));
    write_file(
        &env.path("new/during-storm.png"),
        b"written during the storm",
    );
    sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let opens: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(opens > 20_000, "only {opens} opens: not a storm");
    wait_until(
        Duration::from_secs(20),
        "the file written during the storm",
        || s3.has("new/during-storm.png"),
    );
    daemon.signal(libc::SIGTERM);
    daemon.wait_exit(Duration::from_secs(20));
    let log = daemon.stderr();
    assert!(
        !log.contains("some were dropped") && !log.contains("rescan"),
        "{opens} opens by readers made the daemon drop events or rescan:\n{log}"
    );
}

const IN_ACCESS: u32 = 0x1;
const IN_CLOSE_WRITE: u32 = 0x8;
const IN_CLOSE_NOWRITE: u32 = 0x10;
const IN_OPEN: u32 = 0x20;

/// The event masks of every inotify watch the process holds, as the kernel
/// reports them in /proc/PID/fdinfo ("inotify wd:1 ino:... mask:fce ...").
fn inotify_masks(pid: u32) -> Vec<u32> {
    let mut masks = Vec::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = fs::read_to_string(fd.unwrap().path()) else {
            continue;
        };
        for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
            let mask = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("mask:"))
                .unwrap_or_else(|| panic!("no mask in {line:?}"));
            masks.push(u32::from_str_radix(mask, 16).unwrap());
        }
    }
    masks
}
