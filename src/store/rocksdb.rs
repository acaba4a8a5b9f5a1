//! The embedded RocksDB store (default).
//!
//! Five column families: `dedup` (scoped key → [`DedupEntry`], bloom-filtered for misses),
//! `expiry` (expiry time ‖ commit → the keys that commit wrote with that expiry: the index the
//! purge walks, one row per commit and expiry time), `positions` (group/topic/partition →
//! next offset and epoch), `dead_letters` (partition ‖ offset → [`DeadLetter`]) and `data` (the
//! handler's own key-value state, through [`RocksTx`]).
//!
//! A batch is buffered in a [`RocksTx`] overlay (so reads see the batch's own writes, and a
//! per-record savepoint can be undone) and lands as ONE `WriteBatch` together with the partition's
//! new position: WAL on, fsync per commit configurable. The store is single-process (RocksDB locks
//! its directory); epochs still fence a partition task that was abandoned after a revoke.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch,
    WriteOptions,
};

use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};
use crate::store::entry::{DedupEntry, Reader, put_bytes};
use crate::store::{
    Assignment, Claim, ClaimAhead, PartitionId, Store, StoredPosition, Transaction,
};

const CF_DEDUP: &str = "dedup";
const CF_EXPIRY: &str = "expiry";
const CF_POSITIONS: &str = "positions";
const CF_DEAD_LETTERS: &str = "dead_letters";
const CF_DATA: &str = "data";
const ALL_CFS: [&str; 5] = [CF_DEDUP, CF_EXPIRY, CF_POSITIONS, CF_DEAD_LETTERS, CF_DATA];

/// A key held by a transaction's overlay, its undo log and the claim tables: allocated once.
type Key = Arc<[u8]>;

/// Options of the RocksDB store.
#[derive(Debug, Clone)]
pub struct RocksOptions {
    /// Fsync the WAL on every commit (default `true`). With `false` a commit survives a process
    /// crash but not a machine crash.
    pub sync: bool,
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions { sync: true }
    }
}

/// The embedded store. Cheap to clone; clones share one database.
#[derive(Clone)]
pub struct RocksStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    write_opts: WriteOptions,
    /// Current epoch of each partition this process has acquired, keyed by the positions key.
    fences: Mutex<HashMap<Vec<u8>, Arc<Mutex<u64>>>>,
    /// Commits hold it shared; a purge round holds it exclusively, so a purge never deletes an
    /// entry that a concurrent commit just rewrote.
    purge_gate: RwLock<()>,
    /// Dedup keys claimed by in-flight transactions, with the holder's transaction id.
    claims: Mutex<Holders>,
    /// Keys of the handler's state locked by in-flight transactions (by a read or a write),
    /// with the holder's transaction id. Apart from `claims`, so a batch claiming its keys
    /// never holds up another partition's handler.
    data_locks: Mutex<Holders>,
    next_tx_id: std::sync::atomic::AtomicU64,
}

/// Keys held by in-flight transactions, each with the holder's transaction id.
type Holders = foldhash::HashMap<Key, u64>;

impl fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.inner.db.path())
            .finish_non_exhaustive()
    }
}

fn rocks(context: &str) -> impl FnOnce(rocksdb::Error) -> Error + '_ {
    move |e| Error::store(context.to_owned(), e)
}

impl StoredPosition {
    fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.next_offset.unwrap_or(-1).to_be_bytes());
        out[8..].copy_from_slice(&self.epoch.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "position");
        let next = i64::from_be_bytes(r.array()?);
        let epoch = u64::from_be_bytes(r.array()?);
        r.finish()?;
        Ok(StoredPosition {
            next_offset: (next >= 0).then_some(next),
            epoch,
        })
    }
}

fn position_key(p: &PartitionId) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + p.group.len() + p.topic.len());
    for part in [p.group.as_bytes(), p.topic.as_bytes()] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part);
    }
    k.extend_from_slice(&p.partition.to_be_bytes());
    k
}

