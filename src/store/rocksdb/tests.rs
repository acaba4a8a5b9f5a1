//! Unit tests of the RocksDB store's own mechanics (the store contract every store keeps is
//! `tests/store_contract.rs`).

use rocksdb::IteratorMode;

use super::keys::{CF_DEDUP, CF_EXPIRY};
use super::*;
use crate::identity::Fingerprint;
use crate::store::EntryStatus;
use crate::store::{Claim, ClaimAhead, Transaction};

fn entry(offset: i64, expires_at_ms: i64) -> DedupEntry {
    DedupEntry {
        status: EntryStatus::Completed,
        fingerprint: Fingerprint::of(Some(b"p")),
        outcome: Some(b"ok".to_vec()),
        topic: "t".into(),
        partition: 0,
        offset,
        created_at_ms: 0,
        expires_at_ms,
    }
}

fn open() -> (tempfile::TempDir, RocksStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open_with(dir.path(), RocksOptions { sync: false }).unwrap();
    (dir, store)
}

/// Partitions 0 and 1 of one topic, acquired.
async fn two_partitions(
    store: &RocksStore,
) -> ((PartitionId, Assignment), (PartitionId, Assignment)) {
    let (p0, p1) = (PartitionId::new("g", "t", 0), PartitionId::new("g", "t", 1));
    let (a0, a1) = (
        store.acquire(&p0).await.unwrap(),
        store.acquire(&p1).await.unwrap(),
    );
    ((p0, a0), (p1, a1))
}

#[tokio::test]
async fn commit_is_all_or_nothing_and_rollback_undoes_one_record() {
    let (_dir, store) = open();
    let p = PartitionId::new("g", "t", 0);
    let a = store.acquire(&p).await.unwrap();
    assert_eq!(
        a,
        Assignment {
            epoch: 1,
            position: None
        }
    );

    let mut tx = store.begin(&p, a.epoch).await.unwrap();
    tx.savepoint().await.unwrap();
    tx.put("balance", b"10".to_vec());
    tx.put_entry(b"k1", &entry(0, i64::MAX)).await.unwrap();
    tx.savepoint().await.unwrap();
    tx.put("balance", b"99".to_vec());
    tx.put_entry(b"k2", &entry(1, i64::MAX)).await.unwrap();
    assert_eq!(tx.get("balance").unwrap().as_deref(), Some(&b"99"[..]));
    tx.rollback_to_savepoint().await.unwrap();
    assert_eq!(
        tx.get("balance").unwrap().as_deref(),
        Some(&b"10"[..]),
        "read your writes after rollback"
    );
    assert!(tx.lookup(b"k2").await.unwrap().is_none());
    assert!(
        tx.lookup(b"k1").await.unwrap().is_some(),
        "sees its own entry"
    );
    assert!(
        store.get(b"balance").unwrap().is_none(),
        "nothing visible before commit"
    );
    tx.commit(2).await.unwrap();

    assert_eq!(store.get(b"balance").unwrap().as_deref(), Some(&b"10"[..]));
    assert!(store.inner.entry(b"k1").unwrap().is_some());
    assert!(store.inner.entry(b"k2").unwrap().is_none());
    assert_eq!(
        store.read_position(&p).unwrap(),
        Some(StoredPosition {
            next_offset: Some(2),
            epoch: 1
        })
    );

    // A dropped transaction writes nothing.
    let mut tx = store.begin(&p, a.epoch).await.unwrap();
    tx.put("balance", b"0".to_vec());
    drop(tx);
    assert_eq!(store.get(b"balance").unwrap().as_deref(), Some(&b"10"[..]));
}

#[tokio::test]
async fn a_claimed_key_is_busy_for_others_until_commit_or_drop() {
    let (_dir, store) = open();
    let ((p0, a0), (p1, a1)) = two_partitions(&store).await;
    let mut first = store.begin(&p0, a0.epoch).await.unwrap();
    let mut second = store.begin(&p1, a1.epoch).await.unwrap();
    assert_eq!(first.claim(b"k", 0).await.unwrap(), Claim::Claimed);
    assert_eq!(
        first.claim(b"k", 0).await.unwrap(),
        Claim::Claimed,
        "re-claim by the owner"
    );
    assert_eq!(second.claim(b"k", 0).await.unwrap(), Claim::Busy);

    // Dropped without commit: the key is free again.
    drop(first);
    assert_eq!(second.claim(b"k", 0).await.unwrap(), Claim::Claimed);
    second.put_entry(b"k", &entry(5, 100)).await.unwrap();
    let mut third = store.begin(&p0, a0.epoch).await.unwrap();
    assert_eq!(third.claim(b"k", 0).await.unwrap(), Claim::Busy);
    second.commit(6).await.unwrap();
    // Committed: the entry answers; once expired, the key can be claimed again.
    assert!(matches!(third.claim(b"k", 0).await.unwrap(), Claim::Existing(e) if e.offset == 5));
    assert_eq!(third.claim(b"k", 100).await.unwrap(), Claim::Claimed);
}

