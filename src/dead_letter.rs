//! Records that could not be applied, kept with the reason, never dropped.
//!
//! A [`DeadLetter`] holds the original record (key, payload, headers, position), the idempotency
//! key when there was one, the reason class and message, the attempt count and the failure
//! times. The runtime writes it through the store's transaction, in the same commit as the
//! partition position and the key's `dead_lettered` dedup entry, so a redelivered record is not
//! dead-lettered twice and a crash cannot lose it.
//!
//! It is also produced to a dead-letter topic ([`DeadLetterTopic`], default `<topic>.dlq`) with
//! the original key, payload and headers plus `dlq.*` headers, by an idempotent producer, and
//! acknowledged before that commit: at least once, never lost.

use std::fmt;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::error::{Error, Result};
use crate::record::Record;
use crate::store::entry::{Reader, put_bytes};

/// Why a record was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The handler returned a permanent error (this includes undecodable payloads).
    Permanent,
    /// The handler kept failing with retryable errors until the attempts ran out.
    RetriesExhausted,
    /// The record's key was already used by a record with a different payload.
    Conflict,
    /// The record has no usable idempotency key (missing or over the length limit).
    InvalidKey,
}

impl DeadLetterReason {
    /// Lower-case name, as written to headers and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Permanent => "permanent",
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::Conflict => "conflict",
            DeadLetterReason::InvalidKey => "invalid_key",
        }
    }

    fn code(self) -> u8 {
        match self {
            DeadLetterReason::Permanent => 1,
            DeadLetterReason::RetriesExhausted => 2,
            DeadLetterReason::Conflict => 3,
            DeadLetterReason::InvalidKey => 4,
        }
    }

    #[cfg_attr(not(any(feature = "rocksdb", feature = "postgres")), allow(dead_code))]
    fn from_code(code: u8) -> Result<Self> {
        Ok(match code {
            1 => DeadLetterReason::Permanent,
            2 => DeadLetterReason::RetriesExhausted,
            3 => DeadLetterReason::Conflict,
            4 => DeadLetterReason::InvalidKey,
            other => {
                return Err(Error::Corrupt(format!(
                    "unknown dead-letter reason {other}"
                )));
            }
        })
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that was not applied, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The original record, bytes untouched.
    pub record: Record,
    /// The idempotency key, when the record had one.
    pub key: Option<Vec<u8>>,
    /// The reason class.
    pub reason: DeadLetterReason,
    /// The error message.
    pub message: String,
    /// How many times the handler ran on it (0 when it never ran).
    pub attempts: u32,
    /// When it first failed, milliseconds since the epoch.
    pub first_failed_at_ms: i64,
    /// When it was dead-lettered (its last failure), milliseconds since the epoch.
    pub failed_at_ms: i64,
    /// The id of the attempt at a batch that dead-lettered it, also produced as the
    /// `dlq.batch.id` header. The dead-letter topic is at least once: an attempt whose store
    /// commit then failed or was fenced has already produced its letters, and a later attempt
    /// may apply the record (or dead-letter it again, under a new id). The store's letters are
    /// written in the commit and are exact; a letter on the topic is current when its batch id
    /// is among them. `None` for letters kept by versions before the id.
    pub batch_id: Option<String>,
}

/// The whole letter, payload included, without a batch id (read only).
#[cfg_attr(not(any(feature = "rocksdb", feature = "postgres")), allow(dead_code))]
const DEAD_LETTER_V1: u8 = 1;
/// The letter without its payload, which the store keeps beside it (PostgreSQL's `payload`
/// column), so the payload is stored once; without a batch id (read only).
#[cfg_attr(not(any(feature = "rocksdb", feature = "postgres")), allow(dead_code))]
const DEAD_LETTER_APART_V2: u8 = 2;
/// Version 1 followed by the batch id.
const DEAD_LETTER_VERSION: u8 = 3;
/// Version 2 followed by the batch id.
const DEAD_LETTER_APART_VERSION: u8 = 4;

