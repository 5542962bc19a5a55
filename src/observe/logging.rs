//! Log output: readable text on stderr (or JSON) for terminals, native journald
//! records under systemd. A reload changes the level and the format live.

use crate::config::LogFormat;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::{fmt, layer::Layered, prelude::*, reload, EnvFilter, Layer, Registry};

/// The subscriber under the output: the registry and its level filter.
type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
/// One output (journald, JSON or text), swapped whole by a reload.
type Output = Box<dyn Layer<Filtered> + Send + Sync>;

/// Where log lines go now (set with the output): how `main` writes a fatal
/// error once, not twice ([`fatal`]).
static WHERE: AtomicU8 = AtomicU8::new(STDERR_OTHER);
const STDERR_TEXT: u8 = 0;
const STDERR_OTHER: u8 = 1;
const JOURNAL_ALSO_STDERR: u8 = 2;

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();
static OUTPUT: OnceLock<reload::Handle<Output, Filtered>> = OnceLock::new();

fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_new(crate::config::log_filter(level)).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Changes the level filter of the running subscriber (a reload).
pub fn set_level(level: &str) {
    if let Some(h) = LEVEL.get() {
        let _ = h.modify(|f| *f = filter(level));
    }
}

/// Changes the output of the running subscriber (a reload that changed
/// `log.format`); lines already written stay as they were. Safe because
/// offloadd opens no spans: tracing-subscriber's JSON output panics on a
/// span opened before it was installed.
pub fn set_format(format: LogFormat) {
    if let Some(h) = OUTPUT.get() {
        let _ = h.reload(output(format));
    }
}

/// Installs the global subscriber. `level` is a tracing filter such as `info` or
/// `offloadd=debug`.
pub fn init(format: LogFormat, level: &str) {
    let (filter, level_handle) = reload::Layer::new(filter(level));
    let (output, output_handle) = reload::Layer::new(output(format));
    let _ = LEVEL.set(level_handle);
    let _ = OUTPUT.set(output_handle);
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
}

/// The one sentence of a fatal error, once wherever it is read: in the
/// journal as a record of priority `err` (not again as a line of stderr,
/// which is the journal too), on a terminal as `offloadd: …` (not again
/// as a log line), and both where they differ (JSON logs, say); on stderr
/// alone where the level records no errors.
pub fn fatal(sentence: &str) {
    let to = WHERE.load(Ordering::Relaxed);
    // `log.level: off` records nothing: stderr then has it whatever it is.
    let recorded = tracing::enabled!(tracing::Level::ERROR);
    if to != STDERR_TEXT && recorded {
        tracing::error!("{sentence}");
    }
    if to != JOURNAL_ALSO_STDERR || !recorded {
        eprintln!("offloadd: {sentence}");
    }
}

/// The output `format` asks for. `auto` is journald when stderr is the
/// journal; journald falls back to text on stderr when its socket is absent.
fn output(format: LogFormat) -> Output {
    let journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => stderr_is_journal(),
        _ => false,
    };
    if journald {
        if let Ok(layer) = tracing_journald::layer() {
            let to = if stderr_is_journal() {
                JOURNAL_ALSO_STDERR
            } else {
                STDERR_OTHER
            };
            WHERE.store(to, Ordering::Relaxed);
            // Fields become OFFLOADD_PATH, OFFLOADD_KEY, ... (the prefix
            // replaces tracing-journald's default `F`). Priorities follow
            // syslog use: info is 6 (not the crate's default 5, notice), so
            // `journalctl -p notice` shows warnings and errors only.
            return Box::new(
                layer
                    .with_field_prefix(Some("OFFLOADD".into()))
                    .with_syslog_identifier("offloadd".into())
                    .with_priority_mappings(PriorityMappings {
                        error: Priority::Error,
                        warn: Priority::Warning,
                        info: Priority::Informational,
                        debug: Priority::Debug,
                        trace: Priority::Debug,
                    }),
            );
        }
    }
    if format == LogFormat::Json {
        WHERE.store(STDERR_OTHER, Ordering::Relaxed);
        Box::new(fmt::layer().json().with_writer(std::io::stderr))
    } else {
        WHERE.store(STDERR_TEXT, Ordering::Relaxed);
        // Colours only for a terminal, not in a file or a pipe.
        use std::io::IsTerminal;
        Box::new(
            fmt::layer()
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
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
