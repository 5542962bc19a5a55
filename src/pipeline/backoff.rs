//! Exponential backoff with full jitter, shared by item retries and provider probes.
//!
//! Pure logic: the delay depends only on the attempt number, the configured bounds
//! and a random factor, so it can be unit tested without clocks.

use std::time::Duration;

/// Bounds of an exponential backoff: the first delay and the largest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
        }
    }

    /// The ceiling for attempt `n` (1-based): `initial * 2^(n-1)`, capped at `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(32);
        let factor = 1u64 << shift;
        let nanos = (self.initial.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.max)
    }

    /// The delay before retry `attempt`: uniformly between half the ceiling and the
    /// ceiling ("equal jitter"), so retries spread out but never collapse to zero.
    pub fn delay(&self, attempt: u32, unit_random: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let r = unit_random.clamp(0.0, 1.0);
        ceiling / 2 + ceiling.mul_f64(r) / 2
    }

    /// [`Backoff::delay`] with a fresh random factor.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(300))
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        assert_eq!(b().ceiling(1), Duration::from_secs(1));
        assert_eq!(b().ceiling(2), Duration::from_secs(2));
        assert_eq!(b().ceiling(5), Duration::from_secs(16));
        assert_eq!(b().ceiling(9), Duration::from_secs(256));
        assert_eq!(b().ceiling(10), Duration::from_secs(300));
        assert_eq!(b().ceiling(1000), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_between_half_and_full_ceiling() {
        assert_eq!(b().delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(b().delay(3, 1.0), Duration::from_secs(4));
        for _ in 0..100 {
            let d = b().jittered(4);
            assert!(d >= Duration::from_secs(4) && d <= Duration::from_secs(8));
        }
    }

    #[test]
    fn max_below_initial_is_raised() {
        let b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(3), Duration::from_secs(5));
    }

    #[test]
    fn attempt_zero_is_treated_as_first() {
        assert_eq!(b().ceiling(0), Duration::from_secs(1));
    }
}
