//! The chain's processes: the HTTP service (with its relay), a relay alone, and the ledger
//! downstream. Started by the harness as roles of the harness binary.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use idempotent_consumer::http::{IdempotencyLayer, Tx};
use idempotent_consumer::outbox::{
    OutboxDeadRow, OutboxLease, OutboxRow, OutboxStore, Publication, Publish, Relay, RelayConfig,
};
use idempotent_consumer::testkit::serve_reporting;
use idempotent_consumer::{
    Handler, HandlerError, Inspect, Outcome, PartitionId, PgOptions, PgRequestTx, PgStore, Record,
    RequestStore, RocksRequestTx, RocksStore, RocksTx, Runtime,
};
use rdkafka::ClientConfig;

use super::super::{Flags, Res, SESSION_MS};
use super::{Event, PARTITIONS, Pay};

// ---------------------------------------------------------------------------------------------
// The service.

/// A request transaction that records a payment.
trait PaymentTx: Publish + Send + 'static {
    fn record(
        &mut self,
        id: &str,
        p: &Pay,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

impl PaymentTx for RocksRequestTx {
    async fn record(&mut self, id: &str, p: &Pay) -> Result<(), String> {
        let value = format!("{}:{}", p.account, p.amount);
        self.put(format!("payment/{id}"), value)
            .await
            .map_err(|e| e.to_string())
    }
}

impl PaymentTx for PgRequestTx {
    async fn record(&mut self, id: &str, p: &Pay) -> Result<(), String> {
        sqlx::query("INSERT INTO chain_payments (id, account, amount) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(&p.account)
            .bind(p.amount)
            .execute(self.conn())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// `POST /payments`: records the payment and publishes its event, in the request's
/// transaction. A payment of nothing is a 400 (kept, so a retry gets it again).
async fn pay<T: PaymentTx>(
    State(topic): State<Arc<str>>,
    tx: Tx<T>,
    Json(p): Json<Pay>,
) -> Response {
    if p.amount <= 0 {
        return (StatusCode::BAD_REQUEST, "the amount must be positive").into_response();
    }
    let Some(id) = tx.client_key().map(|k| k.as_str().to_owned()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut tx = match tx.lock().await {
        Ok(tx) => tx,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = tx.record(&id, &p).await {
        return (StatusCode::SERVICE_UNAVAILABLE, e).into_response();
    }
    let event = Event {
        payment: id.clone(),
        account: p.account.clone(),
        amount: p.amount,
    };
    let published = Publication::new(&*topic)
        .key(p.account.as_str())
        .json(&event)
        .and_then(|p| tx.publish(p));
    match published {
        Ok(_) => (StatusCode::CREATED, id).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The outbox as the relays see it, slow to delete what the broker acknowledged (30 ms): a
/// kill then often lands between the produce and the delete, and the next relay produces
/// those rows again, for the ledger to drop.
#[derive(Clone)]
struct SlowMarks<S>(S);

type Out<T> = idempotent_consumer::Result<T>;

impl<S: OutboxStore> OutboxStore for SlowMarks<S> {
    async fn lease_outbox(&self, owner: &str, lease: Duration) -> Out<Option<OutboxLease>> {
        self.0.lease_outbox(owner, lease).await
    }
    async fn release_outbox(&self, lease: &OutboxLease) -> Out<()> {
        self.0.release_outbox(lease).await
    }
    async fn pending_rows(&self, after: Option<u64>, limit: usize) -> Out<Vec<OutboxRow>> {
        self.0.pending_rows(after, limit).await
    }
    async fn mark_sent(&self, lease: &OutboxLease, ids: &[u64]) -> Out<bool> {
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.0.mark_sent(lease, ids).await
    }
    async fn mark_dead(&self, lease: &OutboxLease, id: u64, reason: &str) -> Out<bool> {
        self.0.mark_dead(lease, id, reason).await
    }
    async fn outbox_backlog(&self) -> Out<(u64, Option<i64>)> {
        self.0.outbox_backlog().await
    }
    async fn dead_rows(&self, limit: usize) -> Out<Vec<OutboxDeadRow>> {
        self.0.dead_rows(limit).await
    }
    fn outbox_written(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.0.outbox_written()
    }
}

fn relay_config() -> RelayConfig {
    let mut config = RelayConfig::default();
    config.batch_size = 100;
    config.poll_interval = Duration::from_millis(50);
    // A killed holder's lease runs out soon, so the other relay takes over.
    config.lease = Duration::from_secs(2);
    config
}

fn producer(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Prints `STATS relayed=.. dead=.. backlog=..` every 200 ms until SIGTERM, then stops the
/// relay (its lease given up) and returns.
async fn report_relay<S: OutboxStore>(store: S, relay: Relay<SlowMarks<S>>) -> Res<()> {
    let stats = relay.stats();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        let backlog = store
            .outbox_backlog()
            .await
            .map(|(n, _)| n)
            .unwrap_or(u64::MAX);
        println!(
            "STATS relayed={} dead={} backlog={backlog}",
            stats.relayed(),
            stats.dead()
        );
        tokio::select! {
            _ = term.recv() => break,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let _ = stop.send(());
    task.await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

async fn serve<S>(store: S, flags: &Flags) -> Res<()>
where
    S: RequestStore + OutboxStore,
    S::RequestTx: PaymentTx,
{
    let topic: Arc<str> = flags.need("topic")?.into();
    let port: u16 = flags.num("port", 0)? as u16;
    let relay = Relay::new(
        SlowMarks(store.clone()),
        &producer(&flags.need("bootstrap")?),
        relay_config(),
    )
    .map_err(|e| e.to_string())?;
    let keys = IdempotencyLayer::new(store.clone(), "chain")
        .map_err(|e| e.to_string())?
        // The first run's lease runs out soon after its server was killed (PostgreSQL).
        .lease(Duration::from_secs(3));
    let app = Router::new()
        .route(
            "/payments",
            axum::routing::post(pay::<S::RequestTx>).layer(keys),
        )
        .with_state(topic);
    // The port of the killed incarnation may take a moment to be free again.
    let mut listener = None;
    for _ in 0..100 {
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let listener = listener.ok_or_else(|| format!("port {port} stayed busy"))?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    report_relay(store, relay).await
}

pub(super) fn runtime() -> Res<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// The `service` role.
pub(in super::super) fn service(flags: &Flags) -> Res<()> {
    let rt = runtime()?;
    let path = flags.need("path")?;
    match flags.need("store")?.as_str() {
        "rocksdb" => rt.block_on(async {
            let store = RocksStore::open(&path).map_err(|e| e.to_string())?;
            serve(store, flags).await
        }),
        "postgres" => rt.block_on(async {
            let store = PgStore::connect_with(&path, pg_options())
                .await
                .map_err(|e| e.to_string())?;
            serve(store, flags).await
        }),
        other => Err(format!("unknown store {other:?}")),
    }
}

fn pg_options() -> PgOptions {
    PgOptions {
        max_connections: 8,
        ..PgOptions::default()
    }
}

/// The `relay` role: a relay alone on a PostgreSQL outbox.
pub(in super::super) fn relay(flags: &Flags) -> Res<()> {
    runtime()?.block_on(async {
        let store = PgStore::connect_with(&flags.need("path")?, pg_options())
            .await
            .map_err(|e| e.to_string())?;
        let relay = Relay::new(
            SlowMarks(store.clone()),
            &producer(&flags.need("bootstrap")?),
            relay_config(),
        )
        .map_err(|e| e.to_string())?;
        report_relay(store, relay).await
    })
}

// ---------------------------------------------------------------------------------------------
// The ledger downstream.

/// Applies each event once: a count per payment (a double application shows as 2) and its
/// amount.
struct Apply;

impl Handler<RocksTx> for Apply {
    async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
        let event: Event = record.json()?;
        let count_key = format!("count/{}", event.payment);
        let n = match tx.get(&count_key).map_err(HandlerError::retryable)? {
            Some(b) => String::from_utf8_lossy(&b).parse::<u64>().unwrap_or(0),
            None => 0,
        };
        tx.put(&count_key, (n + 1).to_string());
        tx.put(
            format!("amount/{}", event.payment),
            event.amount.to_string(),
        );
        Ok(Outcome::none())
    }
}

/// The `ledger` role: runs until SIGTERM, or, with `--until`, until its positions reach it.
pub(in super::super) fn ledger(flags: &Flags) -> Res<()> {
    let topic = flags.need("topic")?;
    let group = flags.need("group")?;
    let until: Option<Vec<i64>> = flags
        .get("until")
        .map(|u| {
            u.split(',')
                .map(|v| v.parse().map_err(|_| format!("bad --until {v:?}")))
                .collect()
        })
        .transpose()?;
    let store = RocksStore::open(flags.need("path")?).map_err(|e| e.to_string())?;
    let consumer = Runtime::builder()
        .bootstrap_servers(flags.need("bootstrap")?)
        .group_id(&group)
        .topics([topic.as_str()])
        .set("session.timeout.ms", SESSION_MS.to_string())
        .set("heartbeat.interval.ms", "300")
        .set("topic.metadata.refresh.interval.ms", "1000")
        .set("group.instance.id", format!("{group}-0"))
        .batch(200, Duration::from_millis(20))
        .store(store.clone())
        .build(Apply)
        .map_err(|e| e.to_string())?;
    let pids: Vec<PartitionId> = (0..PARTITIONS)
        .map(|p| PartitionId::new(&group, &topic, p))
        .collect();
    let done = move || {
        let (store, pids, until) = (store.clone(), pids.clone(), until.clone());
        async move {
            let Some(until) = until else { return false };
            let mut reached = true;
            for (p, end) in pids.iter().zip(&until) {
                let at = store
                    .position(p)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|s| s.next_offset);
                reached &= at.unwrap_or(0) >= *end;
            }
            reached
        }
    };
    runtime()?
        .block_on(serve_reporting(consumer, done))
        .map_err(|e| e.to_string())
}
