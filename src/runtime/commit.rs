//! The commit protocol of a batch, top to bottom. This is step 4 of the record's walk in the
//! crate documentation, and the one place that orders it:
//!
//! 1. **Deferred writes.** What the handlers deferred to the end of the batch is written into
//!    the transaction. If the store refuses it, nothing has been written yet: the batch must be
//!    handled again one savepoint at a time, so the refusal belongs to one record.
//! 2. **Dead letters.** The batch's dead letters are produced and acknowledged *before* the
//!    commit that marks their keys dead-lettered: a crash in between repeats a dead letter on
//!    the topic, never loses one.
//! 3. **Nothing moved.** When every record was below the stored position (all redeliveries),
//!    there is nothing to write.
//! 4. **The store commit.** The handlers' effects, the dedup entries, the dead letters and the
//!    partition's next offset go to the store in ONE atomic write, checked against the
//!    partition's epoch: a stale owner gets [`Error::Fenced`](crate::Error::Fenced) and writes
//!    nothing.
//! 5. **Kafka.** Only then is the same offset committed to Kafka, by the consumer's commit
//!    thread ([`KafkaCommitter`]), so lag tools keep working. Kafka's offset is advisory: on
//!    assignment the runtime seeks to the store's position, so a lost or late Kafka commit
//!    can never skip or repeat a record. A store of
//!    one instance's own marks the commit with its id, which tells the next owner whether its
//!    own copy of the partition is current (`stale.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::dead_letter::{DeadLetter, DeadLetterProducer};
use crate::error::{Error, Result};
use crate::metrics::{GroupMeter, PartitionMeter};
use crate::store::{DeferredWrites, PartitionId, Transaction};

/// What a commit needs besides the transaction and the next offset.
pub(crate) struct CommitContext<'a> {
    pub(crate) partition: &'a PartitionId,
    /// The partition's stored position before this batch.
    pub(crate) position: Option<i64>,
    /// The batch ran with a savepoint before every record, writing each record's deferred rows
    /// after its handler: nothing deferred is left to be refused.
    pub(crate) savepoint_each: bool,
    /// The batch's dead letters, and where they are produced (none: the store only).
    pub(crate) letters: &'a [DeadLetter],
    pub(crate) producer: Option<&'a DeadLetterProducer>,
    pub(crate) kafka: &'a KafkaCommitter,
    pub(crate) meter: &'a PartitionMeter,
}

/// How a commit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Committed {
    /// The store holds the batch and the new position; the store commit took this long.
    Written(Duration),
    /// Nothing moved, so nothing was written (step 3).
    Unchanged,
    /// The deferred writes were refused before anything was written (step 1): handle the batch
    /// again with a savepoint before each record.
    HandleAgain,
}

/// Commits `tx` with `next_offset` as the partition's new position: the protocol above.
pub(crate) async fn commit_batch<T: Transaction>(
    mut tx: T,
    next_offset: i64,
    cx: CommitContext<'_>,
) -> Result<Committed> {
    let partition = cx.partition;
    // 1. Deferred writes.
    if let DeferredWrites::Rejected(error) = tx.write_deferred().await? {
        if cx.savepoint_each {
            return Err(Error::store(
                "writing deferred rows at the commit",
                error.to_string(),
            ));
        }
        tracing::warn!(
            topic = %partition.topic,
            partition = partition.partition,
            error = %error,
            "deferred rows failed at the commit; handling the batch again record by record"
        );
        return Ok(Committed::HandleAgain);
    }
    // 2. Dead letters, acknowledged first.
    if let Some(producer) = cx.producer
        && !cx.letters.is_empty()
    {
        producer.send_all(cx.letters).await?;
    }
    // 3. Nothing moved.
    if cx.position == Some(next_offset) {
        return Ok(Committed::Unchanged);
    }
    // 4. The one atomic, fenced store write.
    let started = Instant::now();
    if let Err(e) = tx.commit(next_offset).await {
        if e.is_fenced() {
            cx.meter.fenced();
        }
        return Err(e);
    }
    let latency = started.elapsed();
    tracing::debug!(
        topic = %partition.topic,
        partition = partition.partition,
        next_offset,
        micros = latency.as_micros() as u64,
        "batch committed"
    );
    // 5. Kafka, advisory.
    cx.kafka.submit(partition, next_offset);
    Ok(Committed::Written(latency))
}

