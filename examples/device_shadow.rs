//! Device shadows: valid reports that conflict, decided once and explained.
//!
//! What it shows: devices report their state to a topic of two partitions (librdkafka's
//! in-process mock cluster, nothing to install). Reports arrive out of order, some twice (a
//! producer retry), two of one device are 900 ms apart with the later one first, one is late by
//! seconds, one says it happened an hour from now. A consumer on a RocksDB store in a temporary
//! directory keeps a shadow per device (its latest state) under a last-writer-wins
//! [`Resolver`]: the latest event time wins, ties broken by source and key, a report more than
//! a minute ahead of its record's timestamp is rejected, an older one within two seconds of the
//! winner is superseded (and `on_superseded` counts a correction), further behind it is stale.
//!
//! The shadow, the entity's winner, the resolution record, the dedup entry and the position
//! commit in one RocksDB write. The program prints, for one device, its final state and why
//! (the store's `explain`), checks every shadow against the reports' latest event times, and
//! exits non-zero if anything differs.
//!
//! Run: `cargo run --example device_shadow --features resolve`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idempotent_consumer::resolve::{
    Entities, Facts, Order, Policy, Resolution, ResolutionOutcome, Resolver,
};
use idempotent_consumer::{
    Handler, HandlerError, Inspect, Outcome, PartitionId, Record, RocksStore, RocksTx, Runtime,
};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const TOPIC: &str = "device-reports";
const GROUP: &str = "shadows";

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Report {
    device: String,
    /// When the device measured it, milliseconds since the Unix epoch.
    at_ms: i64,
    state: String,
}

/// Keeps `shadow/<device>` = the winning report's state; counts corrections under
/// `corrections/<device>` for every report that lost.
struct Shadows;

impl Handler<RocksTx> for Shadows {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let report: Report = record.json()?;
        tx.put(format!("shadow/{}", report.device), report.state);
        Ok(Outcome::none())
    }

    async fn on_superseded(
        &self,
        record: &Record,
        _resolution: &Resolution,
        tx: &mut RocksTx,
    ) -> Result<(), HandlerError> {
        // A service would publish a correction to the device here (through the outbox, in this
        // same transaction); the example counts them.
        let report: Report = record.json()?;
        let key = format!("corrections/{}", report.device);
        let n = tx
            .get(&key)
            .map_err(HandlerError::retryable)?
            .map_or(0, |b| {
                String::from_utf8_lossy(&b).parse::<u64>().unwrap_or(0)
            });
        tx.put(&key, (n + 1).to_string());
        Ok(())
    }
}

fn resolver() -> Resolver {
    let policy = Policy::LastWriterWins {
        max_skew: Some(Duration::from_secs(60)),
        grace: Duration::from_secs(2),
    };
    Resolver::new(policy, |record| {
        let report: Report = record.json().map_err(|e| e.to_string())?;
        Ok(Some(Facts {
            entity: report.device,
            order: Order {
                event_time_ms: Some(report.at_ms),
                ..Order::default()
            },
        }))
    })
}

/// The reports, in the order they are produced: (idempotency key, partition, report).
fn reports(now: i64) -> Vec<(String, i32, Report)> {
    let t = now - 120_000;
    let r = |device: &str, at: i64, state: &str| Report {
        device: device.into(),
        at_ms: at,
        state: state.into(),
    };
    let mut out = vec![
        ("t1-a".to_owned(), 0, r("thermo-1", t, "idle 20.0C")),
        (
            "t1-b".to_owned(),
            0,
            r("thermo-1", t + 10_000, "idle 21.5C"),
        ),
        // A producer retry: the same report again.
        (
            "t1-b".to_owned(),
            0,
            r("thermo-1", t + 10_000, "idle 21.5C"),
        ),
        // Two reports 900 ms apart, the later one first.
        (
            "t1-d".to_owned(),
            0,
            r("thermo-1", t + 30_900, "heating 19.0C"),
        ),
        (
            "t1-c".to_owned(),
            0,
            r("thermo-1", t + 30_000, "idle 19.2C"),
        ),
        // Late by 25 s: stale.
        ("t1-e".to_owned(), 0, r("thermo-1", t + 5_000, "idle 20.4C")),
        // A clock an hour fast.
        ("t1-f".to_owned(), 0, r("thermo-1", now + 3_600_000, "off")),
    ];
    // Other devices: each one's reports spread over both partitions in a shuffled order.
    for d in 0..20 {
        for i in 0..10i64 {
            let at = t + ((i * 7 + d) % 10) * 1_000;
            out.push((
                format!("dev{d}-{i}"),
                (i % 2) as i32,
                r(&format!("dev{d}"), at, &format!("state at {at}")),
            ));
        }
    }
    out
}

