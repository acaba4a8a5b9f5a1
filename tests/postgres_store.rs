//! What only the shared PostgreSQL store has to prove: fencing of a zombie's commit, claims that
//! make a concurrent duplicate in another instance wait and then see a duplicate, recovery from a
//! connection killed mid-transaction, two instances of one group, and the schema options. Each
//! test gets its own database on the server named by `DATABASE_URL`.

mod common;

use std::time::Duration;

use common::backend::{Backend, Postgres, block_on};
use common::{
    Cluster, Incarnation, Ledger, LedgerTx, Movement, builder, committed, setup, store_key, unique,
};
use idempotent_consumer::{
    BatchStatement, Claim, ClaimAhead, DeadLetterTopic, DedupEntry, DeferredWrites, EntryStatus,
    Error, ErrorClass, Handler, HandlerError, Inspect, Outcome, PartitionId, PgOptions, PgStore,
    PgTx, Record, Store, Transaction,
};

fn entry(offset: i64, payload: &[u8]) -> DedupEntry {
    DedupEntry {
        status: EntryStatus::Completed,
        fingerprint: idempotent_consumer::Fingerprint::of(Some(payload)),
        outcome: Some(b"ok".to_vec()),
        topic: "t".into(),
        partition: 0,
        offset,
        created_at_ms: 1,
        expires_at_ms: 4_000_000_000_000, // 2096
    }
}

/// A zombie (an instance that lost its partition but does not know yet) commits after the new
/// owner acquired the partition: the commit is rejected and nothing of it remains: no ledger
/// row, no dedup row (not even one claimed ahead, which already held its entry), no deferred
/// row, no position change. Driven step by step, two stores as two instances.
#[test]
fn zombie_commit_is_fenced_and_rolled_back() {
    let pg = Postgres::new();
    pg.execute(DEPOSITS);
    block_on(async {
        let zombie = pg.connect().await;
        let owner = pg.connect().await;
        let pid = PartitionId::new("g", "t", 0);
        let key = store_key("g", "pay-1");
        let ahead_key = store_key("g", "pay-2");
        let ahead = ClaimAhead {
            key: &ahead_key,
            fingerprint: idempotent_consumer::Fingerprint::of(Some(b"p")),
            topic: "t",
            partition: 0,
            offset: 1,
            created_at_ms: 1,
            expires_at_ms: 4_000_000_000_000,
        };
        let insert = BatchStatement::<(String, String, i64)>::new(INSERT_DEPOSITS);

        let a = zombie.acquire(&pid).await.unwrap();
        let mut tx = zombie.begin(&pid, a.epoch).await.unwrap();
        tx.prepare_claims(&[ahead], 10).await.unwrap();
        assert_eq!(tx.claim(&key, 10).await.unwrap(), Claim::Claimed);
        tx.savepoint().await.unwrap();
        tx.add("alice", 100).await.unwrap();
        tx.put_entry(&key, &entry(0, b"p")).await.unwrap();
        tx.put_entry(&ahead_key, &ahead.entry()).await.unwrap();
        tx.defer(&insert, ("pay-2".into(), "alice".into(), 5));

        // The partition moves on while the zombie's batch is open.
        let b = owner.acquire(&pid).await.unwrap();
        assert_eq!(b.epoch, a.epoch + 1);

        let err = tx.commit(1).await.unwrap_err();
        match &err {
            Error::Fenced { epoch, current, .. } => {
                assert_eq!((*epoch, *current), (a.epoch, b.epoch));
            }
            other => panic!("expected a fenced commit, got {other}"),
        }

        let position = owner.position(&pid).await.unwrap().unwrap();
        assert_eq!(position.next_offset, None, "the position did not move");
        assert_eq!(position.epoch, b.epoch);
        assert_eq!(committed(&owner, "g", "pay-1").await, None, "no dedup row");
        assert_eq!(
            committed(&owner, "g", "pay-2").await,
            None,
            "no row claimed ahead"
        );
        assert_eq!(owner.count_entries().await.unwrap(), 0);
        // The new owner can claim the key: the zombie's claim went with its rollback.
        let mut tx = owner.begin(&pid, b.epoch).await.unwrap();
        assert_eq!(tx.claim(&key, 10).await.unwrap(), Claim::Claimed);
    });
    assert_eq!(
        pg.scalar("SELECT count(*) FROM ledger"),
        Some(0),
        "no ledger row"
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM deposits"),
        Some(0),
        "no deferred row"
    );
}

