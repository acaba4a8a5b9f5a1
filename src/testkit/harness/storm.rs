//! [`Scenario::KillStorm`](super::Scenario::KillStorm): real consumer processes killed with
//! SIGKILL. The consumer process is the test binary itself, started again with the running
//! test's name and [`CHILD_ENV`] set: its [`HandlerHarness::run`] then serves as the consumer
//! ([`HandlerHarness::serve_child`]) and ends the process, instead of running scenarios.

use std::process::Command;
use std::time::Duration;

use super::run::{Run, UnderTest, left};
use super::{HandlerHarness, HarnessStore, Random, runtime};
use crate::handler::Handler;
use crate::store::Store;
use crate::testkit::{ConsumerProcess, serve_reporting};

/// The environment variable that makes a copy of the test binary a consumer: the
/// [`ChildSpec`] as JSON.
const CHILD_ENV: &str = "IDC_TESTKIT_CONSUMER";

/// How long a kill storm holds each handler call, so that a batch is open when a kill lands:
/// 5 ms, less for a workload so large that one pass would be held more than about 4 s.
fn pace(ends: &[i64]) -> Duration {
    let records: i64 = ends.iter().sum();
    let per_partition = (records / ends.len().max(1) as i64).max(1) as u32;
    (Duration::from_secs(4) / per_partition).min(Duration::from_millis(5))
}

/// A kill storm's batch bound (records per commit), unless the handler's options set one.
const BATCH: usize = 4;

/// What a consumer process consumes, and where.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct ChildSpec {
    /// The harness's kind of store (its type's name): a copy that reaches a `run` call of
    /// another kind first passes it by.
    pub(super) kind: String,
    /// The store's [`HarnessStore::address`].
    address: String,
    bootstrap: String,
    session_ms: String,
    topic: String,
    group: String,
    /// Each partition's end offset: the process ends once its store has committed them all.
    ends: Vec<i64>,
}

/// Whether this process is a kill storm's consumer ([`Scenario::KillStorm`](super::Scenario::KillStorm)):
/// a program outside libtest that starts a kill storm can go straight to its
/// [`HandlerHarness::run`] call when it is, which then serves as the consumer and ends the
/// process. A `run` call whose kind of store is not the storm's returns an empty [`Report`](super::Report).
pub fn is_consumer_process() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The consumer this process is to be, when a kill storm started it.
pub(super) fn child_spec() -> Option<ChildSpec> {
    let spec = std::env::var(CHILD_ENV).ok()?;
    // Not shown: the address may hold a database password.
    Some(
        serde_json::from_str(&spec).unwrap_or_else(|e| {
            panic!("{CHILD_ENV} is set but is not a consumer's description ({e})")
        }),
    )
}

impl<P, M, H> HandlerHarness<P, M>
where
    P: HarnessStore,
    M: Fn() -> H,
    H: Handler<<P::Store as Store>::Tx>,
{
    /// Runs this process as a kill storm's consumer until its store has committed every
    /// record, reporting its counters on standard output; then ends the process (exit status
    /// 0, or 1 with the reason on standard error).
    pub(super) fn serve_child(&self, spec: &ChildSpec) -> ! {
        let rt = runtime();
        let store = self.stores.open_at(&spec.address, &rt);
        let handler = UnderTest {
            pace: pace(&spec.ends),
            ..UnderTest::new((self.make)())
        };
        // A static member: a restarted process takes its killed predecessor's place at once
        // instead of waiting for that one's session to expire.
        let built = self
            .builder(
                &spec.bootstrap,
                &spec.session_ms,
                &spec.group,
                &spec.topic,
                |b| {
                    // Small batches: each process commits several before its kill.
                    b.batch(BATCH, Duration::from_millis(20))
                        .set("group.instance.id", format!("{}-storm", spec.group))
                },
            )
            .store(store.clone())
            .build(handler);
        let result = built.and_then(|runtime| {
            rt.block_on(serve_reporting(runtime, || {
                let store = store.clone();
                async move { left(&store, &spec.group, &spec.topic, &spec.ends).await == 0 }
            }))
        });
        drop(store);
        drop(rt);
        match result {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("kill storm consumer: {e}");
                std::process::exit(1)
            }
        }
    }
}

