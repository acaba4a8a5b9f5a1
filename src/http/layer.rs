//! The server layer: a `tower::Layer` for axum routes (and any tower service over axum's body)
//! that walks a request through the protocol of this module, around the handler, on a
//! [`RequestStore`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::MatchedPath;
use axum::response::{IntoResponse, Response};
use futures::future::{Either, select};
use http::request::Parts;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use super::{
    BodyFingerprint, ClientKey, DEFAULT_MAX_CLIENT_KEY_LEN, DEFAULT_REPLAYED_HEADERS, Keep,
    KeyProblem, Mismatch, Problem, RequestFingerprint, RequestScope, StorePolicy, StoredResponse,
    Tx,
};
use crate::error::{Error, Result};
use crate::{Lease, RequestClaim, RequestStore};

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

const REQUESTS: &str = "idempotent_consumer_requests_total";
const HANDLER_SECONDS: &str = "idempotent_consumer_request_handler_seconds";

type TenantFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

struct Config<S> {
    store: S,
    namespace: String,
    tenant: Option<TenantFn>,
    fingerprint: BodyFingerprint,
    policy: StorePolicy,
    window: Duration,
    lease: Duration,
    wait: Option<Duration>,
    required: bool,
    max_key_len: usize,
    max_body: usize,
    max_response: usize,
    replayed_headers: Vec<String>,
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
/// `Idempotency-Key` runs its handler once, in the store's transaction ([`Tx`]), and every
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
///    answer with `Idempotent-Replayed: true`; either with another fingerprint gets **422**;
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
        describe();
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
    /// runs: a crashed server's request loses the key this long after its last renewal.
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
        Box::pin(async move { Ok(serve(config, inner, request).await) })
    }
}

/// What became of a request, as its metric and span say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// First run, answer kept with the handler's writes.
    Handled,
    /// First run, answer not kept: writes rolled back, key released.
    Released,
    /// A run without a key (optional keys).
    Unkeyed,
    /// The kept answer, replayed.
    Replayed,
    /// 409: the first request is still in flight.
    InFlight,
    /// 422: the key was used with another request.
    Reused,
    /// 400: the key is missing, malformed or its scope unusable.
    BadKey,
    /// 413.
    TooLarge,
    /// 409: the lease ran out and another request took the key over.
    Superseded,
    /// 503: the store failed transiently.
    Unavailable,
    /// 500.
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Handled => "handled",
            Outcome::Released => "released",
            Outcome::Unkeyed => "unkeyed",
            Outcome::Replayed => "replayed",
            Outcome::InFlight => "in_flight",
            Outcome::Reused => "reused",
            Outcome::BadKey => "bad_key",
            Outcome::TooLarge => "too_large",
            Outcome::Superseded => "superseded",
            Outcome::Unavailable => "unavailable",
            Outcome::Failed => "failed",
        }
    }
}

fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "Requests through an IdempotencyLayer, by namespace, route and outcome."
    );
    metrics::describe_histogram!(
        HANDLER_SECONDS,
        metrics::Unit::Seconds,
        "Handler latency of requests run under an IdempotencyLayer."
    );
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.to_response().map(Body::from)
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

#[cfg(feature = "rocksdb")]
impl IntoResponse for crate::store::rocksdb::StateError {
    fn into_response(self) -> Response {
        match self {
            crate::store::rocksdb::StateError::Store(e) => e.into_response(),
            busy => {
                tracing::warn!(error = %busy, "a request's state key stayed busy");
                Problem::unavailable().into_response()
            }
        }
    }
}

