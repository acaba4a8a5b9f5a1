//! What the runtime did, as counters, histograms and gauges.
//!
//! Two views of the same numbers:
//! - [`Stats`]: atomic counters of one runtime, read all at once with [`Stats::snapshot`] (for
//!   summaries and tests);
//! - the [`metrics`](https://docs.rs/metrics) facade: install any recorder (for example
//!   `metrics-exporter-prometheus`, see `examples/metrics_prometheus.rs`) and the runtime reports
//!   to it. Without a recorder these calls do nothing.
//!
//! Outcomes of records (processed, duplicates, conflicts, dead letters) are reported when their
//! batch commits, so a crashed, fenced or retried batch is never counted.
//!
//! The metric names and labels are listed in the crate's documentation (Observability).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::dead_letter::DeadLetterReason;
use crate::handler::DuplicateCause;
use crate::runtime::ConflictPolicy;
use crate::store::PartitionId;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters, shared by the runtime's tasks.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub(crate) $name: AtomicU64, )*
        }

        /// A point-in-time copy of [`Stats`]. Serializes (serde) as an object of its counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
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

        impl std::ops::AddAssign for StatsSnapshot {
            /// Adds every counter of `other` (the counts of several runtimes, or of one
            /// consumer's incarnations).
            fn add_assign(&mut self, other: StatsSnapshot) {
                $( self.$name += other.$name; )*
            }
        }

        #[cfg_attr(not(feature = "testkit"), allow(dead_code))]
        impl StatsSnapshot {
            /// Every counter with its field's name.
            pub(crate) fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($name), self.$name), )*]
            }

            /// The counters `value` gives by their fields' names (0 for a name it lacks).
            pub(crate) fn from_named(value: impl Fn(&str) -> Option<u64>) -> StatsSnapshot {
                StatsSnapshot { $( $name: value(stringify!($name)).unwrap_or(0), )* }
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
    /// Conflicting records skipped and recorded in the store only, under
    /// [`ConflictPolicy::SkipAndRecord`] (committed batches; included in `conflicts`).
    conflicts_skipped,
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
    /// Dead letters deleted from the store after the dead-letter retention.
    dead_letters_purged,
    /// Kafka offset commits that failed, each tried again while the partition is owned (the
    /// store's position stays authoritative).
    kafka_commit_failures,
    /// Batches tried again after a transient store failure (lost connection, deadlock).
    store_retries,
    /// Partition assignments refused because another store holds the partition's latest state
    /// ([`Error::StalePartition`](crate::Error::StalePartition)).
    stale_partitions_refused,
    /// Records the resolver (feature `resolve`) let the handler apply (committed batches;
    /// included in `applied`).
    resolved_applied,
    /// Records the resolver settled as superseded (committed batches).
    resolved_superseded,
    /// Records the resolver settled as stale (committed batches).
    resolved_stale,
    /// Records the resolver settled as conflicts with the winner's version (committed batches).
    resolved_conflict,
    /// Records the resolver rejected (committed batches).
    resolved_rejected,
    /// Expired resolution records purged.
    resolutions_purged,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Outcomes of records in a batch not committed yet. They reach [`Stats`] and the recorder only
/// once the batch is committed, so a crashed or fenced batch is never counted.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) applied: u64,
    pub(crate) duplicates_redelivery: u64,
    pub(crate) duplicates_repeated_key: u64,
    pub(crate) conflicts: u64,
    pub(crate) conflicts_skipped: u64,
    /// Dead letters by [`DeadLetterReason`] (indexed by `reason_index`).
    pub(crate) dead_lettered: [u64; REASONS.len()],
    /// The resolver's decisions by outcome (in the order of `OUTCOMES`); applied ones are
    /// in `applied` too.
    pub(crate) resolved: [u64; OUTCOMES.len()],
}

impl Tally {
    pub(crate) fn duplicate(&mut self, cause: DuplicateCause) {
        match cause {
            DuplicateCause::Redelivery => self.duplicates_redelivery += 1,
            DuplicateCause::RepeatedKey => self.duplicates_repeated_key += 1,
        }
    }

    pub(crate) fn dead_letter(&mut self, reason: DeadLetterReason) {
        self.dead_lettered[reason_index(reason)] += 1;
    }

    /// Records settled in the batch (every outcome but a skipped conflict's, which is counted
    /// as a conflict only).
    fn records(&self) -> u64 {
        self.applied
            + self.duplicates_redelivery
            + self.duplicates_repeated_key
            + self.conflicts_skipped
            + self.dead_lettered.iter().sum::<u64>()
            + self.resolved[1..].iter().sum::<u64>()
    }
}

