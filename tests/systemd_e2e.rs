//! End to end under a real systemd 252: a Debian bookworm root booted with
//! systemd-nspawn (tests/systemd-testbed/), the .deb installed inside, an
//! s3s-fs on the host's 127.0.0.1 (the container shares the network).
//!
//! Checks: install (user, conffile mode), `systemctl start` (Type=notify,
//! READY), uploads of files the "app" user writes (shared-group recipe),
//! journald fields (`journalctl -u offloadd OFFLOADD_PATH=...`), a SIGSTOPped
//! daemon killed by the watchdog and restarted, and a clean, quick
//! `systemctl stop`.
//!
//! Needs root (nsenter, systemd-nspawn); skipped with a message otherwise.
//! Slow on first run (debootstrap, 1-2 minutes); the root is cached in
//! `$SDLAB` (default /tmp/offloadd-sdlab). `OFFLOADD_KEEP_TESTBED=1` leaves
//! the container running afterwards.

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lab() -> String {
    std::env::var("SDLAB").unwrap_or_else(|_| "/tmp/offloadd-sdlab".into())
}

fn script(name: &str) -> PathBuf {
    crate_dir().join("tests/systemd-testbed").join(name)
}

fn run(cmd: &mut Command) -> Output {
    cmd.env("SDLAB", lab()).output().expect("spawn")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command inside the container; returns (exit code, stdout, stderr).
fn sd(args: &[&str]) -> (i32, String, String) {
    let o = run(Command::new(script("sdexec.sh")).args(args));
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `sd` that must succeed; returns stdout.
fn sd_ok(args: &[&str]) -> String {
    let (rc, out, err) = sd(args);
    assert_eq!(rc, 0, "inside: {args:?} failed ({rc}):\n{out}{err}");
    out
}

fn sh(script_text: &str) -> String {
    sd_ok(&["sh", "-ec", script_text])
}

/// Copies bytes to a path inside the container (mode 0644; tighten it after
/// for secrets).
fn put(bytes: &[u8], inside: &str) {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), bytes).unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(Command::new(script("sdcp.sh")).arg(tmp.path()).arg(inside));
    assert!(o.status.success(), "sdcp {inside}: {}", text(&o));
}

fn prop(unit: &str, p: &str) -> String {
    sd_ok(&["systemctl", "show", "-p", p, "--value", unit])
        .trim()
        .to_string()
}

fn journal() -> String {
    sd(&[
        "journalctl",
        "-b",
        "-u",
        "offloadd",
        "--no-pager",
        "-n",
        "200",
    ])
    .1
}

fn build_deb() -> PathBuf {
    if let Ok(p) = std::env::var("OFFLOADD_DEB") {
        return PathBuf::from(p);
    }
    let o = Command::new(crate_dir().join("scripts/package.sh"))
        .env("CARGO_BUILD_JOBS", "1")
        .output()
        .expect("run scripts/package.sh");
    assert!(o.status.success(), "package.sh failed:\n{}", text(&o));
    let deb = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let deb = PathBuf::from(deb.lines().last().unwrap_or_default());
    assert!(deb.is_file(), "no .deb at {deb:?}:\n{}", text(&o));
    deb
}

struct Testbed;

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::env::var_os("OFFLOADD_KEEP_TESTBED").is_none() {
            let _ = run(&mut Command::new(script("down.sh")));
        }
    }
}

/// Writes `bytes` at `rel` under the results dir as the `app` user (umask 007:
/// the files are readable only through the shared group).
fn app_write(rel: &str, bytes: &[u8]) {
    app_write_in("/srv/app/storage/results", rel, bytes)
}

fn app_write_in(dir: &str, rel: &str, bytes: &[u8]) {
    put(bytes, "/tmp/offloadd-e2e-src");
    sd_ok(&[
        "setpriv",
        "--reuid=app",
        "--regid=app",
        "--init-groups",
        "sh",
        "-ec",
        "umask 007; cd \"$2\"; mkdir -p \"$(dirname \"$1\")\"; \
         cp /tmp/offloadd-e2e-src \"$1.part\"; mv \"$1.part\" \"$1\"",
        "sh",
        rel,
        dir,
    ]);
}

