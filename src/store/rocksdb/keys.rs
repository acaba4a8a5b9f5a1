//! The RocksDB store's column families and how its keys and rows are encoded.
//!
//! Every multi-part key is length-prefixed or fixed-width, and numbers are big-endian with the
//! sign bit flipped where they can be negative, so RocksDB's byte order is the numeric order.

use crate::error::{Error, Result};
use crate::store::entry::Reader;
use crate::store::{PartitionId, StoredPosition};

pub(super) const CF_DEDUP: &str = "dedup";
pub(super) const CF_EXPIRY: &str = "expiry";
pub(super) const CF_POSITIONS: &str = "positions";
pub(super) const CF_DEAD_LETTERS: &str = "dead_letters";
pub(super) const CF_DATA: &str = "data";
/// The store's own facts: its id.
pub(super) const CF_META: &str = "meta";
/// Published rows waiting for the relay (feature `outbox`), by sequence number.
pub(super) const CF_OUTBOX: &str = "outbox";
/// Published rows the broker refused for good, by sequence number.
pub(super) const CF_OUTBOX_DEAD: &str = "outbox_dead";
/// Each entity's state, by group and entity (feature `resolve`): never purged.
pub(super) const CF_ENTITIES: &str = "entities";
/// Resolution records, by group, entity and number (feature `resolve`).
pub(super) const CF_RESOLUTIONS: &str = "resolutions";
/// The purge's index of resolution records: expiry time, then the record's key; empty values.
pub(super) const CF_RESOLUTION_EXPIRY: &str = "resolution_expiry";
/// The audit log of operators' commands, newest first: the inverted start time, then the id.
pub(super) const CF_AUDIT: &str = "audit";
/// Redrive marks of dead letters, keyed like the letters.
pub(super) const CF_REDRIVES: &str = "redrives";
/// Every family, created on open whatever the features (one layout for every build).
pub(super) const ALL_CFS: [&str; 13] = [
    CF_DEDUP,
    CF_EXPIRY,
    CF_POSITIONS,
    CF_DEAD_LETTERS,
    CF_DATA,
    CF_META,
    CF_OUTBOX,
    CF_OUTBOX_DEAD,
    CF_ENTITIES,
    CF_RESOLUTIONS,
    CF_RESOLUTION_EXPIRY,
    CF_AUDIT,
    CF_REDRIVES,
];

/// The key of the store id in `meta`.
pub(super) const STORE_ID_KEY: &[u8] = b"store_id";

impl StoredPosition {
    pub(super) fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.next_offset.unwrap_or(-1).to_be_bytes());
        out[8..].copy_from_slice(&self.epoch.to_be_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "position");
        let next = i64::from_be_bytes(r.array()?);
        let epoch = u64::from_be_bytes(r.array()?);
        r.finish()?;
        Ok(StoredPosition {
            next_offset: (next >= 0).then_some(next),
            epoch,
        })
    }
}

pub(super) fn position_key(p: &PartitionId) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + p.group.len() + p.topic.len());
    for part in [p.group.as_bytes(), p.topic.as_bytes()] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part);
    }
    k.extend_from_slice(&p.partition.to_be_bytes());
    k
}

/// The key of an audit record: newest first.
pub(super) fn audit_key(record: &crate::store::AuditRecord) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + record.id.len());
    k.extend_from_slice(&(u64::MAX - ((record.at_ms as u64) ^ (1 << 63))).to_be_bytes());
    k.extend_from_slice(record.id.as_bytes());
    k
}

/// The partition a `positions` key names (the inverse of [`position_key`]).
pub(super) fn decode_position_key(key: &[u8]) -> Result<PartitionId> {
    let mut r = Reader::new(key, "position key");
    let (group, topic) = (r.string()?, r.string()?);
    let partition = i32::from_be_bytes(r.array()?);
    r.finish()?;
    Ok(PartitionId::new(group, topic, partition))
}

