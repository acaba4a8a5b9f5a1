//! The user's side: the [`Handler`] trait, its [`Outcome`] and its classified [`HandlerError`].
//!
//! A handler is called once per new record with the record and the store's open transaction
//! (`Tx`). Whatever it writes through `tx` commits atomically with the record's dedup entry and
//! the partition position, or not at all. A run whose transaction does not commit counts for
//! nothing, and the record is handled again: after a store failure, a crash, a retry, or, on
//! PostgreSQL (which runs records without per-record savepoints, a round trip each), when a
//! later record of the same batch fails. Effects that cannot join the transaction (an HTTP call,
//! an e-mail) run at least once; pass the record's idempotency key downstream so the other side
//! can deduplicate them.
//!
//! The hooks `on_duplicate` and `on_conflict` have default no-op bodies, like rdkafka's
//! `ConsumerContext` callbacks: override only what you need.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::record::{DecodeError, Record};
use crate::store::entry::DedupEntry;

/// What the handler returns for a record it applied: optional bytes kept with the dedup entry so
/// a later duplicate can be answered with the original result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome(Option<Vec<u8>>);

impl Outcome {
    /// No outcome bytes.
    pub fn none() -> Self {
        Outcome(None)
    }

    /// Keep these bytes with the entry.
    pub fn bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Outcome(Some(bytes.into()))
    }

    /// Keep `value` serialized as JSON.
    pub fn json<T: serde::Serialize>(value: &T) -> Result<Self, HandlerError> {
        serde_json::to_vec(value)
            .map(|b| Outcome(Some(b)))
            .map_err(HandlerError::permanent)
    }

    /// The bytes, if any.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        self.0.as_deref()
    }

    pub(crate) fn into_bytes(self) -> Option<Vec<u8>> {
        self.0
    }
}

/// How the runtime should treat a failed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later (backoff, bounded attempts, partition order kept).
    Retryable,
    /// Will never succeed: dead-letter the record and go on.
    Permanent,
    /// Stop the consumer without committing past this record.
    Fatal,
}

/// A handler error with its class.
pub struct HandlerError {
    class: ErrorClass,
    retry_after: Option<Duration>,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl HandlerError {
    fn new(class: ErrorClass, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandlerError {
            class,
            retry_after: None,
            source: source.into(),
        }
    }

    /// A transient failure: the record is tried again after a backoff.
    pub fn retryable(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(ErrorClass::Retryable, source)
    }

    /// A transient failure that should be retried no sooner than `after`.
    pub fn retry_after(
        after: Duration,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        HandlerError {
            retry_after: Some(after),
            ..Self::new(ErrorClass::Retryable, source)
        }
    }

    /// A failure that will not go away: the record is dead-lettered.
    pub fn permanent(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(ErrorClass::Permanent, source)
    }

    /// A failure that must stop the consumer (for example a broken invariant).
    pub fn fatal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(ErrorClass::Fatal, source)
    }

    /// The class.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The minimum delay asked for by [`HandlerError::retry_after`].
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("class", &self.class)
            .field("retry_after", &self.retry_after)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// An undecodable payload never becomes decodable: it is a permanent error.
impl From<DecodeError> for HandlerError {
    fn from(e: DecodeError) -> Self {
        HandlerError::permanent(e)
    }
}

/// Why a record was skipped as a duplicate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicateCause {
    /// The same record was delivered again (same topic, partition and offset as the stored entry,
    /// or an offset below the stored position).
    Redelivery,
    /// Another record (another offset) carried a key already processed, with the same payload.
    RepeatedKey,
}

impl DuplicateCause {
    /// Lower-case name, for traces and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DuplicateCause::Redelivery => "redelivery",
            DuplicateCause::RepeatedKey => "repeated_key",
        }
    }
}

/// A record handler over the store transaction `Tx`.
///
/// Implement it with plain `async fn`s:
///
/// ```
/// use idempotent_consumer::{Handler, HandlerError, Outcome, Record};
/// # struct Tx;
/// struct Count;
///
/// impl Handler<Tx> for Count {
///     async fn handle(&self, record: &Record, _tx: &mut Tx) -> Result<Outcome, HandlerError> {
///         Ok(Outcome::bytes(record.offset().to_string()))
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a handler for transactions of type `{Tx}`",
    note = "implement `Handler<{Tx}>` with `async fn handle(&self, record: &Record, tx: &mut {Tx}) -> Result<Outcome, HandlerError>`"
)]
pub trait Handler<Tx>: Send + Sync + 'static {
    /// Applies one new record. Write effects through `tx`; they commit with the dedup entry and
    /// the position. Returning an error rolls back everything this call wrote. A panic is caught
    /// and treated as a permanent error (the record is kept as a dead letter with the panic
    /// message); the runtime goes on.
    fn handle(
        &self,
        record: &Record,
        tx: &mut Tx,
    ) -> impl Future<Output = Result<Outcome, HandlerError>> + Send;

    /// Called for a record skipped as a duplicate, with the stored entry (its `outcome` holds the
    /// original result). Runs at least once per duplicate delivery: a batch that does not
    /// commit is handled again, hooks included. A panic here is caught and logged; the record
    /// stays a duplicate and the runtime goes on.
    fn on_duplicate(
        &self,
        record: &Record,
        entry: &DedupEntry,
        cause: DuplicateCause,
    ) -> impl Future<Output = ()> + Send {
        let _ = (record, entry, cause);
        async {}
    }

    /// Called for a record whose key was first used by a record with a different payload, before
    /// the conflict policy is applied. Runs at least once, like `on_duplicate`; a panic here is
    /// caught and logged, and the policy still applies.
    fn on_conflict(&self, record: &Record, entry: &DedupEntry) -> impl Future<Output = ()> + Send {
        let _ = (record, entry);
        async {}
    }

    /// Called (feature `resolve`) for a record the resolver did not let `handle` apply
    /// (superseded, stale, a conflict with the winner's version, rejected), with its
    /// resolution record and the batch's transaction: what it writes (a correction published
    /// through the outbox, a row of the service's own) commits with the resolution record, the
    /// record's dedup entry and the position, or not at all. An error is the record's, classed
    /// like `handle`'s (retried, dead-lettered, or the stop), and rolls the resolution back
    /// with it; a panic is a permanent error. Default: nothing.
    #[cfg(feature = "resolve")]
    fn on_superseded(
        &self,
        record: &Record,
        resolution: &crate::resolve::Resolution,
        tx: &mut Tx,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let _ = (record, resolution, tx);
        async { Ok(()) }
    }
}

/// The message of a caught panic of user code (a handler, a hook, a key function).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}
