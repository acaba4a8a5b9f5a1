//! One partition's task: batches of records, in order, each record deduplicated and handled
//! inside the batch's store transaction.
//!
//! For every record, in order:
//! 1. an offset below the stored position is a redelivery: skipped;
//! 2. the idempotency key is derived; a record without a usable key is dead-lettered;
//! 3. the key's entry is looked up (seeing this batch's earlier writes): the same fingerprint is
//!    a duplicate (skipped, `on_duplicate` called), another fingerprint a conflict (policy);
//! 4. otherwise the handler runs after a savepoint; on success its entry is written, on error the
//!    savepoint is rolled back and the error class decides: retry (commit what came before, back
//!    off, retry in a new batch), dead-letter, or stop (commit what came before, end).
//!
//! The batch then commits through `commit.rs`. A failing record never poisons the
//! records before or after it.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode};
use tracing::Instrument;

use super::commit::{commit_batch, commit_kafka};
use super::feed::Feed;
use super::rebalance::ConsumerCtx;
use super::{ConflictPolicy, Shared};
use crate::dead_letter::{DeadLetter, DeadLetterReason};
use crate::error::{Error, Result};
use crate::handler::{DuplicateCause, ErrorClass, Handler, HandlerError};
use crate::identity::{Fingerprint, IdempotencyKey, KeyError};
use crate::metrics::{PartitionMeter, Tally};
use crate::record::Record;
use crate::retry::{Attempts, NextTry};
use crate::store::{Claim, ClaimAhead, DedupEntry, EntryStatus, PartitionId, Store, Transaction};

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What became of one record inside a batch.
enum Step {
    /// Settled (applied, duplicate, conflict or dead-lettered, as named for the record's span):
    /// the position moves past it.
    Done(&'static str),
    /// Retry it after this delay, in a new batch.
    Retry(Duration),
    /// Its key is held by another in-flight batch: commit ours (releasing our claims) and try
    /// again shortly.
    Busy,
    /// The handler failed without a savepoint to undo it: drop the transaction and handle the
    /// batch again from its first record, with savepoints; the failed run counts for the record
    /// (its error is kept, the handler is not called again for it).
    Redo,
    /// Stop before it.
    Stop(Error),
}

/// What `process` does once the open transaction has ended.
enum Then {
    /// Every pending record is settled: done.
    Finish,
    /// Sleep, then go on with the record that asked for a retry.
    Retry(Duration),
    /// Wait a moment, then go on with the record whose key was busy.
    Busy,
    /// Return this error.
    Stop(Error),
}

/// How a transaction ended.
enum Ended {
    /// Committed, or dropped with nothing settled in it.
    Committed,
    /// Its deferred writes failed before anything was written: nothing of it counts, and the
    /// batch is handled again one savepoint at a time.
    Redo,
}

/// A record waiting in its partition, with its idempotency key and fingerprint derived once on
/// arrival.
pub(crate) struct Pending {
    record: Record,
    /// The key and its scoped store key, or why the record has none.
    key: std::result::Result<(IdempotencyKey, Vec<u8>), KeyError>,
    fingerprint: Fingerprint,
}

impl Pending {
    fn store_key(&self) -> Option<&[u8]> {
        self.key.as_ref().ok().map(|(_, k)| k.as_slice())
    }
}

pub(crate) struct PartitionTask<S: Store, H> {
    pub(crate) shared: Arc<Shared<S, H>>,
    pub(crate) meter: PartitionMeter,
    pub(crate) consumer: Arc<BaseConsumer<ConsumerCtx<S>>>,
    pub(crate) partition: PartitionId,
    pub(crate) epoch: u64,
    pub(crate) position: Option<i64>,
    pub(crate) tally: Tally,
    /// Dead letters of the open transaction, produced to the topic just before it commits.
    pub(crate) letters: Vec<DeadLetter>,
    /// The current record's failed runs and when it first failed (for retries and dead
    /// letters).
    pub(crate) attempts: Attempts,
    /// A savepoint before every record, even where it costs a round trip: set once a handler
    /// failed without one, until the pending records are all committed.
    pub(crate) careful: bool,
    /// The error of a record whose handler failed without a savepoint, kept for when the redo
    /// reaches it.
    pub(crate) unguarded_failure: Option<(i64, HandlerError)>,
    /// The open transaction's clock (milliseconds since the Unix epoch), read once when it
    /// began: what claims check expiry against, and the creation time of the entries it writes,
    /// so an entry claimed ahead is exactly the one the record then leaves.
    pub(crate) batch_now: i64,
}

impl<S: Store, H: Handler<S::Tx>> PartitionTask<S, H> {
    /// Runs until its feed is closed (revocation or shutdown) and what it holds is settled, or a
    /// record stops it.
    pub(crate) async fn run(mut self, mut records: Feed<ConsumerCtx<S>>) -> Result<()> {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut store_failures = 0u32;
        let result = loop {
            if pending.is_empty() && !self.next_batch(&mut records, &mut pending).await {
                break Ok(());
            }
            match self.process(&mut pending).await {
                Ok(()) => store_failures = 0,
                Err(e) if e.is_transient() => {
                    // Nothing of the open batch counts: its records are still pending and are
                    // handled again (the next transaction starts with an empty tally); those
                    // whose commit did land are found as duplicates.
                    store_failures = store_failures.saturating_add(1);
                    self.meter.store_retried();
                    let delay = self
                        .shared
                        .config
                        .retry
                        .backoff(store_failures.min(8), None);
                    tracing::warn!(
                        topic = %self.partition.topic,
                        partition = self.partition.partition,
                        error = %e,
                        failures = store_failures,
                        ?delay,
                        "transient store failure; trying the batch again"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => break Err(e),
            }
        };
        if result.is_ok()
            && let Some(next) = self.position
        {
            // Last word to Kafka before the partition is released.
            let (consumer, partition, shared) = (
                self.consumer.clone(),
                self.partition.clone(),
                self.shared.clone(),
            );
            let _ = tokio::task::spawn_blocking(move || {
                commit_kafka(&consumer, &partition, next, CommitMode::Sync, &shared.meter);
            })
            .await;
        }
        result
    }

    /// Waits for a record, then gathers more until the batch is full or the linger time passed.
    /// Returns false once the feed is closed.
    async fn next_batch(
        &self,
        records: &mut Feed<ConsumerCtx<S>>,
        batch: &mut VecDeque<Pending>,
    ) -> bool {
        let config = &self.shared.config;
        let Some(first) = records.recv().await else {
            return false;
        };
        let pending = |record: Record| {
            let key = config.identity.key_of(&record).map(|key| {
                let store_key = config.scope.store_key(&key);
                (key, store_key)
            });
            let fingerprint = Fingerprint::of(record.payload());
            Pending {
                record,
                key,
                fingerprint,
            }
        };
        batch.push_back(pending(first));
        let deadline = tokio::time::Instant::now() + config.batch_linger;
        while batch.len() < config.batch_max_records {
            match records.try_recv() {
                Some(record) => batch.push_back(pending(record)),
                None if records.wait_until(deadline).await => {}
                None => break,
            }
        }
        true
    }

    /// Processes and commits the pending records, retrying in place; leaves `pending` empty
    /// unless it fails. Records leave `pending` only once their batch committed, so a failed
    /// commit leaves them to be tried again.
    async fn process(&mut self, pending: &mut VecDeque<Pending>) -> Result<()> {
        let shared = self.shared.clone();
        let mut tx = self.begin(pending).await?;
        let mut next = self.position;
        let mut busy_waits = 0u64;
        // pending[..settled] are settled in the open transaction.
        let mut settled = 0usize;
        loop {
            // What to do once the open transaction has ended, if the loop gets there.
            let then = match pending.get(settled) {
                None => Then::Finish,
                Some(item) => match self.record(&mut tx, item).await? {
                    Step::Done(_) => {
                        // Never backwards: a redelivery below the position leaves it where it is.
                        let offset = item.record.offset();
                        next = Some(next.map_or(offset + 1, |n| n.max(offset + 1)));
                        self.attempts = Attempts::default();
                        settled += 1;
                        continue;
                    }
                    Step::Redo => {
                        // Nothing of this transaction counts; its records are handled again.
                        drop(tx);
                        (next, settled) = (self.position, 0);
                        tx = self.begin_careful(pending).await?;
                        continue;
                    }
                    Step::Retry(delay) => Then::Retry(delay),
                    Step::Busy => Then::Busy,
                    Step::Stop(e) => Then::Stop(e),
                },
            };
            if let Ended::Redo = self.end(tx, next).await? {
                // The deferred writes failed at the commit, before anything was written.
                (next, settled) = (self.position, 0);
                tx = self.begin_careful(pending).await?;
                continue;
            }
            pending.drain(..settled);
            settled = 0;
            match then {
                Then::Retry(delay) => {
                    self.meter.retried();
                    tokio::time::sleep(delay).await;
                }
                Then::Busy => {
                    busy_waits += 1;
                    // Grows and is jittered, so two partitions that keep meeting on the same
                    // keys fall out of step.
                    let wait = shared.config.retry.backoff(busy_waits.min(6) as u32, None) / 20;
                    tokio::time::sleep(wait).await;
                }
                Then::Stop(e) => return Err(e),
                Then::Finish => {
                    self.careful = false;
                    self.unguarded_failure = None;
                    return Ok(());
                }
            }
            tx = self.begin(pending).await?;
        }
    }

    /// Opens a transaction for the pending records again, this time with a savepoint before
    /// each record (until they are all committed): a handler failed without one, or the
    /// deferred writes failed at the commit.
    async fn begin_careful(&mut self, pending: &VecDeque<Pending>) -> Result<S::Tx> {
        self.careful = true;
        self.begin(pending).await
    }

    /// Opens a transaction for the pending records and claims their keys in one go, where the
    /// store can. A new transaction starts with nothing of a previous one: an earlier
    /// transaction either committed (and flushed its tally) or failed (and counts for nothing).
    async fn begin(&mut self, pending: &VecDeque<Pending>) -> Result<S::Tx> {
        self.tally = Tally::default();
        self.letters.clear();
        self.batch_now = now_ms();
        let mut tx = self.shared.store.begin(&self.partition, self.epoch).await?;
        let now = self.batch_now;
        let expires_at_ms = self.expires_at(now);
        let claims: Vec<ClaimAhead<'_>> = pending
            .iter()
            .filter(|p| self.position.is_none_or(|pos| p.record.offset() >= pos))
            .filter_map(|p| {
                Some(ClaimAhead {
                    key: p.store_key()?,
                    fingerprint: p.fingerprint,
                    topic: p.record.topic(),
                    partition: p.record.partition(),
                    offset: p.record.offset(),
                    created_at_ms: now,
                    expires_at_ms,
                })
            })
            .collect();
        if !claims.is_empty() {
            tx.prepare_claims(&claims, now).await?;
        }
        Ok(tx)
    }

    /// Ends the open transaction before anything else begins: commits it when records settled,
    /// drops it (writing nothing, releasing its claims) otherwise. A new transaction must never
    /// start while this one lives, or it could wait on this one's claims.
    async fn end(&mut self, tx: S::Tx, next: Option<i64>) -> Result<Ended> {
        match next {
            Some(n) => self.commit(tx, n).await,
            None => {
                drop(tx);
                Ok(Ended::Committed)
            }
        }
    }

    async fn commit(&mut self, mut tx: S::Tx, next: i64) -> Result<Ended> {
        if let Err(error) = tx.write_deferred().await? {
            if self.careful {
                // One savepoint at a time, each record's deferred writes went out after its
                // handler: nothing should be left to fail here.
                return Err(Error::store(
                    "writing deferred rows at the commit",
                    error.to_string(),
                ));
            }
            tracing::warn!(
                topic = %self.partition.topic,
                partition = self.partition.partition,
                error = %error,
                "deferred rows failed at the commit; handling the batch again record by record"
            );
            return Ok(Ended::Redo);
        }
        if let Some(producer) = &self.shared.dead_letters
            && !self.letters.is_empty()
        {
            // Acknowledged before the commit that marks the keys dead-lettered.
            producer.send_all(&self.letters).await?;
        }
        self.letters.clear();
        if self.position == Some(next) {
            // Nothing moved (every record was below the position); nothing to write.
            self.meter.flush(&mut self.tally);
            return Ok(Ended::Committed);
        }
        let group = &self.shared.meter;
        let latency = commit_batch(
            tx,
            &self.partition,
            next,
            &self.consumer,
            group,
            &self.meter,
        )
        .await?;
        self.position = Some(next);
        self.meter.committed(&mut self.tally, latency);
        Ok(Ended::Committed)
    }

    async fn record(&mut self, tx: &mut S::Tx, item: &Pending) -> Result<Step> {
        let record = &item.record;
        let span = tracing::info_span!(
            "record",
            topic = %record.topic(),
            partition = record.partition(),
            offset = record.offset(),
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        async {
            let step = self.decide(tx, item).await;
            if let Ok(step) = &step {
                let outcome = match step {
                    Step::Done(outcome) => outcome,
                    Step::Retry(_) => "retry",
                    Step::Busy => "busy",
                    Step::Redo => "redo",
                    Step::Stop(_) => "stop",
                };
                tracing::Span::current().record("outcome", outcome);
            }
            step
        }
        .instrument(span)
        .await
    }

    async fn decide(&mut self, tx: &mut S::Tx, item: &Pending) -> Result<Step> {
        let record = &item.record;
        let shared = self.shared.clone();
        let config = &shared.config;
        let span = tracing::Span::current();

        if self.position.is_some_and(|p| record.offset() < p) {
            self.tally.duplicate(DuplicateCause::Redelivery);
            tracing::debug!("below the stored position: redelivery skipped");
            if let Some(store_key) = item.store_key()
                && let Some(entry) = tx.lookup(store_key).await?
            {
                shared
                    .handler
                    .on_duplicate(record, &entry, DuplicateCause::Redelivery)
                    .await;
            }
            return Ok(Step::Done("duplicate"));
        }

        let (key, store_key) = match &item.key {
            Ok((key, store_key)) => (key, store_key.as_slice()),
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(%message, "record without a usable idempotency key");
                self.dead_letter(tx, record, None, DeadLetterReason::InvalidKey, message, 0)
                    .await?;
                return Ok(Step::Done("dead_lettered"));
            }
        };
        span.record("key", tracing::field::display(key));
        let now = self.batch_now;
        let fingerprint = item.fingerprint;
        let existing = match tx.claim(store_key, now).await? {
            Claim::Claimed => None,
            Claim::Existing(entry) => Some(entry),
            Claim::Busy => {
                tracing::debug!("key in flight in another batch; waiting for it");
                return Ok(Step::Busy);
            }
        };
        if let Some(entry) = existing {
            if entry.fingerprint == fingerprint {
                self.duplicate(record, &entry).await;
                return Ok(Step::Done("duplicate"));
            }
            return self
                .conflict(tx, record, key, &entry, fingerprint, now)
                .await;
        }

        // Where a savepoint costs a round trip, records run without one until a handler fails.
        let guarded = self.careful || !<S::Tx as Transaction>::SAVEPOINT_ROUND_TRIP;
        if guarded {
            tx.savepoint().await?;
        }
        // A panic is a handler error, not the end of the runtime. Deterministic on the same
        // input as far as the runtime can tell, so it is permanent: the record is kept as a
        // dead letter. The transaction is not left half-written: the savepoint undoes it.
        let mut result = match self
            .unguarded_failure
            .take_if(|(offset, _)| *offset == record.offset())
        {
            // It failed in a transaction that was dropped for want of a savepoint: that run
            // counts, and the handler is not called again for it.
            Some((_, error)) => Err(error),
            None => {
                let started = std::time::Instant::now();
                let result = AssertUnwindSafe(shared.handler.handle(record, tx))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        Err(HandlerError::permanent(format!(
                            "handler panicked: {}",
                            panic_message(&*panic)
                        )))
                    });
                self.meter.handler_latency(started.elapsed());
                result
            }
        };
        if guarded
            && result.is_ok()
            && let Err(error) = tx.write_deferred().await?
        {
            // Written now, after a savepoint, so a failure is this record's.
            result = Err(error);
        }
        let conflicted = tx.take_conflict();
        if !guarded && (conflicted || result.is_err()) {
            if let Err(error) = result {
                self.unguarded_failure = Some((record.offset(), error));
            }
            return Ok(Step::Redo);
        }
        if conflicted {
            // It read or wrote state another in-flight batch holds: whatever it returned was
            // computed on state that may change. Undo and handle it again after our commit.
            tx.rollback_to_savepoint().await?;
            tracing::debug!("state in flight in another batch; handling the record again");
            return Ok(Step::Busy);
        }
        let error = match result {
            Ok(outcome) => {
                let entry = self.entry(
                    record,
                    fingerprint,
                    EntryStatus::Completed,
                    outcome.into_bytes(),
                    now,
                );
                tx.put_entry(store_key, &entry).await?;
                self.tally.applied += 1;
                return Ok(Step::Done("applied"));
            }
            Err(error) => error,
        };
        tx.rollback_to_savepoint().await?;
        let message = error.to_string();
        let (reason, attempts) = match error.class() {
            ErrorClass::Retryable => {
                match self
                    .attempts
                    .failed(&config.retry, error.retry_delay(), now_ms())
                {
                    NextTry::After(delay) => {
                        let attempts = self.attempts.failures();
                        tracing::warn!(%message, attempts, ?delay, "retryable handler error");
                        return Ok(Step::Retry(delay));
                    }
                    bound => {
                        let attempts = self.attempts.failures();
                        let bound = match bound {
                            NextTry::TimeExhausted => "retry time",
                            _ => "attempts",
                        };
                        tracing::error!(%message, attempts, bound, "retries exhausted; dead-lettering");
                        (DeadLetterReason::RetriesExhausted, attempts)
                    }
                }
            }
            ErrorClass::Permanent => {
                tracing::error!(%message, "permanent handler error; dead-lettering");
                (DeadLetterReason::Permanent, self.attempts.count())
            }
            ErrorClass::Fatal => {
                tracing::error!(%message, "fatal handler error; stopping before this record");
                return Ok(Step::Stop(Error::HandlerFatal {
                    at: record.position(),
                    message,
                }));
            }
        };
        self.dead_letter(
            tx,
            record,
            Some((key, store_key, fingerprint)),
            reason,
            message,
            attempts,
        )
        .await?;
        Ok(Step::Done("dead_lettered"))
    }

