//! The handler's side: the request's open store transaction, as an axum extractor.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use super::{ClientKey, Problem};
use crate::error::{Error, Result};

/// The store's open transaction for one request, handed to the handler by
/// [`IdempotencyLayer`](super::IdempotencyLayer): what the handler writes through it commits
/// with the key's entry and the stored answer, in one transaction, or not at all.
///
/// `T` is the store's [`RequestTx`](crate::RequestStore::RequestTx): `PgRequestTx` on
/// PostgreSQL, `RocksRequestTx` on RocksDB. Take it as an argument of the handler:
///
/// ```ignore
/// async fn create(tx: Tx<PgRequestTx>, Json(payment): Json<Payment>) -> Response {
///     let mut tx = tx.lock().await?;
///     sqlx::query("INSERT ...").execute(tx.conn()).await?;
///     ...
/// }
/// ```
pub struct Tx<T> {
    shared: Arc<Shared<T>>,
}

struct Shared<T> {
    slot: Mutex<Option<T>>,
    key: Option<ClientKey>,
    tenant: Option<String>,
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        Tx {
            shared: self.shared.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Tx<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("key", &self.shared.key)
            .field("tenant", &self.shared.tenant.is_some())
            .finish_non_exhaustive()
    }
}

/// The locked transaction ([`Tx::lock`]).
pub type TxGuard<'a, T> = MappedMutexGuard<'a, T>;

impl<T> Tx<T> {
    pub(super) fn new(tx: T, key: Option<ClientKey>, tenant: Option<String>) -> Self {
        Tx {
            shared: Arc::new(Shared {
                slot: Mutex::new(Some(tx)),
                key,
                tenant,
            }),
        }
    }

    /// The transaction, until the handler returns ([`Error::RequestEnded`] after: a task the
    /// handler spawned cannot write once the request was answered). Hold the guard while you
    /// use the transaction, not across a long wait for something else: the layer renews the
    /// key's lease on the transaction itself between your uses (PostgreSQL ends a transaction
    /// left idle longer than the lease).
    pub async fn lock(&self) -> Result<TxGuard<'_, T>> {
        MutexGuard::try_map(self.shared.slot.lock().await, Option::as_mut)
            .map_err(|_| Error::RequestEnded)
    }

    /// The client's key (`None` on an endpoint where it is optional and the request had none).
    /// Pass it on as the `idempotency-key` header of an event the request emits, and the
    /// consumers of the event deduplicate a retried emission.
    pub fn client_key(&self) -> Option<&ClientKey> {
        self.shared.key.as_ref()
    }

    /// The tenant the layer scoped the key by, if it has a tenant function.
    pub fn tenant(&self) -> Option<&str> {
        self.shared.tenant.as_deref()
    }

    /// The transaction if the handler is not using it at the moment (`None` inside: gone).
    pub(super) fn try_idle(&self) -> Option<MutexGuard<'_, Option<T>>> {
        self.shared.slot.try_lock().ok()
    }

    /// Takes the transaction back once the handler returned.
    pub(super) async fn take(&self) -> Option<T> {
        self.shared.slot.lock().await.take()
    }
}

impl<T, S> FromRequestParts<S> for Tx<T>
where
    T: Send + 'static,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        parts.extensions.get::<Tx<T>>().cloned().ok_or_else(|| {
            tracing::error!(
                transaction = std::any::type_name::<T>(),
                "a handler takes a request transaction but its route is not under an \
                 IdempotencyLayer of that store"
            );
            Problem::internal("the server is misconfigured").into_response()
        })
    }
}

/// A handler's error as the answer: a lost lease is 409, a transient store failure 503,
/// anything else 500; the cause is logged, never sent.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let problem = if self.is_lease_lost() {
            Problem::superseded()
        } else if self.is_transient() {
            tracing::warn!(error = %self, "a request failed transiently");
            Problem::unavailable()
        } else {
            tracing::error!(error = %self, "a request failed");
            Problem::internal("the request failed")
        };
        problem.into_response()
    }
}

#[cfg(any(feature = "rocksdb", feature = "memory"))]
impl IntoResponse for crate::store::StateError {
    fn into_response(self) -> Response {
        match self {
            crate::store::StateError::Store(e) => e.into_response(),
            busy => {
                tracing::warn!(error = %busy, "a request's state key stayed busy");
                Problem::unavailable().into_response()
            }
        }
    }
}
