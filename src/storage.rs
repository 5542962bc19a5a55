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

/// The timeout of a request carrying a body of `len` bytes: long enough for a
/// slow but moving upload, short enough to notice a dead one.
pub fn request_timeout(len: u64) -> Duration {
    SMALL_REQUEST_TIMEOUT + Duration::from_secs(len / MIN_BYTES_PER_SEC)
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

    fn with_timeout(bucket: &Bucket, len: u64) -> Bucket {
        let mut b = bucket.clone();
        b.set_request_timeout(Some(request_timeout(len)));
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

/// What failed below HTTP, for diagnosis.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Nothing listens at the endpoint (connection refused).
    Refused,
    /// The endpoint's host name does not resolve.
    Dns,
    /// The TLS handshake or certificate check failed; the root cause.
    Tls(String),
    /// No answer in time.
    Timeout,
    /// Any other connection-level failure; the root cause.
    Other(String),
}

/// A failed request with what a diagnosis needs beyond [`StorageError`]: the
/// transport failure, if any, and the bucket's real region when the server
/// told it (`<Region>` in the error document or the `x-amz-bucket-region`
/// header).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{error}")]
pub struct Fault {
    pub error: StorageError,
    pub transport: Option<Transport>,
    pub region: Option<String>,
}

impl From<Fault> for StorageError {
    fn from(f: Fault) -> StorageError {
        f.error
    }
}

/// Whether an S3 error code or status means "wrong region for this bucket".
pub fn is_wrong_region(status: Option<u16>, code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "PermanentRedirect"
                | "AuthorizationHeaderMalformed"
                | "IllegalLocationConstraintException"
        )
    ) || (code.is_none() && matches!(status, Some(301 | 307)))
}

/// The region an S3 error document names: `<Region>`, else the region in an
/// AWS `<Endpoint>` such as `media.s3.eu-west-1.amazonaws.com`.
pub fn region_from_error(body: &str) -> Option<String> {
    if let Some(r) = xml_field(body, "Region").filter(|r| valid_region(r)) {
        return Some(r);
    }
    let endpoint = xml_field(body, "Endpoint")?;
    let host = endpoint.trim_end_matches(".amazonaws.com");
    if host.len() == endpoint.len() {
        return None;
    }
    let last = host.rsplit('.').next()?;
    let region = last.strip_prefix("s3-").unwrap_or(last);
    (region != "s3" && valid_region(region)).then(|| region.to_string())
}

fn valid_region(r: &str) -> bool {
    !r.is_empty() && r.len() <= 64 && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Classifies a connection-level failure from its error chain.
pub fn transport_of(timeout: bool, chain: &[String]) -> Transport {
    if timeout {
        return Transport::Timeout;
    }
    let all = chain.join(": ").to_ascii_lowercase();
    if all.contains("connection refused") {
        Transport::Refused
    } else if all.contains("dns error")
        || all.contains("failed to lookup address")
        || all.contains("name or service not known")
        || all.contains("no address associated")
    {
        Transport::Dns
    } else if ["tls", "ssl", "certificate", "handshake"]
        .iter()
        .any(|w| all.contains(w))
    {
        Transport::Tls(chain.last().cloned().unwrap_or_default())
    } else if all.contains("timed out") {
        Transport::Timeout
    } else {
        Transport::Other(chain.last().cloned().unwrap_or_default())
    }
}

/// The messages of an error and all its sources, outermost first.
fn error_chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(next) = cur {
        out.push(next.to_string());
        cur = next.source();
    }
    out
}