/// The same key claimed by two instances at once: the second waits on the primary key until the
/// first commits, then sees the first's entry (a duplicate) instead of running the handler; if
/// the first rolls back instead, the second gets the key.
#[test]
fn concurrent_claim_in_another_instance_waits_then_sees_the_duplicate() {
    let pg = Postgres::new();
    block_on(async {
        let one = pg.connect().await;
        let two = pg.connect().await;
        let (p0, p1) = (PartitionId::new("g", "t", 0), PartitionId::new("g", "t", 1));
        let e0 = one.acquire(&p0).await.unwrap().epoch;
        let e1 = two.acquire(&p1).await.unwrap().epoch;
        let key = store_key("g", "pay-1");

        let mut first = one.begin(&p0, e0).await.unwrap();
        assert_eq!(first.claim(&key, 10).await.unwrap(), Claim::Claimed);

        let second = {
            let (two, key, p1) = (two.clone(), key.clone(), p1.clone());
            tokio::spawn(async move {
                let mut tx = two.begin(&p1, e1).await.unwrap();
                let claim = tx.claim(&key, 10).await.unwrap();
                (claim, tx)
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !second.is_finished(),
            "the second claim waits for the first"
        );

        first.add("bob", 5).await.unwrap();
        first.put_entry(&key, &entry(0, b"p")).await.unwrap();
        first.commit(1).await.unwrap();
        let (claim, _tx) = second.await.unwrap();
        assert_eq!(claim, Claim::Existing(entry(0, b"p")));

        // A rolled-back first claim frees the key.
        let other = store_key("g", "pay-2");
        let mut first = one.begin(&p0, e0).await.unwrap();
        assert_eq!(first.claim(&other, 10).await.unwrap(), Claim::Claimed);
        let second = {
            let (two, other) = (two.clone(), other.clone());
            tokio::spawn(async move {
                let mut tx = two.begin(&p1, e1).await.unwrap();
                tx.claim(&other, 10).await.unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished());
        drop(first);
        assert_eq!(second.await.unwrap(), Claim::Claimed);
    });
    assert_eq!(pg.scalar("SELECT balance FROM ledger"), Some(5));
}

/// A record that fails is rolled back to its savepoint: its SQL and its dedup entry are undone,
/// and the records before and after it in the batch commit.
#[test]
fn savepoint_rollback_undoes_one_record_and_keeps_the_batch() {
    let pg = Postgres::new();
    block_on(async {
        let store = pg.connect().await;
        let pid = PartitionId::new("g", "t", 0);
        let epoch = store.acquire(&pid).await.unwrap().epoch;
        let keys = [
            store_key("g", "a"),
            store_key("g", "b"),
            store_key("g", "c"),
        ];
        let mut tx = store.begin(&pid, epoch).await.unwrap();
        for (offset, key) in keys.iter().enumerate() {
            assert_eq!(tx.claim(key, 10).await.unwrap(), Claim::Claimed);
            tx.savepoint().await.unwrap();
            tx.add("eve", 1 << offset).await.unwrap();
            tx.put_entry(key, &entry(offset as i64, b"p"))
                .await
                .unwrap();
            if offset == 1 {
                tx.rollback_to_savepoint().await.unwrap();
                assert_eq!(tx.lookup(key).await.unwrap(), None, "the entry is undone");
            }
        }
        tx.commit(3).await.unwrap();
        assert!(committed(&store, "g", "a").await.is_some());
        assert_eq!(committed(&store, "g", "b").await, None);
        assert!(committed(&store, "g", "c").await.is_some());
    });
    assert_eq!(
        pg.balances()["eve"],
        1 + 4,
        "the middle record's write is undone"
    );
}

/// Keys claimed ahead: a record that leaves the entry its claim expected commits it (the claim
/// already wrote it), one that leaves another entry (an outcome) commits that one, and a claim
/// whose record did not finish (retried later, or stopped before) is released by the commit, so
/// it never blocks or shadows the record's next attempt.
/// A claim ahead of key `key` for the record at `offset` of `t`/0 (payload `p`, live).
fn claim_ahead(key: &[u8], offset: i64) -> ClaimAhead<'_> {
    ClaimAhead {
        key,
        fingerprint: idempotent_consumer::Fingerprint::of(Some(b"p")),
        topic: "t",
        partition: 0,
        offset,
        created_at_ms: 1,
        expires_at_ms: 4_000_000_000_000,
    }
}

#[test]
fn claims_ahead_commit_the_entry_their_record_left_and_unfinished_ones_are_released() {
    let pg = Postgres::new();
    block_on(async {
        let store = pg.connect().await;
        let pid = PartitionId::new("g", "t", 0);
        let epoch = store.acquire(&pid).await.unwrap().epoch;
        let keys = [
            store_key("g", "as-expected"),
            store_key("g", "with-outcome"),
            store_key("g", "later"),
        ];
        let ahead = |i: usize| claim_ahead(&keys[i], i as i64);
        let mut tx = store.begin(&pid, epoch).await.unwrap();
        tx.prepare_claims(&[ahead(0), ahead(1), ahead(2), ahead(0)], 10)
            .await
            .unwrap();
        for key in &keys {
            assert_eq!(tx.claim(key, 10).await.unwrap(), Claim::Claimed);
        }
        let expected = ahead(0).entry();
        tx.put_entry(&keys[0], &expected).await.unwrap();
        let mut with_outcome = ahead(1).entry();
        with_outcome.outcome = Some(b"receipt".to_vec());
        tx.put_entry(&keys[1], &with_outcome).await.unwrap();
        tx.commit(2).await.unwrap();
        assert_eq!(committed(&store, "g", "as-expected").await, Some(expected));
        assert_eq!(
            committed(&store, "g", "with-outcome").await,
            Some(with_outcome)
        );
        assert_eq!(committed(&store, "g", "later").await, None);
        assert_eq!(store.count_entries().await.unwrap(), 2);
        // The gauge's count (exact on a small table) leaves claims out too.
        assert_eq!(Store::entry_count(&store).await.unwrap(), 2);

        // The released key is free for the next batch.
        let mut tx = store.begin(&pid, epoch).await.unwrap();
        tx.prepare_claims(&[ahead(2)], 10).await.unwrap();
        assert_eq!(tx.claim(&keys[2], 10).await.unwrap(), Claim::Claimed);
        assert!(matches!(
            tx.claim(&keys[0], 10).await.unwrap(),
            Claim::Existing(_)
        ));
    });
}

/// A handler that ends the store transaction (`COMMIT` on `tx.conn()`) also commits the rows
/// claimed ahead for records it has not handled yet, and they already say `completed`: left
/// alone, those records would be found as duplicates and never handled. The commit detects that
/// its transaction is no longer the one that claimed them, fails with a clear error instead of
/// advancing the position, and releases them, so their records are handled again.
#[test]
fn a_handler_ending_the_transaction_is_detected_and_its_unhandled_claims_released() {
    let pg = Postgres::new();
    block_on(async {
        let store = pg.connect().await;
        let pid = PartitionId::new("g", "t", 0);
        let epoch = store.acquire(&pid).await.unwrap().epoch;
        let keys = [store_key("g", "handled"), store_key("g", "not-yet")];
        let ahead = |i: usize| claim_ahead(&keys[i], i as i64);
        let mut tx = store.begin(&pid, epoch).await.unwrap();
        tx.prepare_claims(&[ahead(0), ahead(1)], 10).await.unwrap();
        assert_eq!(tx.claim(&keys[0], 10).await.unwrap(), Claim::Claimed);
        // The handler of offset 0 ends the transaction.
        sqlx::raw_sql("COMMIT").execute(tx.conn()).await.unwrap();
        tx.put_entry(&keys[0], &ahead(0).entry()).await.unwrap();
        let error = tx.commit(1).await.expect_err("the commit went on");
        assert!(!error.is_fenced(), "{error}");
        assert!(
            error.to_string().contains("ended the store transaction"),
            "{error}"
        );
        assert_eq!(
            committed(&store, "g", "not-yet").await,
            None,
            "an unhandled record's claim stayed committed as completed"
        );
        let position = store.position(&pid).await.unwrap();
        assert_eq!(position.and_then(|p| p.next_offset), None, "advanced");
        // The partition goes on: the next batch claims the released key.
        let mut tx = store.begin(&pid, epoch).await.unwrap();
        assert_eq!(tx.claim(&keys[1], 10).await.unwrap(), Claim::Claimed);
    });
}

/// Two instances (each its own pool) in one group, the same keys on both partitions at the same
/// moment: each key's handler runs once across the two.
#[test]
fn same_key_on_partitions_of_two_instances_runs_once() {
    let pg = Postgres::new();
    let cluster = Cluster::start();
    let topic = cluster.create_topic(2);
    let group = unique("group");
    let start = |ledger: Ledger| {
        Incarnation::launch(&pg, |store| {
            builder(&cluster, &group, &topic)
                .batch(10, Duration::from_millis(20))
                .store(store)
                .build(ledger)
                .unwrap()
        })
    };
    let mut ledger = Ledger::new();
    ledger.delay = Duration::from_millis(2);
    // Each consumer sees new records at a moment of its own (a fetch that found nothing waits
    // out its time on the mock): both start on their first record together.
    ledger.start_together = Some(std::sync::Arc::new(tokio::sync::Barrier::new(2)));
    let (one_seen, two_seen) = (ledger.observed.clone(), Ledger::new().observed);
    let one = start(ledger.clone());
    let mut other = ledger;
    other.observed = two_seen.clone();
    let two = start(other);
    // Let the group settle on one partition each before anything arrives (the second join is a
    // rebalance).
    std::thread::sleep(Duration::from_secs(8));
    // Every key on both partitions, in opposite orders: each instance starts on keys the other
    // reaches last, so both handle records, and they meet on the same keys at the same moment.
    let movements = |keys: Vec<usize>| {
        keys.into_iter()
            .map(|i| (format!("x{i}"), "kim".to_owned(), 1))
            .collect::<Vec<_>>()
    };
    cluster.send_movements(&topic, 0, movements((0..40).collect()));
    cluster.send_movements(&topic, 1, movements((0..40).rev().collect()));
    let settled = std::time::Instant::now();
    loop {
        let (a, b) = (one.stats(), two.stats());
        if a.applied + a.duplicates() + b.applied + b.duplicates() >= 80 {
            break;
        }
        assert!(settled.elapsed() < common::WAIT, "{a:?} {b:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (a, b) = (one.stats(), two.stats());
    one.stop().unwrap();
    two.stop().unwrap();
    assert!(
        !one_seen.calls().is_empty() && !two_seen.calls().is_empty(),
        "each instance handled records: {a:?} {b:?}"
    );
    assert_eq!(a.applied + b.applied, 40, "{a:?} {b:?}");
    assert_eq!(
        a.duplicates_repeated_key + b.duplicates_repeated_key,
        40,
        "{a:?} {b:?}"
    );
    assert_eq!(pg.balances()["kim"], 40);
}

/// The database connection is killed in the middle of a batch (pg_terminate_backend): the batch
/// rolls back, the runtime handles it again on a new connection, and every record counts once.
#[test]
fn connection_killed_mid_transaction_is_retried_without_loss_or_doubling() {
    let pg = Postgres::new();
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    for i in 0..30 {
        cluster.send_movement(&topic, 0, &format!("c{i}"), "lou", 1);
    }
    let mut ledger = Ledger::new();
    ledger.notify_at = Some(10);
    ledger.delay = Duration::from_millis(30);
    let observed = ledger.observed.clone();
    let running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .batch(100, Duration::from_secs(5))
            .store(store)
            .build(ledger)
            .unwrap()
    });
    running.wait_notified(&observed);
    let killed = pg.scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'idempotent-consumer' \
         AND xact_start IS NOT NULL",
    );
    assert_eq!(killed, Some(1), "the batch's connection was killed");
    running.wait_for("every record", |s| s.applied == 30);
    let stats = running.stats();
    running.stop().unwrap();
    // The kill surfaces where the connection is next used: in the runtime's own statements (a
    // store retry of the batch) or in the handler's query, which the handler reports as
    // retryable (the batch is dropped and handled again: a retry).
    assert!(stats.store_retries + stats.retries >= 1, "{stats:?}");
    assert_eq!(pg.balances()["lou"], 30, "nothing lost, nothing doubled");
    assert_eq!(
        pg.next_offset(&PartitionId::new(&group, &topic, 0)),
        Some(30)
    );
    assert!(
        observed.calls().iter().filter(|c| c.1 == 5).count() >= 2,
        "the killed batch's records were handled again"
    );
}

/// With the dead-letter topic disabled, the store's table is the only destination: the row, with
/// its readable columns, commits in the batch's transaction with the position, and nothing is
/// produced.
#[test]
fn dead_letters_go_to_the_table_only_when_the_topic_is_disabled() {
    let pg = Postgres::new();
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    cluster.send(&topic, 0, Some("bad-1"), Some(b"not json"));
    cluster.send_movement(&topic, 0, "ok-1", "max", 2);
    let running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .dead_letter_topic(DeadLetterTopic::Disabled)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    running.stop().unwrap();
    assert_eq!(
        pg.scalar(
            "SELECT count(*) FROM idc_dead_letters WHERE reason = 'permanent' \
             AND \"offset\" = 0 AND idempotency_key = 'bad-1'::bytea \
             AND payload = 'not json'::bytea AND attempts = 1 \
             AND message LIKE 'cannot decode payload of %expected ident%'"
        ),
        Some(1),
        "one readable row: {:?}",
        pg.dead_letters(&PartitionId::new(&group, &topic, 0))
    );
    // The payload is stored once: in its column, not again inside the encoded letter.
    assert_eq!(
        pg.scalar("SELECT count(*) FROM idc_dead_letters WHERE position(payload IN letter) > 0"),
        Some(0),
        "the payload is kept twice"
    );
    let letters = pg.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(letters[0].record.payload(), Some(&b"not json"[..]));
    assert_eq!(
        pg.next_offset(&PartitionId::new(&group, &topic, 0)),
        Some(2)
    );
    assert!(
        cluster.read_all(&format!("{topic}.dlq"), 0).is_empty(),
        "nothing produced"
    );
    assert_eq!(pg.balances()["max"], 2);
}

/// The longest key a configuration allows fits PostgreSQL's b-tree: the builder refuses a
/// `max_key_len` whose longest store key (a conflicting record's, with its scope and
/// fingerprint) is over the store's limit, and a key at exactly the limit, of incompressible
/// bytes, commits.
#[test]
fn keys_are_bounded_by_what_postgresql_can_index() {
    let pg = Postgres::new();
    let cluster = Cluster::start();
    block_on(async {
        let store = pg.connect().await;
        let limit = store.max_key_bytes().expect("PostgreSQL limits its keys");
        let build = |max_key_len: usize| {
            builder(&cluster, "g", "t")
                .identity(idempotent_consumer::Identity::new().max_key_len(max_key_len))
                .store(store.clone())
                .build(Ledger::new())
        };
        // Group "g" (1 byte), the conflict scope's tenant suffix (10), the fingerprint (32).
        let widest = limit - 1 - 10 - 32;
        let err = build(widest + 1).unwrap_err();
        assert!(err.to_string().contains(&format!("{limit} bytes")), "{err}");
        build(widest).unwrap();

        // The longest key that configuration makes, of bytes no compression shrinks.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let key: Vec<u8> = (0..widest + 32)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                (state >> 56) as u8
            })
            .collect();
        let store_key = idempotent_consumer::EntryKey::new("g", &key)
            .tenant("\u{1f}conflicts")
            .store_key();
        let pid = PartitionId::new("g", "t", 0);
        let epoch = store.acquire(&pid).await.unwrap().epoch;
        let mut tx = store.begin(&pid, epoch).await.unwrap();
        assert_eq!(tx.claim(&store_key, 10).await.unwrap(), Claim::Claimed);
        tx.put_entry(&store_key, &entry(0, b"p")).await.unwrap();
        tx.commit(1).await.unwrap();
    });
}

