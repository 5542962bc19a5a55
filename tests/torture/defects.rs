//! One test per defect of the safety-core issue: each is a path on which a
//! file was lost, deleted too early, stuck, or misreported. Real binary, real
//! s3s-fs, real files. (Defects that need root live in `privileged`, the
//! poisoned object in `faults`; a failing queue write pausing the pipeline is
//! proven by the scheduler's unit tests with an injected state failure.)

use crate::common::*;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

fn multipart_cfg(endpoint: &str) -> Cfg {
    let mut cfg = Cfg::new(endpoint);
    cfg.multipart_threshold = Some("5MiB".into());
    cfg.part_size = Some("5MiB".into());
    cfg
}

/// Defect 1: a file reopened after its upload, and held open by its writer
/// past `settle` and `delete_after`, is neither uploaded torn nor deleted
/// while open; the writer's last bytes reach the bucket.
#[test]
fn a_reopened_file_is_never_deleted_while_open() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    cfg.delete_after = Some("2s".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let path = env.path("video/reopened.bin");
    let mut content = file_content("reopened", 1000, 2000);
    write_file(&path, &content);
    wait_until(LONG, "first version uploaded", || {
        s3.object_bytes("video/reopened.bin").as_deref() == Some(&content[..])
    });
    let mut w = fs::OpenOptions::new().append(true).open(&path).unwrap();
    for round in 0..3 {
        let more = random_bytes(3000);
        w.write_all(&more).unwrap();
        content.extend_from_slice(&more);
        // The writer pauses longer than settle and delete_after.
        sleep(Duration::from_secs(3));
        assert!(
            path.exists(),
            "deleted while open for writing (round {round})"
        );
    }
    let last = b"the writer's last bytes".to_vec();
    w.write_all(&last).unwrap();
    content.extend_from_slice(&last);
    drop(w);
    wait_until(LONG, "deleted once the final version is uploaded", || {
        !path.exists()
    });
    assert_eq!(
        s3.object_bytes("video/reopened.bin").as_deref(),
        Some(&content[..]),
        "the bucket holds every byte the writer wrote"
    );
    daemon.stop();
}

/// Defect 2: a new file renamed over the name of an uploaded one between the
/// delete's check and its unlink was deleted without being uploaded. Here
/// files are renamed over one name again and again while deletes run;
/// whenever the name is missing, the bucket must hold its last content.
/// (The delete sets a file aside before it checks it, and puts back one that
/// is not the uploaded one: that leaves the name missing for a moment with
/// nothing lost, so a missing name counts only if it is still missing a
/// moment later. The monitor holds `last` while it looks, and the writer
/// while it renames, so `last` is always what the name shows.)
#[test]
fn a_file_renamed_over_an_uploaded_name_is_never_deleted_unuploaded() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    cfg.settle = "100ms".into();
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let name = env.path("hot/name.jpg");
    fs::create_dir_all(name.parent().unwrap()).unwrap();
    let last: Arc<Mutex<Vec<u8>>> = Arc::new(Mutex::new(Vec::new()));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (last, violations, stop, name) =
            (last.clone(), violations.clone(), stop.clone(), name.clone());
        let object = s3.obj("hot/name.jpg");
        std::thread::spawn(move || {
            let lost = |expected: &Vec<u8>| {
                fs::symlink_metadata(&name).is_err()
                    && fs::read(&object).ok().as_ref() != Some(expected)
            };
            while !stop.load(Ordering::SeqCst) {
                {
                    let expected = last.lock().unwrap();
                    if !expected.is_empty() && lost(&expected) {
                        sleep(Duration::from_millis(100));
                        if lost(&expected) {
                            violations.lock().unwrap().push(
                                "the name was deleted while the bucket lacked its content"
                                    .to_string(),
                            );
                        }
                    }
                }
                sleep(Duration::from_millis(5));
            }
        })
    };
    let rounds = crate::scale(25, 200);
    for i in 0..rounds {
        let bytes = file_content(&format!("version {i}"), 100, 5000);
        let tmp = env.path(&format!("hot/.name.{i}.tmp"));
        fs::write(&tmp, &bytes).unwrap();
        {
            let mut shown = last.lock().unwrap();
            fs::rename(&tmp, &name).unwrap();
            *shown = bytes;
        }
        sleep(Duration::from_millis(rand::random::<u64>() % 400));
    }
    let final_bytes = last.lock().unwrap().clone();
    wait_until(LONG, "the last version offloaded", || {
        s3.object_bytes("hot/name.jpg").as_deref() == Some(&final_bytes[..]) && !name.exists()
    });
    stop.store(true, Ordering::SeqCst);
    monitor.join().unwrap();
    let v = violations.lock().unwrap().clone();
    assert!(v.is_empty(), "{v:?}");
    crate::figures("rename_over", &[("renames", rounds.to_string())]);
    daemon.stop();
}

