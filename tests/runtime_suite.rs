//! The runtime's guarantees, on every store: the embedded RocksDB store and PostgreSQL (feature
//! `postgres`, a database per test on the server named by `DATABASE_URL`), against a real Kafka
//! wire protocol (librdkafka's mock cluster, or `KAFKA_BOOTSTRAP_SERVERS`). Each test is written
//! once, generic over the store, and instantiated per store at the bottom of the file. Each
//! fails if the guarantee it names breaks.

mod common;

use std::time::{Duration, SystemTime};

use common::backend::{Backend, Rocks, block_on};
use common::{Cluster, Incarnation, Ledger, builder, setup, unique};
use idempotent_consumer::{ConflictPolicy, DeadLetterReason, DuplicateCause, Error, PartitionId};
use idempotent_consumer::{ErrorClass, Identity, OversizeKey, RetryPolicy, Store, Transaction};
use idempotent_consumer::{StalePartitionPolicy, StartPosition};

/// Starts a consumer with the test defaults on a store of `b`.
fn start<B: Backend>(
    cluster: &Cluster,
    group: &str,
    topic: &str,
    b: &B,
    handler: Ledger,
) -> Incarnation {
    Incarnation::launch(b, |store| {
        builder(cluster, group, topic)
            .store(store)
            .build(handler)
            .unwrap()
    })
}

/// The handler writes its effects for a record and the process dies before the batch commits.
/// After a restart the record is handled again, and its effects count exactly once.
fn crash_between_handler_and_commit_then_redelivery_is_a_noop<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    for i in 0..10 {
        cluster.send_movement(&topic, 0, &format!("k{i}"), "alice", 1 << i);
    }

    let mut crashing = Ledger::new();
    crashing.hang_at = Some(6);
    let observed = crashing.observed.clone();
    let first = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .batch(100, Duration::from_secs(2))
            .store(store)
            .build(crashing)
            .unwrap()
    });
    first.wait_notified(&observed);
    first.crash();
    let handled_before_crash = observed.calls();
    assert!(
        handled_before_crash.contains(&(0, 6)),
        "{handled_before_crash:?}"
    );

    let committed = b
        .next_offset(&PartitionId::new(&group, &topic, 0))
        .unwrap_or(0);
    assert!(
        committed <= 6,
        "offset 6 never finished, yet position is {committed}"
    );

    let ledger = Ledger::new();
    let second_calls = ledger.observed.clone();
    let second = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(ledger)
            .unwrap()
    });
    second.wait_for("all records", |s| {
        s.applied + s.duplicates() >= 10 - committed as u64
    });
    second.stop().unwrap();

    // The crashed batch's records were handled again (their first effects never committed) ...
    assert!(second_calls.calls().contains(&(0, 6)));
    // ... and every movement counts exactly once: 1 + 2 + ... + 512.
    assert_eq!(b.balances()["alice"], 1023);
    assert_eq!(
        b.next_offset(&PartitionId::new(&group, &topic, 0)),
        Some(10)
    );
}

/// A producer retry writes the same event at a new offset: skipped, and `on_duplicate` gets the
/// original outcome.
fn repeated_key_at_new_offset_is_a_noop_with_stored_outcome<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send_movement(&topic, 0, "pay-1", "bob", 5);
    cluster.send_movement(&topic, 0, "pay-2", "bob", 7);
    cluster.send_movement(&topic, 0, "pay-1", "bob", 5);

    let ledger = Ledger::new();
    let observed = ledger.observed.clone();
    let running = start(&cluster, &group, &topic, b, ledger);
    running.wait_for("three records", |s| s.applied + s.duplicates() == 3);
    let stats = running.stats();
    running.stop().unwrap();

    assert_eq!(
        (stats.applied, stats.duplicates_repeated_key),
        (2, 1),
        "{stats:?}"
    );
    assert_eq!(
        observed.calls(),
        vec![(0, 0), (0, 1)],
        "the handler never saw offset 2"
    );
    assert_eq!(
        *observed.duplicates.lock().unwrap(),
        vec![(2, DuplicateCause::RepeatedKey, Some(b"5".to_vec()))]
    );
    assert_eq!(b.balances()["bob"], 12);
}

/// Same key, different payload: never a silent duplicate. Reported to `on_conflict`, kept as a
/// dead letter with its original bytes; with the `Stop` policy, the runtime stops before it.
fn conflict_is_detected_reported_and_dead_lettered<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send_movement(&topic, 0, "pay-1", "carol", 5);
    cluster.send_movement(&topic, 0, "pay-1", "carol", 500);
    cluster.send_movement(&topic, 0, "pay-2", "carol", 1);

    let ledger = Ledger::new();
    let observed = ledger.observed.clone();
    let running = start(&cluster, &group, &topic, b, ledger);
    running.wait_for("three records", |s| s.applied + s.conflicts == 3);
    let stats = running.stats();
    running.stop().unwrap();

    assert_eq!(
        (stats.applied, stats.conflicts, stats.duplicates()),
        (2, 1, 0),
        "{stats:?}"
    );
    assert_eq!(*observed.conflicts.lock().unwrap(), vec![(1, 0)]);
    assert_eq!(b.balances()["carol"], 6);
    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::Conflict);
    assert_eq!(dead[0].record.offset(), 1);
    assert_eq!(
        dead[0].record.payload(),
        Some(&common::movement("carol", 500)[..])
    );
    assert!(
        dead[0].message.contains("different payload"),
        "{}",
        dead[0].message
    );

    // The dead-letter topic has the original bytes and says what happened.
    let dlq = cluster.read_all(&format!("{topic}.dlq"), 1);
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        dlq[0].payload.as_deref(),
        Some(&common::movement("carol", 500)[..])
    );
    assert_eq!(
        dlq[0].header("idempotency-key"),
        Some("pay-1"),
        "original headers kept"
    );
    assert_eq!(dlq[0].header("dlq.original.topic"), Some(topic.as_str()));
    assert_eq!(dlq[0].header("dlq.original.partition"), Some("0"));
    assert_eq!(dlq[0].header("dlq.original.offset"), Some("1"));
    assert_eq!(dlq[0].header("dlq.idempotency.key"), Some("pay-1"));
    assert_eq!(dlq[0].header("dlq.error.class"), Some("conflict"));
    assert!(
        dlq[0]
            .header("dlq.error.message")
            .unwrap()
            .contains("different payload")
    );
    assert_eq!(dlq[0].header("dlq.attempts"), Some("0"));
    assert!(dlq[0].header("dlq.first.failure.ms").is_some());
    assert!(dlq[0].header("dlq.last.failure.ms").is_some());

    // A replay from the start, plus the conflicting record re-sent at a new offset (a producer
    // retry): all duplicates, no second conflict or dead letter.
    cluster.send_movement(&topic, 0, "pay-1", "carol", 500);
    b.set_position(&PartitionId::new(&group, &topic, 0), 0);
    let ledger = Ledger::new();
    let observed = ledger.observed.clone();
    let running = start(&cluster, &group, &topic, b, ledger);
    running.wait_for("the replay", |s| s.duplicates() == 4);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(
        (stats.applied, stats.conflicts, stats.dead_lettered),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        stats.duplicates_repeated_key, 1,
        "the re-sent conflict: {stats:?}"
    );
    assert!(observed.conflicts.lock().unwrap().is_empty());
    assert_eq!(
        b.dead_letters(&PartitionId::new(&group, &topic, 0)).len(),
        1
    );
    assert_eq!(cluster.read_all(&format!("{topic}.dlq"), 1).len(), 1);
    assert_eq!(b.balances()["carol"], 6);
}

/// Under the skip-and-record policy a conflicting record is skipped, recorded in the store's
/// dead-letter log with the reason, not produced to the dead-letter topic, and counted; a
/// replay does not record it twice.
fn conflict_with_skip_and_record_policy_is_recorded_in_the_store_only<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send_movement(&topic, 0, "pay-1", "eve", 5);
    cluster.send_movement(&topic, 0, "pay-1", "eve", 500);
    cluster.send_movement(&topic, 0, "pay-2", "eve", 1);
    let launch = |ledger: Ledger| {
        Incarnation::launch(b, |store| {
            builder(&cluster, &group, &topic)
                .conflict_policy(ConflictPolicy::SkipAndRecord)
                .store(store)
                .build(ledger)
                .unwrap()
        })
    };
    let ledger = Ledger::new();
    let observed = ledger.observed.clone();
    let running = launch(ledger);
    running.wait_for("three records", |s| s.applied + s.conflicts == 3);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(
        (
            stats.applied,
            stats.conflicts,
            stats.conflicts_skipped,
            stats.dead_lettered
        ),
        (2, 1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(*observed.conflicts.lock().unwrap(), vec![(1, 0)]);
    let pid = PartitionId::new(&group, &topic, 0);
    assert_eq!(b.next_offset(&pid), Some(3), "the position moved past it");
    let recorded = b.dead_letters(&pid);
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].reason, DeadLetterReason::Conflict);
    assert_eq!(recorded[0].record.offset(), 1);
    assert!(
        recorded[0]
            .message
            .contains("idempotency key pay-1 was first used at"),
        "{}",
        recorded[0].message
    );
    assert!(
        cluster.read_all(&format!("{topic}.dlq"), 0).is_empty(),
        "nothing produced to the dead-letter topic"
    );
    assert_eq!(b.balances()["eve"], 6);

    b.set_position(&pid, 0);
    let running = launch(Ledger::new());
    running.wait_for("the replay", |s| s.duplicates() == 3);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!((stats.conflicts, stats.applied), (0, 0), "{stats:?}");
    assert_eq!(b.dead_letters(&pid).len(), 1);
}

