//! Shared harness for offloadd's integration tests.
//!
//! Everything here is real: a real S3-compatible server process (`s3s-fs`,
//! which checks request signatures and keeps its data on disk), a real watched
//! directory in a temp dir, and the real `offloadd` binary run as a child
//! process. Each test gets its own ports and directories so tests can run in
//! parallel.
//!
//! Every test uses a distinctive secret (`SECRET-<random>`); every byte the
//! daemon and the CLI print is captured and checked for it on teardown.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use serde_json::Value;
use tempfile::TempDir;

pub const ACCESS_KEY: &str = "AKOFFLOADDTEST";
pub const BUCKET: &str = "media";
pub const PREFIX: &str = "magicads";
pub const PROVIDER: &str = "local-s3";
pub const PUBLIC_URL: &str = "https://cdn.example.test/media";

/// Generous default wait: the machine is slow and shared.
pub const LONG: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// small helpers

/// Path of the binary under test. In the real crate cargo sets
/// `CARGO_BIN_EXE_offloadd`; `OFFLOADD_TEST_BIN` overrides it.
pub fn bin_path() -> PathBuf {
    if let Ok(p) = std::env::var("OFFLOADD_TEST_BIN") {
        return PathBuf::from(p);
    }
    match option_env!("CARGO_BIN_EXE_offloadd") {
        Some(p) => PathBuf::from(p),
        None => panic!("offloadd binary unknown: not built by cargo as part of the offloadd package and OFFLOADD_TEST_BIN unset"),
    }
}

fn s3s_fs_path() -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("s3s-fs");
            if p.is_file() {
                return p;
            }
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = Path::new(&home).join(".cargo/bin/s3s-fs");
    assert!(
        p.is_file(),
        "s3s-fs not found on PATH nor in ~/.cargo/bin (cargo install s3s-fs --features binary)"
    );
    p
}

/// Whether the test may use what it needs (root, a tool). Outside CI a test
/// without it prints SKIP and returns early; under CI (`CI` set, as
/// `.ci/run` does) it fails: no silent skips.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs {what}, which CI must provide");
    }
    eprintln!("SKIP: needs {what}");
    false
}

/// `offloadd --config <env's config>` run as `nobody` (uid and gid 65534, no
/// other groups) through `setpriv`: add the command and its arguments.
pub fn offloadd_as_nobody(env: &TestEnv) -> Command {
    offloadd_as(env, 65534, 65534)
}

/// `offloadd --config <config>` run as `uid` with only the group `gid`.
pub fn offloadd_as(env: &TestEnv, uid: u32, gid: u32) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(bin_path())
        .arg("--config")
        .arg(&env.config_path);
    cmd
}

/// The exit code, stdout and stderr of `cmd`.
pub fn output_of(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.output().expect("run the command");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Lets `nobody` reach the env's folder (the socket's, the state_dir's
/// parent) and read its config; runs `offloadd --config <config> ARGS` as
/// `nobody`, returning the exit code, stdout and stderr.
pub fn offloadd_as_nobody_output(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    use std::os::unix::fs::PermissionsExt;
    for p in [env.dir.path(), env.config_path.as_path()] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }
    output_of(offloadd_as_nobody(env).args(args))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn random_hex(n_bytes: usize) -> String {
    let mut b = vec![0u8; n_bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

/// Distinctive content for a test file: a readable header plus random bytes.
pub fn file_content(name: &str, min: usize, max: usize) -> Vec<u8> {
    let n = rand::thread_rng().gen_range(min..=max);
    let mut v = format!("{name}\n").into_bytes();
    v.extend(random_bytes(n));
    v
}

/// Poll `cond` every 100 ms until it is true; panic with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    if !poll_until(timeout, &mut cond) {
        panic!("timed out after {timeout:?} waiting for: {what}");
    }
}

/// Like [`wait_until`] but returns whether the condition became true.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

pub fn write_file(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Compare two files byte for byte without loading them whole.
pub fn files_equal(a: &Path, b: &Path) -> bool {
    let (ma, mb) = match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x, y),
        _ => return false,
    };
    if ma.len() != mb.len() {
        return false;
    }
    let (mut fa, mut fb) = match (fs::File::open(a), fs::File::open(b)) {
        (Ok(x), Ok(y)) => (x, y),
        _ => return false,
    };
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let n = match fa.read(&mut ba) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 {
            return true;
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Write `size` bytes of random-ish content quickly, through a 1 MiB buffer.
/// Every MiB differs (chunk index stamped in), so parts are distinct.
pub fn write_big_file(path: &Path, size: u64) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    let mut f = fs::File::create(path).unwrap();
    let mut buf = random_bytes(1 << 20);
    let mut written = 0u64;
    let mut i = 0u64;
    while written < size {
        buf[..8].copy_from_slice(&i.to_le_bytes());
        buf[4096..4104].copy_from_slice(&(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
        let n = std::cmp::min(buf.len() as u64, size - written) as usize;
        f.write_all(&buf[..n]).unwrap();
        written += n as u64;
        i += 1;
    }
    f.sync_all().unwrap();
}

/// The S3 multipart ETag of a local file cut into `part_size` chunks:
/// `"{md5 of the concatenated part md5s}-{N}"` (quotes stripped).
pub fn multipart_etag(path: &Path, part_size: usize) -> String {
    use md5::{Digest, Md5};
    let mut f = fs::File::open(path).unwrap();
    let mut all = Vec::new();
    let mut n = 0;
    let mut buf = vec![0u8; part_size];
    loop {
        let mut filled = 0;
        while filled < part_size {
            let r = f.read(&mut buf[filled..]).unwrap();
            if r == 0 {
                break;
            }
            filled += r;
        }
        if filled == 0 {
            break;
        }
        all.extend_from_slice(&Md5::digest(&buf[..filled]));
        n += 1;
        if filled < part_size {
            break;
        }
    }
    format!("{}-{}", hex::encode(Md5::digest(&all)), n)
}

/// Remove environment that would change how a child behaves (systemd,
/// journald, offloadd's own variables, log filters) and route loopback
/// around any proxy.
fn scrub_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("OFFLOADD_") {
            cmd.env_remove(&k);
        }
    }
    for k in [
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
        "INVOCATION_ID",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "RUST_LOG",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        cmd.env_remove(k);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost");
    cmd.env("no_proxy", "127.0.0.1,localhost");
}

fn send_signal(pid: u32, sig: i32) {
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn describe(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st:?}"),
    }
}

fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        s
    } else {
        let mut i = s.len() - n;
        while !s.is_char_boundary(i) {
            i += 1;
        }
        &s[i..]
    }
}