fn wait_uploaded(s3: &S3Server, rel: &str, bytes: &[u8]) {
    let ok = poll_until(LONG, || s3.object_bytes(rel).as_deref() == Some(bytes));
    assert!(
        ok,
        "{rel} never reached the bucket; journal:\n{}",
        journal()
    );
}

#[test]
fn offloadd_under_real_systemd() {
    if !require(is_root(), "root (systemd-nspawn, nsenter)") {
        return;
    }
    let t0 = Instant::now();
    let deb = build_deb();
    println!(
        "[{:>5.1}s] package {}",
        t0.elapsed().as_secs_f64(),
        deb.display()
    );

    let o = run(&mut Command::new(script("up.sh")));
    assert!(o.status.success(), "up.sh failed:\n{}", text(&o));
    let _guard = Testbed;
    println!("[{:>5.1}s] testbed up", t0.elapsed().as_secs_f64());

    // A clean slate inside (the root is reused between runs).
    sh(
        "systemctl stop offloadd offloadd@second 2>/dev/null || true; \
        systemctl reset-failed offloadd 2>/dev/null || true; \
        if dpkg -s offloadd >/dev/null 2>&1; then apt-get purge -y -q offloadd >/dev/null; fi; \
        rm -rf /var/lib/offloadd /etc/offloadd /etc/systemd/system/offloadd.service.d \
        /etc/systemd/system/offloadd@second.service.d /srv/app; \
        systemctl daemon-reload",
    );

    // Install; apt resolves Depends from the mirror.
    put(&std::fs::read(&deb).unwrap(), "/tmp/offloadd.deb");
    let (rc, out, err) = sd(&[
        "sh",
        "-c",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/offloadd.deb",
    ]);
    if rc != 0 {
        println!("first install failed ({out}{err}); apt-get update and retry");
        sh("apt-get update -q >/dev/null; DEBIAN_FRONTEND=noninteractive apt-get install -y -q /tmp/offloadd.deb");
    }
    println!("[{:>5.1}s] installed", t0.elapsed().as_secs_f64());
    assert_eq!(
        sh("stat -c '%a %U:%G' /etc/offloadd/config.yaml").trim(),
        "640 root:offloadd"
    );
    assert!(sh("getent passwd offloadd").contains("offloadd"));
    assert_eq!(
        sd(&["systemctl", "is-enabled", "offloadd"]).1.trim(),
        "enabled"
    );
    // Enabled, but not started on first install (the default config is local).
    assert_ne!(
        sd(&["systemctl", "is-active", "offloadd"]).1.trim(),
        "active"
    );

    // The application: user `app` writes the results; offloadd reads them
    // through the shared group (setgid dir, umask 007).
    sh(
        "getent passwd app >/dev/null || useradd --system --user-group app; \
        mkdir -p /srv/app/storage/results; chown app:app /srv/app/storage/results; \
        chmod 2770 /srv/app/storage/results",
    );

    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let config_for = |root: &str, state: &str, socket: &str| {
        [
            "watch:",
            &format!("  root: {root}"),
            "  settle: 300ms",
            "  rescan_interval: 0",
            &format!("state_dir: {state}"),
            &format!("control_socket: {socket}"),
            "storage:",
            &format!("  active: {PROVIDER}"),
            "  providers:",
            &format!("    {PROVIDER}:"),
            "      kind: minio",
            &format!("      endpoint: {}", s3.endpoint()),
            &format!("      bucket: {BUCKET}"),
            &format!("      access_key_id: {ACCESS_KEY}"),
            &format!("      public_url: {PUBLIC_URL}"),
            &format!("      prefix: {PREFIX}"),
            "upload:",
            "  retry: { initial_backoff: 200ms, max_backoff: 2s }",
            "http:",
            "  listen: \"\"",
            "log:",
            "  level: info",
            "",
        ]
        .join("\n")
    };
    let config = config_for(
        "/srv/app/storage/results",
        "/var/lib/offloadd",
        "/run/offloadd/control.sock",
    );
    put(config.as_bytes(), "/etc/offloadd/config.yaml");
    put(env.secret.as_bytes(), "/etc/offloadd/local-s3.secret");
    // The secret as a systemd credential; a short watchdog for the test.
    let dropin = format!(
        "[Service]\n\
LoadCredential={PROVIDER}.secret_access_key:/etc/offloadd/local-s3.secret\n\
SupplementaryGroups=app\nWatchdogSec=3s\nTimeoutAbortSec=10s\nRestartSec=1s\n"
    );
    put(
        dropin.as_bytes(),
        "/etc/systemd/system/offloadd.service.d/e2e.conf",
    );
    sh(
        "chown root:offloadd /etc/offloadd/config.yaml; chmod 0640 /etc/offloadd/config.yaml; \
        chmod 0600 /etc/offloadd/local-s3.secret; systemctl daemon-reload",
    );

    // --- start: Type=notify returns once READY=1 arrived -----------------
    let t = Instant::now();
    let (rc, out, err) = sd(&["systemctl", "start", "offloadd"]);
    assert_eq!(rc, 0, "start failed: {out}{err}\n{}", journal());
    println!(
        "[{:>5.1}s] started in {:.1}s",
        t0.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(prop("offloadd", "ActiveState"), "active");
    assert_eq!(prop("offloadd", "User"), "offloadd");
    // Exactly one capability: CAP_LEASE (28), for the open-for-writing probe
    // on the app's files.
    let main_pid = prop("offloadd", "MainPID");
    let caps = sh(&format!("grep CapEff /proc/{main_pid}/status"));
    let eff = u64::from_str_radix(caps.split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_eq!(eff, 1 << 28, "effective capabilities: {caps}");
    wait_until(Duration::from_secs(10), "STATUS= text", || {
        prop("offloadd", "StatusText").contains(PROVIDER)
    });

    // --- uploads ----------------------------------------------------------
    // Unique names: the container's journal persists across runs.
    let run_id = random_hex(4);
    let files: Vec<(String, Vec<u8>)> = ["images/x.png", "b.bin", "docs/deep/c.txt"]
        .iter()
        .map(|r| format!("{r}.{run_id}"))
        .map(|r| {
            let bytes = file_content(&r, 1_000, 200_000);
            (r, bytes)
        })
        .collect();
    for (rel, bytes) in &files {
        app_write(rel, bytes);
    }
    for (rel, bytes) in &files {
        wait_uploaded(&s3, rel, bytes);
    }
    println!(
        "[{:>5.1}s] uploaded {}",
        t0.elapsed().as_secs_f64(),
        files.len()
    );

    // --- journald: one file's history by field ----------------------------
    let (rel, bytes) = &files[0];
    let selector = format!("OFFLOADD_PATH={rel}");
    let mut rec: Option<Value> = None;
    let found = poll_until(Duration::from_secs(20), || {
        let out = sd(&[
            "journalctl",
            "-b",
            "-u",
            "offloadd",
            &selector,
            "-o",
            "json",
            "--no-pager",
        ])
        .1;
        rec = out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["MESSAGE"] == format!("uploaded {rel}").as_str());
        rec.is_some()
    });
    assert!(found, "no journal record for {selector}:\n{}", journal());
    let rec = rec.unwrap();
    let field = |k: &str| rec[k].as_str().unwrap_or_default().to_string();
    assert_eq!(field("OFFLOADD_PATH"), *rel);
    assert_eq!(field("OFFLOADD_KEY"), format!("{PREFIX}/{rel}"));
    assert_eq!(field("OFFLOADD_BYTES"), bytes.len().to_string());
    assert_eq!(field("OFFLOADD_PROVIDER"), PROVIDER);
    assert!(
        field("OFFLOADD_DURATION_MS").parse::<u64>().is_ok(),
        "{rec}"
    );
    assert_eq!(field("PRIORITY"), "6", "info maps to priority 6: {rec}");
    assert_eq!(field("SYSLOG_IDENTIFIER"), "offloadd");
    // Only that file's records match the selector.
    let all = sd_ok(&[
        "journalctl",
        "-b",
        "-u",
        "offloadd",
        &selector,
        "-o",
        "json",
    ]);
    for l in all.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["OFFLOADD_PATH"], rel.as_str());
    }
    env.assert_no_secret("the journal", &journal());
    println!("[{:>5.1}s] journal fields ok", t0.elapsed().as_secs_f64());

    // --- watchdog: a stopped (wedged) daemon is killed and restarted ------
    // A healthy daemon outlives several watchdog intervals (WatchdogSec=3s):
    // the pings arrive.
    std::thread::sleep(Duration::from_secs(8));
    let pid = prop("offloadd", "MainPID");
    let restarts: u32 = prop("offloadd", "NRestarts").parse().unwrap();
    assert_eq!(
        restarts,
        0,
        "a healthy daemon was restarted:\n{}",
        journal()
    );
    let t = Instant::now();
    sd_ok(&["sh", "-c", &format!("kill -STOP {pid}")]);
    let restarted = poll_until(Duration::from_secs(60), || {
        let new = prop("offloadd", "MainPID");
        new != "0" && new != pid && prop("offloadd", "ActiveState") == "active"
    });
    assert!(
        restarted,
        "watchdog did not restart; journal:\n{}",
        journal()
    );
    println!(
        "[{:>5.1}s] watchdog restart after {:.1}s",
        t0.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(prop("offloadd", "NRestarts"), "1");
    assert!(
        journal().contains("Watchdog timeout"),
        "no watchdog timeout logged:\n{}",
        journal()
    );
    // The new daemon works.
    let after = (
        "after-watchdog.txt".to_string(),
        file_content("after", 10, 5_000),
    );
    app_write(&after.0, &after.1);
    wait_uploaded(&s3, &after.0, &after.1);

    // --- reload: a good config applies live, a broken one is refused -------
    let pid_before = prop("offloadd", "MainPID");
    let good = config.replace("storage:\n", "storage:\n  delete_local: true\n");
    put(good.as_bytes(), "/etc/offloadd/config.yaml");
    sh("chown root:offloadd /etc/offloadd/config.yaml; chmod 0640 /etc/offloadd/config.yaml");
    let (rc, out, err) = sd(&["systemctl", "reload", "offloadd"]);
    assert_eq!(rc, 0, "reload failed: {out}{err}\n{}", journal());
    wait_until(Duration::from_secs(20), "reload logged", || {
        journal().contains("configuration reloaded")
    });
    let deleted = (
        "after-reload.txt".to_string(),
        file_content("after-reload", 10, 5_000),
    );
    app_write(&deleted.0, &deleted.1);
    wait_uploaded(&s3, &deleted.0, &deleted.1);
    wait_until(
        Duration::from_secs(20),
        "local copy deleted after reload",
        || {
            sd(&[
                "test",
                "-e",
                &format!("/srv/app/storage/results/{}", deleted.0),
            ])
            .0 != 0
        },
    );
    put(b"watch: [broken\n", "/etc/offloadd/config.yaml");
    sh("chown root:offloadd /etc/offloadd/config.yaml; chmod 0640 /etc/offloadd/config.yaml");
    let (rc, out, err) = sd(&["systemctl", "reload", "offloadd"]);
    assert_eq!(
        rc, 0,
        "reload of a broken config must not fail the unit: {out}{err}"
    );
    wait_until(Duration::from_secs(20), "refusal logged", || {
        journal().contains("reload refused")
    });
    assert!(
        journal().contains("line "),
        "the refusal names the line:\n{}",
        journal()
    );
    assert_eq!(prop("offloadd", "ActiveState"), "active");
    assert_eq!(
        prop("offloadd", "MainPID"),
        pid_before,
        "no restart on reload"
    );
    let still = (
        "after-broken.txt".to_string(),
        file_content("after-broken", 10, 5_000),
    );
    app_write(&still.0, &still.1);
    wait_uploaded(&s3, &still.0, &still.1);
    put(config.as_bytes(), "/etc/offloadd/config.yaml");
    sh("chown root:offloadd /etc/offloadd/config.yaml; chmod 0640 /etc/offloadd/config.yaml");
    println!("[{:>5.1}s] reload ok", t0.elapsed().as_secs_f64());

    // --- stop: clean and quick ---------------------------------------------
    let t = Instant::now();
    let (rc, out, err) = sd(&["systemctl", "stop", "offloadd"]);
    let took = t.elapsed();
    assert_eq!(rc, 0, "stop failed: {out}{err}");
    assert!(took < Duration::from_secs(45), "stop took {took:?}");
    assert_eq!(prop("offloadd", "Result"), "success", "{}", journal());
    assert_eq!(prop("offloadd", "ExecMainStatus"), "0", "{}", journal());
    assert!(journal().contains("offloadd stopped"), "{}", journal());
    println!(
        "[{:>5.1}s] stopped in {:.1}s",
        t0.elapsed().as_secs_f64(),
        took.as_secs_f64()
    );

    // --- a second directory as the instance offloadd@second -------------
    sh(
        "mkdir -p /srv/app/storage/second; chown app:app /srv/app/storage/second; \
        chmod 2770 /srv/app/storage/second",
    );
    let second = config_for(
        "/srv/app/storage/second",
        "/var/lib/offloadd/second",
        "/run/offloadd/second/control.sock",
    );
    put(second.as_bytes(), "/etc/offloadd/second.yaml");
    put(
        dropin.as_bytes(),
        "/etc/systemd/system/offloadd@second.service.d/e2e.conf",
    );
    sh(
        "chown root:offloadd /etc/offloadd/second.yaml; chmod 0640 /etc/offloadd/second.yaml; \
        systemctl daemon-reload",
    );
    let (rc, out, err) = sd(&["systemctl", "start", "offloadd@second"]);
    let inst_journal = || sd(&["journalctl", "-b", "-u", "offloadd@second", "--no-pager"]).1;
    assert_eq!(rc, 0, "offloadd@second: {out}{err}\n{}", inst_journal());
    let rel2 = format!("second-{run_id}.txt");
    let bytes2 = file_content(&rel2, 10, 5_000);
    app_write_in("/srv/app/storage/second", &rel2, &bytes2);
    let ok = poll_until(LONG, || {
        s3.object_bytes(&rel2).as_deref() == Some(&bytes2[..])
    });
    assert!(ok, "offloadd@second did not upload:\n{}", inst_journal());
    // `offloadd status` of the instance, run inside by `user`.
    let status_as = |user: &str| {
        sd_ok(&[
            "runuser",
            "-u",
            user,
            "--",
            "offloadd",
            "--config",
            "/etc/offloadd/second.yaml",
            "status",
        ])
    };
    let status = status_as("root");
    assert!(
        status.contains(PROVIDER),
        "status of the instance:\n{status}"
    );
    // Stopping the main unit leaves the instance's socket in place.
    sd_ok(&["systemctl", "start", "offloadd"]);
    sd_ok(&["systemctl", "stop", "offloadd"]);
    sd_ok(&["test", "-S", "/run/offloadd/second/control.sock"]);
    // An operator in the service's group only as a supplementary group is
    // answered, although the unit hides other users' processes (/proc).
    sh("getent passwd alice >/dev/null || useradd --create-home alice; usermod -aG offloadd alice");
    let status = status_as("alice");
    assert!(
        status.contains(PROVIDER),
        "status for a supplementary member of the group:\n{status}"
    );
    sd_ok(&["test", "-d", "/var/lib/offloadd/second"]);
    sd_ok(&["systemctl", "stop", "offloadd@second"]);
    assert_eq!(prop("offloadd@second", "Result"), "success");
    println!(
        "[{:>5.1}s] instance offloadd@second ok",
        t0.elapsed().as_secs_f64()
    );

    // --- upgrade (reinstall) keeps an edited config and the state ---------
    // ... and the owner and mode ops narrowed it to (offloadd's advice for
    // a config with a secret inline), which the first install set wider.
    sh("echo '# edited by ops' >> /etc/offloadd/config.yaml");
    sh("chown offloadd:offloadd /etc/offloadd/config.yaml; chmod 0600 /etc/offloadd/config.yaml");
    sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall /tmp/offloadd.deb >/dev/null");
    assert!(sh("tail -1 /etc/offloadd/config.yaml").contains("edited by ops"));
    assert_eq!(
        sh("stat -c '%a %U:%G' /etc/offloadd/config.yaml").trim(),
        "600 offloadd:offloadd",
        "an upgrade must not widen the config's permissions again"
    );
    sh("test -n \"$(ls -A /var/lib/offloadd)\"");
    println!("[{:>5.1}s] done", t0.elapsed().as_secs_f64());
}