fn conflict_with_stop_policy_stops_before_the_record<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send_movement(&topic, 0, "pay-1", "dan", 5);
    cluster.send_movement(&topic, 0, "pay-1", "dan", 6);
    cluster.send_movement(&topic, 0, "pay-2", "dan", 1);

    let mut running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .conflict_policy(ConflictPolicy::Stop)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    let err = running.join().unwrap_err();
    assert!(matches!(err, Error::Stopped { .. }), "{err}");
    assert_eq!(err.record_position().unwrap().offset, 1);
    assert!(err.to_string().contains("different payload"), "{err}");
    drop(running);
    assert_eq!(
        b.next_offset(&PartitionId::new(&group, &topic, 0)),
        Some(1),
        "nothing committed past the conflicting record"
    );
    assert_eq!(b.balances()["dan"], 5);
}

/// The store's position wins over Kafka's committed offset, whether Kafka is behind (no replay)
/// or ahead (no loss).
fn resumes_from_stored_position_when_kafka_is_behind_or_ahead<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let pid = PartitionId::new(&group, &topic, 0);
    for i in 0..5 {
        cluster.send_movement(&topic, 0, &format!("a{i}"), "erin", 1);
    }
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("five records", |s| s.applied == 5);
    running.stop().unwrap();
    assert_eq!(
        cluster.kafka_offset(&group, &topic, 0),
        Some(5),
        "Kafka's offset follows the store"
    );

    // Kafka behind: it would replay 0..5 through the handler.
    cluster.commit_kafka_offset(&group, &topic, 0, 0);
    for i in 5..8 {
        cluster.send_movement(&topic, 0, &format!("a{i}"), "erin", 1);
    }
    let ledger = Ledger::new();
    let observed = ledger.observed.clone();
    let running = start(&cluster, &group, &topic, b, ledger);
    running.wait_for("three new records", |s| s.applied == 3);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(observed.calls(), vec![(0, 5), (0, 6), (0, 7)]);
    assert_eq!(
        stats.duplicates(),
        0,
        "the seek skipped 0..5, not the dedup entries: {stats:?}"
    );

    // Kafka ahead: it would skip 8..10, which were never applied.
    for i in 8..10 {
        cluster.send_movement(&topic, 0, &format!("a{i}"), "erin", 1);
    }
    cluster.commit_kafka_offset(&group, &topic, 0, 10);
    let ledger = Ledger::new();
    let observed = ledger.observed.clone();
    let running = start(&cluster, &group, &topic, b, ledger);
    running.wait_for("two new records", |s| s.applied == 2);
    running.stop().unwrap();
    assert_eq!(observed.calls(), vec![(0, 8), (0, 9)]);

    assert_eq!(b.balances()["erin"], 10);
    assert_eq!(b.position(&pid).unwrap().next_offset, Some(10));
}

/// A store without a position starts where `start_without_position` says, whatever the group
/// committed: by default at the beginning (the store applied nothing, so it applies everything),
/// at the group's committed offset only when asked, at the end, or at a timestamp. Each case is
/// a new group on the same store with a Kafka offset committed at 3 by another consumer.
fn a_store_without_a_position_starts_where_start_without_position_says<B: Backend>(b: &B) {
    let (cluster, topic, _) = setup(1);
    for i in 0..10 {
        cluster.send_movement(&topic, 0, &format!("s{i}"), "gus", 1);
    }
    let later = SystemTime::now() + Duration::from_secs(3600);
    // (start, Kafka's committed offset, the first offset handled).
    let cases = [
        (None, Some(3), Some(0)),
        (Some(StartPosition::Beginning), Some(3), Some(0)),
        (Some(StartPosition::Committed), Some(3), Some(3)),
        (Some(StartPosition::Committed), None, Some(0)),
        // No record at or after the timestamp: the end.
        (Some(StartPosition::Timestamp(later)), Some(3), None),
        (Some(StartPosition::End), Some(3), None),
    ];
    for (case, (start, committed, first)) in cases.into_iter().enumerate() {
        let group = unique("group");
        if let Some(offset) = committed {
            cluster.commit_kafka_offset(&group, &topic, 0, offset);
        }
        let ledger = Ledger::new();
        let observed = ledger.observed.clone();
        let running = Incarnation::launch(b, |store| {
            let mut builder = builder(&cluster, &group, &topic).store(store);
            if let Some(start) = start {
                builder = builder.start_without_position(start);
            }
            builder.build(ledger).unwrap()
        });
        running.caught_up();
        let handled: Vec<i64> = observed.calls().iter().map(|(_, o)| *o).collect();
        let expected: Vec<i64> = first.map_or(vec![], |f| (f..10).collect());
        assert_eq!(
            handled, expected,
            "case {case}: {start:?}, committed {committed:?}"
        );
        if first.is_none() {
            // At the end: only what is produced from now on.
            let sent = 10 + case as i64 - 4;
            cluster.send_movement(&topic, 0, &format!("s{sent}"), "gus", 1);
            running.wait_for("the new record", |s| s.applied == 1);
            assert_eq!(observed.calls(), vec![(0, sent)], "case {case}");
        }
        running.stop().unwrap();
    }
}

/// `Progress` reports each assigned partition's committed position, watermarks and lag, and
/// `caught_up` resolves only once everything in the log at the call is committed.
fn progress_reports_the_lag_and_caught_up_waits_for_the_commits<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(2);
    for i in 0..12 {
        cluster.send_movement(&topic, i % 2, &format!("p{i}"), "hal", 1);
    }
    let launch = |ledger: Ledger| {
        Incarnation::launch(b, |store| {
            builder(&cluster, &group, &topic)
                .store(store)
                .build(ledger)
                .unwrap()
        })
    };

    // A handler stuck at offset 4: nothing from there on commits.
    let mut stuck = Ledger::new();
    stuck.hang_at = Some(4);
    let observed = stuck.observed.clone();
    let running = launch(stuck);
    running.wait_notified(&observed);
    let parts = block_on(running.progress.partitions()).unwrap();
    assert_eq!(parts.len(), 2, "{parts:?}");
    for (p, part) in parts.iter().enumerate() {
        assert_eq!(
            (part.topic.as_str(), part.partition),
            (topic.as_str(), p as i32)
        );
        assert_eq!(
            (part.low_watermark, part.high_watermark),
            (0, 6),
            "{part:?}"
        );
        assert!(part.position.unwrap_or(0) <= 4, "{part:?}");
        assert_eq!(part.lag, 6 - part.position.unwrap_or(0), "{part:?}");
        assert!(!part.caught_up());
    }
    let progress = running.progress.clone();
    let waited = block_on(async {
        tokio::time::timeout(Duration::from_secs(1), progress.caught_up()).await
    });
    assert!(
        waited.is_err(),
        "caught_up resolved with records uncommitted"
    );
    // A waiter when the process dies: an error, not a hang, and not "caught up".
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = progress.clone();
    std::thread::spawn(move || tx.send(block_on(waiter.caught_up())));
    std::thread::sleep(Duration::from_millis(200));
    // What the stuck instance committed before its handler stuck (a fetch may split a batch).
    let committed_before = running.stats().applied;
    running.crash();
    let after_crash = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("caught_up still waits after the crash");
    assert!(after_crash.is_err(), "crashed: never caught up");

    let running = launch(Ledger::new());
    // The crashed member holds its partitions until its session expires: wait for both.
    running.wait_assigned(2);
    running.caught_up();
    assert_eq!(
        committed_before + running.stats().applied,
        12,
        "every record committed when caught up"
    );
    for part in block_on(running.progress.partitions()).unwrap() {
        assert_eq!(
            (part.position, part.high_watermark, part.lag),
            (Some(6), 6, 0)
        );
    }
    for i in 12..16 {
        cluster.send_movement(&topic, i % 2, &format!("p{i}"), "hal", 1);
    }
    running.caught_up();
    assert_eq!(committed_before + running.stats().applied, 16);
    let progress = running.progress.clone();
    running.stop().unwrap();
    assert!(
        block_on(progress.caught_up()).is_err(),
        "stopped: never caught up"
    );
    assert!(block_on(progress.partitions()).unwrap().is_empty());
}

