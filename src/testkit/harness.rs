//! [`HandlerHarness`]: proves a user's handler exactly-once, in the user's own tests.
//!
//! The harness takes the handler (a function that makes one per consumer incarnation), a kind
//! of store ([`HarnessStore`]: a RocksDB directory, a PostgreSQL database or a memory store of
//! its own per scenario) and a [`Workload`] (keyed records, with repeats at new offsets and
//! conflicting repeats). It runs each [`Scenario`] on a fresh topic, group and store: the
//! consumer is crashed between its handler and its commit (its tokio runtime dropped while a
//! batch is open, as a `kill -9` would leave it) and restarted, or rewound and run again over
//! records it applied. At the end it asks two questions of the store the user answers:
//!
//! - `effects`: how many times each idempotency key's effect is visible (for a ledger, the
//!   movements it recorded per key); a key seen twice is **doubled**, a key of the workload
//!   seen never (and not kept as a dead letter) is **lost**;
//! - `invariant`: whether the state is what the unique records make it (`Err` with a readable
//!   diff when not).
//!
//! The [`Report`] lists both per scenario with the runtime's counts (duplicates, conflicts, dead
//! letters) and the crashes, and [`Report::assert_exactly_once`] fails the test with all of it.
//! A handler that writes its effect outside the store's transaction is caught: its effect of a
//! crashed batch survives, and the record is handled again after the restart.
//!
//! The broker is the cluster `KAFKA_BOOTSTRAP_SERVERS` names (a containerised Kafka in CI), or
//! librdkafka's mock cluster in this process. Each consumer start on the mock waits its initial
//! rebalance delay (3 s); a scenario with `n` crashes starts `n + 1` consumers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};

use crate::dead_letter::DeadLetter;
use crate::handler::{Handler, HandlerError, Outcome};
use crate::identity::DEFAULT_KEY_HEADER;
use crate::metrics::StatsSnapshot;
use crate::record::Record;
use crate::runtime::Runtime;
use crate::store::{DedupEntry, Inspect, PartitionId, Store};

/// How long a scenario may take before the harness gives up on it.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

/// What a record of a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The first record with its key.
    Original,
    /// An earlier record sent again (a producer's retry) at a new offset: a duplicate.
    Repeat,
    /// An earlier key with another payload: a conflict.
    ConflictingRepeat,
}

/// One record of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkRecord {
    /// Its idempotency key (sent in the `idempotency-key` header and as the Kafka key).
    pub key: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The partition it is produced to.
    pub partition: i32,
    /// What it is.
    pub kind: RecordKind,
}

/// The records a harness sends, in order, to a topic of `partitions` partitions.
#[derive(Debug, Clone)]
pub struct Workload {
    partitions: i32,
    records: Vec<WorkRecord>,
}

impl Workload {
    /// An empty workload for a topic of `partitions` partitions (at least 1).
    pub fn new(partitions: i32) -> Self {
        Workload {
            partitions: partitions.max(1),
            records: Vec::new(),
        }
    }

    /// Original records, spread over the partitions in turn. A key used twice is a
    /// [`RecordKind::Repeat`] (same payload) or a [`RecordKind::ConflictingRepeat`].
    pub fn records(mut self, records: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        for (key, payload) in records {
            let kind = match self.first(&key) {
                None => RecordKind::Original,
                Some(first) if first.payload == payload => RecordKind::Repeat,
                Some(_) => RecordKind::ConflictingRepeat,
            };
            let partition = self.records.len() as i32 % self.partitions;
            self.records.push(WorkRecord {
                key,
                payload,
                partition,
                kind,
            });
        }
        self
    }

