//! Entities and resolution records on the RocksDB store (feature `resolve`): reading them from
//! outside the runtime, and the purge of expired records. Transactions write them through their
//! overlay (`tx.rs`), in the batch's one `WriteBatch`.

use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::keys::{CF_ENTITIES, CF_RESOLUTION_EXPIRY, CF_RESOLUTIONS, expiry_of};
use super::{Inner, RocksStore, rocks};
use crate::error::Result;
use crate::resolve::{Entities, EntityState, Resolution, entity_key, resolution_key};

/// Deletes at most `limit` of `group`'s resolution records expired at `now_ms`, walking their
/// index in time order; rows of other groups are passed over. A record is written once (its
/// number is the entity's next), so no commit can be rewriting one the purge deletes.
pub(super) fn purge_resolutions(
    inner: &Inner,
    group: &str,
    now_ms: i64,
    limit: usize,
) -> Result<usize> {
    let prefix = super::purge::group_prefix(group);
    let mut batch = WriteBatch::default();
    let mut purged = 0;
    let index = inner
        .db
        .iterator_cf(inner.cf(CF_RESOLUTION_EXPIRY), IteratorMode::Start);
    for item in index {
        if purged >= limit {
            break;
        }
        let (index_key, _) = item.map_err(rocks("scanning the resolution index"))?;
        if expiry_of(&index_key)? > now_ms {
            break;
        }
        let record_key = &index_key[8..];
        if !record_key.starts_with(&prefix) {
            continue;
        }
        batch.delete_cf(inner.cf(CF_RESOLUTIONS), record_key);
        batch.delete_cf(inner.cf(CF_RESOLUTION_EXPIRY), &index_key);
        purged += 1;
    }
    if !batch.is_empty() {
        inner
            .db
            .write_opt(batch, &inner.write_opts)
            .map_err(rocks("purging resolution records"))?;
    }
    Ok(purged)
}

impl Entities for RocksStore {
    async fn entity(&self, group: &str, entity: &str) -> Result<Option<EntityState>> {
        self.inner
            .db
            .get_pinned_cf(self.cf(CF_ENTITIES), entity_key(group, entity))
            .map_err(rocks("reading an entity"))?
            .map(|b| EntityState::from_json(&b))
            .transpose()
    }

    async fn resolutions(
        &self,
        group: &str,
        entity: &str,
        limit: usize,
    ) -> Result<Vec<Resolution>> {
        let prefix = entity_key(group, entity);
        let last = resolution_key(group, entity, u64::MAX);
        let mode = IteratorMode::From(&last, Direction::Reverse);
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(self.cf(CF_RESOLUTIONS), mode) {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(rocks("reading resolution records"))?;
            // The entity's own: its key and a number, nothing else.
            if !key.starts_with(&prefix) || key.len() != prefix.len() + 8 {
                break;
            }
            out.push(Resolution::from_json(&value)?);
        }
        Ok(out)
    }
}
