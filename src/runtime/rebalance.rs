//! The Kafka side of the runtime: the consumer's context, its poll thread, and rebalances.
//!
//! One OS thread polls the consumer's main queue, which serves librdkafka's events (rebalances,
//! commit results). Records never come through it: each partition's queue is split off before
//! the partition is assigned, and its task reads it directly (`feed.rs`), so a slow partition
//! holds back only its own fetching.
//!
//! Rebalance callbacks run on that thread, where blocking is harmless:
//! - on assignment, each partition is acquired in the store (its epoch bumped, fencing the
//!   previous owner) and assigned at the position stored there, not Kafka's committed offset;
//!   a store of this instance's own is first checked to hold the partition's latest state
//!   (`stale.rs`), and a partition it does not is refused: left unassigned, and under
//!   [`StalePartitionPolicy::Stop`] the runtime stops;
//! - on revocation, the partitions' feeds are closed and the thread waits (bounded by the
//!   drain timeout) until their tasks have drained and committed, or were abandoned, before the
//!   partitions are released.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset};
use tokio::sync::mpsc;

use super::builder::Config;
use super::feed::{Feed, FeedCloser};
use super::health::Health;
use super::progress::ProgressState;
use super::stale::{self, StalePartitionPolicy};
use super::start::{self, StartPosition};
use crate::error::{Error, Result};
use crate::metrics::GroupMeter;
use crate::store::{Assignment, PartitionId, Store};

/// What the poll thread tells the runtime's control loop.
pub(crate) enum Event<S: Store> {
    /// A partition was acquired and assigned; its records arrive on `records`.
    Assigned {
        partition: PartitionId,
        epoch: u64,
        position: Option<i64>,
        records: Feed<ConsumerCtx<S>>,
    },
    /// These partitions are being revoked: their feeds are closed. Send on `ack` once their
    /// tasks are gone.
    Revoked {
        partitions: Vec<PartitionId>,
        ack: std::sync::mpsc::Sender<()>,
    },
    /// The consumer cannot go on.
    Failed(Error),
}

/// The consumer context: store access for assignments, the open feeds of partition tasks.
pub(crate) struct ConsumerCtx<S: Store> {
    store: Arc<S>,
    group: String,
    handle: tokio::runtime::Handle,
    events: mpsc::UnboundedSender<Event<S>>,
    /// The consumer itself, to split partition queues off it (set once it is in its `Arc`).
    consumer: OnceLock<Weak<BaseConsumer<ConsumerCtx<S>>>>,
    feeds: Mutex<HashMap<(String, i32), FeedCloser>>,
    drain_timeout: Duration,
    stale: StalePartitionPolicy,
    /// Where a partition without a stored position starts.
    start: StartPosition,
    /// Partitions given to this instance but refused as stale (under `Pause`): not assigned to
    /// the consumer, so not handed back to it at revocation either.
    refused: Mutex<HashSet<(String, i32)>>,
    meter: GroupMeter,
    progress: Arc<ProgressState>,
    /// Transient acquire failures are tried again with this backoff, for at most the budget.
    retry: crate::retry::RetryPolicy,
    acquire_budget: Duration,
}

impl<S: Store> ConsumerCtx<S> {
    pub(crate) fn new(
        store: Arc<S>,
        config: &Config,
        events: mpsc::UnboundedSender<Event<S>>,
        meter: GroupMeter,
        progress: Arc<ProgressState>,
    ) -> Self {
        ConsumerCtx {
            store,
            group: config.group.clone(),
            handle: tokio::runtime::Handle::current(),
            events,
            consumer: OnceLock::new(),
            feeds: Mutex::new(HashMap::new()),
            drain_timeout: config.drain_timeout,
            stale: config.stale,
            start: config.start,
            refused: Mutex::new(HashSet::new()),
            meter,
            progress,
            retry: config.retry.clone(),
            acquire_budget: config.acquire_budget,
        }
    }

