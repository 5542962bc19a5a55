//! systemd integration: sd_notify READY/STATUS/RELOADING/STOPPING/EXTEND_TIMEOUT_USEC and
//! watchdog pings. Every call is a no-op when not started by systemd (no
//! `NOTIFY_SOCKET`), and a failed notification is only logged at debug level:
//! systemd integration must never take the daemon down.
//!
//! The watchdog: a dedicated OS thread (so a busy tokio runtime cannot starve
//! it) sends `WATCHDOG=1` every half interval, but only while a heartbeat that
//! a small tokio task bumps every 200 ms is fresh. If the event loop wedges,
//! the heartbeat goes stale, the pings stop and systemd restarts the service.
//! The pings also stop when the caller's `stalled` check names a reason (for
//! the daemon: a scheduler loop that stopped turning, uploads in flight but
//! no request finished for several request timeouts, or a state database
//! that stopped answering).

use crate::shutdown::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends `states` to `$NOTIFY_SOCKET`, without waiting: a notify socket
/// whose queue is full (systemd busy, or a test's socket not read yet) drops
/// this message (the next one follows) instead of blocking the thread that
/// sends it, which may be the event loop's.
fn send(states: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|sock| {
        sock.set_nonblocking(true)?;
        sock.connect(&path)?;
        sock.send(message.as_bytes())
    });
    if let Err(e) = sent {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1`: config and state are open and the pipeline starts.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// `STATUS=`: the one-line summary `systemctl status` shows.
pub fn status(line: &str) {
    // STATUS= is one line; a newline would start a new (bogus) assignment.
    let line = line.replace(['\n', '\r'], " ");
    send(&[NotifyState::Status(&line)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC=`: a reload has begun; [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// `EXTEND_TIMEOUT_USEC=`: asks systemd for `usec` more microseconds for the
/// current start-up or shutdown phase (e.g. while a huge tree is walked).
pub fn extend_timeout(usec: u64) {
    let usec = u32::try_from(usec).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// How often [`while_starting`] asks systemd for more start-up time.
pub const EXTEND_EVERY: Duration = Duration::from_secs(20);

/// Runs `work`, a start-up phase of unknown length (a rebuild that reads
/// large files, say), asking systemd every `every` for three times that much
/// more start-up time, so `TimeoutStartSec=` does not cut it short while the
/// process runs.
pub async fn while_starting<F: std::future::Future>(work: F, every: Duration) -> F::Output {
    tokio::pin!(work);
    let extend_by = u64::try_from((3 * every).as_micros()).unwrap_or(u64::MAX);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => extend_timeout(extend_by),
        }
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this PID).
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// How often the event-loop heartbeat task runs.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);

/// Milliseconds since `epoch`, saturating.
fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Decides whether the watchdog thread may ping now: the last heartbeat
/// (ms since the epoch) is no older than `interval`.
pub fn heartbeat_fresh(last_beat_ms: u64, now_ms: u64, interval: Duration) -> bool {
    now_ms.saturating_sub(last_beat_ms) <= interval.as_millis() as u64
}

/// Starts the watchdog when systemd enabled it (`WatchdogSec=`), else does
/// nothing and returns `None`. Must be called from inside the tokio runtime
/// (it spawns the heartbeat task there, and returns it); call it once, right
/// after [`ready`]. After `shutdown` the heartbeat task ends and the thread
/// keeps pinging while the process stops (bounded by `TimeoutStopSec=`).
pub fn spawn_watchdog(
    mut shutdown: Shutdown,
    stalled: impl Fn() -> Option<&'static str> + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()?;
    let epoch = Instant::now();
    let beat = Arc::new(AtomicU64::new(0));
    let stopping = Arc::new(AtomicBool::new(false));

    // Heartbeat: proves the tokio event loop still runs tasks.
    let (task_beat, task_stopping) = (beat.clone(), stopping.clone());
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => task_beat.store(ms_since(epoch), Ordering::Relaxed),
                _ = shutdown.recv() => break,
            }
        }
        task_stopping.store(true, Ordering::Relaxed);
    });

    // Pinger: an OS thread, so CPU-heavy or blocked runtime threads cannot
    // starve it; it only vouches for the event loop while the beat is fresh.
    let every = (interval / 2).max(Duration::from_millis(50));
    let spawned = std::thread::Builder::new()
        .name("sd-watchdog".into())
        .spawn(move || {
            let mut stale_logged = false;
            loop {
                let last = beat.load(Ordering::Relaxed);
                let beating = heartbeat_fresh(last, ms_since(epoch), interval);
                let why = if beating {
                    stalled()
                } else {
                    Some("event loop unresponsive")
                };
                if why.is_none() || stopping.load(Ordering::Relaxed) {
                    send(&[NotifyState::Watchdog]);
                    stale_logged = false;
                } else if !stale_logged {
                    // Logging may itself be stuck; best effort.
                    tracing::error!(
                        since_ms = ms_since(epoch).saturating_sub(last),
                        "{}: watchdog pings stopped; systemd will restart offloadd",
                        why.unwrap_or_default()
                    );
                    stale_logged = true;
                }
                std::thread::sleep(every);
            }
        });
    match spawned {
        Ok(_) => {
            tracing::debug!(
                interval_ms = interval.as_millis() as u64,
                "systemd watchdog enabled"
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the watchdog thread; systemd may restart offloadd");
        }
    }
    Some(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_freshness() {
        let i = Duration::from_secs(10);
        assert!(heartbeat_fresh(0, 0, i));
        assert!(heartbeat_fresh(1_000, 11_000, i));
        assert!(!heartbeat_fresh(1_000, 11_001, i));
        // clock never goes backwards, but be safe
        assert!(heartbeat_fresh(5_000, 1_000, i));
    }

    #[test]
    fn no_ops_without_systemd() {
        std::env::remove_var("NOTIFY_SOCKET");
        ready();
        status("queued 0\nsecond line");
        stopping();
        extend_timeout(5_000_000);
        assert!(watchdog_interval().is_none());
    }
}
