//! One batch's PostgreSQL transaction: the handler's SQL, savepoints, deferred rows, and the
//! commit that checks the fence first and then writes the entries, releases unfinished claims and
//! keeps the dead letters, all in the one transaction.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use sqlx::postgres::{PgConnection, Postgres};

use super::Inner;
use super::batch::{self, BatchRow, BatchStatement};
use super::claims::KeyState;
use super::errors::{is_transient, pg};
use super::rows::{EntryColumns, select_entries, split_all};
use crate::dead_letter::DeadLetter;
use crate::error::{Error, Result};
use crate::handler::HandlerError;
use crate::store::entry::DedupEntry;
use crate::store::{Claim, ClaimAhead, DeferredWrites, PartitionId, Transaction};

/// One batch's PostgreSQL transaction. The handler runs its own SQL through [`PgTx::conn`].
///
/// Dedup entries and dead letters are buffered and written in the commit, with the partition's
/// new position, so a batch costs a few round trips whatever its size.
pub struct PgTx {
    pub(super) tx: sqlx::Transaction<'static, Postgres>,
    pub(super) store: Arc<Inner>,
    pub(super) partition: PartitionId,
    epoch: u64,
    pub(super) keys: HashMap<Vec<u8>, KeyState>,
    dead_letters: Vec<DeadLetter>,
    /// Changes to `keys` since the savepoint: (key, state before).
    undo: Vec<(Vec<u8>, Option<KeyState>)>,
    savepoint: bool,
    /// Rows deferred to the end of the batch, per statement (by id), in order of first use.
    deferred: Vec<(u64, Box<dyn batch::Deferred>)>,
    /// How many rows each of `deferred` held at the savepoint.
    deferred_marks: Vec<usize>,
    /// The server's id of the transaction that inserted this batch's claims. The commit
    /// advances the position only in that same transaction: a handler that ended it (`COMMIT`
    /// or `ROLLBACK` on `conn()`) committed the claims with it, the ones claimed ahead already
    /// saying `completed` for records not handled yet.
    pub(super) claimed_in: Option<i64>,
    /// Events published through the outbox, inserted by the commit.
    #[cfg(feature = "outbox")]
    publications: crate::outbox::Publications,
}

