//! What the dashboard shows, gathered at once from the store, the broker and the runtime's
//! counters: the page renders it, and the page's script fetches it again every refresh.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use serde::Serialize;

use crate::dead_letter::{DeadLetter, DeadLetterReason};
use crate::error::Result;
use crate::hex::shown;
use crate::lag::{AskError, BrokerSide, broker_side};
use crate::metrics::{Stats, StatsSnapshot};
use crate::store::{Audited, Inspect, PartitionId, StoredPosition, now_ms};

/// The newest dead letters listed, and audit records shown.
pub(super) const LATEST: usize = 20;
/// How many samples of the counters the rates chart keeps (one a refresh).
const HISTORY: usize = 120;
/// How long a question to the broker may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the page shows, at `taken_at_ms`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Summary {
    pub(super) group: String,
    pub(super) taken_at_ms: i64,
    pub(super) refresh_ms: u64,
    pub(super) partitions: Vec<PartitionRow>,
    /// The sum of the partitions' lags, when the broker answered for every one.
    pub(super) total_lag: Option<i64>,
    /// Why the broker columns are empty: not configured, or what it answered.
    pub(super) broker: BrokerState,
    /// The runtime's counters, when the dashboard was given them.
    pub(super) counters: Option<Counters>,
    /// Per-second rates between consecutive samples, oldest first.
    pub(super) rates: Vec<RatePoint>,
    pub(super) dead_letters: DeadLetters,
    pub(super) audit: Vec<AuditRow>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", content = "message", rename_all = "snake_case")]
pub(super) enum BrokerState {
    NotConfigured,
    Answered,
    Failed(String),
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct PartitionRow {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) next_offset: Option<i64>,
    pub(super) epoch: u64,
    pub(super) committed_offset: Option<i64>,
    pub(super) high_watermark: Option<i64>,
    pub(super) lag: Option<i64>,
}

/// The runtime's outcome counters since it started, and their shares of the records settled.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Counters {
    pub(super) records_read: u64,
    pub(super) applied: u64,
    pub(super) duplicates: u64,
    pub(super) conflicts: u64,
    pub(super) dead_lettered: u64,
    /// Every record with an outcome, once ([`StatsSnapshot::settled`]).
    pub(super) settled: u64,
    /// Duplicates among the records settled, 0 to 1.
    pub(super) duplicate_rate: f64,
    /// Conflicts among the records settled, 0 to 1.
    pub(super) conflict_rate: f64,
}

impl Counters {
    fn of(s: &StatsSnapshot) -> Self {
        let duplicates = s.duplicates();
        let settled = s.settled();
        let share = |n: u64| {
            if settled == 0 {
                0.0
            } else {
                n as f64 / settled as f64
            }
        };
        Counters {
            records_read: s.records_read,
            applied: s.applied,
            duplicates,
            conflicts: s.conflicts,
            dead_lettered: s.dead_lettered,
            settled,
            duplicate_rate: share(duplicates),
            conflict_rate: share(s.conflicts),
        }
    }
}