    /// After every `every`-th original, one earlier original sent again at a new offset (on
    /// the next partition): about one record in `every + 1` is a duplicate.
    pub fn repeats(mut self, every: usize) -> Self {
        let every = every.max(1);
        let mut out = Vec::with_capacity(self.records.len() * (every + 1) / every);
        let mut originals = 0usize;
        for r in std::mem::take(&mut self.records) {
            let original = r.kind == RecordKind::Original;
            out.push(r);
            if original {
                originals += 1;
                if originals.is_multiple_of(every) {
                    // A deterministic earlier original: the stream is the same on every run.
                    let earlier: Vec<&WorkRecord> = out
                        .iter()
                        .filter(|r| r.kind == RecordKind::Original)
                        .collect();
                    let pick = earlier[(originals * 7919) % earlier.len()].clone();
                    out.push(WorkRecord {
                        partition: (pick.partition + 1) % self.partitions,
                        kind: RecordKind::Repeat,
                        ..pick
                    });
                }
            }
        }
        self.records = out;
        self
    }

    /// The first record of `key` again with `payload` instead of its own: a conflict.
    pub fn conflicting_repeat(mut self, key: &str, payload: impl Into<Vec<u8>>) -> Self {
        let partition = self.first(key).map_or(0, |r| r.partition);
        self.records.push(WorkRecord {
            key: key.to_owned(),
            payload: payload.into(),
            partition,
            kind: RecordKind::ConflictingRepeat,
        });
        self
    }

    /// Every record, in the order they are sent.
    pub fn all(&self) -> &[WorkRecord] {
        &self.records
    }

    /// The first record of each key: what an exactly-once handler applies.
    pub fn originals(&self) -> impl Iterator<Item = &WorkRecord> {
        self.records
            .iter()
            .filter(|r| r.kind == RecordKind::Original)
    }

    fn first(&self, key: &str) -> Option<&WorkRecord> {
        self.records.iter().find(|r| r.key == key)
    }
}

/// What a scenario does to the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Consumes the workload once.
    Clean,
    /// Crashes the consumer `crashes` times, each right after its handler succeeded on a record
    /// chosen at random in the first half of those left (the batch open, its effects written
    /// but not committed), restarting it each time, then finishes. An incarnation that
    /// committed everything before its crash point ends without one ([`ScenarioReport::crashes`]
    /// counts the crashes made).
    CrashBeforeCommit {
        /// How many crashes.
        crashes: u32,
    },
    /// Consumes the workload, then rewinds every partition of the store to offset 0 and
    /// consumes it all again: every record is redelivered.
    RedeliveryAfterRewind,
    /// One consumer until the first third of the workload (sent alone) is committed; then a
    /// second instance joins the group and the rest is sent while the group rebalances
    /// (partitions move while records are in flight), and both finish. Needs a store the
    /// instances share ([`HarnessStore::SHARED`]).
    RebalanceMidStream,
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::Clean => f.write_str("clean"),
            Scenario::CrashBeforeCommit { crashes } => {
                write!(f, "crash before commit ×{crashes}")
            }
            Scenario::RedeliveryAfterRewind => f.write_str("redelivery after a rewind"),
            Scenario::RebalanceMidStream => f.write_str("rebalance mid-stream"),
        }
    }
}

/// What one scenario found.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// The scenario.
    pub scenario: Scenario,
    /// Keys of the workload whose effect is not visible (nor kept as a dead letter).
    pub lost: Vec<String>,
    /// Keys whose effect is visible more than once, with how many times.
    pub doubled: Vec<(String, u64)>,
    /// Keys the store kept as dead letters (the handler's refusals, conflicts).
    pub dead_letters: Vec<String>,
    /// The runtime's counts over every incarnation (committed batches only).
    pub counted: StatsSnapshot,
    /// Crashes made.
    pub crashes: u32,
    /// The user's invariant: `Err` with its diff when it does not hold.
    pub invariant: Result<(), String>,
}

impl ScenarioReport {
    /// No key lost or doubled, and the invariant holds.
    pub fn holds(&self) -> bool {
        self.lost.is_empty() && self.doubled.is_empty() && self.invariant.is_ok()
    }
}

