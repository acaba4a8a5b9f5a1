//! The store hooks the resolver stands on, on both stores: an entity is locked like a claim
//! (another transaction does not get it until the holder commits, and then reads the holder's
//! winner, or is dropped, and then finds the entity new); a batch sees its own entity writes,
//! nothing is visible outside before its commit, and a rollback to a savepoint undoes them; a
//! fenced batch writes neither the entity nor its resolution record.

use std::time::Duration;

use super::Resolving;
use super::common::backend::{Postgres, Rocks, block_on};
use idempotent_consumer::resolve::{
    Candidate, Entities, EntityLock, EntityState, Order, Resolution, ResolutionOutcome,
};
use idempotent_consumer::{PartitionId, Store, Transaction};

const GROUP: &str = "g";

/// An expiry far ahead (the year 2096).
const FAR: i64 = 4_000_000_000_000;

/// What a transaction that wants an entity another one holds sees.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Contention {
    /// [`EntityLock::Busy`] at once (RocksDB's key table).
    Busy,
    /// A wait until the holder ends (PostgreSQL's row locks).
    Wait,
}

enum Contended<T> {
    Busy(T),
    Waiting(tokio::task::JoinHandle<(T, EntityLock)>),
}

/// Locks `entity` in `tx`, which must not get it while another transaction holds it, and must
/// be kept from it the store's way.
async fn contend<T: Transaction>(
    mut tx: T,
    entity: &'static str,
    expect: Contention,
) -> Contended<T> {
    let lock = tokio::spawn(async move {
        let lock = tx.lock_entity(entity).await.unwrap();
        (tx, lock)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    if !lock.is_finished() {
        assert_eq!(expect, Contention::Wait, "{entity}: waited instead of busy");
        return Contended::Waiting(lock);
    }
    let (tx, lock) = lock.await.unwrap();
    assert_eq!(
        lock,
        EntityLock::Busy,
        "an entity another transaction holds is not free"
    );
    assert_eq!(expect, Contention::Busy, "{entity}: busy instead of a wait");
    Contended::Busy(tx)
}

/// The lock's answer once the holder ended.
async fn settle<T: Transaction>(contended: Contended<T>, entity: &str) -> (T, EntityLock) {
    match contended {
        Contended::Busy(mut tx) => {
            let lock = tx.lock_entity(entity).await.unwrap();
            (tx, lock)
        }
        Contended::Waiting(lock) => tokio::time::timeout(Duration::from_secs(30), lock)
            .await
            .expect("the waiting lock ends once the holder ends")
            .unwrap(),
    }
}

fn candidate(key: &str, offset: i64, sequence: u64) -> Candidate {
    Candidate {
        key: key.into(),
        topic: "t".into(),
        partition: 0,
        offset,
        logged_at_ms: Some(1_000 + offset),
        order: Order {
            sequence: Some(sequence),
            ..Order::default()
        },
    }
}

fn state(entity: &str, winner: Candidate, resolutions: u64) -> EntityState {
    EntityState {
        entity: entity.into(),
        winner: Some(winner),
        resolutions,
        decisions: resolutions + 1,
    }
}

fn stale(entity: &str, seq: u64, candidate: Candidate, winner: Candidate) -> Resolution {
    Resolution {
        entity: entity.into(),
        seq,
        outcome: ResolutionOutcome::Stale,
        rule: "sequence-guard".into(),
        rule_version: 1,
        reason: "older sequence".into(),
        compared: Vec::new(),
        candidate,
        previous_winner: Some(winner.clone()),
        winner: Some(winner),
        decided_at_ms: 1_000,
    }
}

async fn acquired<S: Store>(store: &S, partition: i32) -> (PartitionId, u64) {
    let id = PartitionId::new(GROUP, "t", partition);
    let epoch = store.acquire(&id).await.unwrap().epoch;
    (id, epoch)
}

/// `Transaction::lock_entity`, `put_entity`, `put_resolution`: the lock is held until the
/// holder commits or is dropped; writes are seen by their batch alone, undone by a rollback to
/// a savepoint, and read by the next holder once committed.
async fn an_entity_is_locked_like_a_claim<B: Resolving>(b: &B, expect: Contention) {
    let store = b.open_async().await;
    let (p0, e0) = acquired(&store, 0).await;
    let (p1, e1) = acquired(&store, 1).await;

    let mut first = store.begin(&p0, e0).await.unwrap();
    assert_eq!(
        first.lock_entity("e").await.unwrap(),
        EntityLock::Held(None)
    );
    assert_eq!(
        first.lock_entity("e").await.unwrap(),
        EntityLock::Held(None),
        "the holder's own entity"
    );
    let second = contend(store.begin(&p1, e1).await.unwrap(), "e", expect).await;
    drop(first);
    let (mut second, lock) = settle(second, "e").await;
    assert_eq!(
        lock,
        EntityLock::Held(None),
        "dropped without a commit: new"
    );

    // Undone by a rollback to the savepoint before them.
    second.savepoint().await.unwrap();
    let early = candidate("k1", 1, 1);
    second
        .put_entity(&state("e", early.clone(), 0))
        .await
        .unwrap();
    second.rollback_to_savepoint().await.unwrap();
    assert_eq!(
        second.lock_entity("e").await.unwrap(),
        EntityLock::Held(None),
        "rolled back"
    );

    // Seen by their batch, by no one else before the commit, by the next holder after it.
    second.savepoint().await.unwrap();
    let winner = candidate("k5", 5, 5);
    let written = state("e", winner.clone(), 1);
    let record = stale("e", 0, candidate("k3", 6, 3), winner);
    second.put_entity(&written).await.unwrap();
    second.put_resolution(&record, FAR).await.unwrap();
    assert_eq!(
        second.lock_entity("e").await.unwrap(),
        EntityLock::Held(Some(written.clone())),
        "the batch's own write"
    );
    let third = contend(store.begin(&p0, e0).await.unwrap(), "e", expect).await;
    assert_eq!(
        store.entity(GROUP, "e").await.unwrap(),
        None,
        "not before the commit"
    );
    assert!(store.resolutions(GROUP, "e", 10).await.unwrap().is_empty());
    second.commit(7).await.unwrap();
    let (third, lock) = settle(third, "e").await;
    assert_eq!(
        lock,
        EntityLock::Held(Some(written.clone())),
        "committed: the winner"
    );
    // An entity already stored is locked the same way.
    let fourth = contend(store.begin(&p1, e1).await.unwrap(), "e", expect).await;
    drop(third);
    let (fourth, lock) = settle(fourth, "e").await;
    assert_eq!(
        lock,
        EntityLock::Held(Some(written.clone())),
        "dropped: as committed"
    );
    drop(fourth);
    assert_eq!(store.entity(GROUP, "e").await.unwrap(), Some(written));
    assert_eq!(
        store.resolutions(GROUP, "e", 10).await.unwrap(),
        vec![record]
    );
}

/// A batch fenced by a new owner writes neither its entities nor its resolution records, and
/// holds nothing once its commit failed.
async fn a_fenced_batch_writes_no_entity_and_no_record<B: Resolving>(b: &B) {
    let store = b.open_async().await;
    let (p, old) = acquired(&store, 3).await;
    let mut zombie = store.begin(&p, old).await.unwrap();
    assert_eq!(
        zombie.lock_entity("z").await.unwrap(),
        EntityLock::Held(None)
    );
    let winner = candidate("k9", 9, 9);
    zombie
        .put_entity(&state("z", winner.clone(), 1))
        .await
        .unwrap();
    zombie
        .put_resolution(&stale("z", 0, candidate("k2", 10, 2), winner), FAR)
        .await
        .unwrap();

    let new = store.acquire(&p).await.unwrap().epoch;
    let err = zombie.commit(11).await.unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert_eq!(store.entity(GROUP, "z").await.unwrap(), None);
    assert!(store.resolutions(GROUP, "z", 10).await.unwrap().is_empty());
    let mut owner = store.begin(&p, new).await.unwrap();
    assert_eq!(
        owner.lock_entity("z").await.unwrap(),
        EntityLock::Held(None),
        "free, and new"
    );
}

#[test]
fn rocksdb_an_entity_is_locked_like_a_claim() {
    block_on(an_entity_is_locked_like_a_claim(
        &Rocks::new(),
        Contention::Busy,
    ));
}

#[test]
fn postgres_an_entity_is_locked_like_a_claim() {
    block_on(an_entity_is_locked_like_a_claim(
        &Postgres::new(),
        Contention::Wait,
    ));
}

#[test]
fn rocksdb_a_fenced_batch_writes_no_entity_and_no_record() {
    block_on(a_fenced_batch_writes_no_entity_and_no_record(&Rocks::new()));
}

#[test]
fn postgres_a_fenced_batch_writes_no_entity_and_no_record() {
    block_on(a_fenced_batch_writes_no_entity_and_no_record(
        &Postgres::new(),
    ));
}
