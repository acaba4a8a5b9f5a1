//! The test kit as a user meets it: a payments handler proven exactly-once with
//! `HandlerHarness` on RocksDB and on PostgreSQL (crashes between handler and commit, a
//! redelivery of everything after a rewind, repeated keys, a conflicting repeat, and on
//! PostgreSQL a rebalance mid-stream between two instances), and a handler that writes its
//! effect outside the store's transaction caught doubling payments.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use idempotent_consumer::testkit::harness::{MemoryStores, PostgresStores, RocksDbStores};
use idempotent_consumer::testkit::{
    BrokerProcess, HandlerHarness, Scenario, TestCluster, Workload, serve_mock_broker,
};
use idempotent_consumer::{
    Handler, HandlerError, MemoryStore, MemoryTx, Outcome, PgStore, PgTx, Record, RocksStore,
    RocksTx,
};

/// Sixty payments, one in five sent twice, one key re-used with another amount.
fn payments() -> Workload {
    Workload::new(3)
        .records((0..60).map(|i| (format!("pay-{i}"), format!("{}", i * 10).into_bytes())))
        .repeats(5)
        .conflicting_repeat("pay-7", b"999".to_vec())
}

const SCENARIOS: [Scenario; 3] = [
    Scenario::Clean,
    Scenario::CrashBeforeCommit { crashes: 3 },
    Scenario::RedeliveryAfterRewind,
];

/// The invariant: the total paid is the sum of the original payments.
fn paid_as_expected(total: i64, w: &Workload) -> Result<(), String> {
    let expected: i64 = w.originals().map(|r| num(&r.payload)).sum();
    match total == expected {
        true => Ok(()),
        false => Err(format!("paid {total}, expected {expected}")),
    }
}

fn num(bytes: &[u8]) -> i64 {
    String::from_utf8_lossy(bytes).parse().unwrap()
}

/// Counts each payment under `paid/<key>` and adds it to `total`, in the batch's transaction.
struct Payments;

impl Handler<RocksTx> for Payments {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let key = format!(
            "paid/{}",
            String::from_utf8_lossy(record.key().unwrap_or_default())
        );
        for (k, add) in [
            (key.as_str(), 1),
            ("total", num(record.payload().unwrap_or_default())),
        ] {
            let now = tx
                .get(k)
                .map_err(HandlerError::retryable)?
                .map_or(0, |v| num(&v));
            tx.put(k, (now + add).to_string());
        }
        Ok(Outcome::none())
    }
}

async fn rocks_effects(store: &RocksStore) -> BTreeMap<String, u64> {
    let rows = store.scan_prefix(b"paid/").unwrap().into_iter();
    rows.map(|(k, v)| {
        (
            String::from_utf8_lossy(&k[5..]).into_owned(),
            num(&v) as u64,
        )
    })
    .collect()
}

async fn rocks_total(store: &RocksStore, w: &Workload) -> Result<(), String> {
    let total = store.get(b"total").unwrap().map_or(0, |v| num(&v));
    paid_as_expected(total, w)
}

#[test]
fn rocksdb_payments_are_exactly_once() {
    let report = HandlerHarness::new(RocksDbStores, || Payments).run(
        &payments(),
        &SCENARIOS,
        rocks_effects,
        rocks_total,
    );
    report.assert_exactly_once();
    assert_eq!(report.crashes(), 3);
    println!("{report}");
}

/// Consumer processes (this test binary, started again) killed with SIGKILL mid-batch.
#[test]
fn rocksdb_payments_survive_a_kill_storm() {
    let report = HandlerHarness::new(RocksDbStores, || Payments).run(
        &payments(),
        &[Scenario::KillStorm { kills: 3 }],
        rocks_effects,
        rocks_total,
    );
    report.assert_exactly_once();
    assert_eq!(report.kills(), 3, "{report}");
    println!("{report}");
}

/// The same on PostgreSQL: each payment a row of `paid`, inserted in the batch's transaction.
struct PgPayments;

impl Handler<PgTx> for PgPayments {
    async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        let amount: i64 = String::from_utf8_lossy(record.payload().unwrap_or_default())
            .parse()
            .map_err(HandlerError::permanent)?;
        sqlx::query("INSERT INTO paid (key, amount) VALUES ($1, $2)")
            .bind(key)
            .bind(amount)
            .execute(tx.conn())
            .await
            .map_err(HandlerError::retryable)?;
        Ok(Outcome::none())
    }
}

fn pg_stores() -> PostgresStores {
    let admin_url = std::env::var("DATABASE_URL").expect("DATABASE_URL: the test command sets it");
    // No primary key on purpose: a payment applied twice would be two rows.
    PostgresStores::new(admin_url, "CREATE TABLE paid (key text, amount bigint)")
}

async fn pg_effects(store: &PgStore) -> BTreeMap<String, u64> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT key, count(*) FROM paid GROUP BY key")
        .fetch_all(store.pool())
        .await
        .unwrap();
    rows.into_iter().map(|(k, n)| (k, n as u64)).collect()
}

async fn pg_total(store: &PgStore, w: &Workload) -> Result<(), String> {
    let total: i64 = sqlx::query_scalar("SELECT coalesce(sum(amount), 0)::bigint FROM paid")
        .fetch_one(store.pool())
        .await
        .unwrap();
    paid_as_expected(total, w)
}

#[test]
fn postgres_payments_are_exactly_once() {
    let report = HandlerHarness::new(pg_stores(), || PgPayments).run(
        &payments(),
        &[&SCENARIOS[..], &[Scenario::RebalanceMidStream]].concat(),
        pg_effects,
        pg_total,
    );
    report.assert_exactly_once();
    println!("{report}");
}

