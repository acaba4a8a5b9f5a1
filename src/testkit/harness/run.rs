//! One scenario's consumer incarnations: the handler wrapped to crash, the broker, the
//! workload sent, consumers started, waited on, stopped or dropped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{HandlerHarness, HarnessStore, Workload, runtime};
use crate::handler::{Handler, HandlerError, Outcome};
use crate::metrics::StatsSnapshot;
use crate::record::Record;
use crate::runtime::Runtime;
use crate::store::{DedupEntry, Inspect, PartitionId, Store};
use crate::testkit::cluster::{producer, send};

/// The handler under test: each call held `pace` first (a kill storm's, so that batches stay
/// open long enough for a signal to land in them); the incarnation crashes right after its
/// `crash_after`-th success.
pub(super) struct UnderTest<H> {
    pub(super) inner: H,
    pub(super) calls: std::sync::atomic::AtomicU64,
    pub(super) crash_after: Option<u64>,
    pub(super) crashed: Arc<tokio::sync::Notify>,
    pub(super) pace: Duration,
}

impl<H> UnderTest<H> {
    pub(super) fn new(inner: H) -> Self {
        UnderTest {
            inner,
            calls: Default::default(),
            crash_after: None,
            crashed: Default::default(),
            pace: Duration::ZERO,
        }
    }
}

impl<T: crate::Transaction, H: Handler<T>> Handler<T> for UnderTest<H> {
    async fn handle(&self, record: &Record, tx: &mut T) -> Result<Outcome, HandlerError> {
        if !self.pace.is_zero() {
            tokio::time::sleep(self.pace).await;
        }
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

/// Each partition's end offset once the whole workload is sent.
pub(super) fn ends_of(workload: &Workload) -> Vec<i64> {
    let mut ends = vec![0i64; workload.partitions as usize];
    for r in &workload.records {
        ends[r.partition as usize] += 1;
    }
    ends
}

/// One scenario's consumer incarnations on its store.
pub(super) struct Run<'a, P: HarnessStore, M> {
    pub(super) harness: &'a HandlerHarness<P, M>,
    pub(super) kept: &'a P::Kept,
    pub(super) bootstrap: String,
    /// The consumers' `session.timeout.ms` ([`TestCluster::session_timeout_ms`](crate::testkit::TestCluster::session_timeout_ms)).
    pub(super) session_ms: &'static str,
    pub(super) topic: &'a str,
    pub(super) group: &'a str,
    pub(super) ends: &'a [i64],
    pub(super) counted: StatsSnapshot,
    pub(super) crashes: u32,
    pub(super) kills: u32,
    pub(super) started: Instant,
}

impl<P, M, H> Run<'_, P, M>
where
    P: HarnessStore,
    M: Fn() -> H,
    H: Handler<<P::Store as Store>::Tx>,
{
    /// Records not committed yet, by the store's positions.
    pub(super) fn left(&self, rt: &tokio::runtime::Runtime) -> u64 {
        let store = self.harness.stores.open(self.kept, rt);
        rt.block_on(self.left_in(&store))
    }

    async fn left_in(&self, store: &P::Store) -> u64 {
        left(store, self.group, self.topic, self.ends).await
    }

    /// Starts a consumer on a runtime of its own; with `crash_after`, its handler hangs after
    /// that many successes.
    fn start(&self, crash_after: Option<u64>) -> Running<P::Store> {
        let rt = runtime();
        let store = self.harness.stores.open(self.kept, &rt);
        let handler = UnderTest {
            crash_after,
            ..UnderTest::new((self.harness.make)())
        };
        let crashed = handler.crashed.clone();
        let runtime = self
            .harness
            .builder(
                &self.bootstrap,
                self.session_ms,
                self.group,
                self.topic,
                |b| b,
            )
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
                self.in_time();
                if self.left_in(&running.store).await <= left {
                    return false;
                }
            }
        })
    }

    /// Panics once the scenario has taken longer than it may.
    pub(super) fn in_time(&self) {
        let timeout = self.harness.timeout;
        assert!(
            self.started.elapsed() < timeout,
            "the scenario did not finish in {timeout:?} (HandlerHarness::timeout)"
        );
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
        self.counted += stats.snapshot();
    }

    /// One consumer until everything is committed, or until its crash.
    pub(super) fn incarnation(&mut self, crash_after: Option<u64>) {
        let running = self.start(crash_after);
        let crashed = self.wait(&running, 0);
        self.end(running, crashed);
    }

    /// One consumer until the first third of the workload (all that was sent) is committed;
    /// then a second one joins the group and the rest is sent while the group rebalances;
    /// both run until everything is committed.
    pub(super) fn rebalance(&mut self, workload: &Workload) {
        let sent = workload.records.len() / 3;
        let first = self.start(None);
        self.wait(&first, (workload.records.len() - sent) as u64);
        let second = self.start(None);
        // Spread over about five seconds: the stream goes on through the rebalance.
        let rest = &workload.records[sent..];
        let producer = producer(&self.bootstrap).unwrap_or_else(|e| panic!("{e}"));
        for chunk in rest.chunks(rest.len().div_ceil(50).max(1)) {
            send(&producer, self.topic, chunk).unwrap_or_else(|e| panic!("{e}"));
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

/// Records of a scenario not committed yet, by the store's positions.
pub(super) async fn left<S: Inspect>(store: &S, group: &str, topic: &str, ends: &[i64]) -> u64 {
    let mut left = 0;
    for (p, end) in ends.iter().enumerate() {
        let id = PartitionId::new(group, topic, p as i32);
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

impl<P, M, H> HandlerHarness<P, M>
where
    P: HarnessStore,
    M: Fn() -> H,
    H: Handler<<P::Store as Store>::Tx>,
{
    /// A consumer's builder with the harness's settings, the scenario's (`scenario`), then
    /// the user's.
    pub(super) fn builder(
        &self,
        bootstrap: &str,
        session_ms: &str,
        group: &str,
        topic: &str,
        scenario: impl FnOnce(crate::RuntimeBuilder) -> crate::RuntimeBuilder,
    ) -> crate::RuntimeBuilder {
        let builder = scenario(
            Runtime::builder()
                .bootstrap_servers(bootstrap)
                .group_id(group)
                .topics([topic])
                .set("session.timeout.ms", session_ms)
                .set("heartbeat.interval.ms", "500"),
        );
        match &self.configure {
            Some(configure) => configure(builder),
            None => builder,
        }
    }
}
