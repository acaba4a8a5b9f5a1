//! # idempotent-consumer
//!
//! A Kafka consumer runtime in which a record's side effects, its dedup entry and the partition's
//! position are committed in ONE atomic write. A redelivered record, or a second record with the
//! same idempotency key, is a no-op that is counted and traced.
//!
//! ## The guarantee
//!
//! > For every record, the handler's side effects written through the store, the record's dedup
//! > entry and the consumer's position are committed in one atomic transaction. A redelivered
//! > record, or a second record with the same idempotency key, is a no-op that is counted and
//! > traced.
//!
//! Effects that cannot join the transaction (an HTTP call, an e-mail) run **at least once**:
//! pass the record's idempotency key downstream so the other side can deduplicate them.
//!
//! ## A handler
//!
//! A handler receives the [`Record`] and the store's open transaction, writes its effects
//! through it, and returns an [`Outcome`] (bytes kept with the dedup entry, handed to
//! [`Handler::on_duplicate`] when the key comes back) or a classified [`HandlerError`]:
//!
//! ```no_run
//! use idempotent_consumer::{Handler, HandlerError, Outcome, Record, RocksStore, RocksTx, Runtime};
//!
//! #[derive(serde::Deserialize)]
//! struct Payment { account: String, amount: i64 }
//!
//! struct Ledger;
//!
//! impl Handler<RocksTx> for Ledger {
//!     async fn handle(&self, record: &Record, tx: &mut RocksTx) -> Result<Outcome, HandlerError> {
//!         let p: Payment = record.json()?; // undecodable: dead-lettered with serde's message
//!         let key = format!("balance/{}", p.account);
//!         let old = tx.get(&key).map_err(HandlerError::retryable)?;
//!         let balance = old.map_or(0, |b| String::from_utf8_lossy(&b).parse().unwrap_or(0));
//!         tx.put(&key, (balance + p.amount).to_string());
//!         Ok(Outcome::bytes((balance + p.amount).to_string()))
//!     }
//! }
//!
//! # async fn run() -> idempotent_consumer::Result<()> {
//! Runtime::builder()
//!     .bootstrap_servers("localhost:9092")
//!     .group_id("ledger")
//!     .topics(["payments"])
//!     .store(RocksStore::open("/var/lib/ledger")?)
//!     .build(Ledger)?
//!     .run(async { tokio::signal::ctrl_c().await.ok(); })
//!     .await
//! # }
//! ```
//!
//! ## How a record is processed
//!
//! 1. **Identity** ([`Identity`]): the idempotency key comes from the `idempotency-key` header by
//!    default, or the record key, a function, or a payload hash; records without one are
//!    dead-lettered or keyed by topic/partition/offset ([`MissingKey`]). Keys are scoped by the
//!    consumer group and an optional tenant. A SHA-256 fingerprint of the payload is kept with
//!    the key: the same key with another payload is a **conflict** ([`ConflictPolicy`]), never a
//!    duplicate.
//! 2. **Claim** (`runtime/partition/decide.rs`, as are steps 1 and 3 for each record; the batch
//!    loop around them is `runtime/partition.rs`): the key is claimed in the batch's
//!    transaction. A key with a live entry is a
//!    duplicate (cause: redelivery or repeated key); a key in flight in another partition's
//!    batch waits for that batch to commit.
//! 3. **Handle**: the handler runs after a savepoint. On error the record's writes are rolled
//!    back; retryable errors are retried with backoff ([`RetryPolicy`]), permanent ones are kept
//!    as [`DeadLetter`]s, fatal ones stop the runtime before the record.
//! 4. **Commit** (`runtime/commit.rs`, the whole protocol in one function): deferred writes
//!    first, then the batch's dead letters produced and acknowledged, then the batch's effects,
//!    entries, dead letters and the partition's next offset go to the store in one write,
//!    checked against the partition's epoch (a stale owner is [`Error::Fenced`]); only then is
//!    the offset committed to Kafka.
//!
//! What a store must keep for this is the contract of [`Store`] and [`Transaction`], checked
//! for every store by `tests/store_contract.rs`; [`Inspect`] reads a store from outside.
//!
//! On assignment the runtime seeks to the position **stored in the store**, not Kafka's committed
//! offset; a partition the store has no position for starts where [`StartPosition`] says (by
//! default the beginning of the log: the store applied nothing of it). [`Runtime::progress`]
//! tells how far the runtime has got ([`Progress::caught_up`]). Dedup entries expire after the retention (default seven days) and are purged in
//! bounded batches; an entry inside its window is never purged.
//!
//! ## Stores
//!
//! - [`RocksStore`] (feature `rocksdb`, default): embedded, one process. Its state is local to
//!   the machine: if a partition moves to another instance, that instance has no entries for it.
//!   Run one instance per store directory, and keep each instance's partitions with it (static
//!   assignment): a partition whose latest Kafka commit came from another store is **refused**
//!   ([`Error::StalePartition`], [`StalePartitionPolicy`]), never handled from stale state.
//! - `PgStore` (feature `postgres`): shared by every instance of a group. The handler gets
//!   `PgTx` and runs its own SQL on `tx.conn()`, or defers rows with `tx.defer` to a
//!   `BatchStatement` that writes the whole batch's rows in one round trip; keys are claimed
//!   first as uncommitted rows, so a duplicate arriving at another instance waits on the primary key and then sees the entry. A
//!   transient failure (lost connection, deadlock, also one raised by the handler's own SQL)
//!   rolls the batch back and it is tried again, for up to `store_retry_timeout`.
//!   `examples/payments_postgres.rs` shows it.
//!
//! ## Observability
//!
//! Every counter of [`Stats`] is also reported through the [`metrics`](https://docs.rs/metrics)
//! facade (install any recorder; without one these calls do nothing), with histograms of batch
//! size, handler and commit latency and a store-entries gauge; `examples/metrics_prometheus.rs`
//! serves them to Prometheus. Each record runs in a `tracing` span with its topic, partition,
//! offset, key and outcome. Outcomes of records are reported when their batch commits, so a
//! crashed, fenced or retried batch is never counted.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `idempotent_consumer_records_read_total` | counter | group, topic, partition |
//! | `idempotent_consumer_processed_total` | counter | group, topic, partition |
//! | `idempotent_consumer_duplicates_total` | counter | group, topic, partition, cause (`redelivery`, `repeated_key`) |
//! | `idempotent_consumer_conflicts_total` | counter | group, topic, partition, action (`dead_letter`, `skip`, `stop`) |
//! | `idempotent_consumer_dead_letters_total` | counter | group, topic, partition, reason |
//! | `idempotent_consumer_retries_total` | counter | group, topic, partition |
//! | `idempotent_consumer_store_retries_total` | counter | group, topic, partition |
//! | `idempotent_consumer_batches_committed_total` | counter | group, topic, partition |
//! | `idempotent_consumer_fenced_commits_total` | counter | group, topic, partition |
//! | `idempotent_consumer_kafka_commit_failures_total` | counter | group |
//! | `idempotent_consumer_expired_purged_total` | counter | group |
//! | `idempotent_consumer_dead_letters_purged_total` | counter | group |
//! | `idempotent_consumer_stale_partitions_refused_total` | counter | group, topic, partition |
//! | `idempotent_consumer_batch_records` | histogram | group, topic, partition |
//! | `idempotent_consumer_handler_seconds` | histogram | group, topic, partition |
//! | `idempotent_consumer_commit_seconds` | histogram | group, topic, partition |
//! | `idempotent_consumer_store_entries` | gauge | group |
//! | `idempotent_consumer_requests_total` | counter | namespace, route, outcome (`handled`, `released`, `replayed`, `in_flight`, `reused`, `bad_key`, `too_large`, `superseded`, `unavailable`, `failed`, `unkeyed`) |
//! | `idempotent_consumer_request_handler_seconds` | histogram | namespace, route |
//! | `idempotent_consumer_outbox_published_total` | counter | (rows committed to the outbox) |
//! | `idempotent_consumer_outbox_relayed_total` | counter | relay |
//! | `idempotent_consumer_outbox_dead_total` | counter | relay |
//! | `idempotent_consumer_outbox_relay_errors_total` | counter | relay, class (`store`, `produce`, `refused`) |
//! | `idempotent_consumer_outbox_lag_rows` | gauge | relay |
//! | `idempotent_consumer_outbox_lag_seconds` | gauge | relay (age of the oldest row waiting) |
//! | `idempotent_consumer_resolutions_total` | counter | group, topic, partition, outcome (`applied`, `superseded`, `stale`, `conflict`, `rejected`) |
//! | `idempotent_consumer_resolutions_purged_total` | counter | group |
//!
//! The store-entries gauge is refreshed at each purge round; on large PostgreSQL tables it is
//! the planner's estimate.
//!
//! ## Crash semantics
//!
//! Dropping the runtime's future (or the process dying) between a handler call and the batch's
//! commit loses nothing and applies nothing twice: the batch was never written, the position did
//! not move, and the records are handled again on restart. `examples/quickstart.rs` shows it.
//!
//! ## Features
//!
//! `rocksdb` (default) and `postgres` are the stores; `memory` is an in-memory store for
//! measuring and testing the runtime only; `postgres-tls` adds TLS to PostgreSQL connections;
//! `testkit` is the test support the project's own suites and fault harness use (a broker and
//! consumers in processes of their own, a throwaway database), offered for testing handlers.
//! `http` is the protocol of idempotency keys over HTTP ([`http`]: the `Idempotency-Key`
//! header, request fingerprints, which answers are kept, stored answers and their replay,
//! problem details) and the stores' side of it ([`RequestStore`]: a key claimed as a lease,
//! completed with the handler's writes in one transaction, on RocksDB and PostgreSQL) with its
//! server layer ([`http::IdempotencyLayer`], a `tower::Layer` for axum routes, and the
//! [`http::Tx`] extractor that hands the handler the store's open transaction);
//! `examples/payments_http.rs` shows it. `outbox` is the transactional outbox ([`outbox`]):
//! `publish` on every store's transaction writes an event in the same atomic write as the
//! handler's effects, with an idempotency key derived from the record or request it came from,
//! and the [`outbox::Relay`] produces committed rows to Kafka and deletes each one only after
//! the broker acknowledged it. `resolve` decides between valid updates that conflict
//! ([`resolve`]): a per-entity winner kept in the store, a policy (a version guard, last writer
//! wins by event time with a deterministic tie-break, or the service's own rule) consulted
//! before the handler runs, and a resolution record of every decision that is not a plain
//! "newer, applied", committed with its effect; `examples/device_shadow.rs` shows it.

