//! Idempotency keys of requests on PostgreSQL: a claim is a committed `in_flight` row of the
//! dedup table holding a lease (`lease_token`, `lease_until`), so a concurrent request sees it
//! at once; the handler's transaction turns it `completed`, with the stored answer in
//! `outcome`, only while the token is still its own. Every time is the database's clock, so
//! instances whose clocks disagree agree on leases.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnection, Postgres};
use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use super::PgStore;
use super::errors::pg;
use super::rows::split;
use super::sql::ms;
use crate::error::{Error, Result};
use crate::store::request::{Lease, RequestClaim, RequestStore};

/// Makes the statement's own (implicit) transaction commit without waiting for its WAL to
/// reach the disk (`synchronous_commit = off` for that transaction alone): claims, renewals and
/// releases are visible to every session at once, and a claim lost with a server crash is a
/// key nobody completed, which a retry runs, as after its lease. The completing commit, which
/// carries the handler's writes and the answer, stays synchronous, and its WAL flush covers
/// every claim before it.
const ASYNC: &str = "(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit";

/// The statements, built once from the validated table name.
pub(super) struct RequestSql {
    claim: SqlStr,
    read: SqlStr,
    renew: SqlStr,
    release: SqlStr,
    complete: SqlStr,
}

impl RequestSql {
    pub(super) fn new(dedup: &str) -> Self {
        let after = |n: u8| format!("now() + ${n}::bigint * interval '1 millisecond'");
        let key = "consumer_group = $1 AND tenant = $2 AND idempotency_key = $3";
        // Built only from the validated table name and constant text; values are bound.
        let statement = |s: String| AssertSqlSafe(s).into_sql_str();
        RequestSql {
            // Inserted, or taken over when its lease ran out or its window passed.
            claim: statement(format!(
                "INSERT INTO {dedup} AS d (consumer_group, tenant, idempotency_key, status, fingerprint, \
                 topic, \"partition\", \"offset\", created_at, expires_at, lease_token, lease_until) \
                 SELECT $1, $2, $3, 'in_flight', $4, '', -1, -1, now(), {window}, $5, {lease} \
                 FROM {ASYNC} \
                 ON CONFLICT (consumer_group, tenant, idempotency_key) DO UPDATE SET \
                 status = 'in_flight', fingerprint = EXCLUDED.fingerprint, outcome = NULL, \
                 created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at, \
                 lease_token = EXCLUDED.lease_token, lease_until = EXCLUDED.lease_until \
                 WHERE (d.status = 'in_flight' AND d.lease_until <= now()) \
                    OR (d.status IN ('completed', 'dead_lettered') AND d.expires_at <= now()) \
                 RETURNING {until}",
                window = after(6),
                lease = after(7),
                until = ms("lease_until"),
            )),
            read: statement(format!(
                "SELECT status, fingerprint, outcome, {until} AS until_ms, {expires} AS expires_ms \
                 FROM {dedup} WHERE {key}",
                until = ms("lease_until"),
                expires = ms("expires_at"),
            )),
            renew: statement(format!(
                "UPDATE {dedup} SET lease_until = {lease} FROM {ASYNC} \
                 WHERE {key} AND status = 'in_flight' AND lease_token = $4 RETURNING {until}",
                lease = after(5),
                until = ms("lease_until"),
            )),
            release: statement(format!(
                "DELETE FROM {dedup} USING {ASYNC} WHERE {key} AND status = 'in_flight' AND lease_token = $4"
            )),
            // In the handler's transaction: the row lock makes a takeover wait for it.
            complete: statement(format!(
                "UPDATE {dedup} SET status = 'completed', outcome = $5, created_at = now(), \
                 expires_at = {window}, lease_token = NULL, lease_until = NULL \
                 WHERE {key} AND status = 'in_flight' AND lease_token = $4 RETURNING {expires}",
                window = after(6),
                expires = ms("expires_at"),
            )),
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The handler's transaction for one request on PostgreSQL: run its queries on
/// [`conn`](PgRequestTx::conn), and they commit (or roll back) with the key's entry and the
/// stored answer.
pub struct PgRequestTx {
    tx: sqlx::Transaction<'static, Postgres>,
    #[cfg(feature = "outbox")]
    publications: crate::outbox::Publications,
}

impl std::fmt::Debug for PgRequestTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRequestTx").finish_non_exhaustive()
    }
}

impl PgRequestTx {
    /// The open transaction's connection.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Writes the publications and commits.
    async fn finish(#[allow(unused_mut)] mut self, store: &PgStore) -> Result<()> {
        #[cfg(feature = "outbox")]
        let published = {
            let rows = self.publications.take();
            super::outbox::write_rows(&mut self.tx, &store.inner.outbox, &rows).await?;
            rows.len()
        };
        #[cfg(not(feature = "outbox"))]
        let _ = store;
        self.tx.commit().await.map_err(pg("committing a request"))?;
        #[cfg(feature = "outbox")]
        crate::outbox::count_published(published);
        Ok(())
    }
}

impl RequestStore for PgStore {
    type RequestTx = PgRequestTx;

