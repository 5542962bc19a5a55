//! latproxy: a TCP proxy that adds a fixed one-way delay to every byte in each
//! direction of each connection, for offloadd's WAN benchmarks.
//!
//!   latproxy --listen 127.0.0.1:0 --upstream 127.0.0.1:9000 --delay-ms 10 [--stats FILE]
//!
//! Model: a link with `delay` one way and unlimited bandwidth.
//! * Connection setup pays one round trip, as a TCP handshake does: bytes the
//!   client sends are not delivered before accept + 2*delay (+ delay in flight),
//!   so a fresh connection's first request/response costs 4*delay, a request
//!   on a kept-alive connection 2*delay.
//! * Every chunk read from one side is written to the other side `delay` after
//!   it was read, in order; a reader never waits for a writer (each direction
//!   has its own reader and writer thread), so delays do not add up.
//! * EOF (half-close) is forwarded after the same delay.
//!
//! It also counts HTTP/1.1 requests per method on the client->server stream
//! (Content-Length and chunked bodies are skipped, not inspected) and, with
//! `--stats FILE`, rewrites FILE every 200 ms with a JSON object:
//! {"connections":N,"requests":{"PUT":N,...},"bytes_up":N,"bytes_down":N}.
//!
//! Only the standard library: no dependency to fetch, builds in seconds.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    active: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    requests: Mutex<BTreeMap<String, u64>>,
}

enum Msg {
    Data(Instant, Vec<u8>),
    Eof(Instant),
}

fn usage() -> ! {
    eprintln!("usage: latproxy --listen ADDR --upstream ADDR --delay-ms MS [--stats FILE]");
    std::process::exit(2);
}

