//! The `shadows` scenario: the resolver under a kill storm. Device reports (a sequence number
//! per device) cross four partitions in a shuffled order, a tenth are resent (a producer's
//! retry) and a few claim an existing sequence under another key (a conflict); a consumer with
//! a sequence-guard resolver keeps each device's shadow and is killed with SIGKILL at random
//! moments, then runs to the end.
//!
//! The check reads the store: every report has its dedup entry (`lost`); none was applied or
//! settled twice (`doubled`); every report the resolver did not apply has exactly one
//! resolution record, and no applied one has a record saying otherwise (`unrecorded`); every
//! device's shadow and winner are its highest sequence and it was decided once per report
//! (`wrong`). It prints
//! `CHAOS scenario=shadows store=.. reports=.. kills=.. applied=.. not_applied=.. records=.. lost=.. doubled=.. unrecorded=.. wrong=..`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::time::Duration;

use idempotent_consumer::resolve::{
    Entities, Facts, Order, Policy, Resolution, ResolutionOutcome, Resolver,
};
use idempotent_consumer::testkit::{ConsumerProcess, serve_reporting};
use idempotent_consumer::{
    EntryKey, EntryStatus, Handler, HandlerError, Inspect, Outcome, PartitionId, PgOptions,
    PgStore, PgTx, Record, RocksStore, RocksTx, Transaction,
};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::{Flags, Harness, Lcg, Res, Role, StoreUnderTest, block_on, next_offsets, wait_until};

const PARTITIONS: i32 = 4;
const DEVICES: u64 = 50;

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Report {
    device: String,
    seq: u64,
    state: u64,
}

// ---------------------------------------------------------------------------------------------
// The consumer role.

/// Keeps `shadow/<device>` = the applied report's sequence, and logs every application and
/// every settlement by key, so a second one shows.
struct Shadows;

