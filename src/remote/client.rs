//! The S3 client for one provider: requests and nothing else. It implements
//! [`Store`], the seam the pipeline talks to.
//!
//! rust-s3 builds and signs every request (URL, SigV4 headers, XML bodies);
//! this client sends them over an HTTP client of its own, one connection pool
//! per provider, which trusts the system store (`SSL_CERT_FILE` honoured)
//! plus the provider's `ca_file`, honours `HTTPS_PROXY`/`NO_PROXY`, and
//! follows no redirect (a signed request re-sent elsewhere is refused). Of
//! an answer's body it reads at most [`ERROR_BODY_MAX`] of an error and
//! [`ANSWER_BODY_MAX`] of anything else.
//!
//! Owns request building (headers for storage class, encryption, cache control,
//! Content-Type, the part-size metadata of multipart uploads) and turns every
//! failure into a classified [`StorageError`]. Bodies (PUT and UploadPart) go
//! as presigned requests over our headers, including our Content-MD5, with
//! the buffer sent as is, so a byte is hashed once (our MD5, which the server
//! checks) and never copied.
//!
//! Listings ask for url-encoded keys (`encoding-type=url`, signed with the
//! rest of the query) where the provider honours it, and decode them in one
//! place ([`Client::listed_name`]): XML 1.0 cannot carry every key a file
//! name makes (see [`KeyEncoding`]).

use crate::keys::ObjectKey;
use crate::remote::error::{
    classify, error_chain, region_from_error, root_cause, server_message, transport_of,
    valid_region, xml_field, Answer, ErrorClass, Fault, Request, StorageError, Transport,
};
use crate::remote::object_options::ObjectOptions;
use crate::remote::provider::{Addressing, Resolved, Sse};
use crate::remote::store::{
    self, normal_etag, Head, Listed, PendingUpload, Probe, Reply, Store, PART_SIZE_META,
};
use s3::command::{Command, HttpMethod};
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::request::tokio_backend::ReqwestRequest;
use s3::request::Request as _;
use s3::serde_types::{
    CompleteMultipartUploadData, InitiateMultipartUploadResponse, ListBucketResult,
    ListMultipartUploadsResult, Part,
};
use s3::{Bucket, Region};
use std::time::Duration;

/// A connected client for one provider.
#[derive(Clone)]
pub struct Client {
    pub provider: Resolved,
    /// Signs requests for the bucket (rust-s3); never sends them.
    signer: Bucket,
    /// Sends every request.
    http: reqwest::Client,
    /// The provider's headers for every object (class, encryption, cache).
    upload_headers: http::HeaderMap,
    /// The time allowed for a request without a body.
    timeout: Duration,
    /// Body bytes this provider's requests are sending now.
    sending: Sending,
    /// How the provider's listings carry keys, found out by the first one.
    key_encoding: std::sync::Arc<tokio::sync::OnceCell<KeyEncoding>>,
}

/// The body bytes being sent at once: they share the link, so each body's
/// timeout counts them all. A burst of 128 images on a slow uplink would
/// otherwise time out together, be sent again together, and never finish.
#[derive(Clone, Default)]
struct Sending(std::sync::Arc<std::sync::atomic::AtomicU64>);

/// One body counted in [`Sending`] while it goes.
struct Going<'a> {
    sending: &'a Sending,
    len: u64,
    /// Its bytes and those already being sent when it started.
    sharing: u64,
}

impl Sending {
    fn start(&self, len: u64) -> Going<'_> {
        use std::sync::atomic::Ordering;
        let before = self.0.fetch_add(len, Ordering::Relaxed);
        Going {
            sending: self,
            len,
            sharing: before + len,
        }
    }
}

impl Drop for Going<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.sending.0.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// The timeout of a request whose body shares the link with `len` bytes in
/// all (its own included): long enough for a slow but moving upload, short
/// enough to notice a dead one.
pub fn request_timeout(len: u64) -> Duration {
    SMALL_REQUEST_TIMEOUT + Duration::from_secs(len / MIN_BYTES_PER_SEC)
}

/// The timeout of the request that completes a multipart upload.
pub fn complete_timeout() -> Duration {
    request_timeout(COMPLETE_TIMEOUT_AS_BYTES)
}

/// Whose ETag an answer carries.
#[derive(Clone, Copy)]
enum EtagOf {
    /// A part's: the completion names it, whatever it is.
    Part,
    /// An object's: kept only where it may be the MD5 of the bytes.
    Object,
}

/// Whether an answer says the object is encrypted with SSE-KMS, by our
/// header or by the bucket's default encryption: its ETag is then not the
/// MD5 of its bytes and proves nothing.
fn kms_encrypted(headers: &http::HeaderMap) -> bool {
    headers
        .get("x-amz-server-side-encryption")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("aws:kms"))
}

/// The ETag of an answer, quotes stripped; an object's only where it may
/// prove the bytes (see [`kms_encrypted`]), so that verification does not
/// compare it with the MD5 of what was sent.
fn answered_etag(headers: &http::HeaderMap, of: EtagOf) -> Option<String> {
    if matches!(of, EtagOf::Object) && kms_encrypted(headers) {
        return None;
    }
    headers
        .get(http::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(normal_etag)
}

/// An upload id as rust-s3 must be given it for Complete and Abort: it
/// writes the id into the URL as it is, and signs the query as decoded, where
/// a `+` reads as a space. R2's ids are base64 (`+`, `/`, `=`), so unencoded
/// they fail the signature; parts (sent with the id as a query pair) were
/// never affected.
fn query_value(raw: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(raw, KEEP).to_string()
}

/// How a provider's listings carry object keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyEncoding {
    /// Percent-encoded, when asked with `encoding-type=url`: every key goes
    /// through the XML as it is. As XML text, a carriage return is read as a
    /// line feed (XML 1.0 end-of-line handling), and other control
    /// characters are not XML at all: moto and s3s-fs send them as they are,
    /// which a strict parser (boto3's) refuses.
    Url,
    /// As XML text: the provider ignores `encoding-type`, or answers
    /// `<EncodingType>url` without encoding anything (s3s-fs 0.14), where
    /// decoding would turn `a%41` into `aA` and `a+b` into `a b`.
    Text,
}

/// The name, under the prefix listed, of the one-key listing that finds out
/// whether a provider encodes keys: a provider that does answers its `%` and
/// `+` as `%25` and `%2B`. (No space: rust-s3 writes one into the URL as
/// `+`, which not every server reads back as a space.)
const ENCODING_PROBE: &str = ".offloadd-encoding-probe%+";

