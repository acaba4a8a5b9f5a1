//! Stores: where dedup entries, partition positions, dead letters and the handler's effects live.
//!
//! The contract is small. [`Store::acquire`] takes a partition over (bumping its epoch, which
//! fences any previous owner) and returns the stored position to seek to; [`Store::begin`] opens a
//! [`Transaction`] for one batch of one partition; [`Transaction::commit`] writes everything of the
//! batch plus the new position in one atomic write, and fails with
//! [`Error::Fenced`](crate::Error::Fenced) if the partition's epoch moved on. Retention is
//! [`Store::purge_expired`], which the runtime calls in bounded batches.
//!
//! Reading a store from outside the runtime (positions, entries, dead letters) is [`Inspect`],
//! with the same signatures on every store.
//!
//! Stores: `RocksStore` (embedded default, feature `rocksdb`) and `PgStore` (shared by many
//! instances, feature `postgres`); `MemoryStore` (feature `memory`) keeps nothing across
//! restarts and exists to measure and test the runtime. Each store is a folder or file here:
//! `rocksdb/`, `postgres/`, `memory.rs`; `claims.rs` is the key table the RocksDB and memory
//! stores share, `entry.rs` what a store keeps per key.

use std::future::Future;

use crate::dead_letter::DeadLetter;
use crate::error::Result;
use crate::handler::HandlerError;
use crate::identity::Fingerprint;

mod audit;
#[cfg(any(feature = "rocksdb", feature = "memory"))]
mod claims;
pub(crate) mod entry;
mod inspect;
#[cfg(feature = "memory")]
pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "http")]
mod request;
#[cfg(feature = "rocksdb")]
pub(crate) mod rocksdb;

pub use audit::{AuditRecord, Audited, RedriveMark};
#[cfg(any(feature = "rocksdb", feature = "memory"))]
pub use claims::StateError;
pub use entry::{DedupEntry, EntryStatus};
use inspect::check_position;
pub use inspect::{EntryKey, Inspect};
#[cfg(feature = "http")]
pub use request::{Lease, RequestClaim, RequestStore};

/// A partition as seen by one consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionId {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

impl PartitionId {
    /// A partition of `topic` consumed by `group`.
    pub fn new(group: impl Into<String>, topic: impl Into<String>, partition: i32) -> Self {
        PartitionId {
            group: group.into(),
            topic: topic.into(),
            partition,
        }
    }
}

/// What [`Store::acquire`] returns: the new owner's epoch and where to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The epoch every commit of this owner must still hold.
    pub epoch: u64,
    /// The next offset to consume, if the store has one.
    pub position: Option<i64>,
}

/// The next offset and epoch stored for a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPosition {
    /// Next offset to consume; `None` when the partition was acquired but nothing committed yet.
    pub next_offset: Option<i64>,
    /// The epoch of the latest owner.
    pub epoch: u64,
}

