//! The embedded RocksDB store (default).
//!
//! Twelve column families: `dedup` (scoped key → [`DedupEntry`], bloom-filtered for misses),
//! `expiry` (expiry time ‖ commit → the keys that commit wrote with that expiry: the index the
//! purge walks, one row per commit and expiry time), `positions` (group/topic/partition →
//! next offset and epoch), `dead_letters` (partition ‖ offset → [`DeadLetter`]), `data` (the
//! handler's own key-value state, through [`RocksTx`]), `meta` (the store id), and `outbox` and
//! `outbox_dead` (published rows waiting for the relay, and the ones the broker refused; feature
//! `outbox`, in `outbox.rs`), and `entities`, `resolutions` and `resolution_expiry` (each
//! entity's winner, the resolution records and their purge index; feature `resolve`, in
//! `resolve.rs`), and `audit` (operators' commands, `audit.rs`).
//!
//! A batch is buffered in a [`RocksTx`] overlay (so reads see the batch's own writes, and a
//! per-record savepoint can be undone) and lands as ONE `WriteBatch` together with the partition's
//! new position: WAL on, fsync per commit configurable. The store is single-process (RocksDB locks
//! its directory); epochs still fence a partition task that was abandoned after a revoke. Its
//! data is this instance's alone: the store id, created with the directory, lets the runtime
//! refuse a partition whose latest state another instance's store holds.
//!
//! Files: `keys.rs` (families and encodings), `tx.rs` (the batch and its commit), `purge.rs`
//! (retention), `request.rs` (idempotency keys of requests, feature `http`); claims and state
//! locks use the store module's shared key table.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DB, IteratorMode, Options,
    WriteOptions,
};

use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};
use crate::store::claims::KeyTable;
use crate::store::entry::DedupEntry;
use crate::store::{Assignment, EntryKey, Inspect, PartitionId, Store, StoredPosition};

mod audit;
mod keys;
#[cfg(feature = "outbox")]
mod outbox;
mod purge;
#[cfg(feature = "http")]
mod request;
#[cfg(feature = "resolve")]
mod resolve;
#[cfg(test)]
mod tests;
mod tx;

use keys::{
    ALL_CFS, CF_DATA, CF_DEAD_LETTERS, CF_DEDUP, CF_META, CF_POSITIONS, STORE_ID_KEY, position_key,
};
#[cfg(feature = "http")]
pub use request::{REQUEST_STATE_LOCK_WAIT, RocksRequestTx};
pub use tx::RocksTx;

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

pub(super) struct Inner {
    db: DB,
    write_opts: WriteOptions,
    /// Current epoch of each partition this process has acquired, keyed by the positions key.
    fences: Mutex<HashMap<Vec<u8>, Arc<Mutex<u64>>>>,
    /// Commits hold it shared; a purge round holds it exclusively, so a purge never deletes an
    /// entry that a concurrent commit just rewrote.
    purge_gate: RwLock<()>,
    /// Where each group's next dead-letter purge goes on (`purge::purge_dead_letters`).
    dead_letter_cursor: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    /// Dedup keys claimed by in-flight transactions.
    claims: Arc<KeyTable>,
    /// Keys of the handler's state locked by in-flight transactions (by a read or a write).
    /// Apart from `claims`, so a batch claiming its keys never holds up another partition's
    /// handler.
    data_locks: Arc<KeyTable>,
    /// Entities locked by in-flight transactions (feature `resolve`).
    #[cfg(feature = "resolve")]
    entity_locks: Arc<KeyTable>,
    /// Created with the directory and kept in it (`meta` family): which store's copy of a
    /// partition Kafka's latest commit came from.
    store_id: String,
    /// The claims of request keys this process holds, one lock per stripe of keys, taken
    /// while a key is claimed, renewed, released or completed (`request.rs`).
    #[cfg(feature = "http")]
    requests: request::Requests,
    /// Where the outbox stands: sequence numbers, the relay's cursor and lease.
    #[cfg(feature = "outbox")]
    outbox: outbox::RocksOutbox,
}

impl fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.inner.db.path())
            .finish_non_exhaustive()
    }
}

