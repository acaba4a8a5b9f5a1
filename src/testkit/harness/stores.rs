//! The kinds of store a harness makes one of per scenario.

use crate::store::{Inspect, Store};

/// A kind of store the harness makes one of per scenario, and opens once per consumer
/// incarnation (on the incarnation's own tokio runtime).
pub trait HarnessStore {
    /// The store.
    type Store: Store + Inspect + Clone;
    /// What keeps a scenario's store alive between incarnations (a directory, a database).
    type Kept;
    /// Whether two consumer instances may use the store at once (a group sharing it).
    const SHARED: bool = false;
    /// A new, empty store for a scenario.
    fn fresh(&self, rt: &tokio::runtime::Runtime) -> Self::Kept;
    /// Opens the scenario's store.
    fn open(&self, kept: &Self::Kept, rt: &tokio::runtime::Runtime) -> Self::Store;
    /// Where a consumer process finds the scenario's store (a directory, a database URL), for
    /// [`Scenario::KillStorm`](super::Scenario::KillStorm); `None` when no other process can
    /// open it (the memory store).
    fn address(&self, kept: &Self::Kept) -> Option<String>;
    /// Opens the store at an address [`address`](Self::address) gave, in a consumer process.
    fn open_at(&self, address: &str, rt: &tokio::runtime::Runtime) -> Self::Store;
}

/// A memory store of its own per scenario ([`MemoryStore`](crate::MemoryStore)), shared by
/// the scenario's consumer instances: the fastest kit, for a handler written over any store's
/// transaction. Its state lives in this process, so it cannot take a kill storm.
#[cfg(feature = "memory")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStores;

#[cfg(feature = "memory")]
impl HarnessStore for MemoryStores {
    type Store = crate::MemoryStore;
    type Kept = crate::MemoryStore;
    const SHARED: bool = true;

    fn fresh(&self, _rt: &tokio::runtime::Runtime) -> crate::MemoryStore {
        crate::MemoryStore::new()
    }

    fn open(&self, kept: &crate::MemoryStore, _rt: &tokio::runtime::Runtime) -> crate::MemoryStore {
        kept.clone()
    }

    fn address(&self, _kept: &crate::MemoryStore) -> Option<String> {
        None
    }

    fn open_at(&self, _address: &str, _rt: &tokio::runtime::Runtime) -> crate::MemoryStore {
        unreachable!("a memory store has no address another process could open")
    }
}

/// A RocksDB store in a temporary directory of its own per scenario, removed afterwards.
#[cfg(feature = "rocksdb")]
#[derive(Debug, Clone, Copy, Default)]
pub struct RocksDbStores;

/// A scenario's RocksDB directory, removed when dropped.
#[cfg(feature = "rocksdb")]
#[derive(Debug)]
pub struct StoreDir(std::path::PathBuf);

#[cfg(feature = "rocksdb")]
impl StoreDir {
    /// Where the store is.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

#[cfg(feature = "rocksdb")]
impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(feature = "rocksdb")]
impl HarnessStore for RocksDbStores {
    type Store = crate::RocksStore;
    type Kept = StoreDir;

    fn fresh(&self, _rt: &tokio::runtime::Runtime) -> StoreDir {
        let dir = std::env::temp_dir().join(format!("idc-harness-{}", crate::store::new_id()));
        std::fs::create_dir_all(&dir).expect("creating the store's directory");
        StoreDir(dir)
    }

    fn open(&self, dir: &StoreDir, rt: &tokio::runtime::Runtime) -> crate::RocksStore {
        self.open_at(&dir.path().to_string_lossy(), rt)
    }

    fn address(&self, dir: &StoreDir) -> Option<String> {
        Some(dir.path().to_string_lossy().into_owned())
    }

    fn open_at(&self, path: &str, _rt: &tokio::runtime::Runtime) -> crate::RocksStore {
        // No fsync: a crash or a `kill -9` ends the process, not the machine; what was written
        // is in the operating system's cache.
        crate::RocksStore::open_with(path, crate::RocksOptions { sync: false })
            .expect("opening the scenario's RocksDB store")
    }
}

/// A PostgreSQL database of its own per scenario on the server at `admin_url` (its user may
/// create databases), dropped afterwards.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PostgresStores {
    admin_url: String,
    setup: String,
    options: crate::PgOptions,
}

#[cfg(feature = "postgres")]
impl PostgresStores {
    /// Databases on the server at `admin_url` (a URL whose user may create databases), each
    /// set up with `setup` first (the handler's own tables; may be empty), opened with the
    /// default [`PgOptions`](crate::PgOptions).
    pub fn new(admin_url: impl Into<String>, setup: impl Into<String>) -> Self {
        PostgresStores {
            admin_url: admin_url.into(),
            setup: setup.into(),
            options: crate::PgOptions::default(),
        }
    }

    /// The options the stores are opened with (schema, table prefix, pool), as the service's.
    pub fn options(mut self, options: crate::PgOptions) -> Self {
        self.options = options;
        self
    }
}

#[cfg(feature = "postgres")]
impl HarnessStore for PostgresStores {
    type Store = crate::PgStore;
    type Kept = crate::testkit::ThrowawayDb;
    const SHARED: bool = true;

    fn fresh(&self, rt: &tokio::runtime::Runtime) -> crate::testkit::ThrowawayDb {
        let name = format!("idc_harness_{}", &crate::store::new_id()[..16]);
        rt.block_on(crate::testkit::ThrowawayDb::create(
            &self.admin_url,
            &name,
            &self.setup,
        ))
        .expect("creating the scenario's database")
    }

    fn open(
        &self,
        db: &crate::testkit::ThrowawayDb,
        rt: &tokio::runtime::Runtime,
    ) -> crate::PgStore {
        self.open_at(db.url(), rt)
    }

    fn address(&self, db: &crate::testkit::ThrowawayDb) -> Option<String> {
        Some(db.url().to_owned())
    }

    fn open_at(&self, url: &str, rt: &tokio::runtime::Runtime) -> crate::PgStore {
        rt.block_on(crate::PgStore::connect_with(url, self.options.clone()))
            .expect("connecting the scenario's store")
    }
}
