//! The audit log on the RocksDB store: a record per operator command in the `audit` family,
//! written in the same `WriteBatch` as the command's change.

use rocksdb::{IteratorMode, WriteBatch};

use super::keys::{
    CF_AUDIT, CF_DEDUP, CF_POSITIONS, CF_REDRIVES, audit_key, dead_letter_key, position_key,
};
use super::{RocksStore, purge, rocks};
use crate::error::Result;
use crate::store::{
    AuditRecord, Audited, EntryKey, EntryStatus, PartitionId, RedriveMark, StoredPosition,
};

impl Audited for RocksStore {
    async fn set_position_audited(
        &self,
        partition: &PartitionId,
        next_offset: i64,
        record: &AuditRecord,
    ) -> Result<()> {
        crate::store::check_position(next_offset)?;
        let key = position_key(partition);
        // Under the partition's fence, so no commit of this process moves it meanwhile.
        let fence = self.fence(&key);
        let _held = fence.lock().expect("fence poisoned");
        let epoch = self.read_position(partition)?.map_or(0, |p| p.epoch);
        let row = StoredPosition {
            next_offset: Some(next_offset),
            epoch,
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_POSITIONS), key, row.encode());
        batch.put_cf(self.cf(CF_AUDIT), audit_key(record), record.to_json());
        self.inner
            .db
            .write_opt(batch, &self.inner.write_opts)
            .map_err(rocks("setting a position"))
    }

    async fn purge_expired_audited(
        &self,
        group: &str,
        now_ms: i64,
        limit: usize,
        record: &AuditRecord,
        counts: &(dyn Fn(usize) -> serde_json::Value + Sync),
    ) -> Result<usize> {
        let cf = self.cf(CF_AUDIT);
        purge::purge_expired_with(&self.inner, group, now_ms, limit, |batch, purged| {
            let record = AuditRecord {
                counts: counts(purged),
                ..record.clone()
            };
            batch.put_cf(cf, audit_key(&record), record.to_json());
        })
    }

    async fn replay_range(
        &self,
        partition: &PartitionId,
        from: i64,
        to: i64,
        record: &AuditRecord,
        counts: &(dyn Fn(usize) -> serde_json::Value + Sync),
    ) -> Result<usize> {
        crate::store::check_position(from)?;
        let inner = &self.inner;
        // No purge round rewrites entries meanwhile, no commit of this process moves the
        // partition.
        let _exclusive = inner.purge_gate.write().expect("purge gate poisoned");
        let key = position_key(partition);
        let fence = self.fence(&key);
        let _held = fence.lock().expect("fence poisoned");
        let mut prefix = Vec::with_capacity(2 + partition.group.len());
        prefix.extend_from_slice(&(partition.group.len() as u16).to_be_bytes());
        prefix.extend_from_slice(partition.group.as_bytes());
        let mut batch = WriteBatch::default();
        let mut released = 0;
        let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        for item in inner.db.iterator_cf(self.cf(CF_DEDUP), mode) {
            let (k, v) = item.map_err(rocks("scanning dedup entries"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            if crate::identity::split_store_key(&k).map(|(g, _, _)| g)
                != Some(partition.group.as_bytes())
                || v.first() == Some(&crate::store::entry::REQUEST_ENTRY_VERSION)
            {
                continue;
            }
            let e = crate::store::DedupEntry::decode(&v)?;
            if e.topic == partition.topic
                && e.partition == partition.partition
                && (from..to).contains(&e.offset)
            {
                batch.delete_cf(self.cf(CF_DEDUP), &k);
                released += 1;
            }
        }
        let epoch = self.read_position(partition)?.map_or(0, |p| p.epoch);
        let row = StoredPosition {
            next_offset: Some(from),
            epoch,
        };
        batch.put_cf(self.cf(CF_POSITIONS), key, row.encode());
        let record = AuditRecord {
            counts: counts(released),
            ..record.clone()
        };
        batch.put_cf(self.cf(CF_AUDIT), audit_key(&record), record.to_json());
        inner
            .db
            .write_opt(batch, &inner.write_opts)
            .map_err(rocks("releasing entries for a replay"))?;
        Ok(released)
    }

    async fn put_redrive_mark(
        &self,
        group: &str,
        mark: &RedriveMark,
        record: &AuditRecord,
        free: Option<&EntryKey<'_>>,
    ) -> Result<()> {
        let key = dead_letter_key(group, &mark.topic, mark.partition, mark.offset);
        let mut batch = WriteBatch::default();
        if let Some(free) = free {
            let store_key = free.store_key();
            if self
                .inner
                .entry(&store_key)?
                .is_some_and(|e| e.status == EntryStatus::DeadLettered)
            {
                batch.delete_cf(self.cf(CF_DEDUP), store_key);
            }
        }
        batch.put_cf(self.cf(CF_REDRIVES), key, mark.to_json());
        batch.put_cf(self.cf(CF_AUDIT), audit_key(record), record.to_json());
        self.inner
            .db
            .write_opt(batch, &self.inner.write_opts)
            .map_err(rocks("marking a redrive"))
    }

    async fn redrive_marks(&self, group: &str) -> Result<Vec<RedriveMark>> {
        let prefix = purge::group_prefix(group);
        let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(self.cf(CF_REDRIVES), mode) {
            let (key, value) = item.map_err(rocks("reading redrive marks"))?;
            if !key.starts_with(&prefix) {
                break;
            }
            out.push(RedriveMark::from_json(&value)?);
        }
        Ok(out)
    }

    async fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>> {
        let mut out = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_AUDIT), IteratorMode::Start)
        {
            if out.len() >= limit {
                break;
            }
            let (_, value) = item.map_err(rocks("reading the audit log"))?;
            out.push(AuditRecord::from_json(&value)?);
        }
        Ok(out)
    }
}
