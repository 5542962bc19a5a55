//! The S3 client for one provider (rust-s3 underneath) and the classification of
//! everything that can go wrong talking to it.
//!
//! Owns request building (headers for storage class, encryption, cache control,
//! Content-Type; Content-MD5 is added by rust-s3 for every PUT and part) and the
//! mapping of responses to [`StorageError`] classes that decide what happens next:
//! retry with backoff, pause the provider, or park the item.

use crate::keys::ObjectKey;
use crate::provider::{Addressing, Resolved, Sse};
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::serde_types::Part;
use s3::{Bucket, Region};
use std::time::Duration;

/// How an error affects the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Connection, timeout, 5xx, throttling: retry this item later with backoff.
    Transient,
    /// The provider itself is unusable (credentials, bucket, permissions, clock):
    /// pause it and probe.
    ProviderWide,
    /// Only this item is affected (too large, bad key): park it.
    Item,
    /// The multipart upload is gone or a part is invalid: start the upload again.
    RestartUpload,
}

/// A failed storage request, with a one-sentence explanation for operators.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    pub class: ErrorClass,
    pub code: Option<String>,
    pub status: Option<u16>,
    pub message: String,
}

impl StorageError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        StorageError {
            class,
            code: None,
            status: None,
            message: message.into(),
        }
    }
}

/// Extracts `<Code>` and `<Message>` from an S3 error document.
fn xml_field(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&close)? + start;
    Some(body[start..end].trim().to_string())
}

/// Classifies an HTTP status and S3 error code into a class and an explanation.
pub fn classify(status: u16, code: Option<&str>, provider: &str, bucket: &str) -> StorageError {
    use ErrorClass::*;
    let (class, message) = match code.unwrap_or("") {
        "InvalidAccessKeyId" => (ProviderWide, format!("provider `{provider}` rejected the access key id (InvalidAccessKeyId); check `access_key_id`")),
        "SignatureDoesNotMatch" => (ProviderWide, format!("provider `{provider}` rejected our signature (SignatureDoesNotMatch): the secret access key is wrong; fix the secret and restart or reload")),
        "NoSuchBucket" => (ProviderWide, format!("bucket `{bucket}` does not exist at provider `{provider}` (NoSuchBucket); create it or fix `bucket`")),
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => (ProviderWide, format!("provider `{provider}` denied writing to bucket `{bucket}` ({}); grant the key PutObject on the bucket", code.unwrap_or("AccessDenied"))),
        "RequestTimeTooSkewed" => (ProviderWide, format!("provider `{provider}` says this machine's clock is off (RequestTimeTooSkewed); fix the clock (e.g. enable NTP)")),
        "PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException" => (ProviderWide, format!("bucket `{bucket}` is in another region than configured for provider `{provider}` ({}); fix `region` or `endpoint`", code.unwrap_or(""))),
        "InvalidBucketName" => (ProviderWide, format!("provider `{provider}` says `{bucket}` is not a valid bucket name; fix `bucket`")),
        "NoSuchUpload" | "InvalidPart" | "InvalidPartOrder" => (RestartUpload, format!("provider `{provider}` no longer knows this multipart upload ({}); starting it again", code.unwrap_or(""))),
        "EntityTooLarge" => (Item, "the object is larger than the provider accepts (EntityTooLarge)".to_string()),
        "KeyTooLongError" => (Item, "the object key is longer than the provider accepts (KeyTooLongError); shorten the path or the prefix".to_string()),
        "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable" | "BadDigest" | "XAmzContentSHA256Mismatch" => (Transient, format!("provider `{provider}` answered {} (HTTP {status}); will retry", code.unwrap_or(""))),
        other => match status {
            401 | 403 => (ProviderWide, format!("provider `{provider}` refused the request (HTTP {status}{}); check the access key, secret and the key's permissions on bucket `{bucket}`", if other.is_empty() { String::new() } else { format!(", {other}") })),
            404 => (ProviderWide, format!("bucket `{bucket}` was not found at provider `{provider}` (HTTP 404); create it or fix `bucket` and `endpoint`")),
            301 | 307 => (ProviderWide, format!("provider `{provider}` redirected us (HTTP {status}): bucket `{bucket}` is probably in another region; fix `region` or `endpoint`")),
            408 | 429 | 500..=599 => (Transient, format!("provider `{provider}` answered HTTP {status}{}; will retry", if other.is_empty() { String::new() } else { format!(" ({other})") })),
            400 => (Item, format!("provider `{provider}` rejected the request as invalid (HTTP 400{})", if other.is_empty() { String::new() } else { format!(", {other}") })),
            _ => (Transient, format!("provider `{provider}` answered HTTP {status}{}; will retry", if other.is_empty() { String::new() } else { format!(" ({other})") })),
        },
    };
    StorageError {
        class,
        code: code.map(str::to_string),
        status: Some(status),
        message,
    }
}

