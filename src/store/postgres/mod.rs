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

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, Postgres};
use sqlx::{AssertSqlSafe, Row, SqlSafeStr, SqlStr};

use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};
use crate::handler::HandlerError;
use crate::identity::{Fingerprint, split_store_key};
use crate::store::entry::{DedupEntry, EntryStatus};
use crate::store::{
    Assignment, Claim, ClaimAhead, PartitionId, Store, StoredPosition, Transaction,
};

mod batch;

pub use batch::{BatchRow, BatchStatement, Column};

/// The migrations, in order: (version, description, SQL template).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (
        2,
        "byte order keys",
        include_str!("migrations/0002_byte_order_keys.sql"),
    ),
];

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
}

impl Default for PgOptions {
    fn default() -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_owned());
        PgOptions {
            schema: "public".to_owned(),
            table_prefix: "idc_".to_owned(),
            migrate: true,
            max_connections: 10,
            owner: format!("{host}:{}", std::process::id()),
            idle_in_transaction_timeout: Some(Duration::from_secs(60)),
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

/// `$n` (milliseconds since the Unix epoch) as a `timestamptz`, exactly.
fn ts(n: u8) -> String {
    format!("(timestamptz 'epoch' + ${n}::bigint * interval '1 millisecond')")
}

/// PostgreSQL's timestamps end in the year 294276: a time past (or before) what it can hold is
/// kept as the furthest it can (an entry that expires "never" stays unexpired).
fn clamp_ms(ms: i64) -> i64 {
    const LIMIT: i64 = 8_000_000_000_000_000; // about the year 255,000
    ms.clamp(-LIMIT, LIMIT)
}

/// A `timestamptz` column as milliseconds since the Unix epoch, exactly.
fn ms(column: &str) -> String {
    format!("(extract(epoch from {column}) * 1000)::bigint")
}

/// The store's statements, built once from the validated table names.
struct Sql {
    positions: String,
    dedup: String,
    dead_letters: String,
    acquire: SqlStr,
    position: SqlStr,
    set_position: SqlStr,
    claim_many: SqlStr,
    claim_ahead: SqlStr,
    select_many: SqlStr,
    take_over: SqlStr,
    write_entries: SqlStr,
    release_claims: SqlStr,
    write_dead_letters: SqlStr,
    advance: SqlStr,
    epoch: SqlStr,
    purge: SqlStr,
    dead_letters_of: SqlStr,
    count_entries: SqlStr,
    estimate_entries: SqlStr,
}

fn statement(s: String) -> SqlStr {
    // Built only from the validated identifiers and constant text; values are bound parameters.
    AssertSqlSafe(s).into_sql_str()
}

const ENTRY_COLUMNS: &str = "consumer_group, tenant, idempotency_key, status, fingerprint, outcome, topic, \"partition\", \"offset\"";

impl Sql {
    fn new(schema: &str, prefix: &str) -> Sql {
        let positions = format!("\"{schema}\".\"{prefix}positions\"");
        let dedup = format!("\"{schema}\".\"{prefix}dedup\"");
        let dead_letters = format!("\"{schema}\".\"{prefix}dead_letters\"");
        let entry_select = format!(
            "{ENTRY_COLUMNS}, {} AS created_ms, {} AS expires_ms",
            ms("created_at"),
            ms("expires_at")
        );
        Sql {
            acquire: statement(format!(
                "INSERT INTO {positions} AS p (consumer_group, topic, \"partition\", next_offset, epoch, owner, updated_at) \
                 VALUES ($1, $2, $3, NULL, 1, $4, now()) \
                 ON CONFLICT (consumer_group, topic, \"partition\") \
                 DO UPDATE SET epoch = p.epoch + 1, owner = EXCLUDED.owner, updated_at = now() \
                 RETURNING epoch, next_offset"
            )),
            position: statement(format!(
                "SELECT next_offset, epoch FROM {positions} \
                 WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3"
            )),
            set_position: statement(format!(
                "UPDATE {positions} SET next_offset = $4, updated_at = now() \
                 WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3"
            )),
            // Sorted, so two batches claiming overlapping keys lock them in the same order.
            claim_many: statement(format!(
                "INSERT INTO {dedup} (consumer_group, tenant, idempotency_key, status, fingerprint, topic, \"partition\", \"offset\", created_at, expires_at) \
                 SELECT u.g, u.t, u.k, 'claimed', '\\x'::bytea, $4, -1, -1, {now}, {now} \
                 FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(g, t, k) \
                 ORDER BY u.g COLLATE \"C\", u.t COLLATE \"C\", u.k \
                 ON CONFLICT (consumer_group, tenant, idempotency_key) DO NOTHING \
                 RETURNING consumer_group, tenant, idempotency_key",
                now = ts(5)
            )),
            // The same, each row holding the entry its record usually leaves.
            claim_ahead: statement(format!(
                "INSERT INTO {dedup} (consumer_group, tenant, idempotency_key, status, fingerprint, topic, \"partition\", \"offset\", created_at, expires_at) \
                 SELECT u.g, u.t, u.k, 'completed', u.f, u.tp, u.p, u.o, \
                 timestamptz 'epoch' + u.c * interval '1 millisecond', timestamptz 'epoch' + u.e * interval '1 millisecond' \
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[], $6::int4[], $7::int8[], $8::int8[], $9::int8[]) \
                      AS u(g, t, k, tp, f, p, o, c, e) \
                 ORDER BY u.g COLLATE \"C\", u.t COLLATE \"C\", u.k \
                 ON CONFLICT (consumer_group, tenant, idempotency_key) DO NOTHING \
                 RETURNING consumer_group, tenant, idempotency_key"
            )),
            select_many: statement(format!(
                "SELECT {entry_select} FROM {dedup} d \
                 JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS u(g, t, k) \
                 ON d.consumer_group = u.g AND d.tenant = u.t AND d.idempotency_key = u.k"
            )),
            take_over: statement(format!(
                "UPDATE {dedup} SET status = 'claimed', fingerprint = '\\x'::bytea, outcome = NULL, \
                 topic = $4, \"partition\" = -1, \"offset\" = -1, created_at = {now}, expires_at = {now} \
                 WHERE consumer_group = $1 AND tenant = $2 AND idempotency_key = $3 AND expires_at <= {now} \
                 RETURNING 1",
                now = ts(5)
            )),
            write_entries: statement(format!(
                "INSERT INTO {dedup} ({ENTRY_COLUMNS}, created_at, expires_at) \
                 SELECT g, t, k, s, f, o, tp, p, off, \
                 timestamptz 'epoch' + c * interval '1 millisecond', timestamptz 'epoch' + e * interval '1 millisecond' \
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[], $6::bytea[], \
                             $7::text[], $8::int4[], $9::int8[], $10::int8[], $11::int8[]) \
                      AS u(g, t, k, s, f, o, tp, p, off, c, e) \
                 ON CONFLICT (consumer_group, tenant, idempotency_key) DO UPDATE SET \
                 status = EXCLUDED.status, fingerprint = EXCLUDED.fingerprint, outcome = EXCLUDED.outcome, \
                 topic = EXCLUDED.topic, \"partition\" = EXCLUDED.\"partition\", \"offset\" = EXCLUDED.\"offset\", \
                 created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at"
            )),
            release_claims: statement(format!(
                "DELETE FROM {dedup} d USING unnest($1::text[], $2::text[], $3::bytea[]) AS u(g, t, k) \
                 WHERE d.consumer_group = u.g AND d.tenant = u.t AND d.idempotency_key = u.k"
            )),
            write_dead_letters: statement(format!(
                "INSERT INTO {dead_letters} (consumer_group, topic, \"partition\", \"offset\", idempotency_key, reason, message, \
                 attempts, record_key, payload, first_failed_at, failed_at, letter) \
                 SELECT $1, tp, p, off, k, r, m, a, rk, pl, \
                 timestamptz 'epoch' + ff * interval '1 millisecond', timestamptz 'epoch' + lf * interval '1 millisecond', l \
                 FROM unnest($2::text[], $3::int4[], $4::int8[], $5::bytea[], $6::text[], $7::text[], $8::int4[], \
                             $9::bytea[], $10::bytea[], $11::int8[], $12::int8[], $13::bytea[]) \
                      AS u(tp, p, off, k, r, m, a, rk, pl, ff, lf, l) \
                 ON CONFLICT (consumer_group, topic, \"partition\", \"offset\") DO UPDATE SET \
                 idempotency_key = EXCLUDED.idempotency_key, reason = EXCLUDED.reason, message = EXCLUDED.message, \
                 attempts = EXCLUDED.attempts, record_key = EXCLUDED.record_key, payload = EXCLUDED.payload, \
                 first_failed_at = EXCLUDED.first_failed_at, failed_at = EXCLUDED.failed_at, letter = EXCLUDED.letter"
            )),
            advance: statement(format!(
                "UPDATE {positions} SET next_offset = $4, owner = $6, updated_at = now() \
                 WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3 AND epoch = $5 \
                 RETURNING 1"
            )),
            epoch: statement(format!(
                "SELECT epoch FROM {positions} WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3"
            )),
            purge: statement(format!(
                "DELETE FROM {dedup} d USING ( \
                   SELECT consumer_group, tenant, idempotency_key FROM {dedup} \
                   WHERE expires_at <= {now} AND status <> 'claimed' \
                   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) x \
                 WHERE d.consumer_group = x.consumer_group AND d.tenant = x.tenant \
                   AND d.idempotency_key = x.idempotency_key AND d.expires_at <= {now}",
                now = ts(1)
            )),
            dead_letters_of: statement(format!(
                "SELECT letter FROM {dead_letters} \
                 WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3 ORDER BY \"offset\""
            )),
            count_entries: statement(format!(
                "SELECT count(*) FROM {dedup} WHERE status <> 'claimed'"
            )),
            // The planner's estimate; -1 before the table was first vacuumed or analyzed.
            estimate_entries: statement(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)".to_owned(),
            ),
            positions,
            dedup,
            dead_letters,
        }
    }
}

