//! Test support (feature `testkit`): what the project's own tests, fault harness and benchmark
//! share, kept as a module of the crate so that users can run the same machinery against their
//! own handlers.
//!
//! - [`TestCluster`]: the cluster a test runs against (a mock cluster in this process, a
//!   [`BrokerProcess`], or the one `KAFKA_BOOTSTRAP_SERVERS` names), with topic creation and
//!   producing of keyed records ([`harness::WorkRecord`]s, [`Workload`]s) on each;
//! - [`BrokerProcess`] and [`serve_mock_broker`]: a Kafka broker (librdkafka's mock cluster) in
//!   a process of its own, which outlives every `kill -9` of the consumers under test, with
//!   faults injected by command;
//! - [`ConsumerProcess`] and [`serve_reporting`]: a consumer in a process of its own, to be
//!   killed (`kill -9`), frozen past its session, resumed or stopped gracefully while the test
//!   reads the counters it reports;
//! - [`ThrowawayDb`] (with feature `postgres`): a PostgreSQL database of its own per test or
//!   run, dropped with the value;
//! - [`HandlerHarness`]: a user's handler run through crashes between handler and commit,
//!   redeliveries, repeated keys and conflicts on a store of its own per scenario, with a
//!   [`Report`] of what was lost or doubled (module [`harness`]).
//!
//! Nothing here is meant for production code paths.

mod broker;
mod cluster;
pub mod harness;
mod process;
#[cfg(feature = "postgres")]
mod throwaway_db;

pub use broker::{BrokerProcess, serve_mock_broker};
pub use cluster::TestCluster;
pub use harness::{HandlerHarness, HarnessStore, Report, Scenario, ScenarioReport, Workload};
pub use process::{ConsumerProcess, serve_reporting};

#[cfg(feature = "postgres")]
pub use throwaway_db::ThrowawayDb;
