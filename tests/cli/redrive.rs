//! `idc dead-letters redrive`: a dry run that changes nothing, a redrive killed with SIGKILL
//! halfway and run again that produces every letter exactly once, the letters marked and the
//! run audited, and a redrive to the letters' own topic whose records the consumer handles
//! again (their dead-lettered keys freed), with the loop guard holding once they fail again.

use std::collections::HashMap;
use std::time::Duration;

use super::common::backend::Backend;
use super::common::{Cluster, Incarnation, WAIT, builder, unique};
use super::{Devices, json};
use idempotent_consumer::ops::{REDRIVE_COUNT, REDRIVE_OF};
use idempotent_consumer::{AuditRecord, Audited, RedriveMark};
use idempotent_consumer::{Handler, HandlerError, Outcome, Record, StatsSnapshot};
use serde_json::Value;

/// `n` undecodable records (dead-lettered as permanent) under keys `k0..`, then a consumer run
/// until every one is a dead letter.
fn dead_letters<B: Backend>(b: &B, n: usize) -> (Cluster, String, String) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    let records = (0..n).map(|i| (format!("k{i}"), format!("bad-{i}").into_bytes()));
    cluster.send_keyed(&topic, 0, records);
    let consumer = Incarnation::launch(b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(Devices)
            .unwrap()
    });
    consumer.wait_for("dead letters", |s| s.dead_lettered == n as u64);
    consumer.caught_up();
    consumer.stop().unwrap();
    (cluster, topic, group)
}