/// Maps a driver error, marking the failures that trying again can cure.
fn pg(context: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |e| {
        if is_transient(&e) {
            Error::store_transient(context.to_owned(), e)
        } else {
            Error::store(context.to_owned(), e)
        }
    }
}

/// Connection lost or refused, server shutting down or restarting, deadlock, serialization
/// failure, lock or idle timeout: nothing committed (or, for a lost commit, possibly all of it),
/// so the batch can be tried again.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") // connection exception
                || code.starts_with("57P") // admin/crash shutdown, cannot connect now
                || code == "40001" // serialization failure
                || code == "40P01" // deadlock detected
                || code == "55P03" // lock not available
                || code == "25P03" // idle-in-transaction timeout
                || code == "53300" // too many connections
        }),
        _ => false,
    }
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
    /// Connects to `url` (`postgres://user:password@host:port/database`) with the default
    /// options and applies the migrations.
    pub async fn connect(url: &str) -> Result<PgStore> {
        PgStore::connect_with(url, PgOptions::default()).await
    }

    /// Connects to `url` with `options`. The URL is never logged.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<PgStore> {
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
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(connect)
            .await
            .map_err(pg("connecting to PostgreSQL"))?;
        PgStore::from_pool(pool, options).await
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
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                sql,
                owner: options.owner,
            }),
        })
    }

    /// The connection pool, for the handler's own queries outside batches.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The committed dedup entry of a scoped store key, if any.
    pub async fn entry(&self, store_key: &[u8]) -> Result<Option<DedupEntry>> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(pg("reading an entry"))?;
        let found = select_entries(&mut conn, &self.inner.sql, &[store_key]).await?;
        Ok(found.into_iter().next().map(|(_, e)| e.entry))
    }

    /// The stored position and epoch of a partition.
    pub async fn position(&self, partition: &PartitionId) -> Result<Option<StoredPosition>> {
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

    /// Moves a partition's stored position (an operator's replay or skip). Takes effect for the
    /// next owner: call it while no instance consumes the group, or before a rebalance.
    pub async fn set_position(&self, partition: &PartitionId, next_offset: i64) -> Result<()> {
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

    /// The dead letters kept for a partition, in offset order.
    pub async fn dead_letters(&self, partition: &PartitionId) -> Result<Vec<DeadLetter>> {
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
                DeadLetter::decode(&bytes)
            })
            .collect()
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

/// The embedded migrations, with the table names filled in; tracked in
/// `<schema>.<prefix>migrations`.
fn migrator(schema: &str, prefix: &str) -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, template)| {
            let text = template
                .replace("{schema}", schema)
                .replace("{prefix}", prefix);
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                statement(text),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(format!("\"{schema}\".\"{prefix}migrations\""));
    migrator.create_schema(format!("\"{schema}\""));
    migrator
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
        let tx = self
            .inner
            .pool
            .begin()
            .await
            .map_err(pg("starting a transaction"))?;
        Ok(PgTx {
            tx,
            store: self.inner.clone(),
            partition: partition.clone(),
            epoch,
            keys: HashMap::new(),
            dead_letters: Vec::new(),
            undo: Vec::new(),
            savepoint: false,
            deferred: Vec::new(),
            deferred_marks: Vec::new(),
        })
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

    async fn purge_expired(&self, now_ms: i64, limit: usize) -> Result<usize> {
        let done = sqlx::query(self.inner.sql.purge.clone())
            .bind(clamp_ms(now_ms))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.inner.pool)
            .await
            .map_err(pg("purging expired entries"))?;
        Ok(done.rows_affected() as usize)
    }
}

