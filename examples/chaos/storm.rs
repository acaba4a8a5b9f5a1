//! The `kill-storm` scenario, on the crate's test kit: the transfers of [`Plan`] journaled by
//! [`Journal`] under `testkit::Scenario::KillStorm`, which kills real consumer processes (this
//! binary, started again with the same arguments) with SIGKILL mid-batch. The kit reports the
//! keys lost and doubled; the checks here add the ledger, each key's transfer and the
//! conflicting records dead-lettered.
//!
//! The consumer processes re-run `main` with the harness's environment variable set:
//! [`serve`] then goes straight to the kit, whose `run` call of the storm's kind of store
//! serves as the consumer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use idempotent_consumer::testkit::harness::{PostgresStores, RocksDbStores, Workload};
use idempotent_consumer::testkit::{HandlerHarness, Report, Scenario};
use idempotent_consumer::{PgStore, RocksStore};

use super::{ACCOUNTS, Journal, PARTITIONS, Plan, Res, Transfer};

const JOURNAL: &str = "CREATE TABLE chaos_journal (key text NOT NULL, src text NOT NULL, \
                       dst text NOT NULL, amount bigint NOT NULL)";

/// How long the storm may take (50,000 records and 20 kills take about three minutes).
const TIMEOUT: Duration = Duration::from_secs(900);

/// Each key journaled: how many times, and the transfer (the first one seen).
pub(crate) type Journaled = HashMap<String, (u64, Transfer)>;

/// This process is a kill storm's consumer: the `run` call of its kind of store serves.
pub(crate) fn serve(records: u64, kills: u64, seed: u64) -> Res<()> {
    for store in ["rocksdb", "postgres"] {
        kill_storm(store, records, kills, seed)?;
    }
    Err("a kill storm's consumer found no store of its kind".into())
}

/// Runs the storm on `store`; true when every check held.
pub(crate) fn kill_storm(store: &str, records: u64, kills: u64, seed: u64) -> Res<bool> {
    let plan = Plan::new(records, seed, false);
    let mut work = Workload::new(PARTITIONS);
    for (partition, key, transfer) in &plan.planned {
        let payload = serde_json::to_vec(transfer).map_err(|e| e.to_string())?;
        work = work.record_on(*partition, key.clone(), payload);
    }
    let scenarios = [Scenario::KillStorm {
        kills: u32::try_from(kills).map_err(|_| "too many kills")?,
    }];
    let make = || Journal {
        delay: Duration::ZERO,
    };
    let journaled = std::cell::RefCell::new(Journaled::new());
    let report = match store {
        "rocksdb" => HandlerHarness::new(RocksDbStores, make)
            .timeout(TIMEOUT)
            .run(
                &work,
                &scenarios,
                async |s: &RocksStore| counts(&journaled, rocks_journal(s)),
                async |_, _| Ok(()),
            ),
        "postgres" => {
            let admin_url = std::env::var("DATABASE_URL")
                .map_err(|_| "DATABASE_URL is not set: the PostgreSQL kill storm needs it")?;
            HandlerHarness::new(PostgresStores::new(admin_url, JOURNAL), make)
                .timeout(TIMEOUT)
                .run(
                    &work,
                    &scenarios,
                    async |s: &PgStore| counts(&journaled, pg_journal(s).await),
                    async |_, _| Ok(()),
                )
        }
        other => return Err(format!("unknown store {other:?}")),
    };
    if report.scenarios.is_empty() {
        // A consumer process of the other kind of store's storm: not this one.
        return Ok(false);
    }
    Ok(check(store, &plan, &report, &journaled.into_inner()))
}

/// Keeps what the store journaled for the checks; gives the kit each key's count.
fn counts(keep: &std::cell::RefCell<Journaled>, read: Res<Journaled>) -> BTreeMap<String, u64> {
    let journaled = read.unwrap_or_else(|e| panic!("reading the journal: {e}"));
    let counts = journaled
        .iter()
        .map(|(k, (n, _))| (k.clone(), *n))
        .collect();
    *keep.borrow_mut() = journaled;
    counts
}

