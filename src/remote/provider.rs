//! Every per-provider detail: the `storage.providers.*` section as written
//! ([`ProviderSection`]), which options each [`Kind`] supports
//! ([`validate`]), and the presets that turn a section plus its secret into a
//! complete [`Resolved`] provider (endpoint, region, addressing, public URL).
//!
//! Guarantees: [`validate`] rejects, naming the key, anything a kind cannot
//! do; [`resolve`] either returns a provider the storage client can use as is
//! or says in one sentence what is missing ([`Incomplete`]). A [`Secret`] never
//! prints or serializes its content.

use crate::keys::{KeyError, ObjectKey, PublicUrl, RelPath};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    S3,
    R2,
    Wasabi,
    Spaces,
    Gcs,
    Minio,
    Custom,
}

impl Kind {
    fn supports_kms(self) -> bool {
        matches!(self, Kind::S3 | Kind::Minio | Kind::Custom)
    }

    pub fn supports_storage_class(self) -> bool {
        !matches!(self, Kind::Wasabi | Kind::Spaces)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Kind::S3 => "s3",
            Kind::R2 => "r2",
            Kind::Wasabi => "wasabi",
            Kind::Spaces => "spaces",
            Kind::Gcs => "gcs",
            Kind::Minio => "minio",
            Kind::Custom => "custom",
        };
        f.write_str(name)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Addressing {
    VirtualHost,
    Path,
}

impl fmt::Display for Addressing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Addressing::VirtualHost => "virtual-host",
            Addressing::Path => "path",
        })
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Jurisdiction {
    Eu,
    Fedramp,
}

/// `server_side_encryption` as written in the config.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub enum SseMode {
    #[serde(rename = "AES256")]
    Aes256,
    #[serde(rename = "aws:kms")]
    AwsKms,
}

/// Server-side encryption requested on every upload.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Sse {
    Aes256,
    AwsKms { key_id: Option<String> },
}

/// A secret access key; prints as `********` and never serializes.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

/// One `storage.providers.NAME` section, as written.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    pub kind: Kind,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub bucket: Option<String>,
    pub account_id: Option<String>,
    pub jurisdiction: Option<Jurisdiction>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub path_style: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub secret_access_key_file: Option<PathBuf>,
    pub public_url: Option<String>,
    pub prefix: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub storage_class: Option<String>,
    pub server_side_encryption: Option<SseMode>,
    pub kms_key_id: Option<String>,
    pub cache_control: Option<String>,
    #[serde(default)]
    pub allow_insecure: bool,
}

fn yes() -> bool {
    true
}

/// Keys of a provider section, for "valid keys are …" messages.
pub const SECTION_KEYS: &[&str] = &[
    "kind",
    "enabled",
    "bucket",
    "account_id",
    "jurisdiction",
    "region",
    "endpoint",
    "path_style",
    "access_key_id",
    "secret_access_key",
    "secret_access_key_file",
    "public_url",
    "prefix",
    "ca_file",
    "storage_class",
    "server_side_encryption",
    "kms_key_id",
    "cache_control",
    "allow_insecure",
];

impl ProviderSection {
    /// Whether files uploaded here get a public URL (`public_url` or the
    /// kind's own address, which an endpoint elsewhere does not have: see
    /// [`place`]).
    pub fn has_public_url(&self) -> bool {
        match place("", self) {
            Ok(p) => p.public_url_base.is_some(),
            // Incomplete (it runs in local mode, and says why).
            Err(_) => self.public_url.is_some() || self.kind != Kind::R2,
        }
    }
}

/// An option that is wrong for its provider; `key` is the offending key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SectionError {
    pub key: &'static str,
    pub message: String,
}

fn section_err(key: &'static str, message: String) -> SectionError {
    SectionError { key, message }
}

/// Why a provider cannot be used yet, as one sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Incomplete {
    pub reason: String,
}

/// A complete provider, ready for the storage client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub name: String,
    pub kind: Kind,
    pub bucket: String,
    /// `scheme://host[:port]`, no trailing slash, no bucket.
    pub endpoint: String,
    pub region: String,
    pub addressing: Addressing,
    pub access_key_id: String,
    pub secret: Secret,
    /// Trimmed of `/`; may be empty.
    pub prefix: String,
    /// No trailing slash.
    pub public_url_base: Option<String>,
    pub storage_class: Option<String>,
    pub server_side_encryption: Option<Sse>,
    pub cache_control: Option<String>,
    /// Certificates of `ca_file`, trusted beside the system store.
    pub ca: Option<TrustedCa>,
    pub allow_insecure: bool,
    /// Whether a single-part ETag is the MD5 of the body (not under SSE-KMS).
    pub etag_is_md5: bool,
}

impl Resolved {
    pub fn object_key(&self, rel: &RelPath) -> Result<ObjectKey, KeyError> {
        ObjectKey::new(&self.prefix, rel)
    }

    /// Where this provider's objects go, for [`KeySpace::shares_keys_with`].
    pub fn key_space(&self) -> KeySpace {
        KeySpace {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
        }
    }

    /// Whether two different paths can name one object here and in `other`
    /// (see [`KeySpace::shares_keys_with`]).
    pub fn shares_keys_with(&self, other: &Resolved) -> bool {
        self.key_space().shares_keys_with(&other.key_space())
    }