/// What a transaction knows about a key.
#[derive(Debug, Clone)]
enum KeyState {
    /// Claimed by this transaction; its row holds a placeholder (`None`) or, claimed ahead, the
    /// entry its record usually leaves (not an entry yet: released by the commit unless
    /// written).
    Claimed(Option<DedupEntry>),
    /// A live entry committed by an earlier transaction.
    Existing(DedupEntry),
    /// Written by this transaction. `stored`: the row claimed ahead already holds it; otherwise
    /// it goes to the table in the commit.
    Written { entry: DedupEntry, stored: bool },
}

/// One batch's PostgreSQL transaction. The handler runs its own SQL through [`PgTx::conn`].
///
/// Dedup entries and dead letters are buffered and written in the commit, with the partition's
/// new position, so a batch costs a few round trips whatever its size.
pub struct PgTx {
    tx: sqlx::Transaction<'static, Postgres>,
    store: Arc<Inner>,
    partition: PartitionId,
    epoch: u64,
    keys: HashMap<Vec<u8>, KeyState>,
    dead_letters: Vec<DeadLetter>,
    /// Changes to `keys` since the savepoint: (key, state before).
    undo: Vec<(Vec<u8>, Option<KeyState>)>,
    savepoint: bool,
    /// Rows deferred to the end of the batch, per statement (by id), in order of first use.
    deferred: Vec<(u64, Box<dyn batch::Deferred>)>,
    /// How many rows each of `deferred` held at the savepoint.
    deferred_marks: Vec<usize>,
}