impl DeadLetter {
    /// Encodes the dead letter for the embedded store.
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.encode_with(true)
    }

    /// Encodes the dead letter without its payload, for a store that keeps the payload beside
    /// it; read it back with [`DeadLetter::decode_apart`].
    #[cfg(any(feature = "postgres", test))]
    pub(crate) fn encode_apart(&self) -> Vec<u8> {
        self.encode_with(false)
    }

    fn encode_with(&self, with_payload: bool) -> Vec<u8> {
        let r = &self.record;
        let capacity = 128
            + if with_payload {
                r.payload().map_or(0, <[u8]>::len)
            } else {
                0
            };
        let mut out = Vec::with_capacity(capacity);
        out.push(if with_payload {
            DEAD_LETTER_VERSION
        } else {
            DEAD_LETTER_APART_VERSION
        });
        out.push(self.reason.code());
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&self.first_failed_at_ms.to_be_bytes());
        out.extend_from_slice(&self.failed_at_ms.to_be_bytes());
        put_bytes(&mut out, self.message.as_bytes());
        put_opt(&mut out, self.key.as_deref());
        put_bytes(&mut out, r.topic().as_bytes());
        out.extend_from_slice(&r.partition().to_be_bytes());
        out.extend_from_slice(&r.offset().to_be_bytes());
        match r.timestamp_ms() {
            None => out.push(0),
            Some(ts) => {
                out.push(1);
                out.extend_from_slice(&ts.to_be_bytes());
            }
        }
        put_opt(&mut out, r.key());
        if with_payload {
            put_opt(&mut out, r.payload());
        }
        out.extend_from_slice(&(r.headers().len() as u32).to_be_bytes());
        for h in r.headers() {
            put_bytes(&mut out, h.name.as_bytes());
            put_opt(&mut out, h.value.as_deref());
        }
        put_opt(&mut out, self.batch_id.as_deref().map(str::as_bytes));
        out
    }

    /// Decodes a dead letter written by [`DeadLetter::encode`].
    #[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        Self::decode_apart(bytes, None)
    }

    /// Decodes a dead letter written by [`DeadLetter::encode_apart`], whose payload the store
    /// kept beside it (`payload`), or by [`DeadLetter::encode`] (then `payload` is not used).
    #[cfg_attr(not(any(feature = "rocksdb", feature = "postgres")), allow(dead_code))]
    pub(crate) fn decode_apart(bytes: &[u8], payload: Option<Vec<u8>>) -> Result<Self> {
        let mut rd = Reader::new(bytes, "dead letter");
        let version = rd.u8()?;
        let (whole, with_batch) = match version {
            DEAD_LETTER_V1 => (true, false),
            DEAD_LETTER_APART_V2 => (false, false),
            DEAD_LETTER_VERSION => (true, true),
            DEAD_LETTER_APART_VERSION => (false, true),
            _ => {
                return Err(Error::Corrupt(format!(
                    "dead letter version {version} is not supported"
                )));
            }
        };
        let reason = DeadLetterReason::from_code(rd.u8()?)?;
        let attempts = u32::from_be_bytes(rd.array()?);
        let first_failed_at_ms = i64::from_be_bytes(rd.array()?);
        let failed_at_ms = i64::from_be_bytes(rd.array()?);
        let message = rd.string()?;
        let key = get_opt(&mut rd)?;
        let topic = rd.string()?;
        let partition = i32::from_be_bytes(rd.array()?);
        let offset = i64::from_be_bytes(rd.array()?);
        let timestamp = match rd.u8()? {
            0 => None,
            _ => Some(i64::from_be_bytes(rd.array()?)),
        };
        let record_key = get_opt(&mut rd)?;
        let payload = if whole { get_opt(&mut rd)? } else { payload };
        let mut record = Record::new(topic, partition, offset, record_key, payload);
        if let Some(ts) = timestamp {
            record = record.with_timestamp_ms(ts);
        }
        let headers = u32::from_be_bytes(rd.array()?);
        for _ in 0..headers {
            let name = rd.string()?;
            record = record.with_header(name, get_opt(&mut rd)?);
        }
        let batch_id = if with_batch {
            get_opt(&mut rd)?
                .map(String::from_utf8)
                .transpose()
                .map_err(|_| Error::Corrupt("dead letter batch id is not UTF-8".into()))?
        } else {
            None
        };
        rd.finish()?;
        Ok(DeadLetter {
            record,
            key,
            reason,
            message,
            attempts,
            first_failed_at_ms,
            failed_at_ms,
            batch_id,
        })
    }

    /// The headers of the dead-letter topic record: the original headers, then `dlq.*` headers
    /// with the original position, the idempotency key, the reason class and message, the
    /// attempts, the first and last failure times and the batch id; for a letter too large to
    /// produce whole,
    /// what was left out (`dlq.payload.omitted`, `dlq.headers.omitted`: how many bytes, how
    /// many headers).
    fn topic_headers(&self, shape: Shape) -> OwnedHeaders {
        let r = &self.record;
        let mut headers = OwnedHeaders::new_with_capacity(r.headers().len() + 12);
        if shape == Shape::Bare {
            let count = r.headers().len().to_string();
            headers = headers.insert(Header {
                key: "dlq.headers.omitted",
                value: Some(count.as_bytes()),
            });
        } else {
            for h in r.headers() {
                headers = headers.insert(Header {
                    key: &h.name,
                    value: h.value.as_deref(),
                });
            }
        }
        if shape != Shape::Whole {
            let bytes = r.payload().map_or(0, <[u8]>::len).to_string();
            headers = headers.insert(Header {
                key: "dlq.payload.omitted",
                value: Some(bytes.as_bytes()),
            });
        }
        let text = [
            ("dlq.original.topic", r.topic().to_owned()),
            ("dlq.original.partition", r.partition().to_string()),
            ("dlq.original.offset", r.offset().to_string()),
            ("dlq.error.class", self.reason.as_str().to_owned()),
            ("dlq.error.message", self.message.clone()),
            ("dlq.attempts", self.attempts.to_string()),
            ("dlq.first.failure.ms", self.first_failed_at_ms.to_string()),
            ("dlq.last.failure.ms", self.failed_at_ms.to_string()),
        ];
        for (key, value) in &text {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        if let Some(batch_id) = &self.batch_id {
            headers = headers.insert(Header {
                key: "dlq.batch.id",
                value: Some(batch_id.as_bytes()),
            });
        }
        headers.insert(Header {
            key: "dlq.idempotency.key",
            value: self.key.as_deref(),
        })
    }
}

