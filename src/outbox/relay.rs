//! The relay: committed outbox rows to Kafka, each deleted only after the broker's
//! acknowledgement.
//!
//! A round: hold (or renew) the outbox's lease; read the next rows not yet sent (after the
//! rounds still in flight); produce them in order with an idempotent producer (with no delivery
//! timeout by default, so a broker that is down delays rows and never reorders or fails them).
//! Up to [`RelayConfig::in_flight`] rows wait for their acknowledgements at once; each round is
//! settled in order: the acknowledged rows deleted and the refused ones kept as dead rows, both
//! only while the lease is still this relay's. When the relay idles, or after a failure, it
//! reads from the first row waiting again. A relay
//! that lost its lease stops at the next round and waits; what it produced meanwhile is produced
//! again by the new holder and dropped downstream by its derived key.
//!
//! Metrics (the [`metrics`](https://docs.rs/metrics) facade, label `relay`):
//! `idempotent_consumer_outbox_relayed_total`, `idempotent_consumer_outbox_dead_total`,
//! `idempotent_consumer_outbox_relay_errors_total{class}` (`store`, `produce`, `refused`),
//! gauges `idempotent_consumer_outbox_lag_rows` and `idempotent_consumer_outbox_lag_seconds`
//! (rows waiting and the age of the oldest); `idempotent_consumer_outbox_published_total` is
//! counted by the stores' commits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tracing::Instrument;

use super::{IDEMPOTENCY_KEY_HEADER, OutboxLease, OutboxRow, OutboxStore};
use crate::error::{Error, Result};

pub(super) const PUBLISHED_METRIC: &str = "idempotent_consumer_outbox_published_total";
const RELAYED: &str = "idempotent_consumer_outbox_relayed_total";
const DEAD: &str = "idempotent_consumer_outbox_dead_total";
const ERRORS: &str = "idempotent_consumer_outbox_relay_errors_total";
const LAG_ROWS: &str = "idempotent_consumer_outbox_lag_rows";
const LAG_SECONDS: &str = "idempotent_consumer_outbox_lag_seconds";

/// Acknowledged rows are deleted this many at a time (or when nothing more is in flight).
const DELETE_EVERY: usize = 1000;

/// How often the lag gauges are measured (counting the outbox's rows is not free).
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// How a relay runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Names the relay in its lease, logs and metrics (default `relay`; a unique suffix is added
    /// per relay).
    pub name: String,
    /// Rows read and produced per round (default 500).
    pub batch_size: usize,
    /// Rows produced ahead of their acknowledgements (default 10,000, at least one round):
    /// reading and producing go on while the broker acknowledges; rounds are settled in order.
    pub in_flight: usize,
    /// How often an idle relay looks for rows committed by other processes (default 100 ms;
    /// commits of its own process wake it at once).
    pub poll_interval: Duration,
    /// How long the lease holds without renewal (default 10 s); renewed once a third of it has
    /// passed.
    pub lease: Duration,
    /// The longest wait after a failing round (default 30 s; doubling from 100 ms).
    pub max_backoff: Duration,
    /// A backlog of more rows than this is logged as an alarm (default 100,000).
    pub alarm_rows: u64,
    /// A backlog whose oldest row is older than this is logged as an alarm (default 5 min).
    pub alarm_age: Duration,
    /// Asked to stop, the relay goes on producing the rows waiting for at most this long
    /// (default 5 s), so what a runtime's last commit published leaves with it; the rows still
    /// waiting then are the next relay's. Zero: it settles the rounds in flight and stops.
    pub shutdown_drain: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            name: "relay".into(),
            batch_size: 500,
            in_flight: 10_000,
            poll_interval: Duration::from_millis(100),
            lease: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
            alarm_rows: 100_000,
            alarm_age: Duration::from_secs(300),
            shutdown_drain: Duration::from_secs(5),
        }
    }
}

/// What a relay did, shared while it runs ([`Relay::stats`]).
#[derive(Debug, Default)]
pub struct RelayStats {
    relayed: AtomicU64,
    dead: AtomicU64,
    errors: AtomicU64,
}

impl RelayStats {
    /// Rows produced and acknowledged, then deleted.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    /// Rows the broker refused for good, kept as dead rows.
    pub fn dead(&self) -> u64 {
        self.dead.load(Ordering::Relaxed)
    }

