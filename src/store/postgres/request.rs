//! Idempotency keys of requests on PostgreSQL: a claim is a transaction-level advisory lock on
//! a 64-bit hash of the key, taken in the handler's own transaction (`claim_request`, a VOLATILE
//! function from the migrations, which then reads the key's row on a fresh snapshot), so a
//! concurrent request sees it at once and a server that dies lets it go with its session. The
//! lease is the transaction's idle time (`idle_in_transaction_session_timeout` for that
//! transaction): a holder that stays idle longer loses its session, its writes and the key, and
//! the layer renews it with a statement while the handler is not using the transaction. The
//! key's row is written once, completed, with the answer in `outcome`, in the handler's
//! transaction. Every time is the database's clock, so instances whose clocks disagree agree on
//! windows.
//!
//! A claim writes nothing and commits nothing: a fresh request costs one statement and one row
//! more than the same handler without a key, a replay one read-only statement in a transaction
//! rolled back.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::{PgConnection, Postgres};
use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use super::PgStore;
use super::errors::pg;
use super::rows::split;
use super::sql::ms;
use crate::error::{Error, Result};
use crate::store::request::{Lease, RequestClaim, RequestEntry, RequestStore};

/// The statements, built once from the validated schema and table prefix.
pub(super) struct RequestSql {
    /// Hashed with every key into its lock, so stores of other prefixes in one database keep
    /// their locks apart.
    table: String,
    claim: SqlStr,
    renew: SqlStr,
    complete: SqlStr,
}

impl RequestSql {
    pub(super) fn new(schema: &str, prefix: &str) -> Self {
        let dedup = format!("\"{schema}\".\"{prefix}dedup\"");
        let after = |n: u8| format!("now() + ${n}::bigint * interval '1 millisecond'");
        // Built only from the validated schema, prefix and constant text; values are bound.
        let statement = |s: String| AssertSqlSafe(s).into_sql_str();
        RequestSql {
            claim: statement(format!(
                "SELECT held, found_status, found_fingerprint, found_outcome, found_until_ms, \
                 found_expires_ms, db_now_ms \
                 FROM \"{schema}\".\"{prefix}claim_request\"($1, $2, $3, $4, $5)"
            )),
            // Resets the transaction's idle clock, with the lease it should have now.
            renew: statement(
                "SELECT set_config('idle_in_transaction_session_timeout', $1, true)".to_owned(),
            ),
            // In the handler's transaction, under the key's lock. A row still there is an
            // answer whose window passed, or a claim an earlier version of this crate left
            // whose lease ran out: both taken over.
            complete: statement(format!(
                "INSERT INTO {dedup} AS d (consumer_group, tenant, idempotency_key, status, \
                 fingerprint, outcome, topic, \"partition\", \"offset\", created_at, expires_at) \
                 VALUES ($1, $2, $3, 'completed', $4, $5, '', -1, -1, now(), {window}) \
                 ON CONFLICT (consumer_group, tenant, idempotency_key) DO UPDATE SET \
                 status = 'completed', fingerprint = EXCLUDED.fingerprint, \
                 outcome = EXCLUDED.outcome, created_at = EXCLUDED.created_at, \
                 expires_at = EXCLUDED.expires_at, lease_token = NULL, lease_until = NULL \
                 WHERE (d.status = 'in_flight' AND d.lease_until <= now()) \
                    OR (d.status IN ('completed', 'dead_lettered') AND d.expires_at <= now()) \
                 RETURNING {expires}",
                window = after(6),
                expires = ms("expires_at"),
            )),
            table: dedup,
        }
    }

