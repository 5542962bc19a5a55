//! Log output: readable text on stderr (or JSON) for terminals, native journald
//! records under systemd. The level can be changed live by a reload.

use crate::config::LogFormat;
use std::sync::OnceLock;
use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::{fmt, prelude::*, reload, EnvFilter, Registry};

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Changes the level filter of the running subscriber (a reload).
pub fn set_level(level: &str) {
    if let Some(h) = LEVEL.get() {
        let _ = h.modify(|f| *f = filter(level));
    }
}

/// Installs the global subscriber. `level` is a tracing filter such as `info` or
/// `offloadd=debug`.
pub fn init(format: LogFormat, level: &str) {
    let (filter, handle) = reload::Layer::new(filter(level));
    let _ = LEVEL.set(handle);
    let under_systemd = stderr_is_journal();
    let journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => under_systemd,
        _ => false,
    };
    if journald {
        if let Ok(layer) = tracing_journald::layer() {
            // Fields become OFFLOADD_PATH, OFFLOADD_KEY, ... (the prefix
            // replaces tracing-journald's default `F`). Priorities follow
            // syslog use: info is 6 (not the crate's default 5, notice), so
            // `journalctl -p notice` shows warnings and errors only.
            let layer = layer
                .with_field_prefix(Some("OFFLOADD".into()))
                .with_syslog_identifier("offloadd".into())
                .with_priority_mappings(PriorityMappings {
                    error: Priority::Error,
                    warn: Priority::Warning,
                    info: Priority::Informational,
                    debug: Priority::Debug,
                    trace: Priority::Debug,
                });
            tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .init();
            return;
        }
    }
    if format == LogFormat::Json {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .init();
    } else {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
            .init();
    }
}

/// Whether stderr is connected to the journal: `JOURNAL_STREAM` (set by
/// systemd as `DEVICE:INODE`) names stderr itself. A bare `JOURNAL_STREAM`
/// is not enough: it is inherited by everything a service starts, e.g. a shell
/// whose stderr went elsewhere.
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a stat for a valid fd into the buffer we own.
    if unsafe { libc::fstat(2, st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    st.st_dev == dev && st.st_ino == ino
}
