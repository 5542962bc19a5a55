//! Proof for `test-connection [PROVIDER]`: exact one-sentence diagnoses and
//! exit codes. Real s3s-fs for everything a real server produces (success,
//! bad access key, bad secret, missing bucket, closed port); a tiny local
//! responder with real S3 error XML for what it cannot (read-back denied,
//! wrong region, delete denied, no answer). The harness checks that no secret
//! appears in any output.

mod common;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn probe(env: &TestEnv) -> (i32, String, String) {
    env.cli(&["test-connection"])
}

fn assert_failed(got: (i32, String, String), diagnosis: &str) {
    let (code, out, err) = got;
    assert_eq!(code, 1, "exit 1 on failure: stdout={out} stderr={err}");
    assert_eq!(err.trim(), format!("offloadd: {diagnosis}"), "stdout={out}");
    assert!(
        out.contains(&format!("failed: {diagnosis}")),
        "stdout shows the diagnosis: {out}"
    );
}

#[test]
fn success_puts_reads_back_and_deletes() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    env.write_config(&Cfg::new(&s3.endpoint()));
    let (code, out, err) = env.cli(&["test-connection", PROVIDER]);
    assert_eq!(code, 0, "stdout={out} stderr={err}");
    for step in ["put … ok", "read back … ok", "delete … ok"] {
        assert!(out.contains(step), "`{step}` in: {out}");
    }
    assert!(
        out.contains(&format!("`{PREFIX}/.offloadd-probe-")),
        "probe under the prefix: {out}"
    );
    assert!(out.contains("passed:"), "{out}");
    assert!(
        s3.keys(BUCKET).is_empty(),
        "probe deleted: {:?}",
        s3.keys(BUCKET)
    );
    // Default: the active provider.
    let (code, out, _) = probe(&env);
    assert_eq!(code, 0, "{out}");
}

/// s3s-fs answers an unknown access key with NotSignedUp (AWS: InvalidAccessKeyId).
#[test]
fn bad_access_key() {
    let env = TestEnv::new();
    let s3 = S3Server::start_s3s_fs("AKSOMEONEELSE", &env.secret);
    s3.create_bucket(BUCKET);
    env.write_config(&Cfg::new(&s3.endpoint()));
    assert_failed(
        probe(&env),
        &format!("provider `{PROVIDER}` does not know the access key id (NotSignedUp); check `access_key_id`"),
    );
}

#[test]
fn bad_secret() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let wrong = env.new_secret();
    env.set_secret_file(&wrong);
    env.write_config(&Cfg::new(&s3.endpoint()));
    assert_failed(
        probe(&env),
        &format!("provider `{PROVIDER}` rejected the signature (SignatureDoesNotMatch): the secret access key is wrong; fix the secret of provider `{PROVIDER}`"),
    );
}

/// s3s-fs creates a missing bucket directory on PUT, so this uses moto, which
/// answers NoSuchBucket as S3 does.
#[test]
fn missing_bucket() {
    let env = TestEnv::new();
    let moto = MotoServer::start();
    env.write_config(&Cfg::new(&moto.endpoint()));
    assert_failed(
        probe(&env),
        &format!("bucket `{BUCKET}` does not exist at provider `{PROVIDER}` (NoSuchBucket: The specified bucket does not exist); create it, or fix `bucket`, `region` or `endpoint`"),
    );
}

#[test]
fn unreachable_endpoint() {
    let env = TestEnv::new();
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    env.write_config(&Cfg::new(&endpoint));
    assert_failed(
        probe(&env),
        &format!("cannot connect to {endpoint} (connection refused): nothing accepts connections there; check `endpoint` of provider `{PROVIDER}` and that the server is running and reachable"),
    );
}

#[test]
fn unknown_provider_is_a_usage_error_listing_the_names() {
    let env = TestEnv::new();
    env.write_config(&Cfg::new("http://127.0.0.1:9"));
    let (code, out, err) = env.cli(&["test-connection", "nope"]);
    assert_eq!(code, 2, "stdout={out} stderr={err}");
    assert_eq!(
        err.trim(),
        format!("offloadd: there is no provider `nope`; name one of: {PROVIDER}")
    );
}

