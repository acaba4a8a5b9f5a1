//! How far the runtime has got: per assigned partition, the next offset it will handle (the
//! store's position, or where the partition started), the log's watermarks and the lag; and a
//! future that resolves once the runtime has caught up with the log as it was at a moment.
//!
//! The rebalance callbacks record what is assigned and where it starts, each partition task
//! records its store commits, and revocations remove partitions. Watermarks are asked of the
//! broker (through the runtime's own consumer) when progress is read, so a lag is never older
//! than the call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};

/// How long one watermark request may take.
const WATERMARKS: Duration = Duration::from_secs(10);

/// Asks the broker for a partition's low and high watermarks.
type Watermarks = dyn Fn(&str, i32) -> Result<(i64, i64)> + Send + Sync;

/// One assigned partition's progress, as [`Progress::partitions`] reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PartitionProgress {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset the runtime handles: the store's position, or where the partition
    /// started when nothing is committed yet; `None` when it started at the beginning of the
    /// log and has committed nothing (it then starts at `low_watermark`).
    pub position: Option<i64>,
    /// The log's first offset.
    pub low_watermark: i64,
    /// The offset the next produced record gets.
    pub high_watermark: i64,
    /// Records in the log not yet committed by the runtime:
    /// `high_watermark - position` (or `- low_watermark`), never negative.
    pub lag: i64,
}

impl PartitionProgress {
    /// True when the runtime has committed everything up to the high watermark.
    pub fn caught_up(&self) -> bool {
        self.lag == 0
    }
}

/// What the runtime's callbacks and tasks record.
pub(crate) struct ProgressState {
    /// Assigned partitions and their next offset (`None`: from the log's start).
    assigned: Mutex<HashMap<(String, i32), Option<i64>>>,
    /// Bumped on every change; `joined` and `ended` are read with it.
    changes: watch::Sender<Phase>,
    watermarks: OnceLock<Arc<Watermarks>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No assignment received yet.
    Joining(u64),
    /// An assignment (possibly empty) was received.
    Running(u64),
    /// The runtime stopped.
    Ended,
}

impl ProgressState {
    pub(crate) fn new() -> Self {
        ProgressState {
            assigned: Mutex::new(HashMap::new()),
            changes: watch::Sender::new(Phase::Joining(0)),
            watermarks: OnceLock::new(),
        }
    }

    fn assigned(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Option<i64>>> {
        self.assigned.lock().expect("progress poisoned")
    }

    fn changed(&self) {
        self.changes.send_modify(|phase| {
            *phase = match *phase {
                Phase::Joining(n) | Phase::Running(n) => Phase::Running(n.wrapping_add(1)),
                Phase::Ended => Phase::Ended,
            }
        });
    }

    /// The runtime's consumer, to read watermarks with; once, when the runtime starts.
    pub(crate) fn attach(&self, watermarks: Arc<Watermarks>) {
        let _ = self.watermarks.set(watermarks);
    }

    /// An assignment arrived (possibly empty): the consumer has joined its group.
    pub(crate) fn joined(&self) {
        self.changed();
    }

    /// `partition` of `topic` is assigned and starts at `next` (`None`: the log's start).
    pub(crate) fn assign(&self, topic: &str, partition: i32, next: Option<i64>) {
        self.assigned().insert((topic.to_owned(), partition), next);
        self.changed();
    }

    /// The store committed the partition up to `next`.
    pub(crate) fn committed(&self, topic: &str, partition: i32, next: i64) {
        if let Some(slot) = self.assigned().get_mut(&(topic.to_owned(), partition)) {
            *slot = Some(next);
        }
        self.changed();
    }

    /// The partitions were revoked.
    pub(crate) fn revoke(&self, partitions: &[(String, i32)]) {
        {
            let mut assigned = self.assigned();
            for tp in partitions {
                assigned.remove(tp);
            }
        }
        self.changed();
    }

    /// The runtime stopped: nothing is assigned any more.
    pub(crate) fn end(&self) {
        self.assigned().clear();
        self.changes.send_replace(Phase::Ended);
    }
}

/// Where a running [`Runtime`](crate::Runtime) has got, from [`Runtime::progress`](crate::Runtime::progress).
/// Cheap to clone; usable from any task while the runtime runs.
#[derive(Clone)]
pub struct Progress {
    state: Arc<ProgressState>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("assigned", &*self.state.assigned())
            .finish_non_exhaustive()
    }
}

