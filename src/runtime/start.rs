//! Where a partition starts when the store has no position for it: a new store (a new
//! PostgreSQL database, a new RocksDB directory), or a partition the store never handled.
//!
//! The store's position is what counts, and Kafka's committed offset is never trusted over it.
//! A store without a position has applied nothing of the partition, so by default it starts at
//! the beginning of the log, whatever the group committed ([`StartPosition::Beginning`]). The
//! other choices are explicit: the group's committed offset (taking a group over from a plain
//! consumer), the end (only new records), or a timestamp. Whenever a store without a position
//! meets a group that has a committed offset for the partition, the runtime logs a warning
//! naming the partition, the committed offset and where it starts, because one of the two is
//! then not what the operator may think it is.
//!
//! Every choice is resolved to a concrete offset here, on assignment (the log's start stays
//! symbolic: it moves with retention), so the runtime knows where each partition's progress
//! is counted from ([`Progress`](crate::Progress)).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

use crate::error::{Error, Result};

/// Where a partition starts when the store has no position for it. Set with
/// [`RuntimeBuilder::start_without_position`](crate::RuntimeBuilder::start_without_position).
///
/// A partition the store has a position for always resumes there; this only decides the first
/// start. The group's committed Kafka offset plays no part unless [`StartPosition::Committed`]
/// is chosen (a brand-new group has none anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// The partition's first record still in the log (default): the store has applied nothing,
    /// so it applies everything there is.
    #[default]
    Beginning,
    /// The group's committed Kafka offset, for a group that a plain consumer (or a store that
    /// is gone) handled up to there; the beginning when the group has none.
    Committed,
    /// The end of the log at assignment: only records produced afterwards.
    End,
    /// The first record whose timestamp is at or after this instant; the end when there is
    /// none.
    Timestamp(SystemTime),
}

/// How long a watermark or timestamp lookup may take.
const LOOKUP: Duration = Duration::from_secs(10);

/// The offset a partition without a stored position starts at, under `start`, given the group's
/// committed offset (if any). `Offset::Beginning` or a concrete offset.
pub(crate) fn resolve<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partition: i32,
    start: StartPosition,
    committed: Option<i64>,
) -> Result<Offset> {
    let end = || {
        consumer
            .fetch_watermarks(topic, partition, LOOKUP)
            .map(|(_, high)| Offset::Offset(high))
            .map_err(|e| {
                Error::kafka(
                    format!("reading the end of {topic}/{partition}, where it starts"),
                    e,
                )
            })
    };
    match start {
        StartPosition::Beginning => Ok(Offset::Beginning),
        StartPosition::Committed => Ok(committed.map_or(Offset::Beginning, Offset::Offset)),
        StartPosition::End => end(),
        StartPosition::Timestamp(at) => {
            let ms = at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, Offset::Offset(ms))
                .map_err(|e| Error::kafka("building a timestamp lookup", e))?;
            let found = consumer.offsets_for_times(tpl, LOOKUP).map_err(|e| {
                Error::kafka(
                    format!("looking up the first offset of {topic}/{partition} at {ms} ms"),
                    e,
                )
            })?;
            match found.elements().first().map(|e| e.offset()) {
                Some(Offset::Offset(offset)) => Ok(Offset::Offset(offset)),
                // No record at or after the timestamp.
                _ => end(),
            }
        }
    }
}

/// The high watermarks of `partitions`, in one lookup per broker (a ListOffsets for the
/// latest offset of each).
pub(crate) fn ends<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &[(String, i32)],
) -> Result<std::collections::HashMap<(String, i32), i64>> {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition_offset(topic, *partition, Offset::End)
            .map_err(|e| Error::kafka("building a watermark lookup", e))?;
    }
    let found = consumer
        .offsets_for_times(tpl, LOOKUP)
        .map_err(|e| Error::kafka("reading the ends of the assigned partitions", e))?;
    Ok(found
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(high) => Some(((e.topic().to_owned(), e.partition()), high)),
            _ => None,
        })
        .collect())
}

/// A stored position beyond the end of the log is refused, never a skip of what comes next.
pub(crate) fn check_within_log(
    topic: &str,
    partition: i32,
    position: i64,
    high_watermark: Option<i64>,
) -> Result<()> {
    match high_watermark {
        Some(high) if position > high => Err(Error::PositionAheadOfLog {
            topic: topic.to_owned(),
            partition,
            position,
            high_watermark: high,
        }),
        _ => Ok(()),
    }
}

/// Words for a log line: where a partition started.
pub(crate) fn describe(offset: Offset) -> String {
    match offset {
        Offset::Beginning => "the beginning of the log".into(),
        Offset::Offset(o) => format!("offset {o}"),
        other => format!("{other:?}"),
    }
}
