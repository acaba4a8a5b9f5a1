//! Requests per second and latency of idempotency keys over HTTP, against the same handler
//! without them, in one run: the ratios are the result (absolute figures drift on a shared
//! machine).
//!
//! Rows, per store (RocksDB with synced writes, PostgreSQL when `DATABASE_URL` is set):
//! - `plain`: an axum handler that opens the store's request transaction, debits an account and
//!   records the payment, and commits (`commit_unkeyed`): the same rows, no idempotency;
//! - `fresh`: the same handler under `IdempotencyLayer`, a new key per request (claim, handler,
//!   commit with the key's entry and the kept answer);
//! - `replay`: the keys of `fresh` again: the kept answers, no handler.
//!
//! The load: `--connections` (default 32) HTTP/1.1 clients on loopback (reqwest, keep-alive),
//! each sending its requests one after another, on the account of its own (no lock waits), in
//! the same process as the server. Each row runs `--requests` (default 20,000 on RocksDB, 10,000
//! on PostgreSQL) after a warm-up of 500. Output: `BENCH name=... requests=... seconds=...
//! requests_per_s=... p50_ms=... p99_ms=...` per row, then the targets as `BENCH ratio ...
//! met|MISSED` and the p99 overhead of `fresh` over `plain`.
//!
//! `scripts/dev.sh bench-http` starts a throwaway PostgreSQL with fsync on and runs it.

use std::net::SocketAddr;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idempotent_consumer::http::{IDEMPOTENT_REPLAYED, IdempotencyLayer, Tx};
use idempotent_consumer::testkit::ThrowawayDb;
use idempotent_consumer::{PgRequestTx, PgStore, RequestStore, RocksRequestTx, RocksStore};
use serde_json::json;

type Res<T> = Result<T, String>;

#[derive(serde::Deserialize)]
struct Payment {
    account: String,
    amount: i64,
}

/// The handler's write, on either store's request transaction.
trait Ledger: Send + 'static {
    fn debit(
        &mut self,
        account: String,
        amount: i64,
    ) -> impl Future<Output = Result<i64, String>> + Send + '_;
}

impl Ledger for RocksRequestTx {
    async fn debit(&mut self, account: String, amount: i64) -> Result<i64, String> {
        let key = format!("balance/{account}");
        let balance = match self.get(&key).await.map_err(|e| e.to_string())? {
            Some(b) => String::from_utf8_lossy(&b).parse().unwrap_or(0),
            None => 1_000_000_000i64,
        };
        let after = balance - amount;
        self.put(&key, after.to_string())
            .await
            .map_err(|e| e.to_string())?;
        let id = format!("payment/{account}/{after}");
        self.put(id, format!("{amount}"))
            .await
            .map_err(|e| e.to_string())?;
        Ok(after)
    }
}

impl Ledger for PgRequestTx {
    async fn debit(&mut self, account: String, amount: i64) -> Result<i64, String> {
        let after: i64 = sqlx::query_scalar(
            "UPDATE bench_accounts SET balance = balance - $2 WHERE account = $1 RETURNING balance",
        )
        .bind(&account)
        .bind(amount)
        .fetch_one(self.conn())
        .await
        .map_err(|e| e.to_string())?;
        sqlx::query("INSERT INTO bench_payments (account, amount) VALUES ($1, $2)")
            .bind(&account)
            .bind(amount)
            .execute(self.conn())
            .await
            .map_err(|e| e.to_string())?;
        Ok(after)
    }
}

fn answer(result: Result<i64, String>) -> Response {
    match result {
        Ok(balance) => (StatusCode::CREATED, Json(json!({ "balance": balance }))).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
    }
}

/// The handler under the layer.
async fn keyed<T: Ledger>(tx: Tx<T>, Json(p): Json<Payment>) -> Response {
    let mut tx = match tx.lock().await {
        Ok(tx) => tx,
        Err(e) => return e.into_response(),
    };
    answer(tx.debit(p.account, p.amount).await)
}

/// The same handler without the layer: its own transaction, committed.
async fn plain<S>(State(store): State<S>, Json(p): Json<Payment>) -> Response
where
    S: RequestStore + Clone,
    S::RequestTx: Ledger,
{
    let mut tx = match store.begin_request().await {
        Ok(tx) => tx,
        Err(e) => return e.into_response(),
    };
    let result = tx.debit(p.account, p.amount).await;
    if result.is_ok()
        && let Err(e) = store.commit_unkeyed(tx).await
    {
        return e.into_response();
    }
    answer(result)
}

fn app<S>(store: S) -> Res<Router>
where
    S: RequestStore + Clone,
    S::RequestTx: Ledger,
{
    let keys = IdempotencyLayer::new(store.clone(), "bench").map_err(|e| e.to_string())?;
    Ok(Router::new()
        .route("/plain", post(plain::<S>))
        .route("/payments", post(keyed::<S::RequestTx>).layer(keys))
        .with_state(store))
}

struct Args {
    connections: usize,
    rocks_requests: usize,
    pg_requests: usize,
}