    /// The warning for [`Resolved::shares_keys_with`], naming both.
    pub fn shared_keys_warning(&self, other: &Resolved, other_is: &str) -> String {
        format!(
            "provider `{}` ({}) and {other_is} ({}) write to one bucket, {}, under prefixes that nest: {NESTING_HARM}; give them prefixes that do not nest",
            self.name,
            shown_prefix(&self.prefix),
            shown_prefix(&other.prefix),
            self.bucket,
        )
    }

    /// The warning for an `earlier` key space, from the history of those
    /// uploaded under, that shares keys with this provider's.
    pub fn earlier_keys_warning(&self, earlier: &KeySpace) -> String {
        format!(
            "provider `{}` ({}) writes to bucket {}, where {} was used earlier on this bucket, and the two nest: {NESTING_HARM}; give provider `{}` a prefix that does not nest with the earlier one",
            self.name,
            shown_prefix(&self.prefix),
            self.bucket,
            shown_prefix(&earlier.prefix),
            self.name,
        )
    }

    pub fn public_url(&self, key: &ObjectKey) -> Option<PublicUrl> {
        self.public_url_base
            .as_deref()
            .map(|base| PublicUrl::new(base, key))
    }
}

/// What nesting prefixes do, for the warnings about them.
const NESTING_HARM: &str =
    "one object can stand for a file under each, and an upload under the one replaces the other's";

/// `prefix `p`` or `no prefix`.
fn shown_prefix(prefix: &str) -> String {
    match prefix {
        "" => "no prefix".to_string(),
        p => format!("prefix `{p}`"),
    }
}

/// Where a provider's objects go, as far as which keys it shares with
/// another: endpoint, bucket and prefix, nothing that signs. The endpoint is
/// a resolved one (`scheme://host[:port]`), the kind's own or a configured
/// one, which [`endpoint_base`] refuses if it holds a user name or password:
/// it carries no credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySpace {
    pub endpoint: String,
    pub bucket: String,
    /// Trimmed of `/`; may be empty.
    pub prefix: String,
}

impl KeySpace {
    /// Whether two different paths can name one object here and in `other`:
    /// the same bucket at the same endpoint, under prefixes that nest
    /// without being equal (`pre` and `pre/sub`: `sub/x.png` under the one
    /// and `x.png` under the other; no prefix nests with any).
    pub fn shares_keys_with(&self, other: &KeySpace) -> bool {
        let nests = |outer: &str, inner: &str| {
            outer.is_empty()
                || inner
                    .strip_prefix(outer)
                    .is_some_and(|r| r.starts_with('/'))
        };
        (&self.endpoint, &self.bucket) == (&other.endpoint, &other.bucket)
            && self.prefix != other.prefix
            && (nests(&self.prefix, &other.prefix) || nests(&other.prefix, &self.prefix))
    }
}