impl fmt::Debug for PgTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTx")
            .field("partition", &self.partition)
            .field("epoch", &self.epoch)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl PgTx {
    pub(super) fn new(
        tx: sqlx::Transaction<'static, Postgres>,
        store: Arc<Inner>,
        partition: &PartitionId,
        epoch: u64,
    ) -> PgTx {
        PgTx {
            tx,
            store,
            partition: partition.clone(),
            epoch,
            keys: HashMap::new(),
            dead_letters: Vec::new(),
            undo: Vec::new(),
            savepoint: false,
            deferred: Vec::new(),
            deferred_marks: Vec::new(),
            claimed_in: None,
            #[cfg(feature = "outbox")]
            publications: Default::default(),
        }
    }

    /// The open transaction's connection: run the handler's queries on it, and they commit (or
    /// roll back) with the record's dedup row and the partition's position.
    ///
    /// ```no_run
    /// # async fn f(tx: &mut idempotent_consumer::PgTx) -> Result<(), sqlx::Error> {
    /// sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
    ///     .bind(10_i64)
    ///     .bind("alice")
    ///     .execute(tx.conn())
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// The partition this batch belongs to.
    pub fn partition(&self) -> &PartitionId {
        &self.partition
    }

    /// Defers `row` to `statement`, which writes the rows of the whole batch at once, in this
    /// transaction, just before it commits: one round trip per batch instead of one per record.
    /// Rows keep the order they were deferred in. Rows of a record that fails or is rolled back
    /// are discarded with it. Queries on [`conn`](PgTx::conn) in the same batch do not see
    /// deferred rows. What a failing statement does is told in [`BatchStatement`]'s module:
    /// in short, the batch is handled again one record at a time and the failure becomes that
    /// record's handler error.
    pub fn defer<R: BatchRow>(&mut self, statement: &BatchStatement<R>, row: R) {
        batch::push(&mut self.deferred, statement, row);
    }

    pub(super) fn set_key(&mut self, key: &[u8], state: KeyState) {
        let before = self.keys.insert(key.to_vec(), state);
        if self.savepoint {
            self.undo.push((key.to_vec(), before));
        }
    }

    /// The epoch is ours but the transaction is not the one that claimed: a handler ended it,
    /// committing (or rolling back) the claims. Records not handled yet must not stay marked
    /// done, so their claims, where the server still holds them as written, are deleted (the
    /// connection is outside any transaction now, so each statement commits by itself); the
    /// error ends the run. The server's id of the transaction the commit runs in
    /// (`txid_current()`) is what tells: the claims returned it, the fenced position update
    /// compares it.
    async fn transaction_ended_by_a_handler(&mut self) -> Error {
        let p = &self.partition;
        let mut keys: Vec<&[u8]> = Vec::new();
        let mut offsets: Vec<Option<i64>> = Vec::new();
        for (key, state) in &self.keys {
            let offset = match state {
                KeyState::Claimed(ahead) => ahead.as_ref().map(|e| e.offset),
                // Handled, its entry not written yet: only a placeholder would be left.
                KeyState::Written { stored: false, .. } => None,
                // Handled with the entry claimed ahead, or known before: as they should be.
                KeyState::Written { stored: true, .. } | KeyState::Existing(_) => continue,
            };
            keys.push(key);
            offsets.push(offset);
        }
        // A transaction the handler may have begun after ending ours is not this batch's.
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *self.tx).await;
        let released = match split_all(&keys) {
            Ok((groups, tenants, bytes)) => {
                sqlx::query(self.store.sql.release_committed_claims.clone())
                    .bind(&groups)
                    .bind(&tenants)
                    .bind(&bytes)
                    .bind(&offsets)
                    .bind(&p.topic)
                    .bind(p.partition)
                    .execute(&mut *self.tx)
                    .await
                    .map(|done| done.rows_affected())
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let released = match released {
            Ok(n) => format!("{n} claims of records not handled yet were released"),
            Err(e) => format!("releasing the claims of records not handled yet failed ({e})"),
        };
        tracing::error!(
            topic = %p.topic,
            partition = p.partition,
            %released,
            "a handler ended the store transaction"
        );
        Error::store(
            format!(
                "{}/{}: a handler ended the store transaction (COMMIT or ROLLBACK on \
                 PgTx::conn()), so the batch's effects, dedup entries and position are no \
                 longer one atomic write; the position was not advanced and {released}",
                p.topic, p.partition
            ),
            "handlers must leave the transaction to the runtime",
        )
    }
}

impl Transaction for PgTx {
    const SAVEPOINT_ROUND_TRIP: bool = true;

    #[cfg(feature = "resolve")]
    const RESOLVES: bool = true;

    #[cfg(feature = "resolve")]
    async fn lock_entity(&mut self, entity: &str) -> Result<crate::resolve::EntityLock> {
        self.lock_entity_row(entity).await
    }

    #[cfg(feature = "resolve")]
    async fn put_entity(&mut self, state: &crate::resolve::EntityState) -> Result<()> {
        self.put_entity_row(state).await
    }

    #[cfg(feature = "resolve")]
    async fn put_resolution(
        &mut self,
        resolution: &crate::resolve::Resolution,
        expires_at_ms: i64,
    ) -> Result<()> {
        self.put_resolution_row(resolution, expires_at_ms).await
    }

    fn is_transient_failure(&self, error: &HandlerError) -> bool {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = next {
            if let Some(e) = e.downcast_ref::<sqlx::Error>() {
                return is_transient(e);
            }
            next = e.source();
        }
        false
    }

    async fn lookup(&mut self, key: &[u8]) -> Result<Option<DedupEntry>> {
        match self.keys.get(key) {
            Some(KeyState::Existing(entry) | KeyState::Written { entry, .. }) => {
                return Ok(Some(entry.clone()));
            }
            Some(KeyState::Claimed(_)) => return Ok(None),
            None => {}
        }
        let found = select_entries(&mut self.tx, &self.store.sql, &[key]).await?;
        Ok(found
            .into_iter()
            .find(|(_, e)| !e.status_is_claimed)
            .map(|(_, e)| e.entry))
    }

    async fn prepare_claims(&mut self, claims: &[ClaimAhead<'_>], now_ms: i64) -> Result<()> {
        let claims: Vec<_> = claims.iter().map(|c| (c.key, Some(c))).collect();
        self.claim_unknown(&claims, now_ms).await
    }

    async fn claim(&mut self, key: &[u8], now_ms: i64) -> Result<Claim> {
        if !self.keys.contains_key(key) {
            self.claim_unknown(&[(key, None)], now_ms).await?;
        }
        match self.keys.get(key) {
            Some(KeyState::Claimed(_)) => Ok(Claim::Claimed),
            Some(KeyState::Existing(entry) | KeyState::Written { entry, .. }) => {
                Ok(Claim::Existing(entry.clone()))
            }
            None => Err(Error::Corrupt(
                "a claimed key vanished from the transaction".into(),
            )),
        }
    }

    #[cfg(feature = "outbox")]
    fn begin_record(&mut self, store_key: &[u8], record: &crate::Record) {
        self.publications.begin_record(store_key, record);
    }

    async fn savepoint(&mut self) -> Result<()> {
        let statement = if self.savepoint {
            "RELEASE SAVEPOINT idc_record; SAVEPOINT idc_record"
        } else {
            "SAVEPOINT idc_record"
        };
        sqlx::raw_sql(statement)
            .execute(&mut *self.tx)
            .await
            .map_err(pg("setting a savepoint"))?;
        self.savepoint = true;
        #[cfg(feature = "outbox")]
        self.publications.savepoint();
        self.undo.clear();
        self.deferred_marks.clear();
        self.deferred_marks
            .extend(self.deferred.iter().map(|(_, rows)| rows.len()));
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> Result<()> {
        if !self.savepoint {
            return Err(Error::Config("rollback without a savepoint".into()));
        }
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT idc_record")
            .execute(&mut *self.tx)
            .await
            .map_err(pg("rolling back to a savepoint"))?;
        #[cfg(feature = "outbox")]
        self.publications.rollback_to_savepoint();
        while let Some((key, before)) = self.undo.pop() {
            match before {
                Some(state) => self.keys.insert(key, state),
                None => self.keys.remove(&key),
            };
        }
        for (i, (_, rows)) in self.deferred.iter_mut().enumerate() {
            rows.truncate(self.deferred_marks.get(i).copied().unwrap_or(0));
        }
        Ok(())
    }

    async fn write_deferred(&mut self) -> Result<DeferredWrites> {
        match batch::write_all(&mut self.tx, &mut self.deferred).await {
            Ok(()) => {}
            Err(e) if is_transient(&e) => {
                return Err(Error::store_transient("writing deferred rows", e));
            }
            Err(e) => return Ok(DeferredWrites::Rejected(batch::record_error(e))),
        }
        // Written rows are below every mark now.
        self.deferred_marks.iter_mut().for_each(|m| *m = 0);
        Ok(DeferredWrites::Written)
    }

    async fn put_entry(&mut self, key: &[u8], entry: &DedupEntry) -> Result<()> {
        let stored =
            matches!(self.keys.get(key), Some(KeyState::Claimed(Some(row))) if row == entry);
        let entry = entry.clone();
        self.set_key(key, KeyState::Written { entry, stored });
        Ok(())
    }

    async fn put_dead_letter(&mut self, dead_letter: &DeadLetter) -> Result<()> {
        self.dead_letters.push(dead_letter.clone());
        Ok(())
    }

    async fn commit(mut self, next_offset: i64) -> Result<()> {
        let sql = &self.store.sql;
        let p = &self.partition;
        // The fence first: it takes the position row's lock, so an acquire waits for this
        // commit, and a bumped epoch stops it before anything else is written.
        let advanced = sqlx::query(sql.advance.clone())
            .bind(&p.group)
            .bind(&p.topic)
            .bind(p.partition)
            .bind(next_offset)
            .bind(self.epoch as i64)
            .bind(&self.store.owner)
            .bind(self.claimed_in)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(pg("advancing the position"))?;
        if advanced.is_none() {
            let current: Option<i64> = sqlx::query_scalar(sql.epoch.clone())
                .bind(&p.group)
                .bind(&p.topic)
                .bind(p.partition)
                .fetch_optional(&mut *self.tx)
                .await
                .map_err(pg("reading the epoch"))?;
            if self.claimed_in.is_some() && current == Some(self.epoch as i64) {
                return Err(self.transaction_ended_by_a_handler().await);
            }
            let _ = self.tx.rollback().await;
            return Err(Error::fenced(p, self.epoch, current.unwrap_or(0) as u64));
        }

        // Rows still deferred (the runtime writes them before the commit, so a failure can be
        // put down to a record; a caller driving the transaction may not have).
        batch::write_all(&mut self.tx, &mut self.deferred)
            .await
            .map_err(pg("writing deferred rows"))?;

        // The entries written by the batch (the last write of a key is its state), as columns.
        let mut rows = EntryColumns::default();
        for (key, state) in &self.keys {
            if let KeyState::Written {
                entry,
                stored: false,
            } = state
            {
                rows.push(key, entry)?;
            }
        }
        if !rows.keys.is_empty() {
            sqlx::query(sql.write_entries.clone())
                .bind(rows.groups)
                .bind(rows.tenants)
                .bind(rows.keys)
                .bind(rows.statuses)
                .bind(rows.fingerprints)
                .bind(rows.outcomes)
                .bind(rows.topics)
                .bind(rows.partitions)
                .bind(rows.offsets)
                .bind(rows.created)
                .bind(rows.expires)
                .execute(&mut *self.tx)
                .await
                .map_err(pg("writing dedup entries"))?;
        }

        // Claims no record finished (it will be retried, or the batch stopped before it).
        let unfinished: Vec<&[u8]> = self
            .keys
            .iter()
            .filter(|(_, s)| matches!(s, KeyState::Claimed(_)))
            .map(|(k, _)| k.as_slice())
            .collect();
        if !unfinished.is_empty() {
            let (groups, tenants, bytes) = split_all(&unfinished)?;
            sqlx::query(sql.release_claims.clone())
                .bind(&groups)
                .bind(&tenants)
                .bind(&bytes)
                .execute(&mut *self.tx)
                .await
                .map_err(pg("releasing unfinished claims"))?;
        }

        if !self.dead_letters.is_empty() {
            let d = &self.dead_letters;
            let r = |f: fn(&DeadLetter) -> i64| d.iter().map(f).collect::<Vec<_>>();
            sqlx::query(sql.write_dead_letters.clone())
                .bind(&p.group)
                .bind(d.iter().map(|l| l.record.topic()).collect::<Vec<_>>())
                .bind(d.iter().map(|l| l.record.partition()).collect::<Vec<_>>())
                .bind(r(|l| l.record.offset()))
                .bind(d.iter().map(|l| l.key.as_deref()).collect::<Vec<_>>())
                .bind(d.iter().map(|l| l.reason.as_str()).collect::<Vec<_>>())
                .bind(d.iter().map(|l| l.message.as_str()).collect::<Vec<_>>())
                .bind(
                    d.iter()
                        .map(|l| i32::try_from(l.attempts).unwrap_or(i32::MAX))
                        .collect::<Vec<_>>(),
                )
                .bind(d.iter().map(|l| l.record.key()).collect::<Vec<_>>())
                .bind(d.iter().map(|l| l.record.payload()).collect::<Vec<_>>())
                .bind(r(|l| l.first_failed_at_ms))
                .bind(r(|l| l.failed_at_ms))
                // The payload once: in its column, the rest of the letter beside it.
                .bind(d.iter().map(DeadLetter::encode_apart).collect::<Vec<_>>())
                .execute(&mut *self.tx)
                .await
                .map_err(pg("writing dead letters"))?;
        }

        #[cfg(feature = "outbox")]
        let published = {
            let rows = self.publications.take();
            super::outbox::write_rows(&mut self.tx, &self.store.outbox, &rows).await?;
            rows.len()
        };
        self.tx.commit().await.map_err(pg("committing a batch"))?;
        #[cfg(feature = "outbox")]
        crate::outbox::count_published(published);
        Ok(())
    }
}

/// Publishes through the outbox, committed with this transaction (feature `outbox`).
#[cfg(feature = "outbox")]
impl crate::outbox::Publish for PgTx {
    fn publish(
        &mut self,
        publication: crate::outbox::Publication,
    ) -> std::result::Result<String, crate::outbox::PublishError> {
        self.publications.publish(publication)
    }
}
