//! Proof that the bandwidth limit takes effect: the flat `bandwidth_limit`
//! spaces uploads out (a lower bound on time, not a speed claim), and
//! `bandwidth_schedule` sets the limit in force, shown by `status` and
//! `/metrics`, and follows a reload.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn with_upload_line(yaml: &str, line: &str) -> String {
    assert!(yaml.contains("upload:\n"), "{yaml}");
    yaml.replacen("upload:\n", &format!("upload:\n  {line}\n"), 1)
}

#[test]
fn a_flat_limit_spaces_uploads_out() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let port = free_port();
    let yaml = env.config_yaml_http(&Cfg::new(&s3.endpoint()), port, Some(PUBLIC_URL));
    env.write_raw_config(&with_upload_line(&yaml, "bandwidth_limit: 200KiB"));
    let daemon = Daemon::start(&env, &[]);
    let mut files: Expected = Vec::new();
    let src = env.outside().join("batch");
    for i in 0..4 {
        let rel = format!("batch/{i}.bin");
        let bytes = random_bytes(300 * 1024);
        write_file(&src.join(format!("{i}.bin")), &bytes);
        files.push((rel, bytes));
    }
    let t = Instant::now();
    std::fs::rename(&src, env.path("batch")).unwrap();
    wait_all_uploaded(&s3, &files, LONG);
    let took = t.elapsed();
    // 1.2 MB at 200 KiB/s: the fourth body may start only 4.5 s after the first.
    assert!(
        took >= Duration::from_secs(4),
        "the limit was not applied: {took:?}"
    );
    let st = env.status();
    assert_eq!(st["bandwidth_limit"], "200 KiB/s", "{st}");
    let m = http_get(port, "/metrics").text();
    assert_eq!(
        metric_value(&m, "offloadd_bandwidth_limit_bytes_per_second"),
        Some(204800.0),
        "{m}"
    );
    daemon.stop();
}

#[test]
fn the_schedule_sets_the_limit_and_follows_a_reload() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let port = free_port();
    let yaml = env.config_yaml_http(&Cfg::new(&s3.endpoint()), port, Some(PUBLIC_URL));
    env.write_raw_config(&with_upload_line(
        &yaml,
        "bandwidth_schedule: [\"00:00 100KiB\"]",
    ));
    let daemon = Daemon::start(&env, &[]);
    wait_until(LONG, "the scheduled limit in status", || {
        env.status()["bandwidth_limit"] == "100 KiB/s (bandwidth_schedule)"
    });
    let m = http_get(port, "/metrics").text();
    assert_eq!(
        metric_value(&m, "offloadd_bandwidth_limit_bytes_per_second"),
        Some(102400.0)
    );
    env.write_raw_config(&with_upload_line(
        &yaml,
        "bandwidth_schedule: [\"Mon-Sun 00:00 off\"]",
    ));
    daemon.reload_and_wait("configuration reloaded");
    wait_until(LONG, "unlimited after the reload", || {
        env.status()["bandwidth_limit"] == "unlimited (bandwidth_schedule)"
    });
    let m = http_get(port, "/metrics").text();
    assert_eq!(
        metric_value(&m, "offloadd_bandwidth_limit_bytes_per_second"),
        Some(0.0)
    );
    write_and_wait(&env, &s3, "after.png", b"unlimited now");
    let log = daemon.stop();
    assert!(
        log.contains("upload bandwidth limit now unlimited"),
        "{log}"
    );
}

#[test]
fn a_bad_schedule_entry_is_named() {
    let env = TestEnv::new();
    let yaml = env.config_yaml(&Cfg::new("http://127.0.0.1:9"));
    env.write_raw_config(&with_upload_line(
        &yaml,
        "bandwidth_schedule: [\"08:00 1MiB\", \"Mon-Fr 19:00 off\"]",
    ));
    let (code, _, err) = env.cli(&["check-config"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("upload.bandwidth_schedule entry 2 `Mon-Fr 19:00 off`: `Mon-Fr` is not a day or a range of days"),
        "{err}"
    );
    assert!(err.contains("line "), "{err}");
}
