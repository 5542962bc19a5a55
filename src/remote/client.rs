//! The S3 client for one provider (rust-s3 underneath): requests and nothing
//! else. It implements [`Store`], the seam the pipeline talks to.
//!
//! Owns request building (headers for storage class, encryption, cache control,
//! Content-Type, the part-size metadata of multipart uploads) and turns every
//! failure into a classified [`StorageError`]. Bodies (PUT and UploadPart) go
//! on a data path of their own: rust-s3 presigns the request over our headers,
//! including our Content-MD5, and its HTTP client sends the buffer as is, so a
//! byte is hashed once (our MD5, which the server checks) and never copied.

use crate::keys::ObjectKey;
use crate::remote::error::{
    classify, error_chain, region_from_error, root_cause, transport_of, valid_region, xml_field,
    ErrorClass, Fault, StorageError, Transport,
};
use crate::remote::object_options::ObjectOptions;
use crate::remote::provider::{Addressing, Resolved, Sse};
use crate::remote::store::{
    self, normal_etag, Head, Listed, PendingUpload, Reply, Store, PART_SIZE_META,
};
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::serde_types::Part;
use s3::{Bucket, Region};
use std::time::Duration;

/// A connected client for one provider.
#[derive(Clone)]
pub struct Client {
    pub provider: Resolved,
    /// For PUT and multipart initiation: carries the upload options as headers.
    upload_bucket: Bucket,
    /// For parts, completion, HEAD, GET and DELETE.
    plain_bucket: Bucket,
}

/// The timeout of a request carrying a body of `len` bytes: long enough for a
/// slow but moving upload, short enough to notice a dead one.
pub fn request_timeout(len: u64) -> Duration {
    SMALL_REQUEST_TIMEOUT + Duration::from_secs(len / MIN_BYTES_PER_SEC)
}

