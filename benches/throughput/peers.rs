//! What a user writes in an afternoon instead of using the crate, on the same topic: rdkafka
//! with RocksDB or with sqlx, deduplicating by the record's idempotency key. No fencing, no
//! conflict detection, no dead letters, no retries: the crate keeps every one of those, and is
//! held to be as fast.

use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Headers};
use rocksdb::{DB, Options, WriteBatch, WriteOptions};
use sqlx::{Connection, PgConnection};

use super::Res;
use super::topic::subscribed;

/// Up to `max` records, or what arrived once `linger` passed with at least one.
fn next_batch<'c>(
    consumer: &'c BaseConsumer,
    max: usize,
    linger: Duration,
) -> Res<Vec<BorrowedMessage<'c>>> {
    let mut batch = Vec::with_capacity(max);
    let mut since: Option<Instant> = None;
    while batch.len() < max && since.is_none_or(|t| t.elapsed() < linger) {
        match consumer.poll(Duration::from_millis(if batch.is_empty() {
            100
        } else {
            1
        })) {
            Some(Ok(m)) => {
                since.get_or_insert_with(Instant::now);
                batch.push(m);
            }
            Some(Err(e)) => return Err(e.to_string()),
            None if batch.is_empty() => {}
            None => break,
        }
    }
    Ok(batch)
}

/// The record's `idempotency-key` header.
pub(super) fn key_of(m: &BorrowedMessage<'_>) -> Vec<u8> {
    m.headers()
        .and_then(|h| h.iter().find(|h| h.key == "idempotency-key"))
        .and_then(|h| h.value)
        .unwrap_or_default()
        .to_vec()
}

/// rdkafka + RocksDB: per batch of 500, `multi_get` the keys, put the new ones and their
/// effects in one synced `WriteBatch`, then commit the offsets to Kafka.
pub(super) fn peer_rocksdb(bootstrap: &str, records: usize) -> Res<Duration> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.increase_parallelism(2);
    let db = DB::open(&opts, dir.path()).map_err(|e| e.to_string())?;
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    let consumer = subscribed(bootstrap, "peer-rocksdb")?;
    let mut first: Option<Instant> = None;
    let mut done = 0;
    while done < records {
        let batch = next_batch(&consumer, 500, Duration::from_millis(20))?;
        if batch.is_empty() {
            continue;
        }
        first.get_or_insert_with(Instant::now);
        let keys: Vec<Vec<u8>> = batch
            .iter()
            .map(|m| [b"seen/".as_slice(), &key_of(m)].concat())
            .collect();
        let seen = db.multi_get(&keys);
        let mut wb = WriteBatch::default();
        for ((m, key), seen) in batch.iter().zip(&keys).zip(seen) {
            if seen.map_err(|e| e.to_string())?.is_none() {
                let payload = m.payload().unwrap_or_default();
                wb.put(key, m.offset().to_be_bytes());
                wb.put(
                    [b"effect/".as_slice(), &key[5..]].concat(),
                    &payload[..payload.len().min(32)],
                );
            }
        }
        db.write_opt(wb, &sync).map_err(|e| e.to_string())?;
        consumer
            .commit_consumer_state(CommitMode::Async)
            .map_err(|e| e.to_string())?;
        done += batch.len();
    }
    Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
}

/// rdkafka + sqlx: per batch of 1,000, one transaction: `INSERT ... ON CONFLICT DO NOTHING
/// RETURNING` the keys, then the effects of the keys it returned; after the commit, the offsets
/// to Kafka.
pub(super) fn peer_postgres(
    rt: &tokio::runtime::Runtime,
    bootstrap: &str,
    url: &str,
    records: usize,
) -> Res<Duration> {
    let consumer = subscribed(bootstrap, "peer-postgres")?;
    rt.block_on(async {
        let mut conn = PgConnection::connect(url)
            .await
            .map_err(|e| e.to_string())?;
        sqlx::raw_sql(
            "CREATE TABLE peer_dedup (key bytea PRIMARY KEY, seen_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE peer_effects (key bytea NOT NULL, body bytea NOT NULL)",
        )
        .execute(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
        let mut first: Option<Instant> = None;
        let mut done = 0;
        while done < records {
            let batch = next_batch(&consumer, 1000, Duration::from_millis(20))?;
            if batch.is_empty() {
                continue;
            }
            first.get_or_insert_with(Instant::now);
            let keys: Vec<Vec<u8>> = batch.iter().map(key_of).collect();
            let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
            let new: Vec<Vec<u8>> = sqlx::query_scalar(
                "INSERT INTO peer_dedup (key) SELECT * FROM UNNEST($1::bytea[]) \
                 ON CONFLICT DO NOTHING RETURNING key",
            )
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
            let new: std::collections::HashSet<Vec<u8>> = new.into_iter().collect();
            let (effect_keys, bodies): (Vec<Vec<u8>>, Vec<Vec<u8>>) = batch
                .iter()
                .zip(keys)
                .filter(|(_, k)| new.contains(k))
                .map(|(m, k)| (k, m.payload().unwrap_or_default().to_vec()))
                .unzip();
            sqlx::query(
                "INSERT INTO peer_effects (key, body) SELECT * FROM UNNEST($1::bytea[], $2::bytea[])",
            )
            .bind(&effect_keys)
            .bind(&bodies)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())?;
            consumer
                .commit_consumer_state(CommitMode::Async)
                .map_err(|e| e.to_string())?;
            done += batch.len();
        }
        Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
    })
}
