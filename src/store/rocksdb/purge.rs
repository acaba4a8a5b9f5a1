//! Retention for the RocksDB store: expired entries, and dead letters past the dead-letter
//! retention, removed in bounded rounds.
//!
//! The purge walks the `expiry` index in time order (one row per commit and expiry time, see
//! `keys.rs`), deletes each listed entry whose *current* expiry is the row's (a key admitted
//! again since keeps its new entry) and examines at most `limit` keys a round: a row cut short
//! keeps the keys left for the next round. A round holds the purge gate exclusively, so it never
//! deletes an entry that a concurrent commit is rewriting.

use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::keys::{CF_DEAD_LETTERS, CF_DEDUP, CF_EXPIRY, expiry_of, group_of_row, indexed_keys};
use super::{Inner, rocks};
use crate::dead_letter::DeadLetter;
use crate::error::Result;
use crate::store::entry::{DedupEntry, put_bytes};

/// Deletes at most `limit` of `group`'s expired entries (at `now_ms`); returns how many. Index
/// rows of other groups are passed over.
pub(super) fn purge_expired(
    inner: &Inner,
    group: &str,
    now_ms: i64,
    limit: usize,
) -> Result<usize> {
    purge_expired_with(inner, group, now_ms, limit, |_, _| {})
}

/// [`purge_expired`], with `also` adding to the round's write what goes with it (an audit
/// record, given the count).
pub(super) fn purge_expired_with(
    inner: &Inner,
    group: &str,
    now_ms: i64,
    limit: usize,
    also: impl FnOnce(&mut WriteBatch, usize),
) -> Result<usize> {
    let _exclusive = inner.purge_gate.write().expect("purge gate poisoned");
    let mut batch = WriteBatch::default();
    let (mut examined, mut purged) = (0, 0);
    let index = inner
        .db
        .iterator_cf(inner.cf(CF_EXPIRY), IteratorMode::Start);
    for item in index {
        if examined >= limit {
            break;
        }
        let (index_key, value) = item.map_err(rocks("scanning the expiry index"))?;
        let expires_at = expiry_of(&index_key)?;
        if expires_at > now_ms {
            break;
        }
        if group_of_row(&index_key, &value).is_some_and(|g| g != group.as_bytes()) {
            continue;
        }
        let keys = indexed_keys(&index_key, &value)?;
        // At most `limit` keys a round: a row cut short keeps the keys left for the next.
        let (now, later) = keys.split_at(keys.len().min(limit - examined));
        for key in now {
            // The key may have been admitted again since: only its current entry's own
            // expiry counts.
            if inner.read_entry(key, DedupEntry::encoded_expiry)? == Some(expires_at) {
                batch.delete_cf(inner.cf(CF_DEDUP), key);
                purged += 1;
            }
        }
        examined += now.len();
        if later.is_empty() {
            batch.delete_cf(inner.cf(CF_EXPIRY), &index_key);
        } else {
            let mut rest = Vec::new();
            later.iter().for_each(|key| put_bytes(&mut rest, key));
            batch.put_cf(inner.cf(CF_EXPIRY), &index_key, rest);
        }
    }
    also(&mut batch, purged);
    if !batch.is_empty() {
        inner
            .db
            .write_opt(batch, &inner.write_opts)
            .map_err(rocks("purging expired entries"))?;
    }
    Ok(purged)
}

/// Deletes at most `limit` of `group`'s dead letters that failed before `before_ms`, examining
/// at most `limit` letters and going on at the next call where this one stopped (the group's
/// letters are in partition and offset order, not time order).
pub(super) fn purge_dead_letters(
    inner: &Inner,
    group: &str,
    before_ms: i64,
    limit: usize,
) -> Result<usize> {
    let _exclusive = inner.purge_gate.write().expect("purge gate poisoned");
    let prefix = group_prefix(group);
    let mut cursor = inner.dead_letter_cursor.lock().expect("cursor poisoned");
    let start = cursor
        .get(group)
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .unwrap_or_else(|| prefix.clone());
    let mode = IteratorMode::From(&start, Direction::Forward);
    let mut batch = WriteBatch::default();
    let (mut examined, mut purged) = (0, 0);
    let mut next = None;
    for item in inner.db.iterator_cf(inner.cf(CF_DEAD_LETTERS), mode) {
        let (key, value) = item.map_err(rocks("scanning dead letters"))?;
        if !key.starts_with(&prefix) {
            break;
        }
        if examined >= limit {
            next = Some(key.to_vec());
            break;
        }
        examined += 1;
        if DeadLetter::decode(&value)?.failed_at_ms < before_ms {
            batch.delete_cf(inner.cf(CF_DEAD_LETTERS), &key);
            purged += 1;
        }
    }
    // At the end of the group's letters, the next call starts from the first again.
    match next {
        Some(key) => cursor.insert(group.to_owned(), key),
        None => cursor.remove(group),
    };
    if !batch.is_empty() {
        inner
            .db
            .write_opt(batch, &inner.write_opts)
            .map_err(rocks("purging old dead letters"))?;
    }
    Ok(purged)
}

/// The first bytes of every key of `group` in the partition-keyed column families.
pub(super) fn group_prefix(group: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(4 + group.len());
    prefix.extend_from_slice(&(group.len() as u32).to_be_bytes());
    prefix.extend_from_slice(group.as_bytes());
    prefix
}
