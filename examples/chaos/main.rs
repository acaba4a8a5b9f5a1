//! Process-level fault harness: consumers killed with SIGKILL, frozen past their session,
//! rebalanced at random, while the broker and PostgreSQL fail under them. Every invariant is then
//! read back from the real stores.
//!
//! One binary, three roles (it starts copies of itself):
//! - `broker`: hosts librdkafka's mock cluster (3 brokers) in its own process, prints its
//!   bootstrap address and takes fault commands on stdin, so it outlives every consumer kill
//!   (`testkit::serve_mock_broker`; the harness drives it through `testkit::BrokerProcess`);
//! - `consumer`: the consumer under test, an ordinary runtime on RocksDB or PostgreSQL whose
//!   handler journals account transfers in the batch's transaction;
//! - `run` (the default): the harness. For each scenario and store it produces a workload of
//!   transfers (about 20% re-send an earlier key at a new offset, a few re-send a key with
//!   another amount), drives the consumers, then checks the stores: every distinct key applied
//!   exactly once with its original amount, every conflicting record dead-lettered, every
//!   partition's position at its end, the ledger equal to the expected one, and (rebalance
//!   storm) fenced zombie commits > 0, (two stores) refused stale partitions > 0. It ends each
//!   scenario with a line
//!   `CHAOS scenario=.. store=.. records=.. kills=.. rebalances=.. fenced=.. refused=.. applied=.. duplicates=.. conflicts=.. lost=.. doubled=..`
//!   (the kill storm's has no rebalances, fenced or refused) and exits non-zero if any
//!   invariant broke.
//!
//! Scenarios: `kill-storm` (both stores; the test kit's `Scenario::KillStorm`, see `storm.rs`:
//! the kit starts this binary again as its consumer, which `main` sends straight to the kit),
//! `rebalance-storm` (PostgreSQL: three instances started,
//! stopped, killed; one frozen with SIGSTOP past the session timeout and resumed after its
//! partitions moved), `faults` (both stores: request errors on fetch, offset commit and produce,
//! a broker down and up, and PostgreSQL restarted mid-run), `two-stores` (RocksDB: two
//! instances of one group, each on a directory of its own, keys always on one partition; one
//! instance at a time is killed and left down past its session, so the other is given its
//! partitions and must refuse them as stale, then started again), `chain` (both stores: HTTP
//! → outbox → Kafka → consumer; an HTTP service whose handler records a payment and publishes
//! its event, its relay, a second relay on PostgreSQL, and a ledger downstream, each killed at
//! random while a client retries and resends payments; see `chain.rs`, which prints
//! `CHAOS scenario=chain store=.. payments=.. accepted=.. kills=.. relayed=.. duplicates=.. lost=.. doubled=..`),
//! `shadows` (both stores: device reports out of order across partitions, resent and
//! conflicting, decided by a resolver while its consumer is killed at random; every report not
//! applied must have exactly one resolution record; see `shadows.rs`).
//!
//! Run: `cargo run --all-features --example chaos -- run` with `DATABASE_URL` set (a server where
//! databases may be created) and `CHAOS_PG_RESTART` set to a shell command that restarts that
//! server (or `none` to leave the restart fault out, which the output then says). Knobs, as
//! flags or environment variables: `--records N` (`CHAOS_RECORDS`, default 50000), `--kills N`
//! (`CHAOS_KILLS`, default 20; also the chain's rounds), `--chain-payments N`
//! (`CHAOS_CHAIN_PAYMENTS`, default records / 25), `--scenarios a,b` (`CHAOS_SCENARIOS`), `--stores a,b`
//! (`CHAOS_STORES`), `--seed N` (`CHAOS_SEED`). `scripts/dev.sh test` runs the CI-sized version.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotent_consumer::{
    DeadLetter, DeadLetterReason, Handler, HandlerError, Inspect, Outcome, PartitionId, PgOptions,
    PgStore, PgTx, Record, RocksStore, RocksTx, Runtime, StalePartitionPolicy,
};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use idempotent_consumer::testkit::{
    BrokerProcess, ConsumerProcess, ThrowawayDb, serve_mock_broker, serve_reporting,
};

mod chain;
mod shadows;
mod storm;

const PARTITIONS: i32 = 4;
const ACCOUNTS: u64 = 200;
/// The consumers' session timeout; a frozen instance is held well past it.
const SESSION_MS: u64 = 3_000;

type Res<T> = std::result::Result<T, String>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str).unwrap_or("run");
    if idempotent_consumer::testkit::harness::is_consumer_process() {
        // A kill storm's consumer: this binary started again by the test kit.
        let flags = Flags::parse(args.get(1..).unwrap_or_default());
        let served = (|| {
            let (records, kills) = (flags.num("records", 50_000)?, flags.num("kills", 20)?);
            storm::serve(records, kills, flags.num("seed", 7)?)
        })();
        if let Err(e) = served {
            eprintln!("chaos consumer: {e}");
        }
        std::process::exit(1);
    }
    let result = match role {
        "broker" => serve_mock_broker(3),
        "consumer" => consumer(&Flags::parse(&args[1..])),
        "service" => chain::service(&Flags::parse(&args[1..])),
        "relay" => chain::relay(&Flags::parse(&args[1..])),
        "ledger" => chain::ledger(&Flags::parse(&args[1..])),
        "shadow" => shadows::shadow(&Flags::parse(&args[1..])),
        "run" => run(&Flags::parse(args.get(1..).unwrap_or_default())),
        other => Err(format!(
            "unknown role {other:?}: use run, broker, consumer, service, relay, ledger or shadow"
        )),
    };
    if let Err(e) = result {
        eprintln!("chaos {role}: {e}");
        std::process::exit(1);
    }
}

