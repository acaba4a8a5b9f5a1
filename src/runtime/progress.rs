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
    /// Where the runtime is; every change to it or to `assigned` notifies the waiters.
    phase: watch::Sender<Phase>,
    watermarks: OnceLock<Arc<Watermarks>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No assignment received yet.
    Joining,
    /// An assignment (possibly empty) was received.
    Running,
    /// The runtime stopped, or is draining to stop.
    Ended,
}

impl ProgressState {
    pub(crate) fn new() -> Self {
        ProgressState {
            assigned: Mutex::new(HashMap::new()),
            phase: watch::Sender::new(Phase::Joining),
            watermarks: OnceLock::new(),
        }
    }

    fn assigned(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Option<i64>>> {
        self.assigned.lock().expect("progress poisoned")
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Notifies the waiters; a runtime that joined is running unless it ended.
    fn changed(&self) {
        self.phase.send_modify(|phase| {
            if *phase == Phase::Joining {
                *phase = Phase::Running;
            }
        });
    }

    /// True once the runtime stopped or its future was dropped: nobody drains revoked
    /// partitions any more.
    pub(crate) fn ended(&self) -> bool {
        self.phase() == Phase::Ended
    }

    /// How to read watermarks; once, when the runtime starts.
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

    /// The runtime is stopping (or its future was dropped): nothing counts as assigned any
    /// more, and waiters end with an error rather than mistake the final revocations for
    /// progress.
    pub(crate) fn end(&self) {
        self.phase.send_replace(Phase::Ended);
    }
}

/// Ends the progress when dropped: [`Runtime::run`](crate::Runtime::run) holds one, so a run
/// whose future is dropped (a crash, a cancelled task) ends it too.
pub(crate) struct EndOnDrop(pub(crate) Arc<ProgressState>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Records not yet committed: from the next offset (or the log's start) to the high watermark.
fn lag(next: Option<i64>, low: i64, high: i64) -> i64 {
    (high - next.unwrap_or(low).max(low)).max(0)
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
    /// partition; empty before the first assignment and once the runtime stops.
    pub async fn partitions(&self) -> Result<Vec<PartitionProgress>> {
        let mut assigned: Vec<(String, i32)> = self.state.assigned().keys().cloned().collect();
        assigned.sort();
        let mut out = Vec::with_capacity(assigned.len());
        for (topic, partition) in assigned {
            let (low, high) = self.watermarks(topic.clone(), partition).await?;
            // Read after the watermarks, so a commit in between only lowers the lag.
            let position = self
                .state
                .assigned()
                .get(&(topic.clone(), partition))
                .copied();
            if self.state.phase() == Phase::Ended {
                return Ok(Vec::new());
            }
            let Some(position) = position else {
                continue; // revoked meanwhile
            };
            out.push(PartitionProgress {
                topic,
                partition,
                position,
                low_watermark: low,
                high_watermark: high,
                lag: lag(position, low, high),
            });
        }
        Ok(out)
    }

    /// Resolves once the consumer has joined its group and every partition assigned to it at
    /// that point has been committed up to the high watermark it had when this was called (or
    /// was revoked: its new owner goes on with it). Records produced after the call are not
    /// waited for, nor partitions assigned later: a partition still held by a member that died
    /// (until its session times out) is not this instance's yet. An error when the runtime
    /// stops first (its future dropped included), or the
    /// watermarks cannot be read.
    ///
    /// A partition whose last records are transaction markers (a transactional producer's
    /// commit) has a high watermark past its last record: such a partition counts as caught
    /// up only once a later record has been handled.
    pub async fn caught_up(&self) -> Result<()> {
        let mut phase = self.state.phase.subscribe();
        // Joined first: before that, "every assigned partition" would be none.
        phase
            .wait_for(|p| *p != Phase::Joining)
            .await
            .map_err(|_| stopped())?;
        let mut targets: Vec<((String, i32), i64, i64)> = self
            .partitions()
            .await?
            .into_iter()
            .map(|p| ((p.topic, p.partition), p.low_watermark, p.high_watermark))
            .collect();
        loop {
            // The phase before the partitions: a stopping runtime's revocations are no progress.
            if *phase.borrow_and_update() == Phase::Ended {
                return Err(stopped());
            }
            {
                let assigned = self.state.assigned();
                targets.retain(|(tp, low, high)| {
                    // Gone from `assigned`: revoked, its new owner goes on with it.
                    assigned
                        .get(tp)
                        .is_some_and(|next| lag(*next, *low, *high) > 0)
                });
            }
            if targets.is_empty() {
                return Ok(());
            }
            phase.changed().await.map_err(|_| stopped())?;
        }
    }
}

fn stopped() -> Error {
    Error::Task("the runtime stopped before it caught up".into())
}

/// The watermark reader for [`ProgressState::attach`]: a client of its own, made from the
/// runtime's settings (without its group) on first use. The runtime's consumer would answer
/// too, but its requests queue behind its fetches, each of which the broker holds for up to
/// `fetch.wait.max.ms`.
pub(crate) fn reader(client: &rdkafka::ClientConfig) -> Arc<Watermarks> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut config = client.clone();
    for key in ["group.id", "group.instance.id"] {
        config.remove(key);
    }
    let made: OnceLock<Result<BaseConsumer>> = OnceLock::new();
    Arc::new(move |topic: &str, partition: i32| {
        let consumer = made
            .get_or_init(|| {
                config
                    .create()
                    .map_err(|e| Error::kafka("creating the watermark client", e))
            })
            .as_ref()
            // The error's text only: its source may not be shared, and names no secret.
            .map_err(|e| Error::Task(e.to_string()))?;
        consumer
            .fetch_watermarks(topic, partition, WATERMARKS)
            .map_err(|e| Error::kafka(format!("reading the watermarks of {topic}/{partition}"), e))
    })
}
