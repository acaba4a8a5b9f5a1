//! The audit log: who changed a store from outside its runtime, when, what, with which filters,
//! and what it changed, kept in the store in the same write as the change itself.
//!
//! An operator's command (the `idc` tool's) makes one [`AuditRecord`] when it starts; every
//! write it makes carries the record, updated with the counts so far, in the same atomic write
//! (RocksDB `WriteBatch`, PostgreSQL transaction). A command interrupted halfway leaves a record
//! that says exactly what it had done.

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::store::PartitionId;

/// One operator command, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unique per command.
    pub id: String,
    /// When the command started, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Who ran it (a name the operator gave, or the user and host).
    pub who: String,
    /// The command (`positions rewind`, `entries purge`).
    pub command: String,
    /// Its arguments and filters.
    pub details: serde_json::Value,
    /// What it changed so far (counts, previous values).
    pub counts: serde_json::Value,
}

#[cfg_attr(not(any(feature = "rocksdb", feature = "postgres")), allow(dead_code))] // the stores' encoding
impl AuditRecord {
    /// A record of `command` by `who`, starting now.
    pub fn new(
        who: impl Into<String>,
        command: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        AuditRecord {
            id: crate::store::new_id(),
            at_ms: crate::store::now_ms(),
            who: who.into(),
            command: command.into(),
            details,
            counts: serde_json::Value::Null,
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an audit record serializes")
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| crate::Error::Corrupt(format!("an audit record does not decode: {e}")))
    }
}

/// Where the redrive of one dead letter stands (the `idc dead-letters redrive` command's mark,
/// kept beside the letter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedriveMark {
    /// The dead letter's record: topic, partition, offset.
    pub topic: String,
    /// The record's partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// Produced and acknowledged (`true`), or about to be (`false`: a redrive that was
    /// interrupted may or may not have produced it; the next one looks in the target
    /// partition from `from_offset` before producing it again).
    pub done: bool,
    /// Where it goes.
    pub target_topic: String,
    /// The target partition.
    pub target_partition: i32,
    /// The target partition's end when the redrive began: the record, if produced, is at or
    /// after it.
    pub from_offset: i64,
    /// Where it landed, once done.
    pub produced_offset: Option<i64>,
    /// How many times this record has been redriven, this time included.
    pub count: u32,
    /// The audit record of the command.
    pub audit_id: String,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: i64,
}

#[cfg_attr(not(any(feature = "rocksdb", feature = "postgres")), allow(dead_code))] // the stores' encoding
impl RedriveMark {
    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a redrive mark serializes")
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| crate::Error::Corrupt(format!("a redrive mark does not decode: {e}")))
    }
}

/// Changes an operator makes to a store, each written with its audit record in one write.
/// Run them while no consumer of the group runs (the RocksDB store cannot be opened for writing
/// while its service holds the directory).
pub trait Audited {
    /// Sets a partition's next offset (keeping its epoch, as
    /// [`Inspect::set_position`](crate::Inspect::set_position)) and keeps `record`, in one
    /// write.
    fn set_position_audited(
        &self,
        partition: &PartitionId,
        next_offset: i64,
        record: &AuditRecord,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Deletes at most `limit` of `group`'s entries expired at `now_ms` (as
    /// [`Store::purge_expired`](crate::Store::purge_expired)) and keeps `record` with its
    /// `counts` set by `counts(purged)`, in one write; returns how many.
    fn purge_expired_audited(
        &self,
        group: &str,
        now_ms: i64,
        limit: usize,
        record: &AuditRecord,
        counts: &(dyn Fn(usize) -> serde_json::Value + Sync),
    ) -> impl Future<Output = Result<usize>> + Send;

    /// The one place where a record may be applied twice, on purpose: releases the dedup
    /// entries of the records first seen at offsets `from..to` of `partition` (their keys are
    /// then new), moves the partition's position to `from`, and keeps `record` with `counts`
    /// set by `counts(released)`, in one write; returns how many entries it released. The
    /// records of the range are handled again when the group resumes; the others after `from`
    /// are redeliveries.
    fn replay_range(
        &self,
        partition: &PartitionId,
        from: i64,
        to: i64,
        record: &AuditRecord,
        counts: &(dyn Fn(usize) -> serde_json::Value + Sync),
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Keeps `mark` for a dead letter of `group` (replacing the letter's earlier one) and
    /// `record`, in one write; with `free`, that write also deletes the key's entry if it says
    /// dead-lettered, so the redriven record is handled again (an entry of a record applied
    /// meanwhile stays: the redriven one is a duplicate).
    fn put_redrive_mark(
        &self,
        group: &str,
        mark: &RedriveMark,
        record: &AuditRecord,
        free: Option<&crate::store::EntryKey<'_>>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Every redrive mark of `group`'s dead letters.
    fn redrive_marks(&self, group: &str) -> impl Future<Output = Result<Vec<RedriveMark>>> + Send;

    /// The latest `limit` audit records, newest first.
    fn audit_log(&self, limit: usize) -> impl Future<Output = Result<Vec<AuditRecord>>> + Send;
}
