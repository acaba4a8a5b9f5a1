//! Claims on PostgreSQL: a batch's keys inserted as uncommitted `claimed` rows, so a concurrent
//! batch of another instance inserting the same key waits on the primary key until ours commits
//! (it then sees a duplicate) or rolls back (it then claims the key). What the transaction
//! learns of each key is its `KeyState`.

use super::PgTx;
use super::errors::pg;
use super::rows::{select_entries, split, split_all, store_key_of};
use super::sql::clamp_ms;
use crate::error::{Error, Result};
use crate::store::ClaimAhead;
use crate::store::entry::DedupEntry;

/// What a transaction knows about a key.
#[derive(Debug, Clone)]
pub(super) enum KeyState {
    /// Claimed by this transaction; its row holds a placeholder (`None`) or, claimed ahead, the
    /// entry its record usually leaves (not an entry yet: released by the commit unless
    /// written).
    Claimed(Option<DedupEntry>),
    /// A live entry committed by an earlier transaction.
    Existing(DedupEntry),
    /// Written by this transaction. `stored`: the row claimed ahead already holds it; otherwise
    /// it goes to the table in the commit.
    Written { entry: DedupEntry, stored: bool },
}

impl PgTx {
    /// Keeps the id of the transaction that inserted the first claims: the commit checks that
    /// it is still the same one (a handler may have ended it on `conn()`).
    fn note_claiming_transaction(&mut self, claimed: &[sqlx::postgres::PgRow]) -> Result<()> {
        use sqlx::Row;
        if self.claimed_in.is_none()
            && let Some(row) = claimed.first()
        {
            let xid: i64 = row
                .try_get("xid")
                .map_err(pg("reading the transaction id"))?;
            self.claimed_in = Some(xid);
        }
        Ok(())
    }

    /// Claims every key of `claims` not known yet, in one insert (two if some come with the
    /// entry to write and some without); then reads the entries of the ones it did not get,
    /// taking over the expired ones.
    pub(super) async fn claim_unknown(
        &mut self,
        claims: &[(&[u8], Option<&ClaimAhead<'_>>)],
        now_ms: i64,
    ) -> Result<()> {
        let mut unknown: Vec<(&[u8], Option<&ClaimAhead<'_>>)> = claims
            .iter()
            .copied()
            .filter(|(k, _)| !self.keys.contains_key(*k))
            .collect();
        // Stable: of a key's claims, the first (its first record's) stays.
        unknown.sort_by(|a, b| a.0.cmp(b.0));
        unknown.dedup_by(|a, b| a.0 == b.0);
        // A key the purge deleted between the insert and the read, or that another batch
        // refreshed between the read and the takeover, is simply tried again.
        let mut not_expired_here = std::collections::HashSet::new();
        for _ in 0..3 {
            if unknown.is_empty() {
                return Ok(());
            }
            let (ahead, plain): (Vec<_>, Vec<_>) =
                unknown.iter().partition(|(_, entry)| entry.is_some());
            if !ahead.is_empty() {
                let keys: Vec<&[u8]> = ahead.iter().map(|(k, _)| *k).collect();
                let (groups, tenants, bytes) = split_all(&keys)?;
                let entries: Vec<&ClaimAhead<'_>> = ahead.iter().filter_map(|(_, e)| *e).collect();
                let claimed = sqlx::query(self.store.sql.claim_ahead.clone())
                    .bind(&groups)
                    .bind(&tenants)
                    .bind(&bytes)
                    .bind(entries.iter().map(|e| e.topic).collect::<Vec<_>>())
                    .bind(
                        entries
                            .iter()
                            .map(|e| e.fingerprint.0.as_slice())
                            .collect::<Vec<_>>(),
                    )
                    .bind(entries.iter().map(|e| e.partition).collect::<Vec<_>>())
                    .bind(entries.iter().map(|e| e.offset).collect::<Vec<_>>())
                    .bind(
                        entries
                            .iter()
                            .map(|e| clamp_ms(e.created_at_ms))
                            .collect::<Vec<_>>(),
                    )
                    .bind(
                        entries
                            .iter()
                            .map(|e| clamp_ms(e.expires_at_ms))
                            .collect::<Vec<_>>(),
                    )
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(pg("claiming keys"))?;
                self.note_claiming_transaction(&claimed)?;
                for row in &claimed {
                    let key = store_key_of(row)?;
                    let entry = ahead
                        .binary_search_by(|(k, _)| (*k).cmp(key.as_slice()))
                        .ok()
                        .and_then(|at| ahead[at].1)
                        .ok_or_else(|| {
                            Error::Corrupt("a claim returned a key not asked for".into())
                        })?
                        .entry();
                    self.set_key(&key, KeyState::Claimed(Some(entry)));
                }
            }
            if !plain.is_empty() {
                let keys: Vec<&[u8]> = plain.iter().map(|(k, _)| *k).collect();
                let (groups, tenants, bytes) = split_all(&keys)?;
                let claimed = sqlx::query(self.store.sql.claim_many.clone())
                    .bind(&groups)
                    .bind(&tenants)
                    .bind(&bytes)
                    .bind(&self.partition.topic)
                    .bind(clamp_ms(now_ms))
                    .fetch_all(&mut *self.tx)
                    .await
                    .map_err(pg("claiming keys"))?;
                self.note_claiming_transaction(&claimed)?;
                for row in &claimed {
                    self.set_key(&store_key_of(row)?, KeyState::Claimed(None));
                }
            }
            unknown.retain(|(k, _)| !self.keys.contains_key(*k));
            if unknown.is_empty() {
                return Ok(());
            }
            let keys: Vec<&[u8]> = unknown.iter().map(|(k, _)| *k).collect();
            for (key, read) in select_entries(&mut self.tx, &self.store.sql, &keys).await? {
                if read.status_is_claimed {
                    // Our own claims are known keys (filtered out above) and other
                    // transactions' claims are invisible: this row should not exist.
                    return Err(Error::Corrupt(
                        "a claimed dedup row was committed by another transaction".into(),
                    ));
                }
                // The database's clock has the last word: an instance whose clock runs fast
                // must not take over a key that has not expired (take_over refuses it, and the
                // entry read again then stands).
                if !read.entry.is_expired(now_ms) || not_expired_here.contains(&key) {
                    self.set_key(&key, KeyState::Existing(read.entry));
                    continue;
                }
                // Expired: take the row over, unless someone else refreshed it meanwhile.
                let (g, t, k) = split(&key)?;
                let took = sqlx::query(self.store.sql.take_over.clone())
                    .bind(g)
                    .bind(t)
                    .bind(k)
                    .bind(&self.partition.topic)
                    .bind(clamp_ms(now_ms))
                    .fetch_optional(&mut *self.tx)
                    .await
                    .map_err(pg("taking over an expired key"))?;
                if took.is_some() {
                    self.set_key(&key, KeyState::Claimed(None));
                } else {
                    // Refreshed meanwhile, or not expired by the database's clock: read again.
                    not_expired_here.insert(key);
                }
            }
            unknown.retain(|(k, _)| !self.keys.contains_key(*k));
        }
        Err(Error::store_transient(
            "claiming keys",
            "keys kept changing between the claim and the read",
        ))
    }
}