impl fmt::Display for ScenarioReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counted;
        writeln!(
            f,
            "{}: {} · lost {} · doubled {} · applied {}, duplicates {}, conflicts {}, dead letters {} · crashes {}",
            self.scenario,
            if self.holds() { "ok" } else { "FAILED" },
            self.lost.len(),
            self.doubled.len(),
            c.applied,
            c.duplicates(),
            c.conflicts,
            c.dead_lettered,
            self.crashes,
        )?;
        if !self.lost.is_empty() {
            writeln!(f, "  lost: {}", shorten(&self.lost))?;
        }
        if !self.doubled.is_empty() {
            let doubled: Vec<String> = self
                .doubled
                .iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect();
            writeln!(f, "  doubled: {}", shorten(&doubled))?;
        }
        if let Err(diff) = &self.invariant {
            writeln!(f, "  invariant: {diff}")?;
        }
        Ok(())
    }
}

fn shorten(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(10).map(String::as_str).collect();
    match items.len() {
        n if n > 10 => format!("{} … ({n} in all)", shown.join(", ")),
        _ => shown.join(", "),
    }
}

/// Every scenario's report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// In the order they ran.
    pub scenarios: Vec<ScenarioReport>,
}

impl Report {
    /// Keys lost, over every scenario.
    pub fn lost(&self) -> usize {
        self.scenarios.iter().map(|s| s.lost.len()).sum()
    }

    /// Keys doubled, over every scenario.
    pub fn doubled(&self) -> usize {
        self.scenarios.iter().map(|s| s.doubled.len()).sum()
    }

    /// Crashes made, over every scenario.
    pub fn crashes(&self) -> u32 {
        self.scenarios.iter().map(|s| s.crashes).sum()
    }

    /// Panics with the whole report unless every scenario holds.
    #[track_caller]
    pub fn assert_exactly_once(&self) {
        assert!(
            self.scenarios.iter().all(ScenarioReport::holds),
            "the handler is not exactly-once:\n{self}"
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.scenarios.iter().try_for_each(|s| write!(f, "{s}"))
    }
}

/// A kind of store the harness makes one of per scenario, and opens once per consumer
/// incarnation (on the incarnation's own tokio runtime).
pub trait HarnessStore {
    /// The store.
    type Store: Store + Inspect + Clone;
    /// What keeps a scenario's store alive between incarnations (a directory, a database).
    type Kept;
    /// Whether two consumer instances may use the store at once (a group sharing it).
    const SHARED: bool = false;
    /// A new, empty store for a scenario.
    fn fresh(&self, rt: &tokio::runtime::Runtime) -> Self::Kept;
    /// Opens the scenario's store.
    fn open(&self, kept: &Self::Kept, rt: &tokio::runtime::Runtime) -> Self::Store;
}

/// A RocksDB store in a temporary directory of its own per scenario, removed afterwards.
#[cfg(feature = "rocksdb")]
#[derive(Debug, Clone, Copy, Default)]
pub struct RocksDbStores;

/// A scenario's RocksDB directory, removed when dropped.
#[cfg(feature = "rocksdb")]
#[derive(Debug)]
pub struct StoreDir(std::path::PathBuf);

#[cfg(feature = "rocksdb")]
impl StoreDir {
    /// Where the store is.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

#[cfg(feature = "rocksdb")]
impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(feature = "rocksdb")]
impl HarnessStore for RocksDbStores {
    type Store = crate::RocksStore;
    type Kept = StoreDir;

    fn fresh(&self, _rt: &tokio::runtime::Runtime) -> StoreDir {
        let dir = std::env::temp_dir().join(format!("idc-harness-{}", crate::store::new_id()));
        std::fs::create_dir_all(&dir).expect("creating the store's directory");
        StoreDir(dir)
    }

    fn open(&self, dir: &StoreDir, _rt: &tokio::runtime::Runtime) -> crate::RocksStore {
        // No fsync: a crash here drops the process's runtime, not the machine.
        crate::RocksStore::open_with(dir.path(), crate::RocksOptions { sync: false })
            .expect("opening the scenario's RocksDB store")
    }
}

/// A PostgreSQL database of its own per scenario on the server at `admin_url` (its user may
/// create databases), dropped afterwards.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub struct PostgresStores {
    admin_url: String,
    setup: String,
    options: crate::PgOptions,
}