/// `--name value` flags, falling back to `CHAOS_<NAME>` environment variables.
struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> Self {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                map.insert(name.to_owned(), it.next().cloned().unwrap_or_default());
            }
        }
        Flags(map)
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned().or_else(|| {
            std::env::var(format!("CHAOS_{}", name.to_uppercase().replace('-', "_"))).ok()
        })
    }

    fn need(&self, name: &str) -> Res<String> {
        self.get(name)
            .ok_or_else(|| format!("--{name} is required"))
    }

    fn num(&self, name: &str, default: u64) -> Res<u64> {
        self.get(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("--{name} must be a number, got {v:?}"))
        })
    }

    fn list(&self, name: &str, default: &[&str]) -> Vec<String> {
        self.get(name).map_or_else(
            || default.iter().map(|s| (*s).to_owned()).collect(),
            |v| v.split(',').map(str::to_owned).collect(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The workload and the handler.

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Transfer {
    from: String,
    to: String,
    amount: i64,
}

/// A small deterministic generator: the same seed gives the same workload.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below.max(1)
    }
}

/// Journals each transfer under its key in the batch's transaction. A double application
/// shows as a second journal row (PostgreSQL) or a count of 2 (RocksDB). `delay` slows every
/// call down (the instance the rebalance storm freezes has work in flight when it stops).
struct Journal {
    delay: Duration,
}

trait JournalTx: Send {
    fn journal(
        &mut self,
        key: &str,
        t: &Transfer,
    ) -> impl std::future::Future<Output = Result<(), HandlerError>> + Send;
}

impl JournalTx for RocksTx {
    async fn journal(&mut self, key: &str, t: &Transfer) -> Result<(), HandlerError> {
        let count_key = format!("count/{key}");
        let n = match self.get(&count_key).map_err(HandlerError::retryable)? {
            Some(b) => String::from_utf8_lossy(&b).parse::<u64>().unwrap_or(0),
            None => 0,
        };
        self.put(&count_key, (n + 1).to_string());
        let body = serde_json::to_vec(t).map_err(HandlerError::permanent)?;
        self.put(format!("xfer/{key}"), body);
        Ok(())
    }
}

impl JournalTx for PgTx {
    async fn journal(&mut self, key: &str, t: &Transfer) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO chaos_journal (key, src, dst, amount) VALUES ($1, $2, $3, $4)")
            .bind(key)
            .bind(&t.from)
            .bind(&t.to)
            .bind(t.amount)
            .execute(self.conn())
            .await
            .map(|_| ())
            .map_err(HandlerError::retryable)
    }
}

impl<T: JournalTx + idempotent_consumer::Transaction> Handler<T> for Journal {
    async fn handle(&self, record: &Record, tx: &mut T) -> Result<Outcome, HandlerError> {
        let t: Transfer = record.json()?;
        let key = record
            .header("idempotency-key")
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .ok_or_else(|| HandlerError::permanent("no idempotency key"))?;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        tx.journal(&key, &t).await?;
        Ok(Outcome::none())
    }
}

// ---------------------------------------------------------------------------------------------
// The consumer process.

fn consumer(flags: &Flags) -> Res<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let Role {
        group,
        topic,
        until,
        rt,
        builder,
    } = Role::new(flags)?;
    let delay = Duration::from_micros(flags.num("handler-delay-us", 0)?);
    // Static membership: a restarted instance takes its slot back at once instead of waiting
    // for the killed one's session to expire (Kubernetes-style deployments do the same).
    let builder = match flags.get("instance") {
        Some(id) => builder.set("group.instance.id", id),
        None => builder,
    };
    let builder = match flags.get("on-stale").as_deref() {
        None | Some("stop") => builder,
        Some("pause") => builder.on_stale_partition(StalePartitionPolicy::Pause),
        Some(other) => return Err(format!("bad --on-stale {other:?} (stop or pause)")),
    };
    let caught_up = |positions: Vec<Option<i64>>| {
        positions
            .iter()
            .zip(&until)
            .all(|(p, end)| p.unwrap_or(0) >= *end)
    };
    let pids: Vec<PartitionId> = (0..until.len() as i32)
        .map(|p| PartitionId::new(&group, &topic, p))
        .collect();
    match flags.need("store")?.as_str() {
        "rocksdb" => {
            let store = RocksStore::open(flags.need("path")?).map_err(|e| e.to_string())?;
            let runtime = builder
                .store(store.clone())
                .build(Journal { delay })
                .map_err(|e| e.to_string())?;
            let done = move || {
                let (store, pids) = (store.clone(), pids.clone());
                async move { caught_up(next_offsets(&store, &pids).await) }
            };
            rt.block_on(serve_reporting(runtime, done))
                .map_err(|e| e.to_string())
        }
        "postgres" => rt.block_on(async {
            let options = PgOptions {
                max_connections: 8,
                // A frozen instance's open transaction is ended soon, so the new owner of its
                // partitions does not wait long on the keys it claimed.
                idle_in_transaction_timeout: Some(Duration::from_secs(3)),
                ..PgOptions::default()
            };
            let store = PgStore::connect_with(&flags.need("path")?, options)
                .await
                .map_err(|e| e.to_string())?;
            let runtime = builder
                .store(store.clone())
                .build(Journal { delay })
                .map_err(|e| e.to_string())?;
            let done = move || {
                let (store, pids) = (store.clone(), pids.clone());
                async move { caught_up(next_offsets(&store, &pids).await) }
            };
            serve_reporting(runtime, done)
                .await
                .map_err(|e| e.to_string())
        }),
        other => Err(format!("unknown store {other:?}")),
    }
}

/// What every consumer role starts from: its group, topic and `--until`, a tokio runtime, and
/// a builder with the harness's timings.
struct Role {
    group: String,
    topic: String,
    until: Vec<i64>,
    rt: tokio::runtime::Runtime,
    builder: idempotent_consumer::RuntimeBuilder,
}

