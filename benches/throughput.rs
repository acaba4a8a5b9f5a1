//! Throughput, side by side in one run: the framework against a plain rdkafka consumer and
//! against the check-then-insert code people write by hand, on the same broker and the same
//! pre-filled topic. Absolute figures drift on a shared machine; the ratios are the result.
//!
//! Rows: `raw` (a plain consumer that reads everything and commits offsets periodically; the
//! median of three passes),
//! `framework-noop` (the runtime, no-op handler, in-memory store), `rocksdb` (handler writes one
//! key per record), `postgres-b1`, `-b100`, `-b1000` (handler inserts one row per record, at
//! those batch sizes, deferred with `PgTx::defer` to one statement per batch),
//! `postgres-b1000-sql` (the same with the handler's own INSERT per record), `naive` (per record: SELECT the key, the same insert, INSERT the key,
//! COMMIT, commit the offset), `pg-limit` (the same dedup rows and inserts with UNNEST in
//! batches of 1,000, no Kafka), `replay-rocksdb` and `replay-postgres-b1000` (the same records
//! again: all duplicates), `rocksdb-10m` (the rocksdb row with 10 million entries already
//! stored). Each prints
//! `BENCH name=<name> records=<n> seconds=<s> records_per_s=<r> ratio_to_raw=<x>` (plus peak
//! RSS), then the target ratios as `BENCH ratio <name>=<x>`, and writes
//! `target/bench/throughput.csv` and `target/bench/throughput.svg`.
//!
//! Run: `scripts/dev.sh bench` (starts a throwaway PostgreSQL with fsync on), or
//! `DATABASE_URL=... cargo bench --all-features --bench throughput -- [--records N]
//! [--slow-records N] [--preload N] [--rows a,b]`. `--slow-records` (default 20,000) bounds
//! `postgres-b1` and `naive`, which commit once per record; rates are per second, so the rows
//! compare. Without `DATABASE_URL` the PostgreSQL rows are left out, and the output says so.
//!
//! The topic lives on librdkafka's in-process mock cluster unless `KAFKA_BOOTSTRAP_SERVERS`
//! names a broker (the topic is then created there, and must not exist). The mock keeps at most
//! 5 MB of log per partition, so on it the topic holds 100,000 records by default and at most;
//! on a broker the default is 1,000,000.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_consumer::{
    BatchStatement, DedupEntry, EntryStatus, Handler, HandlerError, Inspect, MemoryStore, MemoryTx,
    Outcome, PartitionId, PgOptions, PgStore, PgTx, Record, RocksStore, RocksTx, Runtime, Stats,
    Store, Transaction,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message};
use sqlx::{Connection, PgConnection};

use idempotent_consumer::testkit::ThrowawayDb;

const PARTITIONS: i32 = 4;
const TOPIC: &str = "bench";

type Res<T> = std::result::Result<T, String>;

/// librdkafka's mock cluster keeps at most 5 MB of log per partition (hard-coded) and drops the
/// oldest batches beyond that: about 30,000 of these records per partition. On the mock the
/// topic holds this many records by default, and at most this many.
const MOCK_RECORDS: usize = 100_000;

struct Args {
    /// Default: 1,000,000 on a broker, [`MOCK_RECORDS`] on the mock cluster.
    records: Option<usize>,
    slow_records: usize,
    preload: usize,
    rows: Option<Vec<String>>,
}

fn args() -> Res<Args> {
    let mut a = Args {
        records: None,
        slow_records: 20_000,
        preload: 10_000_000,
        rows: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|_| format!("bad number {v:?}"));
        match flag.as_str() {
            "--records" => a.records = Some(number(value()?)?),
            "--slow-records" => a.slow_records = number(value()?)?,
            "--preload" => a.preload = number(value()?)?,
            "--rows" => a.rows = Some(value()?.split(',').map(str::to_owned).collect()),
            // cargo bench passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("throughput: {e}");
        std::process::exit(1);
    }
}

/// One measured row.
struct Row {
    name: String,
    records: usize,
    seconds: f64,
    peak_rss_mb: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.records as f64 / self.seconds
    }
}