/// A connected client for one provider.
#[derive(Clone)]
pub struct Client {
    pub provider: Resolved,
    /// For PUT and multipart initiation: carries the upload options as headers.
    upload_bucket: Bucket,
    /// For parts, completion, HEAD, GET and DELETE.
    plain_bucket: Bucket,
}

/// The result of a HEAD request.
#[derive(Debug, Clone)]
pub struct Head {
    pub size: Option<u64>,
    pub etag: Option<String>,
    pub content_type: Option<String>,
}

/// An object found by listing.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
}

const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest throughput a body upload is allowed before it counts as stalled.
const MIN_BYTES_PER_SEC: u64 = 256 * 1024;

impl Client {
    pub fn new(provider: &Resolved) -> Result<Client, StorageError> {
        // Retries and their pacing belong to the pipeline, not to rust-s3.
        s3::set_retries(0);
        let bad = |e: S3Error| {
            StorageError::new(
                ErrorClass::ProviderWide,
                format!(
                    "cannot set up the client for provider `{}`: {e}",
                    provider.name
                ),
            )
        };
        let region = Region::Custom {
            region: provider.region.clone(),
            endpoint: provider.endpoint.clone(),
        };
        let creds = Credentials::new(
            Some(&provider.access_key_id),
            Some(provider.secret.expose()),
            None,
            None,
            None,
        )
        .map_err(|e| {
            StorageError::new(
                ErrorClass::ProviderWide,
                format!("invalid credentials for provider `{}`: {e}", provider.name),
            )
        })?;
        let mut bucket = Bucket::new(&provider.bucket, region, creds).map_err(bad)?;
        if provider.addressing == Addressing::Path {
            bucket = bucket.with_path_style();
        }
        bucket.set_request_timeout(Some(SMALL_REQUEST_TIMEOUT));
        let plain_bucket = *bucket;
        let upload_bucket = plain_bucket
            .with_extra_headers(
                upload_headers(provider)
                    .map_err(|m| StorageError::new(ErrorClass::ProviderWide, m))?,
            )
            .map_err(bad)?;
        Ok(Client {
            provider: provider.clone(),
            upload_bucket,
            plain_bucket,
        })
    }