#[cfg(feature = "postgres")]
impl PostgresStores {
    /// Databases on the server at `admin_url` (a URL whose user may create databases), each
    /// set up with `setup` first (the handler's own tables; may be empty), opened with the
    /// default [`PgOptions`](crate::PgOptions).
    pub fn new(admin_url: impl Into<String>, setup: impl Into<String>) -> Self {
        PostgresStores {
            admin_url: admin_url.into(),
            setup: setup.into(),
            options: crate::PgOptions::default(),
        }
    }

    /// The options the stores are opened with (schema, table prefix, pool), as the service's.
    pub fn options(mut self, options: crate::PgOptions) -> Self {
        self.options = options;
        self
    }
}

#[cfg(feature = "postgres")]
impl HarnessStore for PostgresStores {
    type Store = crate::PgStore;
    type Kept = super::ThrowawayDb;
    const SHARED: bool = true;

    fn fresh(&self, rt: &tokio::runtime::Runtime) -> super::ThrowawayDb {
        let name = format!("idc_harness_{}", &crate::store::new_id()[..16]);
        rt.block_on(super::ThrowawayDb::create(
            &self.admin_url,
            &name,
            &self.setup,
        ))
        .expect("creating the scenario's database")
    }

    fn open(&self, db: &super::ThrowawayDb, rt: &tokio::runtime::Runtime) -> crate::PgStore {
        rt.block_on(crate::PgStore::connect_with(db.url(), self.options.clone()))
            .expect("connecting the scenario's store")
    }
}

/// The handler under test, crashing the incarnation right after its `crash_after`-th success.
struct Crashing<H> {
    inner: H,
    calls: std::sync::atomic::AtomicU64,
    crash_after: Option<u64>,
    crashed: Arc<tokio::sync::Notify>,
}

impl<T: crate::Transaction, H: Handler<T>> Handler<T> for Crashing<H> {
    async fn handle(&self, record: &Record, tx: &mut T) -> Result<Outcome, HandlerError> {
        let outcome = self.inner.handle(record, tx).await?;
        let done = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if self.crash_after == Some(done) {
            // The effects are written, the batch is open: the process dies here.
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(outcome)
    }

    async fn on_duplicate(
        &self,
        record: &Record,
        entry: &DedupEntry,
        cause: crate::DuplicateCause,
    ) {
        self.inner.on_duplicate(record, entry, cause).await;
    }

    async fn on_conflict(&self, record: &Record, entry: &DedupEntry) {
        self.inner.on_conflict(record, entry).await;
    }

    #[cfg(feature = "resolve")]
    async fn on_superseded(
        &self,
        record: &Record,
        resolution: &crate::resolve::Resolution,
        tx: &mut T,
    ) -> Result<(), HandlerError> {
        self.inner.on_superseded(record, resolution, tx).await
    }
}

/// Where the scenarios' topics live.
enum Broker {
    Mock(MockCluster<'static, DefaultProducerContext>),
    External(String),
}

impl Broker {
    fn start() -> Self {
        match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
            Ok(servers) if !servers.is_empty() => Broker::External(servers),
            _ => Broker::Mock(MockCluster::new(1).expect("starting librdkafka's mock cluster")),
        }
    }

    fn bootstrap(&self) -> String {
        match self {
            Broker::Mock(mock) => mock.bootstrap_servers(),
            Broker::External(servers) => servers.clone(),
        }
    }

    fn create_topic(&self, rt: &tokio::runtime::Runtime, topic: &str, partitions: i32) {
        match self {
            Broker::Mock(mock) => mock
                .create_topic(topic, partitions, 1)
                .expect("creating a topic on the mock cluster"),
            Broker::External(servers) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", servers)
                    .create()
                    .expect("creating the admin client");
                let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                for r in rt
                    .block_on(admin.create_topics([&new], &AdminOptions::new()))
                    .expect("creating a topic")
                {
                    r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
                }
            }
        }
    }
}

/// Runs a user's handler through [`Scenario`]s on a kind of store. See the module's
/// documentation.
pub struct HandlerHarness<P, M> {
    stores: P,
    make: M,
    configure: Option<Box<dyn Fn(crate::RuntimeBuilder) -> crate::RuntimeBuilder>>,
}

impl<P, M> fmt::Debug for HandlerHarness<P, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerHarness").finish_non_exhaustive()
    }
}