/// Expiry index key of the entries one commit wrote with one expiry time: the time first
/// (order-preserving for negative values too), then what makes the commit unique (epoch, next
/// offset, partition; a partition's position only moves forward within an epoch). The value
/// lists the entries' keys.
fn expiry_key(expires_at_ms: i64, epoch: u64, next_offset: i64, position_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(24 + position_key.len());
    k.extend_from_slice(&((expires_at_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&next_offset.to_be_bytes());
    k.extend_from_slice(position_key);
    k
}

/// The expiry time of an index row.
fn expiry_of(index_key: &[u8]) -> Result<i64> {
    let t = index_key
        .first_chunk::<8>()
        .ok_or_else(|| Error::Corrupt("expiry index key is truncated".into()))?;
    Ok((u64::from_be_bytes(*t) ^ (1 << 63)) as i64)
}

/// The dedup keys an index row stands for. A row with an empty value is of the earlier
/// one-row-per-entry layout: its key holds the entry's key after the time.
fn indexed_keys<'a>(index_key: &'a [u8], value: &'a [u8]) -> Result<Vec<&'a [u8]>> {
    if value.is_empty() {
        return Ok(vec![&index_key[8..]]);
    }
    let mut keys = Vec::new();
    let mut r = Reader::new(value, "expiry index row");
    while !r.is_empty() {
        keys.push(r.bytes()?);
    }
    Ok(keys)
}

fn dead_letter_key(group: &str, record_topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let p = PartitionId::new(group, record_topic, partition);
    let mut k = position_key(&p);
    k.extend_from_slice(&((offset as u64) ^ (1 << 63)).to_be_bytes());
    k
}

impl RocksStore {
    /// Opens (creating if needed) a store in `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, RocksOptions::default())
    }

    /// Opens (creating if needed) a store in `path`.
    pub fn open_with(path: impl AsRef<Path>, options: RocksOptions) -> Result<Self> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf_opts = Options::default();
            if *name == CF_DEDUP || *name == CF_POSITIONS {
                let mut table = BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                cf_opts.set_block_based_table_factory(&table);
            }
            ColumnFamilyDescriptor::new(*name, cf_opts)
        });
        let db = DB::open_cf_descriptors(&db_opts, path.as_ref(), cfs).map_err(|e| {
            Error::store(format!("opening RocksDB at {}", path.as_ref().display()), e)
        })?;
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(options.sync);
        Ok(RocksStore {
            inner: Arc::new(Inner {
                db,
                write_opts,
                fences: Mutex::new(HashMap::new()),
                purge_gate: RwLock::new(()),
                claims: Mutex::new(Holders::default()),
                data_locks: Mutex::new(Holders::default()),
                next_tx_id: std::sync::atomic::AtomicU64::new(1),
            }),
        })
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.inner.cf(name)
    }

    /// The committed dedup entry under a scoped key (see
    /// [`Scope::store_key`](crate::identity::Scope::store_key)), expired or not.
    pub fn entry(&self, key: &[u8]) -> Result<Option<DedupEntry>> {
        self.inner.entry(key)
    }

    /// Flushes the memtables and waits until background compactions have finished: after a
    /// bulk load, before a measurement or a backup that should not race them.
    pub fn wait_for_compactions(&self) -> Result<()> {
        let mut options = rocksdb::WaitForCompactOptions::default();
        options.set_flush(true);
        self.inner
            .db
            .wait_for_compact(&options)
            .map_err(rocks("waiting for compactions"))
    }

    /// The stored position of a partition.
    pub fn position(&self, partition: &PartitionId) -> Result<Option<StoredPosition>> {
        self.inner
            .db
            .get_cf(self.cf(CF_POSITIONS), position_key(partition))
            .map_err(rocks("reading a position"))?
            .map(|b| StoredPosition::decode(&b))
            .transpose()
    }

    /// Sets a partition's next offset, keeping its epoch: an operator's replay or skip. Run it
    /// while no consumer owns the partition; the next owner resumes from `next_offset`, and
    /// records it has already applied are skipped as redeliveries.
    pub fn set_position(&self, partition: &PartitionId, next_offset: i64) -> Result<()> {
        let epoch = self.position(partition)?.map_or(0, |p| p.epoch);
        let row = StoredPosition {
            next_offset: Some(next_offset),
            epoch,
        };
        self.inner
            .db
            .put_cf_opt(
                self.cf(CF_POSITIONS),
                position_key(partition),
                row.encode(),
                &self.inner.write_opts,
            )
            .map_err(rocks("writing a position"))
    }

    /// Every dead letter kept, in partition and offset order.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.inner
            .db
            .iterator_cf(self.cf(CF_DEAD_LETTERS), IteratorMode::Start)
            .map(|item| {
                let (_, v) = item.map_err(rocks("reading dead letters"))?;
                DeadLetter::decode(&v)
            })
            .collect()
    }

    /// A committed value of the handler's key-value state.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner
            .db
            .get_cf(self.cf(CF_DATA), key)
            .map_err(rocks("reading handler data"))
    }

    /// Committed key-value pairs of the handler's state whose key starts with `prefix`.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(self.cf(CF_DATA), mode) {
            let (k, v) = item.map_err(rocks("scanning handler data"))?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.into_vec(), v.into_vec()));
        }
        Ok(out)
    }

    /// Number of dedup entries stored (RocksDB's estimate, cheap).
    pub fn estimated_entries(&self) -> Result<u64> {
        Ok(self
            .inner
            .db
            .property_int_value_cf(self.cf(CF_DEDUP), "rocksdb.estimate-num-keys")
            .map_err(rocks("reading the entry count"))?
            .unwrap_or(0))
    }

    fn fence(&self, key: &[u8]) -> Arc<Mutex<u64>> {
        let mut fences = self.inner.fences.lock().expect("fence map poisoned");
        match fences.entry(key.to_vec()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => e.insert(Arc::new(Mutex::new(0))).clone(),
        }
    }
}

