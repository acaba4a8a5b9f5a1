//! The shared PostgreSQL store (feature `postgres`).
//!
//! A batch is ONE PostgreSQL transaction. The handler receives it ([`PgTx::conn`]) and does its
//! own SQL in it; the runtime adds the dedup rows, the dead letters and the partition's new
//! position, and commits. So a crash, a lost connection or a fenced commit leaves no trace of the
//! batch, and a commit leaves all of it.
//!
//! - **Claims first.** Before a record is handled its key is inserted as a `claimed` row in the
//!   batch's transaction (the whole batch in one statement where possible). A concurrent batch of
//!   another instance inserting the same key waits on the primary key until ours commits (it then
//!   sees a duplicate) or rolls back (it then claims the key). Claimed rows never commit: the ones
//!   a record did not finish are deleted in the commit.
//! - **Fencing.** [`Store::acquire`] bumps the partition's epoch; every commit updates the
//!   position row only where the epoch is still its own, and rolls everything back otherwise
//!   ([`Error::Fenced`]).
//! - **Retention.** [`Store::purge_expired`] deletes expired rows in bounded batches with
//!   `FOR UPDATE SKIP LOCKED`, so it never waits on, or makes wait, a batch in flight.
//!
//! Table names come from [`PgOptions::schema`] and [`PgOptions::table_prefix`], validated against
//! `[a-z_][a-z0-9_]*`; every value is a bound parameter. The schema ships as migrations (in
//! `src/store/postgres/migrations/`) applied on connect unless [`PgOptions::migrate`] is off.
//!
//! Files: `sql.rs` (statements and migrations), `errors.rs` (error mapping), `rows.rs` (rows and
//! their columns), `claims.rs` (the claim state machine), `tx.rs` (the batch and its commit),
//! `batch.rs` (rows deferred to the end of a batch), `request.rs` (idempotency keys of requests,
//! feature `http`), `outbox.rs` (the outbox and the relays' lease, feature `outbox`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};
use crate::store::entry::DedupEntry;
use crate::store::{Assignment, EntryKey, Inspect, PartitionId, Store, StoredPosition};

mod audit;
mod batch;
mod claims;
mod errors;
#[cfg(feature = "outbox")]
mod outbox;
#[cfg(feature = "http")]
mod request;
#[cfg(feature = "resolve")]
mod resolve;
mod rows;
mod sql;
mod tx;

pub use batch::{BatchRow, BatchStatement, Column};
use errors::pg;
#[cfg(feature = "http")]
pub use request::PgRequestTx;
use rows::select_entries;
use sql::{Sql, clamp_ms, migrator, statement};
pub use tx::PgTx;

/// Options of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Schema of the tables (default `public`); created by the migrations if missing.
    pub schema: String,
    /// Prefix of the table names (default `idc_`), so several deployments can share a schema.
    pub table_prefix: String,
    /// Apply the embedded migrations on connect (default `true`). Teams that run migrations
    /// themselves turn it off; the store then checks that the tables exist.
    pub migrate: bool,
    /// Connections in the pool (default 10). Each partition in flight holds one during a batch.
    pub max_connections: u32,
    /// Written to the positions row on acquire, to tell owners apart (default `host:pid`).
    pub owner: String,
    /// PostgreSQL's `idle_in_transaction_session_timeout` for the store's connections (default
    /// 60 s): bounds how long a frozen instance can hold claimed keys that its partition's new
    /// owner waits for. `None` leaves the server's setting.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// How long getting a connection may take before it fails (default 30 s): the pool tries
    /// again meanwhile, so a server that is restarting is waited for.
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        let host = crate::store::host_name();
        PgOptions {
            schema: "public".to_owned(),
            table_prefix: "idc_".to_owned(),
            migrate: true,
            max_connections: 10,
            owner: format!("{host}:{}", std::process::id()),
            idle_in_transaction_timeout: Some(Duration::from_secs(60)),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// Checks a schema name or table prefix from configuration: lower-case ASCII letters, digits and
/// underscores, not starting with a digit, short enough for PostgreSQL's 63-byte names.
fn validate_identifier(what: &str, value: &str, allow_empty: bool) -> Result<()> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    let ok_start = value
        .bytes()
        .next()
        .map_or(allow_empty, |b| !b.is_ascii_digit());
    if ok_chars && ok_start && value.len() <= 40 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} {value:?} is not allowed: use 1 to 40 characters of [a-z0-9_], not starting with a digit"
        )))
    }
}