pub(super) fn rocks(context: &str) -> impl FnOnce(rocksdb::Error) -> Error + '_ {
    move |e| Error::store(context.to_owned(), e)
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
        let store_id = store_id(&db)?;
        Self::from_db(db, options, store_id)
    }

    /// Opens the store in `path` for reading only: RocksDB's read-only mode takes no lock and
    /// writes nothing, so the service that owns the directory may keep running (reads see what
    /// it had committed when this opened). Fails, creating and writing nothing, unless `path`
    /// holds a store of this layout: a missing or foreign directory, or one of another version
    /// (column families missing or unknown), is [`Error::Config`]. Commits through it fail.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        check_layout(path)?;
        let db = DB::open_cf_for_read_only(&Options::default(), path, ALL_CFS, false)
            .map_err(|e| Error::store(format!("opening RocksDB at {}", path.display()), e))?;
        let id = db
            .get_cf(db.cf_handle(CF_META).expect("opened"), STORE_ID_KEY)
            .map_err(rocks("reading the store id"))?
            .ok_or_else(|| {
                Error::Config(format!("{} holds no store id: not a store", path.display()))
            })?;
        let id =
            String::from_utf8(id).map_err(|_| Error::Corrupt("store id is not UTF-8".into()))?;
        Self::from_db(db, RocksOptions::default(), id)
    }

    /// Opens the store in `path` for writing, as an operator's tool does: like
    /// [`open_with`](RocksStore::open_with), but refused, creating nothing, unless `path` holds
    /// a store of this layout ([`Error::Config`], as [`open_read_only`](RocksStore::open_read_only)),
    /// and refused while another process (its service) has the directory open.
    pub fn open_existing(path: impl AsRef<Path>, options: RocksOptions) -> Result<Self> {
        let path = path.as_ref();
        check_layout(path)?;
        let mut db_opts = Options::default();
        db_opts.increase_parallelism(2);
        let db = DB::open_cf(&db_opts, path, ALL_CFS).map_err(|e| {
            if e.to_string().contains("lock") {
                Error::Config(format!(
                    "the store at {} is open in another process (its service?): stop it first",
                    path.display()
                ))
            } else {
                Error::store(format!("opening RocksDB at {}", path.display()), e)
            }
        })?;
        let store_id = store_id(&db)?;
        Self::from_db(db, options, store_id)
    }

    fn from_db(db: DB, options: RocksOptions, store_id: String) -> Result<Self> {
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(options.sync);
        #[cfg(feature = "outbox")]
        let outbox = outbox::RocksOutbox::open(&db)?;
        Ok(RocksStore {
            inner: Arc::new(Inner {
                db,
                write_opts,
                fences: Mutex::new(HashMap::new()),
                purge_gate: RwLock::new(()),
                dead_letter_cursor: std::sync::Mutex::default(),
                claims: KeyTable::shared(),
                data_locks: KeyTable::shared(),
                #[cfg(feature = "resolve")]
                entity_locks: KeyTable::shared(),
                store_id,
                #[cfg(feature = "http")]
                requests: request::Requests::default(),
                #[cfg(feature = "outbox")]
                outbox,
            }),
        })
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.inner.cf(name)
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

    /// The stored position of a partition, read now.
    fn read_position(&self, partition: &PartitionId) -> Result<Option<StoredPosition>> {
        self.inner
            .db
            .get_cf(self.cf(CF_POSITIONS), position_key(partition))
            .map_err(rocks("reading a position"))?
            .map(|b| StoredPosition::decode(&b))
            .transpose()
    }

    pub(super) fn fence(&self, key: &[u8]) -> Arc<Mutex<u64>> {
        let mut fences = self.inner.fences.lock().expect("fence map poisoned");
        match fences.entry(key.to_vec()) {
            Entry::Occupied(e) => e.get().clone(),
            Entry::Vacant(e) => e.insert(Arc::new(Mutex::new(0))).clone(),
        }
    }
}

impl Inner {
    /// Writes `batch` through `write` (a store without the outbox publishes nothing).
    #[cfg(not(feature = "outbox"))]
    pub(super) fn write_with_published(
        &self,
        batch: rocksdb::WriteBatch,
        (): tx::Published,
        write: impl FnOnce(rocksdb::WriteBatch) -> Result<()>,
    ) -> Result<()> {
        write(batch)
    }

    pub(super) fn cf(&self, name: &str) -> &ColumnFamily {
        // Every family is created on open, so a missing handle is a bug, not an input error.
        self.db
            .cf_handle(name)
            .expect("column family created on open")
    }

    fn entry(&self, key: &[u8]) -> Result<Option<DedupEntry>> {
        self.read_entry(key, DedupEntry::decode)
    }

