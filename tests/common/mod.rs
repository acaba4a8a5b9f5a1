//! Shared helpers of the integration tests: a Kafka cluster (librdkafka's in-process mock
//! cluster, or the one named by `KAFKA_BOOTSTRAP_SERVERS`), a producer, unique names, a ledger
//! handler with fault points, and a harness that runs each consumer "incarnation" on its own
//! tokio runtime so that a crash is a real drop of everything in flight.

#![allow(dead_code, unreachable_pub)]

pub mod backend;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idempotent_consumer::{
    DedupEntry, DuplicateCause, ErrorClass, Handler, HandlerError, Outcome, Record, RocksStore,
    RocksTx, Runtime, Stats, StatsSnapshot, Store, Transaction,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Notify, oneshot};

/// How long a test waits for the consumer to reach a state before failing.
pub const WAIT: Duration = Duration::from_secs(60);

/// A unique name for topics and groups, so tests never share state on a real cluster.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

/// The Kafka cluster a test runs against.
pub struct Cluster {
    /// True when `producer` owns an in-process mock cluster.
    mocked: bool,
    bootstrap: String,
    producer: BaseProducer,
}

impl Cluster {
    /// The cluster named by `KAFKA_BOOTSTRAP_SERVERS`, or a fresh in-process mock cluster owned
    /// by the test producer, whose groups rebalance without the initial delay.
    pub fn start() -> Self {
        let external = std::env::var("KAFKA_BOOTSTRAP_SERVERS")
            .ok()
            .filter(|s| !s.is_empty());
        let mut config = ClientConfig::new();
        config
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Records near the consumers' (and dead-letter producers') 1,000,000-byte limit.
            .set("message.max.bytes", "2000000");
        match &external {
            Some(servers) => config.set("bootstrap.servers", servers),
            None => config.set("test.mock.num.brokers", "1"),
        };
        let producer: BaseProducer = config.create().expect("creating the test producer");
        let mocked = external.is_none();
        let bootstrap = match external {
            Some(servers) => servers,
            None => {
                no_initial_rebalance_delay(&producer);
                producer
                    .client()
                    .mock_cluster()
                    .expect("the producer's mock cluster")
                    .bootstrap_servers()
            }
        };
        Cluster {
            mocked,
            bootstrap,
            producer,
        }
    }

    /// The in-process mock cluster, when the tests run on one.
    fn mock(&self) -> Option<MockCluster<'_, DefaultProducerContext>> {
        if self.mocked {
            self.producer.client().mock_cluster()
        } else {
            None
        }
    }

    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic and its dead-letter topic `<topic>.dlq` (one partition).
    pub fn create_topic(&self, partitions: i32) -> String {
        let topic = unique("topic");
        self.create_named_topic(&topic, partitions);
        self.create_named_topic(&format!("{topic}.dlq"), 1);
        topic
    }

    /// Creates a topic (through the mock itself: the mock does not serve CreateTopics).
    pub fn create_named_topic(&self, topic: &str, partitions: i32) {
        match self.mock() {
            Some(mock) => mock
                .create_topic(topic, partitions, 1)
                .expect("creating a topic on the mock cluster"),
            None => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &self.bootstrap)
                    .create()
                    .expect("creating the admin client");
                let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                let rt = tokio::runtime::Runtime::new().unwrap();
                let results = rt
                    .block_on(admin.create_topics([&new], &AdminOptions::new()))
                    .expect("creating a topic");
                for r in results {
                    r.expect("creating a topic");
                }
            }
        }
    }

    /// Makes producing dead letters fail from now on, and returns the dead-letter topic setting
    /// to use: on the mock cluster every Produce request is refused (the mock would auto-create
    /// any topic); on a real cluster the topic name is one Kafka refuses.
    pub fn refuse_dead_letters(&self) -> idempotent_consumer::DeadLetterTopic {
        match self.mock() {
            Some(mock) => {
                let refused = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1000];
                mock.request_errors(RDKafkaApiKey::Produce, &refused);
                idempotent_consumer::DeadLetterTopic::default()
            }
            None => idempotent_consumer::DeadLetterTopic::Fixed("no such topic!".into()),
        }
    }

    /// Delays every answer of the broker by `delay` (0 to undo); false on a real cluster.
    pub fn broker_round_trip(&self, delay: Duration) -> bool {
        match self.mock() {
            Some(mock) => {
                mock.broker_round_trip_time(1, delay)
                    .expect("setting the mock broker's round trip");
                true
            }
            None => false,
        }
    }

    /// Makes the next `n` offset commits fail (the mock cluster answers them with
    /// `OFFSET_METADATA_TOO_LARGE`, an error no client retries); false on a real cluster,
    /// where they cannot be made to fail.
    pub fn fail_offset_commits(&self, n: usize) -> bool {
        match self.mock() {
            Some(mock) => {
                let errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; n];
                mock.request_errors(RDKafkaApiKey::OffsetCommit, &errors);
                true
            }
            None => false,
        }
    }

    /// The high watermark of a partition: how many records it holds (offsets start at 0 and
    /// the tests never delete).
    pub fn high_watermark(&self, topic: &str, partition: i32) -> i64 {
        self.producer
            .client()
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .expect("fetching watermarks")
            .1
    }

    /// Every record of partition 0 of `topic`, read from the start until `n` arrived and no more
    /// came for a second: (key, payload, headers as UTF-8-lossy name/value pairs).
    pub fn read_all(&self, topic: &str, n: usize) -> Vec<TopicRecord> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("creating a reader");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).expect("assigning the reader");
        let mut out = Vec::new();
        let start = Instant::now();
        let mut quiet_since = Instant::now();
        while out.len() < n || quiet_since.elapsed() < Duration::from_secs(1) {
            assert!(
                start.elapsed() < WAIT,
                "read {} of {n} records from {topic}",
                out.len()
            );
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    use rdkafka::Message;
                    use rdkafka::message::Headers;
                    let raw_headers: Vec<(String, Option<Vec<u8>>)> = m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    let headers = raw_headers
                        .iter()
                        .map(|(k, v)| {
                            let v = v.as_deref().map(String::from_utf8_lossy);
                            (k.clone(), v.unwrap_or_default().into_owned())
                        })
                        .collect();
                    out.push(TopicRecord {
                        key: m.key().map(<[u8]>::to_vec),
                        payload: m.payload().map(<[u8]>::to_vec),
                        headers,
                        raw_headers,
                    });
                    quiet_since = Instant::now();
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    }

    /// Produces one record to an explicit partition and waits until it is acknowledged.
    pub fn send(&self, topic: &str, partition: i32, key: Option<&str>, payload: Option<&[u8]>) {
        let headers: Vec<(&str, &[u8])> = key
            .map(|k| ("idempotency-key", k.as_bytes()))
            .into_iter()
            .collect();
        self.send_raw(topic, partition, &headers, payload);
    }

    /// Waits until every record produced so far is acknowledged. rdkafka's own `flush` polls
    /// for 100 ms at a time, each poll lasting its whole timeout, so one record sent and
    /// flushed costs 100 ms; this polls a millisecond at a time.
    pub fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        self.producer.poll(Duration::ZERO);
        while self.producer.in_flight_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "records not acknowledged within 30 s"
            );
            self.producer.poll(Duration::from_millis(1));
        }
    }

    /// Produces one record with these headers (any bytes) to an explicit partition and waits
    /// until it is acknowledged.
    pub fn send_raw(
        &self,
        topic: &str,
        partition: i32,
        headers: &[(&str, &[u8])],
        payload: Option<&[u8]>,
    ) {
        let headers = headers
            .iter()
            .fold(OwnedHeaders::new(), |hs, (name, value)| {
                hs.insert(Header {
                    key: name,
                    value: Some(*value),
                })
            });
        let mut record: BaseRecord<'_, (), [u8]> =
            BaseRecord::to(topic).partition(partition).headers(headers);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record)
            .map_err(|(e, _)| e)
            .expect("enqueueing a record");
        self.flush();
    }

    /// Produces ledger movements `(key, account, amount)` to one partition, in order, waiting
    /// once for all acknowledgements (the idempotent producer keeps the order).
    pub fn send_movements(
        &self,
        topic: &str,
        partition: i32,
        movements: impl IntoIterator<Item = (String, String, i64)>,
    ) {
        let records = movements
            .into_iter()
            .map(|(key, account, amount)| (key, movement(&account, amount)));
        self.send_keyed(topic, partition, records);
    }

    /// Produces `(idempotency key, payload)` records to one partition, in order, waiting once
    /// for all acknowledgements.
    pub fn send_keyed(
        &self,
        topic: &str,
        partition: i32,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) {
        for (key, payload) in records {
            enqueue_keyed(&self.producer, topic, partition, &key, &payload);
            self.producer.poll(Duration::ZERO);
        }
        self.flush();
    }

    /// Produces a ledger movement: `{"account": .., "amount": ..}` under an idempotency key.
    pub fn send_movement(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        account: &str,
        amount: i64,
    ) {
        let payload = movement(account, amount);
        self.send(topic, partition, Some(key), Some(&payload));
    }

    /// The consumers' session timeout. The mock cluster holds every rebalance after the first
    /// join open for the session timeout less a second, even when the last member has left
    /// (a broker makes such a group empty at once), so each restart of a group in a test pays
    /// it: 2 s on the mock. A broker refuses sessions under its
    /// `group.min.session.timeout.ms` (6 s by default).
    pub fn session_timeout_ms(&self) -> &'static str {
        if self.mocked { "2000" } else { "6000" }
    }

    /// Sets the group's committed Kafka offset of a partition (as an operator tool would). A
    /// group the cluster has never seen takes a commit from outside; once the group exists the
    /// mock cluster refuses commits from non-members, so the tool joins it first.
    pub fn commit_kafka_offset(&self, group: &str, topic: &str, partition: i32, offset: i64) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .unwrap();
        let tool = |session: Option<&str>| -> BaseConsumer {
            let mut config = ClientConfig::new();
            config
                .set("bootstrap.servers", &self.bootstrap)
                .set("group.id", group)
                .set("enable.auto.commit", "false");
            if let Some(ms) = session {
                config.set("session.timeout.ms", ms);
            }
            config.create().expect("creating the offset tool consumer")
        };
        let outside = tool(None);
        outside.assign(&tpl).expect("assigning the offset tool");
        match outside.commit(&tpl, CommitMode::Sync) {
            Ok(()) => return,
            Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::UnknownMemberId) => {}
            Err(e) => panic!("committing a Kafka offset: {e}"),
        }
        let consumer = tool(Some(self.session_timeout_ms()));
        consumer
            .subscribe(&[topic])
            .expect("subscribing the offset tool");
        let start = Instant::now();
        while consumer.assignment().map_or(0, |a| a.count()) == 0 {
            assert!(start.elapsed() < WAIT, "offset tool never joined the group");
            let _ = consumer.poll(Duration::from_millis(100));
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .expect("committing a Kafka offset");
        // Leave the group explicitly so the next member does not wait for our session to expire.
        consumer.unsubscribe();
        let start = Instant::now();
        while consumer.assignment().map_or(0, |a| a.count()) > 0 {
            assert!(start.elapsed() < WAIT, "offset tool never left the group");
            let _ = consumer.poll(Duration::from_millis(100));
        }
    }

    /// The group's committed Kafka offset of a partition.
    pub fn kafka_offset(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .create()
            .expect("creating the offset tool consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("reading committed offsets");
        match committed.elements()[0].offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }
}