/// An operator rewinds the position (a replay): every record is a counted redelivery no-op and
/// `on_duplicate` still gets the stored outcome.
fn replay_after_rewind_is_a_counted_noop<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    for i in 0..4 {
        cluster.send_movement(&topic, 0, &format!("r{i}"), "fay", 10);
    }
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("four records", |s| s.applied == 4);
    running.stop().unwrap();

    b.set_position(&PartitionId::new(&group, &topic, 0), 0);
    let ledger = Ledger::new();
    let observed = ledger.observed.clone();
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(ledger)
            .unwrap()
    });
    running.wait_for("four replayed records", |s| s.duplicates_redelivery == 4);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(stats.applied, 0, "{stats:?}");
    assert!(observed.calls().is_empty());
    let dups = observed.duplicates.lock().unwrap().clone();
    assert_eq!(
        dups[3],
        (3, DuplicateCause::Redelivery, Some(b"40".to_vec()))
    );
    assert_eq!(b.balances()["fay"], 40);
}

/// An entry older than the retention no longer holds its key; a young one does. The purge is
/// off here, so this is the expiry check itself, not the purge.
fn ttl_expiry_readmits_old_key_and_keeps_young_one<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let retention = Duration::from_millis(2_500);
    cluster.send_movement(&topic, 0, "old", "gus", 1);

    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .retention(retention)
            .purge(Duration::from_secs(3600), 10)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    running.wait_for("the old key", |s| s.applied == 1);
    std::thread::sleep(retention + Duration::from_millis(200));
    cluster.send_movement(&topic, 0, "young", "gus", 10);
    cluster.send_movement(&topic, 0, "old", "gus", 1);
    cluster.send_movement(&topic, 0, "young", "gus", 10);
    running.wait_for("three more records", |s| s.applied + s.duplicates() == 4);
    let stats = running.stats();
    running.stop().unwrap();

    assert_eq!(
        (stats.applied, stats.duplicates_repeated_key),
        (3, 1),
        "{stats:?}"
    );
    assert_eq!(stats.expired_purged, 0);
    assert_eq!(b.balances()["gus"], 12);
}

/// The background purge deletes expired entries and keeps the ones inside the window.
fn background_purge_removes_expired_entries_only<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let retention = Duration::from_millis(2_000);
    cluster.send_movement(&topic, 0, "old", "lea", 1);
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .retention(retention)
            .purge(Duration::from_millis(200), 10)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    running.wait_for("the old key", |s| s.applied == 1);
    std::thread::sleep(retention);
    running.wait_for("the old entry purged", |s| s.expired_purged == 1);
    cluster.send_movement(&topic, 0, "young", "lea", 1);
    running.wait_for("the young key", |s| s.applied == 2);
    std::thread::sleep(Duration::from_millis(600));
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(stats.expired_purged, 1, "{stats:?}");

    assert!(b.entry(&group, "old").is_none(), "expired: purged");
    assert!(
        b.entry(&group, "young").is_some(),
        "inside the window: kept"
    );
}

/// The background purge deletes dead letters older than the dead-letter retention from the
/// store, and counts them; the records' entries (dead-lettered keys) stay for their own
/// retention.
fn background_purge_removes_old_dead_letters<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let pid = PartitionId::new(&group, &topic, 0);
    cluster.send(&topic, 0, Some("bad-1"), Some(b"not json"));
    cluster.send_movement(&topic, 0, "ok-1", "lou", 1);
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .dead_letter_retention(Some(Duration::from_millis(1_500)))
            .purge(Duration::from_millis(200), 10)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    // (Young letters are kept: the store contract tests it.)
    running.wait_for("the old letter purged", |s| s.dead_letters_purged == 1);
    running.stop().unwrap();
    assert!(b.dead_letters(&pid).is_empty());
    assert!(
        b.entry(&group, "bad-1").is_some(),
        "the key stays dead-lettered"
    );
}

/// A graceful shutdown in the middle of a batch commits everything the handler did; Kafka's
/// offset matches the store's position.
fn shutdown_drains_and_commits_in_flight_work<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    for i in 0..20 {
        cluster.send_movement(&topic, 0, &format!("s{i}"), "hal", 1);
    }
    let mut ledger = Ledger::new();
    ledger.notify_at = Some(3);
    ledger.delay = Duration::from_millis(20);
    let observed = ledger.observed.clone();
    // One batch of all twenty records (a linger of a second gathers them), stopped while its
    // handlers run: without a drain, nothing of the batch would commit.
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .batch(1_000, Duration::from_secs(1))
            .store(store)
            .build(ledger)
            .unwrap()
    });
    running.wait_notified(&observed);
    assert_eq!(running.stats().batches_committed, 0);
    running.stop().unwrap();

    let handled = observed.calls().len() as i64;
    assert!(handled >= 4, "{handled}");
    let position = b.next_offset(&PartitionId::new(&group, &topic, 0));
    assert_eq!(
        position,
        Some(handled),
        "everything handled was committed, nothing more"
    );
    assert_eq!(b.balances()["hal"], handled);
    assert_eq!(cluster.kafka_offset(&group, &topic, 0), Some(handled));
}

/// An undecodable payload is kept as a dead letter with serde's message, the records after it
/// are applied, and a redelivery does not dead-letter it twice.
fn undecodable_payload_is_dead_lettered_not_lost<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send(
        &topic,
        0,
        Some("bad-1"),
        Some(b"{\"account\": \"ivy\", \"amount\": \"ten\"}"),
    );
    cluster.send_movement(&topic, 0, "good-1", "ivy", 3);

    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    running.stop().unwrap();

    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::Permanent);
    assert_eq!(dead[0].key.as_deref(), Some(&b"bad-1"[..]));
    assert!(
        dead[0]
            .message
            .contains("invalid type: string \"ten\", expected i64"),
        "serde's message reaches the user: {}",
        dead[0].message
    );
    assert_eq!(b.balances()["ivy"], 3);

    // Replay from the start: the dead-lettered record is a duplicate now, not a second letter.
    b.set_position(&PartitionId::new(&group, &topic, 0), 0);
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    running.wait_for("the replay", |s| s.duplicates() == 2);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(
        b.dead_letters(&PartitionId::new(&group, &topic, 0)).len(),
        1
    );
    assert_eq!(
        cluster.read_all(&format!("{topic}.dlq"), 1).len(),
        1,
        "the replay produced no second dead letter"
    );
}

/// A record without an idempotency key under the default policy is dead-lettered with a clear
/// reason; it is neither applied nor lost.
fn record_without_key_is_rejected_to_dead_letters<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send(&topic, 0, None, Some(&common::movement("jo", 4)));
    cluster.send_movement(&topic, 0, "k", "jo", 1);

    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    running.stop().unwrap();
    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::InvalidKey);
    assert!(
        dead[0].message.contains("no idempotency key"),
        "{}",
        dead[0].message
    );
    assert_eq!(b.balances()["jo"], 1);
}

/// A key over the length limit (default 1 KiB) is rejected to the dead letters by default, with
/// the sizes in the message; under the hash policy it is replaced by its SHA-256 and deduplicates
/// like any key.
fn oversize_key_is_rejected_or_hashed_by_policy<B: Backend>(b: &B) {
    let (cluster, topic, _) = setup(1);
    let long = "k".repeat(1025);
    for _ in 0..2 {
        cluster.send_raw(
            &topic,
            0,
            &[("idempotency-key", long.as_bytes())],
            Some(&common::movement("big", 1)),
        );
    }
    cluster.send_movement(&topic, 0, "short", "small", 2);

    let rejecting = unique("group");
    let running = start(&cluster, &rejecting, &topic, b, Ledger::new());
    running.wait_for("three records", |s| s.applied + s.dead_lettered == 3);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!((stats.applied, stats.dead_lettered), (1, 2), "{stats:?}");
    let dead = b.dead_letters(&PartitionId::new(&rejecting, &topic, 0));
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert_eq!(d.reason, DeadLetterReason::InvalidKey);
        assert_eq!(
            d.message, "idempotency key is 1025 bytes, over the limit of 1024",
            "the user sees both sizes"
        );
        assert_eq!(d.key, None);
        assert_eq!(d.record.header("idempotency-key"), Some(long.as_bytes()));
    }

    let hashing = unique("group");
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &hashing, &topic)
            .identity(Identity::new().oversize_key(OversizeKey::Hash))
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    running.wait_for("three records", |s| s.applied + s.duplicates() == 3);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(
        (
            stats.applied,
            stats.duplicates_repeated_key,
            stats.dead_lettered
        ),
        (2, 1, 0),
        "{stats:?}"
    );
    let balances = b.balances();
    assert_eq!((balances["big"], balances["small"]), (1, 4));
}

