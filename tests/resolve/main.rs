//! The resolver on both stores: valid, distinct updates of one entity decided the same way
//! whatever their arrival order, every decision that is not a plain "newer, applied" kept as
//! exactly one resolution record committed with its effect, and a replay of the log on an empty
//! store giving the same winners and records byte for byte.

#[path = "../common/mod.rs"]
mod common;
mod crash;
mod interleavings;
mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::backend::{Backend, Postgres, Rocks};
use common::{Cluster, Incarnation, LedgerTx, builder, unique};
use idempotent_consumer::resolve::{
    Entities, Explanation, Facts, Order, Policy, Resolution, ResolutionOutcome, Resolver,
};
use idempotent_consumer::{
    EntryStatus, Handler, HandlerError, Outcome, PartitionId, Record, StatsSnapshot, Store,
};

/// A device's state report.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct Report {
    device: String,
    #[serde(default)]
    epoch: u64,
    seq: u64,
    time: i64,
    state: i64,
}

fn report(device: &str, seq: u64, time: i64, state: i64) -> Vec<u8> {
    serde_json::to_vec(&Report {
        device: device.into(),
        epoch: 0,
        seq,
        time,
        state,
    })
    .unwrap()
}

fn resolver(policy: Policy) -> Resolver {
    Resolver::new(policy, |record| {
        let r: Report = record.json().map_err(|e| e.to_string())?;
        Ok(Some(Facts {
            entity: r.device,
            order: Order {
                epoch: r.epoch,
                sequence: Some(r.seq),
                event_time_ms: Some(r.time),
                source: String::new(),
            },
        }))
    })
}

/// Keeps each device's shadow (its latest state) under the device's name in the ledger, and
/// counts the corrections `on_superseded` would send under `corrections`. Hangs, once it has
/// signalled, at `hang_at` (partition, offset).
struct Shadow {
    hang_at: Option<(i32, i64)>,
    reached: Arc<tokio::sync::Notify>,
    hanging: Arc<AtomicBool>,
}

impl Shadow {
    fn new() -> Self {
        Shadow {
            hang_at: None,
            reached: Arc::default(),
            hanging: Arc::default(),
        }
    }
}

