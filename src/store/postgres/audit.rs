//! The audit log on PostgreSQL: the `audit` table of migration 6, written in the same
//! transaction as the operator's change.

use sqlx::postgres::PgConnection;

use super::PgStore;
use super::errors::pg;
use super::rows::split;
use super::sql::clamp_ms;
use crate::error::Result;
use crate::store::{AuditRecord, Audited, EntryKey, PartitionId, RedriveMark};

impl PgStore {
    async fn put_audit(&self, conn: &mut PgConnection, record: &AuditRecord) -> Result<()> {
        let json = String::from_utf8(record.to_json()).expect("JSON is UTF-8");
        sqlx::query(self.inner.sql.put_audit.clone())
            .bind(&record.id)
            .bind(clamp_ms(record.at_ms))
            .bind(&record.who)
            .bind(&record.command)
            .bind(json)
            .execute(conn)
            .await
            .map_err(pg("writing an audit record"))?;
        Ok(())
    }
}

impl Audited for PgStore {
    async fn set_position_audited(
        &self,
        partition: &PartitionId,
        next_offset: i64,
        record: &AuditRecord,
    ) -> Result<()> {
        crate::store::check_position(next_offset)?;
        let mut tx = self.transaction().await?;
        sqlx::query(self.inner.sql.set_position.clone())
            .bind(&partition.group)
            .bind(&partition.topic)
            .bind(partition.partition)
            .bind(next_offset)
            .execute(&mut *tx)
            .await
            .map_err(pg("setting a position"))?;
        self.put_audit(&mut tx, record).await?;
        tx.commit().await.map_err(pg("committing a position"))
    }

    async fn purge_expired_audited(
        &self,
        group: &str,
        now_ms: i64,
        limit: usize,
        record: &AuditRecord,
        counts: &(dyn Fn(usize) -> serde_json::Value + Sync),
    ) -> Result<usize> {
        let mut tx = self.transaction().await?;
        let done = sqlx::query(self.inner.sql.purge.clone())
            .bind(clamp_ms(now_ms))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(group)
            .execute(&mut *tx)
            .await
            .map_err(pg("purging expired entries"))?;
        let purged = done.rows_affected() as usize;
        let record = AuditRecord {
            counts: counts(purged),
            ..record.clone()
        };
        self.put_audit(&mut tx, &record).await?;
        tx.commit().await.map_err(pg("committing a purge"))?;
        Ok(purged)
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
        let mut tx = self.transaction().await?;
        let done = sqlx::query(self.inner.sql.release_range.clone())
            .bind(&partition.group)
            .bind(&partition.topic)
            .bind(partition.partition)
            .bind(from)
            .bind(to)
            .execute(&mut *tx)
            .await
            .map_err(pg("releasing entries for a replay"))?;
        let released = done.rows_affected() as usize;
        sqlx::query(self.inner.sql.set_position.clone())
            .bind(&partition.group)
            .bind(&partition.topic)
            .bind(partition.partition)
            .bind(from)
            .execute(&mut *tx)
            .await
            .map_err(pg("setting a position"))?;
        let record = AuditRecord {
            counts: counts(released),
            ..record.clone()
        };
        self.put_audit(&mut tx, &record).await?;
        tx.commit().await.map_err(pg("committing a replay"))?;
        Ok(released)
    }

    async fn put_redrive_mark(
        &self,
        group: &str,
        mark: &RedriveMark,
        record: &AuditRecord,
        free: Option<&EntryKey<'_>>,
    ) -> Result<()> {
        let mut tx = self.transaction().await?;
        if let Some(free) = free {
            let store_key = free.store_key();
            let (g, t, k) = split(&store_key)?;
            sqlx::query(self.inner.sql.free_dead_lettered.clone())
                .bind(g)
                .bind(t)
                .bind(k)
                .execute(&mut *tx)
                .await
                .map_err(pg("freeing a dead-lettered key"))?;
        }
        let json = String::from_utf8(mark.to_json()).expect("JSON is UTF-8");
        sqlx::query(self.inner.sql.put_redrive.clone())
            .bind(group)
            .bind(&mark.topic)
            .bind(mark.partition)
            .bind(mark.offset)
            .bind(json)
            .execute(&mut *tx)
            .await
            .map_err(pg("marking a redrive"))?;
        self.put_audit(&mut tx, record).await?;
        tx.commit().await.map_err(pg("committing a redrive mark"))
    }

    async fn redrive_marks(&self, group: &str) -> Result<Vec<RedriveMark>> {
        let rows: Vec<String> = sqlx::query_scalar(self.inner.sql.redrives_of.clone())
            .bind(group)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg("reading redrive marks"))?;
        rows.iter()
            .map(|r| RedriveMark::from_json(r.as_bytes()))
            .collect()
    }

    async fn audit_log(&self, limit: usize) -> Result<Vec<AuditRecord>> {
        let rows: Vec<String> = sqlx::query_scalar(self.inner.sql.audit_log.clone())
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg("reading the audit log"))?;
        rows.iter()
            .map(|r| AuditRecord::from_json(r.as_bytes()))
            .collect()
    }
}
