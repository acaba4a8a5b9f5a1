//! The runtime: builder, configuration and the control loop.
//!
//! [`Runtime::builder`] collects the Kafka settings (any librdkafka property passes through),
//! the store, identity and batching policies; [`RuntimeBuilder::build`] takes the handler.
//! [`Runtime::run`] consumes until the `shutdown` future completes, then drains in-flight work,
//! commits it and leaves the group.
//!
//! The control loop owns the partition tasks (in a `JoinSet`: dropping the runtime aborts them
//! before their next commit, which is exactly a crash between handler and commit), answers
//! revocations once the revoked partitions' tasks are drained (or abandoned after the drain
//! timeout), runs the bounded retention purge, and stops the whole runtime on a fatal error.
//!
//! Files: `rebalance.rs` (poll thread, assignment, revocation), `partition.rs` (one partition's
//! records), `commit.rs` (the atomic store commit, then Kafka's).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::dead_letter::{DeadLetterProducer, DeadLetterTopic};
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::identity::{Identity, Scope};
use crate::metrics::{self, GroupMeter, PartitionMeter, Stats};
use crate::retry::RetryPolicy;
use crate::store::{PartitionId, Store};

mod commit;
mod feed;
mod partition;
mod rebalance;

use partition::PartitionTask;
use rebalance::{ConsumerCtx, Event, PollThread};

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
    pub(crate) batch_linger: Duration,
    pub(crate) retention: Duration,
    pub(crate) conflict: ConflictPolicy,
    pub(crate) retry: RetryPolicy,
    pub(crate) drain_timeout: Duration,
    pub(crate) purge_interval: Duration,
    pub(crate) purge_batch: usize,
}

pub(crate) struct Shared<S, H> {
    pub(crate) config: Config,
    pub(crate) store: Arc<S>,
    pub(crate) dead_letters: Option<DeadLetterProducer>,
    pub(crate) handler: H,
    /// The runtime's counters and recorder handles.
    pub(crate) meter: GroupMeter,
}

/// Builds a [`Runtime`]. Start with [`Runtime::builder`].
pub struct RuntimeBuilder<S = ()> {
    client: ClientConfig,
    group: Option<String>,
    topics: Vec<String>,
    store: S,
    identity: Identity,
    batch_max_records: usize,
    batch_linger: Duration,
    retention: Duration,
    conflict: ConflictPolicy,
    retry: RetryPolicy,
    drain_timeout: Duration,
    purge_interval: Duration,
    purge_batch: usize,
    dead_letter_topic: DeadLetterTopic,
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

    /// The store the runtime commits into.
    pub fn store<T: Store>(self, store: T) -> RuntimeBuilder<T> {
        RuntimeBuilder {
            client: self.client,
            group: self.group,
            topics: self.topics,
            store,
            identity: self.identity,
            batch_max_records: self.batch_max_records,
            batch_linger: self.batch_linger,
            retention: self.retention,
            conflict: self.conflict,
            retry: self.retry,
            drain_timeout: self.drain_timeout,
            purge_interval: self.purge_interval,
            purge_batch: self.purge_batch,
            dead_letter_topic: self.dead_letter_topic,
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
        if self.retention.is_zero() {
            return Err(Error::Config("retention must be positive".into()));
        }
        if self.retry.max_attempts == 0 {
            return Err(Error::Config(
                "retry max_attempts must be at least 1".into(),
            ));
        }
        if self.purge_batch == 0 || self.purge_interval.is_zero() {
            return Err(Error::Config(
                "purge interval and batch must be positive".into(),
            ));
        }
        self.identity.validate()?;

        let mut client = self.client;
        client
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        if client.get("auto.offset.reset").is_none() {
            client.set("auto.offset.reset", "earliest");
        }
        let scope = self.identity.scope(&group);
        let conflict_scope = self.identity.conflict_scope(&group);
        let meter = GroupMeter::new(&group);
        let dead_letters = DeadLetterProducer::new(&client, self.dead_letter_topic)?;
        Ok(Runtime {
            client,
            shared: Arc::new(Shared {
                config: Config {
                    group,
                    topics: self.topics,
                    identity: self.identity,
                    scope,
                    conflict_scope,
                    batch_max_records: self.batch_max_records,
                    batch_linger: self.batch_linger,
                    retention: self.retention,
                    conflict: self.conflict,
                    retry: self.retry,
                    drain_timeout: self.drain_timeout,
                    purge_interval: self.purge_interval,
                    purge_batch: self.purge_batch,
                },
                store: Arc::new(self.store),
                dead_letters,
                handler,
                meter,
            }),
        })
    }
}

/// An idempotent consumer, ready to [`run`](Runtime::run).
pub struct Runtime<S, H> {
    client: ClientConfig,
    shared: Arc<Shared<S, H>>,
}

impl<S, H> fmt::Debug for Runtime<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("group", &self.shared.config.group)
            .field("topics", &self.shared.config.topics)
            .finish_non_exhaustive()
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
            batch_linger: Duration::from_millis(50),
            retention: DEFAULT_RETENTION,
            conflict: ConflictPolicy::default(),
            retry: RetryPolicy::default(),
            drain_timeout: Duration::from_secs(30),
            purge_interval: Duration::from_secs(60),
            purge_batch: 1_000,
            dead_letter_topic: DeadLetterTopic::default(),
        }
    }
}