impl Cluster {
    /// Produces one record with a header whose *name* is `name` (any bytes but NUL, which the
    /// protocol allows and other clients send) after `headers`, and waits for the ack.
    /// rdkafka's producer takes names as `&str`, so this goes through librdkafka's own API.
    #[allow(unsafe_code)]
    pub fn send_with_header_name(
        &self,
        topic: &str,
        partition: i32,
        headers: &[(&str, &[u8])],
        name: &[u8],
        payload: &[u8],
    ) {
        use rdkafka_sys::{rd_kafka_vtype_t as V, rd_kafka_vu_t};
        use std::ffi::CString;
        let topic_c = CString::new(topic).unwrap();
        let names: Vec<CString> = headers
            .iter()
            .map(|(n, _)| CString::new(*n).unwrap())
            .chain([CString::new(name).expect("a header name without NUL")])
            .collect();
        let values: Vec<&[u8]> = headers.iter().map(|h| h.1).chain([&b"v"[..]]).collect();
        let vu = |vtype, u| rd_kafka_vu_t { vtype, u };
        let mut vus = vec![
            vu(
                V::RD_KAFKA_VTYPE_TOPIC,
                rdkafka_sys::rd_kafka_vu_s__bindgen_ty_1 {
                    cstr: topic_c.as_ptr(),
                },
            ),
            vu(
                V::RD_KAFKA_VTYPE_PARTITION,
                rdkafka_sys::rd_kafka_vu_s__bindgen_ty_1 { i32_: partition },
            ),
            vu(
                V::RD_KAFKA_VTYPE_MSGFLAGS,
                rdkafka_sys::rd_kafka_vu_s__bindgen_ty_1 {
                    i: rdkafka_sys::RD_KAFKA_MSG_F_COPY,
                },
            ),
            vu(
                V::RD_KAFKA_VTYPE_VALUE,
                rdkafka_sys::rd_kafka_vu_s__bindgen_ty_1 {
                    mem: rdkafka_sys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                        ptr: payload.as_ptr() as *mut _,
                        size: payload.len(),
                    },
                },
            ),
        ];
        for (n, v) in names.iter().zip(&values) {
            vus.push(vu(
                V::RD_KAFKA_VTYPE_HEADER,
                rdkafka_sys::rd_kafka_vu_s__bindgen_ty_1 {
                    header: rdkafka_sys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                        name: n.as_ptr(),
                        val: v.as_ptr() as *const _,
                        size: v.len() as isize,
                    },
                },
            ));
        }
        // SAFETY: the producer's handle is live for the whole call; every pointer in `vus`
        // points into `topic_c`, `names`, `values` or `payload`, which outlive the call, and
        // librdkafka copies them all (RD_KAFKA_MSG_F_COPY for the value; topic and header
        // names and values are always copied). An error object returned is freed here.
        unsafe {
            let error = rdkafka_sys::rd_kafka_produceva(
                self.producer.client().native_ptr(),
                vus.as_ptr(),
                vus.len(),
            );
            if !error.is_null() {
                let message = std::ffi::CStr::from_ptr(rdkafka_sys::rd_kafka_error_string(error))
                    .to_string_lossy()
                    .into_owned();
                rdkafka_sys::rd_kafka_error_destroy(error);
                panic!("producing a record with a raw header name: {message}");
            }
        }
        self.flush();
    }
}