impl Inner {
    fn cf(&self, name: &str) -> &ColumnFamily {
        // Every family is created on open, so a missing handle is a bug, not an input error.
        self.db
            .cf_handle(name)
            .expect("column family created on open")
    }

    fn entry(&self, key: &[u8]) -> Result<Option<DedupEntry>> {
        self.read_entry(key, DedupEntry::decode)
    }

    /// The committed entry under `key`, read with `decode`.
    fn read_entry<T>(
        &self,
        key: &[u8],
        decode: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<Option<T>> {
        self.db
            .get_pinned_cf(self.cf(CF_DEDUP), key)
            .map_err(rocks("reading a dedup entry"))?
            .map(|b| decode(&b))
            .transpose()
    }
}

impl Store for RocksStore {
    type Tx = RocksTx;

    async fn acquire(&self, partition: &PartitionId) -> Result<Assignment> {
        let key = position_key(partition);
        let fence = self.fence(&key);
        let mut current = fence.lock().expect("fence poisoned");
        let stored = self.position(partition)?;
        let epoch = stored.map_or(0, |p| p.epoch).max(*current) + 1;
        let row = StoredPosition {
            next_offset: stored.and_then(|p| p.next_offset),
            epoch,
        };
        self.inner
            .db
            .put_cf_opt(
                self.cf(CF_POSITIONS),
                &key,
                row.encode(),
                &self.inner.write_opts,
            )
            .map_err(rocks("writing an epoch"))?;
        *current = epoch;
        Ok(Assignment {
            epoch,
            position: row.next_offset,
        })
    }

    async fn begin(&self, partition: &PartitionId, epoch: u64) -> Result<RocksTx> {
        let position_key = position_key(partition);
        let id = self
            .inner
            .next_tx_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(RocksTx {
            id,
            claimed: foldhash::HashSet::default(),
            locked: foldhash::HashSet::default(),
            conflicted: false,
            fence: self.fence(&position_key),
            store: self.clone(),
            partition: partition.clone(),
            position_key,
            epoch,
            overlay: Default::default(),
            undo: Vec::new(),
            known: foldhash::HashMap::default(),
        })
    }

    async fn entry_count(&self) -> Result<u64> {
        self.estimated_entries()
    }