/// Defect 4: deletes already pending stop when deletion is turned off, by
/// reload and by restart.
#[test]
fn pending_deletes_stop_when_deletion_is_turned_off() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    cfg.delete_after = Some("4s".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let mut files: Expected = Vec::new();
    for i in 0..5 {
        let rel = format!("reload/{i}.png");
        let bytes = file_content(&rel, 10, 1000);
        write_file(&env.path(&rel), &bytes);
        files.push((rel, bytes));
    }
    wait_all_uploaded(&s3, &files, LONG);
    cfg.delete_local = false;
    env.write_config(&cfg);
    daemon.reload_and_wait("configuration reloaded");
    sleep(Duration::from_secs(6));
    for (rel, _) in &files {
        assert!(
            env.path(rel).exists(),
            "{rel} deleted after deletion was turned off"
        );
    }
    let st = env.status();
    assert_eq!(
        json_u64(&st, "queue_depth"),
        0,
        "cancelled, not pending: {st}"
    );

    // The same across a restart.
    cfg.delete_local = true;
    cfg.delete_after = Some("4s".into());
    env.write_config(&cfg);
    daemon.reload_and_wait("configuration reloaded");
    let mut more: Expected = Vec::new();
    for i in 0..5 {
        let rel = format!("restart/{i}.png");
        let bytes = file_content(&rel, 10, 1000);
        write_file(&env.path(&rel), &bytes);
        more.push((rel, bytes));
    }
    wait_all_uploaded(&s3, &more, LONG);
    daemon.stop();
    cfg.delete_local = false;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    sleep(Duration::from_secs(6));
    for (rel, _) in &more {
        assert!(
            env.path(rel).exists(),
            "{rel} deleted after a restart with deletion off"
        );
    }
    daemon.stop();
}

/// Defect 6: a hard link into the tree (created, never closed) and a file a
/// writer keeps open are not stuck: the first is uploaded, the second is
/// listed as waiting for its writer and uploaded once closed.
#[test]
fn a_hard_link_and_a_file_never_closed_are_not_stuck() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    let outside = env.outside().join("original.bin");
    let linked = b"made elsewhere, linked in".to_vec();
    fs::write(&outside, &linked).unwrap();
    fs::hard_link(&outside, env.path("linked.bin")).unwrap();
    let open_path = env.path("open.bin");
    let mut w = fs::File::create(&open_path).unwrap();
    w.write_all(b"first half ").unwrap();
    wait_until(LONG, "the hard link uploaded", || {
        s3.object_bytes("linked.bin").as_deref() == Some(&linked[..])
    });
    wait_until(LONG, "status lists the open file", || {
        let st = env.status();
        json_u64(&st, "waiting_for_writer") >= 1
            && st["waiting_for_writer_sample"]
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p == "open.bin"))
    });
    assert!(!s3.has("open.bin"), "never uploaded while open");
    w.write_all(b"second half").unwrap();
    drop(w);
    wait_until(LONG, "uploaded once closed", || {
        s3.object_bytes("open.bin").as_deref() == Some(&b"first half second half"[..])
    });
    daemon.stop();
}

/// Defect 7: files written while in local mode are found when a provider is
/// active again, without waiting for a periodic rescan.
#[test]
fn files_written_in_local_mode_are_found_when_the_provider_returns() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let cfg = Cfg::new(&s3.endpoint());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "before.png", b"before");
    let yaml = env.config_yaml(&cfg);
    env.write_raw_config(&yaml.replace(&format!("active: {PROVIDER}"), "active: local"));
    daemon.reload_and_wait("configuration reloaded");
    let mut files: Expected = Vec::new();
    for i in 0..5 {
        let rel = format!("local-mode/{i}.png");
        let bytes = file_content(&rel, 10, 1000);
        write_file(&env.path(&rel), &bytes);
        files.push((rel, bytes));
    }
    sleep(Duration::from_secs(2));
    assert!(
        files.iter().all(|(r, _)| !s3.has(r)),
        "local mode uploads nothing"
    );
    env.write_raw_config(&yaml);
    daemon.reload_and_wait("configuration reloaded");
    wait_all_uploaded(&s3, &files, Duration::from_secs(30));
    daemon.stop();
}