    /// Rounds that failed (a store error, a produce error) and were tried again.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// Produces a store's committed outbox rows to Kafka. Started by the runtime
/// ([`RuntimeBuilder::relay`](crate::RuntimeBuilder::relay)) or alone, beside an HTTP service.
pub struct Relay<S> {
    store: S,
    producer: FutureProducer,
    config: RelayConfig,
    owner: String,
    stats: Arc<RelayStats>,
}

impl<S> std::fmt::Debug for Relay<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("owner", &self.owner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a running relay keeps between rounds.
#[derive(Default)]
struct State {
    /// The outbox's lease, when this relay holds it, and when it was last taken or renewed
    /// (by this process's clock).
    lease: Option<OutboxLease>,
    renewed: Option<std::time::Instant>,
    /// The last row produced: the next read starts after it (`None`: at the first row waiting).
    cursor: Option<u64>,
    /// Acknowledged rows not deleted yet.
    sent: Vec<u64>,
}

/// The acknowledgements of one produced batch, in row order.
type Acks = futures::future::BoxFuture<'static, Vec<Delivery>>;

/// What became of one produced row.
enum Delivery {
    Sent(u64),
    Refused(u64, String),
    Failed(KafkaError),
}

/// A refusal that producing again cannot change: the row becomes a dead row.
fn is_refusal(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::MessageBatchTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::UnknownTopic
            | C::InvalidRequiredAcks
    )
}

impl<S: OutboxStore> Relay<S> {
    /// A relay of `store`'s outbox producing through a producer made from `client` (the
    /// broker's address and security settings; a consumer's configuration will do, its
    /// consumer-only properties are left out; idempotence is always on, and unless `client`
    /// sets `message.timeout.ms`, deliveries never time out: a row waits for the broker).
    pub fn new(store: S, client: &ClientConfig, config: RelayConfig) -> Result<Self> {
        if config.batch_size == 0 {
            return Err(Error::Config("relay batch_size must be at least 1".into()));
        }
        // The client's connection settings; a consumer's own properties are left out.
        let mut producer = crate::dead_letter::producer_config(client);
        producer.set("enable.idempotence", "true");
        if producer.get("message.timeout.ms").is_none() {
            producer.set("message.timeout.ms", "0");
        }
        if producer.get("linger.ms").is_none() {
            producer.set("linger.ms", "2");
        }
        let producer = producer
            .create()
            .map_err(|e| Error::kafka("creating the relay's producer", e))?;
        let owner = format!("{}-{}", config.name, &crate::store::new_id()[..12]);
        Ok(Relay {
            store,
            producer,
            config,
            owner,
            stats: Arc::default(),
        })
    }