    async fn purge_expired(&self, now_ms: i64, limit: usize) -> Result<usize> {
        let inner = &self.inner;
        let _exclusive = inner.purge_gate.write().expect("purge gate poisoned");
        let mut batch = WriteBatch::default();
        let (mut examined, mut purged) = (0, 0);
        let index = inner
            .db
            .iterator_cf(inner.cf(CF_EXPIRY), IteratorMode::Start);
        for item in index {
            if examined >= limit {
                break;
            }
            let (index_key, value) = item.map_err(rocks("scanning the expiry index"))?;
            let expires_at = expiry_of(&index_key)?;
            if expires_at > now_ms {
                break;
            }
            let keys = indexed_keys(&index_key, &value)?;
            // At most `limit` keys a round: a row cut short keeps the keys left for the next.
            let (now, later) = keys.split_at(keys.len().min(limit - examined));
            for key in now {
                // The key may have been admitted again since: only its current entry's own
                // expiry counts.
                if inner.read_entry(key, DedupEntry::encoded_expiry)? == Some(expires_at) {
                    batch.delete_cf(inner.cf(CF_DEDUP), key);
                    purged += 1;
                }
            }
            examined += now.len();
            if later.is_empty() {
                batch.delete_cf(inner.cf(CF_EXPIRY), &index_key);
            } else {
                let mut rest = Vec::new();
                later.iter().for_each(|key| put_bytes(&mut rest, key));
                batch.put_cf(inner.cf(CF_EXPIRY), &index_key, rest);
            }
        }
        if !batch.is_empty() {
            inner
                .db
                .write_opt(batch, &inner.write_opts)
                .map_err(rocks("purging expired entries"))?;
        }
        Ok(purged)
    }
}

/// The families a transaction writes through its overlay. The expiry index is derived from the
/// dedup entries at commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Dedup = 0,
    DeadLetters = 1,
    Data = 2,
}

const FAMILIES: [Family; 3] = [Family::Dedup, Family::DeadLetters, Family::Data];

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Dedup => CF_DEDUP,
            Family::DeadLetters => CF_DEAD_LETTERS,
            Family::Data => CF_DATA,
        }
    }
}

/// Enters a free key in a store table (whose lock the caller holds) and in the transaction's
/// own set of what it holds (released on drop); returns the key, allocated once for both.
fn hold(table: &mut Holders, held: &mut foldhash::HashSet<Key>, key: &[u8], id: u64) -> Key {
    let key = Key::from(key);
    table.insert(key.clone(), id);
    held.insert(key.clone());
    key
}

/// Pending writes of one family: `Some(value)` is a put, `None` a delete.
type Writes = foldhash::HashMap<Key, Option<Vec<u8>>>;

/// A slot written since the last savepoint and what it held before (`None`: nothing pending).
type Undo = (Family, Key, Option<Option<Vec<u8>>>);

/// A batch transaction on the RocksDB store.
///
/// Handlers use [`get`](RocksTx::get), [`put`](RocksTx::put) and [`delete`](RocksTx::delete) on
/// their own key space; reads see the batch's earlier writes. Nothing reaches the database until
/// the runtime commits the batch, in one `WriteBatch` with the dedup entries and the position.
pub struct RocksTx {
    id: u64,
    /// Dedup keys this transaction holds in the store's claim table; released on drop.
    claimed: foldhash::HashSet<Key>,
    /// Keys of the handler's state this transaction holds locked; released on drop.
    locked: foldhash::HashSet<Key>,
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
    /// and a live entry is never claimed).
    known: foldhash::HashMap<Vec<u8>, DedupEntry>,
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
    fn write(&mut self, family: Family, key: Key, value: Option<Vec<u8>>) {
        let previous = self.overlay[family as usize].insert(key.clone(), value);
        self.undo.push((family, key, previous));
    }