    fn err(&self, e: S3Error) -> StorageError {
        match e {
            S3Error::HttpFailWithBody(status, body) => {
                let code = xml_field(&body, "Code");
                classify(
                    status,
                    code.as_deref(),
                    &self.provider.name,
                    &self.provider.bucket,
                )
            }
            S3Error::Reqwest(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "could not connect"
                } else {
                    "failed"
                };
                StorageError::new(
                    ErrorClass::Transient,
                    format!(
                        "request to provider `{}` {what} ({}): {}; will retry",
                        self.provider.name,
                        self.provider.endpoint,
                        root_cause(&e)
                    ),
                )
            }
            other => StorageError::new(
                ErrorClass::Transient,
                format!(
                    "request to provider `{}` failed: {other}; will retry",
                    self.provider.name
                ),
            ),
        }
    }

    fn timeout_for(len: u64) -> Duration {
        SMALL_REQUEST_TIMEOUT + Duration::from_secs(len / MIN_BYTES_PER_SEC)
    }

    fn with_timeout(bucket: &Bucket, len: u64) -> Bucket {
        let mut b = bucket.clone();
        b.set_request_timeout(Some(Self::timeout_for(len)));
        b
    }

    /// Uploads a whole object in one PUT.
    pub async fn put(
        &self,
        key: &ObjectKey,
        body: &[u8],
        content_type: &str,
    ) -> Result<(), StorageError> {
        let b = Self::with_timeout(&self.upload_bucket, body.len() as u64);
        b.put_object_with_content_type(key.as_str(), body, content_type)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub async fn initiate_multipart(
        &self,
        key: &ObjectKey,
        content_type: &str,
    ) -> Result<String, StorageError> {
        let r = self
            .upload_bucket
            .initiate_multipart_upload(key.as_str(), content_type)
            .await
            .map_err(|e| self.err(e))?;
        Ok(r.upload_id)
    }

    /// Uploads one part; returns its ETag.
    pub async fn put_part(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        number: u32,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<String, StorageError> {
        let b = Self::with_timeout(&self.plain_bucket, body.len() as u64);
        let part = b
            .put_multipart_chunk(body, key.as_str(), number, upload_id, content_type)
            .await
            .map_err(|e| self.err(e))?;
        Ok(part.etag)
    }

    pub async fn complete_multipart(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        parts: Vec<(u32, String)>,
    ) -> Result<(), StorageError> {
        let parts = parts
            .into_iter()
            .map(|(part_number, etag)| Part { part_number, etag })
            .collect();
        let b = Self::with_timeout(&self.plain_bucket, 64 * 1024 * 1024);
        b.complete_multipart_upload(key.as_str(), upload_id, parts)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        self.plain_bucket
            .abort_upload(key, upload_id)
            .await
            .map_err(|e| self.err(e))
    }

    /// HEAD of an object; `Ok(None)` when it does not exist.
    pub async fn head(&self, key: &ObjectKey) -> Result<Option<Head>, StorageError> {
        match self.plain_bucket.head_object(key.as_str()).await {
            Ok((h, status)) if (200..300).contains(&status) => Ok(Some(Head {
                size: h.content_length.map(|l| l.max(0) as u64),
                etag: h.e_tag,
                content_type: h.content_type,
            })),
            Ok((_, 404)) => Ok(None),
            Ok((_, status)) => Err(classify(
                status,
                None,
                &self.provider.name,
                &self.provider.bucket,
            )),
            Err(S3Error::HttpFailWithBody(404, _)) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// One page (up to 1,000 objects) of the objects under `prefix`, and the token
    /// for the next page if there is one.
    pub async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>), StorageError> {
        let (page, _) = self
            .plain_bucket
            .list_page(prefix.to_string(), None, token, None, Some(1000))
            .await
            .map_err(|e| self.err(e))?;
        let next = if page.is_truncated {
            page.next_continuation_token
        } else {
            None
        };
        let objects = page
            .contents
            .into_iter()
            .map(|o| Listed {
                key: o.key,
                size: o.size,
                etag: o.e_tag.map(|e| e.trim_matches('"').to_ascii_lowercase()),
            })
            .collect();
        Ok((objects, next))
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.plain_bucket
            .delete_object(key.as_str())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Headers sent with every object (PUT and multipart initiation).
fn upload_headers(p: &Resolved) -> Result<http::HeaderMap, String> {
    let mut h = http::HeaderMap::new();
    let mut set = |name: &'static str, value: &str| -> Result<(), String> {
        let v = http::HeaderValue::from_str(value)
            .map_err(|_| format!("`{name}` value `{value}` is not a valid HTTP header value; fix it in provider `{}`", p.name))?;
        h.insert(http::HeaderName::from_static(name), v);
        Ok(())
    };
    if let Some(sc) = &p.storage_class {
        set("x-amz-storage-class", sc)?;
    }
    if let Some(cc) = &p.cache_control {
        set("cache-control", cc)?;
    }
    match &p.server_side_encryption {
        Some(Sse::Aes256) => set("x-amz-server-side-encryption", "AES256")?,
        Some(Sse::AwsKms { key_id }) => {
            set("x-amz-server-side-encryption", "aws:kms")?;
            if let Some(k) = key_id {
                set("x-amz-server-side-encryption-aws-kms-key-id", k)?;
            }
        }
        None => {}
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_classes() {
        let c = |s, code| classify(s, code, "p", "b").class;
        assert_eq!(
            c(403, Some("SignatureDoesNotMatch")),
            ErrorClass::ProviderWide
        );
        assert_eq!(c(403, Some("InvalidAccessKeyId")), ErrorClass::ProviderWide);
        assert_eq!(c(404, Some("NoSuchBucket")), ErrorClass::ProviderWide);
        assert_eq!(c(503, Some("SlowDown")), ErrorClass::Transient);
        assert_eq!(c(500, None), ErrorClass::Transient);
        assert_eq!(c(429, None), ErrorClass::Transient);
        assert_eq!(c(404, Some("NoSuchUpload")), ErrorClass::RestartUpload);
        assert_eq!(c(400, Some("EntityTooLarge")), ErrorClass::Item);
        assert_eq!(c(403, None), ErrorClass::ProviderWide);
    }

    #[test]
    fn wrong_secret_message_names_the_secret() {
        let e = classify(403, Some("SignatureDoesNotMatch"), "r2", "media");
        assert!(e.message.contains("secret access key"), "{}", e.message);
    }

    #[test]
    fn xml_code_is_extracted() {
        let body =
            "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code><Message>x</Message></Error>";
        assert_eq!(xml_field(body, "Code").as_deref(), Some("NoSuchBucket"));
        assert_eq!(xml_field("nothing", "Code"), None);
    }
}