    /// The committed entry under `key`, read with `decode`.
    pub(super) fn read_entry<T>(
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

/// Refuses, with [`Error::Config`], a `path` that holds no store of this layout: no RocksDB
/// database, or one whose column families are not this version's.
fn check_layout(path: &Path) -> Result<()> {
    if !path.join("CURRENT").is_file() {
        return Err(Error::Config(format!(
            "{} holds no RocksDB store",
            path.display()
        )));
    }
    let families = DB::list_cf(&Options::default(), path)
        .map_err(|e| Error::store(format!("listing the families of {}", path.display()), e))?;
    let missing: Vec<&str> = ALL_CFS
        .iter()
        .copied()
        .filter(|cf| !families.iter().any(|f| f == cf))
        .collect();
    let unknown: Vec<&str> = families
        .iter()
        .map(String::as_str)
        .filter(|f| *f != "default" && !ALL_CFS.contains(f))
        .collect();
    if !missing.is_empty() || !unknown.is_empty() {
        return Err(Error::Config(format!(
            "the store at {} is of another version (families missing: {missing:?}, unknown: \
             {unknown:?}): open it with the version that wrote it",
            path.display()
        )));
    }
    Ok(())
}

/// The directory's store id, created (and synced) the first time the directory is opened.
fn store_id(db: &DB) -> Result<String> {
    let cf = db
        .cf_handle(CF_META)
        .expect("every column family is opened");
    if let Some(id) = db
        .get_cf(cf, STORE_ID_KEY)
        .map_err(rocks("reading the store id"))?
    {
        return String::from_utf8(id).map_err(|_| Error::Corrupt("store id is not UTF-8".into()));
    }
    let id = crate::store::new_id();
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    db.put_cf_opt(cf, STORE_ID_KEY, id.as_bytes(), &sync)
        .map_err(rocks("writing the store id"))?;
    Ok(id)
}

impl Store for RocksStore {
    type Tx = RocksTx;

    async fn acquire(&self, partition: &PartitionId) -> Result<Assignment> {
        let key = position_key(partition);
        let fence = self.fence(&key);
        let mut current = fence.lock().expect("fence poisoned");
        let stored = self.read_position(partition)?;
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
        Ok(RocksTx::new(self, partition, epoch))
    }

    async fn entry_count(&self) -> Result<u64> {
        self.estimated_entries()
    }

    async fn purge_expired(&self, group: &str, now_ms: i64, limit: usize) -> Result<usize> {
        purge::purge_expired(&self.inner, group, now_ms, limit)
    }

    async fn purge_dead_letters(
        &self,
        group: &str,
        now_ms: i64,
        retention: std::time::Duration,
        limit: usize,
    ) -> Result<usize> {
        let before = crate::store::retention_cutoff(now_ms, retention);
        purge::purge_dead_letters(&self.inner, group, before, limit)
    }

    #[cfg(feature = "resolve")]
    async fn purge_resolutions(&self, group: &str, now_ms: i64, limit: usize) -> Result<usize> {
        resolve::purge_resolutions(&self.inner, group, now_ms, limit)
    }

    fn store_id(&self) -> Option<&str> {
        Some(&self.inner.store_id)
    }
}

impl Inspect for RocksStore {
    async fn position(&self, partition: &PartitionId) -> Result<Option<StoredPosition>> {
        self.read_position(partition)
    }

    /// Keeps the partition's epoch (0 for a partition never acquired).
    async fn set_position(&self, partition: &PartitionId, next_offset: i64) -> Result<()> {
        crate::store::check_position(next_offset)?;
        let epoch = self.read_position(partition)?.map_or(0, |p| p.epoch);
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

    async fn positions(&self, group: &str) -> Result<Vec<(PartitionId, StoredPosition)>> {
        let prefix = purge::group_prefix(group);
        let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(self.cf(CF_POSITIONS), mode) {
            let (k, v) = item.map_err(rocks("reading positions"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let partition = keys::decode_position_key(&k)?;
            out.push((partition, StoredPosition::decode(&v)?));
        }
        out.sort_by(|a, b| (&a.0.topic, a.0.partition).cmp(&(&b.0.topic, b.0.partition)));
        Ok(out)
    }

    async fn entry(&self, key: &EntryKey<'_>) -> Result<Option<DedupEntry>> {
        self.inner.entry(&key.store_key())
    }

    async fn dead_letters(&self, partition: &PartitionId) -> Result<Vec<DeadLetter>> {
        let prefix = position_key(partition);
        let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(self.cf(CF_DEAD_LETTERS), mode) {
            let (k, v) = item.map_err(rocks("reading dead letters"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(DeadLetter::decode(&v)?);
        }
        Ok(out)
    }
}
