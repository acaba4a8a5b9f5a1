//! What the stores alone can do with the rows a record leaves, no Kafka and no runtime: the
//! limits the `rocksdb` and `postgres-b1000` rows are held against.

use std::time::{Duration, Instant};

use idempotent_consumer::{EntryKey, Fingerprint, PgOptions, PgStore};
use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};
use sqlx::{Connection, PgConnection};

use super::topic::{payload, record_key};
use super::{PARTITIONS, Res};

/// The bytes of a completed entry of the `bench` topic as the RocksDB store encodes it
/// (version, status, fingerprint, partition, offset, creation and expiry times, the topic with
/// its length, no outcome).
const ENTRY_BYTES: usize = 1 + 1 + 32 + 4 + 8 + 8 + 8 + 4 + 5 + 1;

/// RocksDB's own rate for the rows the `rocksdb` row leaves: per record the dedup entry (the
/// store's key for it, a value of the entry's size, in a family with the store's bloom filter)
/// and the handler's key (32 bytes of value), per batch of `batch` records of one partition a
/// position row; each batch one `WriteBatch`, keys in order, written with a WAL sync, as the
/// store commits. One writer thread per partition, as the runtime has one task per partition,
/// so syncs group as the store's do.
pub(super) fn rocks_limit(records: usize, batch: usize) -> Res<Duration> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.increase_parallelism(2);
    let families = ["dedup", "data", "positions"].map(|name| {
        let mut cf_opts = Options::default();
        if name != "data" {
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            cf_opts.set_block_based_table_factory(&table);
        }
        ColumnFamilyDescriptor::new(name, cf_opts)
    });
    let db = DB::open_cf_descriptors(&db_opts, dir.path(), families).map_err(|e| e.to_string())?;
    let started = Instant::now();
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..PARTITIONS as usize)
            .map(|p| {
                let db = &db;
                scope.spawn(move || write_partition(db, p, records, batch))
            })
            .collect();
        writers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| "a writer panicked".to_owned())?)
    })?;
    Ok(started.elapsed())
}

/// The records of partition `p` (every `PARTITIONS`th), in batches.
fn write_partition(db: &DB, p: usize, records: usize, batch: usize) -> Res<()> {
    let (dedup, data, positions) = (
        db.cf_handle("dedup").ok_or("no dedup family")?,
        db.cf_handle("data").ok_or("no data family")?,
        db.cf_handle("positions").ok_or("no positions family")?,
    );
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    let mine: Vec<usize> = (p..records).step_by(PARTITIONS as usize).collect();
    let entry = vec![7u8; ENTRY_BYTES];
    for (n, chunk) in mine.chunks(batch).enumerate() {
        let mut rows: Vec<(Vec<u8>, Vec<u8>)> = chunk
            .iter()
            .map(|&i| {
                let key = record_key(i);
                let store_key = EntryKey::new("rocks-limit", &key).store_key();
                let effect = [b"effect/".as_slice(), key.as_bytes()].concat();
                (store_key, effect)
            })
            .collect();
        rows.sort();
        let mut effects: Vec<&Vec<u8>> = rows.iter().map(|(_, e)| e).collect();
        effects.sort();
        let mut wb = WriteBatch::default();
        for (store_key, _) in &rows {
            wb.put_cf(&dedup, store_key, &entry);
        }
        for effect in effects {
            wb.put_cf(&data, effect, &payload(0).as_bytes()[..32]);
        }
        wb.put_cf(
            &positions,
            format!("rocks-limit/{p}"),
            (n as i64).to_be_bytes(),
        );
        db.write_opt(wb, &sync).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// How the `pg-limit` rows were inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PgMethod {
    /// `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING`, as the store claims.
    Unnest,
    /// Binary `COPY ... FROM STDIN` (no conflict handling: the keys are new).
    Copy,
}

/// PostgreSQL's own rate for the rows the `postgres-b1000` row leaves: the dedup rows (into a
/// table of the store's own shape, its migrations under the prefix `limit_<method>_`: the same
/// key, indexes and collation) and one effect row per record, in batches of 1,000, one
/// transaction each, fsync as the server has it, one connection.
pub(super) async fn pg_limit(url: &str, n: usize, method: PgMethod) -> Res<Duration> {
    let prefix = match method {
        PgMethod::Unnest => "limit_unnest_",
        PgMethod::Copy => "limit_copy_",
    };
    let options = PgOptions {
        table_prefix: prefix.into(),
        max_connections: 1,
        ..PgOptions::default()
    };
    PgStore::connect_with(url, options)
        .await
        .map_err(|e| e.to_string())?
        .pool()
        .close()
        .await;
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let effects = format!("{prefix}effects");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {effects} (key bytea NOT NULL, body bytea NOT NULL)"
    )))
    .execute(&mut conn)
    .await
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let upto = (i + 1000).min(n);
        let rows = Rows::new(i, upto);
        let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
        match method {
            PgMethod::Unnest => rows.unnest(&mut tx, prefix, &effects).await?,
            PgMethod::Copy => rows.copy(&mut tx, prefix, &effects).await?,
        }
        tx.commit().await.map_err(|e| e.to_string())?;
        i = upto;
    }
    Ok(started.elapsed())
}

