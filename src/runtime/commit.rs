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
//! 5. **Kafka.** Only then is the same offset committed to Kafka, asynchronously, so lag tools
//!    keep working. Kafka's offset is advisory: on assignment the runtime seeks to the store's
//!    position, so a lost or late Kafka commit can never skip or repeat a record. A store of
//!    one instance's own marks the commit with its id, which tells the next owner whether its
//!    own copy of the partition is current (`stale.rs`).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::dead_letter::{DeadLetter, DeadLetterProducer};
use crate::error::{Error, Result};
use crate::metrics::{GroupMeter, PartitionMeter};
use crate::store::{DeferredWrites, PartitionId, Transaction};

/// What a commit needs besides the transaction and the next offset.
pub(crate) struct CommitContext<'a, C: ConsumerContext> {
    pub(crate) partition: &'a PartitionId,
    /// The partition's stored position before this batch.
    pub(crate) position: Option<i64>,
    /// The batch ran with a savepoint before every record, writing each record's deferred rows
    /// after its handler: nothing deferred is left to be refused.
    pub(crate) savepoint_each: bool,
    /// The batch's dead letters, and where they are produced (none: the store only).
    pub(crate) letters: &'a [DeadLetter],
    pub(crate) producer: Option<&'a DeadLetterProducer>,
    pub(crate) consumer: &'a BaseConsumer<C>,
    /// The metadata of the Kafka commit, naming the store (`stale.rs`).
    pub(crate) mark: Option<&'a str>,
    pub(crate) group: &'a GroupMeter,
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
pub(crate) async fn commit_batch<T: Transaction, C: ConsumerContext>(
    mut tx: T,
    next_offset: i64,
    cx: CommitContext<'_, C>,
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
    commit_kafka(
        cx.consumer,
        partition,
        next_offset,
        cx.mark,
        CommitMode::Async,
        cx.group,
    );
    Ok(Committed::Written(latency))
}

/// Commits `next_offset` to Kafka, with the store's mark as its metadata. Failures are counted
/// and logged, never fatal.
pub(crate) fn commit_kafka<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partition: &PartitionId,
    next_offset: i64,
    mark: Option<&str>,
    mode: CommitMode,
    meter: &GroupMeter,
) {
    let mut tpl = TopicPartitionList::new();
    let mut element = tpl.add_partition(&partition.topic, partition.partition);
    let added = element.set_offset(Offset::Offset(next_offset));
    if let Some(mark) = mark {
        element.set_metadata(mark);
    }
    if let Err(e) = added.and_then(|()| consumer.commit(&tpl, mode)) {
        meter.kafka_commit_failed();
        tracing::debug!(topic = %partition.topic, partition = partition.partition, error = %e, "kafka offset commit failed");
    }
}
