//! The operations tool `idc`, run as a process against seeded stores: every command on both
//! stores with its `--json` output parsed and compared with what the store itself says, and bad
//! input refused with exit code 2, nothing written.

#[path = "../common/mod.rs"]
mod common;

#[macro_use]
mod stores {
    /// Runs each of these tests once on RocksDB (a temporary directory) and once on PostgreSQL
    /// (a database of its own), as `rocksdb::<name>` and `postgres::<name>`.
    macro_rules! on_both_stores {
        ($($name:ident),* $(,)?) => {
            mod rocksdb {
                $(
                    #[test]
                    fn $name() {
                        let b = crate::common::backend::Rocks::new();
                        let store = b.dir.path().display().to_string();
                        super::$name(b, &store);
                    }
                )*
            }

            mod postgres {
                $(
                    #[test]
                    fn $name() {
                        let b = crate::common::backend::Postgres::new();
                        let store = b.url().to_owned();
                        super::$name(b, &store);
                    }
                )*
            }
        };
    }
}

mod change;
mod redrive;

use std::process::Output;

use common::backend::{Backend, Postgres, Rocks};
use common::{Cluster, Incarnation, LedgerTx, builder, unique};
use idempotent_consumer::resolve::{Entities, Facts, Order, Policy, Resolver};
use idempotent_consumer::{EntryKey, Handler, HandlerError, Inspect, Outcome, PartitionId, Record};
use serde_json::Value;

#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    device: String,
    seq: u64,
}

/// Adds each report's sequence to its device's balance.
pub(crate) struct Devices;

impl<T: LedgerTx> Handler<T> for Devices {
    async fn handle(&self, record: &Record, tx: &mut T) -> Result<Outcome, HandlerError> {
        let r: Report = record.json()?;
        tx.add(&r.device, r.seq as i64).await?;
        Ok(Outcome::bytes(format!("seq {}", r.seq)))
    }
}

pub(crate) fn report(device: &str, seq: u64) -> Vec<u8> {
    serde_json::to_vec(&Report {
        device: device.into(),
        seq,
    })
    .unwrap()
}

/// A store seeded by a consumer with a resolver: reports of two devices on two partitions (one
/// stale), a repeat, a conflict (the key again with another payload) and an undecodable record.
/// Partition 0: r1, r3, r2 (stale), r1 (repeat), r1 (conflict); partition 1: b1, bad.
pub(crate) struct Seeded<B> {
    pub(crate) b: B,
    pub(crate) cluster: Cluster,
    pub(crate) topic: String,
    pub(crate) group: String,
}

pub(crate) fn seed<B: Backend<S: Entities + Sync>>(b: B) -> Seeded<B> {
    let cluster = Cluster::start();
    let topic = cluster.create_topic(2);
    let group = unique("group");
    cluster.send_keyed(
        &topic,
        0,
        [
            ("r1".to_owned(), report("dev-a", 1)),
            ("r3".to_owned(), report("dev-a", 3)),
            ("r2".to_owned(), report("dev-a", 2)),
            ("r1".to_owned(), report("dev-a", 1)),
            ("r1".to_owned(), report("dev-a", 9)),
        ],
    );
    cluster.send_keyed(
        &topic,
        1,
        [
            ("b1".to_owned(), report("dev-b", 1)),
            ("bad".to_owned(), b"{not json".to_vec()),
        ],
    );
    let resolver = Resolver::new(Policy::SequenceGuard { epochs: false }, |record| {
        let r: Report = record.json().map_err(|e| e.to_string())?;
        Ok(Some(Facts {
            entity: r.device,
            order: Order {
                sequence: Some(r.seq),
                ..Order::default()
            },
        }))
    });
    let consumer = Incarnation::launch(&b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .resolver(resolver)
            .build(Devices)
            .unwrap()
    });
    consumer.wait_for("everything settled", |s| {
        s.resolved_applied + s.resolved_stale + s.duplicates() + s.dead_lettered == 7
    });
    consumer.caught_up();
    consumer.stop().unwrap();
    Seeded {
        b,
        cluster,
        topic,
        group,
    }
}

/// Runs `idc --store <store> <args>`.
pub(crate) fn idc(store: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_idc"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("IDC_STORE")
        .env_remove("KAFKA_BOOTSTRAP_SERVERS")
        .output()
        .expect("running idc")
}