/// Records a second between two samples, by outcome.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct RatePoint {
    pub(super) at_ms: i64,
    pub(super) applied: f64,
    pub(super) duplicates: f64,
    pub(super) conflicts: f64,
    pub(super) dead_lettered: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct DeadLetters {
    pub(super) total: usize,
    /// Every reason, in a fixed order, with its count (zero included).
    pub(super) by_reason: Vec<ReasonCount>,
    /// The newest, by the time they were dead-lettered.
    pub(super) latest: Vec<LetterRow>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct ReasonCount {
    pub(super) reason: &'static str,
    pub(super) count: usize,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct LetterRow {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<String>,
    pub(super) reason: &'static str,
    pub(super) message: String,
    pub(super) failed_at_ms: i64,
}

impl LetterRow {
    fn of(d: &DeadLetter) -> Self {
        LetterRow {
            topic: d.record.topic().to_owned(),
            partition: d.record.partition(),
            offset: d.record.offset(),
            key: d.key.as_deref().map(shown),
            reason: d.reason.as_str(),
            message: d.message.clone(),
            failed_at_ms: d.failed_at_ms,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct AuditRow {
    pub(super) id: String,
    pub(super) at_ms: i64,
    pub(super) who: String,
    pub(super) command: String,
    pub(super) counts: serde_json::Value,
}

pub(super) const REASONS: [DeadLetterReason; 4] = [
    DeadLetterReason::Permanent,
    DeadLetterReason::RetriesExhausted,
    DeadLetterReason::Conflict,
    DeadLetterReason::InvalidKey,
];

/// The samples of the counters the rates come from, one a refresh, taken by a task of the
/// dashboard from its first request on (so a page opened later shows the rates before it).
#[derive(Default)]
pub(super) struct Samples(VecDeque<(i64, StatsSnapshot)>);

impl Samples {
    pub(super) fn push(&mut self, at_ms: i64, s: StatsSnapshot) {
        if self.0.len() == HISTORY + 1 {
            self.0.pop_front();
        }
        self.0.push_back((at_ms, s));
    }

    fn rates(&self) -> Vec<RatePoint> {
        let per_s = |later: u64, earlier: u64, ms: i64| {
            later.saturating_sub(earlier) as f64 * 1000.0 / ms as f64
        };
        self.0
            .iter()
            .zip(self.0.iter().skip(1))
            .filter(|((a, _), (b, _))| b > a)
            .map(|((a, x), (b, y))| {
                let ms = b - a;
                RatePoint {
                    at_ms: *b,
                    applied: per_s(y.applied, x.applied, ms),
                    duplicates: per_s(
                        y.duplicates_redelivery + y.duplicates_repeated_key,
                        x.duplicates_redelivery + x.duplicates_repeated_key,
                        ms,
                    ),
                    conflicts: per_s(y.conflicts, x.conflicts, ms),
                    dead_lettered: per_s(y.dead_lettered, x.dead_lettered, ms),
                }
            })
            .collect()
    }
}

/// Where a summary comes from.
pub(super) struct Sources<'a, S> {
    pub(super) store: &'a S,
    pub(super) group: &'a str,
    pub(super) stats: Option<&'a Arc<Stats>>,
    pub(super) broker: Option<Arc<BaseConsumer>>,
    pub(super) refresh: Duration,
}

/// Reads everything once. The store's answer is required; the broker's is shown when it comes.
pub(super) async fn gather<S: Inspect + Audited + Sync>(
    from: Sources<'_, S>,
    samples: &std::sync::Mutex<Samples>,
) -> Result<Summary> {
    let taken_at_ms = now_ms();
    let positions = from.store.positions(from.group).await?;
    let (sides, broker) = match from.broker {
        None => (None, BrokerState::NotConfigured),
        Some(consumer) => match ask(consumer, &positions).await {
            Ok(sides) => (Some(sides), BrokerState::Answered),
            Err(message) => (None, BrokerState::Failed(message)),
        },
    };
    let partitions: Vec<PartitionRow> = positions
        .iter()
        .enumerate()
        .map(|(i, (p, s))| {
            let b = sides.as_ref().map(|b| b[i]);
            PartitionRow {
                topic: p.topic.clone(),
                partition: p.partition,
                next_offset: s.next_offset,
                epoch: s.epoch,
                committed_offset: b.and_then(|b| b.committed),
                high_watermark: b.map(|b| b.high_watermark),
                lag: b.map(|b| b.lag(s)),
            }
        })
        .collect();
    let total_lag = sides
        .as_ref()
        .map(|_| partitions.iter().filter_map(|p| p.lag).sum());

    let mut letters = Vec::new();
    for (p, _) in &positions {
        letters.extend(from.store.dead_letters(p).await?);
    }
    let by_reason = REASONS
        .iter()
        .map(|r| ReasonCount {
            reason: r.as_str(),
            count: letters.iter().filter(|d| d.reason == *r).count(),
        })
        .collect();
    letters.sort_by_key(|d| std::cmp::Reverse(d.failed_at_ms));
    let dead_letters = DeadLetters {
        total: letters.len(),
        by_reason,
        latest: letters.iter().take(LATEST).map(LetterRow::of).collect(),
    };

    // The operator commands on this group (a command names its group in its details).
    let audit = from
        .store
        .audit_log(LATEST * 5)
        .await?
        .into_iter()
        .filter(|r| r.details.get("group").and_then(|g| g.as_str()) == Some(from.group))
        .take(LATEST)
        .map(|r| AuditRow {
            id: r.id,
            at_ms: r.at_ms,
            who: r.who,
            command: r.command,
            counts: r.counts,
        })
        .collect();

    let counters = from.stats.map(|stats| Counters::of(&stats.snapshot()));
    let rates = samples.lock().unwrap_or_else(|e| e.into_inner()).rates();
    Ok(Summary {
        group: from.group.to_owned(),
        taken_at_ms,
        refresh_ms: u64::try_from(from.refresh.as_millis()).unwrap_or(u64::MAX),
        partitions,
        total_lag,
        broker,
        counters,
        rates,
        dead_letters,
        audit,
    })
}

/// The broker's side of every partition, asked off the async threads (the calls block).
async fn ask(
    consumer: Arc<BaseConsumer>,
    positions: &[(PartitionId, StoredPosition)],
) -> std::result::Result<Vec<BrokerSide>, String> {
    let partitions: Vec<PartitionId> = positions.iter().map(|(p, _)| p.clone()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&PartitionId> = partitions.iter().collect();
        broker_side(&consumer, &refs, BROKER_TIMEOUT)
    })
    .await
    .map_err(|e| format!("asking the broker: {e}"))?
    .map_err(|e| match e {
        AskError::Settings(m) | AskError::Broker(m) => m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(applied: u64, duplicates: u64) -> StatsSnapshot {
        StatsSnapshot {
            applied,
            duplicates_redelivery: duplicates,
            ..StatsSnapshot::default()
        }
    }

    #[test]
    fn rates_are_per_second_between_samples() {
        let mut s = Samples::default();
        s.push(1_000, snapshot(0, 0));
        s.push(3_000, snapshot(100, 10));
        s.push(3_000, snapshot(150, 10)); // the same instant: no rate
        s.push(4_000, snapshot(250, 30));
        let rates = s.rates();
        assert_eq!(rates.len(), 2);
        assert_eq!(
            (rates[0].at_ms, rates[0].applied, rates[0].duplicates),
            (3_000, 50.0, 5.0)
        );
        assert_eq!(
            (rates[1].at_ms, rates[1].applied, rates[1].duplicates),
            (4_000, 100.0, 20.0)
        );
    }

    #[test]
    fn the_history_is_bounded() {
        let mut s = Samples::default();
        for i in 0..(HISTORY as i64 + 50) {
            s.push(i * 1_000, snapshot(i as u64, 0));
        }
        assert_eq!(s.rates().len(), HISTORY);
    }

    #[test]
    fn shares_of_the_settled_records() {
        // 5 conflicts: 3 dead-lettered (among the 5 dead letters), 2 skipped and recorded.
        let c = Counters::of(&StatsSnapshot {
            applied: 68,
            duplicates_redelivery: 10,
            duplicates_repeated_key: 10,
            conflicts: 5,
            conflicts_skipped: 2,
            dead_lettered: 5,
            resolved_stale: 5,
            ..StatsSnapshot::default()
        });
        assert_eq!((c.settled, c.duplicates), (100, 20));
        assert_eq!((c.duplicate_rate, c.conflict_rate), (0.2, 0.05));
        assert_eq!(Counters::of(&StatsSnapshot::default()).duplicate_rate, 0.0);
    }
}
