//! The outbox on PostgreSQL (feature `outbox`): rows of the `outbox` table, inserted by the
//! commit of the transaction that published them (one statement for the batch, in publication
//! order); a relay's lease in the one row of `outbox_relay`.
//!
//! Only the holder of the current, unexpired lease deletes rows or marks them dead, and it reads
//! the lease row `FOR SHARE` in the same statement, so a relay taking the lease over waits for
//! that statement's commit: a relay that lost its lease changes nothing (fenced, as a zombie
//! consumer's commit is by its partition's epoch).

use std::time::Duration;

use sqlx::Row;
use sqlx::SqlStr;
use sqlx::postgres::PgConnection;

use super::PgStore;
use super::errors::pg;
use super::sql::{ms, statement};
use crate::error::Result;
use crate::outbox::encode::{decode_headers, encode_headers};
use crate::outbox::{OutboxDeadRow, OutboxLease, OutboxRow, OutboxStore, Outgoing};

/// The statements, built once from the validated table names.
pub(super) struct OutboxSql {
    insert: SqlStr,
    lease: SqlStr,
    release: SqlStr,
    pending: SqlStr,
    sent: SqlStr,
    dead: SqlStr,
    backlog: SqlStr,
    dead_rows: SqlStr,
}

/// The columns of a row, then its creation time (`created_ms`): read by position, in this
/// order, by [`row`] (a lookup by name per column is a hash per column per row).
const ROW_COLUMNS: &str = "id, topic, record_key, payload, headers, idempotency_key, source";

impl OutboxSql {
    pub(super) fn new(schema: &str, prefix: &str) -> Self {
        let outbox = format!("\"{schema}\".\"{prefix}outbox\"");
        let relay = format!("\"{schema}\".\"{prefix}outbox_relay\"");
        let held = format!(
            "held AS (SELECT 1 FROM {relay} WHERE id = 0 AND owner = $1 AND epoch = $2 \
             AND lease_until > now() FOR SHARE)"
        );
        let created = ms("created_at");
        OutboxSql {
            insert: statement(format!(
                "INSERT INTO {outbox} (topic, record_key, payload, headers, idempotency_key, source, created_at) \
                 SELECT u.tp, u.k, u.p, u.h, u.ik, u.s, now() \
                 FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::bytea[], $5::text[], $6::text[]) \
                      WITH ORDINALITY AS u(tp, k, p, h, ik, s, n) \
                 ORDER BY u.n"
            )),
            lease: statement(format!(
                "INSERT INTO {relay} AS r (id, owner, epoch, lease_until) \
                 VALUES (0, $1, 1, now() + $2::bigint * interval '1 millisecond') \
                 ON CONFLICT (id) DO UPDATE SET \
                 epoch = CASE WHEN r.owner = EXCLUDED.owner THEN r.epoch ELSE r.epoch + 1 END, \
                 owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until \
                 WHERE r.owner = EXCLUDED.owner OR r.lease_until <= now() \
                 RETURNING epoch, {until} AS until_ms",
                until = ms("lease_until"),
            )),
            release: statement(format!(
                "UPDATE {relay} SET lease_until = now() WHERE id = 0 AND owner = $1 AND epoch = $2"
            )),
            // Through a function that plans the read as an index scan in id order whatever
            // the table's statistics (migration 8).
            pending: statement(format!(
                "SELECT {ROW_COLUMNS}, {created} AS created_ms \
                 FROM \"{schema}\".\"{prefix}outbox_waiting_after\"($2, $1)"
            )),
            // Committed without waiting for the WAL's flush (for this transaction alone): a
            // deletion lost with the server is a row produced again, which the consumers
            // downstream drop by its key.
            sent: statement(format!(
                "WITH {held}, gone AS (DELETE FROM {outbox} \
                 WHERE id = ANY($3::int8[]) AND reason IS NULL AND EXISTS (SELECT 1 FROM held) RETURNING 1), \
                 unsynced AS (SELECT set_config('synchronous_commit', 'off', true) AS s) \
                 SELECT EXISTS (SELECT 1 FROM held), (SELECT count(*) FROM gone), (SELECT s FROM unsynced)"
            )),
            dead: statement(format!(
                "WITH {held}, kept AS (UPDATE {outbox} SET reason = $4, failed_at = now() \
                 WHERE id = $3 AND reason IS NULL AND EXISTS (SELECT 1 FROM held) RETURNING 1) \
                 SELECT EXISTS (SELECT 1 FROM held), (SELECT count(*) FROM kept)"
            )),
            backlog: statement(format!(
                "SELECT count(*), min({created}) FROM {outbox} WHERE reason IS NULL"
            )),
            dead_rows: statement(format!(
                "SELECT {ROW_COLUMNS}, {created} AS created_ms, reason, {failed} AS failed_ms \
                 FROM {outbox} WHERE reason IS NOT NULL ORDER BY id LIMIT $1",
                failed = ms("failed_at"),
            )),
        }
    }
}