/// A pool on `url` with `options`' connection settings, once the options' identifiers are
/// checked. The URL is never logged.
async fn pool(url: &str, options: &PgOptions) -> Result<PgPool> {
    validate_identifier("schema", &options.schema, false)?;
    validate_identifier("table prefix", &options.table_prefix, true)?;
    let mut connect = PgConnectOptions::from_str(url)
        .map_err(|e| Error::Config(format!("invalid PostgreSQL URL: {}", redact(&e))))?
        .application_name("idempotent-consumer");
    if let Some(timeout) = options.idle_in_transaction_timeout {
        connect = connect.options([(
            "idle_in_transaction_session_timeout",
            timeout.as_millis().max(1).to_string(),
        )]);
    }
    PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .acquire_timeout(options.connect_timeout)
        .connect_with(connect)
        .await
        .map_err(pg("connecting to PostgreSQL"))
}

/// The PostgreSQL store. Cheap to clone; clones share one pool.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    sql: Sql,
    owner: String,
    /// The sessions' `idle_in_transaction_session_timeout`, as set by the options.
    idle_timeout: Option<Duration>,
    #[cfg(feature = "http")]
    requests: request::RequestSql,
    #[cfg(feature = "outbox")]
    outbox: outbox::OutboxSql,
    #[cfg(feature = "resolve")]
    resolve: resolve::ResolveSql,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("dedup", &self.inner.sql.dedup)
            .field("positions", &self.inner.sql.positions)
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// A transaction on a pooled connection.
    async fn transaction(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.inner
            .pool
            .begin()
            .await
            .map_err(pg("starting a transaction"))
    }

    /// Connects to `url` (`postgres://user:password@host:port/database`) with the default
    /// options and applies the migrations.
    pub async fn connect(url: &str) -> Result<PgStore> {
        PgStore::connect_with(url, PgOptions::default()).await
    }

    /// Connects to `url` with `options`. The URL is never logged.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<PgStore> {
        let pool = pool(url, &options).await?;
        PgStore::from_pool(pool, options).await
    }

    /// Connects to the store at `url` without changing it, for tools that only look or act on
    /// a store a service made: no migration runs. Refused with [`Error::Config`], having
    /// written nothing, when the URL is malformed, when the database holds no store under
    /// `options`' schema and prefix, or when the store's schema is of another version than this
    /// crate's (older: start a service of this version once; newer: use the newer tool).
    pub async fn open_existing(url: &str, options: PgOptions) -> Result<PgStore> {
        let pool = pool(url, &options).await?;
        let migrations = format!(
            "\"{}\".\"{}migrations\"",
            options.schema, options.table_prefix
        );
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&migrations)
            .fetch_one(&pool)
            .await
            .map_err(pg("looking for the store's tables"))?;
        if exists.is_none() {
            return Err(Error::Config(format!(
                "the database holds no store under schema {:?} and table prefix {:?}",
                options.schema, options.table_prefix
            )));
        }
        let version: Option<i64> = sqlx::query_scalar(statement(format!(
            "SELECT max(version) FROM {migrations} WHERE success"
        )))
        .fetch_one(&pool)
        .await
        .map_err(pg("reading the store's schema version"))?;
        let ours = sql::MIGRATIONS.last().map_or(0, |m| m.0);
        match version {
            Some(v) if v == ours => {}
            Some(v) if v > ours => {
                return Err(Error::Config(format!(
                    "the store's schema is at version {v}, newer than this version's {ours}: \
                     use the newer version"
                )));
            }
            v => {
                return Err(Error::Config(format!(
                    "the store's schema is at version {}, older than this version's {ours}: start \
                     a service of this version once (it migrates), then try again",
                    v.unwrap_or(0)
                )));
            }
        }
        PgStore::from_pool(
            pool,
            PgOptions {
                migrate: false,
                ..options
            },
        )
        .await
    }

    /// Uses an existing pool (its connection settings are the caller's) and applies the
    /// migrations unless [`PgOptions::migrate`] is off.
    pub async fn from_pool(pool: PgPool, options: PgOptions) -> Result<PgStore> {
        validate_identifier("schema", &options.schema, false)?;
        validate_identifier("table prefix", &options.table_prefix, true)?;
        let sql = Sql::new(&options.schema, &options.table_prefix);
        if options.migrate {
            migrator(&options.schema, &options.table_prefix)
                .run(&pool)
                .await
                .map_err(|e| Error::store("applying the store's migrations", e))?;
        } else {
            for table in [&sql.dedup, &sql.positions, &sql.dead_letters] {
                sqlx::query(statement(format!("SELECT 1 FROM {table} LIMIT 0")))
                    .execute(&pool)
                    .await
                    .map_err(|e| {
                        Error::store(
                            format!("table {table} is missing or unreadable (migrations are off; run them first)"),
                            e,
                        )
                    })?;
            }
        }
        // What the sessions really have (the options' value, or the server's or the pool's
        // own): the runtime keeps batches well inside it.
        let idle_ms: String = sqlx::query_scalar(
            "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'",
        )
        .fetch_one(&pool)
        .await
        .map_err(pg("reading idle_in_transaction_session_timeout"))?;
        let idle_timeout = idle_ms
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                #[cfg(feature = "http")]
                requests: request::RequestSql::new(&options.schema, &options.table_prefix),
                #[cfg(feature = "outbox")]
                outbox: outbox::OutboxSql::new(&options.schema, &options.table_prefix),
                #[cfg(feature = "resolve")]
                resolve: resolve::ResolveSql::new(&options.schema, &options.table_prefix),
                sql,
                owner: options.owner,
                idle_timeout,
            }),
        })
    }

    /// The connection pool, for the handler's own queries outside batches.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// How many committed dedup entries the table holds.
    pub async fn count_entries(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(self.inner.sql.count_entries.clone())
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg("counting entries"))?;
        Ok(n as u64)
    }
}