// ---------------------------------------------------------------------------
// S3 server

/// A real `s3s-fs` process on 127.0.0.1 with its own data directory.
pub struct S3Server {
    pub port: u16,
    pub data_dir: PathBuf,
    pub access_key: String,
    pub secret_key: String,
    base: TempDir,
    child: Option<Child>,
}

impl S3Server {
    pub fn start_s3s_fs(access_key: &str, secret_key: &str) -> S3Server {
        let base = tempfile::Builder::new()
            .prefix("offloadd-s3-")
            .tempdir()
            .unwrap();
        let data_dir = base.path().join("data");
        fs::create_dir_all(&data_dir).unwrap();
        let mut s = S3Server {
            port: 0,
            data_dir,
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            base,
            child: None,
        };
        for _ in 0..10 {
            s.port = free_port();
            if s.spawn() {
                return s;
            }
        }
        panic!("could not start s3s-fs: {}", s.log());
    }

    /// Start with the default test access key and a bucket named [`BUCKET`].
    pub fn start_for(env: &TestEnv) -> S3Server {
        let s = S3Server::start_s3s_fs(ACCESS_KEY, &env.secret);
        s.create_bucket(BUCKET);
        s
    }

    fn log(&self) -> String {
        fs::read_to_string(self.base.path().join("s3s-fs.log")).unwrap_or_default()
    }

    /// Spawn on `self.port`; true once the port accepts connections.
    fn spawn(&mut self) -> bool {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.base.path().join("s3s-fs.log"))
            .unwrap();
        let mut cmd = Command::new(s3s_fs_path());
        cmd.arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(&self.access_key)
            .arg("--secret-key")
            .arg(&self.secret_key)
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd.env_remove("RUST_LOG");
        let mut child = cmd.spawn().expect("spawn s3s-fs");
        let start = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return true;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A bucket is a directory of the data dir.
    pub fn create_bucket(&self, name: &str) {
        fs::create_dir_all(self.data_dir.join(name)).unwrap();
    }

    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.data_dir.join(bucket).join(key)
    }

    /// The object path for a file at `rel` under the watched root, with the
    /// test prefix, in the test bucket.
    pub fn obj(&self, rel: &str) -> PathBuf {
        self.object_path(BUCKET, &format!("{PREFIX}/{rel}"))
    }

    pub fn object_bytes(&self, rel: &str) -> Option<Vec<u8>> {
        fs::read(self.obj(rel)).ok()
    }

    pub fn has(&self, rel: &str) -> bool {
        self.obj(rel).is_file()
    }

    /// Every object key in `bucket` (s3s-fs keeps its own bookkeeping outside
    /// the bucket directory).
    pub fn keys(&self, bucket: &str) -> BTreeSet<String> {
        let root = self.data_dir.join(bucket);
        let mut out = BTreeSet::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    stack.push(p);
                } else {
                    out.insert(
                        p.strip_prefix(&root)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
            }
        }
        out
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restart on the same port and data dir.
    pub fn restart(&mut self) {
        self.stop();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "could not restart s3s-fs on port {}: {}",
            self.port,
            self.log()
        );
    }

    /// HEAD an object through the S3 API (rust-s3); returns (status, ETag
    /// without quotes, content length).
    pub fn head(&self, bucket: &str, key: &str) -> (u16, Option<String>, Option<i64>) {
        let (h, code) = head_object(
            &self.endpoint(),
            &self.access_key,
            &self.secret_key,
            bucket,
            key,
        )
        .expect("HEAD object");
        (
            code,
            h.e_tag.map(|e| e.trim_matches('"').to_string()),
            h.content_length,
        )
    }
}

/// HEAD of `bucket/key` on a path-style S3 endpoint through rust-s3.
pub fn head_object(
    endpoint: &str,
    access_key: &str,
    secret_key: &str,
    bucket: &str,
    key: &str,
) -> Result<(s3::serde_types::HeadObjectResult, u16), s3::error::S3Error> {
    let b = path_style_bucket(endpoint, access_key, secret_key, bucket);
    block_on(b.head_object(key))
}