/// Sets the mock cluster's initial rebalance delay (3 s by default, as a real broker's
/// `group.initial.rebalance.delay.ms`) to 0, so each consumer start joins its group at once.
/// rdkafka's `MockCluster` has no method for it; librdkafka's mock API has.
#[allow(unsafe_code)]
fn no_initial_rebalance_delay(producer: &BaseProducer) {
    let client = producer.client();
    // SAFETY: `client` is a live librdkafka handle for the whole call. It was created with
    // `test.mock.num.brokers`, so it owns a mock cluster that lives as long as it does, and
    // `rd_kafka_handle_mock_cluster` returns that cluster (checked for null before use). The
    // setter only stores an integer in the cluster's state under its own lock.
    unsafe {
        let mock = rdkafka_sys::rd_kafka_handle_mock_cluster(client.native_ptr());
        assert!(!mock.is_null(), "the test producer has no mock cluster");
        rdkafka_sys::rd_kafka_mock_group_initial_rebalance_delay_ms(mock, 0);
    }
}

/// A record read back from a topic.
#[derive(Debug)]
pub struct TopicRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    /// The headers as sent, bytes untouched.
    pub raw_headers: Vec<(String, Option<Vec<u8>>)>,
}

impl TopicRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.0 == name)
            .map(|h| h.1.as_str())
    }
}

