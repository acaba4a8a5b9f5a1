//! The commands that change a store: a rewind refused while the group runs and audited once
//! it goes through, a bounded purge of expired entries with its counts in the audit log.

use serde_json::Value;

use super::common::backend::Backend;
use super::common::{Cluster, Incarnation, builder, unique};
use super::{Devices, idc, json, refused, report, seed};
use idempotent_consumer::PartitionId;
use idempotent_consumer::resolve::Entities;

/// Runs `idc` and returns its exit code and standard error.
fn attempt(store: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = idc(store, args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn a_rewind_waits_for_an_empty_group_and_is_audited<B: Backend<S: Entities + Sync>>(
    b: B,
    store: &str,
) {
    let s = seed(b);
    let (g, t) = (s.group.as_str(), s.topic.as_str());
    let boot = s.cluster.bootstrap().to_owned();
    let rewind = [
        "--bootstrap",
        &boot,
        "--who",
        "ops-test",
        "positions",
        "rewind",
        g,
        t,
        "0",
        "--to-offset",
        "0",
    ];

    // A consumer of the group runs: refused (the broker lists a member; RocksDB's directory is
    // also held by the service), and the position stays.
    let partition = PartitionId::new(g, t, 0);
    let open = s.b.shared();
    let consumer = Incarnation::launch_with(&*open, |store| {
        builder(&s.cluster, g, t)
            .store(store)
            .build(Devices)
            .unwrap()
    });
    consumer.wait_assigned(2);
    // librdkafka's mock cluster cannot list a group's members: what cannot be asked is no
    // answer, and the rewind is refused too.
    let refusals = ["live member", "open in another process", "cannot list"];
    let (code, stderr) = attempt(store, &rewind);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(refusals.iter().any(|r| stderr.contains(r)), "{stderr}");
    consumer.stop().unwrap();
    drop(open);
    assert_eq!(s.b.next_offset(&partition), Some(5));

    // Without the broker to ask: refused unless forced.
    refused(
        store,
        &["positions", "rewind", g, t, "0", "--to-offset", "0"],
        "give --bootstrap",
    );
    // Once the group is stopped: a broker that lists members lets it through; the mock cannot
    // tell, so it is refused there and forced.
    let out = idc(store, &[&rewind[..], &["--json"]].concat());
    let done: Value = if out.status.success() {
        serde_json::from_slice(&out.stdout).unwrap()
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot list"), "{stderr}");
        json(store, &[&rewind[..], &["--force"]].concat())
    };
    assert_eq!(
        (done["from"].as_i64(), done["to"].as_i64()),
        (Some(5), Some(0))
    );
    assert_eq!(s.b.next_offset(&partition), Some(0));
    let log = json(store, &["audit", "list"]);
    let record = &log["records"][0];
    assert_eq!(record["id"], done["audit_id"]);
    assert_eq!(record["who"], "ops-test");
    assert_eq!(record["command"], "positions rewind");
    assert_eq!(record["details"]["to_offset"], 0);
    assert_eq!(record["counts"]["from"], 5);
    // By time: no record at or after a time a day ahead, so the end of the log (the mock
    // cluster answers offsets by time no better than that).
    let tomorrow = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 86_400_000)
        .to_string();
    let by_time = json(
        store,
        &[
            "--bootstrap",
            &boot,
            "positions",
            "rewind",
            g,
            t,
            "1",
            "--to-time",
            &tomorrow,
            "--force",
        ],
    );
    assert_eq!(by_time["to"], 2, "{by_time}");
    assert_eq!(
        json(store, &["audit", "list"])["records"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The service resumes from the new positions: everything is a redelivery, nothing doubles.
    let before = s.b.balances();
    let again = Incarnation::launch(&s.b, |store| {
        builder(&s.cluster, g, t)
            .store(store)
            .build(Devices)
            .unwrap()
    });
    // Partition 0 again from offset 0 (partition 1 was moved to its end): five duplicates.
    again.wait_for("the replay", |st| st.duplicates() == 5);
    again.caught_up();
    again.stop().unwrap();
    assert_eq!(s.b.balances(), before);
}

fn a_purge_of_expired_entries_is_bounded_and_audited<B: Backend>(b: B, store: &str) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    let records: Vec<(String, Vec<u8>)> =
        (0..7).map(|i| (format!("k{i}"), report("d", i))).collect();
    cluster.send_keyed(&topic, 0, records);
    let consumer = Incarnation::launch(&b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .retention(std::time::Duration::from_millis(1))
            .purge(std::time::Duration::from_secs(3600), 1_000)
            .build(Devices)
            .unwrap()
    });
    consumer.wait_for("applied", |s| s.applied == 7);
    consumer.caught_up();
    consumer.stop().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    refused(store, &["entries", "purge", &group], "--expired");
    let done = json(
        store,
        &[
            "--who",
            "ops-test",
            "entries",
            "purge",
            &group,
            "--expired",
            "--batch",
            "3",
        ],
    );
    assert_eq!(done["purged"], 7, "{done}");
    assert_eq!(done["batches"], 3, "3 + 3 + 1");
    assert_eq!(
        json(store, &["entries", "get", &group, "k0"])["found"],
        false
    );
    let record = &json(store, &["audit", "list"])["records"][0];
    assert_eq!(record["id"], done["audit_id"]);
    assert_eq!(record["command"], "entries purge");
    assert_eq!(
        record["counts"]["purged"], 7,
        "the counts of every batch: {record}"
    );
    assert_eq!(record["details"]["batch"], 3);
    assert_eq!(b.balances()["d"], 21, "the effects stay");
}

/// `positions replay --i-know`: the records first seen in the range are applied again (their
/// effects twice, on purpose), the others after it are redeliveries; refused without the flag.
fn a_replay_applies_a_range_again_on_purpose<B: Backend>(b: B, store: &str) {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    let records: Vec<(String, Vec<u8>)> =
        (1..=5).map(|i| (format!("k{i}"), report("d", i))).collect();
    cluster.send_keyed(&topic, 0, records);
    let run = |until: u64| {
        let consumer = Incarnation::launch(&b, |store| {
            builder(&cluster, &group, &topic)
                .store(store)
                .build(Devices)
                .unwrap()
        });
        consumer.wait_for("settled", |s| s.applied + s.duplicates() == until);
        consumer.caught_up();
        let stats = consumer.stats();
        consumer.stop().unwrap();
        stats
    };
    run(5);
    assert_eq!(b.balances()["d"], 15);
    let replay = [
        "positions",
        "replay",
        &group,
        &topic,
        "0",
        "--from",
        "1",
        "--to",
        "3",
    ];
    refused(store, &replay, "--i-know");
    refused(
        store,
        &[&replay[..], &["--i-know"]].concat(),
        "give --bootstrap",
    );
    let done = json(
        store,
        &[&replay[..], &["--i-know", "--force", "--who", "ops-test"]].concat(),
    );
    assert_eq!(
        (
            done["released"].as_u64(),
            done["previous_position"].as_i64()
        ),
        (Some(2), Some(5))
    );
    let record = &json(store, &["audit", "list"])["records"][0];
    assert_eq!(record["command"], "positions replay");
    assert_eq!(record["counts"]["released"], 2);
    assert_eq!(
        (
            record["details"]["from"].as_i64(),
            record["details"]["to"].as_i64()
        ),
        (Some(1), Some(3))
    );
    // Offsets 1 and 2 (seq 2 and 3) applied again, 3 and 4 redeliveries.
    let stats = run(4);
    assert_eq!((stats.applied, stats.duplicates()), (2, 2), "{stats:?}");
    assert_eq!(b.balances()["d"], 15 + 2 + 3);
}

on_both_stores!(
    a_replay_applies_a_range_again_on_purpose,
    a_rewind_waits_for_an_empty_group_and_is_audited,
    a_purge_of_expired_entries_is_bounded_and_audited,
);