/// PUTs `body` at `bucket/key` through rust-s3, signed, as another writer of
/// the bucket would; the HTTP status.
pub fn put_object(
    endpoint: &str,
    access_key: &str,
    secret_key: &str,
    bucket: &str,
    key: &str,
    body: &[u8],
) -> u16 {
    let b = path_style_bucket(endpoint, access_key, secret_key, bucket);
    block_on(b.put_object(key, body))
        .expect("PUT object")
        .status_code()
}

fn path_style_bucket(
    endpoint: &str,
    access_key: &str,
    secret_key: &str,
    bucket: &str,
) -> Box<s3::Bucket> {
    let region = s3::Region::Custom {
        region: "us-east-1".into(),
        endpoint: endpoint.to_string(),
    };
    let creds =
        s3::creds::Credentials::new(Some(access_key), Some(secret_key), None, None, None).unwrap();
    s3::Bucket::new(bucket, region, creds)
        .unwrap()
        .with_path_style()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// fault-injecting TCP proxy

struct ProxyInner {
    upstream: SocketAddr,
    enabled: AtomicBool,
    stop: AtomicBool,
    attempts: AtomicUsize,
    conns: Mutex<Vec<TcpStream>>,
}

/// A TCP forwarder on 127.0.0.1 in front of the S3 server. When disabled it
/// drops every live connection and closes each new one right after accepting
/// it (counting it), so the daemon sees connection failures.
pub struct Proxy {
    pub port: u16,
    inner: Arc<ProxyInner>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let inner = Arc::new(ProxyInner {
            upstream,
            enabled: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            attempts: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let i2 = inner.clone();
        let thread = thread::spawn(move || {
            while !i2.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        i2.attempts.fetch_add(1, Ordering::SeqCst);
                        client.set_nonblocking(false).unwrap();
                        if !i2.enabled.load(Ordering::SeqCst) {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(i2.upstream) else {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        {
                            let mut conns = i2.conns.lock().unwrap();
                            conns.retain(|c| c.peer_addr().is_ok());
                            conns.push(client.try_clone().unwrap());
                            conns.push(server.try_clone().unwrap());
                        }
                        let (mut c1, mut s1) =
                            (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let (mut c2, mut s2) = (client, server);
                        thread::spawn(move || {
                            let _ = io::copy(&mut c1, &mut s1);
                            let _ = s1.shutdown(Shutdown::Write);
                        });
                        thread::spawn(move || {
                            let _ = io::copy(&mut s2, &mut c2);
                            let _ = c2.shutdown(Shutdown::Write);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            port,
            inner,
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_enabled(&self, on: bool) {
        self.inner.enabled.store(on, Ordering::SeqCst);
        if !on {
            for c in self.inner.conns.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// Connections accepted since the last reset.
    pub fn attempts(&self) -> usize {
        self.inner.attempts.load(Ordering::SeqCst)
    }

    pub fn reset_attempts(&self) {
        self.inner.attempts.store(0, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.set_enabled(false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// test environment and config

/// Config knobs; [`TestEnv::write_config`] renders them as YAML.
#[derive(Clone, Debug)]
pub struct Cfg {
    pub endpoint: String,
    pub settle: String,
    pub rescan_interval: String,
    pub delete_local: bool,
    /// `storage.delete_after`, written only when set.
    pub delete_after: Option<String>,
    pub workers: u32,
    pub multipart_threshold: Option<String>,
    pub part_size: Option<String>,
    pub memory_limit: Option<String>,
    pub initial_backoff: String,
    pub max_backoff: String,
    /// Write `secret_access_key_file:` pointing at the env's secret file.
    pub with_secret_file: bool,
}

impl Cfg {
    pub fn new(endpoint: &str) -> Cfg {
        Cfg {
            endpoint: endpoint.to_string(),
            settle: "300ms".into(),
            rescan_interval: "0".into(),
            delete_local: false,
            delete_after: None,
            workers: 4,
            multipart_threshold: None,
            part_size: None,
            memory_limit: None,
            initial_backoff: "200ms".into(),
            max_backoff: "2s".into(),
            with_secret_file: true,
        }
    }
}

/// A temp dir with `results/` (the watched root), `state/`, the secret file
/// and the config file.
pub struct TestEnv {
    pub dir: TempDir,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub secret_file: PathBuf,
    /// The right secret for this test's S3 server.
    pub secret: String,
    /// Every secret this test ever handed out; none may appear in output.
    secrets: Arc<Mutex<Vec<String>>>,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("offloadd-test-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("results");
        let state_dir = dir.path().join("state");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&state_dir).unwrap();
        let secret = format!("SECRET-{}", random_hex(12));
        let env = TestEnv {
            socket: dir.path().join("control.sock"),
            config_path: dir.path().join("offloadd.yaml"),
            secret_file: dir.path().join("secret"),
            root,
            state_dir,
            secret: secret.clone(),
            secrets: Arc::new(Mutex::new(vec![secret.clone()])),
            dir,
        };
        env.set_secret_file(&secret);
        env
    }

    /// Register another secret that must never be printed.
    pub fn new_secret(&self) -> String {
        let s = format!("SECRET-{}", random_hex(12));
        self.secrets.lock().unwrap().push(s.clone());
        s
    }

    pub fn secrets(&self) -> Vec<String> {
        self.secrets.lock().unwrap().clone()
    }

    /// (Re)write the secret file, mode 0600, no trailing newline.
    pub fn set_secret_file(&self, secret: &str) {
        {
            let mut s = self.secrets.lock().unwrap();
            if !s.iter().any(|x| x == secret) {
                s.push(secret.to_string());
            }
        }
        let mut f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.secret_file)
            .unwrap();
        f.write_all(secret.as_bytes()).unwrap();
        fs::set_permissions(&self.secret_file, fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A sibling of the watched root on the same filesystem.
    pub fn outside(&self) -> PathBuf {
        let p = self.dir.path().join("outside");
        fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn config_yaml(&self, c: &Cfg) -> String {
        let mut upload = format!("  workers: {}\n", c.workers);
        if let Some(v) = &c.multipart_threshold {
            upload += &format!("  multipart_threshold: {v}\n");
        }
        if let Some(v) = &c.part_size {
            upload += &format!("  part_size: {v}\n");
        }
        if let Some(v) = &c.memory_limit {
            upload += &format!("  memory_limit: {v}\n");
        }
        upload += &format!(
            "  retry: {{ initial_backoff: {}, max_backoff: {} }}\n",
            c.initial_backoff, c.max_backoff
        );
        let secret = if c.with_secret_file {
            format!(
                "      secret_access_key_file: {}\n",
                self.secret_file.display()
            )
        } else {
            String::new()
        };
        format!(
            "# offloadd integration test config\n\
watch:\n  root: {root}\n  settle: {settle}\n  rescan_interval: {rescan}\n\
state_dir: {state}\n\
control_socket: {socket}\n\
storage:\n  active: {PROVIDER}\n  delete_local: {delete}\n{delete_after}  providers:\n    {PROVIDER}:\n      kind: minio\n      endpoint: {endpoint}\n      bucket: {BUCKET}\n      access_key_id: {ACCESS_KEY}\n{secret}      public_url: {PUBLIC_URL}\n      prefix: {PREFIX}\n\
upload:\n{upload}\
http:\n  listen: \"\"\n",
            root = self.root.display(),
            settle = c.settle,
            rescan = c.rescan_interval,
            state = self.state_dir.display(),
            socket = self.socket.display(),
            delete = c.delete_local,
            delete_after = c
                .delete_after
                .as_ref()
                .map(|d| format!("  delete_after: {d}\n"))
                .unwrap_or_default(),
            endpoint = c.endpoint,
        )
    }

    pub fn write_config(&self, c: &Cfg) {
        self.write_raw_config(&self.config_yaml(c));
    }

    pub fn write_raw_config(&self, yaml: &str) {
        fs::write(&self.config_path, yaml).unwrap();
        fs::set_permissions(&self.config_path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Panic if any secret of this test occurs in `text`.
    pub fn assert_no_secret(&self, what: &str, text: &str) {
        for s in self.secrets() {
            assert!(!text.contains(&s), "a secret appeared in {what}:\n{text}");
        }
    }

    /// `offloadd --config <cfg> <args>` with a 60 s timeout; (exit code,
    /// stdout, stderr). Secrets are checked in both streams.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_os(&args.iter().map(OsStr::new).collect::<Vec<_>>())
    }

    pub fn cli_os(&self, args: &[&OsStr]) -> (i32, String, String) {
        self.cli_os_env(args, &[])
    }

    /// Runs `offloadd --config … ARGS` with extra environment; fails the test if
    /// any of its secrets is printed.
    pub fn cli_os_env(&self, args: &[&OsStr], extra_env: &[(&str, &str)]) -> (i32, String, String) {
        let mut cmd = Command::new(bin_path());
        cmd.arg("--config").arg(&self.config_path).args(args);
        scrub_env(&mut cmd);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn offloadd");
        let out = capture(child.stdout.take().unwrap());
        let err = capture(child.stderr.take().unwrap());
        let st = match wait_child(&mut child, Duration::from_secs(60)) {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("offloadd {args:?} did not finish within 60 s");
            }
        };
        let out = out.join();
        let err = err.join();
        self.assert_no_secret(&format!("stdout of `offloadd {args:?}`"), &out);
        self.assert_no_secret(&format!("stderr of `offloadd {args:?}`"), &err);
        let code = st
            .code()
            .unwrap_or_else(|| panic!("offloadd {args:?}: {}", describe(&st)));
        (code, out, err)
    }

    /// `status --json`, parsed; asserts exit 0 and a single JSON object.
    pub fn status(&self) -> Value {
        let (code, out, err) = self.cli(&["status", "--json"]);
        assert_eq!(code, 0, "status --json failed: stdout={out} stderr={err}");
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("status --json is not one JSON object ({e}): {out}"))
    }

    /// `locate REL`: (exit code, trimmed stdout).
    pub fn locate(&self, rel: &str) -> (i32, String) {
        let (code, out, _err) = self.cli(&["locate", rel]);
        (code, out.trim().to_string())
    }
}

pub fn public_url(rel: &str) -> String {
    format!("{PUBLIC_URL}/{PREFIX}/{rel}")
}

struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: JoinHandle<()>,
}

impl Capture {
    fn join(self) -> String {
        let _ = self.thread.join();
        let b = self.buf.lock().unwrap();
        String::from_utf8_lossy(&b).into_owned()
    }
}

fn capture(mut r: impl Read + Send + 'static) -> Capture {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b2 = buf.clone();
    let thread = thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b2.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    Capture { buf, thread }
}

// ---------------------------------------------------------------------------
// the daemon

/// `offloadd run` as a child process; stdout and stderr are streamed into
/// buffers. Dropping it kills the process; every teardown checks that no
/// secret was printed.
pub struct Daemon {
    child: Option<Child>,
    pub pid: u32,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    secrets: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
    checked: bool,
}

/// The daemon logs "offloadd started" once its state is open, the
/// managed-since mark is set and the watcher is started. Until then (or until
/// READY_FALLBACK passes) tests do not write files, so that the mark predates
/// them.
const READY_MARKERS: &[&str] = &["offloadd started"];
const READY_FALLBACK: Duration = Duration::from_secs(10);

impl Daemon {
    /// Spawn `offloadd run` and return at once.
    pub fn spawn(env: &TestEnv, extra_env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_bin(&bin_path(), env, extra_env)
    }

    /// Spawn `BIN run` (another build of offloadd) and return at once.
    pub fn spawn_bin(bin: &Path, env: &TestEnv, extra_env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&env.config_path).arg("run");
        Daemon::spawn_command(cmd, env, extra_env)
    }

    /// Spawn the daemon as `nobody` ([`offloadd_as_nobody`]); the caller
    /// makes what it needs reachable to it.
    pub fn spawn_as_nobody(env: &TestEnv) -> Daemon {
        let mut cmd = offloadd_as_nobody(env);
        cmd.arg("run");
        Daemon::spawn_command(cmd, env, &[])
    }

    fn spawn_command(mut cmd: Command, env: &TestEnv, extra_env: &[(&str, &str)]) -> Daemon {
        scrub_env(&mut cmd);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn offloadd run");
        let pid = child.id();
        let mut readers = Vec::new();
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        for (stream, buf) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
                out.clone(),
            ),
            (
                Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
                err.clone(),
            ),
        ] {
            let mut stream = stream;
            readers.push(thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
                    }
                }
            }));
        }
        Daemon {
            child: Some(child),
            pid,
            out,
            err,
            readers,
            secrets: env.secrets.clone(),
            exit: None,
            checked: false,
        }
    }

    /// Spawn and wait until the daemon is up (see [`READY_MARKERS`]).
    pub fn start(env: &TestEnv, extra_env: &[(&str, &str)]) -> Daemon {
        let mut d = Daemon::spawn(env, extra_env);
        d.wait_ready();
        d
    }

    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if !self.alive() {
                panic!(
                    "offloadd run exited during start-up ({}):\n{}",
                    describe(&self.exit.unwrap()),
                    self.stderr()
                );
            }
            let log = self.stderr() + &self.stdout();
            if READY_MARKERS.iter().any(|m| log.contains(m)) || start.elapsed() >= READY_FALLBACK {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        // Give the watcher a moment to add its watches after the ready line.
        thread::sleep(Duration::from_millis(500));
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        send_signal(self.pid, sig);
    }

    /// SIGHUP, then waits until the log shows `outcome` once more (e.g.
    /// "configuration reloaded" or "reload refused").
    pub fn reload_and_wait(&self, outcome: &str) {
        let before = self.stderr().matches(outcome).count();
        self.signal(libc::SIGHUP);
        wait_until(LONG, outcome, || {
            self.stderr().matches(outcome).count() > before
        });
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn alive(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.as_mut() {
            None => false,
            Some(c) => match c.try_wait().unwrap() {
                Some(st) => {
                    self.exit = Some(st);
                    false
                }
                None => true,
            },
        }
    }

    /// Wait for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.exit {
            return Some(st);
        }
        let st = wait_child(self.child.as_mut()?, timeout)?;
        self.exit = Some(st);
        self.join_readers();
        Some(st)
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn check_no_secret(&mut self) {
        self.checked = true;
        let all = self.stderr() + &self.stdout();
        for s in self.secrets.lock().unwrap().iter() {
            if all.contains(s.as_str()) {
                panic!("a secret appeared in the daemon's output:\n{all}");
            }
        }
    }

    /// SIGTERM, wait (the contract allows 30 s for in-flight uploads), assert
    /// exit code 0 and no secret in the output. Returns stderr.
    pub fn stop(mut self) -> String {
        if self.alive() {
            send_signal(self.pid, libc::SIGTERM);
        }
        let st = match self.wait_exit(Duration::from_secs(45)) {
            Some(st) => st,
            None => {
                send_signal(self.pid, libc::SIGKILL);
                let _ = self.wait_exit(Duration::from_secs(10));
                panic!(
                    "offloadd did not exit within 45 s of SIGTERM:\n{}",
                    tail(&self.stderr(), 8000)
                );
            }
        };
        self.check_no_secret();
        let err = self.stderr();
        assert_eq!(
            st.code(),
            Some(0),
            "offloadd run should exit 0 on SIGTERM, got {}:\n{}",
            describe(&st),
            tail(&err, 8000)
        );
        err
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) -> String {
        self.kill_in_place();
        self.stderr()
    }

    /// SIGKILL and reap, keeping the guard (its output stays readable).
    pub fn kill_in_place(&mut self) {
        if self.alive() {
            send_signal(self.pid, libc::SIGKILL);
        }
        self.wait_exit(Duration::from_secs(30))
            .expect("SIGKILLed daemon did not exit");
        self.check_no_secret();
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if self.exit.is_none() {
                let _ = c.kill();
                if let Ok(st) = c.wait() {
                    self.exit = Some(st);
                }
            }
        }
        self.join_readers();
        if thread::panicking() {
            eprintln!(
                "---- offloadd (pid {}) stderr, last 8000 bytes ----\n{}\n---- end ----",
                self.pid,
                tail(&self.stderr(), 8000)
            );
        } else if !self.checked {
            self.check_no_secret();
        }
    }
}

// ---------------------------------------------------------------------------
// assertions about the bucket and local files

/// (relative path, expected bytes)
pub type Expected = Vec<(String, Vec<u8>)>;

/// All objects present with equal bytes.
pub fn all_uploaded(s3: &S3Server, files: &[(String, Vec<u8>)]) -> bool {
    files
        .iter()
        .all(|(rel, bytes)| s3.object_bytes(rel).as_deref() == Some(bytes.as_slice()))
}

pub fn missing_objects(s3: &S3Server, files: &[(String, Vec<u8>)]) -> Vec<String> {
    files
        .iter()
        .filter(|(rel, bytes)| s3.object_bytes(rel).as_deref() != Some(bytes.as_slice()))
        .map(|(r, _)| r.clone())
        .collect()
}

pub fn wait_all_uploaded(s3: &S3Server, files: &[(String, Vec<u8>)], timeout: Duration) {
    if !poll_until(timeout, || all_uploaded(s3, files)) {
        let missing = missing_objects(s3, files);
        panic!(
            "after {timeout:?}, {} of {} files are not in the bucket with equal bytes, e.g. {:?}",
            missing.len(),
            files.len(),
            &missing[..missing.len().min(10)]
        );
    }
}

/// (relative path, expected bytes, seen gone)
type Watched = Arc<Mutex<Vec<(String, Vec<u8>, bool)>>>;

/// Watches local files while the daemon works: whenever one disappears, its
/// object must already be in the bucket with the same bytes (no early delete).
pub struct DeleteWatch {
    entries: Watched,
    violations: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DeleteWatch {
    pub fn start(env: &TestEnv, s3: &S3Server) -> DeleteWatch {
        let entries: Watched = Arc::new(Mutex::new(Vec::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (e2, v2, s2) = (entries.clone(), violations.clone(), stop.clone());
        let root = env.root.clone();
        let data = s3.data_dir.join(BUCKET).join(PREFIX);
        let thread =
            thread::spawn(move || {
                while !s2.load(Ordering::SeqCst) {
                    let mut es = e2.lock().unwrap();
                    for (rel, bytes, gone) in es.iter_mut() {
                        if *gone {
                            continue;
                        }
                        if fs::symlink_metadata(root.join(&*rel)).is_err() {
                            *gone = true;
                            match fs::read(data.join(&*rel)) {
                                Ok(b) if b == *bytes => {}
                                Ok(_) => v2.lock().unwrap().push(format!(
                                    "{rel}: deleted locally while its object differs"
                                )),
                                Err(_) => v2.lock().unwrap().push(format!(
                                    "{rel}: deleted locally before its object existed"
                                )),
                            }
                        }
                    }
                    drop(es);
                    thread::sleep(Duration::from_millis(10));
                }
            });
        DeleteWatch {
            entries,
            violations,
            stop,
            thread: Some(thread),
        }
    }

    /// Register a file (after writing it).
    pub fn add(&self, rel: &str, bytes: &[u8]) {
        self.entries
            .lock()
            .unwrap()
            .push((rel.to_string(), bytes.to_vec(), false));
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    pub fn assert_clean(&self) {
        let v = self.violations();
        assert!(v.is_empty(), "local files deleted too early: {v:#?}");
    }

    pub fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.violations()
    }
}

impl Drop for DeleteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// status helpers

pub fn json_u64(v: &Value, field: &str) -> u64 {
    v.get(field)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("status field `{field}` missing or not a number: {v}"))
}

pub fn json_array<'a>(v: &'a Value, field: &str) -> &'a Vec<Value> {
    v.get(field)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("status field `{field}` missing or not an array: {v}"))
}

/// Find a `failed` entry whose reason contains `needle` (case-insensitive).
pub fn failed_with<'a>(status: &'a Value, needle: &str) -> Option<&'a Value> {
    let needle = needle.to_lowercase();
    json_array(status, "failed").iter().find(|f| {
        f.get("reason")
            .and_then(Value::as_str)
            .map(|r| r.to_lowercase().contains(&needle))
            .unwrap_or(false)
    })
}

/// Wait until a file at `rel` is in the bucket with these bytes.
pub fn write_and_wait(env: &TestEnv, s3: &S3Server, rel: &str, bytes: &[u8]) {
    write_file(&env.path(rel), bytes);
    wait_until(LONG, &format!("{rel} uploaded"), || {
        s3.object_bytes(rel).as_deref() == Some(bytes)
    });
}

// ---------------------------------------------------------------------------
// the HTTP listener (`http.listen`) and a minimal HTTP client

/// A second provider for configs made with [`TestEnv::config_yaml_http`].
#[derive(Clone, Debug)]
pub struct ExtraProvider {
    pub name: String,
    pub kind: String,
    pub endpoint: String,
    pub public_url: Option<String>,
    /// Extra `key: value` lines for the provider section.
    pub extra: Vec<String>,
}

/// The public URL base of [`ExtraProvider::second`].
pub const SECOND_PUBLIC_URL: &str = "https://cdn-b.example.test/media";

impl ExtraProvider {
    /// Provider `second` (kind minio) at `endpoint`, its public URL
    /// [`SECOND_PUBLIC_URL`].
    pub fn second(endpoint: String) -> ExtraProvider {
        ExtraProvider {
            name: "second".into(),
            kind: "minio".into(),
            endpoint,
            public_url: Some(SECOND_PUBLIC_URL.into()),
            extra: vec![],
        }
    }
}

impl TestEnv {
    /// [`TestEnv::config_yaml`] with `http.listen: 127.0.0.1:{port}` and the
    /// test provider's `public_url` replaced (`None` removes it).
    pub fn config_yaml_http(&self, c: &Cfg, port: u16, public_url: Option<&str>) -> String {
        let yaml = self.config_yaml(c);
        let listen_old = "http:\n  listen: \"\"\n";
        assert!(
            yaml.contains(listen_old),
            "harness config lost its http section"
        );
        let yaml = yaml.replace(listen_old, &format!("http:\n  listen: 127.0.0.1:{port}\n"));
        let url_old = format!("      public_url: {PUBLIC_URL}\n");
        assert!(
            yaml.contains(&url_old),
            "harness config lost its public_url"
        );
        let url_new = public_url
            .map(|u| format!("      public_url: {u}\n"))
            .unwrap_or_default();
        yaml.replace(&url_old, &url_new)
    }

    /// Add `p` as a second provider (same bucket, access key, secret file and
    /// prefix as the test provider); `active` picks the active one.
    pub fn with_provider(&self, yaml: &str, p: &ExtraProvider, active: &str) -> String {
        let anchor = format!("      prefix: {PREFIX}\n");
        assert!(
            yaml.contains(&anchor),
            "harness config lost its prefix line"
        );
        let mut section = format!(
            "    {}:\n      kind: {}\n      endpoint: {}\n      bucket: {BUCKET}\n      access_key_id: {ACCESS_KEY}\n      secret_access_key_file: {}\n      prefix: {PREFIX}\n",
            p.name,
            p.kind,
            p.endpoint,
            self.secret_file.display()
        );
        if let Some(u) = &p.public_url {
            section += &format!("      public_url: {u}\n");
        }
        for l in &p.extra {
            section += &format!("      {l}\n");
        }
        yaml.replacen(&anchor, &format!("{anchor}{section}"), 1)
            .replace(
                &format!("  active: {PROVIDER}\n"),
                &format!("  active: {active}\n"),
            )
    }
}

/// One HTTP response, as read by [`http_get`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `METHOD target` over HTTP/1.0 to 127.0.0.1:`port` (so the answer is never
/// chunked); `target` is sent byte for byte, so percent-encode it yourself.
pub fn http_request(port: u16, method: &str, target: &str) -> io::Result<HttpResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no end of headers in {buf:?}")))?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: buf[end + 4..].to_vec(),
    })
}

pub fn http_get(port: u16, target: &str) -> HttpResponse {
    http_request(port, "GET", target)
        .unwrap_or_else(|e| panic!("GET http://127.0.0.1:{port}{target}: {e}"))
}

/// GET an absolute `http://127.0.0.1:PORT/...` URL (as found in a Location).
pub fn http_get_url(url: &str) -> HttpResponse {
    let rest = url
        .strip_prefix("http://127.0.0.1:")
        .unwrap_or_else(|| panic!("not a http://127.0.0.1:PORT URL: {url}"));
    let (port, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let port = port.parse().unwrap_or_else(|_| panic!("bad port in {url}"));
    http_get(port, if path.is_empty() { "/" } else { path })
}

/// Wait until `GET /healthz` on `port` answers 200.
pub fn wait_http_ready(port: u16) {
    wait_until(LONG, &format!("offloadd /healthz on port {port}"), || {
        http_request(port, "GET", "/healthz").is_ok_and(|r| r.status == 200)
    });
}

/// The value of one series (e.g. `offloadd_uploads_total{result="success"}`)
/// in a Prometheus/OpenMetrics text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

/// `/usr/sbin/nginx` (or `nginx` on PATH); panics with how to install it.
pub fn nginx_path() -> PathBuf {
    let p = PathBuf::from("/usr/sbin/nginx");
    if p.is_file() {
        return p;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nginx");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("nginx not found at /usr/sbin/nginx nor on PATH: install the Debian package (apt-get install nginx) or run scripts/test.sh, which does")
}

/// A real nginx in the foreground with its prefix, pid, logs and temp paths
/// in its own temp dir. `http_body` is the inside of the `http { }` block.
pub struct Nginx {
    pub dir: TempDir,
    child: Option<Child>,
}

impl Nginx {
    pub fn start(http_body: &str, ports: &[u16]) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("offloadd-nginx-")
            .tempdir()
            .unwrap();
        let d = dir.path().display().to_string();
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
events {{ worker_connections 64; }}\n\
http {{\n  access_log {d}/access.log;\n\
  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
  types {{ text/plain txt; image/png png; }}\n\
{http_body}\n}}\n"
        );
        fs::write(dir.path().join("nginx.conf"), &conf).unwrap();
        let mut cmd = Command::new(nginx_path());
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("stderr.log")).unwrap());
        let child = cmd.spawn().expect("spawn nginx");
        let mut n = Nginx {
            dir,
            child: Some(child),
        };
        let ok = poll_until(Duration::from_secs(30), || {
            if let Some(st) = n.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nginx exited ({}):\n{}\n{}\nconfig:\n{conf}",
                    describe(&st),
                    n.log("stderr.log"),
                    n.log("error.log")
                );
            }
            ports
                .iter()
                .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
        });
        assert!(
            ok,
            "nginx did not listen on {ports:?}:\n{}",
            n.log("error.log")
        );
        n
    }

    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGQUIT: graceful stop of master and workers.
            send_signal(c.id(), libc::SIGQUIT);
            if wait_child(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if thread::panicking() {
            eprintln!(
                "---- nginx error.log ----\n{}\n---- access.log ----\n{}",
                self.log("error.log"),
                self.log("access.log")
            );
        }
    }
}

