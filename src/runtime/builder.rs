//! Building a [`Runtime`]: the Kafka settings (any librdkafka property passes through), the
//! store, identity, batching, retention, conflict, retry and dead-letter policies, validated by
//! [`RuntimeBuilder::build`], which takes the handler.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;

use super::stale::{self, StalePartitionPolicy};
use super::start::StartPosition;
use super::{Runtime, Shared};
use crate::dead_letter::{DeadLetterProducer, DeadLetterTopic};
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::identity::{Identity, Scope};
use crate::metrics::GroupMeter;
use crate::retry::RetryPolicy;
use crate::store::Store;

/// What to do with a record whose key was first used with a different payload.
///
/// Under the first two policies the conflicting record gets an entry of its own (under its key
/// and fingerprint), committed with the position: a redelivery or replay of it is a duplicate,
/// not a second conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConflictPolicy {
    /// Keep it as a dead letter (in the store and on the dead-letter topic) with the reason,
    /// and go on (default).
    #[default]
    DeadLetter,
    /// Skip it and record it in the store's dead-letter log only (reason `conflict`), not on
    /// the dead-letter topic; count it as a conflict (`conflicts_skipped`) and go on. For
    /// streams where re-used keys are expected noise but must stay auditable.
    SkipAndRecord,
    /// Stop the runtime without committing past it.
    Stop,
}

/// Default retention of dedup entries: seven days, Kafka's default `retention.ms`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) group: String,
    pub(crate) topics: Vec<String>,
    pub(crate) identity: Identity,
    pub(crate) scope: Scope,
    pub(crate) conflict_scope: Scope,
    pub(crate) batch_max_records: usize,
    pub(crate) batch_max_bytes: usize,
    pub(crate) batch_linger: Duration,
    pub(crate) retention: Duration,
    pub(crate) conflict: ConflictPolicy,
    pub(crate) retry: RetryPolicy,
    pub(crate) drain_timeout: Duration,
    pub(crate) purge_interval: Duration,
    pub(crate) purge_batch: usize,
    pub(crate) stale: StalePartitionPolicy,
    pub(crate) start: StartPosition,
    pub(crate) kafka_unavailable: Duration,
    pub(crate) store_retry_timeout: Duration,
    /// How long one assignment may try transient acquire failures again: the poll thread
    /// waits meanwhile, so at most half of `max.poll.interval.ms`.
    pub(crate) acquire_budget: Duration,
    pub(crate) dead_letter_retention: Option<Duration>,
    /// Decides between valid updates of one entity (feature `resolve`).
    #[cfg(feature = "resolve")]
    pub(crate) resolver: Option<crate::resolve::Resolver>,
}

/// Builds a [`Runtime`]. Start with [`Runtime::builder`].
pub struct RuntimeBuilder<S = ()> {
    client: ClientConfig,
    group: Option<String>,
    topics: Vec<String>,
    store: S,
    identity: Identity,
    batch_max_records: usize,
    batch_max_bytes: usize,
    batch_linger: Duration,
    retention: Duration,
    conflict: ConflictPolicy,
    retry: RetryPolicy,
    drain_timeout: Duration,
    purge_interval: Duration,
    purge_batch: usize,
    dead_letter_topic: DeadLetterTopic,
    stale: StalePartitionPolicy,
    start: StartPosition,
    kafka_unavailable: Duration,
    store_retry_timeout: Duration,
    dead_letter_retention: Option<Duration>,
    /// Set by [`RuntimeBuilder::resolver`] (`resolver.rs`).
    #[cfg(feature = "resolve")]
    pub(super) resolver: Option<crate::resolve::Resolver>,
    /// Makes the outbox's relay at `build` ([`RuntimeBuilder::relay`]).
    #[cfg(feature = "outbox")]
    pub(super) relay: Option<super::relay::Start<S>>,
}