impl Role {
    fn new(flags: &Flags) -> Res<Role> {
        let bootstrap = flags.need("bootstrap")?;
        let group = flags.need("group")?;
        let topic = flags.need("topic")?;
        let until: Vec<i64> = flags
            .need("until")?
            .split(',')
            .map(|v| v.parse().map_err(|_| format!("bad --until {v:?}")))
            .collect::<Res<_>>()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let builder = Runtime::builder()
            .bootstrap_servers(bootstrap)
            .group_id(&group)
            .topics([topic.as_str()])
            .set("session.timeout.ms", SESSION_MS.to_string())
            .set("heartbeat.interval.ms", "300")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .set("message.timeout.ms", "20000")
            .batch(200, Duration::from_millis(20));
        Ok(Role {
            group,
            topic,
            until,
            rt,
            builder,
        })
    }
}

/// The stored next offsets of `pids` (`None` where unknown, or unreadable for now).
async fn next_offsets<S: Inspect>(store: &S, pids: &[PartitionId]) -> Vec<Option<i64>> {
    let mut offsets = Vec::with_capacity(pids.len());
    for p in pids {
        let stored = store.position(p).await.ok().flatten();
        offsets.push(stored.and_then(|s| s.next_offset));
    }
    offsets
}

/// The stored next offsets and dead letters of `pids`.
async fn positions_and_letters<S: Inspect>(
    store: &S,
    pids: &[PartitionId],
) -> Res<(Vec<Option<i64>>, Vec<DeadLetter>)> {
    let (mut positions, mut dead_letters) = (Vec::new(), Vec::new());
    for p in pids {
        dead_letters.extend(store.dead_letters(p).await.map_err(|e| e.to_string())?);
        let stored = store.position(p).await.map_err(|e| e.to_string())?;
        positions.push(stored.and_then(|s| s.next_offset));
    }
    Ok((positions, dead_letters))
}

/// Starts a consumer in `slot` of the group (its static member id).
fn start_instance(spec: &ConsumerSpec, slot: usize) -> Res<ConsumerProcess> {
    let mut command = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    command
        .arg("consumer")
        .args(["--store", &spec.store, "--path", &spec.path])
        .args(["--bootstrap", &spec.bootstrap, "--group", &spec.group])
        .args(["--topic", &spec.topic, "--until", &spec.until])
        .args(["--instance", &format!("{}-{slot}", spec.group)])
        .args([
            "--handler-delay-us",
            &if slot == 0 { spec.slot0_delay_us } else { 0 }.to_string(),
        ]);
    if let Some(policy) = &spec.on_stale {
        command.args(["--on-stale", policy]);
    }
    ConsumerProcess::start(command)
}

/// Waits (up to 300 s) for a consumer to reach the end of every partition and stop by itself,
/// then adds its last counters. Returns whether it did; an error exit counts as a restart.
fn run_out(mut instance: ConsumerProcess, tally: &mut Tally) -> Res<bool> {
    let status = instance
        .wait(Duration::from_secs(300))?
        .ok_or("a consumer did not catch up in 300 s")?;
    tally.add_fenced(&instance.settled_stats());
    if !status.success() {
        eprintln!("chaos: a consumer exited with {status}");
        tally.restarts += 1;
    }
    Ok(status.success())
}

#[derive(Clone)]
struct ConsumerSpec {
    store: String,
    path: String,
    bootstrap: String,
    group: String,
    topic: String,
    until: String,
    /// Handler delay of the instance in slot 0, in microseconds (0: none).
    slot0_delay_us: u64,
    /// `--on-stale` of the consumers (default: the runtime's, stop).
    on_stale: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// A scenario's records, planned up front, and what they expect.
struct Plan {
    /// (partition, idempotency key, transfer), in production order.
    planned: Vec<(i32, String, Transfer)>,
    /// key -> the first transfer sent under it.
    originals: BTreeMap<String, Transfer>,
    /// (partition, offset) of records that re-sent a key with another amount.
    conflicts: HashSet<(i32, i64)>,
    /// Each partition's end offset once everything is produced.
    ends: Vec<i64>,
}

impl Plan {
    /// Plans `n` records: about 20% repeat an earlier key (same transfer) at a new offset,
    /// about 1 in 500 re-sends an earlier key with another amount. `keyed`: every record of a
    /// key on the key's first partition (as a producer partitioning by key does), for stores
    /// that each see only their own partitions.
    fn new(n: u64, seed: u64, keyed: bool) -> Plan {
        let mut rng = Lcg(seed);
        let mut order: Vec<String> = Vec::new();
        let mut originals: BTreeMap<String, Transfer> = BTreeMap::new();
        let mut first_partition: HashMap<String, i32> = HashMap::new();
        let mut conflicts = HashSet::new();
        let mut ends = vec![0i64; PARTITIONS as usize];
        let mut planned = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let roll = rng.next(1000);
            let mut partition = rng.next(PARTITIONS as u64) as i32;
            let (key, transfer) = if !order.is_empty() && roll < 2 {
                // On the original's partition: across partitions "first" is whichever is
                // processed first, and the original could be the one found conflicting.
                let key = order[rng.next(order.len() as u64) as usize].clone();
                partition = first_partition[&key];
                let mut t: Transfer = originals[&key].clone();
                t.amount += 1 + rng.next(50) as i64;
                conflicts.insert((partition, ends[partition as usize]));
                (key, t)
            } else if !order.is_empty() && roll < 200 {
                let key = order[rng.next(order.len() as u64) as usize].clone();
                if keyed {
                    partition = first_partition[&key];
                }
                let t = originals[&key].clone();
                (key, t)
            } else {
                let key = format!("t-{}", order.len());
                let from = rng.next(ACCOUNTS);
                let to = (from + 1 + rng.next(ACCOUNTS - 1)) % ACCOUNTS;
                let t = Transfer {
                    from: format!("a{from}"),
                    to: format!("a{to}"),
                    amount: 1 + rng.next(1_000) as i64,
                };
                originals.insert(key.clone(), t.clone());
                first_partition.insert(key.clone(), partition);
                order.push(key.clone());
                (key, t)
            };
            ends[partition as usize] += 1;
            planned.push((partition, key, transfer));
        }
        Plan {
            planned,
            originals,
            conflicts,
            ends,
        }
    }
}

