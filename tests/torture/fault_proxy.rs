//! A fault-injecting HTTP/1.1 proxy between the daemon and a real S3 server.
//!
//! Each accepted connection carries exactly one exchange: the proxy reads the
//! request head and its `Content-Length` body, asks the test's rule what to
//! do with it, and either forwards it over a fresh upstream connection
//! (streaming the answer back) or injects a [`Fault`]. Every answer says
//! `Connection: close` and the connection is closed after it, so a client
//! never reuses a connection and every request is seen, counted and judged on
//! its own. Requests with `Transfer-Encoding` (chunked bodies) are not
//! supported: they are answered 501 and counted in [`Counts::unsupported`],
//! which the tests check is zero.
//!
//! Std threads only: one accept thread and one thread per connection.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// How long the proxy waits for a client's next bytes before giving up.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the proxy waits for the upstream's next bytes.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);

/// What to do to one request instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// HTTP 503 with an S3 `SlowDown` error document.
    Status503SlowDown,
    /// HTTP 429 (`TooManyRequests`, as R2 and GCS send it).
    Status429,
    /// HTTP 500 with an S3 `InternalError` error document.
    Status500,
    /// HTTP 403 with an S3 `RequestTimeTooSkewed` error document.
    ClockSkew,
    /// HTTP 200 with an S3 `InternalError` error document, as S3 may answer
    /// CompleteMultipartUpload once it has started its answer.
    Status200Error,
    /// Read about half the body, then close with SO_LINGER 0: the client sees
    /// a connection reset while sending.
    ResetMidBody,
    /// Read the whole request, never answer; the socket stays open until the
    /// proxy is dropped.
    Hang,
    /// Close as soon as the request head is read, without an answer (SO_LINGER
    /// 0). [`FaultProxy::set_down`] refuses even earlier: right after accept,
    /// before reading anything.
    Refuse,
}

impl Fault {
    /// Status, reason phrase, S3 error code and message of the answering faults.
    pub fn answer(self) -> Option<(u16, &'static str, &'static str, &'static str)> {
        match self {
            Fault::Status503SlowDown => Some((
                503,
                "Slow Down",
                "SlowDown",
                "Please reduce your request rate.",
            )),
            Fault::Status429 => Some((
                429,
                "Too Many Requests",
                "TooManyRequests",
                "Rate limit exceeded, please reduce your request rate.",
            )),
            Fault::Status500 => Some((
                500,
                "Internal Server Error",
                "InternalError",
                "We encountered an internal error. Please try again.",
            )),
            Fault::ClockSkew => Some((
                403,
                "Forbidden",
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            )),
            Fault::Status200Error => Some((
                200,
                "OK",
                "InternalError",
                "We encountered an internal error. Please try again.",
            )),
            Fault::ResetMidBody | Fault::Hang | Fault::Refuse => None,
        }
    }
}

