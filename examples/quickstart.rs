//! Quickstart: payments applied exactly once through crashes, retries and a replay.
//!
//! What it shows: librdkafka's in-process mock cluster (nothing to install or start) carries a
//! stream of payment events in which about a fifth re-send an earlier idempotency key at a new
//! offset, and one re-sends a key with a different amount. A consumer on a RocksDB store in a
//! temporary directory applies them to account balances. It is crashed twice mid-stream, right
//! after its handler wrote a payment and before the batch committed, and restarted each time;
//! then an operator rewinds one partition and replays it.
//!
//! Delivery guarantee: each payment's balance update, its dedup entry and the partition position
//! are committed in one RocksDB write, so the final balances equal the ledger computed from the
//! unique payments, whatever crashed when. The program prints a summary and exits non-zero if
//! anything differs.
//!
//! Run: `cargo run --example quickstart` (add `RUST_LOG=info` for per-record traces; Ctrl-C or SIGTERM
//! stops a run gracefully).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotent_consumer::{
    DeadLetterReason, Handler, HandlerError, Inspect, Outcome, PartitionId, Record, RocksStore,
    RocksTx, Runtime, StatsSnapshot,
};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio::sync::Notify;

const TOPIC: &str = "payments";
const PARTITIONS: i32 = 3;
const EVENTS: usize = 3_000;
const GROUP: &str = "ledger";
const ACCOUNTS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

#[derive(serde::Serialize, serde::Deserialize)]
struct Payment {
    account: String,
    amount: i64,
}

/// Applies a payment to `balance/<account>` in the batch's transaction. When `crash_after`
/// calls have completed, it writes the next payment and then never returns: the process is
/// killed between the handler and the commit.
struct Ledger {
    calls: AtomicU64,
    crash_after: Option<u64>,
    crashed: Arc<Notify>,
}

impl Handler<RocksTx> for Ledger {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let payment: Payment = record.json()?;
        let key = format!("balance/{}", payment.account);
        let balance = match tx.get(&key).map_err(HandlerError::retryable)? {
            Some(bytes) => parse_i64(&bytes).map_err(HandlerError::fatal)?,
            None => 0,
        } + payment.amount;
        tx.put(&key, balance.to_string());
        let done = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.crash_after.is_some_and(|n| done > n) {
            self.crashed.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(Outcome::bytes(balance.to_string()))
    }
}

fn parse_i64(bytes: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "stored balance is not a number".to_owned())
}

/// A small deterministic generator, so every run produces the same stream.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

struct Sent {
    /// Expected balances: each unique payment once.
    ledger: BTreeMap<String, i64>,
    repeats: u64,
    conflicts: u64,
    per_partition: [i64; PARTITIONS as usize],
}

fn produce(bootstrap: &str) -> Sent {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("creating the producer");
    let mut rng = Lcg(42);
    let mut originals: Vec<(String, i32, Payment)> = Vec::new();
    let mut sent = Sent {
        ledger: BTreeMap::new(),
        repeats: 0,
        conflicts: 0,
        per_partition: [0; PARTITIONS as usize],
    };
    for i in 0..EVENTS {
        // About a fifth re-send an earlier payment (a producer retry) at a new offset, possibly
        // on another partition; once, an earlier key comes back with another amount.
        let (key, partition, payment) = if i == EVENTS / 2 {
            let (key, partition, p) = &originals[7];
            sent.conflicts += 1;
            let changed = Payment {
                account: p.account.clone(),
                amount: p.amount + 1,
            };
            (key.clone(), *partition, changed)
        } else if i > 10 && rng.next(5) == 0 {
            let (key, _, p) = &originals[rng.next(originals.len() as u64) as usize];
            sent.repeats += 1;
            let copy = Payment {
                account: p.account.clone(),
                amount: p.amount,
            };
            (key.clone(), rng.next(PARTITIONS as u64) as i32, copy)
        } else {
            let account = ACCOUNTS[rng.next(ACCOUNTS.len() as u64) as usize].to_owned();
            let amount = rng.next(10_000) as i64 - 2_000;
            *sent.ledger.entry(account.clone()).or_default() += amount;
            let key = format!("pay-{i:05}");
            let partition = rng.next(PARTITIONS as u64) as i32;
            originals.push((
                key.clone(),
                partition,
                Payment {
                    account: account.clone(),
                    amount,
                },
            ));
            (key, partition, Payment { account, amount })
        };
        let payload = serde_json::to_vec(&payment).expect("serializing a payment");
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(key.as_bytes()),
        });
        producer
            .send(
                BaseRecord::<(), [u8]>::to(TOPIC)
                    .partition(partition)
                    .payload(&payload)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .expect("producing a payment");
        sent.per_partition[partition as usize] += 1;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flushing");
    sent
}