fn run() -> Res<()> {
    let args = args()?;
    let wanted = |name: &str| {
        args.rows
            .as_ref()
            .is_none_or(|r| r.iter().any(|x| x == name))
    };
    let mock = match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        Ok(_) => None,
        Err(_) => Some(MockCluster::new(1).map_err(|e| e.to_string())?),
    };
    let bootstrap = match &mock {
        Some(m) => {
            m.create_topic(TOPIC, PARTITIONS, 1)
                .map_err(|e| e.to_string())?;
            m.bootstrap_servers()
        }
        None => {
            let servers = std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap();
            create_topic(&servers)?;
            servers
        }
    };
    let records = match (args.records, &mock) {
        (Some(n), Some(_)) if n > MOCK_RECORDS => {
            return Err(format!(
                "--records {n}: the in-process mock cluster keeps at most 5 MB per partition \
                 ({MOCK_RECORDS} records of this size over {PARTITIONS} partitions); set \
                 KAFKA_BOOTSTRAP_SERVERS to a broker for more"
            ));
        }
        (Some(n), _) => n,
        (None, Some(_)) => MOCK_RECORDS,
        (None, None) => 1_000_000,
    };
    let started = Instant::now();
    let ends = prefill(&bootstrap, records)?;
    eprintln!(
        "throughput: {} records of ~150 bytes over {PARTITIONS} partitions produced in {:.1?}",
        records,
        started.elapsed()
    );
    let pg_url = std::env::var("DATABASE_URL").ok();
    if pg_url.is_none() {
        eprintln!("throughput: DATABASE_URL is not set: the PostgreSQL rows are left out");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut rows: Vec<Row> = Vec::new();
    let mut report = |row: Row, raw: Option<f64>| {
        let ratio = raw.map_or(1.0, |r| row.rate() / r);
        println!(
            "BENCH name={} records={} seconds={:.3} records_per_s={:.0} ratio_to_raw={:.3} peak_rss_mb={:.0}",
            row.name,
            row.records,
            row.seconds,
            row.rate(),
            ratio,
            row.peak_rss_mb
        );
        rows.push(row);
    };

    // The baseline is short and every ratio divides by it: the median of three passes.
    let raw = measure("raw", records, || {
        let mut passes = (0..3)
            .map(|i| raw_consumer(&bootstrap, &ends, &format!("raw-{i}")))
            .collect::<Res<Vec<Duration>>>()?;
        passes.sort();
        Ok(passes[1])
    })?;
    let raw_rate = raw.rate();
    report(raw, None);
    let bench = Bench {
        bootstrap: &bootstrap,
        rt: &rt,
    };
    if wanted("framework-noop") {
        let store = MemoryStore::new();
        report(
            bench.runtime_in(
                "framework-noop",
                "framework-noop",
                records,
                store,
                Noop,
                500,
            )?,
            Some(raw_rate),
        );
    }
    if wanted("rocksdb") || wanted("replay-rocksdb") {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store = RocksStore::open(dir.path()).map_err(|e| e.to_string())?;
        let group = "rocksdb";
        report(
            bench.runtime_in(group, "rocksdb", records, store.clone(), KeyPerRecord, 500)?,
            Some(raw_rate),
        );
        for p in 0..PARTITIONS {
            block_on(store.set_position(&PartitionId::new(group, TOPIC, p), 0))
                .map_err(|e| e.to_string())?;
        }
        report(
            bench.runtime_in(group, "replay-rocksdb", records, store, KeyPerRecord, 500)?,
            Some(raw_rate),
        );
    }
    if wanted("rocksdb-10m") {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store = RocksStore::open(dir.path()).map_err(|e| e.to_string())?;
        let t = Instant::now();
        rt.block_on(preload(&store, args.preload))?;
        // Entries stored, not entries being compacted: the row starts once the load settled.
        store.wait_for_compactions().map_err(|e| e.to_string())?;
        eprintln!(
            "throughput: {} entries preloaded and compacted in {:.1?}",
            args.preload,
            t.elapsed()
        );
        report(
            bench.runtime_in(
                "rocksdb-10m",
                "rocksdb-10m",
                records,
                store,
                KeyPerRecord,
                500,
            )?,
            Some(raw_rate),
        );
    }
    if let Some(url) = &pg_url {
        let db = database(url)?;
        let options = PgOptions {
            max_connections: 8,
            ..PgOptions::default()
        };
        let connect = || {
            rt.block_on(PgStore::connect_with(db.url(), options.clone()))
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
                report(row, Some(raw_rate));
                if name == "postgres-b1000" && wanted("replay-postgres-b1000") {
                    for p in 0..PARTITIONS {
                        rt.block_on(store.set_position(&PartitionId::new(name, TOPIC, p), 0))
                            .map_err(|e| e.to_string())?;
                    }
                    report(
                        bench.runtime_in(
                            name,
                            "replay-postgres-b1000",
                            n,
                            store,
                            handler(),
                            batch,
                        )?,
                        Some(raw_rate),
                    );
                }
            }
        }
        if wanted("naive") {
            let n = args.slow_records;
            let row = measure("naive", n, || naive(&rt, &bootstrap, db.url(), n))?;
            report(row, Some(raw_rate));
        }
        if wanted("pg-limit") {
            let n = records;
            let row = measure("pg-limit", n, || rt.block_on(pg_limit(db.url(), n)))?;
            report(row, Some(raw_rate));
        }
    }

    let by_name: BTreeMap<&str, f64> = rows.iter().map(|r| (r.name.as_str(), r.rate())).collect();
    let ratio = |a: &str, b: &str| Some(by_name.get(a)? / by_name.get(b)?);
    for (name, value, target) in [
        ("rocksdb/raw", ratio("rocksdb", "raw"), 0.60),
        (
            "postgres-b1000/pg-limit",
            ratio("postgres-b1000", "pg-limit"),
            0.70,
        ),
        (
            "postgres-b1000/naive",
            ratio("postgres-b1000", "naive"),
            20.0,
        ),
        (
            "replay-rocksdb/rocksdb",
            ratio("replay-rocksdb", "rocksdb"),
            1.0,
        ),
        (
            "replay-postgres-b1000/postgres-b1000",
            ratio("replay-postgres-b1000", "postgres-b1000"),
            1.0,
        ),
        ("rocksdb-10m/rocksdb", ratio("rocksdb-10m", "rocksdb"), 0.80),
    ] {
        if let Some(v) = value {
            let verdict = if v >= target { "met" } else { "MISSED" };
            println!("BENCH ratio {name}={v:.3} target>={target} {verdict}");
        }
    }
    write_outputs(&rows, raw_rate)
}