/// An empty payload reaches the handler, which cannot decode it: it is dead-lettered with
/// "payload is empty", its bytes (empty, not null) kept.
fn empty_payload_is_dead_lettered_with_the_reason<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send(&topic, 0, Some("empty-1"), Some(b""));
    cluster.send_movement(&topic, 0, "after-1", "fay", 3);
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    running.stop().unwrap();
    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::Permanent);
    assert_eq!(
        dead[0].message,
        format!("cannot decode payload of {topic}/0@0 as JSON: payload is empty")
    );
    assert_eq!(dead[0].key.as_deref(), Some(&b"empty-1"[..]));
    assert_eq!(b.balances()["fay"], 3);
}

/// A tombstone (null payload) is dead-lettered by a JSON handler with "payload is null
/// (tombstone)", kept as null, and a redelivery is a duplicate.
fn tombstone_is_dead_lettered_with_the_reason<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send(&topic, 0, Some("gone-1"), None);
    cluster.send_movement(&topic, 0, "after-1", "gil", 3);
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    running.stop().unwrap();
    let pid = PartitionId::new(&group, &topic, 0);
    let dead = b.dead_letters(&pid);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::Permanent);
    assert_eq!(
        dead[0].message,
        format!("cannot decode payload of {topic}/0@0 as JSON: payload is null (tombstone)")
    );
    assert_eq!(dead[0].record.payload(), None, "null, not empty");
    let dlq = cluster.read_all(&format!("{topic}.dlq"), 1);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload, None, "produced as a tombstone too");
    assert_eq!(dlq[0].header("dlq.idempotency.key"), Some("gone-1"));

    b.set_position(&pid, 0);
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("the replay", |s| s.duplicates() == 2);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    assert_eq!(b.dead_letters(&pid).len(), 1);
}

/// Header values need not be UTF-8: a binary idempotency key identifies records like any other
/// (a repeat is a duplicate), and dead letters keep every header byte for byte, in the store and
/// on the dead-letter topic.
fn non_utf8_header_values_are_kept_byte_for_byte<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let key: &[u8] = &[0xff, 0xfe, 0x00, 0x80];
    let trace: &[u8] = &[0xc3, 0x28];
    let headers = [("idempotency-key", key), ("trace", trace)];
    let payload = common::movement("hal", 7);
    cluster.send_raw(&topic, 0, &headers, Some(&payload));
    cluster.send_raw(&topic, 0, &headers, Some(&payload));
    let other_key: &[u8] = &[0xff, 0x01];
    cluster.send_raw(
        &topic,
        0,
        &[("idempotency-key", other_key), ("trace", trace)],
        Some(b"\xff not json"),
    );
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("three records", |s| {
        s.applied + s.duplicates() + s.dead_lettered == 3
    });
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(
        (
            stats.applied,
            stats.duplicates_repeated_key,
            stats.dead_lettered
        ),
        (1, 1, 1),
        "{stats:?}"
    );
    assert_eq!(b.balances()["hal"], 7);
    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key.as_deref(), Some(other_key));
    assert_eq!(dead[0].record.header("trace"), Some(trace));
    assert!(
        dead[0].message.contains("expected value"),
        "serde's message: {}",
        dead[0].message
    );
    let dlq = cluster.read_all(&format!("{topic}.dlq"), 1);
    let raw = |name: &str| {
        dlq[0]
            .raw_headers
            .iter()
            .rev()
            .find(|h| h.0 == name)
            .and_then(|h| h.1.clone())
    };
    assert_eq!(raw("idempotency-key").as_deref(), Some(other_key));
    assert_eq!(raw("trace").as_deref(), Some(trace));
    assert_eq!(raw("dlq.idempotency.key").as_deref(), Some(other_key));
}

/// A header whose name is not UTF-8 (the protocol allows any bytes; the Kafka client cannot
/// read such a name) neither panics nor halts the partition: the record is dead-lettered with
/// the reason and its readable headers, and the records after it are applied.
fn header_name_not_utf8_is_dead_lettered_not_a_halt<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let payload = common::movement("ivy", 3);
    cluster.send_with_header_name(
        &topic,
        0,
        &[("idempotency-key", b"h0"), ("trace", b"t-1")],
        &[0xff],
        &payload,
    );
    cluster.send_movement(&topic, 0, "h1", "ivy", 4);
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!((stats.applied, stats.dead_lettered), (1, 1), "{stats:?}");
    assert_eq!(b.balances()["ivy"], 4);
    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::Permanent);
    assert_eq!(dead[0].record.offset(), 0);
    assert!(dead[0].message.contains("not UTF-8"), "{}", dead[0].message);
    assert_eq!(dead[0].record.payload(), Some(&payload[..]));
    assert_eq!(dead[0].record.header("trace"), Some(&b"t-1"[..]));
}

/// A record of about 1,040,000 bytes without an idempotency key: its dead letter is over the
/// dead-letter producer's limit (1,000,000 bytes), so it is produced without its payload and a
/// header says how many bytes were left out. The store keeps the whole record, and the records
/// after it are applied.
fn oversize_dead_letter_is_produced_without_its_payload<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let big = vec![b'x'; 1_040_000];
    cluster.send_raw(&topic, 0, &[("trace", b"t-9")], Some(&big));
    cluster.send_movement(&topic, 0, "after-big", "kit", 2);
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!((stats.applied, stats.dead_lettered), (1, 1), "{stats:?}");
    assert_eq!(b.balances()["kit"], 2);
    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record.payload().map(<[u8]>::len), Some(big.len()));
    let dlq = cluster.read_all(&format!("{topic}.dlq"), 1);
    assert_eq!(dlq[0].payload, None, "the payload is left out on the topic");
    let header = |name: &str| {
        dlq[0]
            .raw_headers
            .iter()
            .find(|h| h.0 == name)
            .and_then(|h| h.1.clone())
    };
    assert_eq!(
        header("dlq.payload.omitted").as_deref(),
        Some(&b"1040000"[..])
    );
    assert_eq!(header("trace").as_deref(), Some(&b"t-9"[..]));
    assert_eq!(
        header("dlq.error.class").as_deref(),
        Some(&b"invalid_key"[..])
    );
}

/// Partitions are processed concurrently and each in order; keys are scoped by group, so a
/// second group applies everything again.
fn partitions_in_order_and_keys_scoped_by_group<B: Backend>(b: &B) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(3);
    for p in 0..3 {
        for i in 0..5 {
            cluster.send_movement(&topic, p, &format!("p{p}-{i}"), &format!("acct{p}"), 1);
        }
    }
    // One store for both groups: the second group's keys are its own.
    for (round, group) in [unique("group-a"), unique("group-b")].iter().enumerate() {
        let ledger = Ledger::new();
        let observed = ledger.observed.clone();
        let running = start(&cluster, group, &topic, b, ledger);
        running.wait_for("fifteen records", |s| s.applied == 15);
        running.stop().unwrap();
        for p in 0..3 {
            let offsets: Vec<i64> = observed
                .calls()
                .iter()
                .filter(|c| c.0 == p)
                .map(|c| c.1)
                .collect();
            assert_eq!(offsets, vec![0, 1, 2, 3, 4], "partition {p} in order");
        }
        let balances = b.balances();
        let expected = 5 * (round as i64 + 1);
        assert_eq!(
            (balances["acct0"], balances["acct1"], balances["acct2"]),
            (expected, expected, expected)
        );
    }
}

/// The same key on two partitions at the same moment: the handler runs once per key, the other
/// copy waits for the claim and is then a duplicate.
fn same_key_on_two_partitions_at_once_runs_once<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(2);
    for i in 0..40 {
        for p in 0..2 {
            cluster.send_movement(&topic, p, &format!("x{i}"), "kim", 1);
        }
    }
    let mut ledger = Ledger::new();
    ledger.delay = Duration::from_millis(2);
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .batch(10, Duration::from_millis(20))
            .store(store)
            .build(ledger)
            .unwrap()
    });
    running.wait_for("eighty records", |s| s.applied + s.duplicates() == 80);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(
        (stats.applied, stats.duplicates_repeated_key),
        (40, 40),
        "{stats:?}"
    );
    assert_eq!(b.balances()["kim"], 40);
}