/// One run of the consumer, on its own tokio runtime like one process. Ends after `crash_after`
/// handler calls (crash), when the partitions reach `end` (graceful stop), or on Ctrl-C.
fn incarnation(
    bootstrap: &str,
    dir: &std::path::Path,
    crash_after: Option<u64>,
    end: &[i64],
) -> StatsSnapshot {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting tokio");
    let store = RocksStore::open(dir).expect("opening the store");
    let crashed = Arc::new(Notify::new());
    let runtime = Runtime::builder()
        .bootstrap_servers(bootstrap)
        .group_id(GROUP)
        .topics([TOPIC])
        .set("session.timeout.ms", "6000")
        .batch(200, Duration::from_millis(20))
        .store(store.clone())
        .build(Ledger {
            calls: AtomicU64::new(0),
            crash_after,
            crashed: crashed.clone(),
        })
        .expect("building the consumer");
    let stats = runtime.stats();
    let done = Arc::new(Notify::new());
    let finished = done.clone();
    let task = rt.spawn(runtime.run(async move {
        tokio::select! {
            () = finished.notified() => {}
            () = interrupted() => eprintln!("interrupted: draining and committing"),
        }
    }));
    let caught_up = async || {
        for p in 0..PARTITIONS {
            let id = PartitionId::new(GROUP, TOPIC, p);
            let stored = store.position(&id).await.ok().flatten();
            if stored.and_then(|s| s.next_offset).unwrap_or(0) < end[p as usize] {
                return false;
            }
        }
        true
    };
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            tokio::select! {
                () = crashed.notified() => {
                    println!("  crash: the handler wrote a payment, the process dies before the commit");
                    return;
                }
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if task.is_finished() || (crash_after.is_none() && caught_up().await) {
                done.notify_one();
                return;
            }
            assert!(Instant::now() < deadline, "the consumer made no progress for two minutes");
        }
    });
    if crash_after.is_none() {
        let result = rt.block_on(task).expect("consumer task panicked");
        result.expect("consumer failed");
    }
    // Dropping the runtime drops every task where it stands: a crash when one was pending.
    drop(store);
    drop(rt);
    // Read only now: until the drop, other partitions could still commit batches.
    stats.snapshot()
}