fn main() {
    let mut listen = None;
    let mut upstream = None;
    let mut delay_ms: f64 = 0.0;
    let mut stats_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--listen" => listen = Some(val()),
            "--upstream" => upstream = Some(val()),
            "--delay-ms" => delay_ms = val().parse().unwrap_or_else(|_| usage()),
            "--stats" => stats_file = Some(val()),
            _ => usage(),
        }
    }
    let (Some(listen), Some(upstream)) = (listen, upstream) else { usage() };
    let delay = Duration::from_secs_f64(delay_ms / 1000.0);
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("latproxy: cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    // The harness reads this line to learn the port.
    println!("listening on {} delay_ms {}", listener.local_addr().unwrap(), delay_ms);
    let _ = std::io::stdout().flush();

    let stats = Arc::new(Stats::default());
    if let Some(path) = stats_file {
        let st = stats.clone();
        thread::spawn(move || loop {
            write_stats(&st, &path);
            thread::sleep(Duration::from_millis(200));
        });
    }
    for conn in listener.incoming() {
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("latproxy: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let accepted = Instant::now();
        let upstream = upstream.clone();
        let st = stats.clone();
        thread::spawn(move || {
            let server = match TcpStream::connect(&upstream) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("latproxy: connect {upstream}: {e}");
                    return;
                }
            };
            st.connections.fetch_add(1, Ordering::Relaxed);
            st.active.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            // Client -> server: not before the handshake round trip is over.
            let up_floor = accepted + 2 * delay;
            let a = pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), delay, Some(up_floor), st.clone(), true);
            let b = pipe(server, client, delay, None, st.clone(), false);
            for h in a.into_iter().chain(b) {
                let _ = h.join();
            }
            st.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Starts the reader and writer threads of one direction.
fn pipe(
    mut from: TcpStream,
    to: TcpStream,
    delay: Duration,
    floor: Option<Instant>,
    st: Arc<Stats>,
    upstream: bool,
) -> Vec<thread::JoinHandle<()>> {
    // Bounded by chunk count (<= 64 KiB each): 4096 chunks in flight is far
    // more than delay * loopback bandwidth needs for these workloads.
    let (tx, rx): (SyncSender<Msg>, Receiver<Msg>) = sync_channel(4096);
    let from_w = from.try_clone().unwrap();
    let reader = thread::spawn(move || {
        let mut counter = if upstream { Some(HttpCounter::default()) } else { None };
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = |now: Instant| match floor {
            Some(f) if f > now => f + delay,
            _ => now + delay,
        };
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Msg::Eof(deadline(Instant::now())));
                    break;
                }
                Ok(n) => {
                    let now = Instant::now();
                    if let Some(c) = counter.as_mut() {
                        c.feed(&buf[..n], &st);
                    }
                    if upstream {
                        st.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
                    } else {
                        st.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    if tx.send(Msg::Data(deadline(now), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let writer = thread::spawn(move || {
        let mut to = to;
        for msg in rx {
            let (at, data) = match msg {
                Msg::Data(at, d) => (at, Some(d)),
                Msg::Eof(at) => (at, None),
            };
            let now = Instant::now();
            if at > now {
                thread::sleep(at - now);
            }
            match data {
                Some(d) => {
                    if to.write_all(&d).is_err() {
                        // The receiving side is gone: tear the whole connection down.
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from_w.shutdown(Shutdown::Both);
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
    });
    vec![reader, writer]
}

/// Counts HTTP/1.x requests in a client->server byte stream.
#[derive(Default)]
struct HttpCounter {
    state: ParseState,
    head: Vec<u8>,
    line: Vec<u8>,
    broken: bool,
}

#[derive(Default)]
enum ParseState {
    #[default]
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailer,
}

impl HttpCounter {
    fn feed(&mut self, mut data: &[u8], st: &Stats) {
        while !data.is_empty() && !self.broken {
            match self.state {
                ParseState::Head => {
                    // Skip stray CRLF between requests.
                    if self.head.is_empty() && (data[0] == b'\r' || data[0] == b'\n') {
                        data = &data[1..];
                        continue;
                    }
                    let b = data[0];
                    data = &data[1..];
                    self.head.push(b);
                    if self.head.len() > 256 * 1024 {
                        self.broken = true;
                        return;
                    }
                    if self.head.ends_with(b"\r\n\r\n") {
                        self.finish_head(st);
                    }
                }
                ParseState::Body(left) => {
                    let n = (left as usize).min(data.len());
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 { ParseState::Head } else { ParseState::Body(left) };
                }
                ParseState::ChunkSize => {
                    let b = data[0];
                    data = &data[1..];
                    self.line.push(b);
                    if self.line.ends_with(b"\r\n") {
                        let text = String::from_utf8_lossy(&self.line);
                        let hex = text.trim().split(';').next().unwrap_or("").trim().to_string();
                        self.line.clear();
                        match u64::from_str_radix(&hex, 16) {
                            Ok(0) => self.state = ParseState::Trailer,
                            Ok(n) => self.state = ParseState::ChunkData(n),
                            Err(_) => self.broken = true,
                        }
                    } else if self.line.len() > 4096 {
                        self.broken = true;
                    }
                }
                ParseState::ChunkData(left) => {
                    let n = (left as usize).min(data.len());
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 { ParseState::ChunkDataEnd(2) } else { ParseState::ChunkData(left) };
                }
                ParseState::ChunkDataEnd(k) => {
                    data = &data[1..];
                    self.state = if k <= 1 { ParseState::ChunkSize } else { ParseState::ChunkDataEnd(k - 1) };
                }
                ParseState::Trailer => {
                    let b = data[0];
                    data = &data[1..];
                    self.line.push(b);
                    if self.line.ends_with(b"\r\n") {
                        let empty = self.line.len() == 2;
                        self.line.clear();
                        if empty {
                            self.state = ParseState::Head;
                        }
                    }
                }
            }
        }
    }

    fn finish_head(&mut self, st: &Stats) {
        let text = String::from_utf8_lossy(&self.head).into_owned();
        self.head.clear();
        let mut lines = text.split("\r\n");
        let method = lines.next().and_then(|l| l.split(' ').next()).unwrap_or("").to_string();
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            self.broken = true;
            return;
        }
        let (mut len, mut chunked) = (0u64, false);
        for l in lines {
            let Some((k, v)) = l.split_once(':') else { continue };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
        *st.requests.lock().unwrap().entry(method).or_insert(0) += 1;
        self.state = if chunked {
            ParseState::ChunkSize
        } else if len > 0 {
            ParseState::Body(len)
        } else {
            ParseState::Head
        };
    }
}

fn write_stats(st: &Stats, path: &str) {
    let reqs = st.requests.lock().unwrap().clone();
    let reqs: Vec<String> = reqs.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    let json = format!(
        "{{\"connections\":{},\"active\":{},\"requests\":{{{}}},\"bytes_up\":{},\"bytes_down\":{}}}\n",
        st.connections.load(Ordering::Relaxed),
        st.active.load(Ordering::Relaxed),
        reqs.join(","),
        st.bytes_up.load(Ordering::Relaxed),
        st.bytes_down.load(Ordering::Relaxed),
    );
    let tmp = format!("{path}.tmp");
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}