/// Table names come from validated configuration; a custom schema and prefix work; with
/// migrations off, missing tables are a clear error; migrations run twice are a no-op.
#[test]
fn schema_options_are_validated_and_applied() {
    let pg = Postgres::new();
    block_on(async {
        for (schema, prefix) in [
            ("public", "x; DROP TABLE ledger; --"),
            ("Bad", "idc_"),
            ("9s", ""),
        ] {
            let options = PgOptions {
                schema: schema.into(),
                table_prefix: prefix.into(),
                ..PgOptions::default()
            };
            let err = PgStore::connect_with(pg.url(), options).await.unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err}");
            assert!(err.to_string().contains("is not allowed"), "{err}");
        }

        let custom = PgOptions {
            schema: "billing".into(),
            table_prefix: "inbox_".into(),
            ..PgOptions::default()
        };
        let store = PgStore::connect_with(pg.url(), custom.clone())
            .await
            .unwrap();
        let pid = PartitionId::new("g", "t", 0);
        assert_eq!(store.acquire(&pid).await.unwrap().epoch, 1);
        // Applying the migrations again changes nothing.
        let again = PgStore::connect_with(pg.url(), custom).await.unwrap();
        assert_eq!(again.acquire(&pid).await.unwrap().epoch, 2);

        let unmigrated = PgOptions {
            table_prefix: "absent_".into(),
            migrate: false,
            ..PgOptions::default()
        };
        let err = PgStore::connect_with(pg.url(), unmigrated)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("is missing") && err.to_string().contains("absent_dedup"),
            "{err}"
        );
    });
    assert_eq!(
        pg.scalar("SELECT count(*) FROM billing.inbox_positions"),
        Some(1)
    );
    assert_eq!(
        pg.scalar("SELECT count(*) FROM ledger"),
        Some(0),
        "the ledger table is still there"
    );
}

