//! One partition's records, read by its task straight from librdkafka's queue for that
//! partition.
//!
//! Each assigned partition's fetch queue is split off the consumer's main queue (before the
//! partition is assigned, so no record of it can reach the main queue). librdkafka keeps
//! prefetching into that queue up to `queued.max.messages.kbytes` and then stops fetching the
//! partition by itself: a partition whose handler is slow holds back only its own fetching, and
//! nothing is paused, purged and fetched again. The task takes records as it goes; it waits on
//! the queue's non-empty callback when the queue is empty.
//!
//! Closing a feed (revocation, shutdown) makes it yield nothing more: the task settles the
//! records it holds, commits and ends. Records left in the queue were never taken; the
//! partition's next owner reads them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::Counter;
use rdkafka::Message;
use rdkafka::consumer::ConsumerContext;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::Error;
use crate::metrics::Stats;
use crate::record::Record;

/// A wait re-checks the queue at least this often, whatever the callback does.
const RECHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Signal {
    ready: Notify,
    closed: AtomicBool,
}

/// Closes a [`Feed`] from the poll thread.
pub(crate) struct FeedCloser(Arc<Signal>);

impl FeedCloser {
    /// The feed yields nothing more; a task waiting on it wakes up.
    pub(crate) fn close(&self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.ready.notify_one();
    }
}

impl Drop for FeedCloser {
    fn drop(&mut self) {
        self.close();
    }
}

/// One partition's records, in offset order.
pub(crate) struct Feed<C: ConsumerContext + 'static> {
    queue: PartitionQueue<C>,
    signal: Arc<Signal>,
    /// Records read from the partition (the recorder's counter).
    read: Counter,
    stats: Arc<Stats>,
    /// `topic/partition`, for errors.
    name: String,
    /// The topic's name, shared by the partition's records.
    topic: Arc<str>,
    /// Records read and not yet added to the counters (which are shared by the partitions:
    /// counted a batch at a time, not a record at a time).
    uncounted: u64,
    /// The offset of the last record read.
    last: Option<i64>,
    /// Records the client cannot read (a batch that failed its CRC, or one it cannot
    /// decompress): the feed ends here instead of going on past them.
    failure: Option<Error>,
}

impl<C: ConsumerContext + 'static> Feed<C> {
    pub(crate) fn new(
        mut queue: PartitionQueue<C>,
        (topic, partition): (&str, i32),
        read: Counter,
        stats: Arc<Stats>,
    ) -> (Self, FeedCloser) {
        let signal = Arc::new(Signal::default());
        let ready = signal.clone();
        // Called by librdkafka when the queue goes from empty to non-empty.
        queue.set_nonempty_callback(move || ready.ready.notify_one());
        let closer = FeedCloser(signal.clone());
        (
            Feed {
                queue,
                signal,
                read,
                stats,
                name: format!("{topic}/{partition}"),
                topic: Arc::from(topic),
                uncounted: 0,
                last: None,
                failure: None,
            },
            closer,
        )
    }

    fn closed(&self) -> bool {
        self.signal.closed.load(Ordering::Acquire)
    }

    /// The next record that is there now, if any (never once closed or failed).
    pub(crate) fn try_recv(&mut self) -> Option<Record> {
        loop {
            if self.closed() || self.failure.is_some() {
                return None;
            }
            match self.queue.poll(Duration::ZERO)? {
                Ok(message) => {
                    self.uncounted += 1;
                    self.last = Some(message.offset());
                    return Some(Record::from_message(&message, &self.topic));
                }
                // librdkafka skips records it cannot read and goes on with the next batch:
                // going on would move the position past records never handled.
                Err(e) if unreadable(&e) => {
                    tracing::error!(partition = %self.name, after = ?self.last, error = %e, "records the client cannot read; the partition stops here");
                    self.failure = Some(Error::kafka(
                        format!(
                            "reading {} after offset {}: a record batch failed its CRC or cannot \
                             be decompressed, and the client would skip it; nothing after the \
                             last good record is handled",
                            self.name,
                            self.last
                                .map_or_else(|| "none".to_owned(), |o| o.to_string()),
                        ),
                        e,
                    ));
                    return None;
                }
                // Other fetch errors are reported here; librdkafka goes on fetching.
                Err(e) => tracing::warn!(error = %e, "partition fetch error"),
            }
        }
    }

    /// Adds the records read since the last call to the counters.
    pub(crate) fn count_read(&mut self) {
        let n = std::mem::take(&mut self.uncounted);
        if n > 0 {
            Stats::add(&self.stats.records_read, n);
            self.read.increment(n);
        }
    }

    /// Why the feed ended, when it was not closed: records the client cannot read.
    pub(crate) fn take_failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// Waits for the next record; `None` once the feed is closed.
    pub(crate) async fn recv(&mut self) -> Option<Record> {
        loop {
            if let Some(record) = self.try_recv() {
                return Some(record);
            }
            if self.closed() || self.failure.is_some() {
                return None;
            }
            let _ = tokio::time::timeout(RECHECK, self.signal.ready.notified()).await;
        }
    }

    /// Waits until a record may be there or `deadline` passes; false once the deadline passed
    /// or the feed is closed.
    pub(crate) async fn wait_until(&self, deadline: Instant) -> bool {
        if self.closed() || self.failure.is_some() {
            return false;
        }
        let until = deadline.min(Instant::now() + RECHECK);
        let _ = tokio::time::timeout_at(until, self.signal.ready.notified()).await;
        !self.closed() && Instant::now() < deadline
    }
}

impl<C: ConsumerContext + 'static> Drop for Feed<C> {
    fn drop(&mut self) {
        self.count_read();
    }
}

/// A consumption error for records the client cannot read: a batch that failed its CRC
/// (`check.crcs`, on by default in this crate), a corrupt batch, or a compression codec it
/// was built without or cannot decode.
fn unreadable(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::MessageConsumption(
            RDKafkaErrorCode::BadMessage
                | RDKafkaErrorCode::BadCompression
                | RDKafkaErrorCode::NotImplemented
        )
    )
}