// ---------------------------------------------------------------------------
// added for test-connection, upload options and secrets

impl TestEnv {
    /// Like [`TestEnv::cli`], with extra environment variables for the child
    /// (set after the scrub, so `CREDENTIALS_DIRECTORY` and `OFFLOADD_*` pass).
    pub fn cli_env(&self, args: &[&str], extra_env: &[(&str, &str)]) -> (i32, String, String) {
        self.cli_os_env(&args.iter().map(OsStr::new).collect::<Vec<_>>(), extra_env)
    }
}

/// Insert provider lines (each indented 6 spaces, newline-terminated) into a
/// config rendered by [`TestEnv::config_yaml`], right after the prefix line.
pub fn with_provider_lines(yaml: &str, lines: &str) -> String {
    let anchor = format!("      prefix: {PREFIX}\n");
    assert!(yaml.contains(&anchor), "config has no prefix line: {yaml}");
    yaml.replacen(&anchor, &format!("{anchor}{lines}"), 1)
}

/// One request seen by [`FakeS3`].
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// An answer of [`FakeS3`]: status, extra headers, body.
pub type FakeAnswer = (u16, Vec<(String, String)>, String);

/// A tiny HTTP/1.1 responder on 127.0.0.1 for answers a real local server
/// cannot be made to give (S3 error XML for GET only, wrong region…). Each
/// connection gets one answer, then is closed.
pub struct FakeS3 {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<SeenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The XML error document S3 sends.
pub fn s3_error_xml(code: &str, message: &str, extra: &str) -> String {
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message>{extra}<RequestId>4442587FB7D0A2F9</RequestId><HostId>fake</HostId></Error>")
}

impl FakeS3 {
    pub fn start(answer: impl Fn(&SeenRequest) -> FakeAnswer + Send + Sync + 'static) -> FakeS3 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let answer = Arc::new(answer);
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let seen3 = seen2.clone();
                        let answer = answer.clone();
                        thread::spawn(move || {
                            let _ = FakeS3::serve(conn, &seen3, &*answer);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeS3 {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn serve(
        mut conn: TcpStream,
        seen: &Mutex<Vec<SeenRequest>>,
        answer: &dyn Fn(&SeenRequest) -> FakeAnswer,
    ) -> io::Result<()> {
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split_whitespace();
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end..].to_vec();
        while body.len() < len {
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        let req = SeenRequest {
            method,
            path,
            headers,
            body,
        };
        seen.lock().unwrap().push(req.clone());
        let (status, extra, body) = answer(&req);
        let mut resp = format!(
            "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            if status < 300 { "OK" } else { "Error" },
            if req.method == "HEAD" { 0 } else { body.len() }
        );
        if !body.is_empty() {
            resp += "Content-Type: application/xml\r\n";
        }
        for (k, v) in extra {
            resp += &format!("{k}: {v}\r\n");
        }
        resp += "\r\n";
        if req.method != "HEAD" {
            resp += &body;
        }
        conn.write_all(resp.as_bytes())?;
        conn.flush()?;
        let _ = conn.shutdown(Shutdown::Write);
        Ok(())
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeS3 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A real `moto_server` on 127.0.0.1 (accepts any key; keeps object
/// metadata such as storage class, cache-control and SSE).
pub struct MotoServer {
    pub port: u16,
    child: Child,
    _log_dir: TempDir,
}

impl MotoServer {
    pub fn start() -> MotoServer {
        let log_dir = tempfile::Builder::new()
            .prefix("offloadd-moto-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let log = fs::File::create(log_dir.path().join("moto.log")).unwrap();
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd
            .spawn()
            .expect("spawn moto_server (pip install 'moto[server]')");
        let mut m = MotoServer {
            port,
            child,
            _log_dir: log_dir,
        };
        wait_until(Duration::from_secs(60), "moto_server listening", || {
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!("moto_server exited: {st:?}");
            }
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        m
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `PUT /name`, unsigned (moto allows it).
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 200"),
            "create bucket {name}: {resp}"
        );
    }

    /// `PUT /bucket/key`, unsigned (moto allows it), as another tool would.
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{bucket}/{key} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "put {key}: {resp}");
    }

    /// HEAD of an object, signed with any key; None unless 200.
    pub fn head(&self, bucket: &str, key: &str) -> Option<s3::serde_types::HeadObjectResult> {
        match head_object(&self.endpoint(), "AKMOTO", "moto-secret", bucket, key) {
            Ok((h, 200)) => Some(h),
            _ => None,
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that `err` is test-connection's one sentence for a TLS handshake
/// with `endpoint` that failed, its cause starting with `cause`.
pub fn assert_tls_sentence(err: &str, endpoint: &str, cause: &str) {
    let err = err.trim();
    assert!(
        err.starts_with(&format!(
            "offloadd: the TLS connection to {endpoint} failed ({cause}"
        )) && err.ends_with(&format!(
            "); check that `endpoint` of provider `{PROVIDER}` speaks HTTPS with a certificate this machine trusts (system store, SSL_CERT_FILE, or `ca_file`)"
        )),
        "{err}"
    );
}