/// What a RocksDB store journaled: `count/<key>` and `xfer/<key>`.
pub(crate) fn rocks_journal(store: &RocksStore) -> Res<Journaled> {
    let mut transfers: HashMap<String, Transfer> = HashMap::new();
    for (k, v) in store.scan_prefix(b"xfer/").map_err(|e| e.to_string())? {
        let key = String::from_utf8_lossy(&k["xfer/".len()..]).into_owned();
        transfers.insert(key, serde_json::from_slice(&v).map_err(|e| e.to_string())?);
    }
    let mut journaled = Journaled::new();
    for (k, v) in store.scan_prefix(b"count/").map_err(|e| e.to_string())? {
        let key = String::from_utf8_lossy(&k["count/".len()..]).into_owned();
        let n: u64 = String::from_utf8_lossy(&v).parse().unwrap_or(0);
        let t = transfers
            .remove(&key)
            .ok_or_else(|| format!("no transfer journaled under {key}"))?;
        journaled.insert(key, (n, t));
    }
    Ok(journaled)
}

/// What a PostgreSQL store journaled: rows of `chaos_journal`, grouped by key.
pub(crate) async fn pg_journal(store: &PgStore) -> Res<Journaled> {
    let rows: Vec<(String, i64, String, String, i64, i64)> = sqlx::query_as(
        "SELECT key, count(*), min(src), min(dst), min(amount), max(amount) \
         FROM chaos_journal GROUP BY key",
    )
    .fetch_all(store.pool())
    .await
    .map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .map(|(key, n, from, to, min, max)| {
            // Two amounts under one key: a conflict applied, a double application at least.
            let n = if min == max { n } else { n.max(2) };
            let t = Transfer {
                from,
                to,
                amount: min,
            };
            (key, (n as u64, t))
        })
        .collect())
}

/// The kit's report, each key's transfer, the conflicts dead-lettered and the ledger; prints
/// the scenario's `CHAOS` line.
fn check(store: &str, plan: &Plan, report: &Report, journaled: &Journaled) -> bool {
    let mut problems = Vec::new();
    let scenario = &report.scenarios[0];
    if !scenario.holds() {
        problems.push(format!("the kit's report: {scenario}"));
    }
    for (key, (_, t)) in journaled {
        match plan.originals.get(key) {
            Some(original) if original == t => {}
            Some(original) => {
                problems.push(format!("key {key} applied with {t:?}, not {original:?}"))
            }
            None => problems.push(format!("unknown key {key} applied")),
        }
    }
    let letters: BTreeSet<&str> = scenario.dead_letters.iter().map(String::as_str).collect();
    let conflicting: BTreeSet<&str> = plan
        .planned
        .iter()
        .filter(|(_, key, t)| plan.originals.get(key) != Some(t))
        .map(|(_, key, _)| key.as_str())
        .collect();
    for key in conflicting.difference(&letters).take(10) {
        problems.push(format!("a conflicting record of {key} not dead-lettered"));
    }
    let mut expected: BTreeMap<&str, i64> = BTreeMap::new();
    for t in plan.originals.values() {
        *expected.entry(&t.from).or_default() -= t.amount;
        *expected.entry(&t.to).or_default() += t.amount;
    }
    let mut actual: BTreeMap<&str, i64> = BTreeMap::new();
    for (n, t) in journaled.values() {
        *actual.entry(&t.from).or_default() -= t.amount * *n as i64;
        *actual.entry(&t.to).or_default() += t.amount * *n as i64;
    }
    if expected != actual {
        problems.push(format!(
            "the ledger of {ACCOUNTS} accounts differs from the expected one"
        ));
    }
    for p in &problems {
        eprintln!("chaos: VIOLATION kill-storm/{store}: {p}");
    }
    let c = &scenario.counted;
    println!(
        "CHAOS scenario=kill-storm store={store} records={} kills={} applied={} duplicates={} conflicts={} lost={} doubled={}",
        plan.planned.len(),
        scenario.kills,
        journaled.len(),
        c.duplicates(),
        letters.len(),
        scenario.lost.len(),
        scenario.doubled.len(),
    );
    problems.is_empty()
}
