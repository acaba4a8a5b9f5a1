//! The server layer: a `tower::Layer` for axum routes (and any tower service over axum's body),
//! its settings and its service; each request's walk around the handler is `walk.rs`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::Request;
use http::request::Parts;
use tower_layer::Layer;
use tower_service::Service;

use super::{BodyFingerprint, DEFAULT_MAX_CLIENT_KEY_LEN, DEFAULT_REPLAYED_HEADERS, StorePolicy};
use crate::RequestStore;
use crate::error::{Error, Result};

/// The response header that publishes when the key expires: an RFC 9651 Date
/// (`@1767225600`, seconds since the epoch). Until then a retry with the key gets the stored
/// answer; after it, a request with the key runs as a new request. Sent on the first answer
/// once it is kept and on every replay.
pub const IDEMPOTENCY_KEY_EXPIRES: &str = "idempotency-key-expires";

/// How long a completed key is kept by default: 24 hours.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// A request's hold on its key by default, renewed every third of it while the handler runs.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The largest request body the layer buffers by default (it must read the whole body to
/// fingerprint it), and the largest answer it keeps.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

type TenantFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

/// A layer's settings, shared by its services and read by each request's walk (`walk.rs`).
pub(super) struct Config<S> {
    pub(super) store: S,
    pub(super) namespace: String,
    pub(super) tenant: Option<TenantFn>,
    pub(super) fingerprint: BodyFingerprint,
    pub(super) policy: StorePolicy,
    pub(super) window: Duration,
    pub(super) lease: Duration,
    pub(super) wait: Option<Duration>,
    pub(super) required: bool,
    pub(super) max_key_len: usize,
    pub(super) max_body: usize,
    pub(super) max_response: usize,
    pub(super) replayed_headers: Vec<String>,
}

impl<S: Clone> Clone for Config<S> {
    fn clone(&self) -> Self {
        Config {
            store: self.store.clone(),
            namespace: self.namespace.clone(),
            tenant: self.tenant.clone(),
            fingerprint: self.fingerprint.clone(),
            policy: self.policy.clone(),
            window: self.window,
            lease: self.lease,
            wait: self.wait,
            required: self.required,
            max_key_len: self.max_key_len,
            max_body: self.max_body,
            max_response: self.max_response,
            replayed_headers: self.replayed_headers.clone(),
        }
    }
}

/// Idempotency keys for the routes it wraps, on one store: a request with an
/// `Idempotency-Key` runs its handler once, in the store's transaction ([`Tx`](super::Tx)), and every
/// retry gets the kept answer.
///
/// ```ignore
/// let keys = IdempotencyLayer::new(store.clone(), "payments")?
///     .tenant(|req| req.headers.get("x-account").and_then(|v| v.to_str().ok()).map(Into::into))
///     .fingerprint(BodyFingerprint::Json);
/// let app = Router::new().route("/payments", post(create).layer(keys));
/// ```
///
/// A request's walk:
/// 1. its key is read (**400** if missing on a route that requires one, or malformed), its body
///    buffered (**413** over [`max_body`](Self::max_body)) and fingerprinted;
/// 2. the key, scoped by the namespace, the tenant, the method and the route template, is
///    claimed as a lease: a request that finds it in flight gets **409** (or waits, see
///    [`wait_in_flight`](Self::wait_in_flight)); one that finds it answered gets the kept
///    answer with `Idempotent-Replayed: true`; either with another fingerprint gets **422**
///    (in flight on PostgreSQL: 409, the first's fingerprint is written with its answer);
/// 3. the handler runs with the transaction while the lease is renewed; its answer is kept or
///    not by the [`StorePolicy`]: kept, the handler's writes, the key's entry and the answer
///    commit in one transaction (**409** if the lease was lost meanwhile: nothing is written);
///    not kept, the writes are rolled back and the key released, as when the client drops the
///    connection.
pub struct IdempotencyLayer<S> {
    config: Arc<Config<S>>,
}

impl<S: Clone> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            config: self.config.clone(),
        }
    }
}

impl<S> std::fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        f.debug_struct("IdempotencyLayer")
            .field("namespace", &c.namespace)
            .field("window", &c.window)
            .field("lease", &c.lease)
            .field("wait", &c.wait)
            .field("required", &c.required)
            .finish_non_exhaustive()
    }
}

