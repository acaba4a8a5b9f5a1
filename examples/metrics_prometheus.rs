//! Metrics: the runtime's counters, histograms and gauge served to Prometheus.
//!
//! What it shows: the runtime reports through the `metrics` facade; installing
//! `metrics-exporter-prometheus` serves them on an HTTP endpoint. A known workload runs on
//! librdkafka's in-process mock cluster and a RocksDB store in a temporary directory: 200
//! payments, 40 producer retries of earlier ones (duplicates), one earlier key re-sent with
//! another amount (a conflict), one payment whose handler fails once (a retry), and one payload
//! that is not JSON (a dead letter). The program then scrapes its own `/metrics` endpoint,
//! prints the series, and exits non-zero unless every count matches the workload.
//!
//! Run: `cargo run --example metrics_prometheus` (add `-- --serve` to keep serving on
//! `METRICS_ADDR`, default `127.0.0.1:9464`, until Ctrl-C; `RUST_LOG=info` for traces).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use idempotent_consumer::{
    Handler, HandlerError, Outcome, Record, RetryPolicy, RocksStore, RocksTx, Runtime,
};
use metrics_exporter_prometheus::PrometheusBuilder;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPIC: &str = "payments";
const GROUP: &str = "ledger";
const PAYMENTS: usize = 200;
const REPEATS: usize = 40;

#[derive(serde::Serialize, serde::Deserialize)]
struct Payment {
    account: String,
    amount: i64,
}

/// Adds each payment to `balance/<account>`; the payment keyed `flaky` fails once with a
/// retryable error, as a briefly unavailable dependency would.
struct Ledger {
    flaked: AtomicBool,
}

impl Handler<RocksTx> for Ledger {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let payment: Payment = record.json()?;
        if record.header("idempotency-key") == Some(b"flaky")
            && !self.flaked.swap(true, Ordering::SeqCst)
        {
            return Err(HandlerError::retryable(
                "dependency unavailable (simulated)",
            ));
        }
        let key = format!("balance/{}", payment.account);
        let old = tx.get(&key).map_err(HandlerError::retryable)?;
        let balance = old
            .and_then(|b| String::from_utf8(b).ok()?.parse::<i64>().ok())
            .unwrap_or(0)
            + payment.amount;
        tx.put(&key, balance.to_string());
        Ok(Outcome::bytes(balance.to_string()))
    }
}

/// Produces the workload; returns how many records were sent.
fn produce(bootstrap: &str) -> usize {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("creating the producer");
    let mut sent = 0;
    let mut send = |key: &str, partition: i32, payload: &[u8]| {
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(key.as_bytes()),
        });
        let record = BaseRecord::<(), [u8]>::to(TOPIC)
            .partition(partition)
            .payload(payload)
            .headers(headers);
        producer
            .send(record)
            .map_err(|(e, _)| e)
            .expect("producing");
        producer.poll(Duration::ZERO);
        sent += 1;
    };
    let payment = |i: usize, amount: i64| {
        let p = Payment {
            account: format!("acct-{}", i % 5),
            amount,
        };
        serde_json::to_vec(&p).expect("serializing")
    };
    for i in 0..PAYMENTS {
        send(
            &format!("pay-{i}"),
            (i % 2) as i32,
            &payment(i, i as i64 + 1),
        );
    }
    for i in 0..REPEATS {
        send(
            &format!("pay-{i}"),
            (i % 2) as i32,
            &payment(i, i as i64 + 1),
        );
    }
    send("pay-50", 0, &payment(50, 9_999));
    send("flaky", 1, &payment(7, 7));
    send("garbage", 0, b"not json");
    producer.flush(Duration::from_secs(30)).expect("flushing");
    sent
}

/// `GET /metrics` over plain TCP: the exporter's own endpoint, as Prometheus scrapes it.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("sending the scrape request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("reading the scrape response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape failed: {head}");
    body.to_owned()
}

