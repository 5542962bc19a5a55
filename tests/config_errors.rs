//! Proof: broken configs (YAML syntax error, unknown key, wrong type,
//! relative root) → exit 78 with file, line and column, for both `run` and
//! `check-config`; an incomplete active provider → `check-config` 78, `run`
//! stays up in local mode and says why.

mod common;
use common::*;
use serde_json::Value;
use std::thread::sleep;
use std::time::Duration;

const EX_CONFIG: i32 = 78;

/// Replace the line starting with `old` (after indentation) by `new`;
/// returns the new text and the 1-based line number.
fn replace_line(yaml: &str, old: &str, new: &str) -> (String, usize) {
    let mut line_no = 0;
    let out: Vec<String> = yaml
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if line_no == 0 && l.trim_start().starts_with(old) {
                line_no = i + 1;
                new.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(line_no > 0, "line {old:?} not in config");
    (out.join("\n") + "\n", line_no)
}

/// Insert `new` after the line starting with `after`; returns text and the
/// 1-based number of the inserted line.
fn insert_after(yaml: &str, after: &str, new: &str) -> (String, usize) {
    let mut lines: Vec<String> = yaml.lines().map(String::from).collect();
    let i = lines
        .iter()
        .position(|l| l.trim_start().starts_with(after))
        .expect("anchor line");
    lines.insert(i + 1, new.to_string());
    (lines.join("\n") + "\n", i + 2)
}

fn col_of(line: &str, needle: &str) -> usize {
    line.find(needle).expect("needle in line") + 1
}

/// Both `check-config` and `run` exit 78 and print
/// `{file}: line {L}, column {C}: …` with C one of `cols`; the line mentions
/// `mention`.
fn assert_config_error(env: &TestEnv, line: usize, cols: &[usize], mention: &str) {
    let path = env.config_path.display().to_string();
    let check = |who: &str, code: i32, err: &str| {
        assert_eq!(
            code, EX_CONFIG,
            "{who} exits 78 on a broken config; stderr:\n{err}"
        );
        let hit = err.lines().find(|l| {
            cols.iter()
                .any(|c| l.contains(&format!("{path}: line {line}, column {c}: ")))
        });
        let Some(hit) = hit else {
            panic!(
                "{who}: expected `{path}: line {line}, column {cols:?}: …` on stderr, got:\n{err}"
            );
        };
        assert!(
            hit.contains(mention),
            "{who}: the error names `{mention}`: {hit}"
        );
        assert!(!err.contains("panicked"), "{who} must not panic: {err}");
    };
    let (code, _out, err) = env.cli(&["check-config"]);
    check("check-config", code, &err);

    let mut d = Daemon::spawn(env, &[]);
    let st = d
        .wait_exit(Duration::from_secs(60))
        .expect("run with a broken config must exit");
    let err = d.stderr();
    d.check_no_secret();
    check("run", st.code().unwrap_or(-1), &err);
}

fn base_env() -> TestEnv {
    let env = TestEnv::new();
    env.write_config(&Cfg::new("http://127.0.0.1:9"));
    env
}

#[test]
fn yaml_syntax_error() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, line) = replace_line(&yaml, "settle:", "  settle: 300ms: soon");
    env.write_raw_config(&yaml);
    // The second `:` is where the YAML stops making sense.
    assert_config_error(&env, line, &[col_of("  settle: 300ms: soon", ": soon")], "");
}

#[test]
fn unknown_key() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, line) = insert_after(&yaml, "settle:", "  setle_time: 2s");
    env.write_raw_config(&yaml);
    assert_config_error(&env, line, &[3], "setle_time");
}

#[test]
fn unknown_key_in_provider() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, line) = insert_after(&yaml, "bucket:", "      regoin: us-east-1");
    env.write_raw_config(&yaml);
    assert_config_error(&env, line, &[7], "regoin");
}

#[test]
fn wrong_type() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, line) = replace_line(&yaml, "workers:", "  workers: lots");
    env.write_raw_config(&yaml);
    // The key or its value are both fair places to point at.
    assert_config_error(
        &env,
        line,
        &[3, col_of("  workers: lots", "lots")],
        "workers",
    );
}

#[test]
fn relative_root() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, line) = replace_line(&yaml, "root:", "  root: results");
    env.write_raw_config(&yaml);
    assert_config_error(
        &env,
        line,
        &[3, col_of("  root: results", "results")],
        "root",
    );
}

#[test]
fn usage_errors_exit_2() {
    let env = base_env();
    let (code, _, err) = env.cli(&["no-such-command"]);
    assert_eq!(code, 2, "unknown command is a usage error: {err}");
    let (code, _, err) = env.cli(&["locate"]);
    assert_eq!(code, 2, "locate without a path is a usage error: {err}");
}

