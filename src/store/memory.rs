//! An in-memory store (feature `memory`), to measure and test the runtime without a database.
//!
//! It keeps the full contract of [`Store`]: claims that make a concurrent transaction see
//! [`Claim::Busy`], savepoints, epochs that fence a previous owner, expiry. It keeps nothing
//! across a restart of the process, so it gives no guarantee a real deployment needs: never use
//! it for one. The handler's own state is a key-value map written through [`MemoryTx::put`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use super::claims::{Holds, Key, KeyTable, StateError};
use super::{
    Assignment, Claim, ClaimAhead, EntryKey, Inspect, PartitionId, Store, StoredPosition,
    Transaction,
};
use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};
use crate::store::entry::DedupEntry;

/// The committed entries: a map that keeps each key's hash beside it, so growing it (to
/// millions of entries) does not read every key's bytes again.
type Entries = indexmap::IndexMap<Key, DedupEntry, foldhash::fast::RandomState>;

#[derive(Default)]
struct State {
    entries: Entries,
    positions: HashMap<PartitionId, StoredPosition>,
    /// Each with the group of the partition that kept it.
    dead_letters: Vec<(String, DeadLetter)>,
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Published rows waiting for the relay, and the ones the broker refused, by number
    /// (taken at commit, under this state's lock: the commit order).
    #[cfg(feature = "outbox")]
    outbox: BTreeMap<u64, crate::outbox::OutboxRow>,
    #[cfg(feature = "outbox")]
    outbox_dead: Vec<crate::outbox::OutboxDeadRow>,
    #[cfg(feature = "outbox")]
    outbox_next: u64,
}

impl State {
    /// A partition's position row, created (epoch 0, no offset) when missing.
    fn position_row(&mut self, partition: &PartitionId) -> &mut StoredPosition {
        self.positions
            .entry(partition.clone())
            .or_insert(StoredPosition {
                next_offset: None,
                epoch: 0,
            })
    }
}

/// The in-memory store. Clones share the same state.
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    /// Keys claimed by open transactions. A claim reads the entry while it holds this table's
    /// lock, and a commit writes its entries before it releases its claims.
    claims: Arc<KeyTable>,
    /// Keys of the handler's state locked by open transactions, as the RocksDB store's.
    data_locks: Arc<KeyTable>,
    /// Each store's own: its state is lost with the process, like an instance's directory.
    id: Arc<str>,
    #[cfg(feature = "outbox")]
    relay: Arc<crate::outbox::store::LocalLease>,
    #[cfg(feature = "outbox")]
    written: Arc<tokio::sync::Notify>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            state: Arc::default(),
            claims: KeyTable::shared(),
            data_locks: KeyTable::shared(),
            id: super::new_id().into(),
            #[cfg(feature = "outbox")]
            relay: Arc::default(),
            #[cfg(feature = "outbox")]
            written: Arc::default(),
        }
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("memory store poisoned")
    }

    /// The committed entry of a store key.
    fn committed_entry(&self, key: &[u8]) -> Option<DedupEntry> {
        self.lock().entries.get(key).cloned()
    }

    /// A committed value of the handler's state.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        self.lock().data.get(key.as_ref()).cloned()
    }

    /// How many committed dedup entries it holds.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether it holds no committed dedup entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a write replaced, to undo it back to the last savepoint.
enum Undo {
    Entry(Key, Option<DedupEntry>),
    Data(Vec<u8>, Option<Vec<u8>>),
    DeadLetter,
}

/// A batch's writes, applied under the store's lock at commit.
pub struct MemoryTx {
    store: MemoryStore,
    partition: PartitionId,
    epoch: u64,
    /// Each key shared with the claim table and the undo log.
    entries: foldhash::HashMap<Key, DedupEntry>,
    data: foldhash::HashMap<Vec<u8>, Vec<u8>>,
    dead_letters: Vec<DeadLetter>,
    /// Writes since the last savepoint, newest last.
    undo: Vec<Undo>,
    /// Keys this transaction claimed, released when it is dropped (after its commit's write).
    claimed: Holds,
    /// Keys of the handler's state this transaction holds locked; released when dropped.
    locked: Holds,
    /// Set when the handler touched a state key another transaction holds.
    conflicted: bool,
    #[cfg(feature = "outbox")]
    publications: crate::outbox::Publications,
}