fn as_str(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn a_killed_redrive_resumes_and_produces_each_letter_once<B: Backend>(b: B, store: &str) {
    let n = 300;
    let (cluster, _topic, group) = dead_letters(&b, n);
    let target = unique("redriven");
    cluster.create_named_topic(&target, 1);
    let boot = cluster.bootstrap().to_owned();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--bootstrap", &boot, "--who", "ops-test", "dead-letters"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(["redrive", &group, "--to-topic", &target].map(String::from));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // A dry run counts and changes nothing.
    let dry = json(store, &as_str(&args(&["--dry-run"])));
    assert_eq!(
        (dry["would_redrive"].as_u64(), dry["dry_run"].as_bool()),
        (Some(n as u64), Some(true))
    );
    assert!(
        json(store, &["audit", "list"])["records"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Killed halfway, then run again: paced to 50 letters a second (six seconds in all), and
    // killed once ten of them are on the target topic, however long the command took to start.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idc"))
        .arg("--store")
        .arg(store)
        .args(args(&["--rate", "50"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while cluster.high_watermark(&target, 0) < 10 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the redrive ended before ten letters were produced"
        );
        assert!(
            started.elapsed() < WAIT,
            "the redrive never produced ten letters"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the redrive ended before it was killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = json(store, &as_str(&args(&[])));
    let before = resumed["already_redriven"].as_u64().unwrap();
    assert!(before > 0 && before < n as u64, "killed mid-run: {resumed}");
    assert_eq!(
        before
            + resumed["redriven"].as_u64().unwrap()
            + resumed["found_after_interruption"].as_u64().unwrap(),
        n as u64,
        "{resumed}"
    );

    // Exactly once each on the target topic, with the original key and payload.
    let records = cluster.read_all(&target, n);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &records {
        let of = r
            .header(REDRIVE_OF)
            .expect("every redriven record names its letter");
        *seen.entry(of.to_owned()).or_default() += 1;
        assert_eq!(r.header(REDRIVE_COUNT), Some("1"));
        let key = r.header("idempotency-key").unwrap();
        let i: usize = key[1..].parse().unwrap();
        assert_eq!(r.payload.as_deref(), Some(format!("bad-{i}").as_bytes()));
    }
    assert_eq!(seen.len(), n, "every letter once");
    assert!(seen.values().all(|c| *c == 1), "none twice");
    // The audit records say what each run did.
    let log = json(store, &["audit", "list"]);
    let runs: Vec<&serde_json::Value> = log["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["command"] == "dead-letters redrive")
        .collect();
    assert_eq!(runs.len(), 2, "{log}");
    assert_eq!(runs[0]["who"], "ops-test");
    assert_eq!(runs[0]["details"]["to_topic"], target.as_str());
    // Again: nothing left to redrive.
    let again = json(store, &as_str(&args(&[])));
    assert_eq!(again["already_redriven"], n, "{again}");
    assert_eq!(again["redriven"], 0);
    assert_eq!(cluster.read_all(&target, n).len(), n);
}

fn a_redrive_to_its_topic_is_handled_again_and_the_loop_guard_holds<B: Backend>(b: B, store: &str) {
    let (cluster, topic, group) = dead_letters(&b, 2);
    let boot = cluster.bootstrap().to_owned();
    let redrive = |extra: &[&str]| {
        let mut v = vec![
            "--bootstrap",
            boot.as_str(),
            "dead-letters",
            "redrive",
            group.as_str(),
        ];
        v.extend_from_slice(extra);
        json(store, &v)
    };
    // To the letters' own topic: their keys are freed, so the consumer handles them again
    // (they fail again: two new dead letters, each redriven once).
    let first = redrive(&["--max-redrives", "1"]);
    assert_eq!(first["redriven"], 2, "{first}");
    let consumer = Incarnation::launch(&b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(Devices)
            .unwrap()
    });
    consumer.wait_for("the redriven records handled again", |s| {
        s.dead_lettered == 2
    });
    consumer.caught_up();
    consumer.stop().unwrap();
    let listed = json(store, &["dead-letters", "list", &group]);
    assert_eq!(listed["matched"], 4, "{listed}");
    // The new letters' records were redriven once already: the loop guard leaves them.
    let second = redrive(&["--max-redrives", "1"]);
    assert_eq!(
        (
            second["already_redriven"].as_u64(),
            second["skipped_loop_guard"].as_u64()
        ),
        (Some(2), Some(2)),
        "{second}"
    );
    let forced = redrive(&["--max-redrives", "1", "--force"]);
    assert_eq!(forced["redriven"], 2, "{forced}");
    let records = cluster.read_all(&topic, 6);
    let counts: Vec<Option<&str>> = records[4..]
        .iter()
        .map(|r| r.header(REDRIVE_COUNT))
        .collect();
    assert_eq!(counts, [Some("2"), Some("2")], "redriven twice now");
}

/// The step the kill above may or may not land in, made on purpose: a letter whose record was
/// produced but whose mark still says pending (the redrive died between the two) is found on
/// the target and marked, not produced again.
fn a_letter_produced_before_its_mark_is_found_not_produced_again<B: Backend<S: Audited>>(
    b: B,
    store: &str,
) {
    let (cluster, topic, group) = dead_letters(&b, 2);
    let target = unique("redriven");
    cluster.create_named_topic(&target, 1);
    let id = format!("{group}/{topic}/0/0");
    let record = AuditRecord::new("a redrive that died", "dead-letters redrive", Value::Null);
    let pending = RedriveMark {
        topic: topic.clone(),
        partition: 0,
        offset: 0,
        done: false,
        target_topic: target.clone(),
        target_partition: 0,
        from_offset: 0,
        produced_offset: None,
        count: 1,
        audit_id: record.id.clone(),
        at_ms: 0,
    };
    b.inspect(async |s: &B::S| {
        s.put_redrive_mark(&group, &pending, &record, None)
            .await
            .unwrap()
    });
    cluster.send_raw(
        &target,
        0,
        &[(REDRIVE_OF, id.as_bytes()), (REDRIVE_COUNT, b"1")],
        Some(b"bad-0"),
    );
    let boot = cluster.bootstrap().to_owned();
    let done = json(
        store,
        &[
            "--bootstrap",
            &boot,
            "dead-letters",
            "redrive",
            &group,
            "--to-topic",
            &target,
        ],
    );
    assert_eq!(
        (
            done["found_after_interruption"].as_u64(),
            done["redriven"].as_u64()
        ),
        (Some(1), Some(1)),
        "{done}"
    );
    let records = cluster.read_all(&target, 2);
    let of: Vec<Option<&str>> = records.iter().map(|r| r.header(REDRIVE_OF)).collect();
    assert_eq!(
        of,
        [
            Some(id.as_str()),
            Some(format!("{group}/{topic}/0/1").as_str())
        ]
    );
    let marks = b.inspect(async |s: &B::S| s.redrive_marks(&group).await.unwrap());
    assert!(marks.iter().all(|m| m.done), "{marks:?}");
    assert_eq!(marks[0].produced_offset, Some(0), "found where it was");
}

/// Fails every record (permanently) until it is fixed, then adds the report's sequence.
struct Picky {
    fixed: bool,
}

impl<T: super::common::LedgerTx> Handler<T> for Picky {
    async fn handle(&self, record: &Record, tx: &mut T) -> Result<Outcome, HandlerError> {
        if !self.fixed {
            return Err(HandlerError::permanent("a bug, fixed in the next deploy"));
        }
        Devices.handle(record, tx).await
    }
}

/// A redriven record whose key was applied meanwhile is a duplicate: the redrive that freed
/// the key died before producing (its mark pending), the producer sent the record again and
/// the fixed consumer applied it, and the redrive run again produces the letter, which the
/// consumer counts as a duplicate.
fn a_redriven_record_applied_meanwhile_is_a_duplicate<B: Backend<S: Audited>>(b: B, store: &str) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    let payment = super::report("d", 7);
    cluster.send_keyed(&topic, 0, [("k0".to_owned(), payment.clone())]);
    let consume = |fixed: bool, what: &str, until: fn(&StatsSnapshot) -> bool| {
        let consumer = Incarnation::launch(&b, |store| {
            builder(&cluster, &group, &topic)
                .store(store)
                .build(Picky { fixed })
                .unwrap()
        });
        consumer.wait_for(what, until);
        consumer.caught_up();
        let stats = consumer.stats();
        consumer.stop().unwrap();
        stats
    };
    consume(false, "the dead letter", |s| s.dead_lettered == 1);
    let record = AuditRecord::new("a redrive that died", "dead-letters redrive", Value::Null);
    let pending = RedriveMark {
        topic: topic.clone(),
        partition: 0,
        offset: 0,
        done: false,
        target_topic: topic.clone(),
        target_partition: 0,
        from_offset: 1,
        produced_offset: None,
        count: 1,
        audit_id: record.id.clone(),
        at_ms: 0,
    };
    let free = idempotent_consumer::EntryKey::new(&group, "k0");
    b.inspect(async |s: &B::S| {
        s.put_redrive_mark(&group, &pending, &record, Some(&free))
            .await
            .unwrap()
    });
    // Meanwhile the producer sends the record again and the fixed consumer applies it.
    cluster.send_keyed(&topic, 0, [("k0".to_owned(), payment)]);
    consume(true, "the copy applied", |s| s.applied == 1);
    let boot = cluster.bootstrap().to_owned();
    let done = json(
        store,
        &["--bootstrap", &boot, "dead-letters", "redrive", &group],
    );
    assert_eq!(
        done["redriven"], 1,
        "not found on the topic, so produced: {done}"
    );
    let stats = consume(true, "the redriven record", |s| s.duplicates() == 1);
    assert_eq!(
        (stats.applied, stats.duplicates_repeated_key),
        (0, 1),
        "{stats:?}"
    );
    assert_eq!(b.balances()["d"], 7, "applied once");
}

on_both_stores!(
    a_redriven_record_applied_meanwhile_is_a_duplicate,
    a_killed_redrive_resumes_and_produces_each_letter_once,
    a_redrive_to_its_topic_is_handled_again_and_the_loop_guard_holds,
    a_letter_produced_before_its_mark_is_found_not_produced_again,
);
