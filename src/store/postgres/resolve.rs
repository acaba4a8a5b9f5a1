//! Entities and resolution records on PostgreSQL (feature `resolve`): the `entities` and
//! `resolutions` tables of migration 5, written by statements on the batch's own transaction
//! (undone by its savepoints, committed with its position), read from outside the runtime, and
//! the bounded purge of expired records.
//!
//! An entity is locked like a claim, in one statement: its row is inserted, or, when it is
//! there, updated to itself, which locks it as `FOR UPDATE` would and returns the stored state
//! (a concurrent insert of the same entity waits on the primary key, a concurrent lock on the
//! row), so a batch of another instance deciding a record of the same entity waits for this
//! one's commit and then reads its winner.
//! Two batches locking two entities in opposite orders are a deadlock the server breaks: the
//! victim's batch is tried again (a transient failure).

use sqlx::SqlStr;

use super::errors::pg;
use super::sql::{clamp_ms, statement, ts};
use super::{PgStore, PgTx};
use crate::error::Result;
use crate::resolve::{Entities, EntityLock, EntityState, Resolution};

/// The statements, built once from the validated table names.
pub(super) struct ResolveSql {
    lock_entity: SqlStr,
    put_entity: SqlStr,
    put_resolution: SqlStr,
    entity: SqlStr,
    resolutions: SqlStr,
    purge: SqlStr,
}

impl ResolveSql {
    pub(super) fn new(schema: &str, prefix: &str) -> Self {
        let entities = format!("\"{schema}\".\"{prefix}entities\"");
        let resolutions = format!("\"{schema}\".\"{prefix}resolutions\"");
        ResolveSql {
            lock_entity: statement(format!(
                "INSERT INTO {entities} (consumer_group, entity) VALUES ($1, $2) \
                 ON CONFLICT (consumer_group, entity) \
                 DO UPDATE SET consumer_group = EXCLUDED.consumer_group \
                 RETURNING state::text"
            )),
            put_entity: statement(format!(
                "INSERT INTO {entities} AS e (consumer_group, entity, state, updated_at) \
                 VALUES ($1, $2, $3::jsonb, now()) \
                 ON CONFLICT (consumer_group, entity) \
                 DO UPDATE SET state = EXCLUDED.state, updated_at = now()"
            )),
            put_resolution: statement(format!(
                "INSERT INTO {resolutions} \
                 (consumer_group, entity, seq, outcome, decided_at, expires_at, resolution) \
                 VALUES ($1, $2, $3, $4, {decided}, {expires}, $7::jsonb)",
                decided = ts(5),
                expires = ts(6),
            )),
            entity: statement(format!(
                "SELECT state::text FROM {entities} WHERE consumer_group = $1 AND entity = $2"
            )),
            resolutions: statement(format!(
                "SELECT resolution::text FROM {resolutions} \
                 WHERE consumer_group = $1 AND entity = $2 ORDER BY seq DESC LIMIT $3"
            )),
            // Expired by the caller's clock and the database's alike.
            purge: statement(format!(
                "DELETE FROM {resolutions} r USING ( \
                   SELECT consumer_group, entity, seq FROM {resolutions} \
                   WHERE consumer_group = $1 AND expires_at <= LEAST({now}, now()) \
                   ORDER BY expires_at LIMIT $3 FOR UPDATE SKIP LOCKED) x \
                 WHERE r.consumer_group = x.consumer_group AND r.entity = x.entity \
                   AND r.seq = x.seq",
                now = ts(2),
            )),
        }
    }
}

fn state_of(text: Option<String>) -> Result<Option<EntityState>> {
    text.map(|t| EntityState::from_json(t.as_bytes()))
        .transpose()
}

impl PgTx {
    pub(super) async fn lock_entity_row(&mut self, entity: &str) -> Result<EntityLock> {
        let sql = &self.store.resolve;
        let group = &self.partition.group;
        let state: Option<String> = sqlx::query_scalar(sql.lock_entity.clone())
            .bind(group)
            .bind(entity)
            .fetch_one(&mut *self.tx)
            .await
            .map_err(pg("locking an entity"))?;
        Ok(EntityLock::Held(state_of(state)?))
    }

    pub(super) async fn put_entity_row(&mut self, state: &EntityState) -> Result<()> {
        let json = String::from_utf8(state.to_json()).expect("JSON is UTF-8");
        sqlx::query(self.store.resolve.put_entity.clone())
            .bind(&self.partition.group)
            .bind(&state.entity)
            .bind(json)
            .execute(&mut *self.tx)
            .await
            .map_err(pg("writing an entity"))?;
        Ok(())
    }

    pub(super) async fn put_resolution_row(
        &mut self,
        resolution: &Resolution,
        expires_at_ms: i64,
    ) -> Result<()> {
        let json = String::from_utf8(resolution.to_json()).expect("JSON is UTF-8");
        sqlx::query(self.store.resolve.put_resolution.clone())
            .bind(&self.partition.group)
            .bind(&resolution.entity)
            .bind(i64::try_from(resolution.seq).unwrap_or(i64::MAX))
            .bind(resolution.outcome.as_str())
            .bind(clamp_ms(resolution.decided_at_ms))
            .bind(clamp_ms(expires_at_ms))
            .bind(json)
            .execute(&mut *self.tx)
            .await
            .map_err(pg("writing a resolution record"))?;
        Ok(())
    }
}

impl PgStore {
    pub(super) async fn purge_resolution_rows(
        &self,
        group: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<usize> {
        let done = sqlx::query(self.inner.resolve.purge.clone())
            .bind(group)
            .bind(clamp_ms(now_ms))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(&self.inner.pool)
            .await
            .map_err(pg("purging resolution records"))?;
        Ok(done.rows_affected() as usize)
    }
}

impl Entities for PgStore {
    async fn entity(&self, group: &str, entity: &str) -> Result<Option<EntityState>> {
        let state: Option<Option<String>> = sqlx::query_scalar(self.inner.resolve.entity.clone())
            .bind(group)
            .bind(entity)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg("reading an entity"))?;
        state_of(state.flatten())
    }

    async fn resolutions(
        &self,
        group: &str,
        entity: &str,
        limit: usize,
    ) -> Result<Vec<Resolution>> {
        let rows: Vec<String> = sqlx::query_scalar(self.inner.resolve.resolutions.clone())
            .bind(group)
            .bind(entity)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg("reading resolution records"))?;
        rows.iter()
            .map(|r| Resolution::from_json(r.as_bytes()))
            .collect()
    }
}
