//! What can go wrong talking to a bucket, in words an operator can act on.
//!
//! Owns the mapping of HTTP statuses, S3 error codes and connection failures
//! to a [`StorageError`] with its [`ErrorClass`]. The class says what kind of
//! error it is; what happens next (retry, probe, pause, park) is the
//! pipeline's policy, not decided here.

use crate::remote::provider::{Kind, Resolved};

/// What kind of failure it is; the pipeline decides what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// May pass by itself: connection, timeout, 5xx, throttling.
    Transient,
    /// Points at the provider as a whole (credentials, bucket, permissions,
    /// clock), if a probe that involves no item fails too.
    ProviderWide,
    /// Only this item can be affected (too large, bad key).
    Item,
    /// The multipart upload is gone or a part is invalid: that upload has to
    /// start again.
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
    /// The server asked us to slow down (429, 503, SlowDown): never the item's fault.
    pub fn is_throttle(&self) -> bool {
        matches!(self.status, Some(429 | 503))
            || matches!(self.code.as_deref(), Some("SlowDown" | "RequestTimeout"))
    }

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
pub(crate) fn xml_field(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&close)? + start;
    Some(body[start..end].trim().to_string())
}

/// The request that failed: a refusal names the permission it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// PUT, and a multipart upload's initiation, parts and completion.
    Write,
    /// HEAD or GET of an object.
    Read,
    Delete,
    /// ListObjectsV2 (rebuild).
    List,
    ListUploads,
    Abort,
}

impl Request {
    /// The IAM action that allows it.
    pub fn permission(self) -> &'static str {
        match self {
            Request::Write => "s3:PutObject",
            Request::Read => "s3:GetObject",
            Request::Delete => "s3:DeleteObject",
            Request::List => "s3:ListBucket",
            Request::ListUploads => "s3:ListBucketMultipartUploads",
            Request::Abort => "s3:AbortMultipartUpload",
        }
    }

    /// What it does, before "bucket `x`".
    fn doing(self) -> &'static str {
        match self {
            Request::Write => "writing to",
            Request::Read => "reading from",
            Request::Delete => "deleting from",
            Request::List => "listing",
            Request::ListUploads => "listing the multipart uploads of",
            Request::Abort => "aborting multipart uploads in",
        }
    }
}

/// An answer outside 2xx, as far as classification reads it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Answer<'a> {
    pub status: u16,
    /// `<Code>` of the error document.
    pub code: Option<&'a str>,
    /// `<Message>` of the error document, cleaned ([`server_message`]).
    pub said: Option<&'a str>,
    /// The host a redirect's `Location` names.
    pub location: Option<&'a str>,
}