/// The JSON document of a successful `idc ... --json`.
pub(crate) fn json(store: &str, args: &[&str]) -> Value {
    let mut with = args.to_vec();
    with.push("--json");
    let out = idc(store, &with);
    assert!(
        out.status.success(),
        "idc {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("idc's --json output parses")
}

/// Exit code 2 and a message on standard error that says `says`.
pub(crate) fn refused(store: &str, args: &[&str], says: &str) -> String {
    let out = idc(store, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "idc {args:?}: {stderr}");
    assert!(stderr.contains(says), "idc {args:?} said: {stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout when refused");
    stderr
}

fn every_command_answers_what_the_store_says<B: Backend<S: Entities + Sync>>(b: B, store: &str) {
    let s = seed(b);
    let (g, t) = (s.group.as_str(), s.topic.as_str());

    // entries get: the entry, and the conflict recorded for the key.
    let doc = json(store, &["entries", "get", g, "r1"]);
    let stored =
        s.b.inspect(async |st: &B::S| st.entry(&EntryKey::new(g, "r1")).await.unwrap())
            .unwrap();
    assert_eq!(doc["found"], true);
    assert_eq!(doc["entry"]["status"], stored.status.as_str());
    assert_eq!(doc["entry"]["offset"], stored.offset);
    assert_eq!(doc["entry"]["partition"], stored.partition);
    assert_eq!(doc["entry"]["created_at_ms"], stored.created_at_ms);
    assert_eq!(doc["entry"]["outcome"]["utf8"], "seq 1");
    assert_eq!(doc["conflicts"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(doc["conflicts"][0]["offset"], 4);
    let stale = json(store, &["entries", "get", g, "r2"]);
    assert_eq!(stale["entry"]["status"], "resolved", "{stale}");
    let none = json(store, &["entries", "get", g, "never-sent"]);
    assert_eq!(none["found"], false);

    // entries count.
    let count = json(store, &["entries", "count"]);
    assert!(count["entries"].as_u64().unwrap() >= 5, "{count}");

    // positions show, with the broker's side.
    let doc = json(
        store,
        &["--bootstrap", s.cluster.bootstrap(), "positions", "show", g],
    );
    let partitions = doc["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{doc}");
    for (p, expected_end) in partitions.iter().zip([5, 2]) {
        let pid = PartitionId::new(g, t, p["partition"].as_i64().unwrap() as i32);
        let position = s.b.position(&pid).unwrap();
        assert_eq!(p["next_offset"], expected_end);
        assert_eq!(p["next_offset"], position.next_offset.unwrap());
        assert_eq!(p["epoch"], position.epoch);
        assert_eq!(p["high_watermark"], expected_end);
        assert_eq!(p["committed_offset"], expected_end);
        assert_eq!(p["lag"], 0);
    }

    // dead-letters list and show.
    let all = json(store, &["dead-letters", "list", g]);
    assert_eq!(all["matched"], 2, "{all}");
    let conflicts = json(store, &["dead-letters", "list", g, "--reason", "conflict"]);
    assert_eq!(conflicts["matched"], 1);
    assert_eq!(conflicts["dead_letters"][0]["key"], "r1");
    let on_1 = json(store, &["dead-letters", "list", g, "--partition", "1"]);
    assert_eq!(on_1["dead_letters"][0]["reason"], "permanent");
    let letter = json(store, &["dead-letters", "show", g, t, "1", "1"]);
    assert_eq!(letter["payload"]["utf8"], "{not json");
    assert_eq!(letter["key"], "bad");
    let names: Vec<&str> = letter["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"idempotency-key"), "{letter}");

    // entities explain.
    let doc = json(store, &["entities", "explain", g, "dev-a"]);
    let why =
        s.b.inspect(async |st: &B::S| st.explain(g, "dev-a", 20).await.unwrap());
    assert_eq!(doc, serde_json::to_value(&why).unwrap());
    assert_eq!(doc["state"]["winner"]["key"], "r3");
    assert_eq!(doc["resolutions"][0]["outcome"], "stale");

    // The options may follow the command, as an operator types them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idc"))
        .args(["positions", "show", g, "--bootstrap", s.cluster.bootstrap()])
        .args(["--json", "--store", store])
        .env_remove("IDC_STORE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["partitions"][0]["lag"], 0, "{after}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idc"))
        .args(["entries", "count"])
        .env_remove("IDC_STORE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no store given");
    assert!(String::from_utf8_lossy(&out.stderr).contains("give the store"));

    // The same for people: tables.
    let out = idc(store, &["positions", "show", g]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("store next offset"),
        "{text}"
    );
    let out = idc(store, &["entities", "explain", g, "dev-a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("winner r3") && text.contains("stale"),
        "{text}"
    );

    // Bad input: exit 2, a clear message, nothing written.
    refused(
        store,
        &["entries", "get", "no-such-group", "r1"],
        "unknown group",
    );
    refused(store, &["entries", "get", g, ""], "cannot be empty");
    if store.starts_with("postgres") {
        // Over what the store's index holds.
        refused(
            store,
            &["entries", "get", g, &"k".repeat(3_000)],
            "over the",
        );
    }
    refused(
        store,
        &["dead-letters", "list", g, "--reason", "sad"],
        "unknown reason",
    );
    refused(
        store,
        &["dead-letters", "show", g, t, "0", "99"],
        "no dead letter",
    );
    refused(store, &["entities", "explain", g, ""], "empty entity");
    refused(store, &["entries", "frobnicate"], "unrecognized subcommand");
}

#[test]
fn a_running_service_keeps_its_directory_and_idc_reads_it() {
    let b = Rocks::new();
    let cluster = Cluster::start();
    let topic = cluster.create_topic(1);
    let group = unique("group");
    cluster.send_keyed(&topic, 0, [("k".to_owned(), report("d", 1))]);
    let consumer = Incarnation::launch(&b, |store| {
        builder(&cluster, &group, &topic)
            .store(store)
            .build(Devices)
            .unwrap()
    });
    consumer.wait_for("applied", |s| s.applied == 1);
    consumer.caught_up();
    // The service holds the directory's lock; idc reads beside it.
    let store = b.dir.path().display().to_string();
    let doc = json(&store, &["positions", "show", &group]);
    assert_eq!(doc["partitions"][0]["next_offset"], 1);
    consumer.stop().unwrap();
}

#[test]
fn rocksdb_stores_idc_cannot_read_are_refused_and_left_alone() {
    let missing = tempfile::tempdir().unwrap();
    let path = missing.path().join("nothing-here");
    let store = path.display().to_string();
    refused(&store, &["entries", "count"], "holds no RocksDB store");
    assert!(!path.exists(), "idc created the directory");
    // A RocksDB database of another layout (only the default family).
    let foreign = tempfile::tempdir().unwrap();
    drop(::rocksdb::DB::open_default(foreign.path()).unwrap());
    let before = std::fs::read_dir(foreign.path()).unwrap().count();
    refused(
        &foreign.path().display().to_string(),
        &["entries", "count"],
        "of another version",
    );
    assert_eq!(std::fs::read_dir(foreign.path()).unwrap().count(), before);
    refused(
        "ftp://somewhere/store",
        &["entries", "count"],
        "unknown store",
    );
}

#[test]
fn postgres_stores_idc_cannot_read_are_refused_and_left_alone() {
    let b = Postgres::new();
    let url = b.url().to_owned();
    // No store yet (a fresh database): refused, and no table made.
    refused(&url, &["entries", "count"], "holds no store");
    assert_eq!(
        b.scalar(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'idc_%'"
        ),
        Some(0)
    );
    // A store of a newer version.
    // A store made (and migrated) by a service, then of a newer version.
    b.inspect(async |_: &idempotent_consumer::PgStore| ());
    b.execute(
        "INSERT INTO idc_migrations (version, description, success, checksum, execution_time) \
         VALUES (99, 'from the future', true, '\\x00', 0)",
    );
    refused(&url, &["entries", "count"], "newer than this version");
    // Malformed URLs and secrets: the password never shows.
    let stderr = refused(
        "postgres://app:hunter2@[::1",
        &["entries", "count"],
        "invalid PostgreSQL URL",
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let out = idc(
        "postgres://app:hunter2@127.0.0.1:1/db",
        &["entries", "count"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an unreachable server is not bad input: {stderr}"
    );
    assert!(
        !stderr.contains("hunter2") && stderr.contains("app:***@"),
        "{stderr}"
    );
    refused(
        &url,
        &["--table-prefix", "Bad-Prefix", "entries", "count"],
        "table prefix",
    );
}

on_both_stores!(every_command_answers_what_the_store_says,);
