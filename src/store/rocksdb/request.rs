//! Idempotency keys of requests on RocksDB: a claim is held in this process (`Requests`, one
//! lock per stripe of keys), so of two requests with one key exactly one holds it; the
//! handler's state writes and the key's completed entry (`RequestEntry`, in the dedup family
//! beside the consumer's entries, indexed for the same purge) land in ONE synced `WriteBatch`,
//! only while the lease is still the request's own.

use std::time::Duration;

use rocksdb::WriteBatch;

use super::keys::{CF_DEDUP, CF_EXPIRY, request_expiry_key};
use super::tx::RocksTx;
use super::{Inner, RocksStore, rocks};
use crate::error::{Error, Result};
use crate::store::StateError;
use crate::store::now_ms;
use crate::store::request::{Lease, RequestClaim, RequestEntry, RequestStore};

/// Claims of request keys held by this process, by stripe of the key's hash (requests with
/// other keys claim and commit at once).
///
/// A claim lives here, not in the database: a RocksDB directory is open in one process at a
/// time (RocksDB's lock), so no other server can hold one of its keys, and a claim outlives
/// its process for no one. After a crash a retry runs at once instead of waiting for the dead
/// request's lease. The answer is the one durable write: the handler's writes, the key's
/// completed entry and its index row in one synced `WriteBatch`.
pub(super) struct Requests {
    stripes: Box<[std::sync::Mutex<Claims>]>,
}

/// The in-flight claims of one stripe (entries with `in_flight` set).
type Claims = foldhash::HashMap<Vec<u8>, RequestEntry>;

/// A stripe holding this many claims drops those whose lease ran out when it takes another.
const SWEEP_AT: usize = 64;

impl Default for Requests {
    fn default() -> Self {
        Requests {
            stripes: (0..1024).map(|_| std::sync::Mutex::default()).collect(),
        }
    }
}

impl Requests {
    /// The claims of `key`'s stripe, locked.
    fn lock(&self, key: &[u8]) -> std::sync::MutexGuard<'_, Claims> {
        use std::hash::BuildHasher;
        let hash = foldhash::fast::FixedState::default().hash_one(key);
        let stripe = &self.stripes[(hash % self.stripes.len() as u64) as usize];
        stripe.lock().expect("request lock poisoned")
    }
}

/// The claim of `lease`'s key while `lease` holds it.
fn held<'a>(claims: &'a mut Claims, lease: &Lease) -> Option<&'a mut RequestEntry> {
    claims
        .get_mut(lease.key())
        .filter(|e| e.token == lease.token())
}