impl Progress {
    pub(crate) fn new(state: Arc<ProgressState>) -> Self {
        Progress { state }
    }

    async fn watermarks(&self, topic: String, partition: i32) -> Result<(i64, i64)> {
        let Some(read) = self.state.watermarks.get().cloned() else {
            return Err(Error::Task("the runtime has not started".into()));
        };
        tokio::task::spawn_blocking(move || read(&topic, partition))
            .await
            .map_err(|e| Error::Task(format!("reading watermarks: {e}")))?
    }

    /// Every partition assigned to this instance now, with the watermarks the broker reports
    /// now and the lag between them and the runtime's committed position. Sorted by topic and
    /// partition; empty before the first assignment and after the runtime stopped.
    pub async fn partitions(&self) -> Result<Vec<PartitionProgress>> {
        let mut assigned: Vec<_> = self
            .state
            .assigned()
            .iter()
            .map(|(tp, next)| (tp.clone(), *next))
            .collect();
        assigned.sort();
        let mut out = Vec::with_capacity(assigned.len());
        for ((topic, partition), _) in assigned {
            let (low, high) = self.watermarks(topic.clone(), partition).await?;
            // Read after the watermarks, so a commit in between only lowers the lag.
            let Some(position) = self
                .state
                .assigned()
                .get(&(topic.clone(), partition))
                .copied()
            else {
                continue; // revoked meanwhile
            };
            let lag = (high - position.unwrap_or(low).max(low)).max(0);
            out.push(PartitionProgress {
                topic,
                partition,
                position,
                low_watermark: low,
                high_watermark: high,
                lag,
            });
        }
        Ok(out)
    }

    /// Resolves once the consumer has joined its group and every partition assigned to it at
    /// that point has been committed up to the high watermark it had when this was called (or
    /// was revoked: its new owner goes on with it). Records produced after the call are not
    /// waited for. An error when the runtime stops first, or the watermarks cannot be read.
    ///
    /// A partition whose last records are transaction markers (a transactional producer's
    /// commit) has a high watermark past its last record: such a partition counts as caught
    /// up only once a later record has been handled.
    pub async fn caught_up(&self) -> Result<()> {
        let mut changes = self.state.changes.subscribe();
        // Joined first: before that, "every assigned partition" would be none.
        loop {
            match *changes.borrow_and_update() {
                Phase::Ended => return Err(stopped()),
                Phase::Running(_) => break,
                Phase::Joining(_) => {}
            }
            changes.changed().await.map_err(|_| stopped())?;
        }
        let mut targets = Vec::new();
        for progress in self.partitions().await? {
            targets.push((
                (progress.topic, progress.partition),
                progress.high_watermark,
            ));
        }
        loop {
            {
                let assigned = self.state.assigned();
                targets.retain(|(tp, high)| match assigned.get(tp) {
                    None => false, // revoked
                    Some(next) => next.is_none_or(|next| next < *high),
                });
            }
            // An empty partition has nothing to wait for: low == high.
            if !targets.is_empty() {
                let mut waiting = Vec::new();
                for (tp, high) in targets.drain(..) {
                    let (low, _) = self.watermarks(tp.0.clone(), tp.1).await?;
                    let next = self.state.assigned().get(&tp).copied().flatten();
                    if next.unwrap_or(low).max(low) < high {
                        waiting.push((tp, high));
                    }
                }
                targets = waiting;
            }
            if targets.is_empty() {
                return Ok(());
            }
            if *changes.borrow_and_update() == Phase::Ended {
                return Err(stopped());
            }
            // A change, or a second at most (the log's start moves with retention).
            let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        }
    }
}

fn stopped() -> Error {
    Error::Task("the runtime stopped before it caught up".into())
}

/// The watermark reader of a consumer, for [`ProgressState::attach`].
pub(crate) fn reader<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: std::sync::Weak<rdkafka::consumer::BaseConsumer<C>>,
) -> Arc<Watermarks> {
    use rdkafka::consumer::Consumer;
    Arc::new(move |topic: &str, partition: i32| {
        let consumer = consumer
            .upgrade()
            .ok_or_else(|| Error::Task("the runtime stopped".into()))?;
        consumer
            .fetch_watermarks(topic, partition, WATERMARKS)
            .map_err(|e| Error::kafka(format!("reading the watermarks of {topic}/{partition}"), e))
    })
}