/// A store of dedup entries, positions and effects.
pub trait Store: Send + Sync + 'static {
    /// The transaction a batch is written through; handlers receive `&mut Self::Tx`.
    type Tx: Transaction;

    /// Takes ownership of a partition: increments its epoch (so commits of any previous owner are
    /// rejected from now on) and returns the stored position.
    fn acquire(&self, partition: &PartitionId) -> impl Future<Output = Result<Assignment>> + Send;

    /// Opens a transaction for one batch of `partition`, owned at `epoch`.
    fn begin(
        &self,
        partition: &PartitionId,
        epoch: u64,
    ) -> impl Future<Output = Result<Self::Tx>> + Send;

    /// Deletes at most `limit` of `group`'s entries that expired at or before `now_ms`;
    /// returns how many. Never deletes an entry that has not expired, nor another group's: each
    /// group's runtime purges its own (a store may hold several groups).
    fn purge_expired(
        &self,
        group: &str,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Deletes at most `limit` of `group`'s dead letters that failed more than `retention`
    /// before `now_ms` (the dead-letter retention); returns how many. A store may examine at
    /// most `limit` letters a call, going on where it stopped at the next.
    fn purge_dead_letters(
        &self,
        group: &str,
        now_ms: i64,
        retention: std::time::Duration,
        limit: usize,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Optional (feature `resolve`). Deletes at most `limit` of `group`'s resolution records
    /// that expired at or before `now_ms`; returns how many. Never an entity's state. Default:
    /// nothing to purge.
    #[cfg(feature = "resolve")]
    fn purge_resolutions(
        &self,
        group: &str,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<usize>> + Send {
        let _ = (group, now_ms, limit);
        async { Ok(0) }
    }

    /// How many dedup entries the store holds, for the store-entries gauge. May be an estimate
    /// where counting exactly is expensive.
    fn entry_count(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Optional. The most bytes a store key (consumer group, tenant and key together) may take
    /// in this store, where an index limits it (default: no limit). The builder refuses a
    /// configuration whose longest key would not fit, which would otherwise make every record
    /// with such a key fail.
    fn max_key_bytes(&self) -> Option<usize> {
        None
    }

    /// Optional. How long a batch's transaction may stay open where the store ends longer ones
    /// itself (PostgreSQL's `idle_in_transaction_session_timeout`: with deferred rows no
    /// statement is sent between records, so a slow handler leaves the session idle). Once half
    /// of it has passed, the runtime commits what the batch settled and goes on in a new
    /// transaction. Default: no limit.
    fn transaction_time_limit(&self) -> Option<std::time::Duration> {
        None
    }

    /// Optional. For a store whose data belongs to one instance (the embedded store: a
    /// directory per instance) rather than to the whole group: an id created with the data and
    /// kept with it. The runtime commits it to Kafka with every offset, and refuses a partition
    /// whose latest Kafka commit names another store, since this store's copy of that partition
    /// is then stale (see [`StalePartitionPolicy`](crate::StalePartitionPolicy)). Default:
    /// none, for a store the whole group shares, which is never stale.
    fn store_id(&self) -> Option<&str> {
        None
    }
}

/// The instant before which a dead letter is past `retention` at `now_ms`.
#[cfg(any(feature = "rocksdb", feature = "memory"))]
pub(crate) fn retention_cutoff(now_ms: i64, retention: std::time::Duration) -> i64 {
    now_ms.saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
}

/// This machine's name (`HOSTNAME`, else `/etc/hostname`), or `unknown-host`.
#[cfg(any(feature = "postgres", feature = "cli"))]
pub(crate) fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// The wall clock, milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A new id (of a store, of a batch attempt): 128 bits from the clock, the process and the
/// standard library's random hasher keys, as 32 hex digits. Unique enough to tell two stores
/// of one group, or two attempts at one batch, apart.
pub(crate) fn new_id() -> String {
    use sha2::{Digest, Sha256};
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static MADE: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(MADE.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut digest = Sha256::new();
    digest.update(nanos.to_be_bytes());
    digest.update(std::process::id().to_be_bytes());
    digest.update(hasher.finish().to_be_bytes());
    crate::hex::hex(&digest.finalize()[..16])
}

/// The answer of [`Transaction::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key has a live (unexpired) entry: the record is a duplicate or a conflict.
    Existing(DedupEntry),
    /// The key is free and now held by this transaction until it commits or is dropped.
    Claimed,
    /// Another in-flight transaction holds the key. Commit or drop this transaction (releasing
    /// its own claims, so two batches never wait on each other) and try again.
    Busy,
}

/// A key claimed ahead of its record by [`Transaction::prepare_claims`], with the entry the
/// record leaves if its handler succeeds without an outcome: completed, with these fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimAhead<'a> {
    /// The scoped store key.
    pub key: &'a [u8],
    /// The record's payload fingerprint.
    pub fingerprint: Fingerprint,
    /// The record's topic.
    pub topic: &'a str,
    /// The record's partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// When the entry is created (the batch's clock).
    pub created_at_ms: i64,
    /// When the entry expires.
    pub expires_at_ms: i64,
}

impl ClaimAhead<'_> {
    /// The entry: completed, no outcome.
    pub fn entry(&self) -> DedupEntry {
        DedupEntry {
            status: EntryStatus::Completed,
            fingerprint: self.fingerprint,
            outcome: None,
            topic: self.topic.to_owned(),
            partition: self.partition,
            offset: self.offset,
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// What [`Transaction::write_deferred`] did.
#[derive(Debug)]
pub enum DeferredWrites {
    /// Everything deferred is written (or nothing was deferred).
    Written,
    /// The deferred writes themselves were refused (a constraint, a bad value): a failure of
    /// the record that deferred them, classed like its handler's error.
    Rejected(HandlerError),
}

/// One batch's writes, committed atomically with the partition's new position.
///
/// Writes made between [`savepoint`](Transaction::savepoint) and
/// [`rollback_to_savepoint`](Transaction::rollback_to_savepoint) are undone by the latter; the
/// runtime sets a savepoint before each record so a failing record does not poison the batch.
///
/// # Required and optional
///
/// Every store implements the lookups, claims, savepoints, writes and the commit. Four items are
/// optional hooks for stores with particular costs or locking; their defaults are right for a
/// store that keeps the batch in memory until the commit and blocks on nothing:
/// - [`SAVEPOINT_ROUND_TRIP`](Transaction::SAVEPOINT_ROUND_TRIP): savepoints are not free;
/// - [`prepare_claims`](Transaction::prepare_claims): claim a whole batch in one go;
/// - [`take_conflict`](Transaction::take_conflict): state locks that refuse instead of wait;
/// - [`write_deferred`](Transaction::write_deferred): writes buffered until the batch's end.
pub trait Transaction: Send + 'static {
    /// The entry stored under `key` (a scoped store key), including entries written earlier in
    /// this transaction, expired or not.
    fn lookup(&mut self, key: &[u8]) -> impl Future<Output = Result<Option<DedupEntry>>> + Send;

    /// Claims `key` for a record about to be handled, unless it has an entry that has not
    /// expired at `now_ms`. A claim makes a concurrent transaction see [`Claim::Busy`] for the
    /// key until this one commits (then it sees the entry) or is dropped (then the key is free),
    /// so the same key arriving on two partitions at once is handled once.
    fn claim(&mut self, key: &[u8], now_ms: i64) -> impl Future<Output = Result<Claim>> + Send;

    /// Marks the point a later rollback returns to.
    fn savepoint(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Undoes every write since the last savepoint.
    fn rollback_to_savepoint(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Writes (or replaces an expired) dedup entry.
    fn put_entry(
        &mut self,
        key: &[u8],
        entry: &DedupEntry,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Keeps a dead letter.
    fn put_dead_letter(
        &mut self,
        dead_letter: &DeadLetter,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Commits every write and sets the partition's next offset to `next_offset`, atomically.
    /// Fails with [`Error::Fenced`](crate::Error::Fenced) (built with
    /// [`Error::fenced`](crate::Error::fenced)), writing nothing, when the partition's epoch is
    /// no longer the one the transaction was opened with.
    fn commit(self, next_offset: i64) -> impl Future<Output = Result<()>> + Send;

    /// Optional. True when a savepoint costs a round trip to a server. The runtime then handles
    /// records without savepoints; when a handler fails, it drops the whole transaction and
    /// handles the batch again from its first record with a savepoint before each (so records
    /// before the failing one may be handled twice, never committed twice). Default false: a
    /// savepoint before every record.
    const SAVEPOINT_ROUND_TRIP: bool = false;

    /// Optional. Claims several keys ahead of their records, so a store with round trips or a
    /// shared lock claims a whole batch at once; [`claim`](Transaction::claim) then answers from
    /// what this learned. Each claim comes with the entry its record leaves in the usual case
    /// (see [`ClaimAhead`]), which a store may write with the claim, skipping the write when
    /// [`put_entry`](Transaction::put_entry) brings the same entry. A key claimed here whose
    /// record is not finished by the commit is released by the commit. Default: nothing (claims
    /// are answered one by one).
    fn prepare_claims(
        &mut self,
        claims: &[ClaimAhead<'_>],
        now_ms: i64,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (claims, now_ms);
        async { Ok(()) }
    }

    /// Optional. Called just before the handler runs for `record`, whose dedup entry is kept
    /// under `store_key`: a store with an outbox numbers the record's publications from 0 again
    /// and derives their keys from `store_key` (so a record handled again publishes the same
    /// keys). Default: nothing.
    fn begin_record(&mut self, store_key: &[u8], record: &crate::Record) {
        let _ = (store_key, record);
    }

    /// Optional. Who holds a key [`Transaction::claim`] found [`Claim::Busy`] (for example
    /// its partition and epoch), named by the runtime's warning when the wait grows long.
    /// Default `None`.
    fn busy_holder(&self, store_key: &[u8]) -> Option<String> {
        let _ = store_key;
        None
    }

    /// Optional. True (once) when the handler touched state held by another in-flight
    /// transaction since the last savepoint, where the store refuses such access instead of
    /// waiting for it: the runtime then rolls the record back and handles it again after
    /// committing this transaction. Default false (a store whose locks wait).
    fn take_conflict(&mut self) -> bool {
        false
    }

    /// Optional. True when `error`, returned by a handler, is this store's own failure of the
    /// transaction as a whole, raised by the handler's statements on the transaction (a
    /// PostgreSQL deadlock or serialization failure, a lost connection): the runtime then drops
    /// the transaction and tries the batch again like any transient store failure, without
    /// counting it against the record's retry attempts. Recognised from the driver's error in
    /// the chain of `error`'s sources, whatever the handler classified it as. Default false.
    fn is_transient_failure(&self, error: &HandlerError) -> bool {
        let _ = error;
        false
    }

    /// Optional (feature `resolve`). True for a store that keeps entities and resolution
    /// records: the builder refuses a [`Resolver`](crate::resolve::Resolver) for a store
    /// without them. Default false.
    #[cfg(feature = "resolve")]
    const RESOLVES: bool = false;

    /// Optional (feature `resolve`). Locks `entity` of this transaction's consumer group until
    /// the transaction ends, like a claim (a concurrent transaction sees
    /// [`EntityLock::Busy`](crate::resolve::EntityLock::Busy) meanwhile), and returns its
    /// state, seeing this transaction's own writes. Default: refused, for a store without
    /// entities.
    #[cfg(feature = "resolve")]
    fn lock_entity(
        &mut self,
        entity: &str,
    ) -> impl Future<Output = Result<crate::resolve::EntityLock>> + Send {
        let _ = entity;
        async { Err(no_entities()) }
    }

    /// Optional (feature `resolve`). Writes an entity's state (its winner), undone by a
    /// rollback to the savepoint like every write. Default: refused.
    #[cfg(feature = "resolve")]
    fn put_entity(
        &mut self,
        state: &crate::resolve::EntityState,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = state;
        async { Err(no_entities()) }
    }

    /// Optional (feature `resolve`). Keeps a resolution record until `expires_at_ms`, when
    /// the purge may delete it. Default: refused.
    #[cfg(feature = "resolve")]
    fn put_resolution(
        &mut self,
        resolution: &crate::resolve::Resolution,
        expires_at_ms: i64,
    ) -> impl Future<Output = Result<()>> + Send {
        let _ = (resolution, expires_at_ms);
        async { Err(no_entities()) }
    }

    /// Optional. Writes now what the handler deferred to the end of the batch. Default: nothing
    /// is ever deferred, so [`DeferredWrites::Written`].
    ///
    /// The runtime calls it before every commit, and after each record's handler while records
    /// run one savepoint at a time, so a rejection belongs to that record. An `Err` is the
    /// store's failure (a transient one means: try the batch again). After either failure the
    /// transaction is rolled back to its savepoint or dropped.
    fn write_deferred(&mut self) -> impl Future<Output = Result<DeferredWrites>> + Send {
        async { Ok(DeferredWrites::Written) }
    }
}

#[cfg(feature = "resolve")]
fn no_entities() -> crate::Error {
    crate::Error::Config("this store keeps no entities: a resolver needs one that does".into())
}