/// Completes on Ctrl-C or SIGTERM.
async fn interrupted() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let mock = MockCluster::new(1).expect("starting the mock cluster");
    mock.create_topic(TOPIC, PARTITIONS, 1)
        .expect("creating the topic");
    // Dead letters are kept in the store and produced to `<topic>.dlq`.
    mock.create_topic(&format!("{TOPIC}.dlq"), 1, 1)
        .expect("creating the dead-letter topic");
    let bootstrap = mock.bootstrap_servers();
    let dir = tempfile::tempdir().expect("creating a temporary directory");

    println!("producing {EVENTS} payment events to {TOPIC} ({PARTITIONS} partitions)...");
    let sent = produce(&bootstrap);
    let end = sent.per_partition;
    println!(
        "  {} re-sent keys with the same payload, {} re-sent key with another amount",
        sent.repeats, sent.conflicts
    );

    let mut runs = Vec::new();
    println!("run 1: consuming, crashing after 800 payments");
    runs.push(incarnation(&bootstrap, dir.path(), Some(800), &end));
    println!("run 2: restarting, crashing after 900 more");
    runs.push(incarnation(&bootstrap, dir.path(), Some(900), &end));
    println!("run 3: restarting, running to the end");
    runs.push(incarnation(&bootstrap, dir.path(), None, &end));

    // An operator replays partition 0 from the start: every record is a counted no-op.
    let operator = tokio::runtime::Runtime::new().expect("starting a tokio runtime");
    operator
        .block_on(async {
            let store = RocksStore::open(dir.path())?;
            store
                .set_position(&PartitionId::new(GROUP, TOPIC, 0), 0)
                .await
        })
        .expect("rewinding partition 0");
    println!("run 4: operator rewinds partition 0 to offset 0 and replays it");
    runs.push(incarnation(&bootstrap, dir.path(), None, &end));

    let first_pass = |f: fn(&StatsSnapshot) -> u64| runs[..3].iter().map(f).sum::<u64>();
    let replay = runs[3];
    let store = RocksStore::open(dir.path()).expect("reopening the store");
    let balances: BTreeMap<String, i64> = store
        .scan_prefix(b"balance/")
        .expect("reading balances")
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k[8..]).into_owned(),
                parse_i64(&v).unwrap(),
            )
        })
        .collect();
    let dead: Vec<_> = (0..PARTITIONS)
        .flat_map(|p| {
            let partition = PartitionId::new(GROUP, TOPIC, p);
            operator
                .block_on(store.dead_letters(&partition))
                .expect("reading dead letters")
        })
        .collect();
    let conflicts_kept = dead
        .iter()
        .filter(|d| d.reason == DeadLetterReason::Conflict)
        .count();

    println!();
    println!("summary                  runs 1-3 (2 crashes)   run 4 (replay of partition 0)");
    let row = |name: &str, f: fn(&StatsSnapshot) -> u64| {
        println!("  {name:<24}{:>10}{:>22}", first_pass(f), f(&replay));
    };
    row("records read", |s| s.records_read);
    row("applied", |s| s.applied);
    row("duplicates: redelivery", |s| s.duplicates_redelivery);
    row("duplicates: repeated key", |s| s.duplicates_repeated_key);
    row("conflicts", |s| s.conflicts);
    println!("  conflicting records kept as dead letters: {conflicts_kept}");
    println!();
    println!("  {:<8} {:>12} {:>12}", "account", "balance", "expected");
    let mut ok = true;
    for account in ACCOUNTS {
        let (got, want) = (
            balances.get(account).copied(),
            sent.ledger.get(account).copied(),
        );
        let mark = if got == want { "" } else { "  MISMATCH" };
        ok &= got == want;
        println!("  {account:<8} {:>12} {:>12}{mark}", fmt(got), fmt(want));
    }
    let unique = (EVENTS as u64) - sent.repeats - sent.conflicts;
    let replayed = replay.duplicates() + replay.conflicts;
    let checks = [
        (
            "every unique payment applied exactly once",
            first_pass(|s| s.applied) == unique,
        ),
        (
            "every re-sent key skipped as a duplicate",
            first_pass(|s| s.duplicates_repeated_key) == sent.repeats,
        ),
        (
            "the changed amount caught as a conflict",
            first_pass(|s| s.conflicts) == 1 && conflicts_kept == 1,
        ),
        (
            "the replay applied nothing",
            replay.applied == 0 && replayed == end[0] as u64,
        ),
        ("balances equal the expected ledger", ok),
    ];
    let mut failed = false;
    for (what, passed) in checks {
        println!("  [{}] {what}", if passed { "ok" } else { "FAILED" });
        failed |= !passed;
    }
    if failed {
        std::process::exit(1);
    }
}

fn fmt(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}