fn after(now_ms: i64, d: Duration) -> i64 {
    now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Inner {
    /// The key's answered entry, if it has one. An in-flight entry in the database (written by
    /// an earlier version, which kept claims there) belongs to a process that is gone.
    fn answered(&self, key: &[u8]) -> Result<Option<RequestEntry>> {
        Ok(self
            .read_entry(key, RequestEntry::decode)?
            .filter(|e| !e.in_flight))
    }

    /// Writes `entry` under `key` with its index row, together with `batch`, synced as the
    /// store's commits are.
    fn write_request(&self, mut batch: WriteBatch, key: &[u8], entry: &RequestEntry) -> Result<()> {
        batch.put_cf(self.cf(CF_DEDUP), key, entry.encode());
        batch.put_cf(
            self.cf(CF_EXPIRY),
            request_expiry_key(entry.expires_at_ms, key),
            [],
        );
        // Shared, as a commit: a purge round never deletes what this rewrites.
        let _shared = self.purge_gate.read().expect("purge gate poisoned");
        self.db
            .write_opt(batch, &self.write_opts)
            .map_err(rocks("writing a request's key"))
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
}

impl RequestStore for RocksStore {
    type RequestTx = RocksRequestTx;

    async fn claim_request(
        &self,
        key: &[u8],
        fingerprint: &[u8],
        lease: Duration,
        window: Duration,
    ) -> Result<RequestClaim<RocksRequestTx>> {
        let inner = &self.inner;
        let mut claims = inner.requests.lock(key);
        let now = now_ms();
        if let Some(holder) = claims.get(key)
            && !holder.is_free(now)
        {
            return Ok(holder.clone().found());
        }
        if let Some(answered) = inner.answered(key)?
            && !answered.is_free(now)
        {
            return Ok(answered.found());
        }
        if claims.len() >= SWEEP_AT {
            claims.retain(|_, claim| !claim.is_free(now));
        }
        let token = crate::store::new_id();
        let claim = RequestEntry {
            in_flight: true,
            lease_until_ms: after(now, lease),
            created_at_ms: now,
            expires_at_ms: after(now, window),
            fingerprint: fingerprint.to_vec(),
            token: token.clone(),
            response: Vec::new(),
        };
        let until_ms = claim.lease_until_ms;
        claims.insert(key.to_vec(), claim);
        Ok(RequestClaim::Claimed {
            lease: Lease::new(key, fingerprint, token, until_ms),
            tx: RocksRequestTx {
                tx: RocksTx::for_request(self),
            },
        })
    }

    async fn renew_request(
        &self,
        lease: &mut Lease,
        _tx: Option<&mut RocksRequestTx>,
        lease_for: Duration,
    ) -> Result<bool> {
        let mut claims = self.inner.requests.lock(lease.key());
        let Some(claim) = held(&mut claims, lease) else {
            return Ok(false);
        };
        claim.lease_until_ms = after(now_ms(), lease_for);
        lease.set_until_ms(claim.lease_until_ms);
        Ok(true)
    }

    async fn release_request(&self, lease: &Lease, tx: Option<RocksRequestTx>) -> Result<bool> {
        // Nothing of the transaction was written; its state keys are let go with it.
        drop(tx);
        let mut claims = self.inner.requests.lock(lease.key());
        if held(&mut claims, lease).is_none() {
            return Ok(false);
        }
        claims.remove(lease.key());
        Ok(true)
    }

    async fn begin_request(&self) -> Result<RocksRequestTx> {
        Ok(RocksRequestTx {
            tx: RocksTx::for_request(self),
        })
    }

    async fn commit_request(
        &self,
        mut tx: RocksRequestTx,
        lease: &Lease,
        response: &[u8],
        window: Duration,
    ) -> Result<i64> {
        let inner = &self.inner;
        let batch = tx.tx.data_batch();
        let published = tx.tx.take_published();
        let mut claims = inner.requests.lock(lease.key());
        let Some(claim) = held(&mut claims, lease) else {
            return Err(Error::LeaseLost);
        };
        let now = now_ms();
        let entry = RequestEntry {
            in_flight: false,
            lease_until_ms: 0,
            created_at_ms: now,
            expires_at_ms: after(now, window),
            fingerprint: claim.fingerprint.clone(),
            token: String::new(),
            response: response.to_vec(),
        };
        inner.write_with_published(batch, published, |batch| {
            inner.write_request(batch, lease.key(), &entry)
        })?;
        claims.remove(lease.key());
        // The handler's state keys stay locked until the batch is written.
        drop(tx);
        Ok(entry.expires_at_ms)
    }

    async fn commit_unkeyed(&self, mut tx: RocksRequestTx) -> Result<()> {
        let inner = &self.inner;
        let batch = tx.tx.data_batch();
        let published = tx.tx.take_published();
        inner.write_with_published(batch, published, |batch| {
            inner
                .db
                .write_opt(batch, &inner.write_opts)
                .map_err(rocks("committing a request"))
        })?;
        drop(tx);
        Ok(())
    }

    #[cfg(feature = "outbox")]
    fn begin_source(&self, tx: &mut RocksRequestTx, key: Option<&[u8]>) {
        tx.tx.publications.begin_request(key);
    }
}

/// Publishes through the outbox, committed with this transaction (feature `outbox`).
#[cfg(feature = "outbox")]
impl crate::outbox::Publish for RocksRequestTx {
    fn publish(
        &mut self,
        publication: crate::outbox::Publication,
    ) -> std::result::Result<String, crate::outbox::PublishError> {
        self.tx.publications.publish(publication)
    }
}