/// Resets the peak RSS, runs `f`, and returns the row with the time `f` reported.
fn measure(name: &str, records: usize, f: impl FnOnce() -> Res<Duration>) -> Res<Row> {
    // Writing 5 to clear_refs resets VmHWM, so each row reports its own peak.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let seconds = f()?.as_secs_f64();
    Ok(Row {
        name: name.to_owned(),
        records,
        seconds,
        peak_rss_mb: peak_rss_mb(),
    })
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Produces `n` records of about 150 bytes round-robin over the partitions; returns each
/// partition's end offset.
fn prefill(bootstrap: &str, n: usize) -> Res<Vec<i64>> {
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Deliveries::default())
        .map_err(|e| e.to_string())?;
    let mut ends = vec![0i64; PARTITIONS as usize];
    for i in 0..n {
        let partition = (i % PARTITIONS as usize) as i32;
        let key = format!("k-{i:09}");
        let payload = format!(
            r#"{{"account":"acct-{:05}","amount":{},"memo":"{:0>76}"}}"#,
            i % 10_000,
            i % 997,
            i
        );
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(key.as_bytes()),
        });
        let mut record = BaseRecord::<(), str>::to(TOPIC)
            .partition(partition)
            .payload(&payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
        ends[partition as usize] += 1;
    }
    producer
        .flush(Duration::from_secs(300))
        .map_err(|e| e.to_string())?;
    if let Some(e) = producer.context().failed.lock().unwrap().take() {
        return Err(format!("prefill: a record was not delivered: {e}"));
    }
    // Every record must be there, or a row would wait for records that never come.
    for (p, want) in ends.iter().enumerate() {
        let (low, high) = producer
            .client()
            .fetch_watermarks(TOPIC, p as i32, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        if high - low != *want {
            return Err(format!(
                "partition {p} holds {} records after the prefill, not {want}",
                high - low
            ));
        }
    }
    Ok(ends)
}

/// Creates the topic on a broker (the mock creates it itself), failing if it exists: a topic
/// left over from another run would hold more records than this one produces.
fn create_topic(bootstrap: &str) -> Res<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| e.to_string())?;
    let topic = NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1));
    let results = block_on(admin.create_topics(
        [&topic],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
    ))
    .map_err(|e| format!("creating topic {TOPIC}: {e}"))?;
    for result in results {
        result.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// Keeps the first failed delivery of the prefill.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed
                .lock()
                .unwrap()
                .get_or_insert_with(|| e.to_string());
        }
    }
}

fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    c
}

/// The limit: reads every record, commits offsets every 10,000 records and at the end.
fn raw_consumer(bootstrap: &str, ends: &[i64], group: &str) -> Res<Duration> {
    let consumer: BaseConsumer = consumer_config(bootstrap, group)
        .create()
        .map_err(|e| e.to_string())?;
    consumer.subscribe(&[TOPIC]).map_err(|e| e.to_string())?;
    let total: i64 = ends.iter().sum();
    let mut seen = 0i64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while seen < total {
        if Instant::now() > deadline {
            return Err(format!("raw: read {seen} of {total}"));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                // Touch what a handler would: payload and headers.
                std::hint::black_box((
                    m.payload().map(<[u8]>::len),
                    m.headers().map(|h| h.count()),
                ));
                seen += 1;
                if seen % 10_000 == 0 {
                    let _ = consumer.commit_consumer_state(CommitMode::Async);
                }
            }
            Some(Err(e)) => return Err(format!("raw: {e}")),
            None => {}
        }
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
}

