//! Throughput, side by side in one run: the framework against a plain rdkafka consumer, against
//! what each database alone does with the same rows, and against the code people write by hand,
//! on the same broker and the same pre-filled topic. Absolute figures drift on a shared machine;
//! the ratios are the result.
//!
//! Rows: `raw` (a plain consumer that reads everything and commits offsets periodically; the
//! median of three passes), `framework-noop` (the runtime, no-op handler, in-memory store),
//! `rocks-limit` (the rows the rocksdb row leaves, written straight into RocksDB: `limits.rs`),
//! `peer-rocksdb` and `peer-postgres` (rdkafka with RocksDB or sqlx, written as a user would:
//! `peers.rs`), `rocksdb` (handler writes one key per record), `replay-rocksdb`, `rocksdb-1m`
//! and `rocksdb-10m` (the same with that many entries already stored), `postgres-b1`, `-b100`,
//! `-b1000` (handler inserts one row per record, at those batch sizes, deferred with
//! `PgTx::defer` to one statement per batch), `postgres-b1000-sql` (the same with the handler's
//! own INSERT per record), `replay-postgres-b1000`, `naive` (per record: SELECT the key, the
//! same insert, INSERT the key, COMMIT, commit the offset), `pg-limit-unnest` and
//! `pg-limit-copy` (the same dedup and effect rows in batches of 1,000, no Kafka), `scale-out-1`,
//! `-2`, `-3` (instances in one group on PostgreSQL, an I/O-bound handler: `scale.rs`),
//! `postgres-b1000-1m` and `-10m` (entries already stored), `raw-broker-process` and
//! `rocksdb-broker-process` (against a mock cluster in another process). Each prints
//! `BENCH name=<name> records=<n> seconds=<s> records_per_s=<r> ratio_to_raw=<x>` (plus peak
//! RSS), then the limits as `BENCH limit ...` and the targets as `BENCH ratio <name>=<x>
//! target>=<t> met|MISSED`, and writes `target/bench/throughput.csv` and
//! `target/bench/throughput.svg` (`chart.rs`).
//!
//! Run: `scripts/dev.sh bench` (starts a throwaway PostgreSQL with fsync on), or
//! `DATABASE_URL=... cargo bench --all-features --bench throughput -- [--records N]
//! [--slow-records N] [--preload N] [--pg-preload N] [--rows a,b]`. `--slow-records` (default
//! 20,000) bounds `postgres-b1` and `naive`, which commit once per record; rates are per
//! second, so the rows compare. `--preload` and `--pg-preload` (default 10,000,000) are the
//! entries of the `-10m` rows (a tenth for `-1m`). Without `DATABASE_URL` the PostgreSQL rows
//! are left out, and the output says so.
//!
//! The topic lives on librdkafka's in-process mock cluster unless `KAFKA_BOOTSTRAP_SERVERS`
//! names a broker (the topic is then created there, and must not exist). The mock keeps at most
//! 5 MB of log per partition, so on it the topic holds 100,000 records by default and at most;
//! on a broker the default is 1,000,000.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_consumer::testkit::{BrokerProcess, serve_mock_broker};
use idempotent_consumer::{
    DedupEntry, EntryStatus, Handler, HandlerError, Inspect, MemoryStore, MemoryTx, Outcome,
    PartitionId, Record, RocksStore, RocksTx, Runtime, Stats, Store, Transaction,
};
use rdkafka::mocking::MockCluster;

mod chart;
mod limits;
mod peers;
mod postgres;
mod scale;
mod topic;

use topic::{create_topic, prefill, raw_median};

/// Set in the copy of this benchmark that hosts the mock cluster of the `*-broker-process` rows.
const BROKER_HOST: &str = "THROUGHPUT_BROKER_HOST";

/// Set in the copies of this benchmark that measure one RocksDB row's memory alone.
const RSS_CHILD: &str = "THROUGHPUT_RSS_CHILD";

/// Set (to a directory) in the copy of this benchmark that only preloads a growth row's store
/// and exits.
const PRELOAD_INTO: &str = "THROUGHPUT_PRELOAD_INTO";

/// Set (to a directory PRELOAD_INTO filled) in the copy that runs a growth row on it: the store
/// opened by a process that never held the preload's heap, as a service restarted on its data.
const PRELOADED: &str = "THROUGHPUT_PRELOADED";

/// The RocksDB rows of the cost growth, by stored entries: 0, a tenth of `--preload`, all of it.
const ROCKS_GROWTH: [&str; 3] = ["rocksdb", "rocksdb-1m", "rocksdb-10m"];

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
    pg_preload: usize,
    rows: Option<Vec<String>>,
}

