//! Payments over HTTP with idempotency keys: `POST /payments` with an `Idempotency-Key` is
//! charged once however often the client retries.
//!
//! What it shows: an axum service on the embedded RocksDB store (a temporary directory, or
//! `--dir`) with `IdempotencyLayer` around `POST /payments`. The handler takes the store's
//! open transaction (`Tx<RocksRequestTx>`), debits the account and records the payment; the
//! key's entry and the answer commit in the same `WriteBatch`, or nothing does. A retry gets
//! the kept answer with `Idempotent-Replayed: true`; the same key with another body is 422; a
//! retry while the first still runs is 409. `GET /payments/{id}` reads a payment back.
//!
//! Run:
//! - `cargo run --example payments_http --features http -- demo`: serves on a free port, walks
//!   a client through a first request, a replay, a 422 and a 409, checks that the account was
//!   charged once, and exits (non-zero if anything differs);
//! - `cargo run --example payments_http --features http -- serve [--addr 127.0.0.1:3000]
//!   [--dir DIR]`: serves until Ctrl-C, for the curl lines of the README.
//!
//! The body is `{"account": "alice", "amount": 25}`, with an optional `"processing_ms"` that
//! makes the handler take that long (to see a 409).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idempotent_consumer::http::{BodyFingerprint, IDEMPOTENT_REPLAYED, IdempotencyLayer, Tx};
use idempotent_consumer::{RequestStore, RocksRequestTx, RocksStore, StateError};
use serde_json::{Value, json};

/// Every account opens with this balance.
const OPENING: i64 = 1_000;

#[derive(serde::Deserialize)]
struct Payment {
    account: String,
    amount: i64,
    #[serde(default)]
    processing_ms: u64,
}

fn number(bytes: Option<Vec<u8>>, default: i64) -> i64 {
    bytes
        .and_then(|b| String::from_utf8(b).ok()?.parse().ok())
        .unwrap_or(default)
}

/// `POST /payments`: debits the account and records the payment, in the request's transaction.
async fn create(tx: Tx<RocksRequestTx>, Json(p): Json<Payment>) -> Result<Response, Response> {
    if p.amount <= 0 {
        let body = json!({ "error": "the amount must be positive" });
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response());
    }
    let mut tx = tx.lock().await.map_err(IntoResponse::into_response)?;
    let busy = |e: StateError| e.into_response();
    let balance_key = format!("balance/{}", p.account);
    let balance = number(tx.get(&balance_key).await.map_err(busy)?, OPENING);
    if balance < p.amount {
        let body = json!({ "error": "insufficient funds", "balance": balance });
        return Ok((StatusCode::PAYMENT_REQUIRED, Json(body)).into_response());
    }
    // Payment ids in order; a request that never committed used none.
    let seq = number(tx.get("payment-seq").await.map_err(busy)?, 0) + 1;
    let id = format!("pay_{seq}");
    let payment = json!({ "id": id, "account": p.account, "amount": p.amount,
                          "balance": balance - p.amount });
    tx.put("payment-seq", seq.to_string()).await.map_err(busy)?;
    tx.put(&balance_key, (balance - p.amount).to_string())
        .await
        .map_err(busy)?;
    tx.put(format!("payment/{id}"), payment.to_string())
        .await
        .map_err(busy)?;
    tokio::time::sleep(Duration::from_millis(p.processing_ms)).await;
    let location = format!("/payments/{id}");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(payment),
    )
        .into_response())
}