/// The rows of records `from..to`.
struct Rows {
    keys: Vec<Vec<u8>>,
    bodies: Vec<Vec<u8>>,
    fingerprints: Vec<Vec<u8>>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
}

impl Rows {
    fn new(from: usize, to: usize) -> Self {
        let keys: Vec<Vec<u8>> = (from..to).map(|j| record_key(j).into_bytes()).collect();
        let bodies: Vec<Vec<u8>> = (from..to).map(|j| payload(j).into_bytes()).collect();
        let fingerprints = bodies
            .iter()
            .map(|b| Fingerprint::of(Some(b)).as_bytes().to_vec())
            .collect();
        Rows {
            keys,
            bodies,
            fingerprints,
            partitions: (from..to)
                .map(|j| (j % PARTITIONS as usize) as i32)
                .collect(),
            offsets: (from..to)
                .map(|j| (j / PARTITIONS as usize) as i64)
                .collect(),
        }
    }

    async fn unnest(&self, conn: &mut PgConnection, prefix: &str, effects: &str) -> Res<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {prefix}dedup (consumer_group, tenant, idempotency_key, status, \
               fingerprint, topic, \"partition\", \"offset\", created_at, expires_at) \
             SELECT 'pg-limit', '', k, 'completed', f, 'bench', p, o, now(), \
               now() + interval '7 days' \
             FROM UNNEST($1::bytea[], $2::bytea[], $3::int[], $4::bigint[]) AS t(k, f, p, o) \
             ON CONFLICT DO NOTHING"
        )))
        .bind(&self.keys)
        .bind(&self.fingerprints)
        .bind(&self.partitions)
        .bind(&self.offsets)
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {effects} (key, body) SELECT * FROM UNNEST($1::bytea[], $2::bytea[])"
        )))
        .bind(&self.keys)
        .bind(&self.bodies)
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn copy(&self, conn: &mut PgConnection, prefix: &str, effects: &str) -> Res<()> {
        // timestamptz in binary: microseconds since 2000-01-01 UTC.
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_micros() as i64
            - 946_684_800_000_000;
        let week_us = 7 * 86_400 * 1_000_000i64;
        let mut dedup = Copy::new();
        for j in 0..self.keys.len() {
            dedup.tuple(10);
            dedup.field(b"pg-limit");
            dedup.field(b"");
            dedup.field(&self.keys[j]);
            dedup.field(b"completed");
            dedup.field(&self.fingerprints[j]);
            dedup.field(b"bench");
            dedup.field(&self.partitions[j].to_be_bytes());
            dedup.field(&self.offsets[j].to_be_bytes());
            dedup.field(&now_us.to_be_bytes());
            dedup.field(&(now_us + week_us).to_be_bytes());
        }
        let statement = format!(
            "COPY {prefix}dedup (consumer_group, tenant, idempotency_key, status, fingerprint, \
             topic, \"partition\", \"offset\", created_at, expires_at) FROM STDIN (FORMAT binary)"
        );
        send(conn, &statement, dedup.finish()).await?;
        let mut rows = Copy::new();
        for j in 0..self.keys.len() {
            rows.tuple(2);
            rows.field(&self.keys[j]);
            rows.field(&self.bodies[j]);
        }
        let statement = format!("COPY {effects} (key, body) FROM STDIN (FORMAT binary)");
        send(conn, &statement, rows.finish()).await
    }
}

async fn send(conn: &mut PgConnection, statement: &str, data: Vec<u8>) -> Res<()> {
    let mut copy = conn
        .copy_in_raw(statement)
        .await
        .map_err(|e| e.to_string())?;
    copy.send(data).await.map_err(|e| e.to_string())?;
    copy.finish().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// PostgreSQL's binary COPY format: a signature, then tuples of length-prefixed fields.
struct Copy(Vec<u8>);

impl Copy {
    fn new() -> Self {
        let mut out = b"PGCOPY\n\xff\r\n\0".to_vec();
        out.extend_from_slice(&0i32.to_be_bytes()); // flags
        out.extend_from_slice(&0i32.to_be_bytes()); // header extension
        Copy(out)
    }

    fn tuple(&mut self, fields: i16) {
        self.0.extend_from_slice(&fields.to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        self.0
            .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.0.extend_from_slice(bytes);
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}
