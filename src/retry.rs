//! Retry policy for retryable handler errors.
//!
//! Exponential backoff with full jitter, bounded by a number of attempts. While a record waits,
//! its partition waits too (order is kept); other partitions keep flowing.

use std::time::Duration;

/// How retryable errors are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total handler runs for one record, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of one delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based): full jitter over an exponential
    /// ceiling, never below `floor` (a handler's `retry_after`).
    pub fn backoff(&self, attempt: u32, floor: Option<Duration>) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .initial_backoff
            .saturating_mul(1 << exp)
            .min(self.max_backoff);
        let jittered = ceiling.mul_f64(jitter());
        jittered.max(floor.unwrap_or_default())
    }
}

/// A number in [0.5, 1.0): enough spread to de-synchronise retries without a RNG dependency.
fn jitter() -> f64 {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    let r = RandomState::new().hash_one(std::time::Instant::now());
    0.5 + (r % 1_000) as f64 / 2_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_respects_floor() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1_000),
        };
        for _ in 0..50 {
            let d1 = p.backoff(1, None);
            assert!(d1 >= Duration::from_millis(50) && d1 < Duration::from_millis(100));
            let d3 = p.backoff(3, None);
            assert!(d3 >= Duration::from_millis(200) && d3 < Duration::from_millis(400));
            assert!(p.backoff(20, None) < Duration::from_millis(1_000));
            assert_eq!(
                p.backoff(1, Some(Duration::from_secs(3))),
                Duration::from_secs(3)
            );
        }
    }
}