/// A second instance joins the group mid-stream (same process, same store): partitions are
/// revoked from the first, drained and committed, then acquired by the second at the stored
/// position. Every record is applied exactly once across both.
fn rebalance_mid_stream_applies_every_record_once<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(4);
    let send = |range: std::ops::Range<i32>, gap: Duration| {
        for i in range {
            let account = format!("acct{}", i % 3);
            cluster.send_movement(&topic, i % 4, &format!("m{i}"), &account, 1);
            std::thread::sleep(gap);
        }
    };
    send(0..100, Duration::ZERO);
    let mut slow = Ledger::new();
    slow.delay = Duration::from_millis(5);
    // Both instances on one store: one RocksDB shared in-process, or one database.
    let open = b.shared();
    let first = Incarnation::launch_with(&*open, |store| {
        builder(&cluster, &group, &topic)
            .batch(20, Duration::from_millis(10))
            .store(store)
            .build(slow.clone())
            .unwrap()
    });
    first.wait_for("the first instance to be mid-stream", |s| s.applied >= 20);
    let second = Incarnation::launch_with(&*open, |store| {
        builder(&cluster, &group, &topic)
            .batch(20, Duration::from_millis(10))
            .store(store)
            .build(slow)
            .unwrap()
    });
    // Keep records flowing across the rebalance (the mock takes a few seconds to settle it).
    send(100..400, Duration::from_millis(25));
    let start = std::time::Instant::now();
    while first.stats().applied + second.stats().applied < 400 {
        assert!(
            start.elapsed() < common::WAIT,
            "{:?} {:?}",
            first.stats(),
            second.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (a, c) = (first.stats(), second.stats());
    second.stop().unwrap();
    first.stop().unwrap();
    assert!(
        c.applied > 0,
        "the second instance took partitions over: {a:?} {c:?}"
    );
    assert_eq!(a.applied + c.applied, 400, "{a:?} {c:?}");
    drop(open);
    let balances = b.balances();
    assert_eq!(
        balances["acct0"] + balances["acct1"] + balances["acct2"],
        400
    );
    assert_eq!(balances["acct0"], 134);
}

/// Partitions whose tasks stalled with records waiting in their queues, then revoked by a
/// rebalance, flow again where they are assigned, the same instance included: the records of
/// the old assignment left in a partition's queue are dropped, and the queue split off again
/// for the new assignment wakes its new task.
fn stalled_partitions_flow_again_after_a_rebalance<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(2);
    for p in 0..2 {
        cluster.send_movements(
            &topic,
            p,
            (0..100).map(|i| (format!("q{p}-{i}"), format!("ray{p}"), 1)),
        );
    }
    let open = b.shared();
    let launch = |ledger: Ledger| {
        Incarnation::launch_with(&*open, |store| {
            builder(&cluster, &group, &topic)
                .batch(8, Duration::from_millis(5))
                .drain_timeout(Duration::from_secs(2))
                .store(store)
                .build(ledger)
                .unwrap()
        })
    };
    // The first instance's handler stalls once on each partition, with the rest of the
    // partition's records waiting in its queue, until the rebalance takes them away.
    let mut stalling = Ledger::new();
    stalling.hang_once_at = Some(5);
    let observed = stalling.observed.clone();
    let first = launch(stalling);
    let start = std::time::Instant::now();
    while !observed.calls().contains(&(0, 5)) || !observed.calls().contains(&(1, 5)) {
        assert!(start.elapsed() < common::WAIT, "{:?}", observed.calls());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    // Joining revokes both (the stalled batches are abandoned after the drain timeout) and
    // gives one back to the first instance.
    let second = launch(Ledger::new());
    let start = std::time::Instant::now();
    while first.stats().applied + second.stats().applied < 200 {
        assert!(
            start.elapsed() < common::WAIT,
            "a partition never flowed again: {:?} {:?}",
            first.stats(),
            second.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (first_stats, second_stats) = (first.stats.clone(), second.stats.clone());
    second.stop().unwrap();
    first.stop().unwrap();
    let (a, c) = (first_stats.snapshot(), second_stats.snapshot());
    assert!(
        a.applied > 0 && c.applied > 0,
        "one partition each: {a:?} {c:?}"
    );
    assert_eq!(a.applied + c.applied, 200, "{a:?} {c:?}");
    drop(open);
    let balances = b.balances();
    assert_eq!((balances["ray0"], balances["ray1"]), (100, 100));
}

/// A handler that panics (after writing) does not crash the runtime: its writes are rolled
/// back, the record is kept as a dead letter with the panic message, and the next record runs.
fn handler_panic_is_dead_lettered_and_the_runtime_goes_on<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send_movement(&topic, 0, "p0", "max", 1);
    cluster.send_movement(&topic, 0, "p1", "max", 100);
    cluster.send_movement(&topic, 0, "p2", "max", 10);
    let mut ledger = Ledger::new();
    ledger.panic_at = Some(1);
    let running = start(&cluster, &group, &topic, b, ledger);
    running.wait_for("three records", |s| s.applied + s.dead_lettered == 3);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!((stats.applied, stats.dead_lettered), (2, 1), "{stats:?}");
    assert_eq!(
        b.balances()["max"],
        11,
        "the panicking record's write was rolled back"
    );
    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead[0].record.offset(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::Permanent);
    assert!(
        dead[0]
            .message
            .contains("handler panicked: ledger bug at offset 1"),
        "{}",
        dead[0].message
    );
}

/// A panic in `on_duplicate` or `on_conflict` is the hook's alone: the duplicate stays a no-op,
/// the conflict is dead-lettered as its policy says, and the records after them are applied.
fn panicking_hooks_do_not_stop_the_runtime<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let mut ledger = Ledger::new();
    ledger.panic_in_hooks = true;
    let consumer = start(&cluster, &group, &topic, b, ledger.clone());
    cluster.send_movement(&topic, 0, "k1", "amy", 5);
    cluster.send_movement(&topic, 0, "k1", "amy", 5);
    cluster.send_movement(&topic, 0, "k1", "amy", 7);
    cluster.send_movement(&topic, 0, "k2", "amy", 1);
    consumer.wait_for("every record settled", |s| {
        s.applied == 2 && s.duplicates() == 1 && s.conflicts == 1
    });
    consumer.stop().unwrap();
    assert_eq!(
        b.balances()["amy"],
        6,
        "the duplicate and the conflict applied nothing"
    );
    assert_eq!(
        ledger.observed.duplicates.lock().unwrap().len(),
        1,
        "on_duplicate ran"
    );
    assert_eq!(
        ledger.observed.conflicts.lock().unwrap().len(),
        1,
        "on_conflict ran"
    );
    let letters = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, DeadLetterReason::Conflict);
    assert_eq!(b.next_offset(&PartitionId::new(&group, &topic, 0)), Some(4));
}

fn fast_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

/// Whether the backend's handlers run without savepoints until one fails.
fn redoes<B: Backend>() -> bool {
    <<B::S as Store>::Tx as Transaction>::SAVEPOINT_ROUND_TRIP
}

/// A retryable error is retried in place: the partition keeps its order, the record is applied
/// once, and the records before it are not held back by the wait.
fn retryable_error_is_retried_in_order_then_applied_once<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    for i in 0..4 {
        cluster.send_movement(&topic, 0, &format!("t{i}"), "ned", 1 << i);
    }
    let mut ledger = Ledger::new();
    ledger.fail_at = Some((2, ErrorClass::Retryable, 3));
    let observed = ledger.observed.clone();
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .retry(fast_retries(5))
            .store(store)
            .build(ledger)
            .unwrap()
    });
    running.wait_for("four records", |s| s.applied == 4);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!((stats.retries, stats.dead_lettered), (3, 0), "{stats:?}");
    let offsets: Vec<i64> = observed.calls().iter().map(|c| c.1).collect();
    // Where a savepoint costs a round trip, records run without one: the first failure drops
    // the transaction, so the records before the failing one are handled again (once) and
    // committed before the wait. Its failed run counts as its first attempt either way.
    let expected = if redoes::<B>() {
        vec![0, 1, 2, 0, 1, 2, 2, 2, 3]
    } else {
        vec![0, 1, 2, 2, 2, 2, 3]
    };
    assert_eq!(offsets, expected, "order kept, offset 2 tried four times");
    assert_eq!(b.balances()["ned"], 15);
}

/// While a record waits between retries, only its partition waits: the other partition's
/// records are all handled meanwhile (the held record fails until they are, and would run out of
/// attempts if its wait blocked them).
fn retrying_partition_waits_while_other_partitions_flow<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(2);
    for i in 0..3 {
        cluster.send_movement(&topic, 0, &format!("p0-{i}"), "ida", 1);
    }
    let mut ledger = Ledger::new();
    ledger.hold_until_others = Some((0, 1, 30));
    let observed = ledger.observed.clone();
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .retry(fast_retries(1_000))
            .store(store)
            .build(ledger)
            .unwrap()
    });
    // Partition 0 is waiting between retries before partition 1 has anything to do.
    running.wait_for("the first retry", |s| s.retries >= 1);
    for i in 0..30 {
        cluster.send_movement(&topic, 1, &format!("p1-{i}"), "jay", 1);
    }
    running.wait_for("every record", |s| s.applied == 33);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    let p0: Vec<i64> = observed
        .calls()
        .iter()
        .filter(|c| c.0 == 0)
        .map(|c| c.1)
        .collect();
    // Without savepoints the first failure is redone from offset 0 (see the test above).
    let head: &[i64] = if redoes::<B>() { &[0, 1, 0] } else { &[0] };
    assert!(p0.starts_with(head), "{p0:?}");
    assert_eq!(p0.last(), Some(&2), "order kept on the waiting partition");
    assert!(
        p0[head.len()..p0.len() - 1].iter().all(|&o| o == 1),
        "{p0:?}"
    );
    let balances = b.balances();
    assert_eq!((balances["ida"], balances["jay"]), (3, 30));
}