/// One scenario's records, planned up front and produced in chunks, and what they expect.
struct Workload {
    topic: String,
    producer: BaseProducer,
    /// (partition, idempotency key, transfer), in production order.
    planned: Vec<(i32, String, Transfer)>,
    /// How many of `planned` were produced.
    produced: usize,
    /// key -> the first transfer sent under it.
    originals: BTreeMap<String, Transfer>,
    /// (partition, offset) of records that re-sent a key with another amount.
    conflicts: HashSet<(i32, i64)>,
    /// Each partition's end offset once everything is produced.
    ends: Vec<i64>,
}

impl Workload {
    /// [`Plan::new`]'s records, to be produced to `topic`.
    fn new(bootstrap: &str, topic: &str, n: u64, seed: u64, keyed: bool) -> Res<Self> {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create()
            .map_err(|e| format!("creating the producer: {e}"))?;
        let Plan {
            planned,
            originals,
            conflicts,
            ends,
        } = Plan::new(n, seed, keyed);
        Ok(Workload {
            topic: topic.to_owned(),
            producer,
            planned,
            produced: 0,
            originals,
            conflicts,
            ends,
        })
    }

    /// Produces the next `n` planned records (fewer at the end) and waits for every ack.
    fn produce(&mut self, n: u64) -> Res<()> {
        let upto = (self.produced + n as usize).min(self.planned.len());
        for (partition, key, transfer) in &self.planned[self.produced..upto] {
            let payload = serde_json::to_vec(transfer).map_err(|e| e.to_string())?;
            let headers = OwnedHeaders::new().insert(Header {
                key: "idempotency-key",
                value: Some(key.as_bytes()),
            });
            let mut record = BaseRecord::<(), [u8]>::to(&self.topic)
                .partition(*partition)
                .payload(&payload)
                .headers(headers);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(format!("producing: {e}")),
                }
            }
            self.producer.poll(Duration::ZERO);
        }
        self.produced = upto;
        self.producer
            .flush(Duration::from_secs(60))
            .map_err(|e| format!("flushing the producer: {e}"))
    }

    /// Records planned but not produced yet.
    fn rest(&self) -> u64 {
        (self.planned.len() - self.produced) as u64
    }

    /// Every partition's end offset, as the consumers' `--until`.
    fn until(&self) -> String {
        self.ends
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What the stores say after a scenario.
struct Effects {
    /// key -> (times applied, the transfer applied)
    applied: HashMap<String, (u64, Transfer)>,
    dead_letters: Vec<DeadLetter>,
    positions: Vec<Option<i64>>,
}

impl Effects {
    /// Adds what another store holds (two stores, each with its own partitions): a key
    /// applied in both counts twice.
    fn merge(&mut self, other: Effects) {
        for (key, (n, t)) in other.applied {
            self.applied.entry(key).or_insert((0, t)).0 += n;
        }
        self.dead_letters.extend(other.dead_letters);
        for (mine, theirs) in self.positions.iter_mut().zip(other.positions) {
            *mine = (*mine).max(theirs);
        }
    }
}

#[derive(Default)]
struct Tally {
    kills: u64,
    rebalances: u64,
    fenced: u64,
    /// Partition assignments refused as stale.
    refused: u64,
    /// Consumers that stopped with an error and were started again.
    restarts: u64,
    /// Batches the consumers tried again after a transient store failure.
    store_retries: u64,
}

impl Tally {
    /// Adds the last counters an ended consumer printed.
    fn add_fenced(&mut self, last: &BTreeMap<String, u64>) {
        self.fenced += last.get("fenced").copied().unwrap_or(0);
        self.refused += last.get("refused").copied().unwrap_or(0);
        self.store_retries += last.get("store_retries").copied().unwrap_or(0);
    }
}

/// A store for one scenario: a RocksDB directory or a PostgreSQL database.
struct StoreUnderTest {
    kind: String,
    path: String,
    /// What holds the store, removed when the scenario ends.
    _dir: Option<tempfile::TempDir>,
    _db: Option<ThrowawayDb>,
}

impl StoreUnderTest {
    fn create(kind: &str) -> Res<Self> {
        match kind {
            "rocksdb" => {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                Ok(StoreUnderTest {
                    kind: kind.into(),
                    path: dir.path().display().to_string(),
                    _dir: Some(dir),
                    _db: None,
                })
            }
            "postgres" => {
                let admin_url = std::env::var("DATABASE_URL").map_err(|_| {
                    "DATABASE_URL is not set: the PostgreSQL scenarios need a server where \
                     databases may be created (scripts/dev.sh test starts one)"
                        .to_owned()
                })?;
                let database = format!("chaos_{}_{}", std::process::id(), unique_suffix());
                let db = block_on(ThrowawayDb::create(
                    &admin_url,
                    &database,
                    "CREATE TABLE chaos_journal (key text NOT NULL, src text NOT NULL, \
                     dst text NOT NULL, amount bigint NOT NULL)",
                ))
                .map_err(|e| format!("creating the scenario database: {e}"))?;
                Ok(StoreUnderTest {
                    kind: kind.into(),
                    path: db.url().to_owned(),
                    _dir: None,
                    _db: Some(db),
                })
            }
            other => Err(format!("unknown store {other:?}")),
        }
    }

    fn read(&self, group: &str, topic: &str) -> Res<Effects> {
        let pids: Vec<PartitionId> = (0..PARTITIONS)
            .map(|p| PartitionId::new(group, topic, p))
            .collect();
        if self.kind == "rocksdb" {
            let store = RocksStore::open(&self.path).map_err(|e| e.to_string())?;
            let applied = storm::rocks_journal(&store)?;
            let (positions, dead_letters) = block_on(positions_and_letters(&store, &pids))?;
            return Ok(Effects {
                applied,
                dead_letters,
                positions,
            });
        }
        block_on(async {
            let store = PgStore::connect_with(&self.path, PgOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            let applied = storm::pg_journal(&store).await?;
            let (positions, dead_letters) = positions_and_letters(&store, &pids).await?;
            store.pool().close().await;
            Ok(Effects {
                applied,
                dead_letters,
                positions,
            })
        })
    }
}

fn unique_suffix() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting tokio")
        .block_on(f)
}

struct Harness {
    broker: Mutex<BrokerProcess>,
    /// The broker's bootstrap servers (a new broker's after a restart).
    bootstrap: Mutex<String>,
    records: u64,
    kills: u64,
    seed: u64,
    pg_restart: Option<String>,
    /// Payments the chain scenario's client makes.
    chain_payments: u64,
}

fn run(flags: &Flags) -> Res<()> {
    let records = flags.num("records", 50_000)?;
    let kills = flags.num("kills", 20)?;
    let seed = flags.num("seed", 7)?;
    let chain_payments = flags.num("chain-payments", (records / 25).max(100))?;
    let scenarios = flags.list(
        "scenarios",
        &[
            "kill-storm",
            "rebalance-storm",
            "faults",
            "two-stores",
            "chain",
            "shadows",
        ],
    );
    let stores = flags.list("stores", &["rocksdb", "postgres"]);
    let pg_restart = match std::env::var("CHAOS_PG_RESTART") {
        Ok(cmd) if cmd == "none" => None,
        Ok(cmd) => Some(cmd),
        Err(_)
            if stores.iter().any(|s| s == "postgres")
                && scenarios.iter().any(|s| s == "faults") =>
        {
            return Err(
                "CHAOS_PG_RESTART is not set: give a shell command that restarts the \
                        server of DATABASE_URL (scripts/dev.sh test sets it), or `none` to leave \
                        the restart fault out"
                    .into(),
            );
        }
        Err(_) => None,
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut host = Command::new(exe);
    host.arg("broker");
    let broker = BrokerProcess::start(host)?;
    let harness = Harness {
        bootstrap: Mutex::new(broker.bootstrap().to_owned()),
        broker: Mutex::new(broker),
        records,
        kills,
        seed,
        pg_restart,
        chain_payments,
    };
    eprintln!(
        "chaos: broker process at {}, {records} records per scenario",
        harness.bootstrap()
    );
    // Every (scenario, store) run, numbered in order (the number names its topic and seeds it).
    let mut n = 0;
    let runs: Vec<(&str, &str, u64)> = scenarios
        .iter()
        .flat_map(|scenario| {
            // One RocksDB directory belongs to one process: no group of instances shares it.
            stores
                .iter()
                .filter(move |store| scenario != "rebalance-storm" || *store == "postgres")
                .filter(move |store| scenario != "two-stores" || *store == "rocksdb")
                .map(move |store| (scenario.as_str(), store.as_str()))
        })
        .map(|(scenario, store)| {
            n += 1;
            (scenario, store, n)
        })
        .collect();
    let one = |scenario: &str, store: &str, n: u64| {
        let started = Instant::now();
        let result = harness.scenario(scenario, store, n);
        eprintln!("chaos: {scenario}/{store} took {:.0?}", started.elapsed());
        match result {
            Ok(true) => None,
            Ok(false) => Some(format!("{scenario}/{store}")),
            Err(e) => {
                eprintln!("chaos: {scenario}/{store} could not run: {e}");
                Some(format!("{scenario}/{store}"))
            }
        }
    };
    // The kill storms and the two-stores run share nothing but the broker: they run side by
    // side. The others run alone: the faults scenario's broker faults would hit every run, and
    // the rebalance storm's freeze is timed against the session timeout.
    let side_by_side =
        |scenario: &str| matches!(scenario, "kill-storm" | "two-stores" | "chain" | "shadows");
    let mut failures = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .filter(|r| side_by_side(r.0))
            .map(|&(scenario, store, n)| scope.spawn(move || one(scenario, store, n)))
            .collect();
        for h in handles {
            failures.extend(h.join().expect("a scenario thread panicked"));
        }
    });
    harness.replace_broker_if_dead("the side-by-side runs")?;
    for &(scenario, store, n) in runs.iter().filter(|r| !side_by_side(r.0)) {
        let mut failed = one(scenario, store, n);
        if failed.is_some() && harness.replace_broker_if_dead(&format!("{scenario}/{store}"))? {
            // Once, on the new broker, with a topic and group of its own.
            failed = one(scenario, store, n + 1_000);
            harness.replace_broker_if_dead(&format!("{scenario}/{store}, again"))?;
        }
        failures.extend(failed);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("invariants broken in {}", failures.join(", ")))
    }
}

