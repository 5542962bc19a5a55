//! Proof for reload (SIGHUP): a good config applies live; a broken one and a
//! change of `watch.root` are refused whole while the old config keeps running;
//! switching the active provider mid-queue lets uploads in flight finish on the
//! old provider, sends the rest to the new one, and leaves old records pointing
//! at the old bucket; a prefix nesting with one used earlier on the same
//! bucket is warned about, whether a reload or a restart changed it.

mod common;
use common::*;
use std::fs;

fn reload_and_wait(daemon: &Daemon, outcome: &str) {
    daemon.reload_and_wait(outcome);
}

#[test]
fn good_reload_applies_live() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    env.write_config(&cfg);
    let mut daemon = Daemon::start(&env, &[]);
    write_file(&env.path("before.png"), b"kept");
    wait_until(LONG, "before.png uploaded", || s3.has("before.png"));
    assert!(env.path("before.png").exists());

    cfg.delete_local = true;
    env.write_config(&cfg);
    reload_and_wait(&daemon, "configuration reloaded");
    write_file(&env.path("after.png"), b"deleted once offloaded");
    wait_until(LONG, "after.png offloaded and deleted locally", || {
        s3.object_bytes("after.png").as_deref() == Some(&b"deleted once offloaded"[..])
            && !env.path("after.png").exists()
    });
    assert!(daemon.alive());
    daemon.stop();
}

#[test]
fn log_format_and_level_apply_live() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let cfg = Cfg::new(&s3.endpoint());
    let text = env.config_yaml(&cfg);
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let json_lines = |err: &str| {
        err.lines()
            .filter(|l| l.starts_with('{') && l.contains("\"level\":"))
            .count()
    };
    assert_eq!(json_lines(&daemon.stderr()), 0, "starts as text");

    env.write_raw_config(&format!("{text}log:\n  format: json\n  level: debug\n"));
    reload_and_wait(&daemon, "configuration reloaded");
    write_file(&env.path("after.png"), b"logged as json");
    wait_until(LONG, "after.png uploaded", || s3.has("after.png"));
    wait_until(LONG, "JSON lines after the reload", || {
        json_lines(&daemon.stderr()) >= 2
    });
    let err = daemon.stderr();
    assert!(
        err.lines()
            .any(|l| l.starts_with('{') && l.contains("\"level\":\"DEBUG\"")),
        "debug level applied: {err}"
    );

    // A word that is no level is refused: tracing would take `warning` for
    // a target and log nothing else, errors included. The level in force
    // stays.
    env.write_raw_config(&format!("{text}log:\n  format: json\n  level: warning\n"));
    reload_and_wait(&daemon, "reload refused");
    let err = daemon.stderr();
    assert!(
        err.contains("`log.level` `warning` is not a level"),
        "the refusal names log.level: {err}"
    );
    let before = err.len();
    write_file(&env.path("later.png"), b"still logged");
    wait_until(LONG, "later.png uploaded", || s3.has("later.png"));
    wait_until(LONG, "debug lines after the refused reload", || {
        daemon.stderr()[before..].contains("\"level\":\"DEBUG\"")
    });
    daemon.stop();
}

#[test]
fn broken_config_and_root_change_are_refused_whole() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let cfg = Cfg::new(&s3.endpoint());
    let good = env.config_yaml(&cfg);
    env.write_config(&cfg);
    let mut daemon = Daemon::start(&env, &[]);

    // YAML syntax error: refused with its position; the old config runs on.
    env.write_raw_config(&format!("{good}storage: [unclosed\n"));
    reload_and_wait(&daemon, "reload refused");
    let err = daemon.stderr();
    assert!(err.contains("line "), "the refusal names the line: {err}");
    write_file(&env.path("a.png"), b"a");
    wait_until(LONG, "a.png uploaded with the old config", || {
        s3.has("a.png")
    });

    // watch.root changed, together with a live key: nothing of it applies.
    let other = env.dir.path().join("elsewhere");
    fs::create_dir_all(&other).unwrap();
    let moved = good
        .replace(
            &env.root.display().to_string(),
            &other.display().to_string(),
        )
        .replace("delete_local: false", "delete_local: true");
    env.write_raw_config(&moved);
    reload_and_wait(&daemon, "`watch.root` changed");
    write_file(&env.path("b.png"), b"b");
    wait_until(LONG, "b.png uploaded from the old root", || s3.has("b.png"));
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(
        env.path("b.png").exists(),
        "delete_local from the refused reload must not apply"
    );
    assert!(daemon.alive());
    daemon.stop();
}

