//! A batch on the RocksDB store: an overlay of pending writes, savepoints, claims, state locks,
//! and the commit that lands all of it as ONE `WriteBatch` with the partition's new position.
//!
//! Reads see the batch's own writes; a savepoint's undo log restores the overlay. Dedup keys are
//! claimed, and keys of the handler's state locked, in the store's key tables (`claims.rs` of
//! the store module) until the transaction is dropped, which happens after the commit's write.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use rocksdb::WriteBatch;

use super::RocksStore;
use super::keys::{
    CF_DATA, CF_DEAD_LETTERS, CF_DEDUP, CF_ENTITIES, CF_EXPIRY, CF_POSITIONS, CF_RESOLUTION_EXPIRY,
    CF_RESOLUTIONS, dead_letter_key, expiry_key, position_key,
};
use super::rocks;
use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};
use crate::store::claims::{Holds, Key, StateError, holder_name};
use crate::store::entry::{DedupEntry, put_bytes};
use crate::store::{Claim, ClaimAhead, PartitionId, StoredPosition, Transaction};

/// The families a transaction writes through its overlay. The expiry index is derived from the
/// dedup entries at commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Dedup = 0,
    DeadLetters = 1,
    Data = 2,
    /// Entities' states (feature `resolve`).
    Entities = 3,
    /// Resolution records and their expiry index (feature `resolve`).
    Resolutions = 4,
    ResolutionExpiry = 5,
}

const FAMILIES: [Family; 6] = [
    Family::Dedup,
    Family::DeadLetters,
    Family::Data,
    Family::Entities,
    Family::Resolutions,
    Family::ResolutionExpiry,
];

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Dedup => CF_DEDUP,
            Family::DeadLetters => CF_DEAD_LETTERS,
            Family::Data => CF_DATA,
            Family::Entities => CF_ENTITIES,
            Family::Resolutions => CF_RESOLUTIONS,
            Family::ResolutionExpiry => CF_RESOLUTION_EXPIRY,
        }
    }
}

/// Pending writes of one family: `Some(value)` is a put, `None` a delete.
type Writes = foldhash::HashMap<Key, Option<Vec<u8>>>;

/// A slot written since the last savepoint and what it held before (`None`: nothing pending).
type Undo = (Family, Key, Option<Option<Vec<u8>>>);

/// The rows a transaction published, written with its batch (feature `outbox`).
#[cfg(feature = "outbox")]
pub(super) type Published = Vec<crate::outbox::Outgoing>;
/// Without the outbox a transaction publishes nothing.
#[cfg(not(feature = "outbox"))]
pub(super) type Published = ();

/// A batch transaction on the RocksDB store.
///
/// Handlers use [`get`](RocksTx::get), [`put`](RocksTx::put) and [`delete`](RocksTx::delete) on
/// their own key space; reads see the batch's earlier writes. Nothing reaches the database until
/// the runtime commits the batch, in one `WriteBatch` with the dedup entries and the position.
pub struct RocksTx {
    /// Dedup keys this transaction holds in the store's claim table; released on drop.
    claimed: Holds,
    /// Keys of the handler's state this transaction holds locked; released on drop.
    locked: Holds,
    /// Entities this transaction holds locked (feature `resolve`); released on drop.
    #[cfg(feature = "resolve")]
    entities: Holds,
    /// Set when the handler touched a state key held by another transaction.
    conflicted: bool,
    store: RocksStore,
    partition: PartitionId,
    position_key: Vec<u8>,
    epoch: u64,
    fence: Arc<Mutex<u64>>,
    /// Pending writes of each family, indexed by `Family as usize`.
    overlay: [Writes; FAMILIES.len()],
    /// Previous overlay state of each slot written since the last savepoint, newest last.
    undo: Vec<Undo>,
    /// Live entries read by `prepare_claims` (committed, so only a claim could change them,
    /// and a live entry is never claimed), each taken out by the claim that answers with it.
    known: foldhash::HashMap<Vec<u8>, DedupEntry>,
    /// Events published through the outbox, written with the commit.
    #[cfg(feature = "outbox")]
    pub(super) publications: crate::outbox::Publications,
}

impl fmt::Debug for RocksTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksTx")
            .field("partition", &self.partition)
            .field("epoch", &self.epoch)
            .field(
                "pending_writes",
                &self.overlay.iter().map(HashMap::len).sum::<usize>(),
            )
            .finish_non_exhaustive()
    }
}

