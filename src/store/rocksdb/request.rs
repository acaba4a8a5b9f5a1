//! Idempotency keys of requests on RocksDB: a request key's entry (`RequestEntry`) lives in the
//! dedup family beside the consumer's entries, indexed for the same purge. Claims, renewals,
//! releases and the completing commit read and write it under one lock of the store, so of two
//! requests with one key exactly one holds it; the handler's state writes and the completed
//! entry land in ONE `WriteBatch`, only while the lease is still the request's own.

use std::time::Duration;

use rocksdb::{WriteBatch, WriteOptions};

use super::keys::{CF_DEDUP, CF_EXPIRY, request_expiry_key};
use super::tx::{RocksTx, StateError};
use super::{Inner, RocksStore, rocks};
use crate::error::{Error, Result};
use crate::store::now_ms;
use crate::store::request::{Lease, RequestClaim, RequestEntry, RequestStore};

/// What the store keeps for request keys: their locks, by stripe of the key's hash, and the
/// write options of claims, renewals and releases.
pub(super) struct Requests {
    stripes: Box<[std::sync::Mutex<()>]>,
    /// Not synced: a claim, renewal or release lost with the machine (never with the process:
    /// the WAL is written before the call returns) is a key nobody completed, which a retry
    /// runs, as after its lease. The completing write is synced as the store's commits are,
    /// and its sync covers every write before it in the WAL.
    unsynced: WriteOptions,
}

impl Default for Requests {
    fn default() -> Self {
        let mut unsynced = WriteOptions::default();
        unsynced.set_sync(false);
        Requests {
            stripes: (0..64).map(|_| std::sync::Mutex::new(())).collect(),
            unsynced,
        }
    }
}

impl Requests {
    /// The lock of `key`'s stripe.
    fn lock(&self, key: &[u8]) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::BuildHasher;
        let hash = foldhash::fast::FixedState::default().hash_one(key);
        let stripe = &self.stripes[(hash % self.stripes.len() as u64) as usize];
        stripe.lock().expect("request lock poisoned")
    }
}

/// Whether a request key's write is synced.
#[derive(Clone, Copy)]
enum Durable {
    /// As the store's commits (the completing write).
    AsCommits,
    /// Not synced (claims, renewals, releases).
    No,
}

