//! The outbox relay against raw produce of the same records on the same broker, in one run, and
//! the end-to-end latency from a handler's publication to the downstream consumer's apply at a
//! steady load. Absolute figures drift on a shared machine; the ratios are the result.
//!
//! Rows:
//! - `produce-raw`: the records produced straight by an idempotent producer (every record in
//!   flight at once, then every acknowledgement awaited; the median of three passes), the best
//!   a relay could do. Both
//!   producers are warmed up on one record first: a new idempotent producer's first delivery
//!   waits (about 500 ms on the mock) for its producer id, which no row should pay;
//! - `relay-rocksdb-b100`, `relay-rocksdb-b1000`: the same records committed to a RocksDB
//!   outbox in one transaction, drained by a running relay reading that many rows a round: from
//!   the commit to the last row deleted after its acknowledgement;
//! - `relay-postgres-b100`, `relay-postgres-b1000`: the same on PostgreSQL (with
//!   `DATABASE_URL`; left out otherwise, and the output says so);
//! - `outbox-limit-rocksdb`, `outbox-limit-postgres`: the store's share alone, no Kafka: the
//!   same rows read and deleted a thousand at a time, as the relay does. With `produce-raw` it
//!   gives the most a relay can reach on the machine, `1 / (1/raw + 1/limit)`, printed as
//!   `BENCH limit <store> composite_ratio_to_raw=<x>`;
//! - `outbox-reads-postgres`: the floor of any relay on PostgreSQL, whatever its design: the
//!   same rows only read, a thousand at a time after a cursor, through the same client, and
//!   nothing deleted or marked. Its composite limit (`BENCH limit postgres-reads ...`) bounds
//!   every relay that reads each row once;
//! - `e2e-rocksdb`: a consumer on RocksDB whose handler publishes one event per record (the
//!   handler's clock in the payload), its relay, and a consumer downstream; records arrive at
//!   `--rate` per second (default 2,000) for `--seconds` (default 10); the latency of each event
//!   is the downstream handler's clock minus the publishing handler's, so it spans the source
//!   batch's commit, the relay and the downstream fetch: p50, p99 and max. Both consumers set
//!   `fetch.wait.max.ms=10` (the mock cluster answers an empty fetch only after the whole wait).
//!
//! Output: `BENCH name=... records=... seconds=... records_per_s=...` per row, then
//! `BENCH ratio relay-...-b.../produce-raw=<x> target>=0.7 met|MISSED` and
//! `BENCH latency e2e-rocksdb p50_ms=... p99_ms=... max_ms=...`.
//!
//! Run: `scripts/dev.sh bench-relay` (a throwaway PostgreSQL with fsync on), or
//! `cargo bench --all-features --bench relay -- [--records N] [--rate N] [--seconds N]`. The
//! broker is librdkafka's in-process mock cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idempotent_consumer::outbox::{OutboxStore, Publication, Publish, Relay, RelayConfig};
use idempotent_consumer::testkit::ThrowawayDb;
use idempotent_consumer::{
    Handler, HandlerError, Outcome, PartitionId, PgOptions, PgStore, Record, RocksOptions,
    RocksStore, RocksTx, Runtime, Store, Transaction,
};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

type Res<T> = std::result::Result<T, String>;

const PARTITIONS: i32 = 4;
const PAYLOAD: usize = 200;

struct Args {
    records: usize,
    rate: u64,
    seconds: u64,
}