impl Harness {
    fn bootstrap(&self) -> String {
        self.bootstrap.lock().unwrap().clone()
    }

    /// When the broker process died, says so and starts a new one; true if it did. librdkafka's
    /// mock cluster aborts on some group joins (`rd_kafka_mock_cgrp_classic_member_add:
    /// Assertion '!member->resp'`, a JoinGroup sent again while the first one waits), which is
    /// the mock's failure, not the consumer's: the run it took down is repeated once.
    fn replace_broker_if_dead(&self, during: &str) -> Res<bool> {
        let mut broker = self.broker.lock().unwrap();
        let Some(status) = broker.exited() else {
            return Ok(false);
        };
        eprintln!(
            "chaos: the broker process died during {during} ({status}); starting a new broker"
        );
        let mut host = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
        host.arg("broker");
        *broker = BrokerProcess::start(host)?;
        *self.bootstrap.lock().unwrap() = broker.bootstrap().to_owned();
        Ok(true)
    }

    fn command(&self, command: &str) -> Res<()> {
        self.broker.lock().unwrap().command(command)
    }

    fn scenario(&self, scenario: &str, store_kind: &str, n: u64) -> Res<bool> {
        if scenario == "chain" {
            return self.chain(store_kind, n);
        }
        if scenario == "shadows" {
            return self.shadows(store_kind, n);
        }
        if scenario == "kill-storm" {
            return storm::kill_storm(store_kind, self.records, self.kills, self.seed + n);
        }
        let topic = format!("chaos-{n}-{}", std::process::id());
        self.command(&format!("topic {topic} {PARTITIONS}"))?;
        self.command(&format!("topic {topic}.dlq 1"))?;
        let store = StoreUnderTest::create(store_kind)?;
        let two_stores = scenario == "two-stores";
        let bootstrap = self.bootstrap();
        let mut work = Workload::new(&bootstrap, &topic, self.records, self.seed + n, two_stores)?;
        let spec = ConsumerSpec {
            store: store_kind.to_owned(),
            path: store.path.clone(),
            bootstrap: bootstrap.clone(),
            group: format!("group-{topic}"),
            topic: topic.clone(),
            until: work.until(),
            // The rebalance storm freezes slot 0: slowed down, it is always mid-stream.
            slot0_delay_us: if scenario == "rebalance-storm" {
                1_500
            } else {
                0
            },
            on_stale: two_stores.then(|| "pause".to_owned()),
        };
        // The second instance's own directory (two stores).
        let second = two_stores
            .then(|| StoreUnderTest::create(store_kind))
            .transpose()?;
        let mut tally = Tally::default();
        let mut rng = Lcg(self.seed * 31 + n);
        match scenario {
            "rebalance-storm" => self.rebalance_storm(&mut work, &spec, &mut tally, &mut rng)?,
            "faults" => self.faults(&mut work, &spec, store_kind, &mut tally)?,
            "two-stores" => {
                let second = second.as_ref().ok_or("two stores need a second one")?;
                let other = ConsumerSpec {
                    path: second.path.clone(),
                    ..spec.clone()
                };
                self.two_stores(&mut work, [&spec, &other], &mut tally, &mut rng)?;
            }
            other => return Err(format!("unknown scenario {other:?}")),
        }
        let mut effects = store.read(&spec.group, &topic)?;
        if let Some(second) = &second {
            effects.merge(second.read(&spec.group, &topic)?);
        }
        Ok(check(scenario, store_kind, &work, &effects, &tally))
    }

