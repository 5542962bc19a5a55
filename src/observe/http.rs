//! The TCP listener (`http.listen`): `GET /healthz`, `GET /metrics` and
//! `GET /r/{relative path}`.
//!
//! Read-only: nothing here changes state. Other methods get 405, other paths
//! 404. `/r/` percent-decodes the path, refuses empty, `.` and `..` segments
//! and non-UTF-8 names (404), and answers 302 to whatever the [`Resolver`]
//! returns, else 404, or 503 when the location records cannot be read (a
//! guess then could send a recorded file to a missing object). Stops
//! accepting and drains open requests at shutdown.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] open at once, each closed when it
//! sends no request head for [`HEADER_READ_TIMEOUT`].

use crate::observe::metrics::{Metrics, CONTENT_TYPE};
use crate::shutdown::Shutdown;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Maps a path relative to the watch root to the public URL to redirect to;
/// an error when the location records cannot be read.
pub type Resolver = Arc<dyn Fn(&str) -> Result<Option<String>, String> + Send + Sync>;

/// What the handlers need.
#[derive(Clone)]
pub struct App {
    pub metrics: Metrics,
    pub resolve: Resolver,
}

/// The routes, without a listener (used by [`serve`] and the unit tests).
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/r/{*path}", get(redirect))
        .with_state(app)
}

/// At most this many connections are open at once; more wait in the
/// kernel's backlog. A file descriptor per connection: without a cap, idle
/// connections (anyone on the host can open them) would take the descriptors
/// the uploads need for their files and sockets.
const MAX_CONNECTIONS: usize = 256;

/// A connection that has not sent a whole request head this long after it
/// opened, or after its last response, is closed: an idle or slow client
/// cannot hold one of the [`MAX_CONNECTIONS`] for ever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long requests in progress are given at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// After an accept error (out of descriptors, say), the pause before the
/// next accept, so that the loop does not spin while the error lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves until shutdown, then drains open requests (for up to [`DRAIN`]);
/// every connection's task is joined.
pub async fn serve(listener: tokio::net::TcpListener, app: App, shutdown: Shutdown) {
    serve_with(listener, app, shutdown, MAX_CONNECTIONS).await
}

async fn serve_with(
    listener: tokio::net::TcpListener,
    app: App,
    mut shutdown: Shutdown,
    max_connections: usize,
) {
    let service = TowerToHyperService::new(router(app));
    let slots = Arc::new(Semaphore::new(max_connections));
    let (closing, closed) = watch::channel(());
    let mut conns = JoinSet::new();
    let mut told = false;
    loop {
        while conns.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = shutdown.recv() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if !told {
                        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                        tracing::warn!("the HTTP listener on {addr} (http.listen) cannot accept connections: {e}; it tries again");
                        told = true;
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = shutdown.recv() => break,
        };
        told = false;
        conns.spawn(serve_connection(
            stream,
            service.clone(),
            closed.clone(),
            slot,
        ));
    }
    drop(listener);
    drop(closing);
    if tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        conns.shutdown().await;
    }
}

/// One connection, HTTP/1.1 only, until the client closes it, it times out
/// ([`HEADER_READ_TIMEOUT`]), or shutdown (the request in progress is
/// answered first). Holds its `slot` of [`MAX_CONNECTIONS`] throughout.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    service: TowerToHyperService<Router>,
    mut closed: watch::Receiver<()>,
    _slot: OwnedSemaphorePermit,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = closed.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(app): State<App>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], app.metrics.encode()).into_response()
}

async fn redirect(State(app): State<App>, uri: Uri) -> Response {
    let raw = uri.path().strip_prefix("/r/").unwrap_or("");
    let Some(rel) = decode_rel(raw) else {
        return not_found();
    };
    match (app.resolve)(&rel) {
        // The resolver percent-encodes; encode anything left that a header
        // cannot carry (spaces, controls, non-ASCII) rather than fail.
        Ok(Some(url)) => match header::HeaderValue::from_str(
            &percent_encoding::utf8_percent_encode(&url, &HEADER_UNSAFE).to_string(),
        ) {
            Ok(loc) => (StatusCode::FOUND, [(header::LOCATION, loc)]).into_response(),
            Err(_) => not_found(),
        },
        Ok(None) => not_found(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "offloadd cannot read its location records right now; try again later\n",
        )
            .into_response(),
    }
}