    /// Skips a record whose key has an entry with the same fingerprint.
    async fn duplicate(&mut self, record: &Record, entry: &DedupEntry) {
        let same_record = entry.topic == record.topic()
            && entry.partition == record.partition()
            && entry.offset == record.offset();
        let cause = if same_record {
            DuplicateCause::Redelivery
        } else {
            DuplicateCause::RepeatedKey
        };
        self.tally.duplicate(cause);
        tracing::info!(
            cause = cause.as_str(),
            first_offset = entry.offset,
            "duplicate skipped"
        );
        self.shared.handler.on_duplicate(record, entry, cause).await;
    }

    /// A record whose key was first used by `first` with another payload. Unless the policy
    /// stops, the record gets an entry of its own under its key and fingerprint, committed with
    /// its dead letter, so a redelivery or replay of it is a duplicate, not a second conflict.
    async fn conflict(
        &mut self,
        tx: &mut S::Tx,
        record: &Record,
        key: &IdempotencyKey,
        first: &DedupEntry,
        fingerprint: Fingerprint,
        now: i64,
    ) -> Result<Step> {
        let shared = self.shared.clone();
        let policy = shared.config.conflict;
        // Unless the policy stops, the record is remembered under its own key: a replay of it
        // finds that entry and is a duplicate.
        let conflict_key = if policy == ConflictPolicy::Stop {
            None
        } else {
            let conflict_key = shared.config.conflict_scope.conflict_key(key, &fingerprint);
            match tx.claim(&conflict_key, now).await? {
                Claim::Claimed => Some(conflict_key),
                Claim::Existing(entry) => {
                    // Fingerprints match: it is part of the key.
                    self.duplicate(record, &entry).await;
                    return Ok(Step::Done("duplicate"));
                }
                Claim::Busy => return Ok(Step::Busy),
            }
        };
        self.tally.conflicts += 1;
        let message = format!(
            "idempotency key {key} was first used at {}/{}@{} with a different payload",
            first.topic, first.partition, first.offset
        );
        tracing::warn!(%message, policy = ?policy, "conflict");
        shared.handler.on_conflict(record, first).await;
        let Some(conflict_key) = conflict_key else {
            return Ok(Step::Stop(Error::Stopped {
                at: record.position(),
                reason: message,
            }));
        };
        let dl = dead_letter(
            record,
            Some(key),
            DeadLetterReason::Conflict,
            message,
            0,
            now,
        );
        self.keep(tx, &dl, Some((&conflict_key, fingerprint)))
            .await?;
        if policy == ConflictPolicy::SkipAndRecord {
            // Kept in the store's log only; not produced to the dead-letter topic.
            self.tally.conflicts_skipped += 1;
            return Ok(Step::Done("conflict_skipped"));
        }
        self.letters.push(dl);
        self.tally.dead_letter(DeadLetterReason::Conflict);
        Ok(Step::Done("dead_lettered"))
    }

