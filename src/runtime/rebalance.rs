//! The Kafka side of the runtime: the consumer's context, its poll thread, and rebalances.
//!
//! One OS thread polls the consumer, which serves librdkafka's events (rebalances, commit results)
//! and hands each record to its partition task through a bounded channel. When a partition's
//! channel is full the partition is paused and its records wait here until there is room, so a
//! slow partition does not stall the others.
//!
//! Rebalance callbacks run on that thread, where blocking is harmless:
//! - on assignment, each partition is acquired in the store (its epoch bumped, fencing the
//!   previous owner) and assigned at the position stored there, not Kafka's committed offset;
//! - on revocation, the partitions' channels are closed and the thread waits (bounded by the
//!   drain timeout) until their tasks have drained and committed, or were abandoned, before the
//!   partitions are released.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset};
use tokio::sync::mpsc;

use crate::error::Error;
use metrics::Counter;

use crate::metrics::{GroupMeter, Stats};
use crate::record::Record;
use crate::store::{PartitionId, Store};

/// What the poll thread tells the runtime's control loop.
pub(crate) enum Event {
    /// A partition was acquired and assigned; its records arrive on `records`.
    Assigned {
        partition: PartitionId,
        epoch: u64,
        position: Option<i64>,
        records: mpsc::Receiver<Record>,
    },
    /// These partitions are being revoked: their channels are closed. Send on `ack` once their
    /// tasks are gone.
    Revoked {
        partitions: Vec<PartitionId>,
        ack: std::sync::mpsc::Sender<()>,
    },
    /// The consumer cannot go on.
    Failed(Error),
}

struct Route {
    records: mpsc::Sender<Record>,
    /// Records read from the partition (the recorder's counter).
    read: Counter,
    /// Records that did not fit in the channel; the partition is paused while this is non-empty.
    waiting: VecDeque<Record>,
}

/// The consumer context: store access for assignments, routes to partition tasks.
pub(crate) struct ConsumerCtx<S> {
    store: Arc<S>,
    group: String,
    handle: tokio::runtime::Handle,
    events: mpsc::UnboundedSender<Event>,
    routes: Mutex<HashMap<(String, i32), Route>>,
    channel_capacity: usize,
    drain_timeout: Duration,
    meter: GroupMeter,
}