fn main() {
    let cluster = MockCluster::new(1).expect("starting the mock cluster");
    cluster
        .create_topic(TOPIC, 2, 1)
        .expect("creating the topic");
    let bootstrap = cluster.bootstrap_servers();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let reports = reports(now);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("creating the producer");
    let mut end = [0i64; 2];
    for (key, partition, report) in &reports {
        let payload = serde_json::to_vec(report).expect("serializing a report");
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(key.as_bytes()),
        });
        producer
            .send(
                BaseRecord::<(), [u8]>::to(TOPIC)
                    .partition(*partition)
                    .payload(&payload)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .expect("producing a report");
        end[*partition as usize] += 1;
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("flushing the reports");

    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = RocksStore::open(dir.path()).expect("opening the store");
    let rt = tokio::runtime::Runtime::new().expect("starting tokio");
    let runtime = Runtime::builder()
        .bootstrap_servers(&bootstrap)
        .group_id(GROUP)
        .topics([TOPIC])
        .set("session.timeout.ms", "6000")
        .store(store.clone())
        .resolver(resolver())
        .build(Shadows)
        .expect("building the consumer");
    let stats = runtime.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut done = true;
            for p in 0..2 {
                let id = PartitionId::new(GROUP, TOPIC, p);
                let stored = store.position(&id).await.ok().flatten();
                done &= stored.and_then(|s| s.next_offset).unwrap_or(0) >= end[p as usize];
            }
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "the consumer made no progress");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let _ = stop.send(());
    rt.block_on(task)
        .expect("consumer task panicked")
        .expect("consumer failed");
    let s = stats.snapshot();
    println!(
        "{} reports: {} applied, {} superseded, {} stale, {} rejected, {} duplicates",
        reports.len(),
        s.resolved_applied,
        s.resolved_superseded,
        s.resolved_stale,
        s.resolved_rejected,
        s.duplicates()
    );

    // Why is thermo-1 in its state?
    let why = rt
        .block_on(store.explain(GROUP, "thermo-1", 20))
        .expect("reading thermo-1");
    let state = why.state.as_ref().expect("thermo-1 was decided");
    let winner = state.winner.as_ref().expect("thermo-1 has a winner");
    let shadow = store
        .get(b"shadow/thermo-1")
        .ok()
        .flatten()
        .unwrap_or_default();
    println!(
        "\nthermo-1 is \"{}\": report {} (event time {} ms), {}/{}@{}, after {} decisions",
        String::from_utf8_lossy(&shadow),
        winner.key,
        winner.order.event_time_ms.unwrap_or_default() - (now - 120_000),
        winner.topic,
        winner.partition,
        winner.offset,
        state.decisions
    );
    println!("why, newest first:");
    for r in &why.resolutions {
        println!(
            "  #{} {:<10} {} (offset {}): {} [{} v{}]",
            r.seq,
            r.outcome.as_str(),
            r.candidate.key,
            r.candidate.offset,
            r.reason,
            r.rule,
            r.rule_version
        );
    }

    // Check: every shadow is its device's latest report that is not from the future.
    let mut latest: BTreeMap<&str, &Report> = BTreeMap::new();
    for (_, _, report) in &reports {
        if report.at_ms > now + 60_000 {
            continue;
        }
        let best = latest.entry(&report.device).or_insert(report);
        if report.at_ms > best.at_ms {
            *best = report;
        }
    }
    let mut wrong = 0;
    for (device, report) in &latest {
        let shadow = store
            .get(format!("shadow/{device}").as_bytes())
            .ok()
            .flatten()
            .unwrap_or_default();
        if shadow != report.state.as_bytes() {
            eprintln!(
                "{device}: shadow {:?}, expected {:?}",
                String::from_utf8_lossy(&shadow),
                report.state
            );
            wrong += 1;
        }
    }
    let outcomes: Vec<ResolutionOutcome> = why.resolutions.iter().map(|r| r.outcome).collect();
    let expected = [
        ResolutionOutcome::Rejected,
        ResolutionOutcome::Stale,
        ResolutionOutcome::Superseded,
    ];
    if wrong > 0 || outcomes != expected || winner.key != "t1-d" {
        eprintln!("\nFAILED: {wrong} wrong shadows; thermo-1's records {outcomes:?}");
        std::process::exit(1);
    }
    println!(
        "\nOK: {} shadows equal their latest reports; every report that lost has its record",
        latest.len()
    );
}