impl Args {
    fn parse() -> Res<Self> {
        let mut args = Args {
            records: 100_000,
            rate: 2_000,
            seconds: 10,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = || -> Res<u64> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{a} needs a number"))
            };
            match a.as_str() {
                "--records" => args.records = value()? as usize,
                "--rate" => args.rate = value()?,
                "--seconds" => args.seconds = value()?,
                // cargo bench passes --bench
                "--bench" => {}
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(args)
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench relay: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = Args::parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mock = MockCluster::new(1).map_err(|e| e.to_string())?;
    let bootstrap = mock.bootstrap_servers();
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &bootstrap);
    let n = args.records;

    // Every topic made first: a producer's first look at a topic made a moment before finds
    // no leader yet and asks again half a second later, which no row should pay.
    let topics = [
        "raw",
        "relay-rocksdb-b100",
        "relay-rocksdb-b1000",
        "relay-postgres-b100",
        "relay-postgres-b1000",
    ];
    for t in topics {
        mock.create_topic(t, PARTITIONS, 1)
            .map_err(|e| e.to_string())?;
    }
    std::thread::sleep(Duration::from_secs(1));
    // The median of three passes: raw produce alone varies by half between runs.
    let mut passes = (0..3)
        .map(|_| rt.block_on(produce_raw(&client, "raw", n)))
        .collect::<Res<Vec<_>>>()?;
    passes.sort();
    let raw = passes[1];
    row("produce-raw", n, raw);

    let mut ratios = Vec::new();
    let mut limits = Vec::new();
    let rocks = || -> Res<(tempfile::TempDir, RocksStore)> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store = RocksStore::open_with(dir.path(), RocksOptions { sync: true })
            .map_err(|e| e.to_string())?;
        Ok((dir, store))
    };
    let (_dir, store) = rocks()?;
    let took = rt.block_on(store_alone(&store, n))?;
    row("outbox-limit-rocksdb", n, took);
    limits.push(("rocksdb", took));
    for batch in [100, 1000] {
        let topic = format!("relay-rocksdb-b{batch}");
        let (_dir, store) = rocks()?;
        let took = rt.block_on(drain(store, &topic, &client, batch, n))?;
        row(&topic, n, took);
        ratios.push((topic, raw.as_secs_f64() / took.as_secs_f64()));
    }
    match std::env::var("DATABASE_URL") {
        Ok(admin) if !admin.is_empty() => {
            let took = rt.block_on(async {
                let (db, store) = pg_store(&admin, "limit").await?;
                let took = store_alone(&store, n).await;
                drop(db);
                took
            })?;
            row("outbox-limit-postgres", n, took);
            limits.push(("postgres", took));
            let took = rt.block_on(async {
                let (db, store) = pg_store(&admin, "reads").await?;
                let took = reads_alone(&store, n).await;
                drop(db);
                took
            })?;
            row("outbox-reads-postgres", n, took);
            limits.push(("postgres-reads", took));
            for batch in [100, 1000] {
                let topic = format!("relay-postgres-b{batch}");
                let took = rt.block_on(async {
                    let (db, store) = pg_store(&admin, &batch.to_string()).await?;
                    let took = drain(store, &topic, &client, batch, n).await;
                    drop(db);
                    took
                })?;
                row(&topic, n, took);
                ratios.push((topic, raw.as_secs_f64() / took.as_secs_f64()));
            }
        }
        _ => println!("BENCH note: DATABASE_URL is not set; the PostgreSQL rows are left out"),
    }
    for (name, ratio) in &ratios {
        let verdict = if *ratio >= 0.7 { "met" } else { "MISSED" };
        println!("BENCH ratio {name}/produce-raw={ratio:.3} target>=0.7 {verdict}");
    }
    // What a relay could reach on these two cores: the producer's and the store's costs
    // per row added up.
    for (store, alone) in &limits {
        let composite = 1.0 / (raw.as_secs_f64() + alone.as_secs_f64());
        println!(
            "BENCH limit {store} composite_ratio_to_raw={:.3} (1 / (1/raw + 1/that row))",
            composite * raw.as_secs_f64()
        );
    }
    rt.block_on(end_to_end(&mock, &bootstrap, &args))
}