    /// Two instances, each on its own RocksDB directory. Each round kills one and keeps it down
    /// past its session, so the group gives its partitions to the other, which must refuse
    /// them (their latest state is in the killed one's store); then starts it again, and the
    /// group gives them back. Ends once Kafka's committed offsets reach every partition's end.
    fn two_stores(
        &self,
        work: &mut Workload,
        specs: [&ConsumerSpec; 2],
        tally: &mut Tally,
        rng: &mut Lcg,
    ) -> Res<()> {
        // Both join before anything is produced, so each store takes its own partitions from
        // the first record on (the broker's initial rebalance delay gathers both joins).
        let mut instances: Vec<Option<ConsumerProcess>> = (0..2)
            .map(|slot| start_instance(specs[slot], slot).map(Some))
            .collect::<Res<_>>()?;
        tally.rebalances += 2;
        std::thread::sleep(Duration::from_secs(6));
        let rounds = (self.kills / 5).max(2);
        let chunk = self.records / (rounds + 1);
        work.produce(chunk)?;
        let progress = |i: &ConsumerProcess| i.stat("applied") + i.stat("duplicates");
        if !wait_until(Duration::from_secs(60), || {
            instances.iter().flatten().all(|i| progress(i) > 0)
        }) {
            return Err("the two instances did not both start consuming".into());
        }
        for round in 0..rounds {
            let slot = (round % 2) as usize;
            // Some of its partitions' records in flight when it dies.
            work.produce(if round + 1 == rounds {
                work.rest()
            } else {
                chunk
            })?;
            std::thread::sleep(Duration::from_millis(rng.next(300)));
            let (killed, survivor) = (slot, 1 - slot);
            let dead = instances[killed].take().ok_or("the instance is gone")?;
            let alive = instances[survivor].as_ref().ok_or("the survivor is gone")?;
            let before = alive.stat("refused");
            tally.add_fenced(&dead.kill());
            tally.kills += 1;
            // Past the session: the survivor is given every partition and refuses the dead
            // one's.
            if !wait_until(Duration::from_secs(30), || alive.stat("refused") > before) {
                eprintln!("chaos: round {round}: the survivor refused nothing");
            }
            tally.rebalances += 1;
            instances[killed] = Some(start_instance(specs[killed], killed)?);
            tally.rebalances += 1;
        }
        // Everything committed (Kafka's offsets follow the stores), then both stop.
        let ends = work.ends.clone();
        let done = wait_until(Duration::from_secs(300), || {
            kafka_offsets(&specs[0].bootstrap, &specs[0].group, &work.topic)
                .is_ok_and(|at| at.iter().zip(&ends).all(|(a, e)| *a == Some(*e)))
        });
        if !done {
            // What is behind, and what each instance last said, for whoever reads the log.
            let at = kafka_offsets(&specs[0].bootstrap, &specs[0].group, &work.topic);
            eprintln!("chaos: two-stores: Kafka's offsets {at:?}, the ends {ends:?}");
            for (slot, i) in instances.iter().enumerate() {
                if let Some(i) = i {
                    eprintln!("chaos: two-stores: instance {slot}: {:?}", i.stats());
                }
            }
        }
        for i in instances.into_iter().flatten() {
            match i.stop(Duration::from_secs(90)) {
                Ok(last) => tally.add_fenced(&last),
                Err(e) => {
                    // The stores say what happened; the check reads them.
                    eprintln!("chaos: two-stores: {e}");
                    tally.restarts += 1;
                }
            }
        }
        if !done {
            eprintln!("chaos: two-stores: Kafka's offsets did not reach the ends in 300 s");
        }
        Ok(())
    }

