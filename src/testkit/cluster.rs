//! [`TestCluster`]: the Kafka cluster a test runs against, whichever it is, with topic creation
//! and producing that work on each.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};

use super::BrokerProcess;
use super::harness::WorkRecord;
use crate::identity::DEFAULT_KEY_HEADER;

/// The cluster a test runs against:
///
/// - librdkafka's mock cluster in this process ([`TestCluster::mock`]): the fastest, gone with
///   the process;
/// - a [`BrokerProcess`] ([`TestCluster::process`]): the mock cluster hosted by a child
///   process, which outlives the test's own consumer processes and takes fault commands;
/// - a real cluster ([`TestCluster::external`]), for example Apache Kafka in KRaft mode as a
///   CI service container.
///
/// [`TestCluster::from_env`] picks the one `KAFKA_BOOTSTRAP_SERVERS` names, or the mock.
pub enum TestCluster {
    /// librdkafka's mock cluster in this process.
    Mock(MockCluster<'static, DefaultProducerContext>),
    /// The mock cluster in a process of its own.
    Process(Mutex<BrokerProcess>),
    /// A cluster at these `bootstrap.servers`.
    External(String),
}

impl fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TestCluster")
            .field(&self.bootstrap())
            .finish()
    }
}

impl TestCluster {
    /// The cluster `KAFKA_BOOTSTRAP_SERVERS` names when it is set and not empty, else a mock
    /// cluster in this process.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
            Ok(servers) if !servers.trim().is_empty() => Ok(Self::external(servers)),
            _ => Self::mock(),
        }
    }

    /// A mock cluster of one broker in this process.
    pub fn mock() -> Result<Self, String> {
        MockCluster::new(1)
            .map(TestCluster::Mock)
            .map_err(|e| format!("starting librdkafka's mock cluster: {e}"))
    }

    /// The mock cluster a [`BrokerProcess`] hosts.
    pub fn process(broker: BrokerProcess) -> Self {
        TestCluster::Process(Mutex::new(broker))
    }

    /// The cluster at `bootstrap_servers`.
    pub fn external(bootstrap_servers: impl Into<String>) -> Self {
        TestCluster::External(bootstrap_servers.into())
    }

    /// The cluster's `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        match self {
            TestCluster::Mock(mock) => mock.bootstrap_servers(),
            TestCluster::Process(broker) => broker
                .lock()
                .expect("broker process poisoned")
                .bootstrap()
                .to_owned(),
            TestCluster::External(servers) => servers.clone(),
        }
    }

    /// The consumers' `session.timeout.ms` for this cluster: 4 s on the mock cluster, 6 s
    /// (a broker's default `group.min.session.timeout.ms`) on a real one. A killed consumer's
    /// successor waits for the session to expire, so shorter is faster; but the mock holds a
    /// join for its initial rebalance delay (3 s), and a member whose session is not longer
    /// than that (2 s was tried) never finishes joining.
    pub fn session_timeout_ms(&self) -> &'static str {
        match self {
            TestCluster::Mock(_) | TestCluster::Process(_) => "4000",
            TestCluster::External(_) => "6000",
        }
    }

    /// Creates `topic` with `partitions` partitions (replication 1).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), String> {
        match self {
            TestCluster::Mock(mock) => mock
                .create_topic(topic, partitions, 1)
                .map_err(|e| format!("creating topic {topic} on the mock cluster: {e}")),
            TestCluster::Process(broker) => broker
                .lock()
                .expect("broker process poisoned")
                .command(&format!("topic {topic} {partitions}")),
            TestCluster::External(servers) => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", servers)
                    .create()
                    .map_err(|e| format!("creating the admin client: {e}"))?;
                let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                // rdkafka's admin futures are completed by its own thread: any executor will do.
                let results =
                    futures::executor::block_on(admin.create_topics([&new], &AdminOptions::new()))
                        .map_err(|e| format!("creating topic {topic}: {e}"))?;
                for result in results {
                    result.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
                }
                Ok(())
            }
        }
    }

    /// Sends `records` to `topic`, in order, each with its key as the Kafka key and in the
    /// `idempotency-key` header, on its partition; returns once every one is acknowledged.
    pub fn produce(&self, topic: &str, records: &[WorkRecord]) -> Result<(), String> {
        send(&producer(&self.bootstrap())?, topic, records)
    }
}

/// An idempotent producer for a test's records.
pub(crate) fn producer(bootstrap: &str) -> Result<BaseProducer, String> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .map_err(|e| format!("creating the test's producer: {e}"))
}

/// Sends `records`, in order, and waits until every one is acknowledged.
pub(crate) fn send(
    producer: &BaseProducer,
    topic: &str,
    records: &[WorkRecord],
) -> Result<(), String> {
    for r in records {
        let headers = OwnedHeaders::new().insert(Header {
            key: DEFAULT_KEY_HEADER,
            value: Some(r.key.as_bytes()),
        });
        let mut record = BaseRecord::to(topic)
            .partition(r.partition)
            .key(r.key.as_bytes())
            .payload(&r.payload)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(format!("producing to {topic}: {e}")),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(|e| format!("flushing the records to {topic}: {e}"))
}
