//! Scale-out: 1, 2 and 3 instances of the runtime in one group on one PostgreSQL store, each
//! with a pool of its own as a process of its own would have, handling an I/O-bound workload
//! (a 2 ms asynchronous wait per 100 records of a partition, the handler's row deferred to the
//! batch's statement).

use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotent_consumer::{
    BatchStatement, Handler, HandlerError, Outcome, PgOptions, PgStore, PgTx, Record, Runtime,
    Stats,
};

use super::{PARTITIONS, Res, TOPIC};

/// Inserts one row per record, and waits 2 ms at every 100th offset of a partition: a service
/// that calls something slow once per batch of 100.
pub(super) struct Waiting {
    insert: BatchStatement<(Vec<u8>, Vec<u8>)>,
}

impl Waiting {
    pub(super) fn new() -> Self {
        Waiting {
            insert: BatchStatement::new(
                "INSERT INTO bench_effects (key, body) SELECT * FROM unnest($1::bytea[], $2::bytea[])",
            ),
        }
    }
}

impl Handler<PgTx> for Waiting {
    async fn handle(&self, record: &Record, tx: &mut PgTx) -> Result<Outcome, HandlerError> {
        if record.offset() % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let key = record.header("idempotency-key").unwrap_or_default();
        let body = record.payload().unwrap_or_default();
        tx.defer(&self.insert, (key.to_vec(), body.to_vec()));
        Ok(Outcome::none())
    }
}

/// Runs `instances` runtimes in the group `scale-<instances>` until they settled `records`
/// together; the time from the first record read by any to the last settled.
pub(super) fn scale_out(
    rt: &tokio::runtime::Runtime,
    bootstrap: &str,
    url: &str,
    instances: usize,
    records: usize,
) -> Res<Duration> {
    if instances as i32 > PARTITIONS {
        return Err(format!("{instances} instances for {PARTITIONS} partitions"));
    }
    let group = format!("scale-{instances}");
    rt.block_on(async {
        let mut stats: Vec<Arc<Stats>> = Vec::new();
        let mut stops = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..instances {
            let options = PgOptions {
                max_connections: 8,
                ..PgOptions::default()
            };
            let store = PgStore::connect_with(url, options)
                .await
                .map_err(|e| e.to_string())?;
            let runtime = Runtime::builder()
                .bootstrap_servers(bootstrap)
                .group_id(&group)
                .topics([TOPIC])
                .set("session.timeout.ms", "6000")
                .batch(100, Duration::from_millis(20))
                .store(store)
                .build(Waiting::new())
                .map_err(|e| e.to_string())?;
            stats.push(runtime.stats());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            tasks.push(tokio::spawn(runtime.run(async {
                let _ = stopped.await;
            })));
        }
        let elapsed = tokio::task::spawn_blocking(move || watch_all(&stats, records))
            .await
            .map_err(|e| e.to_string())?;
        for stop in stops {
            let _ = stop.send(());
        }
        for task in tasks {
            task.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
        elapsed
    })
}

/// From the first record any instance read until they settled `records` together.
fn watch_all(stats: &[Arc<Stats>], records: usize) -> Res<Duration> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut first: Option<Instant> = None;
    loop {
        let (mut read, mut settled) = (0, 0);
        for s in stats {
            let s = s.snapshot();
            read += s.records_read;
            settled += s.applied + s.duplicates() + s.dead_lettered + s.conflicts;
        }
        if read > 0 {
            first.get_or_insert_with(Instant::now);
        }
        if settled as usize >= records {
            return Ok(first.map_or(Duration::ZERO, |f| f.elapsed()));
        }
        if Instant::now() > deadline {
            return Err(format!("settled {settled} of {records}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