/// A database of its own on the server of `admin` (dropped with the first value) and a store
/// on it.
async fn pg_store(admin: &str, suffix: &str) -> Res<(ThrowawayDb, PgStore)> {
    let name = format!("bench_outbox_{}_{suffix}", std::process::id());
    let db = ThrowawayDb::create(admin, &name, "")
        .await
        .map_err(|e| e.to_string())?;
    let store = PgStore::connect_with(db.url(), PgOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok((db, store))
}

fn row(name: &str, records: usize, took: Duration) {
    println!(
        "BENCH name={name} records={records} seconds={:.3} records_per_s={:.0}",
        took.as_secs_f64(),
        records as f64 / took.as_secs_f64()
    );
}

fn payload(i: usize) -> Vec<u8> {
    let mut p = format!("{i:08}:").into_bytes();
    p.resize(PAYLOAD, b'x');
    p
}

fn key(i: usize) -> String {
    format!("entity-{}", i % 1000)
}

/// Produces `n` records straight, all in flight, and waits for every acknowledgement.
/// The producer is made and warmed up before the clock starts, as the relay's is.
async fn produce_raw(client: &ClientConfig, topic: &str, n: usize) -> Res<Duration> {
    let producer: FutureProducer = client
        .clone()
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .create()
        .map_err(|e| e.to_string())?;
    // Warmed up on one record, as the relay is.
    producer
        .send(
            FutureRecord::<str, str>::to(topic)
                .key("warm-up")
                .payload("warm-up"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e.to_string())?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        let (k, p) = (key(i), payload(i));
        let mut record = FutureRecord::to(topic).key(&k).payload(&p);
        loop {
            match producer.send_result(record) {
                Ok(d) => break deliveries.push(d),
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    for d in deliveries {
        d.await
            .map_err(|_| "a delivery was cancelled".to_owned())?
            .map_err(|(e, _)| e.to_string())?;
    }
    let took = started.elapsed();
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok(took)
}

/// Commits publications `from..to` to `store`'s outbox in one transaction.
async fn fill<S>(store: &S, topic: &str, from: usize, to: usize) -> Res<()>
where
    S: Store<Tx: Publish>,
{
    let partition = PartitionId::new("bench", "source", 0);
    let epoch = store
        .acquire(&partition)
        .await
        .map_err(|e| e.to_string())?
        .epoch;
    let mut tx = store
        .begin(&partition, epoch)
        .await
        .map_err(|e| e.to_string())?;
    for i in from..to {
        let source = Record::new("source", 0, i as i64, None, None);
        tx.begin_record(format!("source-{i}").as_bytes(), &source);
        tx.publish(Publication::new(topic).key(key(i)).payload(payload(i)))
            .map_err(|e| e.to_string())?;
    }
    tx.commit(to as i64).await.map_err(|e| e.to_string())
}

/// The store's share of relaying, no Kafka: `n` committed rows read and deleted a thousand
/// at a time, as the relay does, under a lease.
async fn store_alone<S>(store: &S, n: usize) -> Res<Duration>
where
    S: OutboxStore + Store<Tx: Publish>,
{
    fill(store, "limit", 0, n).await?;
    let e = |e: idempotent_consumer::Error| e.to_string();
    let lease = store
        .lease_outbox("limit", Duration::from_secs(600))
        .await
        .map_err(e)?
        .ok_or("the outbox's lease is held")?;
    let started = Instant::now();
    let mut cursor = None;
    let mut deleted = 0;
    loop {
        let rows = store.pending_rows(cursor, 1000).await.map_err(e)?;
        let Some(last) = rows.last() else { break };
        cursor = Some(last.id);
        let ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
        store.mark_sent(&lease, &ids).await.map_err(e)?;
        deleted += ids.len();
    }
    let took = started.elapsed();
    store.release_outbox(&lease).await.map_err(e)?;
    if deleted != n {
        return Err(format!("read and deleted {deleted} of {n} rows"));
    }
    Ok(took)
}

/// The rows only read, a thousand at a time after a cursor, and nothing deleted: what every
/// relay must do at least, so its composite limit bounds any relay design on the store.
async fn reads_alone<S>(store: &S, n: usize) -> Res<Duration>
where
    S: OutboxStore + Store<Tx: Publish>,
{
    fill(store, "reads", 0, n).await?;
    let started = Instant::now();
    let (mut cursor, mut read) = (None, 0);
    loop {
        let rows = store
            .pending_rows(cursor, 1000)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = rows.last() else { break };
        cursor = Some(last.id);
        read += rows.len();
    }
    let took = started.elapsed();
    if read != n {
        return Err(format!("read {read} of {n} rows"));
    }
    Ok(took)
}

/// A relay reading `batch` rows a round, warmed up on one row (a new idempotent producer's
/// first delivery waits for its producer id), then given `n` rows committed at once: the time
/// from that commit to the last of them deleted after its acknowledgement.
async fn drain<S>(
    store: S,
    topic: &str,
    client: &ClientConfig,
    batch: usize,
    n: usize,
) -> Res<Duration>
where
    S: OutboxStore + Store<Tx: Publish>,
{
    let mut config = RelayConfig::default();
    config.batch_size = batch;
    config.poll_interval = Duration::from_millis(5);
    let relay = Relay::new(store.clone(), client, config).map_err(|e| e.to_string())?;
    let stats = relay.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    let wait = async |count: usize| -> Res<()> {
        let started = Instant::now();
        while (stats.relayed() as usize) < count {
            if started.elapsed() > Duration::from_secs(600) {
                return Err(format!("relayed {} of {count} in 600 s", stats.relayed()));
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        Ok(())
    };
    fill(&store, topic, 0, 1).await?;
    wait(1).await?;
    fill(&store, topic, 1, n + 1).await?;
    let started = Instant::now();
    wait(n + 1).await?;
    let took = started.elapsed();
    let _ = stop.send(());
    task.await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(took)
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Publishes each record to `out` with the handler's clock in the payload.
struct Forward {
    out: String,
}

impl Handler<RocksTx> for Forward {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let key = record.key().unwrap_or_default().to_vec();
        tx.publish(
            Publication::new(&self.out)
                .key(key)
                .payload(now_us().to_string()),
        )?;
        Ok(Outcome::none())
    }
}

/// Records, per event (by partition and offset: a record handled again counts once), the time
/// from its publication to its apply here.
struct Measure {
    latencies_us: Arc<Mutex<HashMap<(i32, i64), i64>>>,
}

impl Handler<RocksTx> for Measure {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let published: i64 = String::from_utf8_lossy(record.payload().unwrap_or_default())
            .parse()
            .map_err(HandlerError::permanent)?;
        tx.put(
            format!("seen/{}/{}", record.partition(), record.offset()),
            "1",
        );
        self.latencies_us
            .lock()
            .unwrap()
            .insert((record.partition(), record.offset()), now_us() - published);
        Ok(Outcome::none())
    }
}

/// The chain at a steady rate: source topic → consumer with relay → events → consumer.
async fn end_to_end(
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    bootstrap: &str,
    args: &Args,
) -> Res<()> {
    let (source, events) = ("e2e-source", "e2e-events");
    for t in [source, events] {
        mock.create_topic(t, PARTITIONS, 1)
            .map_err(|e| e.to_string())?;
    }
    let dirs = [tempfile::tempdir(), tempfile::tempdir()];
    let [Ok(a), Ok(b)] = &dirs else {
        return Err("making temporary directories".into());
    };
    let open = |d: &tempfile::TempDir| RocksStore::open(d.path()).map_err(|e| e.to_string());
    let builder = |group: &str, topic: &str| {
        Runtime::builder()
            .bootstrap_servers(bootstrap)
            .group_id(group)
            .topics([topic])
            .set("session.timeout.ms", "6000")
            // The mock cluster answers a fetch that found nothing only after the whole wait,
            // whatever arrives meanwhile: a short wait, as a latency-minded consumer sets it.
            .set("fetch.wait.max.ms", "10")
            .batch(500, Duration::from_millis(5))
    };
    let mut relay = RelayConfig::default();
    relay.poll_interval = Duration::from_millis(5);
    let upstream = builder("e2e-up", source)
        .store(open(a)?)
        .relay(relay)
        .build(Forward { out: events.into() })
        .map_err(|e| e.to_string())?;
    let latencies = Arc::new(Mutex::new(HashMap::new()));
    let downstream = builder("e2e-down", events)
        .store(open(b)?)
        .build(Measure {
            latencies_us: latencies.clone(),
        })
        .map_err(|e| e.to_string())?;
    let (up_stop, up_stopped) = tokio::sync::oneshot::channel::<()>();
    let (down_stop, down_stopped) = tokio::sync::oneshot::channel::<()>();
    let up_progress = upstream.progress();
    let down_progress = downstream.progress();
    let up = tokio::spawn(upstream.run(async {
        let _ = up_stopped.await;
    }));
    let down = tokio::spawn(downstream.run(async {
        let _ = down_stopped.await;
    }));
    // Both groups joined (the mock delays a group's first rebalance).
    for p in [&up_progress, &down_progress] {
        let started = Instant::now();
        while p.partitions().await.map_or(0, |v| v.len()) < PARTITIONS as usize {
            if started.elapsed() > Duration::from_secs(60) {
                return Err("the consumers were not assigned in 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "0")
        .create()
        .map_err(|e| e.to_string())?;
    let total = (args.rate * args.seconds) as usize;
    let started = Instant::now();
    let every = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut deliveries = Vec::with_capacity(total);
    for i in 0..total {
        let due = started + every * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let k = key(i);
        let id = i.to_string();
        let record = FutureRecord::to(source).key(&k).payload(&id).headers(
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "idempotency-key",
                value: Some(&id),
            }),
        );
        deliveries.push(
            producer
                .send_result(record)
                .map_err(|(e, _)| e.to_string())?,
        );
    }
    for d in deliveries {
        let _ = d.await;
    }
    let waited = Instant::now();
    while latencies.lock().unwrap().len() < total {
        if waited.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "{} of {total} events applied downstream in 120 s",
                latencies.lock().unwrap().len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = up_stop.send(());
    let _ = down_stop.send(());
    up.await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    down.await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut l: Vec<i64> = latencies.lock().unwrap().values().copied().collect();
    l.sort_unstable();
    let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "BENCH latency e2e-rocksdb events={} rate={}/s p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        l.len(),
        args.rate,
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