trait ShadowTx: Transaction {
    fn shadow(
        &mut self,
        device: &str,
        seq: u64,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
    fn log(
        &mut self,
        kind: &str,
        key: &str,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl ShadowTx for RocksTx {
    async fn shadow(&mut self, device: &str, seq: u64) -> Result<(), HandlerError> {
        self.put(format!("shadow/{device}"), seq.to_string());
        Ok(())
    }

    async fn log(&mut self, kind: &str, key: &str) -> Result<(), HandlerError> {
        let at = format!("log/{kind}/{key}");
        let n = self
            .get(&at)
            .map_err(HandlerError::retryable)?
            .map_or(0, |b| {
                String::from_utf8_lossy(&b).parse::<u64>().unwrap_or(0)
            });
        self.put(&at, (n + 1).to_string());
        Ok(())
    }
}

impl ShadowTx for PgTx {
    async fn shadow(&mut self, device: &str, seq: u64) -> Result<(), HandlerError> {
        sqlx::query(
            "INSERT INTO chaos_shadow (device, seq) VALUES ($1, $2) \
             ON CONFLICT (device) DO UPDATE SET seq = EXCLUDED.seq",
        )
        .bind(device)
        .bind(seq as i64)
        .execute(self.conn())
        .await
        .map(|_| ())
        .map_err(HandlerError::retryable)
    }

    async fn log(&mut self, kind: &str, key: &str) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO chaos_shadow_log (kind, key) VALUES ($1, $2)")
            .bind(kind)
            .bind(key)
            .execute(self.conn())
            .await
            .map(|_| ())
            .map_err(HandlerError::retryable)
    }
}

fn key_of(record: &Record) -> Result<String, HandlerError> {
    record
        .header("idempotency-key")
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .ok_or_else(|| HandlerError::permanent("no idempotency key"))
}

impl<T: ShadowTx> Handler<T> for Shadows {
    async fn handle(&self, record: &Record, tx: &mut T) -> Result<Outcome, HandlerError> {
        let r: Report = record.json()?;
        tx.shadow(&r.device, r.seq).await?;
        tx.log("applied", &key_of(record)?).await?;
        Ok(Outcome::none())
    }

    async fn on_superseded(
        &self,
        record: &Record,
        _: &Resolution,
        tx: &mut T,
    ) -> Result<(), HandlerError> {
        tx.log("settled", &key_of(record)?).await
    }
}

fn resolver() -> Resolver {
    Resolver::new(Policy::SequenceGuard { epochs: false }, |record| {
        let r: Report = record.json().map_err(|e| e.to_string())?;
        Ok(Some(Facts {
            entity: r.device,
            order: Order {
                sequence: Some(r.seq),
                ..Order::default()
            },
        }))
    })
}

/// The `shadow` role: a consumer with the resolver, until its positions reach `--until`.
pub(super) fn shadow(flags: &Flags) -> Res<()> {
    let Role {
        group,
        topic,
        until,
        rt,
        builder,
    } = Role::new(flags)?;
    let builder = builder
        .set("group.instance.id", format!("{group}-0"))
        .resolver(resolver());
    let pids: Vec<PartitionId> = (0..PARTITIONS)
        .map(|p| PartitionId::new(&group, &topic, p))
        .collect();
    let done = |positions: Vec<Option<i64>>| {
        positions
            .iter()
            .zip(&until)
            .all(|(p, end)| p.unwrap_or(0) >= *end)
    };
    let path = flags.need("path")?;
    match flags.need("store")?.as_str() {
        "rocksdb" => {
            let store = RocksStore::open(&path).map_err(|e| e.to_string())?;
            let runtime = builder
                .store(store.clone())
                .build(Shadows)
                .map_err(|e| e.to_string())?;
            rt.block_on(serve_reporting(runtime, move || {
                let (store, pids) = (store.clone(), pids.clone());
                async move { done(next_offsets(&store, &pids).await) }
            }))
            .map_err(|e| e.to_string())
        }
        "postgres" => rt.block_on(async {
            let store = PgStore::connect_with(&path, PgOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            sqlx::raw_sql(
                "CREATE TABLE IF NOT EXISTS chaos_shadow (device text PRIMARY KEY, seq bigint NOT NULL); \
                 CREATE TABLE IF NOT EXISTS chaos_shadow_log (kind text NOT NULL, key text NOT NULL)",
            )
            .execute(store.pool())
            .await
            .map_err(|e| e.to_string())?;
            let runtime = builder
                .store(store.clone())
                .build(Shadows)
                .map_err(|e| e.to_string())?;
            serve_reporting(runtime, move || {
                let (store, pids) = (store.clone(), pids.clone());
                async move { done(next_offsets(&store, &pids).await) }
            })
            .await
            .map_err(|e| e.to_string())
        }),
        other => Err(format!("unknown store {other:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The workload, the storm and the check.

/// The reports to produce, in order: (key, partition, report).
fn workload(reports: u64, seed: u64) -> Vec<(String, i32, Report)> {
    let mut rng = Lcg(seed);
    let mut next_seq = vec![0u64; DEVICES as usize];
    let mut firsts: Vec<(String, Report)> = Vec::new();
    let mut out = Vec::new();
    for i in 0..reports {
        let partition = rng.next(PARTITIONS as u64) as i32;
        let roll = rng.next(100);
        if roll < 10 && !firsts.is_empty() {
            // A producer's retry: an earlier report again, anywhere.
            let (key, r) = firsts[rng.next(firsts.len() as u64) as usize].clone();
            out.push((key, partition, r));
            continue;
        }
        let d = rng.next(DEVICES);
        let seq = if roll < 12 && next_seq[d as usize] > 0 {
            // Another report claiming a sequence already used: a conflict (or stale).
            1 + rng.next(next_seq[d as usize])
        } else {
            next_seq[d as usize] += 1;
            // Reports a device sends close together may overtake each other: a sequence a
            // little ahead now and then.
            next_seq[d as usize] + rng.next(3)
        };
        let r = Report {
            device: format!("dev{d}"),
            seq,
            state: i,
        };
        let key = format!("rep-{i}");
        firsts.push((key.clone(), r.clone()));
        out.push((key, partition, r));
    }
    out
}

/// What the store holds after the storm.
struct Held {
    /// Per report key: its entry's status.
    entries: HashMap<String, Option<EntryStatus>>,
    /// Per report key: how many times it was applied and settled.
    applied: HashMap<String, u64>,
    settled: HashMap<String, u64>,
    /// Per device: the shadow's sequence, the winner's sequence and key, decisions, records.
    shadows: HashMap<String, u64>,
    winners: HashMap<String, (u64, u64)>,
    records: Vec<Resolution>,
}

fn read_held(kind: &str, path: &str, group: &str, keys: &[String]) -> Res<Held> {
    async fn common<S: Inspect + Entities + Sync>(
        store: &S,
        group: &str,
        keys: &[String],
        held: &mut Held,
    ) -> Res<()> {
        for key in keys {
            let entry = store
                .entry(&EntryKey::new(group, key.as_str()))
                .await
                .map_err(|e| e.to_string())?;
            held.entries.insert(key.clone(), entry.map(|e| e.status));
        }
        for d in 0..DEVICES {
            let device = format!("dev{d}");
            let why = store
                .explain(group, &device, usize::MAX)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(state) = why.state {
                let seq = state.winner.and_then(|w| w.order.sequence).unwrap_or(0);
                held.winners.insert(device, (seq, state.decisions));
            }
            held.records.extend(why.resolutions);
        }
        Ok(())
    }
    let mut held = Held {
        entries: HashMap::new(),
        applied: HashMap::new(),
        settled: HashMap::new(),
        shadows: HashMap::new(),
        winners: HashMap::new(),
        records: Vec::new(),
    };
    let count = |v: &[u8]| String::from_utf8_lossy(v).parse::<u64>().unwrap_or(0);
    if kind == "rocksdb" {
        let store = RocksStore::open(path).map_err(|e| e.to_string())?;
        for (k, v) in store.scan_prefix(b"shadow/").map_err(|e| e.to_string())? {
            let device = String::from_utf8_lossy(&k["shadow/".len()..]).into_owned();
            held.shadows.insert(device, count(&v));
        }
        for (kind, map) in [
            ("applied", &mut held.applied),
            ("settled", &mut held.settled),
        ] {
            let prefix = format!("log/{kind}/");
            for (k, v) in store
                .scan_prefix(prefix.as_bytes())
                .map_err(|e| e.to_string())?
            {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                map.insert(key, count(&v));
            }
        }
        block_on(common(&store, group, keys, &mut held))?;
        return Ok(held);
    }
    block_on(async {
        let store = PgStore::connect_with(path, PgOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let shadows: Vec<(String, i64)> = sqlx::query_as("SELECT device, seq FROM chaos_shadow")
            .fetch_all(store.pool())
            .await
            .map_err(|e| e.to_string())?;
        held.shadows = shadows.into_iter().map(|(d, s)| (d, s as u64)).collect();
        let log: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT kind, key, count(*) FROM chaos_shadow_log GROUP BY kind, key")
                .fetch_all(store.pool())
                .await
                .map_err(|e| e.to_string())?;
        for (kind, key, n) in log {
            let map = if kind == "applied" {
                &mut held.applied
            } else {
                &mut held.settled
            };
            map.insert(key, n as u64);
        }
        common(&store, group, keys, &mut held).await?;
        store.pool().close().await;
        Ok(held)
    })
}

impl Harness {
    pub(super) fn shadows(&self, kind: &str, n: u64) -> Res<bool> {
        let topic = format!("chaos-shadows-{n}-{}", std::process::id());
        self.command(&format!("topic {topic} {PARTITIONS}"))?;
        self.command(&format!("topic {topic}.dlq 1"))?;
        let group = format!("group-{topic}");
        let store = StoreUnderTest::create(kind)?;
        let bootstrap = self.bootstrap();
        let reports = workload((self.records / 10).max(200), self.seed * 17 + n);
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "60000")
            .create()
            .map_err(|e| e.to_string())?;
        let mut ends = [0i64; PARTITIONS as usize];
        let start = |until: &str| -> Res<ConsumerProcess> {
            let mut command = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
            command
                .arg("shadow")
                .args(["--store", kind, "--path", &store.path])
                .args(["--bootstrap", &bootstrap, "--group", &group])
                .args(["--topic", &topic, "--until", until]);
            ConsumerProcess::start(command)
        };
        let mut rng = Lcg(self.seed * 13 + n);
        let rounds = self.kills.max(1);
        let chunk = reports.len().div_ceil(rounds as usize);
        let (mut kills, mut applied, mut not_applied) = (0u64, 0u64, 0u64);
        for part in reports.chunks(chunk) {
            for (key, partition, r) in part {
                let payload = serde_json::to_vec(r).map_err(|e| e.to_string())?;
                let headers = OwnedHeaders::new().insert(Header {
                    key: "idempotency-key",
                    value: Some(key.as_bytes()),
                });
                producer
                    .send(
                        BaseRecord::<(), [u8]>::to(&topic)
                            .partition(*partition)
                            .payload(&payload)
                            .headers(headers),
                    )
                    .map_err(|(e, _)| e.to_string())?;
                ends[*partition as usize] += 1;
                producer.poll(Duration::ZERO);
            }
            producer
                .flush(Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            // Never done by itself: it runs until killed.
            let never = vec![i64::MAX.to_string(); PARTITIONS as usize].join(",");
            let instance = start(&never)?;
            wait_until(Duration::from_secs(60), || {
                instance.stat("applied") + instance.stat("not_applied") > 0
            });
            std::thread::sleep(Duration::from_millis(rng.next(400)));
            let last = instance.kill();
            applied += last.get("applied").copied().unwrap_or(0);
            not_applied += last.get("not_applied").copied().unwrap_or(0);
            kills += 1;
        }
        let until: Vec<String> = ends.iter().map(i64::to_string).collect();
        let mut finished = false;
        for _ in 0..5 {
            let mut last = start(&until.join(","))?;
            let status = last
                .wait(Duration::from_secs(300))?
                .ok_or("the last consumer did not reach the end in 300 s")?;
            let stats = last.settled_stats();
            applied += stats.get("applied").copied().unwrap_or(0);
            not_applied += stats.get("not_applied").copied().unwrap_or(0);
            if status.success() {
                finished = true;
                break;
            }
            eprintln!("chaos: shadows/{kind}: the last consumer exited with {status}");
        }
        if !finished {
            return Err("the last consumer kept failing".into());
        }
        let keys: Vec<String> = reports
            .iter()
            .map(|(k, _, _)| k.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let held = read_held(kind, &store.path, &group, &keys)?;
        Ok(check(kind, &reports, &held, kills, applied, not_applied))
    }
}

fn check(
    kind: &str,
    reports: &[(String, i32, Report)],
    held: &Held,
    kills: u64,
    applied: u64,
    not_applied: u64,
) -> bool {
    let mut by_device: BTreeMap<&str, (u64, HashSet<&str>)> = BTreeMap::new();
    for (key, _, r) in reports {
        let d = by_device.entry(&r.device).or_default();
        d.0 = d.0.max(r.seq);
        d.1.insert(key);
    }
    let mut records_of: HashMap<&str, Vec<&Resolution>> = HashMap::new();
    for r in &held.records {
        records_of.entry(&r.candidate.key).or_default().push(r);
    }
    let (mut lost, mut doubled, mut unrecorded, mut wrong) = (0u64, 0u64, 0u64, 0u64);
    for (key, status) in &held.entries {
        let a = held.applied.get(key).copied().unwrap_or(0);
        let s = held.settled.get(key).copied().unwrap_or(0);
        let records = records_of.get(key.as_str()).map_or(&[][..], Vec::as_slice);
        let not_applied_records = records
            .iter()
            .filter(|r| r.outcome != ResolutionOutcome::Applied)
            .count();
        match status {
            None => lost += 1,
            Some(_) if a + s > 1 => doubled += 1,
            Some(EntryStatus::Completed) if a == 1 && not_applied_records == 0 => {}
            Some(EntryStatus::Resolved) if s == 1 && not_applied_records == 1 => {}
            Some(status) => {
                eprintln!(
                    "chaos: shadows/{kind}: {key} is {status:?}, applied {a}, settled {s}, records {records:?}"
                );
                unrecorded += 1;
            }
        }
    }
    for (device, (max, keys)) in &by_device {
        let shadow = held.shadows.get(*device).copied();
        let winner = held.winners.get(*device).copied();
        if shadow != Some(*max) || winner != Some((*max, keys.len() as u64)) {
            eprintln!(
                "chaos: shadows/{kind}: {device}: shadow {shadow:?}, winner and decisions {winner:?}, expected seq {max} and {} decisions",
                keys.len()
            );
            wrong += 1;
        }
    }
    let records = held.records.len();
    println!(
        "CHAOS scenario=shadows store={kind} reports={} kills={kills} applied={applied} not_applied={not_applied} records={records} lost={lost} doubled={doubled} unrecorded={unrecorded} wrong={wrong}",
        reports.len()
    );
    lost == 0 && doubled == 0 && unrecorded == 0 && wrong == 0
}
