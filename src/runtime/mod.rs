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
//! Files: `builder.rs` (the builder and the configuration it validates), `rebalance.rs` (poll
//! thread, assignment, revocation), `health.rs` (Kafka errors that end the run), `feed.rs` (a partition's records from its own queue),
//! `partition.rs` (one partition's batch loop) with `partition/decide.rs` (what becomes of one
//! record), `commit.rs` (the whole commit protocol: deferred writes, dead letters, the atomic
//! fenced store write, then Kafka's offset), `stale.rs` (whether this store holds an assigned
//! partition's latest state), `start.rs` (where a partition without a stored position starts).

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

use crate::dead_letter::DeadLetterProducer;
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::metrics::{self, GroupMeter, Stats};
use crate::store::{PartitionId, Store};

mod builder;
mod commit;
mod feed;
mod health;
mod partition;
mod progress;
mod rebalance;
#[cfg(feature = "outbox")]
mod relay;
#[cfg(feature = "resolve")]
mod resolver;
mod stale;
mod start;

use builder::Config;
pub use builder::{ConflictPolicy, DEFAULT_RETENTION, RuntimeBuilder};
use partition::PartitionTask;
pub use progress::{PartitionProgress, Progress};
use rebalance::{ConsumerCtx, Event, PollThread};
pub use stale::StalePartitionPolicy;
pub use start::StartPosition;

pub(crate) struct Shared<S, H> {
    pub(crate) config: Config,
    pub(crate) store: Arc<S>,
    pub(crate) dead_letters: Option<DeadLetterProducer>,
    pub(crate) handler: H,
    /// The runtime's counters and recorder handles.
    pub(crate) meter: GroupMeter,
    /// The metadata of every Kafka commit, naming the store (for a store with an id).
    pub(crate) kafka_mark: Option<String>,
    /// What is assigned and how far it is committed ([`Progress`]).
    pub(crate) progress: Arc<progress::ProgressState>,
}

/// An idempotent consumer, ready to [`run`](Runtime::run).
pub struct Runtime<S, H> {
    client: ClientConfig,
    shared: Arc<Shared<S, H>>,
    #[cfg(feature = "outbox")]
    relay: Option<relay::Prepared>,
}

impl<S, H> fmt::Debug for Runtime<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("group", &self.shared.config.group)
            .field("topics", &self.shared.config.topics)
            .finish_non_exhaustive()
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

    /// The counters of its outbox relay, when it runs one ([`RuntimeBuilder::relay`]).
    #[cfg(feature = "outbox")]
    pub fn relay_stats(&self) -> Option<Arc<crate::outbox::RelayStats>> {
        self.relay.as_ref().map(|r| r.stats.clone())
    }

    /// Where the runtime has got once it runs: per assigned partition its position, the log's
    /// watermarks and the lag, and [`Progress::caught_up`].
    pub fn progress(&self) -> Progress {
        Progress::new(self.shared.progress.clone())
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
        #[cfg(feature = "outbox")]
        let relay = self.relay.map(relay::Prepared::spawn);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let ctx = ConsumerCtx::new(
            shared.store.clone(),
            config,
            events_tx,
            shared.meter.clone(),
            shared.progress.clone(),
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
        shared.progress.attach(progress::reader(&self.client));
        let health = health::Health::new(config.topics.clone(), config.kafka_unavailable);
        let poller = PollThread::spawn(consumer.clone(), health);
        let kafka = Arc::new(commit::KafkaCommitter::spawn(
            &consumer,
            shared.kafka_mark.clone(),
            shared.meter.clone(),
        )?);
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

        // Declared last, dropped first: a run whose future is dropped (a crash, a cancelled
        // task) ends its progress before the consumer's close revokes what it holds.
        let _progress_ends = progress::EndOnDrop(shared.progress.clone());
        let outcome: Result<()> = loop {
            let next_deadline = revokes.iter().map(|r| r.deadline).min();
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                Some(event) = events.recv() => match event {
                    Event::Assigned { partition, epoch, position, records } => {
                        let task = PartitionTask::new(
                            shared.clone(),
                            kafka.clone(),
                            partition.clone(),
                            epoch,
                            position,
                        );
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
                    kafka.forget(&worker.partition);
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
                    purge_expired(&*shared.store, config, &shared.meter).await;
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

        shared.progress.end();
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
        kafka.stop().await;
        drop(consumer);
        poller.stop().await;
        #[cfg(feature = "outbox")]
        if let Some(relay) = relay
            && let Err(e) = relay.stop().await
        {
            tracing::error!(error = %e, "the outbox relay failed");
        }
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

/// Purges expired entries and, with a dead-letter retention, old dead letters, in bounded
/// rounds, then refreshes the store-entries gauge.
async fn purge_expired<S: Store>(store: &S, config: &Config, meter: &GroupMeter) {
    let (group, batch) = (&config.group, config.purge_batch);
    rounds(
        "expired entries",
        batch,
        || store.purge_expired(group, partition::now_ms(), batch),
        |n| meter.purged(n),
    )
    .await;
    #[cfg(feature = "resolve")]
    rounds(
        "expired resolution records",
        batch,
        || store.purge_resolutions(group, partition::now_ms(), batch),
        |n| meter.resolutions_purged(n),
    )
    .await;
    if let Some(retention) = config.dead_letter_retention {
        rounds(
            "old dead letters",
            batch,
            || store.purge_dead_letters(group, partition::now_ms(), retention, batch),
            |n| meter.dead_letters_purged(n),
        )
        .await;
    }
    match store.entry_count().await {
        Ok(n) => meter.store_entries(n),
        Err(e) => tracing::warn!(error = %e, "counting store entries failed"),
    }
}

/// Runs `round` until it purges fewer than `batch` (ten rounds a tick at most), counting what
/// each round purged; a failure is logged and ends the tick.
async fn rounds<Fut: Future<Output = Result<usize>>>(
    what: &str,
    batch: usize,
    mut round: impl FnMut() -> Fut,
    count: impl Fn(u64),
) {
    for _ in 0..10 {
        match round().await {
            Ok(n) => {
                count(n as u64);
                if n < batch {
                    break;
                }
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "purging {what} failed");
                break;
            }
        }
    }
}