impl Client {
    /// Sets the time allowed for each small request (HEAD, GET, DELETE, the
    /// probe's PUT); bodies still get extra time for their size.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.plain_bucket.set_request_timeout(Some(timeout));
        self.upload_bucket.set_request_timeout(Some(timeout));
    }

    fn fault(&self, e: S3Error) -> Fault {
        let (transport, region) = match &e {
            S3Error::HttpFailWithBody(_, body) => (None, region_from_error(body)),
            S3Error::Reqwest(r) => (Some(transport_of(r.is_timeout(), &error_chain(r))), None),
            _ => (None, None),
        };
        Fault {
            error: self.err(e),
            transport,
            region,
        }
    }

    /// Asks the endpoint, unsigned, which region the bucket is in (the
    /// `x-amz-bucket-region` header S3 sends even on 301 and 403).
    pub async fn bucket_region(&self) -> Option<String> {
        let resp = self
            .plain_bucket
            .http_client()
            .head(self.plain_bucket.url())
            .timeout(SMALL_REQUEST_TIMEOUT)
            .send()
            .await
            .ok()?;
        let region = resp.headers().get("x-amz-bucket-region")?.to_str().ok()?;
        valid_region(region).then(|| region.to_string())
    }

    /// Uploads a small object in one PUT with the upload options; for probes.
    pub async fn put_small(&self, key: &str, body: &[u8], content_type: &str) -> Result<(), Fault> {
        self.upload_bucket
            .put_object_with_content_type(key, body, content_type)
            .await
            .map_err(|e| self.fault(e))?;
        Ok(())
    }

    /// The bytes of an object.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, Fault> {
        let r = self
            .plain_bucket
            .get_object(key)
            .await
            .map_err(|e| self.fault(e))?;
        Ok(r.to_vec())
    }

    /// Deletes an object by its raw key; for probes.
    pub async fn delete_key(&self, key: &str) -> Result<(), Fault> {
        self.plain_bucket
            .delete_object(key)
            .await
            .map_err(|e| self.fault(e))?;
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

    #[test]
    fn region_is_read_from_error_documents() {
        let malformed = "<Error><Code>AuthorizationHeaderMalformed</Code><Message>the region 'us-east-1' is wrong; expecting 'eu-west-1'</Message><Region>eu-west-1</Region></Error>";
        assert_eq!(region_from_error(malformed).as_deref(), Some("eu-west-1"));
        let redirect = "<Error><Code>PermanentRedirect</Code><Endpoint>media.s3.ap-south-1.amazonaws.com</Endpoint><Bucket>media</Bucket></Error>";
        assert_eq!(region_from_error(redirect).as_deref(), Some("ap-south-1"));
        let legacy = "<Error><Code>PermanentRedirect</Code><Endpoint>media.s3-eu-west-2.amazonaws.com</Endpoint></Error>";
        assert_eq!(region_from_error(legacy).as_deref(), Some("eu-west-2"));
        let global = "<Error><Code>PermanentRedirect</Code><Endpoint>media.s3.amazonaws.com</Endpoint></Error>";
        assert_eq!(region_from_error(global), None);
        assert_eq!(
            region_from_error("<Error><Region>a b</Region></Error>"),
            None
        );
    }

    #[test]
    fn wrong_region_codes() {
        assert!(is_wrong_region(
            Some(400),
            Some("AuthorizationHeaderMalformed")
        ));
        assert!(is_wrong_region(Some(301), Some("PermanentRedirect")));
        assert!(is_wrong_region(Some(301), None));
        assert!(!is_wrong_region(Some(403), Some("AccessDenied")));
        assert!(!is_wrong_region(Some(404), None));
    }

    #[test]
    fn transport_failures_are_told_apart() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(transport_of(true, &c(&["x"])), Transport::Timeout);
        assert_eq!(
            transport_of(
                false,
                &c(&[
                    "error sending request",
                    "client error (Connect)",
                    "tcp connect error",
                    "Connection refused (os error 111)"
                ])
            ),
            Transport::Refused
        );
        assert_eq!(
            transport_of(
                false,
                &c(&[
                    "error sending request",
                    "dns error",
                    "failed to lookup address information: Name or service not known"
                ])
            ),
            Transport::Dns
        );
        assert_eq!(
            transport_of(
                false,
                &c(&[
                    "error sending request",
                    "error:0A000086:SSL routines::certificate verify failed"
                ])
            ),
            Transport::Tls("error:0A000086:SSL routines::certificate verify failed".into())
        );
    }
}