struct Bench<'a> {
    bootstrap: &'a str,
    rt: &'a tokio::runtime::Runtime,
}

impl Bench<'_> {
    /// Runs the runtime in `group` until it settled `records` records (from the first record
    /// read to the last settled), then stops it.
    fn runtime_in<S: Store, H: Handler<S::Tx>>(
        &self,
        group: &str,
        name: &str,
        records: usize,
        store: S,
        handler: H,
        batch: usize,
    ) -> Res<Row> {
        measure(name, records, || {
            let runtime = Runtime::builder()
                .bootstrap_servers(self.bootstrap)
                .group_id(group)
                .topics([TOPIC])
                // The mock cluster keeps a group that its last member left rebalancing for the
                // session timeout before a new member may join (a real broker empties it at
                // once): short, so the replay rows do not wait 45 s for their group.
                .set("session.timeout.ms", "6000")
                .batch(batch, Duration::from_millis(20))
                .store(store)
                .build(handler)
                .map_err(|e| e.to_string())?;
            let stats = runtime.stats();
            self.rt.block_on(async {
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(runtime.run(async {
                    let _ = stopped.await;
                }));
                // On a thread of its own: the runtime's tasks may keep tokio's workers busy for
                // a while, and a watcher on them would see the first record late.
                let elapsed = tokio::task::spawn_blocking(move || watch(&stats, records))
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = stop.send(());
                task.await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                elapsed
            })
        })
    }
}

