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
//! [`Scenario::KillStorm`] kills real consumer processes with SIGKILL instead: the test binary
//! started again as the consumer (see its documentation for what that asks of the test).
//!
//! The [`Report`] lists both per scenario with the runtime's counts (duplicates, conflicts, dead
//! letters), the crashes and the kills, and [`Report::assert_exactly_once`] fails the test with all of it.
//! A handler that writes its effect outside the store's transaction is caught: its effect of a
//! crashed batch survives, and the record is handled again after the restart.
//!
//! The broker is the cluster `KAFKA_BOOTSTRAP_SERVERS` names (a containerised Kafka in CI), or
//! librdkafka's mock cluster in this process. Each consumer start on the mock waits its initial
//! rebalance delay (3 s); a scenario with `n` crashes starts `n + 1` consumers.

mod report;
mod run;
mod stores;
mod storm;
mod workload;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use crate::dead_letter::DeadLetter;
use crate::handler::Handler;
use crate::metrics::StatsSnapshot;
use crate::store::{Inspect, PartitionId, Store};

use crate::testkit::TestCluster;
pub use report::{Report, Scenario, ScenarioReport};
use run::{Run, ends_of};
pub use stores::HarnessStore;
#[cfg(feature = "memory")]
pub use stores::MemoryStores;
#[cfg(feature = "postgres")]
pub use stores::PostgresStores;
#[cfg(feature = "rocksdb")]
pub use stores::{RocksDbStores, StoreDir};
pub use storm::is_consumer_process;
pub use workload::{RecordKind, WorkRecord, Workload};

/// How long a scenario may take before the harness gives up on it, unless told.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

thread_local! {
    /// [`HandlerHarness::run`] calls made on this thread (a test's, under libtest).
    static RUNS: Cell<u32> = const { Cell::new(0) };
}

/// Runs a user's handler through [`Scenario`]s on a kind of store. See the module's
/// documentation.
pub struct HandlerHarness<P, M> {
    pub(super) stores: P,
    pub(super) make: M,
    pub(super) configure: Option<Box<dyn Fn(crate::RuntimeBuilder) -> crate::RuntimeBuilder>>,
    pub(super) cluster: Option<TestCluster>,
    pub(super) timeout: Duration,
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
            cluster: None,
            timeout: SCENARIO_TIMEOUT,
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

    /// Runs the scenarios on `cluster` instead of the one [`TestCluster::from_env`] gives (the
    /// cluster `KAFKA_BOOTSTRAP_SERVERS` names, or a mock cluster in this process), for
    /// example a [`BrokerProcess`](crate::testkit::BrokerProcess)'s.
    pub fn cluster(mut self, cluster: TestCluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// How long one scenario may take before the harness fails it (default 180 s): more for
    /// a workload of many thousand records.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
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
        if let Some(spec) = storm::child_spec() {
            if spec.kind != std::any::type_name::<P>() {
                return Report::default();
            }
            self.serve_child(&spec);
        }
        let earlier = RUNS.with(|runs| runs.replace(runs.get() + 1));
        assert!(
            earlier == 0
                || !scenarios
                    .iter()
                    .any(|s| matches!(s, Scenario::KillStorm { .. })),
            "Scenario::KillStorm must be in the test's first HandlerHarness::run call: its \
             consumer processes re-run the test up to that call"
        );
        let own;
        let cluster = match &self.cluster {
            Some(cluster) => cluster,
            None => {
                own = TestCluster::from_env().unwrap_or_else(|e| panic!("{e}"));
                &own
            }
        };
        let mut report = Report::default();
        for (i, scenario) in scenarios.iter().enumerate() {
            let rt = runtime();
            let kept = self.stores.fresh(&rt);
            let topic = format!("harness-{}-{i}", &crate::store::new_id()[..12]);
            let group = format!("{topic}-group");
            for (name, partitions) in [
                (topic.clone(), workload.partitions),
                (format!("{topic}.dlq"), 1),
            ] {
                cluster
                    .create_topic(&name, partitions)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            let ends = ends_of(workload);
            // A rebalance scenario sends the rest once the second instance starts.
            let first = match scenario {
                Scenario::RebalanceMidStream => workload.records.len() / 3,
                _ => workload.records.len(),
            };
            cluster
                .produce(&topic, &workload.records[..first])
                .unwrap_or_else(|e| panic!("{e}"));
            let mut run = Run {
                harness: self,
                kept: &kept,
                bootstrap: cluster.bootstrap(),
                session_ms: cluster.session_timeout_ms(),
                topic: &topic,
                group: &group,
                ends: &ends,
                counted: StatsSnapshot::default(),
                crashes: 0,
                kills: 0,
                started: Instant::now(),
            };
            match scenario {
                Scenario::Clean => run.incarnation(None),
                Scenario::CrashBeforeCommit { crashes } => {
                    let mut random = Random::new(workload.records.len());
                    for _ in 0..*crashes {
                        let left = run.left(&rt).max(1);
                        // Within the first half of what is left: the handler is called for
                        // most records (not for duplicates and conflicts).
                        run.incarnation(Some(1 + random.below(left / 2)));
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
                Scenario::KillStorm { kills } => run.storm(*kills),
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
            let (counted, crashes, kills) = (run.counted, run.crashes, run.kills);
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
                    kills,
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

/// Where the harness crashes and kills: a small generator seeded by the workload, so a
/// workload is crashed at the same points on every run.
pub(super) struct Random(u64);

impl Random {
    pub(super) fn new(records: usize) -> Self {
        Random(0x9e37_79b9_7f4a_7c15_u64 ^ records as u64)
    }

    /// A number below `n` (0 when `n` is 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n.max(1)
    }
}

fn letter_key(d: &DeadLetter) -> String {
    d.key
        .as_deref()
        .map_or_else(String::new, |k| String::from_utf8_lossy(k).into_owned())
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting a tokio runtime")
}
