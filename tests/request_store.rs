//! Idempotency keys of requests on the stores (`RequestStore`, feature `http`), written once,
//! generic over the store and instantiated at the bottom for RocksDB and PostgreSQL (a database
//! per test on the server named by `DATABASE_URL`): a key claimed as a lease before the handler
//! runs, with the handler's transaction, seen in flight by a concurrent request, taken over once
//! the lease ran out, and completed with the handler's writes and the stored answer in one write
//! that a request which lost its lease cannot make.

mod common;

use std::time::Duration;

use common::backend::{Postgres, Rocks, block_on};
use idempotent_consumer::http::{ClientKey, IDEMPOTENCY_KEY, RequestScope};
use idempotent_consumer::{
    PgRequestTx, PgStore, RequestClaim, RequestStore, RocksRequestTx, RocksStore, Store,
};

const LONG: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// Every payment id the tests use (RocksDB's state is read key by key).
const PAYMENT_IDS: [&str; 5] = ["p1", "lost", "kept", "slow", "fast"];

/// A store under test, and the handler's write on it: one payment.
trait Subject {
    type S: RequestStore + Store;
    /// Whether a claim outlives its transaction: RocksDB's lives in the process until released
    /// or until its lease runs out; PostgreSQL's is a lock of the transaction, let go with it.
    const CLAIMS_OUTLIVE_THE_TRANSACTION: bool;
    /// Whether a concurrent claim learns the holder's fingerprint and lease: RocksDB keeps both
    /// in the claim; PostgreSQL's claim is a lock, and the key's row is written with the answer.
    const IN_FLIGHT_SHOWS_THE_HOLDER: bool;
    async fn open(&self) -> Self::S;
    async fn pay(tx: &mut <Self::S as RequestStore>::RequestTx, id: &str);
    /// How many payments committed.
    async fn payments(store: &Self::S) -> usize;
}

impl Subject for Rocks {
    type S = RocksStore;
    const CLAIMS_OUTLIVE_THE_TRANSACTION: bool = true;
    const IN_FLIGHT_SHOWS_THE_HOLDER: bool = true;
    async fn open(&self) -> RocksStore {
        self.store()
    }
    async fn pay(tx: &mut RocksRequestTx, id: &str) {
        tx.put(format!("payment/{id}"), "1").await.unwrap();
    }
    async fn payments(store: &RocksStore) -> usize {
        let mut tx = store.begin_request().await.unwrap();
        let mut n = 0;
        for id in PAYMENT_IDS {
            n += usize::from(tx.get(format!("payment/{id}")).await.unwrap().is_some());
        }
        n
    }
}

impl Subject for Postgres {
    type S = PgStore;
    const CLAIMS_OUTLIVE_THE_TRANSACTION: bool = false;
    const IN_FLIGHT_SHOWS_THE_HOLDER: bool = false;
    async fn open(&self) -> PgStore {
        let store = self.connect().await;
        let mut tx = store.begin_request().await.unwrap();
        sqlx::query("CREATE TABLE IF NOT EXISTS payments (id text NOT NULL)")
            .execute(tx.conn())
            .await
            .unwrap();
        sqlx::raw_sql("COMMIT").execute(tx.conn()).await.unwrap();
        store
    }
    async fn pay(tx: &mut PgRequestTx, id: &str) {
        sqlx::query("INSERT INTO payments (id) VALUES ($1)")
            .bind(id)
            .execute(tx.conn())
            .await
            .unwrap();
    }
    async fn payments(store: &PgStore) -> usize {
        let mut tx = store.begin_request().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(tx.conn())
            .await
            .unwrap();
        n as usize
    }
}

/// The store key of the client key `name` sent to `POST /payments`, for `tenant`.
fn key(tenant: Option<&str>, name: &str) -> Vec<u8> {
    let mut headers = http::HeaderMap::new();
    headers.insert(IDEMPOTENCY_KEY, format!("\"{name}\"").parse().unwrap());
    let client = ClientKey::from_headers(&headers, 64).unwrap().unwrap();
    let scope = RequestScope {
        namespace: "svc",
        tenant,
        method: &http::Method::POST,
        route: "/payments",
    };
    scope.store_key(&client).unwrap()
}

