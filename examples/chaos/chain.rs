//! The `chain` scenario: HTTP → outbox → Kafka → consumer, exactly once while every process in
//! the chain is killed with SIGKILL.
//!
//! Three more roles of the harness binary:
//! - `service`: an axum service on RocksDB or PostgreSQL with `IdempotencyLayer` around
//!   `POST /payments`; its handler records the payment and publishes an event through the
//!   request's transaction, and a relay in the same process produces committed events;
//! - `relay`: a second relay alone (PostgreSQL, where relays in several processes share the
//!   outbox's lease);
//! - `ledger`: the consumer downstream, on a RocksDB directory of its own, applying each event
//!   to a ledger (a count per payment, so a double application shows).
//!
//! The harness is the client: it pays `payments` times with keys of their own, retrying every
//! timeout, connection error, 409 and 5xx with the same key until it is answered, resending 20%
//! of the answered payments on purpose (they must come back replayed), and sending a few
//! invalid ones (a 400 that is kept, with nothing written). Meanwhile it kills one process of
//! the chain at random per round and starts it again. Then it lets the relays drain the
//! outbox, runs the ledger to the topic's end, and checks: the payments the service committed
//! are the ones the client was told were accepted, every one of them is in the ledger exactly
//! once with its amount, no other payment is there, no outbox row is left or dead, and every
//! repeat the relays produced was dropped by the ledger as a duplicate.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotent_consumer::http::IDEMPOTENT_REPLAYED;
use idempotent_consumer::outbox::OutboxStore;
use idempotent_consumer::testkit::ConsumerProcess;
use idempotent_consumer::{PgOptions, PgStore, RocksStore};
use rdkafka::ClientConfig;

use super::{Harness, Lcg, Res, StoreUnderTest, block_on, wait_until};

mod roles;

use roles::runtime;
pub(super) use roles::{ledger, relay, service};

/// Partitions of the events' topic.
const PARTITIONS: i32 = 2;
/// Accounts the payments are spread over (the events' key, so their partition).
const ACCOUNTS: u64 = 40;

#[derive(serde::Serialize, serde::Deserialize)]
struct Pay {
    account: String,
    amount: i64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Event {
    payment: String,
    account: String,
    amount: i64,
}

// ---------------------------------------------------------------------------------------------
// The client and the checks.

/// What the client was told about one payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accepted,
    Rejected,
}

/// The client's tallies.
#[derive(Default)]
struct Client {
    answers: std::sync::Mutex<HashMap<String, Answer>>,
    retries: AtomicU64,
    resent: AtomicU64,
    /// A resend answered as a first run, or with another answer: a broken replay.
    bad_replays: AtomicU64,
}