impl<P, M, H> HandlerHarness<P, M>
where
    P: HarnessStore,
    M: Fn() -> H,
    H: Handler<<P::Store as Store>::Tx>,
{
    /// A harness of the handlers `make` makes (one per consumer incarnation), on stores of
    /// `stores`.
    pub fn new(stores: P, make: M) -> Self {
        HandlerHarness {
            stores,
            make,
            configure: None,
        }
    }

    /// Sets the runtime's options the handler relies on (retry policy, batch size, conflict
    /// policy): applied to every incarnation's builder after the harness's own settings.
    pub fn configure(
        mut self,
        f: impl Fn(crate::RuntimeBuilder) -> crate::RuntimeBuilder + 'static,
    ) -> Self {
        self.configure = Some(Box::new(f));
        self
    }

    /// Runs `scenarios` over `workload`; asks `effects` how many times each key's effect is
    /// visible and `invariant` whether the state is right, on each scenario's store at its end.
    pub fn run(
        &self,
        workload: &Workload,
        scenarios: &[Scenario],
        effects: impl AsyncFn(&P::Store) -> BTreeMap<String, u64>,
        invariant: impl AsyncFn(&P::Store, &Workload) -> Result<(), String>,
    ) -> Report {
        let broker = Broker::start();
        let mut report = Report::default();
        for (i, scenario) in scenarios.iter().enumerate() {
            let rt = runtime();
            let kept = self.stores.fresh(&rt);
            let topic = format!("harness-{}-{i}", &crate::store::new_id()[..12]);
            let group = format!("{topic}-group");
            broker.create_topic(&rt, &topic, workload.partitions);
            broker.create_topic(&rt, &format!("{topic}.dlq"), 1);
            let ends = ends_of(workload);
            // A rebalance scenario sends the rest once the second instance starts.
            let first = match scenario {
                Scenario::RebalanceMidStream => workload.records.len() / 3,
                _ => workload.records.len(),
            };
            produce(&broker.bootstrap(), &topic, &workload.records[..first]);
            let mut run = Run {
                harness: self,
                kept: &kept,
                bootstrap: broker.bootstrap(),
                topic: &topic,
                group: &group,
                ends: &ends,
                counted: StatsSnapshot::default(),
                crashes: 0,
                started: Instant::now(),
            };
            match scenario {
                Scenario::Clean => run.incarnation(None),
                Scenario::CrashBeforeCommit { crashes } => {
                    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ workload.records.len() as u64;
                    for _ in 0..*crashes {
                        let left = run.left(&rt).max(1);
                        seed = seed
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        // Within the first half of what is left: the handler is called for
                        // most records (not for duplicates and conflicts).
                        run.incarnation(Some(1 + (seed >> 33) % (left / 2).max(1)));
                    }
                    run.incarnation(None);
                }
                Scenario::RebalanceMidStream => {
                    assert!(
                        P::SHARED,
                        "Scenario::RebalanceMidStream needs a store two consumer instances \
                         share (PostgreSQL, the memory store); a RocksDB directory is one \
                         process's"
                    );
                    run.rebalance(workload);
                }
                Scenario::RedeliveryAfterRewind => {
                    run.incarnation(None);
                    let store = self.stores.open(&kept, &rt);
                    rt.block_on(async {
                        for p in 0..workload.partitions {
                            let id = PartitionId::new(&group, &topic, p);
                            store
                                .set_position(&id, 0)
                                .await
                                .expect("rewinding a partition");
                        }
                    });
                    drop(store);
                    run.incarnation(None);
                }
            }
            let (counted, crashes) = (run.counted, run.crashes);
            let store = self.stores.open(&kept, &rt);
            let scenario_report = rt.block_on(async {
                let seen = effects(&store).await;
                let mut letters = BTreeSet::new();
                for p in 0..workload.partitions {
                    let id = PartitionId::new(&group, &topic, p);
                    for d in store.dead_letters(&id).await.expect("reading dead letters") {
                        letters.insert(letter_key(&d));
                    }
                }
                let lost = workload
                    .originals()
                    .map(|r| r.key.clone())
                    .filter(|k| seen.get(k).copied().unwrap_or(0) == 0 && !letters.contains(k))
                    .collect();
                let doubled = seen
                    .iter()
                    .filter(|(_, n)| **n > 1)
                    .map(|(k, n)| (k.clone(), *n))
                    .collect();
                ScenarioReport {
                    scenario: *scenario,
                    lost,
                    doubled,
                    dead_letters: letters.into_iter().collect(),
                    counted,
                    crashes,
                    invariant: invariant(&store, workload).await,
                }
            });
            drop(store);
            drop(kept);
            report.scenarios.push(scenario_report);
        }
        report
    }
}