#[test]
fn incomplete_provider_is_a_config_error() {
    let env = TestEnv::new();
    let mut cfg = Cfg::new("http://127.0.0.1:9");
    cfg.with_secret_file = false;
    env.write_config(&cfg);
    let (code, out, err) = env.cli(&["test-connection"]);
    assert_eq!(code, 78, "stdout={out} stderr={err}");
    assert!(
        err.starts_with(&format!(
            "offloadd: provider `{PROVIDER}` is incomplete: no secret access key"
        )),
        "{err}"
    );
}

/// A fake bucket that stores PUT bodies and answers GET with them, unless
/// `deny` returns an answer for the request first.
fn fake_bucket(
    deny: impl Fn(&SeenRequest) -> Option<FakeAnswer> + Send + Sync + 'static,
) -> FakeS3 {
    let stored: Arc<Mutex<Vec<u8>>> = Arc::default();
    FakeS3::start(move |req| {
        if let Some(a) = deny(req) {
            return a;
        }
        let etag = vec![("ETag".to_string(), "\"0\"".to_string())];
        match req.method.as_str() {
            "PUT" => {
                *stored.lock().unwrap() = req.body.clone();
                (200, etag, String::new())
            }
            "GET" => (
                200,
                etag,
                String::from_utf8_lossy(&stored.lock().unwrap()).into_owned(),
            ),
            "DELETE" => (204, vec![], String::new()),
            _ => (200, vec![], String::new()),
        }
    })
}

fn denied(what: &str) -> FakeAnswer {
    (
        403,
        vec![],
        s3_error_xml("AccessDenied", &format!("Access Denied ({what})"), ""),
    )
}

#[test]
fn read_back_denied() {
    let env = TestEnv::new();
    let fake = fake_bucket(|r| (r.method == "GET").then(|| denied("GET")));
    env.write_config(&Cfg::new(&fake.endpoint()));
    assert_failed(
        probe(&env),
        &format!("the probe upload to bucket `{BUCKET}` worked but reading it back was denied: the key lacks read permission (GetObject); grant it GetObject on the prefix"),
    );
    let seen = fake.seen();
    assert!(
        seen.iter().any(|r| r.method == "DELETE"),
        "the probe is cleaned up after a failed read-back: {seen:?}"
    );
}

#[test]
fn delete_denied_is_a_warning() {
    let env = TestEnv::new();
    let fake = fake_bucket(|r| (r.method == "DELETE").then(|| denied("DELETE")));
    env.write_config(&Cfg::new(&fake.endpoint()));
    let (code, out, err) = probe(&env);
    assert_eq!(code, 0, "a denied delete is only a warning: {out}{err}");
    assert!(out.contains("put … ok"), "{out}");
    assert!(out.contains("read back … ok"), "{out}");
    assert!(
        out.contains("delete … warning: deleting the probe object was denied: the key lacks DeleteObject; offloadd only needs it for delete-through"),
        "{out}"
    );
    assert!(out.contains("passed with warnings"), "{out}");
}

#[test]
fn wrong_region_named_in_the_error_document() {
    let env = TestEnv::new();
    let fake = FakeS3::start(|_| {
        (
            400,
            vec![],
            s3_error_xml(
                "AuthorizationHeaderMalformed",
                "The authorization header is malformed; the region 'us-east-1' is wrong; expecting 'eu-west-1'",
                "<Region>eu-west-1</Region>",
            ),
        )
    });
    env.write_config(&Cfg::new(&fake.endpoint()));
    assert_failed(
        probe(&env),
        &format!("bucket `{BUCKET}` is in region `eu-west-1`, not `us-east-1` as configured for provider `{PROVIDER}` (AuthorizationHeaderMalformed); set `region: eu-west-1` (or an `endpoint` in that region)"),
    );
}

