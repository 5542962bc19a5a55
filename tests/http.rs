//! Proof for the TCP listener (`http.listen`): `/healthz`; `/metrics` moves
//! with uploads; `/r/{path}` redirects to the recorded URL, else to the
//! active provider's predictable URL, else 404; and a real nginx in front of
//! the results directory (config/nginx.conf.example) serves local files and,
//! once offloaded, redirects to the bucket.

mod common;
use common::*;
use std::fs;

/// A name with a space, a non-ASCII letter and a reserved `+`.
const ODD: &str = "out/a b é+1.png";
const ODD_ENC: &str = "out/a%20b%20%C3%A9%2B1.png";

#[test]
fn healthz_metrics_and_redirects() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let port = free_port();
    let cfg = Cfg::new(&s3.endpoint());
    env.write_raw_config(&env.config_yaml_http(&cfg, port, Some(PUBLIC_URL)));
    let daemon = Daemon::start(&env, &[]);
    wait_http_ready(port);

    let r = http_get(port, "/healthz");
    assert_eq!((r.status, r.text().trim()), (200, "ok"));

    let before = http_get(port, "/metrics");
    assert_eq!(before.status, 200);
    let ct = before.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "content type {ct}"
    );
    let success = "offloadd_uploads_total{result=\"success\"}";
    let bytes = "offloadd_uploaded_bytes_total";
    assert_eq!(
        metric_value(&before.text(), success),
        Some(0.0),
        "{}",
        before.text()
    );

    let mut files: Expected = Vec::new();
    for rel in [ODD, "out/b.png", "deep/x/c.txt"] {
        let b = file_content(rel, 100, 20_000);
        write_file(&env.path(rel), &b);
        files.push((rel.to_string(), b));
    }
    wait_all_uploaded(&s3, &files, LONG);
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    let mut text = String::new();
    wait_until(LONG, "/metrics counts 3 successful uploads", || {
        text = http_get(port, "/metrics").text();
        metric_value(&text, success) == Some(3.0)
    });
    assert_eq!(metric_value(&text, bytes), Some(total as f64), "{text}");
    assert_eq!(
        metric_value(&text, "offloadd_upload_duration_seconds_count"),
        Some(3.0),
        "{text}"
    );
    assert!(
        metric_value(&text, "offloadd_last_success_timestamp_seconds").unwrap_or(0.0) > 1.0e9,
        "{text}"
    );
    for name in [
        "offloadd_queue_depth",
        "offloadd_in_flight",
        "offloadd_failed_items",
        "offloadd_retries_total",
        "offloadd_paused_providers",
        "offloadd_rescans_total",
    ] {
        assert!(
            metric_value(&text, name).is_some(),
            "{name} missing:\n{text}"
        );
    }

    // Recorded file: 302 to its URL, each segment percent-encoded.
    let r = http_get(port, &format!("/r/{ODD_ENC}"));
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("{PUBLIC_URL}/{PREFIX}/{ODD_ENC}").as_str())
    );
    // Query strings are ignored.
    let r = http_get(port, "/r/out/b.png?v=2");
    assert_eq!(r.header("location"), Some(public_url("out/b.png").as_str()));
    // Unknown but valid: the predictable URL on the active provider.
    let r = http_get(port, "/r/later/n%C3%A9w%20one.png");
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("{PUBLIC_URL}/{PREFIX}/later/n%C3%A9w%20one.png").as_str())
    );
    // Invalid paths.
    for bad in [
        "/r/",
        "/r/..",
        "/r/out/../out/b.png",
        "/r/out/%2E%2E/out/b.png",
        "/r/out//b.png",
        "/r/out/%FF.png",
        "/nothing",
    ] {
        assert_eq!(http_get(port, bad).status, 404, "{bad}");
    }
    // Read-only: other methods are refused and nothing changes.
    for m in ["POST", "PUT", "DELETE"] {
        let r = http_request(port, m, "/r/out/b.png").unwrap();
        assert_eq!(r.status, 405, "{m} /r/");
        let r = http_request(port, m, "/metrics").unwrap();
        assert_eq!(r.status, 405, "{m} /metrics");
    }
    assert!(s3.has("out/b.png") && env.path("out/b.png").exists());
    daemon.stop();

    // A record keeps the URL of the provider it was uploaded to; unknown
    // paths follow the newly active provider.
    let other = ExtraProvider {
        name: "other".into(),
        kind: "minio".into(),
        endpoint: s3.endpoint(),
        public_url: Some("https://other.example.test/b".into()),
        extra: vec![],
    };
    let yaml = env.config_yaml_http(&cfg, port, Some(PUBLIC_URL));
    env.write_raw_config(&env.with_provider(&yaml, &other, "other"));
    let daemon = Daemon::start(&env, &[]);
    wait_http_ready(port);
    let r = http_get(port, &format!("/r/{ODD_ENC}"));
    assert_eq!(
        (r.status, r.header("location")),
        (
            302,
            Some(format!("{PUBLIC_URL}/{PREFIX}/{ODD_ENC}").as_str())
        ),
        "recorded file after switching active"
    );
    let r = http_get(port, "/r/later/x.png");
    assert_eq!(
        (r.status, r.header("location")),
        (
            302,
            Some(format!("https://other.example.test/b/{PREFIX}/later/x.png").as_str())
        ),
        "unknown file after switching active"
    );
    daemon.stop();
}