impl<S> fmt::Debug for RuntimeBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The client configuration may hold credentials: not printed.
        f.debug_struct("RuntimeBuilder")
            .field("group", &self.group)
            .field("topics", &self.topics)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl<S> RuntimeBuilder<S> {
    /// Kafka bootstrap servers (`bootstrap.servers`).
    pub fn bootstrap_servers(self, servers: impl Into<String>) -> Self {
        self.set("bootstrap.servers", servers)
    }

    /// The consumer group; it also scopes idempotency keys.
    pub fn group_id(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Topics to subscribe to.
    pub fn topics<I, T>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.topics = topics.into_iter().map(Into::into).collect();
        self
    }

    /// Any librdkafka consumer property, passed through untouched. `enable.auto.commit` must stay
    /// `false`: offsets are committed by the runtime after each store commit.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.client.set(key, value);
        self
    }

    /// How idempotency keys are derived and scoped (default: the `idempotency-key` header).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = identity;
        self
    }

    /// Batch bounds: at most `max_records` per commit, and no record waits more than `linger`
    /// for its batch to fill (defaults 500 and 50 ms).
    pub fn batch(mut self, max_records: usize, linger: Duration) -> Self {
        self.batch_max_records = max_records;
        self.batch_linger = linger;
        self
    }

    /// The byte bound of a batch (default 16 MiB): a batch stops taking records once the
    /// keys, payloads and headers it holds reach `max_bytes`, so it exceeds the bound by at
    /// most one record, and a record larger than the bound is a batch of its own. It bounds
    /// what a partition holds in memory and what one commit writes, whatever the record sizes.
    pub fn batch_max_bytes(mut self, max_bytes: usize) -> Self {
        self.batch_max_bytes = max_bytes;
        self
    }

    /// How long a dedup entry keeps its key taken (default [`DEFAULT_RETENTION`]). Set it to at
    /// least the topic's retention: a replay older than this is applied again. Time is read
    /// once per batch, when its transaction begins: an entry is created at that instant, and a
    /// key that expires while a batch runs still counts as taken in that batch.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// What to do with a conflicting record (default: dead-letter it).
    pub fn conflict_policy(mut self, policy: ConflictPolicy) -> Self {
        self.conflict = policy;
        self
    }

    /// How retryable handler errors are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long a revoked partition may take to drain and commit before it is abandoned (its
    /// uncommitted work then goes to the next owner). Default 30 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How often expired entries are purged, and at most how many per store round (defaults
    /// 60 s and 1,000).
    pub fn purge(mut self, interval: Duration, batch: usize) -> Self {
        self.purge_interval = interval;
        self.purge_batch = batch;
        self
    }

    /// Where dead letters are produced besides the store (default: `<topic>.dlq`). Each is
    /// produced and acknowledged before the commit that marks its key dead-lettered: a crash in
    /// between can repeat a dead-letter record (it carries the idempotency key and original
    /// offset to deduplicate on) but never lose one.
    pub fn dead_letter_topic(mut self, topic: DeadLetterTopic) -> Self {
        self.dead_letter_topic = topic;
        self
    }

    /// What to do with an assigned partition whose latest state another store holds: Kafka's
    /// latest commit for it came from another instance's store of its own (default: stop with
    /// [`Error::StalePartition`]). Only stores with a [`Store::store_id`] (RocksDB) can be
    /// stale; a store the group shares never is.
    pub fn on_stale_partition(mut self, policy: StalePartitionPolicy) -> Self {
        self.stale = policy;
        self
    }

    /// Where a partition starts when the store has no position for it: a new store, or a
    /// partition it never handled (default [`StartPosition::Beginning`]: everything still in
    /// the log). A stored position always wins; the group's committed Kafka offset counts only
    /// under [`StartPosition::Committed`]. A store without a position that meets a group with
    /// a committed offset is logged as a warning with both. A brand-new group with a new store
    /// thus starts at the beginning, as `auto.offset.reset=earliest` (which the builder sets
    /// unless you set it) would; that property then only decides where a stored position that
    /// fell out of the log (retention deleted its records) resumes.
    pub fn start_without_position(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// How long no Kafka broker may be reachable, or a subscribed topic missing, before
    /// [`Runtime::run`] ends with the error (default 60 s). A fatal consumer error (another
    /// member with this `group.instance.id`, for example) ends it at once.
    pub fn kafka_unavailable_timeout(mut self, timeout: Duration) -> Self {
        self.kafka_unavailable = timeout;
        self
    }

    /// How long a partition's batch may keep failing with transient store failures (a lost
    /// connection, a deadlock, a failover), tried again with a growing backoff, before
    /// [`Runtime::run`] ends with the last failure (default 5 minutes). The batch's records
    /// are not committed and are handled again by the next run.
    pub fn store_retry_timeout(mut self, timeout: Duration) -> Self {
        self.store_retry_timeout = timeout;
        self
    }

    /// How long the store keeps a dead letter (default 30 days; `None`: until deleted by
    /// hand). The purge that removes expired entries removes older letters too, in bounded
    /// rounds, by the time the record was dead-lettered. Longer than the dead-letter topic's
    /// retention keeps the store the record of truth for what was dead-lettered.
    pub fn dead_letter_retention(mut self, retention: Option<Duration>) -> Self {
        self.dead_letter_retention = retention;
        self
    }

    /// The store the runtime commits into.
    pub fn store<T: Store>(self, store: T) -> RuntimeBuilder<T> {
        RuntimeBuilder {
            client: self.client,
            group: self.group,
            topics: self.topics,
            store,
            identity: self.identity,
            batch_max_records: self.batch_max_records,
            batch_max_bytes: self.batch_max_bytes,
            batch_linger: self.batch_linger,
            retention: self.retention,
            conflict: self.conflict,
            retry: self.retry,
            drain_timeout: self.drain_timeout,
            purge_interval: self.purge_interval,
            purge_batch: self.purge_batch,
            dead_letter_topic: self.dead_letter_topic,
            stale: self.stale,
            start: self.start,
            kafka_unavailable: self.kafka_unavailable,
            store_retry_timeout: self.store_retry_timeout,
            dead_letter_retention: self.dead_letter_retention,
            #[cfg(feature = "resolve")]
            resolver: self.resolver,
            #[cfg(feature = "outbox")]
            relay: None,
        }
    }
}