impl fmt::Debug for MemoryTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTx")
            .field("partition", &self.partition)
            .field("epoch", &self.epoch)
            .field(
                "writes",
                &(self.entries.len() + self.data.len() + self.dead_letters.len()),
            )
            .finish_non_exhaustive()
    }
}

impl MemoryTx {
    /// Writes a value of the handler's state, committed with the batch (locking the key like
    /// [`get`](MemoryTx::get); on a busy key the write is dropped and the record is handled
    /// again).
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let key = key.into();
        if self.lock_data(&key).is_ok() {
            let previous = self.data.insert(key.clone(), value.into());
            self.undo.push(Undo::Data(key, previous));
        }
    }

    /// Reads a value of the handler's state, this batch's writes included.
    ///
    /// As on the RocksDB store, the key stays locked until the batch commits, so no
    /// concurrent batch (another partition's) can change it in between: read-modify-write is
    /// safe. If another batch holds it, this returns [`StateError::KeyBusy`]; return any error
    /// from the handler and the runtime handles the record again once that batch has
    /// committed.
    pub fn get(
        &mut self,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<Option<Vec<u8>>, StateError> {
        let key = key.as_ref();
        self.lock_data(key)?;
        Ok(match self.data.get(key) {
            Some(value) => Some(value.clone()),
            None => self.store.get(key),
        })
    }

    /// Locks a key of the handler's state for the rest of the transaction (no-wait: a key held
    /// by another transaction marks this one conflicted).
    fn lock_data(&mut self, key: &[u8]) -> std::result::Result<(), StateError> {
        match self.locked.try_hold(key) {
            Some(_) => Ok(()),
            None => {
                self.conflicted = true;
                Err(StateError::KeyBusy)
            }
        }
    }
}

impl Store for MemoryStore {
    type Tx = MemoryTx;

    async fn acquire(&self, partition: &PartitionId) -> Result<Assignment> {
        let mut state = self.lock();
        let row = state.position_row(partition);
        row.epoch += 1;
        Ok(Assignment {
            epoch: row.epoch,
            position: row.next_offset,
        })
    }

    async fn begin(&self, partition: &PartitionId, epoch: u64) -> Result<MemoryTx> {
        let holder: Arc<str> = super::claims::holder_name(partition, epoch).into();
        Ok(MemoryTx {
            store: self.clone(),
            partition: partition.clone(),
            epoch,
            entries: foldhash::HashMap::default(),
            data: foldhash::HashMap::default(),
            dead_letters: Vec::new(),
            undo: Vec::new(),
            claimed: Holds::new(&self.claims, holder.clone()),
            locked: Holds::new(&self.data_locks, holder),
            conflicted: false,
            #[cfg(feature = "outbox")]
            publications: Default::default(),
        })
    }

    async fn purge_expired(&self, group: &str, now_ms: i64, limit: usize) -> Result<usize> {
        let mut state = self.lock();
        let expired: Vec<Key> = state
            .entries
            .iter()
            // A key that is not a scoped store key names no group: any group's purge takes it.
            .filter(|(k, e)| {
                e.is_expired(now_ms) && group_of(k).is_none_or(|g| g == group.as_bytes())
            })
            .map(|(k, _)| k.clone())
            .take(limit)
            .collect();
        for key in &expired {
            state.entries.swap_remove(key);
        }
        Ok(expired.len())
    }

    async fn purge_dead_letters(
        &self,
        group: &str,
        now_ms: i64,
        retention: std::time::Duration,
        limit: usize,
    ) -> Result<usize> {
        let before = crate::store::retention_cutoff(now_ms, retention);
        let mut state = self.lock();
        let mut purged = 0;
        state.dead_letters.retain(|(g, letter)| {
            let old = g == group && letter.failed_at_ms < before && purged < limit;
            purged += usize::from(old);
            !old
        });
        Ok(purged)
    }

