//! Resolution of valid updates that conflict (feature `resolve`): one authoritative answer per
//! entity, with the basis of every decision recorded in the same commit as the effect.
//!
//! Deduplication answers "did we process this event?". A [`Resolver`] answers "which of two
//! valid, distinct events about the same thing is the truth?". It names the **entity** of a
//! record (a device, an account) and the record's **order** ([`Order`]: a version, an event
//! time, a source id), and the runtime keeps, per entity, the current winner in the store. Before
//! the handler runs, the resolver's [`Policy`] compares the record with the winner:
//!
//! | verdict | handler | entity's winner | resolution record |
//! |---|---|---|---|
//! | newer ([`Verdict::Newer`]) | runs | the record | none |
//! | won a tie-break or a custom rule's call ([`Verdict::Won`]) | runs | the record | `applied` |
//! | superseded | not run; [`on_superseded`](crate::Handler::on_superseded) | unchanged | `superseded` |
//! | stale | not run; `on_superseded` | unchanged | `stale` |
//! | conflict (same version, another update) | not run; `on_superseded` | unchanged | `conflict` |
//! | rejected (event time past the skew bound) | not run; `on_superseded` | unchanged | `rejected` |
//!
//! The winner, the [`Resolution`] record, the record's dedup entry and the partition's position
//! commit in ONE transaction on every store, with the handler's effects when it runs (and
//! `on_superseded`'s writes when it does not): there is never a resolution record without its
//! effect, nor an effect without its record. A record that is not applied is **settled**, not
//! dead-lettered: its dedup entry says [`EntryStatus::Resolved`](crate::EntryStatus::Resolved),
//! so its redelivery is a duplicate and gets no second record.
//!
//! Decisions read nothing but the two candidates (the skew bound compares the event time with
//! the record's own Kafka timestamp, not the clock), and a resolution record's time is its
//! record's timestamp: replaying a log on an empty store gives the same winners and the same
//! records, byte for byte.
//!
//! Entities are scoped by consumer group. Their rows are locked like claims: a record of an
//! entity another in-flight batch holds (another partition, another instance on PostgreSQL)
//! waits for that batch's commit. Resolution records expire with the dedup retention and go with
//! the same bounded purge; an entity's winner is never purged.
//!
//! "Why is entity X in state S?": [`Entities::explain`] returns the winner and the resolution
//! records, newest first.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::identity::IdempotencyKey;
use crate::record::Record;

mod policy;

pub use policy::{CustomRule, Decision, Policy, Verdict};

/// The longest entity name, in bytes.
pub const MAX_ENTITY_BYTES: usize = 512;

/// Where a record stands in its entity's order. Fill what the policy reads: the sequence for
/// [`Policy::SequenceGuard`], the event time for [`Policy::LastWriterWins`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// An epoch that survives restarts of the source's sequence (a device's boot count).
    #[serde(default)]
    pub epoch: u64,
    /// A per-entity version or sequence number.
    #[serde(default)]
    pub sequence: Option<u64>,
    /// When the event happened at its source, milliseconds since the Unix epoch.
    #[serde(default)]
    pub event_time_ms: Option<i64>,
    /// The source's id, the first tie-break of equal event times.
    #[serde(default)]
    pub source: String,
}

/// One side of a decision: a record's key, position and order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The record's idempotency key (UTF-8 as it is, other bytes as hex).
    pub key: String,
    /// The record's topic.
    pub topic: String,
    /// The record's partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// The record's Kafka timestamp, milliseconds since the Unix epoch.
    pub logged_at_ms: Option<i64>,
    /// The record's order.
    pub order: Order,
}

/// A value a rule compared, as text: the candidate's and the winner's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compared {
    /// What was compared.
    pub field: String,
    /// The candidate's value.
    pub candidate: String,
    /// The winner's value (or the bound).
    pub winner: String,
}

