//! Proof that the upload options reach the bucket: `storage_class`,
//! `cache_control`, `server_side_encryption` (AES256, aws:kms with a key id)
//! and the Content-Type from the extension are visible on a HEAD of objects
//! the real daemon uploaded, both by single PUT and by multipart. Uses
//! moto_server, which keeps these headers (s3s-fs does not) and accepts any key.

mod common;
use common::*;

fn options_config(env: &TestEnv, endpoint: &str, lines: &str) {
    let mut cfg = Cfg::new(endpoint);
    cfg.multipart_threshold = Some("5MiB".into());
    cfg.part_size = Some("5MiB".into());
    env.write_raw_config(&with_provider_lines(&env.config_yaml(&cfg), lines));
}

fn upload_two(
    env: &TestEnv,
    moto: &MotoServer,
) -> Vec<(String, s3::serde_types::HeadObjectResult)> {
    let daemon = Daemon::start(env, &[]);
    write_file(&env.path("img/a.png"), b"\x89PNG small");
    write_big_file(&env.path("vid/b.mp4"), 11 * 1024 * 1024 + 17);
    let mut heads = Vec::new();
    for rel in ["img/a.png", "vid/b.mp4"] {
        let key = format!("{PREFIX}/{rel}");
        let mut head = None;
        wait_until(LONG, &format!("{rel} uploaded to moto"), || {
            head = moto.head(BUCKET, &key);
            head.is_some()
        });
        heads.push((rel.to_string(), head.unwrap()));
    }
    daemon.stop();
    heads
}

#[test]
fn storage_class_cache_control_aes256_and_content_type() {
    let env = TestEnv::new();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    options_config(
        &env,
        &moto.endpoint(),
        "      storage_class: STANDARD_IA\n      cache_control: \"public, max-age=31536000, immutable\"\n      server_side_encryption: AES256\n",
    );
    let heads = upload_two(&env, &moto);
    for (rel, h) in &heads {
        assert_eq!(
            h.storage_class.as_deref(),
            Some("STANDARD_IA"),
            "{rel}: {h:?}"
        );
        assert_eq!(
            h.cache_control.as_deref(),
            Some("public, max-age=31536000, immutable"),
            "{rel}: {h:?}"
        );
        assert_eq!(
            h.server_side_encryption.as_deref(),
            Some("AES256"),
            "{rel}: {h:?}"
        );
    }
    assert_eq!(heads[0].1.content_type.as_deref(), Some("image/png"));
    assert_eq!(heads[1].1.content_type.as_deref(), Some("video/mp4"));
    assert_eq!(heads[1].1.content_length, Some(11 * 1024 * 1024 + 17));
    let etag = heads[1].1.e_tag.clone().unwrap_or_default();
    assert!(
        etag.trim_matches('"').ends_with("-3"),
        "b.mp4 went up in 3 parts: ETag {etag}"
    );
    // Its part size is recorded, so the ETag can be recomputed later.
    let meta = heads[1].1.metadata.clone().unwrap_or_default();
    assert_eq!(
        meta.get("offloadd-part-size").map(String::as_str),
        Some("5242880"),
        "{meta:?}"
    );
    assert_eq!(
        multipart_etag(&env.path("vid/b.mp4"), 5 * 1024 * 1024),
        etag.trim_matches('"'),
        "the composite ETag follows from the file and the recorded part size"
    );
}

#[test]
fn kms_encryption_with_key_id() {
    let env = TestEnv::new();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    options_config(
        &env,
        &moto.endpoint(),
        "      server_side_encryption: aws:kms\n      kms_key_id: arn:aws:kms:us-east-1:123456789012:key/offloadd-test\n",
    );
    let heads = upload_two(&env, &moto);
    for (rel, h) in &heads {
        assert_eq!(
            h.server_side_encryption.as_deref(),
            Some("aws:kms"),
            "{rel}: {h:?}"
        );
        assert_eq!(
            h.ssekms_key_id.as_deref(),
            Some("arn:aws:kms:us-east-1:123456789012:key/offloadd-test"),
            "{rel}: {h:?}"
        );
    }
    assert_eq!(heads[0].1.content_type.as_deref(), Some("image/png"));
    assert_eq!(heads[1].1.content_type.as_deref(), Some("video/mp4"));
}