impl RocksTx {
    pub(super) fn new(store: &RocksStore, partition: &PartitionId, epoch: u64) -> RocksTx {
        let position_key = position_key(partition);
        let inner = &store.inner;
        let holder: std::sync::Arc<str> = holder_name(partition, epoch).into();
        RocksTx {
            claimed: Holds::new(&inner.claims, holder.clone()),
            #[cfg(feature = "resolve")]
            entities: Holds::new(&inner.entity_locks, holder.clone()),
            locked: Holds::new(&inner.data_locks, holder),
            conflicted: false,
            fence: store.fence(&position_key),
            store: store.clone(),
            partition: partition.clone(),
            position_key,
            epoch,
            overlay: Default::default(),
            undo: Vec::new(),
            known: foldhash::HashMap::default(),
            #[cfg(feature = "outbox")]
            publications: Default::default(),
        }
    }

    /// A transaction for one request (feature `http`): only the handler's state, committed by
    /// `RequestStore::commit_request` with the request key's entry.
    #[cfg(feature = "http")]
    pub(super) fn for_request(store: &RocksStore) -> RocksTx {
        let inner = &store.inner;
        let holder: std::sync::Arc<str> = "a request".into();
        RocksTx {
            claimed: Holds::new(&inner.claims, holder.clone()),
            #[cfg(feature = "resolve")]
            entities: Holds::new(&inner.entity_locks, holder.clone()),
            locked: Holds::new(&inner.data_locks, holder),
            conflicted: false,
            fence: Arc::new(Mutex::new(0)),
            store: store.clone(),
            partition: PartitionId::new("", "", -1),
            position_key: Vec::new(),
            epoch: 0,
            overlay: Default::default(),
            undo: Vec::new(),
            known: foldhash::HashMap::default(),
            #[cfg(feature = "outbox")]
            publications: Default::default(),
        }
    }

    /// The handler's state writes as one batch (a request's transaction writes nothing else).
    #[cfg(feature = "http")]
    pub(super) fn data_batch(&self) -> WriteBatch {
        let cf = self.store.inner.cf(Family::Data.name());
        let mut writes: Vec<_> = self.overlay[Family::Data as usize].iter().collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut batch = WriteBatch::default();
        for (key, value) in writes {
            match value {
                Some(v) => batch.put_cf(cf, key, v),
                None => batch.delete_cf(cf, key),
            }
        }
        batch
    }

    /// What the transaction published, for its commit to write (nothing without `outbox`).
    #[cfg(feature = "outbox")]
    pub(super) fn take_published(&mut self) -> Published {
        self.publications.take()
    }

    /// What the transaction published, for its commit to write (nothing without `outbox`).
    #[cfg(not(feature = "outbox"))]
    pub(super) fn take_published(&mut self) -> Published {}

    fn write(&mut self, family: Family, key: Key, value: Option<Vec<u8>>) {
        let previous = self.overlay[family as usize].insert(key.clone(), value);
        self.undo.push((family, key, previous));
    }

    /// Locks a key of the handler's state for the rest of the transaction (no-wait: a key held
    /// by another transaction marks this one conflicted). Returns the shared key.
    fn lock_data(&mut self, key: &[u8]) -> std::result::Result<Key, StateError> {
        self.locked.try_hold(key).ok_or_else(|| {
            self.conflicted = true;
            StateError::KeyBusy
        })
    }

    /// Locks a key of the handler's state if no other transaction holds it (a request's
    /// transaction waits for it instead of being marked conflicted).
    #[cfg(feature = "http")]
    pub(super) fn try_lock_data(&mut self, key: &[u8]) -> bool {
        self.locked.try_hold(key).is_some()
    }

    fn read(&self, family: Family, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(pending) = self.overlay[family as usize].get(key) {
            return Ok(pending.clone());
        }
        let inner = &self.store.inner;
        inner
            .db
            .get_cf(inner.cf(family.name()), key)
            .map_err(rocks("reading through a transaction"))
    }

    /// Reads a key of the handler's state, seeing this batch's own writes.
    ///
    /// The key stays locked until the batch commits, so no concurrent batch (another
    /// partition) can change it in between: read-modify-write is safe. If another batch holds
    /// it, this returns [`StateError::KeyBusy`]; return any error from the handler and the
    /// runtime handles the record again once that batch has committed.
    pub fn get(
        &mut self,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<Option<Vec<u8>>, StateError> {
        self.lock_data(key.as_ref())?;
        Ok(self.read(Family::Data, key.as_ref())?)
    }

    /// Writes a key of the handler's state (locking it like [`get`](RocksTx::get); on a busy
    /// key the write is dropped and the record is handled again).
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) {
        if let Ok(key) = self.lock_data(key.as_ref()) {
            self.write(Family::Data, key, Some(value.into()));
        }
    }