/// Checks everything about a section that does not depend on secrets or
/// missing values: options the kind does not support, endpoint shape, TLS.
pub fn validate(s: &ProviderSection) -> Result<(), SectionError> {
    let kind = s.kind;
    let only_r2 = |key: &'static str| {
        section_err(
            key,
            format!("`{key}` is only for kind r2, not {kind}; remove it"),
        )
    };
    if kind != Kind::R2 && s.jurisdiction.is_some() {
        return Err(only_r2("jurisdiction"));
    }
    if kind != Kind::R2 && s.account_id.is_some() {
        return Err(only_r2("account_id"));
    }
    if kind == Kind::R2 && s.region.as_deref().is_some_and(|r| r != "auto") {
        return Err(section_err(
            "region",
            "the region of an r2 provider is always `auto`; remove `region`".into(),
        ));
    }
    // Both go into a host name (`{account_id}.r2…`, `s3.{region}.…`). Their
    // values are not quoted back: a key pasted into the wrong line may be a
    // secret (an R2 secret is 64 hex characters, one too many for a label).
    if let Some(account) = s.account_id.as_deref().filter(|a| !a.trim().is_empty()) {
        if !is_label(account, false) {
            return Err(section_err(
                "account_id",
                if is_host_or_url(account) {
                    "`account_id` holds a URL or host name; give only the account id, the 32 hex characters before .r2.cloudflarestorage.com".into()
                } else {
                    "`account_id` is not an account id; give the 32 hex characters Cloudflare shows (letters, digits and `-` only, at most 63)".into()
                },
            ));
        }
    }
    if let Some(region) = s.region.as_deref().filter(|r| !r.trim().is_empty()) {
        // Elsewhere it only signs requests, and a private server may use `_`.
        let in_host =
            matches!(kind, Kind::S3 | Kind::Wasabi | Kind::Spaces) && given(&s.endpoint).is_none();
        if !is_label(region, !in_host) {
            let chars = if in_host { "and `-`" } else { "`-` and `_`" };
            return Err(section_err(
                "region",
                if is_host_or_url(region) {
                    "`region` holds a URL or host name; give only the region name, such as eu-west-1 (and the host in `endpoint` if it is not the kind's own)".into()
                } else {
                    format!("`region` is not a region name; give one such as eu-west-1 (letters, digits {chars} only, at most 63)")
                },
            ));
        }
    }
    if !kind.supports_kms() {
        if s.server_side_encryption == Some(SseMode::AwsKms) {
            return Err(section_err(
                "server_side_encryption",
                format!(
                    "`server_side_encryption: aws:kms` is not supported by kind {kind}; remove it"
                ),
            ));
        }
        if s.kms_key_id.is_some() {
            return Err(section_err(
                "kms_key_id",
                format!("`kms_key_id` is not supported by kind {kind}; remove it"),
            ));
        }
    }
    if s.kms_key_id.is_some() && s.server_side_encryption != Some(SseMode::AwsKms) {
        return Err(section_err(
            "kms_key_id",
            "`kms_key_id` needs `server_side_encryption: aws:kms`; set that or remove `kms_key_id`"
                .into(),
        ));
    }
    if !kind.supports_storage_class() && s.storage_class.is_some() {
        return Err(section_err(
            "storage_class",
            format!("`storage_class` is not supported by kind {kind}; remove it"),
        ));
    }
    // Sent as headers with every upload: a value that cannot be one would
    // fail each upload, so it fails the load instead, like a rule's.
    for (key, value) in [
        ("storage_class", &s.storage_class),
        ("kms_key_id", &s.kms_key_id),
        ("cache_control", &s.cache_control),
    ] {
        if let Some(v) = value.as_deref() {
            if !crate::remote::object_options::header_ok(v) {
                return Err(section_err(
                    key,
                    format!("`{key}` is {v:?}, which cannot be sent as an HTTP header (only visible ASCII characters on one line); retype it"),
                ));
            }
        }
    }
    if s.secret_access_key.is_some() && s.secret_access_key_file.is_some() {
        return Err(section_err(
            "secret_access_key",
            "both `secret_access_key` and `secret_access_key_file` are set; keep only one".into(),
        ));
    }
    for (key, path) in [
        ("secret_access_key_file", &s.secret_access_key_file),
        ("ca_file", &s.ca_file),
    ] {
        if path.as_ref().is_some_and(|p| p.is_relative()) {
            return Err(section_err(
                key,
                format!("`{key}` is a relative path; give an absolute path"),
            ));
        }
    }
    if let Some(bucket) = s.bucket.as_deref().filter(|b| b.contains('/')) {
        return Err(section_err(
            "bucket",
            format!("`bucket` is `{bucket}`, which contains `/`; give only the bucket name and put a key prefix in `prefix`"),
        ));
    }
    if let Some(prefix) = s.prefix.as_deref() {
        let trimmed = prefix.trim_matches('/');
        if !trimmed.is_empty()
            && trimmed
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(section_err(
                "prefix",
                format!("`prefix` is `{prefix}`, which has an empty, `.` or `..` segment; write it like `media/results`"),
            ));
        }
    }
    if let Some(url) = s.public_url.as_deref() {
        if parse_url(url).is_none() {
            return Err(not_a_url(
                "public_url",
                url,
                format!("`public_url` is `{url}`, which is not an http(s) URL; write it like https://cdn.example.com"),
            ));
        }
    }
    if let Some(raw) = s.endpoint.as_deref() {
        endpoint_base(raw, s.bucket.as_deref(), s.allow_insecure)?;
    }
    Ok(())
}

/// A DNS label: 1 to 63 letters, digits and `-`, no `-` at either end;
/// `underscore` also allows `_`.
fn is_label(text: &str, underscore: bool) -> bool {
    (1..=63).contains(&text.len())
        && !text.starts_with('-')
        && !text.ends_with('-')
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || (underscore && c == '_'))
}

/// Whether a value looks pasted from an address (`https://…`, `a.b.c`).
fn is_host_or_url(text: &str) -> bool {
    text.contains("://") || text.contains('.')
}

/// Splits `scheme://authority/path` into its parts, for http and https only.
fn parse_url(raw: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = raw.split_once("://")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    if authority.is_empty()
        || has_user_info(raw)
        || authority.contains(['?', '#'])
        || path.contains(['?', '#'])
    {
        return None;
    }
    Some((scheme, authority, path))
}

/// `message` for a URL that [`parse_url`] refused, unless the URL carries a
/// user name or password: that is never quoted back (it may be a secret).
fn not_a_url(key: &'static str, raw: &str, message: String) -> SectionError {
    // Anywhere after the scheme: a password may hold `/`, `?` or `#`.
    if has_user_info(raw) {
        return section_err(
            key,
            format!("`{key}` holds a user name or password (`…@` before the host); remove that part: offloadd signs with the provider's access key and secret"),
        );
    }
    section_err(key, message)
}

/// Whether a URL may carry a user name or password (`…@` after the scheme).
fn has_user_info(raw: &str) -> bool {
    raw.split_once("://")
        .is_some_and(|(_, rest)| rest.contains('@'))
}