impl<S: Store> RuntimeBuilder<S> {
    /// Validates the configuration and returns the runtime that will call `handler`.
    pub fn build<H: Handler<S::Tx>>(self, handler: H) -> Result<Runtime<S, H>> {
        let group = self
            .group
            .filter(|g| !g.is_empty())
            .ok_or_else(|| Error::Config("group_id is required".into()))?;
        if group.len() > 255 {
            return Err(Error::Config("group_id is longer than 255 bytes".into()));
        }
        if self.topics.is_empty() || self.topics.iter().any(String::is_empty) {
            return Err(Error::Config(
                "at least one non-empty topic is required".into(),
            ));
        }
        if let Some(pattern) = self.topics.iter().find(|t| t.starts_with('^')) {
            // librdkafka would subscribe to every topic the pattern matches, dead-letter
            // topics included.
            return Err(Error::Config(format!(
                "topic {pattern:?} starts with '^', which subscribes to a pattern; name topics \
                 exactly"
            )));
        }
        if let Some(source) = self.topics.iter().find(|t| {
            let target = self.dead_letter_topic.topic_for(t);
            target.is_some_and(|d| self.topics.contains(&d))
        }) {
            return Err(Error::Config(format!(
                "the dead-letter topic of {source:?} is a consumed topic: dead letters would be \
                 consumed again; choose another dead_letter_topic"
            )));
        }
        if self.client.get("bootstrap.servers").is_none() {
            return Err(Error::Config("bootstrap_servers is required".into()));
        }
        if self
            .client
            .get("enable.auto.commit")
            .is_some_and(|v| v != "false")
        {
            return Err(Error::Config(
                "enable.auto.commit must be false: the runtime commits offsets after the store"
                    .into(),
            ));
        }
        if self.batch_max_records == 0 {
            return Err(Error::Config("batch max_records must be at least 1".into()));
        }
        if self.batch_max_bytes == 0 {
            return Err(Error::Config("batch_max_bytes must be at least 1".into()));
        }
        if self.retention.is_zero() {
            return Err(Error::Config("retention must be positive".into()));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::Config(
                "retry max_attempts must be at least 1".into(),
            ));
        }
        if self.kafka_unavailable.is_zero() {
            return Err(Error::Config(
                "kafka_unavailable_timeout must be positive".into(),
            ));
        }
        if self.dead_letter_retention.is_some_and(|r| r.is_zero()) {
            return Err(Error::Config(
                "dead_letter_retention must be positive (None keeps dead letters)".into(),
            ));
        }
        if self.store_retry_timeout.is_zero() {
            return Err(Error::Config("store_retry_timeout must be positive".into()));
        }
        if self.purge_batch == 0 || self.purge_interval.is_zero() {
            return Err(Error::Config(
                "purge interval and batch must be positive".into(),
            ));
        }
        #[cfg(feature = "resolve")]
        if self.resolver.is_some() && !<S::Tx as crate::store::Transaction>::RESOLVES {
            return Err(Error::Config(
                "a resolver needs a store that keeps entities (RocksStore or PgStore)".into(),
            ));
        }
        self.identity.validate()?;
        let longest = self.identity.longest_store_key(&group);
        if let Some(limit) = self.store.max_key_bytes()
            && longest > limit
        {
            return Err(Error::Config(format!(
                "group, tenant and max_key_len make store keys of up to {longest} bytes (a \
                 conflicting record's key included), over the {limit} bytes this store can \
                 index: lower max_key_len (longer keys can be hashed with OversizeKey::Hash)"
            )));
        }