/// `GET /payments/{id}`.
async fn read(State(store): State<RocksStore>, Path(id): Path<String>) -> Response {
    let mut tx = match store.begin_request().await {
        Ok(tx) => tx,
        Err(e) => return e.into_response(),
    };
    match tx.get(format!("payment/{id}")).await {
        Ok(Some(bytes)) => ([(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => e.into_response(),
    }
}

fn app(store: RocksStore) -> idempotent_consumer::Result<Router> {
    let keys = IdempotencyLayer::new(store.clone(), "payments")?
        // The same JSON document, however serialised, is the same request.
        .fingerprint(BodyFingerprint::Json);
    Ok(Router::new()
        .route("/payments", post(create).layer(keys))
        .route("/payments/{id}", get(read))
        .with_state(store))
}

async fn serve(store: RocksStore, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = app(store).map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let stop = async {
            tokio::signal::ctrl_c().await.ok();
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            eprintln!("server failed: {e}");
        }
    });
    Ok(bound)
}

/// One exchange, printed as a client would see it.
async fn post_payment(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: Value,
) -> (u16, bool, Value) {
    let response = client
        .post(format!("{base}/payments"))
        .header("idempotency-key", format!("\"{key}\""))
        .json(&body)
        .send()
        .await
        .expect("the server answers");
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    let mark = if replayed {
        " (Idempotent-Replayed)"
    } else {
        ""
    };
    println!("POST /payments key={key} {body} -> {status}{mark} {answer}");
    (status, replayed, answer)
}

async fn demo(store: RocksStore) -> Result<(), String> {
    let base = format!(
        "http://{}",
        serve(store, "127.0.0.1:0".parse().unwrap())
            .await
            .map_err(|e| e.to_string())?
    );
    let client = reqwest::Client::new();
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: &str| {
        if !ok {
            failures.push(what.to_owned());
        }
    };

    let body = json!({ "account": "alice", "amount": 25 });
    let first = post_payment(&client, &base, "order-1", body.clone()).await;
    check(first.0 == 201 && !first.1, "the first request runs");
    let retry = post_payment(&client, &base, "order-1", body.clone()).await;
    check(
        retry.0 == 201 && retry.1 && retry.2 == first.2,
        "a retry gets the kept answer",
    );
    let other = post_payment(
        &client,
        &base,
        "order-1",
        json!({"account": "alice", "amount": 99}),
    )
    .await;
    check(other.0 == 422, "the same key with another body is refused");

    let slow = json!({ "account": "alice", "amount": 5, "processing_ms": 800 });
    let in_flight = {
        let (client, base, slow) = (client.clone(), base.clone(), slow.clone());
        tokio::spawn(async move { post_payment(&client, &base, "order-2", slow).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let early = post_payment(&client, &base, "order-2", slow).await;
    check(early.0 == 409, "a retry while the first runs is 409");
    let slow_first = in_flight.await.map_err(|e| e.to_string())?;
    check(slow_first.0 == 201, "the first of order-2 completes");

    let id = first.2["id"].as_str().unwrap_or_default().to_owned();
    let payment: Value = client
        .get(format!("{base}/payments/{id}"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    println!("GET /payments/{id} -> {payment}");
    let balance = slow_first.2["balance"].as_i64();
    println!("alice's balance: {balance:?} (opened with {OPENING}, charged 25 and 5, once each)");
    check(
        balance == Some(OPENING - 30),
        "alice was charged once per key",
    );
    if failures.is_empty() {
        println!("OK: two payments charged once each through a retry, a 422 and a 409");
        Ok(())
    } else {
        Err(format!("FAILED: {}", failures.join("; ")))
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = flag("--dir").map_or_else(|| temp.path().to_owned(), Into::into);
    let store = match RocksStore::open(&dir) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("opening the store at {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    match args.first().map(String::as_str) {
        Some("demo") | None => {
            if let Err(e) = demo(store).await {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        Some("serve") => {
            let addr = flag("--addr").unwrap_or_else(|| "127.0.0.1:3000".into());
            let addr: SocketAddr = match addr.parse() {
                Ok(addr) => addr,
                Err(e) => {
                    eprintln!("--addr {addr}: {e}");
                    std::process::exit(2);
                }
            };
            match serve(store, addr).await {
                Ok(bound) => println!("serving on http://{bound} (store {})", dir.display()),
                Err(e) => {
                    eprintln!("binding {addr}: {e}");
                    std::process::exit(1);
                }
            }
            tokio::signal::ctrl_c().await.ok();
        }
        Some(other) => {
            eprintln!("unknown command {other:?}: use `demo` or `serve [--addr A] [--dir D]`");
            std::process::exit(2);
        }
    }
}
