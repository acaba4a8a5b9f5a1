//! A read-only dashboard of one store and consumer group (feature `dashboard`): per-partition
//! positions and lag, duplicate and conflict rates, dead letters by reason with each record's
//! bytes, and the operator commands of the audit log, refreshed while it is open.
//!
//! It is an axum [`Router`](axum::Router) the service serves beside its consumer, on a port of
//! its own or nested in its own router; the store is the consumer's own handle (a RocksDB
//! directory is open once per process), and the rates come from the runtime's counters:
//!
//! ```no_run
//! # async fn run(runtime: &idempotent_consumer::Runtime<idempotent_consumer::RocksStore,
//! #     impl idempotent_consumer::Handler<idempotent_consumer::RocksTx>>,
//! #     store: idempotent_consumer::RocksStore) -> std::io::Result<()> {
//! use idempotent_consumer::dashboard::Dashboard;
//!
//! let dashboard = Dashboard::new(store, "payments")
//!     .expect("a valid group")
//!     .stats(runtime.stats())
//!     .bootstrap("localhost:9092");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
//! dashboard.serve(listener).await
//! # }
//! ```
//!
//! The page is plain HTML rendered on the server, whole without its script; the script
//! (`assets/dashboard.js`) fetches `api/summary` again every refresh and redraws the numbers and
//! the two charts (Chart.js, served from the crate). It only reads: nothing on it changes the
//! store. Serve it where only operators reach it: it shows payloads and keys of dead letters.
//!
//! Routes, relative to where the router is served: `/` (the page), `/api/summary` (what the
//! page shows, as JSON), `/dead-letters/{topic}/{partition}/{offset}` (one dead letter), and
//! `/assets/…`.

mod page;
mod summary;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use rdkafka::consumer::BaseConsumer;

use crate::error::{Error, Result};
use crate::metrics::Stats;
use crate::store::{Audited, Inspect, PartitionId};
use summary::{Samples, Sources, Summary};

/// The default time between two refreshes of the page.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(2);
/// The shortest refresh accepted.
pub const MIN_REFRESH: Duration = Duration::from_millis(250);

/// A dashboard of one store and consumer group. Build it, then [`router`](Dashboard::router)
/// or [`serve`](Dashboard::serve).
pub struct Dashboard<S> {
    store: S,
    group: String,
    stats: Option<Arc<Stats>>,
    bootstrap: Option<String>,
    refresh: Duration,
}

impl<S> Dashboard<S>
where
    S: Inspect + Audited + Clone + Send + Sync + 'static,
{
    /// The dashboard of `group` in `store`. A group that is empty or has control characters
    /// is refused with [`Error::Config`].
    pub fn new(store: S, group: impl Into<String>) -> Result<Self> {
        let group = group.into();
        if group.is_empty() || group.chars().any(char::is_control) {
            return Err(Error::Config(format!(
                "a dashboard's group must be non-empty, without control characters (got {group:?})"
            )));
        }
        Ok(Dashboard {
            store,
            group,
            stats: None,
            bootstrap: None,
            refresh: DEFAULT_REFRESH,
        })
    }

    /// The runtime's counters ([`Runtime::stats`](crate::Runtime::stats)): the applied,
    /// duplicate, conflict and dead-letter counts, their shares, and the rates chart. Without
    /// them the page says where the rates come from.
    pub fn stats(mut self, stats: Arc<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The brokers (`bootstrap.servers`) to ask for the group's committed offsets and the
    /// partitions' high watermarks: the lag. Without them the Kafka columns stay empty.
    pub fn bootstrap(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap = Some(servers.into());
        self
    }

    /// How often the open page refreshes, and so how old what it shows may be (at least
    /// [`MIN_REFRESH`]; default [`DEFAULT_REFRESH`]).
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every.max(MIN_REFRESH);
        self
    }

    /// The routes. A Kafka client for the broker is made here: a bootstrap its settings refuse
    /// is an [`Error::Config`].
    pub fn router(self) -> Result<axum::Router> {
        let broker = match &self.bootstrap {
            None => None,
            Some(servers) => Some(Arc::new(crate::lag::client(servers, &self.group).map_err(
                |e| match e {
                    crate::lag::AskError::Settings(m) | crate::lag::AskError::Broker(m) => {
                        Error::Config(m)
                    }
                },
            )?)),
        };
        let shared = Arc::new(Shared {
            store: self.store,
            group: self.group,
            stats: self.stats,
            broker,
            refresh: self.refresh,
            cache: tokio::sync::Mutex::new(None),
            samples: std::sync::Mutex::new(Samples::default()),
            sampling: std::sync::Once::new(),
        });
        Ok(axum::Router::new()
            .route("/", get(index::<S>))
            .route("/api/summary", get(api_summary::<S>))
            .route(
                "/dead-letters/{topic}/{partition}/{offset}",
                get(dead_letter::<S>),
            )
            .route("/assets/{name}", get(asset))
            .with_state(shared))
    }

    /// Serves the routes on `listener` until the process ends or the listener fails.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let router = self
            .router()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        axum::serve(listener, router).await
    }
}

impl<S> std::fmt::Debug for Dashboard<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("group", &self.group)
            .field("stats", &self.stats.is_some())
            .field("bootstrap", &self.bootstrap)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