/// The lease and the handler's transaction of a claim that got the key.
fn claimed<T: std::fmt::Debug>(claim: RequestClaim<T>) -> (idempotent_consumer::Lease, T) {
    match claim {
        RequestClaim::Claimed { lease, tx } => (lease, tx),
        other => panic!("not claimed: {other:?}"),
    }
}

/// Claims `k` until it is this request's, for at most two seconds: on PostgreSQL the lock of a
/// transaction dropped without a rollback (a crash) goes once the rollback or the session's end
/// reaches the server, moments later.
async fn claimed_soon<S: RequestStore>(
    store: &S,
    k: &[u8],
) -> (idempotent_consumer::Lease, S::RequestTx) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match store.claim_request(k, b"fp", LONG, DAY).await.unwrap() {
            RequestClaim::Claimed { lease, tx } => return (lease, tx),
            other if std::time::Instant::now() > deadline => panic!("never claimed: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// One request runs; a concurrent one sees it in flight (with its fingerprint where the store
/// keeps it); the handler's write and the answer commit together, and every later request gets
/// the answer.
async fn a_key_is_claimed_once_then_answered_with_what_committed<B: Subject>(b: &B) {
    let store = b.open().await;
    let k = key(None, "pay-1");
    let (lease, mut tx) = claimed(store.claim_request(&k, b"fp-1", LONG, DAY).await.unwrap());
    match store.claim_request(&k, b"fp-2", LONG, DAY).await.unwrap() {
        RequestClaim::InFlight {
            fingerprint,
            until_ms,
        } => {
            if B::IN_FLIGHT_SHOWS_THE_HOLDER {
                assert_eq!(fingerprint, b"fp-1", "the holder's fingerprint");
                assert_eq!(until_ms, lease.until_ms());
            } else {
                assert_eq!((fingerprint.len(), until_ms), (0, 0), "not known in flight");
            }
        }
        other => panic!("{other:?}"),
    }
    B::pay(&mut tx, "p1").await;
    store
        .commit_request(tx, &lease, b"201 created", DAY)
        .await
        .unwrap();
    match store.claim_request(&k, b"fp-1", LONG, DAY).await.unwrap() {
        RequestClaim::Completed {
            fingerprint,
            response,
            ..
        } => {
            assert_eq!(
                (fingerprint.as_slice(), response.as_slice()),
                (&b"fp-1"[..], &b"201 created"[..])
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(B::payments(&store).await, 1);
}

/// Many requests with one key at once: exactly one gets it.
async fn concurrent_claims_of_one_key_give_it_to_one<B: Subject>(b: &B) {
    let store = b.open().await;
    let k = key(None, "race");
    let claims =
        futures::future::join_all((0..50).map(|_| store.claim_request(&k, b"fp", LONG, DAY))).await;
    let won = claims
        .iter()
        .filter(|c| matches!(c, Ok(RequestClaim::Claimed { .. })))
        .count();
    let in_flight = claims
        .iter()
        .filter(|c| matches!(c, Ok(RequestClaim::InFlight { .. })))
        .count();
    assert_eq!((won, in_flight), (1, 49), "{claims:?}");
}

/// A request that crashed before its commit (its transaction dropped) left nothing: the retry
/// runs once the claim is gone, at once where the claim is the transaction's (PostgreSQL),
/// once its lease ran out where it outlives it (RocksDB), and commits the one payment.
async fn a_crashed_requests_claim_is_taken_over<B: Subject>(b: &B) {
    let store = b.open().await;
    let k = key(None, "crash");
    let short = Duration::from_millis(300);
    let (_first, mut tx) = claimed(store.claim_request(&k, b"fp", short, DAY).await.unwrap());
    B::pay(&mut tx, "lost").await;
    drop(tx); // the crash
    if B::CLAIMS_OUTLIVE_THE_TRANSACTION {
        assert!(matches!(
            store.claim_request(&k, b"fp", LONG, DAY).await.unwrap(),
            RequestClaim::InFlight { .. }
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (retry, mut tx) = claimed_soon(&store, &k).await;
    B::pay(&mut tx, "kept").await;
    store.commit_request(tx, &retry, b"ok", DAY).await.unwrap();
    assert_eq!(B::payments(&store).await, 1);
}

/// A request that outlived its lease (its transaction idle, a stalled server) while another took
/// the key over cannot commit: its writes are rolled back, and the other's answer stands.
async fn a_request_that_lost_its_lease_is_fenced<B: Subject>(b: &B) {
    let store = b.open().await;
    let k = key(None, "slow");
    let (slow, mut slow_tx) = claimed(
        store
            .claim_request(&k, b"fp", Duration::from_millis(200), DAY)
            .await
            .unwrap(),
    );
    B::pay(&mut slow_tx, "slow").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fast, mut fast_tx) = claimed_soon(&store, &k).await;
    B::pay(&mut fast_tx, "fast").await;
    // The zombie commits while the request that took over still runs.
    let error = store
        .commit_request(slow_tx, &slow, b"slow", DAY)
        .await
        .expect_err("a zombie request committed");
    assert!(error.is_lease_lost(), "{error}");
    store
        .commit_request(fast_tx, &fast, b"fast", DAY)
        .await
        .unwrap();
    match store.claim_request(&k, b"fp", LONG, DAY).await.unwrap() {
        RequestClaim::Completed { response, .. } => assert_eq!(response, b"fast"),
        other => panic!("{other:?}"),
    }
    assert_eq!(B::payments(&store).await, 1);
}

/// A key answered while other requests keep asking for it is never claimed again: every claim
/// after the answer committed finds it (on PostgreSQL, the claim reads the key's row on a
/// snapshot taken after its lock was granted, not on one from before the holder let it go).
async fn a_key_answered_meanwhile_is_never_claimed_again<B: Subject>(b: &B) {
    let store = b.open().await;
    for round in 0..40 {
        let k = key(None, &format!("answered-meanwhile-{round}"));
        let (lease, tx) = claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
        let ask = || async {
            loop {
                match store.claim_request(&k, b"fp", LONG, DAY).await.unwrap() {
                    RequestClaim::Completed { .. } => return Ok(()),
                    RequestClaim::Claimed { .. } => return Err("claimed after the answer"),
                    _ => tokio::task::yield_now().await,
                }
            }
        };
        let answer = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            store.commit_request(tx, &lease, b"ok", DAY).await.unwrap();
        };
        let askers = futures::future::join_all((0..8).map(|_| ask()));
        let (asked, ()) = futures::future::join(askers, answer).await;
        for result in asked {
            assert_eq!(result, Ok(()), "round {round}");
        }
    }
}

/// Renewing holds the key past the first lease; a lease that was taken over neither renews nor
/// releases; releasing lets the next request run.
async fn leases_renew_and_release_only_while_held<B: Subject>(b: &B) {
    let store = b.open().await;
    let k = key(None, "renew");
    let short = Duration::from_millis(300);
    let (mut lease, mut tx) = claimed(store.claim_request(&k, b"fp", short, DAY).await.unwrap());
    let first_until = lease.until_ms();
    assert!(
        store
            .renew_request(&mut lease, Some(&mut tx), LONG)
            .await
            .unwrap()
    );
    assert!(lease.until_ms() > first_until + 30_000);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        matches!(
            store.claim_request(&k, b"fp", LONG, DAY).await.unwrap(),
            RequestClaim::InFlight { .. }
        ),
        "renewed, still held"
    );
    assert!(store.release_request(&lease, Some(tx)).await.unwrap());
    let (next, mut next_tx) = claimed(store.claim_request(&k, b"fp", short, DAY).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let _taker = claimed_soon(&store, &k).await;
    let mut stale = next.clone();
    assert!(
        !store
            .renew_request(&mut stale, Some(&mut next_tx), LONG)
            .await
            .unwrap()
    );
    assert!(!store.release_request(&next, Some(next_tx)).await.unwrap());
}

/// A completed key is answered until its window passes; then a request with it runs again.
/// Tenants are apart: one key under two tenants is two requests.
async fn keys_expire_after_their_window_and_tenants_are_apart<B: Subject>(b: &B) {
    let store = b.open().await;
    let k = key(Some("acme"), "k");
    let (lease, tx) = claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
    store
        .commit_request(tx, &lease, b"first", Duration::from_millis(300))
        .await
        .unwrap();
    let other_tenant = key(Some("globex"), "k");
    let _other = claimed(
        store
            .claim_request(&other_tenant, b"fp", LONG, DAY)
            .await
            .unwrap(),
    );
    assert!(matches!(
        store.claim_request(&k, b"fp", LONG, DAY).await.unwrap(),
        RequestClaim::Completed { .. }
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (again, tx) = claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
    // The expired answer is taken over by the new one.
    store
        .commit_request(tx, &again, b"second", DAY)
        .await
        .unwrap();
    match store.claim_request(&k, b"fp", LONG, DAY).await.unwrap() {
        RequestClaim::Completed { response, .. } => assert_eq!(response, b"second"),
        other => panic!("{other:?}"),
    }
}

/// Request keys go with the same bounded purge as the consumer's entries, once their window
/// passed; a claim in flight has nothing to purge (RocksDB keeps it in memory, PostgreSQL
/// writes the key's row only with the answer) and stays held.
async fn expired_request_keys_are_purged<B: Subject>(b: &B) {
    let store = b.open().await;
    let short = Duration::from_millis(200);
    let answered = key(None, "answered");
    let (lease, tx) = claimed(
        store
            .claim_request(&answered, b"fp", LONG, DAY)
            .await
            .unwrap(),
    );
    store
        .commit_request(tx, &lease, b"ok", short)
        .await
        .unwrap();
    let abandoned = key(None, "abandoned");
    let _abandoned = claimed(
        store
            .claim_request(&abandoned, b"fp", short, short)
            .await
            .unwrap(),
    );
    let live = key(None, "live");
    let _live = claimed(store.claim_request(&live, b"fp", LONG, DAY).await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let purged = store.purge_expired("svc", now, 100).await.unwrap();
    assert_eq!(purged, 1, "the answered key");
    assert_eq!(store.purge_expired("other", now, 100).await.unwrap(), 0);
    assert!(matches!(
        store.claim_request(&live, b"fp", LONG, DAY).await.unwrap(),
        RequestClaim::InFlight { .. }
    ));
}

/// A claim whose process died (the store and its transaction dropped, the store opened again)
/// holds nothing: on RocksDB the claim lived in the process; on PostgreSQL it was the dead
/// session's lock. A retry runs.
async fn a_dead_processs_claim_is_let_go<B: Subject>(b: &B) {
    let k = key(None, "restart");
    {
        let store = b.open().await;
        let _held = claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
    }
    let store = b.open().await;
    claimed_soon(&store, &k).await;
}

/// Instantiates every test above once per store.
macro_rules! requests {
    ($($name:ident),* $(,)?) => {
        mod rocksdb {
            $(
                #[test]
                fn $name() {
                    super::block_on(super::$name(&super::Rocks::new()));
                }
            )*
        }

        mod postgres {
            $(
                #[test]
                fn $name() {
                    let pg = super::Postgres::new();
                    super::block_on(super::$name(&pg));
                }
            )*
        }
    };
}

requests!(
    a_key_is_claimed_once_then_answered_with_what_committed,
    concurrent_claims_of_one_key_give_it_to_one,
    a_crashed_requests_claim_is_taken_over,
    a_request_that_lost_its_lease_is_fenced,
    a_key_answered_meanwhile_is_never_claimed_again,
    leases_renew_and_release_only_while_held,
    keys_expire_after_their_window_and_tenants_are_apart,
    expired_request_keys_are_purged,
    a_dead_processs_claim_is_let_go,
);
