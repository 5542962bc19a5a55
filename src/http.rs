//! The TCP listener (`http.listen`): `/healthz`, `/metrics` and `/r/{path}`.
//! Nothing on it changes state.
//!
//! STUB: filled in by the HTTP work.

use crate::metrics::Metrics;
use std::sync::Arc;
use tokio::sync::watch;

/// Maps a path relative to the watch root to the public URL to redirect to.
pub type Resolver = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// What the handlers need.
#[derive(Clone)]
pub struct App {
    pub metrics: Metrics,
    pub resolve: Resolver,
}

/// Serves until `stop` turns true.
pub async fn serve(listener: tokio::net::TcpListener, app: App, mut stop: watch::Receiver<bool>) {
    let _ = (listener, app);
    let _ = stop.changed().await;
}