/// Defect 8: after state loss, a multipart object is matched to its local
/// file by content, not by size: a same-size rewrite is uploaded again.
#[test]
fn a_same_size_rewrite_with_the_state_lost_is_uploaded_again() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&multipart_cfg(&s3.endpoint()));
    let daemon = Daemon::start(&env, &[]);
    let big = env.path("big/video.mp4");
    write_big_file(&big, 12 * 1024 * 1024 + 5);
    write_and_wait(&env, &s3, "small.txt", b"small and same size");
    wait_until(LONG, "big uploaded", || {
        s3.object_bytes("big/video.mp4")
            .is_some_and(|b| b == fs::read(&big).unwrap())
    });
    daemon.stop();

    // Rewritten in place, same sizes, while offloadd was stopped; then the
    // database is lost.
    write_big_file(&big, 12 * 1024 * 1024 + 5);
    fs::write(env.path("small.txt"), b"SMALL AND SAME SIZE").unwrap();
    fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "the rewritten files uploaded again", || {
        s3.object_bytes("big/video.mp4")
            .is_some_and(|b| b == fs::read(&big).unwrap())
            && s3.object_bytes("small.txt").as_deref() == Some(&b"SMALL AND SAME SIZE"[..])
    });
    let log = daemon.stop();
    assert!(log.contains("rebuild"), "{log}");
}

/// Defect 9: an upload id is durable before its first part, so a SIGKILL
/// right after the first part leaves no orphan: the upload resumes.
#[test]
fn a_kill_after_the_first_part_leaves_no_orphaned_upload() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&multipart_cfg(&s3.endpoint()));
    let big = killed_after_the_first_part(&env, "orphan.mp4");
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "uploaded", || {
        s3.object_bytes("orphan.mp4")
            .is_some_and(|b| b == fs::read(&big).unwrap())
    });
    daemon.stop();
    let pending = pending_uploads(&s3);
    assert!(
        pending.is_empty(),
        "orphaned multipart uploads: {pending:?}"
    );
}

/// An upload started on provider A and cut short is aborted on A when the
/// active provider has become B meanwhile (it was forgotten, its parts left
/// on A), and the file goes to B.
#[test]
fn an_upload_cut_short_before_a_switch_is_aborted_where_it_started() {
    let env = TestEnv::new();
    let s3a = S3Server::start_for(&env);
    let s3b = S3Server::start_for(&env);
    let second = ExtraProvider::second(s3b.endpoint());
    let base = env.config_yaml(&multipart_cfg(&s3a.endpoint()));
    env.write_raw_config(&env.with_provider(&base, &second, PROVIDER));
    let big = killed_after_the_first_part(&env, "switched.mp4");
    assert!(
        !pending_uploads(&s3a).is_empty(),
        "the cut-short upload is on A"
    );

    env.write_raw_config(&env.with_provider(&base, &second, "second"));
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "uploaded to B", || {
        s3b.object_bytes("switched.mp4")
            .is_some_and(|b| b == fs::read(&big).unwrap())
    });
    daemon.stop();
    assert!(!s3a.has("switched.mp4"));
    let pending = pending_uploads(&s3a);
    assert!(
        pending.is_empty(),
        "orphaned multipart uploads on A: {pending:?}"
    );
}

/// Writes a 16 MiB + 3 file `rel` and runs the daemon until the failpoint
/// kills it right after the first part; returns the file's path.
fn killed_after_the_first_part(env: &TestEnv, rel: &str) -> std::path::PathBuf {
    let mut daemon = Daemon::start(env, &[("OFFLOADD_FAILPOINTS", "after_first_part")]);
    let big = env.path(rel);
    write_big_file(&big, 16 * 1024 * 1024 + 3);
    daemon
        .wait_exit(LONG)
        .expect("the failpoint kills the daemon");
    big
}

/// The multipart uploads s3s-fs holds open (its `.upload-*` files).
fn pending_uploads(s3: &S3Server) -> Vec<String> {
    fs::read_dir(&s3.data_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload-"))
        .collect()
}

/// A TCP endpoint that accepts and never answers.
struct Hang {
    port: u16,
    _held: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Hang {
    fn start() -> Hang {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = held.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                h.lock().unwrap().push(s);
            }
        });
        Hang { port, _held: held }
    }
}

