//! The byte budget for buffered file contents, shared by all workers.
//!
//! Guarantees that the file bytes held in memory for uploads (including rust-s3's
//! copy of each request body) never exceed `upload.memory_limit`.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// rust-s3 copies each request body once (`Vec::from(content)`) while sending,
/// so a buffer of `n` bytes costs `n * BODY_COPIES` while in flight.
pub const BODY_COPIES: u64 = 2;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_block_until_released() {
        let b = Budget::new(64 * 1024 * 1024);
        assert_eq!(b.max_buffer(), 32 * 1024 * 1024);
        let r1 = b.reserve(16 * 1024 * 1024).await;
        let _r2 = b.reserve(16 * 1024 * 1024).await;
        assert_eq!(b.in_use(), 64 * 1024 * 1024);
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.reserve(1024).await.bytes });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(r1);
        assert_eq!(waiter.await.unwrap(), 2048);
    }

    #[tokio::test]
    async fn zero_bytes_reserve_nothing() {
        let b = Budget::new(1024 * 1024);
        let _r = b.reserve(0).await;
        assert_eq!(b.in_use(), 0);
    }
}
