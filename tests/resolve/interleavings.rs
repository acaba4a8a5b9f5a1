//! The interleaving property: whatever the order in which each entity's events are merged onto
//! one partition, the stored winners and records are the rules' own decisions over that order,
//! and a replay of the partition on an empty store gives the same bytes.

use std::collections::HashMap;
use std::time::Duration;

use super::common::backend::{Postgres, Rocks};
use super::common::{Cluster, unique};
use super::{Report, Resolving, consume, explain, guard, report, send, snapshot};
use idempotent_consumer::resolve::{Explanation, Order, Policy, ResolutionOutcome};

/// One case of the interleaving property: the events of each entity, in their own order, and
/// the picks that merge them onto one partition.
#[derive(Debug, Clone)]
struct Interleaving {
    /// Per entity: (sequence, event time) of each event.
    events: Vec<Vec<(u64, i64)>>,
    picks: Vec<usize>,
    /// Last writer wins (true) or the sequence guard.
    lww: bool,
}

fn interleavings() -> impl proptest::strategy::Strategy<Value = Interleaving> {
    use proptest::prelude::*;
    let entity = proptest::collection::vec((1u64..8, 0i64..6), 1..7);
    (
        proptest::collection::vec(entity, 1..4),
        proptest::collection::vec(0usize..3, 24),
        any::<bool>(),
    )
        .prop_map(|(events, picks, lww)| Interleaving { events, picks, lww })
}

impl Interleaving {
    fn policy(&self) -> Policy {
        if self.lww {
            Policy::LastWriterWins {
                max_skew: None,
                grace: Duration::from_millis(1_500),
            }
        } else {
            guard()
        }
    }

    /// The records in arrival order: each entity's events in their own order, merged by the
    /// picks (then whatever is left, entity by entity).
    fn records(&self) -> Vec<(String, i32, Vec<u8>)> {
        let mut next = vec![0usize; self.events.len()];
        let mut out = Vec::new();
        let mut take = |e: usize| {
            if let Some(&(seq, time)) = self.events[e].get(next[e]) {
                let key = format!("e{e}-{}", next[e]);
                out.push((
                    key,
                    0,
                    report(&format!("e{e}"), seq, time * 500, next[e] as i64),
                ));
                next[e] += 1;
                true
            } else {
                false
            }
        };
        for &pick in &self.picks {
            take(pick % self.events.len());
        }
        for e in 0..self.events.len() {
            while take(e) {}
        }
        out
    }
}

/// The same events of each entity, interleaved at random on one partition: the stored winners
/// and resolution records are the rules' own decisions over the arrival order, and replaying the
/// partition from offset 0 on an empty store gives the same bytes.
fn random_interleavings_replay_byte_for_byte<B: Resolving>(cases: u32, new: impl Fn() -> B) {
    let cluster = Cluster::start();
    let config = proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    runner
        .run(&interleavings(), |case| {
            let topic = cluster.create_topic(1);
            let records = case.records();
            send(&cluster, &topic, &records);
            let n = records.len() as u64;
            let entities: Vec<String> = (0..case.events.len()).map(|e| format!("e{e}")).collect();
            let names: Vec<&str> = entities.iter().map(String::as_str).collect();
            let (first, second) = (new(), new());
            let (g1, g2) = (unique("group"), unique("group"));
            consume(&first, &cluster, &topic, &g1, case.policy(), n);
            // The rules' own fold over the arrival order.
            let mut winners: HashMap<&str, idempotent_consumer::resolve::Candidate> =
                HashMap::new();
            let mut expected: HashMap<&str, Vec<(String, ResolutionOutcome)>> = HashMap::new();
            let stored: HashMap<&str, Explanation> = names
                .iter()
                .map(|e| (*e, explain(&first, &g1, e)))
                .collect();
            for (key, _, payload) in &records {
                let r: Report = serde_json::from_slice(payload).unwrap();
                let entity = names[r.device[1..].parse::<usize>().unwrap()];
                // The candidate as the store saw it (position and timestamp included).
                let seen = stored[entity]
                    .resolutions
                    .iter()
                    .map(|x| &x.candidate)
                    .chain(
                        stored[entity]
                            .state
                            .as_ref()
                            .and_then(|s| s.winner.as_ref()),
                    )
                    .find(|c| &c.key == key)
                    .cloned();
                let candidate = seen.unwrap_or_else(|| idempotent_consumer::resolve::Candidate {
                    key: key.clone(),
                    topic: topic.clone(),
                    partition: 0,
                    offset: -1,
                    logged_at_ms: None,
                    order: Order {
                        epoch: 0,
                        sequence: Some(r.seq),
                        event_time_ms: Some(r.time),
                        source: String::new(),
                    },
                });
                let d = case.policy().decide(winners.get(entity), &candidate);
                if d.verdict != idempotent_consumer::resolve::Verdict::Newer {
                    expected
                        .entry(entity)
                        .or_default()
                        .push((key.clone(), d.verdict.outcome()));
                }
                if d.verdict.outcome() == ResolutionOutcome::Applied {
                    winners.insert(entity, candidate);
                }
            }
            for entity in &names {
                let why = &stored[entity];
                let state = why.state.as_ref().expect("every entity has a winner");
                proptest::prop_assert_eq!(
                    &state.winner.as_ref().unwrap().key,
                    &winners[entity].key
                );
                let mut got: Vec<(String, ResolutionOutcome)> = why
                    .resolutions
                    .iter()
                    .map(|r| (r.candidate.key.clone(), r.outcome))
                    .collect();
                got.reverse();
                let none = Vec::new();
                proptest::prop_assert_eq!(&got, expected.get(entity).unwrap_or(&none));
            }
            consume(&second, &cluster, &topic, &g2, case.policy(), n);
            proptest::prop_assert_eq!(
                String::from_utf8(snapshot(&first, &g1, &names)).unwrap(),
                String::from_utf8(snapshot(&second, &g2, &names)).unwrap()
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn rocksdb_random_interleavings_replay_byte_for_byte() {
    random_interleavings_replay_byte_for_byte(8, Rocks::new);
}

#[test]
fn postgres_random_interleavings_replay_byte_for_byte() {
    random_interleavings_replay_byte_for_byte(3, Postgres::new);
}
