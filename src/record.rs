//! The record a handler receives.
//!
//! [`Record`] is an owned copy of one Kafka message: topic, partition, offset, key, payload,
//! headers and timestamp, plus a typed JSON decode whose error carries serde's message and the
//! record's position, so a handler can use `?` and the runtime dead-letters the record with a clear
//! reason instead of losing it.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};
use serde::de::DeserializeOwned;

use crate::error::RecordPosition;

/// One header of a record. The value may be absent (a null header) and need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Raw header value, `None` for a null value.
    pub value: Option<Vec<u8>>,
}

/// An owned Kafka record as handed to a handler.
///
/// The copy out of the Kafka client costs one allocation for the key and payload together
/// (`bytes`, the key first) and shares its partition's topic name: the runtime copies every
/// record it reads, so these are per-record costs.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    /// The key's bytes, then the payload's.
    bytes: Vec<u8>,
    /// The key's length in `bytes`, `None` for a record without a key.
    key_len: Option<usize>,
    /// False for a tombstone (null payload).
    has_payload: bool,
    headers: Vec<Header>,
    timestamp_ms: Option<i64>,
    /// Positions of headers the Kafka client could not read (a name that is not UTF-8): left
    /// out of `headers`; the runtime dead-letters such a record.
    unreadable_headers: Vec<usize>,
}

impl fmt::Debug for Record {
    // Payloads and keys may hold personal data: show sizes, not contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("key_len", &self.key().map(<[u8]>::len))
            .field("payload_len", &self.payload().map(<[u8]>::len))
            .field("headers", &self.headers.len())
            .field("timestamp_ms", &self.timestamp_ms)
            .finish()
    }
}

impl Record {
    /// Builds a record by hand, for tests of handlers and for replaying stored dead letters.
    pub fn new(
        topic: impl Into<String>,
        partition: i32,
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
    ) -> Self {
        let topic: String = topic.into();
        Record::from_parts(
            Arc::from(topic),
            partition,
            offset,
            key.as_deref(),
            payload.as_deref(),
        )
    }

    fn from_parts(
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Self {
        let (k, p) = (key.unwrap_or_default(), payload.unwrap_or_default());
        let mut bytes = Vec::with_capacity(k.len() + p.len());
        bytes.extend_from_slice(k);
        bytes.extend_from_slice(p);
        Record {
            topic,
            partition,
            offset,
            bytes,
            key_len: key.map(<[u8]>::len),
            has_payload: payload.is_some(),
            headers: Vec::new(),
            timestamp_ms: None,
            unreadable_headers: Vec::new(),
        }
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: impl Into<String>, value: Option<Vec<u8>>) -> Self {
        self.headers.push(Header {
            name: name.into(),
            value,
        });
        self
    }

    /// Sets the timestamp in milliseconds since the epoch (builder style).
    pub fn with_timestamp_ms(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// The copy of `message`, a record of `topic` (shared by its partition's records).
    pub(crate) fn from_message(message: &BorrowedMessage<'_>, topic: &Arc<str>) -> Self {
        let mut record = Record::from_parts(
            topic.clone(),
            message.partition(),
            message.offset(),
            message.key(),
            message.payload(),
        );
        record.timestamp_ms = message.timestamp().to_millis();
        if let Some(hs) = message.headers() {
            let (headers, unreadable_headers) =
                (&mut record.headers, &mut record.unreadable_headers);
            headers.reserve_exact(hs.count());
            for i in 0..hs.count() {
                // rdkafka reads a header's name as UTF-8 and panics on anything else (the
                // protocol allows any bytes). Caught here, outside every handler, or the
                // partition would halt on this record forever; the record is dead-lettered.
                match std::panic::catch_unwind(AssertUnwindSafe(|| hs.try_get(i))) {
                    Ok(Some(h)) => headers.push(Header {
                        name: h.key.to_owned(),
                        value: h.value.map(<[u8]>::to_vec),
                    }),
                    Ok(None) => break,
                    Err(_) => unreadable_headers.push(i),
                }
            }
        }
        record
    }

    /// Why the record cannot be handled as it was sent, if it cannot: a header the Kafka
    /// client could not read.
    /// The bytes the record holds: key, payload, header names and values.
    pub(crate) fn size_bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.as_ref().map_or(0, Vec::len))
            .sum();
        self.bytes.len() + headers
    }

