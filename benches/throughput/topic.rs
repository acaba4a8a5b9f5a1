//! The topic every row reads: filled once (on the in-process mock, a broker, or a mock in
//! another process), and the plain consumer that is the baseline.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message};

use super::{PARTITIONS, Res, TOPIC, block_on};

/// Produces `n` records of about 150 bytes round-robin over the partitions; returns each
/// partition's end offset.
pub(super) fn prefill(bootstrap: &str, n: usize) -> Res<Vec<i64>> {
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Deliveries::default())
        .map_err(|e| e.to_string())?;
    let mut ends = vec![0i64; PARTITIONS as usize];
    for i in 0..n {
        let partition = (i % PARTITIONS as usize) as i32;
        let key = record_key(i);
        let payload = payload(i);
        let headers = OwnedHeaders::new().insert(Header {
            key: "idempotency-key",
            value: Some(key.as_bytes()),
        });
        let mut record = BaseRecord::<(), str>::to(TOPIC)
            .partition(partition)
            .payload(&payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
        ends[partition as usize] += 1;
    }
    producer
        .flush(Duration::from_secs(300))
        .map_err(|e| e.to_string())?;
    if let Some(e) = producer.context().failed.lock().unwrap().take() {
        return Err(format!("prefill: a record was not delivered: {e}"));
    }
    // Every record must be there, or a row would wait for records that never come.
    for (p, want) in ends.iter().enumerate() {
        let (low, high) = producer
            .client()
            .fetch_watermarks(TOPIC, p as i32, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        if high - low != *want {
            return Err(format!(
                "partition {p} holds {} records after the prefill, not {want}",
                high - low
            ));
        }
    }
    Ok(ends)
}

/// The idempotency key of the topic's record `i`.
pub(super) fn record_key(i: usize) -> String {
    format!("k-{i:09}")
}

/// The payload of the topic's record `i` (about 130 bytes of JSON).
pub(super) fn payload(i: usize) -> String {
    format!(
        r#"{{"account":"acct-{:05}","amount":{},"memo":"{:0>76}"}}"#,
        i % 10_000,
        i % 997,
        i
    )
}

/// Creates the topic on a broker (the mock creates it itself), failing if it exists: a topic
/// left over from another run would hold more records than this one produces.
pub(super) fn create_topic(bootstrap: &str) -> Res<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| e.to_string())?;
    let topic = NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1));
    let results = block_on(admin.create_topics(
        [&topic],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
    ))
    .map_err(|e| format!("creating topic {TOPIC}: {e}"))?;
    for result in results {
        result.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
    }
    Ok(())
}

/// Keeps the first failed delivery of the prefill.
#[derive(Default)]
struct Deliveries {
    failed: std::sync::Mutex<Option<String>>,
}

impl rdkafka::ClientContext for Deliveries {}

impl rdkafka::producer::ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed
                .lock()
                .unwrap()
                .get_or_insert_with(|| e.to_string());
        }
    }
}

pub(super) fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    c
}

/// A consumer in `group`, subscribed to the topic from its start.
pub(super) fn subscribed(bootstrap: &str, group: &str) -> Res<BaseConsumer> {
    let consumer: BaseConsumer = consumer_config(bootstrap, group)
        .create()
        .map_err(|e| e.to_string())?;
    consumer.subscribe(&[TOPIC]).map_err(|e| e.to_string())?;
    Ok(consumer)
}

/// The limit: reads every record, commits offsets every 10,000 records and at the end.
pub(super) fn raw_consumer(bootstrap: &str, ends: &[i64], group: &str) -> Res<Duration> {
    let consumer = subscribed(bootstrap, group)?;
    let total: i64 = ends.iter().sum();
    let mut seen = 0i64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while seen < total {
        if Instant::now() > deadline {
            return Err(format!("raw: read {seen} of {total}"));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                // Touch what a handler would: payload and headers.
                std::hint::black_box((
                    m.payload().map(<[u8]>::len),
                    m.headers().map(|h| h.count()),
                ));
                seen += 1;
                if seen % 10_000 == 0 {
                    let _ = consumer.commit_consumer_state(CommitMode::Async);
                }
            }
            Some(Err(e)) => return Err(format!("raw: {e}")),
            None => {}
        }
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Ok(first.map_or(Duration::ZERO, |f| f.elapsed()))
}

/// `raw`: the median of three passes, each in a group of its own named after `prefix`.
pub(super) fn raw_median(bootstrap: &str, ends: &[i64], prefix: &str) -> Res<Duration> {
    let mut passes = (0..3)
        .map(|i| raw_consumer(bootstrap, ends, &format!("{prefix}-{i}")))
        .collect::<Res<Vec<Duration>>>()?;
    passes.sort();
    Ok(passes[1])
}
