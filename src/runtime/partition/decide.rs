//! What becomes of one record inside its batch's transaction, in named steps:
//!
//! 1. **Redelivery**: an offset below the stored position was committed before: skipped.
//! 2. **Key**: a record without a usable idempotency key, or with a header the Kafka client
//!    could not read, is dead-lettered.
//! 3. **Claim**: the key is claimed in the transaction (seeing this batch's earlier writes). A
//!    live entry with the same fingerprint is a duplicate (skipped, `on_duplicate` called),
//!    with another fingerprint a conflict (the policy decides); a key held by another in-flight
//!    batch makes the record wait.
//! 4. **Apply**: the handler runs after a savepoint (where savepoints are free, or once one was
//!    needed); on success the record's entry is written.
//! 5. **Failure**: the savepoint is rolled back and the error's class decides: retry later,
//!    dead-letter, or stop before the record.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tracing::Instrument;

use super::resolve::Resolved;
use super::{PartitionTask, Pending, now_ms};
use crate::dead_letter::{DeadLetter, DeadLetterReason};
use crate::error::{Error, Result};
use crate::handler::{DuplicateCause, ErrorClass, Handler, HandlerError, Outcome, panic_message};
use crate::identity::{Fingerprint, IdempotencyKey};
use crate::record::Record;
use crate::retry::NextTry;
use crate::runtime::ConflictPolicy;
use crate::store::{Claim, DedupEntry, DeferredWrites, EntryStatus, Store, Transaction};

/// What became of one record inside a batch.
pub(super) enum Step {
    /// Settled (applied, duplicate, conflict or dead-lettered, as named for the record's span):
    /// the position moves past it.
    Done(&'static str),
    /// Retry it after this delay, in a new batch.
    Retry(Duration),
    /// Its key, or state it touched, is held by another in-flight batch: commit ours (releasing
    /// our claims) and try again shortly.
    Busy,
    /// The handler failed without a savepoint to undo it: drop the transaction and handle the
    /// batch again from its first record, with savepoints; the failed run counts for the record
    /// (its error is kept, the handler is not called again for it).
    HandleAgain,
    /// Stop before it.
    Stop(Error),
}

impl<S: Store, H: Handler<S::Tx>> PartitionTask<S, H> {
    /// Decides one record in its `tracing` span, which names the outcome.
    pub(super) async fn record(&mut self, tx: &mut S::Tx, item: &Pending) -> Result<Step> {
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
                    Step::HandleAgain => "handle_again",
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
        // 1. Redelivery.
        if self.position.is_some_and(|p| record.offset() < p) {
            return self.redelivery(tx, item).await;
        }
        // 2. Key (and a record that could not be read whole).
        if let Some(message) = record.unreadable() {
            tracing::warn!(%message, "record with an unreadable header");
            self.dead_letter(tx, record, None, DeadLetterReason::Permanent, message, 0)
                .await?;
            return Ok(Step::Done("dead_lettered"));
        }
        let (key, store_key) = match &item.key {
            Ok(key) => (key, key.store_key()),
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(%message, "record without a usable idempotency key");
                self.dead_letter(tx, record, None, DeadLetterReason::InvalidKey, message, 0)
                    .await?;
                return Ok(Step::Done("dead_lettered"));
            }
        };
        tracing::Span::current().record("key", tracing::field::display(key));
        // 3. Claim.
        match tx.claim(store_key, self.batch_now).await? {
            Claim::Claimed => {}
            Claim::Busy => {
                tracing::debug!("key in flight in another batch; waiting for it");
                return Ok(Step::Busy);
            }
            Claim::Existing(entry) if entry.fingerprint == item.fingerprint => {
                self.duplicate(record, &entry).await;
                return Ok(Step::Done("duplicate"));
            }
            Claim::Existing(entry) => {
                return self
                    .conflict(tx, record, key, &entry, item.fingerprint)
                    .await;
            }
        }
        // 3b. Resolve (feature `resolve`): the entity's winner decides whether it runs.
        #[cfg(feature = "resolve")]
        if self.shared.config.resolver.is_some() {
            // The shared config, not the resolver, is what is copied (an `Arc`).
            let shared = self.shared.clone();
            let resolver = shared.config.resolver.as_ref().expect("checked");
            return self.resolve(tx, item, key, store_key, resolver).await;
        }
        // 4. Apply; 5. failure.
        self.apply(tx, item, key, store_key, None).await
    }