fn is_loopback(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `scheme://host[:port]` of a configured endpoint; a path equal to the
/// bucket is dropped, any other path is an error.
fn endpoint_base(
    raw: &str,
    bucket: Option<&str>,
    allow_insecure: bool,
) -> Result<String, SectionError> {
    let (scheme, authority, path) = parse_url(raw).ok_or_else(|| {
        not_a_url(
            "endpoint",
            raw,
            format!("endpoint `{raw}` is not an http(s) URL; write it like https://host:port"),
        )
    })?;
    let path = path.trim_matches('/');
    if !path.is_empty() && Some(path) != bucket {
        return Err(section_err(
            "endpoint",
            format!("endpoint `{raw}` has a path `/{path}`; give the endpoint without the bucket (e.g. https://host) and the bucket in `bucket`"),
        ));
    }
    let scheme = scheme.to_ascii_lowercase();
    if scheme == "http" && !allow_insecure && !is_loopback(authority) {
        return Err(section_err(
            "endpoint",
            format!("endpoint `{raw}` uses plain http to a host that is not loopback; use https or set `allow_insecure: true`"),
        ));
    }
    Ok(format!("{scheme}://{authority}"))
}

/// Where a provider's bucket is, from its section alone: no credentials, no
/// CA, so that the URLs of its records are known whatever else is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub bucket: String,
    pub region: String,
    /// `scheme://host[:port]`, no trailing slash, no bucket.
    pub endpoint: String,
    pub addressing: Addressing,
    /// No trailing slash.
    pub public_url_base: Option<String>,
}

fn incomplete(name: &str, what: &str) -> Incomplete {
    Incomplete {
        reason: format!("provider `{name}` is incomplete: {what}"),
    }
}

fn given(v: &Option<String>) -> Option<String> {
    v.clone().filter(|v| !v.trim().is_empty())
}

/// The domain of a kind's own service, whose public address the kind
/// derives (`None`: the endpoint is the service, whatever it is).
fn kind_domain(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::S3 => Some("amazonaws.com"),
        Kind::Wasabi => Some("wasabisys.com"),
        Kind::Spaces => Some("digitaloceanspaces.com"),
        Kind::Gcs => Some("googleapis.com"),
        Kind::R2 | Kind::Minio | Kind::Custom => None,
    }
}

/// The host of an `http(s)://host[:port][/…]` endpoint, lower-cased.
fn host_of(endpoint: &str) -> Option<String> {
    let rest = endpoint.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    Some(host.to_ascii_lowercase())
}

/// The bucket, region, endpoint, addressing and public URL base of a
/// validated section.
pub fn place(name: &str, s: &ProviderSection) -> Result<Place, Incomplete> {
    let kind = s.kind;
    let incomplete = |what: &str| incomplete(name, what);
    let bucket = given(&s.bucket).ok_or_else(|| incomplete("no bucket; set `bucket`"))?;
    let region = match (kind, given(&s.region)) {
        (Kind::R2, _) => "auto".to_owned(),
        (_, Some(region)) => region,
        (Kind::Gcs, None) => "auto".to_owned(),
        (Kind::Minio | Kind::Custom, None) => "us-east-1".to_owned(),
        (_, None) => return Err(incomplete("no region; set `region` (e.g. us-east-1)")),
    };
    let endpoint = match (given(&s.endpoint), kind) {
        (Some(raw), _) => endpoint_base(&raw, Some(&bucket), s.allow_insecure)
            .map_err(|e| incomplete(&e.message))?,
        (None, Kind::S3) => format!("https://s3.{region}.amazonaws.com"),
        (None, Kind::R2) => {
            let account = given(&s.account_id)
                .ok_or_else(|| incomplete("no account id; set `account_id` (or `endpoint`)"))?;
            match s.jurisdiction {
                None => format!("https://{account}.r2.cloudflarestorage.com"),
                Some(Jurisdiction::Eu) => format!("https://{account}.eu.r2.cloudflarestorage.com"),
                Some(Jurisdiction::Fedramp) => {
                    format!("https://{account}.fedramp.r2.cloudflarestorage.com")
                }
            }
        }
        (None, Kind::Wasabi) => format!("https://s3.{region}.wasabisys.com"),
        (None, Kind::Spaces) => format!("https://{region}.digitaloceanspaces.com"),
        (None, Kind::Gcs) => "https://storage.googleapis.com".to_owned(),
        (None, Kind::Minio | Kind::Custom) => {
            return Err(incomplete(
                "no endpoint; set `endpoint` (e.g. https://minio.example.com:9000)",
            ))
        }
    };
    // A dotted name as a host label breaks the provider's wildcard
    // certificate (`a.b.s3.….amazonaws.com` is not `*.s3.….amazonaws.com`).
    let dotted = bucket.contains('.');
    let addressing = match (s.path_style, kind) {
        (Some(true), _) => Addressing::Path,
        (Some(false), _) => Addressing::VirtualHost,
        (None, Kind::S3 | Kind::Wasabi | Kind::Spaces) if dotted => Addressing::Path,
        (None, Kind::S3 | Kind::R2 | Kind::Wasabi | Kind::Spaces) => Addressing::VirtualHost,
        (None, Kind::Gcs | Kind::Minio | Kind::Custom) => Addressing::Path,
    };
    // The kind's own public address is only where its own service answers:
    // an `s3` section whose endpoint is another service (Backblaze, say) has
    // none, so it needs `public_url` (or keeps its local copies).
    let own_service = match kind_domain(kind) {
        Some(domain) => {
            host_of(&endpoint).is_some_and(|h| h == domain || h.ends_with(&format!(".{domain}")))
        }
        None => true,
    };
    let public_url_base = match (&s.public_url, kind) {
        (Some(url), _) => Some(url.trim_end_matches('/').to_owned()),
        (None, _) if !own_service => None,
        (None, Kind::S3) if dotted => Some(format!("https://s3.{region}.amazonaws.com/{bucket}")),
        (None, Kind::S3) => Some(format!("https://{bucket}.s3.{region}.amazonaws.com")),
        (None, Kind::R2) => None,
        (None, Kind::Wasabi) => Some(format!("https://s3.{region}.wasabisys.com/{bucket}")),
        (None, Kind::Spaces) if dotted => {
            Some(format!("https://{region}.digitaloceanspaces.com/{bucket}"))
        }
        (None, Kind::Spaces) => Some(format!("https://{bucket}.{region}.digitaloceanspaces.com")),
        (None, Kind::Gcs) => Some(format!("https://storage.googleapis.com/{bucket}")),
        (None, Kind::Minio | Kind::Custom) => Some(format!("{endpoint}/{bucket}")),
    };
    Ok(Place {
        bucket,
        region,
        endpoint,
        addressing,
        public_url_base,
    })
}