/// Retries are bounded: after the last attempt the record is a dead letter, and the partition
/// goes on.
fn exhausted_retries_are_dead_lettered<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send_movement(&topic, 0, "u0", "oli", 1);
    cluster.send_movement(&topic, 0, "u1", "oli", 2);
    let mut ledger = Ledger::new();
    ledger.fail_at = Some((0, ErrorClass::Retryable, u32::MAX));
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .retry(fast_retries(3))
            .store(store)
            .build(ledger)
            .unwrap()
    });
    running.wait_for("both records", |s| s.applied + s.dead_lettered == 2);
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(
        (stats.retries, stats.dead_lettered, stats.applied),
        (2, 1, 1),
        "{stats:?}"
    );
    let dead = b.dead_letters(&PartitionId::new(&group, &topic, 0));
    assert_eq!(dead[0].reason, DeadLetterReason::RetriesExhausted);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].first_failed_at_ms < dead[0].failed_at_ms,
        "{dead:?}"
    );
    assert!(
        dead[0].message.contains("injected Retryable failure"),
        "{}",
        dead[0].message
    );
    assert_eq!(b.balances()["oli"], 2);
}

/// A batch whose commit is fenced has already produced its dead letters (they are
/// acknowledged before the commit), and a later attempt may apply the record instead: the
/// topic is at least once. Every letter names its attempt (`dlq.batch.id`), and the store's
/// letters, written in the commit, are exact: only committed attempts' letters, each with the
/// id its topic copy carries.
fn dead_letters_are_exact_in_the_store_after_a_fenced_batch<B: Backend>(b: &B) {
    /// At offset `at`, the first time: another owner takes the partition (its epoch moves on,
    /// fencing this batch), then the record fails for good.
    struct TakenOverAt<S> {
        inner: Ledger,
        store: S,
        group: String,
        at: i64,
        done: std::sync::atomic::AtomicBool,
    }
    impl<S: Store + Clone> idempotent_consumer::Handler<S::Tx> for TakenOverAt<S>
    where
        S::Tx: common::LedgerTx,
    {
        async fn handle(
            &self,
            record: &idempotent_consumer::Record,
            tx: &mut S::Tx,
        ) -> Result<idempotent_consumer::Outcome, idempotent_consumer::HandlerError> {
            use std::sync::atomic::Ordering;
            if record.offset() == self.at && !self.done.swap(true, Ordering::SeqCst) {
                let partition = PartitionId::new(&self.group, record.topic(), record.partition());
                self.store.acquire(&partition).await.unwrap();
                return Err(idempotent_consumer::HandlerError::permanent(
                    "refused in the fenced batch",
                ));
            }
            self.inner.handle(record, tx).await
        }
    }
    let (cluster, topic, group) = setup(1);
    for i in 0..3 {
        cluster.send_movement(&topic, 0, &format!("x{i}"), "vic", 1);
    }
    let p0 = PartitionId::new(&group, &topic, 0);
    let running = Incarnation::launch(b, |store| {
        let handler = TakenOverAt {
            inner: Ledger::new(),
            store: store.clone(),
            group: group.clone(),
            at: 1,
            done: Default::default(),
        };
        builder(&cluster, &group, &topic)
            .store(store)
            .build(handler)
            .unwrap()
    });
    running.wait_for("the fenced commit", |s| s.fenced_commits == 1);
    running.stop().unwrap();
    let dlq = cluster.read_all(&format!("{topic}.dlq"), 1);
    assert_eq!(dlq.len(), 1, "produced before the fenced commit");
    let fenced_batch = dlq[0]
        .header("dlq.batch.id")
        .expect("a batch id")
        .to_owned();
    assert!(
        b.dead_letters(&p0).is_empty(),
        "the fenced attempt wrote nothing"
    );

    // The next owner applies offset 1 and dead-letters offset 2.
    let mut ledger = Ledger::new();
    ledger.fail_at = Some((2, ErrorClass::Permanent, 1));
    let running = start(&cluster, &group, &topic, b, ledger);
    running.wait_for("the rest", |s| s.applied == 2 && s.dead_lettered == 1);
    running.stop().unwrap();
    let kept = b.dead_letters(&p0);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].record.offset(), 2);
    let kept_batch = kept[0]
        .batch_id
        .clone()
        .expect("the store keeps the batch id");
    assert_ne!(kept_batch, fenced_batch);
    let dlq = cluster.read_all(&format!("{topic}.dlq"), 2);
    let batch_of = |offset: &str| {
        dlq.iter()
            .find(|r| r.header("dlq.original.offset") == Some(offset))
            .and_then(|r| r.header("dlq.batch.id"))
            .map(str::to_owned)
    };
    assert_eq!(
        batch_of("1"),
        Some(fenced_batch),
        "the stale letter, told apart"
    );
    assert_eq!(batch_of("2"), Some(kept_batch), "the current letter");
    assert_eq!(b.balances()["vic"], 2, "offsets 0 and 1, once each");
}

/// A fatal error stops the runtime with the record's position; the records before it are
/// committed, nothing at or after it is, and a restart handles it again.
fn fatal_error_stops_without_committing_past_the_record<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    for i in 0..4 {
        cluster.send_movement(&topic, 0, &format!("f{i}"), "pat", 1);
    }
    let mut ledger = Ledger::new();
    ledger.fail_at = Some((2, ErrorClass::Fatal, 1));
    let mut running = start(&cluster, &group, &topic, b, ledger);
    let err = running.join().unwrap_err();
    assert!(matches!(err, Error::HandlerFatal { .. }), "{err}");
    assert_eq!(err.record_position().unwrap().offset, 2);
    assert!(err.to_string().contains("injected Fatal failure"), "{err}");
    drop(running);
    let pid = PartitionId::new(&group, &topic, 0);
    assert_eq!(b.position(&pid).unwrap().next_offset, Some(2));

    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("the rest", |s| s.applied == 2);
    running.stop().unwrap();
    assert_eq!(b.balances()["pat"], 4);
}

/// When a dead letter cannot be produced, nothing is committed past its record: the runtime
/// stops with the producer's error, and the record is neither lost nor marked dead-lettered.
fn dead_letter_that_cannot_be_produced_is_not_committed_past<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    cluster.send_movement(&topic, 0, "ok-0", "quin", 1);
    cluster.send(&topic, 0, Some("bad-1"), Some(b"not json"));
    cluster.send_movement(&topic, 0, "ok-2", "quin", 2);
    let refused = cluster.refuse_dead_letters();
    let mut running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            // A topic name the broker must refuse.
            .dead_letter_topic(refused)
            .set("message.timeout.ms", "3000")
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    let err = running.join().unwrap_err();
    assert!(err.to_string().contains("producing a dead letter"), "{err}");
    drop(running);
    let position = b.next_offset(&PartitionId::new(&group, &topic, 0));
    assert!(
        position.is_none_or(|p| p <= 1),
        "committed past the record: {position:?}"
    );
    assert!(
        b.dead_letters(&PartitionId::new(&group, &topic, 0))
            .is_empty()
    );
}

/// Batches are bounded by bytes as well as by count: records of 10 kB under a bound of 25 kB
/// make batches of three, where the count bound and the linger alone would make one.
fn batches_are_bounded_by_bytes<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let padding = "x".repeat(10_000);
    cluster.send_keyed(
        &topic,
        0,
        (0..20).map(|i| {
            let payload =
                format!("{{\"account\": \"uma\", \"amount\": 1, \"pad\": \"{padding}\"}}");
            (format!("big-{i}"), payload.into_bytes())
        }),
    );
    let running = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .batch(1_000, Duration::from_secs(2))
            .batch_max_bytes(25_000)
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    running.wait_for("every record", |s| s.applied == 20);
    let stats = running.stats();
    running.stop().unwrap();
    assert!(stats.batches_committed >= 7, "{stats:?}");
    assert_eq!(b.balances()["uma"], 20);
}

