//! Retry policy for retryable handler errors.
//!
//! Exponential backoff with jitter, bounded by a number of attempts and by the time elapsed
//! since the record first failed. While a record waits, its partition waits too (order is kept):
//! its records wait in librdkafka's queue for that partition, which stops fetching it once full,
//! while other partitions keep flowing. Time is tokio's clock, so tests run it paused.

use std::time::Duration;

use tokio::time::Instant;

/// How retryable errors are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total handler runs for one record, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of one delay.
    pub max_backoff: Duration,
    /// No retry is scheduled that would start later than this after the record's first
    /// failure; the record is then dead-lettered as exhausted.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt number `attempt` (1-based): full jitter over an exponential
    /// ceiling, never below `floor` (a handler's `retry_after`).
    pub(crate) fn backoff(&self, attempt: u32, floor: Option<Duration>) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .initial_backoff
            .saturating_mul(1 << exp)
            .min(self.max_backoff);
        // Whole milliseconds: tokio's timers have that resolution.
        let jittered = Duration::from_millis(ceiling.mul_f64(jitter()).as_millis() as u64);
        jittered.max(floor.unwrap_or_default())
    }
}

/// One record's failures so far.
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    failures: u32,
    /// When the record first failed: tokio's clock (for the time bound) and the wall clock in
    /// milliseconds since the epoch (for dead-letter headers).
    first_failure: Option<(Instant, i64)>,
}

/// What to do after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextTry {
    /// Run the handler again after this delay.
    After(Duration),
    /// Give up: the attempts ran out.
    AttemptsExhausted,
    /// Give up: the next try would start past `max_elapsed`.
    TimeExhausted,
}

impl Attempts {
    /// The number of the handler run about to start or running (1 for the first).
    pub(crate) fn count(&self) -> u32 {
        self.failures + 1
    }

    /// Handler runs that failed so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// When the record first failed (wall clock, ms since the epoch), if it has.
    pub(crate) fn first_failure_ms(&self) -> Option<i64> {
        self.first_failure.map(|(_, ms)| ms)
    }

    /// Records a retryable failure now (`now_ms` on the wall clock) and decides on the next try.
    pub(crate) fn failed(
        &mut self,
        policy: &RetryPolicy,
        floor: Option<Duration>,
        now_ms: i64,
    ) -> NextTry {
        let now = Instant::now();
        let (first, _) = *self.first_failure.get_or_insert((now, now_ms));
        self.failures += 1;
        if self.failures >= policy.max_attempts {
            return NextTry::AttemptsExhausted;
        }
        let delay = policy.backoff(self.failures, floor);
        if now + delay > first + policy.max_elapsed {
            return NextTry::TimeExhausted;
        }
        NextTry::After(delay)
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
            max_elapsed: Duration::from_secs(60),
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

    fn policy(attempts: u32, max_elapsed: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts: attempts,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_elapsed,
        }
    }

    /// Runs failures on the paused clock, sleeping each delay: returns the delays and why it
    /// gave up.
    async fn fail_until_given_up(policy: &RetryPolicy) -> (Vec<Duration>, NextTry) {
        let mut attempts = Attempts::default();
        let mut delays = Vec::new();
        loop {
            match attempts.failed(policy, None, 0) {
                NextTry::After(d) => {
                    delays.push(d);
                    tokio::time::sleep(d).await;
                }
                gave_up => return (delays, gave_up),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_bound_retries_and_delays_grow_on_the_clock() {
        let p = policy(6, Duration::from_secs(3600));
        let start = Instant::now();
        let (delays, gave_up) = fail_until_given_up(&p).await;
        assert_eq!(gave_up, NextTry::AttemptsExhausted);
        assert_eq!(delays.len(), 5, "six runs: five waits between them");
        for (i, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_secs(1 << i);
            assert!(*d >= ceiling / 2 && *d < ceiling, "wait {i}: {d:?}");
        }
        // The waits were taken on tokio's clock (paused: no real time passed).
        assert_eq!(start.elapsed(), delays.iter().sum::<Duration>());
    }

    #[tokio::test(start_paused = true)]
    async fn elapsed_time_bounds_retries_from_the_first_failure() {
        let p = policy(1_000, Duration::from_secs(600));
        let start = Instant::now();
        let (delays, gave_up) = fail_until_given_up(&p).await;
        assert_eq!(gave_up, NextTry::TimeExhausted);
        let waited: Duration = delays.iter().sum();
        assert!(waited <= Duration::from_secs(600), "{waited:?}");
        assert!(
            waited > Duration::from_secs(600) - p.max_backoff,
            "gave up only when the next wait would pass the bound: {waited:?}"
        );
        assert_eq!(start.elapsed(), waited);
        // The cap holds once the exponent passes it.
        assert!(delays.iter().all(|d| *d < p.max_backoff));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_floor_is_kept_but_not_past_the_time_bound() {
        let p = policy(10, Duration::from_secs(30));
        let mut attempts = Attempts::default();
        assert_eq!(
            attempts.failed(&p, Some(Duration::from_secs(20)), 7),
            NextTry::After(Duration::from_secs(20))
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(
            attempts.failed(&p, Some(Duration::from_secs(20)), 9),
            NextTry::TimeExhausted,
            "a second 20 s wait would end 40 s after the first failure"
        );
        assert_eq!(attempts.count(), 3);
        assert_eq!(
            attempts.first_failure_ms(),
            Some(7),
            "the first failure's time is kept"
        );
    }
}
