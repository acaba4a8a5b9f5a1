//! The built-in rules that decide between a stored winner and a new candidate, and the custom
//! one. A decision reads nothing but the two candidates, so the same records decide the same way
//! on every replay.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::{Candidate, Compared, ResolutionOutcome};

/// What a rule decided about a candidate, with the reason a resolution record keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Newer than the winner by the rule's plain order: applied, no resolution record.
    Newer,
    /// Applied, but on a basis worth keeping (a tie-break, a custom rule's call): applied, and
    /// recorded with this reason.
    Won(String),
    /// A valid, concurrent update that lost to the winner (an older event inside the grace
    /// period, the loser of a tie-break): not applied; recorded; handed to
    /// [`Handler::on_superseded`](crate::Handler::on_superseded).
    Superseded(String),
    /// Out of date: at or below the stored version, or older than the winner by more than the
    /// grace period. Not applied; recorded.
    Stale(String),
    /// Two updates that claim the same place in the order (the same version with another
    /// idempotency key): the stored winner stays. Not applied; recorded.
    Conflict(String),
    /// Not acceptable as a winner whatever the stored state (an event time too far in the
    /// future). Not applied; recorded.
    Rejected(String),
}

impl Verdict {
    /// The outcome this verdict settles its record with.
    pub fn outcome(&self) -> ResolutionOutcome {
        match self {
            Verdict::Newer | Verdict::Won(_) => ResolutionOutcome::Applied,
            Verdict::Superseded(_) => ResolutionOutcome::Superseded,
            Verdict::Stale(_) => ResolutionOutcome::Stale,
            Verdict::Conflict(_) => ResolutionOutcome::Conflict,
            Verdict::Rejected(_) => ResolutionOutcome::Rejected,
        }
    }

    /// The reason (empty for [`Verdict::Newer`]).
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Newer => "",
            Verdict::Won(r)
            | Verdict::Superseded(r)
            | Verdict::Stale(r)
            | Verdict::Conflict(r)
            | Verdict::Rejected(r) => r,
        }
    }
}

/// A user's rule: sees the stored winner (if any) and the candidate, returns the verdict.
pub type CustomRule = dyn Fn(Option<&Candidate>, &Candidate) -> Verdict + Send + Sync;

/// How a [`Resolver`](super::Resolver) orders the candidates of one entity.
#[derive(Clone)]
pub enum Policy {
    /// A per-entity version: [`Order::sequence`](super::Order::sequence), after
    /// [`Order::epoch`](super::Order::epoch) when `epochs` is true (so a device that restarts
    /// its sequence at a new epoch wins over its old epoch). A record at or below the stored
    /// version is stale; one at the same version with another idempotency key is a conflict.
    SequenceGuard {
        /// Compare the epoch before the sequence.
        epochs: bool,
    },
    /// The latest event time wins, ties broken by the source id and then the idempotency key
    /// (byte order), so every replay picks the same winner.
    LastWriterWins {
        /// A candidate whose event time is further than this past its record's Kafka timestamp
        /// (the producer's or the broker's clock) is rejected: a clock running fast cannot make
        /// it the winner. `None`: no bound.
        max_skew: Option<Duration>,
        /// An older candidate within this much of the winner's event time is superseded (a
        /// concurrent update that lost, handed to the hook); further behind, stale. Zero:
        /// only a tie-break's loser is superseded.
        grace: Duration,
    },
    /// The user's rule, with a name and version kept in every resolution record.
    Custom {
        /// The rule's name, kept in the records.
        name: String,
        /// The rule's version, kept in the records: bump it when the rule changes.
        version: u32,
        /// The rule.
        rule: Arc<CustomRule>,
    },
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::SequenceGuard { epochs } => f
                .debug_struct("SequenceGuard")
                .field("epochs", epochs)
                .finish(),
            Policy::LastWriterWins { max_skew, grace } => f
                .debug_struct("LastWriterWins")
                .field("max_skew", max_skew)
                .field("grace", grace)
                .finish(),
            Policy::Custom { name, version, .. } => f
                .debug_struct("Custom")
                .field("name", name)
                .field("version", version)
                .finish_non_exhaustive(),
        }
    }
}

/// A rule's decision: the verdict and the values it compared (none for a plain
/// [`Verdict::Newer`], the common case, which leaves no record). The rule's name and version
/// are the policy's ([`Policy::rule_name`], [`Policy::rule_version`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What it decided.
    pub verdict: Verdict,
    /// The values compared, candidate's and winner's.
    pub compared: Vec<Compared>,
}