impl fmt::Debug for PgTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTx")
            .field("partition", &self.partition)
            .field("epoch", &self.epoch)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl PgTx {
    /// The open transaction's connection: run the handler's queries on it, and they commit (or
    /// roll back) with the record's dedup row and the partition's position.
    ///
    /// ```no_run
    /// # async fn f(tx: &mut idempotent_consumer::PgTx) -> Result<(), sqlx::Error> {
    /// sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
    ///     .bind(10_i64)
    ///     .bind("alice")
    ///     .execute(tx.conn())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// The partition this batch belongs to.
    pub fn partition(&self) -> &PartitionId {
        &self.partition
    }

    /// Defers `row` to `statement`, which writes the rows of the whole batch at once, in this
    /// transaction, just before it commits: one round trip per batch instead of one per record.
    /// Rows keep the order they were deferred in. Rows of a record that fails or is rolled back
    /// are discarded with it. Queries on [`conn`](PgTx::conn) in the same batch do not see
    /// deferred rows. What a failing statement does is told in [`BatchStatement`]'s module:
    /// in short, the batch is handled again one record at a time and the failure becomes that
    /// record's handler error.
    pub fn defer<R: BatchRow>(&mut self, statement: &BatchStatement<R>, row: R) {
        batch::push(&mut self.deferred, statement, row);
    }

    fn set_key(&mut self, key: &[u8], state: KeyState) {
        let before = self.keys.insert(key.to_vec(), state);
        if self.savepoint {
            self.undo.push((key.to_vec(), before));
        }
    }

    /// Claims every key of `claims` not known yet, in one insert (two if some come with the
    /// entry to write and some without); then reads the entries of the ones it did not get,
    /// taking over the expired ones.
    async fn claim_unknown(
        &mut self,
        claims: &[(&[u8], Option<&ClaimAhead<'_>>)],
        now_ms: i64,
    ) -> Result<()> {
        let mut unknown: Vec<(&[u8], Option<&ClaimAhead<'_>>)> = claims
            .iter()
            .copied()
            .filter(|(k, _)| !self.keys.contains_key(*k))
            .collect();
        // Stable: of a key's claims, the first (its first record's) stays.
        unknown.sort_by(|a, b| a.0.cmp(b.0));
        unknown.dedup_by(|a, b| a.0 == b.0);
        // A key the purge deleted between the insert and the read, or that another batch
        // refreshed between the read and the takeover, is simply tried again.
        for _ in 0..3 {
            if unknown.is_empty() {
                return Ok(());
            }
            let (ahead, plain): (Vec<_>, Vec<_>) =
                unknown.iter().partition(|(_, entry)| entry.is_some());
            if !ahead.is_empty() {
                let keys: Vec<&[u8]> = ahead.iter().map(|(k, _)| *k).collect();
                let (groups, tenants, bytes) = split_all(&keys)?;
                let entries: Vec<&ClaimAhead<'_>> = ahead.iter().filter_map(|(_, e)| *e).collect();
                let claimed = sqlx::query(self.store.sql.claim_ahead.clone())
                    .bind(&groups)
                    .bind(&tenants)
                    .bind(&bytes)
                    .bind(entries.iter().map(|e| e.topic).collect::<Vec<_>>())
                    .bind(
                        entries
                            .iter()
                            .map(|e| e.fingerprint.0.as_slice())
                            .collect::<Vec<_>>(),
                    )
                    .bind(entries.iter().map(|e| e.partition).collect::<Vec<_>>())
                    .bind(entries.iter().map(|e| e.offset).collect::<Vec<_>>())
                    .bind(
                        entries
                            .iter()
                            .map(|e| clamp_ms(e.created_at_ms))
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        entries
                            .iter()
                            .map(|e| clamp_ms(e.expires_at_ms))
                            .collect::<Vec<_>>(),
                    )
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(pg("claiming keys"))?;
                for row in &claimed {
                    let key = store_key_of(row)?;
                    let entry = ahead
                        .binary_search_by(|(k, _)| (*k).cmp(key.as_slice()))
                        .ok()
                        .and_then(|at| ahead[at].1)
                        .ok_or_else(|| {
                            Error::Corrupt("a claim returned a key not asked for".into())
                        })?
                        .entry();
                    self.set_key(&key, KeyState::Claimed(Some(entry)));
                }
            }
            if !plain.is_empty() {
                let keys: Vec<&[u8]> = plain.iter().map(|(k, _)| *k).collect();
                let (groups, tenants, bytes) = split_all(&keys)?;
                let claimed = sqlx::query(self.store.sql.claim_many.clone())
                    .bind(&groups)
                    .bind(&tenants)
                    .bind(&bytes)
                    .bind(&self.partition.topic)
                    .bind(clamp_ms(now_ms))
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(pg("claiming keys"))?;
                for row in &claimed {
                    self.set_key(&store_key_of(row)?, KeyState::Claimed(None));
                }
            }
            unknown.retain(|(k, _)| !self.keys.contains_key(*k));
            if unknown.is_empty() {
                return Ok(());
            }
            let keys: Vec<&[u8]> = unknown.iter().map(|(k, _)| *k).collect();
            for (key, read) in select_entries(&mut self.tx, &self.store.sql, &keys).await? {
                if read.status_is_claimed {
                    // Our own claims are known keys (filtered out above) and other
                    // transactions' claims are invisible: this row should not exist.
                    return Err(Error::Corrupt(
                        "a claimed dedup row was committed by another transaction".into(),
                    ));
                }
                if !read.entry.is_expired(now_ms) {
                    self.set_key(&key, KeyState::Existing(read.entry));
                    continue;
                }
                // Expired: take the row over, unless someone else refreshed it meanwhile.
                let (g, t, k) = split(&key)?;
                let took = sqlx::query(self.store.sql.take_over.clone())
                    .bind(g)
                    .bind(t)
                    .bind(k)
                    .bind(&self.partition.topic)
                    .bind(clamp_ms(now_ms))
                    .fetch_optional(&mut *self.tx)
                    .await
                    .map_err(pg("taking over an expired key"))?;
                if took.is_some() {
                    self.set_key(&key, KeyState::Claimed(None));
                }
            }
            unknown.retain(|(k, _)| !self.keys.contains_key(*k));
        }
        Err(Error::store_transient(
            "claiming keys",
            "keys kept changing between the claim and the read",
        ))
    }
}

/// Dedup entries as the column arrays of one `unnest` insert.
#[derive(Default)]
struct EntryColumns<'a> {
    groups: Vec<&'a str>,
    tenants: Vec<&'a str>,
    keys: Vec<&'a [u8]>,
    statuses: Vec<&'static str>,
    fingerprints: Vec<&'a [u8]>,
    outcomes: Vec<Option<&'a [u8]>>,
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    created: Vec<i64>,
    expires: Vec<i64>,
}

impl<'a> EntryColumns<'a> {
    fn push(&mut self, store_key: &'a [u8], entry: &'a DedupEntry) -> Result<()> {
        let (group, tenant, key) = split(store_key)?;
        self.groups.push(group);
        self.tenants.push(tenant);
        self.keys.push(key);
        self.statuses.push(entry.status.as_str());
        self.fingerprints.push(&entry.fingerprint.0);
        self.outcomes.push(entry.outcome.as_deref());
        self.topics.push(&entry.topic);
        self.partitions.push(entry.partition);
        self.offsets.push(entry.offset);
        self.created.push(clamp_ms(entry.created_at_ms));
        self.expires.push(clamp_ms(entry.expires_at_ms));
        Ok(())
    }
}

/// A dedup row as read back, with whether it is an uncommitted claim.
struct ReadEntry {
    entry: DedupEntry,
    status_is_claimed: bool,
}

fn split(store_key: &[u8]) -> Result<(&str, &str, &[u8])> {
    let (g, t, k) = split_store_key(store_key)
        .ok_or_else(|| Error::Corrupt("a dedup key is not a scoped store key".into()))?;
    let text =
        |b| std::str::from_utf8(b).map_err(|_| Error::Corrupt("a key scope is not UTF-8".into()));
    Ok((text(g)?, text(t)?, k))
}

type Columns<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<&'a [u8]>);

fn split_all<'a>(keys: &[&'a [u8]]) -> Result<Columns<'a>> {
    let mut out = (
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
    );
    for key in keys {
        let (g, t, k) = split(key)?;
        out.0.push(g);
        out.1.push(t);
        out.2.push(k);
    }
    Ok(out)
}