#[test]
fn switching_the_active_provider_mid_queue() {
    let env = TestEnv::new();
    let s3a = S3Server::start_for(&env);
    let s3b = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3a.endpoint());
    cfg.workers = 1;
    let second = ExtraProvider::second(s3b.endpoint());
    let base = env.config_yaml(&cfg);
    // Slow uploads to A so that a queue builds up behind the one in flight.
    let slow_a = env
        .with_provider(&base, &second, PROVIDER)
        .replace("upload:\n", "upload:\n  bandwidth_limit: 200KiB\n");
    let fast_b = env.with_provider(&base, &second, "second");
    env.write_raw_config(&slow_a);
    let mut daemon = Daemon::start(&env, &[]);

    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            let rel = format!("q/{i}.jpg");
            let bytes = file_content(&rel, 150_000, 160_000);
            write_file(&env.path(&rel), &bytes);
            (rel, bytes)
        })
        .collect();
    wait_until(LONG, "the first file reached provider A", || {
        files.iter().any(|(r, _)| s3a.has(r))
    });
    env.write_raw_config(&fast_b);
    reload_and_wait(&daemon, "configuration reloaded");

    wait_until(LONG, "every file in exactly one bucket", || {
        files.iter().all(|(r, b)| {
            let a = s3a.object_bytes(r);
            let bb = s3b.object_bytes(r);
            (a.as_deref() == Some(b.as_slice())) != (bb.as_deref() == Some(b.as_slice()))
        })
    });
    let on_a: Vec<&String> = files
        .iter()
        .map(|(r, _)| r)
        .filter(|r| s3a.has(r))
        .collect();
    let on_b: Vec<&String> = files
        .iter()
        .map(|(r, _)| r)
        .filter(|r| s3b.has(r))
        .collect();
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "A: {on_a:?} B: {on_b:?}"
    );

    // Records keep the provider they were uploaded with.
    for r in &on_a {
        assert_eq!(env.locate(r), (0, public_url(r)));
    }
    for r in &on_b {
        assert_eq!(
            env.locate(r),
            (0, format!("{SECOND_PUBLIC_URL}/{PREFIX}/{r}"))
        );
    }
    write_file(&env.path("later.png"), b"new");
    wait_until(LONG, "a new file goes to B", || s3b.has("later.png"));
    assert!(!s3a.has("later.png"));
    assert!(daemon.alive());
    daemon.stop();
}

#[test]
fn changed_include_and_exclude_rules_apply_live() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let cfg = Cfg::new(&s3.endpoint());
    env.write_config(&cfg);
    let mut daemon = Daemon::start(&env, &[]);
    // Under the default `**/.*`, a hidden folder and what is in it are left out.
    write_file(&env.path(".staging/a.png"), b"staged");
    write_and_wait(&env, &s3, "seen.png", b"seen");
    assert!(!s3.has(".staging/a.png"));

    let yaml = env.config_yaml(&cfg);
    assert!(yaml.contains("  rescan_interval: 0\n"));
    env.write_raw_config(&yaml.replace(
        "  rescan_interval: 0\n",
        "  rescan_interval: 0\n  exclude: [\"**/*.tmp\", \"drafts/**\"]\n",
    ));
    reload_and_wait(&daemon, "configuration reloaded");
    // The folder now included is scanned and watched at once.
    wait_until(LONG, "the staged file found by the rescan", || {
        s3.object_bytes(".staging/a.png").as_deref() == Some(&b"staged"[..])
    });
    write_and_wait(&env, &s3, ".staging/b.png", b"written after the reload");
    // A file in a folder excluded now is left alone, its folder being
    // watched from before or not.
    fs::create_dir_all(env.path("drafts")).unwrap();
    write_file(&env.path("drafts/c.png"), b"draft");
    write_and_wait(&env, &s3, "marker.png", b"later than the draft");
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(!s3.has("drafts/c.png"));
    assert!(daemon.alive());
    daemon.stop();
}

