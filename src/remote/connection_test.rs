//! `test-connection`: put a tiny probe object under the provider's prefix, read
//! it back, compare, delete it, and report each step.
//!
//! Guarantees: the first failing step ends the probe with one sentence saying
//! what is wrong and what to fix ([`diagnose`]); a denied delete of the probe
//! is a warning, not a failure; no message contains the secret (messages are
//! built only from names, codes, the endpoint and the region). [`run`] needs
//! only a [`Client`], so the daemon can run it for the control socket.

use crate::config::Config;
use crate::remote::client::Client;
use crate::remote::error::{self, ErrorClass, Fault, Transport};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::time::Duration;

const EX_USAGE: u8 = 2;
const EX_CONFIG: u8 = 78;

/// The time each probe request may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// How one step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Warning,
    Failed,
}

/// One step of the probe: `put`, `read back` or `delete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub outcome: Outcome,
    /// One sentence.
    pub detail: String,
}

/// The whole probe: every step that ran, and the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub provider: String,
    pub bucket: String,
    pub endpoint: String,
    /// The probe object's key.
    pub key: String,
    pub steps: Vec<Step>,
    /// `Ok` (all steps ok), `Warning` (passed with warnings) or `Failed`.
    pub verdict: Outcome,
    /// The one-sentence diagnosis of the failure, if any.
    pub diagnosis: Option<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.verdict != Outcome::Failed
    }

    /// Human-readable lines, one per step, then the verdict.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "testing provider `{}`: bucket `{}` at {}",
            self.provider, self.bucket, self.endpoint
        );
        for s in &self.steps {
            let word = match s.outcome {
                Outcome::Ok => "ok",
                Outcome::Warning => "warning",
                Outcome::Failed => "FAILED",
            };
            let _ = writeln!(out, "{} … {word}: {}", s.name, s.detail);
        }
        let _ = match (&self.verdict, &self.diagnosis) {
            (Outcome::Failed, Some(d)) => writeln!(out, "failed: {d}"),
            (Outcome::Failed, None) => writeln!(out, "failed"),
            (Outcome::Warning, _) => writeln!(
                out,
                "passed with warnings: provider `{}` can take uploads",
                self.provider
            ),
            (Outcome::Ok, _) => writeln!(
                out,
                "passed: provider `{}` can take uploads, read them back and delete them",
                self.provider
            ),
        };
        out
    }
}

/// Which probe step a failure happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Put,
    ReadBack,
    Delete,
}