impl<T: LedgerTx> Handler<T> for Shadow {
    async fn handle(&self, record: &Record, tx: &mut T) -> Result<Outcome, HandlerError> {
        let r: Report = record.json()?;
        let current = tx.add(&r.device, 0).await?;
        tx.add(&r.device, r.state - current).await?;
        if self.hang_at == Some((record.partition(), record.offset())) {
            self.hanging.store(true, Ordering::SeqCst);
            self.reached.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(Outcome::none())
    }

    async fn on_superseded(
        &self,
        _record: &Record,
        _resolution: &Resolution,
        tx: &mut T,
    ) -> Result<(), HandlerError> {
        tx.add("corrections", 1).await?;
        Ok(())
    }
}

/// A store of the suites that keeps entities.
trait Resolving: Backend<S: Entities + Store<Tx: LedgerTx> + Sync> {}

impl<B: Backend<S: Entities + Store<Tx: LedgerTx> + Sync>> Resolving for B {}

fn explain<B: Resolving>(b: &B, group: &str, entity: &str) -> Explanation {
    b.inspect(async |s: &B::S| s.explain(group, entity, 10_000).await.unwrap())
}

/// Sends `(key, partition, payload)` records in order.
fn send(cluster: &Cluster, topic: &str, records: &[(String, i32, Vec<u8>)]) {
    for (key, partition, payload) in records {
        cluster.send_keyed(topic, *partition, [(key.clone(), payload.clone())]);
    }
}

/// Runs one consumer with `policy` until it has settled `n` records, then stops it.
fn consume<B: Resolving>(
    b: &B,
    cluster: &Cluster,
    topic: &str,
    group: &str,
    policy: Policy,
    n: u64,
) -> StatsSnapshot {
    let consumer = Incarnation::launch(b, |store| {
        builder(cluster, group, topic)
            .store(store)
            .resolver(resolver(policy))
            .build(Shadow::new())
            .unwrap()
    });
    consumer.wait_for("records settled", |s| settled(s) == n);
    consumer.caught_up();
    let stats = consumer.stats();
    consumer.stop().unwrap();
    stats
}

/// Records decided by the resolver, applied or not, plus plain duplicates.
fn settled(s: &StatsSnapshot) -> u64 {
    s.resolved_applied
        + s.resolved_superseded
        + s.resolved_stale
        + s.resolved_conflict
        + s.resolved_rejected
        + s.duplicates()
}

fn not_applied(s: &StatsSnapshot) -> u64 {
    s.resolved_superseded + s.resolved_stale + s.resolved_conflict + s.resolved_rejected
}

/// Eight reports of one device, seq 1..=8, spread over two partitions in an order where the
/// older ones come late on the other partition; one report sent twice (a duplicate), and one
/// that claims seq 8 under another key (a conflict).
fn out_of_order(device: &str) -> Vec<(String, i32, Vec<u8>)> {
    let mut out = Vec::new();
    for (seq, partition) in [
        (5, 0),
        (2, 1),
        (7, 0),
        (1, 1),
        (8, 0),
        (3, 1),
        (6, 1),
        (4, 0),
    ] {
        out.push((
            format!("{device}-r{seq}"),
            partition,
            report(device, seq, 1_000 * seq as i64, seq as i64 * 10),
        ));
    }
    out.push((format!("{device}-r3"), 1, report(device, 3, 3_000, 30)));
    // After seq 8 on its partition: the conflict, whatever the other partition does.
    out.push((format!("{device}-other8"), 0, report(device, 8, 8_000, 99)));
    out
}

fn the_newer_wins_whatever_the_arrival_order<B: Resolving>(b: B) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(2);
    let group = unique("group");
    send(&cluster, &topic, &out_of_order("d1"));
    let stats = consume(&b, &cluster, &topic, &group, guard(), 10);
    assert_eq!(stats.duplicates(), 1, "{stats:?}");
    assert_eq!(stats.resolved_conflict, 1, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    let balances = b.balances();
    assert_eq!(balances["d1"], 80, "seq 8 is the shadow: {balances:?}");
    // Every report that was not applied has exactly one record, and `on_superseded` ran for
    // each in the same commit.
    let why = explain(&b, &group, "d1");
    let state = why.state.expect("the entity's state");
    let winner = state.winner.as_ref().unwrap();
    assert_eq!(winner.key, "d1-r8");
    assert_eq!(winner.order.sequence, Some(8));
    assert_eq!(state.decisions, 9, "every report but the duplicate");
    let not_applied_records = why
        .resolutions
        .iter()
        .filter(|r| r.outcome != ResolutionOutcome::Applied)
        .count() as u64;
    assert_eq!(not_applied_records, not_applied(&stats));
    assert_eq!(
        balances.get("corrections").copied().unwrap_or(0) as u64,
        not_applied(&stats)
    );
    assert_eq!(why.resolutions.len() as u64, state.resolutions);
    let seqs: Vec<u64> = why.resolutions.iter().map(|r| r.seq).collect();
    let mut expected: Vec<u64> = (0..state.resolutions).rev().collect();
    expected.truncate(seqs.len());
    assert_eq!(seqs, expected, "newest first, numbered from 0");
    let mut keys: Vec<&str> = why
        .resolutions
        .iter()
        .map(|r| r.candidate.key.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), why.resolutions.len(), "one record per update");
    let conflict = why
        .resolutions
        .iter()
        .find(|r| r.outcome == ResolutionOutcome::Conflict)
        .expect("the conflicting seq 8");
    assert_eq!(conflict.candidate.key, "d1-other8");
    assert!(conflict.reason.contains("d1-r8"), "{}", conflict.reason);
    for stale in why
        .resolutions
        .iter()
        .filter(|r| r.outcome == ResolutionOutcome::Stale)
    {
        let entry = b.entry(&group, &stale.candidate.key).expect("its entry");
        assert_eq!(entry.status, EntryStatus::Resolved);
        let behind =
            stale.candidate.order.sequence < stale.previous_winner.as_ref().unwrap().order.sequence;
        assert!(behind, "{stale:?}");
    }

    // A replay of both partitions from offset 0: every record is a redelivery, no new record.
    for partition in 0..2 {
        b.set_position(&PartitionId::new(&group, &topic, partition), 0);
    }
    let again = consume(&b, &cluster, &topic, &group, guard(), 10);
    assert_eq!(again.duplicates(), 10, "{again:?}");
    assert_eq!(
        explain(&b, &group, "d1"),
        Explanation {
            state: Some(state),
            ..why
        }
    );
}

#[test]
fn rocksdb_the_newer_wins_whatever_the_arrival_order() {
    the_newer_wins_whatever_the_arrival_order(Rocks::new());
}

#[test]
fn postgres_the_newer_wins_whatever_the_arrival_order() {
    the_newer_wins_whatever_the_arrival_order(Postgres::new());
}