/// A deposits table whose rows handlers defer, and a count of the INSERT statements run on it
/// (a statement-level trigger), to tell one statement per batch from one per record.
const DEPOSITS: &str = "CREATE TABLE deposits (key text PRIMARY KEY, account text NOT NULL, \
     amount bigint NOT NULL CHECK (amount >= 0)); \
     CREATE TABLE deposit_statements (n bigint NOT NULL); \
     INSERT INTO deposit_statements VALUES (0); \
     CREATE FUNCTION count_deposit_statement() RETURNS trigger LANGUAGE plpgsql AS \
     $$ BEGIN UPDATE deposit_statements SET n = n + 1; RETURN NULL; END $$; \
     CREATE TRIGGER deposits_counted AFTER INSERT ON deposits \
     FOR EACH STATEMENT EXECUTE FUNCTION count_deposit_statement()";

const INSERT_DEPOSITS: &str = "INSERT INTO deposits (key, account, amount) SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])";

/// Defers one `deposits` row per record: (idempotency key, account, amount).
struct Deposits {
    insert: BatchStatement<(String, String, i64)>,
}

impl Deposits {
    fn new(sql: &'static str) -> Self {
        Deposits {
            insert: BatchStatement::new(sql),
        }
    }
}

impl Handler<PgTx> for Deposits {
    async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
        let m: Movement = record.json()?;
        let key = record.header("idempotency-key").unwrap_or_default();
        let key = String::from_utf8_lossy(key).into_owned();
        tx.defer(&self.insert, (key, m.account, m.amount));
        Ok(Outcome::none())
    }
}