/// The resolver's outcomes, by their metric label (applied first).
const OUTCOMES: [&str; 5] = ["applied", "superseded", "stale", "conflict", "rejected"];

const REASONS: [DeadLetterReason; 4] = [
    DeadLetterReason::Permanent,
    DeadLetterReason::RetriesExhausted,
    DeadLetterReason::Conflict,
    DeadLetterReason::InvalidKey,
];

fn reason_index(reason: DeadLetterReason) -> usize {
    match reason {
        DeadLetterReason::Permanent => 0,
        DeadLetterReason::RetriesExhausted => 1,
        DeadLetterReason::Conflict => 2,
        DeadLetterReason::InvalidKey => 3,
    }
}

const RECORDS_READ: &str = "idempotent_consumer_records_read_total";
const PROCESSED: &str = "idempotent_consumer_processed_total";
const DUPLICATES: &str = "idempotent_consumer_duplicates_total";
const CONFLICTS: &str = "idempotent_consumer_conflicts_total";
const DEAD_LETTERS: &str = "idempotent_consumer_dead_letters_total";
const RETRIES: &str = "idempotent_consumer_retries_total";
const STORE_RETRIES: &str = "idempotent_consumer_store_retries_total";
const BATCHES: &str = "idempotent_consumer_batches_committed_total";
const FENCED: &str = "idempotent_consumer_fenced_commits_total";
const KAFKA_COMMIT_FAILURES: &str = "idempotent_consumer_kafka_commit_failures_total";
const EXPIRED_PURGED: &str = "idempotent_consumer_expired_purged_total";
const DEAD_LETTERS_PURGED: &str = "idempotent_consumer_dead_letters_purged_total";
const STALE_REFUSED: &str = "idempotent_consumer_stale_partitions_refused_total";
const BATCH_RECORDS: &str = "idempotent_consumer_batch_records";
const HANDLER_SECONDS: &str = "idempotent_consumer_handler_seconds";
const COMMIT_SECONDS: &str = "idempotent_consumer_commit_seconds";
const STORE_ENTRIES: &str = "idempotent_consumer_store_entries";
const RESOLUTIONS: &str = "idempotent_consumer_resolutions_total";
const RESOLUTIONS_PURGED: &str = "idempotent_consumer_resolutions_purged_total";

/// Describes every metric to the installed recorder (units and help texts).
pub(crate) fn describe() {
    metrics::describe_counter!(RECORDS_READ, "Records received from Kafka.");
    metrics::describe_counter!(PROCESSED, "Records whose handler succeeded (committed).");
    metrics::describe_counter!(DUPLICATES, "Records skipped as duplicates, by cause.");
    metrics::describe_counter!(
        CONFLICTS,
        "Records whose key was first used with another payload, by the action taken."
    );
    metrics::describe_counter!(DEAD_LETTERS, "Records kept as dead letters, by reason.");
    metrics::describe_counter!(RETRIES, "Handler retries after retryable errors.");
    metrics::describe_counter!(
        STORE_RETRIES,
        "Batches tried again after a transient store failure."
    );
    metrics::describe_counter!(BATCHES, "Batches committed to the store.");
    metrics::describe_counter!(FENCED, "Commits rejected because the partition moved on.");
    metrics::describe_counter!(
        KAFKA_COMMIT_FAILURES,
        "Advisory Kafka offset commits that failed."
    );
    metrics::describe_counter!(EXPIRED_PURGED, "Expired dedup entries purged.");
    metrics::describe_counter!(
        DEAD_LETTERS_PURGED,
        "Dead letters deleted from the store after the dead-letter retention."
    );
    metrics::describe_counter!(
        STALE_REFUSED,
        "Partition assignments refused: another store holds the partition's latest state."
    );
    metrics::describe_counter!(
        RESOLUTIONS,
        "Records the resolver decided, by outcome (applied, superseded, stale, conflict, rejected)."
    );
    metrics::describe_counter!(RESOLUTIONS_PURGED, "Expired resolution records purged.");
    metrics::describe_histogram!(BATCH_RECORDS, Unit::Count, "Records per committed batch.");
    metrics::describe_histogram!(HANDLER_SECONDS, Unit::Seconds, "Handler call latency.");
    metrics::describe_histogram!(COMMIT_SECONDS, Unit::Seconds, "Store commit latency.");
    metrics::describe_gauge!(STORE_ENTRIES, Unit::Count, "Dedup entries in the store.");
}