    /// A record below the stored position: counted, and reported with its stored entry.
    async fn redelivery(&mut self, tx: &mut S::Tx, item: &Pending) -> Result<Step> {
        self.tally.duplicate(DuplicateCause::Redelivery);
        tracing::debug!("below the stored position: redelivery skipped");
        if let Some(store_key) = item.store_key()
            && let Some(entry) = tx.lookup(store_key).await?
        {
            let handler = &self.shared.handler;
            let cause = DuplicateCause::Redelivery;
            hook(
                "on_duplicate",
                handler.on_duplicate(&item.record, &entry, cause),
            )
            .await;
        }
        Ok(Step::Done("duplicate"))
    }

    /// Runs the handler for a record whose key this transaction claimed; on success writes its
    /// entry (and what the resolver decided for it, when one did), on failure rolls it back and
    /// classifies the error.
    pub(super) async fn apply(
        &mut self,
        tx: &mut S::Tx,
        item: &Pending,
        key: &IdempotencyKey,
        store_key: &[u8],
        resolved: Option<Resolved>,
    ) -> Result<Step> {
        let record = &item.record;
        // Where a savepoint costs a round trip, records run without one until a handler fails.
        let guarded = self.savepoint_each || !<S::Tx as Transaction>::SAVEPOINT_ROUND_TRIP;
        if guarded {
            tx.savepoint().await?;
        }
        tx.begin_record(store_key, record);
        let mut result = match self.run_handler(tx, record).await {
            // The store's failure of the whole transaction (a deadlock on the handler's own
            // statements): the batch is tried again, not this record's attempt.
            Err(error) if tx.is_transient_failure(&error) => {
                return Err(Error::store_transient(
                    format!(
                        "the handler's statements for {}/{}@{}",
                        record.topic(),
                        record.partition(),
                        record.offset()
                    ),
                    error,
                ));
            }
            result => result,
        };
        if guarded
            && result.is_ok()
            && let DeferredWrites::Rejected(error) = tx.write_deferred().await?
        {
            // Written now, after a savepoint, so a refusal is this record's.
            result = Err(error);
        }
        let conflicted = tx.take_conflict();
        if !guarded && (conflicted || result.is_err()) {
            if let Err(error) = result {
                self.failed_without_savepoint = Some((record.offset(), error));
            }
            return Ok(Step::HandleAgain);
        }
        if conflicted {
            // It read or wrote state another in-flight batch holds: whatever it returned was
            // computed on state that may change. Undo and handle it again after our commit.
            tx.rollback_to_savepoint().await?;
            tracing::debug!("state in flight in another batch; handling the record again");
            return Ok(Step::Busy);
        }
        match result {
            Ok(outcome) => {
                if let Some(resolved) = &resolved {
                    self.write_resolved(tx, resolved).await?;
                }
                let entry = self.entry(
                    record,
                    item.fingerprint,
                    EntryStatus::Completed,
                    outcome.into_bytes(),
                    self.batch_now,
                );
                tx.put_entry(store_key, &entry).await?;
                self.tally.applied += 1;
                Ok(Step::Done("applied"))
            }
            Err(error) => {
                tx.rollback_to_savepoint().await?;
                self.failure(tx, item, key, store_key, error).await
            }
        }
    }