    /// Deletes a key of the handler's state (locking it like [`put`](RocksTx::put)).
    pub fn delete(&mut self, key: impl AsRef<[u8]>) {
        if let Ok(key) = self.lock_data(key.as_ref()) {
            self.write(Family::Data, key, None);
        }
    }

    /// The partition this batch belongs to.
    pub fn partition(&self) -> &PartitionId {
        &self.partition
    }
}

impl Transaction for RocksTx {
    async fn lookup(&mut self, key: &[u8]) -> Result<Option<DedupEntry>> {
        self.read(Family::Dedup, key)?
            .map(|b| DedupEntry::decode(&b))
            .transpose()
    }

    async fn claim(&mut self, key: &[u8], now_ms: i64) -> Result<Claim> {
        let live = |e: DedupEntry| (!e.is_expired(now_ms)).then_some(e);
        if let Some(pending) = self.overlay[Family::Dedup as usize].get(key) {
            let entry = pending.as_deref().map(DedupEntry::decode).transpose()?;
            return Ok(entry.and_then(live).map_or(Claim::Claimed, Claim::Existing));
        }
        if self.claimed.contains(key) {
            return Ok(Claim::Claimed);
        }
        // Taken, not copied: a batch claims a key once; a second claim of it reads it again.
        if let Some(entry) = self.known.remove(key).filter(|e| !e.is_expired(now_ms)) {
            return Ok(Claim::Existing(entry));
        }
        let inner = self.store.inner.clone();
        let mut claims = inner.claims.lock();
        if claims.held_by_other(&self.claimed, key) {
            return Ok(Claim::Busy);
        }
        // Read under the claim lock: a committing transaction writes its entry before it
        // releases its claim, so the key is either busy here or its entry is visible.
        if let Some(entry) = inner.entry(key)?.and_then(live) {
            return Ok(Claim::Existing(entry));
        }
        claims.hold(&mut self.claimed, key);
        Ok(Claim::Claimed)
    }