/// How long a failed Kafka commit waits before it is tried again.
const KAFKA_RETRY: Duration = Duration::from_millis(1000);

/// How long the task's last word to Kafka, before it releases the partition, may wait.
const LAST_WORD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`KafkaCommitter::stop`] waits for the request in flight.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

type Key = (String, i32);

/// Commits the partitions' positions to Kafka (step 5), from one thread per consumer.
///
/// Each request commits one partition synchronously, so its outcome is known: librdkafka only
/// reports an asynchronous commit's result through a callback rust-rdkafka does not set, and a
/// request of several partitions fails as a whole only when all of them failed. A position
/// submitted while an older one waits replaces it (the newer covers the older), requests of one
/// partition never overlap (no older offset lands after a newer one), and the partitions take
/// turns in the order they became due. A failed commit is counted and tried again after
/// `KAFKA_RETRY` while the partition is still owned here and nothing newer waits: a lost
/// commit (a rebalance, a broker restart) no longer leaves Kafka's offset behind for good, as
/// it did for a partition at its end, which commits nothing more.
pub(crate) struct KafkaCommitter {
    inner: Arc<CommitterInner>,
    exited: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

struct CommitterInner {
    state: std::sync::Mutex<CommitterState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct CommitterState {
    due: HashMap<Key, Due>,
    /// Partitions owned here: only they are tried again after a failure.
    owned: HashSet<Key>,
    stopped: bool,
}

/// A position waiting to be committed.
struct Due {
    offset: i64,
    /// Not tried before this (a retry's wait).
    not_before: Instant,
    /// When the partition became due, for taking turns.
    since: Instant,
    /// Told whether the commit landed.
    waiters: Vec<tokio::sync::oneshot::Sender<bool>>,
}

impl KafkaCommitter {
    /// Starts the commit thread of `consumer`, which it holds weakly: once the consumer is
    /// dropped nothing more is committed. `mark` is every commit's metadata (`stale.rs`).
    pub(crate) fn spawn<C: ConsumerContext + 'static>(
        consumer: &Arc<BaseConsumer<C>>,
        mark: Option<String>,
        meter: GroupMeter,
    ) -> Result<Self> {
        let inner = Arc::new(CommitterInner {
            state: std::sync::Mutex::new(CommitterState::default()),
            wake: std::sync::Condvar::new(),
        });
        let (exit_tx, exited) = std::sync::mpsc::channel();
        let weak = Arc::downgrade(consumer);
        let thread_inner = inner.clone();
        std::thread::Builder::new()
            .name("kafka-commit".into())
            .spawn(move || {
                commit_loop(&thread_inner, &weak, mark.as_deref(), &meter);
                let _ = exit_tx.send(());
            })
            .map_err(|e| Error::Task(format!("starting the Kafka commit thread: {e}")))?;
        Ok(KafkaCommitter {
            inner,
            exited: std::sync::Mutex::new(Some(exited)),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CommitterState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits `next_offset` as `partition`'s position, as soon as the thread gets to it.
    pub(crate) fn submit(&self, partition: &PartitionId, next_offset: i64) {
        self.enqueue(partition, next_offset, None);
    }

    /// Commits `next_offset` and waits until Kafka answered: the task's last word before it
    /// releases the partition, landing after every earlier commit of it. True when it landed.
    pub(crate) async fn commit_and_wait(&self, partition: &PartitionId, next_offset: i64) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(partition, next_offset, Some(tx));
        matches!(
            tokio::time::timeout(LAST_WORD_TIMEOUT, rx).await,
            Ok(Ok(true))
        )
    }

    fn enqueue(
        &self,
        partition: &PartitionId,
        offset: i64,
        waiter: Option<tokio::sync::oneshot::Sender<bool>>,
    ) {
        let key = (partition.topic.clone(), partition.partition);
        let now = Instant::now();
        let mut state = self.state();
        if state.stopped {
            return; // The waiter, dropped, answers "not landed".
        }
        state.owned.insert(key.clone());
        let due = state.due.entry(key).or_insert_with(|| Due {
            offset,
            not_before: now,
            since: now,
            waiters: Vec::new(),
        });
        // The newer position replaces the older: it goes first, without a retry's wait.
        due.offset = offset;
        due.not_before = now;
        due.waiters.extend(waiter);
        drop(state);
        self.inner.wake.notify_one();
    }

    /// The partitions are no longer owned here: what waits for them is dropped, and a failed
    /// commit of theirs is not tried again.
    pub(crate) fn forget(&self, partition: &PartitionId) {
        let key = (partition.topic.clone(), partition.partition);
        let mut state = self.state();
        state.owned.remove(&key);
        state.due.remove(&key);
    }

    /// Stops the thread once the request in flight is answered (waiting at most
    /// `STOP_TIMEOUT`); what waits is dropped, Kafka's offsets being advisory.
    pub(crate) async fn stop(&self) {
        {
            let mut state = self.state();
            state.stopped = true;
            state.due.clear();
        }
        self.inner.wake.notify_all();
        let exited = self.exited.lock().ok().and_then(|mut e| e.take());
        if let Some(exited) = exited {
            let waited =
                tokio::task::spawn_blocking(move || exited.recv_timeout(STOP_TIMEOUT)).await;
            if let Ok(Err(std::sync::mpsc::RecvTimeoutError::Timeout)) = waited {
                tracing::warn!("the Kafka commit in flight did not end in time; left behind");
            }
        }
    }
}

impl Drop for KafkaCommitter {
    fn drop(&mut self) {
        self.state().stopped = true;
        self.inner.wake.notify_all();
    }
}

/// The commit thread: one due partition at a time, in the order they became due.
fn commit_loop<C: ConsumerContext>(
    inner: &CommitterInner,
    consumer: &std::sync::Weak<BaseConsumer<C>>,
    mark: Option<&str>,
    meter: &GroupMeter,
) {
    let lock = || inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut state = lock();
    loop {
        if state.stopped {
            return;
        }
        let now = Instant::now();
        let next = state
            .due
            .iter()
            .filter(|(_, due)| due.not_before <= now)
            .min_by_key(|(_, due)| due.since)
            .map(|(key, _)| key.clone());
        let Some(key) = next else {
            let wait = state
                .due
                .values()
                .map(|due| due.not_before.saturating_duration_since(now))
                .min();
            state = match wait {
                Some(wait) => inner
                    .wake
                    .wait_timeout(state, wait)
                    .map_or_else(|e| e.into_inner().0, |(state, _)| state),
                None => inner.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
            continue;
        };
        let Some(due) = state.due.remove(&key) else {
            continue;
        };
        drop(state);
        let Some(consumer) = consumer.upgrade() else {
            return; // The consumer is gone; the waiters, dropped, hear "not landed".
        };
        let result = commit_one(&consumer, &key, due.offset, mark);
        drop(consumer);
        state = lock();
        match result {
            Ok(()) => {
                for waiter in due.waiters {
                    let _ = waiter.send(true);
                }
            }
            Err(e) => {
                meter.kafka_commit_failed();
                tracing::debug!(
                    topic = %key.0,
                    partition = key.1,
                    offset = due.offset,
                    error = %e,
                    "kafka offset commit failed; tried again while the partition is owned here"
                );
                for waiter in due.waiters {
                    let _ = waiter.send(false);
                }
                if !state.stopped && state.owned.contains(&key) && !state.due.contains_key(&key) {
                    let now = Instant::now();
                    state.due.insert(
                        key,
                        Due {
                            offset: due.offset,
                            not_before: now + KAFKA_RETRY,
                            since: now,
                            waiters: Vec::new(),
                        },
                    );
                }
            }
        }
    }
}

/// One synchronous commit of one partition, with the store's mark as its metadata.
fn commit_one<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    key: &Key,
    next_offset: i64,
    mark: Option<&str>,
) -> rdkafka::error::KafkaResult<()> {
    let mut tpl = TopicPartitionList::new();
    let mut element = tpl.add_partition(&key.0, key.1);
    element.set_offset(Offset::Offset(next_offset))?;
    if let Some(mark) = mark {
        element.set_metadata(mark);
    }
    consumer.commit(&tpl, CommitMode::Sync)
}