/// Defect 10: an unusable state_dir exits 78; while records are rebuilt from
/// the bucket `/r/` answers by predictable key; SIGTERM during the rebuild
/// stops the daemon cleanly.
#[test]
fn exit_78_for_state_dir_and_a_clean_stop_during_rebuild() {
    let env = TestEnv::new();
    let hang = Hang::start();
    let cfg = Cfg::new(&format!("http://127.0.0.1:{}", hang.port));
    // A state_dir that cannot be created.
    let file = env.dir.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let yaml = env.config_yaml(&cfg);
    env.write_raw_config(&yaml.replace(
        &format!("state_dir: {}", env.state_dir.display()),
        &format!("state_dir: {}/state", file.display()),
    ));
    let (code, _, err) = env.cli(&["run"]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("state_dir"), "{err}");

    // State lost in a managed state_dir: rebuild, against a bucket that hangs.
    let port = free_port();
    env.write_raw_config(&env.config_yaml_http(&cfg, port, Some(PUBLIC_URL)));
    fs::write(env.state_dir.join("managed-since"), "1\n").unwrap();
    let mut daemon = Daemon::spawn(&env, &[]);
    wait_until(LONG, "rebuild started", || {
        daemon.stderr().contains("rebuilding")
    });
    wait_http_ready(port);
    let r = http_get(port, "/r/some/file.png");
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some(public_url("some/file.png").as_str())
    );
    let t = Instant::now();
    daemon.signal(libc::SIGTERM);
    let st = daemon
        .wait_exit(Duration::from_secs(20))
        .expect("stops during the rebuild");
    assert_eq!(st.code(), Some(0), "{}", daemon.stderr());
    assert!(t.elapsed() < Duration::from_secs(15));
}

/// Defect 13: a directory removed (or moved away) and created again under the
/// same name is watched again.
#[test]
fn a_directory_created_again_under_the_same_name_is_watched() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint())); // no periodic rescan
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "d/first.png", b"1");
    fs::remove_dir_all(env.path("d")).unwrap();
    fs::create_dir(env.path("d")).unwrap();
    sleep(Duration::from_millis(500));
    write_file(&env.path("d/second.png"), b"2");
    wait_until(Duration::from_secs(30), "second.png in the new d", || {
        s3.object_bytes("d/second.png").as_deref() == Some(&b"2"[..])
    });
    fs::rename(env.path("d"), env.path("away")).unwrap();
    fs::create_dir(env.path("d")).unwrap();
    write_file(&env.path("d/third.png"), b"3");
    wait_until(
        Duration::from_secs(30),
        "third.png after a move away",
        || s3.object_bytes("d/third.png").as_deref() == Some(&b"3"[..]),
    );
    // A directory moved in and written into at once.
    let incoming = env.outside().join("incoming");
    fs::create_dir_all(&incoming).unwrap();
    fs::rename(&incoming, env.path("moved")).unwrap();
    write_file(&env.path("moved/at-once.png"), b"4");
    wait_until(
        Duration::from_secs(30),
        "written right after the move",
        || s3.object_bytes("moved/at-once.png").as_deref() == Some(&b"4"[..]),
    );
    daemon.stop();
}

/// Defect 15: a SIGKILL after CompleteMultipartUpload but before the record:
/// on restart the daemon finds the object already there instead of pausing
/// the provider over an upload id the server no longer knows.
#[test]
fn a_kill_after_complete_does_not_pause_the_provider() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&multipart_cfg(&s3.endpoint()));
    let mut daemon = Daemon::start(
        &env,
        &[("OFFLOADD_FAILPOINTS", "after_upload_before_record")],
    );
    let big = env.path("done.mp4");
    write_big_file(&big, 11 * 1024 * 1024);
    daemon
        .wait_exit(LONG)
        .expect("the failpoint kills the daemon");
    drop(daemon);
    // Progress of parts is not made durable each time: as after a crash
    // that lost the last of it, the item remembers only the first part.
    {
        use offloadd::keys::ItemKey;
        use offloadd::pipeline::queue::Queue;
        let (queue, _) = Queue::open(&env.state_dir).unwrap();
        let key = ItemKey::from_bytes(b"done.mp4".to_vec()).unwrap();
        let item = queue.item(&key).unwrap().expect("still queued");
        let mut progress = item.multipart().expect("an upload id").clone();
        progress.parts.truncate(1);
        queue.note_multipart(&key, &progress).unwrap();
        queue.flush().unwrap();
    }
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "after.png", b"others flow");
    wait_until(LONG, "recorded", || {
        env.locate("done.mp4").1 == public_url("done.mp4")
    });
    let log = daemon.stop();
    assert!(!log.contains("paused"), "the provider was paused: {log}");
    let st = env.status();
    assert!(json_array(&st, "failed").is_empty(), "{st}");
    assert_eq!(
        s3.object_bytes("done.mp4"),
        Some(fs::read(&big).unwrap()),
        "the object is the file"
    );
}

