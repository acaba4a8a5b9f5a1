//! The commit path of a batch.
//!
//! 1. The store transaction commits the handler's effects, the dedup entries, the dead letters and
//!    the partition's next offset in ONE atomic write, checked against the partition's epoch.
//! 2. Only then is the same offset committed to Kafka, asynchronously, so lag tools keep working.
//!    Kafka's offset is advisory: on assignment the runtime seeks to the store's position, so a
//!    lost or late Kafka commit can never skip or repeat a record.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::Result;
use crate::metrics::{GroupMeter, PartitionMeter};
use crate::store::{PartitionId, Transaction};

/// Commits `tx` with `next_offset` as the partition's position, then tells Kafka. Returns how
/// long the store commit took.
pub(crate) async fn commit_batch<T: Transaction, C: ConsumerContext>(
    tx: T,
    partition: &PartitionId,
    next_offset: i64,
    consumer: &BaseConsumer<C>,
    group: &GroupMeter,
    meter: &PartitionMeter,
) -> Result<Duration> {
    let started = Instant::now();
    if let Err(e) = tx.commit(next_offset).await {
        if e.is_fenced() {
            meter.fenced();
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
    commit_kafka(consumer, partition, next_offset, CommitMode::Async, group);
    Ok(latency)
}

/// Commits `next_offset` to Kafka. Failures are counted and logged, never fatal.
pub(crate) fn commit_kafka<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partition: &PartitionId,
    next_offset: i64,
    mode: CommitMode,
    meter: &GroupMeter,
) {
    let mut tpl = TopicPartitionList::new();
    let added = tpl.add_partition_offset(
        &partition.topic,
        partition.partition,
        Offset::Offset(next_offset),
    );
    if let Err(e) = added.and_then(|()| consumer.commit(&tpl, mode)) {
        meter.kafka_commit_failed();
        tracing::debug!(topic = %partition.topic, partition = partition.partition, error = %e, "kafka offset commit failed");
    }
}