impl Client {
    /// Sends the payment until it is answered (201 or 400), retrying with the same key.
    async fn pay(
        &self,
        http: &reqwest::Client,
        base: &str,
        key: &str,
        p: &Pay,
        replay: bool,
    ) -> Res<Answer> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if Instant::now() > deadline {
                return Err(format!("payment {key} not answered in 180 s"));
            }
            let sent = http
                .post(format!("{base}/payments"))
                .header("idempotency-key", format!("\"{key}\""))
                .json(p)
                .send()
                .await;
            match sent {
                Ok(r) if r.status() == 201 || r.status() == 400 => {
                    let replayed = r.headers().get(IDEMPOTENT_REPLAYED).is_some();
                    if replay && !replayed {
                        self.bad_replays.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(if r.status() == 201 {
                        Answer::Accepted
                    } else {
                        Answer::Rejected
                    });
                }
                Ok(r) if r.status() == 422 => {
                    return Err(format!("payment {key}: 422 for the same request"));
                }
                // 409 in flight or superseded, a 5xx, a timeout, a refused connection.
                _ => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            }
        }
    }

    /// Pays payments `range` (16 at a time), resending every fifth once answered.
    async fn pay_all(&self, base: &str, range: std::ops::Range<u64>) -> Res<()> {
        use futures::StreamExt;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(1500))
            .build()
            .map_err(|e| e.to_string())?;
        let results: Vec<Res<()>> = futures::stream::iter(range)
            .map(|i| {
                let http = &http;
                async move {
                    let key = format!("pay-{i}");
                    let p = payment(i);
                    let first = self.pay(http, base, &key, &p, false).await?;
                    if i % 5 == 0 {
                        self.resent.fetch_add(1, Ordering::Relaxed);
                        let again = self.pay(http, base, &key, &p, true).await?;
                        if again != first {
                            self.bad_replays.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.answers.lock().unwrap().insert(key, first);
                    Ok(())
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// Payment `i`: every 40th is of nothing (refused).
fn payment(i: u64) -> Pay {
    Pay {
        account: format!("acct-{}", i % ACCOUNTS),
        amount: if i % 40 == 7 { 0 } else { (i % 97 + 1) as i64 },
    }
}

fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// The processes of the chain and how to start each again.
struct Chain {
    exe: std::path::PathBuf,
    kind: String,
    service_path: String,
    ledger_path: String,
    bootstrap: String,
    topic: String,
    group: String,
    port: u16,
    /// Duplicates the ledger incarnations counted, and records they applied.
    duplicates: u64,
}

impl Chain {
    fn start(&self, role: &str, until: Option<&str>) -> Res<ConsumerProcess> {
        let mut command = Command::new(&self.exe);
        command
            .arg(role)
            .args(["--bootstrap", &self.bootstrap, "--topic", &self.topic]);
        match role {
            "service" => command
                .args(["--store", &self.kind, "--path", &self.service_path])
                .args(["--port", &self.port.to_string()]),
            "relay" => command.args(["--path", &self.service_path]),
            _ => command.args(["--path", &self.ledger_path, "--group", &self.group]),
        };
        if let Some(until) = until {
            command.args(["--until", until]);
        }
        ConsumerProcess::start(command)
    }

    fn settle(&mut self, role: &str, last: &BTreeMap<String, u64>) {
        if role == "ledger" {
            self.duplicates += last.get("duplicates").copied().unwrap_or(0);
        }
    }
}

impl Harness {
    /// The chain scenario on `kind` (the service's store).
    pub(super) fn chain(&self, kind: &str, n: u64) -> Res<bool> {
        let topic = format!("chain-{n}-{}", std::process::id());
        self.command(&format!("topic {topic} {PARTITIONS}"))?;
        let service_store = StoreUnderTest::create(kind)?;
        if kind == "postgres" {
            block_on(async {
                let store = PgStore::connect_with(&service_store.path, PgOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query("CREATE TABLE chain_payments (id text PRIMARY KEY, account text NOT NULL, amount bigint NOT NULL)")
                    .execute(store.pool())
                    .await
                    .map_err(|e| e.to_string())?;
                store.pool().close().await;
                Res::Ok(())
            })?;
        }
        let ledger_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut chain = Chain {
            exe: std::env::current_exe().map_err(|e| e.to_string())?,
            kind: kind.to_owned(),
            service_path: service_store.path.clone(),
            ledger_path: ledger_dir.path().display().to_string(),
            bootstrap: self.bootstrap(),
            topic: topic.clone(),
            group: format!("ledger-{topic}"),
            port: free_port()?,
            duplicates: 0,
        };
        let roles: &[&str] = if kind == "postgres" {
            &["service", "relay", "ledger"]
        } else {
            &["service", "ledger"]
        };
        let mut running: HashMap<&str, ConsumerProcess> = HashMap::new();
        for role in roles {
            running.insert(role, chain.start(role, None)?);
        }
        let base = format!("http://127.0.0.1:{}", chain.port);
        let payments = self.chain_payments;
        let client = Arc::new(Client::default());
        let mut rng = Lcg(self.seed * 17 + n);
        let mut kills = 0u64;
        let rounds = self.kills.max(1);
        let client_rt = runtime()?;
        for round in 0..rounds {
            let range = (payments * round / rounds)..(payments * (round + 1) / rounds);
            let paying = client_rt.spawn({
                let (base, client) = (base.clone(), client.clone());
                async move { client.pay_all(&base, range).await }
            });
            std::thread::sleep(Duration::from_millis(100 + rng.next(500)));
            let role = roles[rng.next(roles.len() as u64) as usize];
            let victim = running.remove(role).ok_or("a role is not running")?;
            let last = victim.kill();
            chain.settle(role, &last);
            kills += 1;
            running.insert(role, chain.start(role, None)?);
            client_rt.block_on(paying).map_err(|e| e.to_string())??;
        }
        // Every relay left running drains the outbox.
        let drained = wait_until(Duration::from_secs(120), || {
            running
                .get("service")
                .is_some_and(|s| s.stat("backlog") == 0 && s.stats().contains_key("backlog"))
        });
        for role in roles.iter().filter(|r| **r != "ledger") {
            let process = running.remove(role).ok_or("a role is not running")?;
            stop(process)?;
        }
        let ends = topic_ends(&chain.bootstrap, &topic)?;
        let ledger = running
            .remove("ledger")
            .ok_or("the ledger is not running")?;
        let last = stop(ledger)?;
        chain.settle("ledger", &last);
        let until: Vec<String> = ends.iter().map(i64::to_string).collect();
        let mut last_ledger = chain.start("ledger", Some(&until.join(",")))?;
        let status = last_ledger
            .wait(Duration::from_secs(300))?
            .ok_or("the ledger did not reach the topic's end in 300 s")?;
        chain.settle("ledger", &last_ledger.settled_stats());
        if !status.success() {
            return Err(format!("the last ledger exited with {status}"));
        }

        let committed = read_payments(kind, &service_store.path)?;
        let (applied, amounts) = read_ledger(&chain.ledger_path)?;
        let answers = client.answers.lock().unwrap().clone();
        let mut problems = Vec::new();
        if !drained {
            problems.push(format!(
                "the outbox was not drained ({committed:?} rows left)",
                committed = committed.backlog
            ));
        }
        let mut lost = 0u64;
        let mut doubled = 0u64;
        for (key, answer) in &answers {
            let in_store = committed.payments.contains_key(key);
            match answer {
                Answer::Accepted if !in_store => {
                    lost += 1;
                    problems.push(format!("{key}: accepted, but not in the service's store"));
                }
                Answer::Rejected if in_store => {
                    doubled += 1;
                    problems.push(format!("{key}: refused, but recorded"));
                }
                _ => {}
            }
        }
        for (key, amount) in &committed.payments {
            if answers.get(key) != Some(&Answer::Accepted) {
                problems.push(format!(
                    "{key}: recorded, but the client was not told it was accepted"
                ));
            }
            match applied.get(key) {
                None => {
                    lost += 1;
                    problems.push(format!("{key}: accepted, never applied downstream"));
                }
                Some(n) if *n > 1 => {
                    doubled += n - 1;
                    problems.push(format!("{key}: applied {n} times downstream"));
                }
                Some(_) if amounts.get(key) != Some(amount) => {
                    problems.push(format!(
                        "{key}: applied with {:?}, not {amount}",
                        amounts.get(key)
                    ));
                }
                Some(_) => {}
            }
        }
        for key in applied
            .keys()
            .filter(|k| !committed.payments.contains_key(*k))
        {
            doubled += 1;
            problems.push(format!("{key}: applied downstream, never accepted"));
        }
        if committed.backlog != 0 || committed.dead != 0 {
            problems.push(format!(
                "outbox left with {} rows, {} dead",
                committed.backlog, committed.dead
            ));
        }
        let relayed: i64 = ends.iter().sum();
        let duplicates = (relayed as u64).saturating_sub(committed.payments.len() as u64);
        if chain.duplicates < duplicates {
            problems.push(format!(
                "{duplicates} repeats on the topic, {} dropped downstream",
                chain.duplicates
            ));
        }
        let bad_replays = client.bad_replays.load(Ordering::Relaxed);
        if bad_replays > 0 {
            problems.push(format!(
                "{bad_replays} resends were not replays of the first answer"
            ));
        }
        if answers.len() as u64 != payments {
            problems.push(format!("{} of {payments} payments answered", answers.len()));
        }
        for p in problems.iter().take(20) {
            eprintln!("chaos: VIOLATION chain/{kind}: {p}");
        }
        let rejected = answers.values().filter(|a| **a == Answer::Rejected).count();
        eprintln!(
            "chaos: chain/{kind}: {} client retries, {} resends, {} payments refused",
            client.retries.load(Ordering::Relaxed),
            client.resent.load(Ordering::Relaxed),
            rejected
        );
        println!(
            "CHAOS scenario=chain store={kind} payments={payments} accepted={} kills={kills} relayed={relayed} duplicates={duplicates} lost={lost} doubled={doubled}",
            committed.payments.len()
        );
        Ok(problems.is_empty())
    }
}

/// Stops a process of the chain gracefully once it is up: it reports its first `STATS` line
/// after it has its SIGTERM handler, and one started a moment ago may not have it yet.
fn stop(process: ConsumerProcess) -> Res<BTreeMap<String, u64>> {
    if !wait_until(Duration::from_secs(60), || !process.stats().is_empty()) {
        return Err("a process of the chain never reported".into());
    }
    process.stop(Duration::from_secs(30))
}

/// What the service's store holds once the chain stopped.
#[derive(Debug)]
struct Committed {
    /// Payment id → amount.
    payments: HashMap<String, i64>,
    backlog: u64,
    dead: usize,
}

fn read_payments(kind: &str, path: &str) -> Res<Committed> {
    let e = |e: idempotent_consumer::Error| e.to_string();
    if kind == "rocksdb" {
        let store = RocksStore::open(path).map_err(e)?;
        let mut payments = HashMap::new();
        for (k, v) in store.scan_prefix(b"payment/").map_err(e)? {
            let id = String::from_utf8_lossy(&k["payment/".len()..]).into_owned();
            let v = String::from_utf8_lossy(&v).into_owned();
            let amount = v
                .rsplit(':')
                .next()
                .and_then(|a| a.parse().ok())
                .unwrap_or(-1);
            payments.insert(id, amount);
        }
        let (backlog, _) = block_on(store.outbox_backlog()).map_err(e)?;
        let dead = block_on(store.dead_rows(1000)).map_err(e)?.len();
        return Ok(Committed {
            payments,
            backlog,
            dead,
        });
    }
    block_on(async {
        let store = PgStore::connect_with(path, PgOptions::default())
            .await
            .map_err(e)?;
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT id, amount FROM chain_payments")
            .fetch_all(store.pool())
            .await
            .map_err(|e| e.to_string())?;
        let (backlog, _) = store.outbox_backlog().await.map_err(e)?;
        let dead = store.dead_rows(1000).await.map_err(e)?.len();
        store.pool().close().await;
        Ok(Committed {
            payments: rows.into_iter().collect(),
            backlog,
            dead,
        })
    })
}

/// The ledger: how often each payment was applied, and with which amount.
fn read_ledger(path: &str) -> Res<(HashMap<String, u64>, HashMap<String, i64>)> {
    let store = RocksStore::open(path).map_err(|e| e.to_string())?;
    let read = |prefix: &[u8]| -> Res<HashMap<String, i64>> {
        let rows = store.scan_prefix(prefix).map_err(|e| e.to_string())?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| {
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                (id, String::from_utf8_lossy(&v).parse().unwrap_or(-1))
            })
            .collect())
    };
    let counts = read(b"count/")?
        .into_iter()
        .map(|(k, n)| (k, n.max(0) as u64))
        .collect();
    Ok((counts, read(b"amount/")?))
}

/// The high watermark of every partition of `topic`.
fn topic_ends(bootstrap: &str, topic: &str) -> Res<Vec<i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| e.to_string())?;
    (0..PARTITIONS)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map(|(_, high)| high)
                .map_err(|e| e.to_string())
        })
        .collect()
}