/// Defect 16: old files moved in are reported once with the backfill hint;
/// the status snapshot is written only when the control socket cannot be
/// bound, and then readable by owner and group only.
#[test]
fn old_files_moved_in_are_reported_and_the_snapshot_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let cfg = Cfg::new(&s3.endpoint());
    env.write_config(&cfg);
    // Older than the mark: made before the first start.
    let old = env.outside().join("archive");
    for i in 0..3 {
        write_file(&old.join(format!("{i}.png")), b"old");
    }
    let daemon = Daemon::start(&env, &[]);
    fs::rename(&old, env.path("archive")).unwrap();
    wait_until(LONG, "a notice in status", || {
        let st = env.status();
        st["notices"].as_array().is_some_and(|n| {
            n.iter().any(|t| {
                t.as_str().is_some_and(|t| {
                    t.contains("3 file(s) in archive") && t.contains("offloadd backfill")
                })
            })
        })
    });
    assert!(
        !env.state_dir.join("status.json").exists(),
        "no snapshot while the socket answers"
    );
    let log = daemon.stop();
    assert!(log.contains("older than the managed-since mark"), "{log}");

    // A control socket that cannot be bound: the snapshot, mode 0640.
    let yaml = env.config_yaml(&cfg);
    let blocker = env.dir.path().join("not-a-dir");
    fs::write(&blocker, b"").unwrap();
    env.write_raw_config(&yaml.replace(
        &format!("control_socket: {}", env.socket.display()),
        &format!("control_socket: {}/control.sock", blocker.display()),
    ));
    let daemon = Daemon::start(&env, &[]);
    let snap = env.state_dir.join("status.json");
    wait_until(LONG, "snapshot written", || snap.exists());
    assert_eq!(
        fs::metadata(&snap).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let st = env.status();
    assert_eq!(st["running"], true, "{st}");
    daemon.stop();
    assert!(!Path::new(&snap).exists(), "removed at exit");
}

/// The sled files damaged between runs: offloadd starts (moving the
/// database aside when sled calls it corrupt, rebuilding the records from the
/// bucket), or refuses with one sentence; nothing is lost either way and
/// `locate` keeps answering for offloaded files.
#[test]
fn damaged_database_files_between_runs_lose_nothing() {
    use std::io::{Seek, SeekFrom};
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let mut files: Expected = Vec::new();
    for i in 0..20 {
        let rel = format!("damaged/{i:02}.png");
        let bytes = file_content(&rel, 10, 5000);
        write_file(&env.path(&rel), &bytes);
        files.push((rel, bytes));
    }
    wait_all_uploaded(&s3, &files, LONG);
    wait_until(LONG, "deleted", || {
        files.iter().all(|(r, _)| !env.path(r).exists())
    });
    daemon.stop();

    // Garbage over the middle of every file of the database.
    let mut damaged = 0;
    for entry in walk_files(&env.state_dir.join("db")) {
        let len = fs::metadata(&entry).unwrap().len();
        if len < 64 {
            continue;
        }
        let mut f = fs::OpenOptions::new().write(true).open(&entry).unwrap();
        f.seek(SeekFrom::Start(len / 3)).unwrap();
        f.write_all(&random_bytes((len / 3).min(4096) as usize))
            .unwrap();
        damaged += 1;
    }
    assert!(damaged > 0);

    let mut daemon = Daemon::spawn(&env, &[]);
    let started = poll_until(Duration::from_secs(20), || {
        daemon.stderr().contains("offloadd started") || !daemon.alive()
    });
    assert!(started, "{}", daemon.stderr());
    if !daemon.alive() {
        let st = daemon.exit_status().unwrap();
        let err = daemon.stderr();
        assert_ne!(st.code(), Some(101), "a panic is not an answer: {err}");
        assert!(
            err.contains("state"),
            "one sentence naming the state: {err}"
        );
        return;
    }
    write_and_wait(&env, &s3, "damaged/after.png", b"still working");
    daemon.stop();
    for (rel, _) in &files {
        assert_eq!(env.locate(rel), (0, public_url(rel)), "{rel}");
    }
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
