//! What can go wrong talking to a bucket, in words an operator can act on.
//!
//! Owns the mapping of HTTP statuses, S3 error codes and connection failures
//! to a [`StorageError`] with its [`ErrorClass`]. The class says what kind of
//! error it is; what happens next (retry, probe, pause, park) is the
//! pipeline's policy, not decided here.

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
        "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable" | "BadDigest" | "XAmzContentSHA256Mismatch" | "OperationAborted" => (Transient, format!("provider `{provider}` answered {} (HTTP {status}); will retry", code.unwrap_or(""))),
        other => match status {
            401 | 403 => (ProviderWide, format!("provider `{provider}` refused the request (HTTP {status}{}); check the access key, secret and the key's permissions on bucket `{bucket}`", if other.is_empty() { String::new() } else { format!(", {other}") })),
            404 => (ProviderWide, format!("bucket `{bucket}` was not found at provider `{provider}` (HTTP 404); create it or fix `bucket` and `endpoint`")),
            301 | 307 => (ProviderWide, format!("provider `{provider}` redirected us (HTTP {status}): bucket `{bucket}` is probably in another region; fix `region` or `endpoint`")),
            408 | 429 | 500..=599 => (Transient, format!("provider `{provider}` answered HTTP {status}{}; will retry", if other.is_empty() { String::new() } else { format!(" ({other})") })),
            // A proxy in front of the server (nginx's client_max_body_size,
            // say) refuses a body or a URL as too large: this item only.
            413 => (Item, format!("provider `{provider}`, or a proxy in front of it, refused the body as too large (HTTP 413); raise that limit (nginx: client_max_body_size) or lower upload.multipart_threshold and part_size")),
            414 => (Item, format!("provider `{provider}`, or a proxy in front of it, refused the object key as too long (HTTP 414); shorten the path or the prefix")),
            // A probe sends the same upload headers: if it is refused too, a
            // provider option is wrong (a typo in `storage_class`, say) and
            // the provider pauses; else the item is refused again and again,
            // and parked.
            400 => (ProviderWide, format!("provider `{provider}` rejected the request as invalid (HTTP 400{}); check the provider's upload options (storage_class, server_side_encryption, kms_key_id, cache_control)", if other.is_empty() { String::new() } else { format!(", {other}") })),
            401..=499 => (ProviderWide, format!("provider `{provider}` refused the request (HTTP {status}{}); check that `endpoint` is the S3 API of the bucket and the provider's upload options", if other.is_empty() { String::new() } else { format!(", {other}") })),
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

pub(crate) fn valid_region(r: &str) -> bool {
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
        assert_eq!(c(409, Some("OperationAborted")), ErrorClass::Transient);
        assert_eq!(c(408, None), ErrorClass::Transient);
    }

    /// A 4xx no table names is never retried for ever as if transient: a
    /// body or key too large for a proxy in front is the item's; any other
    /// refusal goes to the probe (the provider pauses, or the item is
    /// refused until it is parked).
    #[test]
    fn other_client_errors_are_refusals() {
        let c = |s| classify(s, None, "p", "b");
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