    /// Gives the context its consumer; before the consumer is first polled.
    pub(crate) fn attach(consumer: &Arc<BaseConsumer<Self>>) {
        let _ = consumer.context().consumer.set(Arc::downgrade(consumer));
    }

    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), FeedCloser>> {
        self.feeds.lock().expect("feeds poisoned")
    }

    /// Ends the run with `error` (the control loop stops on it).
    fn fail(&self, error: Error) {
        tracing::error!(error = %error, "the consumer cannot go on");
        let _ = self.events.send(Event::Failed(error));
    }

    /// Closes every feed: the tasks settle what they hold, commit and end.
    pub(crate) fn close_all(&self) {
        self.feeds().clear();
    }
}

impl<S: Store> ClientContext for ConsumerCtx<S> {}

impl<S: Store> ConsumerContext for ConsumerCtx<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => {
                tracing::error!(error = ?other, "rebalance failed; releasing the assignment");
                if let Ok(current) = consumer.assignment() {
                    self.revoke(consumer, &current);
                }
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassign after a failed rebalance failed");
                }
            }
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl<S: Store> ConsumerCtx<S> {
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let Some(this) = self.consumer.get().and_then(Weak::upgrade) else {
            let _ = self.events.send(Event::Failed(Error::Task(
                "assignment before the consumer was attached to its context".into(),
            )));
            return;
        };
        // What Kafka committed: to tell whether this store's copies are current, and to warn
        // when a store without a position meets a group that has committed offsets. Read once,
        // when the first partition needs it.
        let mut committed: Option<HashMap<(String, i32), stale::Committed>> = None;
        let mut ends: Option<HashMap<(String, i32), i64>> = None;
        let mut assigned = TopicPartitionList::new();
        let acquire_until = Instant::now() + self.acquire_budget;
        for (topic, partition) in partitions_of(tpl) {
            let id = PartitionId::new(self.group.clone(), topic.clone(), partition);
            let acquired = self.acquire(&id, acquire_until);
            let assignment = match acquired {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(%topic, partition, error = %e, "cannot acquire partition in the store");
                    let _ = self.events.send(Event::Failed(e));
                    continue;
                }
            };
            if committed.is_none()
                && (self.store.store_id().is_some() || assignment.position.is_none())
            {
                match stale::committed(consumer, tpl) {
                    Ok(read) => committed = Some(read),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the group's committed offsets of the assigned partitions");
                        let _ = self.events.send(Event::Failed(e));
                        return;
                    }
                }
            }
            let kafka = committed
                .as_ref()
                .and_then(|c| c.get(&(topic.clone(), partition)));
            if let Some(store_id) = self.store.store_id() {
                match stale::check(&id, store_id, assignment.position, kafka) {
                    Ok(None) => {}
                    // Without a position the start below is logged instead.
                    Ok(Some(_)) if assignment.position.is_none() => {}
                    Ok(Some(kafka_offset)) => tracing::warn!(
                        %topic, partition, store_position = ?assignment.position, kafka_offset,
                        "Kafka's offset, committed after this store's own commits, is ahead of \
                         the store (unsynced commits lost, or a restored backup): the records \
                         from the store's position are handled again"
                    ),
                    Err(e) => {
                        self.refuse(&topic, partition, e);
                        continue;
                    }
                }
            }
            // The store's position; without one, where the start policy says (`start.rs`).
            let offset = match assignment.position {
                Some(position) => {
                    // The ends of the assigned partitions, read once, when the first needs them.
                    if ends.is_none() {
                        match start::ends(consumer, &partitions_of(tpl)) {
                            Ok(read) => ends = Some(read),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot read the ends of the assigned partitions");
                                let _ = self.events.send(Event::Failed(e));
                                return;
                            }
                        }
                    }
                    let high = ends
                        .as_ref()
                        .and_then(|h| h.get(&(topic.clone(), partition)).copied());
                    if let Err(e) = start::check_within_log(&topic, partition, position, high) {
                        tracing::error!(%topic, partition, position, high_watermark = ?high, "the store's position is beyond the end of the log; the partition is not handled");
                        let _ = self.events.send(Event::Failed(e));
                        continue;
                    }
                    Offset::Offset(position)
                }
                None => {
                    let kafka_offset = kafka.map(|c| c.offset);
                    match start::resolve(consumer, &topic, partition, self.start, kafka_offset) {
                        Ok(offset) => {
                            if let Some(kafka_offset) = kafka_offset {
                                tracing::warn!(
                                    %topic, partition, kafka_offset, start = ?self.start,
                                    starts_at = %start::describe(offset),
                                    "the store has no position for this partition but the group \
                                     has a committed offset: it starts where \
                                     start_without_position says"
                                );
                            }
                            offset
                        }
                        Err(e) => {
                            tracing::error!(%topic, partition, error = %e, "cannot resolve where the partition starts");
                            let _ = self.events.send(Event::Failed(e));
                            continue;
                        }
                    }
                }
            };
            if let Err(e) = assigned.add_partition_offset(&topic, partition, offset) {
                let _ = self
                    .events
                    .send(Event::Failed(Error::kafka("building the assignment", e)));
                continue;
            }
            // Split before assigning: no record of the partition may reach the main queue.
            let Some(queue) = this.split_partition_queue(&topic, partition) else {
                let _ = self.events.send(Event::Failed(Error::Task(format!(
                    "cannot split the queue of {topic}/{partition} off the consumer"
                ))));
                continue;
            };
            let (feed, closer) = Feed::new(
                queue,
                (&topic, partition),
                self.meter.records_read(&topic, partition),
                self.meter.stats().clone(),
            );
            self.feeds().insert((topic.clone(), partition), closer);
            self.progress.assign(
                &topic,
                partition,
                match offset {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            );
            tracing::info!(%topic, partition, epoch = assignment.epoch, position = ?assignment.position, starts_at = %start::describe(offset), "partition assigned");
            let _ = self.events.send(Event::Assigned {
                partition: id,
                epoch: assignment.epoch,
                position: assignment.position,
                records: feed,
            });
        }
        self.progress.joined();
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(&assigned),
            _ => consumer.assign(&assigned),
        };
        if let Err(e) = result {
            let _ = self
                .events
                .send(Event::Failed(Error::kafka("assigning partitions", e)));
        }
    }

    /// Acquires a partition in the store. A transient failure (a database failing over during
    /// the rebalance) is tried again with backoff until `until`: the poll thread waits
    /// meanwhile, so the budget is bounded by `max.poll.interval.ms` (see `acquire_budget`).
    fn acquire(&self, id: &PartitionId, until: Instant) -> Result<Assignment> {
        let started = Instant::now();
        let mut failures = 0u32;
        loop {
            let error = match self.handle.block_on(self.store.acquire(id)) {
                Ok(assignment) => return Ok(assignment),
                Err(e) if e.is_transient() => e,
                Err(e) => return Err(e),
            };
            failures = failures.saturating_add(1);
            let now = Instant::now();
            if now >= until {
                return Err(Error::store(
                    format!(
                        "{}/{}: acquiring the partition failed {failures} times over {:?}, the \
                         budget of one assignment (store_retry_timeout, at most half of \
                         max.poll.interval.ms); the last failure",
                        id.topic,
                        id.partition,
                        started.elapsed(),
                    ),
                    error,
                ));
            }
            self.meter.acquire_retried(&id.topic, id.partition);
            let delay = self.retry.backoff(failures.min(8), None).min(until - now);
            tracing::warn!(
                topic = %id.topic,
                partition = id.partition,
                error = %error,
                failures,
                ?delay,
                "transient store failure acquiring a partition; trying again"
            );
            std::thread::sleep(delay);
        }
    }

    /// Leaves a stale partition unassigned: logged and counted, and by the policy the runtime
    /// stops or goes on without it.
    fn refuse(&self, topic: &str, partition: i32, error: Error) {
        self.meter.stale_refused(topic, partition);
        if let Error::StalePartition {
            store_position,
            kafka_offset,
            store,
            committed_by,
            ..
        } = &error
        {
            tracing::error!(
                %topic, partition, ?store_position, kafka_offset, %store, %committed_by,
                policy = ?self.stale,
                "partition refused: another store holds its latest state"
            );
        }
        match self.stale {
            StalePartitionPolicy::Stop => {
                let _ = self.events.send(Event::Failed(error));
            }
            StalePartitionPolicy::Pause => {
                self.refused().insert((topic.to_owned(), partition));
            }
        }
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, HashSet<(String, i32)>> {
        self.refused.lock().expect("refused poisoned")
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut revoked = partitions_of(tpl);
        // Refused partitions were never assigned to the consumer: nothing to give back.
        {
            let mut refused = self.refused();
            revoked.retain(|tp| !refused.remove(tp));
        }
        let mut assigned = TopicPartitionList::new();
        for (topic, partition) in &revoked {
            assigned.add_partition(topic, *partition);
        }
        let tpl = &assigned;
        self.progress.revoke(&revoked);
        {
            let mut feeds = self.feeds();
            for tp in &revoked {
                // Dropping the closer closes the feed: the task settles what it holds, commits
                // and ends. Records left in the queue were never taken; the next owner reads
                // them.
                feeds.remove(tp);
            }
        }
        let partitions = revoked
            .iter()
            .map(|(t, p)| PartitionId::new(self.group.clone(), t.clone(), *p))
            .collect();
        let (ack, acked) = std::sync::mpsc::channel();
        // Once the run is over (its future dropped included) no control loop answers: release
        // at once rather than wait out the drain timeout.
        if !self.progress.ended() && self.events.send(Event::Revoked { partitions, ack }).is_ok() {
            // The control loop abandons tasks past the drain timeout; the margin covers that.
            if acked
                .recv_timeout(self.drain_timeout + Duration::from_secs(5))
                .is_err()
            {
                tracing::warn!("revoked partitions were not confirmed drained in time");
            }
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
            _ => consumer.unassign(),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "releasing revoked partitions failed");
        }
        tracing::info!(partitions = revoked.len(), "partitions revoked");
    }

    /// A record on the main queue. Partition queues are split off before assignment, so this
    /// is a record of a partition we do not own (any more), which its owner reads. If we do
    /// own it, its task would commit past it: the runtime stops rather than lose it.
    fn stray(&self, topic: &str, partition: i32, offset: i64) {
        if self.feeds().contains_key(&(topic.to_owned(), partition)) {
            let _ = self.events.send(Event::Failed(Error::Task(format!(
                "record {topic}/{partition}@{offset} arrived outside its partition's queue"
            ))));
        } else {
            tracing::debug!(%topic, partition, offset, "record of a partition not owned here");
        }
    }
}