/// The scoped store key of a row's (consumer_group, tenant, idempotency_key) columns.
fn store_key_of(row: &PgRow) -> Result<Vec<u8>> {
    let group: &str = row.try_get(0).map_err(pg("reading a key"))?;
    let tenant: &str = row.try_get(1).map_err(pg("reading a key"))?;
    let key: &[u8] = row.try_get(2).map_err(pg("reading a key"))?;
    let scope = crate::identity::Scope::new(group, (!tenant.is_empty()).then_some(tenant));
    let mut out = scope.as_bytes().to_vec();
    out.extend_from_slice(key);
    Ok(out)
}

async fn select_entries(
    conn: &mut PgConnection,
    sql: &Sql,
    keys: &[&[u8]],
) -> Result<Vec<(Vec<u8>, ReadEntry)>> {
    let (groups, tenants, bytes) = split_all(keys)?;
    let rows = sqlx::query(sql.select_many.clone())
        .bind(&groups)
        .bind(&tenants)
        .bind(&bytes)
        .fetch_all(conn)
        .await
        .map_err(pg("reading entries"))?;
    rows.iter()
        .map(|row| Ok((store_key_of(row)?, read_entry(row)?)))
        .collect()
}

fn read_entry(row: &PgRow) -> Result<ReadEntry> {
    let get = pg("reading an entry");
    let status: &str = row.try_get("status").map_err(get)?;
    let status_is_claimed = status == "claimed";
    let status = match status {
        "completed" | "claimed" => EntryStatus::Completed,
        "dead_lettered" => EntryStatus::DeadLettered,
        other => return Err(Error::Corrupt(format!("unknown entry status {other:?}"))),
    };
    let fingerprint: &[u8] = row.try_get("fingerprint").map_err(pg("reading an entry"))?;
    let fingerprint = if status_is_claimed {
        Fingerprint([0; 32])
    } else {
        Fingerprint(
            fingerprint
                .try_into()
                .map_err(|_| Error::Corrupt("a fingerprint is not 32 bytes".into()))?,
        )
    };
    Ok(ReadEntry {
        entry: DedupEntry {
            status,
            fingerprint,
            outcome: row.try_get("outcome").map_err(pg("reading an entry"))?,
            topic: row.try_get("topic").map_err(pg("reading an entry"))?,
            partition: row.try_get("partition").map_err(pg("reading an entry"))?,
            offset: row.try_get("offset").map_err(pg("reading an entry"))?,
            created_at_ms: row.try_get("created_ms").map_err(pg("reading an entry"))?,
            expires_at_ms: row.try_get("expires_ms").map_err(pg("reading an entry"))?,
        },
        status_is_claimed,
    })
}

