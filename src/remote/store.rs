//! The seam between the pipeline and a bucket: the [`Store`] trait, with the
//! few requests offloadd makes. [`super::client::Client`] implements it over
//! rust-s3; the pipeline's unit tests implement it in memory, so the
//! scheduling rules run deterministically with tokio's paused time.

use crate::keys::ObjectKey;
use crate::remote::error::StorageError;
use crate::remote::object_options::ObjectOptions;
use crate::remote::provider::Resolved;
use futures::future::BoxFuture;

/// The answer of a request.
pub type Reply<'a, T> = BoxFuture<'a, Result<T, StorageError>>;

/// The metadata key (after `x-amz-meta-`) that carries a multipart object's
/// part size, so its composite ETag can be recomputed from the local file.
pub const PART_SIZE_META: &str = "offloadd-part-size";

/// An ETag as offloadd compares it: quotes (plain or as the XML entity
/// `&quot;`) stripped, lower case.
pub fn normal_etag(raw: &str) -> String {
    raw.trim()
        .trim_start_matches("&quot;")
        .trim_end_matches("&quot;")
        .trim_matches('"')
        .to_ascii_lowercase()
}

/// The result of a HEAD request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub size: Option<u64>,
    /// Quotes stripped, lower case.
    pub etag: Option<String>,
    pub content_type: Option<String>,
    /// From [`PART_SIZE_META`], for multipart objects offloadd uploaded.
    pub part_size: Option<u64>,
}

/// An object found by listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// Quotes stripped, lower case.
    pub etag: Option<String>,
    /// Its LastModified as Unix ms, when the server gave one that parses.
    pub modified_ms: Option<u64>,
}

/// A multipart upload in progress, found by listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
    /// Unix ms, when the server said.
    pub initiated_ms: Option<u64>,
}

/// The requests offloadd makes to one provider.
pub trait Store: Send + Sync {
    /// The provider this store talks to.
    fn provider(&self) -> &Resolved;

    /// Uploads a whole object in one PUT; `md5` (the body's) goes as
    /// Content-MD5, which the server checks. Returns the ETag the server
    /// answered with, if any.
    fn put<'a>(
        &'a self,
        key: &'a ObjectKey,
        body: bytes::Bytes,
        md5: [u8; 16],
        options: &'a ObjectOptions,
    ) -> Reply<'a, Option<String>>;

    /// Starts a multipart upload whose parts are `part_size` bytes (recorded
    /// in the object's metadata); returns the upload id.
    fn initiate<'a>(
        &'a self,
        key: &'a ObjectKey,
        options: &'a ObjectOptions,
        part_size: u64,
    ) -> Reply<'a, String>;

    /// Uploads one part (`md5` as Content-MD5); returns its ETag.
    fn put_part<'a>(
        &'a self,
        key: &'a ObjectKey,
        upload_id: &'a str,
        number: u32,
        body: bytes::Bytes,
        md5: [u8; 16],
    ) -> Reply<'a, String>;

    /// Completes a multipart upload; returns the object's ETag as the server
    /// answered it, if it did.
    fn complete<'a>(
        &'a self,
        key: &'a ObjectKey,
        upload_id: &'a str,
        parts: Vec<(u32, String)>,
    ) -> Reply<'a, Option<String>>;

    fn abort<'a>(&'a self, key: &'a str, upload_id: &'a str) -> Reply<'a, ()>;

    /// HEAD of an object; `None` when it does not exist.
    fn head<'a>(&'a self, key: &'a ObjectKey) -> Reply<'a, Option<Head>>;

    /// One page (up to 1,000 objects) under `prefix`, and the token of the next.
    fn list_page<'a>(
        &'a self,
        prefix: &'a str,
        token: Option<String>,
    ) -> Reply<'a, (Vec<Listed>, Option<String>)>;

    /// The multipart uploads in progress under `prefix`; `None` where the
    /// provider cannot list them.
    fn list_uploads<'a>(&'a self, prefix: &'a str) -> Reply<'a, Option<Vec<PendingUpload>>>;

    /// A request that involves no queued file: a zero-byte PUT of the
    /// provider's health object, and what `check` adds. It fails when the
    /// provider as a whole does.
    fn probe(&self, check: Probe) -> Reply<'_, ()>;
}

/// What a [`Store::probe`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Uploads: the PUT of the health object.
    Write,
    /// Uploads verified by a HEAD (those whose local copy is deleted): the
    /// PUT, then a HEAD of the object, so that a key that may write but
    /// not read pauses the provider rather than failing every item.
    WriteAndRead,
}

/// The key of the health object [`Store::probe`] writes: `{prefix}/.offloadd-health`.
pub fn health_key(prefix: &str) -> ObjectKey {
    let prefix = prefix.trim_matches('/');
    ObjectKey::from_raw(if prefix.is_empty() {
        ".offloadd-health".to_string()
    } else {
        format!("{prefix}/.offloadd-health")
    })
}

/// Parses the RFC 3339 times S3 lists (`2026-11-26T09:18:42.000Z`) to Unix ms.
pub fn parse_time_ms(s: &str) -> Option<u64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.trim_end_matches('Z');
    let time = time.split(['+']).next()?;
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let secs: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = (days * 86_400 + hh * 3600 + mm * 60) * 1000 + (secs * 1000.0) as i64;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_time_ms("2026-11-18T11:06:40.000Z"),
            Some(1_795_000_000_000)
        );
        assert_eq!(
            crate::statedir::rfc3339(parse_time_ms("2024-02-29T23:59:59Z").unwrap()),
            "2024-02-29T23:59:59Z"
        );
        assert_eq!(parse_time_ms("yesterday"), None);
    }

    #[test]
    fn etags_lose_their_quotes_and_case() {
        assert_eq!(normal_etag("\"ABC-2\""), "abc-2");
        assert_eq!(normal_etag("&quot;abc&quot;"), "abc");
        assert_eq!(normal_etag(" abc "), "abc");
    }

    #[test]
    fn health_key_lives_under_the_prefix() {
        assert_eq!(health_key("/a/").as_str(), "a/.offloadd-health");
        assert_eq!(health_key("").as_str(), ".offloadd-health");
    }
}