    /// Locks a key of the handler's state for the rest of the transaction (no-wait: a key held
    /// by another transaction marks this one conflicted). Returns the shared key.
    fn lock_data(&mut self, key: &[u8]) -> Result<Key> {
        if let Some(held) = self.locked.get(key) {
            return Ok(held.clone());
        }
        let mut locks = self.store.inner.data_locks.lock().expect("locks poisoned");
        if locks.get(key).is_some_and(|owner| *owner != self.id) {
            self.conflicted = true;
            return Err(Error::KeyBusy);
        }
        Ok(hold(&mut locks, &mut self.locked, key, self.id))
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
    /// it, this returns [`Error::KeyBusy`]; return any error from the handler and the runtime
    /// handles the record again once that batch has committed.
    pub fn get(&mut self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        self.lock_data(key.as_ref())?;
        self.read(Family::Data, key.as_ref())
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

impl Drop for RocksTx {
    /// Releases the claims and locks: after the commit's write (the entries are visible by
    /// then), or without a commit (the keys are free again).
    fn drop(&mut self) {
        let inner = &self.store.inner;
        for (held, table) in [
            (&mut self.claimed, &inner.claims),
            (&mut self.locked, &inner.data_locks),
        ] {
            if held.is_empty() {
                continue;
            }
            let mut table = table.lock().expect("claims poisoned");
            for key in held.drain() {
                if table.get(&key) == Some(&self.id) {
                    table.remove(&key);
                }
            }
        }
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
        if let Some(entry) = self.known.get(key).filter(|e| !e.is_expired(now_ms)) {
            return Ok(Claim::Existing(entry.clone()));
        }
        let inner = self.store.inner.clone();
        let mut claims = inner.claims.lock().expect("claims poisoned");
        if claims.get(key).is_some_and(|owner| *owner != self.id) {
            return Ok(Claim::Busy);
        }
        // Read under the claim lock: a committing transaction writes its entry before it
        // releases its claim, so the key is either busy here or its entry is visible.
        if let Some(entry) = inner.entry(key)?.and_then(live) {
            return Ok(Claim::Existing(entry));
        }
        hold(&mut claims, &mut self.claimed, key, self.id);
        Ok(Claim::Claimed)
    }

    /// Claims the batch's keys under one lock of the claim table, reading their entries with
    /// one `MultiGet`; keys another transaction holds are left for `claim` to answer.
    async fn prepare_claims(&mut self, claims: &[ClaimAhead<'_>], now_ms: i64) -> Result<()> {
        let mut keys: Vec<&[u8]> = claims
            .iter()
            .map(|c| c.key)
            .filter(|k| !self.claimed.contains(*k) && !self.known.contains_key(*k))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let inner = self.store.inner.clone();
        let mut table = inner.claims.lock().expect("claims poisoned");
        keys.retain(|k| !table.contains_key(*k));
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
                    hold(&mut table, &mut self.claimed, key, self.id);
                }
            }
        }
        Ok(())
    }

    fn take_conflict(&mut self) -> bool {
        std::mem::take(&mut self.conflicted)
    }

    async fn savepoint(&mut self) -> Result<()> {
        self.conflicted = false;
        // A rollback only returns to the last savepoint.
        self.undo.clear();
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> Result<()> {
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

    async fn commit(self, next_offset: i64) -> Result<()> {
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
            return Err(Error::Fenced {
                topic: self.partition.topic.clone(),
                partition: self.partition.partition,
                epoch: self.epoch,
                current: *current,
            });
        }
        inner
            .db
            .write_opt(batch, &inner.write_opts)
            .map_err(rocks("committing a batch"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Fingerprint;
    use crate::store::EntryStatus;

    fn entry(offset: i64, expires_at_ms: i64) -> DedupEntry {
        DedupEntry {
            status: EntryStatus::Completed,
            fingerprint: Fingerprint::of(Some(b"p")),
            outcome: Some(b"ok".to_vec()),
            topic: "t".into(),
            partition: 0,
            offset,
            created_at_ms: 0,
            expires_at_ms,
        }
    }

    fn open() -> (tempfile::TempDir, RocksStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open_with(dir.path(), RocksOptions { sync: false }).unwrap();
        (dir, store)
    }

    /// Partitions 0 and 1 of one topic, acquired.
    async fn two_partitions(
        store: &RocksStore,
    ) -> ((PartitionId, Assignment), (PartitionId, Assignment)) {
        let (p0, p1) = (PartitionId::new("g", "t", 0), PartitionId::new("g", "t", 1));
        let (a0, a1) = (
            store.acquire(&p0).await.unwrap(),
            store.acquire(&p1).await.unwrap(),
        );
        ((p0, a0), (p1, a1))
    }

    #[tokio::test]
    async fn commit_is_all_or_nothing_and_rollback_undoes_one_record() {
        let (_dir, store) = open();
        let p = PartitionId::new("g", "t", 0);
        let a = store.acquire(&p).await.unwrap();
        assert_eq!(
            a,
            Assignment {
                epoch: 1,
                position: None
            }
        );

        let mut tx = store.begin(&p, a.epoch).await.unwrap();
        tx.savepoint().await.unwrap();
        tx.put("balance", b"10".to_vec());
        tx.put_entry(b"k1", &entry(0, i64::MAX)).await.unwrap();
        tx.savepoint().await.unwrap();
        tx.put("balance", b"99".to_vec());
        tx.put_entry(b"k2", &entry(1, i64::MAX)).await.unwrap();
        assert_eq!(tx.get("balance").unwrap().as_deref(), Some(&b"99"[..]));
        tx.rollback_to_savepoint().await.unwrap();
        assert_eq!(
            tx.get("balance").unwrap().as_deref(),
            Some(&b"10"[..]),
            "read your writes after rollback"
        );
        assert!(tx.lookup(b"k2").await.unwrap().is_none());
        assert!(
            tx.lookup(b"k1").await.unwrap().is_some(),
            "sees its own entry"
        );
        assert!(
            store.get(b"balance").unwrap().is_none(),
            "nothing visible before commit"
        );
        tx.commit(2).await.unwrap();

        assert_eq!(store.get(b"balance").unwrap().as_deref(), Some(&b"10"[..]));
        assert!(store.entry(b"k1").unwrap().is_some());
        assert!(store.entry(b"k2").unwrap().is_none());
        assert_eq!(
            store.position(&p).unwrap(),
            Some(StoredPosition {
                next_offset: Some(2),
                epoch: 1
            })
        );

        // A dropped transaction writes nothing.
        let mut tx = store.begin(&p, a.epoch).await.unwrap();
        tx.put("balance", b"0".to_vec());
        drop(tx);
        assert_eq!(store.get(b"balance").unwrap().as_deref(), Some(&b"10"[..]));
    }

    #[tokio::test]
    async fn a_claimed_key_is_busy_for_others_until_commit_or_drop() {
        let (_dir, store) = open();
        let ((p0, a0), (p1, a1)) = two_partitions(&store).await;
        let mut first = store.begin(&p0, a0.epoch).await.unwrap();
        let mut second = store.begin(&p1, a1.epoch).await.unwrap();
        assert_eq!(first.claim(b"k", 0).await.unwrap(), Claim::Claimed);
        assert_eq!(
            first.claim(b"k", 0).await.unwrap(),
            Claim::Claimed,
            "re-claim by the owner"
        );
        assert_eq!(second.claim(b"k", 0).await.unwrap(), Claim::Busy);

        // Dropped without commit: the key is free again.
        drop(first);
        assert_eq!(second.claim(b"k", 0).await.unwrap(), Claim::Claimed);
        second.put_entry(b"k", &entry(5, 100)).await.unwrap();
        let mut third = store.begin(&p0, a0.epoch).await.unwrap();
        assert_eq!(third.claim(b"k", 0).await.unwrap(), Claim::Busy);
        second.commit(6).await.unwrap();
        // Committed: the entry answers; once expired, the key can be claimed again.
        assert!(matches!(third.claim(b"k", 0).await.unwrap(), Claim::Existing(e) if e.offset == 5));
        assert_eq!(third.claim(b"k", 100).await.unwrap(), Claim::Claimed);
    }

    #[tokio::test]
    async fn batch_claims_take_free_keys_answer_live_ones_and_leave_busy_ones() {
        let (_dir, store) = open();
        let ((p0, a0), (p1, a1)) = two_partitions(&store).await;
        let mut setup = store.begin(&p0, a0.epoch).await.unwrap();
        setup.put_entry(b"live", &entry(1, 1_000)).await.unwrap();
        setup.put_entry(b"expired", &entry(2, 10)).await.unwrap();
        setup.commit(3).await.unwrap();
        let mut other = store.begin(&p1, a1.epoch).await.unwrap();
        assert_eq!(other.claim(b"held", 50).await.unwrap(), Claim::Claimed);

        let ahead = |key: &'static [u8]| ClaimAhead {
            key,
            fingerprint: Fingerprint::of(Some(b"p")),
            topic: "t",
            partition: 0,
            offset: 0,
            created_at_ms: 50,
            expires_at_ms: 1_000,
        };
        let mut tx = store.begin(&p0, a0.epoch).await.unwrap();
        let keys: [&'static [u8]; 5] = [b"new", b"live", b"expired", b"held", b"new"];
        let claims: Vec<_> = keys.iter().map(|k| ahead(k)).collect();
        tx.prepare_claims(&claims, 50).await.unwrap();
        // Claimed in the table already: another transaction finds them busy.
        let mut third = store.begin(&p1, a1.epoch).await.unwrap();
        assert_eq!(third.claim(b"new", 50).await.unwrap(), Claim::Busy);
        assert_eq!(third.claim(b"expired", 50).await.unwrap(), Claim::Busy);
        drop(third);

        assert_eq!(tx.claim(b"new", 50).await.unwrap(), Claim::Claimed);
        assert!(
            matches!(tx.claim(b"live", 50).await.unwrap(), Claim::Existing(e) if e.offset == 1)
        );
        assert_eq!(tx.claim(b"expired", 50).await.unwrap(), Claim::Claimed);
        assert_eq!(tx.claim(b"held", 50).await.unwrap(), Claim::Busy);
        drop(other);
        assert_eq!(tx.claim(b"held", 50).await.unwrap(), Claim::Claimed);
        // Dropped: every key it claimed is free again.
        drop(tx);
        let mut last = store.begin(&p1, a1.epoch).await.unwrap();
        for key in [&b"new"[..], b"expired", b"held"] {
            assert_eq!(last.claim(key, 50).await.unwrap(), Claim::Claimed);
        }
    }

    #[tokio::test]
    async fn state_keys_are_locked_until_commit() {
        let (_dir, store) = open();
        let ((p0, a0), (p1, a1)) = two_partitions(&store).await;
        let mut first = store.begin(&p0, a0.epoch).await.unwrap();
        let mut second = store.begin(&p1, a1.epoch).await.unwrap();
        first.savepoint().await.unwrap();
        assert_eq!(first.get("acct").unwrap(), None);
        first.put("acct", b"1".to_vec());
        second.savepoint().await.unwrap();
        assert!(matches!(second.get("acct"), Err(Error::KeyBusy)));
        second.put("acct", b"2".to_vec());
        assert!(
            second.take_conflict(),
            "the runtime learns the record must be handled again"
        );
        assert!(!second.take_conflict());
        first.commit(1).await.unwrap();
        second.savepoint().await.unwrap();
        assert_eq!(second.get("acct").unwrap().as_deref(), Some(&b"1"[..]));
        second.put("acct", b"3".to_vec());
        assert!(!second.take_conflict());
        second.commit(1).await.unwrap();
        assert_eq!(store.get(b"acct").unwrap().as_deref(), Some(&b"3"[..]));
    }

    #[tokio::test]
    async fn stale_epoch_commit_is_fenced_and_writes_nothing() {
        let (_dir, store) = open();
        let p = PartitionId::new("g", "t", 3);
        let old = store.acquire(&p).await.unwrap();
        let mut zombie = store.begin(&p, old.epoch).await.unwrap();
        zombie.put("x", b"zombie".to_vec());
        let new = store.acquire(&p).await.unwrap();
        assert_eq!(new.epoch, old.epoch + 1);
        let err = zombie.commit(10).await.unwrap_err();
        assert!(err.is_fenced(), "{err}");
        assert!(store.get(b"x").unwrap().is_none());
        assert_eq!(store.position(&p).unwrap().unwrap().next_offset, None);
    }

    #[tokio::test]
    async fn positions_and_epochs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = PartitionId::new("g", "t", 1);
        {
            let store = RocksStore::open(dir.path()).unwrap();
            let a = store.acquire(&p).await.unwrap();
            store
                .begin(&p, a.epoch)
                .await
                .unwrap()
                .commit(7)
                .await
                .unwrap();
        }
        let store = RocksStore::open(dir.path()).unwrap();
        let a = store.acquire(&p).await.unwrap();
        assert_eq!(
            a,
            Assignment {
                epoch: 2,
                position: Some(7)
            }
        );
    }

    #[tokio::test]
    async fn purge_removes_only_expired_entries_in_bounded_rounds() {
        let (_dir, store) = open();
        let p = PartitionId::new("g", "t", 0);
        let a = store.acquire(&p).await.unwrap();
        let mut tx = store.begin(&p, a.epoch).await.unwrap();
        for i in 0..5 {
            tx.put_entry(format!("old{i}").as_bytes(), &entry(i, 1_000 + i))
                .await
                .unwrap();
        }
        tx.put_entry(b"young", &entry(9, 5_000)).await.unwrap();
        // A key expired and admitted again keeps its new entry.
        tx.put_entry(b"again", &entry(10, 500)).await.unwrap();
        tx.commit(11).await.unwrap();
        let mut tx = store.begin(&p, a.epoch).await.unwrap();
        tx.put_entry(b"again", &entry(12, 9_000)).await.unwrap();
        tx.commit(13).await.unwrap();

        assert_eq!(
            store.purge_expired(2_000, 3).await.unwrap(),
            2,
            "bounded: 3 index rows, one stale"
        );
        assert_eq!(store.purge_expired(2_000, 100).await.unwrap(), 3);
        assert_eq!(store.purge_expired(2_000, 100).await.unwrap(), 0);
        for i in 0..5 {
            assert!(store.entry(format!("old{i}").as_bytes()).unwrap().is_none());
        }
        assert!(
            store.entry(b"young").unwrap().is_some(),
            "inside the window: kept"
        );
        assert_eq!(store.entry(b"again").unwrap().unwrap().offset, 12);
        assert_eq!(store.purge_expired(i64::MAX, 100).await.unwrap(), 2);
    }

    #[test]
    fn expiry_keys_sort_by_time_including_negative() {
        let mut ks = [
            expiry_key(5, 1, 0, b"a"),
            expiry_key(-3, 9, 7, b"b"),
            expiry_key(0, 2, 1, b"c"),
        ];
        ks.sort();
        let times: Vec<i64> = ks.iter().map(|k| expiry_of(k).unwrap()).collect();
        assert_eq!(times, [-3, 0, 5]);
    }

    fn index_rows(store: &RocksStore) -> usize {
        let inner = &store.inner;
        inner
            .db
            .iterator_cf(inner.cf(CF_EXPIRY), IteratorMode::Start)
            .count()
    }

    #[tokio::test]
    async fn one_index_row_per_commit_and_expiry_and_the_purge_keeps_its_bound() {
        let (_dir, store) = open();
        let p = PartitionId::new("g", "t", 0);
        let a = store.acquire(&p).await.unwrap();
        let mut tx = store.begin(&p, a.epoch).await.unwrap();
        for i in 0..4 {
            tx.put_entry(format!("k{i}").as_bytes(), &entry(i, 1_000))
                .await
                .unwrap();
        }
        tx.put_entry(b"later", &entry(4, 3_000)).await.unwrap();
        // Undone: not in the index.
        tx.savepoint().await.unwrap();
        tx.put_entry(b"undone", &entry(5, 1_000)).await.unwrap();
        tx.rollback_to_savepoint().await.unwrap();
        tx.commit(5).await.unwrap();
        // The next commit, same expiry time: a row of its own, not a replacement.
        let mut tx = store.begin(&p, a.epoch).await.unwrap();
        for i in 0..2 {
            tx.put_entry(format!("m{i}").as_bytes(), &entry(5 + i, 1_000))
                .await
                .unwrap();
        }
        tx.commit(7).await.unwrap();
        // A row of the earlier layout (time ‖ key, empty value) is still purged.
        let inner = &store.inner;
        let mut legacy = ((1_500u64) ^ (1 << 63)).to_be_bytes().to_vec();
        legacy.extend_from_slice(b"legacy");
        inner
            .db
            .put_cf(inner.cf(CF_DEDUP), b"legacy", entry(6, 1_500).encode())
            .unwrap();
        inner.db.put_cf(inner.cf(CF_EXPIRY), &legacy, []).unwrap();

        assert_eq!(
            index_rows(&store),
            4,
            "two rows for the first commit (two expiry times), one for the second, the legacy row"
        );
        assert_eq!(
            store.purge_expired(2_000, 3).await.unwrap(),
            3,
            "bounded: a row is cut short"
        );
        assert!(store.entry(b"k2").unwrap().is_none());
        assert!(
            store.entry(b"k3").unwrap().is_some(),
            "left in its row for the next round"
        );
        assert_eq!(index_rows(&store), 4, "the cut row keeps the rest");
        assert_eq!(store.purge_expired(2_000, 3).await.unwrap(), 3);
        assert!(store.entry(b"k3").unwrap().is_none());
        assert!(store.entry(b"m1").unwrap().is_none());
        assert!(store.entry(b"legacy").unwrap().is_some(), "after the limit");
        assert_eq!(store.purge_expired(2_000, 10).await.unwrap(), 1);
        assert!(store.entry(b"legacy").unwrap().is_none());
        assert!(store.entry(b"later").unwrap().is_some());
        assert_eq!(store.purge_expired(2_000, 10).await.unwrap(), 0);
        assert_eq!(store.purge_expired(5_000, 10).await.unwrap(), 1);
        assert_eq!(index_rows(&store), 0);
    }
}