#[test]
fn wrong_region_named_by_the_bucket_region_header() {
    // AWS answers a request to the wrong regional endpoint with a bare 301
    // (HEAD) or PermanentRedirect, and `x-amz-bucket-region` on both.
    let env = TestEnv::new();
    let fake = FakeS3::start(|req| {
        let header = vec![(
            "x-amz-bucket-region".to_string(),
            "ap-southeast-2".to_string(),
        )];
        if req.method == "HEAD" {
            (301, header, String::new())
        } else {
            (
                301,
                header,
                s3_error_xml(
                    "PermanentRedirect",
                    "The bucket you are attempting to access must be addressed using the specified endpoint.",
                    "<Bucket>media</Bucket>",
                ),
            )
        }
    });
    env.write_config(&Cfg::new(&fake.endpoint()));
    assert_failed(
        probe(&env),
        &format!("bucket `{BUCKET}` is in region `ap-southeast-2`, not `us-east-1` as configured for provider `{PROVIDER}` (PermanentRedirect); set `region: ap-southeast-2` (or an `endpoint` in that region)"),
    );
}

/// A redirect is not followed (a signed request sent elsewhere is refused
/// there): the error names where it leads.
#[test]
fn a_redirect_is_named_not_followed() {
    let env = TestEnv::new();
    let elsewhere = free_port();
    let fake = FakeS3::start(move |_| {
        (
            307,
            vec![(
                "Location".to_string(),
                format!("http://127.0.0.1:{elsewhere}/media/x"),
            )],
            String::new(),
        )
    });
    env.write_config(&Cfg::new(&fake.endpoint()));
    assert_failed(
        probe(&env),
        &format!("the endpoint of provider `{PROVIDER}` redirects to 127.0.0.1:{elsewhere} (HTTP 307); fix `endpoint`"),
    );
}

#[test]
fn no_answer_is_a_timeout() {
    let env = TestEnv::new();
    let fake = FakeS3::start(|_| {
        std::thread::sleep(Duration::from_secs(25));
        (500, vec![], String::new())
    });
    env.write_config(&Cfg::new(&fake.endpoint()));
    assert_failed(
        probe(&env),
        &format!("{} did not answer within 15s (timeout); check the network, firewalls and HTTPS_PROXY/NO_PROXY for provider `{PROVIDER}`", fake.endpoint()),
    );
}

#[test]
fn dns_failure() {
    let env = TestEnv::new();
    let endpoint = "https://s3.offloadd-test.invalid";
    env.write_config(&Cfg::new(endpoint));
    assert_failed(
        probe(&env),
        &format!("cannot resolve the host of {endpoint} (DNS failure); check `endpoint` (or what it is derived from: `region`, `account_id`) of provider `{PROVIDER}` and this machine's DNS"),
    );
}

#[test]
fn tls_failure() {
    // Something that is not TLS on an https:// endpoint: the handshake fails.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            use std::io::Write;
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let env = TestEnv::new();
    let endpoint = format!("https://127.0.0.1:{port}");
    env.write_config(&Cfg::new(&endpoint));
    let (code, out, err) = probe(&env);
    assert_eq!(code, 1, "stdout={out} stderr={err}");
    assert_tls_sentence(&err, &endpoint, "");
}

#[test]
fn read_back_differs() {
    let env = TestEnv::new();
    let fake = fake_bucket(|r| (r.method == "GET").then(|| (200, vec![], "rewritten".to_string())));
    env.write_config(&Cfg::new(&fake.endpoint()));
    let (code, out, err) = probe(&env);
    assert_eq!(code, 1, "stdout={out} stderr={err}");
    let err = err.trim();
    assert!(
        err.starts_with(&format!(
            "offloadd: the probe object read back from bucket `{BUCKET}` differs from what was written (9 bytes instead of "
        )) && err.ends_with(&format!(
            "); check that nothing between offloadd and provider `{PROVIDER}` rewrites objects"
        )),
        "{err}"
    );
}

/// A read-back answered with far more than was written (a gateway's page, a
/// video) is reported as longer, after reading one byte past the probe.
#[test]
fn read_back_longer_is_not_read_whole() {
    let env = TestEnv::new();
    let fake = fake_bucket(|r| (r.method == "GET").then(|| (200, vec![], "x".repeat(4 << 20))));
    env.write_config(&Cfg::new(&fake.endpoint()));
    let (code, out, err) = probe(&env);
    assert_eq!(code, 1, "stdout={out} stderr={err}");
    assert!(
        err.contains("differs from what was written (more than ")
            && err.contains(" bytes instead of "),
        "{err}"
    );
}
