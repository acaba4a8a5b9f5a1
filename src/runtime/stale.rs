//! Whether this instance's store holds a partition's latest state, checked when the partition
//! is assigned.
//!
//! A store whose data is one instance's own (RocksDB: a directory per instance, see
//! [`Store::store_id`](crate::Store::store_id)) cannot follow a partition to another instance.
//! Were the other instance to handle it from Kafka's (lagging) offset with none of the entries
//! and effects, and this one later from its own older position, records would be applied twice
//! with no error. So every Kafka commit carries a mark naming the store it follows (the offset's
//! metadata), and on assignment the runtime reads Kafka's committed offset and its mark:
//!
//! - no committed offset, or one without a mark (committed by another kind of consumer, or by a
//!   version without marks): nothing to compare; the store's position decides as before;
//! - this store's mark: current. Kafka can only be ahead of the store when the store lost
//!   commits that were not synced, or was restored from a backup; the store's state is then
//!   consistent with its own position, and the records from there are handled again (logged);
//! - another store's mark: that store handled the partition last and holds its latest state,
//!   whatever this store's position says (Kafka's offset may lag the other store's). The
//!   partition is refused, by the [`StalePartitionPolicy`].

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::error::{Error, Result};
use crate::store::PartitionId;

/// What to do with a partition whose latest state another store holds
/// ([`Error::StalePartition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StalePartitionPolicy {
    /// Stop the runtime with the error (default): the deployment gives partitions to instances
    /// whose stores do not have them, which needs fixing.
    #[default]
    Stop,
    /// Leave the partition unassigned on this instance (it is neither fetched nor committed
    /// until the next rebalance) and go on with the others. The refusal is logged as an error
    /// and counted (`stale_partitions_refused`).
    Pause,
}

/// The start of every mark; the store id follows.
const MARK: &str = "idempotent-consumer store=";

/// The metadata committed with every Kafka offset of the store `store_id`.
pub(crate) fn mark(store_id: &str) -> String {
    format!("{MARK}{store_id}")
}

/// The store a mark names, or `None` when the metadata is not a mark.
fn marked_by(metadata: &str) -> Option<&str> {
    metadata.strip_prefix(MARK).filter(|id| !id.is_empty())
}

/// Kafka's committed offset of a partition and its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Committed {
    pub(crate) offset: i64,
    pub(crate) metadata: String,
}

/// Decides whether the store `store_id`, at `position`, may take `partition`, given what Kafka
/// committed for it. `Ok(Some(kafka))` when it may but Kafka is ahead of it (logged by the
/// caller).
pub(crate) fn check(
    partition: &PartitionId,
    store_id: &str,
    position: Option<i64>,
    committed: Option<&Committed>,
) -> Result<Option<i64>> {
    let Some(committed) = committed else {
        return Ok(None);
    };
    match marked_by(&committed.metadata) {
        None => Ok(None),
        Some(id) if id == store_id => {
            Ok((position.is_none_or(|p| p < committed.offset)).then_some(committed.offset))
        }
        Some(other) => Err(Error::StalePartition {
            topic: partition.topic.clone(),
            partition: partition.partition,
            store_position: position,
            kafka_offset: committed.offset,
            store: store_id.to_owned(),
            committed_by: other.to_owned(),
        }),
    }
}

/// How long the committed offsets may take to read (the coordinator can be moving).
const READ_FOR: Duration = Duration::from_secs(30);

/// Kafka's committed offsets (with metadata) of the partitions in `tpl`, by topic and
/// partition; partitions without one are left out. Tried again until [`READ_FOR`] passed.
pub(crate) fn committed<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    tpl: &TopicPartitionList,
) -> Result<HashMap<(String, i32), Committed>> {
    let started = Instant::now();
    let read = loop {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(read) => break read,
            Err(e) if started.elapsed() >= READ_FOR => {
                return Err(Error::kafka(
                    "reading Kafka's committed offsets, to check that the store holds the \
                     partitions' latest state",
                    e,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading committed offsets failed; trying again");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let mut out = HashMap::new();
    for element in read.elements() {
        let Offset::Offset(offset) = element.offset() else {
            continue;
        };
        // rdkafka panics on metadata that is not UTF-8 (another client may commit any bytes):
        // that is not a mark.
        let metadata = std::panic::catch_unwind(AssertUnwindSafe(|| element.metadata().to_owned()))
            .unwrap_or_default();
        out.insert(
            (element.topic().to_owned(), element.partition()),
            Committed { offset, metadata },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(offset: i64, metadata: &str) -> Committed {
        Committed {
            offset,
            metadata: metadata.to_owned(),
        }
    }

    #[test]
    fn only_another_stores_mark_refuses() {
        let p = PartitionId::new("g", "t", 3);
        let ours = mark("aaaa");
        // Nothing committed, or no mark: nothing to compare.
        assert_eq!(check(&p, "aaaa", None, None).unwrap(), None);
        assert_eq!(
            check(&p, "aaaa", Some(5), Some(&committed(9, ""))).unwrap(),
            None
        );
        assert_eq!(
            check(&p, "aaaa", None, Some(&committed(9, "app-v2"))).unwrap(),
            None
        );
        assert_eq!(
            check(&p, "aaaa", None, Some(&committed(9, MARK))).unwrap(),
            None
        );
        // Our own mark: current; Kafka ahead is reported.
        assert_eq!(
            check(&p, "aaaa", Some(9), Some(&committed(9, &ours))).unwrap(),
            None
        );
        assert_eq!(
            check(&p, "aaaa", Some(12), Some(&committed(9, &ours))).unwrap(),
            None
        );
        assert_eq!(
            check(&p, "aaaa", Some(7), Some(&committed(9, &ours))).unwrap(),
            Some(9)
        );
        assert_eq!(
            check(&p, "aaaa", None, Some(&committed(9, &ours))).unwrap(),
            Some(9)
        );
        // Another store's mark: stale, whatever our position (Kafka's may lag the other's).
        for position in [None, Some(3), Some(9), Some(100)] {
            match check(&p, "aaaa", position, Some(&committed(9, &mark("bbbb")))) {
                Err(Error::StalePartition {
                    topic,
                    partition: 3,
                    store_position,
                    kafka_offset: 9,
                    store,
                    committed_by,
                }) => {
                    assert_eq!(
                        (
                            topic.as_str(),
                            store_position,
                            store.as_str(),
                            committed_by.as_str()
                        ),
                        ("t", position, "aaaa", "bbbb")
                    );
                }
                other => panic!("expected a stale partition, got {other:?}"),
            }
        }
    }
}