const HEADER_UNSAFE: percent_encoding::AsciiSet = percent_encoding::CONTROLS.add(b' ');

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// The relative path from the raw (still percent-encoded) request path, or
/// None when a segment is empty, `.` or `..` (before or after decoding) or
/// the name is not UTF-8.
fn decode_rel(raw: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?
        .into_owned();
    let bad = |s: &str| {
        s.split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
    };
    if raw.is_empty() || bad(raw) || bad(&decoded) {
        return None;
    }
    Some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn decode_rel_decodes_and_refuses_dot_segments() {
        assert_eq!(
            decode_rel("a/b%20c%C3%A9.png").as_deref(),
            Some("a/b cé.png")
        );
        assert_eq!(decode_rel("a+b%2B%25.txt").as_deref(), Some("a+b+%.txt"));
        for bad in [
            "",
            "../x",
            "a/../b",
            "a/%2e%2E/b",
            "%2E%2E",
            "./a",
            "a//b",
            "a/",
            "%FF.bin",
            "a%00b",
        ] {
            assert_eq!(decode_rel(bad), None, "{bad:?}");
        }
    }

    async fn start(
        resolve: Resolver,
    ) -> (String, crate::shutdown::Stop, tokio::task::JoinHandle<()>) {
        start_with(resolve, MAX_CONNECTIONS).await
    }

    async fn start_with(
        resolve: Resolver,
        max_connections: usize,
    ) -> (String, crate::shutdown::Stop, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = crate::shutdown::Stop::new();
        let app = App {
            metrics: Metrics::new(),
            resolve,
        };
        let h = tokio::spawn(serve_with(listener, app, rx, max_connections));
        (addr.to_string(), tx, h)
    }

    /// One HTTP/1.1 request; returns (status, headers lowercased, body).
    async fn request(addr: &str, method: &str, path: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_lowercase(), body.to_string())
    }

    #[tokio::test]
    async fn routes_methods_and_shutdown() {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let s2 = seen.clone();
        let resolve: Resolver = Arc::new(move |rel: &str| {
            s2.lock().unwrap().push(rel.to_owned());
            match rel {
                "missing.png" => Ok(None),
                "unreadable.png" => Err("the database is closed".into()),
                _ => Ok(Some(format!(
                    "https://cdn.test/{}",
                    rel.replace(' ', "%20")
                ))),
            }
        });
        let (addr, stop, handle) = start(resolve).await;

        let (code, _, body) = request(&addr, "GET", "/healthz").await;
        assert_eq!((code, body.as_str()), (200, "ok\n"));

        let (code, head, body) = request(&addr, "GET", "/metrics").await;
        assert_eq!(code, 200);
        assert!(
            head.contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(body.contains("offloadd_uploads_total"), "{body}");

        let (code, head, _) = request(&addr, "GET", "/r/out/a%20b%C3%A9.png?x=1").await;
        assert_eq!(code, 302);
        assert!(
            head.contains("\r\nlocation: https://cdn.test/out/a%20b%c3%a9.png\r\n"),
            "{head}"
        );
        assert_eq!(seen.lock().unwrap().last().unwrap(), "out/a bé.png");

        assert_eq!(request(&addr, "GET", "/r/missing.png").await.0, 404);
        // Records that cannot be read: no guess, no 404 (the file may exist).
        let (code, head, body) = request(&addr, "GET", "/r/unreadable.png").await;
        assert_eq!(code, 503);
        assert!(!head.contains("location:"), "{head}");
        assert_eq!(
            body,
            "offloadd cannot read its location records right now; try again later\n"
        );
        assert_eq!(request(&addr, "GET", "/r/a/%2e%2e/etc/passwd").await.0, 404);
        assert_eq!(request(&addr, "GET", "/r/").await.0, 404);
        assert_eq!(request(&addr, "GET", "/nothing").await.0, 404);
        for m in ["POST", "PUT", "DELETE"] {
            assert_eq!(request(&addr, m, "/r/x.png").await.0, 405, "{m}");
            assert_eq!(request(&addr, m, "/healthz").await.0, 405, "{m}");
        }
        assert_eq!(request(&addr, "HEAD", "/healthz").await.0, 200);
        assert_eq!(
            seen.lock().unwrap().len(),
            3,
            "resolver called for valid GETs only"
        );

        stop.fire();
        tokio::time::timeout(std::time::Duration::from_secs(10), handle)
            .await
            .expect("serve returns after stop")
            .unwrap();
    }

    /// Idle connections (opened, nothing sent) cannot take the listener:
    /// with every slot held by one, a request waits for a slot, and gets it
    /// once the idle ones time out.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_time_out_and_free_their_slots() {
        use tokio::io::AsyncReadExt;
        let resolve: Resolver = Arc::new(|_: &str| Ok(None));
        let (addr, stop, handle) = start_with(resolve, 3).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        let began = tokio::time::Instant::now();
        let (code, _, body) = request(&addr, "GET", "/healthz").await;
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        assert!(
            began.elapsed() >= HEADER_READ_TIMEOUT,
            "answered after {:?}: the cap did not hold it back",
            began.elapsed()
        );
        for mut s in idle {
            let mut buf = [0u8; 64];
            // Closed by the server (a 408 or nothing), not left open.
            let n = s.read(&mut buf).await.unwrap_or(0);
            let rest = s.read(&mut buf).await.unwrap_or(0);
            assert!(n == 0 || rest == 0, "an idle connection stayed open");
        }
        stop.fire();
        handle.await.unwrap();
    }
}