/// Reports of several devices on one partition under last-writer-wins with a grace of one
/// second: two reports 900 ms apart (the later arriving first), two with equal event times (the
/// tie-break), one 5 s late, one from an hour in the future.
fn contested() -> Vec<(String, i32, Vec<u8>)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t = now - 60_000;
    [
        ("a-late", report("a", 0, t + 900, 2)),
        ("a-early", report("a", 0, t, 1)),
        ("b-x", report("b", 0, t, 1)),
        ("b-y", report("b", 0, t, 2)),
        ("c-new", report("c", 0, t + 5_000, 2)),
        ("c-old", report("c", 0, t, 1)),
        ("d-now", report("d", 0, t, 1)),
        ("d-future", report("d", 0, now + 3_600_000, 2)),
        // An entity's first report from the future: rejected, and no winner, so the next one
        // (older by an hour) is simply the first winner.
        ("e-future", report("e", 0, now + 3_600_000, 2)),
        ("e-now", report("e", 0, t, 1)),
    ]
    .into_iter()
    .map(|(k, p)| (k.to_owned(), 0, p))
    .collect()
}

fn guard() -> Policy {
    Policy::SequenceGuard { epochs: false }
}

fn lww() -> Policy {
    Policy::LastWriterWins {
        max_skew: Some(Duration::from_secs(60)),
        grace: Duration::from_secs(1),
    }
}

/// Everything a store says about `entities`, as bytes.
fn snapshot<B: Resolving>(b: &B, group: &str, entities: &[&str]) -> Vec<u8> {
    let all: BTreeMap<&str, Explanation> = entities
        .iter()
        .map(|e| (*e, explain(b, group, e)))
        .collect();
    let mut shadow: Vec<(String, i64)> = b.balances().into_iter().collect();
    shadow.sort();
    serde_json::to_vec(&(all, shadow)).unwrap()
}

fn replaying_on_an_empty_store_gives_the_same_bytes<B: Resolving>(first: B, second: B) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    let records = contested();
    send(&cluster, &topic, &records);
    let n = records.len() as u64;
    let stats = consume(&first, &cluster, &topic, &group, lww(), n);
    assert_eq!(stats.resolved_rejected, 2, "{stats:?}");
    let shadow = first.balances();
    assert_eq!(
        (
            shadow["a"],
            shadow["b"],
            shadow["c"],
            shadow["d"],
            shadow["e"]
        ),
        (2, 2, 2, 1, 1),
        "the later event, the tie-break's winner, the newer, the one not from the future (twice): {shadow:?}"
    );
    let e = explain(&first, &group, "e");
    assert_eq!(
        e.resolutions.len(),
        1,
        "only the rejection is recorded: {e:?}"
    );
    assert_eq!(e.resolutions[0].candidate.key, "e-future");
    let a = explain(&first, &group, "a");
    let a_early = a.resolutions.iter().find(|r| r.candidate.key == "a-early");
    let a_early = a_early.expect("a record for the report 900 ms older");
    assert_eq!(
        a_early.outcome,
        ResolutionOutcome::Superseded,
        "{a_early:?}"
    );
    assert_eq!(a_early.winner.as_ref().unwrap().key, "a-late");
    let b_records = explain(&first, &group, "b").resolutions;
    assert_eq!(b_records.len(), 1, "the tie-break: {b_records:?}");
    assert!(b_records[0].reason.contains("tie-break"), "{b_records:?}");
    assert_eq!(
        explain(&first, &group, "b")
            .state
            .unwrap()
            .winner
            .unwrap()
            .key,
        "b-y"
    );
    let d = explain(&first, &group, "d");
    assert_eq!(
        d.state.as_ref().unwrap().winner.as_ref().unwrap().key,
        "d-now"
    );
    let rejected = &d.resolutions[0];
    assert_eq!(rejected.outcome, ResolutionOutcome::Rejected);
    assert!(
        rejected.reason.contains("clock skew"),
        "{}",
        rejected.reason
    );
    let c = explain(&first, &group, "c").resolutions;
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(
        (c[0].outcome, c[0].candidate.key.as_str()),
        (ResolutionOutcome::Stale, "c-old")
    );
    assert!(c[0].reason.contains("past the grace"), "{}", c[0].reason);

    // The same partition from offset 0 on an empty store (another group: Kafka's offsets of the
    // first name the first store): the same bytes.
    let group_again = unique("group");
    let stats_again = consume(&second, &cluster, &topic, &group_again, lww(), n);
    assert_eq!(not_applied(&stats_again), not_applied(&stats));
    let entities = ["a", "b", "c", "d", "e"];
    assert_eq!(
        String::from_utf8(snapshot(&first, &group, &entities)).unwrap(),
        String::from_utf8(snapshot(&second, &group_again, &entities)).unwrap()
    );
}

#[test]
fn rocksdb_replaying_on_an_empty_store_gives_the_same_bytes() {
    replaying_on_an_empty_store_gives_the_same_bytes(Rocks::new(), Rocks::new());
}

#[test]
fn postgres_replaying_on_an_empty_store_gives_the_same_bytes() {
    replaying_on_an_empty_store_gives_the_same_bytes(Postgres::new(), Postgres::new());
}