/// sqlx's error for a bad URL may quote it; keep only its kind.
fn redact(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::Configuration(_) => "the URL could not be parsed",
        _ => "the URL was rejected",
    }
}

impl Store for PgStore {
    type Tx = PgTx;

    async fn acquire(&self, partition: &PartitionId) -> Result<Assignment> {
        // The row lock makes this wait for a commit of the previous owner that is in flight;
        // once the epoch is bumped, any later commit of that owner is fenced.
        let row = sqlx::query(self.inner.sql.acquire.clone())
            .bind(&partition.group)
            .bind(&partition.topic)
            .bind(partition.partition)
            .bind(&self.inner.owner)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg("acquiring a partition"))?;
        Ok(Assignment {
            epoch: row
                .try_get::<i64, _>(0)
                .map_err(pg("acquiring a partition"))? as u64,
            position: row.try_get(1).map_err(pg("acquiring a partition"))?,
        })
    }

    async fn begin(&self, partition: &PartitionId, epoch: u64) -> Result<PgTx> {
        let tx = self.transaction().await?;
        Ok(PgTx::new(tx, self.inner.clone(), partition, epoch))
    }

    /// Exact below 100,000 rows; above, the planner's estimate (counting would scan the table).
    async fn entry_count(&self) -> Result<u64> {
        const EXACT_BELOW: i64 = 100_000;
        let estimate: Option<i64> = sqlx::query_scalar(self.inner.sql.estimate_entries.clone())
            .bind(&self.inner.sql.dedup)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg("estimating the entry count"))?;
        match estimate {
            Some(n) if n >= EXACT_BELOW => Ok(n as u64),
            _ => self.count_entries().await,
        }
    }

    /// PostgreSQL's b-tree entries hold at most 2,704 bytes on 8 KiB pages; the dedup table's
    /// primary key (group, tenant, key) keeps a margin for the entry's own overhead.
    fn max_key_bytes(&self) -> Option<usize> {
        Some(2_600)
    }

    fn transaction_time_limit(&self) -> Option<Duration> {
        self.inner.idle_timeout
    }

    async fn purge_dead_letters(
        &self,
        group: &str,
        now_ms: i64,
        retention: std::time::Duration,
        limit: usize,
    ) -> Result<usize> {
        let done = sqlx::query(self.inner.sql.purge_dead_letters.clone())
            .bind(group)
            .bind(clamp_ms(now_ms))
            .bind(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.inner.pool)
            .await
            .map_err(pg("purging old dead letters"))?;
        Ok(done.rows_affected() as usize)
    }

    async fn purge_expired(&self, group: &str, now_ms: i64, limit: usize) -> Result<usize> {
        let done = sqlx::query(self.inner.sql.purge.clone())
            .bind(clamp_ms(now_ms))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(group)
            .execute(&self.inner.pool)
            .await
            .map_err(pg("purging expired entries"))?;
        Ok(done.rows_affected() as usize)
    }

    #[cfg(feature = "resolve")]
    async fn purge_resolutions(&self, group: &str, now_ms: i64, limit: usize) -> Result<usize> {
        self.purge_resolution_rows(group, now_ms, limit).await
    }
}