/// Per-pattern `rules:`: the first matching rule sets the object's options
/// over the provider's; `check-config` says which rule a sample path hits.
#[test]
fn rules_set_object_options_by_pattern() {
    let env = TestEnv::new();
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let mut cfg = Cfg::new(&moto.endpoint());
    cfg.multipart_threshold = Some("5MiB".into());
    cfg.part_size = Some("5MiB".into());
    let yaml = with_provider_lines(
        &env.config_yaml(&cfg),
        "      cache_control: \"public, max-age=60\"\n",
    ) + "rules:\n  - match: \"vid/**/*.mp4\"\n    cache_control: \"public, max-age=31536000, immutable\"\n    storage_class: STANDARD_IA\n    content_disposition: inline\n  - match: \"vid/**\"\n    content_type: application/x-never\n  - match: \"img/*.png\"\n    content_type: image/x-offloadd-test\n    content_disposition: \"attachment; filename=a.png\"\n";
    env.write_raw_config(&yaml);
    let (code, out, err) = env.cli(&[
        "check-config",
        "--sample",
        "vid/2026/b.mp4",
        "--sample",
        "docs/x.txt",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("rule: vid/2026/b.mp4 -> rules[0] (`vid/**/*.mp4`): content_type=video/mp4, cache_control=public, max-age=31536000, immutable, storage_class=STANDARD_IA, content_disposition=inline"),
        "{out}"
    );
    assert!(
        out.contains("rule: docs/x.txt -> no rule (provider defaults): content_type=text/plain, cache_control=public, max-age=60"),
        "{out}"
    );
    let heads = upload_two(&env, &moto);
    let (_, png) = &heads[0];
    assert_eq!(
        png.content_type.as_deref(),
        Some("image/x-offloadd-test"),
        "{png:?}"
    );
    assert_eq!(
        png.cache_control.as_deref(),
        Some("public, max-age=60"),
        "provider default: {png:?}"
    );
    assert_eq!(
        png.content_disposition.as_deref(),
        Some("attachment; filename=a.png"),
        "{png:?}"
    );
    let (_, mp4) = &heads[1];
    assert_eq!(
        mp4.content_type.as_deref(),
        Some("video/mp4"),
        "first match wins: {mp4:?}"
    );
    assert_eq!(
        mp4.cache_control.as_deref(),
        Some("public, max-age=31536000, immutable"),
        "{mp4:?}"
    );
    assert_eq!(mp4.storage_class.as_deref(), Some("STANDARD_IA"), "{mp4:?}");
    assert_eq!(
        mp4.content_disposition.as_deref(),
        Some("inline"),
        "{mp4:?}"
    );
    assert_eq!(
        mp4.metadata
            .clone()
            .unwrap_or_default()
            .get("offloadd-part-size")
            .map(String::as_str),
        Some("5242880"),
        "a rule keeps the part-size metadata: {mp4:?}"
    );
}

#[test]
fn a_bad_rule_is_a_configuration_error_naming_it() {
    let env = TestEnv::new();
    let cfg = Cfg::new("http://127.0.0.1:9");
    env.write_raw_config(&(env.config_yaml(&cfg) + "rules:\n  - match: \"**/*.mp4\"\n    cache_control: x\n  - match: \"[\"\n    cache_control: y\n"));
    let (code, _, err) = env.cli(&["check-config"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("`rules[1]`: `match` pattern `[` is not a valid glob"),
        "{err}"
    );
    assert!(err.contains("line "), "names the line: {err}");
}