/// The thread polling the consumer. Dropping it stops the thread and waits for it.
pub(crate) struct PollThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PollThread {
    /// Polls until stopped; `health` turns the consumer's errors into the end of the run when
    /// they mean it cannot work (`health.rs`).
    pub(crate) fn spawn<S: Store>(
        consumer: Arc<BaseConsumer<ConsumerCtx<S>>>,
        mut health: Health,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("idempotent-consumer-poll".into())
            .spawn(move || {
                let mut failed = false;
                while !stopping.load(Ordering::Acquire) {
                    let verdict = match consumer.poll(Duration::from_millis(100)) {
                        None => Ok(()),
                        Some(Ok(m)) => {
                            consumer
                                .context()
                                .stray(m.topic(), m.partition(), m.offset());
                            Ok(())
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "consumer error");
                            health.error(&e)
                        }
                    };
                    // Once failed, it only polls on (revocations while the runtime drains).
                    if !failed && let Err(e) = verdict.and_then(|()| health.check(&consumer)) {
                        failed = true;
                        consumer.context().fail(e);
                    }
                }
                // Dropping the consumer closes it: leaves the group (revoking what is left).
            })
            .expect("spawning the poll thread");
        PollThread {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread and waits until the consumer is closed.
    pub(crate) async fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for PollThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