impl<'a> Answer<'a> {
    pub fn new(status: u16, code: Option<&'a str>) -> Answer<'a> {
        Answer {
            status,
            code,
            ..Answer::default()
        }
    }
}

/// The longest server message quoted in an error, in characters.
const SAID_MAX_CHARS: usize = 200;

/// The `<Message>` of an S3 error document as an error may quote it: XML
/// entities decoded, control characters dropped, blanks collapsed, at most
/// [`SAID_MAX_CHARS`] characters, and `secret` (if it were ever echoed)
/// redacted. `None` if there is none.
pub fn server_message(body: &str, secret: &str) -> Option<String> {
    let raw = xml_field(body, "Message")?;
    let decoded = raw
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    let redacted = if secret.is_empty() {
        decoded
    } else {
        decoded.replace(secret, "[redacted]")
    };
    let clean: String = redacted
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let mut said: String = clean.chars().take(SAID_MAX_CHARS).collect();
    if said.len() < clean.len() {
        said.push('…');
    }
    (!said.is_empty()).then_some(said)
}

/// The headers and options offloadd sends with objects, which a provider
/// may not implement.
const UPLOAD_OPTIONS: &str = "storage_class, server_side_encryption, kms_key_id, cache_control, and the `rules:` that set storage_class, cache_control or content_disposition";

/// Classifies a refusal of `request` into a class and an explanation that
/// quotes what the server said.
pub fn classify(answer: Answer<'_>, request: Request, provider: &Resolved) -> StorageError {
    use ErrorClass::*;
    let Answer {
        status,
        code,
        said,
        location,
    } = answer;
    let (p, bucket) = (provider.name.as_str(), provider.bucket.as_str());
    // `(Code: message)`, `(Code)`, or `(HTTP 403)` without a code.
    let why = match (code, said) {
        (Some(c), Some(s)) => format!("{c}: {s}"),
        (Some(c), None) => c.to_string(),
        (None, Some(s)) => format!("HTTP {status}: {s}"),
        (None, None) => format!("HTTP {status}"),
    };
    let says = |words: &str| said.is_some_and(|s| s.to_ascii_lowercase().contains(words));
    let clock = || {
        (ProviderWide, format!("provider `{p}` says this machine's clock is off ({why}); fix the clock (e.g. enable NTP)"))
    };
    let region = || {
        (ProviderWide, format!("bucket `{bucket}` is in another region than configured for provider `{p}` ({why}); fix `region` or `endpoint`"))
    };
    let credentials = || {
        (
            ProviderWide,
            format!("provider `{p}` rejected the access key id ({why}); check `access_key_id`"),
        )
    };
    let (class, message) = match code.unwrap_or("") {
        "InvalidAccessKeyId" => credentials(),
        // R2 answers a key id of the wrong length so.
        "InvalidArgument" if says("access key") => credentials(),
        "SignatureDoesNotMatch" => (ProviderWide, format!("provider `{p}` rejected our signature ({why}): the secret access key is wrong; fix the secret and restart or reload")),
        "NoSuchBucket" => {
            let also = if provider.kind == Kind::R2 { ", `jurisdiction`" } else { "" };
            (ProviderWide, format!("bucket `{bucket}` does not exist at provider `{p}` ({why}); create it, or fix `bucket`{also}, `region` or `endpoint`"))
        }
        // A presigned request (a body) signed over an hour ago by the
        // server's clock.
        "AccessDenied" if says("request has expired") => clock(),
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => (ProviderWide, format!("provider `{p}` denied {} bucket `{bucket}` ({why}); grant the key {} on the bucket", request.doing(), request.permission())),
        "RequestTimeTooSkewed" => clock(),
        "PermanentRedirect" | "AuthorizationHeaderMalformed" | "AuthorizationQueryParametersError" | "IllegalLocationConstraintException" => region(),
        "InvalidBucketName" => (ProviderWide, format!("provider `{p}` says `{bucket}` is not a valid bucket name ({why}); fix `bucket`")),
        "NoSuchUpload" | "InvalidPart" | "InvalidPartOrder" => (RestartUpload, format!("provider `{p}` no longer knows this multipart upload ({why}); starting it again")),
        "EntityTooLarge" => (Item, format!("the object is larger than provider `{p}` accepts ({why})")),
        "KeyTooLongError" => (Item, format!("the object key is longer than provider `{p}` accepts ({why}); shorten the path or the prefix")),
        // The probe sends the provider's options: if it is refused too, the
        // provider pauses; else a rule's option is refused again and again,
        // and the item is parked.
        "NotImplemented" => not_implemented(p, &why),
        "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable" | "BadDigest" | "XAmzContentSHA256Mismatch" | "OperationAborted" => (Transient, format!("provider `{p}` answered {why} (HTTP {status}); will retry")),
        _ => match status {
            // Requests are signed for the endpoint: re-sent to another
            // host they are refused, so redirects are not followed.
            // S3 answers a HEAD in the wrong region so: no body, no
            // Location (the region is in `x-amz-bucket-region`).
            301 | 307 if location.is_none() => region(),
            300..=399 => (ProviderWide, match location {
                Some(host) => format!("the endpoint of provider `{p}` redirects to {host} ({why}); fix `endpoint`"),
                None => format!("the endpoint of provider `{p}` redirects without saying where ({why}); fix `endpoint`"),
            }),
            // A HEAD's refusal has no body to say why; the upload before
            // it was accepted.
            403 if request == Request::Read && code.is_none() => (ProviderWide, format!("provider `{p}` refused to show an object of bucket `{bucket}` ({why}), so an upload cannot be verified before its local copy is deleted; grant the key s3:GetObject on the bucket")),
            401 | 403 => (ProviderWide, format!("provider `{p}` refused {} bucket `{bucket}` ({why}); check the access key, secret and the key's {} permission on the bucket", request.doing(), request.permission())),
            404 => (ProviderWide, format!("bucket `{bucket}` was not found at provider `{p}` ({why}); create it or fix `bucket` and `endpoint`")),
            501 => not_implemented(p, &why),
            408 | 429 | 500..=599 => (Transient, format!("provider `{p}` answered {why}; will retry")),
            // A proxy in front of the server (nginx's client_max_body_size,
            // say) refuses a body or a URL as too large: this item only.
            413 => (Item, format!("provider `{p}`, or a proxy in front of it, refused the body as too large ({why}); raise that limit (nginx: client_max_body_size) or lower upload.multipart_threshold and part_size")),
            414 => (Item, format!("provider `{p}`, or a proxy in front of it, refused the object key as too long ({why}); shorten the path or the prefix")),
            // As NotImplemented: the probe decides.
            400 if request == Request::Write => (ProviderWide, format!("provider `{p}` rejected the upload as invalid ({why}); check its upload options ({UPLOAD_OPTIONS})")),
            400 => (ProviderWide, format!("provider `{p}` rejected the request as invalid ({why})")),
            401..=499 => (ProviderWide, format!("provider `{p}` refused the request ({why}); check that `endpoint` is the S3 API of the bucket and the provider's upload options")),
            _ => (Transient, format!("provider `{p}` answered {why}; will retry")),
        },
    };
    StorageError {
        class,
        code: code.map(str::to_string),
        status: Some(status),
        message,
    }
}

/// A header or option the provider does not implement (501).
fn not_implemented(provider: &str, why: &str) -> (ErrorClass, String) {
    (
        ErrorClass::ProviderWide,
        format!("provider `{provider}` does not implement a header or option offloadd sent ({why}); check {UPLOAD_OPTIONS}"),
    )
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
                | "AuthorizationQueryParametersError"
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

pub(crate) fn valid_region(r: &str) -> bool {
    !r.is_empty() && r.len() <= 64 && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Classifies a connection-level failure from its error chain, which must
/// not hold the request's URL (see `reqwest::Error::without_url`): a key
/// such as `certificates/a.png` would read as a TLS failure.
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
    } else if [
        "tls",
        "ssl",
        "certificate",
        "handshake",
        // rustls' own wording (its errors do not say "TLS").
        "received corrupt message",
        "peer is incompatible",
        "peer misbehaved",
        "received fatal alert",
    ]
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
pub(crate) fn error_chain(e: &dyn std::error::Error) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(next) = cur {
        out.push(next.to_string());
        cur = next.source();
    }
    out
}

pub(crate) fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::fake;