/// The one-sentence diagnosis of a failed probe step. `configured_region` is
/// the region the client signs for; `region` the bucket's real one if known.
pub fn diagnose(
    phase: Phase,
    fault: &Fault,
    provider: &str,
    bucket: &str,
    endpoint: &str,
    configured_region: &str,
) -> String {
    if let Some(t) = &fault.transport {
        let proxy = crate::remote::proxy::through(endpoint);
        return transport_sentence(t, provider, endpoint, proxy.as_deref());
    }
    let e = &fault.error;
    let code = e.code.as_deref();
    // A redirect S3 did not explain (a proxy's to https, say) names where
    // it leads.
    let unexplained_redirect = code.is_none()
        && e.status.is_some_and(|s| (300..400).contains(&s))
        && fault.region.is_none();
    if error::is_wrong_region(e.status, code) && !unexplained_redirect {
        let what = code
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {}", e.status.unwrap_or(0)));
        return match &fault.region {
            Some(r) if r != configured_region => format!("bucket `{bucket}` is in region `{r}`, not `{configured_region}` as configured for provider `{provider}` ({what}); set `region: {r}` (or an `endpoint` in that region)"),
            Some(r) => format!("bucket `{bucket}` is in region `{r}` as configured, but {endpoint} sends requests for it elsewhere ({what}); fix `endpoint` of provider `{provider}` to one in region `{r}`"),
            None => format!("bucket `{bucket}` is not in region `{configured_region}` as configured for provider `{provider}` ({what}), and the server did not say which region it is in; fix `region` or `endpoint`"),
        };
    }
    match code {
        // s3s answers an unknown key with NotSignedUp.
        Some(c @ ("InvalidAccessKeyId" | "NotSignedUp")) => return format!("provider `{provider}` does not know the access key id ({c}); check `access_key_id`"),
        Some("SignatureDoesNotMatch") => return format!("provider `{provider}` rejected the signature (SignatureDoesNotMatch): the secret access key is wrong; fix the secret of provider `{provider}`"),
        // Classified with what the server said and, for R2, `jurisdiction`.
        Some("NoSuchBucket") => return e.message.clone(),
        Some("RequestTimeTooSkewed") => return format!("provider `{provider}` says this machine's clock is off (RequestTimeTooSkewed); fix the clock (e.g. enable NTP)"),
        _ => {}
    }
    let denied = matches!(code, Some("AccessDenied")) || (code.is_none() && e.status == Some(403));
    match phase {
        Phase::Put if denied => format!("provider `{provider}` denied the probe upload to bucket `{bucket}` (AccessDenied): the key lacks write permission (PutObject); grant it PutObject on the prefix"),
        Phase::ReadBack if denied => format!("the probe upload to bucket `{bucket}` worked but reading it back was denied: the key lacks read permission (GetObject); grant it GetObject on the prefix"),
        Phase::ReadBack if e.status == Some(404) || code == Some("NoSuchKey") => format!("the probe upload to bucket `{bucket}` was accepted but the object cannot be read back (NoSuchKey); check that `endpoint` of provider `{provider}` points at the server itself, not a gateway or cache"),
        Phase::Delete if denied => "deleting the probe object was denied: the key lacks DeleteObject; offloadd only needs it for delete-through".to_string(),
        _ => {
            let step = match phase {
                Phase::Put => "the probe upload",
                Phase::ReadBack => "reading the probe back",
                Phase::Delete => "deleting the probe",
            };
            if unexplained_redirect {
                return e.message.clone();
            }
            let after = if e.class == ErrorClass::Transient { "; try again later" } else { "" };
            format!("{step} failed: {}{after}", e.message.trim_end_matches("; will retry"))
        }
    }
}

/// The sentence for a request that got no answer: through a proxy (from the
/// environment), the proxy is the first suspect.
fn transport_sentence(
    t: &Transport,
    provider: &str,
    endpoint: &str,
    proxy: Option<&str>,
) -> String {
    // A TLS failure is the endpoint's certificate, tunnel or not.
    if let Some(proxy) = proxy.filter(|_| !matches!(t, Transport::Tls(_))) {
        let what = match t {
            Transport::Refused => "connection refused".to_string(),
            Transport::Dns => "DNS failure".to_string(),
            Transport::Timeout => format!("no answer within {}s", PROBE_TIMEOUT.as_secs()),
            Transport::Tls(cause) | Transport::Other(cause) => cause.clone(),
        };
        return format!("cannot reach {endpoint} through the proxy {proxy} ({what}); check that proxy (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY), or exempt the host with NO_PROXY, for provider `{provider}`");
    }
    match t {
        Transport::Refused => format!("cannot connect to {endpoint} (connection refused): nothing accepts connections there; check `endpoint` of provider `{provider}` and that the server is running and reachable"),
        Transport::Dns => format!("cannot resolve the host of {endpoint} (DNS failure); check `endpoint` (or what it is derived from: `region`, `account_id`) of provider `{provider}` and this machine's DNS"),
        Transport::Tls(cause) => format!("the TLS connection to {endpoint} failed ({cause}); check that `endpoint` of provider `{provider}` speaks HTTPS with a certificate this machine trusts (system store, SSL_CERT_FILE, or `ca_file`)"),
        Transport::Timeout => format!("{endpoint} did not answer within {}s (timeout); check the network, firewalls and HTTPS_PROXY/NO_PROXY for provider `{provider}`", PROBE_TIMEOUT.as_secs()),
        Transport::Other(cause) => format!("the connection to {endpoint} failed ({cause}); check `endpoint` of provider `{provider}` and the network"),
    }
}