fn letter_key(d: &DeadLetter) -> String {
    d.key
        .as_deref()
        .map_or_else(String::new, |k| String::from_utf8_lossy(k).into_owned())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting a tokio runtime")
}

/// Produces the workload; returns each partition's end offset.
/// Each partition's end offset once the whole workload is sent.
fn ends_of(workload: &Workload) -> Vec<i64> {
    let mut ends = vec![0i64; workload.partitions as usize];
    for r in &workload.records {
        ends[r.partition as usize] += 1;
    }
    ends
}

/// Sends `records`, in order, and waits until every one is acknowledged.
fn produce(bootstrap: &str, topic: &str, records: &[WorkRecord]) {
    send(&producer(bootstrap), topic, records);
}

fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("creating the harness's producer")
}

fn send(producer: &BaseProducer, topic: &str, records: &[WorkRecord]) {
    for r in records {
        let headers = OwnedHeaders::new().insert(Header {
            key: DEFAULT_KEY_HEADER,
            value: Some(r.key.as_bytes()),
        });
        let mut record = BaseRecord::to(topic)
            .partition(r.partition)
            .key(r.key.as_bytes())
            .payload(&r.payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) => {
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "producing the workload: {e}"
                    );
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("flushing the workload");
}

/// One scenario's consumer incarnations on its store.
struct Run<'a, P: HarnessStore, M> {
    harness: &'a HandlerHarness<P, M>,
    kept: &'a P::Kept,
    bootstrap: String,
    topic: &'a str,
    group: &'a str,
    ends: &'a [i64],
    counted: StatsSnapshot,
    crashes: u32,
    started: Instant,
}