    /// Claims the batch's keys under one lock of the claim table, reading their entries with
    /// one `MultiGet`; keys another transaction holds are left for `claim` to answer.
    async fn prepare_claims(&mut self, claims: &[ClaimAhead<'_>], now_ms: i64) -> Result<()> {
        let mut keys: Vec<&[u8]> = claims
            .iter()
            .map(|c| c.key)
            .filter(|k| !self.claimed.contains(k) && !self.known.contains_key(*k))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let inner = self.store.inner.clone();
        let mut table = inner.claims.lock();
        keys.retain(|k| !table.is_held(k));
        // Read under the claim lock, as in `claim`: a key is either busy or its entry visible.
        let values = inner
            .db
            .batched_multi_get_cf(inner.cf(CF_DEDUP), &keys, true);
        for (key, value) in keys.iter().zip(values) {
            let value = value.map_err(rocks("reading dedup entries"))?;
            match value.map(|v| DedupEntry::decode(&v)).transpose()? {
                Some(entry) if !entry.is_expired(now_ms) => {
                    self.known.insert(key.to_vec(), entry);
                }
                _ => {
                    table.hold(&mut self.claimed, key);
                }
            }
        }
        Ok(())
    }

    fn take_conflict(&mut self) -> bool {
        std::mem::take(&mut self.conflicted)
    }

    fn busy_holder(&self, store_key: &[u8]) -> Option<String> {
        self.claimed.other_holder(store_key).map(|h| h.to_string())
    }

    #[cfg(feature = "outbox")]
    fn begin_record(&mut self, store_key: &[u8], record: &crate::Record) {
        self.publications.begin_record(store_key, record);
    }

    #[cfg(feature = "resolve")]
    const RESOLVES: bool = true;

    /// Locked in the store's entity table (no wait: a held entity is busy) and read under its
    /// lock, as a claim is: a committing transaction writes the entity before it lets it go.
    #[cfg(feature = "resolve")]
    async fn lock_entity(&mut self, entity: &str) -> Result<crate::resolve::EntityLock> {
        use crate::resolve::{EntityLock, EntityState, entity_key};
        let key = entity_key(&self.partition.group, entity);
        if !self.entities.contains(&key) {
            let inner = self.store.inner.clone();
            let mut table = inner.entity_locks.lock();
            if table.held_by_other(&self.entities, &key) {
                return Ok(EntityLock::Busy);
            }
            table.hold(&mut self.entities, &key);
        }
        let state = self.read(Family::Entities, &key)?;
        Ok(EntityLock::Held(
            state.map(|b| EntityState::from_json(&b)).transpose()?,
        ))
    }

    #[cfg(feature = "resolve")]
    async fn put_entity(&mut self, state: &crate::resolve::EntityState) -> Result<()> {
        let key = crate::resolve::entity_key(&self.partition.group, &state.entity);
        self.write(Family::Entities, Key::from(key), Some(state.to_json()));
        Ok(())
    }

    #[cfg(feature = "resolve")]
    async fn put_resolution(
        &mut self,
        resolution: &crate::resolve::Resolution,
        expires_at_ms: i64,
    ) -> Result<()> {
        let key = crate::resolve::resolution_key(
            &self.partition.group,
            &resolution.entity,
            resolution.seq,
        );
        let index = super::keys::resolution_expiry_key(expires_at_ms, &key);
        self.write(Family::ResolutionExpiry, Key::from(index), Some(Vec::new()));
        self.write(
            Family::Resolutions,
            Key::from(key),
            Some(resolution.to_json()),
        );
        Ok(())
    }

    async fn savepoint(&mut self) -> Result<()> {
        #[cfg(feature = "outbox")]
        self.publications.savepoint();
        self.conflicted = false;
        // A rollback only returns to the last savepoint.
        self.undo.clear();
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> Result<()> {
        #[cfg(feature = "outbox")]
        self.publications.rollback_to_savepoint();
        while let Some((family, key, previous)) = self.undo.pop() {
            let writes = &mut self.overlay[family as usize];
            match previous {
                Some(value) => writes.insert(key, value),
                None => writes.remove(&key),
            };
        }
        Ok(())
    }

    async fn put_entry(&mut self, key: &[u8], entry: &DedupEntry) -> Result<()> {
        let key = self
            .claimed
            .get(key)
            .cloned()
            .unwrap_or_else(|| Key::from(key));
        self.write(Family::Dedup, key, Some(entry.encode()));
        Ok(())
    }

    async fn put_dead_letter(&mut self, dead_letter: &DeadLetter) -> Result<()> {
        let r = &dead_letter.record;
        let key = dead_letter_key(&self.partition.group, r.topic(), r.partition(), r.offset());
        self.write(
            Family::DeadLetters,
            Key::from(key),
            Some(dead_letter.encode()),
        );
        Ok(())
    }

    async fn commit(mut self, next_offset: i64) -> Result<()> {
        let published = self.take_published();
        let inner = &self.store.inner;
        let pending: usize = self.overlay.iter().map(HashMap::len).sum();
        let mut batch = WriteBatch::with_capacity_bytes(128 * (pending + 1));
        // The keys of the entries written, by expiry time: one index row per expiry time.
        let mut expiring: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
        for family in FAMILIES {
            let cf = inner.cf(family.name());
            // In key order: the memtable inserts of a sorted batch reuse their search path.
            let mut writes: Vec<_> = self.overlay[family as usize].iter().collect();
            writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, value) in writes {
                match value {
                    Some(v) => {
                        batch.put_cf(cf, key, v);
                        if family == Family::Dedup {
                            let keys = expiring.entry(DedupEntry::encoded_expiry(v)?).or_default();
                            put_bytes(keys, key);
                        }
                    }
                    None => batch.delete_cf(cf, key),
                }
            }
        }
        let expiry = inner.cf(CF_EXPIRY);
        for (expires_at_ms, keys) in &expiring {
            let index_key = expiry_key(*expires_at_ms, self.epoch, next_offset, &self.position_key);
            batch.put_cf(expiry, index_key, keys);
        }
        let row = StoredPosition {
            next_offset: Some(next_offset),
            epoch: self.epoch,
        };
        batch.put_cf(inner.cf(CF_POSITIONS), &self.position_key, row.encode());

        let _shared = inner.purge_gate.read().expect("purge gate poisoned");
        let current = self.fence.lock().expect("fence poisoned");
        if *current != self.epoch {
            return Err(Error::fenced(&self.partition, self.epoch, *current));
        }
        inner.write_with_published(batch, published, |batch| {
            inner
                .db
                .write_opt(batch, &inner.write_opts)
                .map_err(rocks("committing a batch"))
        })
    }
}

/// Publishes through the outbox, committed with this transaction (feature `outbox`).
#[cfg(feature = "outbox")]
impl crate::outbox::Publish for RocksTx {
    fn publish(
        &mut self,
        publication: crate::outbox::Publication,
    ) -> std::result::Result<String, crate::outbox::PublishError> {
        self.publications.publish(publication)
    }
}
