//! The stores the shared suite runs over: a RocksDB directory per test, or a PostgreSQL database
//! per test (created on the server named by `DATABASE_URL`, dropped afterwards).

use std::collections::HashMap;

use idempotent_consumer::{
    DeadLetter, DedupEntry, PartitionId, RocksOptions, RocksStore, Store, StoredPosition,
};

use super::LedgerTx;

/// Opens a store on the runtime that will use it.
pub type Opener<'a, S> = Box<dyn Fn(&tokio::runtime::Runtime) -> S + 'a>;

/// A store under test and the ways the tests look into it.
pub trait Backend {
    type S: Store<Tx: LedgerTx> + Clone;

    /// Opens the store. Connections belong to `rt`, the runtime that uses them.
    fn open(&self, rt: &tokio::runtime::Runtime) -> Self::S;

    /// Opens stores for several consumers running at once: clones of one open RocksDB (it locks
    /// its directory), or a pool per consumer.
    fn shared(&self) -> Opener<'_, Self::S> {
        Box::new(|rt| self.open(rt))
    }

    /// Committed ledger balances.
    fn balances(&self) -> HashMap<String, i64>;

    /// The stored position of a partition.
    fn position(&self, partition: &PartitionId) -> Option<StoredPosition>;

    /// Moves a stored position (an operator's replay).
    fn set_position(&self, partition: &PartitionId, next_offset: i64);

    /// The dead letters kept for a partition.
    fn dead_letters(&self, partition: &PartitionId) -> Vec<DeadLetter>;

    /// The committed entry of a scoped store key.
    fn entry(&self, store_key: &[u8]) -> Option<DedupEntry>;

    /// The next offset, or `None`.
    fn next_offset(&self, partition: &PartitionId) -> Option<i64> {
        self.position(partition).and_then(|p| p.next_offset)
    }
}

/// A RocksDB directory, removed when the test ends. Look into it only while no consumer has it
/// open (RocksDB locks its directory).
pub struct Rocks {
    pub dir: tempfile::TempDir,
}

impl Rocks {
    pub fn new() -> Self {
        Rocks {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn store(&self) -> RocksStore {
        RocksStore::open_with(self.dir.path(), RocksOptions { sync: false }).unwrap()
    }
}

impl Backend for Rocks {
    type S = RocksStore;

    fn open(&self, _rt: &tokio::runtime::Runtime) -> RocksStore {
        self.store()
    }

    fn shared(&self) -> Opener<'_, RocksStore> {
        let store = self.store();
        Box::new(move |_| store.clone())
    }

    fn balances(&self) -> HashMap<String, i64> {
        super::balances(&self.store())
    }

    fn position(&self, partition: &PartitionId) -> Option<StoredPosition> {
        self.store().position(partition).unwrap()
    }

    fn set_position(&self, partition: &PartitionId, next_offset: i64) {
        self.store().set_position(partition, next_offset).unwrap();
    }

    fn dead_letters(&self, partition: &PartitionId) -> Vec<DeadLetter> {
        let all = self.store().dead_letters().unwrap();
        all.into_iter()
            .filter(|d| {
                d.record.topic() == partition.topic && d.record.partition() == partition.partition
            })
            .collect()
    }

    fn entry(&self, store_key: &[u8]) -> Option<DedupEntry> {
        self.store().entry(store_key).unwrap()
    }
}

#[cfg(feature = "postgres")]
#[allow(unused_imports)] // each test binary uses its own part
pub use self::postgres::{Postgres, block_on};

#[cfg(feature = "postgres")]
mod postgres {
    use std::collections::HashMap;
    use std::future::Future;

    use idempotent_consumer::{
        DeadLetter, DedupEntry, PartitionId, PgOptions, PgStore, StoredPosition,
    };
    use sqlx::{Connection, PgConnection};

    use super::super::throwaway_db::ThrowawayDb;
    use super::Backend;

    /// A database of its own on the server named by `DATABASE_URL`, with the ledger table.
    /// Dropped when the test ends.
    pub struct Postgres {
        db: ThrowawayDb,
        pub options: PgOptions,
    }

    /// The server's URL, or a loud failure: the README's test command starts one.
    pub fn server_url() -> String {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => panic!(
                "DATABASE_URL is not set: run `scripts/dev.sh test` (it starts a throwaway \
                 PostgreSQL) or point DATABASE_URL at a server where this user may create databases"
            ),
        }
    }

    /// Runs `f` to completion on a short-lived runtime of its own.
    pub fn block_on<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    impl Postgres {
        pub fn new() -> Self {
            let name = super::super::unique("idc_test")
                .replace('-', "_")
                .to_lowercase();
            let db = block_on(ThrowawayDb::create(
                &server_url(),
                &name,
                "CREATE TABLE ledger (account text PRIMARY KEY, balance bigint NOT NULL)",
            ))
            .expect("creating the test database on DATABASE_URL");
            let options = PgOptions {
                max_connections: 8,
                ..PgOptions::default()
            };
            Postgres { db, options }
        }

        /// The URL of this test's database.
        pub fn url(&self) -> &str {
            &self.db.url
        }

        /// A store on this database, opened on the current runtime.
        pub async fn connect(&self) -> PgStore {
            PgStore::connect_with(self.url(), self.options.clone())
                .await
                .expect("connecting the store")
        }

        /// Runs `f` with a store on a short-lived runtime.
        fn with_store<T>(&self, f: impl AsyncFnOnce(&PgStore) -> T) -> T {
            block_on(async {
                let store = self.connect().await;
                let out = f(&store).await;
                store.pool().close().await;
                out
            })
        }

        /// Runs statements (no parameters) on a fresh connection.
        pub fn execute(&self, statements: &str) {
            let statements = statements.to_owned();
            block_on(async {
                let mut conn = PgConnection::connect(self.url()).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(statements))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            })
        }

        /// One row of a query returning a bigint, on a fresh connection.
        pub fn scalar(&self, query: &str) -> Option<i64> {
            let query = query.to_owned();
            block_on(async {
                let mut conn = PgConnection::connect(self.url()).await.unwrap();
                sqlx::query_scalar(sqlx::AssertSqlSafe(query))
                    .fetch_optional(&mut conn)
                    .await
                    .unwrap()
            })
        }
    }

    impl Backend for Postgres {
        type S = PgStore;

        fn open(&self, rt: &tokio::runtime::Runtime) -> PgStore {
            rt.block_on(self.connect())
        }

        fn balances(&self) -> HashMap<String, i64> {
            let url = self.url().to_owned();
            block_on(async move {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                sqlx::query_as::<_, (String, i64)>("SELECT account, balance FROM ledger")
                    .fetch_all(&mut conn)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect()
            })
        }

        fn position(&self, partition: &PartitionId) -> Option<StoredPosition> {
            self.with_store(async |s: &PgStore| s.position(partition).await.unwrap())
        }

        fn set_position(&self, partition: &PartitionId, next_offset: i64) {
            self.with_store(async |s: &PgStore| {
                s.set_position(partition, next_offset).await.unwrap()
            })
        }

        fn dead_letters(&self, partition: &PartitionId) -> Vec<DeadLetter> {
            self.with_store(async |s: &PgStore| s.dead_letters(partition).await.unwrap())
        }

        fn entry(&self, store_key: &[u8]) -> Option<DedupEntry> {
            self.with_store(async |s: &PgStore| s.entry(store_key).await.unwrap())
        }
    }
}