/// Why [`resolve`] refuses a provider that has everything before its secret.
pub fn missing_secret(name: &str) -> Incomplete {
    incomplete(
        name,
        &format!(
            "no secret access key; set `secret_access_key_file`, the systemd credential `{name}.secret_access_key`, or {}",
            secret_env_var(name)
        ),
    )
}

/// Turns a validated section and its secret into a complete provider.
pub fn resolve(
    name: &str,
    s: &ProviderSection,
    secret: Option<Secret>,
) -> Result<Resolved, Incomplete> {
    let incomplete = |what: &str| incomplete(name, what);
    // Complaints in the order an operator fills a section in.
    given(&s.bucket).ok_or_else(|| incomplete("no bucket; set `bucket`"))?;
    let access_key_id = given(&s.access_key_id)
        .ok_or_else(|| incomplete("no access key id; set `access_key_id`"))?;
    let secret = secret.ok_or_else(|| missing_secret(name))?;
    let Place {
        bucket,
        region,
        endpoint,
        addressing,
        public_url_base,
    } = place(name, s)?;
    let server_side_encryption = s.server_side_encryption.map(|mode| match mode {
        SseMode::Aes256 => Sse::Aes256,
        SseMode::AwsKms => Sse::AwsKms {
            key_id: s.kms_key_id.clone(),
        },
    });
    Ok(Resolved {
        name: name.to_owned(),
        kind: s.kind,
        bucket,
        endpoint,
        region,
        addressing,
        access_key_id,
        secret,
        prefix: s
            .prefix
            .as_deref()
            .unwrap_or("")
            .trim_matches('/')
            .to_owned(),
        public_url_base,
        storage_class: s.storage_class.clone(),
        etag_is_md5: !matches!(server_side_encryption, Some(Sse::AwsKms { .. })),
        server_side_encryption,
        cache_control: s.cache_control.clone(),
        ca: match &s.ca_file {
            Some(path) => Some(TrustedCa::load(path).map_err(|e| incomplete(&e))?),
            None => None,
        },
        allow_insecure: s.allow_insecure,
    })
}

/// The certificates of a provider's `ca_file` (PEM), which its client trusts
/// beside the system store; read when the configuration is resolved, so a
/// reload picks up a changed file.
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedCa {
    pub path: PathBuf,
    pem: Vec<u8>,
}

impl TrustedCa {
    /// Reads `path`; an error says what is wrong with it, for "provider … is
    /// incomplete: …".
    pub fn load(path: &std::path::Path) -> Result<TrustedCa, String> {
        let pem = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "the CA file {} does not exist; create it or fix `ca_file`",
                path.display()
            ),
            kind => format!(
                "cannot read the CA file {} ({kind}); make it readable by the service user",
                path.display()
            ),
        })?;
        let ca = TrustedCa {
            path: path.to_path_buf(),
            pem,
        };
        if ca.certificates().is_empty() {
            return Err(format!(
                "the CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----); fix `ca_file`",
                path.display()
            ));
        }
        Ok(ca)
    }

    /// The certificates, for the HTTP client.
    pub fn certificates(&self) -> Vec<reqwest::Certificate> {
        reqwest::Certificate::from_pem_bundle(&self.pem).unwrap_or_default()
    }
}

impl std::fmt::Debug for TrustedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustedCa({})", self.path.display())
    }
}

