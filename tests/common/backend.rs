//! The stores the shared suites run over: a RocksDB directory per test, a PostgreSQL database
//! per test (created on the server named by `DATABASE_URL`, dropped afterwards), and, for the
//! store contract, the in-memory store. Every look into a store goes through [`Inspect`], the
//! same on every store.

use std::collections::HashMap;
use std::future::Future;

use idempotent_consumer::{
    DeadLetter, DedupEntry, EntryKey, Inspect, PartitionId, RocksOptions, RocksStore, Store,
    StoredPosition,
};

use super::LedgerTx;

/// Opens a store on the runtime that will use it.
pub type Opener<'a, S> = Box<dyn Fn(&tokio::runtime::Runtime) -> S + 'a>;

/// A store under test and the ways the tests look into it.
pub trait Backend {
    type S: Store<Tx: LedgerTx> + Inspect + Clone;

    /// Opens the store. Connections belong to `rt`, the runtime that uses them.
    fn open(&self, rt: &tokio::runtime::Runtime) -> Self::S;

    /// Opens stores for several consumers running at once: clones of one open RocksDB (it locks
    /// its directory), or a pool per consumer.
    fn shared(&self) -> Opener<'_, Self::S> {
        Box::new(|rt| self.open(rt))
    }

    /// Committed ledger balances.
    fn balances(&self) -> HashMap<String, i64>;

    /// Runs `f` on the store, opened for this look on a short-lived runtime (for RocksDB, only
    /// while no consumer has the directory open).
    fn inspect<T>(&self, f: impl AsyncFnOnce(&Self::S) -> T) -> T {
        block_on(async { f(&self.open_async().await).await })
    }

    /// Opens the store on the current runtime, for [`Backend::inspect`].
    async fn open_async(&self) -> Self::S;

    /// The stored position of a partition.
    fn position(&self, partition: &PartitionId) -> Option<StoredPosition> {
        self.inspect(async |s: &Self::S| s.position(partition).await.unwrap())
    }

    /// Moves a stored position (an operator's replay).
    fn set_position(&self, partition: &PartitionId, next_offset: i64) {
        self.inspect(async |s: &Self::S| s.set_position(partition, next_offset).await.unwrap())
    }

    /// The dead letters kept for a partition.
    fn dead_letters(&self, partition: &PartitionId) -> Vec<DeadLetter> {
        self.inspect(async |s: &Self::S| s.dead_letters(partition).await.unwrap())
    }

    /// The committed entry of idempotency key `key` in `group`.
    fn entry(&self, group: &str, key: &str) -> Option<DedupEntry> {
        self.inspect(async |s: &Self::S| s.entry(&EntryKey::new(group, key)).await.unwrap())
    }

    /// The next offset, or `None`.
    fn next_offset(&self, partition: &PartitionId) -> Option<i64> {
        self.position(partition).and_then(|p| p.next_offset)
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

    async fn open_async(&self) -> RocksStore {
        self.store()
    }

    fn shared(&self) -> Opener<'_, RocksStore> {
        let store = self.store();
        Box::new(move |_| store.clone())
    }

    fn balances(&self) -> HashMap<String, i64> {
        super::balances(&self.store())
    }
}

#[cfg(all(feature = "postgres", feature = "testkit"))]
#[allow(unused_imports)] // each test binary uses its own part
pub use self::postgres::Postgres;

#[cfg(all(feature = "postgres", feature = "testkit"))]
mod postgres {
    use std::collections::HashMap;

    use idempotent_consumer::testkit::ThrowawayDb;
    use idempotent_consumer::{PgOptions, PgStore};
    use sqlx::{Connection, PgConnection};

    use super::{Backend, block_on};

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
            self.db.url()
        }

        /// A store on this database, opened on the current runtime.
        pub async fn connect(&self) -> PgStore {
            PgStore::connect_with(self.url(), self.options.clone())
                .await
                .expect("connecting the store")
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

        async fn open_async(&self) -> PgStore {
            self.connect().await
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
    }
}