    async fn entry_count(&self) -> Result<u64> {
        Ok(self.len() as u64)
    }

    fn store_id(&self) -> Option<&str> {
        Some(&self.id)
    }
}

impl Transaction for MemoryTx {
    fn busy_holder(&self, store_key: &[u8]) -> Option<String> {
        self.claimed.other_holder(store_key).map(|h| h.to_string())
    }

    async fn lookup(&mut self, key: &[u8]) -> Result<Option<DedupEntry>> {
        Ok(match self.entries.get(key) {
            Some(entry) => Some(entry.clone()),
            None => self.store.committed_entry(key),
        })
    }

    async fn claim(&mut self, key: &[u8], now_ms: i64) -> Result<Claim> {
        let live = |e: DedupEntry| (!e.is_expired(now_ms)).then_some(e);
        if let Some(entry) = self.entries.get(key) {
            return Ok(live(entry.clone()).map_or(Claim::Claimed, Claim::Existing));
        }
        if self.claimed.contains(key) {
            return Ok(Claim::Claimed);
        }
        let claims = self.store.claims.clone();
        let mut table = claims.lock();
        if table.held_by_other(&self.claimed, key) {
            return Ok(Claim::Busy);
        }
        // Read under the table's lock: a key is either busy here or its entry is visible.
        if let Some(entry) = self.store.committed_entry(key).and_then(live) {
            return Ok(Claim::Existing(entry));
        }
        table.hold(&mut self.claimed, key);
        Ok(Claim::Claimed)
    }