/// The request as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target: path and query, as sent (percent-encoded).
    pub path: String,
    /// Header names as sent; values trimmed.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, 0 when absent.
    pub fn content_length(&self) -> u64 {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn is_put(&self) -> bool {
        self.method == "PUT"
    }

    /// The query string, if any.
    pub fn query(&self) -> &str {
        self.path.split_once('?').map(|(_, q)| q).unwrap_or("")
    }

    /// Whether the query has this parameter (`uploadId`, `partNumber`, `uploads`…).
    pub fn has_param(&self, name: &str) -> bool {
        self.query()
            .split('&')
            .any(|p| p.split('=').next() == Some(name))
    }

    /// A PUT of one part of a multipart upload.
    pub fn is_part(&self) -> bool {
        self.is_put() && self.has_param("partNumber")
    }

    /// A PUT of a whole object (not a part); the daemon's health probe too.
    pub fn is_object_put(&self) -> bool {
        self.is_put() && !self.has_param("partNumber") && !self.has_param("uploadId")
    }

    /// The daemon's health probe (a zero-byte PUT of `{prefix}/.offloadd-health`).
    pub fn is_probe(&self) -> bool {
        self.path.contains(".offloadd-health")
    }

    fn parse(head: &[u8]) -> Option<RequestHead> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_string();
        let path = first.next()?.to_string();
        let version = first.next()?;
        if method.is_empty() || !path.starts_with('/') || !version.starts_with("HTTP/1.") {
            return None;
        }
        let mut headers = Vec::new();
        for l in lines.filter(|l| !l.is_empty()) {
            let (k, v) = l.split_once(':')?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        Some(RequestHead {
            method,
            path,
            headers,
        })
    }

    /// The head sent upstream: the same request line and headers, hop-by-hop
    /// connection headers replaced by `Connection: close` (never signed).
    fn forwarded(&self) -> Vec<u8> {
        let mut s = format!("{} {} HTTP/1.1\r\n", self.method, self.path);
        for (k, v) in &self.headers {
            let lower = k.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "connection" | "keep-alive" | "proxy-connection"
            ) {
                continue;
            }
            s += &format!("{k}: {v}\r\n");
        }
        s += "Connection: close\r\n\r\n";
        s.into_bytes()
    }
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Empty for connections refused at accept ([`FaultProxy::set_down`]).
    pub method: String,
    pub path: String,
    /// The fault injected, or `None` when forwarded.
    pub fault: Option<Fault>,
    /// The status the client got (upstream's or the injected one), if any.
    pub status: Option<u16>,
    /// `Content-Length` of the request.
    pub body_len: u64,
    /// Body bytes the proxy read from the client.
    pub body_read: u64,
}

/// What the proxy has counted since the last [`FaultProxy::reset`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections accepted.
    pub connections: usize,
    /// Requests seen: heads parsed, plus connections refused at accept.
    pub requests: usize,
    /// Requests sent on to the upstream.
    pub forwarded: usize,
    /// Requests that got a fault, by kind.
    pub faults: BTreeMap<Fault, usize>,
    /// Requests the proxy cannot handle (Transfer-Encoding, bad heads).
    pub unsupported: usize,
}

impl Counts {
    pub fn injected(&self, f: Fault) -> usize {
        self.faults.get(&f).copied().unwrap_or(0)
    }
}

/// The rule: which fault, if any, a request gets.
pub type Rule = Arc<dyn Fn(&RequestHead) -> Option<Fault> + Send + Sync>;

struct Inner {
    upstream: SocketAddr,
    rule: Mutex<Option<Rule>>,
    down: AtomicBool,
    stop: AtomicBool,
    state: Mutex<State>,
    /// Client sockets still open, by connection id; shut down on drop (hung
    /// ones stay here until then).
    open: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    counts: Counts,
    log: Vec<Seen>,
    /// Bumped by every reset, so a late status update never lands in a new log.
    generation: u64,
}