impl Transaction for PgTx {
    const SAVEPOINT_ROUND_TRIP: bool = true;

    async fn lookup(&mut self, key: &[u8]) -> Result<Option<DedupEntry>> {
        match self.keys.get(key) {
            Some(KeyState::Existing(entry) | KeyState::Written { entry, .. }) => {
                return Ok(Some(entry.clone()));
            }
            Some(KeyState::Claimed(_)) => return Ok(None),
            None => {}
        }
        let found = select_entries(&mut self.tx, &self.store.sql, &[key]).await?;
        Ok(found
            .into_iter()
            .find(|(_, e)| !e.status_is_claimed)
            .map(|(_, e)| e.entry))
    }

    async fn prepare_claims(&mut self, claims: &[ClaimAhead<'_>], now_ms: i64) -> Result<()> {
        let claims: Vec<_> = claims.iter().map(|c| (c.key, Some(c))).collect();
        self.claim_unknown(&claims, now_ms).await
    }

    async fn claim(&mut self, key: &[u8], now_ms: i64) -> Result<Claim> {
        if !self.keys.contains_key(key) {
            self.claim_unknown(&[(key, None)], now_ms).await?;
        }
        match self.keys.get(key) {
            Some(KeyState::Claimed(_)) => Ok(Claim::Claimed),
            Some(KeyState::Existing(entry) | KeyState::Written { entry, .. }) => {
                Ok(Claim::Existing(entry.clone()))
            }
            None => Err(Error::Corrupt(
                "a claimed key vanished from the transaction".into(),
            )),
        }
    }

    async fn savepoint(&mut self) -> Result<()> {
        let statement = if self.savepoint {
            "RELEASE SAVEPOINT idc_record; SAVEPOINT idc_record"
        } else {
            "SAVEPOINT idc_record"
        };
        sqlx::raw_sql(statement)
            .execute(&mut *self.tx)
            .await
            .map_err(pg("setting a savepoint"))?;
        self.savepoint = true;
        self.undo.clear();
        self.deferred_marks.clear();
        self.deferred_marks
            .extend(self.deferred.iter().map(|(_, rows)| rows.len()));
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> Result<()> {
        if !self.savepoint {
            return Err(Error::Config("rollback without a savepoint".into()));
        }
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT idc_record")
            .execute(&mut *self.tx)
            .await
            .map_err(pg("rolling back to a savepoint"))?;
        while let Some((key, before)) = self.undo.pop() {
            match before {
                Some(state) => self.keys.insert(key, state),
                None => self.keys.remove(&key),
            };
        }
        for (i, (_, rows)) in self.deferred.iter_mut().enumerate() {
            rows.truncate(self.deferred_marks.get(i).copied().unwrap_or(0));
        }
        Ok(())
    }

    async fn write_deferred(&mut self) -> Result<std::result::Result<(), HandlerError>> {
        match batch::write_all(&mut self.tx, &mut self.deferred).await {
            Ok(()) => {}
            Err(e) if is_transient(&e) => {
                return Err(Error::store_transient("writing deferred rows", e));
            }
            Err(e) => return Ok(Err(batch::record_error(e))),
        }
        // Written rows are below every mark now.
        self.deferred_marks.iter_mut().for_each(|m| *m = 0);
        Ok(Ok(()))
    }

    async fn put_entry(&mut self, key: &[u8], entry: &DedupEntry) -> Result<()> {
        let stored =
            matches!(self.keys.get(key), Some(KeyState::Claimed(Some(row))) if row == entry);
        let entry = entry.clone();
        self.set_key(key, KeyState::Written { entry, stored });
        Ok(())
    }

    async fn put_dead_letter(&mut self, dead_letter: &DeadLetter) -> Result<()> {
        self.dead_letters.push(dead_letter.clone());
        Ok(())
    }

    async fn commit(mut self, next_offset: i64) -> Result<()> {
        let sql = &self.store.sql;
        let p = &self.partition;
        // The fence first: it takes the position row's lock, so an acquire waits for this
        // commit, and a bumped epoch stops it before anything else is written.
        let advanced = sqlx::query(sql.advance.clone())
            .bind(&p.group)
            .bind(&p.topic)
            .bind(p.partition)
            .bind(next_offset)
            .bind(self.epoch as i64)
            .bind(&self.store.owner)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(pg("advancing the position"))?;
        if advanced.is_none() {
            let current: Option<i64> = sqlx::query_scalar(sql.epoch.clone())
                .bind(&p.group)
                .bind(&p.topic)
                .bind(p.partition)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(pg("reading the epoch"))?;
            let _ = self.tx.rollback().await;
            return Err(Error::Fenced {
                topic: p.topic.clone(),
                partition: p.partition,
                epoch: self.epoch,
                current: current.unwrap_or(0) as u64,
            });
        }

        // Rows still deferred (the runtime writes them before the commit, so a failure can be
        // put down to a record; a caller driving the transaction may not have).
        batch::write_all(&mut self.tx, &mut self.deferred)
            .await
            .map_err(pg("writing deferred rows"))?;

        // The entries written by the batch (the last write of a key is its state), as columns.
        let mut rows = EntryColumns::default();
        for (key, state) in &self.keys {
            if let KeyState::Written {
                entry,
                stored: false,
            } = state
            {
                rows.push(key, entry)?;
            }
        }
        if !rows.keys.is_empty() {
            sqlx::query(sql.write_entries.clone())
                .bind(rows.groups)
                .bind(rows.tenants)
                .bind(rows.keys)
                .bind(rows.statuses)
                .bind(rows.fingerprints)
                .bind(rows.outcomes)
                .bind(rows.topics)
                .bind(rows.partitions)
                .bind(rows.offsets)
                .bind(rows.created)
                .bind(rows.expires)
                .execute(&mut *self.tx)
                .await
                .map_err(pg("writing dedup entries"))?;
        }

        // Claims no record finished (it will be retried, or the batch stopped before it).
        let unfinished: Vec<&[u8]> = self
            .keys
            .iter()
            .filter(|(_, s)| matches!(s, KeyState::Claimed(_)))
            .map(|(k, _)| k.as_slice())
            .collect();
        if !unfinished.is_empty() {
            let (groups, tenants, bytes) = split_all(&unfinished)?;
            sqlx::query(sql.release_claims.clone())
                .bind(&groups)
                .bind(&tenants)
                .bind(&bytes)
                .execute(&mut *self.tx)
                .await
                .map_err(pg("releasing unfinished claims"))?;
        }

        if !self.dead_letters.is_empty() {
            let d = &self.dead_letters;
            let r = |f: fn(&DeadLetter) -> i64| d.iter().map(f).collect::<Vec<_>>();
            sqlx::query(sql.write_dead_letters.clone())
                .bind(&p.group)
                .bind(d.iter().map(|l| l.record.topic()).collect::<Vec<_>>())
                .bind(d.iter().map(|l| l.record.partition()).collect::<Vec<_>>())
                .bind(r(|l| l.record.offset()))
                .bind(d.iter().map(|l| l.key.as_deref()).collect::<Vec<_>>())
                .bind(d.iter().map(|l| l.reason.as_str()).collect::<Vec<_>>())
                .bind(d.iter().map(|l| l.message.as_str()).collect::<Vec<_>>())
                .bind(
                    d.iter()
                        .map(|l| i32::try_from(l.attempts).unwrap_or(i32::MAX))
                        .collect::<Vec<_>>(),
                )
                .bind(d.iter().map(|l| l.record.key()).collect::<Vec<_>>())
                .bind(d.iter().map(|l| l.record.payload()).collect::<Vec<_>>())
                .bind(r(|l| l.first_failed_at_ms))
                .bind(r(|l| l.failed_at_ms))
                .bind(d.iter().map(DeadLetter::encode).collect::<Vec<_>>())
                .execute(&mut *self.tx)
                .await
                .map_err(pg("writing dead letters"))?;
        }

        self.tx.commit().await.map_err(pg("committing a batch"))
    }
}