/// When the asynchronous Kafka commit after a partition's last batch fails, the position is
/// committed to Kafka again once the partition is idle: Kafka's committed offset (what lag
/// tools read) reaches the store's while the runtime runs, not only at its stop. (On a real
/// cluster commits cannot be made to fail; the offset must get there all the same.)
fn kafka_offsets_catch_up_after_a_failed_commit<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    for i in 0..5 {
        cluster.send_movement(&topic, 0, &format!("k{i}"), "kai", 1);
    }
    // The batch's Kafka commit fails (on the mock cluster; without the retry the offset then
    // stays behind until the stop), and the failure is counted.
    let injected = cluster.fail_offset_commits(1);
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("the five records", |s| s.applied == 5);
    let started = std::time::Instant::now();
    while cluster.kafka_offset(&group, &topic, 0) != Some(5) {
        assert!(
            started.elapsed() < common::WAIT,
            "Kafka's offset stays behind: {:?} {:?}",
            cluster.kafka_offset(&group, &topic, 0),
            running.stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = running.stats();
    running.stop().unwrap();
    if injected {
        assert_eq!(stats.kafka_commit_failures, 1, "counted: {stats:?}");
    }
}

/// A partition assigned at a stored position that Kafka's committed offset lags (the last
/// commit of its previous owner failed in the rebalance) and with nothing left to handle still
/// gets its position committed to Kafka, so lag tools and the next owner see it.
fn kafka_offsets_catch_up_with_the_store_at_assignment<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    for i in 0..5 {
        cluster.send_movement(&topic, 0, &format!("a{i}"), "ada", 1);
    }
    // The store handled everything; Kafka never heard of it.
    b.set_position(&PartitionId::new(&group, &topic, 0), 5);
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_assigned(1);
    let started = std::time::Instant::now();
    while cluster.kafka_offset(&group, &topic, 0) != Some(5) {
        assert!(
            started.elapsed() < common::WAIT,
            "Kafka's offset stays behind: {:?}",
            cluster.kafka_offset(&group, &topic, 0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = running.stats();
    running.stop().unwrap();
    assert_eq!(stats.records_read, 0, "{stats:?}");
}

/// A stored position beyond the end of the log (the topic was deleted and created again) is
/// refused with both numbers: without the check every new record would be below the position
/// and skipped as a redelivery. Once the operator sets where it resumes, everything is handled.
fn position_beyond_the_end_of_the_log_is_refused_not_skipped<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let pid = PartitionId::new(&group, &topic, 0);
    for i in 0..5 {
        cluster.send_movement(&topic, 0, &format!("e{i}"), "sam", 1);
    }
    // The store remembers offset 100 of the topic's previous life.
    b.set_position(&pid, 100);
    let launch = || start(&cluster, &group, &topic, b, Ledger::new());
    let mut running = launch();
    let err = running.join().unwrap_err();
    drop(running);
    assert!(
        matches!(
            err,
            Error::PositionAheadOfLog {
                position: 100,
                high_watermark: 5,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("set_position"), "{err}");
    assert_eq!(b.next_offset(&pid), Some(100), "nothing committed");
    assert_eq!(b.balances().get("sam"), None, "nothing handled");

    b.set_position(&pid, 0);
    let running = launch();
    running.wait_for("the five records", |s| s.applied == 5);
    running.stop().unwrap();
    assert_eq!(b.balances()["sam"], 5);
}

/// Records compressed with every codec Kafka producers use (gzip, snappy, lz4, zstd) are read
/// and applied: a codec the client was built without stops the partition (and librdkafka
/// alone would skip its records).
fn every_compression_codec_is_read<B: Backend>(b: &B) {
    let codecs = ["gzip", "snappy", "lz4", "zstd"];
    let (cluster, topic, group) = setup(codecs.len() as i32);
    for (p, codec) in codecs.into_iter().enumerate() {
        let records: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| (format!("{codec}-{i}"), common::movement(codec, 1)))
            .collect();
        cluster.send_compressed(&topic, p as i32, codec, &records);
    }
    let running = start(&cluster, &group, &topic, b, Ledger::new());
    running.wait_for("every record", |s| s.applied == 80);
    running.stop().unwrap();
    let balances = b.balances();
    for codec in codecs {
        assert_eq!(balances[codec], 20, "{codec}");
    }
}

/// A record batch that fails its CRC stops its partition with an error naming where: neither
/// handed on unchecked nor skipped (librdkafka skips such a batch and goes on, which would move
/// the position past records never handled). Records before it are committed. A broker checks
/// CRCs on produce and refuses the batch; the mock cluster stores it as sent, which is what a
/// corrupted disk or network hands a consumer.
fn a_batch_that_fails_its_crc_stops_the_partition_not_skipped<B: Backend>(b: &B) {
    let (cluster, topic, group) = setup(1);
    let pid = PartitionId::new(&group, &topic, 0);
    // A batch written by hand with a good CRC: the encoding is right.
    let good: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("g{i}"), common::movement("val", 1)))
        .collect();
    let good: Vec<(&str, Vec<u8>)> = good.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    assert_eq!(
        cluster.send_batch_by_hand(&topic, 0, &good, false),
        common::RawProduce::Stored(0)
    );
    let bad = [
        ("c0", common::movement("val", 100)),
        ("c1", common::movement("val", 100)),
    ];
    match cluster.send_batch_by_hand(&topic, 0, &bad, true) {
        common::RawProduce::Stored(base) => assert_eq!(base, 3),
        // A broker: the batch never reaches the log.
        common::RawProduce::Refused(code) => {
            assert_eq!(code, 2, "CORRUPT_MESSAGE");
            return;
        }
    }
    for i in 0..3 {
        cluster.send_movement(&topic, 0, &format!("a{i}"), "val", 10);
    }
    let mut running = start(&cluster, &group, &topic, b, Ledger::new());
    let err = running.join().unwrap_err();
    drop(running);
    assert!(err.to_string().contains("failed its CRC"), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("{topic}/0 after offset 2")),
        "{err}"
    );
    assert_eq!(
        b.next_offset(&pid),
        Some(3),
        "the records before it committed"
    );
    assert_eq!(
        b.balances()["val"],
        3,
        "nothing of or after the batch applied"
    );
}

/// A dead-letter topic that does not exist, on a cluster that does not create topics: the
/// producer gives up on the topic (after `topic.metadata.propagation.max.ms`) and the run ends
/// with an error naming it; nothing is committed past the record. Once the topic is created,
/// a restart dead-letters the record once and goes on.
fn missing_dead_letter_topic_ends_the_run_and_loses_nothing<B: Backend>(b: &B) {
    let cluster = Cluster::start();
    let topic = unique("topic");
    cluster.create_named_topic(&topic, 1);
    let group = unique("group");
    let pid = PartitionId::new(&group, &topic, 0);
    cluster.send_movement(&topic, 0, "ok-0", "rue", 1);
    cluster.send(&topic, 0, Some("bad-1"), Some(b"not json"));
    cluster.send_movement(&topic, 0, "ok-2", "rue", 2);
    let launch = || {
        Incarnation::launch(b, |store| {
            builder(&cluster, &group, &topic)
                // What a broker with auto.create.topics.enable=false does.
                .set("allow.auto.create.topics", "false")
                .set("topic.metadata.propagation.max.ms", "1000")
                .store(store)
                .build(Ledger::new())
                .unwrap()
        })
    };
    let mut running = launch();
    let err = running.join().unwrap_err();
    drop(running);
    let dlq = format!("{topic}.dlq");
    assert!(
        err.to_string()
            .contains(&format!("producing a dead letter to {dlq}")),
        "{err}"
    );
    let cause = std::error::Error::source(&err).map(|e| e.to_string());
    assert!(
        cause.as_deref().is_some_and(|c| c.contains("UnknownTopic")),
        "the cause names the missing topic: {cause:?}"
    );
    let position = b.next_offset(&pid);
    assert!(
        position.is_none_or(|p| p <= 1),
        "committed past the record: {position:?}"
    );
    assert!(b.dead_letters(&pid).is_empty());

    cluster.create_named_topic(&dlq, 1);
    let running = launch();
    running.wait_for("the rest", |s| s.applied >= 1 && s.dead_lettered == 1);
    running.caught_up();
    running.stop().unwrap();
    assert_eq!(b.next_offset(&pid), Some(3));
    assert_eq!(b.dead_letters(&pid).len(), 1);
    assert_eq!(b.balances()["rue"], 3);
    let letters = cluster.read_all(&dlq, 1);
    assert_eq!(letters.len(), 1, "one dead letter on the topic");
}