/// See the module docs.
pub struct FaultProxy {
    pub port: u16,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) in front of `upstream`; forwards
    /// everything until a rule says otherwise.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().unwrap().port();
        let inner = Arc::new(Inner {
            upstream,
            rule: Mutex::new(None),
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let i2 = inner.clone();
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if i2.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                i2.state.lock().unwrap().counts.connections += 1;
                if i2.down.load(Ordering::SeqCst) {
                    // An outage: accepted and closed at once, nothing read.
                    i2.note(Seen {
                        method: String::new(),
                        path: String::new(),
                        fault: Some(Fault::Refuse),
                        status: None,
                        body_len: 0,
                        body_read: 0,
                    });
                    linger_zero(&conn);
                    drop(conn);
                    continue;
                }
                let id = i2.next_id.fetch_add(1, Ordering::SeqCst);
                if let Ok(c) = conn.try_clone() {
                    i2.open.lock().unwrap().insert(id, c);
                }
                let i3 = i2.clone();
                thread::spawn(move || {
                    let keep = i3.serve(conn).unwrap_or(false);
                    if !keep {
                        i3.open.lock().unwrap().remove(&id);
                    }
                });
            }
        });
        FaultProxy {
            port,
            inner,
            accept: Some(accept),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sets the rule, effective for every request whose head arrives from now on.
    pub fn set_rule(&self, rule: impl Fn(&RequestHead) -> Option<Fault> + Send + Sync + 'static) {
        *self.inner.rule.lock().unwrap() = Some(Arc::new(rule));
    }

    /// Forward everything again.
    pub fn clear_rule(&self) {
        *self.inner.rule.lock().unwrap() = None;
    }

    /// An outage: while down, every connection is closed right after accept,
    /// before a byte is read (counted as a request with [`Fault::Refuse`]).
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    pub fn counts(&self) -> Counts {
        self.inner.state.lock().unwrap().counts.clone()
    }

    /// Requests seen since the last reset.
    pub fn requests(&self) -> usize {
        self.counts().requests
    }

    pub fn forwarded(&self) -> usize {
        self.counts().forwarded
    }

    pub fn injected(&self, f: Fault) -> usize {
        self.counts().injected(f)
    }

    /// Every request seen since the last reset, in arrival order.
    pub fn log(&self) -> Vec<Seen> {
        self.inner.state.lock().unwrap().log.clone()
    }

    /// Zeroes the counters and empties the log.
    pub fn reset(&self) {
        let mut st = self.inner.state.lock().unwrap();
        st.counts = Counts::default();
        st.log.clear();
        st.generation += 1;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, c) in self.inner.open.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Makes the next close send a RST instead of a FIN.
fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Reads until the end of an HTTP head; returns (head, bytes read past it), or
/// None at EOF before a head.
fn read_head(s: &mut TcpStream) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::other("request head too large"));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a head",
                ))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads (and drops, or passes to `sink`) body bytes until `total` have
/// been consumed, counting `already` bytes that came with the head; `done`
/// counts the bytes read, also when it fails (the client went away).
fn pump_body(
    client: &mut TcpStream,
    already: &[u8],
    total: u64,
    mut sink: Option<&mut TcpStream>,
    done: &mut u64,
) -> io::Result<()> {
    let first = &already[..already.len().min(total as usize)];
    *done = first.len() as u64;
    if let Some(s) = sink.as_deref_mut() {
        s.write_all(first)?;
    }
    let mut chunk = vec![0u8; 64 * 1024];
    while *done < total {
        let want = ((total - *done) as usize).min(chunk.len());
        let n = client.read(&mut chunk[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed inside the body",
            ));
        }
        *done += n as u64;
        if let Some(s) = sink.as_deref_mut() {
            s.write_all(&chunk[..n])?;
        }
    }
    Ok(())
}

/// The XML error document S3 sends.
pub fn error_document(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>FAULTPROXY0001</RequestId><HostId>fault-proxy</HostId></Error>"
    )
}

impl Inner {
    /// Records a request; returns its index in the log and the generation.
    fn note(&self, seen: Seen) -> (usize, u64) {
        let mut st = self.state.lock().unwrap();
        st.counts.requests += 1;
        match seen.fault {
            Some(f) => *st.counts.faults.entry(f).or_insert(0) += 1,
            None => st.counts.forwarded += 1,
        }
        st.log.push(seen);
        (st.log.len() - 1, st.generation)
    }

    fn update(&self, at: (usize, u64), f: impl FnOnce(&mut Seen)) {
        let mut st = self.state.lock().unwrap();
        if st.generation == at.1 {
            if let Some(s) = st.log.get_mut(at.0) {
                f(s);
            }
        }
    }