fn args() -> Res<Args> {
    let mut args = Args {
        connections: 32,
        rocks_requests: 20_000,
        pg_requests: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Res<usize> {
            let v = it.next().ok_or(format!("{flag} needs a value"))?;
            v.parse().map_err(|e| format!("{flag} {v}: {e}"))
        };
        match flag.as_str() {
            "--connections" => args.connections = value()?.max(1),
            "--requests" => {
                let n = value()?;
                args.rocks_requests = n;
                args.pg_requests = n;
            }
            // What `cargo bench` passes to every bench.
            "--bench" => {}
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// A measured row.
struct Row {
    name: String,
    requests: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// Sends `requests` POSTs to `path` over `connections` clients; the key of request `i` is
/// `keys(i)` (none for `None`). Every answer must be 201, replayed when `replayed`.
async fn load(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    requests: usize,
    keys: impl Fn(usize) -> Option<String> + Send + Sync + Clone + 'static,
    replayed: bool,
) -> Res<(f64, Vec<f64>)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://{addr}{path}");
    let started = Instant::now();
    let workers = (0..connections).map(|worker| {
        let (client, url, keys) = (client.clone(), url.clone(), keys.clone());
        let path = path.to_owned();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let body = json!({ "account": format!("acct-{worker}"), "amount": 1 });
            let mut i = worker;
            while i < requests {
                let mut request = client.post(&url).json(&body);
                if let Some(key) = keys(i) {
                    request = request.header("idempotency-key", format!("\"{key}\""));
                }
                let sent = Instant::now();
                let response = request.send().await.map_err(|e| e.to_string())?;
                let status = response.status();
                let was_replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
                let text = response.text().await.map_err(|e| e.to_string())?;
                latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                if status != StatusCode::CREATED || was_replayed != replayed {
                    return Err(format!(
                        "{path} answered {status} (replayed {was_replayed}): {text}"
                    ));
                }
                i += connections;
            }
            Ok::<_, String>(latencies)
        })
    });
    let mut latencies = Vec::with_capacity(requests);
    for worker in futures::future::join_all(workers).await {
        latencies.extend(worker.map_err(|e| e.to_string())??);
    }
    Ok((started.elapsed().as_secs_f64(), latencies))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// The three rows of one store.
async fn rows<S>(store: S, label: &str, args: &Args, requests: usize) -> Res<Vec<Row>>
where
    S: RequestStore + Clone,
    S::RequestTx: Ledger,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = app(store)?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let c = args.connections;
    // Warm-up: connections, the allocator, the store's caches.
    load(addr, "/plain", c, 500, |_| None, false).await?;
    load(
        addr,
        "/payments",
        c,
        500,
        |i| Some(format!("warm-{i}")),
        false,
    )
    .await?;
    let mut out = Vec::new();
    let passes: [(&str, &str, bool); 3] = [
        ("plain", "/plain", false),
        ("fresh", "/payments", false),
        ("replay", "/payments", true),
    ];
    for (row, path, replayed) in passes {
        let keyed = path == "/payments";
        let keys = move |i: usize| keyed.then(|| format!("key-{i}"));
        let (seconds, mut latencies) = load(addr, path, c, requests, keys, replayed).await?;
        latencies.sort_by(f64::total_cmp);
        let row = Row {
            name: format!("http-{label}-{row}"),
            requests,
            seconds,
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
        };
        println!(
            "BENCH name={} requests={} seconds={:.3} requests_per_s={:.0} p50_ms={:.2} p99_ms={:.2}",
            row.name,
            row.requests,
            row.seconds,
            row.rate(),
            row.p50_ms,
            row.p99_ms
        );
        out.push(row);
    }
    server.abort();
    Ok(out)
}

fn verdicts(label: &str, rows: &[Row]) {
    let [plain, fresh, replay] = rows else { return };
    for (name, value, target) in [
        (
            format!("http-{label}-fresh/plain"),
            fresh.rate() / plain.rate(),
            0.8,
        ),
        (
            format!("http-{label}-replay/fresh"),
            replay.rate() / fresh.rate(),
            1.5,
        ),
    ] {
        let verdict = if value >= target { "met" } else { "MISSED" };
        println!("BENCH ratio {name}={value:.3} target>={target} {verdict}");
    }
    println!(
        "BENCH p99-overhead http-{label}-fresh-vs-plain={:+.2}ms (p50 {:+.2}ms)",
        fresh.p99_ms - plain.p99_ms,
        fresh.p50_ms - plain.p50_ms
    );
}

async fn run() -> Res<()> {
    let args = args()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let rocks = RocksStore::open(dir.path()).map_err(|e| e.to_string())?;
    let rocks_rows = rows(rocks, "rocksdb", &args, args.rocks_requests).await?;
    let mut all = vec![("rocksdb", rocks_rows)];
    match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let db = ThrowawayDb::create(
                &url,
                &format!("idc_bench_http_{}", std::process::id()),
                "CREATE TABLE bench_accounts (account text PRIMARY KEY, balance bigint NOT NULL);
                 CREATE TABLE bench_payments (seq bigserial PRIMARY KEY, account text NOT NULL,
                                              amount bigint NOT NULL);",
            )
            .await
            .map_err(|e| e.to_string())?;
            let store = PgStore::connect(db.url())
                .await
                .map_err(|e| e.to_string())?;
            let mut tx = store.begin_request().await.map_err(|e| e.to_string())?;
            sqlx::query(
                "INSERT INTO bench_accounts SELECT 'acct-' || i, 1000000000 \
                 FROM generate_series(0, $1) AS i",
            )
            .bind(args.connections as i32)
            .execute(tx.conn())
            .await
            .map_err(|e| e.to_string())?;
            store.commit_unkeyed(tx).await.map_err(|e| e.to_string())?;
            let pg_rows = rows(store, "postgres", &args, args.pg_requests).await?;
            all.push(("postgres", pg_rows));
        }
        Err(_) => eprintln!("http: DATABASE_URL is not set: the PostgreSQL rows are left out"),
    }
    for (label, rows) in &all {
        verdicts(label, rows);
    }
    Ok(())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("http: {e}");
        std::process::exit(1);
    }
}