    pub(crate) fn unreadable(&self) -> Option<String> {
        let first = self.unreadable_headers.first()?;
        Some(format!(
            "{} header(s), the first at #{first}, with a name that is not UTF-8, which the \
             Kafka client cannot read; the record is kept without them",
            self.unreadable_headers.len()
        ))
    }

    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition number.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Offset in the partition.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The record key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.key_len.map(|n| &self.bytes[..n])
    }

    /// The payload; `None` for a tombstone (null payload).
    pub fn payload(&self) -> Option<&[u8]> {
        self.has_payload
            .then(|| &self.bytes[self.key_len.unwrap_or(0)..])
    }

    /// All headers in order.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The value of the last header with this name (`None` if absent or null).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.name == name)
            .and_then(|h| h.value.as_deref())
    }

    /// Timestamp in milliseconds since the epoch, when the broker supplied one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp_ms
    }

    /// Topic, partition and offset.
    pub fn position(&self) -> RecordPosition {
        RecordPosition {
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: self.offset,
        }
    }

    /// Decodes the payload as JSON into `T`.
    ///
    /// A tombstone, an empty payload or invalid JSON give a [`DecodeError`] that says which record
    /// and carries serde's message. It converts into a permanent
    /// [`HandlerError`](crate::HandlerError), so `record.json::<T>()?` in a handler sends an
    /// undecodable record to the dead-letter path instead of losing it.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let bytes = match self.payload() {
            None => return Err(self.decode_error("payload is null (tombstone)".to_owned())),
            Some([]) => return Err(self.decode_error("payload is empty".to_owned())),
            Some(bytes) => bytes,
        };
        serde_json::from_slice(bytes).map_err(|e| self.decode_error(e.to_string()))
    }

    fn decode_error(&self, message: String) -> DecodeError {
        DecodeError {
            at: self.position(),
            message,
        }
    }
}

/// A payload that could not be decoded into the handler's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode payload of {at} as JSON: {message}")]
pub struct DecodeError {
    /// The record.
    pub at: RecordPosition,
    /// The decoder's message (serde's, for JSON).
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Payment {
        amount: i64,
    }

    #[test]
    fn json_decodes_and_reports_serde_message() {
        let ok = Record::new("t", 0, 1, None, Some(br#"{"amount":5}"#.to_vec()));
        assert_eq!(ok.json::<Payment>().unwrap(), Payment { amount: 5 });

        let bad = Record::new("t", 2, 7, None, Some(b"{not json".to_vec()));
        let err = bad.json::<Payment>().unwrap_err();
        assert_eq!(err.at.to_string(), "t/2@7");
        assert!(err.to_string().contains("key must be a string"), "{err}");

        let tomb = Record::new("t", 0, 1, None, None);
        assert!(
            tomb.json::<Payment>()
                .unwrap_err()
                .message
                .contains("tombstone")
        );
        let empty = Record::new("t", 0, 1, None, Some(Vec::new()));
        assert!(
            empty
                .json::<Payment>()
                .unwrap_err()
                .message
                .contains("empty")
        );
    }

    #[test]
    fn key_and_payload_keep_apart_in_one_buffer() {
        let cases = [
            (None, None),
            (Some(b"k".to_vec()), None),
            (None, Some(b"p".to_vec())),
            (Some(Vec::new()), Some(Vec::new())),
            (Some(b"key".to_vec()), Some(b"payload".to_vec())),
        ];
        for (key, payload) in cases {
            let r = Record::new("t", 0, 0, key.clone(), payload.clone());
            assert_eq!(r.key(), key.as_deref());
            assert_eq!(r.payload(), payload.as_deref());
            assert_eq!(
                r.size_bytes(),
                key.map_or(0, |k| k.len()) + payload.map_or(0, |p| p.len())
            );
        }
        // Equal records are the same key and payload, not the same bytes split elsewhere.
        let a = Record::new("t", 0, 0, Some(b"ab".to_vec()), Some(b"c".to_vec()));
        let b = Record::new("t", 0, 0, Some(b"a".to_vec()), Some(b"bc".to_vec()));
        assert_ne!(a, b);
        assert_eq!(a.clone(), a);
    }

    #[test]
    fn last_header_wins_and_null_is_absent() {
        let r = Record::new("t", 0, 0, None, None)
            .with_header("k", Some(b"a".to_vec()))
            .with_header("k", Some(b"b".to_vec()))
            .with_header("n", None);
        assert_eq!(r.header("k"), Some(&b"b"[..]));
        assert_eq!(r.header("n"), None);
        assert_eq!(r.header("missing"), None);
    }

    #[test]
    fn debug_does_not_print_payload() {
        let r = Record::new(
            "t",
            0,
            0,
            Some(b"secret-key".to_vec()),
            Some(b"card=4111".to_vec()),
        );
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("4111") && !shown.contains("secret"),
            "{shown}"
        );
    }
}