async fn serve<S, Svc>(config: Arc<Config<S>>, inner: Svc, request: Request<Body>) -> Response
where
    S: RequestStore + Clone,
    Svc: Service<Request<Body>, Error = Infallible> + Send,
    Svc::Response: IntoResponse,
    Svc::Future: Send,
{
    let (parts, body) = request.into_parts();
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map_or_else(|| parts.uri.path().to_owned(), |m| m.as_str().to_owned());
    let span = tracing::info_span!(
        "idempotent_request",
        namespace = %config.namespace,
        method = %parts.method,
        route = %route,
        outcome = tracing::field::Empty,
    );
    let walk = Walk {
        config: &config,
        route: &route,
    };
    let (outcome, response) = walk.run(inner, parts, body).instrument(span.clone()).await;
    span.record("outcome", outcome.as_str());
    metrics::counter!(
        REQUESTS,
        "namespace" => config.namespace.clone(),
        "route" => route,
        "outcome" => outcome.as_str(),
    )
    .increment(1);
    response
}

/// One request's walk through the layer.
struct Walk<'a, S> {
    config: &'a Config<S>,
    route: &'a str,
}

impl<S: RequestStore + Clone> Walk<'_, S> {
    async fn run<Svc>(&self, inner: Svc, parts: Parts, body: Body) -> (Outcome, Response)
    where
        Svc: Service<Request<Body>, Error = Infallible> + Send,
        Svc::Response: IntoResponse,
        Svc::Future: Send,
    {
        let config = self.config;
        let key = match ClientKey::from_headers(&parts.headers, config.max_key_len) {
            Ok(key) => key,
            Err(problem) => return (Outcome::BadKey, Problem::bad_key(&problem).into_response()),
        };
        let tenant = config.tenant.as_ref().and_then(|f| f(&parts));
        let Some(key) = key else {
            if config.required {
                let problem = Problem::bad_key(&KeyProblem::Missing);
                return (Outcome::BadKey, problem.into_response());
            }
            return self.unkeyed(inner, parts, body, tenant).await;
        };
        let bytes = match Limited::new(body, config.max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                let problem = Problem::too_large(config.max_body);
                return (Outcome::TooLarge, problem.into_response());
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading a request's body failed");
                return (Outcome::BadKey, Problem::unreadable_body().into_response());
            }
        };
        let target = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |pq| pq.as_str());
        let fingerprint = RequestFingerprint::of(target, &bytes, &config.fingerprint);
        let scope = RequestScope {
            namespace: &config.namespace,
            tenant: tenant.as_deref(),
            method: &parts.method,
            route: self.route,
        };
        let store_key = match scope.store_key(&key) {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(error = %e, "a request's key scope is unusable");
                let problem = Problem::bad_scope(
                    "the tenant this request acts for cannot scope an Idempotency-Key \
                     (control characters, or too long)"
                        .into(),
                );
                return (Outcome::BadKey, problem.into_response());
            }
        };

        let deadline = config.wait.map(|wait| Instant::now() + wait);
        let mut pause = Duration::from_millis(5);
        loop {
            let claim = config
                .store
                .claim_request(
                    &store_key,
                    &fingerprint.to_bytes(),
                    config.lease,
                    config.window,
                )
                .await;
            match claim {
                Err(e) => {
                    tracing::warn!(error = %e, "claiming a request's key failed");
                    return (Outcome::Unavailable, Problem::unavailable().into_response());
                }
                Ok(RequestClaim::Claimed(lease)) => {
                    let request = (parts, bytes);
                    return self.first(inner, request, lease, key, tenant).await;
                }
                Ok(RequestClaim::InFlight {
                    fingerprint: first, ..
                }) => {
                    if let Some(mismatch) = differs(&fingerprint, &first) {
                        return (Outcome::Reused, Problem::reused(mismatch).into_response());
                    }
                    let now = Instant::now();
                    match deadline {
                        Some(deadline) if now < deadline => {
                            tokio::time::sleep(pause.min(deadline - now)).await;
                            pause = (pause * 2).min(Duration::from_millis(200));
                        }
                        _ => return (Outcome::InFlight, Problem::in_flight().into_response()),
                    }
                }
                Ok(RequestClaim::Completed {
                    fingerprint: first,
                    response,
                    expires_at_ms,
                }) => {
                    if let Some(mismatch) = differs(&fingerprint, &first) {
                        return (Outcome::Reused, Problem::reused(mismatch).into_response());
                    }
                    return match StoredResponse::decode(&response) {
                        Ok(stored) => {
                            let mut replay = stored.replay().map(Body::from);
                            publish_expiry(&mut replay, expires_at_ms);
                            (Outcome::Replayed, replay)
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "a kept answer cannot be read");
                            let problem =
                                Problem::internal("the kept answer of this key cannot be read");
                            (Outcome::Failed, problem.into_response())
                        }
                    };
                }
            }
        }
    }

    /// The first run of a key this request holds.
    async fn first<Svc>(
        &self,
        inner: Svc,
        (mut parts, bytes): (Parts, Bytes),
        lease: Lease,
        key: ClientKey,
        tenant: Option<String>,
    ) -> (Outcome, Response)
    where
        Svc: Service<Request<Body>, Error = Infallible> + Send,
        Svc::Response: IntoResponse,
        Svc::Future: Send,
    {
        let config = self.config;
        // Released if this future is dropped (the client went away) before it answers.
        let mut hold = Hold {
            store: config.store.clone(),
            lease: Some(lease.clone()),
        };
        let tx = match config.store.begin_request().await {
            Ok(tx) => tx,
            Err(e) => {
                tracing::warn!(error = %e, "opening a request's transaction failed");
                hold.release().await;
                return (Outcome::Unavailable, Problem::unavailable().into_response());
            }
        };
        let slot = Tx::new(tx, Some(key), tenant);
        parts.extensions.insert(slot.clone());
        let request = Request::from_parts(parts, Body::from(bytes));
        let (response, lease) = self.handle(inner, request, lease).await;

        let tx = slot.take().await;
        let (head, body) = response.into_parts();
        let body = match Limited::new(body, config.max_response).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                tracing::error!(error = %e, "a handler's answer could not be kept");
                drop(tx);
                hold.release().await;
                let problem = Problem::internal("the answer could not be kept");
                return (Outcome::Failed, problem.into_response());
            }
        };
        let Some(tx) = tx else {
            // `take` found it gone: only `take` removes it.
            hold.release().await;
            return (
                Outcome::Failed,
                Problem::internal("the request failed").into_response(),
            );
        };
        match config.policy.decide(head.status) {
            Keep::Release => {
                drop(tx);
                hold.release().await;
                (
                    Outcome::Released,
                    Response::from_parts(head, Body::from(body)),
                )
            }
            Keep::Store => {
                let allowed: Vec<&str> =
                    config.replayed_headers.iter().map(|h| h.as_str()).collect();
                let kept =
                    StoredResponse::capture(head.status, &head.headers, body.to_vec(), &allowed);
                let committed = config
                    .store
                    .commit_request(tx, &lease, &kept.encode(), config.window)
                    .await;
                match committed {
                    Ok(expires_at_ms) => {
                        hold.disarm();
                        let mut response = Response::from_parts(head, Body::from(body));
                        publish_expiry(&mut response, expires_at_ms);
                        (Outcome::Handled, response)
                    }
                    Err(e) if e.is_lease_lost() => {
                        hold.disarm();
                        tracing::warn!("a request outlived its lease; its answer was not kept");
                        (Outcome::Superseded, Problem::superseded().into_response())
                    }
                    Err(e) => {
                        hold.release().await;
                        let outcome = if e.is_transient() {
                            Outcome::Unavailable
                        } else {
                            Outcome::Failed
                        };
                        (outcome, e.into_response())
                    }
                }
            }
        }
    }

    /// Runs the handler, renewing the lease every third of it meanwhile, in this task: a
    /// process that stops making progress stops renewing.
    async fn handle<Svc>(
        &self,
        mut inner: Svc,
        request: Request<Body>,
        mut lease: Lease,
    ) -> (Response, Lease)
    where
        Svc: Service<Request<Body>, Error = Infallible> + Send,
        Svc::Response: IntoResponse,
        Svc::Future: Send,
    {
        let config = self.config;
        let every = config.lease / 3;
        let started = Instant::now();
        let mut call = pin!(inner.call(request));
        let result = loop {
            let tick = pin!(tokio::time::sleep(every));
            match select(call.as_mut(), tick).await {
                Either::Left((result, _)) => break result,
                Either::Right(((), _)) => {}
            }
            let renewal = pin!(config.store.renew_request(&mut lease, config.lease));
            match select(call.as_mut(), renewal).await {
                Either::Left((result, _)) => break result,
                Either::Right((Ok(true), _)) => {}
                Either::Right((Ok(false), _)) => {
                    tracing::warn!("a request lost its key's lease while its handler runs");
                }
                Either::Right((Err(e), _)) => {
                    tracing::warn!(error = %e, "renewing a request's lease failed");
                }
            }
        };
        metrics::histogram!(
            HANDLER_SECONDS,
            "namespace" => config.namespace.clone(),
            "route" => self.route.to_owned(),
        )
        .record(started.elapsed().as_secs_f64());
        let response = match result {
            Ok(response) => response.into_response(),
            Err(never) => match never {},
        };
        (response, lease)
    }

    /// A request without a key on a route where keys are optional.
    async fn unkeyed<Svc>(
        &self,
        mut inner: Svc,
        mut parts: Parts,
        body: Body,
        tenant: Option<String>,
    ) -> (Outcome, Response)
    where
        Svc: Service<Request<Body>, Error = Infallible> + Send,
        Svc::Response: IntoResponse,
        Svc::Future: Send,
    {
        let config = self.config;
        let tx = match config.store.begin_request().await {
            Ok(tx) => tx,
            Err(e) => {
                tracing::warn!(error = %e, "opening a request's transaction failed");
                return (Outcome::Unavailable, Problem::unavailable().into_response());
            }
        };
        let slot = Tx::new(tx, None, tenant);
        parts.extensions.insert(slot.clone());
        let response = match inner.call(Request::from_parts(parts, body)).await {
            Ok(response) => response.into_response(),
            Err(never) => match never {},
        };
        let Some(tx) = slot.take().await else {
            return (
                Outcome::Failed,
                Problem::internal("the request failed").into_response(),
            );
        };
        if config.policy.decide(response.status()) == Keep::Release {
            return (Outcome::Unkeyed, response);
        }
        match config.store.commit_unkeyed(tx).await {
            Ok(()) => (Outcome::Unkeyed, response),
            Err(e) => {
                let outcome = if e.is_transient() {
                    Outcome::Unavailable
                } else {
                    Outcome::Failed
                };
                (outcome, e.into_response())
            }
        }
    }
}