/// Two instances of one group, each with a RocksDB directory of its own (two replicas of a
/// service). A partition whose latest state is in the other instance's store is refused: never
/// handled from Kafka's lagging offset, nor later from this store's stale position. Under
/// `Stop` the runtime ends with the error; under `Pause` the partition waits and the others
/// flow.
#[test]
fn rocksdb_stores_of_two_instances_refuse_a_partition_whose_state_is_elsewhere() {
    common::init_tracing();
    let (cluster, topic, group) = setup(2);
    let (a, b) = (Rocks::new(), Rocks::new());
    let start_on = |r: &Rocks, policy: StalePartitionPolicy| {
        Incarnation::launch(r, |store| {
            builder(&cluster, &group, &topic)
                .on_stale_partition(policy)
                .store(store)
                .build(Ledger::new())
                .unwrap()
        })
    };
    let send = |partition: i32, range: std::ops::Range<i32>, account: &str| {
        for i in range {
            cluster.send_movement(&topic, partition, &format!("p{partition}-{i}"), account, 1);
        }
    };
    let (p0, p1) = (
        PartitionId::new(&group, &topic, 0),
        PartitionId::new(&group, &topic, 1),
    );

    // A handles partition 0 up to offset 10; partition 1 stays empty (nothing committed).
    send(0, 0..10, "ann");
    let one = start_on(&a, StalePartitionPolicy::Stop);
    one.wait_for("partition 0", |s| s.applied == 10);
    one.stop().unwrap();

    // B stops on partition 0: A's store holds its state. The error names both positions.
    send(0, 10..20, "ann");
    let mut two = start_on(&b, StalePartitionPolicy::Stop);
    let err = two.join().unwrap_err();
    match &err {
        Error::StalePartition {
            topic: t,
            partition: 0,
            store_position: None,
            kafka_offset: 10,
            ..
        } if *t == topic => {}
        other => panic!("expected partition 0 refused as stale, got {other:?}"),
    }
    assert!(err.to_string().contains("another store"), "{err}");
    drop(two);

    // B pausing: partition 0 waits, partition 1 (no state anywhere) flows.
    send(1, 0..5, "bob");
    let two = start_on(&b, StalePartitionPolicy::Pause);
    two.wait_for("partition 1 and the refusal", |s| {
        s.applied == 5 && s.stale_partitions_refused == 1
    });
    // Time for partition 0's records to be (wrongly) handled, were it assigned.
    std::thread::sleep(Duration::from_millis(500));
    let on_b = two.stats();
    two.stop().unwrap();
    assert_eq!(
        on_b.applied, 5,
        "only partition 1 was handled on B: {on_b:?}"
    );

    // Back on A: partition 0 goes on from A's offset 10; partition 1 is B's now, refused.
    let one = start_on(&a, StalePartitionPolicy::Pause);
    one.wait_for("partition 0's new records and the refusal", |s| {
        s.applied == 10 && s.stale_partitions_refused == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    let on_a = one.stats();
    one.stop().unwrap();
    assert_eq!(on_a.applied, 10, "{on_a:?}");

    // Every record applied once, each in the store that owns its partition's state.
    assert_eq!(a.balances().get("ann"), Some(&20));
    assert_eq!(a.balances().get("bob"), None);
    assert_eq!(b.balances().get("bob"), Some(&5));
    assert_eq!(b.balances().get("ann"), None);
    assert_eq!(a.next_offset(&p0), Some(20));
    assert_eq!(a.next_offset(&p1), None);
    assert_eq!(b.next_offset(&p1), Some(5));
    assert_eq!(b.next_offset(&p0), None);
}

/// No broker reachable (a closed port): `run` ends with an error that says so, once the
/// configured time has passed, instead of logging forever.
#[test]
fn unreachable_brokers_end_the_run_with_a_clear_error() {
    common::init_tracing();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = Rocks::new();
    let mut running = Incarnation::launch(&dir, |store| {
        idempotent_consumer::Runtime::builder()
            .bootstrap_servers(format!("127.0.0.1:{closed}"))
            .group_id(unique("group"))
            .topics(["anything"])
            .kafka_unavailable_timeout(Duration::from_secs(2))
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    let err = running.join().unwrap_err();
    assert!(
        err.to_string().contains("no Kafka broker reachable for 2s"),
        "{err}"
    );
}

/// A subscribed topic that does not exist ends `run` with an error naming it.
#[test]
fn missing_topic_ends_the_run_with_a_clear_error() {
    common::init_tracing();
    let cluster = Cluster::start();
    let dir = Rocks::new();
    let mut running = Incarnation::launch(&dir, |store| {
        builder(&cluster, &unique("group"), "no-such-topic")
            .kafka_unavailable_timeout(Duration::from_secs(2))
            .store(store)
            .build(Ledger::new())
            .unwrap()
    });
    let err = running.join().unwrap_err();
    assert!(
        err.to_string()
            .contains("\"no-such-topic\" has not existed"),
        "{err}"
    );
}

/// Instantiates every test above once per store.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod rocksdb {
            $(
                #[test]
                fn $name() {
                    super::common::init_tracing();
                    super::$name(&super::common::backend::Rocks::new());
                }
            )*
        }

        #[cfg(all(feature = "postgres", feature = "testkit"))]
        mod postgres {
            $(
                #[test]
                fn $name() {
                    super::common::init_tracing();
                    super::$name(&super::common::backend::Postgres::new());
                }
            )*
        }
    };
}

suite!(
    crash_between_handler_and_commit_then_redelivery_is_a_noop,
    repeated_key_at_new_offset_is_a_noop_with_stored_outcome,
    conflict_is_detected_reported_and_dead_lettered,
    conflict_with_stop_policy_stops_before_the_record,
    conflict_with_skip_and_record_policy_is_recorded_in_the_store_only,
    oversize_key_is_rejected_or_hashed_by_policy,
    empty_payload_is_dead_lettered_with_the_reason,
    tombstone_is_dead_lettered_with_the_reason,
    non_utf8_header_values_are_kept_byte_for_byte,
    header_name_not_utf8_is_dead_lettered_not_a_halt,
    oversize_dead_letter_is_produced_without_its_payload,
    retrying_partition_waits_while_other_partitions_flow,
    resumes_from_stored_position_when_kafka_is_behind_or_ahead,
    a_store_without_a_position_starts_where_start_without_position_says,
    progress_reports_the_lag_and_caught_up_waits_for_the_commits,
    replay_after_rewind_is_a_counted_noop,
    ttl_expiry_readmits_old_key_and_keeps_young_one,
    background_purge_removes_expired_entries_only,
    shutdown_drains_and_commits_in_flight_work,
    undecodable_payload_is_dead_lettered_not_lost,
    record_without_key_is_rejected_to_dead_letters,
    partitions_in_order_and_keys_scoped_by_group,
    same_key_on_two_partitions_at_once_runs_once,
    rebalance_mid_stream_applies_every_record_once,
    stalled_partitions_flow_again_after_a_rebalance,
    handler_panic_is_dead_lettered_and_the_runtime_goes_on,
    panicking_hooks_do_not_stop_the_runtime,
    retryable_error_is_retried_in_order_then_applied_once,
    exhausted_retries_are_dead_lettered,
    dead_letters_are_exact_in_the_store_after_a_fenced_batch,
    fatal_error_stops_without_committing_past_the_record,
    dead_letter_that_cannot_be_produced_is_not_committed_past,
    missing_dead_letter_topic_ends_the_run_and_loses_nothing,
    position_beyond_the_end_of_the_log_is_refused_not_skipped,
    a_batch_that_fails_its_crc_stops_the_partition_not_skipped,
    every_compression_codec_is_read,
    batches_are_bounded_by_bytes,
    background_purge_removes_old_dead_letters,
    kafka_offsets_catch_up_after_a_failed_commit,
    kafka_offsets_catch_up_with_the_store_at_assignment,
);

/// A record that waits long for its idempotency key, held by another partition's batch whose
/// handler does not return, is logged as a warning naming the key and its holder (partition
/// and epoch) instead of waiting silently.
#[test]
fn a_long_wait_for_a_busy_key_is_a_warning_naming_its_holder() {
    struct HangOnPartition0;
    impl idempotent_consumer::Handler<idempotent_consumer::RocksTx> for HangOnPartition0 {
        async fn handle(
            &self,
            record: &idempotent_consumer::Record,
            _: &mut idempotent_consumer::RocksTx,
        ) -> Result<idempotent_consumer::Outcome, idempotent_consumer::HandlerError> {
            if record.partition() == 0 {
                std::future::pending::<()>().await;
            }
            Ok(idempotent_consumer::Outcome::none())
        }
    }
    common::init_tracing();
    let (cluster, topic, group) = setup(2);
    let key = unique("shared-key");
    cluster.send_movement(&topic, 0, &key, "kim", 1);
    let dir = Rocks::new();
    let running = Incarnation::launch(&dir, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(HangOnPartition0)
            .unwrap()
    });
    running.wait_assigned(2);
    // Partition 0's batch holds the key (its handler never returns) before partition 1 asks.
    std::thread::sleep(Duration::from_millis(500));
    cluster.send_movement(&topic, 1, &key, "kim", 1);
    let start = std::time::Instant::now();
    let warned = loop {
        let found = common::warnings()
            .into_iter()
            .find(|w| w.contains("waited long for its idempotency key") && w.contains(&key));
        if let Some(w) = found {
            break w;
        }
        assert!(start.elapsed() < common::WAIT, "no warning about the wait");
        std::thread::sleep(Duration::from_millis(100));
    };
    running.crash();
    assert!(
        warned.contains(&format!("holder=\"{topic}/0 (epoch")),
        "names the holder: {warned}"
    );
    assert!(
        warned.contains(&format!("topic={topic} partition=1")),
        "{warned}"
    );
}