/// A state_dir first run in local mode and then reloaded to a provider: the
/// records written since are this database's, so the next start opens it as
/// it is, instead of taking it for a lost one and rebuilding it from the
/// bucket.
#[test]
fn a_database_begun_in_local_mode_is_not_rebuilt_after_a_reload_to_a_provider() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let with_provider = env.config_yaml(&Cfg::new(&s3.endpoint()));
    env.write_raw_config(
        &with_provider.replace(&format!("  active: {PROVIDER}\n"), "  active: local\n"),
    );
    let daemon = Daemon::start(&env, &[]);
    env.write_raw_config(&with_provider);
    daemon.reload_and_wait("configuration reloaded");
    write_and_wait(&env, &s3, "a.png", b"offloaded after the reload");
    daemon.stop();

    let daemon = Daemon::start(&env, &[]);
    let (code, out, err) = env.cli(&["locate", "a.png"]);
    assert_eq!(code, 0, "{out}{err}");
    let log = daemon.stop();
    assert!(
        !log.contains("was managed before")
            && !log.contains("rebuilding location records from the bucket listing"),
        "the restart rebuilt an intact database:\n{log}"
    );
}

/// While the root is away (unmounted, renamed) the daemon pauses and says
/// why: `status` answers with the reason (it used to exit 78, "watch.root
/// does not exist"), and a reload applies (it used to be refused), here
/// turning `delete_local` on, which the first file after the root's return
/// shows.
#[test]
fn status_and_reload_work_while_the_root_is_away() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    env.write_config(&cfg);
    let mut daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "a.png", b"before the root went away");

    let away = env.dir.path().join("results.away");
    fs::rename(&env.root, &away).unwrap();
    wait_until(LONG, "status names the missing root", || {
        let (code, out, err) = env.cli(&["status"]);
        assert_eq!(code, 0, "status while the root is away: {out}{err}");
        out.contains("is not available")
    });
    cfg.delete_local = true;
    env.write_config(&cfg);
    daemon.reload_and_wait("configuration reloaded");

    fs::rename(&away, &env.root).unwrap();
    write_and_wait(&env, &s3, "b.png", b"after the root came back");
    wait_until(LONG, "b.png deleted locally (the reload applied)", || {
        !env.path("b.png").exists()
    });
    assert!(env.path("a.png").exists(), "uploaded before delete_local");
    assert!(daemon.alive());
    daemon.stop();
}

/// The same through a symbolic link: `watch.root` names a link to the
/// results. While its target is away the reload compared the path as written
/// with the resolved one in force and was refused ("`watch.root` changed").
#[test]
fn a_reload_while_a_linked_root_is_away_applies() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let link = env.dir.path().join("results-link");
    std::os::unix::fs::symlink(&env.root, &link).unwrap();
    let mut cfg = Cfg::new(&s3.endpoint());
    let linked = |cfg: &Cfg| {
        env.config_yaml(cfg).replace(
            &format!("  root: {}\n", env.root.display()),
            &format!("  root: {}\n", link.display()),
        )
    };
    env.write_raw_config(&linked(&cfg));
    let daemon = Daemon::start(&env, &[]);
    write_and_wait(&env, &s3, "a.png", b"before the root went away");

    let away = env.dir.path().join("results.away");
    fs::rename(&env.root, &away).unwrap();
    wait_until(LONG, "status names the missing root", || {
        env.cli(&["status"]).1.contains("is not available")
    });
    cfg.delete_local = true;
    env.write_raw_config(&linked(&cfg));
    daemon.reload_and_wait("configuration reloaded");
    assert!(
        !daemon.stderr().contains("reload refused"),
        "{}",
        daemon.stderr()
    );
    fs::rename(&away, &env.root).unwrap();
    write_and_wait(&env, &s3, "b.png", b"after the root came back");
    wait_until(LONG, "b.png deleted locally (the reload applied)", || {
        !env.path("b.png").exists()
    });
    // And the next one, with the root back: the root in force is still the
    // resolved one, not the link path loaded while it was away.
    daemon.reload_and_wait("configuration reloaded");
    assert!(
        !daemon.stderr().contains("reload refused"),
        "{}",
        daemon.stderr()
    );
    daemon.stop();
}

