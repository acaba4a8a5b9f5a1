//! Idempotency keys over HTTP (feature `http`): the protocol of the IETF draft "The
//! Idempotency-Key HTTP Header Field" (draft-ietf-httpapi-idempotency-key-header), in pieces a
//! server layer puts together.
//!
//! A request's walk, and where each step lives:
//!
//! 1. **The key** (`key.rs`): at most one `Idempotency-Key` field, a Structured Field string
//!    (RFC 9651), not empty, within a length limit; otherwise **400** with the reason.
//! 2. **The request's fingerprint** (`fingerprint.rs`): the target (path and query) and the body
//!    (its bytes, its JSON canonicalised, or a set of its JSON fields), hashed apart so that a
//!    reuse of the key with another request is **422** naming what differs.
//! 3. **The answer of a first run** is kept or not by the [`StorePolicy`] (`policy.rs`): by
//!    default 2xx and 4xx other than 408, 409 and 429 are kept; 5xx release the key so the
//!    client may try again.
//! 4. **The kept answer** (`response.rs`): status, an allow-list of headers and the body, replayed
//!    with `Idempotent-Replayed: true`.
//! 5. **Errors** (`problem.rs`) are RFC 9457 `application/problem+json` bodies.
//! 6. **Where the key lives** (`scope.rs`): namespace, tenant, method and route template, then
//!    the client's key, apart from every consumer key; the stores' side is
//!    [`RequestStore`](crate::RequestStore).
//! 7. **The server layer** (`layer.rs`): [`IdempotencyLayer`], a `tower::Layer` for axum routes,
//!    puts the steps together around the handler (`walk.rs`, one request's walk), which takes
//!    the store's open transaction as the [`Tx`] extractor (`extract.rs`, with the handler's
//!    errors as answers).
//!
//! ## The key's window
//!
//! An answered key is kept for the layer's window (24 hours by default): until then every
//! retry gets the kept answer; after it, a request with the key runs as a new request. The
//! window is published on the kept first answer and on every replay as the
//! [`Idempotency-Key-Expires`](IDEMPOTENCY_KEY_EXPIRES) header, an RFC 9651 Date
//! (`Idempotency-Key-Expires: @1767225600`, seconds since the epoch). Expired keys are purged
//! by the store's bounded purge with the consumer's entries.

mod extract;
mod fingerprint;
mod key;
mod layer;
mod policy;
mod problem;
mod response;
mod scope;
mod walk;

pub use extract::{Tx, TxGuard};
pub use fingerprint::{BodyFingerprint, Mismatch, RequestFingerprint};
pub use key::{ClientKey, DEFAULT_MAX_CLIENT_KEY_LEN, IDEMPOTENCY_KEY, KeyProblem};
pub use layer::{
    DEFAULT_LEASE, DEFAULT_MAX_BODY, DEFAULT_WINDOW, IDEMPOTENCY_KEY_EXPIRES, IdempotencyLayer,
    IdempotencyService,
};
pub use policy::{Keep, StorePolicy};
pub use problem::{PROBLEM_JSON, Problem};
pub use response::{DEFAULT_REPLAYED_HEADERS, IDEMPOTENT_REPLAYED, StoredResponse};
pub use scope::RequestScope;