/// The runtime's [`Stats`] and its group-wide recorder handles (labelled by group). Every
/// report goes to both.
#[derive(Debug, Clone)]
pub(crate) struct GroupMeter {
    stats: Arc<Stats>,
    group: String,
    kafka_commit_failures: Counter,
    expired_purged: Counter,
    dead_letters_purged: Counter,
    resolutions_purged: Counter,
    store_entries: Gauge,
}

impl GroupMeter {
    pub(crate) fn new(group: &str) -> Self {
        let labels = [("group", group.to_owned())];
        GroupMeter {
            stats: Arc::default(),
            group: group.to_owned(),
            kafka_commit_failures: metrics::counter!(KAFKA_COMMIT_FAILURES, &labels),
            expired_purged: metrics::counter!(EXPIRED_PURGED, &labels),
            dead_letters_purged: metrics::counter!(DEAD_LETTERS_PURGED, &labels),
            resolutions_purged: metrics::counter!(RESOLUTIONS_PURGED, &labels),
            store_entries: metrics::gauge!(STORE_ENTRIES, &labels),
        }
    }

    /// The runtime's counters.
    pub(crate) fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub(crate) fn kafka_commit_failed(&self) {
        Stats::add(&self.stats.kafka_commit_failures, 1);
        self.kafka_commit_failures.increment(1);
    }

    pub(crate) fn purged(&self, n: u64) {
        Stats::add(&self.stats.expired_purged, n);
        self.expired_purged.increment(n);
    }

    pub(crate) fn dead_letters_purged(&self, n: u64) {
        Stats::add(&self.stats.dead_letters_purged, n);
        self.dead_letters_purged.increment(n);
    }

    #[cfg_attr(not(feature = "resolve"), allow(dead_code))]
    pub(crate) fn resolutions_purged(&self, n: u64) {
        Stats::add(&self.stats.resolutions_purged, n);
        self.resolutions_purged.increment(n);
    }

    /// A partition assignment refused as stale.
    pub(crate) fn stale_refused(&self, topic: &str, partition: i32) {
        Stats::add(&self.stats.stale_partitions_refused, 1);
        metrics::counter!(STALE_REFUSED, &self.partition_labels(topic, partition)).increment(1);
    }

    /// A transient store failure while acquiring a partition, tried again.
    pub(crate) fn acquire_retried(&self, topic: &str, partition: i32) {
        Stats::add(&self.stats.store_retries, 1);
        metrics::counter!(STORE_RETRIES, &self.partition_labels(topic, partition)).increment(1);
    }

    pub(crate) fn store_entries(&self, n: u64) {
        self.store_entries.set(n as f64);
    }

    /// The counter of records read from one partition (kept by the poll thread's route).
    pub(crate) fn records_read(&self, topic: &str, partition: i32) -> Counter {
        metrics::counter!(RECORDS_READ, &self.partition_labels(topic, partition))
    }

    fn partition_labels(&self, topic: &str, partition: i32) -> [(&'static str, String); 3] {
        [
            ("group", self.group.clone()),
            ("topic", topic.to_owned()),
            ("partition", partition.to_string()),
        ]
    }
}

/// One partition's recorder handles, registered once when the partition is assigned so the
/// record path never builds labels.
#[derive(Debug)]
pub(crate) struct PartitionMeter {
    stats: Arc<Stats>,
    processed: Counter,
    duplicates: [Counter; 2],
    /// Labelled with the action of the runtime's conflict policy.
    conflicts: Counter,
    dead_letters: [Counter; REASONS.len()],
    resolutions: [Counter; OUTCOMES.len()],
    retries: Counter,
    store_retries: Counter,
    batches: Counter,
    fenced: Counter,
    batch_records: Histogram,
    handler_seconds: Histogram,
    commit_seconds: Histogram,
}

impl PartitionMeter {
    pub(crate) fn new(
        group: &GroupMeter,
        partition: &PartitionId,
        conflict: ConflictPolicy,
    ) -> Self {
        let labels = group.partition_labels(&partition.topic, partition.partition);
        let with = |name: &'static str, value: &str| {
            let mut l = labels.to_vec();
            l.push((name, value.to_owned()));
            l
        };
        let conflict_action = match conflict {
            ConflictPolicy::DeadLetter => "dead_letter",
            ConflictPolicy::SkipAndRecord => "skip",
            ConflictPolicy::Stop => "stop",
        };
        PartitionMeter {
            stats: group.stats.clone(),
            processed: metrics::counter!(PROCESSED, &labels),
            duplicates: [DuplicateCause::Redelivery, DuplicateCause::RepeatedKey]
                .map(|c| metrics::counter!(DUPLICATES, &with("cause", c.as_str()))),
            conflicts: metrics::counter!(CONFLICTS, &with("action", conflict_action)),
            dead_letters: REASONS
                .map(|r| metrics::counter!(DEAD_LETTERS, &with("reason", r.as_str()))),
            resolutions: OUTCOMES.map(|o| metrics::counter!(RESOLUTIONS, &with("outcome", o))),
            retries: metrics::counter!(RETRIES, &labels),
            store_retries: metrics::counter!(STORE_RETRIES, &labels),
            batches: metrics::counter!(BATCHES, &labels),
            fenced: metrics::counter!(FENCED, &labels),
            batch_records: metrics::histogram!(BATCH_RECORDS, &labels),
            handler_seconds: metrics::histogram!(HANDLER_SECONDS, &labels),
            commit_seconds: metrics::histogram!(COMMIT_SECONDS, &labels),
        }
    }

