//! The records a harness sends: originals, repeats at new offsets, conflicting repeats.

/// What a record of a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The first record with its key.
    Original,
    /// An earlier record sent again (a producer's retry) at a new offset: a duplicate.
    Repeat,
    /// An earlier key with another payload: a conflict.
    ConflictingRepeat,
}

/// One record of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkRecord {
    /// Its idempotency key (sent in the `idempotency-key` header and as the Kafka key).
    pub key: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The partition it is produced to.
    pub partition: i32,
    /// What it is.
    pub kind: RecordKind,
}

/// The records a harness sends, in order, to a topic of `partitions` partitions.
#[derive(Debug, Clone)]
pub struct Workload {
    pub(super) partitions: i32,
    pub(super) records: Vec<WorkRecord>,
    /// Each key's first record, by its index in `records`.
    firsts: std::collections::HashMap<String, usize>,
}

impl Workload {
    /// An empty workload for a topic of `partitions` partitions (at least 1).
    pub fn new(partitions: i32) -> Self {
        Workload {
            partitions: partitions.max(1),
            records: Vec::new(),
            firsts: Default::default(),
        }
    }

    /// Original records, spread over the partitions in turn. A key used twice is a
    /// [`RecordKind::Repeat`] (same payload) or a [`RecordKind::ConflictingRepeat`].
    pub fn records(mut self, records: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        for (key, payload) in records {
            let partition = self.records.len() as i32 % self.partitions;
            self = self.record_on(partition, key, payload);
        }
        self
    }

    /// One record on `partition` (taken modulo the partition count), as a producer that
    /// partitions by key would send it: an original, a [`RecordKind::Repeat`] or a
    /// [`RecordKind::ConflictingRepeat`] as for [`records`](Self::records).
    pub fn record_on(
        mut self,
        partition: i32,
        key: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        let (key, payload) = (key.into(), payload.into());
        let kind = match self.first(&key) {
            None => RecordKind::Original,
            Some(first) if first.payload == payload => RecordKind::Repeat,
            Some(_) => RecordKind::ConflictingRepeat,
        };
        if kind == RecordKind::Original {
            self.firsts.insert(key.clone(), self.records.len());
        }
        self.records.push(WorkRecord {
            key,
            payload,
            partition: partition.rem_euclid(self.partitions),
            kind,
        });
        self
    }

    /// After every `every`-th original, one earlier original sent again at a new offset (on
    /// the next partition): about one record in `every + 1` is a duplicate.
    pub fn repeats(mut self, every: usize) -> Self {
        let every = every.max(1);
        let mut out = Vec::with_capacity(self.records.len() * (every + 1) / every);
        // Where each original is in `out`.
        let mut earlier: Vec<usize> = Vec::new();
        for r in std::mem::take(&mut self.records) {
            let original = r.kind == RecordKind::Original;
            out.push(r);
            if original {
                earlier.push(out.len() - 1);
                if earlier.len().is_multiple_of(every) {
                    // A deterministic earlier original: the stream is the same on every run.
                    let pick = out[earlier[(earlier.len() * 7919) % earlier.len()]].clone();
                    out.push(WorkRecord {
                        partition: (pick.partition + 1) % self.partitions,
                        kind: RecordKind::Repeat,
                        ..pick
                    });
                }
            }
        }
        self.firsts = earlier.iter().map(|&i| (out[i].key.clone(), i)).collect();
        self.records = out;
        self
    }

    /// The first record of `key` again with `payload` instead of its own: a conflict.
    pub fn conflicting_repeat(mut self, key: &str, payload: impl Into<Vec<u8>>) -> Self {
        let partition = self.first(key).map_or(0, |r| r.partition);
        self.records.push(WorkRecord {
            key: key.to_owned(),
            payload: payload.into(),
            partition,
            kind: RecordKind::ConflictingRepeat,
        });
        self
    }

    /// Every record, in the order they are sent.
    pub fn all(&self) -> &[WorkRecord] {
        &self.records
    }

    /// The first record of each key: what an exactly-once handler applies.
    pub fn originals(&self) -> impl Iterator<Item = &WorkRecord> {
        self.records
            .iter()
            .filter(|r| r.kind == RecordKind::Original)
    }

    fn first(&self, key: &str) -> Option<&WorkRecord> {
        self.firsts.get(key).map(|&i| &self.records[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_knows_its_repeats_and_conflicts() {
        let w = Workload::new(2)
            .records((0..10).map(|i| (format!("k{i}"), vec![i as u8])))
            .repeats(5)
            .conflicting_repeat("k3", b"other".to_vec())
            .records([("k1".to_owned(), vec![1u8])]);
        let kinds = |k: RecordKind| w.all().iter().filter(|r| r.kind == k).count();
        assert_eq!(kinds(RecordKind::Original), 10);
        assert_eq!(
            kinds(RecordKind::Repeat),
            3,
            "two from repeats(5), one by hand"
        );
        assert_eq!(kinds(RecordKind::ConflictingRepeat), 1);
        assert_eq!(w.originals().count(), 10);
        assert!(w.all().iter().all(|r| r.partition < 2));
        let conflict = w
            .all()
            .iter()
            .find(|r| r.kind == RecordKind::ConflictingRepeat)
            .unwrap();
        assert_eq!(
            (conflict.key.as_str(), conflict.partition),
            ("k3", w.first("k3").unwrap().partition)
        );
    }
}
