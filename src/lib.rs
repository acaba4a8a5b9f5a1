//! # idempotent-consumer
//!
//! A Kafka consumer runtime in which a record's side effects, its dedup entry and the partition's
//! position are committed in ONE atomic write. A redelivered record, or a second record with the
//! same idempotency key, is a no-op that is counted and traced.
//!
//! The placeholder for the crate guide is replaced below.

#![forbid(unsafe_code)]

pub mod dead_letter;
pub mod error;
pub mod handler;
pub mod identity;
pub mod metrics;
pub mod record;
pub mod retry;
pub mod runtime;
pub mod store;

pub use dead_letter::{DeadLetter, DeadLetterReason};
pub use error::{Error, RecordPosition, Result};
pub use handler::{DuplicateCause, ErrorClass, Handler, HandlerError, Outcome};
pub use identity::{Identity, KeySource, MissingKey, OversizeKey};
pub use metrics::{Stats, StatsSnapshot};
pub use record::{DecodeError, Header, Record};
pub use retry::RetryPolicy;
pub use runtime::{ConflictPolicy, Runtime, RuntimeBuilder};
pub use store::{Claim, DedupEntry, EntryStatus, PartitionId, Store, Transaction};

#[cfg(feature = "rocksdb")]
pub use store::rocksdb::{RocksOptions, RocksStore, RocksTx};