/// A reload that cannot be applied whole changes nothing. Here leaving local
/// mode fails where the watcher starts (the failpoint stands in for inotify
/// out of file descriptors): a file an earlier run queued for the provider
/// must not be uploaded (and then deleted, `delete_local` being on) under the
/// refused config. It used to be: the scheduler took the new plan before the
/// watcher failed, and the upload started before the old plan came back.
#[test]
fn a_reload_whose_watcher_cannot_start_uploads_nothing() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    // First run: the bucket cannot be reached, so the file stays queued.
    env.write_config(&Cfg::new(&format!("http://127.0.0.1:{}", free_port())));
    let daemon = Daemon::start(&env, &[]);
    write_file(&env.path("a.png"), b"queued while the bucket was away");
    wait_until(LONG, "a.png queued", || env.status()["queue_depth"] == 1);
    daemon.stop();

    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    let with_provider = env.config_yaml(&cfg);
    env.write_raw_config(
        &with_provider.replace(&format!("  active: {PROVIDER}\n"), "  active: local\n"),
    );
    let mut daemon = Daemon::start(&env, &[("OFFLOADD_FAILPOINTS", "watch_start_fails")]);
    env.write_raw_config(&with_provider);
    daemon.reload_and_wait("reload refused");
    assert!(
        daemon.stderr().contains("cannot watch"),
        "{}",
        daemon.stderr()
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(!s3.has("a.png"), "uploaded under a refused reload");
    assert!(env.path("a.png").exists());
    assert_eq!(env.status()["queue_depth"], 1);
    assert!(daemon.alive());
    daemon.stop();
}

/// A reload that moves the active provider to a prefix nesting with its
/// old one in the same bucket (`magicads` → `magicads/sub`): `sub/x.png`
/// uploaded before and `x.png` uploaded after would share one object. The
/// log says so, naming both prefixes.
#[test]
fn a_reload_to_a_nesting_prefix_in_the_same_bucket_is_warned_about() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let yaml = env.config_yaml(&Cfg::new(&s3.endpoint()));
    env.write_raw_config(&yaml);
    let daemon = Daemon::start(&env, &[]);
    env.write_raw_config(&yaml.replace(
        &format!("      prefix: {PREFIX}\n"),
        &format!("      prefix: {PREFIX}/sub\n"),
    ));
    daemon.reload_and_wait("configuration reloaded");
    let log = daemon.stop();
    assert!(log.contains(&nesting_warning()), "{log}");
    assert_eq!(
        log.matches("used earlier on this bucket").count(),
        1,
        "once: {log}"
    );
}

/// The warning for the active provider at `{PREFIX}/sub` after `{PREFIX}`.
fn nesting_warning() -> String {
    format!(
        "provider `{PROVIDER}` (prefix `{PREFIX}/sub`) writes to bucket {BUCKET}, where prefix `{PREFIX}` was used earlier on this bucket, and the two nest: one object can stand for a file under each"
    )
}

/// The same change made the usual way, in the file and then a restart
/// (`magicads` → `magicads/sub`): `sub/x.png` uploaded by the first run
/// and `x.png` by the second would share one object. The second run says
/// so in its log and in `status`, although no reload saw the old prefix.
/// A prefix that nests with neither (`other`) is not warned about.
#[test]
fn a_restart_with_a_prefix_nesting_with_an_earlier_one_is_warned_about() {
    let env = TestEnv::new();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let yaml = env.config_yaml(&Cfg::new(&moto.endpoint()));
    let with_prefix = |prefix: &str| {
        yaml.replace(
            &format!("      prefix: {PREFIX}\n"),
            &format!("      prefix: {prefix}\n"),
        )
    };
    env.write_raw_config(&yaml);
    let daemon = Daemon::start(&env, &[]);
    write_file(&env.path("sub/x.png"), b"first run");
    wait_until(LONG, "sub/x.png uploaded", || {
        moto.head(BUCKET, &format!("{PREFIX}/sub/x.png")).is_some()
    });
    let first = daemon.stop();
    assert!(!first.contains("used earlier"), "{first}");

    env.write_raw_config(&with_prefix(&format!("{PREFIX}/sub")));
    let daemon = Daemon::start(&env, &[]);
    let notices = env.status()["notices"].clone();
    let second = daemon.stop();
    assert!(second.contains(&nesting_warning()), "{second}");
    assert_eq!(
        second.matches("used earlier on this bucket").count(),
        1,
        "once: {second}"
    );
    assert!(
        notices.as_array().is_some_and(|n| n
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.contains(&nesting_warning())))),
        "{notices}"
    );

    env.write_raw_config(&with_prefix("other"));
    let daemon = Daemon::start(&env, &[]);
    let notices = env.status()["notices"].clone();
    let third = daemon.stop();
    assert!(third.contains("offloadd started"), "{third}");
    assert!(!third.contains("used earlier"), "{third}");
    assert!(!notices.to_string().contains("used earlier"), "{notices}");
}