/// Expiry index key of the entries one commit wrote with one expiry time: the time first
/// (order-preserving for negative values too), then what makes the commit unique (epoch, next
/// offset, partition; a partition's position only moves forward within an epoch). The value
/// lists the entries' keys.
pub(super) fn expiry_key(
    expires_at_ms: i64,
    epoch: u64,
    next_offset: i64,
    position_key: &[u8],
) -> Vec<u8> {
    let mut k = Vec::with_capacity(24 + position_key.len());
    k.extend_from_slice(&((expires_at_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(&epoch.to_be_bytes());
    k.extend_from_slice(&next_offset.to_be_bytes());
    k.extend_from_slice(position_key);
    k
}

/// Expiry index key of one request key's entry (the one-entry layout, with an empty value):
/// the time, then the store key.
#[cfg(feature = "http")]
pub(super) fn request_expiry_key(expires_at_ms: i64, store_key: &[u8]) -> Vec<u8> {
    time_prefixed_key(expires_at_ms, store_key)
}

/// Index key of a resolution record in `resolution_expiry`: the time, then the record's key.
#[cfg(feature = "resolve")]
pub(super) fn resolution_expiry_key(expires_at_ms: i64, resolution_key: &[u8]) -> Vec<u8> {
    time_prefixed_key(expires_at_ms, resolution_key)
}

/// A key of an index in time order: the time (order-preserving for negative values too), then `key`.
#[cfg(any(feature = "http", feature = "resolve"))]
fn time_prefixed_key(expires_at_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&((expires_at_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The expiry time of an index row.
pub(super) fn expiry_of(index_key: &[u8]) -> Result<i64> {
    let t = index_key
        .first_chunk::<8>()
        .ok_or_else(|| Error::Corrupt("expiry index key is truncated".into()))?;
    Ok((u64::from_be_bytes(*t) ^ (1 << 63)) as i64)
}

/// The dedup keys an index row stands for. A row with an empty value is of the earlier
/// one-row-per-entry layout: its key holds the entry's key after the time.
pub(super) fn indexed_keys<'a>(index_key: &'a [u8], value: &'a [u8]) -> Result<Vec<&'a [u8]>> {
    if value.is_empty() {
        return Ok(vec![&index_key[8..]]);
    }
    let mut keys = Vec::new();
    let mut r = Reader::new(value, "expiry index row");
    while !r.is_empty() {
        keys.push(r.bytes()?);
    }
    Ok(keys)
}

/// The consumer group of an index row's entries: of the partition that wrote them (its
/// position key follows time, epoch and offset), or for a row of the earlier layout, of its
/// one entry's store key. `None` when the row does not say.
pub(super) fn group_of_row<'a>(index_key: &'a [u8], value: &'a [u8]) -> Option<&'a [u8]> {
    if value.is_empty() {
        return crate::identity::split_store_key(index_key.get(8..)?).map(|(g, _, _)| g);
    }
    let position = index_key.get(24..)?;
    let (len, rest) = position.split_first_chunk::<4>()?;
    rest.get(..u32::from_be_bytes(*len) as usize)
}

pub(super) fn dead_letter_key(
    group: &str,
    record_topic: &str,
    partition: i32,
    offset: i64,
) -> Vec<u8> {
    let p = PartitionId::new(group, record_topic, partition);
    let mut k = position_key(&p);
    k.extend_from_slice(&((offset as u64) ^ (1 << 63)).to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_keys_sort_by_time_including_negative() {
        let mut ks = [
            expiry_key(5, 1, 0, b"a"),
            expiry_key(-3, 9, 7, b"b"),
            expiry_key(0, 2, 1, b"c"),
        ];
        ks.sort();
        let times: Vec<i64> = ks.iter().map(|k| expiry_of(k).unwrap()).collect();
        assert_eq!(times, [-3, 0, 5]);
    }

    #[test]
    fn positions_round_trip() {
        for next_offset in [None, Some(0), Some(i64::MAX)] {
            let p = StoredPosition {
                next_offset,
                epoch: 7,
            };
            assert_eq!(StoredPosition::decode(&p.encode()).unwrap(), p);
        }
        assert!(StoredPosition::decode(&[0; 15]).is_err(), "truncated");
    }
}