/// What became of a record the resolver decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolutionOutcome {
    /// Handled; the record is the entity's winner now.
    Applied,
    /// A concurrent update that lost to the winner; not handled.
    Superseded,
    /// Out of date; not handled.
    Stale,
    /// The same place in the order as the winner, another update; not handled.
    Conflict,
    /// Not acceptable as a winner (beyond the skew bound); not handled.
    Rejected,
}

impl ResolutionOutcome {
    /// Every outcome, in the order of the metrics.
    pub const ALL: [ResolutionOutcome; 5] = [
        ResolutionOutcome::Applied,
        ResolutionOutcome::Superseded,
        ResolutionOutcome::Stale,
        ResolutionOutcome::Conflict,
        ResolutionOutcome::Rejected,
    ];

    /// Lower-case name, for records, traces and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ResolutionOutcome::Applied => "applied",
            ResolutionOutcome::Superseded => "superseded",
            ResolutionOutcome::Stale => "stale",
            ResolutionOutcome::Conflict => "conflict",
            ResolutionOutcome::Rejected => "rejected",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ResolutionOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The basis of one decision that was not a plain "newer, applied", kept in the store with the
/// decision's effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    /// The entity.
    pub entity: String,
    /// The record's number among the entity's resolution records, from 0.
    pub seq: u64,
    /// What became of the candidate.
    pub outcome: ResolutionOutcome,
    /// The rule that decided, and its version.
    pub rule: String,
    /// The rule's version.
    pub rule_version: u32,
    /// Why, in words.
    pub reason: String,
    /// The values compared.
    pub compared: Vec<Compared>,
    /// The record decided.
    pub candidate: Candidate,
    /// The winner it was compared with (none for the entity's first record).
    pub previous_winner: Option<Candidate>,
    /// The winner after the decision (none while no record of the entity was accepted).
    pub winner: Option<Candidate>,
    /// When: the decided record's Kafka timestamp (deterministic on replay), or the batch's
    /// clock for a record without one, milliseconds since the Unix epoch.
    pub decided_at_ms: i64,
}

impl Resolution {
    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a resolution serializes")
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("a resolution record does not decode: {e}")))
    }
}

/// What the store keeps per entity: the current winner and how many resolution records the
/// entity has had (the next record's `seq`). Never purged by the dedup retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityState {
    /// The entity.
    pub entity: String,
    /// The current winner: none while every record of the entity was refused (rejected, or
    /// refused by a custom rule), so the next one is decided as the entity's first.
    pub winner: Option<Candidate>,
    /// Resolution records written for the entity so far.
    pub resolutions: u64,
    /// Records decided for the entity so far (applied or not).
    pub decisions: u64,
}

impl EntityState {
    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an entity state serializes")
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("an entity's state does not decode: {e}")))
    }
}

/// What [`Transaction::lock_entity`](crate::Transaction::lock_entity) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityLock {
    /// Locked by this transaction, with the stored state (none for a new entity).
    Held(Option<EntityState>),
    /// Another in-flight transaction holds the entity: commit or drop this one and try again.
    Busy,
}

/// The entity and order of a record, as the user's function tells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The entity the record is about (non-empty, at most [`MAX_ENTITY_BYTES`], no NUL).
    pub entity: String,
    /// The record's order.
    pub order: Order,
}

type FactsFn = dyn Fn(&Record) -> std::result::Result<Option<Facts>, String> + Send + Sync;

