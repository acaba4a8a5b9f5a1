//! What the broker says of a group's partitions (its committed offsets, the high watermarks),
//! beside what the store says: for the operations tool and the dashboard.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::store::{PartitionId, StoredPosition};

/// What the broker says of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BrokerSide {
    /// The group's committed offset, if it has one.
    pub(crate) committed: Option<i64>,
    /// The partition's high watermark (the offset its next record gets).
    pub(crate) high_watermark: i64,
}

impl BrokerSide {
    /// Records the group has not applied yet, by the store's position.
    pub(crate) fn lag(&self, stored: &StoredPosition) -> i64 {
        (self.high_watermark - stored.next_offset.unwrap_or(0)).max(0)
    }
}

/// Why the broker could not be asked: bad settings (the caller's input) or the broker itself.
#[derive(Debug)]
pub(crate) enum AskError {
    Settings(String),
    Broker(String),
}

/// A Kafka client of `group` that never joins it: for asking the broker.
pub(crate) fn client(servers: &str, group: &str) -> Result<BaseConsumer, AskError> {
    ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| AskError::Settings(format!("the Kafka client refused its settings: {e}")))
}

/// The group's committed offsets and the partitions' high watermarks, in the order of
/// `partitions`, asked of the broker (blocking calls, each bounded by `timeout`).
pub(crate) fn broker_side(
    consumer: &BaseConsumer,
    partitions: &[&PartitionId],
    timeout: Duration,
) -> Result<Vec<BrokerSide>, AskError> {
    let mut list = TopicPartitionList::new();
    for p in partitions {
        list.add_partition(&p.topic, p.partition);
    }
    let committed = consumer
        .committed_offsets(list, timeout)
        .map_err(|e| AskError::Broker(format!("asking the broker for committed offsets: {e}")))?;
    partitions
        .iter()
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(&p.topic, p.partition, timeout)
                .map_err(|e| {
                    AskError::Broker(format!(
                        "asking the broker for {}/{}'s watermarks: {e}",
                        p.topic, p.partition
                    ))
                })?;
            let committed = committed
                .find_partition(&p.topic, p.partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            Ok(BrokerSide {
                committed,
                high_watermark: high,
            })
        })
        .collect()
}