        let mut client = self.client;
        client
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        if client.get("auto.offset.reset").is_none() {
            client.set("auto.offset.reset", "earliest");
        }
        // A batch whose CRC fails is then an error that stops its partition (`feed.rs`)
        // instead of records handed on unchecked.
        if client.get("check.crcs").is_none() {
            client.set("check.crcs", "true");
        }
        let max_poll = client
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(300), Duration::from_millis);
        let acquire_budget = self.store_retry_timeout.min(max_poll / 2);
        let scope = self.identity.scope(&group);
        let conflict_scope = self.identity.conflict_scope(&group);
        let meter = GroupMeter::new(&group);
        let dead_letters = DeadLetterProducer::new(&client, self.dead_letter_topic)?;
        #[cfg(feature = "outbox")]
        let relay = self
            .relay
            .map(|start| start(&self.store, &client))
            .transpose()?;
        Ok(Runtime {
            #[cfg(feature = "outbox")]
            relay,
            client,
            shared: Arc::new(Shared {
                config: Config {
                    group,
                    topics: self.topics,
                    identity: self.identity,
                    scope,
                    conflict_scope,
                    batch_max_records: self.batch_max_records,
                    batch_max_bytes: self.batch_max_bytes,
                    batch_linger: self.batch_linger,
                    retention: self.retention,
                    conflict: self.conflict,
                    retry: self.retry,
                    drain_timeout: self.drain_timeout,
                    purge_interval: self.purge_interval,
                    purge_batch: self.purge_batch,
                    stale: self.stale,
                    start: self.start,
                    kafka_unavailable: self.kafka_unavailable,
                    store_retry_timeout: self.store_retry_timeout,
                    acquire_budget,
                    dead_letter_retention: self.dead_letter_retention,
                    #[cfg(feature = "resolve")]
                    resolver: self.resolver,
                },
                kafka_mark: self.store.store_id().map(stale::mark),
                progress: Arc::new(super::progress::ProgressState::new()),
                store: Arc::new(self.store),
                dead_letters,
                handler,
                meter,
            }),
        })
    }
}