fn compared(field: &str, candidate: impl ToString, winner: impl ToString) -> Compared {
    Compared {
        field: field.to_owned(),
        candidate: candidate.to_string(),
        winner: winner.to_string(),
    }
}

impl Policy {
    /// A custom rule.
    pub fn custom(
        name: impl Into<String>,
        version: u32,
        rule: impl Fn(Option<&Candidate>, &Candidate) -> Verdict + Send + Sync + 'static,
    ) -> Policy {
        Policy::Custom {
            name: name.into(),
            version,
            rule: Arc::new(rule),
        }
    }

    /// The rule's name, as resolution records keep it.
    pub fn rule_name(&self) -> &str {
        match self {
            Policy::SequenceGuard { .. } => "sequence-guard",
            Policy::LastWriterWins { .. } => "last-writer-wins",
            Policy::Custom { name, .. } => name,
        }
    }

    /// The rule's version, as resolution records keep it.
    pub fn rule_version(&self) -> u32 {
        match self {
            Policy::SequenceGuard { .. } | Policy::LastWriterWins { .. } => 1,
            Policy::Custom { version, .. } => *version,
        }
    }

    /// What the fields a candidate needs under this policy are missing, if any.
    pub(crate) fn missing_field(&self, candidate: &Candidate) -> Option<&'static str> {
        match self {
            Policy::SequenceGuard { .. } if candidate.order.sequence.is_none() => Some("sequence"),
            Policy::LastWriterWins { .. } if candidate.order.event_time_ms.is_none() => {
                Some("event time")
            }
            _ => None,
        }
    }

    /// Decides `candidate` against the stored `winner`. Deterministic: the same two candidates
    /// always give the same decision.
    pub fn decide(&self, winner: Option<&Candidate>, candidate: &Candidate) -> Decision {
        let (verdict, compared) = match self {
            Policy::SequenceGuard { epochs } => sequence_guard(*epochs, winner, candidate),
            Policy::LastWriterWins { max_skew, grace } => {
                last_writer_wins(*max_skew, *grace, winner, candidate)
            }
            Policy::Custom { rule, .. } => (rule(winner, candidate), Vec::new()),
        };
        Decision { verdict, compared }
    }
}

fn sequence_guard(
    epochs: bool,
    winner: Option<&Candidate>,
    candidate: &Candidate,
) -> (Verdict, Vec<Compared>) {
    let Some(winner) = winner else {
        return (Verdict::Newer, Vec::new());
    };
    let seq = |c: &Candidate| c.order.sequence.unwrap_or(0);
    let by_epoch = if epochs {
        candidate.order.epoch.cmp(&winner.order.epoch)
    } else {
        std::cmp::Ordering::Equal
    };
    let ordering = by_epoch.then_with(|| seq(candidate).cmp(&seq(winner)));
    if ordering.is_gt() {
        // The common case: nothing recorded, so nothing to describe.
        return (Verdict::Newer, Vec::new());
    }
    let mut values = Vec::with_capacity(2);
    if epochs {
        values.push(compared("epoch", candidate.order.epoch, winner.order.epoch));
    }
    values.push(compared("sequence", seq(candidate), seq(winner)));
    let version = |c: &Candidate| {
        if epochs {
            format!("{}.{}", c.order.epoch, seq(c))
        } else {
            seq(c).to_string()
        }
    };
    let verdict = match ordering {
        std::cmp::Ordering::Greater => unreachable!("returned above"),
        std::cmp::Ordering::Less => Verdict::Stale(format!(
            "version {} is below the stored version {}",
            version(candidate),
            version(winner)
        )),
        std::cmp::Ordering::Equal if candidate.key == winner.key => Verdict::Stale(format!(
            "version {} is the stored winner's own",
            version(candidate)
        )),
        std::cmp::Ordering::Equal => Verdict::Conflict(format!(
            "version {} was already applied from another update (key {})",
            version(candidate),
            winner.key
        )),
    };
    (verdict, values)
}

