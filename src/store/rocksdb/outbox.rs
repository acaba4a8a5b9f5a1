//! The outbox on RocksDB (feature `outbox`): rows in the `outbox` family under their sequence
//! number (8 bytes, big-endian), written in the commit's `WriteBatch`; dead rows in
//! `outbox_dead` under the same number.
//!
//! Sequence numbers are taken at commit, just before the write. Two commits at once may land
//! in the opposite order of their numbers, so the relay's reads start at a cursor below which
//! every row is settled: the lowest number a commit still writing has taken, or the first row
//! not sent yet, whichever is lower. Everything before it is a tombstone the reads skip.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use super::keys::{CF_OUTBOX, CF_OUTBOX_DEAD};
use super::{Inner, RocksStore, rocks};
use crate::error::{Error, Result};
use crate::outbox::encode::{decode_dead, decode_row, encode_dead, encode_row};
use crate::outbox::store::LocalLease;
use crate::outbox::{OutboxDeadRow, OutboxLease, OutboxRow, OutboxStore, Outgoing};

/// The outbox's bookkeeping in the process that opened the store.
pub(super) struct RocksOutbox {
    numbers: Mutex<Numbers>,
    /// Every row below it is sent or dead.
    cursor: Mutex<u64>,
    /// Rows waiting (committed, not yet sent or dead).
    waiting: Mutex<u64>,
    lease: LocalLease,
    written: Arc<tokio::sync::Notify>,
}

struct Numbers {
    next: u64,
    /// The first number of each commit still writing.
    writing: BTreeSet<u64>,
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of(key: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(key.try_into().map_err(|_| {
        Error::Corrupt("an outbox key is not 8 bytes".into())
    })?))
}

impl RocksOutbox {
    /// Reads where the outbox stands: the next number after every kept row, and how many wait.
    pub(super) fn open(db: &rocksdb::DB) -> Result<Self> {
        let cf = |name| db.cf_handle(name).expect("every column family is opened");
        let mut next = 0;
        for name in [CF_OUTBOX, CF_OUTBOX_DEAD] {
            if let Some(item) = db.iterator_cf(cf(name), IteratorMode::End).next() {
                let (key, _) = item.map_err(rocks("reading the outbox"))?;
                next = next.max(seq_of(&key)? + 1);
            }
        }
        let mut waiting = 0;
        let mut first = None;
        for item in db.iterator_cf(cf(CF_OUTBOX), IteratorMode::Start) {
            let (key, _) = item.map_err(rocks("reading the outbox"))?;
            first.get_or_insert(seq_of(&key)?);
            waiting += 1;
        }
        Ok(RocksOutbox {
            numbers: Mutex::new(Numbers {
                next,
                writing: BTreeSet::new(),
            }),
            cursor: Mutex::new(first.unwrap_or(next)),
            waiting: Mutex::new(waiting),
            lease: LocalLease::default(),
            written: Arc::default(),
        })
    }
}

/// A commit's rows in its batch, numbered; dropping it (after the write, or when the commit
/// fails) ends the commit's claim on its numbers.
pub(super) struct Numbered<'a> {
    outbox: &'a RocksOutbox,
    first: u64,
    count: u64,
    written: bool,
}

impl Numbered<'_> {
    /// The commit's write landed.
    pub(super) fn written(mut self) {
        self.written = true;
    }
}

impl Drop for Numbered<'_> {
    fn drop(&mut self) {
        if self.written {
            *self.outbox.waiting.lock().expect("outbox poisoned") += self.count;
        }
        self.outbox
            .numbers
            .lock()
            .expect("outbox poisoned")
            .writing
            .remove(&self.first);
        if self.written {
            self.outbox.written.notify_one();
            crate::outbox::count_published(self.count as usize);
        }
    }
}

impl Inner {
    /// Writes `batch` through `write` with `published` numbered into it, in the same write.
    pub(super) fn write_with_published(
        &self,
        mut batch: WriteBatch,
        published: Vec<Outgoing>,
        write: impl FnOnce(WriteBatch) -> Result<()>,
    ) -> Result<()> {
        if published.is_empty() {
            return write(batch);
        }
        let numbered = self.put_outbox_rows(&mut batch, &published);
        write(batch)?;
        numbered.written();
        Ok(())
    }

    /// Numbers `rows` and puts them into `batch`.
    fn put_outbox_rows(&self, batch: &mut WriteBatch, rows: &[Outgoing]) -> Numbered<'_> {
        let outbox = &self.outbox;
        let count = rows.len() as u64;
        let first = {
            let mut numbers = outbox.numbers.lock().expect("outbox poisoned");
            let first = numbers.next;
            numbers.next += count;
            numbers.writing.insert(first);
            first
        };
        let cf = self.cf(CF_OUTBOX);
        for (seq, row) in (first..).zip(rows) {
            batch.put_cf(cf, seq_key(seq), encode_row(row));
        }
        Numbered {
            outbox,
            first,
            count,
            written: false,
        }
    }

    fn unsynced() -> WriteOptions {
        // A settled row lost with a machine crash is produced again and dropped downstream.
        WriteOptions::default()
    }
}