impl<P, M, H> Run<'_, P, M>
where
    P: HarnessStore,
    M: Fn() -> H,
    H: Handler<<P::Store as Store>::Tx>,
{
    /// Records not committed yet, by the store's positions.
    fn left(&self, rt: &tokio::runtime::Runtime) -> u64 {
        let store = self.harness.stores.open(self.kept, rt);
        rt.block_on(self.left_in(&store))
    }

    async fn left_in(&self, store: &P::Store) -> u64 {
        let mut left = 0;
        for (p, end) in self.ends.iter().enumerate() {
            let id = PartitionId::new(self.group, self.topic, p as i32);
            let next = store
                .position(&id)
                .await
                .expect("reading a position")
                .and_then(|s| s.next_offset)
                .unwrap_or(0);
            left += (end - next).max(0) as u64;
        }
        left
    }

    /// Starts a consumer on a runtime of its own; with `crash_after`, its handler hangs after
    /// that many successes.
    fn start(&self, crash_after: Option<u64>) -> Running<P::Store> {
        let rt = runtime();
        let store = self.harness.stores.open(self.kept, &rt);
        let crashed = Arc::new(tokio::sync::Notify::new());
        let handler = Crashing {
            inner: (self.harness.make)(),
            calls: Default::default(),
            crash_after,
            crashed: crashed.clone(),
        };
        let mut builder = Runtime::builder()
            .bootstrap_servers(&self.bootstrap)
            .group_id(self.group)
            .topics([self.topic])
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500");
        if let Some(configure) = &self.harness.configure {
            builder = configure(builder);
        }
        let runtime = builder
            .store(store.clone())
            .build(handler)
            .expect("building the consumer");
        let stats = runtime.stats();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(runtime.run(async {
            let _ = stopped.await;
        }));
        Running {
            rt,
            store,
            crashed,
            stats,
            stop,
            task,
        }
    }

    /// Waits until at most `left` records are left uncommitted (false), or `running` crashed
    /// (true).
    fn wait(&self, running: &Running<P::Store>, left: u64) -> bool {
        running.rt.block_on(async {
            loop {
                tokio::select! {
                    () = running.crashed.notified() => return true,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                assert!(
                    !running.task.is_finished(),
                    "the consumer stopped on its own; run it alone to see why"
                );
                assert!(
                    self.started.elapsed() < SCENARIO_TIMEOUT,
                    "the scenario made no progress in {SCENARIO_TIMEOUT:?}"
                );
                if self.left_in(&running.store).await <= left {
                    return false;
                }
            }
        })
    }

    /// Stops a consumer gracefully, or drops it where it stands (a crash: every task dropped,
    /// the open batch never commits); counts what it committed.
    fn end(&mut self, running: Running<P::Store>, crashed: bool) {
        let Running {
            rt,
            store,
            stats,
            stop,
            task,
            ..
        } = running;
        if crashed {
            drop(store);
            drop(rt);
            self.crashes += 1;
        } else {
            let _ = stop.send(());
            rt.block_on(task)
                .expect("the consumer task panicked")
                .expect("the consumer failed");
            drop(store);
        }
        add(&mut self.counted, &stats.snapshot());
    }

    /// One consumer until everything is committed, or until its crash.
    fn incarnation(&mut self, crash_after: Option<u64>) {
        let running = self.start(crash_after);
        let crashed = self.wait(&running, 0);
        self.end(running, crashed);
    }

    /// One consumer until the first third of the workload (all that was sent) is committed;
    /// then a second one joins the group and the rest is sent while the group rebalances;
    /// both run until everything is committed.
    fn rebalance(&mut self, workload: &Workload) {
        let sent = workload.records.len() / 3;
        let first = self.start(None);
        self.wait(&first, (workload.records.len() - sent) as u64);
        let second = self.start(None);
        // Spread over about five seconds: the stream goes on through the rebalance.
        let rest = &workload.records[sent..];
        let producer = producer(&self.bootstrap);
        for chunk in rest.chunks(rest.len().div_ceil(50).max(1)) {
            send(&producer, self.topic, chunk);
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait(&second, 0);
        self.end(first, false);
        self.end(second, false);
    }
}

/// A consumer incarnation running on its own tokio runtime.
struct Running<S> {
    rt: tokio::runtime::Runtime,
    store: S,
    crashed: Arc<tokio::sync::Notify>,
    stats: Arc<crate::metrics::Stats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<crate::Result<()>>,
}

fn add(total: &mut StatsSnapshot, s: &StatsSnapshot) {
    total.applied += s.applied;
    total.duplicates_redelivery += s.duplicates_redelivery;
    total.duplicates_repeated_key += s.duplicates_repeated_key;
    total.conflicts += s.conflicts;
    total.conflicts_skipped += s.conflicts_skipped;
    total.dead_lettered += s.dead_lettered;
    total.records_read += s.records_read;
    total.retries += s.retries;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_knows_its_repeats_and_conflicts() {
        let w = Workload::new(2)
            .records((0..10).map(|i| (format!("k{i}"), vec![i as u8])))
            .repeats(5)
            .conflicting_repeat("k3", b"other".to_vec())
            .records([("k1".to_owned(), vec![1u8])]);
        let kinds = |k: RecordKind| w.all().iter().filter(|r| r.kind == k).count();
        assert_eq!(kinds(RecordKind::Original), 10);
        assert_eq!(
            kinds(RecordKind::Repeat),
            3,
            "two from repeats(5), one by hand"
        );
        assert_eq!(kinds(RecordKind::ConflictingRepeat), 1);
        assert_eq!(w.originals().count(), 10);
        assert!(w.all().iter().all(|r| r.partition < 2));
        let conflict = w
            .all()
            .iter()
            .find(|r| r.kind == RecordKind::ConflictingRepeat)
            .unwrap();
        assert_eq!(
            (conflict.key.as_str(), conflict.partition),
            ("k3", w.first("k3").unwrap().partition)
        );
    }
}