/// How much of the original record a dead-letter topic record carries. A letter must always be
/// producible, or the runtime could not commit past its record: when the whole record is over
/// the producer's size limit, the payload is left out, then the original headers too (the store
/// keeps the whole record either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Whole,
    NoPayload,
    Bare,
}

/// Where dead letters are produced, besides the store that always keeps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterTopic {
    /// The source topic's name plus this suffix (default: `.dlq`).
    Suffix(String),
    /// One topic for every source topic.
    Fixed(String),
    /// No topic: dead letters are kept in the store only.
    Disabled,
}

impl Default for DeadLetterTopic {
    fn default() -> Self {
        DeadLetterTopic::Suffix(".dlq".to_owned())
    }
}

impl DeadLetterTopic {
    /// The dead-letter topic of records from `source`.
    pub fn topic_for(&self, source: &str) -> Option<String> {
        match self {
            DeadLetterTopic::Suffix(suffix) => Some(format!("{source}{suffix}")),
            DeadLetterTopic::Fixed(topic) => Some(topic.clone()),
            DeadLetterTopic::Disabled => None,
        }
    }
}

/// Produces dead letters with an idempotent producer and waits for every acknowledgement.
pub(crate) struct DeadLetterProducer {
    producer: FutureProducer,
    topics: DeadLetterTopic,
}

/// Consumer-only properties the producer must not be given.
const CONSUMER_ONLY: [&str; 8] = [
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
];

/// A producer's configuration with the consumer's connection settings (brokers, security).
pub(crate) fn producer_config(consumer: &ClientConfig) -> ClientConfig {
    let mut config = consumer.clone();
    for key in CONSUMER_ONLY {
        config.remove(key);
    }
    config
}

impl DeadLetterProducer {
    /// A producer sharing the consumer's connection settings, or `None` when disabled.
    pub(crate) fn new(consumer: &ClientConfig, topics: DeadLetterTopic) -> Result<Option<Self>> {
        if topics == DeadLetterTopic::Disabled {
            return Ok(None);
        }
        let mut config = producer_config(consumer);
        config.set("enable.idempotence", "true");
        if config.get("message.timeout.ms").is_none() {
            config.set("message.timeout.ms", "30000");
        }
        if config.get("compression.type").is_none() {
            // Dead letters repeat records that may be near the size limit.
            config.set("compression.type", "lz4");
        }
        let producer = config
            .create()
            .map_err(|e| Error::kafka("creating the dead-letter producer", e))?;
        Ok(Some(DeadLetterProducer { producer, topics }))
    }

