//! What a store keeps per idempotency key, and the byte encoding the embedded store uses for it.
//!
//! The encoding starts with a version byte so later versions can read older entries; decoding
//! never panics on bad bytes, it returns [`Error::Corrupt`]. Property tests check round trips.

use crate::error::{Error, Result};
use crate::identity::Fingerprint;

/// What became of the record that first used a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryStatus {
    /// The handler succeeded and its effects were committed with this entry.
    Completed,
    /// The record was sent to the dead-letter path.
    DeadLettered,
    /// The record was settled by the resolver (feature `resolve`) without its handler:
    /// superseded, stale, a conflict or rejected. Its resolution record says why.
    Resolved,
}

impl EntryStatus {
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))] // the embedded store's encoding
    fn code(self) -> u8 {
        match self {
            EntryStatus::Completed => 1,
            EntryStatus::DeadLettered => 2,
            EntryStatus::Resolved => 3,
        }
    }

    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    fn from_code(code: u8) -> Result<Self> {
        match code {
            1 => Ok(EntryStatus::Completed),
            2 => Ok(EntryStatus::DeadLettered),
            3 => Ok(EntryStatus::Resolved),
            other => Err(Error::Corrupt(format!("unknown entry status {other}"))),
        }
    }

    /// Lower-case name, for traces and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Completed => "completed",
            EntryStatus::DeadLettered => "dead_lettered",
            EntryStatus::Resolved => "resolved",
        }
    }
}

/// The dedup entry stored for one idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupEntry {
    /// What became of the first record with this key.
    pub status: EntryStatus,
    /// Fingerprint of that record's payload.
    pub fingerprint: Fingerprint,
    /// The handler's outcome bytes, kept to answer duplicates with the original result.
    pub outcome: Option<Vec<u8>>,
    /// Topic of the first record.
    pub topic: String,
    /// Partition of the first record.
    pub partition: i32,
    /// Offset of the first record.
    pub offset: i64,
    /// When the entry was written, milliseconds since the epoch.
    pub created_at_ms: i64,
    /// When the entry stops counting, milliseconds since the epoch.
    pub expires_at_ms: i64,
}

#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
const ENTRY_VERSION: u8 = 1;

/// The first byte of a request key's entry (`store/request.rs`): version, state (u8), lease
/// end, creation and expiry times (i64 each), then fingerprint, lease token and answer.
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub(crate) const REQUEST_ENTRY_VERSION: u8 = 2;

impl DedupEntry {
    /// True once the retention window has passed: the key is admitted again.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms <= now_ms
    }

    /// Encodes the entry.
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn encode(&self) -> Vec<u8> {
        let outcome_len = self.outcome.as_ref().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(64 + self.topic.len() + outcome_len);
        out.push(ENTRY_VERSION);
        out.push(self.status.code());
        out.extend_from_slice(&self.fingerprint.0);
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.created_at_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        put_bytes(&mut out, self.topic.as_bytes());
        match &self.outcome {
            None => out.push(0),
            Some(bytes) => {
                out.push(1);
                put_bytes(&mut out, bytes);
            }
        }
        out
    }

    /// A reader past the version byte of an encoded entry, which must be this version.
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    fn reader(bytes: &[u8]) -> Result<Reader<'_>> {
        let mut r = Reader::new(bytes, "dedup entry");
        let version = r.u8()?;
        if version != ENTRY_VERSION {
            return Err(Error::Corrupt(format!(
                "dedup entry version {version} is not supported"
            )));
        }
        Ok(r)
    }

    /// The expiry time of an encoded entry, without decoding the rest: of a consumer's entry
    /// or of a request's key (`REQUEST_ENTRY_VERSION`, beside them in the embedded store).
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn encoded_expiry(bytes: &[u8]) -> Result<i64> {
        if bytes.first() == Some(&REQUEST_ENTRY_VERSION) {
            let mut r = Reader::new(bytes, "request entry");
            // Version, state, lease end, creation time.
            r.take(1 + 1 + 8 + 8)?;
            return Ok(i64::from_be_bytes(r.array()?));
        }
        let mut r = Self::reader(bytes)?;
        // Status, fingerprint, partition, offset, creation time.
        r.take(1 + 32 + 4 + 8 + 8)?;
        Ok(i64::from_be_bytes(r.array()?))
    }

    /// Decodes an entry written by [`DedupEntry::encode`].
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Self::reader(bytes)?;
        let status = EntryStatus::from_code(r.u8()?)?;
        let fingerprint = Fingerprint(r.array()?);
        let partition = i32::from_be_bytes(r.array()?);
        let offset = i64::from_be_bytes(r.array()?);
        let created_at_ms = i64::from_be_bytes(r.array()?);
        let expires_at_ms = i64::from_be_bytes(r.array()?);
        let topic = r.string()?;
        let outcome = match r.u8()? {
            0 => None,
            1 => Some(r.bytes()?.to_vec()),
            other => return Err(Error::Corrupt(format!("bad outcome flag {other}"))),
        };
        r.finish()?;
        Ok(DedupEntry {
            status,
            fingerprint,
            outcome,
            topic,
            partition,
            offset,
            created_at_ms,
            expires_at_ms,
        })
    }
}

/// Appends a u32 length and the bytes.
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("field over 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A bounds-checked reader over an encoded value.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(Error::Corrupt(format!("{} is truncated", self.what)));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        self.take(len)
    }

    pub(crate) fn string(&mut self) -> Result<String> {
        let what = self.what;
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| Error::Corrupt(format!("{what} holds a non-UTF-8 string")))
    }

    /// True once every byte was read.
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn finish(self) -> Result<()> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(Error::Corrupt(format!("{} has trailing bytes", self.what)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry_strategy() -> impl Strategy<Value = DedupEntry> {
        (
            prop_oneof![
                Just(EntryStatus::Completed),
                Just(EntryStatus::DeadLettered)
            ],
            any::<[u8; 32]>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            ".{0,16}",
            any::<i32>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(status, fp, outcome, topic, partition, offset, c, e)| DedupEntry {
                    status,
                    fingerprint: Fingerprint(fp),
                    outcome,
                    topic,
                    partition,
                    offset,
                    created_at_ms: c,
                    expires_at_ms: e,
                },
            )
    }

    proptest! {
        #[test]
        fn entry_round_trips(entry in entry_strategy()) {
            prop_assert_eq!(DedupEntry::decode(&entry.encode()).unwrap(), entry);
        }

        #[test]
        fn expiry_reads_from_the_encoding(entry in entry_strategy()) {
            prop_assert_eq!(
                DedupEntry::encoded_expiry(&entry.encode()).unwrap(),
                entry.expires_at_ms
            );
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = DedupEntry::decode(&bytes);
        }

        #[test]
        fn truncation_is_an_error(entry in entry_strategy(), cut in 1usize..40) {
            let bytes = entry.encode();
            let cut = cut.min(bytes.len());
            prop_assert!(DedupEntry::decode(&bytes[..bytes.len() - cut]).is_err());
        }
    }

    #[test]
    fn unknown_version_is_reported() {
        let err = DedupEntry::decode(&[9, 1]).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
    }
}
