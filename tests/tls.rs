//! Proof that offloadd speaks HTTPS to a provider and trusts what DESIGN
//! says it trusts: the system store, which `SSL_CERT_FILE` replaces, plus
//! the provider's `ca_file`. An
//! HTTPS front (tokio-rustls, a leaf certificate for 127.0.0.1 signed by a
//! private CA that rcgen makes per test) forwards to a real s3s-fs, which
//! checks every signature. With the CA in `SSL_CERT_FILE`, `test-connection`
//! passes and files land byte for byte (single PUT and multipart); with
//! another CA, the handshake fails, the sentence says TLS and names the
//! endpoint, nothing leaves the disk, and a restart with the right CA drains
//! the queue. A `ca_file` naming the CA works while the system store does
//! not know it; one without a certificate is a sentence (check-config exits
//! 78, the daemon stays local). `HTTPS_PROXY` carries the requests through a
//! CONNECT proxy (one that is not there is named in the sentence), and
//! `NO_PROXY` naming the endpoint's host bypasses it.

mod common;
use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;

/// A private certificate authority, written as PEM for `SSL_CERT_FILE`.
struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// Writes the CA certificate to `dir/{file}`; its path.
    fn write_pem(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }

    /// A server certificate for 127.0.0.1 and localhost, with its key.
    fn leaf(&self) -> (rcgen::Certificate, rcgen::KeyPair) {
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert, key)
    }
}

/// TLS on 127.0.0.1 in front of `upstream`: each connection is decrypted and
/// its bytes forwarded as they are, so s3s-fs sees the daemon's requests.
struct HttpsFront {
    port: u16,
    handshakes: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl HttpsFront {
    fn start(upstream: SocketAddr, ca: &TestCa) -> HttpsFront {
        let (leaf, key) = ca.leaf();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (port, handshakes, runtime) = serve_loopback(move |client, counted| {
            let acceptor = acceptor.clone();
            async move {
                // A failed handshake (the daemon distrusting us) just ends.
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
            }
        });
        HttpsFront {
            port,
            handshakes,
            _runtime: runtime,
        }
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

/// A one-thread runtime that accepts on 127.0.0.1 and runs `handle` on each
/// connection, with a counter the handler bumps for what it counts; the
/// port, the counter, and the runtime (serving until dropped).
fn serve_loopback<F, Fut>(handle: F) -> (u16, Arc<AtomicUsize>, tokio::runtime::Runtime)
where
    F: Fn(tokio::net::TcpStream, Arc<AtomicUsize>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    runtime.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(handle(client, counted.clone()));
        }
    });
    (port, count, runtime)
}

/// The trust settings a process gets: `SSL_CERT_FILE` naming `ca_pem` and
/// `SSL_CERT_DIR` naming an empty directory, so only that CA is trusted,
/// whatever this machine's own store holds.
fn trusting(env: &TestEnv, ca_pem: &Path) -> Vec<(&'static str, String)> {
    let empty = env.dir.path().join("no-certs");
    std::fs::create_dir_all(&empty).unwrap();
    vec![
        ("SSL_CERT_FILE", ca_pem.display().to_string()),
        ("SSL_CERT_DIR", empty.display().to_string()),
    ]
}

fn as_env<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// s3s-fs behind an HTTPS front whose certificate a fresh private CA signed.
fn https_s3() -> (TestEnv, S3Server, TestCa, HttpsFront) {
    let env = TestEnv::new();
    let s3 = S3Server::start_for(&env);
    let ca = TestCa::new("offloadd test CA");
    let front = HttpsFront::start(s3.addr(), &ca);
    (env, s3, ca, front)
}