fn after(now_ms: i64, d: Duration) -> i64 {
    now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Inner {
    fn request_entry(&self, key: &[u8]) -> Result<Option<RequestEntry>> {
        self.read_entry(key, RequestEntry::decode)
    }

    fn opts(&self, durable: Durable) -> &WriteOptions {
        match durable {
            Durable::AsCommits => &self.write_opts,
            Durable::No => &self.requests.unsynced,
        }
    }

    /// Writes `entry` under `key` with its index row, together with `batch`.
    fn write_request(
        &self,
        mut batch: WriteBatch,
        key: &[u8],
        entry: &RequestEntry,
        durable: Durable,
    ) -> Result<()> {
        batch.put_cf(self.cf(CF_DEDUP), key, entry.encode());
        batch.put_cf(
            self.cf(CF_EXPIRY),
            request_expiry_key(entry.expires_at_ms, key),
            [],
        );
        // Shared, as a commit: a purge round never deletes what this rewrites.
        let _shared = self.purge_gate.read().expect("purge gate poisoned");
        self.db
            .write_opt(batch, self.opts(durable))
            .map_err(rocks("writing a request's key"))
    }

    /// The entry of `lease`'s key while `lease` holds it.
    fn held(&self, lease: &Lease) -> Result<Option<RequestEntry>> {
        Ok(self
            .request_entry(lease.key())?
            .filter(|e| e.in_flight && e.token == lease.token()))
    }
}

/// How long a request's transaction waits for a key of the handler's state that another
/// transaction (a request's or a consumer batch's) holds, before [`StateError::KeyBusy`].
pub const REQUEST_STATE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The handler's transaction for one request on RocksDB: [`get`](RocksRequestTx::get),
/// [`put`](RocksRequestTx::put) and [`delete`](RocksRequestTx::delete) on the handler's own key
/// space, as on [`RocksTx`]; nothing is written until the request commits, in one
/// `WriteBatch` with the key's entry and the stored answer.
///
/// Every key the transaction touches stays locked until it commits or is dropped, so a
/// read-modify-write (a balance debited by two payments at once) is safe; a key another
/// transaction holds is waited for, up to [`REQUEST_STATE_LOCK_WAIT`]. Two requests that lock the same
/// keys in opposite orders wait for each other until one gives up: touch keys in one order.
#[derive(Debug)]
pub struct RocksRequestTx {
    tx: RocksTx,
}

impl RocksRequestTx {
    /// Waits until this transaction holds `key`.
    async fn lock(&mut self, key: &[u8]) -> std::result::Result<(), StateError> {
        let deadline = tokio::time::Instant::now() + REQUEST_STATE_LOCK_WAIT;
        let mut pause = Duration::from_micros(200);
        while !self.tx.try_lock_data(key) {
            if tokio::time::Instant::now() >= deadline {
                return Err(StateError::KeyBusy);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Reads a key of the handler's state, seeing this request's own writes.
    pub async fn get(
        &mut self,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<Option<Vec<u8>>, StateError> {
        self.lock(key.as_ref()).await?;
        self.tx.get(key)
    }

    /// Writes a key of the handler's state.
    pub async fn put(
        &mut self,
        key: impl AsRef<[u8]>,
        value: impl Into<Vec<u8>>,
    ) -> std::result::Result<(), StateError> {
        self.lock(key.as_ref()).await?;
        self.tx.put(key, value);
        Ok(())
    }

    /// Deletes a key of the handler's state.
    pub async fn delete(&mut self, key: impl AsRef<[u8]>) -> std::result::Result<(), StateError> {
        self.lock(key.as_ref()).await?;
        self.tx.delete(key);
        Ok(())
    }

    /// The handler's writes, refused if one of them was dropped on a busy key (never, through
    /// this type's methods: they wait).
    fn batch(&self) -> Result<WriteBatch> {
        if self.tx.is_conflicted() {
            return Err(Error::store_transient(
                "committing a request",
                "a key of the handler's state was held by another transaction",
            ));
        }
        Ok(self.tx.data_batch())
    }
}

impl RequestStore for RocksStore {
    type RequestTx = RocksRequestTx;

    async fn claim_request(
        &self,
        key: &[u8],
        fingerprint: &[u8],
        lease: Duration,
        window: Duration,
    ) -> Result<RequestClaim> {
        let inner = &self.inner;
        let _one = inner.requests.lock(key);
        let now = now_ms();
        if let Some(entry) = inner.request_entry(key)?
            && !entry.is_free(now)
        {
            return Ok(entry.found());
        }
        let token = crate::store::new_id();
        let entry = RequestEntry {
            in_flight: true,
            lease_until_ms: after(now, lease),
            created_at_ms: now,
            expires_at_ms: after(now, window),
            fingerprint: fingerprint.to_vec(),
            token: token.clone(),
            response: Vec::new(),
        };
        inner.write_request(WriteBatch::default(), key, &entry, Durable::No)?;
        Ok(RequestClaim::Claimed(Lease::new(
            key,
            token,
            entry.lease_until_ms,
        )))
    }

    async fn renew_request(&self, lease: &mut Lease, lease_for: Duration) -> Result<bool> {
        let inner = &self.inner;
        let _one = inner.requests.lock(lease.key());
        let Some(mut entry) = inner.held(lease)? else {
            return Ok(false);
        };
        entry.lease_until_ms = after(now_ms(), lease_for);
        inner.write_request(WriteBatch::default(), lease.key(), &entry, Durable::No)?;
        lease.set_until_ms(entry.lease_until_ms);
        Ok(true)
    }

    async fn release_request(&self, lease: &Lease) -> Result<bool> {
        let inner = &self.inner;
        let _one = inner.requests.lock(lease.key());
        if inner.held(lease)?.is_none() {
            return Ok(false);
        }
        // Its index row stays; the purge passes over a key without the row's entry.
        inner
            .db
            .delete_cf_opt(inner.cf(CF_DEDUP), lease.key(), inner.opts(Durable::No))
            .map_err(rocks("releasing a request's key"))?;
        Ok(true)
    }

    async fn begin_request(&self) -> Result<RocksRequestTx> {
        Ok(RocksRequestTx {
            tx: RocksTx::for_request(self),
        })
    }

    async fn commit_request(
        &self,
        tx: RocksRequestTx,
        lease: &Lease,
        response: &[u8],
        window: Duration,
    ) -> Result<i64> {
        let inner = &self.inner;
        let batch = tx.batch()?;
        let _one = inner.requests.lock(lease.key());
        let Some(held) = inner.held(lease)? else {
            return Err(Error::LeaseLost);
        };
        let now = now_ms();
        let entry = RequestEntry {
            in_flight: false,
            lease_until_ms: 0,
            created_at_ms: now,
            expires_at_ms: after(now, window),
            fingerprint: held.fingerprint,
            token: String::new(),
            response: response.to_vec(),
        };
        inner.write_request(batch, lease.key(), &entry, Durable::AsCommits)?;
        // The handler's state keys stay locked until the batch is written.
        drop(tx);
        Ok(entry.expires_at_ms)
    }

    async fn commit_unkeyed(&self, tx: RocksRequestTx) -> Result<()> {
        let inner = &self.inner;
        let batch = tx.batch()?;
        inner
            .db
            .write_opt(batch, &inner.write_opts)
            .map_err(rocks("committing a request"))?;
        drop(tx);
        Ok(())
    }
}
