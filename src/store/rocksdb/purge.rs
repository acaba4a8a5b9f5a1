//! Retention for the RocksDB store: expired entries removed in bounded rounds.
//!
//! The purge walks the `expiry` index in time order (one row per commit and expiry time, see
//! `keys.rs`), deletes each listed entry whose *current* expiry is the row's (a key admitted
//! again since keeps its new entry) and examines at most `limit` keys a round: a row cut short
//! keeps the keys left for the next round. A round holds the purge gate exclusively, so it never
//! deletes an entry that a concurrent commit is rewriting.

use rocksdb::{IteratorMode, WriteBatch};

use super::keys::{CF_DEDUP, CF_EXPIRY, expiry_of, group_of_row, indexed_keys};
use super::{Inner, rocks};
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
    if !batch.is_empty() {
        inner
            .db
            .write_opt(batch, &inner.write_opts)
            .map_err(rocks("purging expired entries"))?;
    }
    Ok(purged)
}
