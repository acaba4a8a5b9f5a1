//! The store contract: what every store promises the runtime, written once, generic over the
//! store, and instantiated at the bottom for the in-memory store (feature `memory`), RocksDB, and
//! PostgreSQL (features `postgres` and `testkit`: a database per test on the server named by
//! `DATABASE_URL`). Each test names the guarantee of `Store`/`Transaction` it checks and fails if
//! that guarantee breaks. Writes of the handler's own state go through [`LedgerTx`], which each
//! store implements its own way (a key-value map, RocksDB's data family, a SQL table).

mod common;

use std::time::Duration;

use common::LedgerTx;
use idempotent_consumer::{
    Claim, DeadLetter, DeadLetterReason, DedupEntry, EntryKey, EntryStatus, Fingerprint, Inspect,
    PartitionId, Record, Store, Transaction,
};

/// A store under the contract, opened on the test's runtime.
trait Subject {
    type S: Store<Tx: LedgerTx> + Inspect;
    async fn open(&self) -> Self::S;
}

const GROUP: &str = "g";

/// An expiry far ahead (the year 2096), inside what every store can hold exactly.
const FAR: i64 = 4_000_000_000_000;

fn key(name: &str) -> Vec<u8> {
    EntryKey::new(GROUP, name).store_key()
}

fn entry(offset: i64, expires_at_ms: i64) -> DedupEntry {
    DedupEntry {
        status: EntryStatus::Completed,
        fingerprint: Fingerprint::of(Some(b"payload")),
        outcome: Some(b"receipt".to_vec()),
        topic: "t".into(),
        partition: 0,
        offset,
        created_at_ms: 1,
        expires_at_ms,
    }
}

fn dead_letter(offset: i64) -> DeadLetter {
    DeadLetter {
        record: Record::new("t", 0, offset, None, Some(b"payload".to_vec())),
        key: Some(b"k".to_vec()),
        reason: DeadLetterReason::Permanent,
        message: "refused".into(),
        attempts: 1,
        first_failed_at_ms: 1,
        failed_at_ms: 2,
        batch_id: Some("b1".into()),
    }
}

async fn committed<S: Inspect>(store: &S, name: &str) -> Option<DedupEntry> {
    store.entry(&EntryKey::new(GROUP, name)).await.unwrap()
}

/// Partitions 0 and 1 of topic `t`, acquired, with their epochs.
async fn two_partitions<S: Store>(store: &S) -> [(PartitionId, u64); 2] {
    let mut out = Vec::new();
    for p in 0..2 {
        let id = PartitionId::new(GROUP, "t", p);
        let epoch = store.acquire(&id).await.unwrap().epoch;
        out.push((id, epoch));
    }
    out.try_into().unwrap()
}

/// What a claim of a key held by another transaction did: answered [`Claim::Busy`] at once
/// (stores with a key table), or waits until the holder ends (PostgreSQL's row locks).
enum Contended<T> {
    Busy(T),
    Waiting(tokio::task::JoinHandle<(T, Claim)>),
}