#[test]
fn redirect_is_404_when_the_active_provider_has_no_public_url() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let port = free_port();
    let cfg = Cfg::new(&s3.endpoint());
    // The test provider keeps its public URL but is not active; the active
    // one is an r2 bucket without `public_url` (r2 has no public address).
    let r2 = ExtraProvider {
        name: "r2".into(),
        kind: "r2".into(),
        endpoint: s3.endpoint(),
        public_url: None,
        extra: vec!["path_style: true".into()],
    };
    let yaml = env.config_yaml_http(&cfg, port, Some(PUBLIC_URL));
    env.write_raw_config(&env.with_provider(&yaml, &r2, "r2"));
    let daemon = Daemon::start(&env, &[]);
    wait_http_ready(port);
    assert_eq!(http_get(port, "/healthz").status, 200);
    for target in ["/r/out/a.png", "/r/out/a%20b.png", "/r/x"] {
        let r = http_get(port, target);
        assert_eq!(r.status, 404, "{target}: {r:?}");
        assert_eq!(r.header("location"), None);
    }
    daemon.stop();
}

/// The `server { }` block of config/nginx.conf.example with the test's
/// addresses filled in.
fn example_server_block(listen: u16, root: &std::path::Path, offloadd: u16) -> String {
    let example = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/nginx.conf.example"
    ))
    .expect("read config/nginx.conf.example");
    let start = example.find("server {").expect("a server block");
    let mut block = example[start..].to_string();
    for (from, to) in [
        ("listen 80;", format!("listen 127.0.0.1:{listen};")),
        (
            "root /srv/app/storage/results;",
            format!("root {};", root.display()),
        ),
        ("127.0.0.1:9187", format!("127.0.0.1:{offloadd}")),
    ] {
        assert!(block.contains(from), "the example lost `{from}`");
        block = block.replace(from, &to);
    }
    block
}

#[test]
fn nginx_serves_local_then_offloaded_files() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let (front, public, port) = (free_port(), free_port(), free_port());

    // Existed before offloadd managed the directory: never uploaded, stays local.
    let old_rel = "old/kept é 1.txt";
    let old = file_content(old_rel, 100, 5_000);
    write_file(&env.path(old_rel), &old);

    // Front: the example config. Public: serves s3s-fs's data dir, standing in
    // for the bucket's public address (s3s-fs wants signed requests).
    let body = format!(
        "{}\nserver {{\n  listen 127.0.0.1:{public};\n  root {};\n}}\n",
        example_server_block(front, &env.root, port),
        s3.data_dir.display()
    );
    let nginx = Nginx::start(&body, &[front, public]);

    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.delete_local = true;
    let public_base = format!("http://127.0.0.1:{public}/{BUCKET}");
    env.write_raw_config(&env.config_yaml_http(&cfg, port, Some(&public_base)));
    let daemon = Daemon::start(&env, &[]);
    wait_http_ready(port);

    // A local file: served by nginx from disk.
    let old_enc = "/old/kept%20%C3%A9%201.txt";
    let r = http_get(front, old_enc);
    assert_eq!(r.status, 200, "{r:?}\n{}", nginx.log("error.log"));
    assert!(r.body == old, "local file bytes differ through nginx");

    // A new file: uploaded, its local copy deleted, then served by redirect.
    let b = file_content(ODD, 1000, 200_000);
    write_file(&env.path(ODD), &b);
    wait_until(LONG, "uploaded and deleted locally", || {
        s3.object_bytes(ODD).as_deref() == Some(b.as_slice()) && !env.path(ODD).exists()
    });
    let r = http_get(front, &format!("/{ODD_ENC}"));
    assert_eq!(r.status, 302, "{r:?}\n{}", nginx.log("error.log"));
    let loc = r.header("location").expect("Location").to_string();
    assert_eq!(loc, format!("{public_base}/{PREFIX}/{ODD_ENC}"));
    let got = http_get_url(&loc);
    assert_eq!(got.status, 200, "following {loc}: {got:?}");
    assert!(got.body == b, "offloaded file bytes differ at {loc}");

    // Reserved characters in a name survive the trip (`%`, `+`, `#`, `?`).
    let rel = "out/50%+#?.txt";
    let enc = "/out/50%25%2B%23%3F.txt";
    let b = file_content(rel, 10, 1000);
    write_file(&env.path(rel), &b);
    wait_until(LONG, "reserved-name file offloaded", || {
        s3.object_bytes(rel).as_deref() == Some(b.as_slice()) && !env.path(rel).exists()
    });
    let r = http_get(front, enc);
    let loc = r.header("location").unwrap_or_default().to_string();
    assert_eq!(
        (r.status, loc.as_str()),
        (302, format!("{public_base}/{PREFIX}{enc}").as_str())
    );
    assert!(http_get_url(&loc).body == b, "bytes differ at {loc}");

    // The old file is still served locally; an unknown path is redirected to
    // where it would be, which does not exist.
    assert_eq!(http_get(front, old_enc).body, old);
    let r = http_get(front, "/nope/x%20y.png");
    assert_eq!(r.status, 302, "{r:?}");
    let loc = r.header("location").unwrap().to_string();
    assert_eq!(loc, format!("{public_base}/{PREFIX}/nope/x%20y.png"));
    assert_eq!(http_get_url(&loc).status, 404);
    // `..` never reaches a file outside the tree.
    assert_ne!(
        http_get(front, "/old/%2E%2E/%2E%2E/offloadd.yaml").status,
        200
    );

    daemon.stop();
    assert!(
        env.path(old_rel).exists(),
        "a file that predates offloadd stays"
    );
}