#![forbid(unsafe_code)]

#[cfg(feature = "dashboard")]
pub mod dashboard;
mod dead_letter;
mod error;
mod handler;
mod hex;
#[cfg(feature = "http")]
pub mod http;
mod identity;
#[cfg(any(feature = "cli", feature = "dashboard"))]
mod lag;
mod metrics;
#[cfg(feature = "cli")]
pub mod ops;
#[cfg(feature = "outbox")]
pub mod outbox;
mod record;
#[cfg(feature = "resolve")]
pub mod resolve;
mod retry;
mod runtime;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use dead_letter::{DeadLetter, DeadLetterReason, DeadLetterTopic};
pub use error::{Error, RecordPosition, Result};
pub use handler::{DuplicateCause, ErrorClass, Handler, HandlerError, Outcome};
pub use identity::{
    DEFAULT_KEY_HEADER, DEFAULT_MAX_KEY_LEN, Fingerprint, Identity, KeyFn, KeySource, MissingKey,
    OversizeKey,
};
pub use metrics::{Stats, StatsSnapshot};
pub use record::{DecodeError, Header, Record};
pub use retry::RetryPolicy;
pub use runtime::{
    ConflictPolicy, DEFAULT_RETENTION, PartitionProgress, Progress, Runtime, RuntimeBuilder,
    StalePartitionPolicy, StartPosition,
};
pub use store::{
    Assignment, AuditRecord, Audited, Claim, ClaimAhead, DedupEntry, DeferredWrites, EntryKey,
    EntryStatus, Inspect, PartitionId, RedriveMark, Store, StoredPosition, Transaction,
};
#[cfg(feature = "http")]
pub use store::{Lease, RequestClaim, RequestStore};

/// The Kafka client the runtime is built on, at the version it uses: a handler or a test that
/// names rdkafka's types takes them from here.
pub use rdkafka;
/// The PostgreSQL driver `PgTx::conn` hands out, at the version and with the features the store
/// uses: `idempotent_consumer::sqlx::query(...)` in a handler needs no sqlx entry of its own.
#[cfg(feature = "postgres")]
pub use sqlx;

#[cfg(any(feature = "rocksdb", feature = "memory"))]
pub use store::StateError;
#[cfg(feature = "memory")]
pub use store::memory::{MemoryStore, MemoryTx};
#[cfg(all(feature = "postgres", feature = "http"))]
pub use store::postgres::PgRequestTx;
#[cfg(feature = "postgres")]
pub use store::postgres::{BatchRow, BatchStatement, Column, PgOptions, PgStore, PgTx};
#[cfg(all(feature = "rocksdb", feature = "http"))]
pub use store::rocksdb::{REQUEST_STATE_LOCK_WAIT, RocksRequestTx};
#[cfg(feature = "rocksdb")]
pub use store::rocksdb::{RocksOptions, RocksStore, RocksTx};
