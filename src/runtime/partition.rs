//! One partition's task: batches of records, in order, each record deduplicated and handled
//! inside the batch's store transaction.
//!
//! The task gathers a batch (bounded by count and linger time), opens a transaction and claims
//! the batch's keys at once where the store can, decides each record in order (`decide.rs`:
//! redelivery, key, claim, duplicate or conflict, handler, failure), and ends the transaction
//! through the commit protocol (`commit.rs`). A record that must wait (a retry's backoff, a key
//! busy in another batch) first commits what was settled before it; a failing record never
//! poisons the records before or after it. Records leave the pending queue only once their batch
//! committed, so a failed commit leaves them to be handled again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use super::commit::{CommitContext, Committed, KafkaCommitter, commit_batch};
use super::feed::Feed;
use super::rebalance::ConsumerCtx;
use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};
use crate::handler::{Handler, HandlerError};
use crate::identity::{Fingerprint, IdempotencyKey, KeyError};
use crate::metrics::{PartitionMeter, Tally};
use crate::record::Record;
use crate::retry::Attempts;
use crate::store::{ClaimAhead, PartitionId, Store, Transaction};

mod decide;
mod resolve;

use decide::Step;

pub(crate) use crate::store::now_ms;

/// A record waiting this long for a key another in-flight batch holds is logged as a warning
/// (again at most every `BUSY_WARN_EVERY`), naming the key's holder where the store knows it.
const BUSY_WARN_AFTER: Duration = Duration::from_secs(10);
const BUSY_WARN_EVERY: Duration = Duration::from_secs(30);

/// What the batch loop does once the open transaction has ended.
enum AfterCommit {
    /// Every pending record is settled: done.
    Finish,
    /// The transaction has been open for long enough: go on in a new one.
    Continue,
    /// Sleep, then go on with the record that asked for a retry.
    Retry(Duration),
    /// Wait a moment, then go on with the record whose key was busy (its holder, if known).
    Busy(Option<String>),
    /// Return this error.
    Stop(Error),
}

/// A record waiting in its partition, with its idempotency key and fingerprint derived once on
/// arrival.
struct Pending {
    record: Record,
    /// The key (with its scoped store key), or why the record has none.
    key: std::result::Result<IdempotencyKey, KeyError>,
    fingerprint: Fingerprint,
}

impl Pending {
    fn store_key(&self) -> Option<&[u8]> {
        self.key.as_ref().ok().map(IdempotencyKey::store_key)
    }
}

pub(crate) struct PartitionTask<S: Store, H> {
    shared: Arc<Shared<S, H>>,
    meter: PartitionMeter,
    /// Commits the partition's position to Kafka (step 5 of the commit protocol).
    kafka: Arc<KafkaCommitter>,
    partition: PartitionId,
    epoch: u64,
    /// The stored position: the next offset to handle, once the store has one.
    position: Option<i64>,
    /// What the open transaction settled, counted when it commits.
    tally: Tally,
    /// Dead letters of the open transaction, produced to the topic just before it commits.
    letters: Vec<DeadLetter>,
    /// The open transaction's id, new for every attempt at a batch and made by its first dead
    /// letter (most batches have none): its dead letters carry it (`dlq.batch.id` on the
    /// topic), so a letter produced by an attempt that then failed to commit is told apart
    /// from the store's letters, which only committed attempts wrote.
    batch_id: Option<String>,
    /// The current record's failed runs and when it first failed (for retries and dead
    /// letters).
    attempts: Attempts,
    /// A savepoint before every record, even where it costs a round trip: set once a handler
    /// failed without one, until the pending records are all committed.
    savepoint_each: bool,
    /// The error of a record whose handler failed without a savepoint, kept for when the batch,
    /// handled again, reaches it.
    failed_without_savepoint: Option<(i64, HandlerError)>,
    /// The open transaction's clock (milliseconds since the Unix epoch), read once when it
    /// began: what claims check expiry against, and the creation time of the entries it writes,
    /// so an entry claimed ahead is exactly the one the record then leaves.
    batch_now: i64,
    /// When the open transaction began, for `tx_budget`.
    tx_began: std::time::Instant,
    /// How long a transaction may stay open before what it settled is committed: half the
    /// store's transaction time limit, if it has one.
    tx_budget: Option<Duration>,
}