/// Claims `key` in `tx`, which must not get it while another transaction holds it.
async fn contend<T: Transaction>(mut tx: T, key: Vec<u8>) -> Contended<T> {
    let claim = tokio::spawn(async move {
        let claim = tx.claim(&key, 10).await.unwrap();
        (tx, claim)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    if !claim.is_finished() {
        return Contended::Waiting(claim);
    }
    let (tx, claim) = claim.await.unwrap();
    assert_eq!(
        claim,
        Claim::Busy,
        "a key another transaction holds is not free"
    );
    Contended::Busy(tx)
}

/// The claim's answer once the holder ended.
async fn settle<T: Transaction>(contended: Contended<T>, key: &[u8]) -> (T, Claim) {
    match contended {
        Contended::Busy(mut tx) => {
            let claim = tx.claim(key, 10).await.unwrap();
            (tx, claim)
        }
        Contended::Waiting(claim) => tokio::time::timeout(Duration::from_secs(30), claim)
            .await
            .expect("the waiting claim ends once the holder ends")
            .unwrap(),
    }
}

/// `Transaction::claim`: a claimed key is not free for another transaction until the holder
/// commits (the other then sees the entry) or is dropped (the other then gets the key); the
/// holder may claim it again; an expired entry frees its key.
async fn a_claim_holds_the_key_until_commit_or_drop<B: Subject>(b: &B) {
    let store = b.open().await;
    let [(p0, e0), (p1, e1)] = two_partitions(&store).await;
    let k = key("pay-1");

    let mut first = store.begin(&p0, e0).await.unwrap();
    assert_eq!(first.claim(&k, 10).await.unwrap(), Claim::Claimed);
    assert_eq!(
        first.claim(&k, 10).await.unwrap(),
        Claim::Claimed,
        "the holder's own key"
    );
    let second = contend(store.begin(&p1, e1).await.unwrap(), k.clone()).await;
    drop(first);
    let (mut second, claim) = settle(second, &k).await;
    assert_eq!(
        claim,
        Claim::Claimed,
        "dropped without a commit: the key is free"
    );

    second.put_entry(&k, &entry(5, 1_000)).await.unwrap();
    let third = contend(store.begin(&p0, e0).await.unwrap(), k.clone()).await;
    second.commit(6).await.unwrap();
    let (third, claim) = settle(third, &k).await;
    assert_eq!(
        claim,
        Claim::Existing(entry(5, 1_000)),
        "committed: the entry answers"
    );
    drop(third);

    let mut later = store.begin(&p0, e0).await.unwrap();
    assert_eq!(
        later.claim(&k, 1_000).await.unwrap(),
        Claim::Claimed,
        "expired at 1,000: the key is admitted again"
    );
}

/// `Transaction::savepoint` and `rollback_to_savepoint`: a rollback undoes every write since the
/// last savepoint (entries and the handler's state) and keeps what came before.
async fn a_rollback_undoes_the_writes_since_the_savepoint<B: Subject>(b: &B) {
    let store = b.open().await;
    let [(p, epoch), _] = two_partitions(&store).await;
    let mut tx = store.begin(&p, epoch).await.unwrap();
    for name in ["kept", "undone"] {
        assert_eq!(tx.claim(&key(name), 10).await.unwrap(), Claim::Claimed);
    }
    tx.savepoint().await.unwrap();
    tx.put_entry(&key("kept"), &entry(0, FAR)).await.unwrap();
    assert_eq!(tx.add("acct", 10).await.unwrap(), 10);
    tx.savepoint().await.unwrap();
    tx.put_entry(&key("undone"), &entry(1, FAR)).await.unwrap();
    assert_eq!(tx.add("acct", 5).await.unwrap(), 15);
    tx.rollback_to_savepoint().await.unwrap();

    assert_eq!(tx.lookup(&key("undone")).await.unwrap(), None);
    assert!(
        tx.lookup(&key("kept")).await.unwrap().is_some(),
        "before the savepoint: kept"
    );
    assert_eq!(
        tx.add("acct", 0).await.unwrap(),
        10,
        "the state as it was at the savepoint"
    );
    tx.commit(2).await.unwrap();
    assert!(committed(&store, "kept").await.is_some());
    assert_eq!(committed(&store, "undone").await, None);
    let mut tx = store.begin(&p, epoch).await.unwrap();
    assert_eq!(
        tx.add("acct", 0).await.unwrap(),
        10,
        "committed without the undone write"
    );
}

/// `Transaction::lookup` and the handler's reads see the batch's own writes; nothing is visible
/// outside before the commit, and a dropped transaction writes nothing.
async fn a_batch_reads_its_own_writes_and_shows_nothing_before_its_commit<B: Subject>(b: &B) {
    let store = b.open().await;
    let [(p, epoch), _] = two_partitions(&store).await;
    let mut tx = store.begin(&p, epoch).await.unwrap();
    assert_eq!(tx.claim(&key("k"), 10).await.unwrap(), Claim::Claimed);
    tx.put_entry(&key("k"), &entry(0, FAR)).await.unwrap();
    assert_eq!(tx.lookup(&key("k")).await.unwrap(), Some(entry(0, FAR)));
    assert_eq!(tx.add("acct", 3).await.unwrap(), 3);
    assert_eq!(
        tx.add("acct", 4).await.unwrap(),
        7,
        "the first write is seen"
    );
    assert_eq!(
        committed(&store, "k").await,
        None,
        "not visible before the commit"
    );
    assert_eq!(store.position(&p).await.unwrap().unwrap().next_offset, None);
    tx.commit(1).await.unwrap();
    assert_eq!(committed(&store, "k").await, Some(entry(0, FAR)));

    let mut dropped = store.begin(&p, epoch).await.unwrap();
    assert_eq!(
        dropped.claim(&key("gone"), 10).await.unwrap(),
        Claim::Claimed
    );
    dropped
        .put_entry(&key("gone"), &entry(1, FAR))
        .await
        .unwrap();
    dropped.add("acct", 100).await.unwrap();
    dropped.put_dead_letter(&dead_letter(1)).await.unwrap();
    drop(dropped);
    assert_eq!(committed(&store, "gone").await, None);
    assert!(store.dead_letters(&p).await.unwrap().is_empty());
    let mut tx = store.begin(&p, epoch).await.unwrap();
    assert_eq!(
        tx.add("acct", 0).await.unwrap(),
        7,
        "the dropped write never landed"
    );
}

/// `Store::acquire` and `Transaction::commit`: a new owner's acquire fences the previous one,
/// whose commit then fails as fenced and writes nothing (no entry, no state, no dead letter,
/// no position); the new owner commits.
async fn a_fenced_commit_writes_nothing<B: Subject>(b: &B) {
    let store = b.open().await;
    let p = PartitionId::new(GROUP, "t", 3);
    let old = store.acquire(&p).await.unwrap();
    let mut zombie = store.begin(&p, old.epoch).await.unwrap();
    assert_eq!(zombie.claim(&key("z"), 10).await.unwrap(), Claim::Claimed);
    zombie.put_entry(&key("z"), &entry(0, FAR)).await.unwrap();
    zombie.put_dead_letter(&dead_letter(1)).await.unwrap();
    zombie.add("acct", 50).await.unwrap();

    let new = store.acquire(&p).await.unwrap();
    assert!(new.epoch > old.epoch, "{new:?} after {old:?}");
    let err = zombie.commit(10).await.unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert_eq!(committed(&store, "z").await, None);
    assert!(store.dead_letters(&p).await.unwrap().is_empty());
    let position = store.position(&p).await.unwrap().unwrap();
    assert_eq!(position.next_offset, None);
    assert_eq!(position.epoch, new.epoch);

    let mut owner = store.begin(&p, new.epoch).await.unwrap();
    assert_eq!(
        owner.add("acct", 0).await.unwrap(),
        0,
        "the zombie's write never landed"
    );
    assert_eq!(owner.claim(&key("z"), 10).await.unwrap(), Claim::Claimed);
    owner.commit(1).await.unwrap();
    assert_eq!(
        store.position(&p).await.unwrap().unwrap().next_offset,
        Some(1)
    );
}

/// `Store::purge_expired`: at most `limit` entries a round, only entries expired at `now_ms`; an
/// entry inside its window is never purged.
async fn the_purge_is_bounded_and_takes_only_expired_entries<B: Subject>(b: &B) {
    let store = b.open().await;
    let [(p, epoch), _] = two_partitions(&store).await;
    let mut tx = store.begin(&p, epoch).await.unwrap();
    for i in 0..5 {
        let name = format!("old{i}");
        assert_eq!(tx.claim(&key(&name), 10).await.unwrap(), Claim::Claimed);
        tx.put_entry(&key(&name), &entry(i, 1_000 + i))
            .await
            .unwrap();
    }
    assert_eq!(tx.claim(&key("young"), 10).await.unwrap(), Claim::Claimed);
    tx.put_entry(&key("young"), &entry(9, 5_000)).await.unwrap();
    tx.commit(10).await.unwrap();

    assert_eq!(
        store.purge_expired(GROUP, 2_000, 3).await.unwrap(),
        3,
        "bounded"
    );
    assert_eq!(
        store.purge_expired(GROUP, 2_000, 100).await.unwrap(),
        2,
        "the rest"
    );
    assert_eq!(store.purge_expired(GROUP, 2_000, 100).await.unwrap(), 0);
    for i in 0..5 {
        assert_eq!(committed(&store, &format!("old{i}")).await, None);
    }
    assert!(
        committed(&store, "young").await.is_some(),
        "inside its window: kept"
    );
    assert_eq!(store.purge_expired(GROUP, 4_999, 100).await.unwrap(), 0);
    assert_eq!(
        store.purge_expired(GROUP, 5_000, 100).await.unwrap(),
        1,
        "expired at 5,000"
    );
    assert_eq!(committed(&store, "young").await, None);
}

/// `Store::purge_expired` takes only the given group's entries: a store several groups share
/// keeps the others' until their own runtimes purge them.
async fn the_purge_takes_only_its_own_groups_entries<B: Subject>(b: &B) {
    let store = b.open().await;
    let other = PartitionId::new("other-group", "t", 0);

    for p in [PartitionId::new(GROUP, "t", 0), other.clone()] {
        let epoch = store.acquire(&p).await.unwrap().epoch;
        let mut tx = store.begin(&p, epoch).await.unwrap();
        let key = EntryKey::new(&p.group, "old").store_key();
        assert_eq!(tx.claim(&key, 10).await.unwrap(), Claim::Claimed);
        tx.put_entry(&key, &entry(0, 1_000)).await.unwrap();
        tx.commit(1).await.unwrap();
    }
    assert_eq!(store.purge_expired(GROUP, 2_000, 100).await.unwrap(), 1);
    assert_eq!(committed(&store, "old").await, None);
    let theirs = EntryKey::new("other-group", "old");
    assert!(
        store.entry(&theirs).await.unwrap().is_some(),
        "another group's entry purged"
    );
    assert_eq!(
        store
            .purge_expired("other-group", 2_000, 100)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.entry(&theirs).await.unwrap(), None);
}

/// `Store::purge_dead_letters`: only `group`'s letters that failed more than the retention
/// ago, at most `limit` a call; the young ones and another group's stay.
async fn the_dead_letter_purge_takes_only_old_letters_of_its_group<B: Subject>(b: &B) {
    let store = b.open().await;
    let day = 86_400_000;
    let now = 100 * day;
    let other = PartitionId::new("other-group", "t", 0);
    for p in [PartitionId::new(GROUP, "t", 0), other.clone()] {
        let epoch = store.acquire(&p).await.unwrap().epoch;
        let mut tx = store.begin(&p, epoch).await.unwrap();
        for offset in 0..4 {
            // Offsets 0..3 failed 40 days ago, offset 3 one day ago.
            let failed_at_ms = if offset < 3 {
                now - 40 * day
            } else {
                now - day
            };
            let letter = DeadLetter {
                failed_at_ms,
                first_failed_at_ms: failed_at_ms,
                ..dead_letter(offset)
            };
            tx.put_dead_letter(&letter).await.unwrap();
        }
        tx.commit(4).await.unwrap();
    }
    let retention = Duration::from_millis(30 * day as u64);
    let mut purged = store
        .purge_dead_letters(GROUP, now, retention, 2)
        .await
        .unwrap();
    assert!(purged <= 2, "bounded: {purged}");
    for _ in 0..5 {
        purged += store
            .purge_dead_letters(GROUP, now, retention, 2)
            .await
            .unwrap();
    }
    assert_eq!(purged, 3, "the three old letters");
    let left = store
        .dead_letters(&PartitionId::new(GROUP, "t", 0))
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|l| l.record.offset()).collect::<Vec<_>>(),
        [3]
    );
    assert_eq!(
        store.dead_letters(&other).await.unwrap().len(),
        4,
        "another group's"
    );
}