/// Deferred rows commit with their batch, once, in one statement per batch (not one per
/// record); redelivered and repeated keys add nothing.
#[test]
fn deferred_rows_are_written_once_per_batch() {
    let pg = Postgres::new();
    pg.execute(DEPOSITS);
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    let movements = (0..250).map(|i| (format!("d{}", i % 200), "ada".to_owned(), 1));
    cluster.send_movements(&topic, 0, movements);
    let running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .batch(100, Duration::from_millis(200))
            .store(store)
            .build(Deposits::new(INSERT_DEPOSITS))
            .unwrap()
    });
    running.wait_for("every record", |s| s.applied + s.duplicates() == 250);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(stats.applied, 200, "{stats:?}");
    assert_eq!(pg.scalar("SELECT count(*) FROM deposits"), Some(200));
    assert_eq!(
        pg.scalar("SELECT sum(amount)::bigint FROM deposits"),
        Some(200)
    );
    let statements = pg.scalar("SELECT n FROM deposit_statements").unwrap();
    assert!(
        (2..=stats.batches_committed as i64).contains(&statements),
        "{statements} INSERT statements for 200 rows in {} batches",
        stats.batches_committed
    );
    assert_eq!(
        pg.next_offset(&PartitionId::new(&group, &topic, 0)),
        Some(250)
    );
}

/// A deferred row the database rejects fails at the batch's statement; the batch is handled
/// again record by record, the rejected row's record is dead-lettered as a permanent failure,
/// and every other record's row commits once.
#[test]
fn a_rejected_deferred_row_dead_letters_its_record_alone() {
    let pg = Postgres::new();
    pg.execute(DEPOSITS);
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    let movements = (0..10).map(|i| {
        (
            format!("r{i}"),
            "bo".to_owned(),
            if i == 4 { -1 } else { 1 },
        )
    });
    cluster.send_movements(&topic, 0, movements);
    let running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .batch(100, Duration::from_millis(200))
            .dead_letter_topic(DeadLetterTopic::Disabled)
            .store(store)
            .build(Deposits::new(INSERT_DEPOSITS))
            .unwrap()
    });
    running.wait_for("every record", |s| s.applied + s.dead_lettered == 10);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!((stats.applied, stats.dead_lettered), (9, 1), "{stats:?}");
    assert_eq!(pg.scalar("SELECT count(*) FROM deposits"), Some(9));
    assert_eq!(
        pg.scalar("SELECT count(*) FROM deposits WHERE key = 'r4'"),
        Some(0)
    );
    let pid = PartitionId::new(&group, &topic, 0);
    let letters = pg.dead_letters(&pid);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].record.offset(), 4);
    assert!(
        letters[0].message.contains("deferred") && letters[0].message.contains("check"),
        "{}",
        letters[0].message
    );
    assert_eq!(pg.next_offset(&pid), Some(10));
}

