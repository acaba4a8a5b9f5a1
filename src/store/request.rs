//! Idempotency keys of requests (HTTP, feature `http`): what a store promises for them.
//!
//! A request's key is claimed before the handler runs, as a lease, where every server that could
//! take the key sees it at once, and the claim opens the handler's transaction: a concurrent
//! request with the key sees it in flight instead of waiting on a lock. On PostgreSQL the claim
//! is a transaction-level advisory lock taken in the handler's own transaction, so a server that
//! dies lets it go with its session, and one whose transaction stays idle longer than the lease
//! loses its session to the database; on RocksDB, whose directory one process opens, it lives
//! in that process's memory and is taken over once its lease ran out. The handler's writes, the
//! key's completed entry and the stored answer then commit in ONE transaction that checks the
//! lease is still this request's: a request that outlived its lease and lost the key writes
//! nothing ([`Error::LeaseLost`](crate::Error::LeaseLost)).

use std::future::Future;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::store::entry::{REQUEST_ENTRY_VERSION, Reader, put_bytes};

/// A request's hold on its key, until [`until_ms`](Lease::until_ms) unless renewed.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    key: Vec<u8>,
    fingerprint: Vec<u8>,
    token: String,
    until_ms: i64,
}

impl Lease {
    pub(crate) fn new(key: &[u8], fingerprint: &[u8], token: String, until_ms: i64) -> Self {
        Lease {
            key: key.to_vec(),
            fingerprint: fingerprint.to_vec(),
            token,
            until_ms,
        }
    }

    /// The scoped store key held.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// When the lease runs out, milliseconds since the epoch (by the store's clock).
    pub fn until_ms(&self) -> i64 {
        self.until_ms
    }

    /// The fingerprint of the request holding it.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn fingerprint(&self) -> &[u8] {
        &self.fingerprint
    }

    /// What tells this holder from a later one (RocksDB's claims; empty on PostgreSQL, whose
    /// claim is the transaction's lock).
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    pub(crate) fn set_until_ms(&mut self, until_ms: i64) {
        self.until_ms = until_ms;
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key_bytes", &self.key.len())
            .field("until_ms", &self.until_ms)
            .finish_non_exhaustive()
    }
}

/// What claiming a request's key found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestClaim<T> {
    /// The key is this request's until the lease runs out: run the handler in `tx`, the
    /// transaction that holds it.
    Claimed {
        /// The request's hold on the key.
        lease: Lease,
        /// The handler's transaction ([`RequestStore::RequestTx`]).
        tx: T,
    },
    /// Another request holds the key.
    InFlight {
        /// The holder's request fingerprint; empty when the store cannot tell before the
        /// holder completes (PostgreSQL, where the claim is a lock and the key's row is written
        /// once, with the answer).
        fingerprint: Vec<u8>,
        /// When its lease runs out, milliseconds since the epoch; 0 when the store cannot tell
        /// (PostgreSQL: the lease is the holder's idle time, renewed by its every statement).
        until_ms: i64,
    },
    /// A request with the key completed: its fingerprint and its stored answer.
    Completed {
        /// The first request's fingerprint.
        fingerprint: Vec<u8>,
        /// Its stored answer.
        response: Vec<u8>,
        /// When the key expires and a new request with it runs again.
        expires_at_ms: i64,
    },
}

