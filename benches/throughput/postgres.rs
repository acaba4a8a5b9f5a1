//! The PostgreSQL rows: the store at batch sizes 1, 100 and 1,000, its replay, the
//! handler's own INSERT per record, the hand-written check-then-insert pattern, the database's
//! limits, scale-out, the peer, and the cost growth with stored entries.

use std::time::{Duration, Instant};

use idempotent_consumer::testkit::ThrowawayDb;
use idempotent_consumer::{
    BatchStatement, Handler, HandlerError, Inspect, Outcome, PartitionId, PgOptions, PgStore, PgTx,
    Record,
};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer};
use sqlx::{Connection, PgConnection};

use super::topic::subscribed;
use super::{Args, Bench, PARTITIONS, Res, Row, TOPIC, block_on, limits, measure, peers, scale};

/// Measures every wanted PostgreSQL row on a database of its own on the server at `url`.
pub(super) fn rows(
    bench: &Bench<'_>,
    args: &Args,
    url: &str,
    records: usize,
    wanted: &dyn Fn(&str) -> bool,
    report: &mut dyn FnMut(Row),
) -> Res<()> {
    let db = database(url)?;
    let options = PgOptions {
        max_connections: 8,
        ..PgOptions::default()
    };
    let connect = || {
        bench
            .rt
            .block_on(PgStore::connect_with(db.url(), options.clone()))
            .map_err(|e| e.to_string())
    };
    for (name, batch, n, batched) in [
        ("postgres-b1", 1, args.slow_records, true),
        ("postgres-b100", 100, records, true),
        ("postgres-b1000", 1000, records, true),
        ("postgres-b1000-sql", 1000, records, false),
    ] {
        let handler = || {
            if batched {
                RowPerRecord::batched()
            } else {
                RowPerRecord { batched: None }
            }
        };
        if wanted(name) || (name == "postgres-b1000" && wanted("replay-postgres-b1000")) {
            let store = connect()?;
            let row = bench.runtime_in(name, name, n, store.clone(), handler(), batch)?;
            report(row);
            if name == "postgres-b1000" && wanted("replay-postgres-b1000") {
                for p in 0..PARTITIONS {
                    bench
                        .rt
                        .block_on(store.set_position(&PartitionId::new(name, TOPIC, p), 0))
                        .map_err(|e| e.to_string())?;
                }
                report(bench.runtime_in(
                    name,
                    "replay-postgres-b1000",
                    n,
                    store,
                    handler(),
                    batch,
                )?);
            }
        }
    }
    if wanted("naive") {
        let n = args.slow_records;
        let row = measure("naive", n, || naive(bench.rt, bench.bootstrap, db.url(), n))?;
        report(row);
    }
    for (name, method) in [
        ("pg-limit-unnest", limits::PgMethod::Unnest),
        ("pg-limit-copy", limits::PgMethod::Copy),
    ] {
        if wanted(name) || wanted("pg-limit") {
            let n = records;
            let row = measure(name, n, || {
                bench.rt.block_on(limits::pg_limit(db.url(), n, method))
            })?;
            report(row);
        }
    }
    for n in 1..=3 {
        let name = format!("scale-out-{n}");
        if wanted(&name) || wanted("scale-out") {
            let row = measure(&name, records, || {
                scale::scale_out(bench.rt, bench.bootstrap, db.url(), n, records)
            })?;
            report(row);
        }
    }
    if wanted("peer-postgres") {
        let row = measure("peer-postgres", records, || {
            peers::peer_postgres(bench.rt, bench.bootstrap, db.url(), records)
        })?;
        report(row);
    }
    // Cost growth, last: the preloaded entries stay in the store's table.
    let mut stored = 0;
    for (name, entries) in [
        ("postgres-b1000-1m", args.pg_preload / 10),
        ("postgres-b1000-10m", args.pg_preload),
    ] {
        if !wanted(name) {
            continue;
        }
        let store = connect()?;
        let t = Instant::now();
        bench.rt.block_on(pg_preload(&store, stored, entries))?;
        eprintln!(
            "throughput: {} entries preloaded into PostgreSQL in {:.1?}",
            entries - stored.min(entries),
            t.elapsed()
        );
        stored = stored.max(entries);
        let row = bench.runtime_in(name, name, records, store, RowPerRecord::batched(), 1000)?;
        report(row);
    }
    Ok(())
}

