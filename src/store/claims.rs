//! The table of keys held by in-flight transactions, for stores whose database cannot hold an
//! uncommitted claim itself (RocksDB, memory). PostgreSQL holds claims as uncommitted rows and
//! needs none of this.
//!
//! A transaction enters each key it claims (or, for state locks, touches) in a [`KeyTable`]
//! shared by the store, and remembers it in its own [`Holds`]; dropping the `Holds` releases
//! every key it entered. A store keeps the rule that makes claims safe: a committing
//! transaction makes its entries visible *before* it drops its `Holds`, and a claimer reads the
//! entry *while* it holds the table's lock, so a key is either busy or its entry is visible.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Why a read of the handler's state ([`RocksTx::get`](crate::RocksTx::get),
/// [`MemoryTx::get`](crate::MemoryTx::get)) did not return the key's value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Another in-flight batch (another partition's) holds the key. The runtime rolls the
    /// record back and handles it again once that batch has committed; a handler only needs to
    /// return the error (any class will do).
    #[error("state key is held by another in-flight batch; the record will be handled again")]
    KeyBusy,
    /// The store failed to read.
    #[error(transparent)]
    Store(#[from] crate::Error),
}

/// A key shared by a transaction's writes, its undo log and a key table: allocated once.
pub(crate) type Key = Arc<[u8]>;

/// Keys held by in-flight transactions, each with its holder's id.
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    /// Each held key's holder: its id and who it is (for a warning about a long wait).
    held: Mutex<foldhash::HashMap<Key, (u64, Arc<str>)>>,
    next_holder: AtomicU64,
}

impl KeyTable {
    /// A new, empty table, shared by the store and the `Holds` of its transactions.
    pub(crate) fn shared() -> Arc<KeyTable> {
        Arc::default()
    }

    /// Locks the table: what a claim checks and takes under one lock.
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked(self.held.lock().expect("key table poisoned"))
    }
}

/// The locked table.
pub(crate) struct Locked<'a>(MutexGuard<'a, foldhash::HashMap<Key, (u64, Arc<str>)>>);

impl Locked<'_> {
    /// True when some transaction other than the one of `holds` holds `key`.
    pub(crate) fn held_by_other(&self, holds: &Holds, key: &[u8]) -> bool {
        self.0
            .get(key)
            .is_some_and(|(holder, _)| *holder != holds.id)
    }

    /// True when any transaction holds `key`.
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn is_held(&self, key: &[u8]) -> bool {
        self.0.contains_key(key)
    }

    /// Enters `key` for the transaction of `holds`; returns the key, allocated once for both.
    pub(crate) fn hold(&mut self, holds: &mut Holds, key: &[u8]) -> Key {
        let key = Key::from(key);
        self.0.insert(key.clone(), (holds.id, holds.name.clone()));
        holds.keys.insert(key.clone());
        key
    }
}

/// The keys one transaction holds in one table; released when dropped.
/// How a waiter's warning names the transaction holding a key: its partition and epoch.
pub(crate) fn holder_name(partition: &crate::store::PartitionId, epoch: u64) -> String {
    format!(
        "{}/{} (epoch {epoch})",
        partition.topic, partition.partition
    )
}

#[derive(Debug)]
pub(crate) struct Holds {
    table: Arc<KeyTable>,
    id: u64,
    /// Who holds these keys (a partition and epoch), as another waiter's warning names it.
    name: Arc<str>,
    keys: foldhash::HashSet<Key>,
}

impl Holds {
    /// A new holder of keys in `table`, with an id of its own.
    pub(crate) fn new(table: &Arc<KeyTable>, name: impl Into<Arc<str>>) -> Holds {
        Holds {
            id: table.next_holder.fetch_add(1, Ordering::Relaxed),
            table: table.clone(),
            name: name.into(),
            keys: foldhash::HashSet::default(),
        }
    }

    /// Who else holds `key`, if anyone.
    pub(crate) fn other_holder(&self, key: &[u8]) -> Option<Arc<str>> {
        let table = self.table.lock();
        table
            .0
            .get(key)
            .filter(|(holder, _)| *holder != self.id)
            .map(|(_, name)| name.clone())
    }

    /// Holds `key` unless another transaction does: the held key (allocated once, shared
    /// with the transaction's writes), or `None` when it is another's. What a store's lock of
    /// a key of the handler's state is, no-wait.
    pub(crate) fn try_hold(&mut self, key: &[u8]) -> Option<Key> {
        if let Some(held) = self.keys.get(key) {
            return Some(held.clone());
        }
        let table = self.table.clone();
        let mut locked = table.lock();
        if locked.held_by_other(self, key) {
            return None;
        }
        Some(locked.hold(self, key))
    }

    /// The held key equal to `key`, to share its allocation.
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn get(&self, key: &[u8]) -> Option<&Key> {
        self.keys.get(key)
    }

    /// True when this transaction holds `key`.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.keys.contains(key)
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut table = self.table.lock();
        for key in self.keys.drain() {
            if table
                .0
                .get(&key)
                .is_some_and(|(holder, _)| *holder == self.id)
            {
                table.0.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_holder_is_named() {
        let table = KeyTable::shared();
        let (mut one, two) = (
            Holds::new(&table, "t/0 (epoch 3)"),
            Holds::new(&table, "t/1"),
        );
        table.lock().hold(&mut one, b"k");
        assert_eq!(two.other_holder(b"k").as_deref(), Some("t/0 (epoch 3)"));
        assert_eq!(one.other_holder(b"k"), None, "its own key");
        assert_eq!(two.other_holder(b"free"), None);
    }

    #[test]
    fn a_key_is_held_until_its_holder_is_dropped() {
        let table = KeyTable::shared();
        let (mut one, two) = (Holds::new(&table, "one"), Holds::new(&table, "two"));
        table.lock().hold(&mut one, b"k");
        assert!(one.contains(b"k"));
        assert!(table.lock().held_by_other(&two, b"k"));
        assert!(!table.lock().held_by_other(&one, b"k"), "its own key");
        drop(one);
        assert!(!table.lock().is_held(b"k"), "released on drop");
        drop(two);
    }
}
