//! Idempotency keys of requests on the stores (`RequestStore`, feature `http`): a key claimed as
//! a lease before the handler runs, seen in flight by a concurrent request, taken over once the
//! lease ran out, and completed with the handler's writes and the stored answer in one
//! transaction that a request which lost its lease cannot commit. PostgreSQL so far (a
//! database per test on the server named by `DATABASE_URL`); RocksDB comes with the HTTP layer.

mod common;

use std::time::Duration;

use common::backend::{Postgres, block_on};
use idempotent_consumer::{EntryKey, PgRequestTx, PgStore, RequestClaim, RequestStore};

const LONG: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

fn key(tenant: Option<&str>, name: &str) -> Vec<u8> {
    let key = EntryKey::new("svc", name);
    match tenant {
        Some(t) => key.tenant(t),
        None => key,
    }
    .store_key()
}

/// The handler's write: one payment row.
async fn pay(tx: &mut PgRequestTx, id: &str) {
    sqlx::query("INSERT INTO payments (id) VALUES ($1)")
        .bind(id)
        .execute(tx.conn())
        .await
        .unwrap();
}

/// A database with the handler's table.
fn database() -> Postgres {
    let pg = Postgres::new();
    pg.execute("CREATE TABLE payments (id text NOT NULL)");
    pg
}

fn claimed(claim: RequestClaim) -> idempotent_consumer::Lease {
    match claim {
        RequestClaim::Claimed(lease) => lease,
        other => panic!("not claimed: {other:?}"),
    }
}

/// One request runs; a concurrent one sees it in flight with its fingerprint; the handler's
/// write and the answer commit together, and every later request gets the answer.
#[test]
fn a_key_is_claimed_once_then_answered_with_what_committed() {
    let pg = database();
    block_on(async {
        let store: PgStore = pg.connect().await;
        let k = key(None, "pay-1");
        let lease = claimed(store.claim_request(&k, b"fp-1", LONG, DAY).await.unwrap());
        match store.claim_request(&k, b"fp-2", LONG, DAY).await.unwrap() {
            RequestClaim::InFlight {
                fingerprint,
                until_ms,
            } => {
                assert_eq!(fingerprint, b"fp-1", "the holder's fingerprint");
                assert_eq!(until_ms, lease.until_ms());
            }
            other => panic!("{other:?}"),
        }
        let mut tx = store.begin_request().await.unwrap();
        pay(&mut tx, "p1").await;
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
    });
    assert_eq!(pg.scalar("SELECT count(*) FROM payments"), Some(1));
}

/// Many requests with one key at once: exactly one gets it.
#[test]
fn concurrent_claims_of_one_key_give_it_to_one() {
    let pg = database();
    block_on(async {
        let store: PgStore = pg.connect().await;
        let k = key(None, "race");
        let claims =
            futures::future::join_all((0..50).map(|_| store.claim_request(&k, b"fp", LONG, DAY)))
                .await;
        let won = claims
            .iter()
            .filter(|c| matches!(c, Ok(RequestClaim::Claimed(_))))
            .count();
        let in_flight = claims
            .iter()
            .filter(|c| matches!(c, Ok(RequestClaim::InFlight { .. })))
            .count();
        assert_eq!((won, in_flight), (1, 49), "{claims:?}");
    });
}

/// A request that crashed before its commit left nothing but its claim; once the lease ran out
/// the retry takes the key over and runs.
#[test]
fn a_crashed_requests_claim_is_taken_over_after_its_lease() {
    let pg = database();
    block_on(async {
        let store: PgStore = pg.connect().await;
        let k = key(None, "crash");
        let short = Duration::from_millis(300);
        let _first = claimed(store.claim_request(&k, b"fp", short, DAY).await.unwrap());
        let mut tx = store.begin_request().await.unwrap();
        pay(&mut tx, "lost").await;
        drop(tx); // the crash
        assert!(matches!(
            store.claim_request(&k, b"fp", LONG, DAY).await.unwrap(),
            RequestClaim::InFlight { .. }
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let retry = claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
        let mut tx = store.begin_request().await.unwrap();
        pay(&mut tx, "kept").await;
        store.commit_request(tx, &retry, b"ok", DAY).await.unwrap();
    });
    assert_eq!(
        pg.scalar("SELECT count(*) FROM payments WHERE id = 'kept'"),
        Some(1)
    );
    assert_eq!(pg.scalar("SELECT count(*) FROM payments"), Some(1));
}

/// A request that outlived its lease while another took the key over cannot commit: its
/// writes are rolled back, and the other's answer stands.
#[test]
fn a_request_that_lost_its_lease_is_fenced() {
    let pg = database();
    block_on(async {
        let store: PgStore = pg.connect().await;
        let k = key(None, "slow");
        let slow = claimed(
            store
                .claim_request(&k, b"fp", Duration::from_millis(200), DAY)
                .await
                .unwrap(),
        );
        let mut slow_tx = store.begin_request().await.unwrap();
        pay(&mut slow_tx, "slow").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let fast = claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
        let mut fast_tx = store.begin_request().await.unwrap();
        pay(&mut fast_tx, "fast").await;
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
    });
    assert_eq!(
        pg.scalar("SELECT count(*) FROM payments WHERE id = 'slow'"),
        Some(0)
    );
    assert_eq!(pg.scalar("SELECT count(*) FROM payments"), Some(1));
}

/// Renewing holds the key past the first lease; a lease that was taken over neither renews nor
/// releases; releasing lets the next request run.
#[test]
fn leases_renew_and_release_only_while_held() {
    let pg = database();
    block_on(async {
        let store: PgStore = pg.connect().await;
        let k = key(None, "renew");
        let short = Duration::from_millis(300);
        let mut lease = claimed(store.claim_request(&k, b"fp", short, DAY).await.unwrap());
        let first_until = lease.until_ms();
        assert!(store.renew_request(&mut lease, LONG).await.unwrap());
        assert!(lease.until_ms() > first_until + 30_000);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            matches!(
                store.claim_request(&k, b"fp", LONG, DAY).await.unwrap(),
                RequestClaim::InFlight { .. }
            ),
            "renewed, still held"
        );
        assert!(store.release_request(&lease).await.unwrap());
        let next = claimed(store.claim_request(&k, b"fp", short, DAY).await.unwrap());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _taker = claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
        let mut stale = next.clone();
        assert!(!store.renew_request(&mut stale, LONG).await.unwrap());
        assert!(!store.release_request(&next).await.unwrap());
    });
}

/// A completed key is answered until its window passes; then a request with it runs again.
/// Tenants are apart: one key under two tenants is two requests.
#[test]
fn keys_expire_after_their_window_and_tenants_are_apart() {
    let pg = database();
    block_on(async {
        let store: PgStore = pg.connect().await;
        let k = key(Some("acme"), "k");
        let lease = claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
        let tx = store.begin_request().await.unwrap();
        store
            .commit_request(tx, &lease, b"first", Duration::from_millis(300))
            .await
            .unwrap();
        let other_tenant = key(Some("globex"), "k");
        claimed(
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
        claimed(store.claim_request(&k, b"fp", LONG, DAY).await.unwrap());
    });
}
