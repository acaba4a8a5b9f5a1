//! The crate's error type.
//!
//! One `#[non_exhaustive]` enum for everything the runtime and the stores can fail with, plus a
//! `Result` alias. Driver errors (librdkafka, RocksDB) are kept as `#[source]` so callers can walk
//! the chain; the accessors at the bottom classify an error without parsing its text.

use std::fmt;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the runtime or a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the message says which setting and why.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A Kafka client call failed.
    #[error("kafka: {context}")]
    Kafka {
        /// What the runtime was doing.
        context: String,
        /// The librdkafka error.
        #[source]
        source: rdkafka::error::KafkaError,
    },

    /// The store failed.
    #[error("store: {context}")]
    Store {
        /// What the store was doing.
        context: String,
        /// The driver error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        /// True when trying again can succeed (a lost connection, a deadlock, a serialization
        /// failure): the runtime retries the batch from its first uncommitted record.
        transient: bool,
    },

    /// Bytes read from the store could not be decoded: the store is corrupt or was written by an
    /// incompatible version.
    #[error("corrupt store data: {0}")]
    Corrupt(String),

    /// A commit was rejected because another owner took the partition over (its epoch is newer).
    /// Nothing of the batch was written.
    #[error("commit fenced for {topic}/{partition}: our epoch {epoch}, current epoch {current}")]
    Fenced {
        /// Topic of the fenced partition.
        topic: String,
        /// Partition number.
        partition: i32,
        /// The epoch this instance held.
        epoch: u64,
        /// The epoch found in the store.
        current: u64,
    },

    /// A request's lease on its idempotency key ran out and another request took the key
    /// over: nothing of this request was written.
    #[error(
        "the request's lease on its idempotency key ran out and another request took the key \
         over; nothing of this request was written"
    )]
    LeaseLost,

    /// A request's transaction was used after its handler returned (by a task the handler
    /// spawned): the request was already answered.
    #[error("the request's transaction was used after its handler returned")]
    RequestEnded,

    /// This store's copy of a partition is stale: Kafka's latest commit for it came from another
    /// store (another instance's own directory), which holds the partition's latest state. The
    /// partition was not handled (see [`StalePartitionPolicy`](crate::StalePartitionPolicy)).
    #[error(
        "{topic}/{partition} refused: Kafka's latest commit (offset {kafka_offset}) came from \
         another store ({committed_by}), which holds the partition's latest state; this store \
         ({store}, position {}) holds a stale copy. Each instance with a store of its own must \
         keep its partitions (static assignment), or the group must share one store \
         (PostgreSQL)",
        store_position.map_or_else(|| "none".to_owned(), |p| p.to_string())
    )]
    StalePartition {
        /// Topic.
        topic: String,
        /// Partition number.
        partition: i32,
        /// This store's position for the partition, if it has one.
        store_position: Option<i64>,
        /// Kafka's committed offset.
        kafka_offset: i64,
        /// This store's id.
        store: String,
        /// The id of the store that made Kafka's latest commit.
        committed_by: String,
    },

    /// The store's position for a partition is beyond the end of its log (the topic was
    /// deleted and created again, or an unclean leader election lost records): every new
    /// record would be below the position and skipped as a redelivery. The partition was not
    /// handled; after checking what happened, set where it resumes with
    /// [`Inspect::set_position`](crate::store::Inspect::set_position).
    #[error(
        "{topic}/{partition}: the store's position {position} is beyond the end of the log \
         (high watermark {high_watermark}); the topic was recreated or lost records. Nothing \
         was handled: set where the partition resumes with Inspect::set_position"
    )]
    PositionAheadOfLog {
        /// Topic.
        topic: String,
        /// Partition number.
        partition: i32,
        /// The store's position (the next offset it would handle).
        position: i64,
        /// The log's high watermark at assignment.
        high_watermark: i64,
    },

    /// The handler returned a fatal error; the runtime stopped without committing past the record.
    #[error("handler failed fatally at {at}: {message}")]
    HandlerFatal {
        /// The record the handler failed on.
        at: RecordPosition,
        /// The handler's error message.
        message: String,
    },

    /// A record broke a rule whose policy is `Stop` (for example a conflicting idempotency key);
    /// the runtime stopped without committing past it.
    #[error("stopped at {at}: {reason}")]
    Stopped {
        /// The record that stopped the runtime.
        at: RecordPosition,
        /// Why.
        reason: String,
    },

    /// A background task of the runtime failed unexpectedly (for example it panicked).
    #[error("runtime task failed: {0}")]
    Task(String),
}

/// Topic, partition and offset of one record, for error messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordPosition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
}

/// A configuration error names the property, never its value: the value may be a secret, and a
/// misspelled property (`sasl.pasword`) cannot be recognised as one by its name.
fn redact_config_value(error: rdkafka::error::KafkaError) -> rdkafka::error::KafkaError {
    use rdkafka::error::KafkaError;
    const REDACTED: &str = "[redacted]";
    match error {
        KafkaError::ClientConfig(code, description, property, value) => {
            let description = if value.is_empty() {
                description
            } else {
                description.replace(&value, REDACTED)
            };
            KafkaError::ClientConfig(code, description, property, REDACTED.to_owned())
        }
        other => other,
    }
}

impl fmt::Display for RecordPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

impl Error {
    /// Wraps a Kafka error with what the runtime was doing.
    pub(crate) fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka {
            context: context.into(),
            source: redact_config_value(source),
        }
    }

    /// The error of a commit of `partition` at `epoch`, refused because the store holds the
    /// newer epoch `current`. Stores build [`Error::Fenced`] with it.
    pub fn fenced(partition: &crate::store::PartitionId, epoch: u64, current: u64) -> Self {
        Error::Fenced {
            topic: partition.topic.clone(),
            partition: partition.partition,
            epoch,
            current,
        }
    }

    /// Wraps a store driver error with what the store was doing.
    pub fn store(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::store_error(context.into(), source.into(), false)
    }

    /// Like [`Error::store`], for a failure that can go away when the batch is tried again.
    pub fn store_transient(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::store_error(context.into(), source.into(), true)
    }

    fn store_error(
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
        transient: bool,
    ) -> Self {
        Error::Store {
            context,
            source,
            transient,
        }
    }

    /// True when the failure is a transient store failure: nothing of the batch was committed
    /// (or, for a commit that lost its connection, it may have been) and trying again is safe,
    /// because records already committed are found as duplicates.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Store {
                transient: true,
                ..
            }
        )
    }

    /// True when the error is a fenced commit: the partition now belongs to another owner.
    pub fn is_fenced(&self) -> bool {
        matches!(self, Error::Fenced { .. })
    }

    /// True when a request lost its idempotency key's lease to another ([`Error::LeaseLost`]).
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Error::LeaseLost)
    }

    /// True when the runtime stopped on purpose at a record (fatal handler error or a `Stop`
    /// policy), as opposed to an infrastructure failure.
    pub fn is_stop_at_record(&self) -> bool {
        matches!(self, Error::HandlerFatal { .. } | Error::Stopped { .. })
    }

    /// The record at which the runtime stopped, if it stopped at one.
    pub fn record_position(&self) -> Option<&RecordPosition> {
        match self {
            Error::HandlerFatal { at, .. } | Error::Stopped { at, .. } => Some(at),
            _ => None,
        }
    }
}