const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a presigned data-path URL is valid (it is used at once).
const PRESIGN_EXPIRY_SECS: u32 = 3600;
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
                if let Transport::Tls(cause) = transport_of(e.is_timeout(), &error_chain(&e)) {
                    return StorageError::new(
                        ErrorClass::Transient,
                        format!(
                            "the TLS connection to provider `{}` ({}) failed ({cause}); check that it speaks HTTPS with a certificate this machine trusts (system store, or SSL_CERT_FILE); will retry",
                            self.provider.name, self.provider.endpoint
                        ),
                    );
                }
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

    /// The headers an object is created with: the provider's upload headers,
    /// with what `options` sets over them, then `extra`.
    fn object_headers(
        &self,
        options: &ObjectOptions,
        extra: &[(&'static str, String)],
    ) -> Result<http::HeaderMap, StorageError> {
        let mut headers = self.upload_bucket.extra_headers.clone();
        let values = [
            ("cache-control", options.cache_control.clone()),
            ("x-amz-storage-class", options.storage_class.clone()),
            ("content-disposition", options.content_disposition.clone()),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .chain(extra.iter().cloned());
        for (name, value) in values {
            let v = http::HeaderValue::from_str(&value).map_err(|_| {
                StorageError::new(
                    ErrorClass::Item,
                    format!("`{name}` value `{value}` is not a valid HTTP header value; fix the rule that sets it"),
                )
            })?;
            headers.insert(http::HeaderName::from_static(name), v);
        }
        Ok(headers)
    }

    /// The data path: a PUT of `body` to a URL presigned by rust-s3 over
    /// `headers` (the payload is not hashed again: the server checks our
    /// Content-MD5), sent by the bucket's own HTTP client without copying the
    /// body. Returns the response's ETag, quotes stripped.
    async fn put_presigned(
        &self,
        key: &str,
        mut headers: http::HeaderMap,
        queries: Option<std::collections::HashMap<String, String>>,
        body: Vec<u8>,
        md5: [u8; 16],
    ) -> Result<Option<String>, StorageError> {
        use base64::Engine as _;
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5);
        headers.insert(
            http::HeaderName::from_static("content-md5"),
            http::HeaderValue::from_str(&md5).expect("base64 is a valid header value"),
        );
        let url = self
            .plain_bucket
            .presign_put(key, PRESIGN_EXPIRY_SECS, Some(headers.clone()), queries)
            .await
            .map_err(|e| self.err(e))?;
        let timeout = request_timeout(body.len() as u64);
        let sent = self
            .plain_bucket
            .http_client()
            .put(url)
            .headers(headers)
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| self.err(S3Error::Reqwest(e)))?;
        let status = sent.status().as_u16();
        let etag = sent
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(normal_etag);
        if (200..300).contains(&status) {
            return Ok(etag);
        }
        let text = sent.text().await.unwrap_or_default();
        Err(self.err(S3Error::HttpFailWithBody(status, text)))
    }

    /// Uploads a whole object in one PUT; the ETag of the answer.
    pub async fn put(
        &self,
        key: &ObjectKey,
        body: Vec<u8>,
        md5: [u8; 16],
        options: &ObjectOptions,
    ) -> Result<Option<String>, StorageError> {
        let headers =
            self.object_headers(options, &[("content-type", options.content_type.clone())])?;
        self.put_presigned(key.as_str(), headers, None, body, md5)
            .await
    }

    /// Starts a multipart upload; the object will carry its part size in
    /// `x-amz-meta-offloadd-part-size`.
    pub async fn initiate_multipart(
        &self,
        key: &ObjectKey,
        options: &ObjectOptions,
        part_size: u64,
    ) -> Result<String, StorageError> {
        let headers = self.object_headers(
            options,
            &[("x-amz-meta-offloadd-part-size", part_size.to_string())],
        )?;
        let bucket = self
            .plain_bucket
            .with_extra_headers(headers)
            .map_err(|e| self.err(e))?;
        let r = bucket
            .initiate_multipart_upload(key.as_str(), &options.content_type)
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
        md5: [u8; 16],
    ) -> Result<String, StorageError> {
        let queries = [
            ("partNumber".to_string(), number.to_string()),
            ("uploadId".to_string(), upload_id.to_string()),
        ]
        .into_iter()
        .collect();
        let etag = self
            .put_presigned(
                key.as_str(),
                http::HeaderMap::new(),
                Some(queries),
                body,
                md5,
            )
            .await?;
        etag.ok_or_else(|| {
            StorageError::new(
                ErrorClass::RestartUpload,
                format!(
                    "provider `{}` accepted part {number} without an ETag; starting the upload again",
                    self.provider.name
                ),
            )
        })
    }

    /// Completes a multipart upload; the object's ETag from the answer.
    pub async fn complete_multipart(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        parts: Vec<(u32, String)>,
    ) -> Result<Option<String>, StorageError> {
        let parts = parts
            .into_iter()
            .map(|(part_number, etag)| Part { part_number, etag })
            .collect();
        let b = Self::with_timeout(&self.plain_bucket, 64 * 1024 * 1024);
        let answer = b
            .complete_multipart_upload(key.as_str(), upload_id, parts)
            .await
            .map_err(|e| self.err(e))?;
        let body = String::from_utf8_lossy(answer.as_slice());
        Ok(xml_field(&body, "ETag").map(|e| normal_etag(&e)))
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
                etag: h.e_tag.as_deref().map(normal_etag),
                content_type: h.content_type,
                part_size: h
                    .metadata
                    .as_ref()
                    .and_then(|m| m.get(PART_SIZE_META))
                    .and_then(|v| v.trim().parse().ok()),
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
                etag: o.e_tag.as_deref().map(normal_etag),
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

    /// The multipart uploads in progress under `prefix`; `None` where the
    /// provider does not implement the listing.
    pub async fn list_uploads(
        &self,
        prefix: &str,
    ) -> Result<Option<Vec<PendingUpload>>, StorageError> {
        let pages = match self
            .plain_bucket
            .list_multiparts_uploads(Some(prefix), None)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let e = self.err(e);
                let unsupported = matches!(e.status, Some(400 | 404 | 405 | 501))
                    || matches!(e.code.as_deref(), Some("NotImplemented"));
                return if unsupported { Ok(None) } else { Err(e) };
            }
        };
        Ok(Some(
            pages
                .into_iter()
                .flat_map(|p| p.uploads)
                .map(|u| PendingUpload {
                    initiated_ms: store::parse_time_ms(&u.initiated),
                    key: u.key,
                    upload_id: u.id,
                })
                .collect(),
        ))
    }

    /// A zero-byte PUT of the health object, with the upload options.
    pub async fn probe(&self) -> Result<(), StorageError> {
        let key = store::health_key(&self.provider.prefix);
        self.upload_bucket
            .put_object_with_content_type(key.as_str(), b"", "application/octet-stream")
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

impl Store for Client {
    fn provider(&self) -> &Resolved {
        &self.provider
    }

    fn put<'a>(
        &'a self,
        key: &'a ObjectKey,
        body: Vec<u8>,
        md5: [u8; 16],
        options: &'a ObjectOptions,
    ) -> Reply<'a, Option<String>> {
        Box::pin(Client::put(self, key, body, md5, options))
    }

    fn initiate<'a>(
        &'a self,
        key: &'a ObjectKey,
        options: &'a ObjectOptions,
        part_size: u64,
    ) -> Reply<'a, String> {
        Box::pin(self.initiate_multipart(key, options, part_size))
    }

    fn put_part<'a>(
        &'a self,
        key: &'a ObjectKey,
        upload_id: &'a str,
        number: u32,
        body: Vec<u8>,
        md5: [u8; 16],
    ) -> Reply<'a, String> {
        Box::pin(Client::put_part(self, key, upload_id, number, body, md5))
    }

    fn complete<'a>(
        &'a self,
        key: &'a ObjectKey,
        upload_id: &'a str,
        parts: Vec<(u32, String)>,
    ) -> Reply<'a, Option<String>> {
        Box::pin(self.complete_multipart(key, upload_id, parts))
    }

    fn abort<'a>(&'a self, key: &'a str, upload_id: &'a str) -> Reply<'a, ()> {
        Box::pin(self.abort_multipart(key, upload_id))
    }

    fn head<'a>(&'a self, key: &'a ObjectKey) -> Reply<'a, Option<Head>> {
        Box::pin(Client::head(self, key))
    }

    fn list_page<'a>(
        &'a self,
        prefix: &'a str,
        token: Option<String>,
    ) -> Reply<'a, (Vec<Listed>, Option<String>)> {
        Box::pin(Client::list_page(self, prefix, token))
    }

    fn list_uploads<'a>(&'a self, prefix: &'a str) -> Reply<'a, Option<Vec<PendingUpload>>> {
        Box::pin(Client::list_uploads(self, prefix))
    }

    fn probe(&self) -> Reply<'_, ()> {
        Box::pin(Client::probe(self))
    }
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