    async fn claim_request(
        &self,
        key: &[u8],
        fingerprint: &[u8],
        lease: Duration,
        window: Duration,
    ) -> Result<RequestClaim> {
        let (g, t, k) = split(key)?;
        let sql = &self.inner.requests;
        // A row purged between the insert and the read is claimed again.
        for _ in 0..3 {
            let token = crate::store::new_id();
            let claimed: Option<i64> = sqlx::query_scalar(sql.claim.clone())
                .bind(g)
                .bind(t)
                .bind(k)
                .bind(fingerprint)
                .bind(&token)
                .bind(millis(window))
                .bind(millis(lease))
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(pg("claiming a request's key"))?;
            if let Some(until_ms) = claimed {
                return Ok(RequestClaim::Claimed(Lease::new(key, token, until_ms)));
            }
            let row = sqlx::query(sql.read.clone())
                .bind(g)
                .bind(t)
                .bind(k)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(pg("reading a request's key"))?;
            let Some(row) = row else { continue };
            let read = |e| pg("reading a request's key")(e);
            let status: String = row.try_get("status").map_err(read)?;
            let fingerprint: Vec<u8> = row.try_get("fingerprint").map_err(read)?;
            match status.as_str() {
                "in_flight" => {
                    let until_ms: Option<i64> = row.try_get("until_ms").map_err(read)?;
                    return Ok(RequestClaim::InFlight {
                        fingerprint,
                        until_ms: until_ms.unwrap_or(0),
                    });
                }
                "completed" => {
                    let response: Option<Vec<u8>> = row.try_get("outcome").map_err(read)?;
                    let expires_at_ms: i64 = row.try_get("expires_ms").map_err(read)?;
                    return Ok(RequestClaim::Completed {
                        fingerprint,
                        response: response.unwrap_or_default(),
                        expires_at_ms,
                    });
                }
                other => {
                    return Err(Error::Corrupt(format!(
                        "a request's key holds a consumer's entry (status {other})"
                    )));
                }
            }
        }
        Err(Error::store_transient(
            "claiming a request's key",
            "the key kept changing between the claim and the read",
        ))
    }

    async fn renew_request(&self, lease: &mut Lease, lease_for: Duration) -> Result<bool> {
        let (g, t, k) = split(lease.key())?;
        let until: Option<i64> = sqlx::query_scalar(self.inner.requests.renew.clone())
            .bind(g)
            .bind(t)
            .bind(k)
            .bind(lease.token())
            .bind(millis(lease_for))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(pg("renewing a request's lease"))?;
        if let Some(until_ms) = until {
            lease.set_until_ms(until_ms);
        }
        Ok(until.is_some())
    }

    async fn release_request(&self, lease: &Lease) -> Result<bool> {
        let (g, t, k) = split(lease.key())?;
        let done = sqlx::query(self.inner.requests.release.clone())
            .bind(g)
            .bind(t)
            .bind(k)
            .bind(lease.token())
            .execute(&self.inner.pool)
            .await
            .map_err(pg("releasing a request's key"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn begin_request(&self) -> Result<PgRequestTx> {
        Ok(PgRequestTx {
            tx: self.transaction().await?,
            #[cfg(feature = "outbox")]
            publications: Default::default(),
        })
    }

    async fn commit_request(
        &self,
        mut tx: PgRequestTx,
        lease: &Lease,
        response: &[u8],
        window: Duration,
    ) -> Result<i64> {
        let (g, t, k) = split(lease.key())?;
        let completed: Option<i64> = sqlx::query_scalar(self.inner.requests.complete.clone())
            .bind(g)
            .bind(t)
            .bind(k)
            .bind(lease.token())
            .bind(response)
            .bind(millis(window))
            .fetch_optional(&mut *tx.tx)
            .await
            .map_err(pg("completing a request's key"))?;
        let Some(expires_at_ms) = completed else {
            let _ = tx.tx.rollback().await;
            return Err(Error::LeaseLost);
        };
        tx.finish(self).await?;
        Ok(expires_at_ms)
    }

    async fn commit_unkeyed(&self, tx: PgRequestTx) -> Result<()> {
        tx.finish(self).await
    }

    #[cfg(feature = "outbox")]
    fn begin_source(&self, tx: &mut PgRequestTx, key: Option<&[u8]>) {
        tx.publications.begin_request(key);
    }
}

/// Publishes through the outbox, committed with this transaction (feature `outbox`).
#[cfg(feature = "outbox")]
impl crate::outbox::Publish for PgRequestTx {
    fn publish(
        &mut self,
        publication: crate::outbox::Publication,
    ) -> std::result::Result<String, crate::outbox::PublishError> {
        self.publications.publish(publication)
    }
}
