//! Payments on PostgreSQL: a ledger table updated in the same transaction as the dedup rows and
//! the partition positions, shared by every instance of the consumer group.
//!
//! What it shows: the handler receives the batch's open PostgreSQL transaction and updates a
//! `payments_ledger` table in it. The program creates the topic, produces payments in which
//! about a fifth re-send an earlier idempotency key at a new offset, consumes them, and checks
//! that every balance equals the one computed from the unique payments. Run it several times, or
//! as several processes at once: every payment counts once across all runs, because the dedup
//! rows and positions live in the database with the ledger.
//!
//! Delivery guarantee: a payment's ledger update, its dedup row and the partition's next offset
//! commit in ONE PostgreSQL transaction; a duplicate delivery or a repeated key is a counted
//! no-op, and a zombie instance's late commit is fenced by the partition's epoch.
//!
//! Run (with the compose stack of `docker/`):
//!
//! ```text
//! docker compose -f docker/docker-compose.yml up -d
//! DATABASE_URL=postgres://postgres:postgres@localhost:5432/postgres \
//! KAFKA_BOOTSTRAP_SERVERS=localhost:9092 \
//! cargo run --example payments_postgres --features postgres
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use idempotent_consumer::{Handler, HandlerError, Outcome, PgStore, PgTx, Record, Runtime};
// The driver at the store's own version, as the crate re-exports it.
use idempotent_consumer::sqlx;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const TOPIC: &str = "payments";
const GROUP: &str = "payments-ledger";
const EVENTS: usize = 2_000;
const ACCOUNTS: [&str; 4] = ["alice", "bob", "carol", "dave"];

#[derive(serde::Serialize, serde::Deserialize)]
struct Payment {
    account: String,
    amount: i64,
}

/// Adds each payment to its account's balance, in the batch's transaction.
struct Ledger;

impl Handler<PgTx> for Ledger {
    async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
        let payment: Payment = record.json()?;
        let balance: i64 = sqlx::query_scalar(
            "INSERT INTO payments_ledger (account, balance) VALUES ($1, $2) \
             ON CONFLICT (account) DO UPDATE SET balance = payments_ledger.balance + EXCLUDED.balance \
             RETURNING balance",
        )
        .bind(&payment.account)
        .bind(payment.amount)
        .fetch_one(tx.conn())
        .await
        .map_err(HandlerError::retryable)?;
        Ok(Outcome::bytes(balance.to_string()))
    }
}

async fn balances(store: &PgStore) -> Result<BTreeMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT account, balance FROM payments_ledger")
        .fetch_all(store.pool())
        .await?;
    Ok(rows.into_iter().collect())
}

fn required(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => {
            eprintln!(
                "{name} is not set. This example needs a Kafka cluster and a PostgreSQL server:\n\
                 \n  docker compose -f docker/docker-compose.yml up -d\n  \
                 DATABASE_URL=postgres://postgres:postgres@localhost:5432/postgres \\\n  \
                 KAFKA_BOOTSTRAP_SERVERS=localhost:9092 \\\n  \
                 cargo run --example payments_postgres --features postgres\n\
                 \n(For a run with nothing to install, see `cargo run --example quickstart`.)"
            );
            std::process::exit(2);
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let database_url = required("DATABASE_URL");
    let bootstrap = required("KAFKA_BOOTSTRAP_SERVERS");

    let store = PgStore::connect(&database_url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS payments_ledger (account text PRIMARY KEY, balance bigint NOT NULL)",
    )
    .execute(store.pool())
    .await?;
    // The expected balances include earlier runs: their payments are in the table already.
    let before = balances(&store).await?;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    for topic in [TOPIC.to_owned(), format!("{TOPIC}.dlq")] {
        let new = NewTopic::new(&topic, 3, TopicReplication::Fixed(1));
        // "Already exists" is fine; a cluster that creates topics on first use needs no call.
        if let Err(e) = admin.create_topics([&new], &options).await {
            eprintln!("could not create {topic} ({e}); relying on the cluster to create it");
        }
    }

    // Payments of this run: unique keys, about a fifth re-sent at a new offset.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    let mut expected = before.clone();
    let mut sent = 0usize;
    for i in 0..EVENTS {
        let n = if i % 5 == 4 { i - 3 } else { i };
        let account = ACCOUNTS[n % ACCOUNTS.len()];
        let amount = (n % 97) as i64 + 1;
        if n == i {
            *expected.entry(account.to_owned()).or_default() += amount;
        }
        let key = format!("pay-{run}-{n}");
        let payload = serde_json::to_vec(&Payment {
            account: account.to_owned(),
            amount,
        })?;
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(key.as_bytes()),
        });
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .key(account)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
        sent += 1;
    }
    let unique = EVENTS - EVENTS / 5;
    println!("produced {sent} payments ({unique} unique) to {TOPIC}");

    let runtime = Runtime::builder()
        .bootstrap_servers(&bootstrap)
        .group_id(GROUP)
        .topics([TOPIC])
        .batch(500, Duration::from_millis(50))
        .store(store.clone())
        .build(Ledger)?;
    let stats = runtime.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    loop {
        let s = stats.snapshot();
        if s.applied as usize >= unique && s.duplicates_repeated_key as usize >= sent - unique {
            break;
        }
        if consumer.is_finished() || started.elapsed() > Duration::from_secs(300) {
            eprintln!("the consumer did not finish this run's payments: {s:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    consumer.await??;

    let s = stats.snapshot();
    let after = balances(&store).await?;
    println!(
        "read {} records: {} applied, {} repeated keys skipped, {} redeliveries skipped, {} dead letters",
        s.records_read,
        s.applied,
        s.duplicates_repeated_key,
        s.duplicates_redelivery,
        s.dead_lettered
    );
    println!("{:<8} {:>12} {:>12}", "account", "ledger", "expected");
    let mut ok = true;
    for (account, want) in &expected {
        let got = after.get(account).copied().unwrap_or(0);
        ok &= got == *want;
        println!("{account:<8} {got:>12} {want:>12}");
    }
    if ok {
        println!("ok: every payment counted exactly once");
        Ok(())
    } else {
        eprintln!("MISMATCH: the ledger differs from the unique payments");
        std::process::exit(1);
    }
}