    /// Claims the batch's free keys under one lock of the claim table and of the state; keys
    /// with a live entry or held by another transaction are left for `claim` to answer.
    async fn prepare_claims(&mut self, claims: &[ClaimAhead<'_>], now_ms: i64) -> Result<()> {
        self.entries.reserve(claims.len());
        let table = self.store.claims.clone();
        let mut table = table.lock();
        // Under the table's lock, as in `claim`: a key is either busy or its entry visible.
        let state = self.store.lock();
        for claim in claims {
            let (key, claimed) = (claim.key, &mut self.claimed);
            let live = |e: &DedupEntry| !e.is_expired(now_ms);
            if claimed.contains(key)
                || table.is_held(key)
                || state.entries.get(key).is_some_and(live)
            {
                continue;
            }
            table.hold(claimed, key);
        }
        Ok(())
    }

    fn take_conflict(&mut self) -> bool {
        std::mem::take(&mut self.conflicted)
    }

    #[cfg(feature = "outbox")]
    fn begin_record(&mut self, store_key: &[u8], record: &crate::Record) {
        self.publications.begin_record(store_key, record);
    }

    async fn savepoint(&mut self) -> Result<()> {
        #[cfg(feature = "outbox")]
        self.publications.savepoint();
        self.conflicted = false;
        // A rollback only returns to the last savepoint.
        self.undo.clear();
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> Result<()> {
        #[cfg(feature = "outbox")]
        self.publications.rollback_to_savepoint();
        while let Some(undo) = self.undo.pop() {
            match undo {
                Undo::Entry(key, Some(previous)) => {
                    self.entries.insert(key, previous);
                }
                Undo::Entry(key, None) => {
                    self.entries.remove(&key);
                }
                Undo::Data(key, Some(previous)) => {
                    self.data.insert(key, previous);
                }
                Undo::Data(key, None) => {
                    self.data.remove(&key);
                }
                Undo::DeadLetter => {
                    self.dead_letters.pop();
                }
            }
        }
        Ok(())
    }

    async fn put_entry(&mut self, key: &[u8], entry: &DedupEntry) -> Result<()> {
        let key = self
            .claimed
            .get(key)
            .cloned()
            .unwrap_or_else(|| Key::from(key));
        let previous = self.entries.insert(key.clone(), entry.clone());
        self.undo.push(Undo::Entry(key, previous));
        Ok(())
    }

    async fn put_dead_letter(&mut self, dead_letter: &DeadLetter) -> Result<()> {
        self.dead_letters.push(dead_letter.clone());
        self.undo.push(Undo::DeadLetter);
        Ok(())
    }

    async fn commit(mut self, next_offset: i64) -> Result<()> {
        let store = self.store.clone();
        let mut state = store.lock();
        let current = state.positions.get(&self.partition).map_or(0, |p| p.epoch);
        if current != self.epoch {
            return Err(Error::fenced(&self.partition, self.epoch, current));
        }
        state.entries.extend(self.entries.drain());
        state.data.extend(self.data.drain());
        let group = &self.partition.group;
        state
            .dead_letters
            .extend(self.dead_letters.drain(..).map(|d| (group.clone(), d)));
        state.positions.insert(
            self.partition.clone(),
            StoredPosition {
                next_offset: Some(next_offset),
                epoch: self.epoch,
            },
        );
        #[cfg(feature = "outbox")]
        {
            let rows = self.publications.take();
            if !rows.is_empty() {
                crate::outbox::count_published(rows.len());
                for row in rows {
                    let id = state.outbox_next;
                    state.outbox_next += 1;
                    state.outbox.insert(id, row.into_row(id));
                }
                self.store.written.notify_one();
            }
        }
        // The claims are released when `self` is dropped, after the entries are visible.
        Ok(())
    }
}

impl Inspect for MemoryStore {
    async fn position(&self, partition: &PartitionId) -> Result<Option<StoredPosition>> {
        Ok(self.lock().positions.get(partition).copied())
    }

    /// Keeps the partition's epoch (0 for a partition never acquired).
    async fn set_position(&self, partition: &PartitionId, next_offset: i64) -> Result<()> {
        super::check_position(next_offset)?;
        self.lock().position_row(partition).next_offset = Some(next_offset);
        Ok(())
    }

    async fn positions(&self, group: &str) -> Result<Vec<(PartitionId, StoredPosition)>> {
        let mut out: Vec<(PartitionId, StoredPosition)> = self
            .lock()
            .positions
            .iter()
            .filter(|(p, _)| p.group == group)
            .map(|(p, s)| (p.clone(), *s))
            .collect();
        out.sort_by(|a, b| (&a.0.topic, a.0.partition).cmp(&(&b.0.topic, b.0.partition)));
        Ok(out)
    }

    async fn entry(&self, key: &EntryKey<'_>) -> Result<Option<DedupEntry>> {
        Ok(self.committed_entry(&key.store_key()))
    }

    async fn dead_letters(&self, partition: &PartitionId) -> Result<Vec<DeadLetter>> {
        let mut letters: Vec<DeadLetter> = self
            .lock()
            .dead_letters
            .iter()
            .filter(|(group, d)| {
                *group == partition.group
                    && d.record.topic() == partition.topic
                    && d.record.partition() == partition.partition
            })
            .map(|(_, d)| d.clone())
            .collect();
        letters.sort_by_key(|d| d.record.offset());
        Ok(letters)
    }
}

/// The group of a store key (`Scope::store_key`).
fn group_of(store_key: &[u8]) -> Option<&[u8]> {
    crate::identity::split_store_key(store_key).map(|(group, _, _)| group)
}

#[cfg(feature = "outbox")]
impl crate::outbox::OutboxStore for MemoryStore {
    async fn lease_outbox(
        &self,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<Option<crate::outbox::OutboxLease>> {
        Ok(self.relay.take(owner, lease))
    }

    async fn release_outbox(&self, lease: &crate::outbox::OutboxLease) -> Result<()> {
        self.relay.release(lease);
        Ok(())
    }

    async fn pending_rows(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<crate::outbox::OutboxRow>> {
        let from = after.map_or(0, |a| a.saturating_add(1));
        Ok(self
            .lock()
            .outbox
            .range(from..)
            .take(limit)
            .map(|(_, row)| row.clone())
            .collect())
    }

    async fn mark_sent(&self, lease: &crate::outbox::OutboxLease, ids: &[u64]) -> Result<bool> {
        let done = self.relay.while_held(lease, || {
            let mut state = self.lock();
            for id in ids {
                state.outbox.remove(id);
            }
            Ok(())
        })?;
        Ok(done.is_some())
    }

    async fn mark_dead(
        &self,
        lease: &crate::outbox::OutboxLease,
        id: u64,
        reason: &str,
    ) -> Result<bool> {
        let done = self.relay.while_held(lease, || {
            let mut state = self.lock();
            if let Some(row) = state.outbox.remove(&id) {
                state.outbox_dead.push(crate::outbox::OutboxDeadRow {
                    row,
                    reason: reason.to_owned(),
                    failed_at_ms: super::now_ms(),
                });
            }
            Ok(())
        })?;
        Ok(done.is_some())
    }

    async fn outbox_backlog(&self) -> Result<(u64, Option<i64>)> {
        let state = self.lock();
        let oldest = state.outbox.values().next().map(|r| r.created_at_ms);
        Ok((state.outbox.len() as u64, oldest))
    }

    async fn dead_rows(&self, limit: usize) -> Result<Vec<crate::outbox::OutboxDeadRow>> {
        Ok(self
            .lock()
            .outbox_dead
            .iter()
            .take(limit)
            .cloned()
            .collect())
    }

    fn outbox_written(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.written.clone())
    }
}

/// Publishes through the outbox, committed with this transaction (feature `outbox`).
#[cfg(feature = "outbox")]
impl crate::outbox::Publish for MemoryTx {
    fn publish(
        &mut self,
        publication: crate::outbox::Publication,
    ) -> std::result::Result<String, crate::outbox::PublishError> {
        self.publications.publish(publication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Fingerprint;
    use crate::store::EntryStatus;

    fn entry(offset: i64) -> DedupEntry {
        DedupEntry {
            status: EntryStatus::Completed,
            fingerprint: Fingerprint::of(Some(b"p")),
            outcome: None,
            topic: "t".into(),
            partition: 0,
            offset,
            created_at_ms: 0,
            expires_at_ms: 1_000,
        }
    }

    /// `prepare_claims` keeps the claim's rule: free keys are held at once (busy for others),
    /// live ones answer with their entry, keys another transaction holds are left busy.
    #[tokio::test]
    async fn batch_claims_take_free_keys_answer_live_ones_and_leave_busy_ones() {
        let store = MemoryStore::new();
        let (p0, p1) = (PartitionId::new("g", "t", 0), PartitionId::new("g", "t", 1));
        let (e0, e1) = (
            store.acquire(&p0).await.unwrap().epoch,
            store.acquire(&p1).await.unwrap().epoch,
        );
        let mut setup = store.begin(&p0, e0).await.unwrap();
        setup.put_entry(b"live", &entry(1)).await.unwrap();
        let mut expired = entry(2);
        expired.expires_at_ms = 10;
        setup.put_entry(b"expired", &expired).await.unwrap();
        setup.commit(3).await.unwrap();
        let mut other = store.begin(&p1, e1).await.unwrap();
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
        let mut tx = store.begin(&p0, e0).await.unwrap();
        let keys: [&'static [u8]; 5] = [b"new", b"live", b"expired", b"held", b"new"];
        let claims: Vec<_> = keys.iter().map(|k| ahead(k)).collect();
        tx.prepare_claims(&claims, 50).await.unwrap();
        let mut third = store.begin(&p1, e1).await.unwrap();
        assert_eq!(third.claim(b"new", 50).await.unwrap(), Claim::Busy);
        assert_eq!(third.claim(b"expired", 50).await.unwrap(), Claim::Busy);
        drop(third);

        assert_eq!(tx.claim(b"new", 50).await.unwrap(), Claim::Claimed);
        assert!(
            matches!(tx.claim(b"live", 50).await.unwrap(), Claim::Existing(e) if e.offset == 1)
        );
        assert_eq!(tx.claim(b"expired", 50).await.unwrap(), Claim::Claimed);
        assert_eq!(tx.claim(b"held", 50).await.unwrap(), Claim::Busy);
        drop(other);
        assert_eq!(tx.claim(b"held", 50).await.unwrap(), Claim::Claimed);
        drop(tx);
        let mut last = store.begin(&p1, e1).await.unwrap();
        for key in [&b"new"[..], b"expired", b"held"] {
            assert_eq!(last.claim(key, 50).await.unwrap(), Claim::Claimed);
        }
    }

    #[tokio::test]
    async fn a_state_key_read_stays_locked_until_the_batch_ends() {
        let store = MemoryStore::new();
        let (p, q) = (PartitionId::new("g", "t", 0), PartitionId::new("g", "t", 1));
        let (a, b) = (
            store.acquire(&p).await.unwrap(),
            store.acquire(&q).await.unwrap(),
        );
        let mut one = store.begin(&p, a.epoch).await.unwrap();
        let mut two = store.begin(&q, b.epoch).await.unwrap();
        assert_eq!(one.get("acct").unwrap(), None);
        assert!(matches!(two.get("acct"), Err(StateError::KeyBusy)));
        assert!(two.take_conflict(), "the busy read marks the other batch");
        two.put("acct", "lost");
        assert!(two.take_conflict(), "a write of a busy key is dropped");
        one.put("acct", "10");
        one.commit(1).await.unwrap();
        assert_eq!(two.get("acct").unwrap().as_deref(), Some(&b"10"[..]));
        assert!(!two.take_conflict());
        two.put("acct", "15");
        two.commit(1).await.unwrap();
        assert_eq!(store.get("acct").as_deref(), Some(&b"15"[..]));
    }

    #[tokio::test]
    async fn claims_savepoints_commit_and_fencing() {
        let store = MemoryStore::new();
        let p = PartitionId::new("g", "t", 0);
        let a = store.acquire(&p).await.unwrap();
        let mut one = store.begin(&p, a.epoch).await.unwrap();
        let mut two = store.begin(&p, a.epoch).await.unwrap();
        assert_eq!(one.claim(b"k", 0).await.unwrap(), Claim::Claimed);
        assert_eq!(two.claim(b"k", 0).await.unwrap(), Claim::Busy);
        one.savepoint().await.unwrap();
        one.put("x", "1");
        one.put_entry(b"k", &entry(0)).await.unwrap();
        one.savepoint().await.unwrap();
        one.put("x", "2");
        one.rollback_to_savepoint().await.unwrap();
        assert_eq!(one.get("x").unwrap().as_deref(), Some(&b"1"[..]));
        one.commit(1).await.unwrap();
        assert_eq!(store.get("x").as_deref(), Some(&b"1"[..]));
        assert_eq!(
            store.position(&p).await.unwrap().unwrap().next_offset,
            Some(1)
        );
        assert_eq!(
            two.claim(b"k", 0).await.unwrap(),
            Claim::Existing(entry(0)),
            "the committed entry, not a busy claim"
        );
        // Expired: claimable again, and purged.
        assert_eq!(two.claim(b"k", 5_000).await.unwrap(), Claim::Claimed);
        drop(two);
        let mut three = store.begin(&p, a.epoch).await.unwrap();
        assert_eq!(
            three.claim(b"k", 5_000).await.unwrap(),
            Claim::Claimed,
            "a dropped transaction releases its claims"
        );
        drop(three);
        assert_eq!(store.purge_expired("g", 5_000, 10).await.unwrap(), 1);

        // A newer owner fences the old one's commit; nothing of it is written.
        let mut zombie = store.begin(&p, a.epoch).await.unwrap();
        zombie.put("x", "zombie");
        store.acquire(&p).await.unwrap();
        assert!(zombie.commit(9).await.unwrap_err().is_fenced());
        assert_eq!(store.get("x").as_deref(), Some(&b"1"[..]));
        assert_eq!(
            store.position(&p).await.unwrap().unwrap().next_offset,
            Some(1)
        );
    }
}