    fn entry(
        &self,
        record: &Record,
        fingerprint: Fingerprint,
        status: EntryStatus,
        outcome: Option<Vec<u8>>,
        now: i64,
    ) -> DedupEntry {
        DedupEntry {
            status,
            fingerprint,
            outcome,
            topic: record.topic().to_owned(),
            partition: record.partition(),
            offset: record.offset(),
            created_at_ms: now,
            expires_at_ms: self.expires_at(now),
        }
    }

    /// When an entry created at `created_ms` expires. One place for claims made ahead and the
    /// entries records leave, which must agree for the store to skip a second write.
    fn expires_at(&self, created_ms: i64) -> i64 {
        let retention = i64::try_from(self.shared.config.retention.as_millis()).unwrap_or(i64::MAX);
        created_ms.saturating_add(retention)
    }

    /// Keeps the record as a dead letter and, when it has a key, marks the key dead-lettered in
    /// the same transaction so a redelivery is a duplicate instead of a second dead letter.
    async fn dead_letter(
        &mut self,
        tx: &mut S::Tx,
        record: &Record,
        key: Option<(&IdempotencyKey, &[u8], Fingerprint)>,
        reason: DeadLetterReason,
        message: String,
        attempts: u32,
    ) -> Result<()> {
        let first_failure = self.attempts.first_failure_ms().unwrap_or_else(now_ms);
        let dl = dead_letter(
            record,
            key.map(|k| k.0),
            reason,
            message,
            attempts,
            first_failure,
        );
        self.keep(tx, &dl, key.map(|(_, store_key, fp)| (store_key, fp)))
            .await?;
        self.letters.push(dl);
        self.tally.dead_letter(reason);
        Ok(())
    }

    /// Writes a dead letter to the store and, under `entry_key`, a dead-lettered entry for its
    /// record, in the open transaction.
    async fn keep(
        &self,
        tx: &mut S::Tx,
        dl: &DeadLetter,
        entry_key: Option<(&[u8], Fingerprint)>,
    ) -> Result<()> {
        tx.put_dead_letter(dl).await?;
        if let Some((store_key, fingerprint)) = entry_key {
            let entry = self.entry(
                &dl.record,
                fingerprint,
                EntryStatus::DeadLettered,
                None,
                dl.failed_at_ms,
            );
            tx.put_entry(store_key, &entry).await?;
        }
        Ok(())
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

fn dead_letter(
    record: &Record,
    key: Option<&IdempotencyKey>,
    reason: DeadLetterReason,
    message: String,
    attempts: u32,
    first_failed_at_ms: i64,
) -> DeadLetter {
    DeadLetter {
        record: record.clone(),
        key: key.map(|k| k.as_bytes().to_vec()),
        reason,
        message,
        attempts,
        first_failed_at_ms,
        failed_at_ms: now_ms(),
    }
}