    pub(crate) fn retried(&self) {
        Stats::add(&self.stats.retries, 1);
        self.retries.increment(1);
    }

    pub(crate) fn store_retried(&self) {
        Stats::add(&self.stats.store_retries, 1);
        self.store_retries.increment(1);
    }

    pub(crate) fn fenced(&self) {
        Stats::add(&self.stats.fenced_commits, 1);
        self.fenced.increment(1);
    }

    pub(crate) fn handler_latency(&self, elapsed: Duration) {
        self.handler_seconds.record(elapsed.as_secs_f64());
    }

    /// Reports a committed batch and its tally, and clears the tally.
    pub(crate) fn committed(&self, tally: &mut Tally, commit_latency: Duration) {
        Stats::add(&self.stats.batches_committed, 1);
        self.batches.increment(1);
        self.batch_records.record(tally.records() as f64);
        self.commit_seconds.record(commit_latency.as_secs_f64());
        self.flush(tally);
    }

    /// Reports the tally of a transaction that settled records without writing (every record
    /// was below the position), and clears it.
    pub(crate) fn flush(&self, tally: &mut Tally) {
        let stats = &*self.stats;
        let t = std::mem::take(tally);
        Stats::add(&stats.applied, t.applied);
        self.processed.increment(t.applied);
        Stats::add(&stats.duplicates_redelivery, t.duplicates_redelivery);
        self.duplicates[0].increment(t.duplicates_redelivery);
        Stats::add(&stats.duplicates_repeated_key, t.duplicates_repeated_key);
        self.duplicates[1].increment(t.duplicates_repeated_key);
        Stats::add(&stats.conflicts, t.conflicts);
        Stats::add(&stats.conflicts_skipped, t.conflicts_skipped);
        self.conflicts.increment(t.conflicts);
        let letters: u64 = t.dead_lettered.iter().sum();
        Stats::add(&stats.dead_lettered, letters);
        for (counter, n) in self.dead_letters.iter().zip(t.dead_lettered) {
            counter.increment(n);
        }
        let resolved = [
            &stats.resolved_applied,
            &stats.resolved_superseded,
            &stats.resolved_stale,
            &stats.resolved_conflict,
            &stats.resolved_rejected,
        ];
        for ((counter, stat), n) in self.resolutions.iter().zip(resolved).zip(t.resolved) {
            Stats::add(stat, n);
            counter.increment(n);
        }
    }
}

impl StatsSnapshot {
    /// Duplicates of both causes.
    pub fn duplicates(&self) -> u64 {
        self.duplicates_redelivery + self.duplicates_repeated_key
    }

    /// Records with an outcome, each once: applied, duplicates, dead letters (a conflict
    /// dead-lettered among them), conflicts skipped and recorded, and the resolver's decisions
    /// not to apply.
    pub fn settled(&self) -> u64 {
        self.applied
            + self.duplicates()
            + self.dead_lettered
            + self.conflicts_skipped
            + self.resolved_superseded
            + self.resolved_stale
            + self.resolved_conflict
            + self.resolved_rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_serializes_as_its_counters() {
        let stats = Stats::default();
        Stats::add(&stats.applied, 3);
        Stats::add(&stats.stale_partitions_refused, 1);
        let json = serde_json::to_value(stats.snapshot()).unwrap();
        assert_eq!(json["applied"], 3);
        assert_eq!(json["stale_partitions_refused"], 1);
        assert_eq!(json["fenced_commits"], 0);
        assert_eq!(json.as_object().unwrap().len(), 21, "every counter: {json}");
    }
}