    /// Produces every letter and returns once all are acknowledged.
    pub(crate) async fn send_all(&self, letters: &[DeadLetter]) -> Result<()> {
        let sends = letters.iter().filter_map(|dl| {
            let topic = self.topics.topic_for(dl.record.topic())?;
            Some(async move { self.send(&topic, dl).await })
        });
        futures::future::try_join_all(sends).await.map(|_| ())
    }

    /// Produces one letter, leaving out what makes it too large to produce (see [`Shape`]).
    async fn send(&self, topic: &str, dl: &DeadLetter) -> Result<()> {
        let mut shape = Shape::Whole;
        loop {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(dl.topic_headers(shape));
            if let Some(key) = dl.record.key() {
                record = record.key(key);
            }
            if let (Shape::Whole, Some(payload)) = (shape, dl.record.payload()) {
                record = record.payload(payload);
            }
            let error = match self.producer.send(record, Timeout::Never).await {
                Ok(_) => return Ok(()),
                Err((error, _)) => error,
            };
            let too_large =
                error.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge);
            let next = match shape {
                Shape::Whole => Shape::NoPayload,
                Shape::NoPayload => Shape::Bare,
                Shape::Bare => shape,
            };
            if !too_large || next == shape {
                return Err(Error::kafka(
                    format!("producing a dead letter to {topic}"),
                    error,
                ));
            }
            tracing::warn!(
                topic,
                original = %format_args!("{}/{}@{}", dl.record.topic(), dl.record.partition(), dl.record.offset()),
                left_out = if next == Shape::NoPayload { "payload" } else { "payload and headers" },
                "dead letter over the producer's size limit; producing it without part of the \
                 record (the store keeps the whole record)"
            );
            shape = next;
        }
    }
}

fn put_opt(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
    }
}

#[cfg_attr(not(any(feature = "rocksdb", feature = "postgres")), allow(dead_code))]
fn get_opt(rd: &mut Reader<'_>) -> Result<Option<Vec<u8>>> {
    Ok(match rd.u8()? {
        0 => None,
        _ => Some(rd.bytes()?.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn dead_letter_round_trips(
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            rkey in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            payload in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            headers in proptest::collection::vec((".{0,6}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8))), 0..4),
            ts in proptest::option::of(any::<i64>()),
            message in ".{0,32}",
            attempts in any::<u32>(),
            offset in any::<i64>(),
            batch_id in proptest::option::of("[0-9a-f]{0,32}"),
        ) {
            let mut record = Record::new("t", 1, offset, rkey, payload);
            if let Some(ts) = ts { record = record.with_timestamp_ms(ts); }
            for (n, v) in headers { record = record.with_header(n, v); }
            let dl = DeadLetter { record, key, reason: DeadLetterReason::Conflict, message, attempts, first_failed_at_ms: 3, failed_at_ms: 7, batch_id };
            prop_assert_eq!(DeadLetter::decode(&dl.encode()).unwrap(), dl.clone());
            // Apart: the payload is not in the bytes, and comes back from beside them.
            let apart = dl.encode_apart();
            let payload = dl.record.payload().map(<[u8]>::to_vec);
            prop_assert_eq!(apart.len() + payload.as_ref().map_or(1, |p| 1 + 4 + p.len()), dl.encode().len());
            prop_assert_eq!(DeadLetter::decode_apart(&apart, payload).unwrap(), dl.clone());
            // A letter written whole before (version 1) reads the same whatever is beside it.
            prop_assert_eq!(DeadLetter::decode_apart(&dl.encode(), Some(b"other".to_vec())).unwrap(), dl.clone());
            // Letters kept before the batch id (versions 1 and 2) read with none: they are
            // versions 3 and 4 without the id's trailing field.
            let old = DeadLetter { batch_id: None, ..dl };
            for (bytes, payload) in [(old.encode(), None), (old.encode_apart(), old.record.payload().map(<[u8]>::to_vec))] {
                let mut before = bytes.clone();
                prop_assert_eq!(before.pop(), Some(0));
                before[0] -= 2;
                prop_assert_eq!(DeadLetter::decode_apart(&before, payload).unwrap(), old.clone());
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = DeadLetter::decode(&bytes);
        }
    }
}