    /// Its counters, readable while it runs.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// The name it holds the lease under.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Relays until `shutdown` completes, then goes on while rows are waiting, for at most
    /// [`RelayConfig::shutdown_drain`], settles the rows in flight and gives the lease up. Rows
    /// produced but not settled when it ends (its task dropped, its process killed) stay in the
    /// outbox and are produced again by the next relay.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let span = tracing::info_span!("outbox_relay", relay = %self.owner);
        let mut shutdown = std::pin::pin!(shutdown.fuse());
        let mut st = State::default();
        let mut backoff = Duration::ZERO;
        let written = self.store.outbox_written();
        let mut measured: Option<std::time::Instant> = None;
        // Once asked to stop: until when it goes on with the rows waiting.
        let mut draining: Option<std::time::Instant> = None;
        let drain_from = |draining: &mut Option<std::time::Instant>| {
            if self.config.shutdown_drain.is_zero() {
                return false;
            }
            tracing::info!(for_at_most = ?self.config.shutdown_drain, "stopping: relaying the rows waiting first");
            *draining = Some(std::time::Instant::now() + self.config.shutdown_drain);
            true
        };
        // Rounds produced and not settled yet, oldest first.
        let mut in_flight: FuturesOrdered<Acks> = FuturesOrdered::new();
        let rounds = self
            .config
            .in_flight
            .div_ceil(self.config.batch_size)
            .max(1);
        async {
            loop {
                if draining.is_some_and(|until| std::time::Instant::now() >= until) {
                    tracing::warn!(
                        "stopping with rows still waiting: the next relay produces them"
                    );
                    break;
                }
                if st.lease.is_some() && measured.is_none_or(|t| t.elapsed() >= BACKLOG_EVERY) {
                    self.backlog().await;
                    measured = Some(std::time::Instant::now());
                }
                let mut produced = false;
                let mut step = Ok(());
                if in_flight.len() < rounds {
                    match self.refill(&mut st).await {
                        Ok(Some(acks)) => {
                            in_flight.push_back(acks);
                            produced = true;
                        }
                        Ok(None) => {}
                        Err(e) => step = Err(e),
                    }
                }
                // The oldest round is settled once the pipeline is full or nothing more came.
                if step.is_ok() && (!produced || in_flight.len() >= rounds) && !in_flight.is_empty()
                {
                    step = self.settle_oldest(&mut st, &mut in_flight).await;
                }
                // Deleted a thousand at a time, and always before the next read from the first
                // row waiting (which would find them again).
                if step.is_ok() && (st.sent.len() >= DELETE_EVERY || in_flight.is_empty()) {
                    step = self.flush(&mut st).await;
                }
                if let Err(e) = step {
                    // What is acknowledged is settled; the rest is read again from the first
                    // row waiting, after a pause.
                    self.drain(&mut st, &mut in_flight).await;
                    st.cursor = None;
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    backoff = (backoff * 2)
                        .max(Duration::from_millis(100))
                        .min(self.config.max_backoff);
                    tracing::warn!(error = %e, ?backoff, "relaying failed; backing off");
                    if draining.is_some() {
                        break;
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    continue;
                }
                backoff = Duration::ZERO;
                if produced || !in_flight.is_empty() {
                    // The future is fused: it completes here once, and never again.
                    if (&mut shutdown).now_or_never().is_some() && !drain_from(&mut draining) {
                        break;
                    }
                    continue;
                }
                if draining.is_some() {
                    // Nothing more waiting (or the outbox is another relay's).
                    break;
                }
                // Idle: the next read starts from the first row waiting again, so a row
                // committed late under a lower id (PostgreSQL) is found too.
                st.cursor = None;
                let woken = async {
                    match &written {
                        Some(n) => n.notified().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = &mut shutdown => if !drain_from(&mut draining) { break },
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    () = woken => {}
                }
            }
            self.drain(&mut st, &mut in_flight).await;
            if let Some(lease) = &st.lease
                && let Err(e) = self.store.release_outbox(lease).await
            {
                tracing::warn!(error = %e, "giving the outbox's lease up failed; it runs out");
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    fn error(&self, class: &'static str) {
        metrics::counter!(ERRORS, "relay" => self.config.name.clone(), "class" => class)
            .increment(1);
    }

    /// Renews the lease when a third of it has passed, reads the rows after the cursor and
    /// produces them: their acknowledgements to come, or `None` when the outbox is another
    /// relay's or has nothing more.
    async fn refill(&self, st: &mut State) -> Result<Option<Acks>> {
        // Every round while another relay holds it.
        let fresh = st.lease.is_some()
            && st
                .renewed
                .is_some_and(|at| at.elapsed() < self.config.lease / 3);
        if !fresh {
            self.renew(st).await?;
        }
        if st.lease.is_none() {
            return Ok(None);
        }
        let rows = self
            .store
            .pending_rows(st.cursor, self.config.batch_size)
            .await
            .inspect_err(|_| self.error("store"))?;
        let Some(last) = rows.last() else {
            return Ok(None);
        };
        st.cursor = Some(last.id);
        Ok(Some(self.produce(&rows).await))
    }

    /// Takes or renews the outbox's lease.
    async fn renew(&self, st: &mut State) -> Result<()> {
        let held = self
            .store
            .lease_outbox(&self.owner, self.config.lease)
            .await
            .inspect_err(|_| self.error("store"))?;
        if held.as_ref().map(OutboxLease::epoch) != st.lease.as_ref().map(OutboxLease::epoch) {
            match &held {
                Some(l) => tracing::info!(epoch = l.epoch(), "holding the outbox"),
                None if st.lease.is_some() => {
                    tracing::warn!("the outbox's lease went to another relay")
                }
                None => tracing::debug!("another relay holds the outbox"),
            }
            // A new holder (or none) starts from the first row waiting.
            st.cursor = None;
        }
        st.renewed = held.is_some().then(std::time::Instant::now);
        st.lease = held;
        Ok(())
    }

    /// Waits for the oldest round's acknowledgements, keeping the lease meanwhile (a broker
    /// slower than the lease must not cost it), and settles the round.
    async fn settle_oldest(
        &self,
        st: &mut State,
        in_flight: &mut FuturesOrdered<Acks>,
    ) -> Result<()> {
        let deliveries = loop {
            tokio::select! {
                d = in_flight.next() => break d,
                () = tokio::time::sleep(self.config.lease / 3) => {
                    if let Err(e) = self.renew(st).await {
                        tracing::warn!(error = %e, "renewing the outbox's lease failed");
                    }
                }
            }
        };
        match deliveries {
            Some(deliveries) => self.settle(st, deliveries).await,
            None => Ok(()),
        }
    }

    /// Settles every round in flight and deletes what was acknowledged; failures are logged
    /// (the rows stay, and are produced again).
    async fn drain(&self, st: &mut State, in_flight: &mut FuturesOrdered<Acks>) {
        while let Some(deliveries) = in_flight.next().await {
            let _ = self.settle(st, deliveries).await;
        }
        if let Err(e) = self.flush(st).await {
            tracing::warn!(error = %e, "deleting sent rows failed; they are produced again");
            st.sent.clear();
        }
    }

    /// Settles one produced round: its acknowledged rows join `sent` (deleted by
    /// [`flush`](Self::flush)), the refused ones are kept dead at once, while the lease is still
    /// the current one. A row that failed otherwise is an error: it is produced again.
    async fn settle(&self, st: &mut State, deliveries: Vec<Delivery>) -> Result<()> {
        let Some(lease) = &st.lease else {
            return Ok(());
        };
        let mut failure = None;
        for delivery in deliveries {
            match delivery {
                Delivery::Sent(id) => st.sent.push(id),
                Delivery::Refused(id, reason) => {
                    self.error("refused");
                    tracing::error!(id, %reason, "the broker refused an outbox row for good; kept as a dead row");
                    if self.store.mark_dead(lease, id, &reason).await? {
                        self.stats.dead.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(DEAD, "relay" => self.config.name.clone()).increment(1);
                    }
                }
                Delivery::Failed(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => {
                self.error("produce");
                Err(Error::kafka("relaying outbox rows", e))
            }
            None => Ok(()),
        }
    }

    /// Deletes the acknowledged rows in `sent`, while the lease is still the current one.
    async fn flush(&self, st: &mut State) -> Result<()> {
        let Some(lease) = &st.lease else {
            st.sent.clear();
            return Ok(());
        };
        if st.sent.is_empty() {
            return Ok(());
        }
        let held = self
            .store
            .mark_sent(lease, &st.sent)
            .await
            .inspect_err(|_| self.error("store"))?;
        if held {
            let n = st.sent.len() as u64;
            self.stats.relayed.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(RELAYED, "relay" => self.config.name.clone()).increment(n);
        } else {
            tracing::warn!(
                rows = st.sent.len(),
                "the outbox's lease ran out while producing: the next holder produces these rows again"
            );
        }
        st.sent.clear();
        Ok(())
    }

    /// Queues `rows` with the producer in order; returns their acknowledgements to come.
    async fn produce(&self, rows: &[OutboxRow]) -> Acks {
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let mut headers = OwnedHeaders::new_with_capacity(row.headers.len() + 1);
            for (name, value) in &row.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
            headers = headers.insert(Header {
                key: IDEMPOTENCY_KEY_HEADER,
                value: Some(&row.idempotency_key),
            });
            let mut record = FutureRecord::<[u8], [u8]>::to(&row.topic).headers(headers);
            if let Some(key) = &row.key {
                record = record.key(key);
            }
            if let Some(payload) = &row.payload {
                record = record.payload(payload);
            }
            // What links the event on the topic to the record or request that published it.
            let traceparent = row
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("traceparent"))
                .and_then(|(_, v)| std::str::from_utf8(v).ok());
            tracing::debug!(
                id = row.id,
                source = %row.source,
                idempotency_key = %row.idempotency_key,
                topic = %row.topic,
                traceparent,
                "relaying an outbox row"
            );
            // Queued now, in order; a full queue is waited out.
            let queued = loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => break Ok(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => break Err(e),
                }
            };
            pending.push((row.id, queued));
        }
        // Acknowledgements arrive in order within a partition: awaited one after another.
        Box::pin(async move {
            let mut out = Vec::with_capacity(pending.len());
            for (id, queued) in pending {
                let result = match queued {
                    Ok(delivery) => match delivery.await {
                        Ok(Ok(_)) => {
                            out.push(Delivery::Sent(id));
                            continue;
                        }
                        Ok(Err((e, _))) => e,
                        Err(_) => KafkaError::Canceled,
                    },
                    Err(e) => e,
                };
                out.push(match result.rdkafka_error_code() {
                    Some(code) if is_refusal(code) => Delivery::Refused(id, result.to_string()),
                    _ => Delivery::Failed(result),
                });
            }
            out
        })
    }

    /// Updates the lag gauges and raises the backlog alarm.
    async fn backlog(&self) {
        let Ok((rows, oldest)) = self.store.outbox_backlog().await else {
            return;
        };
        let age_ms = oldest.map_or(0, |t| crate::store::now_ms().saturating_sub(t).max(0));
        let name = self.config.name.clone();
        metrics::gauge!(LAG_ROWS, "relay" => name.clone()).set(rows as f64);
        metrics::gauge!(LAG_SECONDS, "relay" => name).set(age_ms as f64 / 1000.0);
        let age = Duration::from_millis(age_ms as u64);
        if rows > self.config.alarm_rows || age > self.config.alarm_age {
            tracing::warn!(rows, age_s = age.as_secs(), "outbox backlog over its alarm");
        }
    }
}
