//! Proof: a multipart upload has every non-trailing part exactly `part_size`
//! (checked through the S3 multipart ETag) and equal bytes; the daemon's peak
//! RSS is about the same for a 256 MiB file as for a 1 GiB file and within
//! `memory_limit` plus a fixed overhead.

mod common;
use common::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn multipart_parts_are_equal_and_bytes_match() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.multipart_threshold = Some("16MiB".into());
    cfg.part_size = Some("5MiB".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);

    let rel = "video/big.mp4";
    let size = 40 * MIB + 12_345; // 8 full parts and a short trailing one
    write_big_file(&env.path(rel), size);
    wait_until(Duration::from_secs(300), "40 MiB file uploaded", || {
        std::fs::metadata(s3.obj(rel))
            .map(|m| m.len() == size)
            .unwrap_or(false)
    });
    assert!(
        files_equal(&env.path(rel), &s3.obj(rel)),
        "object bytes equal the file"
    );
    let (code, etag, len) = s3.head(BUCKET, &format!("{PREFIX}/{rel}"));
    assert_eq!(code, 200);
    assert_eq!(len, Some(size as i64));
    let expected = multipart_etag(&env.path(rel), 5 * MIB as usize);
    assert_eq!(
        etag.as_deref(),
        Some(expected.as_str()),
        "ETag must be the multipart ETag of 5 MiB parts (every non-trailing part exactly part_size)"
    );
    assert!(expected.ends_with("-9"));

    // A file just under the threshold goes up in one PUT: plain MD5 ETag.
    let small = "video/small.mp4";
    write_big_file(&env.path(small), 3 * MIB);
    wait_until(Duration::from_secs(120), "small file uploaded", || {
        std::fs::metadata(s3.obj(small))
            .map(|m| m.len() == 3 * MIB)
            .unwrap_or(false)
    });
    let (_, etag, _) = s3.head(BUCKET, &format!("{PREFIX}/{small}"));
    let md5 = {
        use md5::{Digest, Md5};
        hex::encode(Md5::digest(std::fs::read(env.path(small)).unwrap()))
    };
    assert_eq!(
        etag.as_deref(),
        Some(md5.as_str()),
        "single PUT below the threshold"
    );
    daemon.stop();
    let st = env.status();
    assert_eq!(json_u64(&st, "uploaded_count"), 2, "status: {st}");
    assert_eq!(
        json_u64(&st, "uploaded_bytes"),
        size + 3 * MIB,
        "status: {st}"
    );
}

/// A memory_limit under the multipart threshold caps the single PUT: a file
/// larger than memory_limit goes in parts, so its bytes are never buffered
/// whole (guarantee 9).
#[test]
fn a_file_over_memory_limit_goes_in_parts_whatever_the_threshold() {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.multipart_threshold = Some("64MiB".into());
    cfg.part_size = Some("5MiB".into());
    cfg.memory_limit = Some("8MiB".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let rel = "video/mid.mp4";
    let size = 12 * MIB;
    write_big_file(&env.path(rel), size);
    wait_until(Duration::from_secs(120), "12 MiB file uploaded", || {
        std::fs::metadata(s3.obj(rel))
            .map(|m| m.len() == size)
            .unwrap_or(false)
    });
    assert!(files_equal(&env.path(rel), &s3.obj(rel)));
    let (_, etag, _) = s3.head(BUCKET, &format!("{PREFIX}/{rel}"));
    assert_eq!(
        etag,
        Some(multipart_etag(&env.path(rel), 5 * MIB as usize)),
        "a 12 MiB file under memory_limit 8MiB goes in 5 MiB parts"
    );
    daemon.stop();
}

/// Upload one file of `size` bytes with memory_limit 32MiB; return the
/// daemon's peak RSS in KiB, read just before stopping it.
fn peak_rss_for(size: u64) -> u64 {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let mut cfg = Cfg::new(&s3.endpoint());
    cfg.multipart_threshold = Some("16MiB".into());
    cfg.part_size = Some("8MiB".into());
    cfg.memory_limit = Some("32MiB".into());
    env.write_config(&cfg);
    let daemon = Daemon::start(&env, &[]);
    let rel = format!("big/file-{}MiB.bin", size / MIB);
    write_big_file(&env.path(&rel), size);
    wait_until(Duration::from_secs(900), &format!("{rel} uploaded"), || {
        std::fs::metadata(s3.obj(&rel))
            .map(|m| m.len() == size)
            .unwrap_or(false)
    });
    let peak = daemon.peak_rss_kib();
    daemon.stop();
    assert!(
        files_equal(&env.path(&rel), &s3.obj(&rel)),
        "{rel}: object bytes equal the file"
    );
    let (_, etag, _) = s3.head(BUCKET, &format!("{PREFIX}/{rel}"));
    assert_eq!(
        etag,
        Some(multipart_etag(&env.path(&rel), 8 * MIB as usize)),
        "{rel}: 8 MiB parts"
    );
    peak
}

#[test]
fn peak_rss_is_flat_in_file_size_and_bounded_by_memory_limit() {
    let p256 = peak_rss_for(256 * MIB);
    let p1g = peak_rss_for(1024 * MIB);
    eprintln!(
        "peak RSS: 256 MiB file → {} KiB, 1 GiB file → {} KiB",
        p256, p1g
    );
    let limit_kib = (32 + 80) * 1024;
    assert!(
        p256 <= limit_kib,
        "peak RSS {p256} KiB for 256 MiB exceeds memory_limit 32 MiB + 80 MiB"
    );
    assert!(
        p1g <= limit_kib,
        "peak RSS {p1g} KiB for 1 GiB exceeds memory_limit 32 MiB + 80 MiB"
    );
    assert!(
        p1g <= p256 + 24 * 1024,
        "peak RSS grows with file size: {p256} KiB for 256 MiB vs {p1g} KiB for 1 GiB"
    );
}