struct Worker {
    partition: PartitionId,
    abort: AbortHandle,
}

struct PendingRevoke {
    waiting_for: Vec<PartitionId>,
    ack: std::sync::mpsc::Sender<()>,
    deadline: Instant,
}

impl<S: Store, H: Handler<S::Tx>> Runtime<S, H> {
    /// Live counters of this runtime.
    pub fn stats(&self) -> Arc<Stats> {
        self.shared.meter.stats().clone()
    }

    /// The store this runtime commits into.
    pub fn store(&self) -> &S {
        &self.shared.store
    }

    /// Consumes until `shutdown` completes or a record stops the runtime, then drains in-flight
    /// work, commits it and leaves the group.
    ///
    /// Returns the error that stopped it (a fatal handler error, a `Stop` policy, a store or
    /// Kafka failure); records from the stopping one on are not committed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let shared = self.shared;
        let config = &shared.config;
        metrics::describe();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let ctx = ConsumerCtx::new(
            shared.store.clone(),
            config.group.clone(),
            events_tx,
            config.drain_timeout,
            shared.meter.clone(),
        );
        let consumer: BaseConsumer<ConsumerCtx<S>> = self
            .client
            .create_with_context(ctx)
            .map_err(|e| Error::kafka("creating the consumer", e))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|e| Error::kafka("subscribing", e))?;
        let consumer = Arc::new(consumer);
        ConsumerCtx::attach(&consumer);
        let poller = PollThread::spawn(consumer.clone());
        tracing::info!(group = %config.group, topics = ?config.topics, "consumer started");

        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        let mut workers: HashMap<tokio::task::Id, Worker> = HashMap::new();
        let mut revokes: Vec<PendingRevoke> = Vec::new();
        let mut purge = tokio::time::interval_at(
            Instant::now() + config.purge_interval,
            config.purge_interval,
        );
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);

        let outcome: Result<()> = loop {
            let next_deadline = revokes.iter().map(|r| r.deadline).min();
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                Some(event) = events.recv() => match event {
                    Event::Assigned { partition, epoch, position, records } => {
                        let meter = PartitionMeter::new(&shared.meter, &partition, config.conflict);
                        let task = PartitionTask {
                            meter,
                            shared: shared.clone(),
                            consumer: consumer.clone(),
                            partition: partition.clone(),
                            epoch,
                            position,
                            tally: Default::default(),
                            letters: Vec::new(),
                            attempts: Default::default(),
                            careful: false,
                            unguarded_failure: None,
                            batch_now: 0,
                        };
                        let abort = tasks.spawn(task.run(records));
                        workers.insert(abort.id(), Worker { partition, abort });
                    }
                    Event::Revoked { partitions, ack } => {
                        let waiting_for: Vec<PartitionId> = partitions
                            .into_iter()
                            .filter(|p| workers.values().any(|w| &w.partition == p))
                            .collect();
                        if waiting_for.is_empty() {
                            let _ = ack.send(());
                        } else {
                            revokes.push(PendingRevoke {
                                waiting_for,
                                ack,
                                deadline: Instant::now() + config.drain_timeout,
                            });
                        }
                    }
                    Event::Failed(e) => break Err(e),
                },
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let (id, result) = match done {
                        Ok((id, result)) => (id, result),
                        // An aborted task was abandoned on purpose; a panic is a failure.
                        Err(e) if e.is_cancelled() => (e.id(), Ok(())),
                        Err(e) => (e.id(), Err(Error::Task(format!("partition task panicked: {e}")))),
                    };
                    let Some(worker) = workers.remove(&id) else { continue };
                    settle_revokes(&mut revokes, &worker.partition);
                    match result {
                        Ok(()) => {}
                        Err(e) if e.is_fenced() => {
                            tracing::warn!(topic = %worker.partition.topic, partition = worker.partition.partition, error = %e, "partition fenced; dropped locally");
                        }
                        Err(e) => break Err(e),
                    }
                }
                _ = purge.tick() => {
                    purge_expired(&*shared.store, config.purge_batch, &shared.meter).await;
                }
                () = sleep_until_opt(next_deadline) => {
                    let now = Instant::now();
                    for revoke in revokes.iter().filter(|r| r.deadline <= now) {
                        for w in workers.values().filter(|w| revoke.waiting_for.contains(&w.partition)) {
                            tracing::warn!(topic = %w.partition.topic, partition = w.partition.partition, "drain timed out; abandoning uncommitted work");
                            w.abort.abort();
                        }
                    }
                    // The aborted tasks settle the revocations when they are joined.
                    for revoke in &mut revokes {
                        if revoke.deadline <= now {
                            revoke.deadline = now + Duration::from_secs(3600);
                        }
                    }
                }
            }
        };

        // Drain: close every feed, let the tasks commit what they hold, then leave. Without a
        // control loop nobody answers rebalance events any more: closing the receiver makes the
        // poll thread release partitions at once instead of waiting for an answer.
        drop(events);
        consumer.context().close_all();
        let drained = tokio::time::timeout(config.drain_timeout, async {
            let mut first_error = None;
            while let Some(done) = tasks.join_next().await {
                if let Ok(Err(e)) = done
                    && !e.is_fenced()
                {
                    first_error.get_or_insert(e);
                }
            }
            first_error
        })
        .await;
        let drain_error = match drained {
            Ok(error) => error,
            Err(_) => {
                tracing::warn!("shutdown drain timed out; abandoning uncommitted work");
                tasks.shutdown().await;
                None
            }
        };
        for revoke in revokes {
            let _ = revoke.ack.send(());
        }
        drop(consumer);
        poller.stop().await;
        tracing::info!(stats = ?shared.meter.stats().snapshot(), "consumer stopped");
        match (outcome, drain_error) {
            (Err(e), _) | (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => Ok(()),
        }
    }
}

fn settle_revokes(revokes: &mut Vec<PendingRevoke>, partition: &PartitionId) {
    revokes.retain_mut(|r| {
        r.waiting_for.retain(|p| p != partition);
        if r.waiting_for.is_empty() {
            let _ = r.ack.send(());
            false
        } else {
            true
        }
    });
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Purges expired entries in bounded rounds (a few rounds per tick at most), then refreshes the
/// store-entries gauge.
async fn purge_expired<S: Store>(store: &S, batch: usize, meter: &GroupMeter) {
    purge_rounds(store, batch, meter).await;
    match store.entry_count().await {
        Ok(n) => meter.store_entries(n),
        Err(e) => tracing::warn!(error = %e, "counting store entries failed"),
    }
}

async fn purge_rounds<S: Store>(store: &S, batch: usize, meter: &GroupMeter) {
    for _ in 0..10 {
        match store.purge_expired(partition::now_ms(), batch).await {
            Ok(n) => {
                meter.purged(n as u64);
                if n < batch {
                    break;
                }
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "purging expired entries failed");
                break;
            }
        }
    }
}