impl Inspect for PgStore {
    async fn position(&self, partition: &PartitionId) -> Result<Option<StoredPosition>> {
        let row = sqlx::query(self.inner.sql.position.clone())
            .bind(&partition.group)
            .bind(&partition.topic)
            .bind(partition.partition)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg("reading a position"))?;
        row.map(|r| {
            Ok(StoredPosition {
                next_offset: r.try_get(0).map_err(pg("reading a position"))?,
                epoch: r.try_get::<i64, _>(1).map_err(pg("reading a position"))? as u64,
            })
        })
        .transpose()
    }

    async fn positions(&self, group: &str) -> Result<Vec<(PartitionId, StoredPosition)>> {
        let rows = sqlx::query(self.inner.sql.positions_of.clone())
            .bind(group)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg("reading positions"))?;
        rows.iter()
            .map(|r| {
                let get = || pg("reading positions");
                let topic: String = r.try_get(0).map_err(get())?;
                let partition: i32 = r.try_get(1).map_err(get())?;
                Ok((
                    PartitionId::new(group, topic, partition),
                    StoredPosition {
                        next_offset: r.try_get(2).map_err(get())?,
                        epoch: r.try_get::<i64, _>(3).map_err(get())? as u64,
                    },
                ))
            })
            .collect()
    }

    /// Takes effect for the next owner: call it while no instance consumes the group, or before
    /// a rebalance. A partition this store has never acquired gets its row (epoch 0).
    async fn set_position(&self, partition: &PartitionId, next_offset: i64) -> Result<()> {
        crate::store::check_position(next_offset)?;
        sqlx::query(self.inner.sql.set_position.clone())
            .bind(&partition.group)
            .bind(&partition.topic)
            .bind(partition.partition)
            .bind(next_offset)
            .execute(&self.inner.pool)
            .await
            .map_err(pg("setting a position"))?;
        Ok(())
    }

    async fn entry(&self, key: &EntryKey<'_>) -> Result<Option<DedupEntry>> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(pg("reading an entry"))?;
        let found = select_entries(&mut conn, &self.inner.sql, &[&key.store_key()]).await?;
        Ok(found.into_iter().next().map(|(_, e)| e.entry))
    }

    async fn dead_letters(&self, partition: &PartitionId) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(self.inner.sql.dead_letters_of.clone())
            .bind(&partition.group)
            .bind(&partition.topic)
            .bind(partition.partition)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg("reading dead letters"))?;
        rows.iter()
            .map(|r| {
                let bytes: Vec<u8> = r.try_get(0).map_err(pg("reading dead letters"))?;
                let payload: Option<Vec<u8>> = r.try_get(1).map_err(pg("reading dead letters"))?;
                DeadLetter::decode_apart(&bytes, payload)
            })
            .collect()
    }
}