/// A name from a listing answered with `encoding-type=url` (`Key`, `Prefix`,
/// `NextKeyMarker`): `%XX` is the byte XX and `+` a space, as S3 encodes
/// them (and boto3 decodes them); `None` if it is not such an encoding of
/// UTF-8.
fn url_decoded(encoded: &str) -> Option<String> {
    fn hex(b: Option<u8>) -> Option<u8> {
        char::from(b?).to_digit(16).map(|d| d as u8)
    }
    let mut bytes = encoded.bytes();
    let mut out = Vec::with_capacity(encoded.len());
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => (hex(bytes.next())? << 4) | hex(bytes.next())?,
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// Whether a listing answer's names are to be decoded: asked for url-encoded
/// and answered so. A server that ignored the parameter says nothing.
fn decodes(asked: KeyEncoding, answered: Option<&str>) -> bool {
    asked == KeyEncoding::Url && answered == Some("url")
}

const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a presigned data-path URL is valid (it is used at once).
const PRESIGN_EXPIRY_SECS: u32 = 3600;
/// The slowest throughput a body upload is allowed before it counts as stalled.
const MIN_BYTES_PER_SEC: u64 = 256 * 1024;
/// The completion of a multipart upload may take the server a while: it
/// assembles the object. Allowed as long as a 64 MiB body.
const COMPLETE_TIMEOUT_AS_BYTES: u64 = 64 * 1024 * 1024;

impl Client {
    pub fn new(provider: &Resolved) -> Result<Client, StorageError> {
        let provider_wide = |what: String| StorageError::new(ErrorClass::ProviderWide, what);
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
            provider_wide(format!(
                "invalid credentials for provider `{}`: {e}",
                provider.name
            ))
        })?;
        let mut signer = *Bucket::new(&provider.bucket, region, creds).map_err(|e| {
            provider_wide(format!(
                "cannot set up the client for provider `{}`: {e}",
                provider.name
            ))
        })?;
        if provider.addressing == Addressing::Path {
            signer = *signer.with_path_style();
        }
        // reqwest's defaults (system store, proxies from the environment),
        // the provider's CA, and no redirect followed: a signed request
        // sent on to another host would be refused there with a misleading
        // SignatureDoesNotMatch.
        let builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        let http = provider
            .ca
            .iter()
            .flat_map(|ca| ca.certificates())
            .fold(builder, |b, cert| b.add_root_certificate(cert))
            .build()
            .map_err(|e| {
                provider_wide(format!(
                    "cannot set up the HTTP client for provider `{}`: {}",
                    provider.name,
                    root_cause(&e)
                ))
            })?;
        Ok(Client {
            provider: provider.clone(),
            signer,
            http,
            upload_headers: upload_headers(provider).map_err(provider_wide)?,
            timeout: SMALL_REQUEST_TIMEOUT,
            sending: Sending::default(),
            key_encoding: Default::default(),
        })
    }

    /// Sets the time allowed for each request without a body (HEAD, GET,
    /// DELETE, the probe's PUT); bodies still get extra time for their size.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// One request: rust-s3 builds and signs it over `signer`'s headers, our
    /// HTTP client sends it. A status outside 2xx is
    /// [`S3Error::HttpFailWithBody`], with the body the server sent.
    async fn send(
        &self,
        signer: &Bucket,
        path: &str,
        command: Command<'_>,
        timeout: Duration,
    ) -> Result<reqwest::Response, S3Error> {
        let request = ReqwestRequest::new(signer, path, command).await?;
        let method = match request.command.http_verb() {
            HttpMethod::Get => reqwest::Method::GET,
            HttpMethod::Put => reqwest::Method::PUT,
            HttpMethod::Post => reqwest::Method::POST,
            HttpMethod::Delete => reqwest::Method::DELETE,
            HttpMethod::Head => reqwest::Method::HEAD,
        };
        let answer = self
            .http
            .request(method, request.url()?.as_str())
            .headers(request.headers().await?)
            .body(request.request_body()?)
            .timeout(timeout)
            .send()
            .await?;
        if answer.status().is_success() {
            return Ok(answer);
        }
        Err(refusal(answer).await)
    }

    /// [`Client::send`] with the default timeout; the answer's body as text.
    /// An S3 error document answered with a 2xx status (as S3 may answer a
    /// completion) is an error all the same.
    async fn send_for_text(
        &self,
        signer: &Bucket,
        path: &str,
        command: Command<'_>,
        timeout: Duration,
    ) -> Result<String, S3Error> {
        let (_, text) = self.send_for_answer(signer, path, command, timeout).await?;
        Ok(text)
    }

    /// [`Client::send_for_text`], with the answer's headers.
    async fn send_for_answer(
        &self,
        signer: &Bucket,
        path: &str,
        command: Command<'_>,
        timeout: Duration,
    ) -> Result<(http::HeaderMap, String), S3Error> {
        let answer = self.send(signer, path, command, timeout).await?;
        let status = answer.status().as_u16();
        let headers = answer.headers().clone();
        let (text, fits) = read_at_most(answer, ANSWER_BODY_MAX).await?;
        if fits == Fits::Cut {
            return Err(S3Error::Io(std::io::Error::other(format!(
                "it answered with more than {} MiB, more than any answer offloadd asks for (a proxy's page?)",
                ANSWER_BODY_MAX >> 20
            ))));
        }
        if xml_field(&text, "Code").is_some() && text.contains("<Error>") {
            return Err(S3Error::HttpFailWithBody(status.max(500), text));
        }
        Ok((headers, text))
    }

    /// A failed `request` as a classified error.
    fn err(&self, request: Request, e: S3Error) -> StorageError {
        match without_url(e) {
            S3Error::HttpFailWithBody(status, body) => {
                let code = xml_field(&body, "Code");
                let said = server_message(&body, self.provider.secret.expose());
                let location = xml_field(&body, LOCATION_TAG);
                let answer = Answer {
                    status,
                    code: code.as_deref(),
                    said: said.as_deref(),
                    location: location.as_deref(),
                };
                classify(answer, request, &self.provider)
            }
            S3Error::Reqwest(e) => {
                if let Transport::Tls(cause) = transport_of(e.is_timeout(), &error_chain(&e)) {
                    return StorageError::new(
                        ErrorClass::Transient,
                        format!(
                            "the TLS connection to provider `{}` ({}) failed ({cause}); check that it speaks HTTPS with a certificate this machine trusts (system store, SSL_CERT_FILE, or `ca_file`); will retry",
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
                let via = crate::remote::proxy::through(&self.provider.endpoint)
                    .map(|p| format!(" through the proxy {p}"))
                    .unwrap_or_default();
                StorageError::new(
                    ErrorClass::Transient,
                    format!(
                        "request to provider `{}` {what} ({}{via}): {}; will retry",
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

    /// The signer with `headers` on every request it signs.
    fn signer_with(&self, headers: http::HeaderMap) -> Bucket {
        let mut signer = self.signer.clone();
        signer.extra_headers = headers;
        signer
    }

    /// The signer of a listing: where keys are asked for url-encoded, with
    /// `encoding-type=url` in the query of every request it signs (rust-s3
    /// signs the query with it).
    fn listing_signer(&self, encoding: KeyEncoding) -> Bucket {
        let mut signer = self.signer.clone();
        if encoding == KeyEncoding::Url {
            signer
                .extra_query
                .insert("encoding-type".into(), "url".into());
        }
        signer
    }

    /// A name from a listing answer as the key it is: decoded where `url`
    /// (see [`decodes`]), as it came otherwise.
    fn listed_name(&self, name: String, url: bool) -> Result<String, StorageError> {
        if !url {
            return Ok(name);
        }
        url_decoded(&name).ok_or_else(|| {
            StorageError::new(
                ErrorClass::Transient,
                format!(
                    "provider `{}` listed `{}` as a url-encoded key, which it is not",
                    self.provider.name,
                    name.escape_debug()
                ),
            )
        })
    }

    /// How this provider's listings carry keys, found out once, by the
    /// first listing, with one more request (of at most one key, under
    /// `prefix`): asked to encode a prefix holding `%` and `+`, a provider
    /// that encodes answers it encoded; one that ignores the parameter, or
    /// only says it encodes, answers it as it is.
    async fn key_encoding(&self, prefix: &str) -> Result<KeyEncoding, StorageError> {
        if let Some(known) = self.key_encoding.get() {
            return Ok(*known);
        }
        let probe = format!("{prefix}{ENCODING_PROBE}");
        let find_out = async {
            let command = Command::ListObjectsV2 {
                prefix: probe.clone(),
                delimiter: None,
                continuation_token: None,
                start_after: None,
                max_keys: Some(1),
            };
            let signer = self.listing_signer(KeyEncoding::Url);
            let text = match self
                .send_for_text(&signer, "/", command, self.timeout)
                .await
            {
                Ok(text) => text,
                // The parameter refused: keys as XML text, for good.
                Err(S3Error::HttpFailWithBody(400 | 501, _)) => return Ok(Some(KeyEncoding::Text)),
                // Refused otherwise (a policy that allows listing only some
                // prefixes, a passing 429, a bad key): as XML text for this
                // listing, which itself tells whether it is allowed, and
                // asked again at the next.
                Err(S3Error::HttpFailWithBody(status, _)) if (400..500).contains(&status) => {
                    return Ok(None)
                }
                Err(e) => return Err(self.err(Request::List, e)),
            };
            let answer: ListBucketResult =
                quick_xml::de::from_str(&text).map_err(|e| self.err(Request::List, e.into()))?;
            let echoed = answer
                .prefix
                .filter(|_| answer.encoding_type.as_deref() == Some("url"));
            Ok(Some(match echoed {
                Some(p) if p != probe && url_decoded(&p).as_deref() == Some(probe.as_str()) => {
                    KeyEncoding::Url
                }
                _ => KeyEncoding::Text,
            }))
        };
        Ok(match find_out.await? {
            Some(found) => *self.key_encoding.get_or_init(|| async { found }).await,
            None => KeyEncoding::Text,
        })
    }

    /// The headers an object is created with: the provider's upload headers,
    /// with what `options` sets over them, then `extra`.
    fn object_headers(
        &self,
        options: &ObjectOptions,
        extra: &[(&'static str, String)],
    ) -> Result<http::HeaderMap, StorageError> {
        let mut headers = self.upload_headers.clone();
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
    /// Content-MD5), sent without copying the body. Returns the answer's
    /// ETag, quotes stripped.
    async fn put_presigned(
        &self,
        key: &str,
        mut headers: http::HeaderMap,
        queries: Option<std::collections::HashMap<String, String>>,
        body: bytes::Bytes,
        md5: [u8; 16],
        of: EtagOf,
    ) -> Result<Option<String>, StorageError> {
        use base64::Engine as _;
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5);
        headers.insert(
            http::HeaderName::from_static("content-md5"),
            http::HeaderValue::from_str(&md5).expect("base64 is a valid header value"),
        );
        let url = self
            .signer
            .presign_put(key, PRESIGN_EXPIRY_SECS, Some(headers.clone()), queries)
            .await
            .map_err(|e| self.err(Request::Write, e))?;
        let going = self.sending.start(body.len() as u64);
        let timeout = self.timeout.max(request_timeout(going.sharing));
        let sent = self
            .http
            .put(url)
            .headers(headers)
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| self.err(Request::Write, S3Error::Reqwest(e)))?;
        let status = sent.status().as_u16();
        let etag = answered_etag(sent.headers(), of);
        if (200..300).contains(&status) {
            return Ok(etag);
        }
        Err(self.err(Request::Write, refusal(sent).await))
    }

    /// Uploads a whole object in one PUT; the ETag of the answer.
    pub async fn put(
        &self,
        key: &ObjectKey,
        body: bytes::Bytes,
        md5: [u8; 16],
        options: &ObjectOptions,
    ) -> Result<Option<String>, StorageError> {
        let headers =
            self.object_headers(options, &[("content-type", options.content_type.clone())])?;
        self.put_presigned(key.as_str(), headers, None, body, md5, EtagOf::Object)
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
        let command = Command::InitiateMultipartUpload {
            content_type: &options.content_type,
        };
        let text = self
            .send_for_text(
                &self.signer_with(headers),
                key.as_str(),
                command,
                self.timeout,
            )
            .await
            .map_err(|e| self.err(Request::Write, e))?;
        let answer: InitiateMultipartUploadResponse =
            quick_xml::de::from_str(&text).map_err(|e| self.err(Request::Write, e.into()))?;
        Ok(answer.upload_id)
    }

    /// Uploads one part; returns its ETag.
    pub async fn put_part(
        &self,
        key: &ObjectKey,
        upload_id: &str,
        number: u32,
        body: bytes::Bytes,
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
                EtagOf::Part,
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
        let upload_id = &query_value(upload_id);
        let command = Command::CompleteMultipartUpload {
            upload_id,
            data: CompleteMultipartUploadData { parts },
        };
        let timeout = self.timeout.max(complete_timeout());
        let (headers, text) = self
            .send_for_answer(&self.signer, key.as_str(), command, timeout)
            .await
            .map_err(|e| self.err(Request::Write, e))?;
        Ok(xml_field(&text, "ETag")
            .filter(|_| !kms_encrypted(&headers))
            .map(|e| normal_etag(&e)))
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        let upload_id = &query_value(upload_id);
        let command = Command::AbortMultipartUpload { upload_id };
        self.send(&self.signer, key, command, self.timeout)
            .await
            .map_err(|e| self.err(Request::Abort, e))?;
        Ok(())
    }

    /// HEAD of an object; `Ok(None)` when it does not exist.
    pub async fn head(&self, key: &ObjectKey) -> Result<Option<Head>, StorageError> {
        let answer = match self
            .send(
                &self.signer,
                key.as_str(),
                Command::HeadObject,
                self.timeout,
            )
            .await
        {
            Ok(a) => a,
            Err(S3Error::HttpFailWithBody(404, _)) => return Ok(None),
            Err(e) => return Err(self.err(Request::Read, e)),
        };
        let h = answer.headers();
        let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        Ok(Some(Head {
            // The header, not the body's length: a HEAD answer has no body.
            size: text(http::header::CONTENT_LENGTH.as_str()).and_then(|v| v.trim().parse().ok()),
            etag: answered_etag(h, EtagOf::Object),
            content_type: text(http::header::CONTENT_TYPE.as_str()).map(str::to_string),
            part_size: text(&format!("x-amz-meta-{PART_SIZE_META}"))
                .and_then(|v| v.trim().parse().ok()),
        }))
    }

    /// One page (up to 1,000 objects) of the objects under `prefix`, and the token
    /// for the next page if there is one.
    pub async fn list_page(
        &self,
        prefix: &str,
        token: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>), StorageError> {
        let encoding = self.key_encoding(prefix).await?;
        let command = Command::ListObjectsV2 {
            prefix: prefix.to_string(),
            delimiter: None,
            continuation_token: token,
            start_after: None,
            max_keys: Some(1000),
        };
        let text = self
            .send_for_text(&self.listing_signer(encoding), "/", command, self.timeout)
            .await
            .map_err(|e| self.err(Request::List, e))?;
        let page: ListBucketResult =
            quick_xml::de::from_str(&text).map_err(|e| self.err(Request::List, e.into()))?;
        // The continuation token is not a key: S3 sends it as it is.
        let url = decodes(encoding, page.encoding_type.as_deref());
        let next = match (page.is_truncated, page.next_continuation_token) {
            (false, _) => None,
            (true, Some(token)) => Some(token),
            // Ending here would take a part of the listing for all of it.
            (true, None) => {
                return Err(StorageError::new(
                    ErrorClass::Transient,
                    format!(
                        "provider `{}` said its listing goes on but gave no continuation token",
                        self.provider.name
                    ),
                ))
            }
        };
        let objects = page
            .contents
            .into_iter()
            .map(|o| {
                Ok(Listed {
                    key: self.listed_name(o.key, url)?,
                    size: o.size,
                    etag: o.e_tag.as_deref().map(normal_etag),
                    modified_ms: store::parse_time_ms(&o.last_modified),
                })
            })
            .collect::<Result<_, StorageError>>()?;
        Ok((objects, next))
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.send(
            &self.signer,
            key.as_str(),
            Command::DeleteObject,
            self.timeout,
        )
        .await
        .map_err(|e| self.err(Request::Delete, e))?;
        Ok(())
    }

    /// The multipart uploads in progress under `prefix`, every page; `None`
    /// where the provider does not implement the listing.
    pub async fn list_uploads(
        &self,
        prefix: &str,
    ) -> Result<Option<Vec<PendingUpload>>, StorageError> {
        // Keys as XML text: `encoding-type` is not asked for here, since a
        // provider that takes it on object listings may refuse it on these,
        // which would read as "cannot list uploads".
        let mut uploads = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let command = Command::ListMultipartUploads {
                prefix: Some(prefix),
                delimiter: None,
                key_marker: markers.0.clone(),
                upload_id_marker: markers.1.clone(),
                max_uploads: Some(1000),
            };
            let page: ListMultipartUploadsResult = match self
                .send_for_text(&self.signer, "/", command, self.timeout)
                .await
            {
                Ok(text) => quick_xml::de::from_str(&text)
                    .map_err(|e| self.err(Request::ListUploads, e.into()))?,
                Err(e) => {
                    let e = self.err(Request::ListUploads, e);
                    let unsupported = matches!(e.status, Some(400 | 404 | 405 | 501))
                        || matches!(e.code.as_deref(), Some("NotImplemented"));
                    return if unsupported { Ok(None) } else { Err(e) };
                }
            };
            uploads.extend(page.uploads.into_iter().map(|u| PendingUpload {
                initiated_ms: store::parse_time_ms(&u.initiated),
                key: u.key,
                upload_id: u.id,
            }));
            let next = (page.next_marker, page.next_upload_id_marker);
            // A truncated page without a new cursor would repeat for ever.
            if !page.is_truncated || next.0.is_none() || next == markers {
                return Ok(Some(uploads));
            }
            markers = next;
        }
    }

    /// A zero-byte PUT of the health object, with the upload options; with
    /// [`Probe::WriteAndRead`], then a HEAD of it.
    pub async fn probe(&self, check: Probe) -> Result<(), StorageError> {
        let key = store::health_key(&self.provider.prefix);
        self.put_small_raw(key.as_str(), b"", "application/octet-stream")
            .await
            .map_err(|e| self.err(Request::Write, e))?;
        if check == Probe::Write || self.head(&key).await?.is_some() {
            return Ok(());
        }
        Err(StorageError::new(
            ErrorClass::ProviderWide,
            format!(
                "provider `{}` accepted the health object `{key}` but a HEAD right after does not find it, so uploads cannot be verified; check that `endpoint` points at the server itself, not a gateway or cache",
                self.provider.name
            ),
        ))
    }

    /// A small signed PUT with the provider's upload headers.
    async fn put_small_raw(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<(), S3Error> {
        let command = Command::PutObject {
            content: body,
            content_type,
            custom_headers: None,
            multipart: None,
        };
        let signer = self.signer_with(self.upload_headers.clone());
        self.send(&signer, key, command, self.timeout).await?;
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
        body: bytes::Bytes,
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
        body: bytes::Bytes,
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

    fn probe(&self, check: Probe) -> Reply<'_, ()> {
        Box::pin(Client::probe(self, check))
    }
}

/// What `test-connection` needs beyond the [`Store`].
impl Client {
    fn fault(&self, request: Request, e: S3Error) -> Fault {
        let e = without_url(e);
        let (transport, region) = match &e {
            S3Error::HttpFailWithBody(_, body) => (None, region_from_error(body)),
            S3Error::Reqwest(r) => (Some(transport_of(r.is_timeout(), &error_chain(r))), None),
            _ => (None, None),
        };
        Fault {
            error: self.err(request, e),
            transport,
            region,
        }
    }

    /// Asks the endpoint, unsigned, which region the bucket is in (the
    /// `x-amz-bucket-region` header S3 sends even on 301 and 403).
    pub async fn bucket_region(&self) -> Option<String> {
        let resp = self
            .http
            .head(self.signer.url())
            .timeout(self.timeout)
            .send()
            .await
            .ok()?;
        let region = resp.headers().get("x-amz-bucket-region")?.to_str().ok()?;
        valid_region(region).then(|| region.to_string())
    }

    /// Uploads a small object in one PUT with the upload options; for probes.
    pub async fn put_small(&self, key: &str, body: &[u8], content_type: &str) -> Result<(), Fault> {
        self.put_small_raw(key, body, content_type)
            .await
            .map_err(|e| self.fault(Request::Write, e))
    }

    /// The bytes of an object, at most `max` of them: a probe reads back
    /// what it wrote, and a gateway that answers with something else (a
    /// page, a video) is not read whole.
    pub async fn get(&self, key: &str, max: usize) -> Result<Vec<u8>, Fault> {
        let answer = self
            .send(&self.signer, key, Command::GetObject, self.timeout)
            .await
            .map_err(|e| self.fault(Request::Read, e))?;
        let (bytes, _) = read_bytes_at_most(answer, max)
            .await
            .map_err(|e| self.fault(Request::Read, S3Error::Reqwest(e)))?;
        Ok(bytes)
    }

    /// Deletes an object by its raw key; for probes.
    pub async fn delete_key(&self, key: &str) -> Result<(), Fault> {
        self.send(&self.signer, key, Command::DeleteObject, self.timeout)
            .await
            .map_err(|e| self.fault(Request::Delete, e))?;
        Ok(())
    }
}

/// The most of an error answer's body read: an S3 error document is small,
/// and a proxy's page need not be.
const ERROR_BODY_MAX: usize = 64 * 1024;

/// The most of any other answer's body read: a listing page of 1,000 keys is
/// about 1 MiB at most.
const ANSWER_BODY_MAX: usize = 8 << 20;

/// The element that carries the host a redirect's `Location` names, put
/// ahead of the body of its [`S3Error::HttpFailWithBody`] (which has no
/// room for headers) by [`refusal`] and read by [`Client::err`].
const LOCATION_TAG: &str = "offloadd-location";

/// Whether a body was read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Fits {
    #[default]
    Whole,
    /// The rest, past the limit, was dropped unread.
    Cut,
}

/// At most `max` bytes of an answer's body, as text.
async fn read_at_most(
    answer: reqwest::Response,
    max: usize,
) -> Result<(String, Fits), reqwest::Error> {
    let (body, fits) = read_bytes_at_most(answer, max).await?;
    Ok((String::from_utf8_lossy(&body).into_owned(), fits))
}

/// The first `max` bytes of an answer's body, and whether that was all of it.
async fn read_bytes_at_most(
    mut answer: reqwest::Response,
    max: usize,
) -> Result<(Vec<u8>, Fits), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await? {
        let room = max - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, Fits::Cut));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, Fits::Whole))
}

/// An answer outside 2xx as an error: its status, and what it says in at
/// most [`ERROR_BODY_MAX`] bytes, with the host a redirect leads to.
async fn refusal(answer: reqwest::Response) -> S3Error {
    let status = answer.status().as_u16();
    let location = answer
        .headers()
        .get(http::header::LOCATION)
        .filter(|_| answer.status().is_redirection())
        .and_then(|v| v.to_str().ok())
        .map(redirect_target);
    let (body, _) = read_at_most(answer, ERROR_BODY_MAX)
        .await
        .unwrap_or_default();
    let body = match location {
        Some(to) => format!("<{LOCATION_TAG}>{to}</{LOCATION_TAG}>{body}"),
        None => body,
    };
    S3Error::HttpFailWithBody(status, body)
}

/// Where a `Location` leads, as an error names it: the host (and port) of
/// an absolute URL, else the location itself, cleaned and short.
fn redirect_target(location: &str) -> String {
    match reqwest::Url::parse(location) {
        Ok(url) if url.host_str().is_some() => {
            let host = url.host_str().unwrap_or_default();
            match url.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            }
        }
        // A relative or odd one: its path only (a presigned query would
        // carry the access key id).
        _ => location
            .split(['?', '#'])
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control() && !matches!(c, '<' | '>'))
            .take(100)
            .collect(),
    }
}

/// A connection failure without the request's URL, whose bucket, key and
/// host would otherwise be read as a diagnosis (a key `certificates/a.png`
/// as a TLS failure).
fn without_url(e: S3Error) -> S3Error {
    match e {
        S3Error::Reqwest(e) => S3Error::Reqwest(e.without_url()),
        other => other,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::fake;
    use md5::{Digest, Md5};
    use std::io::{Read, Write};

    /// Answers one request on 127.0.0.1 with `answer`; returns its port and
    /// the request's head as received.
    fn answer_once(answer: &'static str) -> (u16, std::thread::JoinHandle<String>) {
        let (port, seen) = answer_each(vec![answer.to_string()]);
        (
            port,
            std::thread::spawn(move || seen.join().unwrap().remove(0)),
        )
    }

    /// Answers one request (each on its own connection) with each of
    /// `answers` in turn; returns the port and the requests' heads.
    fn answer_each(answers: Vec<String>) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::thread::spawn(move || {
            answers
                .iter()
                .map(|answer| answer_one(&listener, answer))
                .collect()
        });
        (port, seen)
    }

    /// Answers one request on `listener` with `answer`; the request's head.
    fn answer_one(listener: &std::net::TcpListener, answer: &str) -> String {
        let (mut conn, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        // The body is read too: a socket closed with bytes unread resets.
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        conn.read_exact(&mut vec![0; len]).unwrap();
        conn.write_all(answer.as_bytes()).unwrap();
        head
    }

    /// A 200 answer with an XML body.
    fn xml_answer(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// The query of a request head's request line, decoded.
    fn query_of(head: &str) -> Vec<(String, String)> {
        let target = head.lines().next().unwrap().split(' ').nth(1).unwrap();
        reqwest::Url::parse(&format!("http://h{target}"))
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The answer to the probe of [`Client::key_encoding`]: its prefix
    /// echoed as `prefix`, with `<EncodingType>url` if `says_url`.
    fn probe_answer(prefix: &str, says_url: bool) -> String {
        let encoding = if says_url {
            "<EncodingType>url</EncodingType>"
        } else {
            ""
        };
        xml_answer(&format!(
            "<ListBucketResult><Name>media</Name><Prefix>{prefix}</Prefix>{encoding}<KeyCount>0</KeyCount><MaxKeys>1</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>"
        ))
    }

    /// A provider that encodes keys answers the probe so.
    fn probe_encoded() -> String {
        probe_answer("pre/.offloadd-encoding-probe%25%2B", true)
    }

    /// A page of a listing of `keys` (as written in the XML).
    fn page_answer(says_url: bool, keys: &[&str], token: Option<&str>) -> String {
        let contents: String = keys
            .iter()
            .map(|k| format!("<Contents><Key>{k}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>\"0f0e\"</ETag><Size>5</Size><StorageClass>STANDARD</StorageClass></Contents>"))
            .collect();
        let encoding = if says_url {
            "<EncodingType>url</EncodingType>"
        } else {
            ""
        };
        let more = match token {
            Some(t) => format!(
                "<IsTruncated>true</IsTruncated><NextContinuationToken>{t}</NextContinuationToken>"
            ),
            None => "<IsTruncated>false</IsTruncated>".into(),
        };
        xml_answer(&format!(
            "<ListBucketResult><Name>media</Name><Prefix>pre/</Prefix>{encoding}<MaxKeys>1000</MaxKeys>{more}{contents}</ListBucketResult>"
        ))
    }

    fn keys_of(listed: &[Listed]) -> Vec<&str> {
        listed.iter().map(|l| l.key.as_str()).collect()
    }

    #[test]
    fn url_encoded_names_decode_as_s3_encodes_them() {
        for (encoded, key) in [
            ("pre/plain.png", "pre/plain.png"),
            ("pre/cr%0Dname%0A.png", "pre/cr\rname\n.png"),
            ("pre/ctl%01%1f", "pre/ctl\x01\x1f"),
            ("pre/sp+ace%20", "pre/sp ace "),
            ("pre/a%2Bb%25c%2541", "pre/a+b%c%41"),
            ("pre/caf%C3%A9%e2%82%AC", "pre/caf\u{e9}\u{20ac}"),
            ("pre/d%2Fe/f", "pre/d/e/f"),
            ("", ""),
        ] {
            assert_eq!(url_decoded(encoded).as_deref(), Some(key), "{encoded}");
        }
        // Not an encoding: a `%` without two hex digits, or bytes that are
        // not UTF-8.
        for bad in ["100%", "a%4", "a%zz", "a%+1", "a%C3", "a%FF"] {
            assert_eq!(url_decoded(bad), None, "{bad}");
        }
    }

    /// Listings ask for url-encoded keys where the provider encodes them,
    /// and decode them, so that a key XML cannot carry (a carriage return,
    /// a control character) comes back as it is. Whether it does is found
    /// out once, by the first listing; the continuation token (not a key)
    /// goes back as it came.
    #[tokio::test]
    async fn listed_keys_are_asked_url_encoded_and_decoded() {
        let (port, seen) = answer_each(vec![
            probe_encoded(),
            page_answer(
                true,
                &["pre/cr%0Dname.png", "pre/ctl%01.png", "pre/sp+ace.png"],
                Some("tok%2B/="),
            ),
            page_answer(
                true,
                &["pre/100%2541.png", "pre/a%2Bb.png", "pre/caf%C3%A9.png"],
                None,
            ),
        ]);
        let c = client(port);
        let (first, token) = c.list_page("pre/", None).await.unwrap();
        assert_eq!(
            keys_of(&first),
            ["pre/cr\rname.png", "pre/ctl\x01.png", "pre/sp ace.png"]
        );
        assert_eq!(token.as_deref(), Some("tok%2B/="));
        // 2026-01-01T00:00:00.000Z, the LastModified each object is listed with.
        assert_eq!(first[0].modified_ms, Some(1_767_225_600_000));
        let (second, token) = c.list_page("pre/", token).await.unwrap();
        assert_eq!(
            keys_of(&second),
            ["pre/100%41.png", "pre/a+b.png", "pre/caf\u{e9}.png"]
        );
        assert_eq!(token, None);

        let heads = seen.join().unwrap();
        let queries: Vec<_> = heads.iter().map(|h| query_of(h)).collect();
        assert_eq!(
            param(&queries[0], "prefix"),
            Some("pre/.offloadd-encoding-probe%+")
        );
        assert_eq!(param(&queries[0], "max-keys"), Some("1"));
        for q in &queries {
            assert_eq!(param(q, "encoding-type"), Some("url"), "{q:?}");
        }
        assert_eq!(param(&queries[1], "prefix"), Some("pre/"));
        assert_eq!(param(&queries[2], "continuation-token"), Some("tok%2B/="));
    }

    /// A provider that ignores `encoding-type=url`, or says it encodes but
    /// does not (s3s-fs 0.14 answers `<EncodingType>url` with its keys as
    /// they are), is not asked again: its keys are read as they are, and a
    /// `%` or `+` in them is not decoded into another key. One that refuses
    /// the probe is listed as before too.
    #[tokio::test]
    async fn keys_of_a_provider_that_does_not_encode_are_read_as_they_are() {
        let refused = "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        for probe in [
            probe_answer("pre/.offloadd-encoding-probe%+", true),
            probe_answer("pre/.offloadd-encoding-probe%+", false),
            probe_answer("pre/.offloadd-encoding-probe%25%2B", false),
            refused.to_string(),
        ] {
            let (port, seen) = answer_each(vec![
                probe.clone(),
                page_answer(true, &["pre/100%41.png", "pre/a+b.png"], None),
            ]);
            let (listed, _) = client(port).list_page("pre/", None).await.unwrap();
            assert_eq!(
                keys_of(&listed),
                ["pre/100%41.png", "pre/a+b.png"],
                "{probe}"
            );
            let heads = seen.join().unwrap();
            assert_eq!(
                param(&query_of(&heads[1]), "encoding-type"),
                None,
                "{probe}"
            );
        }
    }

    /// A name that the answer says is url-encoded but is not fails the page
    /// (a guess would map it to another path).
    #[tokio::test]
    async fn a_listed_key_that_is_not_url_encoded_as_said_is_an_error() {
        let (port, _) = answer_each(vec![
            probe_encoded(),
            page_answer(true, &["pre/100%.png"], None),
        ]);
        let err = client(port).list_page("pre/", None).await.unwrap_err();
        assert!(err.message.contains("`pre/100%.png`"), "{}", err.message);
    }

    /// Multipart uploads are listed without `encoding-type` (a provider may
    /// take it on object listings and refuse it here): keys and the marker
    /// as they come, and no probe first.
    #[tokio::test]
    async fn listed_uploads_are_read_as_they_come() {
        let upload = |key: &str, id: &str| {
            format!("<Upload><Key>{key}</Key><UploadId>{id}</UploadId><StorageClass>STANDARD</StorageClass><Initiated>2026-01-01T00:00:00.000Z</Initiated></Upload>")
        };
        let (port, seen) = answer_each(vec![
            xml_answer(&format!(
                "<ListMultipartUploadsResult><Bucket>media</Bucket><Prefix>pre/</Prefix><NextKeyMarker>pre/a+b.mp4</NextKeyMarker><NextUploadIdMarker>id+1</NextUploadIdMarker><IsTruncated>true</IsTruncated>{}</ListMultipartUploadsResult>",
                upload("pre/a+b.mp4", "id+1")
            )),
            xml_answer(&format!(
                "<ListMultipartUploadsResult><Bucket>media</Bucket><Prefix>pre/</Prefix><IsTruncated>false</IsTruncated>{}</ListMultipartUploadsResult>",
                upload("pre/b%41.mp4", "id2")
            )),
        ]);
        let uploads = client(port).list_uploads("pre/").await.unwrap().unwrap();
        let listed: Vec<_> = uploads
            .iter()
            .map(|u| (u.key.as_str(), u.upload_id.as_str()))
            .collect();
        assert_eq!(listed, [("pre/a+b.mp4", "id+1"), ("pre/b%41.mp4", "id2")]);
        let heads = seen.join().unwrap();
        assert!(heads[0].starts_with("GET /media/?uploads"), "{}", heads[0]);
        let next = query_of(&heads[1]);
        assert_eq!(param(&next, "encoding-type"), None);
        assert_eq!(param(&next, "key-marker"), Some("pre/a+b.mp4"));
        assert_eq!(param(&next, "upload-id-marker"), Some("id+1"));
    }

    fn object_key(rel: &str) -> ObjectKey {
        ObjectKey::new("pre", &crate::keys::RelPath::parse(rel).unwrap()).unwrap()
    }

    fn no_options() -> ObjectOptions {
        ObjectOptions {
            content_type: "image/png".into(),
            cache_control: None,
            storage_class: None,
            content_disposition: None,
            rule: None,
        }
    }

    /// A redirect is not followed (the signed request would go to another
    /// host): it is refused, naming where it leads.
    #[tokio::test]
    async fn redirects_are_not_followed_but_named() {
        // Nothing listens where it leads: followed, it would fail to connect.
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port2 = elsewhere.local_addr().unwrap().port();
        drop(elsewhere);
        let moved = |status: &str| {
            format!("HTTP/1.1 {status}\r\nLocation: http://127.0.0.1:{port2}/media/pre/a.png\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        };
        let key = object_key("a.png");
        let body = bytes::Bytes::from_static(b"bytes");
        let md5: [u8; 16] = Md5::digest(b"bytes").into();
        for status in ["307 Temporary Redirect", "301 Moved Permanently"] {
            let (port, _) = answer_each(vec![moved(status)]);
            let err = client(port)
                .put(&key, body.clone(), md5, &no_options())
                .await
                .unwrap_err();
            assert_eq!(err.class, ErrorClass::ProviderWide, "{status}");
            assert_eq!(
                err.message,
                format!(
                    "the endpoint of provider `fake` redirects to 127.0.0.1:{port2} (HTTP {}); fix `endpoint`",
                    &status[..3]
                )
            );
        }
        let (port, _) = answer_each(vec![moved("308 Permanent Redirect")]);
        let err = client(port).head(&key).await.unwrap_err();
        assert_eq!(
            err.message,
            format!("the endpoint of provider `fake` redirects to 127.0.0.1:{port2} (HTTP 308); fix `endpoint`")
        );
    }

    /// The server's `<Message>` is quoted in the error, and picks the
    /// sentence: R2's answer to an access key id of the wrong length.
    #[tokio::test]
    async fn the_server_message_is_quoted() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InvalidArgument</Code><Message>Credential access key has length 40, should be 32 (not SECRET)</Message></Error>";
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (port, _) = answer_each(vec![answer]);
        let md5: [u8; 16] = Md5::digest(b"bytes").into();
        let err = client(port)
            .put(
                &object_key("a.png"),
                bytes::Bytes::from_static(b"bytes"),
                md5,
                &no_options(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.message,
            "provider `fake` rejected the access key id (InvalidArgument: Credential access key has length 40, should be 32 (not [redacted])); check `access_key_id`"
        );
    }

    /// A probe of uploads verified by a HEAD also reads: a key that may
    /// write but not read fails it, saying so.
    #[tokio::test]
    async fn a_probe_that_reads_fails_on_a_refused_head() {
        let put = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let refused = "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let (port, seen) = answer_each(vec![put.into(), refused.into()]);
        let err = client(port).probe(Probe::WriteAndRead).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::ProviderWide);
        assert_eq!(
            err.message,
            "provider `fake` refused to show an object of bucket `media` (HTTP 403), so an upload cannot be verified before its local copy is deleted; grant the key s3:GetObject on the bucket"
        );
        let heads = seen.join().unwrap();
        assert!(
            heads[0].starts_with("PUT /media/pre/.offloadd-health "),
            "{}",
            heads[0]
        );
        assert!(
            heads[1].starts_with("HEAD /media/pre/.offloadd-health "),
            "{}",
            heads[1]
        );

        let (port, seen) = answer_each(vec![put.into()]);
        client(port).probe(Probe::Write).await.unwrap();
        assert_eq!(seen.join().unwrap().len(), 1);
    }

    /// Words in the URL (a key under `certificates/`) are not read as the
    /// cause of a connection failure.
    #[tokio::test]
    async fn a_connection_failure_is_not_diagnosed_from_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                // Closed without an answer once the request is in.
                let (mut conn, _) = listener.accept().unwrap();
                let mut byte = [0u8; 1];
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
            }
        });
        let c = client(port);
        let err = c
            .head(&object_key("certificates/tls-handshake.png"))
            .await
            .unwrap_err();
        assert!(
            err.message
                .starts_with("request to provider `fake` failed (http://127.0.0.1:"),
            "{}",
            err.message
        );
        let fault = c
            .get("pre/certificates/tls-handshake.png", 1024)
            .await
            .unwrap_err();
        assert!(
            matches!(fault.transport, Some(Transport::Other(_))),
            "{:?}",
            fault.transport
        );
        server.join().unwrap();
    }

    /// An error answer's body is read up to a limit and the rest dropped:
    /// an endless one does not hold the request until it times out.
    #[tokio::test]
    async fn an_endless_error_body_is_cut_short() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut byte = [0u8; 1];
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            let start = "<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message>";
            let mut out = format!(
                "HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{start}\r\n",
                start.len()
            )
            .into_bytes();
            let pad = vec![b' '; 64 * 1024];
            // Bounded: 1 GiB at most, until the client hangs up.
            for _ in 0..16 * 1024 {
                out.extend_from_slice(format!("{:x}\r\n", pad.len()).as_bytes());
                out.extend_from_slice(&pad);
                out.extend_from_slice(b"\r\n");
                if conn.write_all(&out).is_err() {
                    return;
                }
                out.clear();
            }
        });
        let mut c = client(port);
        c.set_request_timeout(Duration::from_secs(10));
        let started = std::time::Instant::now();
        let err = c.delete(&object_key("a.png")).await.unwrap_err();
        assert_eq!(
            err.code.as_deref(),
            Some("InternalError"),
            "{}",
            err.message
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    /// A listing answer larger than any page is an error, not read whole.
    #[tokio::test]
    async fn an_oversized_answer_is_an_error() {
        let big = format!(
            "<ListBucketResult>{}</ListBucketResult>",
            " ".repeat(ANSWER_BODY_MAX)
        );
        let (port, _) = answer_each(vec![probe_encoded(), xml_answer(&big)]);
        let err = client(port).list_page("pre/", None).await.unwrap_err();
        assert!(
            err.message.contains("answered with more than 8 MiB"),
            "{}",
            err.message
        );
    }

    fn client(port: u16) -> Client {
        let mut p = fake::provider();
        p.endpoint = format!("http://127.0.0.1:{port}");
        Client::new(&p).unwrap()
    }

    /// The upload id signed (rust-s3 signs the query as decoded) is the one
    /// sent: `+`, `/` and `=` travel percent-encoded, so that a `+` is not
    /// taken for a space.
    fn assert_id_encoded(head: &str) {
        let line = head.lines().next().unwrap();
        assert!(
            line.contains("?uploadId=r2%2Bid%2Fwith%3D%3D "),
            "request line: {line}"
        );
        let url =
            reqwest::Url::parse(&format!("http://h{}", line.split(' ').nth(1).unwrap())).unwrap();
        let signed: Vec<_> = url.query_pairs().collect();
        assert_eq!(signed.len(), 1);
        assert_eq!(signed[0].1, "r2+id/with==");
    }

    #[tokio::test]
    async fn abort_sends_an_r2_upload_id_percent_encoded() {
        let (port, seen) = answer_once("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        client(port)
            .abort_multipart("pre/a.mp4", "r2+id/with==")
            .await
            .unwrap();
        assert_id_encoded(&seen.join().unwrap());
    }

    #[tokio::test]
    async fn complete_sends_an_r2_upload_id_percent_encoded() {
        let body =
            "<CompleteMultipartUploadResult><ETag>\"abc-2\"</ETag></CompleteMultipartUploadResult>";
        let answer: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (port, seen) = answer_once(answer);
        let key = ObjectKey::new("pre", &crate::keys::RelPath::parse("a.mp4").unwrap()).unwrap();
        let etag = client(port)
            .complete_multipart(
                &key,
                "r2+id/with==",
                vec![(1, "e1".into()), (2, "e2".into())],
            )
            .await
            .unwrap();
        assert_eq!(etag.as_deref(), Some("abc-2"));
        assert_id_encoded(&seen.join().unwrap());
    }

    /// A bucket that encrypts with SSE-KMS by default answers with an ETag
    /// that is not the MD5 of the bytes, and says so: that ETag is not
    /// given to verification (which would find it wrong every time).
    #[tokio::test]
    async fn an_sse_kms_answer_gives_no_object_etag() {
        const KMS: &str = "x-amz-server-side-encryption: aws:kms\r\n";
        let put = |kms: &str| -> &'static str {
            Box::leak(
                format!("HTTP/1.1 200 OK\r\nETag: \"0f0e\"\r\n{kms}Content-Length: 0\r\nConnection: close\r\n\r\n")
                    .into_boxed_str(),
            )
        };
        let key = ObjectKey::new("pre", &crate::keys::RelPath::parse("a.png").unwrap()).unwrap();
        let options = ObjectOptions {
            content_type: "image/png".into(),
            cache_control: None,
            storage_class: None,
            content_disposition: None,
            rule: None,
        };
        let body = bytes::Bytes::from_static(b"bytes");
        let md5: [u8; 16] = Md5::digest(b"bytes").into();

        let (port, _) = answer_once(put(""));
        let etag = client(port)
            .put(&key, body.clone(), md5, &options)
            .await
            .unwrap();
        assert_eq!(etag.as_deref(), Some("0f0e"));

        let (port, _) = answer_once(put(KMS));
        let etag = client(port)
            .put(&key, body.clone(), md5, &options)
            .await
            .unwrap();
        assert_eq!(etag, None, "an SSE-KMS object's ETag");

        let (port, _) = answer_once(put(KMS));
        let etag = client(port)
            .put_part(&key, "id", 1, body, md5)
            .await
            .unwrap();
        assert_eq!(etag, "0f0e", "a part's ETag is kept for the completion");

        let (port, _) = answer_once(Box::leak(
            format!("HTTP/1.1 200 OK\r\nETag: \"0f0e\"\r\n{KMS}Content-Length: 5\r\nConnection: close\r\n\r\n")
                .into_boxed_str(),
        ));
        let head = client(port).head(&key).await.unwrap().unwrap();
        assert_eq!((head.size, head.etag), (Some(5), None));

        let body =
            "<CompleteMultipartUploadResult><ETag>\"abc-2\"</ETag></CompleteMultipartUploadResult>";
        let (port, _) = answer_once(Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\n{KMS}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        ));
        let etag = client(port)
            .complete_multipart(&key, "id", vec![(1, "e1".into())])
            .await
            .unwrap();
        assert_eq!(etag, None);
    }

    /// Bodies sent at once share the link: each one's timeout counts the
    /// bytes already going, and a finished body stops counting.
    #[test]
    fn a_body_timeout_counts_the_bodies_sent_with_it() {
        let sending = Sending::default();
        let a = sending.start(4 * MIN_BYTES_PER_SEC);
        assert_eq!(a.sharing, 4 * MIN_BYTES_PER_SEC);
        let b = sending.start(MIN_BYTES_PER_SEC);
        assert_eq!(
            request_timeout(b.sharing),
            SMALL_REQUEST_TIMEOUT + Duration::from_secs(5)
        );
        drop(a);
        drop(b);
        assert_eq!(sending.start(0).sharing, 0);
    }

    /// A listing page that says more follows but names no continuation
    /// token is an error, not the end: a rebuild would take part of the
    /// bucket for all of it and never list the rest.
    #[tokio::test]
    async fn a_truncated_listing_without_a_token_is_an_error() {
        let body = "<ListBucketResult><Name>media</Name><Prefix>pre/</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated><Contents><Key>pre/a.png</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>\"0f0e\"</ETag><Size>5</Size><StorageClass>STANDARD</StorageClass></Contents></ListBucketResult>";
        let (port, _) = answer_each(vec![probe_encoded(), xml_answer(body)]);
        let err = client(port).list_page("pre/", None).await.unwrap_err();
        assert!(
            err.message.contains("no continuation token"),
            "{}",
            err.message
        );
    }
}