/// `Store::acquire`, `Transaction::commit` and `Inspect::set_position`: the position a commit
/// writes is the one the next acquire returns, with a newer epoch; an operator's new position
/// keeps the epoch and is the next owner's start (on a partition never seen too); a negative
/// one is refused.
async fn positions_round_trip<B: Subject>(b: &B) {
    let store = b.open().await;
    let p = PartitionId::new(GROUP, "t", 1);
    assert_eq!(store.position(&p).await.unwrap(), None, "never acquired");
    let first = store.acquire(&p).await.unwrap();
    assert_eq!(first.position, None);
    let stored = store.position(&p).await.unwrap().unwrap();
    assert_eq!((stored.next_offset, stored.epoch), (None, first.epoch));

    store
        .begin(&p, first.epoch)
        .await
        .unwrap()
        .commit(7)
        .await
        .unwrap();
    let second = store.acquire(&p).await.unwrap();
    assert_eq!(second.position, Some(7));
    assert!(second.epoch > first.epoch);

    let err = store.set_position(&p, -1).await.unwrap_err();
    assert!(err.to_string().contains("negative"), "{err}");
    assert_eq!(
        store.position(&p).await.unwrap().unwrap().next_offset,
        Some(7),
        "unchanged"
    );
    store.set_position(&p, 3).await.unwrap();
    let stored = store.position(&p).await.unwrap().unwrap();
    assert_eq!((stored.next_offset, stored.epoch), (Some(3), second.epoch));
    let third = store.acquire(&p).await.unwrap();
    assert_eq!(third.position, Some(3));
    assert!(third.epoch > second.epoch);

    // An operator's position on a partition the store has never seen (a fresh store that must
    // start somewhere): created, and the first owner starts there.
    let fresh = PartitionId::new(GROUP, "t", 2);
    store.set_position(&fresh, 11).await.unwrap();
    let stored = store.position(&fresh).await.unwrap().unwrap();
    assert_eq!(stored.next_offset, Some(11));
    let first = store.acquire(&fresh).await.unwrap();
    assert_eq!(first.position, Some(11));
    assert!(first.epoch > stored.epoch);
}

