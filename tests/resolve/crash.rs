//! A crash while a batch is open: no resolution record without its effect, nor an effect
//! without its record, and after the restart every stale report has exactly one record.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::common::backend::{Postgres, Rocks};
use super::common::{Cluster, Incarnation, builder, unique};
use super::{Resolving, Shadow, consume, explain, guard, report, resolver, send};
use idempotent_consumer::resolve::{Resolution, ResolutionOutcome};
use idempotent_consumer::{EntryStatus, PartitionId};

/// A crash while a batch is open: what the committed store holds is consistent record by
/// record (a record below the position has its entry, and its resolution record when it was
/// not applied; none above it has either), and after a restart every report not applied has
/// exactly one record.
fn a_crash_leaves_no_record_without_its_effect<B: Resolving>(b: B) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    // seq 2, 4, .., 18, then 1, 3, .., 19 (each stale but 19), then 20.
    let order: Vec<u64> = (1..20u64)
        .filter(|s| s % 2 == 0)
        .chain((1..20u64).filter(|s| s % 2 == 1))
        .chain([20])
        .collect();
    let records: Vec<_> = order
        .iter()
        .map(|&seq| {
            (
                format!("r{seq}"),
                0,
                report("dev", seq, seq as i64, seq as i64),
            )
        })
        .collect();
    send(&cluster, &topic, &records);
    let mut shadow = Shadow::new();
    // Hangs at seq 20, the last record, after the stale ones before it were settled in the
    // same open transaction (or in batches committed before it).
    shadow.hang_at = Some((0, 19));
    let hanging = shadow.hanging.clone();
    let consumer = Incarnation::launch(&b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .batch(100, Duration::from_millis(200))
            .resolver(resolver(guard()))
            .build(shadow)
            .unwrap()
    });
    let start = std::time::Instant::now();
    while !hanging.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < super::common::WAIT,
            "the handler never hung"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    consumer.crash();
    let partition = PartitionId::new(&group, &topic, 0);
    let committed = b.next_offset(&partition).unwrap_or(0);
    let why = explain(&b, &group, "dev");
    let recorded: HashMap<i64, &Resolution> = why
        .resolutions
        .iter()
        .map(|r| (r.candidate.offset, r))
        .collect();
    for (offset, (key, _, _)) in records.iter().enumerate() {
        let offset = offset as i64;
        let entry = b.entry(&group, key);
        let stale = is_stale(&order, offset as usize);
        if offset < committed {
            let entry = entry.unwrap_or_else(|| {
                panic!("offset {offset} below the position {committed} has no entry")
            });
            assert_eq!(
                entry.status == EntryStatus::Resolved,
                stale,
                "offset {offset}"
            );
            assert_eq!(
                recorded.contains_key(&offset),
                stale,
                "offset {offset}: its record"
            );
        } else {
            assert!(
                entry.is_none(),
                "offset {offset} at or past the position has an entry"
            );
            assert!(
                !recorded.contains_key(&offset),
                "a record for uncommitted offset {offset}"
            );
        }
    }
    assert_eq!(why.resolutions.len(), recorded.len());
    assert!(
        committed < 20,
        "the hung batch committed: position {committed}"
    );
    let corrections = b.balances().get("corrections").copied().unwrap_or(0);
    assert_eq!(
        corrections as usize,
        recorded.len(),
        "on_superseded's writes, as committed"
    );

    let stats = consume(&b, &cluster, &topic, &group, guard(), 20 - committed as u64);
    let why = explain(&b, &group, "dev");
    let state = why.state.unwrap();
    assert_eq!(state.winner.unwrap().key, "r20");
    assert_eq!(state.decisions, 20);
    let stale: Vec<_> = why
        .resolutions
        .iter()
        .filter(|r| r.outcome == ResolutionOutcome::Stale)
        .collect();
    let expected = (0..order.len()).filter(|&i| is_stale(&order, i)).count();
    assert_eq!(stale.len(), expected, "every stale report, once: {stats:?}");
    assert_eq!(b.balances()["dev"], 20);
    assert_eq!(
        b.balances()["corrections"] as usize,
        expected,
        "on_superseded's writes committed once each"
    );
}

/// True when the report at `at` comes after a higher sequence.
fn is_stale(order: &[u64], at: usize) -> bool {
    order[..at].iter().any(|&s| s > order[at])
}

#[test]
fn rocksdb_a_crash_leaves_no_record_without_its_effect() {
    a_crash_leaves_no_record_without_its_effect(Rocks::new());
}

#[test]
fn postgres_a_crash_leaves_no_record_without_its_effect() {
    a_crash_leaves_no_record_without_its_effect(Postgres::new());
}