fn last_writer_wins(
    max_skew: Option<Duration>,
    grace: Duration,
    winner: Option<&Candidate>,
    candidate: &Candidate,
) -> (Verdict, Vec<Compared>) {
    let time = |c: &Candidate| c.order.event_time_ms.unwrap_or(i64::MIN);
    if let (Some(bound), Some(logged)) = (max_skew, candidate.logged_at_ms) {
        let bound_ms = i64::try_from(bound.as_millis()).unwrap_or(i64::MAX);
        let ahead = time(candidate).saturating_sub(logged);
        if ahead > bound_ms {
            let values = vec![compared(
                "event time - record timestamp (ms)",
                ahead,
                bound_ms,
            )];
            return (
                Verdict::Rejected(format!(
                    "event time {} is {ahead} ms past the record's timestamp {logged}, over \
                     the accepted clock skew of {bound_ms} ms",
                    time(candidate)
                )),
                values,
            );
        }
    }
    let Some(winner) = winner else {
        return (Verdict::Newer, Vec::new());
    };
    let by_time = time(candidate).cmp(&time(winner));
    if by_time.is_gt() {
        // The common case: nothing recorded, so nothing to describe.
        return (Verdict::Newer, Vec::new());
    }
    let mut values = vec![compared("event time", time(candidate), time(winner))];
    if by_time.is_lt() {
        let behind = time(winner).saturating_sub(time(candidate));
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let verdict = if behind <= grace_ms {
            Verdict::Superseded(format!(
                "event time {} is {behind} ms before the winner's {}, within the grace of \
                 {grace_ms} ms",
                time(candidate),
                time(winner)
            ))
        } else {
            Verdict::Stale(format!(
                "event time {} is {behind} ms before the winner's {}, past the grace of \
                 {grace_ms} ms",
                time(candidate),
                time(winner)
            ))
        };
        return (verdict, values);
    }
    if candidate.key == winner.key && candidate.order == winner.order {
        return (
            Verdict::Stale("the stored winner's own update".to_owned()),
            values,
        );
    }
    // Equal event times: the source id, then the idempotency key, decide.
    let by = if candidate.order.source != winner.order.source {
        values.push(compared(
            "source",
            &candidate.order.source,
            &winner.order.source,
        ));
        "source id"
    } else {
        values.push(compared("idempotency key", &candidate.key, &winner.key));
        "idempotency key"
    };
    let wins = (&candidate.order.source, &candidate.key) > (&winner.order.source, &winner.key);
    let verdict = if wins {
        Verdict::Won(format!(
            "equal event times {}; the tie-break by {by} chose this update",
            time(candidate)
        ))
    } else {
        Verdict::Superseded(format!(
            "equal event times {}; the tie-break by {by} chose the winner",
            time(candidate)
        ))
    };
    (verdict, values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::Order;

    fn at(key: &str, seq: u64, time: i64) -> Candidate {
        Candidate {
            key: key.to_owned(),
            topic: "t".into(),
            partition: 0,
            offset: 0,
            logged_at_ms: Some(time),
            order: Order {
                epoch: 0,
                sequence: Some(seq),
                event_time_ms: Some(time),
                source: String::new(),
            },
        }
    }

    #[test]
    fn the_sequence_guard_orders_by_version_and_finds_conflicts() {
        let p = Policy::SequenceGuard { epochs: true };
        let w = at("a", 5, 0);
        assert_eq!(p.decide(None, &w).verdict, Verdict::Newer);
        assert_eq!(p.decide(Some(&w), &at("b", 6, 0)).verdict, Verdict::Newer);
        assert!(matches!(
            p.decide(Some(&w), &at("b", 4, 0)).verdict,
            Verdict::Stale(_)
        ));
        assert!(matches!(
            p.decide(Some(&w), &at("b", 5, 0)).verdict,
            Verdict::Conflict(_)
        ));
        let mut restarted = at("c", 1, 0);
        restarted.order.epoch = 1;
        assert_eq!(p.decide(Some(&w), &restarted).verdict, Verdict::Newer);
        let no_epochs = Policy::SequenceGuard { epochs: false };
        assert!(matches!(
            no_epochs.decide(Some(&w), &restarted).verdict,
            Verdict::Stale(_)
        ));
    }

    #[test]
    fn last_writer_wins_breaks_ties_the_same_way_whichever_comes_first() {
        let p = Policy::LastWriterWins {
            max_skew: None,
            grace: Duration::from_secs(1),
        };
        let (x, y) = (at("x", 0, 100), at("y", 0, 100));
        assert!(matches!(p.decide(Some(&x), &y).verdict, Verdict::Won(_)));
        assert!(matches!(
            p.decide(Some(&y), &x).verdict,
            Verdict::Superseded(_)
        ));
        assert!(matches!(
            p.decide(Some(&at("w", 0, 1_000)), &at("v", 0, 100)).verdict,
            Verdict::Superseded(_)
        ));
        assert!(matches!(
            p.decide(Some(&at("w", 0, 1_101)), &at("v", 0, 100)).verdict,
            Verdict::Stale(_)
        ));
    }

    #[test]
    fn an_event_from_too_far_in_the_future_is_rejected() {
        let p = Policy::LastWriterWins {
            max_skew: Some(Duration::from_secs(5)),
            grace: Duration::ZERO,
        };
        let mut future = at("f", 0, 60_000);
        future.logged_at_ms = Some(1_000);
        let d = p.decide(None, &future);
        assert!(matches!(d.verdict, Verdict::Rejected(_)), "{d:?}");
        assert_eq!(d.compared[0].candidate, "59000");
        let mut near = at("n", 0, 5_000);
        near.logged_at_ms = Some(1_000);
        assert_eq!(p.decide(None, &near).verdict, Verdict::Newer);
    }

    /// The winner after deciding `events` in order, and every decision made.
    fn fold(p: &Policy, events: &[Candidate]) -> (Option<Candidate>, Vec<Decision>) {
        let mut winner: Option<Candidate> = None;
        let mut decisions = Vec::new();
        for e in events {
            let d = p.decide(winner.as_ref(), e);
            if d.verdict.outcome() == ResolutionOutcome::Applied {
                winner = Some(e.clone());
            }
            decisions.push(d);
        }
        (winner, decisions)
    }

    fn policies() -> [Policy; 2] {
        [
            Policy::SequenceGuard { epochs: true },
            Policy::LastWriterWins {
                max_skew: None,
                grace: Duration::from_millis(500),
            },
        ]
    }

    proptest::proptest! {
        /// Whatever the arrival order of one entity's updates, the winner is the greatest by
        /// the policy's order; deciding the same order twice gives the same decisions; and
        /// interleaving other entities' updates changes nothing of this entity's.
        #[test]
        fn the_winner_does_not_depend_on_the_arrival_order(
            times in proptest::collection::vec(0i64..50, 1..12),
            order in proptest::collection::vec(proptest::num::usize::ANY, 12),
            other in proptest::collection::vec(0i64..50, 0..12),
        ) {
            // Distinct updates: the index is the sequence and part of the key.
            let events: Vec<Candidate> = times
                .iter()
                .enumerate()
                .map(|(i, t)| at(&format!("k{i:02}"), i as u64 + 1, *t * 100))
                .collect();
            let mut shuffled = events.clone();
            for (i, j) in order.iter().enumerate().take(shuffled.len()) {
                let n = shuffled.len();
                shuffled.swap(i % n, j % n);
            }
            for p in policies() {
                let (winner, decisions) = fold(&p, &shuffled);
                let best = match &p {
                    Policy::SequenceGuard { .. } => events.iter().max_by_key(|e| e.order.sequence),
                    _ => events.iter().max_by(|a, b| {
                        (a.order.event_time_ms, &a.key).cmp(&(b.order.event_time_ms, &b.key))
                    }),
                };
                proptest::prop_assert_eq!(winner.as_ref(), best);
                proptest::prop_assert_eq!(&fold(&p, &shuffled).1, &decisions);
                // Another entity's updates interleaved: decided apart, this one's are the same.
                let mut mine = Vec::new();
                let (mut w, mut theirs) = (None::<Candidate>, None::<Candidate>);
                let others: Vec<Candidate> = other
                    .iter()
                    .enumerate()
                    .map(|(i, t)| at(&format!("o{i:02}"), i as u64 + 1, *t * 100))
                    .collect();
                let mut a = shuffled.iter();
                let mut b = others.iter();
                loop {
                    match (a.next(), b.next()) {
                        (None, None) => break,
                        (x, y) => {
                            for (e, slot, out) in [(x, &mut w, true), (y, &mut theirs, false)] {
                                let Some(e) = e else { continue };
                                let d = p.decide(slot.as_ref(), e);
                                if d.verdict.outcome() == ResolutionOutcome::Applied {
                                    *slot = Some(e.clone());
                                }
                                if out {
                                    mine.push(d);
                                }
                            }
                        }
                    }
                }
                proptest::prop_assert_eq!(mine, decisions);
            }
        }
    }
}