#[test]
fn incomplete_active_provider_runs_in_local_mode() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.with_secret_file = false; // no secret anywhere
    env.write_config(&cfg);

    let (code, out, err) = env.cli(&["check-config"]);
    assert_eq!(
        code, EX_CONFIG,
        "check-config: an incomplete active provider is an error:\n{out}\n{err}"
    );
    assert!(
        format!("{out}{err}").contains(PROVIDER),
        "check-config names the incomplete provider:\n{out}\n{err}"
    );

    let mut daemon = Daemon::start(&env, &[]);
    sleep(Duration::from_secs(2));
    assert!(
        daemon.alive(),
        "run stays up in local mode:\n{}",
        daemon.stderr()
    );
    assert!(
        daemon.stderr().contains(PROVIDER),
        "the log says why it runs in local mode:\n{}",
        daemon.stderr()
    );

    // Live status while running.
    let st = env.status();
    assert_eq!(
        st["running"],
        Value::Bool(true),
        "status while running: {st}"
    );
    assert_eq!(
        st["pid"].as_u64(),
        Some(daemon.pid as u64),
        "status pid: {st}"
    );
    assert_eq!(st["active_provider"], "local", "status while running: {st}");
    let reason = st["local_mode_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(PROVIDER),
        "local_mode_reason names the provider: {st}"
    );

    // Local mode offloads nothing.
    write_file(&env.path("local/a.jpg"), b"stays local");
    sleep(Duration::from_secs(2));
    assert!(daemon.alive());
    assert!(s3.keys(BUCKET).is_empty(), "local mode uploads nothing");
    assert!(env.path("local/a.jpg").exists());
    daemon.stop();

    let st = env.status();
    assert_eq!(st["running"], Value::Bool(false), "{st}");
    assert_eq!(st["active_provider"], "local", "{st}");
    assert!(
        st["local_mode_reason"]
            .as_str()
            .unwrap_or_default()
            .contains(PROVIDER),
        "{st}"
    );
    assert_eq!(
        json_u64(&st, "queue_depth"),
        0,
        "in local mode nothing is queued: {st}"
    );
}

#[test]
fn log_level_that_is_no_level() {
    // tracing would read `warning` as a target name and log nothing else,
    // errors included.
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let line = yaml.lines().count() + 2;
    env.write_raw_config(&format!("{yaml}log:\n  level: warning\n"));
    assert_config_error(&env, line, &[3], "`log.level` `warning` is not a level");
}

#[test]
fn r2_account_id_pasted_as_a_url() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, _) = replace_line(&yaml, "kind: minio", "      kind: r2");
    let (yaml, line) = insert_after(
        &yaml,
        "bucket:",
        "      account_id: https://0123abc.r2.cloudflarestorage.com",
    );
    env.write_raw_config(&yaml);
    assert_config_error(
        &env,
        line,
        &[7],
        "`account_id` holds a URL or host name; give only the account id",
    );
}

#[test]
fn provider_name_written_twice() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, line) = insert_after(
        &yaml,
        "prefix:",
        &format!("    {PROVIDER}:\n      kind: gcs"),
    );
    env.write_raw_config(&yaml);
    assert_config_error(
        &env,
        line,
        &[5],
        &format!("`storage.providers.{PROVIDER}` appears twice; keep one"),
    );
}

#[test]
fn blank_inline_secret_is_incomplete() {
    let env = TestEnv::new();
    let mut cfg = Cfg::new("http://127.0.0.1:9");
    cfg.with_secret_file = false;
    env.write_config(&cfg);
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, _) = insert_after(&yaml, "access_key_id:", "      secret_access_key: \"  \"");
    env.write_raw_config(&yaml);
    let (code, out, err) = env.cli(&["check-config"]);
    assert_eq!(code, EX_CONFIG, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("  secret:     unusable\n"), "{out}");
    assert!(!out.contains("state:      complete"), "{out}");
    assert!(
        err.contains(&format!(
            "local mode: nothing would be offloaded because provider `{PROVIDER}` is incomplete: `secret_access_key` is empty or holds only blanks;"
        )),
        "{err}"
    );
}

#[test]
fn missing_secret_outside_the_service_says_why() {
    // check-config from a shell cannot see the unit's systemd credential.
    let env = TestEnv::new();
    let mut cfg = Cfg::new("http://127.0.0.1:9");
    cfg.with_secret_file = false;
    env.write_config(&cfg);
    let (code, out, err) = env.cli(&["check-config"]);
    assert_eq!(code, EX_CONFIG, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("no secret access key;")
            && err.contains("a systemd credential is seen only inside the service ($CREDENTIALS_DIRECTORY is not set here)"),
        "{err}"
    );
}

/// A header value every upload would send fails the load at its line (it
/// used to pass `check-config`, then put `run` in local mode).
#[test]
fn cache_control_that_cannot_be_sent() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let (yaml, line) = insert_after(
        &yaml,
        "prefix:",
        "      cache_control: \"public, max\u{2011}age=60\"",
    );
    env.write_raw_config(&yaml);
    assert_config_error(
        &env,
        line,
        &[7],
        "`cache_control` is \"public, max\u{2011}age=60\", which cannot be sent as an HTTP header",
    );
}

/// The state's own files would be uploaded and, with `delete_local`,
/// deleted.
#[test]
fn state_dir_inside_the_root() {
    let env = base_env();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let inside = env.root.join(".offloadd-state");
    let (yaml, line) = replace_line(
        &yaml,
        "state_dir:",
        &format!("state_dir: {}", inside.display()),
    );
    env.write_raw_config(&yaml);
    assert_config_error(&env, line, &[1], "is inside `watch.root`");
    assert!(!inside.exists(), "nothing was created in the root");
}

/// Out of inotify instances or file descriptors may clear: `run` exits 1,
/// which systemd restarts, not 78, which it does not.
#[test]
fn a_watcher_the_kernel_refuses_is_not_a_configuration_error() {
    let env = base_env();
    let mut d = Daemon::spawn(&env, &[("OFFLOADD_FAILPOINTS", "watch_start_fails")]);
    let st = d
        .wait_exit(Duration::from_secs(60))
        .expect("run without a watcher must exit");
    let err = d.stderr();
    d.check_no_secret();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot watch") && err.contains("fs.inotify.max_user_instances"),
        "{err}"
    );
}
