//! Proof for guarantee 8: when the database is lost, the location records are
//! rebuilt from the bucket listing, so offloaded files (even those whose local
//! copy is gone) are still located, and nothing is uploaded again.

mod common;
use common::*;
use std::fs;

/// A test directory with moto as its S3 server (moto lists ETags, which
/// proving a local file equal to its object needs; s3s-fs does not).
fn on_moto() -> (TestEnv, MotoServer, Cfg) {
    let env = TestEnv::new();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let cfg = Cfg::new(&moto.endpoint());
    (env, moto, cfg)
}

/// `n` files `r/{i}.png` written, uploaded and deleted locally (the
/// config has `delete_local: true`).
fn offloaded_and_deleted(env: &TestEnv, s3: &S3Server, n: usize) -> Vec<(String, Vec<u8>)> {
    let files: Vec<(String, Vec<u8>)> = (0..n)
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
    files
}

#[test]
fn lost_database_is_rebuilt_from_the_bucket() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let files = offloaded_and_deleted(&env, &s3, 6);
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

/// A rebuild that proves a local file equal to its object may delete it
/// (`delete_local: true`), but never a zero-byte file. On moto: s3s-fs lists
/// no ETags, so nothing could be proven equal there.
#[test]
fn a_rebuild_never_deletes_a_zero_byte_file() {
    let (env, moto, mut cfg) = on_moto();
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let full = file_content("full.png", 100, 5_000);
    write_file(&env.path("full.png"), &full);
    write_file(&env.path("empty.png"), b"");
    let head = |rel: &str| moto.head(BUCKET, &format!("{PREFIX}/{rel}"));
    wait_until(LONG, "both uploaded", || {
        head("full.png").is_some() && head("empty.png").is_some()
    });
    daemon.stop();

    fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "the proven non-empty copy deleted", || {
        !env.path("full.png").exists()
    });
    wait_until(LONG, "records rebuilt", || {
        env.status()["uploaded_count"] == 2
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let log = daemon.stop();
    assert!(
        log.contains("restored=2"),
        "both proven by the rebuild: {log}"
    );
    assert!(
        env.path("empty.png").exists(),
        "a zero-byte file is never deleted locally: {log}"
    );
}

/// The config of two providers with `delete_local`: A (`PROVIDER`, at
/// endpoint `a`) and B (`second`, at endpoint `b`), the one named active.
fn two_providers<'a>(env: &'a TestEnv, a: &str, b: &str) -> impl Fn(&str) -> String + 'a {
    let mut cfg = Cfg::new(a);
    cfg.delete_local = true;
    let second = ExtraProvider::second(b.to_string());
    let base = env.config_yaml(&cfg);
    move |active| env.with_provider(&base, &second, active)
}

/// Runs the daemon on `config` until `rel`, written with `bytes`, is in `s3`
/// and deleted locally.
fn offload_via(env: &TestEnv, s3: &S3Server, config: &str, rel: &str, bytes: &[u8]) {
    offload_until(env, config, rel, bytes, || {
        s3.object_bytes(rel).as_deref() == Some(bytes)
    });
}

/// Runs the daemon on `config` until `rel`, written with `bytes`, is
/// `uploaded` and deleted locally.
fn offload_until(
    env: &TestEnv,
    config: &str,
    rel: &str,
    bytes: &[u8],
    uploaded: impl Fn() -> bool,
) {
    env.write_raw_config(config);
    let daemon = Daemon::start(env, &[]);
    write_file(&env.path(rel), bytes);
    wait_until(LONG, &format!("{rel} uploaded, deleted locally"), || {
        uploaded() && !env.path(rel).exists()
    });
    daemon.stop();
}

/// Guarantee 8 with two providers: files offloaded to A (local copies
/// deleted) before the active provider became B keep A's record after the
/// database is lost: the rebuild lists every provider, not only the active,
/// and A retired (`enabled: false`, as the README says to keep its section)
/// too. A retired provider used to be left out, and its records were lost
/// for good.
#[test]
fn a_rebuild_restores_records_of_every_provider() {
    let env = TestEnv::new();
    let s3a = S3Server::start_for(&env);
    let s3b = S3Server::start_for(&env);
    let config = two_providers(&env, &s3a.endpoint(), &s3b.endpoint());
    let bytes = file_content("a.png", 100, 5_000);
    offload_via(&env, &s3a, &config(PROVIDER), "old/a.png", &bytes);
    offload_via(&env, &s3b, &config("second"), "new/b.png", b"to B");

    fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    let retired = with_provider_lines(&config("second"), "      enabled: false\n");
    env.write_raw_config(&retired);
    let (code, out, err) = env.cli(&["check-config"]);
    assert!(
        out.contains(&format!(
            "provider {PROVIDER}\n  kind:       minio\n  enabled:    no\n"
        )),
        "A is retired: {code} {out}{err}"
    );
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "records rebuilt", || {
        env.status()["uploaded_count"] == 2
    });
    assert_eq!(env.locate("old/a.png"), (0, public_url("old/a.png")));
    assert_eq!(
        env.locate("new/b.png"),
        (0, format!("{SECOND_PUBLIC_URL}/{PREFIX}/new/b.png"))
    );
    assert!(!s3b.has("old/a.png"), "nothing was uploaded again");
    daemon.stop();
}