fn test_connection(env: &TestEnv, trust: &[(&'static str, String)]) -> (i32, String, String) {
    env.cli_os_env(&[std::ffi::OsStr::new("test-connection")], &as_env(trust))
}

#[test]
fn https_with_a_private_ca_in_ssl_cert_file_uploads_byte_for_byte() {
    let (env, s3, ca, front) = https_s3();
    let mut cfg = Cfg::new(&front.endpoint());
    cfg.multipart_threshold = Some("5MiB".into());
    cfg.part_size = Some("5MiB".into());
    env.write_config(&cfg);
    let trust = trusting(&env, &ca.write_pem(env.dir.path(), "ca.pem"));

    let (code, out, err) = test_connection(&env, &trust);
    assert_eq!(code, 0, "stdout={out} stderr={err}");
    assert!(out.contains("passed:"), "{out}");
    assert!(front.handshakes() >= 1, "the probe went through TLS");

    let _daemon = Daemon::start(&env, &as_env(&trust));
    let files: Expected = vec![
        ("small.jpg".into(), file_content("small.jpg", 1_000, 50_000)),
        ("videos/big.mp4".into(), random_bytes(11 * 1024 * 1024)),
    ];
    for (rel, bytes) in &files {
        write_file(&env.path(rel), bytes);
    }
    wait_all_uploaded(&s3, &files, LONG);
    assert_eq!(
        s3.head(BUCKET, &format!("{PREFIX}/videos/big.mp4")).1,
        Some(multipart_etag(&env.path("videos/big.mp4"), 5 * 1024 * 1024)),
        "the big file went multipart over TLS"
    );
}

#[test]
fn an_untrusted_certificate_keeps_files_local_until_the_ca_is_trusted() {
    let (env, s3, ca, front) = https_s3();
    env.write_config(&Cfg::new(&front.endpoint()));
    let stranger = TestCa::new("some other CA");
    let wrong = trusting(&env, &stranger.write_pem(env.dir.path(), "other-ca.pem"));

    let (code, out, err) = test_connection(&env, &wrong);
    assert_eq!(code, 1, "stdout={out} stderr={err}");
    let endpoint = front.endpoint();
    assert_tls_sentence(&err, &endpoint, "invalid peer certificate: UnknownIssuer");

    // The daemon: the file stays where it is, the reason says TLS.
    let daemon = Daemon::start(&env, &as_env(&wrong));
    let bytes = file_content("waiting.jpg", 1_000, 50_000);
    write_file(&env.path("waiting.jpg"), &bytes);
    wait_until(LONG, "the provider paused for the certificate", || {
        json_array(&env.status(), "paused").iter().any(|p| {
            p.get("reason")
                .and_then(|r| r.as_str())
                .is_some_and(|r| r.contains("TLS") && r.contains("UnknownIssuer"))
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !s3.has("waiting.jpg"),
        "nothing can pass an untrusted TLS front"
    );
    assert_eq!(std::fs::read(env.path("waiting.jpg")).unwrap(), bytes);
    assert_eq!(front.handshakes(), 0, "no handshake completed");
    let log = daemon.stop();
    assert!(
        log.contains(&format!(
            "the TLS connection to provider `{PROVIDER}` ({endpoint}) failed"
        )),
        "the log says TLS: {log}"
    );

    // Restarted with the right CA: the queue drains.
    let right = trusting(&env, &ca.write_pem(env.dir.path(), "ca.pem"));
    let _daemon = Daemon::start(&env, &as_env(&right));
    wait_all_uploaded(&s3, &[("waiting.jpg".into(), bytes)], LONG);
}

/// `ca_file` makes one provider trust a private CA beside the system store
/// (which here, by `SSL_CERT_FILE`, holds only another CA): test-connection
/// passes and files land. A `ca_file` without a certificate is one sentence
/// from check-config (exit 78), and the daemon keeps the files local.
#[test]
fn ca_file_trusts_a_private_ca_beside_the_system_store() {
    let (env, s3, ca, front) = https_s3();
    let stranger = TestCa::new("some other CA");
    let system = trusting(&env, &stranger.write_pem(env.dir.path(), "system.pem"));
    let with_ca_file = |path: &Path| {
        let prefix = format!("      prefix: {PREFIX}\n");
        let yaml = env.config_yaml(&Cfg::new(&front.endpoint()));
        assert!(yaml.contains(&prefix));
        yaml.replace(
            &prefix,
            &format!("{prefix}      ca_file: {}\n", path.display()),
        )
    };

    let junk = env.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    env.write_raw_config(&with_ca_file(&junk));
    let (code, out, err) =
        env.cli_os_env(&[std::ffi::OsStr::new("check-config")], &as_env(&system));
    assert_eq!(code, 78, "stdout={out} stderr={err}");
    let sentence = format!(
        "the CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----); fix `ca_file`",
        junk.display()
    );
    assert!(
        out.contains(&sentence) || err.contains(&sentence),
        "stdout={out} stderr={err}"
    );
    let daemon = Daemon::start(&env, &as_env(&system));
    let early = file_content("early.jpg", 1_000, 20_000);
    write_file(&env.path("early.jpg"), &early);
    wait_until(LONG, "local mode, saying why", || {
        env.status()
            .to_string()
            .contains("holds no PEM certificate")
    });
    assert!(!s3.has("early.jpg"));
    daemon.stop();
    assert_eq!(std::fs::read(env.path("early.jpg")).unwrap(), early);

    env.write_raw_config(&with_ca_file(&ca.write_pem(env.dir.path(), "ca.pem")));
    let (code, out, err) = test_connection(&env, &system);
    assert_eq!(code, 0, "stdout={out} stderr={err}");
    assert!(out.contains("passed:"), "{out}");
    let _daemon = Daemon::start(&env, &as_env(&system));
    let files: Expected = vec![("late.jpg".into(), file_content("late.jpg", 1_000, 50_000))];
    write_file(&env.path("late.jpg"), &files[0].1);
    wait_all_uploaded(&s3, &files, LONG);
    assert!(front.handshakes() >= 1, "the uploads went through TLS");
}

/// An HTTP proxy that only tunnels (CONNECT host:port), as HTTPS_PROXY
/// names one; it counts the tunnels it opened.
struct ConnectProxy {
    port: u16,
    tunnels: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl ConnectProxy {
    fn start() -> ConnectProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (port, tunnels, runtime) = serve_loopback(|mut client, counted| async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if client.read_exact(&mut byte).await.is_err() || head.len() > 8192 {
                    return;
                }
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let Some(target) = head
                .strip_prefix("CONNECT ")
                .and_then(|rest| rest.split_whitespace().next())
            else {
                let _ = client
                    .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                    .await;
                return;
            };
            let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        ConnectProxy {
            port,
            tunnels,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }
}

#[test]
fn https_proxy_carries_the_uploads_and_no_proxy_bypasses_it() {
    let (env, s3, ca, front) = https_s3();
    env.write_config(&Cfg::new(&front.endpoint()));
    let proxy = ConnectProxy::start();
    let mut vars = trusting(&env, &ca.write_pem(env.dir.path(), "ca.pem"));
    vars.push(("HTTPS_PROXY", proxy.url()));
    // The harness exempts loopback from proxies (scrub_env); not here.
    vars.push(("NO_PROXY", String::new()));
    vars.push(("no_proxy", String::new()));

    // A proxy that is not there is named, not the endpoint.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let to_nowhere: Vec<_> = vars
        .iter()
        .map(|(k, v)| match *k {
            "HTTPS_PROXY" => (*k, closed.clone()),
            _ => (*k, v.clone()),
        })
        .collect();
    let (code, out, err) = test_connection(&env, &to_nowhere);
    assert_ne!(code, 0, "stdout={out} stderr={err}");
    let sentence = format!(
        "cannot reach {} through the proxy {closed} (connection refused)",
        front.endpoint()
    );
    assert!(
        out.contains(&sentence) || err.contains(&sentence),
        "stdout={out} stderr={err}"
    );

    let (code, out, err) = test_connection(&env, &vars);
    assert_eq!(code, 0, "stdout={out} stderr={err}");
    assert!(
        proxy.tunnels() >= 1,
        "test-connection went through the proxy"
    );
    let daemon = Daemon::start(&env, &as_env(&vars));
    let before = proxy.tunnels();
    let files: Expected = vec![(
        "proxied.jpg".into(),
        file_content("proxied.jpg", 1_000, 50_000),
    )];
    write_file(&env.path("proxied.jpg"), &files[0].1);
    wait_all_uploaded(&s3, &files, LONG);
    assert!(
        proxy.tunnels() > before,
        "the daemon's upload went through the proxy"
    );
    daemon.stop();

    vars.retain(|(k, _)| !k.eq_ignore_ascii_case("no_proxy"));
    vars.push(("NO_PROXY", "127.0.0.1".into()));
    vars.push(("no_proxy", String::new()));
    let through_proxy = proxy.tunnels();
    let handshakes = front.handshakes();
    let _daemon = Daemon::start(&env, &as_env(&vars));
    let direct: Expected = vec![(
        "direct.jpg".into(),
        file_content("direct.jpg", 1_000, 50_000),
    )];
    write_file(&env.path("direct.jpg"), &direct[0].1);
    wait_all_uploaded(&s3, &direct, LONG);
    assert!(front.handshakes() > handshakes, "the upload went over TLS");
    assert_eq!(
        proxy.tunnels(),
        through_proxy,
        "NO_PROXY bypassed the proxy"
    );
}