/// At most `limit` rows from number `from` on.
fn read_rows(inner: &Inner, from: u64, limit: usize) -> Result<Vec<OutboxRow>> {
    let mut options = ReadOptions::default();
    options.set_iterate_lower_bound(seq_key(from).to_vec());
    let mode = IteratorMode::From(&[], rocksdb::Direction::Forward);
    let mut rows = Vec::new();
    for item in inner.db.iterator_cf_opt(inner.cf(CF_OUTBOX), options, mode) {
        if rows.len() == limit {
            break;
        }
        let (key, value) = item.map_err(rocks("reading the outbox"))?;
        rows.push(decode_row(seq_of(&key)?, &value)?);
    }
    Ok(rows)
}

impl OutboxStore for RocksStore {
    async fn lease_outbox(&self, owner: &str, lease: Duration) -> Result<Option<OutboxLease>> {
        Ok(self.inner.outbox.lease.take(owner, lease))
    }

    async fn release_outbox(&self, lease: &OutboxLease) -> Result<()> {
        self.inner.outbox.lease.release(lease);
        Ok(())
    }

    async fn pending_rows(&self, after: Option<u64>, limit: usize) -> Result<Vec<OutboxRow>> {
        let inner = &self.inner;
        let outbox = &inner.outbox;
        if let Some(after) = after {
            return read_rows(inner, after.saturating_add(1), limit);
        }
        // Before reading: a commit writing now has a number at or above this floor.
        let floor = {
            let numbers = outbox.numbers.lock().expect("outbox poisoned");
            numbers.writing.first().copied().unwrap_or(numbers.next)
        };
        let from = *outbox.cursor.lock().expect("outbox poisoned");
        let rows = read_rows(inner, from, limit)?;
        let first_waiting = rows.first().map_or(u64::MAX, |r| r.id);
        *outbox.cursor.lock().expect("outbox poisoned") = floor.min(first_waiting).max(from);
        Ok(rows)
    }

    async fn mark_sent(&self, lease: &OutboxLease, ids: &[u64]) -> Result<bool> {
        let inner = &self.inner;
        let done = inner.outbox.lease.while_held(lease, || {
            let mut batch = WriteBatch::default();
            let cf = inner.cf(CF_OUTBOX);
            // A run of consecutive numbers is one range deletion (a round's rows usually are):
            // nothing else can be inside it, as every number in it is one of these rows.
            for run in ids.chunk_by(|a, b| b.checked_sub(*a) == Some(1)) {
                match run {
                    [one] => batch.delete_cf(cf, seq_key(*one)),
                    [first, .., last] => {
                        batch.delete_range_cf(cf, seq_key(*first), seq_key(*last));
                        batch.delete_cf(cf, seq_key(*last));
                    }
                    [] => {}
                }
            }
            inner
                .db
                .write_opt(batch, &Inner::unsynced())
                .map_err(rocks("deleting sent outbox rows"))
        })?;
        if done.is_some() {
            let mut waiting = inner.outbox.waiting.lock().expect("outbox poisoned");
            *waiting = waiting.saturating_sub(ids.len() as u64);
        }
        Ok(done.is_some())
    }

    async fn mark_dead(&self, lease: &OutboxLease, id: u64, reason: &str) -> Result<bool> {
        let inner = &self.inner;
        let done = inner.outbox.lease.while_held(lease, || {
            let key = seq_key(id);
            let Some(row) = inner
                .db
                .get_cf(inner.cf(CF_OUTBOX), key)
                .map_err(rocks("reading an outbox row"))?
            else {
                return Ok(false);
            };
            let mut batch = WriteBatch::default();
            batch.delete_cf(inner.cf(CF_OUTBOX), key);
            let dead = encode_dead(&row, reason, crate::store::now_ms());
            batch.put_cf(inner.cf(CF_OUTBOX_DEAD), key, dead);
            // Kept: a dead row is the one copy of an event nobody received.
            inner
                .db
                .write_opt(batch, &inner.write_opts)
                .map_err(rocks("keeping a dead outbox row"))?;
            Ok(true)
        })?;
        if done == Some(true) {
            let mut waiting = inner.outbox.waiting.lock().expect("outbox poisoned");
            *waiting = waiting.saturating_sub(1);
        }
        Ok(done.is_some())
    }

    async fn outbox_backlog(&self) -> Result<(u64, Option<i64>)> {
        let inner = &self.inner;
        let waiting = *inner.outbox.waiting.lock().expect("outbox poisoned");
        let oldest = if waiting == 0 {
            None
        } else {
            self.pending_rows(None, 1)
                .await?
                .first()
                .map(|r| r.created_at_ms)
        };
        Ok((waiting, oldest))
    }

    async fn dead_rows(&self, limit: usize) -> Result<Vec<OutboxDeadRow>> {
        let inner = &self.inner;
        let mut out = Vec::new();
        for item in inner
            .db
            .iterator_cf(inner.cf(CF_OUTBOX_DEAD), IteratorMode::Start)
            .take(limit)
        {
            let (key, value) = item.map_err(rocks("reading dead outbox rows"))?;
            out.push(decode_dead(seq_of(&key)?, &value)?);
        }
        Ok(out)
    }

    fn outbox_written(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.inner.outbox.written.clone())
    }
}