    /// [`pump_body`], noting the bytes read in the log.
    fn body(
        &self,
        at: (usize, u64),
        client: &mut TcpStream,
        already: &[u8],
        total: u64,
        sink: Option<&mut TcpStream>,
    ) -> io::Result<()> {
        let mut done = 0;
        let r = pump_body(client, already, total, sink, &mut done);
        self.update(at, |s| s.body_read = done);
        r
    }

    /// Serves one connection; true if the socket must stay open (hung).
    fn serve(&self, mut client: TcpStream) -> io::Result<bool> {
        client.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        client.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        let _ = client.set_nodelay(true);
        let Some((raw, rest)) = read_head(&mut client)? else {
            return Ok(false);
        };
        let Some(head) = RequestHead::parse(&raw) else {
            self.state.lock().unwrap().counts.unsupported += 1;
            answer(&mut client, "GET", 400, "Bad Request", "")?;
            return Ok(false);
        };
        if head.header("transfer-encoding").is_some() {
            self.state.lock().unwrap().counts.unsupported += 1;
            answer(&mut client, &head.method, 501, "Not Implemented", "")?;
            return Ok(false);
        }
        let rule = self.rule.lock().unwrap().clone();
        let fault = rule.and_then(|r| r(&head));
        let len = head.content_length();
        let at = self.note(Seen {
            method: head.method.clone(),
            path: head.path.clone(),
            fault,
            status: None,
            body_len: len,
            body_read: 0,
        });
        match fault {
            None => self.forward(&head, client, &rest, at),
            Some(Fault::Refuse) => {
                linger_zero(&client);
                Ok(false)
            }
            Some(Fault::ResetMidBody) => {
                let _ = self.body(at, &mut client, &rest, len / 2, None);
                linger_zero(&client);
                Ok(false)
            }
            Some(Fault::Hang) => {
                self.body(at, &mut client, &rest, len, None)?;
                Ok(true)
            }
            Some(f) => {
                self.body(at, &mut client, &rest, len, None)?;
                let (status, phrase, code, message) = f.answer().expect("an answering fault");
                self.update(at, |s| s.status = Some(status));
                answer(
                    &mut client,
                    &head.method,
                    status,
                    phrase,
                    &error_document(code, message),
                )?;
                Ok(false)
            }
        }
    }

    fn forward(
        &self,
        head: &RequestHead,
        mut client: TcpStream,
        rest: &[u8],
        at: (usize, u64),
    ) -> io::Result<bool> {
        let mut up = match TcpStream::connect_timeout(&self.upstream, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => {
                // The upstream itself is down: the client sees a 502.
                self.update(at, |s| s.status = Some(502));
                answer(&mut client, &head.method, 502, "Bad Gateway", "")?;
                return Err(e);
            }
        };
        up.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
        up.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
        let _ = up.set_nodelay(true);
        up.write_all(&head.forwarded())?;
        self.body(at, &mut client, rest, head.content_length(), Some(&mut up))?;
        up.flush()?;
        // The answer: its head with `Connection: close`, then every byte up to
        // the upstream's close (it closes: we asked it to).
        let Some((raw, body_start)) = read_head(&mut up)? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed without an answer",
            ));
        };
        let text = String::from_utf8_lossy(&raw).into_owned();
        let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok());
        self.update(at, |s| s.status = status);
        let mut out = format!("{status_line}\r\n");
        for l in lines {
            let name = l.split(':').next().unwrap_or("").trim();
            if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
            out += l;
            out += "\r\n";
        }
        out += "Connection: close\r\n\r\n";
        client.write_all(out.as_bytes())?;
        client.write_all(&body_start)?;
        io::copy(&mut up, &mut client)?;
        client.flush()?;
        close_after_answer(&mut client);
        Ok(false)
    }
}

/// Writes one answer with `Connection: close` and half-closes.
fn answer(
    client: &mut TcpStream,
    method: &str,
    status: u16,
    phrase: &str,
    body: &str,
) -> io::Result<()> {
    let mut resp = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nx-amz-request-id: FAULTPROXY0001\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        resp += body;
    }
    client.write_all(resp.as_bytes())?;
    client.flush()?;
    close_after_answer(client);
    Ok(())
}