/// Inserts `rows` in the transaction on `conn`, in order.
pub(super) async fn write_rows(
    conn: &mut PgConnection,
    sql: &OutboxSql,
    rows: &[Outgoing],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let p = |f: fn(&Outgoing) -> Option<&[u8]>| rows.iter().map(f).collect::<Vec<_>>();
    sqlx::query(sql.insert.clone())
        .bind(
            rows.iter()
                .map(|r| r.publication.topic.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(p(|r| r.publication.key.as_deref()))
        .bind(p(|r| r.publication.payload.as_deref()))
        .bind(
            rows.iter()
                .map(|r| encode_headers(&r.publication.headers))
                .collect::<Vec<_>>(),
        )
        .bind(
            rows.iter()
                .map(|r| r.idempotency_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.source.as_str()).collect::<Vec<_>>())
        .execute(conn)
        .await
        .map_err(pg("writing outbox rows"))?;
    Ok(())
}

fn row(r: &sqlx::postgres::PgRow) -> std::result::Result<OutboxRow, sqlx::Error> {
    // By position: ROW_COLUMNS, then created_ms.
    let headers: &[u8] = r.try_get(4)?;
    let id: i64 = r.try_get(0)?;
    Ok(OutboxRow {
        id: id as u64,
        topic: r.try_get(1)?,
        key: r.try_get(2)?,
        payload: r.try_get(3)?,
        headers: decode_headers(headers).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        idempotency_key: r.try_get(5)?,
        source: r.try_get(6)?,
        created_at_ms: r.try_get(7)?,
    })
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Runs a fenced statement (`sent`, `dead`): whether the lease was held, and how many rows
    /// it changed.
    async fn fenced(
        &self,
        statement: &SqlStr,
        lease: &OutboxLease,
        bind: impl FnOnce(
            sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        )
            -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
        context: &'static str,
    ) -> Result<(bool, i64)> {
        let query = sqlx::query(statement.clone())
            .bind(&lease.owner)
            .bind(lease.epoch as i64);
        let r = bind(query)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg(context))?;
        let held: bool = r.try_get(0).map_err(pg(context))?;
        let changed: i64 = r.try_get(1).map_err(pg(context))?;
        Ok((held, changed))
    }
}

impl OutboxStore for PgStore {
    async fn lease_outbox(&self, owner: &str, lease: Duration) -> Result<Option<OutboxLease>> {
        let ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let r = sqlx::query(self.inner.outbox.lease.clone())
            .bind(owner)
            .bind(ms)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg("taking the outbox's lease"))?;
        let Some(r) = r else { return Ok(None) };
        let read = |e| pg("taking the outbox's lease")(e);
        let epoch: i64 = r.try_get("epoch").map_err(read)?;
        let until_ms: i64 = r.try_get("until_ms").map_err(read)?;
        Ok(Some(OutboxLease {
            owner: owner.to_owned(),
            epoch: epoch as u64,
            until_ms,
        }))
    }

    async fn release_outbox(&self, lease: &OutboxLease) -> Result<()> {
        sqlx::query(self.inner.outbox.release.clone())
            .bind(&lease.owner)
            .bind(lease.epoch as i64)
            .execute(&self.inner.pool)
            .await
            .map_err(pg("giving the outbox's lease up"))?;
        Ok(())
    }

    async fn pending_rows(&self, after: Option<u64>, n: usize) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(self.inner.outbox.pending.clone())
            .bind(limit(n))
            .bind(after.map_or(0, |a| a as i64))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg("reading the outbox"))?;
        rows.iter()
            .map(row)
            .collect::<std::result::Result<_, _>>()
            .map_err(pg("reading the outbox"))
    }

    async fn mark_sent(&self, lease: &OutboxLease, ids: &[u64]) -> Result<bool> {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let sql = &self.inner.outbox.sent;
        let (held, _) = self
            .fenced(sql, lease, |q| q.bind(ids), "deleting sent outbox rows")
            .await?;
        Ok(held)
    }

    async fn mark_dead(&self, lease: &OutboxLease, id: u64, reason: &str) -> Result<bool> {
        let sql = &self.inner.outbox.dead;
        let (held, _) = self
            .fenced(
                sql,
                lease,
                |q| q.bind(id as i64).bind(reason.to_owned()),
                "keeping a dead outbox row",
            )
            .await?;
        Ok(held)
    }

    async fn outbox_backlog(&self) -> Result<(u64, Option<i64>)> {
        let r = sqlx::query(self.inner.outbox.backlog.clone())
            .fetch_one(&self.inner.pool)
            .await
            .map_err(pg("measuring the outbox"))?;
        let read = |e| pg("measuring the outbox")(e);
        let count: i64 = r.try_get(0).map_err(read)?;
        let oldest: Option<i64> = r.try_get(1).map_err(read)?;
        Ok((count as u64, oldest))
    }

    async fn dead_rows(&self, n: usize) -> Result<Vec<OutboxDeadRow>> {
        let rows = sqlx::query(self.inner.outbox.dead_rows.clone())
            .bind(limit(n))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(pg("reading dead outbox rows"))?;
        rows.iter()
            .map(|r| {
                Ok(OutboxDeadRow {
                    row: row(r)?,
                    reason: r.try_get("reason")?,
                    failed_at_ms: r.try_get("failed_ms")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(pg("reading dead outbox rows"))
    }
}