#[tokio::test]
async fn batch_claims_take_free_keys_answer_live_ones_and_leave_busy_ones() {
    let (_dir, store) = open();
    let ((p0, a0), (p1, a1)) = two_partitions(&store).await;
    let mut setup = store.begin(&p0, a0.epoch).await.unwrap();
    setup.put_entry(b"live", &entry(1, 1_000)).await.unwrap();
    setup.put_entry(b"expired", &entry(2, 10)).await.unwrap();
    setup.commit(3).await.unwrap();
    let mut other = store.begin(&p1, a1.epoch).await.unwrap();
    assert_eq!(other.claim(b"held", 50).await.unwrap(), Claim::Claimed);

    let ahead = |key: &'static [u8]| ClaimAhead {
        key,
        fingerprint: Fingerprint::of(Some(b"p")),
        topic: "t",
        partition: 0,
        offset: 0,
        created_at_ms: 50,
        expires_at_ms: 1_000,
    };
    let mut tx = store.begin(&p0, a0.epoch).await.unwrap();
    let keys: [&'static [u8]; 5] = [b"new", b"live", b"expired", b"held", b"new"];
    let claims: Vec<_> = keys.iter().map(|k| ahead(k)).collect();
    tx.prepare_claims(&claims, 50).await.unwrap();
    // Claimed in the table already: another transaction finds them busy.
    let mut third = store.begin(&p1, a1.epoch).await.unwrap();
    assert_eq!(third.claim(b"new", 50).await.unwrap(), Claim::Busy);
    assert_eq!(third.claim(b"expired", 50).await.unwrap(), Claim::Busy);
    drop(third);

    assert_eq!(tx.claim(b"new", 50).await.unwrap(), Claim::Claimed);
    assert!(matches!(tx.claim(b"live", 50).await.unwrap(), Claim::Existing(e) if e.offset == 1));
    // Claimed again in the same batch (the entry read ahead was taken by the first claim):
    // the same answer, read again.
    assert!(matches!(tx.claim(b"live", 50).await.unwrap(), Claim::Existing(e) if e.offset == 1));
    assert_eq!(tx.claim(b"expired", 50).await.unwrap(), Claim::Claimed);
    assert_eq!(tx.claim(b"held", 50).await.unwrap(), Claim::Busy);
    drop(other);
    assert_eq!(tx.claim(b"held", 50).await.unwrap(), Claim::Claimed);
    // Dropped: every key it claimed is free again.
    drop(tx);
    let mut last = store.begin(&p1, a1.epoch).await.unwrap();
    for key in [&b"new"[..], b"expired", b"held"] {
        assert_eq!(last.claim(key, 50).await.unwrap(), Claim::Claimed);
    }
}

#[tokio::test]
async fn state_keys_are_locked_until_commit() {
    let (_dir, store) = open();
    let ((p0, a0), (p1, a1)) = two_partitions(&store).await;
    let mut first = store.begin(&p0, a0.epoch).await.unwrap();
    let mut second = store.begin(&p1, a1.epoch).await.unwrap();
    first.savepoint().await.unwrap();
    assert_eq!(first.get("acct").unwrap(), None);
    first.put("acct", b"1".to_vec());
    second.savepoint().await.unwrap();
    assert!(matches!(
        second.get("acct"),
        Err(crate::store::StateError::KeyBusy)
    ));
    second.put("acct", b"2".to_vec());
    assert!(
        second.take_conflict(),
        "the runtime learns the record must be handled again"
    );
    assert!(!second.take_conflict());
    first.commit(1).await.unwrap();
    second.savepoint().await.unwrap();
    assert_eq!(second.get("acct").unwrap().as_deref(), Some(&b"1"[..]));
    second.put("acct", b"3".to_vec());
    assert!(!second.take_conflict());
    second.commit(1).await.unwrap();
    assert_eq!(store.get(b"acct").unwrap().as_deref(), Some(&b"3"[..]));
}

#[tokio::test]
async fn stale_epoch_commit_is_fenced_and_writes_nothing() {
    let (_dir, store) = open();
    let p = PartitionId::new("g", "t", 3);
    let old = store.acquire(&p).await.unwrap();
    let mut zombie = store.begin(&p, old.epoch).await.unwrap();
    zombie.put("x", b"zombie".to_vec());
    let new = store.acquire(&p).await.unwrap();
    assert_eq!(new.epoch, old.epoch + 1);
    let err = zombie.commit(10).await.unwrap_err();
    assert!(err.is_fenced(), "{err}");
    assert!(store.get(b"x").unwrap().is_none());
    assert_eq!(store.read_position(&p).unwrap().unwrap().next_offset, None);
}

#[tokio::test]
async fn positions_and_epochs_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = PartitionId::new("g", "t", 1);
    {
        let store = RocksStore::open(dir.path()).unwrap();
        let a = store.acquire(&p).await.unwrap();
        store
            .begin(&p, a.epoch)
            .await
            .unwrap()
            .commit(7)
            .await
            .unwrap();
    }
    let store = RocksStore::open(dir.path()).unwrap();
    let a = store.acquire(&p).await.unwrap();
    assert_eq!(
        a,
        Assignment {
            epoch: 2,
            position: Some(7)
        }
    );
}