/// What differs between this request and the key's first (a stored fingerprint that cannot be
/// read is taken as all of it).
fn differs(this: &RequestFingerprint, first: &[u8]) -> Option<Mismatch> {
    match RequestFingerprint::from_bytes(first) {
        Some(first) => this.mismatch(&first),
        None => Some(Mismatch::TargetAndBody),
    }
}

fn publish_expiry(response: &mut Response, expires_at_ms: i64) {
    let date = format!("@{}", expires_at_ms.div_euclid(1000));
    if let Ok(value) = HeaderValue::from_str(&date) {
        response
            .headers_mut()
            .insert(IDEMPOTENCY_KEY_EXPIRES, value);
    }
}

/// A claimed key not answered yet: released when dropped (the request's future dropped with
/// the connection), in a task of its own.
struct Hold<S: RequestStore + Clone> {
    store: S,
    lease: Option<Lease>,
}

impl<S: RequestStore + Clone> Hold<S> {
    async fn release(&mut self) {
        if let Some(lease) = self.lease.take()
            && let Err(e) = self.store.release_request(&lease).await
        {
            tracing::warn!(error = %e, "releasing a request's key failed; its lease runs out");
        }
    }

    fn disarm(&mut self) {
        self.lease = None;
    }
}

impl<S: RequestStore + Clone> Drop for Hold<S> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            runtime.spawn(async move {
                if let Err(e) = store.release_request(&lease).await {
                    tracing::warn!(error = %e, "releasing a dropped request's key failed");
                }
            });
        }
    }
}
