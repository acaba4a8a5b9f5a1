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
    /// Records whose handler succeeded and whose effects were committed.
    applied,
    /// Records skipped because the same record was already processed.
    duplicates_redelivery,
    /// Records skipped because another record with the same key and payload was processed.
    duplicates_repeated_key,
    /// Records whose key was already used with a different payload.
    conflicts,
    /// Records sent to the dead-letter path.
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
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn duplicate(&self, cause: DuplicateCause) {
        match cause {
            DuplicateCause::Redelivery => Self::add(&self.duplicates_redelivery, 1),
            DuplicateCause::RepeatedKey => Self::add(&self.duplicates_repeated_key, 1),
        }
    }
}

impl StatsSnapshot {
    /// Duplicates of both causes.
    pub fn duplicates(&self) -> u64 {
        self.duplicates_redelivery + self.duplicates_repeated_key
    }
}