/// Two instances on one PostgreSQL database, four partitions, the reports of each device spread
/// over all of them: entities are locked like claims, so each device ends at its highest
/// sequence and every other report has exactly one record.
#[test]
fn postgres_two_instances_decide_each_entity_once() {
    let b = Postgres::new();
    let cluster = Cluster::start();
    let topic = cluster.create_topic(4);
    let group = unique("group");
    let devices = 6;
    let per_device = 24u64;
    let mut records = Vec::new();
    for seq in 1..=per_device {
        for d in 0..devices {
            // The partition turns with the sequence, so each device's reports cross partitions.
            let partition = ((seq as i32) + d) % 4;
            records.push((
                format!("d{d}-{seq}"),
                partition,
                report(&format!("d{d}"), seq, seq as i64, seq as i64),
            ));
        }
    }
    // Reversed within each partition: the newest first, so most reports come late.
    let mut by_partition: BTreeMap<i32, Vec<(String, i32, Vec<u8>)>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.1).or_default().push(r);
    }
    for (partition, mut rs) in by_partition {
        rs.reverse();
        cluster.send_keyed(&topic, partition, rs.into_iter().map(|(k, _, p)| (k, p)));
    }
    let open = b.shared();
    let instances: Vec<Incarnation> = (0..2)
        .map(|_| {
            Incarnation::launch_with(&*open, |store| {
                builder(&cluster, &group, &topic)
                    .store(store)
                    .batch(10, Duration::from_millis(20))
                    .resolver(resolver(guard()))
                    .build(Shadow::new())
                    .unwrap()
            })
        })
        .collect();
    let total = devices as u64 * per_device;
    let start = std::time::Instant::now();
    loop {
        let done: u64 = instances.iter().map(|i| settled(&i.stats())).sum();
        if done == total {
            break;
        }
        assert!(start.elapsed() < common::WAIT, "settled {done} of {total}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats: Vec<StatsSnapshot> = instances.iter().map(|i| i.stats()).collect();
    for i in instances {
        i.stop().unwrap();
    }
    let not_applied: u64 = stats.iter().map(not_applied).sum();
    let shadow = b.balances();
    let mut records = 0;
    for d in 0..devices {
        let device = format!("d{d}");
        assert_eq!(shadow[&device], per_device as i64, "{device}: {shadow:?}");
        let why = explain(&b, &group, &device);
        let state = why.state.unwrap();
        assert_eq!(
            state.decisions, per_device,
            "{device} decided once per report"
        );
        assert_eq!(why.resolutions.len() as u64, state.resolutions);
        records += why.resolutions.len() as u64;
    }
    assert_eq!(
        records, not_applied,
        "one record per report not applied: {stats:?}"
    );
    assert_eq!(shadow["corrections"] as u64, not_applied);
}

#[test]
fn a_store_without_entities_is_refused() {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let store = idempotent_consumer::MemoryStore::new();
    let err = builder(&cluster, "g", &topic)
        .store(store)
        .resolver(resolver(guard()))
        .build(Noop)
        .unwrap_err();
    assert!(err.to_string().contains("keeps entities"), "{err}");
}

struct Noop;

impl Handler<idempotent_consumer::MemoryTx> for Noop {
    async fn handle(
        &self,
        _: &Record,
        _: &mut idempotent_consumer::MemoryTx,
    ) -> Result<Outcome, HandlerError> {
        Ok(Outcome::none())
    }
}

/// Resolution records go with the dedup retention, in the same bounded purge; the entity's
/// winner stays.
fn expired_records_are_purged_and_the_winner_stays<B: Resolving>(b: B) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    send(&cluster, &topic, &contested());
    let consumer = Incarnation::launch(&b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .retention(Duration::from_millis(1))
            .purge(Duration::from_millis(100), 2)
            .resolver(resolver(lww()))
            .build(Shadow::new())
            .unwrap()
    });
    consumer.wait_for("records settled and their records purged", |s| {
        // One record per entity: a superseded, a tie-break, a stale and two rejected reports.
        settled(s) == 10 && s.resolutions_purged == 5
    });
    consumer.stop().unwrap();
    for entity in ["a", "b", "c", "d", "e"] {
        let why = explain(&b, &group, entity);
        assert!(why.resolutions.is_empty(), "{entity}: {why:?}");
        assert!(why.state.is_some(), "{entity}'s winner is kept");
    }
}

#[test]
fn rocksdb_expired_records_are_purged_and_the_winner_stays() {
    expired_records_are_purged_and_the_winner_stays(Rocks::new());
}

#[test]
fn postgres_expired_records_are_purged_and_the_winner_stays() {
    expired_records_are_purged_and_the_winner_stays(Postgres::new());
}