/// The sum of a series over every label set that contains `filter`.
fn total(exposition: &str, name: &str, filter: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.contains(filter)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("reading the port")
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let serve = std::env::args().any(|a| a == "--serve");
    let addr: SocketAddr = match std::env::var("METRICS_ADDR") {
        Ok(a) => a.parse().expect("METRICS_ADDR must be host:port"),
        Err(_) if serve => "127.0.0.1:9464".parse().unwrap(),
        Err(_) => free_port(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting tokio");
    rt.block_on(async {
        PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .expect("installing the Prometheus exporter");
    });

    let mock = MockCluster::new(1).expect("starting the mock cluster");
    mock.create_topic(TOPIC, 2, 1).expect("creating the topic");
    mock.create_topic(&format!("{TOPIC}.dlq"), 1, 1)
        .expect("creating the dead-letter topic");
    let bootstrap = mock.bootstrap_servers();
    let sent = produce(&bootstrap);
    println!("produced {sent} records; consuming with metrics served at http://{addr}/metrics");

    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let store = RocksStore::open(dir.path()).expect("opening the store");
    let runtime = Runtime::builder()
        .bootstrap_servers(&bootstrap)
        .group_id(GROUP)
        .topics([TOPIC])
        .set("session.timeout.ms", "6000")
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        // Frequent rounds so the store-entries gauge is fresh at the scrape.
        .purge(Duration::from_millis(500), 1_000)
        .store(store)
        .build(Ledger {
            flaked: AtomicBool::new(false),
        })
        .expect("building the consumer");
    let stats = runtime.stats();
    let exposition = rt.block_on(async {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let consumer = tokio::spawn(runtime.run(async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = stats.snapshot();
            if (s.applied + s.duplicates() + s.dead_lettered) as usize == sent {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no progress in two minutes: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // One more purge round refreshes the gauge.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let exposition = scrape(addr).await;
        if serve {
            println!("serving until Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
        let _ = stop.send(());
        consumer
            .await
            .expect("consumer task panicked")
            .expect("consumer failed");
        exposition
    });

    println!();
    for line in exposition.lines() {
        // Quantile lines left out of the printout: the _sum and _count lines summarise them.
        if line.starts_with("idempotent_consumer_") && !line.contains("quantile=") {
            println!("  {line}");
        }
    }
    println!();
    let m = |name: &str, filter: &str| total(&exposition, name, filter) as usize;
    let checks: BTreeMap<&str, (usize, usize)> = BTreeMap::from([
        (
            "records read",
            (m("idempotent_consumer_records_read_total", ""), sent),
        ),
        (
            "processed",
            (m("idempotent_consumer_processed_total", ""), PAYMENTS + 1),
        ),
        (
            "duplicates (repeated key)",
            (
                m(
                    "idempotent_consumer_duplicates_total",
                    "cause=\"repeated_key\"",
                ),
                REPEATS,
            ),
        ),
        (
            "conflicts",
            (m("idempotent_consumer_conflicts_total", ""), 1),
        ),
        ("retries", (m("idempotent_consumer_retries_total", ""), 1)),
        (
            "dead letters (conflict)",
            (
                m(
                    "idempotent_consumer_dead_letters_total",
                    "reason=\"conflict\"",
                ),
                1,
            ),
        ),
        (
            "dead letters (permanent)",
            (
                m(
                    "idempotent_consumer_dead_letters_total",
                    "reason=\"permanent\"",
                ),
                1,
            ),
        ),
        (
            "records over committed batches",
            (m("idempotent_consumer_batch_records_sum", ""), sent),
        ),
    ]);
    let mut failed = false;
    for (what, (got, want)) in &checks {
        let ok = got == want;
        failed |= !ok;
        println!(
            "  [{}] {what}: {got} (expected {want})",
            if ok { "ok" } else { "FAILED" }
        );
    }
    // Every payment, the failed try of `flaky` and the undecodable record at least; more when a
    // handler touched a balance another partition's batch held and ran again after its commit.
    let timed = m("idempotent_consumer_handler_seconds_count", "");
    let ok = timed > PAYMENTS + 2;
    failed |= !ok;
    println!(
        "  [{}] handler calls timed: {timed} (at least {})",
        if ok { "ok" } else { "FAILED" },
        PAYMENTS + 3
    );
    let entries = m("idempotent_consumer_store_entries", "");
    println!("  store entries (gauge, RocksDB's estimate): {entries}");
    if failed {
        std::process::exit(1);
    }
}