/// Half-closes after an answer, then reads what the client may still send
/// (a pipelined request) until it closes, so the close is a FIN: a RST could
/// make the client lose the answer it has not read yet.
fn close_after_answer(client: &mut TcpStream) {
    let _ = client.shutdown(Shutdown::Write);
    let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 16 * 1024];
    while let Ok(n) = client.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

// ---------------------------------------------------------------------------
// the proxy's own tests: the daemon tests are only as good as these

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::*;
    use std::time::Instant;

    /// One raw HTTP/1.1 exchange: writes `request` (head and body), reads to
    /// EOF; Ok(bytes) or the socket error the client saw.
    fn raw_exchange(port: u16, request: &[u8]) -> io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(request)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    }

    fn put_request(port: u16, path: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn status_of(resp: &[u8]) -> u16 {
        let text = String::from_utf8_lossy(resp);
        text.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {text:?}"))
    }

    fn bucket_via(endpoint: &str, secret: &str) -> Box<s3::Bucket> {
        let region = s3::Region::Custom {
            region: "us-east-1".into(),
            endpoint: endpoint.to_string(),
        };
        let creds =
            s3::creds::Credentials::new(Some(ACCESS_KEY), Some(secret), None, None, None).unwrap();
        s3::Bucket::new(BUCKET, region, creds)
            .unwrap()
            .with_path_style()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn request_heads_parse() {
        let h = RequestHead::parse(
            b"PUT /media/a/b.jpg?partNumber=2&uploadId=xyz HTTP/1.1\r\nHost: h\r\ncontent-length:  42 \r\nConnection: keep-alive\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.method, "PUT");
        assert_eq!(h.path, "/media/a/b.jpg?partNumber=2&uploadId=xyz");
        assert_eq!(h.content_length(), 42);
        assert_eq!(h.header("CONTENT-LENGTH"), Some("42"));
        assert!(h.is_part() && !h.is_object_put());
        assert!(h.has_param("uploadId") && !h.has_param("upload"));
        let fwd = String::from_utf8(h.forwarded()).unwrap();
        assert!(fwd.starts_with("PUT /media/a/b.jpg?partNumber=2&uploadId=xyz HTTP/1.1\r\n"));
        assert!(fwd.contains("Host: h\r\n") && fwd.contains("content-length: 42\r\n"));
        assert!(!fwd.contains("keep-alive"), "{fwd}");
        assert!(fwd.ends_with("Connection: close\r\n\r\n"), "{fwd}");
        let p =
            RequestHead::parse(b"PUT /media/magicads/.offloadd-health HTTP/1.1\r\n\r\n").unwrap();
        assert!(p.is_object_put() && p.is_probe() && p.content_length() == 0);
        let init = RequestHead::parse(b"POST /media/k?uploads HTTP/1.1\r\n\r\n").unwrap();
        assert!(init.has_param("uploads") && !init.is_put());
        assert!(RequestHead::parse(b"garbage\r\n\r\n").is_none());
    }

    /// Forwarding is transparent to a real signed client (rust-s3, as the
    /// daemon uses it) and a real server that checks signatures (s3s-fs):
    /// PUT, GET, HEAD, a multipart upload, LIST and DELETE all work, each on
    /// its own connection, and the counters add up.
    #[test]
    fn forwards_signed_requests_to_a_real_server() {
        let secret = format!("SECRET-{}", random_hex(8));
        let s3 = S3Server::start_s3s_fs(ACCESS_KEY, &secret);
        s3.create_bucket(BUCKET);
        let proxy = FaultProxy::start(s3.addr());
        let bucket = bucket_via(&proxy.endpoint(), &secret);
        let small = random_bytes(300_000);
        let part1 = random_bytes(5 * 1024 * 1024);
        let part2 = random_bytes(1234);
        runtime().block_on(async {
            let r = bucket.put_object("p/small.bin", &small).await.unwrap();
            assert_eq!(r.status_code(), 200);
            let got = bucket.get_object("p/small.bin").await.unwrap();
            assert_eq!(got.status_code(), 200);
            assert!(
                got.to_vec() == small,
                "GET through the proxy returns the bytes"
            );
            let (h, code) = bucket.head_object("p/small.bin").await.unwrap();
            assert_eq!(code, 200);
            assert_eq!(h.content_length, Some(small.len() as i64));

            let up = bucket
                .initiate_multipart_upload("p/multi.bin", "application/octet-stream")
                .await
                .unwrap();
            let a = bucket
                .put_multipart_chunk(
                    part1.clone(),
                    "p/multi.bin",
                    1,
                    &up.upload_id,
                    "application/octet-stream",
                )
                .await
                .unwrap();
            let b = bucket
                .put_multipart_chunk(
                    part2.clone(),
                    "p/multi.bin",
                    2,
                    &up.upload_id,
                    "application/octet-stream",
                )
                .await
                .unwrap();
            bucket
                .complete_multipart_upload("p/multi.bin", &up.upload_id, vec![a, b])
                .await
                .unwrap();
            let listed = bucket.list("p/".into(), None).await.unwrap();
            let keys: Vec<String> = listed
                .iter()
                .flat_map(|p| p.contents.iter().map(|o| o.key.clone()))
                .collect();
            assert_eq!(
                keys,
                vec!["p/multi.bin".to_string(), "p/small.bin".to_string()]
            );
            bucket.delete_object("p/small.bin").await.unwrap();
        });
        let mut whole = part1.clone();
        whole.extend_from_slice(&part2);
        assert!(
            std::fs::read(s3.object_path(BUCKET, "p/multi.bin")).unwrap() == whole,
            "the multipart object has the bytes of its parts"
        );
        assert!(
            !s3.object_path(BUCKET, "p/small.bin").exists(),
            "DELETE went through"
        );
        let c = proxy.counts();
        // PUT, GET, HEAD, initiate, 2 parts, complete, LIST, DELETE.
        assert_eq!(c.requests, 9, "{c:?}\n{:#?}", proxy.log());
        assert_eq!(c.forwarded, 9, "{c:?}");
        assert_eq!(c.connections, 9, "one connection per request: {c:?}");
        assert!(c.faults.is_empty() && c.unsupported == 0, "{c:?}");
        let log = proxy.log();
        assert!(
            log.iter()
                .all(|s| s.status.is_some_and(|st| (200..300).contains(&st))),
            "{log:#?}"
        );
        assert!(log.iter().all(|s| s.body_read == s.body_len), "{log:#?}");
        assert_eq!(
            log.iter()
                .filter(|s| s.method == "PUT" && s.path.contains("partNumber="))
                .count(),
            2
        );
        proxy.reset();
        assert_eq!(proxy.counts(), Counts::default());
        assert!(proxy.log().is_empty());
    }

    /// Each answering fault gives its status and S3 error code, with
    /// `Connection: close`, after reading the whole body; nothing reaches the
    /// upstream; HEAD gets no body.
    #[test]
    fn answering_faults_look_like_s3_errors() {
        let upstream = FakeS3::start(|_| (200, vec![], String::new()));
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], upstream.port)));
        for f in [
            Fault::Status503SlowDown,
            Fault::Status429,
            Fault::Status500,
            Fault::ClockSkew,
            Fault::Status200Error,
        ] {
            proxy.set_rule(move |_| Some(f));
            let (status, _, code, _) = f.answer().unwrap();
            let body = random_bytes(200_000);
            let resp =
                raw_exchange(proxy.port, &put_request(proxy.port, "/media/x", &body)).unwrap();
            assert_eq!(status_of(&resp), status, "{f:?}");
            let text = String::from_utf8_lossy(&resp).into_owned();
            assert!(text.contains("Connection: close\r\n"), "{text}");
            assert!(
                text.contains(&format!("<Error><Code>{code}</Code>")),
                "{text}"
            );
            let head =
                raw_exchange(proxy.port, b"HEAD /media/x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let text = String::from_utf8_lossy(&head).into_owned();
            assert_eq!(status_of(&head), status);
            assert!(
                text.ends_with("\r\n\r\n"),
                "HEAD answer without a body: {text:?}"
            );
            assert_eq!(proxy.injected(f), 2, "{f:?}: {:?}", proxy.counts());
            let log = proxy.log();
            let put = log.iter().rev().find(|s| s.method == "PUT").unwrap();
            assert_eq!(
                (put.body_read, put.status),
                (body.len() as u64, Some(status))
            );
        }
        assert!(
            upstream.seen().is_empty(),
            "a fault never reaches the upstream"
        );
        let c = proxy.counts();
        assert_eq!(
            (c.requests, c.forwarded, c.connections),
            (10, 0, 10),
            "{c:?}"
        );
        proxy.clear_rule();
        let resp =
            raw_exchange(proxy.port, &put_request(proxy.port, "/media/y", b"hello")).unwrap();
        assert_eq!(status_of(&resp), 200);
        assert_eq!(upstream.seen().len(), 1);
        assert_eq!(upstream.seen()[0].body, b"hello");
        assert_eq!(proxy.forwarded(), 1);
    }

    /// rust-s3 (the daemon's client) reads the injected answers as S3 errors
    /// with their codes.
    #[test]
    fn rust_s3_sees_the_injected_error_codes() {
        let upstream = FakeS3::start(|_| (200, vec![], String::new()));
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], upstream.port)));
        let bucket = bucket_via(&proxy.endpoint(), "SECRET-any");
        let rt = runtime();
        for f in [
            Fault::Status503SlowDown,
            Fault::Status429,
            Fault::Status500,
            Fault::ClockSkew,
        ] {
            proxy.set_rule(move |r| r.is_put().then_some(f));
            let (status, _, code, _) = f.answer().unwrap();
            match rt.block_on(bucket.put_object("k/file.jpg", b"some bytes")) {
                Err(s3::error::S3Error::HttpFailWithBody(st, body)) => {
                    assert_eq!(st, status, "{f:?}");
                    assert!(body.contains(&format!("<Code>{code}</Code>")), "{body}");
                }
                other => panic!(
                    "{f:?}: expected an HTTP error, got {:?}",
                    other.map(|r| r.status_code())
                ),
            }
            // rust-s3 may retry on its own (its global default is 1 retry).
            assert!(proxy.injected(f) >= 1, "{f:?}: {:?}", proxy.counts());
        }
        assert!(upstream.seen().is_empty());
        assert_eq!(proxy.counts().unsupported, 0);
    }

    /// ResetMidBody reads about half the body, then the client gets a reset
    /// (on write or read), never an answer.
    #[test]
    fn reset_mid_body_resets_the_client() {
        let upstream = FakeS3::start(|_| (200, vec![], String::new()));
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], upstream.port)));
        proxy.set_rule(|r| r.is_put().then_some(Fault::ResetMidBody));
        let len = 4 * 1024 * 1024;
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "PUT /media/big HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n"
        )
        .unwrap();
        let body = random_bytes(len);
        let mut err = None;
        for c in body.chunks(64 * 1024) {
            if let Err(e) = s.write_all(c) {
                err = Some(e);
                break;
            }
        }
        if err.is_none() {
            let mut out = Vec::new();
            match s.read_to_end(&mut out) {
                Ok(_) => panic!(
                    "expected a reset, got an answer: {:?}",
                    String::from_utf8_lossy(&out)
                ),
                Err(e) => err = Some(e),
            }
        }
        let e = err.unwrap();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "expected a reset, got {e:?}"
        );
        let log = proxy.log();
        assert_eq!(log.len(), 1);
        let half = len as u64 / 2;
        assert!(
            log[0].body_read >= half && log[0].body_read < half + 64 * 1024,
            "{log:?}"
        );
        assert_eq!(log[0].status, None);
        assert_eq!(proxy.injected(Fault::ResetMidBody), 1);
        assert!(upstream.seen().is_empty());
    }

    /// Hang reads the request and never answers, keeping the socket open until
    /// the proxy is dropped; Refuse and an outage close without an answer.
    #[test]
    fn hang_refuse_and_outage() {
        let upstream = FakeS3::start(|_| (200, vec![], String::new()));
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], upstream.port)));
        proxy.set_rule(|r| match r.path.as_str() {
            "/hang" => Some(Fault::Hang),
            "/refuse" => Some(Fault::Refuse),
            _ => None,
        });
        let mut hung = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        hung.write_all(&put_request(proxy.port, "/hang", b"0123456789"))
            .unwrap();
        hung.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut buf = [0u8; 64];
        let e = hung
            .read(&mut buf)
            .expect_err("a hung request gets no answer");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e:?}"
        );

        // Other requests go on meanwhile.
        let ok = raw_exchange(proxy.port, &put_request(proxy.port, "/fine", b"x")).unwrap();
        assert_eq!(status_of(&ok), 200);
        match raw_exchange(proxy.port, &put_request(proxy.port, "/refuse", b"abc")) {
            Ok(b) => assert!(
                b.is_empty(),
                "refused: no answer, got {:?}",
                String::from_utf8_lossy(&b)
            ),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e:?}"),
        }
        proxy.set_down(true);
        for _ in 0..3 {
            match raw_exchange(proxy.port, &put_request(proxy.port, "/fine", b"abc")) {
                Ok(b) => assert!(
                    b.is_empty(),
                    "down: no answer, got {:?}",
                    String::from_utf8_lossy(&b)
                ),
                Err(e) => assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ),
                    "{e:?}"
                ),
            }
        }
        proxy.set_down(false);
        let c = proxy.counts();
        assert_eq!(c.injected(Fault::Hang), 1, "{c:?}");
        assert_eq!(c.injected(Fault::Refuse), 4, "{c:?}");
        assert_eq!((c.requests, c.forwarded, c.connections), (6, 1, 6), "{c:?}");
        assert_eq!(upstream.seen().len(), 1, "only /fine was forwarded");

        // Still hung a while later; released when the proxy goes.
        let e = hung.read(&mut buf).expect_err("still no answer");
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e:?}"
        );
        let t = Instant::now();
        drop(proxy);
        hung.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        match hung.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("a hung request got {n} bytes"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    /// One exchange per connection: a second request pipelined on the same
    /// connection is not served; the answer says `Connection: close`.
    #[test]
    fn one_exchange_per_connection() {
        let upstream = FakeS3::start(|_| {
            (
                200,
                vec![("Connection".into(), "keep-alive".into())],
                "ok".into(),
            )
        });
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], upstream.port)));
        let mut two = put_request(proxy.port, "/one", b"first");
        two.extend(put_request(proxy.port, "/two", b"second"));
        let resp = raw_exchange(proxy.port, &two).unwrap();
        let text = String::from_utf8_lossy(&resp).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
        assert!(
            text.contains("Connection: close\r\n") && !text.contains("keep-alive"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\nok"), "{text}");
        let seen = upstream.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].path, "/one");
        assert_eq!(seen[0].body, b"first");
        assert!(
            seen[0]
                .headers
                .iter()
                .any(|(k, v)| k == "connection" && v == "close"),
            "{:?}",
            seen[0].headers
        );
        assert_eq!(proxy.counts().requests, 1);
    }
}
