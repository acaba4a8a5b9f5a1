//! Step 3b of a record (feature `resolve`): the resolver places the record in its entity's
//! order and decides, against the stored winner, whether the handler runs.
//!
//! Newer (or winning a tie-break): the handler runs, and the entity's new winner (with the
//! resolution record, when the decision was not a plain "newer") is written after it succeeds,
//! after the record's savepoint, so a failing handler leaves neither. Not applied: the record is
//! settled after a savepoint of its own with its resolution record, the entity's updated counts,
//! a `resolved` dedup entry, and whatever `on_superseded` writes, all or nothing.

#[cfg(feature = "resolve")]
use std::panic::AssertUnwindSafe;

#[cfg(feature = "resolve")]
use futures::FutureExt;

use super::PartitionTask;
use crate::error::Result;
use crate::handler::Handler;
use crate::store::Store;
#[cfg(feature = "resolve")]
use {
    super::Pending,
    super::decide::Step,
    crate::dead_letter::DeadLetterReason,
    crate::error::Error,
    crate::handler::{HandlerError, panic_message},
    crate::identity::IdempotencyKey,
    crate::resolve::{EntityLock, EntityState, Resolution, ResolutionOutcome, Resolver, Verdict},
    crate::store::{DeferredWrites, EntryStatus, Transaction},
};

/// What the resolver decided for a record, written with its effect.
#[cfg(feature = "resolve")]
pub(super) struct Resolved {
    /// The entity's state after the decision.
    state: EntityState,
    /// The resolution record, unless the record was plainly newer.
    resolution: Option<Resolution>,
    outcome: ResolutionOutcome,
}

/// Without the feature nothing is ever resolved.
#[cfg(not(feature = "resolve"))]
pub(super) enum Resolved {}

impl<S: Store, H: Handler<S::Tx>> PartitionTask<S, H> {
    /// Writes the entity's state and the resolution record of a decision, and counts it.
    #[cfg(feature = "resolve")]
    pub(super) async fn write_resolved(&mut self, tx: &mut S::Tx, r: &Resolved) -> Result<()> {
        tx.put_entity(&r.state).await?;
        if let Some(resolution) = &r.resolution {
            let expires = self.expires_at(self.batch_now);
            tx.put_resolution(resolution, expires).await?;
        }
        self.tally.resolved[r.outcome.index()] += 1;
        Ok(())
    }

    #[cfg(not(feature = "resolve"))]
    pub(super) async fn write_resolved(&mut self, _: &mut S::Tx, r: &Resolved) -> Result<()> {
        match *r {}
    }

    /// Places the record in its entity's order and decides it: applied through the handler,
    /// or settled without it.
    #[cfg(feature = "resolve")]
    pub(super) async fn resolve(
        &mut self,
        tx: &mut S::Tx,
        item: &Pending,
        key: &IdempotencyKey,
        store_key: &[u8],
        resolver: &Resolver,
    ) -> Result<Step> {
        let record = &item.record;
        let (entity, candidate) = match resolver.candidate(record, key) {
            Ok(Some(placed)) => placed,
            Ok(None) => return self.apply(tx, item, key, store_key, None).await,
            Err(message) => {
                tracing::warn!(%message, "record the resolver cannot place");
                let entry_key = Some((key, store_key, item.fingerprint));
                self.dead_letter(
                    tx,
                    record,
                    entry_key,
                    DeadLetterReason::Permanent,
                    message,
                    0,
                )
                .await?;
                return Ok(Step::Done("dead_lettered"));
            }
        };
        let stored = match tx.lock_entity(&entity).await? {
            EntityLock::Held(stored) => stored,
            EntityLock::Busy => {
                tracing::debug!(%entity, "entity in flight in another batch; waiting for it");
                return Ok(Step::Busy);
            }
        };
        let policy = resolver.policy();
        let winner = stored.as_ref().and_then(|s| s.winner.as_ref());
        let decision = policy.decide(winner, &candidate);
        let outcome = decision.verdict.outcome();
        let applied = outcome == ResolutionOutcome::Applied;
        // The common case, newer and nothing to record, moves the candidate into the state and
        // copies nothing; a recorded decision copies what its record keeps.
        let recorded = decision.verdict != Verdict::Newer;
        let mut state = stored.unwrap_or(EntityState {
            entity,
            winner: None,
            resolutions: 0,
            decisions: 0,
        });
        state.decisions += 1;
        let resolution = recorded.then(|| {
            let seq = state.resolutions;
            state.resolutions += 1;
            Resolution {
                entity: state.entity.clone(),
                seq,
                outcome,
                rule: policy.rule_name().to_owned(),
                rule_version: policy.rule_version(),
                reason: decision.verdict.reason().to_owned(),
                compared: decision.compared,
                winner: if applied {
                    Some(candidate.clone())
                } else {
                    state.winner.clone()
                },
                candidate: candidate.clone(),
                previous_winner: state.winner.clone(),
                decided_at_ms: record.timestamp_ms().unwrap_or(self.batch_now),
            }
        });
        if applied {
            state.winner = Some(candidate);
        }
        if let Some(r) = &resolution {
            tracing::info!(
                entity = %r.entity,
                outcome = outcome.as_str(),
                rule = %r.rule,
                reason = %r.reason,
                winner_offset = r.winner.as_ref().map(|w| w.offset),
                "resolved"
            );
        }
        let resolved = Resolved {
            state,
            resolution,
            outcome,
        };
        if outcome == ResolutionOutcome::Applied {
            return self.apply(tx, item, key, store_key, Some(resolved)).await;
        }
        self.settle(tx, item, key, store_key, resolved).await
    }

    /// Settles a record the resolver did not apply: its resolution record, the entity's counts,
    /// its `resolved` entry and what `on_superseded` writes, after a savepoint of its own.
    #[cfg(feature = "resolve")]
    async fn settle(
        &mut self,
        tx: &mut S::Tx,
        item: &Pending,
        key: &IdempotencyKey,
        store_key: &[u8],
        resolved: Resolved,
    ) -> Result<Step> {
        let record = &item.record;
        let resolution = resolved
            .resolution
            .as_ref()
            .expect("a record not applied has its resolution record");
        tx.savepoint().await?;
        tx.begin_record(store_key, record);
        let handler = &self.shared.handler;
        let mut result = AssertUnwindSafe(handler.on_superseded(record, resolution, tx))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(HandlerError::permanent(format!(
                    "on_superseded panicked: {}",
                    panic_message(&*panic)
                )))
            });
        if let Err(error) = &result
            && tx.is_transient_failure(error)
        {
            let at = record.position();
            return Err(Error::store_transient(
                format!("on_superseded's statements for {at}"),
                result.expect_err("checked"),
            ));
        }
        if result.is_ok()
            && let DeferredWrites::Rejected(error) = tx.write_deferred().await?
        {
            result = Err(error);
        }
        if tx.take_conflict() {
            tx.rollback_to_savepoint().await?;
            return Ok(Step::Busy);
        }
        if let Err(error) = result {
            tx.rollback_to_savepoint().await?;
            return self.failure(tx, item, key, store_key, error).await;
        }
        self.write_resolved(tx, &resolved).await?;
        let entry = self.entry(
            record,
            item.fingerprint,
            EntryStatus::Resolved,
            None,
            self.batch_now,
        );
        tx.put_entry(store_key, &entry).await?;
        Ok(Step::Done(resolved.outcome.as_str()))
    }
}