    /// The handler's result for `record`. A panic is a handler error, not the end of the
    /// runtime: deterministic on the same input as far as the runtime can tell, so permanent.
    /// The transaction is not left half-written: the savepoint undoes it.
    pub(super) async fn run_handler(
        &mut self,
        tx: &mut S::Tx,
        record: &Record,
    ) -> std::result::Result<Outcome, HandlerError> {
        if let Some((_, error)) = self
            .failed_without_savepoint
            .take_if(|(offset, _)| *offset == record.offset())
        {
            // It failed in a transaction that was dropped for want of a savepoint: that run
            // counts, and the handler is not called again for it.
            return Err(error);
        }
        let started = std::time::Instant::now();
        let result = AssertUnwindSafe(self.shared.handler.handle(record, tx))
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

    /// A failed record, rolled back: retried after a delay, dead-lettered, or the stop.
    pub(super) async fn failure(
        &mut self,
        tx: &mut S::Tx,
        item: &Pending,
        key: &IdempotencyKey,
        store_key: &[u8],
        error: HandlerError,
    ) -> Result<Step> {
        let record = &item.record;
        let message = error.to_string();
        let (reason, attempts) = match error.class() {
            ErrorClass::Retryable => {
                let retry = &self.shared.config.retry;
                let next = self.attempts.failed(retry, error.retry_delay(), now_ms());
                let attempts = self.attempts.failures();
                match next {
                    NextTry::After(delay) => {
                        tracing::warn!(%message, attempts, ?delay, "retryable handler error");
                        return Ok(Step::Retry(delay));
                    }
                    bound => {
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
        let entry_key = Some((key, store_key, item.fingerprint));
        self.dead_letter(tx, record, entry_key, reason, message, attempts)
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
        hook(
            "on_duplicate",
            self.shared.handler.on_duplicate(record, entry, cause),
        )
        .await;
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
    ) -> Result<Step> {
        let shared = self.shared.clone();
        let policy = shared.config.conflict;
        let now = self.batch_now;
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
        hook("on_conflict", shared.handler.on_conflict(record, first)).await;
        let Some(conflict_key) = conflict_key else {
            return Ok(Step::Stop(Error::Stopped {
                at: record.position(),
                reason: message,
            }));
        };
        let dl = new_dead_letter(
            record,
            Some(key),
            DeadLetterReason::Conflict,
            message,
            0,
            now,
            self.batch_id(),
        );
        self.store_dead_letter(tx, &dl, Some((&conflict_key, fingerprint)))
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

    pub(super) fn entry(
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
    pub(super) fn expires_at(&self, created_ms: i64) -> i64 {
        let retention = i64::try_from(self.shared.config.retention.as_millis()).unwrap_or(i64::MAX);
        created_ms.saturating_add(retention)
    }

    /// Keeps the record as a dead letter (in the store, and for the topic) and, when it has a
    /// key, marks the key dead-lettered in the same transaction so a redelivery is a duplicate
    /// instead of a second dead letter.
    pub(super) async fn dead_letter(
        &mut self,
        tx: &mut S::Tx,
        record: &Record,
        key: Option<(&IdempotencyKey, &[u8], Fingerprint)>,
        reason: DeadLetterReason,
        message: String,
        attempts: u32,
    ) -> Result<()> {
        let first_failure = self.attempts.first_failure_ms().unwrap_or_else(now_ms);
        let dl = new_dead_letter(
            record,
            key.map(|k| k.0),
            reason,
            message,
            attempts,
            first_failure,
            self.batch_id(),
        );
        self.store_dead_letter(tx, &dl, key.map(|(_, store_key, fp)| (store_key, fp)))
            .await?;
        self.letters.push(dl);
        self.tally.dead_letter(reason);
        Ok(())
    }

    /// Writes a dead letter to the store and, under `entry_key`, a dead-lettered entry for its
    /// record, in the open transaction.
    async fn store_dead_letter(
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

/// Runs a hook of the handler. A panic in it is logged and goes no further: the record's
/// outcome stands, as it would had the hook returned.
async fn hook(name: &'static str, hook: impl Future<Output = ()>) {
    if let Err(panic) = AssertUnwindSafe(hook).catch_unwind().await {
        let message = panic_message(&*panic);
        tracing::error!(
            hook = name,
            panic = message,
            "hook panicked; the record's outcome stands"
        );
    }
}

fn new_dead_letter(
    record: &Record,
    key: Option<&IdempotencyKey>,
    reason: DeadLetterReason,
    message: String,
    attempts: u32,
    first_failed_at_ms: i64,
    batch_id: String,
) -> DeadLetter {
    DeadLetter {
        record: record.clone(),
        key: key.map(|k| k.as_bytes().to_vec()),
        reason,
        message,
        attempts,
        first_failed_at_ms,
        failed_at_ms: now_ms(),
        batch_id: Some(batch_id),
    }
}