impl<S: RequestStore + Clone> IdempotencyLayer<S> {
    /// Keys on `store`, apart from other services' by `namespace` (not empty, no control
    /// characters).
    pub fn new(store: S, namespace: impl Into<String>) -> Result<Self> {
        let namespace = namespace.into();
        if namespace.is_empty() || namespace.chars().any(char::is_control) {
            return Err(Error::Config(
                "an IdempotencyLayer's namespace must be non-empty, without control characters"
                    .into(),
            ));
        }
        super::walk::describe();
        Ok(IdempotencyLayer {
            config: Arc::new(Config {
                store,
                namespace,
                tenant: None,
                fingerprint: BodyFingerprint::default(),
                policy: StorePolicy::default(),
                window: DEFAULT_WINDOW,
                lease: DEFAULT_LEASE,
                wait: None,
                required: true,
                max_key_len: DEFAULT_MAX_CLIENT_KEY_LEN,
                max_body: DEFAULT_MAX_BODY,
                max_response: DEFAULT_MAX_BODY,
                replayed_headers: DEFAULT_REPLAYED_HEADERS
                    .iter()
                    .map(|h| (*h).to_owned())
                    .collect(),
            }),
        })
    }

    fn with(mut self, f: impl FnOnce(&mut Config<S>)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Scopes keys by the tenant or principal a request acts for (an authenticated user id),
    /// from its head: one key of two tenants is two requests. Run it after authentication.
    pub fn tenant(self, f: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static) -> Self {
        self.with(|c| c.tenant = Some(Arc::new(f)))
    }

    /// What of the body makes two requests with one key the same request (default: its bytes).
    pub fn fingerprint(self, how: BodyFingerprint) -> Self {
        self.with(|c| c.fingerprint = how)
    }

    /// Which answers are kept (default: [`StorePolicy::default`]).
    pub fn policy(self, policy: StorePolicy) -> Self {
        self.with(|c| c.policy = policy)
    }

    /// How long an answered key is kept (default 24 hours); published in
    /// [`IDEMPOTENCY_KEY_EXPIRES`].
    pub fn window(self, window: Duration) -> Self {
        self.with(|c| c.window = window)
    }

    /// A request's hold on its key (default 30 s), renewed every third of it while the handler
    /// runs: a stalled server's request loses the key this long after its last renewal (on
    /// PostgreSQL, after its transaction stayed idle this long: the renewal is a statement on
    /// it while the handler is not holding [`Tx::lock`](super::Tx::lock)). A crashed server's
    /// request loses it at once.
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|c| c.lease = lease.max(Duration::from_millis(30)))
    }

    /// A retry that finds the first request in flight waits up to `wait` for its answer
    /// instead of getting 409 at once (409 if it is still in flight then).
    pub fn wait_in_flight(self, wait: Duration) -> Self {
        self.with(|c| c.wait = Some(wait))
    }

    /// Requests without a key run too (default: they get 400): the handler's writes commit
    /// when its answer would be kept, and nothing is kept for a retry.
    pub fn optional(self) -> Self {
        self.with(|c| c.required = false)
    }

    /// The longest client key accepted (default [`DEFAULT_MAX_CLIENT_KEY_LEN`]).
    pub fn max_key_len(self, len: usize) -> Self {
        self.with(|c| c.max_key_len = len)
    }

    /// The largest request body buffered (default [`DEFAULT_MAX_BODY`]; over it: 413).
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_body = bytes)
    }

    /// The largest answer kept (default [`DEFAULT_MAX_BODY`]; a larger one is refused with a
    /// 500 and nothing is kept).
    pub fn max_response(self, bytes: usize) -> Self {
        self.with(|c| c.max_response = bytes)
    }

    /// The headers a kept answer replays (default [`DEFAULT_REPLAYED_HEADERS`]).
    pub fn replayed_headers<I: IntoIterator<Item = H>, H: AsRef<str>>(self, names: I) -> Self {
        let names = names
            .into_iter()
            .map(|h| h.as_ref().to_ascii_lowercase())
            .collect();
        self.with(|c| c.replayed_headers = names)
    }
}

impl<S: RequestStore + Clone, Svc> Layer<Svc> for IdempotencyLayer<S> {
    type Service = IdempotencyService<S, Svc>;

    fn layer(&self, inner: Svc) -> Self::Service {
        IdempotencyService {
            config: self.config.clone(),
            inner,
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around a route.
pub struct IdempotencyService<S, Svc> {
    config: Arc<Config<S>>,
    inner: Svc,
}

impl<S, Svc: Clone> Clone for IdempotencyService<S, Svc> {
    fn clone(&self) -> Self {
        IdempotencyService {
            config: self.config.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S, Svc> std::fmt::Debug for IdempotencyService<S, Svc> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("namespace", &self.config.namespace)
            .finish_non_exhaustive()
    }
}

impl<S, Svc> Service<Request<Body>> for IdempotencyService<S, Svc>
where
    S: RequestStore + Clone,
    Svc: Service<Request<Body>, Error = Infallible> + Clone + Send + 'static,
    Svc::Response: IntoResponse,
    Svc::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The service that was polled ready runs this request; its clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move { Ok(super::walk::serve(config, inner, request).await) })
    }
}
