//! Log output: readable text on stderr (or JSON) for terminals, native journald
//! records under systemd. The level can be changed live by a reload.

use crate::config::LogFormat;
use std::sync::OnceLock;
use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter, Registry};

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. `level` is a tracing filter such as `info` or
/// `offloadd=debug`.
pub fn init(format: LogFormat, level: &str) {
    let (filter, handle) = reload::Layer::new(filter(level));
    let _ = LEVEL.set(handle);
    let registry = tracing_subscriber::registry().with(filter);
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => under_systemd,
        _ => false,
    };
    if journald {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer
                .with_field_prefix(Some("OFFLOADD".into()))
                .with_syslog_identifier("offloadd".into());
            registry.with(layer).init();
            return;
        }
    }
    if format == LogFormat::Json {
        registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        registry
            .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
            .init();
    }
}

/// Changes the level filter of the running subscriber (a reload).
pub fn set_level(level: &str) {
    if let Some(h) = LEVEL.get() {
        let _ = h.modify(|f| *f = filter(level));
    }
}