/// A batch statement that cannot run (its table does not exist) stops the runtime before the
/// first record that deferred a row: nothing is committed past it.
#[test]
fn a_broken_batch_statement_stops_before_the_first_record() {
    let pg = Postgres::new();
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    for i in 0..3 {
        cluster.send_movement(&topic, 0, &format!("b{i}"), "cy", 1);
    }
    let mut running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(Deposits::new(
                "INSERT INTO no_such_table SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])",
            ))
            .unwrap()
    });
    let err = running.join().unwrap_err();
    assert!(matches!(err, Error::HandlerFatal { .. }), "{err}");
    assert_eq!(err.record_position().unwrap().offset, 0);
    assert!(err.to_string().contains("no_such_table"), "{err}");
    let position = pg.position(&PartitionId::new(&group, &topic, 0));
    assert_eq!(
        position.and_then(|p| p.next_offset),
        None,
        "nothing committed"
    );
}

/// Driven step by step: rows deferred after a savepoint go with a rollback to it, rows written
/// early stay written, the commit writes what is still deferred, and a rejected row is the
/// caller's error (permanent), not the store's.
#[test]
fn deferred_rows_follow_savepoints_and_fail_as_the_record() {
    let pg = Postgres::new();
    pg.execute(DEPOSITS);
    block_on(async {
        let store = pg.connect().await;
        let pid = PartitionId::new("g", "t", 0);
        let epoch = store.acquire(&pid).await.unwrap().epoch;
        let insert = BatchStatement::<(String, String, i64)>::new(INSERT_DEPOSITS);
        let row = |key: &str, amount| (key.to_owned(), "dee".to_owned(), amount);

        let mut tx = store.begin(&pid, epoch).await.unwrap();
        tx.defer(&insert, row("kept", 1));
        tx.savepoint().await.unwrap();
        tx.defer(&insert, row("undone", 2));
        tx.rollback_to_savepoint().await.unwrap();
        tx.savepoint().await.unwrap();
        tx.defer(&insert, row("early", 4));
        assert!(matches!(
            tx.write_deferred().await.unwrap(),
            DeferredWrites::Written
        ));
        tx.savepoint().await.unwrap();
        tx.defer(&insert, row("late", 8));
        tx.commit(1).await.unwrap();

        let mut tx = store.begin(&pid, epoch).await.unwrap();
        tx.savepoint().await.unwrap();
        tx.defer(&insert, row("negative", -1));
        let DeferredWrites::Rejected(failure) = tx.write_deferred().await.unwrap() else {
            panic!("a negative amount is refused by the table's check");
        };
        assert_eq!(failure.class(), ErrorClass::Permanent, "{failure}");
        tx.rollback_to_savepoint().await.unwrap();
        tx.defer(&insert, row("after", 16));
        assert!(matches!(
            tx.write_deferred().await.unwrap(),
            DeferredWrites::Written
        ));
        tx.commit(2).await.unwrap();
    });
    assert_eq!(
        pg.scalar("SELECT sum(amount)::bigint FROM deposits"),
        Some(1 + 4 + 8 + 16),
        "every row but the undone one (the commit writes what is still deferred)"
    );
}

/// Raises a PostgreSQL error with `code` on the transaction's own connection, for the first
/// `times` calls at offset `at`, then adds the movement to the ledger.
struct RaisesAt {
    at: i64,
    code: &'static str,
    times: std::sync::atomic::AtomicU32,
}

impl Handler<PgTx> for RaisesAt {
    async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
        use std::sync::atomic::Ordering;
        let m: Movement = record.json()?;
        if record.offset() == self.at
            && self
                .times
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            let raise = match self.code {
                "40P01" => {
                    "DO $$ BEGIN RAISE EXCEPTION 'raised by the test' USING ERRCODE = '40P01'; END $$"
                }
                _ => {
                    "DO $$ BEGIN RAISE EXCEPTION 'raised by the test' USING ERRCODE = '40001'; END $$"
                }
            };
            sqlx::query(raise)
                .execute(tx.conn())
                .await
                // Classified as the README's pattern does: retryable.
                .map_err(HandlerError::retryable)?;
        }
        tx.add(&m.account, m.amount).await?;
        Ok(Outcome::none())
    }
}

/// A deadlock or serialization failure raised by the handler's own SQL is the store's failure
/// of the batch: rolled back and tried again, never spent from the record's retry attempts
/// (here a single attempt: one counted failure would dead-letter it).
#[test]
fn deadlocks_in_the_handlers_sql_retry_the_batch_not_the_record() {
    let pg = Postgres::new();
    let (cluster, topic, group) = setup(1);
    for i in 0..6 {
        cluster.send_movement(&topic, 0, &format!("d{i}"), "max", 1);
    }
    for code in ["40P01", "40001"] {
        let group = format!("{group}-{code}");
        let running = Incarnation::launch(&pg, |store| {
            builder(&cluster, &group, &topic)
                .retry(idempotent_consumer::RetryPolicy {
                    max_attempts: 1,
                    ..Default::default()
                })
                .store(store)
                .build(RaisesAt {
                    at: 3,
                    code,
                    times: 3.into(),
                })
                .unwrap()
        });
        running.wait_for("every record", |s| s.applied == 6);
        let stats = running.stats();
        running.stop().unwrap();
        assert_eq!(
            (stats.dead_lettered, stats.retries),
            (0, 0),
            "{code}: {stats:?}"
        );
        assert!(stats.store_retries >= 3, "{code}: {stats:?}");
        let pid = PartitionId::new(&group, &topic, 0);
        assert!(pg.dead_letters(&pid).is_empty(), "{code}");
        assert_eq!(pg.next_offset(&pid), Some(6), "{code}");
    }
    assert_eq!(pg.balances()["max"], 12, "each record once per group");
}

