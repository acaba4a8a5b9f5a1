//! What a store keeps for the outbox, and what the relay asks of it: [`OutboxStore`].

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::error::Result;

/// A committed outbox row, waiting for the relay.
#[derive(Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Its place in the outbox: rows are relayed in increasing `id`.
    pub id: u64,
    /// The topic to produce to.
    pub topic: String,
    /// The record key.
    pub key: Option<Vec<u8>>,
    /// The payload.
    pub payload: Option<Vec<u8>>,
    /// The publication's own headers (the relay adds the idempotency key's).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The derived idempotency key (see the [module](crate::outbox)).
    pub idempotency_key: String,
    /// What published it: `topic/partition@offset` of a record, or `request`.
    pub source: String,
    /// When it was published, milliseconds since the Unix epoch (PostgreSQL: the
    /// database's clock at the commit's start).
    pub created_at_ms: i64,
}

impl fmt::Debug for OutboxRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxRow")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("key_bytes", &self.key.as_ref().map(Vec::len))
            .field("payload_bytes", &self.payload.as_ref().map(Vec::len))
            .field("headers", &self.headers.len())
            .field("idempotency_key", &self.idempotency_key)
            .field("source", &self.source)
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

/// A row the broker refused for good (too large, an invalid topic, no permission): kept, never
/// relayed again, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxDeadRow {
    /// The row as it was published.
    pub row: OutboxRow,
    /// The broker's or the client's refusal.
    pub reason: String,
    /// When the relay gave it up, milliseconds since the Unix epoch.
    pub failed_at_ms: i64,
}

/// One relay's hold on a store's outbox. Only the holder of the current lease marks rows sent
/// or dead; a relay whose lease another took over is fenced, like a zombie consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxLease {
    pub(crate) owner: String,
    pub(crate) epoch: u64,
    pub(crate) until_ms: i64,
}

impl OutboxLease {
    /// The holder's name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Bumped every time the outbox changes hands.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When it runs out unless renewed, milliseconds since the epoch (by the store's clock).
    pub fn until_ms(&self) -> i64 {
        self.until_ms
    }
}

/// A store whose transactions publish to an outbox, read by a [`Relay`](crate::outbox::Relay).
///
/// One relay at a time holds the outbox's lease ([`lease_outbox`](OutboxStore::lease_outbox));
/// others wait for it to run out. PostgreSQL keeps the lease in a row, so relays in several
/// processes share one outbox; the embedded stores keep it in the process that opened them.
pub trait OutboxStore: Clone + Send + Sync + 'static {
    /// Takes the outbox's lease for `owner` for `lease`, or renews it if `owner` holds it.
    /// `None` while another owner's lease runs.
    fn lease_outbox(
        &self,
        owner: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<OutboxLease>>> + Send;

    /// Gives the lease up, so another relay takes over at once.
    fn release_outbox(&self, lease: &OutboxLease) -> impl Future<Output = Result<()>> + Send;

    /// The first `limit` committed rows not yet sent, in order; only those after id `after`
    /// when given (the rows before it are in flight).
    fn pending_rows(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send;

    /// Deletes rows the broker acknowledged. False (and nothing done) when `lease` is no longer
    /// the current one.
    fn mark_sent(
        &self,
        lease: &OutboxLease,
        ids: &[u64],
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Keeps a row the broker refused for good as a dead row with `reason`, out of the relay's
    /// way. False (and nothing done) when `lease` is no longer the current one.
    fn mark_dead(
        &self,
        lease: &OutboxLease,
        id: u64,
        reason: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// How many rows wait for the relay, and when the oldest was published.
    fn outbox_backlog(&self) -> impl Future<Output = Result<(u64, Option<i64>)>> + Send;

    /// The dead rows, oldest first, at most `limit`.
    fn dead_rows(&self, limit: usize) -> impl Future<Output = Result<Vec<OutboxDeadRow>>> + Send;

    /// Optional. Notified when a commit of this process wrote rows, so a relay beside it wakes
    /// at once instead of at its next poll. Default: none (the relay polls).
    fn outbox_written(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
}

/// The lease of an outbox that one process owns (the embedded stores).
#[cfg(any(feature = "rocksdb", feature = "memory"))]
#[derive(Debug, Default)]
pub(crate) struct LocalLease {
    state: std::sync::Mutex<(Option<OutboxLease>, u64)>,
}

#[cfg(any(feature = "rocksdb", feature = "memory"))]
impl LocalLease {
    pub(crate) fn take(&self, owner: &str, lease: Duration) -> Option<OutboxLease> {
        let now = crate::store::now_ms();
        let until_ms = now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX));
        let mut state = self.state.lock().expect("outbox lease poisoned");
        let (held, epochs) = &mut *state;
        match held {
            Some(h) if h.owner == owner => h.until_ms = until_ms,
            Some(h) if h.until_ms > now => return None,
            _ => {
                *epochs += 1;
                *held = Some(OutboxLease {
                    owner: owner.to_owned(),
                    epoch: *epochs,
                    until_ms,
                });
            }
        }
        held.clone()
    }

    pub(crate) fn release(&self, lease: &OutboxLease) {
        let mut state = self.state.lock().expect("outbox lease poisoned");
        if state.0.as_ref().is_some_and(|h| h.epoch == lease.epoch) {
            state.0 = None;
        }
    }

    /// Runs `f` while `lease` is the current one (holding the lease's lock, so a takeover
    /// waits for it); false when it is not.
    pub(crate) fn while_held<T>(
        &self,
        lease: &OutboxLease,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<Option<T>> {
        let state = self.state.lock().expect("outbox lease poisoned");
        let now = crate::store::now_ms();
        match &state.0 {
            Some(h) if h.epoch == lease.epoch && h.until_ms > now => f().map(Some),
            _ => Ok(None),
        }
    }
}

#[cfg(all(test, any(feature = "rocksdb", feature = "memory")))]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_a_takeover_fences_the_old_one() {
        let lease = LocalLease::default();
        let a = lease.take("a", Duration::from_secs(60)).unwrap();
        assert!(lease.take("b", Duration::from_secs(60)).is_none());
        assert_eq!(
            lease.take("a", Duration::from_secs(60)).unwrap().epoch,
            a.epoch
        );
        assert_eq!(lease.while_held(&a, || Ok(1)).unwrap(), Some(1));
        lease.release(&a);
        let b = lease.take("b", Duration::from_millis(0)).unwrap();
        assert!(b.epoch > a.epoch);
        assert_eq!(lease.while_held(&a, || Ok(1)).unwrap(), None);
        // b's lease ran out at once: a takes the outbox over, and b is fenced.
        let a2 = lease.take("a", Duration::from_secs(60)).unwrap();
        assert!(a2.epoch > b.epoch);
        assert_eq!(lease.while_held(&b, || Ok(1)).unwrap(), None);
    }
}