#[test]
fn postgres_payments_survive_a_kill_storm() {
    let report = HandlerHarness::new(pg_stores(), || PgPayments).run(
        &payments(),
        &[Scenario::KillStorm { kills: 3 }],
        pg_effects,
        pg_total,
    );
    report.assert_exactly_once();
    assert_eq!(report.kills(), 3, "{report}");
    println!("{report}");
}

/// Writes its effect to a map outside the store: the effect of a crashed batch stays, and
/// the record is handled again after the restart.
struct Leaky(Arc<Mutex<BTreeMap<String, u64>>>);

impl Handler<RocksTx> for Leaky {
    async fn handle(&self, record: &Record, _tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        *self.0.lock().unwrap().entry(key).or_default() += 1;
        Ok(Outcome::none())
    }
}

#[test]
fn a_handler_writing_outside_the_transaction_is_caught_doubling() {
    let effects = Arc::new(Mutex::new(BTreeMap::new()));
    let handed = effects.clone();
    let report = HandlerHarness::new(RocksDbStores, move || Leaky(handed.clone())).run(
        &payments(),
        &[Scenario::CrashBeforeCommit { crashes: 2 }],
        async |_| std::mem::take(&mut *effects.lock().unwrap()),
        async |_, _| Ok(()),
    );
    assert!(report.doubled() > 0, "the kit saw nothing wrong:\n{report}");
    assert_eq!(report.lost(), 0);
    let shown = std::panic::catch_unwind(|| report.assert_exactly_once())
        .expect_err("the report fails the test");
    let message = shown.downcast_ref::<String>().unwrap();
    assert!(message.contains("doubled: pay-"), "{message}");
}

#[test]
#[should_panic(expected = "needs a store two consumer instances share")]
fn a_rebalance_on_a_store_of_one_process_is_refused() {
    HandlerHarness::new(RocksDbStores, || Payments).run(
        &payments(),
        &[Scenario::RebalanceMidStream],
        async |_| BTreeMap::new(),
        async |_, _| Ok(()),
    );
}

/// The same on the memory store: every scenario but the kill storm, in this process.
struct MemPayments;

impl Handler<MemoryTx> for MemPayments {
    async fn handle(&self, record: &Record, tx: &mut MemoryTx) -> Result<Outcome, HandlerError> {
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        let amount = num(record.payload().unwrap_or_default());
        for (k, add) in [(format!("paid/{key}"), 1), ("total".to_owned(), amount)] {
            let now = tx
                .get(&k)
                .map_err(HandlerError::retryable)?
                .map_or(0, |v| num(&v));
            tx.put(k, (now + add).to_string());
        }
        Ok(Outcome::none())
    }
}

/// How many times each payment of `w` was counted (the memory store is read key by key).
fn mem_paid(store: &MemoryStore, w: &Workload) -> BTreeMap<String, u64> {
    let paid = |k: &str| store.get(format!("paid/{k}")).map_or(0, |v| num(&v));
    w.originals()
        .map(|r| (r.key.clone(), paid(&r.key) as u64))
        .filter(|(_, n)| *n > 0)
        .collect()
}

#[test]
fn memory_payments_are_exactly_once() {
    let work = payments();
    let report = HandlerHarness::new(MemoryStores, || MemPayments).run(
        &work,
        &[&SCENARIOS[..], &[Scenario::RebalanceMidStream]].concat(),
        async |store| mem_paid(store, &work),
        async |store, w| {
            let total = store.get("total").map_or(0, |v| num(&v));
            paid_as_expected(total, w)
        },
    );
    report.assert_exactly_once();
    println!("{report}");
}

#[test]
#[should_panic(expected = "needs a store another process can open")]
fn a_kill_storm_on_a_store_of_this_process_is_refused() {
    HandlerHarness::new(MemoryStores, || MemPayments).run(
        &payments(),
        &[Scenario::KillStorm { kills: 1 }],
        async |_| BTreeMap::new(),
        async |_, _| Ok(()),
    );
}

#[test]
#[should_panic(expected = "must be in the test's first HandlerHarness::run call")]
fn a_kill_storm_after_another_run_is_refused() {
    let harness = HandlerHarness::new(MemoryStores, || MemPayments);
    let none = Workload::new(1);
    harness.run(&none, &[], async |_| BTreeMap::new(), async |_, _| Ok(()));
    harness.run(
        &none,
        &[Scenario::KillStorm { kills: 1 }],
        async |_| BTreeMap::new(),
        async |_, _| Ok(()),
    );
}

/// Not a test of its own: the broker process of the test below (this binary, started again
/// with `TESTKIT_BROKER_HOST` set) hosts a mock cluster here until its standard input closes.
#[test]
fn broker_host() {
    if std::env::var_os("TESTKIT_BROKER_HOST").is_some() {
        let served = serve_mock_broker(1);
        std::process::exit(i32::from(served.is_err()));
    }
}

/// The kit on a broker in a process of its own: topics made through its commands.
#[test]
fn the_kit_runs_on_a_broker_process() {
    let mut host = std::process::Command::new(std::env::current_exe().unwrap());
    host.args(["broker_host", "--exact", "--nocapture"])
        .env("TESTKIT_BROKER_HOST", "1");
    let cluster = TestCluster::process(BrokerProcess::start(host).unwrap());
    let work = payments();
    let report = HandlerHarness::new(MemoryStores, || MemPayments)
        .cluster(cluster)
        .run(
            &work,
            &[Scenario::Clean],
            async |store| mem_paid(store, &work),
            async |_, _| Ok(()),
        );
    report.assert_exactly_once();
    assert_eq!(report.scenarios[0].counted.applied, 60, "{report}");
}