fn args() -> Res<Args> {
    let mut a = Args {
        records: None,
        slow_records: 20_000,
        preload: 10_000_000,
        pg_preload: 10_000_000,
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
            "--pg-preload" => a.pg_preload = number(value()?)?,
            "--rows" => a.rows = Some(value()?.split(',').map(str::to_owned).collect()),
            // cargo bench passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    Ok(a)
}

fn main() {
    if std::env::var_os(BROKER_HOST).is_some() {
        let served = serve_mock_broker(1);
        std::process::exit(i32::from(served.is_err()));
    }
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
    let raw = measure("raw", records, || raw_median(&bootstrap, &ends, "raw"))?;
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
    if wanted("rocks-limit") {
        let row = measure("rocks-limit", records, || limits::rocks_limit(records, 500))?;
        report(row, Some(raw_rate));
    }
    if wanted("peer-rocksdb") {
        let row = measure("peer-rocksdb", records, || {
            peers::peer_rocksdb(&bootstrap, records)
        })?;
        report(row, Some(raw_rate));
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
    // Cost growth: the rocksdb row on a store that already holds 1 and 10 million entries.
    for (name, entries) in [
        ("rocksdb-1m", args.preload / 10),
        ("rocksdb-10m", args.preload),
    ] {
        if !wanted(name) {
            continue;
        }
        if let Some(given) = std::env::var_os(PRELOADED) {
            let store = RocksStore::open(&given).map_err(|e| e.to_string())?;
            report(
                bench.runtime_in(name, name, records, store, KeyPerRecord, 500)?,
                Some(raw_rate),
            );
            continue;
        }
        let own_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let into = std::env::var_os(PRELOAD_INTO);
        let dir = into.as_deref().map_or(own_dir.path(), std::path::Path::new);
        let store = RocksStore::open(dir).map_err(|e| e.to_string())?;
        let t = Instant::now();
        rt.block_on(preload(&store, entries))?;
        // Entries stored, not entries being compacted: the row starts once the load settled.
        store.wait_for_compactions().map_err(|e| e.to_string())?;
        eprintln!(
            "throughput: {entries} entries preloaded and compacted in {:.1?}",
            t.elapsed()
        );
        if into.is_some() {
            return Ok(());
        }
        report(
            bench.runtime_in(name, name, records, store, KeyPerRecord, 500)?,
            Some(raw_rate),
        );
    }
    if let Some(url) = &pg_url {
        postgres::rows(&bench, &args, url, records, &wanted, &mut |row| {
            report(row, Some(raw_rate))
        })?;
    }
    if wanted("raw-broker-process") || wanted("rocksdb-broker-process") {
        // The same rows against a mock cluster in a process of its own (this benchmark started
        // again as its host): the fetch crosses a socket, as against a real broker.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut host = std::process::Command::new(exe);
        host.env(BROKER_HOST, "1");
        let mut broker = BrokerProcess::start(host)?;
        broker.command(&format!("topic {TOPIC} {PARTITIONS}"))?;
        let remote = broker.bootstrap().to_owned();
        let remote_ends = prefill(&remote, records)?;
        let raw_remote = measure("raw-broker-process", records, || {
            raw_median(&remote, &remote_ends, "raw-remote")
        })?;
        report(raw_remote, Some(raw_rate));
        if wanted("rocksdb-broker-process") {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let store = RocksStore::open(dir.path()).map_err(|e| e.to_string())?;
            let remote_bench = Bench {
                bootstrap: &remote,
                rt: &rt,
            };
            report(
                remote_bench.runtime_in(
                    "rocksdb-remote",
                    "rocksdb-broker-process",
                    records,
                    store,
                    KeyPerRecord,
                    500,
                )?,
                Some(raw_rate),
            );
        }
    }

    let by_name: BTreeMap<&str, f64> = rows.iter().map(|r| (r.name.as_str(), r.rate())).collect();
    let rss: BTreeMap<&str, f64> = rows
        .iter()
        .map(|r| (r.name.as_str(), r.peak_rss_mb))
        .collect();
    let rate = |a: &str| by_name.get(a).copied();
    let ratio = |a: &str, b: &str| Some(rate(a)? / rate(b)?);
    // The most the rocksdb row can reach: librdkafka's and RocksDB's shares of each record's
    // cost added up.
    let composite = |limit: &str| Some(1.0 / (1.0 / rate("raw")? + 1.0 / rate(limit)?));
    if let Some(c) = composite("rocks-limit") {
        println!(
            "BENCH limit rocksdb-composite records_per_s={c:.0} (1 / (1/raw + 1/rocks-limit))"
        );
    }
    let best_pg = match (rate("pg-limit-unnest"), rate("pg-limit-copy")) {
        (Some(u), Some(c)) => {
            let (method, best) = if c > u { ("copy", c) } else { ("unnest", u) };
            println!("BENCH limit pg-limit best={method} records_per_s={best:.0}");
            Some(best)
        }
        (one, other) => one.or(other),
    };
    let targets: [(&str, Option<f64>, f64); 13] = [
        (
            "scale-out-2/scale-out-1",
            ratio("scale-out-2", "scale-out-1"),
            1.6,
        ),
        (
            "scale-out-3/scale-out-1",
            ratio("scale-out-3", "scale-out-1"),
            2.4,
        ),
        (
            "rocksdb/composite-limit",
            composite("rocks-limit").and_then(|c| Some(rate("rocksdb")? / c)),
            0.85,
        ),
        ("framework-noop/raw", ratio("framework-noop", "raw"), 0.70),
        (
            "rocksdb/peer-rocksdb",
            ratio("rocksdb", "peer-rocksdb"),
            1.0,
        ),
        (
            "postgres-b1000/peer-postgres",
            ratio("postgres-b1000", "peer-postgres"),
            1.0,
        ),
        (
            "postgres-b1000/pg-limit",
            best_pg.and_then(|b| Some(rate("postgres-b1000")? / b)),
            0.90,
        ),
        (
            "postgres-b1000/naive",
            ratio("postgres-b1000", "naive"),
            20.0,
        ),
        (
            "replay-rocksdb/rocksdb",
            ratio("replay-rocksdb", "rocksdb"),
            2.0,
        ),
        (
            "replay-postgres-b1000/postgres-b1000",
            ratio("replay-postgres-b1000", "postgres-b1000"),
            2.0,
        ),
        ("rocksdb-10m/rocksdb", ratio("rocksdb-10m", "rocksdb"), 0.90),
        (
            "postgres-b1000-10m/postgres-b1000",
            ratio("postgres-b1000-10m", "postgres-b1000"),
            0.0,
        ),
        (
            "rocksdb-broker-process/raw-broker-process",
            ratio("rocksdb-broker-process", "raw-broker-process"),
            0.0,
        ),
    ];
    for (name, value, target) in targets {
        let Some(v) = value else { continue };
        if target == 0.0 {
            // Reported, no target: the ratio users see against a broker across a socket.
            println!("BENCH ratio {name}={v:.3}");
            continue;
        }
        let verdict = if v >= target { "met" } else { "MISSED" };
        println!("BENCH ratio {name}={v:.3} target>={target} {verdict}");
    }
    // At most: memory may grow with the stored entries, by half at most. Each row in a process
    // of its own, when it can be: in this one a row's figure counts whatever the rows before it
    // left resident.
    let own = if std::env::var_os(RSS_CHILD).is_none() && ROCKS_GROWTH.iter().all(|r| wanted(r)) {
        own_process_rss(&args, records)?
    } else {
        BTreeMap::new()
    };
    let peak = |name: &str| own.get(name).or_else(|| rss.get(name)).copied();
    if let (Some(full), Some(empty)) = (peak("rocksdb-10m"), peak("rocksdb")) {
        let v = full / empty;
        let verdict = if v <= 1.5 { "met" } else { "MISSED" };
        println!("BENCH ratio peak-rss rocksdb-10m/rocksdb={v:.3} target<=1.5 {verdict}");
    }
    write_outputs(&rows, raw_rate, &own)
}

/// The peak RSS of each RocksDB row of the cost growth measured alone: this benchmark started
/// again with `--rows <row>` on a mock cluster of its own, without PostgreSQL, so each figure
/// counts the same prefill and `raw` pass and then the row itself. A row with stored entries
/// runs on a directory another copy preloaded, opened fresh, as a service restarted on its
/// data: the preload's own heap (which the allocator keeps once freed) is not the row's.
fn own_process_rss(args: &Args, records: usize) -> Res<BTreeMap<String, f64>> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    let copy = |name: &str| {
        let mut c = std::process::Command::new(&exe);
        c.args(["--bench", "--rows", name])
            .args(["--records", &records.to_string()])
            .args(["--preload", &args.preload.to_string()])
            .env(RSS_CHILD, "1")
            .env_remove("DATABASE_URL")
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .stderr(std::process::Stdio::null());
        c
    };
    for name in ROCKS_GROWTH {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut run = copy(name);
        if name != "rocksdb" {
            let loaded = copy(name)
                .env(PRELOAD_INTO, dir.path())
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("starting the {name} preload: {e}"))?;
            if !loaded.success() {
                return Err(format!("the {name} preload failed ({loaded})"));
            }
            run.env(PRELOADED, dir.path());
        }
        let child = run
            .output()
            .map_err(|e| format!("starting the {name} memory run: {e}"))?;
        let stdout = String::from_utf8_lossy(&child.stdout);
        let prefix = format!("BENCH name={name} ");
        let mb = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit("peak_rss_mb=").next()?.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("the {name} memory run printed no row ({})", child.status))?;
        println!("BENCH rss name={name} own_process_peak_rss_mb={mb:.0}");
        out.insert(name.to_owned(), mb);
    }
    Ok(out)
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
            if std::env::var_os("THROUGHPUT_WINDOW").is_some() {
                // Instant's Debug is the CLOCK_MONOTONIC time on Linux: the window to keep of a
                // `perf record -k CLOCK_MONOTONIC` profile.
                eprintln!("throughput: window from {first:?} to {:?}", Instant::now());
            }
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

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting tokio")
        .block_on(f)
}

/// `target/bench/throughput.csv` and a bar chart `target/bench/throughput.svg`.
fn write_outputs(rows: &[Row], raw_rate: f64, own_rss: &BTreeMap<String, f64>) -> Res<()> {
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
    chart::write(&dir.join("throughput.svg"), rows, raw_rate, own_rss)?;
    eprintln!("throughput: wrote {}/throughput.{{csv,svg}}", dir.display());
    Ok(())
}