impl<S: Store, H: Handler<S::Tx>> PartitionTask<S, H> {
    /// The task of a partition just acquired at `epoch`, resuming at the stored `position`.
    pub(crate) fn new(
        shared: Arc<Shared<S, H>>,
        kafka: Arc<KafkaCommitter>,
        partition: PartitionId,
        epoch: u64,
        position: Option<i64>,
    ) -> Self {
        let meter = PartitionMeter::new(&shared.meter, &partition, shared.config.conflict);
        let tx_budget = shared.store.transaction_time_limit().map(|limit| limit / 2);
        if let Some(next) = position {
            // Kafka's offset may lag the stored position the partition resumes at: the last
            // commit of its previous owner (this instance, or another sharing the store) may
            // have failed in the rebalance, and a partition already at its end commits nothing
            // more.
            kafka.submit(&partition, next);
        }
        PartitionTask {
            shared,
            meter,
            kafka,
            partition,
            epoch,
            position,
            tally: Tally::default(),
            letters: Vec::new(),
            batch_id: None,
            attempts: Attempts::default(),
            savepoint_each: false,
            failed_without_savepoint: None,
            batch_now: 0,
            tx_began: std::time::Instant::now(),
            tx_budget,
        }
    }

    /// Runs until its feed is closed (revocation or shutdown) and what it holds is settled, or a
    /// record stops it.
    pub(crate) async fn run(mut self, mut records: Feed<ConsumerCtx<S>>) -> Result<()> {
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut store_failures = 0u32;
        let mut failing_since: Option<std::time::Instant> = None;
        let result = loop {
            if pending.is_empty() && !self.next_batch(&mut records, &mut pending).await {
                // Closed, or records the client cannot read after everything before them.
                break records.take_failure().map_or(Ok(()), Err);
            }
            match self.process(&mut pending).await {
                Ok(()) => (store_failures, failing_since) = (0, None),
                Err(e) if e.is_transient() => {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    let bound = self.shared.config.store_retry_timeout;
                    if since.elapsed() >= bound {
                        break Err(Error::store(
                            format!(
                                "{}/{}: the store failed {} times in a row over {:?}, the \
                                 store_retry_timeout; the last failure",
                                self.partition.topic,
                                self.partition.partition,
                                store_failures + 1,
                                since.elapsed(),
                            ),
                            e,
                        ));
                    }
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
            // Last word to Kafka before the partition is released, after every earlier
            // commit of it.
            self.kafka.commit_and_wait(&self.partition, next).await;
        }
        result
    }

    /// Waits for a record, then gathers more until the batch is full or the linger time passed.
    /// Returns false once the feed is closed.
    async fn next_batch(
        &mut self,
        records: &mut Feed<ConsumerCtx<S>>,
        batch: &mut VecDeque<Pending>,
    ) -> bool {
        let config = &self.shared.config;
        let first = records.recv().await;
        let Some(first) = first else {
            return false;
        };
        let pending = |record: Record| {
            let key = config.identity.scoped_key_of(&record, &config.scope);
            let fingerprint = Fingerprint::of(record.payload());
            Pending {
                record,
                key,
                fingerprint,
            }
        };
        let mut bytes = first.size_bytes();
        batch.push_back(pending(first));
        let deadline = tokio::time::Instant::now() + config.batch_linger;
        while batch.len() < config.batch_max_records && bytes < config.batch_max_bytes {
            match records.try_recv() {
                Some(record) => {
                    bytes = bytes.saturating_add(record.size_bytes());
                    batch.push_back(pending(record));
                }
                None if records.wait_until(deadline).await => {}
                None => break,
            }
        }
        records.count_read();
        true
    }

    /// Processes and commits the pending records, retrying in place; leaves `pending` empty
    /// unless it fails.
    async fn process(&mut self, pending: &mut VecDeque<Pending>) -> Result<()> {
        let mut tx = self.begin(pending).await?;
        let mut next = self.position;
        let mut busy_waits = 0u64;
        // Since when the first pending record has waited for a key another batch holds.
        let (mut busy_since, mut busy_warned) = (None, None::<std::time::Instant>);
        // pending[..settled] are settled in the open transaction.
        let mut settled = 0usize;
        loop {
            let then = match pending.get(settled) {
                None => AfterCommit::Finish,
                Some(item) => match self.record(&mut tx, item).await? {
                    Step::Done(_) => {
                        // Never backwards: a redelivery below the position leaves it where it is.
                        let offset = item.record.offset();
                        next = Some(next.map_or(offset + 1, |n| n.max(offset + 1)));
                        self.attempts = Attempts::default();
                        busy_since = None;
                        settled += 1;
                        if settled == pending.len() || !self.transaction_over_time() {
                            continue;
                        }
                        // Commit what is settled before the store ends the transaction.
                        AfterCommit::Continue
                    }
                    Step::HandleAgain => {
                        // Nothing of this transaction counts; its records are handled again.
                        drop(tx);
                        (next, settled) = (self.position, 0);
                        tx = self.begin_with_savepoints(pending).await?;
                        continue;
                    }
                    Step::Retry(delay) => AfterCommit::Retry(delay),
                    Step::Busy => {
                        // Who holds the key, asked only once the wait is long enough to warn.
                        let long = busy_since
                            .is_some_and(|s: std::time::Instant| s.elapsed() >= BUSY_WARN_AFTER);
                        let holder = match &item.key {
                            Ok(key) if long => tx.busy_holder(key.store_key()),
                            _ => None,
                        };
                        AfterCommit::Busy(holder)
                    }
                    Step::Stop(e) => AfterCommit::Stop(e),
                },
            };
            if !self.end(tx, next).await? {
                // The deferred writes were refused at the commit, before anything was written.
                (next, settled) = (self.position, 0);
                tx = self.begin_with_savepoints(pending).await?;
                continue;
            }
            pending.drain(..settled);
            settled = 0;
            match then {
                AfterCommit::Retry(delay) => {
                    self.meter.retried();
                    tokio::time::sleep(delay).await;
                }
                AfterCommit::Busy(holder) => {
                    busy_waits += 1;
                    let since = *busy_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= BUSY_WARN_AFTER
                        && busy_warned.is_none_or(|w| w.elapsed() >= BUSY_WARN_EVERY)
                    {
                        busy_warned = Some(std::time::Instant::now());
                        let waiting = pending.front();
                        tracing::warn!(
                            topic = %self.partition.topic,
                            partition = self.partition.partition,
                            offset = waiting.map(|p| p.record.offset()),
                            key = waiting.and_then(|p| p.key.as_ref().ok()).map(|k| k.to_string()),
                            holder = holder.as_deref().unwrap_or("another in-flight batch"),
                            waited = ?since.elapsed(),
                            "a record has waited long for its idempotency key, held by another \
                             in-flight batch (a handler that does not return holds it)"
                        );
                    }
                    // Grows and is jittered, so two partitions that keep meeting on the same
                    // keys fall out of step.
                    let retry = &self.shared.config.retry;
                    tokio::time::sleep(retry.backoff(busy_waits.min(6) as u32, None) / 20).await;
                }
                AfterCommit::Stop(e) => return Err(e),
                AfterCommit::Continue => {}
                AfterCommit::Finish => {
                    self.savepoint_each = false;
                    self.failed_without_savepoint = None;
                    return Ok(());
                }
            }
            tx = self.begin(pending).await?;
        }
    }

    /// True once the open transaction has used its time budget.
    fn transaction_over_time(&self) -> bool {
        self.tx_budget
            .is_some_and(|budget| self.tx_began.elapsed() >= budget)
    }

    /// Opens a transaction for the pending records again, this time with a savepoint before
    /// each record (until they are all committed): a handler failed without one, or the
    /// deferred writes were refused at the commit.
    async fn begin_with_savepoints(&mut self, pending: &VecDeque<Pending>) -> Result<S::Tx> {
        self.savepoint_each = true;
        self.begin(pending).await
    }

    /// Opens a transaction for the pending records and claims their keys in one go, where the
    /// store can. A new transaction starts with nothing of a previous one: an earlier
    /// transaction either committed (and flushed its tally) or failed (and counts for nothing).
    /// The open transaction's id (`batch_id`), made on first use.
    fn batch_id(&mut self) -> String {
        self.batch_id
            .get_or_insert_with(crate::store::new_id)
            .clone()
    }

    async fn begin(&mut self, pending: &VecDeque<Pending>) -> Result<S::Tx> {
        self.tally = Tally::default();
        self.letters.clear();
        self.batch_id = None;
        self.batch_now = now_ms();
        self.tx_began = std::time::Instant::now();
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
    /// start while this one lives, or it could wait on this one's claims. False when the batch
    /// must be handled again with a savepoint before each record.
    async fn end(&mut self, tx: S::Tx, next: Option<i64>) -> Result<bool> {
        let Some(next) = next else {
            drop(tx);
            return Ok(true);
        };
        let cx = CommitContext {
            partition: &self.partition,
            position: self.position,
            savepoint_each: self.savepoint_each,
            letters: &self.letters,
            producer: self.shared.dead_letters.as_ref(),
            kafka: &self.kafka,
            meter: &self.meter,
        };
        let committed = commit_batch(tx, next, cx).await?;
        self.letters.clear();
        match committed {
            Committed::HandleAgain => return Ok(false),
            Committed::Unchanged => self.meter.flush(&mut self.tally),
            Committed::Written(latency) => {
                self.position = Some(next);
                self.meter.committed(&mut self.tally, latency);
                self.shared.progress.committed(
                    &self.partition.topic,
                    self.partition.partition,
                    next,
                );
            }
        }
        Ok(true)
    }
}