    /// Runs one consumer to the end of every partition and collects its counters.
    fn finish(&self, spec: &ConsumerSpec, tally: &mut Tally) -> Res<()> {
        for _ in 0..5 {
            tally.rebalances += 1;
            if run_out(start_instance(spec, 0)?, tally)? {
                return Ok(());
            }
        }
        Err("the final consumer kept failing".into())
    }

    fn rebalance_storm(
        &self,
        work: &mut Workload,
        spec: &ConsumerSpec,
        tally: &mut Tally,
        rng: &mut Lcg,
    ) -> Res<()> {
        let rounds = 12u64;
        let chunk = self.records / (rounds + 1);
        work.produce(chunk)?;
        let mut instances: Vec<Option<ConsumerProcess>> = (0..3)
            .map(|slot| start_instance(spec, slot).map(Some))
            .collect::<Res<_>>()?;
        tally.rebalances += 3;
        let mut froze = 0;
        let mut seen_fenced = false;
        for round in 0..rounds {
            work.produce(if round + 1 == rounds {
                work.rest()
            } else {
                chunk
            })?;
            let slot = rng.next(3) as usize;
            let freeze_now = (round == 3 || round == 8)
                || (round > 8 && !seen_fenced && tally.fenced == 0 && froze < 4);
            if freeze_now {
                // Slot 0, slowed down, still has work in flight.
                if let Some(zombie) = instances[0].as_ref() {
                    // Let the group settle first (a restart in the last round is a join that
                    // takes the broker's initial rebalance delay): frozen with its JoinGroup
                    // pending, the resumed zombie sends it again and librdkafka's mock cluster
                    // aborts (`rd_kafka_mock_cgrp_classic_member_add: !member->resp`).
                    std::thread::sleep(Duration::from_secs(5));
                    // Freeze it while it holds work, past the session timeout: the group moves
                    // its partitions to the others, then it wakes up and tries to commit.
                    let before = zombie.stat("applied") + zombie.stat("duplicates");
                    wait_until(Duration::from_secs(10), || {
                        zombie.stat("applied") + zombie.stat("duplicates") > before
                    });
                    zombie.freeze();
                    froze += 1;
                    tally.rebalances += 1;
                    std::thread::sleep(Duration::from_millis(SESSION_MS * 2 + 2_000));
                    zombie.resume();
                    std::thread::sleep(Duration::from_secs(3));
                    tally.rebalances += 1;
                }
            } else {
                match rng.next(3) {
                    0 => {
                        if let Some(i) = instances[slot].take() {
                            let last = i.kill();
                            tally.add_fenced(&last);
                            tally.kills += 1;
                            tally.rebalances += 1;
                        }
                    }
                    1 => {
                        if let Some(i) = instances[slot].take() {
                            match i.stop(Duration::from_secs(90)) {
                                Ok(last) => tally.add_fenced(&last),
                                Err(e) => {
                                    eprintln!("chaos: {e}");
                                    tally.restarts += 1;
                                }
                            }
                            tally.rebalances += 1;
                        }
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(300 + rng.next(1_500)));
            }
            for (slot, i) in instances.iter_mut().enumerate() {
                let ended = i.as_mut().is_some_and(|i| i.exited().is_some());
                if ended {
                    let done = i.take().unwrap();
                    tally.add_fenced(&done.stats());
                    tally.restarts += 1;
                }
                if i.is_none() {
                    *i = Some(start_instance(spec, slot)?);
                    tally.rebalances += 1;
                }
            }
            let fenced_live: u64 = instances.iter().flatten().map(|i| i.stat("fenced")).sum();
            if fenced_live > 0 && !seen_fenced {
                seen_fenced = true;
                eprintln!("chaos: a zombie commit was fenced (round {round})");
            }
        }
        // The survivors run to the end of every partition, then stop by themselves.
        for i in instances.into_iter().flatten() {
            run_out(i, tally)?;
        }
        // A last one finds nothing to do; it checks the end positions too.
        self.finish(spec, tally)
    }

    fn faults(
        &self,
        work: &mut Workload,
        spec: &ConsumerSpec,
        store_kind: &str,
        tally: &mut Tally,
    ) -> Res<()> {
        work.produce(self.records / 5)?;
        let mut steps: Vec<(&str, Vec<String>)> = vec![
            ("fetch errors", vec!["errors fetch 30 not_leader".into()]),
            (
                "offset commit errors",
                vec!["errors commit 30 coordinator".into()],
            ),
            (
                "produce errors",
                vec!["errors produce 10 not_enough_replicas".into()],
            ),
            ("broker 1 down", vec!["down 1".into()]),
        ];
        if store_kind == "postgres" {
            steps.push(("postgres restart", Vec::new()));
        }
        let per_step = work.rest() / steps.len() as u64;
        let mut instance = start_instance(spec, 0)?;
        tally.rebalances += 1;
        let progress = |i: &ConsumerProcess| i.stat("applied") + i.stat("duplicates");
        for (i, (what, commands)) in steps.iter().enumerate() {
            // Work in flight when the fault hits.
            work.produce(if i + 1 == steps.len() {
                work.rest()
            } else {
                per_step
            })?;
            let before = progress(&instance);
            wait_until(Duration::from_secs(30), || progress(&instance) > before);
            eprintln!("chaos: fault: {what}");
            for c in commands {
                self.command(c)?;
            }
            if *what == "broker 1 down" {
                std::thread::sleep(Duration::from_secs(3));
                self.command("up 1")?;
            }
            if *what == "postgres restart" {
                match &self.pg_restart {
                    Some(cmd) => {
                        let status = Command::new("sh")
                            .args(["-c", cmd])
                            .stdout(Stdio::null())
                            .status()
                            .map_err(|e| format!("restarting PostgreSQL: {e}"))?;
                        if !status.success() {
                            return Err(format!("restarting PostgreSQL failed: {status}"));
                        }
                    }
                    None => eprintln!("chaos: PostgreSQL restart left out (CHAOS_PG_RESTART=none)"),
                }
            }
            std::thread::sleep(Duration::from_secs(1));
            if let Some(status) = instance.exited() {
                if status.success() {
                    // Caught up with everything produced: it stopped by itself.
                    break;
                }
                // A supervisor's job: the runtime stopped without committing past the record
                // it could not finish; start it again.
                eprintln!("chaos: the consumer exited with {status} during {what}; restarting it");
                tally.add_fenced(&instance.stats());
                tally.restarts += 1;
                instance = start_instance(spec, 0)?;
                tally.rebalances += 1;
            }
        }
        run_out(instance, tally)?;
        self.finish(spec, tally)
    }
}

/// Kafka's committed offsets of `group` for every partition of `topic` (`None`: none yet).
fn kafka_offsets(bootstrap: &str, group: &str, topic: &str) -> Res<Vec<Option<i64>>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .map_err(|e| e.to_string())?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok((0..PARTITIONS)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => Some(o),
                _ => None,
            },
        )
        .collect())
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Checks every invariant, prints the details and the CHAOS line; true when all hold.
fn check(scenario: &str, store: &str, work: &Workload, fx: &Effects, tally: &Tally) -> bool {
    let mut problems = Vec::new();
    let mut lost = 0u64;
    let mut doubled = 0u64;
    for (key, original) in &work.originals {
        match fx.applied.get(key) {
            None => {
                lost += 1;
                if problems.len() < 10 {
                    problems.push(format!("key {key} never applied"));
                }
            }
            Some((n, t)) => {
                doubled += n.saturating_sub(1);
                if *n > 1 && problems.len() < 10 {
                    problems.push(format!("key {key} applied {n} times"));
                }
                if t != original {
                    lost += 1;
                    problems.push(format!("key {key} applied with {t:?}, not {original:?}"));
                }
            }
        }
    }
    for key in fx
        .applied
        .keys()
        .filter(|k| !work.originals.contains_key(*k))
    {
        problems.push(format!("unknown key {key} applied"));
        doubled += 1;
    }
    let conflict_letters: HashSet<(i32, i64)> = fx
        .dead_letters
        .iter()
        .filter(|d| d.reason == DeadLetterReason::Conflict)
        .map(|d| (d.record.partition(), d.record.offset()))
        .collect();
    for c in &work.conflicts {
        if !conflict_letters.contains(c) {
            lost += 1;
            problems.push(format!(
                "conflicting record {}@{} not dead-lettered",
                c.0, c.1
            ));
        }
    }
    let other_letters: Vec<&DeadLetter> = fx
        .dead_letters
        .iter()
        .filter(|d| d.reason != DeadLetterReason::Conflict)
        .collect();
    for d in other_letters.iter().take(5) {
        problems.push(format!(
            "unexpected dead letter {}@{}: {} {}",
            d.record.partition(),
            d.record.offset(),
            d.reason,
            d.message
        ));
    }
    let dead_letter_count = fx.dead_letters.len() as u64;
    let distinct_letters: HashSet<(i32, i64)> = fx
        .dead_letters
        .iter()
        .map(|d| (d.record.partition(), d.record.offset()))
        .collect();
    if distinct_letters.len() as u64 != dead_letter_count {
        doubled += dead_letter_count - distinct_letters.len() as u64;
        problems.push("a record was dead-lettered twice".into());
    }
    for (p, (got, want)) in fx.positions.iter().zip(&work.ends).enumerate() {
        if *got != Some(*want) {
            problems.push(format!("partition {p} position {got:?}, expected {want}"));
        }
    }
    // The ledger: balances from what was applied against balances from the originals.
    let mut expected: BTreeMap<&str, i64> = BTreeMap::new();
    for t in work.originals.values() {
        *expected.entry(&t.from).or_default() -= t.amount;
        *expected.entry(&t.to).or_default() += t.amount;
    }
    let mut actual: BTreeMap<&str, i64> = BTreeMap::new();
    for (n, t) in fx.applied.values() {
        *actual.entry(&t.from).or_default() -= t.amount * *n as i64;
        *actual.entry(&t.to).or_default() += t.amount * *n as i64;
    }
    if expected != actual {
        problems.push("the ledger differs from the expected one".into());
    }
    if scenario == "rebalance-storm" && tally.fenced == 0 {
        problems.push("no zombie commit was fenced".into());
    }
    if scenario == "two-stores" && tally.refused == 0 {
        problems.push("no stale partition was refused".into());
    }
    let applied = work
        .originals
        .keys()
        .filter(|k| fx.applied.contains_key(*k))
        .count() as u64;
    let conflicts = conflict_letters.len() as u64;
    let duplicates =
        (work.produced as u64).saturating_sub(applied + conflicts + other_letters.len() as u64);
    for p in &problems {
        eprintln!("chaos: VIOLATION {scenario}/{store}: {p}");
    }
    eprintln!(
        "chaos: {scenario}/{store}: {} consumer restarts after an error exit, {} store retries, {} non-conflict dead letters",
        tally.restarts,
        tally.store_retries,
        other_letters.len()
    );
    println!(
        "CHAOS scenario={scenario} store={store} records={} kills={} rebalances={} fenced={} refused={} applied={applied} duplicates={duplicates} conflicts={conflicts} lost={lost} doubled={doubled}",
        work.produced, tally.kills, tally.rebalances, tally.fenced, tally.refused
    );
    problems.is_empty()
}