/// The active provider's listing decides first. Here a path went to A, then
/// (written again) to B, the active one; with the database lost, B cannot be
/// listed at the first start. The rebuild used to list A all the same, and
/// A's older object took the record, which B's listing at the next start
/// then skipped: `locate` and `/r/` pointed at A for good.
#[test]
fn an_unlisted_active_provider_leaves_the_others_for_later() {
    let env = TestEnv::new();
    let s3a = S3Server::start_for(&env);
    let mut s3b = S3Server::start_for(&env);
    let config = two_providers(&env, &s3a.endpoint(), &s3b.endpoint());
    offload_via(
        &env,
        &s3a,
        &config(PROVIDER),
        "x.png",
        b"first version, to A",
    );
    offload_via(
        &env,
        &s3b,
        &config("second"),
        "x.png",
        b"second version, to B",
    );

    fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    s3b.stop();
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "B's listing failed", || {
        daemon
            .stderr()
            .contains("the rebuild runs again at the next start")
    });
    daemon.stop();
    s3b.restart();
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "records rebuilt", || {
        env.status()["uploaded_count"] == 1
    });
    assert_eq!(
        env.locate("x.png"),
        (0, format!("{SECOND_PUBLIC_URL}/{PREFIX}/x.png")),
        "the record names B, which holds the current version"
    );
    daemon.stop();
}