pub fn movement(account: &str, amount: i64) -> Vec<u8> {
    format!(r#"{{"account":"{account}","amount":{amount}}}"#).into_bytes()
}

/// The payload of [`Cluster::send_movement`].
#[derive(serde::Deserialize)]
pub struct Movement {
    pub account: String,
    pub amount: i64,
}

/// One `on_duplicate` call: offset, cause and the stored outcome.
pub type DuplicateCall = (i64, DuplicateCause, Option<Vec<u8>>);

/// What a handler observed, for assertions.
#[derive(Default)]
pub struct Observed {
    /// (partition, offset) of every handler call, in call order.
    pub calls: Mutex<Vec<(i32, i64)>>,
    /// (offset, cause, stored outcome) of every on_duplicate call.
    pub duplicates: Mutex<Vec<DuplicateCall>>,
    /// (offset, offset of the first record) of every on_conflict call.
    pub conflicts: Mutex<Vec<(i64, i64)>>,
    /// Notified when the handler reaches its `hang_at` or `notify_at` offset.
    pub reached: Notify,
}

impl Observed {
    pub fn calls(&self) -> Vec<(i32, i64)> {
        self.calls.lock().unwrap().clone()
    }
}

/// A ledger handler: adds `amount` to `balance/<account>` in the store transaction and returns
/// the new balance as its outcome. Fault points: `hang_at` makes it write its effects and then
/// never return (the crash point between handler and commit); `notify_at` only signals;
/// `delay` slows every call down.
#[derive(Clone)]
pub struct Ledger {
    pub observed: Arc<Observed>,
    pub hang_at: Option<i64>,
    /// Hang like `hang_at`, but only the first time each partition reaches this offset.
    pub hang_once_at: Option<i64>,
    hung: Arc<Mutex<std::collections::HashSet<i32>>>,
    pub notify_at: Option<i64>,
    pub panic_at: Option<i64>,
    /// Fail at this offset with this class, this many times (then succeed).
    pub fail_at: Option<(i64, ErrorClass, u32)>,
    /// (partition, offset, n): fail that record retryably until the handler was called `n`
    /// times for records of other partitions.
    pub hold_until_others: Option<(i32, i64, usize)>,
    failures: Arc<std::sync::atomic::AtomicU32>,
    pub delay: Duration,
    /// `on_duplicate` and `on_conflict` panic after recording their call.
    pub panic_in_hooks: bool,
    /// Shared by the ledgers of several instances: each instance's first handler call waits
    /// (up to [`WAIT`]) until every instance has made its first call, so that they start
    /// together whatever the fetch timing of each consumer.
    pub start_together: Option<Arc<tokio::sync::Barrier>>,
}

impl Ledger {
    pub fn new() -> Self {
        Ledger {
            observed: Arc::new(Observed::default()),
            hang_at: None,
            hang_once_at: None,
            hung: Arc::default(),
            notify_at: None,
            panic_at: None,
            fail_at: None,
            hold_until_others: None,
            failures: Arc::default(),
            delay: Duration::ZERO,
            panic_in_hooks: false,
            start_together: None,
        }
    }
}

/// A transaction the ledger can add to: `balance/<account>` keys on RocksDB, a `ledger` table
/// on PostgreSQL. Returns the new balance.
pub trait LedgerTx: Transaction {
    fn add(
        &mut self,
        account: &str,
        amount: i64,
    ) -> impl std::future::Future<Output = Result<i64, HandlerError>> + Send;
}

impl LedgerTx for RocksTx {
    async fn add(&mut self, account: &str, amount: i64) -> Result<i64, HandlerError> {
        let key = format!("balance/{account}");
        let balance = self
            .get(&key)
            .map_err(HandlerError::retryable)?
            .map(|b| String::from_utf8(b).unwrap().parse::<i64>().unwrap())
            .unwrap_or(0)
            + amount;
        self.put(&key, balance.to_string());
        Ok(balance)
    }
}

#[cfg(feature = "memory")]
impl LedgerTx for idempotent_consumer::MemoryTx {
    async fn add(&mut self, account: &str, amount: i64) -> Result<i64, HandlerError> {
        let key = format!("balance/{account}");
        let balance = self
            .get(&key)
            .map_err(HandlerError::retryable)?
            .map(|b| String::from_utf8(b).unwrap().parse::<i64>().unwrap())
            .unwrap_or(0)
            + amount;
        self.put(key, balance.to_string());
        Ok(balance)
    }
}

#[cfg(feature = "postgres")]
impl LedgerTx for idempotent_consumer::PgTx {
    async fn add(&mut self, account: &str, amount: i64) -> Result<i64, HandlerError> {
        sqlx::query_scalar(
            "INSERT INTO ledger (account, balance) VALUES ($1, $2) \
             ON CONFLICT (account) DO UPDATE SET balance = ledger.balance + EXCLUDED.balance \
             RETURNING balance",
        )
        .bind(account)
        .bind(amount)
        .fetch_one(self.conn())
        .await
        .map_err(HandlerError::retryable)
    }
}

impl<T: LedgerTx> Handler<T> for Ledger {
    async fn handle(&self, record: &Record, tx: &mut T) -> Result<Outcome, HandlerError> {
        let first = {
            let mut calls = self.observed.calls.lock().unwrap();
            calls.push((record.partition(), record.offset()));
            calls.len() == 1
        };
        if first && let Some(barrier) = &self.start_together {
            // On time-out the instances go on alone, and the test's own assertions say so.
            let _ = tokio::time::timeout(WAIT, barrier.wait()).await;
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let m: Movement = record.json()?;
        let balance = tx.add(&m.account, m.amount).await?;
        if let Some((partition, offset, n)) = self.hold_until_others
            && (partition, offset) == (record.partition(), record.offset())
        {
            let others = self
                .observed
                .calls()
                .iter()
                .filter(|c| c.0 != partition)
                .count();
            if others < n {
                return Err(HandlerError::retryable(format!(
                    "holding until other partitions had {n} calls (now {others})"
                )));
            }
        }
        if let Some((offset, class, times)) = self.fail_at
            && offset == record.offset()
            && self.failures.fetch_add(1, Ordering::SeqCst) < times
        {
            let message = format!("injected {class:?} failure at offset {offset}");
            return Err(match class {
                ErrorClass::Retryable => HandlerError::retryable(message),
                ErrorClass::Permanent => HandlerError::permanent(message),
                ErrorClass::Fatal => HandlerError::fatal(message),
            });
        }
        if self.panic_at == Some(record.offset()) {
            panic!("ledger bug at offset {}", record.offset());
        }
        if self.notify_at == Some(record.offset()) {
            self.observed.reached.notify_one();
        }
        if self.hang_once_at == Some(record.offset())
            && self.hung.lock().unwrap().insert(record.partition())
        {
            std::future::pending::<()>().await;
        }
        if self.hang_at == Some(record.offset()) {
            self.observed.reached.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(Outcome::bytes(balance.to_string()))
    }

    async fn on_duplicate(&self, record: &Record, entry: &DedupEntry, cause: DuplicateCause) {
        self.observed.duplicates.lock().unwrap().push((
            record.offset(),
            cause,
            entry.outcome.clone(),
        ));
        assert!(
            !self.panic_in_hooks,
            "on_duplicate bug at {}",
            record.offset()
        );
    }

    async fn on_conflict(&self, record: &Record, entry: &DedupEntry) {
        self.observed
            .conflicts
            .lock()
            .unwrap()
            .push((record.offset(), entry.offset));
        assert!(
            !self.panic_in_hooks,
            "on_conflict bug at {}",
            record.offset()
        );
    }
}

/// Committed balances in a store.
pub fn balances(store: &RocksStore) -> HashMap<String, i64> {
    store
        .scan_prefix(b"balance/")
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8(k[8..].to_vec()).unwrap(),
                String::from_utf8(v).unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// A cluster, a fresh topic with `partitions` and a fresh group.
pub fn setup(partitions: i32) -> (Cluster, String, String) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(partitions);
    (cluster, topic, unique("group"))
}

/// A runtime builder preset for tests: fast group joins and short timeouts.
pub fn builder(cluster: &Cluster, group: &str, topic: &str) -> idempotent_consumer::RuntimeBuilder {
    Runtime::builder()
        .bootstrap_servers(cluster.bootstrap())
        .group_id(group)
        .topics([topic])
        .set("session.timeout.ms", cluster.session_timeout_ms())
        .set("heartbeat.interval.ms", "500")
        .set("topic.metadata.refresh.interval.ms", "500")
}

fn new_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One consumer incarnation on its own tokio runtime, like one process.
pub struct Incarnation {
    rt: Option<tokio::runtime::Runtime>,
    shutdown: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<idempotent_consumer::Result<()>>>,
    pub stats: Arc<Stats>,
    /// The runtime's progress: usable after a crash or stop too (it then reports the end).
    pub progress: idempotent_consumer::Progress,
}

impl Incarnation {
    pub fn start<S: Store, H: Handler<S::Tx>>(runtime: Runtime<S, H>) -> Self {
        Self::start_on(new_runtime(), runtime)
    }

    /// Starts the consumer that `build` makes from a store of `backend` opened on the
    /// incarnation's own tokio runtime (a connection pool belongs to the runtime that made it).
    pub fn launch<B: backend::Backend, H: Handler<<B::S as Store>::Tx>>(
        backend: &B,
        build: impl FnOnce(B::S) -> Runtime<B::S, H>,
    ) -> Self {
        Self::launch_with(&|rt: &tokio::runtime::Runtime| backend.open(rt), build)
    }

    /// Like [`Incarnation::launch`], with the store from `open`.
    pub fn launch_with<S: Store, H: Handler<S::Tx>>(
        open: &dyn Fn(&tokio::runtime::Runtime) -> S,
        build: impl FnOnce(S) -> Runtime<S, H>,
    ) -> Self {
        let rt = new_runtime();
        let store = open(&rt);
        let runtime = build(store);
        Self::start_on(rt, runtime)
    }

    fn start_on<S: Store, H: Handler<S::Tx>>(
        rt: tokio::runtime::Runtime,
        runtime: Runtime<S, H>,
    ) -> Self {
        let stats = runtime.stats();
        let progress = runtime.progress();
        let (tx, rx) = oneshot::channel();
        let done = rt.spawn(runtime.run(async {
            let _ = rx.await;
        }));
        Incarnation {
            rt: Some(rt),
            shutdown: Some(tx),
            done: Some(done),
            stats,
            progress,
        }
    }

    /// Waits until `n` partitions are assigned to this instance, or panics after [`WAIT`].
    pub fn wait_assigned(&self, n: usize) {
        let start = Instant::now();
        loop {
            let assigned = backend::block_on(self.progress.partitions()).map_or(0, |p| p.len());
            if assigned == n {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "{assigned} partitions assigned, not {n}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the runtime has committed everything in the partitions assigned to it now,
    /// or panics after [`WAIT`].
    pub fn caught_up(&self) {
        backend::block_on(async {
            tokio::time::timeout(WAIT, self.progress.caught_up())
                .await
                .expect("never caught up")
                .expect("the runtime stopped before it caught up")
        });
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Waits until `cond` holds for the counters, or panics with them after [`WAIT`].
    pub fn wait_for(&self, what: &str, cond: impl Fn(&StatsSnapshot) -> bool) {
        let start = Instant::now();
        loop {
            let s = self.stats();
            if cond(&s) {
                return;
            }
            if let Some(done) = &self.done {
                assert!(
                    !done.is_finished(),
                    "runtime ended while waiting for {what}: {s:?}"
                );
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting for {what}: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a handler notification.
    pub fn wait_notified(&self, observed: &Observed) {
        let rt = self.rt.as_ref().unwrap();
        rt.block_on(async {
            tokio::time::timeout(WAIT, observed.reached.notified())
                .await
                .expect("handler never reached its fault point")
        });
    }

    /// Drops everything in flight without any graceful step: a crash.
    pub fn crash(mut self) {
        let rt = self.rt.take().unwrap();
        // The shutdown signal outlives the runtime: sent first, it would start the graceful
        // drain, which may commit before the runtime is gone.
        let shutdown = self.shutdown.take();
        // Dropping the runtime cancels every task at its current await point; nothing after it
        // runs, so nothing else commits.
        drop(self.done.take());
        drop(rt);
        drop(shutdown);
    }

    /// Graceful shutdown; returns what `run` returned.
    pub fn stop(mut self) -> idempotent_consumer::Result<()> {
        let _ = self.shutdown.take().unwrap().send(());
        self.join()
    }

    /// Waits for `run` to return on its own (a fatal stop).
    pub fn join(&mut self) -> idempotent_consumer::Result<()> {
        let rt = self.rt.take().unwrap();
        let done = self.done.take().unwrap();
        let result = rt
            .block_on(async { tokio::time::timeout(WAIT, done).await })
            .expect("runtime did not stop in time")
            .expect("runtime task panicked");
        drop(rt);
        result
    }
}

impl Drop for Incarnation {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let (Some(rt), Some(done)) = (self.rt.take(), self.done.take()) {
            let _ = rt.block_on(async { tokio::time::timeout(WAIT, done).await });
        }
    }
}

/// The committed entry of idempotency key `key` in `group`.
pub async fn committed<S: idempotent_consumer::Inspect>(
    store: &S,
    group: &str,
    key: &str,
) -> Option<DedupEntry> {
    let key = idempotent_consumer::EntryKey::new(group, key);
    store.entry(&key).await.unwrap()
}

/// The scoped store key of idempotency key `key` in `group`.
pub fn store_key(group: &str, key: &str) -> Vec<u8> {
    idempotent_consumer::EntryKey::new(group, key).store_key()
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, filter::LevelFilter};
    let shown = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(tracing_subscriber::EnvFilter::from_default_env());
    let _ = tracing_subscriber::registry()
        .with(shown)
        .with(Warnings.with_filter(LevelFilter::WARN))
        .try_init();
}

/// Every warning and error logged in this test process so far, as `message field=value ...`
/// (after [`init_tracing`]).
pub fn warnings() -> Vec<String> {
    WARNINGS.lock().unwrap().clone()
}

static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Keeps warnings and errors for [`warnings`], whatever `RUST_LOG` shows.
struct Warnings;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write;
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        WARNINGS.lock().unwrap().push(fields.0);
    }
}

impl Cluster {
    /// Produces `(idempotency key, payload)` records to one partition with a producer of their
    /// own that compresses with `codec` (`gzip`, `snappy`, `lz4`, `zstd`), waiting for every
    /// acknowledgement.
    pub fn send_compressed(
        &self,
        topic: &str,
        partition: i32,
        codec: &str,
        records: &[(String, Vec<u8>)],
    ) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("compression.type", codec)
            .set("linger.ms", "50")
            .create()
            .unwrap_or_else(|e| panic!("a producer compressing with {codec}: {e}"));
        for (key, payload) in records {
            enqueue_keyed(&producer, topic, partition, key, payload);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while producer.in_flight_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "{codec} records not acknowledged"
            );
            producer.poll(Duration::from_millis(1));
        }
    }
}

/// What the broker answered to a produce request sent by [`Cluster::send_batch_by_hand`].
#[derive(Debug, PartialEq, Eq)]
pub enum RawProduce {
    /// Stored at this base offset (the mock cluster keeps batches as sent, unchecked).
    Stored(i64),
    /// Refused with this Kafka error code (a broker checks the CRC: `CORRUPT_MESSAGE` is 2).
    Refused(i16),
}

impl Cluster {
    /// Produces one record batch (magic 2, uncompressed) of `(idempotency key, payload)`
    /// records, written by hand on the wire (a Produce v3 request): with `corrupt`, its CRC is
    /// wrong, as a disk or network corruption leaves it, which no client would send. Goes to
    /// the first bootstrap server, the leader of every partition on the one-broker test
    /// cluster.
    pub fn send_batch_by_hand(
        &self,
        topic: &str,
        partition: i32,
        records: &[(&str, Vec<u8>)],
        corrupt: bool,
    ) -> RawProduce {
        use std::io::{Read, Write};
        let batch = record_batch(records, corrupt);
        let mut body = Vec::new();
        body.extend(0i16.to_be_bytes()); // api key: Produce
        body.extend(3i16.to_be_bytes()); // version 3
        body.extend(7i32.to_be_bytes()); // correlation id
        put_str(&mut body, "corrupt-batch");
        body.extend((-1i16).to_be_bytes()); // no transactional id
        body.extend((-1i16).to_be_bytes()); // acks: all
        body.extend(10_000i32.to_be_bytes()); // timeout
        body.extend(1i32.to_be_bytes()); // one topic
        put_str(&mut body, topic);
        body.extend(1i32.to_be_bytes()); // one partition
        body.extend(partition.to_be_bytes());
        body.extend((batch.len() as i32).to_be_bytes());
        body.extend(&batch);
        let address = self.bootstrap.split(',').next().unwrap();
        let mut conn = std::net::TcpStream::connect(address).expect("connecting to the broker");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        conn.write_all(&(body.len() as i32).to_be_bytes()).unwrap();
        conn.write_all(&body).unwrap();
        let mut size = [0u8; 4];
        conn.read_exact(&mut size)
            .expect("reading the produce response");
        let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
        conn.read_exact(&mut response).unwrap();
        // correlation id, topics (1), name, partitions (1), index, error code, base offset.
        let mut at = 4 + 4;
        let name_len = i16::from_be_bytes([response[at], response[at + 1]]) as usize;
        at += 2 + name_len + 4 + 4;
        let code = i16::from_be_bytes([response[at], response[at + 1]]);
        let base = i64::from_be_bytes(response[at + 2..at + 10].try_into().unwrap());
        if code == 0 {
            RawProduce::Stored(base)
        } else {
            RawProduce::Refused(code)
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s.as_bytes());
}

fn put_varint(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// CRC-32C (Castagnoli), what record batches carry.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A record batch (magic 2) of keyed records; with `corrupt`, its CRC is one off.
fn record_batch(records: &[(&str, Vec<u8>)], corrupt: bool) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut checked = Vec::new();
    checked.extend(0i16.to_be_bytes()); // attributes: no compression
    checked.extend((records.len() as i32 - 1).to_be_bytes()); // last offset delta
    checked.extend(now.to_be_bytes());
    checked.extend(now.to_be_bytes());
    checked.extend((-1i64).to_be_bytes()); // producer id
    checked.extend((-1i16).to_be_bytes()); // producer epoch
    checked.extend((-1i32).to_be_bytes()); // base sequence
    checked.extend((records.len() as i32).to_be_bytes());
    for (i, (key, payload)) in records.iter().enumerate() {
        let mut record = vec![0u8]; // attributes
        put_varint(&mut record, 0); // timestamp delta
        put_varint(&mut record, i as i64); // offset delta
        put_varint(&mut record, -1); // no Kafka key
        put_varint(&mut record, payload.len() as i64);
        record.extend(payload);
        put_varint(&mut record, 1); // one header
        put_varint(&mut record, "idempotency-key".len() as i64);
        record.extend(b"idempotency-key");
        put_varint(&mut record, key.len() as i64);
        record.extend(key.as_bytes());
        put_varint(&mut checked, record.len() as i64);
        checked.extend(record);
    }
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset (the broker assigns it)
    batch.extend((4 + 1 + 4 + checked.len() as i32).to_be_bytes());
    batch.extend((-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(
        crc32c(&checked)
            .wrapping_add(u32::from(corrupt))
            .to_be_bytes(),
    );
    batch.extend(checked);
    batch
}

/// Enqueues one record under an idempotency key, to an explicit partition.
fn enqueue_keyed(producer: &BaseProducer, topic: &str, partition: i32, key: &str, payload: &[u8]) {
    let headers = OwnedHeaders::new().insert(Header {
        key: "idempotency-key",
        value: Some(key.as_bytes()),
    });
    let record: BaseRecord<'_, (), [u8]> = BaseRecord::to(topic)
        .partition(partition)
        .headers(headers)
        .payload(payload);
    producer
        .send(record)
        .map_err(|(e, _)| e)
        .expect("enqueueing a record");
}