/// `Inspect::positions`: every partition of one group the store has a position for, sorted by
/// topic and partition, none of another group's (a group whose name is a prefix of this one's
/// included), and nothing for a group never seen.
async fn a_groups_positions_are_listed_in_order<B: Subject>(b: &B) {
    let store = b.open().await;
    let other = format!("{GROUP}x");
    for p in [
        PartitionId::new(GROUP, "t", 1),
        PartitionId::new(GROUP, "a", 0),
        PartitionId::new(GROUP, "t", 0),
        PartitionId::new(other.as_str(), "t", 0),
    ] {
        store.acquire(&p).await.unwrap();
    }
    store
        .set_position(&PartitionId::new(GROUP, "t", 1), 9)
        .await
        .unwrap();
    let listed = store.positions(GROUP).await.unwrap();
    let names: Vec<(&str, i32, Option<i64>)> = listed
        .iter()
        .map(|(p, s)| (p.topic.as_str(), p.partition, s.next_offset))
        .collect();
    assert_eq!(names, [("a", 0, None), ("t", 0, None), ("t", 1, Some(9))]);
    assert!(listed.iter().all(|(p, s)| p.group == GROUP && s.epoch >= 1));
    assert!(store.positions("never-seen").await.unwrap().is_empty());
}

/// Runs a contract test on a runtime of its own.
fn run<F: Future<Output = ()>>(f: F) {
    common::init_tracing();
    common::backend::block_on(f);
}