/// With its local copy gone, a path's record goes to its newest object
/// across the providers. Here `x.png` went to A, then (written again) to B,
/// then A became the active provider again, and the database was lost. The
/// rebuild lists A first, and A's older object used to take the record,
/// which B's listing then skipped: `locate` and `/r/` served the old bytes.
/// On two moto servers: they list LastModified (to the second, hence the
/// pause between the uploads).
#[test]
fn a_rebuild_restores_the_newest_upload_of_a_gone_file() {
    let env = TestEnv::new();
    let (moto_a, moto_b) = (MotoServer::start(), MotoServer::start());
    moto_a.create_bucket(BUCKET);
    moto_b.create_bucket(BUCKET);
    let config = two_providers(&env, &moto_a.endpoint(), &moto_b.endpoint());
    let key = format!("{PREFIX}/x.png");
    let etag_in = |moto: &MotoServer| {
        let head = moto.head(BUCKET, &key)?;
        Some(head.e_tag?.trim_matches('"').to_string())
    };
    let etag_of = |bytes: &[u8]| {
        use md5::{Digest, Md5};
        Some(hex::encode(Md5::digest(bytes)))
    };
    let (old, new) = (b"first version, to A", b"second version, to B");
    offload_until(&env, &config(PROVIDER), "x.png", old, || {
        etag_in(&moto_a) == etag_of(old)
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    offload_until(&env, &config("second"), "x.png", new, || {
        etag_in(&moto_b) == etag_of(new)
    });

    env.write_raw_config(&config(PROVIDER));
    fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "both providers listed", || {
        daemon.stderr().matches("rebuild finished").count() == 2
    });
    let located = env.locate("x.png");
    let count = env.status()["uploaded_count"].clone();
    let log = daemon.stop();
    assert_eq!(
        located,
        (0, format!("{SECOND_PUBLIC_URL}/{PREFIX}/x.png")),
        "the record names B, which holds the newer version: {log}"
    );
    assert_eq!(count, 1, "{log}");
    assert_eq!(etag_in(&moto_b), etag_of(new), "B holds the newer bytes");
    assert_eq!(etag_in(&moto_a), etag_of(old), "nothing was uploaded again");
}

/// A rebuild follows no symlink inside the root: an object whose path goes
/// through a symlinked folder names a file outside the tree offloadd manages,
/// which is never deleted, even proven equal with `delete_local: true`. It
/// was: the rebuild restored a record through the link and deleted the file
/// outside the root. On moto, which lists ETags (s3s-fs does not).
#[test]
fn a_rebuild_never_deletes_through_a_symlinked_folder() {
    let (env, moto, mut cfg) = on_moto();
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let bytes = file_content("arch/a.png", 100, 5_000);
    write_file(&env.path("arch/a.png"), &bytes);
    wait_until(LONG, "uploaded", || {
        moto.head(BUCKET, &format!("{PREFIX}/arch/a.png")).is_some()
    });
    daemon.stop();

    // The folder moves out of the root, and a symlink takes its place.
    let outside = env.outside().join("arch");
    fs::rename(env.path("arch"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, env.path("arch")).unwrap();
    fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "the rebuild finished", || {
        daemon.stderr().contains("rebuild finished")
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let log = daemon.stop();
    assert_eq!(
        fs::read(outside.join("a.png")).ok().as_deref(),
        Some(bytes.as_slice()),
        "the file outside the root is kept: {log}"
    );
}

/// Files older than the managed-since mark are left for `backfill`, after a
/// database loss too: whether its object (another tool's, say) has the same
/// bytes or not, a file is neither uploaded over it nor deleted
/// (`delete_local` notwithstanding), and gets no record, so that `backfill`
/// still takes it. Both files used to be deleted, and the differing object
/// overwritten.
#[test]
fn a_rebuild_leaves_files_older_than_the_mark_to_backfill() {
    let (env, moto, mut cfg) = on_moto();
    cfg.delete_local = true;
    env.write_config(&cfg);
    write_file(&env.path("same.png"), b"same bytes");
    write_file(&env.path("other.png"), b"local bytes");
    moto.put(BUCKET, &format!("{PREFIX}/same.png"), b"same bytes");
    let theirs = b"another tool's bytes";
    moto.put(BUCKET, &format!("{PREFIX}/other.png"), theirs);
    // Managed since later than both files were written, and no database.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let later_ns = later
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    fs::write(env.state_dir.join("managed-since"), later_ns.to_string()).unwrap();

    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "the rebuild finished", || {
        daemon.stderr().contains("rebuild finished")
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(env.status()["uploaded_count"], 0, "no record");
    let (code, out, err) = env.cli(&["backfill", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 file(s)"), "both left for backfill: {out}");
    let log = daemon.stop();
    assert!(env.path("same.png").exists(), "left for backfill: {log}");
    assert!(env.path("other.png").exists(), "left for backfill: {log}");
    let head = moto
        .head(BUCKET, &format!("{PREFIX}/other.png"))
        .expect("their object is still there");
    assert_eq!(
        head.content_length,
        Some(theirs.len() as i64),
        "not uploaded over: {log}"
    );
}

/// A database lost while the config is in local mode: no bucket is listed,
/// and the log says when the records come back and what answers meanwhile;
/// the first start with a provider rebuilds them.
#[test]
fn a_database_lost_in_local_mode_is_rebuilt_at_the_next_start_with_a_provider() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    write_file(&env.path("a.png"), b"offloaded before the loss");
    wait_until(LONG, "a.png offloaded", || {
        s3.has("a.png") && !env.path("a.png").exists()
    });
    daemon.stop();
    fs::remove_dir_all(env.state_dir.join("db")).unwrap();

    let with_provider = env.config_yaml(&cfg);
    env.write_raw_config(
        &with_provider.replace(&format!("  active: {PROVIDER}\n"), "  active: local\n"),
    );
    let daemon = Daemon::start(&env, &[]);
    assert_eq!(env.locate("a.png").0, 1, "no record while in local mode");
    let log = daemon.stop();
    assert!(
        log.contains("in local mode no bucket is listed: the location records are rebuilt at the first start with an active provider"),
        "{log}"
    );
    assert!(
        !log.contains("rebuilding location records from the bucket listing"),
        "{log}"
    );

    env.write_raw_config(&with_provider);
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "records rebuilt", || {
        env.status()["uploaded_count"] == 1
    });
    assert_eq!(env.locate("a.png"), (0, public_url("a.png")));
    daemon.stop();
}

/// Offloads a file under each of `names` (deleted locally once uploaded),
/// loses the database, and checks that the rebuild gives every path back
/// its record, with the URL it had, and no record to any other path.
fn rebuild_maps_every_name_back(env: &TestEnv, mut cfg: Cfg, names: &[&str]) {
    cfg.delete_local = true;
    env.write_config(&cfg);
    let daemon = Daemon::start(env, &[]);
    for (i, name) in names.iter().enumerate() {
        write_file(&env.path(name), format!("file {i}").as_bytes());
    }
    for name in names {
        wait_until(LONG, &format!("{name:?} uploaded, deleted locally"), || {
            !env.path(name).exists()
        });
    }
    let before: Vec<_> = names.iter().map(|n| env.locate(n)).collect();
    let log = daemon.stop();
    for (name, (code, url)) in names.iter().zip(&before) {
        assert_eq!(
            *code, 0,
            "{name:?} has a record before the loss: {url} {log}"
        );
    }

    fs::remove_dir_all(env.state_dir.join("db")).unwrap();
    let daemon = Daemon::start(env, &[]);
    wait_until(LONG, "the rebuild finished", || {
        daemon.stderr().contains("rebuild finished")
    });
    let after: Vec<_> = names.iter().map(|n| env.locate(n)).collect();
    let count = env.status()["uploaded_count"].clone();
    let log = daemon.stop();
    for ((name, b), a) in names.iter().zip(&before).zip(&after) {
        assert_eq!(a, b, "{name:?} is located as before the loss: {log}");
    }
    assert_eq!(count, names.len(), "one record per name, none other: {log}");
}

/// A carriage return in a file name cannot travel as it is in a listing's
/// XML: a parser reads it as a line feed (XML 1.0 end-of-line handling).
/// moto sends it as it is, so the rebuild used to map that key to another
/// path (`a\nb` for `a\rb`), gave that path a record and left the real one
/// without. Keys are asked for url-encoded (`encoding-type=url`) and
/// decoded, which must also give back `%`, `+`, spaces, other control
/// characters and non-ASCII names exactly.
#[test]
fn a_rebuild_maps_keys_xml_cannot_carry_back_to_their_paths() {
    let (env, _moto, cfg) = on_moto();
    rebuild_maps_every_name_back(
        &env,
        cfg,
        &[
            "cr\rname.png",
            "ctl\x01name.png",
            "tab\tname.png",
            "d/sp ace.png",
            "100%41.png",
            "a+b.png",
            "caf\u{e9}.png",
            "plain.png",
        ],
    );
}

/// s3s-fs (0.14) answers `encoding-type=url` with `<EncodingType>url` but
/// sends its keys as they are. Decoding them there (as boto3 does) would
/// turn `100%41.png` into `100A.png` and `a+b.png` into `a b.png`; offloadd
/// finds out once that this server does not encode, and reads its keys as
/// they are.
#[test]
fn a_rebuild_on_a_server_that_does_not_encode_keys_reads_them_as_they_are() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let cfg = Cfg::new(&s3.endpoint());
    rebuild_maps_every_name_back(&env, cfg, &["100%41.png", "a+b.png", "d/sp ace.png"]);
}

/// A state_dir removed while the daemon runs (`rm -rf` by config
/// management, say) is noticed: the daemon exits 1 with one sentence, and
/// the restart rebuilds the records of files already deleted locally (not a
/// "fresh" start), and still uploads a file queued while the bucket was
/// away (the managed-since mark is kept).
#[test]
fn a_state_dir_removed_while_running_is_rebuilt_at_the_restart() {
    let env = TestEnv::new();
    let mut s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    env.write_config(&cfg);
    let mut daemon = Daemon::start(&env, &[]);
    let files = offloaded_and_deleted(&env, &s3, 3);
    // A backlog: queued while the bucket is away.
    s3.stop();
    let late = file_content("late.png", 100, 5_000);
    write_file(&env.path("late.png"), &late);
    std::thread::sleep(std::time::Duration::from_secs(3));
    fs::remove_dir_all(&env.state_dir).unwrap();

    let st = daemon
        .wait_exit(std::time::Duration::from_secs(30))
        .expect("offloadd exits once its state_dir is gone");
    assert_eq!(st.code(), Some(1), "{}", daemon.stderr());
    let said = format!(
        "state_dir {} was removed or replaced while offloadd ran",
        env.state_dir.display()
    );
    assert!(daemon.stderr().contains(&said), "{}", daemon.stderr());

    s3.restart();
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "records rebuilt, the backlog uploaded", || {
        env.status()["uploaded_count"] == files.len() + 1
    });
    for (rel, _) in &files {
        assert_eq!(env.locate(rel), (0, public_url(rel)));
    }
    assert_eq!(
        s3.object_bytes("late.png").as_deref(),
        Some(late.as_slice())
    );
    let log = daemon.stop();
    assert!(log.contains("rebuilt from the bucket"), "{log}");
}
