//! Shared upload resources: the byte budget for buffered file contents and the
//! bandwidth pacer.
//!
//! Guarantees that the file bytes held in memory for uploads never exceed
//! `upload.memory_limit`, and that bodies
//! start no faster than `upload.bandwidth_limit` allows on average.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Copies of a body in memory while it is sent: the data path hands the
/// buffer itself to the HTTP client, so a buffer of `n` bytes costs `n`.
pub const BODY_COPIES: u64 = 1;

const UNIT: u64 = 1024;

/// A counting budget in KiB units (a tokio semaphore holds at most `u32::MAX` permits).
#[derive(Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total_units: u32,
}

/// Bytes reserved from the budget; released when dropped.
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
    pub bytes: u64,
}

impl Budget {
    pub fn new(limit_bytes: u64) -> Self {
        let units = (limit_bytes / UNIT).clamp(1, u32::MAX as u64 >> 4) as u32;
        Budget {
            sem: Arc::new(Semaphore::new(units as usize)),
            total_units: units,
        }
    }

    /// The largest buffer that can ever be reserved, taking the body copy into account.
    pub fn max_buffer(&self) -> u64 {
        self.total_units as u64 * UNIT / BODY_COPIES
    }

    /// Waits until a buffer of `buffer_len` bytes (plus its in-flight copy) fits.
    /// Buffers larger than [`Budget::max_buffer`] take the whole budget.
    pub async fn reserve(&self, buffer_len: u64) -> Reservation {
        let bytes = buffer_len.saturating_mul(BODY_COPIES);
        let units = bytes.div_ceil(UNIT).clamp(0, self.total_units as u64) as u32;
        let permit = if units == 0 {
            None
        } else {
            Some(
                self.sem
                    .clone()
                    .acquire_many_owned(units)
                    .await
                    .expect("budget semaphore is never closed"),
            )
        };
        Reservation {
            _permit: permit,
            bytes,
        }
    }

    /// Bytes currently reserved.
    pub fn in_use(&self) -> u64 {
        (self.total_units as u64 - self.sem.available_permits() as u64) * UNIT
    }
}

/// Tunes glibc's allocator so that resident memory follows the budget
/// instead of its high-water mark; call it once, before the runtime starts.
/// - Every buffer of 1 MiB or more goes straight back to the OS when freed
///   (glibc otherwise raises its mmap threshold after the first large free and
///   keeps later part buffers in the heap).
/// - At most two arenas: glibc gives threads that allocate at once arenas of
///   their own (up to 8 per core), and memory freed in one is not reused by
///   another; with dozens of upload tasks moving between runtime threads, peak
///   RSS grew far beyond the bytes in use (bench/RESULTS.md).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called once at start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1024 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Spaces request bodies so that, on average, no more than `bytes_per_sec` are
/// sent. A body waits until the bodies before it would have been sent at that rate.
#[derive(Clone)]
pub struct Pacer {
    /// Bytes per second; 0 is unlimited. Changed by the bandwidth schedule.
    bytes_per_sec: Arc<std::sync::atomic::AtomicU64>,
    next_free: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl Pacer {
    /// `0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> Self {
        Pacer {
            bytes_per_sec: Arc::new(std::sync::atomic::AtomicU64::new(bytes_per_sec)),
            next_free: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Changes the rate for the bodies that start from now on (every clone).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        let old = self
            .bytes_per_sec
            .swap(bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
        if old != bytes_per_sec {
            // Bodies already spaced out at the old rate keep their turn; the
            // next one waits no longer than the new rate asks.
            *self.next_free.lock().expect("pacer lock") = None;
        }
    }

    pub fn rate(&self) -> u64 {
        self.bytes_per_sec
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for this body's turn.
    pub async fn take(&self, bytes: u64) {
        let rate = self.rate();
        if rate == 0 || bytes == 0 {
            return;
        }
        let cost = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
        let start = {
            let mut next = self.next_free.lock().expect("pacer lock");
            let now = tokio::time::Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + cost);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_bodies_by_rate() {
        let p = Pacer::new(1000);
        let t0 = tokio::time::Instant::now();
        p.take(500).await;
        assert_eq!(t0.elapsed(), std::time::Duration::ZERO);
        p.take(1000).await;
        assert_eq!(t0.elapsed(), std::time::Duration::from_millis(500));
        p.take(10).await;
        assert_eq!(t0.elapsed(), std::time::Duration::from_millis(1500));
        Pacer::new(0).take(u64::MAX).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_applies_to_the_next_body() {
        let p = Pacer::new(1000);
        let t0 = tokio::time::Instant::now();
        p.take(1000).await;
        p.take(1000).await;
        assert_eq!(t0.elapsed(), std::time::Duration::from_secs(1));
        p.clone().set_rate(0);
        p.take(1_000_000).await;
        p.take(1_000_000).await;
        assert_eq!(
            t0.elapsed(),
            std::time::Duration::from_secs(1),
            "unlimited now"
        );
        p.set_rate(500);
        assert_eq!(p.rate(), 500);
        p.take(500).await;
        p.take(500).await;
        assert_eq!(t0.elapsed(), std::time::Duration::from_secs(2));
    }

    #[tokio::test]
    async fn reservations_block_until_released() {
        let b = Budget::new(64 * 1024 * 1024);
        let half = b.max_buffer() / 2;
        assert_eq!(b.max_buffer(), 64 * 1024 * 1024 / BODY_COPIES);
        let r1 = b.reserve(half).await;
        let _r2 = b.reserve(half).await;
        assert_eq!(b.in_use(), 64 * 1024 * 1024);
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.reserve(1024).await.bytes });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(r1);
        assert_eq!(waiter.await.unwrap(), 1024 * BODY_COPIES);
    }

    #[tokio::test]
    async fn zero_bytes_reserve_nothing() {
        let b = Budget::new(1024 * 1024);
        let _r = b.reserve(0).await;
        assert_eq!(b.in_use(), 0);
    }
}