/// A store that keeps idempotency keys of requests beside the consumer's dedup entries, in the
/// same table or family and under the same bounded purge.
pub trait RequestStore: Send + Sync + 'static {
    /// The handler's transaction for one request.
    type RequestTx: Send + std::fmt::Debug + 'static;

    /// Claims `key` for a request with `fingerprint`, held for `lease`, and opens the handler's
    /// transaction that holds it; an abandoned claim is purged `window` after it was made. A
    /// completed key whose `window` has passed, or a claim whose lease ran out, is taken over.
    fn claim_request(
        &self,
        key: &[u8],
        fingerprint: &[u8],
        lease: Duration,
        window: Duration,
    ) -> impl Future<Output = Result<RequestClaim<Self::RequestTx>>> + Send;

    /// Holds the key `lease_for` longer. `tx` is the request's transaction when the handler is
    /// not using it at the moment (`None` while it is: a store whose lease is the transaction's
    /// own activity, PostgreSQL's, then has nothing to do). False when the key is no longer this
    /// request's.
    fn renew_request(
        &self,
        lease: &mut Lease,
        tx: Option<&mut Self::RequestTx>,
        lease_for: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Gives the key up without an answer (a 5xx, a dropped connection), rolling back `tx`, the
    /// request's transaction, when the caller still has it: the next request with the key runs.
    /// False when it was no longer this request's.
    fn release_request(
        &self,
        lease: &Lease,
        tx: Option<Self::RequestTx>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Opens the transaction of a request without a key (on an endpoint where the key is
    /// optional).
    fn begin_request(&self) -> impl Future<Output = Result<Self::RequestTx>> + Send;

    /// Commits the handler's writes with the key's completed entry and `response`, kept for
    /// `window`, in one transaction, if the lease is still this request's; otherwise writes
    /// nothing and fails with [`Error::LeaseLost`](crate::Error::LeaseLost). Returns when the
    /// key expires, milliseconds since the epoch (by the store's clock).
    fn commit_request(
        &self,
        tx: Self::RequestTx,
        lease: &Lease,
        response: &[u8],
        window: Duration,
    ) -> impl Future<Output = Result<i64>> + Send;

    /// Commits the handler's writes of a request without a key (on an endpoint where the key
    /// is optional): nothing is kept for a retry.
    fn commit_unkeyed(&self, tx: Self::RequestTx) -> impl Future<Output = Result<()>> + Send;

    /// Optional (feature `outbox`). Names what the events the request's handler publishes
    /// through `tx` derive their keys from: the request's scoped key (`key`), so a retried
    /// request publishes the same keys, or, for a request without one, a source of its own.
    /// The HTTP layer calls it on the transaction a claim or
    /// [`begin_request`](RequestStore::begin_request) opened. Default:
    /// nothing (a store without an outbox).
    #[cfg(feature = "outbox")]
    fn begin_source(&self, tx: &mut Self::RequestTx, key: Option<&[u8]>) {
        let _ = (tx, key);
    }
}

/// A request key's entry as the embedded stores keep it (PostgreSQL has columns instead).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub(crate) struct RequestEntry {
    /// Claimed and not answered yet (otherwise completed).
    pub(crate) in_flight: bool,
    pub(crate) lease_until_ms: i64,
    pub(crate) created_at_ms: i64,
    pub(crate) expires_at_ms: i64,
    pub(crate) fingerprint: Vec<u8>,
    /// The holder's lease token (empty once completed).
    pub(crate) token: String,
    pub(crate) response: Vec<u8>,
}

#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
impl RequestEntry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + self.fingerprint.len() + self.response.len());
        out.push(REQUEST_ENTRY_VERSION);
        out.push(u8::from(self.in_flight));
        for time in [self.lease_until_ms, self.created_at_ms, self.expires_at_ms] {
            out.extend_from_slice(&time.to_be_bytes());
        }
        put_bytes(&mut out, &self.fingerprint);
        put_bytes(&mut out, self.token.as_bytes());
        put_bytes(&mut out, &self.response);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "request entry");
        if r.u8()? != REQUEST_ENTRY_VERSION {
            return Err(Error::Corrupt(
                "a request's key holds a consumer's entry".into(),
            ));
        }
        let in_flight = match r.u8()? {
            0 => false,
            1 => true,
            other => return Err(Error::Corrupt(format!("bad request state {other}"))),
        };
        let mut time = || -> Result<i64> { Ok(i64::from_be_bytes(r.array()?)) };
        let (lease_until_ms, created_at_ms, expires_at_ms) = (time()?, time()?, time()?);
        let fingerprint = r.bytes()?.to_vec();
        let token = r.string()?;
        let response = r.bytes()?.to_vec();
        r.finish()?;
        Ok(RequestEntry {
            in_flight,
            lease_until_ms,
            created_at_ms,
            expires_at_ms,
            fingerprint,
            token,
            response,
        })
    }

    /// Whether a new claim takes the key over at `now_ms`: the holder's lease ran out, or the
    /// answer's window passed.
    pub(crate) fn is_free(&self, now_ms: i64) -> bool {
        if self.in_flight {
            self.lease_until_ms <= now_ms
        } else {
            self.expires_at_ms <= now_ms
        }
    }

    /// What a claim that does not take the key over finds.
    pub(crate) fn found<T>(self) -> RequestClaim<T> {
        if self.in_flight {
            RequestClaim::InFlight {
                fingerprint: self.fingerprint,
                until_ms: self.lease_until_ms,
            }
        } else {
            RequestClaim::Completed {
                fingerprint: self.fingerprint,
                response: self.response,
                expires_at_ms: self.expires_at_ms,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entry::DedupEntry;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_entries_round_trip_and_tell_their_expiry(
            in_flight in any::<bool>(),
            times in any::<(i64, i64, i64)>(),
            fingerprint in any::<Vec<u8>>(),
            token in "[a-z0-9]{0,20}",
            response in any::<Vec<u8>>(),
        ) {
            let entry = RequestEntry {
                in_flight,
                lease_until_ms: times.0,
                created_at_ms: times.1,
                expires_at_ms: times.2,
                fingerprint,
                token,
                response,
            };
            let bytes = entry.encode();
            prop_assert_eq!(DedupEntry::encoded_expiry(&bytes).unwrap(), times.2);
            prop_assert_eq!(RequestEntry::decode(&bytes).unwrap(), entry);
            prop_assert!(RequestEntry::decode(&bytes[..bytes.len() - 1]).is_err());
        }
    }
}