#[tokio::test]
async fn purge_removes_only_expired_entries_in_bounded_rounds() {
    let (_dir, store) = open();
    let p = PartitionId::new("g", "t", 0);
    let a = store.acquire(&p).await.unwrap();
    let mut tx = store.begin(&p, a.epoch).await.unwrap();
    for i in 0..5 {
        tx.put_entry(format!("old{i}").as_bytes(), &entry(i, 1_000 + i))
            .await
            .unwrap();
    }
    tx.put_entry(b"young", &entry(9, 5_000)).await.unwrap();
    // A key expired and admitted again keeps its new entry.
    tx.put_entry(b"again", &entry(10, 500)).await.unwrap();
    tx.commit(11).await.unwrap();
    let mut tx = store.begin(&p, a.epoch).await.unwrap();
    tx.put_entry(b"again", &entry(12, 9_000)).await.unwrap();
    tx.commit(13).await.unwrap();

    assert_eq!(
        store.purge_expired("g", 2_000, 3).await.unwrap(),
        2,
        "bounded: 3 index rows, one stale"
    );
    assert_eq!(store.purge_expired("g", 2_000, 100).await.unwrap(), 3);
    assert_eq!(store.purge_expired("g", 2_000, 100).await.unwrap(), 0);
    for i in 0..5 {
        assert!(
            store
                .inner
                .entry(format!("old{i}").as_bytes())
                .unwrap()
                .is_none()
        );
    }
    assert!(
        store.inner.entry(b"young").unwrap().is_some(),
        "inside the window: kept"
    );
    assert_eq!(store.inner.entry(b"again").unwrap().unwrap().offset, 12);
    assert_eq!(store.purge_expired("g", i64::MAX, 100).await.unwrap(), 2);
}

fn index_rows(store: &RocksStore) -> usize {
    let inner = &store.inner;
    inner
        .db
        .iterator_cf(inner.cf(CF_EXPIRY), IteratorMode::Start)
        .count()
}

#[tokio::test]
async fn one_index_row_per_commit_and_expiry_and_the_purge_keeps_its_bound() {
    let (_dir, store) = open();
    let p = PartitionId::new("g", "t", 0);
    let a = store.acquire(&p).await.unwrap();
    let mut tx = store.begin(&p, a.epoch).await.unwrap();
    for i in 0..4 {
        tx.put_entry(format!("k{i}").as_bytes(), &entry(i, 1_000))
            .await
            .unwrap();
    }
    tx.put_entry(b"later", &entry(4, 3_000)).await.unwrap();
    // Undone: not in the index.
    tx.savepoint().await.unwrap();
    tx.put_entry(b"undone", &entry(5, 1_000)).await.unwrap();
    tx.rollback_to_savepoint().await.unwrap();
    tx.commit(5).await.unwrap();
    // The next commit, same expiry time: a row of its own, not a replacement.
    let mut tx = store.begin(&p, a.epoch).await.unwrap();
    for i in 0..2 {
        tx.put_entry(format!("m{i}").as_bytes(), &entry(5 + i, 1_000))
            .await
            .unwrap();
    }
    tx.commit(7).await.unwrap();
    // A row of the earlier layout (time ‖ key, empty value) is still purged.
    let inner = &store.inner;
    let mut legacy = ((1_500u64) ^ (1 << 63)).to_be_bytes().to_vec();
    legacy.extend_from_slice(b"legacy");
    inner
        .db
        .put_cf(inner.cf(CF_DEDUP), b"legacy", entry(6, 1_500).encode())
        .unwrap();
    inner.db.put_cf(inner.cf(CF_EXPIRY), &legacy, []).unwrap();

    assert_eq!(
        index_rows(&store),
        4,
        "two rows for the first commit (two expiry times), one for the second, the legacy row"
    );
    assert_eq!(
        store.purge_expired("g", 2_000, 3).await.unwrap(),
        3,
        "bounded: a row is cut short"
    );
    assert!(store.inner.entry(b"k2").unwrap().is_none());
    assert!(
        store.inner.entry(b"k3").unwrap().is_some(),
        "left in its row for the next round"
    );
    assert_eq!(index_rows(&store), 4, "the cut row keeps the rest");
    assert_eq!(store.purge_expired("g", 2_000, 3).await.unwrap(), 3);
    assert!(store.inner.entry(b"k3").unwrap().is_none());
    assert!(store.inner.entry(b"m1").unwrap().is_none());
    assert!(
        store.inner.entry(b"legacy").unwrap().is_some(),
        "after the limit"
    );
    assert_eq!(store.purge_expired("g", 2_000, 10).await.unwrap(), 1);
    assert!(store.inner.entry(b"legacy").unwrap().is_none());
    assert!(store.inner.entry(b"later").unwrap().is_some());
    assert_eq!(store.purge_expired("g", 2_000, 10).await.unwrap(), 0);
    assert_eq!(store.purge_expired("g", 5_000, 10).await.unwrap(), 1);
    assert_eq!(index_rows(&store), 0);
}