/// A random probe key under the prefix.
pub fn probe_key(prefix: &str) -> String {
    let n: u64 = rand::random();
    let name = format!(".offloadd-probe-{n:016x}");
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

/// Runs the probe with `client`: put, read back and compare, delete. Each
/// request may take [`PROBE_TIMEOUT`].
pub async fn run(client: &Client) -> Report {
    let mut client = client.clone();
    client.set_request_timeout(PROBE_TIMEOUT);
    let client = &client;
    let p = &client.provider;
    let key = probe_key(&p.prefix);
    let body = format!("offloadd connection probe {key}\n").into_bytes();
    let mut report = Report {
        provider: p.name.clone(),
        bucket: p.bucket.clone(),
        endpoint: p.endpoint.clone(),
        key: key.clone(),
        steps: Vec::new(),
        verdict: Outcome::Ok,
        diagnosis: None,
    };
    let diagnosis = |phase: Phase, fault: &Fault| {
        diagnose(phase, fault, &p.name, &p.bucket, &p.endpoint, &p.region)
    };

    // put
    if let Err(mut fault) = client.put_small(&key, &body, "text/plain").await {
        if error::is_wrong_region(fault.error.status, fault.error.code.as_deref())
            && fault.region.is_none()
        {
            fault.region = client.bucket_region().await;
        }
        let d = diagnosis(Phase::Put, &fault);
        report.failed("put", d);
        return report;
    }
    report.ok("put", format!("wrote {} bytes to `{key}`", body.len()));

    // read back and compare
    // One byte more than was written shows a longer answer without
    // reading all of it.
    match client.get(&key, body.len() + 1).await {
        Ok(got) if got == body => report.ok(
            "read back",
            format!("read {} bytes back, identical", got.len()),
        ),
        Ok(got) => {
            let read = if got.len() > body.len() {
                format!("more than {}", body.len())
            } else {
                got.len().to_string()
            };
            let d = format!("the probe object read back from bucket `{}` differs from what was written ({read} bytes instead of {}); check that nothing between offloadd and provider `{}` rewrites objects", p.bucket, body.len(), p.name);
            report.failed("read back", d);
            cleanup(client, &key).await;
            return report;
        }
        Err(fault) => {
            let d = diagnosis(Phase::ReadBack, &fault);
            report.failed("read back", d);
            cleanup(client, &key).await;
            return report;
        }
    }

    // delete
    match client.delete_key(&key).await {
        Ok(()) => report.ok("delete", format!("deleted `{key}`")),
        Err(fault) => {
            let d = diagnosis(Phase::Delete, &fault);
            let denied = fault.error.code.as_deref() == Some("AccessDenied")
                || (fault.error.code.is_none() && fault.error.status == Some(403));
            if denied {
                report.steps.push(Step {
                    name: "delete".into(),
                    outcome: Outcome::Warning,
                    detail: format!("{d} (remove `{key}` by hand)"),
                });
                report.verdict = Outcome::Warning;
            } else {
                report.failed("delete", d);
            }
        }
    }
    report
}

/// Best effort: remove the probe after a failed read-back.
async fn cleanup(client: &Client, key: &str) {
    let _ = client.delete_key(key).await;
}

impl Report {
    fn ok(&mut self, name: &str, detail: String) {
        self.steps.push(Step {
            name: name.into(),
            outcome: Outcome::Ok,
            detail,
        });
    }

    fn failed(&mut self, name: &str, diagnosis: String) {
        self.steps.push(Step {
            name: name.into(),
            outcome: Outcome::Failed,
            detail: diagnosis.clone(),
        });
        self.verdict = Outcome::Failed;
        self.diagnosis = Some(diagnosis);
    }
}

/// What `test-connection` prints (stdout, stderr) and its exit code (0 passed,
/// possibly with warnings; 1 failed; 2 unknown provider; 78 provider incomplete
/// or `active: local` without a name); shared by the CLI and the daemon (which runs it with the credentials only it can read).
pub async fn outcome(config: &Config, provider: Option<&str>) -> (u8, String, String) {
    let names: Vec<&str> = config
        .storage
        .providers
        .keys()
        .map(String::as_str)
        .collect();
    let fail = |code: u8, msg: String| (code, String::new(), format!("offloadd: {msg}\n"));
    let name = match provider {
        Some(n) => n,
        None if config.storage.active == "local" => {
            return fail(EX_CONFIG, format!("`storage.active` is `local`, so there is no provider to test; name one: offloadd test-connection {}", name_list(&names)));
        }
        None => config.storage.active.as_str(),
    };
    if !config.storage.providers.contains_key(name) {
        return fail(
            EX_USAGE,
            format!(
                "there is no provider `{name}`; name one of: {}",
                name_list(&names)
            ),
        );
    }
    let resolved = match config.resolve_provider(name) {
        Ok(r) => r,
        Err(e) => return fail(EX_CONFIG, e.to_string()),
    };
    let client = match Client::new(&resolved) {
        Ok(c) => c,
        Err(e) => return fail(EX_CONFIG, e.to_string()),
    };
    let report = run(&client).await;
    match &report.diagnosis {
        Some(d) if !report.passed() => (1, report.render(), format!("offloadd: {d}\n")),
        _ => (0, report.render(), String::new()),
    }
}

fn name_list(names: &[&str]) -> String {
    if names.is_empty() {
        "(none configured under `storage.providers`)".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::error::{classify, Answer, Request, StorageError};
    use crate::remote::fake;

    fn http(status: u16, code: Option<&str>, region: Option<&str>) -> Fault {
        let mut p = fake::provider();
        p.name = "p".into();
        Fault {
            error: classify(Answer::new(status, code), Request::Write, &p),
            transport: None,
            region: region.map(str::to_string),
        }
    }

    fn net(t: Transport) -> Fault {
        Fault {
            error: StorageError::new(ErrorClass::Transient, "x"),
            transport: Some(t),
            region: None,
        }
    }

    fn d(phase: Phase, f: &Fault) -> String {
        diagnose(phase, f, "p", "media", "https://s3.example", "us-east-1")
    }

    #[test]
    fn credentials_and_bucket() {
        assert_eq!(
            d(Phase::Put, &http(403, Some("InvalidAccessKeyId"), None)),
            "provider `p` does not know the access key id (InvalidAccessKeyId); check `access_key_id`"
        );
        assert_eq!(
            d(Phase::Put, &http(403, Some("NotSignedUp"), None)),
            "provider `p` does not know the access key id (NotSignedUp); check `access_key_id`"
        );
        assert_eq!(
            d(Phase::Put, &http(403, Some("SignatureDoesNotMatch"), None)),
            "provider `p` rejected the signature (SignatureDoesNotMatch): the secret access key is wrong; fix the secret of provider `p`"
        );
        assert_eq!(
            d(Phase::Put, &http(404, Some("NoSuchBucket"), None)),
            "bucket `media` does not exist at provider `p` (NoSuchBucket); create it, or fix `bucket`, `region` or `endpoint`"
        );
    }

    #[test]
    fn wrong_region_names_the_region_when_known() {
        assert_eq!(
            d(Phase::Put, &http(400, Some("AuthorizationHeaderMalformed"), Some("eu-west-1"))),
            "bucket `media` is in region `eu-west-1`, not `us-east-1` as configured for provider `p` (AuthorizationHeaderMalformed); set `region: eu-west-1` (or an `endpoint` in that region)"
        );
        assert_eq!(
            d(Phase::Put, &http(301, None, Some("ap-south-1"))),
            "bucket `media` is in region `ap-south-1`, not `us-east-1` as configured for provider `p` (HTTP 301); set `region: ap-south-1` (or an `endpoint` in that region)"
        );
        assert_eq!(
            d(Phase::Put, &http(301, Some("PermanentRedirect"), None)),
            "bucket `media` is not in region `us-east-1` as configured for provider `p` (PermanentRedirect), and the server did not say which region it is in; fix `region` or `endpoint`"
        );
    }

    /// A redirect that S3 did not explain and that tells no region (a
    /// proxy's, to https) names where it leads, not a region.
    #[test]
    fn an_unexplained_redirect_names_where_it_leads() {
        let mut p = fake::provider();
        p.name = "p".into();
        let answer = Answer {
            location: Some("s3.example:443"),
            ..Answer::new(301, None)
        };
        let fault = Fault {
            error: classify(answer, Request::Write, &p),
            transport: None,
            region: None,
        };
        assert_eq!(
            d(Phase::Put, &fault),
            "the endpoint of provider `p` redirects to s3.example:443 (HTTP 301); fix `endpoint`"
        );
    }

    #[test]
    fn wrong_endpoint_for_the_right_region() {
        assert_eq!(
            d(Phase::Put, &http(301, Some("PermanentRedirect"), Some("us-east-1"))),
            "bucket `media` is in region `us-east-1` as configured, but https://s3.example sends requests for it elsewhere (PermanentRedirect); fix `endpoint` of provider `p` to one in region `us-east-1`"
        );
    }

    #[test]
    fn permissions_depend_on_the_step() {
        let denied = http(403, Some("AccessDenied"), None);
        assert!(d(Phase::Put, &denied).contains("lacks write permission (PutObject)"));
        assert_eq!(
            d(Phase::ReadBack, &denied),
            "the probe upload to bucket `media` worked but reading it back was denied: the key lacks read permission (GetObject); grant it GetObject on the prefix"
        );
        assert_eq!(
            d(Phase::Delete, &http(403, None, None)),
            "deleting the probe object was denied: the key lacks DeleteObject; offloadd only needs it for delete-through"
        );
    }

    #[test]
    fn transport_failures() {
        assert_eq!(
            d(Phase::Put, &net(Transport::Refused)),
            "cannot connect to https://s3.example (connection refused): nothing accepts connections there; check `endpoint` of provider `p` and that the server is running and reachable"
        );
        assert!(d(Phase::Put, &net(Transport::Dns))
            .starts_with("cannot resolve the host of https://s3.example (DNS failure)"));
        assert!(d(Phase::Put, &net(Transport::Tls("bad cert".into())))
            .starts_with("the TLS connection to https://s3.example failed (bad cert)"));
        assert!(d(Phase::Put, &net(Transport::Timeout))
            .starts_with("https://s3.example did not answer within 15s (timeout)"));
    }

    #[test]
    fn through_a_proxy_the_proxy_is_named() {
        let via = |t: Transport| {
            transport_sentence(&t, "p", "https://s3.example", Some("http://proxy.lan:3128"))
        };
        assert_eq!(
            via(Transport::Refused),
            "cannot reach https://s3.example through the proxy http://proxy.lan:3128 (connection refused); check that proxy (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY), or exempt the host with NO_PROXY, for provider `p`"
        );
        assert!(via(Transport::Timeout)
            .contains("through the proxy http://proxy.lan:3128 (no answer within 15s)"));
        assert!(
            via(Transport::Tls("bad cert".into()))
                .starts_with("the TLS connection to https://s3.example failed (bad cert)"),
            "a certificate is the endpoint's, proxy or not"
        );
    }

    #[test]
    fn other_errors_fall_back_to_the_classification() {
        let m = d(Phase::Put, &http(503, Some("SlowDown"), None));
        assert_eq!(
            m,
            "the probe upload failed: provider `p` answered SlowDown (HTTP 503); try again later"
        );
    }

    #[test]
    fn report_round_trips_and_renders() {
        let mut r = Report {
            provider: "p".into(),
            bucket: "media".into(),
            endpoint: "https://s3.example".into(),
            key: "x/.offloadd-probe-1".into(),
            steps: vec![],
            verdict: Outcome::Ok,
            diagnosis: None,
        };
        r.ok("put", "wrote 3 bytes".into());
        r.failed("read back", "nope".into());
        assert!(!r.passed());
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let text = r.render();
        assert!(text.contains("put … ok: wrote 3 bytes"), "{text}");
        assert!(text.contains("read back … FAILED: nope"), "{text}");
        assert!(text.ends_with("failed: nope\n"), "{text}");
    }

    #[test]
    fn probe_keys_live_under_the_prefix() {
        let k = probe_key("magicads");
        assert!(k.starts_with("magicads/.offloadd-probe-"), "{k}");
        assert!(probe_key("").starts_with(".offloadd-probe-"));
        assert_ne!(probe_key("a"), probe_key("a"));
    }
}