/// Names the entity and order of each record and the policy that decides between them.
///
/// ```
/// use idempotent_consumer::resolve::{Facts, Order, Policy, Resolver};
/// use std::time::Duration;
///
/// #[derive(serde::Deserialize)]
/// struct Report { device: String, seq: u64 }
///
/// let resolver = Resolver::new(Policy::SequenceGuard { epochs: false }, |record| {
///     let r: Report = record.json().map_err(|e| e.to_string())?;
///     Ok(Some(Facts {
///         entity: r.device,
///         order: Order { sequence: Some(r.seq), ..Order::default() },
///     }))
/// });
/// ```
#[derive(Clone)]
pub struct Resolver {
    policy: Policy,
    facts: Arc<FactsFn>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver deciding by `policy` between the records `facts` places. `facts` returns
    /// `Ok(None)` for a record about no entity (handled as without a resolver), and `Err` for a
    /// record it cannot read: kept as a dead letter with the message.
    pub fn new(
        policy: Policy,
        facts: impl Fn(&Record) -> std::result::Result<Option<Facts>, String> + Send + Sync + 'static,
    ) -> Resolver {
        Resolver {
            policy,
            facts: Arc::new(facts),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The record's entity and candidate, or why it has none that can be decided. A panic of
    /// the user's function is an error of the record, like a handler's.
    pub(crate) fn candidate(
        &self,
        record: &Record,
        key: &IdempotencyKey,
    ) -> std::result::Result<Option<(String, Candidate)>, String> {
        let facts = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.facts)(record)))
            .unwrap_or_else(|panic| {
                Err(format!(
                    "the resolver's function panicked: {}",
                    crate::handler::panic_message(&*panic)
                ))
            })?;
        let Some(Facts { entity, order }) = facts else {
            return Ok(None);
        };
        check_entity(&entity)?;
        let candidate = Candidate {
            key: key_text(key.as_bytes()),
            topic: record.topic().to_owned(),
            partition: record.partition(),
            offset: record.offset(),
            logged_at_ms: record.timestamp_ms(),
            order,
        };
        if let Some(field) = self.policy.missing_field(&candidate) {
            return Err(format!(
                "the {} policy needs the record's {field}, which the resolver's function did \
                 not give",
                self.policy.rule_name()
            ));
        }
        Ok(Some((entity, candidate)))
    }
}

/// Checks an entity name: what every store can keep and index.
pub fn check_entity(entity: &str) -> std::result::Result<(), String> {
    if entity.is_empty() {
        return Err("the resolver's function named an empty entity".to_owned());
    }
    if entity.len() > MAX_ENTITY_BYTES {
        return Err(format!(
            "the entity name is {} bytes, over the {MAX_ENTITY_BYTES} allowed",
            entity.len()
        ));
    }
    if entity.contains('\0') {
        return Err("the entity name contains a NUL character".to_owned());
    }
    Ok(())
}

/// An idempotency key as text: UTF-8 as it is, other bytes as hex.
fn key_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => crate::hex::hex(bytes),
    }
}

/// An entity's winner and its resolution records, newest first: why it is in its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The entity's state (none for an entity never decided).
    pub state: Option<EntityState>,
    /// Its resolution records still within the retention, newest first.
    pub resolutions: Vec<Resolution>,
}

/// Reading entities and their resolution records from outside the runtime, on every store
/// (feature `resolve`).
pub trait Entities {
    /// The state stored for `entity` of `group`.
    fn entity(
        &self,
        group: &str,
        entity: &str,
    ) -> impl Future<Output = Result<Option<EntityState>>> + Send;

    /// At most `limit` of the entity's resolution records, newest first.
    fn resolutions(
        &self,
        group: &str,
        entity: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Resolution>>> + Send;

    /// Why `entity` is in its state: its winner and its resolution records (at most `limit`),
    /// newest first.
    fn explain(
        &self,
        group: &str,
        entity: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Explanation>> + Send
    where
        Self: Sync,
    {
        async move {
            Ok(Explanation {
                state: self.entity(group, entity).await?,
                resolutions: self.resolutions(group, entity, limit).await?,
            })
        }
    }
}

/// The key of an entity in the embedded stores: the group and the entity, each
/// length-prefixed, so one entity's key is never a prefix of another's.
#[cfg(any(feature = "rocksdb", feature = "memory"))]
pub(crate) fn entity_key(group: &str, entity: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + group.len() + entity.len());
    for part in [group.as_bytes(), entity.as_bytes()] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part);
    }
    k
}

/// The key of a resolution record in the embedded stores: its entity's key, then its number.
#[cfg(any(feature = "rocksdb", feature = "memory"))]
pub(crate) fn resolution_key(group: &str, entity: &str, seq: u64) -> Vec<u8> {
    let mut k = entity_key(group, entity);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