/// Transient store failures that never end stop the runtime after `store_retry_timeout`, with
/// the last failure, and nothing of the failing batch is committed.
#[test]
fn transient_store_failures_that_never_end_stop_the_runtime() {
    let pg = Postgres::new();
    let (cluster, topic, group) = setup(1);
    for i in 0..3 {
        cluster.send_movement(&topic, 0, &format!("n{i}"), "ned", 1);
    }
    let mut running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .store_retry_timeout(Duration::from_secs(2))
            .store(store)
            .build(RaisesAt {
                at: 1,
                code: "40P01",
                times: u32::MAX.into(),
            })
            .unwrap()
    });
    let err = running.join().unwrap_err();
    let shown = format!("{err} {:?}", std::error::Error::source(&err));
    assert!(shown.contains("store_retry_timeout"), "{shown}");
    assert!(shown.contains("raised by the test"), "{shown}");
    assert!(!err.is_transient(), "{err}");
    drop(running);
    assert!(pg.balances().get("ned").is_none_or(|b| *b == 0));
    assert_eq!(pg.next_offset(&PartitionId::new(&group, &topic, 0)), None);
}

/// The README's pattern under real deadlocks: four partitions of transfers between four shared
/// accounts, each transfer two upserts on `tx.conn()` in the record's order (so concurrent
/// batches lock rows in opposite orders and PostgreSQL kills one of them), one retry attempt
/// per record. Every transfer is applied once, none is dead-lettered, and the throughput and
/// the deadlocks survived are printed.
#[test]
fn real_deadlocks_between_partitions_dead_letter_nothing() {
    struct Transfers;
    impl Handler<PgTx> for Transfers {
        async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
            let t: serde_json::Value = record.json()?;
            let (from, to) = (t["from"].as_str().unwrap(), t["to"].as_str().unwrap());
            tx.add(from, -1).await?;
            // Widens the window in which another batch takes the other row first.
            tokio::time::sleep(Duration::from_micros(200)).await;
            tx.add(to, 1).await?;
            Ok(Outcome::none())
        }
    }
    let pg = Postgres::new();
    // Deadlocks found in 20 ms rather than PostgreSQL's default second.
    pg.execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET deadlock_timeout = %L', \
         current_database(), '20ms'); END $$",
    );
    let accounts = ["acc-a", "acc-b", "acc-c", "acc-d"];
    let (cluster, topic, group) = setup(4);
    let per_partition = 250;
    let mut expected = std::collections::HashMap::<&str, i64>::new();
    for p in 0..4 {
        let mut records = Vec::new();
        for i in 0..per_partition {
            let (from, to) = (accounts[(i + p) % 4], accounts[(i * 3 + p + 1) % 4]);
            let (from, to) = if from == to {
                (from, accounts[(i + p + 2) % 4])
            } else {
                (from, to)
            };
            *expected.entry(from).or_default() -= 1;
            *expected.entry(to).or_default() += 1;
            let payload = serde_json::json!({ "from": from, "to": to }).to_string();
            records.push((format!("t{p}-{i}"), payload.into_bytes()));
        }
        cluster.send_keyed(&topic, p as i32, records);
    }
    let total = 4 * per_partition as u64;
    let started = std::time::Instant::now();
    let running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .batch(50, Duration::from_millis(20))
            .retry(idempotent_consumer::RetryPolicy {
                max_attempts: 1,
                ..Default::default()
            })
            .store(store)
            .build(Transfers)
            .unwrap()
    });
    running.wait_for("every transfer", |s| s.applied + s.dead_lettered == total);
    let elapsed = started.elapsed();
    let stats = running.stats();
    running.stop().unwrap();
    println!(
        "DEADLOCKS transfers={total} store_retries={} seconds={:.1} records_per_s={:.0}",
        stats.store_retries,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(
        (stats.applied, stats.dead_lettered),
        (total, 0),
        "{stats:?}"
    );
    let balances = pg.balances();
    for account in accounts {
        assert_eq!(
            balances.get(account).copied().unwrap_or(0),
            expected[account],
            "{account}"
        );
    }
}

/// A batch that would outlive `idle_in_transaction_session_timeout` (deferred rows send nothing
/// between records, and each record takes 100 ms) is committed in parts before the server would
/// end it: every record lands once, nothing is tried again. Before, the server killed the
/// session, the batch was retried from its start, and it never committed.
#[test]
fn a_batch_is_committed_before_the_idle_in_transaction_timeout_ends_it() {
    struct Slow(Deposits);
    impl Handler<PgTx> for Slow {
        async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.0.handle(record, tx).await
        }
    }
    let mut pg = Postgres::new();
    pg.options.idle_in_transaction_timeout = Some(Duration::from_secs(1));
    pg.execute(DEPOSITS);
    let (cluster, topic, group) = setup(1);
    let movements = (0..30).map(|i| (format!("s{i}"), "sue".to_owned(), 1));
    cluster.send_movements(&topic, 0, movements);
    let running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .batch(500, Duration::from_secs(2))
            .store(store)
            .build(Slow(Deposits::new(INSERT_DEPOSITS)))
            .unwrap()
    });
    running.wait_for("every record", |s| s.applied == 30);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(stats.store_retries, 0, "{stats:?}");
    assert!(stats.batches_committed >= 6, "{stats:?}");
    assert_eq!(pg.scalar("SELECT count(*) FROM deposits"), Some(30));
    assert_eq!(
        pg.next_offset(&PartitionId::new(&group, &topic, 0)),
        Some(30)
    );
}