impl<P, M, H> Run<'_, P, M>
where
    P: HarnessStore,
    M: Fn() -> H,
    H: Handler<<P::Store as Store>::Tx>,
{
    /// `kills` consumer processes, each killed with SIGKILL once it has settled a random share
    /// of what is left, then one run to the end.
    pub(super) fn storm(&mut self, kills: u32) {
        let address = self.harness.stores.address(self.kept).unwrap_or_else(|| {
            panic!(
                "Scenario::KillStorm needs a store another process can open (RocksDB, \
                 PostgreSQL); this one lives in the test's process"
            )
        });
        let spec = serde_json::to_string(&ChildSpec {
            kind: std::any::type_name::<P>().to_owned(),
            address,
            bootstrap: self.bootstrap.clone(),
            session_ms: self.session_ms.to_owned(),
            topic: self.topic.to_owned(),
            group: self.group.to_owned(),
            ends: self.ends.to_vec(),
        })
        .expect("describing the consumer");
        let records: i64 = self.ends.iter().sum();
        let mut random = Random::new(records as usize);
        for k in 0..kills {
            let mut child = self.spawn(&spec);
            // Killed once it has settled a random share of what is left (what the killed ones
            // settled is counted): after some commits, with the next batch open or committing.
            let left = (records as u64).saturating_sub(self.counted.settled());
            let share = 1 + random.below(left / u64::from(kills - k + 1));
            if !self.until_settled(&mut child, share) {
                // Everything was committed before the kill: the storm is over.
                self.finished(child);
                return;
            }
            std::thread::sleep(pace(self.ends) * random.below(4) as u32);
            if child.sigkill() {
                self.kills += 1;
            }
            let last = child.snapshot();
            tracing::info!(
                kill = k + 1,
                settled = last.settled(),
                after = ?self.started.elapsed(),
                "kill storm: a consumer process killed"
            );
            self.counted += last;
        }
        let child = self.spawn(&spec);
        self.finished(child);
    }

    /// Starts a copy of the test binary as the consumer `spec` describes.
    fn spawn(&self, spec: &str) -> ConsumerProcess {
        let exe = std::env::current_exe().expect("finding the test binary");
        let mut command = Command::new(exe);
        match std::thread::current().name() {
            // libtest runs each test on a thread named after it.
            Some(test) if test != "main" => {
                command.args([test, "--exact", "--nocapture", "--test-threads", "1"]);
            }
            _ => {
                command.args(std::env::args_os().skip(1));
            }
        }
        command.env(CHILD_ENV, spec);
        ConsumerProcess::start(command).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until `child` has settled `records` records (true), or ended by itself (false).
    fn until_settled(&self, child: &mut ConsumerProcess, records: u64) -> bool {
        loop {
            if child.exited().is_some() {
                return false;
            }
            if child.snapshot().settled() >= records {
                return true;
            }
            self.in_time();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for `child` to commit everything and end by itself; counts what it did.
    fn finished(&mut self, mut child: ConsumerProcess) {
        let timeout = self.harness.timeout;
        let left = timeout.saturating_sub(self.started.elapsed());
        match child.wait(left).expect("waiting for the consumer process") {
            Some(status) if status.success() => {
                child.settled_stats();
                self.counted += child.snapshot();
            }
            Some(status) => panic!(
                "a kill storm's consumer process failed ({status}); its standard error is above"
            ),
            None => panic!("the scenario did not finish in {timeout:?} (HandlerHarness::timeout)"),
        }
        if self.counted.records_read == 0 {
            panic!(
                "the kill storm's consumer process ended without reading a record: it must \
                 reach HandlerHarness::run as the test does (see Scenario::KillStorm)"
            );
        }
    }
}