/// `OFFLOADD_{NAME}_SECRET_ACCESS_KEY`, the name upper-cased and every other
/// character than A–Z and 0–9 written as `_`.
pub fn secret_env_var(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| match c.to_ascii_uppercase() {
            c @ ('A'..='Z' | '0'..='9') => c,
            _ => '_',
        })
        .collect();
    format!("OFFLOADD_{name}_SECRET_ACCESS_KEY")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> ProviderSection {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn resolved(yaml: &str) -> Resolved {
        let bucket = if yaml.contains("bucket:") {
            ""
        } else {
            "bucket: media\n"
        };
        let s = section(&format!("{bucket}access_key_id: AKID\n{yaml}"));
        validate(&s).unwrap();
        resolve("p", &s, Some(Secret::new("sekrit".into()))).unwrap()
    }

    fn check(
        r: &Resolved,
        endpoint: &str,
        region: &str,
        addressing: Addressing,
        public: Option<&str>,
    ) {
        assert_eq!(r.endpoint, endpoint);
        assert_eq!(r.region, region);
        assert_eq!(r.addressing, addressing);
        assert_eq!(r.public_url_base.as_deref(), public);
    }

    /// A kind's own public address only where its own service answers; a
    /// dotted bucket goes path-style wherever its name would be a host label
    /// under the provider's wildcard certificate.
    #[test]
    fn an_endpoint_elsewhere_has_no_public_address_of_the_kind() {
        use Addressing::*;
        let r = resolved(
            "kind: s3\nregion: us-west-004\nendpoint: https://s3.us-west-004.backblazeb2.com",
        );
        check(
            &r,
            "https://s3.us-west-004.backblazeb2.com",
            "us-west-004",
            VirtualHost,
            None,
        );
        let r = resolved(
            "kind: s3\nregion: us-east-1\nendpoint: https://s3-fips.us-east-1.amazonaws.com",
        );
        assert_eq!(
            r.public_url_base.as_deref(),
            Some("https://media.s3.us-east-1.amazonaws.com")
        );
        let r = resolved("kind: s3\nregion: us-west-004\nendpoint: https://s3.us-west-004.backblazeb2.com\npublic_url: https://f004.backblazeb2.com/file/media");
        assert_eq!(
            r.public_url_base.as_deref(),
            Some("https://f004.backblazeb2.com/file/media")
        );
        let r = resolved("kind: wasabi\nregion: eu-central-1\nbucket: media.example.com");
        check(
            &r,
            "https://s3.eu-central-1.wasabisys.com",
            "eu-central-1",
            Path,
            Some("https://s3.eu-central-1.wasabisys.com/media.example.com"),
        );
    }

    #[test]
    fn presets_for_every_kind() {
        use Addressing::*;
        let r = resolved("kind: s3\nregion: eu-west-1");
        check(
            &r,
            "https://s3.eu-west-1.amazonaws.com",
            "eu-west-1",
            VirtualHost,
            Some("https://media.s3.eu-west-1.amazonaws.com"),
        );
        let r = resolved("kind: r2\naccount_id: acc");
        check(
            &r,
            "https://acc.r2.cloudflarestorage.com",
            "auto",
            VirtualHost,
            None,
        );
        let r = resolved("kind: r2\naccount_id: acc\njurisdiction: eu");
        check(
            &r,
            "https://acc.eu.r2.cloudflarestorage.com",
            "auto",
            VirtualHost,
            None,
        );
        let r = resolved("kind: r2\naccount_id: acc\njurisdiction: fedramp");
        check(
            &r,
            "https://acc.fedramp.r2.cloudflarestorage.com",
            "auto",
            VirtualHost,
            None,
        );
        let r = resolved("kind: wasabi\nregion: us-east-2");
        check(
            &r,
            "https://s3.us-east-2.wasabisys.com",
            "us-east-2",
            VirtualHost,
            Some("https://s3.us-east-2.wasabisys.com/media"),
        );
        let r = resolved("kind: spaces\nregion: fra1");
        check(
            &r,
            "https://fra1.digitaloceanspaces.com",
            "fra1",
            VirtualHost,
            Some("https://media.fra1.digitaloceanspaces.com"),
        );
        let r = resolved("kind: gcs");
        check(
            &r,
            "https://storage.googleapis.com",
            "auto",
            Path,
            Some("https://storage.googleapis.com/media"),
        );
        for kind in ["minio", "custom"] {
            let r = resolved(&format!("kind: {kind}\nendpoint: http://127.0.0.1:9000/"));
            check(
                &r,
                "http://127.0.0.1:9000",
                "us-east-1",
                Path,
                Some("http://127.0.0.1:9000/media"),
            );
        }
    }

    #[test]
    fn overrides_and_public_url() {
        let r = resolved("kind: s3\nregion: us-east-1\nbucket: my.bucket\n");
        assert_eq!(r.addressing, Addressing::Path);
        assert_eq!(
            r.public_url_base.as_deref(),
            Some("https://s3.us-east-1.amazonaws.com/my.bucket")
        );
        let r = resolved("kind: r2\naccount_id: a\nendpoint: https://r2.local\npath_style: true\npublic_url: https://cdn.example/\nprefix: /magicads/");
        assert_eq!(r.endpoint, "https://r2.local");
        assert_eq!(r.addressing, Addressing::Path);
        let key = r.object_key(&RelPath::parse("a b.png").unwrap()).unwrap();
        assert_eq!(key.as_str(), "magicads/a b.png");
        assert_eq!(
            r.public_url(&key).unwrap().as_str(),
            "https://cdn.example/magicads/a%20b.png"
        );
        let r =
            resolved("kind: minio\nendpoint: https://m.example\nregion: eu-1\npath_style: false");
        assert_eq!(
            (r.region.as_str(), r.addressing),
            ("eu-1", Addressing::VirtualHost)
        );
    }

    #[test]
    fn endpoint_with_bucket_appended() {
        let r = resolved(
            "kind: r2\naccount_id: a\nendpoint: https://acct.r2.cloudflarestorage.com/media/",
        );
        assert_eq!(r.endpoint, "https://acct.r2.cloudflarestorage.com");
        let s = section(
            "kind: r2\nbucket: media\nendpoint: https://acct.r2.cloudflarestorage.com/other",
        );
        let err = validate(&s).unwrap_err();
        assert_eq!(err.key, "endpoint");
        assert_eq!(err.message, "endpoint `https://acct.r2.cloudflarestorage.com/other` has a path `/other`; give the endpoint without the bucket (e.g. https://host) and the bucket in `bucket`");
    }

    #[test]
    fn plain_http_needs_loopback_or_allow_insecure() {
        for ok in [
            "http://localhost:9000",
            "http://127.0.0.5",
            "http://[::1]:9000",
            "https://minio.lan",
        ] {
            validate(&section(&format!("kind: minio\nendpoint: {ok}"))).unwrap();
        }
        let err = validate(&section("kind: minio\nendpoint: http://minio.lan:9000")).unwrap_err();
        assert_eq!(err.key, "endpoint");
        assert!(err.message.contains("allow_insecure: true"), "{err}");
        validate(&section(
            "kind: minio\nendpoint: http://minio.lan:9000\nallow_insecure: true",
        ))
        .unwrap();
        assert!(validate(&section("kind: minio\nendpoint: ftp://x")).is_err());
    }

    /// Header values sent with every upload fail the load, not each upload
    /// (which used to put the daemon in local mode past `check-config`).
    #[test]
    fn upload_header_values_must_be_sendable() {
        for (key, yaml) in [
            (
                "cache_control",
                "kind: s3\ncache_control: \"public, max\u{2011}age=60\"",
            ),
            (
                "storage_class",
                "kind: s3\nstorage_class: \"STANDARD_IA\\n\"",
            ),
            (
                "kms_key_id",
                "kind: s3\nserver_side_encryption: aws:kms\nkms_key_id: |\n  alias/media\n  more\n",
            ),
        ] {
            let err = validate(&section(yaml)).unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(
                err.message.contains("cannot be sent as an HTTP header"),
                "{err}"
            );
        }
        validate(&section(
            "kind: s3\ncache_control: public, max-age=60\nstorage_class: STANDARD_IA\nserver_side_encryption: aws:kms\nkms_key_id: alias/media",
        ))
        .unwrap();
    }

    #[test]
    fn a_url_with_a_password_is_refused_without_quoting_it() {
        for (key, yaml) in [
            ("endpoint", "kind: minio\nendpoint: https://AKID:s3cr3tpw@minio.lan:9000"),
            ("endpoint", "kind: minio\nendpoint: https://AKID:s3cr/3tpw@minio.lan:9000"),
            ("endpoint", "kind: minio\nendpoint: https://AKID:s3c?r3tpw@minio.lan:9000"),
            ("public_url", "kind: minio\nendpoint: https://minio.lan\npublic_url: https://u:s3cr3tpw@cdn.example.com/media"),
        ] {
            let err = validate(&section(yaml)).unwrap_err();
            assert_eq!(err.key, key);
            assert!(err.message.contains("holds a user name or password"), "{err}");
            assert!(!err.message.contains("3tpw"), "{err}");
        }
        let err = validate(&section("kind: minio\nendpoint: https://minio.lan/a?b")).unwrap_err();
        assert!(
            err.message
                .contains("`https://minio.lan/a?b` is not an http(s) URL"),
            "{err}"
        );
    }

    #[test]
    fn ca_file_is_read_and_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let with = |path: &std::path::Path| {
            let s = section(&format!(
                "kind: minio\nendpoint: https://minio.lan\nbucket: media\naccess_key_id: AKID\nca_file: {}",
                path.display()
            ));
            validate(&s).unwrap();
            resolve("p", &s, Some(Secret::new("sekrit".into())))
        };
        let missing = dir.path().join("missing.pem");
        assert_eq!(
            with(&missing).unwrap_err().reason,
            format!(
                "provider `p` is incomplete: the CA file {} does not exist; create it or fix `ca_file`",
                missing.display()
            )
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        assert_eq!(
            with(&junk).unwrap_err().reason,
            format!(
                "provider `p` is incomplete: the CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----); fix `ca_file`",
                junk.display()
            )
        );
        let good = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&good, cert.pem()).unwrap();
        let r = with(&good).unwrap();
        let ca = r.ca.expect("the CA is kept");
        assert_eq!(ca.path, good);
        assert_eq!(ca.certificates().len(), 1);
        assert_eq!(format!("{ca:?}"), format!("TrustedCa({})", good.display()));
    }

    #[test]
    fn unsupported_options_name_the_key() {
        let cases = [
            (
                "kind: r2\nserver_side_encryption: aws:kms",
                "server_side_encryption",
            ),
            (
                "kind: gcs\nserver_side_encryption: aws:kms",
                "server_side_encryption",
            ),
            ("kind: wasabi\nkms_key_id: k", "kms_key_id"),
            ("kind: s3\nkms_key_id: k", "kms_key_id"),
            (
                "kind: s3\nserver_side_encryption: AES256\nkms_key_id: k",
                "kms_key_id",
            ),
            ("kind: s3\njurisdiction: eu", "jurisdiction"),
            ("kind: gcs\naccount_id: a", "account_id"),
            ("kind: spaces\nstorage_class: GLACIER", "storage_class"),
            ("kind: wasabi\nstorage_class: X", "storage_class"),
            ("kind: r2\nregion: weur", "region"),
            (
                "kind: s3\nsecret_access_key: a\nsecret_access_key_file: /b",
                "secret_access_key",
            ),
            (
                "kind: s3\nsecret_access_key_file: rel/x",
                "secret_access_key_file",
            ),
            ("kind: s3\nbucket: a/b", "bucket"),
            ("kind: minio\nca_file: etc/ca.pem", "ca_file"),
            ("kind: s3\nprefix: a//b", "prefix"),
            ("kind: s3\npublic_url: cdn.example", "public_url"),
        ];
        for (yaml, key) in cases {
            let err = validate(&section(yaml)).unwrap_err();
            assert_eq!(err.key, key, "{yaml}");
            assert!(err.message.contains(&format!("`{key}")), "{err}");
        }
        let err = validate(&section("kind: r2\nserver_side_encryption: aws:kms")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`server_side_encryption: aws:kms` is not supported by kind r2; remove it"
        );
        validate(&section(
            "kind: r2\nstorage_class: STANDARD_IA\nregion: auto",
        ))
        .unwrap();
    }

    #[test]
    fn kms_turns_off_md5_etags() {
        let r = resolved("kind: s3\nregion: r\nserver_side_encryption: aws:kms\nkms_key_id: k1");
        assert_eq!(
            r.server_side_encryption,
            Some(Sse::AwsKms {
                key_id: Some("k1".into())
            })
        );
        assert!(!r.etag_is_md5);
        let r = resolved("kind: s3\nregion: r\nserver_side_encryption: AES256");
        assert_eq!(r.server_side_encryption, Some(Sse::Aes256));
        assert!(r.etag_is_md5);
    }

    #[test]
    fn incomplete_reasons() {
        let reason = |yaml: &str, secret: bool| {
            let s = section(yaml);
            resolve("my-p", &s, secret.then(|| Secret::new("x".into())))
                .unwrap_err()
                .reason
        };
        assert_eq!(
            reason("kind: s3\naccess_key_id: a", true),
            "provider `my-p` is incomplete: no bucket; set `bucket`"
        );
        assert!(reason("kind: s3\nbucket: b", true).contains("no access key id"));
        assert_eq!(
            reason("kind: s3\nbucket: b\naccess_key_id: a\nregion: r", false),
            "provider `my-p` is incomplete: no secret access key; set `secret_access_key_file`, the systemd credential `my-p.secret_access_key`, or OFFLOADD_MY_P_SECRET_ACCESS_KEY"
        );
        assert!(reason("kind: spaces\nbucket: b\naccess_key_id: a", true).contains("no region"));
        assert!(reason("kind: r2\nbucket: b\naccess_key_id: a", true).contains("no account id"));
        assert!(reason("kind: custom\nbucket: b\naccess_key_id: a", true).contains("no endpoint"));
    }

    #[test]
    fn secret_is_masked() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s} {s:?}"), "******** ********");
        let r = resolved("kind: gcs");
        assert!(!format!("{r:?}").contains("sekrit"));
        assert_eq!(r.secret.expose(), "sekrit");
        assert_eq!(
            secret_env_var("r2-media.eu"),
            "OFFLOADD_R2_MEDIA_EU_SECRET_ACCESS_KEY"
        );
    }
    /// Two sections on one bucket share object keys only where their
    /// prefixes nest without being equal.
    #[test]
    fn nested_prefixes_on_one_bucket_share_keys() {
        let at = |bucket: &str, prefix: &str| {
            let mut r = resolved("kind: s3\nregion: eu-west-1\n");
            r.bucket = bucket.into();
            r.prefix = prefix.into();
            r
        };
        let shares = |a: &Resolved, b: &Resolved| a.shares_keys_with(b) && b.shares_keys_with(a);
        assert!(shares(&at("m", "pre"), &at("m", "pre/sub")));
        assert!(shares(&at("m", ""), &at("m", "media")));
        assert!(
            !shares(&at("m", "pre"), &at("m", "pre")),
            "equal: one mapping"
        );
        assert!(
            !at("m", "pre").shares_keys_with(&at("m", "prefix")),
            "not at a `/`"
        );
        assert!(!at("m", "pre").shares_keys_with(&at("other", "pre/sub")));
        let mut elsewhere = at("m", "pre/sub");
        elsewhere.endpoint = "https://minio.example".into();
        assert!(!at("m", "pre").shares_keys_with(&elsewhere));
        let text = at("m", "").shared_keys_warning(&at("m", "pre"), "provider `q`");
        assert!(
            text.starts_with("provider `p` (no prefix) and provider `q` (prefix `pre`) write to one bucket, m, under prefixes that nest"),
            "{text}"
        );
        let text = at("m", "pre/sub").earlier_keys_warning(&at("m", "pre").key_space());
        assert_eq!(
            text,
            "provider `p` (prefix `pre/sub`) writes to bucket m, where prefix `pre` was used earlier on this bucket, and the two nest: one object can stand for a file under each, and an upload under the one replaces the other's; give provider `p` a prefix that does not nest with the earlier one"
        );
    }
}
