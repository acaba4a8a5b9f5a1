//! What an operator, a test or a dashboard reads from a store, with the same signatures on every
//! store: a partition's position (and moving it), a group's positions, a key's entry, a
//! partition's dead letters.

use std::future::Future;

use crate::dead_letter::DeadLetter;
use crate::error::Result;
use crate::identity::Scope;
use crate::store::{DedupEntry, PartitionId, Store, StoredPosition};

/// An idempotency key as one consumer group sees it: the group, the tenant (when the
/// [`Identity`](crate::Identity) has one) and the key's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryKey<'a> {
    /// The consumer group.
    pub group: &'a str,
    /// The tenant, if keys are scoped by one.
    pub tenant: Option<&'a str>,
    /// The idempotency key's bytes (a header's value, the record key, ...).
    pub key: &'a [u8],
}

impl<'a> EntryKey<'a> {
    /// `key` in `group`, without a tenant.
    pub fn new(group: &'a str, key: &'a (impl AsRef<[u8]> + ?Sized)) -> Self {
        EntryKey {
            group,
            tenant: None,
            key: key.as_ref(),
        }
    }

    /// The same key under `tenant`.
    pub fn tenant(self, tenant: &'a str) -> Self {
        EntryKey {
            tenant: Some(tenant),
            ..self
        }
    }

    /// The scoped key the stores index entries by: what [`Transaction`](crate::Transaction)'s
    /// methods take.
    pub fn store_key(&self) -> Vec<u8> {
        let mut out = Scope::new(self.group, self.tenant).as_bytes().to_vec();
        out.extend_from_slice(self.key);
        out
    }
}

/// Refuses a position no partition can have, before a store writes it.
pub(crate) fn check_position(next_offset: i64) -> Result<()> {
    if next_offset < 0 {
        return Err(crate::Error::Config(format!(
            "a partition's next offset cannot be negative (got {next_offset})"
        )));
    }
    Ok(())
}

/// Reading a store from outside the runtime. Every store implements it.
pub trait Inspect: Store {
    /// The stored position and epoch of a partition; `None` for a partition never acquired.
    fn position(
        &self,
        partition: &PartitionId,
    ) -> impl Future<Output = Result<Option<StoredPosition>>> + Send;

    /// Sets a partition's next offset, keeping its epoch: an operator's replay or skip. Run it
    /// while no consumer owns the partition; the next owner resumes from `next_offset`, and the
    /// records it has already applied are skipped as redeliveries. On a partition the store has
    /// never seen, the position is created (epoch 0), so a fresh store can be told where to
    /// start. A negative offset is refused
    /// with [`Error::Config`](crate::Error::Config) and changes nothing.
    fn set_position(
        &self,
        partition: &PartitionId,
        next_offset: i64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Every partition of `group` the store has a position for, with it, sorted by topic and
    /// partition: what an operator lists first. Empty for a group the store has never seen.
    fn positions(
        &self,
        group: &str,
    ) -> impl Future<Output = Result<Vec<(PartitionId, StoredPosition)>>> + Send;

    /// The committed entry of a key, expired or not.
    fn entry(&self, key: &EntryKey<'_>) -> impl Future<Output = Result<Option<DedupEntry>>> + Send;

    /// The dead letters kept for a partition, in offset order.
    fn dead_letters(
        &self,
        partition: &PartitionId,
    ) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;
}