struct Shared<S> {
    store: S,
    group: String,
    stats: Option<Arc<Stats>>,
    broker: Option<Arc<BaseConsumer>>,
    refresh: Duration,
    /// The latest summary, shared by every open page until it is half a refresh old.
    cache: tokio::sync::Mutex<Option<(Instant, Arc<Summary>)>>,
    samples: std::sync::Mutex<Samples>,
    sampling: std::sync::Once,
}

impl<S: Inspect + Audited + Send + Sync + 'static> Shared<S> {
    /// Starts sampling the counters once (from the first request on, on the runtime that
    /// serves the router), every refresh, until the router is dropped.
    fn sample(self: &Arc<Self>) {
        let Some(stats) = self.stats.clone() else {
            return;
        };
        self.sampling.call_once(|| {
            let shared = Arc::downgrade(self);
            let every = self.refresh;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    let mut samples = shared.samples.lock().unwrap_or_else(|e| e.into_inner());
                    samples.push(crate::store::now_ms(), stats.snapshot());
                }
            });
        });
    }

    async fn summary(self: &Arc<Self>) -> Result<Arc<Summary>> {
        self.sample();
        let mut cache = self.cache.lock().await;
        if let Some((at, s)) = &*cache
            && at.elapsed() < self.refresh / 2
        {
            return Ok(s.clone());
        }
        let sources = Sources {
            store: &self.store,
            group: &self.group,
            stats: self.stats.as_ref(),
            broker: self.broker.clone(),
            refresh: self.refresh,
        };
        let summary = Arc::new(summary::gather(sources, &self.samples).await?);
        *cache = Some((Instant::now(), summary.clone()));
        Ok(summary)
    }
}

/// Where the router is served (`/`, or the prefix it is nested under), with a trailing `/`:
/// the page's links start there.
fn base(original: &str, here: &str) -> String {
    let prefix = original
        .strip_suffix(here)
        .or_else(|| original.strip_suffix(here.trim_end_matches('/')))
        .unwrap_or("");
    format!("{}/", prefix.trim_end_matches('/'))
}

/// What every page's response carries: no framing by other sites, scripts and styles from the
/// dashboard alone, nothing cached.
fn page(status: StatusCode, html: String) -> Response {
    let mut response = (status, Html(html)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn store_failed(base: &str, e: &Error) -> Response {
    tracing::warn!(error = %e, "the dashboard could not read the store");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        page::problem(base, "The store did not answer", &e.to_string()),
    )
}

async fn index<S: Inspect + Audited + Send + Sync + 'static>(
    State(shared): State<Arc<Shared<S>>>,
    OriginalUri(original): OriginalUri,
    uri: axum::http::Uri,
) -> Response {
    let base = base(original.path(), uri.path());
    match shared.summary().await {
        Ok(s) => page(StatusCode::OK, page::index(&s, &base)),
        Err(e) => store_failed(&base, &e),
    }
}

async fn api_summary<S: Inspect + Audited + Send + Sync + 'static>(
    State(shared): State<Arc<Shared<S>>>,
) -> Response {
    match shared.summary().await {
        Ok(s) => {
            let mut response = Json(&*s).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "the dashboard could not read the store");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    }
}

async fn dead_letter<S: Inspect + Audited + Sync>(
    State(shared): State<Arc<Shared<S>>>,
    OriginalUri(original): OriginalUri,
    uri: axum::http::Uri,
    Path((topic, partition, offset)): Path<(String, i32, i64)>,
) -> Response {
    let base = base(original.path(), uri.path());
    let id = PartitionId::new(&shared.group, &topic, partition);
    match shared.store.dead_letters(&id).await {
        Ok(letters) => match letters.iter().find(|d| d.record.offset() == offset) {
            Some(d) => page(StatusCode::OK, page::letter(&shared.group, d, &base)),
            None => page(
                StatusCode::NOT_FOUND,
                page::problem(
                    &base,
                    "No such dead letter",
                    &format!(
                        "The store keeps no dead letter of {}/{partition} at offset {offset} for \
                         group {}.",
                        topic, shared.group
                    ),
                ),
            ),
        },
        Err(e) => store_failed(&base, &e),
    }
}

/// The files the page loads, built into the crate.
async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind): (&'static str, &'static str) = match name.as_str() {
        "dashboard.js" => (
            include_str!("assets/dashboard.js"),
            "text/javascript; charset=utf-8",
        ),
        "dashboard.css" => (
            include_str!("assets/dashboard.css"),
            "text/css; charset=utf-8",
        ),
        "chart.umd.min.js" => (
            include_str!("assets/chart.umd.min.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::base;

    #[test]
    fn links_start_where_the_router_is_served() {
        assert_eq!(base("/", "/"), "/");
        assert_eq!(base("/ops", "/"), "/ops/");
        assert_eq!(base("/ops/", "/"), "/ops/");
        assert_eq!(base("/dead-letters/t/0/5", "/dead-letters/t/0/5"), "/");
        assert_eq!(
            base("/ops/dead-letters/t/0/5", "/dead-letters/t/0/5"),
            "/ops/"
        );
    }
}