    /// The message for `status`, `code` and `said` of a `request` to
    /// provider `fake` (bucket `media`).
    fn said(status: u16, code: Option<&str>, said: Option<&str>, request: Request) -> String {
        let answer = Answer {
            said,
            ..Answer::new(status, code)
        };
        classify(answer, request, &fake::provider()).message
    }

    #[test]
    fn codes_map_to_classes() {
        let c = |s, code| classify(Answer::new(s, code), Request::Write, &fake::provider()).class;
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
        assert_eq!(c(409, Some("OperationAborted")), ErrorClass::Transient);
        assert_eq!(c(408, None), ErrorClass::Transient);
    }

    /// A 4xx no table names is never retried for ever as if transient: a
    /// body or key too large for a proxy in front is the item's; any other
    /// refusal goes to the probe (the provider pauses, or the item is
    /// refused until it is parked).
    #[test]
    fn other_client_errors_are_refusals() {
        let c = |s| classify(Answer::new(s, None), Request::Write, &fake::provider());
        assert_eq!(c(413).class, ErrorClass::Item);
        assert!(
            c(413).message.contains("client_max_body_size"),
            "{}",
            c(413).message
        );
        assert_eq!(c(414).class, ErrorClass::Item);
        for status in [405, 409, 411, 412, 415, 451] {
            assert_eq!(c(status).class, ErrorClass::ProviderWide, "HTTP {status}");
            assert!(c(status).message.contains(&format!("HTTP {status}")));
        }
    }