/// From the first record read until `records` are settled.
fn watch(stats: &Arc<Stats>, records: usize) -> Res<Duration> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut first: Option<Instant> = None;
    loop {
        let s = stats.snapshot();
        if s.records_read > 0 {
            first.get_or_insert_with(Instant::now);
        }
        let settled = s.applied + s.duplicates() + s.dead_lettered + s.conflicts;
        if settled as usize >= records {
            return Ok(first.map_or(Duration::ZERO, |f| f.elapsed()));
        }
        if Instant::now() > deadline {
            return Err(format!("settled {settled} of {records}: {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Does nothing.
struct Noop;

impl Handler<MemoryTx> for Noop {
    async fn handle(&self, _: &Record, _: &mut MemoryTx) -> Result<Outcome, HandlerError> {
        Ok(Outcome::none())
    }
}

/// Writes one key per record (the record's key and a slice of its payload).
struct KeyPerRecord;

impl Handler<RocksTx> for KeyPerRecord {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let key = record.header("idempotency-key").unwrap_or_default();
        let payload = record.payload().unwrap_or_default();
        tx.put(
            [b"effect/".as_slice(), key].concat(),
            &payload[..payload.len().min(32)],
        );
        Ok(Outcome::none())
    }
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

/// Stores `n` entries (keys no record of the topic uses) in one partition's batches.
async fn preload(store: &RocksStore, n: usize) -> Res<()> {
    let partition = PartitionId::new("preload", "preload", 0);
    let epoch = store
        .acquire(&partition)
        .await
        .map_err(|e| e.to_string())?
        .epoch;
    let entry = DedupEntry {
        status: EntryStatus::Completed,
        fingerprint: idempotent_consumer::Fingerprint::of(Some(b"preloaded")),
        outcome: None,
        topic: "preload".into(),
        partition: 0,
        offset: 0,
        created_at_ms: 0,
        expires_at_ms: i64::MAX,
    };
    let mut written = 0;
    while written < n {
        let mut tx = store
            .begin(&partition, epoch)
            .await
            .map_err(|e| e.to_string())?;
        for i in written..(written + 50_000).min(n) {
            let key = format!("preloaded-{i:010}");
            let key = idempotent_consumer::EntryKey::new("rocksdb-10m", &key).store_key();
            tx.put_entry(&key, &entry)
                .await
                .map_err(|e| e.to_string())?;
        }
        written = (written + 50_000).min(n);
        tx.commit(written as i64).await.map_err(|e| e.to_string())?;
    }
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

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting tokio")
        .block_on(f)
}

/// The hand-written pattern: per record, in its own transaction, SELECT the key, do the write,
/// INSERT the key, COMMIT; then commit the offset. Stops after `n` records.
fn naive(rt: &tokio::runtime::Runtime, bootstrap: &str, url: &str, n: usize) -> Res<Duration> {
    let consumer: BaseConsumer = consumer_config(bootstrap, "naive")
        .create()
        .map_err(|e| e.to_string())?;
    consumer.subscribe(&[TOPIC]).map_err(|e| e.to_string())?;
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
            let key = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "idempotency-key"))
                .and_then(|h| h.value)
                .unwrap_or_default()
                .to_vec();
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

/// The database's own limit: the same dedup rows and effect rows, inserted with UNNEST ... ON
/// CONFLICT DO NOTHING in batches of 1,000 (one transaction each), no Kafka. The dedup rows go
/// to a table of the store's own shape (its migrations, under the prefix `limit_`: the same
/// key, indexes and collation).
async fn pg_limit(url: &str, n: usize) -> Res<Duration> {
    let options = PgOptions {
        table_prefix: "limit_".into(),
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
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let upto = (i + 1000).min(n);
        let keys: Vec<Vec<u8>> = (i..upto)
            .map(|j| format!("k-{j:09}").into_bytes())
            .collect();
        let bodies: Vec<Vec<u8>> = (i..upto)
            .map(|j| {
                format!(
                    r#"{{"account":"acct-{:05}","amount":{},"memo":"{:0>76}"}}"#,
                    j % 10_000,
                    j % 997,
                    j
                )
                .into_bytes()
            })
            .collect();
        let fingerprints: Vec<Vec<u8>> = bodies
            .iter()
            .map(|b| {
                idempotent_consumer::Fingerprint::of(Some(b))
                    .as_bytes()
                    .to_vec()
            })
            .collect();
        let partitions: Vec<i32> = (i..upto)
            .map(|j| (j % PARTITIONS as usize) as i32)
            .collect();
        let offsets: Vec<i64> = (i..upto)
            .map(|j| (j / PARTITIONS as usize) as i64)
            .collect();
        let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
        sqlx::query(
            "INSERT INTO limit_dedup (consumer_group, tenant, idempotency_key, status, fingerprint, \
               topic, \"partition\", \"offset\", created_at, expires_at) \
             SELECT 'pg-limit', '', k, 'completed', f, 'bench', p, o, now(), now() + interval '7 days' \
             FROM UNNEST($1::bytea[], $2::bytea[], $3::int[], $4::bigint[]) AS t(k, f, p, o) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&keys)
        .bind(&fingerprints)
        .bind(&partitions)
        .bind(&offsets)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
        sqlx::query(
            "INSERT INTO limit_effects (key, body) SELECT * FROM UNNEST($1::bytea[], $2::bytea[])",
        )
        .bind(&keys)
        .bind(&bodies)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        i = upto;
    }
    Ok(started.elapsed())
}

/// `target/bench/throughput.csv` and a bar chart `target/bench/throughput.svg`.
fn write_outputs(rows: &[Row], raw_rate: f64) -> Res<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut csv = String::from("name,records,seconds,records_per_s,ratio_to_raw,peak_rss_mb\n");
    for r in rows {
        let _ = writeln!(
            csv,
            "{},{},{:.3},{:.0},{:.3},{:.0}",
            r.name,
            r.records,
            r.seconds,
            r.rate(),
            r.rate() / raw_rate,
            r.peak_rss_mb
        );
    }
    std::fs::write(dir.join("throughput.csv"), csv).map_err(|e| e.to_string())?;
    let (bar_h, left, width) = (26.0, 210.0, 520.0);
    let max = rows.iter().map(Row::rate).fold(1.0, f64::max);
    let height = 40.0 + bar_h * rows.len() as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">
<text x="10" y="18" font-size="14">records per second (ratio to raw)</text>
"#,
        w = left + width + 150.0
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 30.0 + bar_h * i as f64;
        let w = (r.rate() / max * width).max(1.0);
        let _ = writeln!(
            svg,
            r#"<text x="{tx}" y="{ty}" text-anchor="end">{name}</text><rect x="{left}" y="{y}" width="{w:.1}" height="{bh}" fill="{color}"/><text x="{lx:.1}" y="{ty}">{rate:.0} ({ratio:.2})</text>"#,
            tx = left - 8.0,
            ty = y + 15.0,
            name = r.name,
            bh = bar_h - 6.0,
            color = if r.name == "raw" { "#888" } else { "#3a7bd5" },
            lx = left + w + 6.0,
            rate = r.rate(),
            ratio = r.rate() / raw_rate
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(dir.join("throughput.svg"), svg).map_err(|e| e.to_string())?;
    eprintln!("throughput: wrote {}/throughput.{{csv,svg}}", dir.display());
    Ok(())
}
