//! Counters of what the runtime did.
//!
//! [`Stats`] is a set of atomic counters shared by every partition task; [`Stats::snapshot`] reads
//! them all at once for summaries and tests. Every increment is also visible in the `tracing`
//! events of the record it concerns.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::handler::DuplicateCause;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters, shared by the runtime's tasks.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub(crate) $name: AtomicU64, )*
        }

        /// A point-in-time copy of [`Stats`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Records received from Kafka.
    records_read,
    /// Records whose handler succeeded, counted once their batch is committed.
    applied,
    /// Records skipped because the same record was already processed (committed batches).
    duplicates_redelivery,
    /// Records skipped because another record with the same key and payload was processed
    /// (committed batches).
    duplicates_repeated_key,
    /// Records whose key was already used with a different payload (committed batches).
    conflicts,
    /// Records kept as dead letters (committed batches).
    dead_lettered,
    /// Handler retries after a retryable error.
    retries,
    /// Batches committed to the store.
    batches_committed,
    /// Commits rejected because the partition has a newer owner.
    fenced_commits,
    /// Expired dedup entries purged.
    expired_purged,
    /// Asynchronous Kafka offset commits that failed (the store's position stays authoritative).
    kafka_commit_failures,
    /// Batches tried again after a transient store failure (lost connection, deadlock).
    store_retries,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Outcomes of records in a batch not committed yet. They reach [`Stats`] only once the batch is
/// committed, so a crashed or fenced batch is never counted.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) applied: u64,
    pub(crate) duplicates_redelivery: u64,
    pub(crate) duplicates_repeated_key: u64,
    pub(crate) conflicts: u64,
    pub(crate) dead_lettered: u64,
}

impl Tally {
    pub(crate) fn duplicate(&mut self, cause: DuplicateCause) {
        match cause {
            DuplicateCause::Redelivery => self.duplicates_redelivery += 1,
            DuplicateCause::RepeatedKey => self.duplicates_repeated_key += 1,
        }
    }

    /// Adds the tally to the counters and clears it (after a commit).
    pub(crate) fn flush(&mut self, stats: &Stats) {
        let t = std::mem::take(self);
        Stats::add(&stats.applied, t.applied);
        Stats::add(&stats.duplicates_redelivery, t.duplicates_redelivery);
        Stats::add(&stats.duplicates_repeated_key, t.duplicates_repeated_key);
        Stats::add(&stats.conflicts, t.conflicts);
        Stats::add(&stats.dead_lettered, t.dead_lettered);
    }
}

impl StatsSnapshot {
    /// Duplicates of both causes.
    pub fn duplicates(&self) -> u64 {
        self.duplicates_redelivery + self.duplicates_repeated_key
    }
}