impl Subject for common::backend::Rocks {
    type S = idempotent_consumer::RocksStore;
    async fn open(&self) -> Self::S {
        self.store()
    }
}

#[cfg(feature = "memory")]
struct Memory;

#[cfg(feature = "memory")]
impl Subject for Memory {
    type S = idempotent_consumer::MemoryStore;
    async fn open(&self) -> Self::S {
        idempotent_consumer::MemoryStore::new()
    }
}

#[cfg(all(feature = "postgres", feature = "testkit"))]
impl Subject for common::backend::Postgres {
    type S = idempotent_consumer::PgStore;
    async fn open(&self) -> Self::S {
        self.connect().await
    }
}

/// Instantiates every test above once per store.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        #[cfg(feature = "memory")]
        mod memory {
            $(
                #[test]
                fn $name() {
                    super::run(super::$name(&super::Memory));
                }
            )*
        }

        mod rocksdb {
            $(
                #[test]
                fn $name() {
                    super::run(super::$name(&super::common::backend::Rocks::new()));
                }
            )*
        }

        #[cfg(all(feature = "postgres", feature = "testkit"))]
        mod postgres {
            $(
                #[test]
                fn $name() {
                    let pg = super::common::backend::Postgres::new();
                    super::run(super::$name(&pg));
                }
            )*
        }
    };
}

contract!(
    a_claim_holds_the_key_until_commit_or_drop,
    a_rollback_undoes_the_writes_since_the_savepoint,
    a_batch_reads_its_own_writes_and_shows_nothing_before_its_commit,
    a_fenced_commit_writes_nothing,
    the_purge_is_bounded_and_takes_only_expired_entries,
    the_purge_takes_only_its_own_groups_entries,
    the_dead_letter_purge_takes_only_old_letters_of_its_group,
    positions_round_trip,
    a_groups_positions_are_listed_in_order,
);