/// A transient store failure while a partition is acquired (a database failing over during a
/// rebalance) is tried again with backoff instead of ending the run: acquiring fails with a
/// serialization failure (raised by a trigger on the positions table) for two seconds, then
/// the partition is taken and every record applied once. When it never ends, the run ends
/// with the last failure once the assignment's budget (`store_retry_timeout`) is spent.
#[test]
fn transient_failures_while_acquiring_a_partition_are_tried_again() {
    let pg = Postgres::new();
    // The store's tables, then a trigger that fails every write of a position while the
    // flag table has a row.
    drop(block_on(pg.connect()));
    pg.execute(
        "CREATE TABLE fail_acquire (on_ boolean);
         CREATE FUNCTION fail_acquire() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM fail_acquire) THEN
                 RAISE EXCEPTION 'acquire refused by the test' USING ERRCODE = '40001';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER fail_acquire BEFORE INSERT OR UPDATE ON idc_positions
             FOR EACH ROW EXECUTE FUNCTION fail_acquire();
         INSERT INTO fail_acquire VALUES (true);",
    );
    let (cluster, topic, group) = setup(1);
    for i in 0..3 {
        cluster.send_movement(&topic, 0, &format!("q{i}"), "quy", 1);
    }
    let running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    let start = std::time::Instant::now();
    while running.stats().store_retries < 2 {
        assert!(start.elapsed() < common::WAIT, "{:?}", running.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    pg.execute("DELETE FROM fail_acquire");
    running.wait_for("the three records", |s| s.applied == 3);
    let stats = running.stats();
    running.stop().unwrap();
    assert!(stats.store_retries >= 2, "{stats:?}");
    assert_eq!(pg.balances()["quy"], 3);

    // Failures that never end: the run ends with the last one, naming the budget.
    pg.execute("INSERT INTO fail_acquire VALUES (true)");
    let (cluster, topic, group) = setup(1);
    cluster.send_movement(&topic, 0, "r0", "rex", 1);
    let mut running = Incarnation::launch(&pg, |store| {
        builder(&cluster, &group, &topic)
            .store_retry_timeout(Duration::from_secs(2))
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    let err = running.join().unwrap_err();
    drop(running);
    let shown = format!("{err} {:?}", std::error::Error::source(&err));
    assert!(shown.contains("acquiring the partition failed"), "{shown}");
    assert!(shown.contains("acquire refused by the test"), "{shown}");
    assert!(!pg.balances().contains_key("rex"));
}

/// An instance whose clock runs two days fast cannot expire what the database's clock says is
/// live: neither its purge deletes the entry nor its claim takes the key over (which would
/// apply the record again). Once the entry has expired by the database's clock, both do.
#[test]
fn a_fast_clock_neither_purges_nor_takes_over_live_entries() {
    let pg = Postgres::new();
    block_on(async {
        let store = pg.connect().await;
        let pid = PartitionId::new("g", "t", 0);
        let epoch = store.acquire(&pid).await.unwrap().epoch;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let live = DedupEntry {
            created_at_ms: now,
            expires_at_ms: now + 3_600_000,
            ..entry(0, b"p")
        };
        let gone = DedupEntry {
            created_at_ms: now - 7_200_000,
            expires_at_ms: now - 3_600_000,
            ..entry(1, b"q")
        };
        let (live_key, gone_key) = (store_key("g", "live"), store_key("g", "gone"));
        let mut tx = store.begin(&pid, epoch).await.unwrap();
        for key in [&live_key, &gone_key] {
            assert_eq!(tx.claim(key, now).await.unwrap(), Claim::Claimed);
        }
        tx.put_entry(&live_key, &live).await.unwrap();
        tx.put_entry(&gone_key, &gone).await.unwrap();
        tx.commit(2).await.unwrap();

        let fast = now + 2 * 86_400_000;
        let mut tx = store.begin(&pid, epoch).await.unwrap();
        assert_eq!(
            tx.claim(&live_key, fast).await.unwrap(),
            Claim::Existing(live.clone()),
            "a fast clock took a live key over"
        );
        assert_eq!(tx.claim(&gone_key, fast).await.unwrap(), Claim::Claimed);
        // Dropped: its rollback releases the takeover on the pooled connection, soon.
        drop(tx);
        let started = std::time::Instant::now();
        let mut purged = 0;
        while purged == 0 && started.elapsed() < Duration::from_secs(10) {
            purged += store.purge_expired("g", fast, 100).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        purged += store.purge_expired("g", fast, 100).await.unwrap();
        assert_eq!(purged, 1, "only the entry expired by the database's clock");
    });
    assert_eq!(
        pg.scalar("SELECT count(*) FROM idc_dedup WHERE idempotency_key = 'live'::bytea"),
        Some(1)
    );
}