impl<S> ConsumerCtx<S> {
    pub(crate) fn new(
        store: Arc<S>,
        group: String,
        events: mpsc::UnboundedSender<Event>,
        channel_capacity: usize,
        drain_timeout: Duration,
        meter: GroupMeter,
    ) -> Self {
        ConsumerCtx {
            store,
            group,
            handle: tokio::runtime::Handle::current(),
            events,
            routes: Mutex::new(HashMap::new()),
            channel_capacity,
            drain_timeout,
            meter,
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Route>> {
        self.routes.lock().expect("routes poisoned")
    }

    /// Closes every partition channel: the tasks drain what they hold, commit and end.
    pub(crate) fn close_all(&self) {
        self.routes().clear();
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

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            self.meter.kafka_commit_failed();
            tracing::debug!(error = %e, "kafka offset commit failed; the store's position stays authoritative");
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
        let mut assigned = TopicPartitionList::new();
        for (topic, partition) in partitions_of(tpl) {
            let id = PartitionId::new(self.group.clone(), topic.clone(), partition);
            let acquired = self.handle.block_on(self.store.acquire(&id));
            let assignment = match acquired {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!(%topic, partition, error = %e, "cannot acquire partition in the store");
                    let _ = self.events.send(Event::Failed(e));
                    continue;
                }
            };
            // Seek to the store's position; without one, Kafka's committed offset (then
            // auto.offset.reset) decides.
            let offset = assignment.position.map_or(Offset::Stored, Offset::Offset);
            if let Err(e) = assigned.add_partition_offset(&topic, partition, offset) {
                let _ = self
                    .events
                    .send(Event::Failed(Error::kafka("building the assignment", e)));
                continue;
            }
            let (tx, rx) = mpsc::channel(self.channel_capacity);
            self.routes().insert(
                (topic.clone(), partition),
                Route {
                    records: tx,
                    read: self.meter.records_read(&topic, partition),
                    waiting: VecDeque::new(),
                },
            );
            tracing::info!(%topic, partition, epoch = assignment.epoch, position = ?assignment.position, "partition assigned");
            let _ = self.events.send(Event::Assigned {
                partition: id,
                epoch: assignment.epoch,
                position: assignment.position,
                records: rx,
            });
        }
        let result = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(&assigned),
            _ => consumer.assign(&assigned),
        };
        // librdkafka keeps an application pause across unassign and assign: a partition paused
        // (its queue was full) when it was revoked would otherwise never be fetched again.
        let result = result.and_then(|()| consumer.resume(&assigned));
        if let Err(e) = result {
            let _ = self
                .events
                .send(Event::Failed(Error::kafka("assigning partitions", e)));
        }
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let revoked = partitions_of(tpl);
        {
            let mut routes = self.routes();
            for tp in &revoked {
                // Dropping the sender closes the channel: the task drains it, commits and ends.
                // Records still waiting here were never handed over; the next owner reads them.
                routes.remove(tp);
            }
        }
        let partitions = revoked
            .iter()
            .map(|(t, p)| PartitionId::new(self.group.clone(), t.clone(), *p))
            .collect();
        let (ack, acked) = std::sync::mpsc::channel();
        if self.events.send(Event::Revoked { partitions, ack }).is_ok() {
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

    /// Hands a record to its partition task, or parks it and pauses the partition.
    fn dispatch(&self, consumer: &BaseConsumer<Self>, record: Record) {
        Stats::add(&self.meter.stats().records_read, 1);
        let mut routes = self.routes();
        let tp = (record.topic().to_owned(), record.partition());
        let Some(route) = routes.get_mut(&tp) else {
            // Not ours (any more): not committed, so the partition's owner reads it.
            return;
        };
        route.read.increment(1);
        if !route.waiting.is_empty() {
            route.waiting.push_back(record);
            return;
        }
        match route.records.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(record)) => {
                route.waiting.push_back(record);
                set_paused(consumer, &tp, true);
            }
            // The task ended; the runtime is stopping or the partition is being revoked.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Moves parked records into channels that have room again; resumes drained partitions.
    /// Returns whether records are still parked.
    fn flush_waiting(&self, consumer: &BaseConsumer<Self>) -> bool {
        let mut still_waiting = false;
        for (tp, route) in self.routes().iter_mut() {
            if route.waiting.is_empty() {
                continue;
            }
            while let Some(record) = route.waiting.pop_front() {
                match route.records.try_send(record) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(record)) => {
                        route.waiting.push_front(record);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => route.waiting.clear(),
                }
            }
            if route.waiting.is_empty() {
                set_paused(consumer, tp, false);
            } else {
                still_waiting = true;
            }
        }
        still_waiting
    }
}

fn set_paused<C: ConsumerContext>(consumer: &BaseConsumer<C>, tp: &(String, i32), pause: bool) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    let result = if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = result {
        tracing::warn!(topic = %tp.0, partition = tp.1, pause, error = %e, "pause/resume failed");
    }
}

/// The thread polling the consumer. Dropping it stops the thread and waits for it.
pub(crate) struct PollThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PollThread {
    pub(crate) fn spawn<S: Store>(consumer: Arc<BaseConsumer<ConsumerCtx<S>>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("idempotent-consumer-poll".into())
            .spawn(move || {
                let mut waiting = false;
                while !stopping.load(Ordering::Acquire) {
                    let timeout = Duration::from_millis(if waiting { 5 } else { 100 });
                    match consumer.poll(timeout) {
                        None => {}
                        Some(Ok(message)) => consumer
                            .context()
                            .dispatch(&consumer, Record::from_message(&message)),
                        Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                    }
                    waiting = consumer.context().flush_waiting(&consumer);
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