    #[test]
    fn wrong_secret_message_names_the_secret() {
        let e = classify(
            Answer::new(403, Some("SignatureDoesNotMatch")),
            Request::Write,
            &fake::provider(),
        );
        assert!(e.message.contains("secret access key"), "{}", e.message);
    }

    /// The server's `<Message>` is quoted, cleaned and cut short; a secret
    /// it might echo is redacted.
    #[test]
    fn the_server_message_is_quoted_clean_and_short() {
        let body = "<Error><Code>InvalidArgument</Code><Message>Credential access key has length 40,\r\n\tshould be 32 &amp; \x07 &quot;x&quot;</Message></Error>";
        assert_eq!(
            server_message(body, "SECRET").as_deref(),
            Some("Credential access key has length 40, should be 32 & \"x\"")
        );
        let long = format!("<Error><Message>{}</Message></Error>", "é".repeat(300));
        assert_eq!(
            server_message(&long, "SECRET"),
            Some(format!("{}…", "é".repeat(200)))
        );
        let echo = "<Error><Message>bad key SECRET-abc here</Message></Error>";
        assert_eq!(
            server_message(echo, "SECRET-abc").as_deref(),
            Some("bad key [redacted] here")
        );
        assert_eq!(
            server_message("<Error><Message> </Message></Error>", "S"),
            None
        );
        assert_eq!(server_message("<html>proxy</html>", "S"), None);
    }

    /// Each refusal names what to fix, with what the server said.
    #[test]
    fn refusals_name_what_to_fix_and_quote_the_server() {
        use Request::*;
        assert_eq!(
            said(400, Some("InvalidArgument"), Some("Credential access key has length 40, should be 32"), Write),
            "provider `fake` rejected the access key id (InvalidArgument: Credential access key has length 40, should be 32); check `access_key_id`"
        );
        assert_eq!(
            said(400, Some("AuthorizationQueryParametersError"), Some("Error parsing the X-Amz-Credential parameter; the region 'us-east-1' is wrong; expecting 'eu-west-1'"), Write),
            "bucket `media` is in another region than configured for provider `fake` (AuthorizationQueryParametersError: Error parsing the X-Amz-Credential parameter; the region 'us-east-1' is wrong; expecting 'eu-west-1'); fix `region` or `endpoint`"
        );
        assert_eq!(
            said(403, Some("AccessDenied"), Some("Request has expired"), Write),
            "provider `fake` says this machine's clock is off (AccessDenied: Request has expired); fix the clock (e.g. enable NTP)"
        );
        assert_eq!(
            said(403, Some("AccessDenied"), Some("Access Denied"), Write),
            "provider `fake` denied writing to bucket `media` (AccessDenied: Access Denied); grant the key s3:PutObject on the bucket"
        );
        assert_eq!(
            said(403, Some("AccessDenied"), None, Delete),
            "provider `fake` denied deleting from bucket `media` (AccessDenied); grant the key s3:DeleteObject on the bucket"
        );
        assert_eq!(
            said(403, Some("AccessDenied"), None, List),
            "provider `fake` denied listing bucket `media` (AccessDenied); grant the key s3:ListBucket on the bucket"
        );
        assert_eq!(
            said(404, Some("NoSuchBucket"), Some("The specified bucket does not exist"), Write),
            "bucket `media` does not exist at provider `fake` (NoSuchBucket: The specified bucket does not exist); create it, or fix `bucket`, `region` or `endpoint`"
        );
        let mut r2 = fake::provider();
        r2.kind = Kind::R2;
        assert_eq!(
            classify(Answer::new(404, Some("NoSuchBucket")), Write, &r2).message,
            "bucket `media` does not exist at provider `fake` (NoSuchBucket); create it, or fix `bucket`, `jurisdiction`, `region` or `endpoint`"
        );
        assert_eq!(
            said(400, Some("InvalidStorageClass"), Some("The storage class you specified is not valid"), Write),
            "provider `fake` rejected the upload as invalid (InvalidStorageClass: The storage class you specified is not valid); check its upload options (storage_class, server_side_encryption, kms_key_id, cache_control, and the `rules:` that set storage_class, cache_control or content_disposition)"
        );
        assert_eq!(
            said(400, Some("InvalidArgument"), Some("Invalid max-keys"), List),
            "provider `fake` rejected the request as invalid (InvalidArgument: Invalid max-keys)"
        );
    }

