//! The dashboard served by a running consumer: a payments ledger on the embedded RocksDB store,
//! fed by a steady stream in which some payments are sent twice, a few re-use a key with
//! another amount (conflicts) and a few cannot be decoded (dead letters).
//!
//! What it shows: `Dashboard` built from the consumer's own store handle and counters and
//! served beside it; open the printed address to watch positions, lag, the rates of
//! duplicates and conflicts, the dead letters by reason (each one's bytes a click away).
//! Nothing to install or start: the broker is librdkafka's in-process mock cluster.
//!
//! Run: `cargo run --features dashboard --example dashboard` (Ctrl-C stops it), or with
//! `-- --listen 127.0.0.1:8080` and `-- --seconds 10` (then it reads its own page's summary,
//! prints it and exits, non-zero when the page disagrees with the counters).

use std::time::Duration;

use idempotent_consumer::dashboard::Dashboard;
use idempotent_consumer::{Handler, HandlerError, Outcome, Record, RocksStore, RocksTx, Runtime};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

const TOPIC: &str = "payments";
const GROUP: &str = "ledger";
const ACCOUNTS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];

#[derive(serde::Serialize, serde::Deserialize)]
struct Payment {
    account: String,
    amount: i64,
}

/// Adds each payment to `balance/<account>` in the batch's transaction.
struct Ledger;

impl Handler<RocksTx> for Ledger {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let payment: Payment = record.json()?;
        let key = format!("balance/{}", payment.account);
        let before = match tx.get(&key).map_err(HandlerError::retryable)? {
            Some(bytes) => String::from_utf8_lossy(&bytes)
                .parse::<i64>()
                .map_err(HandlerError::fatal)?,
            None => 0,
        };
        tx.put(&key, (before + payment.amount).to_string());
        Ok(Outcome::bytes((before + payment.amount).to_string()))
    }
}

/// Sends a payment every 15 ms until the process ends: one in eight again (a producer retry),
/// one in sixty with a used key and another amount, one in forty undecodable.
async fn traffic(bootstrap: String) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("creating the producer");
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0u64.. {
        let (key, payload) = if i > 10 && i % 8 == 0 {
            sent[(i as usize * 7) % sent.len()].clone()
        } else if i > 10 && i % 60 == 1 {
            let (key, _) = &sent[(i as usize * 3) % sent.len()];
            (key.clone(), br#"{"account":"alice","amount":1}"#.to_vec())
        } else if i % 40 == 3 {
            (
                format!("pay-{i:06}"),
                b"{\"account\": \"bob\", amount".to_vec(),
            )
        } else {
            let payment = Payment {
                account: ACCOUNTS[(i % 5) as usize].to_owned(),
                amount: (i as i64 * 37) % 500 - 100,
            };
            let payload = serde_json::to_vec(&payment).expect("a payment serializes");
            let key = format!("pay-{i:06}");
            sent.push((key.clone(), payload.clone()));
            (key, payload)
        };
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(key.as_bytes()),
        });
        let record = FutureRecord::to(TOPIC)
            .key(&key)
            .payload(&payload)
            .headers(headers);
        if let Err((e, _)) = producer.send(record, Duration::from_secs(5)).await {
            eprintln!("producing a payment: {e}");
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

struct Args {
    listen: String,
    seconds: Option<u64>,
}

fn args() -> Args {
    let mut args = Args {
        listen: "127.0.0.1:9464".into(),
        seconds: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--listen", Some(v)) => args.listen = v,
            ("--seconds", Some(v)) => args.seconds = Some(v.parse().expect("--seconds N")),
            _ => {
                eprintln!("usage: dashboard [--listen ADDR] [--seconds N]");
                std::process::exit(2);
            }
        }
    }
    args
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

#[tokio::main]
async fn main() {
    let args = args();
    let mock = MockCluster::new(1).expect("starting the mock cluster");
    mock.create_topic(TOPIC, 3, 1).expect("creating the topic");
    mock.create_topic(&format!("{TOPIC}.dlq"), 1, 1)
        .expect("creating the dead-letter topic");
    let bootstrap = mock.bootstrap_servers();
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let store = RocksStore::open(dir.path()).expect("opening the store");

    let runtime = Runtime::builder()
        .bootstrap_servers(&bootstrap)
        .group_id(GROUP)
        .topics([TOPIC])
        .store(store.clone())
        .build(Ledger)
        .expect("building the consumer");
    let stats = runtime.stats();
    // The consumer's own store handle and counters, and the broker for the lag.
    let dashboard = Dashboard::new(store, GROUP)
        .expect("a valid group")
        .stats(stats.clone())
        .bootstrap(bootstrap.clone())
        .refresh(Duration::from_secs(1));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .unwrap_or_else(|e| panic!("listening on {}: {e}", args.listen));
    let addr = listener.local_addr().expect("the listener's address");
    tokio::spawn(async move {
        dashboard
            .serve(listener)
            .await
            .expect("serving the dashboard")
    });
    tokio::spawn(traffic(bootstrap));
    println!("dashboard of group {GROUP:?}: http://{addr}/");

    let seconds = args.seconds;
    let stop = async move {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => interrupted().await,
        }
    };
    runtime.run(stop).await.expect("the consumer failed");

    if seconds.is_some() {
        // Past the age a cached summary may have, so it is read after the last commit.
        tokio::time::sleep(Duration::from_millis(600)).await;
        // What the page shows, read as the page's script reads it, against the counters.
        let summary: serde_json::Value = reqwest::get(format!("http://{addr}/api/summary"))
            .await
            .and_then(|r| r.error_for_status())
            .expect("fetching the dashboard's summary")
            .json()
            .await
            .expect("the summary is JSON");
        let counted = stats.snapshot();
        let shown = &summary["counters"];
        println!(
            "applied {}, duplicates {} ({:.1} %), conflicts {} ({:.1} %), dead letters kept {}",
            shown["applied"],
            shown["duplicates"],
            shown["duplicate_rate"].as_f64().unwrap_or(0.0) * 100.0,
            shown["conflicts"],
            shown["conflict_rate"].as_f64().unwrap_or(0.0) * 100.0,
            summary["dead_letters"]["total"],
        );
        let agrees = shown["applied"] == counted.applied
            && shown["duplicates"] == counted.duplicates()
            && counted.applied > 0;
        if !agrees {
            eprintln!("the page disagrees with the counters: {summary} vs {counted:?}");
            std::process::exit(1);
        }
    }
}
