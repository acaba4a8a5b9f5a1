//! One request's walk through [`IdempotencyLayer`](super::IdempotencyLayer), around the
//! handler, on a [`RequestStore`]: key, body and fingerprint, claim, the handler with its lease
//! renewed, then the answer kept with the handler's writes or the key released.

use std::convert::Infallible;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::MatchedPath;
use axum::response::{IntoResponse, Response};
use futures::future::{Either, select};
use http::request::Parts;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use super::layer::Config;
use super::{
    ClientKey, IDEMPOTENCY_KEY_EXPIRES, Keep, KeyProblem, Mismatch, Problem, RequestFingerprint,
    RequestScope, StoredResponse, Tx,
};
use crate::{Lease, RequestClaim, RequestStore};

const REQUESTS: &str = "idempotent_consumer_requests_total";
const HANDLER_SECONDS: &str = "idempotent_consumer_request_handler_seconds";

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

pub(super) fn describe() {
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

pub(super) async fn serve<S, Svc>(
    config: Arc<Config<S>>,
    inner: Svc,
    request: Request<Body>,
) -> Response
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
                Ok(RequestClaim::Claimed { lease, tx }) => {
                    let request = (parts, bytes);
                    return self.first(inner, request, (lease, tx), key, tenant).await;
                }
                Ok(RequestClaim::InFlight {
                    fingerprint: first, ..
                }) => {
                    // An empty fingerprint: the store cannot tell before the first completes.
                    if !first.is_empty()
                        && let Some(mismatch) = differs(&fingerprint, &first)
                    {
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

    /// Hands the request's transaction to the handler in the request's extensions.
    fn hand_over(
        &self,
        parts: &mut Parts,
        #[cfg_attr(not(feature = "outbox"), allow(unused_mut))] mut tx: S::RequestTx,
        key: Option<ClientKey>,
        tenant: Option<String>,
        #[cfg_attr(not(feature = "outbox"), allow(unused_variables))] source: Option<&[u8]>,
    ) -> Tx<S::RequestTx> {
        // What its publications derive their keys from: the scoped key it holds.
        #[cfg(feature = "outbox")]
        self.config.store.begin_source(&mut tx, source);
        let slot = Tx::new(tx, key, tenant);
        parts.extensions.insert(slot.clone());
        slot
    }

    /// The first run of a key this request holds.
    async fn first<Svc>(
        &self,
        inner: Svc,
        (mut parts, bytes): (Parts, Bytes),
        (lease, tx): (Lease, S::RequestTx),
        key: ClientKey,
        tenant: Option<String>,
    ) -> (Outcome, Response)
    where
        Svc: Service<Request<Body>, Error = Infallible> + Send,
        Svc::Response: IntoResponse,
        Svc::Future: Send,
    {
        let config = self.config;
        let source = lease.key().to_vec();
        let slot = self.hand_over(&mut parts, tx, Some(key), tenant, Some(&source));
        // Released if this future is dropped (the client went away) before it answers.
        let mut hold = Hold {
            store: config.store.clone(),
            lease: Some(lease.clone()),
            slot: slot.clone(),
        };
        let request = Request::from_parts(parts, Body::from(bytes));
        let (response, lease) = self.handle(inner, request, lease, &slot).await;

        let tx = slot.take().await;
        let (head, body) = response.into_parts();
        let body = match Limited::new(body, config.max_response).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                tracing::error!(error = %e, "a handler's answer could not be kept");
                hold.release(tx).await;
                let problem = Problem::internal("the answer could not be kept");
                return (Outcome::Failed, problem.into_response());
            }
        };
        let Some(tx) = tx else {
            // `take` found it gone: only `take` removes it.
            hold.release(None).await;
            return (
                Outcome::Failed,
                Problem::internal("the request failed").into_response(),
            );
        };
        match config.policy.decide(head.status) {
            Keep::Release => {
                hold.release(Some(tx)).await;
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
                        // The transaction went with the failed commit.
                        hold.release(None).await;
                        failed_commit(e)
                    }
                }
            }
        }
    }

    /// Runs the handler, renewing the lease every third of it meanwhile, in this task: a
    /// process that stops making progress stops renewing. The renewal gets the transaction
    /// when the handler is not using it.
    async fn handle<Svc>(
        &self,
        mut inner: Svc,
        request: Request<Body>,
        mut lease: Lease,
        slot: &Tx<S::RequestTx>,
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
            // Run to its end, so a statement on the transaction is never cut off halfway: the
            // handler waits for the transaction meanwhile.
            let mut idle = slot.try_idle();
            let renewed = config
                .store
                .renew_request(
                    &mut lease,
                    idle.as_mut().and_then(|t| t.as_mut()),
                    config.lease,
                )
                .await;
            drop(idle);
            match renewed {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("a request lost its key's lease while its handler runs");
                }
                Err(e) => {
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
        let slot = self.hand_over(&mut parts, tx, None, tenant, None);
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
            Err(e) => failed_commit(e),
        }
    }
}

/// A commit that failed (not for a lost lease): 503 when it may succeed if tried again.
fn failed_commit(e: crate::Error) -> (Outcome, Response) {
    let outcome = if e.is_transient() {
        Outcome::Unavailable
    } else {
        Outcome::Failed
    };
    (outcome, e.into_response())
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
/// the connection), in a task of its own, with its transaction.
struct Hold<S: RequestStore + Clone> {
    store: S,
    lease: Option<Lease>,
    slot: Tx<S::RequestTx>,
}

impl<S: RequestStore + Clone> Hold<S> {
    /// Gives the key up, rolling back `tx` (or the transaction still in the slot).
    async fn release(&mut self, tx: Option<S::RequestTx>) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        let tx = match tx {
            Some(tx) => Some(tx),
            None => self.slot.take().await,
        };
        if let Err(e) = self.store.release_request(&lease, tx).await {
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
            let slot = self.slot.clone();
            runtime.spawn(async move {
                let tx = slot.take().await;
                if let Err(e) = store.release_request(&lease, tx).await {
                    tracing::warn!(error = %e, "releasing a dropped request's key failed");
                }
            });
        }
    }
}