/// Inserts one row per record: deferred to a statement that writes the batch's rows at once,
/// or (`batched: None`) with its own INSERT per record on the transaction's connection.
struct RowPerRecord {
    batched: Option<BatchStatement<(Vec<u8>, Vec<u8>)>>,
}

impl RowPerRecord {
    fn batched() -> Self {
        RowPerRecord {
            batched: Some(BatchStatement::new(
                "INSERT INTO bench_effects (key, body) SELECT * FROM unnest($1::bytea[], $2::bytea[])",
            )),
        }
    }
}

impl Handler<PgTx> for RowPerRecord {
    async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
        let key = record.header("idempotency-key").unwrap_or_default();
        let body = record.payload().unwrap_or_default();
        match &self.batched {
            Some(insert) => tx.defer(insert, (key.to_vec(), body.to_vec())),
            None => {
                sqlx::query("INSERT INTO bench_effects (key, body) VALUES ($1, $2)")
                    .bind(key)
                    .bind(body)
                    .execute(tx.conn())
                    .await
                    .map_err(HandlerError::retryable)?;
            }
        }
        Ok(Outcome::none())
    }
}

/// Stores entries `from..to` (keys no record of the topic uses) in the store's dedup table, in
/// statements of a million rows, then analyses it.
async fn pg_preload(store: &PgStore, from: usize, to: usize) -> Res<()> {
    let mut at = from;
    while at < to {
        let upto = (at + 1_000_000).min(to);
        sqlx::query(
            "INSERT INTO idc_dedup (consumer_group, tenant, idempotency_key, status, fingerprint, \
               topic, \"partition\", \"offset\", created_at, expires_at) \
             SELECT 'preload', '', convert_to('preloaded-' || lpad(i::text, 10, '0'), 'UTF8'), \
               'completed', sha256(convert_to(i::text, 'UTF8')), 'preload', 0, i, now(), \
               now() + interval '30 days' \
             FROM generate_series($1::bigint, $2::bigint - 1) AS i",
        )
        .bind(at as i64)
        .bind(upto as i64)
        .execute(store.pool())
        .await
        .map_err(|e| e.to_string())?;
        at = upto;
    }
    sqlx::query("ANALYZE idc_dedup")
        .execute(store.pool())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// A database of its own for the PostgreSQL rows, dropped at the end.
fn database(admin_url: &str) -> Res<ThrowawayDb> {
    block_on(ThrowawayDb::create(
        admin_url,
        &format!("bench_{}", std::process::id()),
        "CREATE TABLE bench_effects (key bytea NOT NULL, body bytea NOT NULL); \
         CREATE TABLE naive_dedup (key bytea PRIMARY KEY); \
         CREATE TABLE limit_effects (key bytea NOT NULL, body bytea NOT NULL)",
    ))
    .map_err(|e| format!("creating the benchmark database on DATABASE_URL: {e}"))
}

/// The hand-written pattern: per record, in its own transaction, SELECT the key, do the write,
/// INSERT the key, COMMIT; then commit the offset. Stops after `n` records.
fn naive(rt: &tokio::runtime::Runtime, bootstrap: &str, url: &str, n: usize) -> Res<Duration> {
    let consumer = subscribed(bootstrap, "naive")?;
    rt.block_on(async {
        let mut conn = PgConnection::connect(url)
            .await
            .map_err(|e| e.to_string())?;
        let mut first: Option<Instant> = None;
        let mut done = 0;
        while done < n {
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m.map_err(|e| e.to_string())?;
            first.get_or_insert_with(Instant::now);
            let key = peers::key_of(&m);
            let body = m.payload().unwrap_or_default().to_vec();
            let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
            let seen: Option<i32> = sqlx::query_scalar("SELECT 1 FROM naive_dedup WHERE key = $1")
                .bind(&key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            if seen.is_none() {
                sqlx::query("INSERT INTO bench_effects (key, body) VALUES ($1, $2)")
                    .bind(&key)
                    .bind(&body)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query("INSERT INTO naive_dedup (key) VALUES ($1)")
                    .bind(&key)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().await.map_err(|e| e.to_string())?;
            consumer
                .commit_message(&m, CommitMode::Async)
                .map_err(|e| e.to_string())?;
            done += 1;
        }
        Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
    })
}