    /// S3's answer to a HEAD in another region: 301, no body, no Location.
    #[test]
    fn a_bare_redirect_says_region() {
        let e = classify(Answer::new(301, None), Request::Read, &fake::provider());
        assert_eq!(e.class, ErrorClass::ProviderWide);
        assert_eq!(
            e.message,
            "bucket `media` is in another region than configured for provider `fake` (HTTP 301); fix `region` or `endpoint`"
        );
    }

    /// A HEAD refused without a body (a key without s3:GetObject) says the
    /// upload cannot be verified and which permission is missing.
    #[test]
    fn a_refused_head_names_get_object() {
        let e = classify(Answer::new(403, None), Request::Read, &fake::provider());
        assert_eq!(e.class, ErrorClass::ProviderWide);
        assert_eq!(
            e.message,
            "provider `fake` refused to show an object of bucket `media` (HTTP 403), so an upload cannot be verified before its local copy is deleted; grant the key s3:GetObject on the bucket"
        );
    }

    /// A provider that does not implement a header offloadd sends is not
    /// retried for ever: the probe decides.
    #[test]
    fn not_implemented_is_a_refusal() {
        for code in [Some("NotImplemented"), None] {
            let e = classify(
                Answer {
                    said: Some(
                        "A header you provided implies functionality that is not implemented",
                    ),
                    ..Answer::new(501, code)
                },
                Request::Write,
                &fake::provider(),
            );
            assert_eq!(e.class, ErrorClass::ProviderWide, "{code:?}");
            assert!(
                e.message.starts_with(
                    "provider `fake` does not implement a header or option offloadd sent ("
                ),
                "{}",
                e.message
            );
            assert!(e.message.ends_with("); check storage_class, server_side_encryption, kms_key_id, cache_control, and the `rules:` that set storage_class, cache_control or content_disposition"), "{}", e.message);
        }
    }

    /// A redirect is not followed: it names where it leads.
    #[test]
    fn redirects_name_the_host() {
        let e = classify(
            Answer {
                location: Some("other.example"),
                ..Answer::new(307, None)
            },
            Request::Write,
            &fake::provider(),
        );
        assert_eq!(e.class, ErrorClass::ProviderWide);
        assert_eq!(
            e.message,
            "the endpoint of provider `fake` redirects to other.example (HTTP 307); fix `endpoint`"
        );
        assert_eq!(
            said(302, None, None, Request::Read),
            "the endpoint of provider `fake` redirects without saying where (HTTP 302); fix `endpoint`"
        );
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
        for rustls in [
            "invalid peer certificate: UnknownIssuer",
            "received corrupt message of type InvalidContentType",
            "received fatal alert: HandshakeFailure",
            "peer is incompatible: Tls12NotOffered",
        ] {
            assert_eq!(
                transport_of(
                    false,
                    &c(&["error sending request", "client error (Connect)", rustls])
                ),
                Transport::Tls(rustls.into()),
                "{rustls}"
            );
        }
    }
}