impl Runtime<(), ()> {
    /// Starts a builder.
    pub fn builder() -> RuntimeBuilder<()> {
        RuntimeBuilder {
            client: ClientConfig::new(),
            group: None,
            topics: Vec::new(),
            store: (),
            identity: Identity::default(),
            batch_max_records: 500,
            batch_max_bytes: 16 << 20,
            batch_linger: Duration::from_millis(50),
            retention: DEFAULT_RETENTION,
            conflict: ConflictPolicy::default(),
            retry: RetryPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            purge_interval: Duration::from_secs(60),
            purge_batch: 1_000,
            dead_letter_topic: DeadLetterTopic::default(),
            stale: StalePartitionPolicy::default(),
            start: StartPosition::default(),
            kafka_unavailable: Duration::from_secs(60),
            store_retry_timeout: Duration::from_secs(300),
            dead_letter_retention: Some(Duration::from_secs(30 * 24 * 3600)),
            #[cfg(feature = "resolve")]
            resolver: None,
            #[cfg(feature = "outbox")]
            relay: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Outcome, Record, RocksStore, RocksTx};

    struct Noop;

    impl Handler<RocksTx> for Noop {
        async fn handle(
            &self,
            _: &Record,
            _: &mut RocksTx,
        ) -> std::result::Result<Outcome, crate::HandlerError> {
            Ok(Outcome::none())
        }
    }

    fn build(topics: &[&str], dead_letters: DeadLetterTopic) -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        Runtime::builder()
            .bootstrap_servers("127.0.0.1:9")
            .group_id("g")
            .topics(topics.iter().copied())
            .dead_letter_topic(dead_letters)
            .store(RocksStore::open(dir.path()).unwrap())
            .build(Noop)
            .map(drop)
    }

    fn config_error(result: Result<()>) -> String {
        match result {
            Err(Error::Config(message)) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn a_config_error_names_the_property_but_never_its_value() {
        let dir = tempfile::tempdir().unwrap();
        for (property, value) in [
            ("sasl.pasword", "hunter2-not-for-logs"),
            ("session.timeout.ms", "hunter2-not-a-number"),
        ] {
            let built = Runtime::builder()
                .bootstrap_servers("127.0.0.1:9")
                .group_id("g")
                .topics(["pay"])
                .set(property, value)
                .store(RocksStore::open(dir.path()).unwrap())
                .build(Noop);
            // A consumer-only property is first checked when run() creates the consumer.
            let err = match built {
                Err(err) => err,
                Ok(runtime) => tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(async {
                        let run = runtime.run(std::future::pending());
                        tokio::time::timeout(Duration::from_secs(10), run).await
                    })
                    .expect("run() fails at once")
                    .unwrap_err(),
            };
            let shown = format!("{err} {err:?} {}", std::error::Error::source(&err).unwrap());
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains(property), "{shown}");
        }
    }

    #[test]
    fn bounds_of_zero_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = || {
            Runtime::builder()
                .bootstrap_servers("127.0.0.1:9")
                .group_id("g")
                .topics(["pay"])
        };
        let open = || RocksStore::open(dir.path()).unwrap();
        let records = base().batch(0, Duration::from_millis(5)).store(open());
        let message = config_error(records.build(Noop).map(drop));
        assert!(message.contains("max_records"), "{message}");
        let bytes = base().batch_max_bytes(0).store(open());
        let message = config_error(bytes.build(Noop).map(drop));
        assert!(message.contains("batch_max_bytes"), "{message}");
        let letters = base()
            .dead_letter_retention(Some(Duration::ZERO))
            .store(open());
        let message = config_error(letters.build(Noop).map(drop));
        assert!(message.contains("dead_letter_retention"), "{message}");
        let kept = base().dead_letter_retention(None).store(open());
        kept.build(Noop).unwrap();
    }

    #[test]
    fn a_pattern_subscription_is_refused() {
        let message = config_error(build(&["^pay.*"], DeadLetterTopic::default()));
        assert!(message.contains("\"^pay.*\""), "{message}");
    }

    #[test]
    fn a_dead_letter_topic_that_is_consumed_is_refused() {
        for (topics, dead_letters) in [
            (&["pay"][..], DeadLetterTopic::Suffix(String::new())),
            (&["pay"][..], DeadLetterTopic::Fixed("pay".into())),
            (&["pay", "pay.dlq"][..], DeadLetterTopic::default()),
        ] {
            let message = config_error(build(topics, dead_letters));
            assert!(message.contains("dead-letter topic"), "{message}");
        }
        build(&["pay"], DeadLetterTopic::default()).unwrap();
        build(&["pay"], DeadLetterTopic::Disabled).unwrap();
        build(&["pay", "refunds"], DeadLetterTopic::Fixed("dlq".into())).unwrap();
    }
}