    /// The advisory lock of a scoped key in this store.
    fn lock_key(&self, key: &[u8]) -> i64 {
        let mut h = Sha256::new();
        h.update(b"idempotent-consumer/request-lock/1\0");
        h.update((self.table.len() as u64).to_be_bytes());
        h.update(self.table.as_bytes());
        h.update(key);
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(first)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A lease as `idle_in_transaction_session_timeout` takes it: whole milliseconds, at least 1 (0
/// would turn the limit off), at most what the setting holds.
fn idle_ms(lease: Duration) -> i32 {
    i32::try_from(lease.as_millis()).unwrap_or(i32::MAX).max(1)
}

/// Whether the database ended the session for staying idle in a transaction past its lease:
/// nothing of the transaction committed, and the key is no longer this request's.
fn idle_ended(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "25P03"))
}

/// [`idle_ended`], for a failure the store already mapped (before its commit).
fn store_idle_ended(e: &Error) -> bool {
    matches!(e, Error::Store { source, .. }
        if source.downcast_ref::<sqlx::Error>().is_some_and(idle_ended))
}

/// Whether a failed statement of a request's transaction means the session is gone (ended for
/// its idle time, or lost): nothing of it committed, and the key is no longer this request's.
fn lost_session(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_)) || idle_ended(e)
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
        // The key's row is written once, with the answer, and its window with it.
        _window: Duration,
    ) -> Result<RequestClaim<PgRequestTx>> {
        let (g, t, k) = split(key)?;
        let sql = &self.inner.requests;
        let mut tx = self.begin_request().await?;
        let row = sqlx::query(sql.claim.clone())
            .bind(sql.lock_key(key))
            .bind(idle_ms(lease))
            .bind(g)
            .bind(t)
            .bind(k)
            .fetch_one(&mut *tx.tx)
            .await
            .map_err(pg("claiming a request's key"))?;
        let read = |e| pg("reading a request's key")(e);
        let held: bool = row.try_get("held").map_err(read)?;
        if !held {
            let _ = tx.tx.rollback().await;
            return Ok(RequestClaim::InFlight {
                fingerprint: Vec::new(),
                until_ms: 0,
            });
        }
        let status: Option<String> = row.try_get("found_status").map_err(read)?;
        let now_ms: i64 = row.try_get("db_now_ms").map_err(read)?;
        if let Some(status) = status {
            let in_flight = match status.as_str() {
                "completed" => false,
                // A claim an earlier version of this crate committed as a row: held until its
                // lease runs out (its server may still run it).
                "in_flight" => true,
                other => {
                    let _ = tx.tx.rollback().await;
                    return Err(Error::Corrupt(format!(
                        "a request's key holds a consumer's entry (status {other})"
                    )));
                }
            };
            let found = RequestEntry {
                in_flight,
                lease_until_ms: row
                    .try_get::<Option<i64>, _>("found_until_ms")
                    .map_err(read)?
                    .unwrap_or(0),
                created_at_ms: 0,
                expires_at_ms: row.try_get("found_expires_ms").map_err(read)?,
                fingerprint: row
                    .try_get::<Option<Vec<u8>>, _>("found_fingerprint")
                    .map_err(read)?
                    .unwrap_or_default(),
                token: String::new(),
                response: row
                    .try_get::<Option<Vec<u8>>, _>("found_outcome")
                    .map_err(read)?
                    .unwrap_or_default(),
            };
            if !found.is_free(now_ms) {
                let _ = tx.tx.rollback().await;
                return Ok(found.found());
            }
        }
        let until_ms = now_ms.saturating_add(millis(lease));
        // The lock is the transaction's: no token tells holders apart.
        Ok(RequestClaim::Claimed {
            lease: Lease::new(key, fingerprint, String::new(), until_ms),
            tx,
        })
    }

    async fn renew_request(
        &self,
        lease: &mut Lease,
        tx: Option<&mut PgRequestTx>,
        lease_for: Duration,
    ) -> Result<bool> {
        // While the handler uses the transaction, its own statements keep the session.
        let Some(tx) = tx else { return Ok(true) };
        let renewed = sqlx::query(self.inner.requests.renew.clone())
            .bind(idle_ms(lease_for).to_string())
            .execute(&mut *tx.tx)
            .await;
        match renewed {
            Ok(_) => {
                lease.set_until_ms(crate::store::now_ms().saturating_add(millis(lease_for)));
                Ok(true)
            }
            Err(e) if lost_session(&e) => Ok(false),
            Err(e) => Err(pg("renewing a request's lease")(e)),
        }
    }

    async fn release_request(&self, _lease: &Lease, tx: Option<PgRequestTx>) -> Result<bool> {
        // The lock goes with the transaction; without it here, it went when it was dropped.
        let Some(tx) = tx else { return Ok(true) };
        match tx.tx.rollback().await {
            Ok(()) => Ok(true),
            Err(e) if lost_session(&e) => Ok(false),
            Err(e) => Err(pg("releasing a request's key")(e)),
        }
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
        let fingerprint = lease.fingerprint();

        let completed = sqlx::query_scalar::<_, i64>(self.inner.requests.complete.clone())
            .bind(g)
            .bind(t)
            .bind(k)
            .bind(fingerprint)
            .bind(response)
            .bind(millis(window))
            .fetch_optional(&mut *tx.tx)
            .await;
        let expires_at_ms = match completed {
            Ok(Some(expires_at_ms)) => expires_at_ms,
            // A claim row of an earlier version whose lease still runs.
            Ok(None) => {
                let _ = tx.tx.rollback().await;
                return Err(Error::LeaseLost);
            }
            Err(e) if lost_session(&e) => return Err(Error::LeaseLost),
            Err(e) => return Err(pg("completing a request's key")(e)),
        };
        match tx.finish(self).await {
            Ok(()) => Ok(expires_at_ms),
            Err(e) if store_idle_ended(&e) => Err(Error::LeaseLost),
            Err(e) => Err(e),
        }
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
