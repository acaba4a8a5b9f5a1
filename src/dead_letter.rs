//! Records that could not be applied, kept with the reason, never dropped.
//!
//! A [`DeadLetter`] holds the original record (key, payload, headers, position), the idempotency
//! key when there was one, the reason class and message, and the attempt count. The runtime writes
//! it through the store's transaction, in the same commit as the partition position and the
//! key's `dead_lettered` dedup entry, so a redelivered record is not dead-lettered twice and a
//! crash cannot lose it.

use std::fmt;

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
    /// When it was dead-lettered, milliseconds since the epoch.
    pub failed_at_ms: i64,
}

const DEAD_LETTER_VERSION: u8 = 1;

impl DeadLetter {
    /// Encodes the dead letter for the embedded store.
    pub fn encode(&self) -> Vec<u8> {
        let r = &self.record;
        let mut out = Vec::with_capacity(128 + r.payload().map_or(0, <[u8]>::len));
        out.push(DEAD_LETTER_VERSION);
        out.push(self.reason.code());
        out.extend_from_slice(&self.attempts.to_be_bytes());
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
        put_opt(&mut out, r.payload());
        out.extend_from_slice(&(r.headers().len() as u32).to_be_bytes());
        for h in r.headers() {
            put_bytes(&mut out, h.name.as_bytes());
            put_opt(&mut out, h.value.as_deref());
        }
        out
    }

    /// Decodes a dead letter written by [`DeadLetter::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut rd = Reader::new(bytes, "dead letter");
        let version = rd.u8()?;
        if version != DEAD_LETTER_VERSION {
            return Err(Error::Corrupt(format!(
                "dead letter version {version} is not supported"
            )));
        }
        let reason = DeadLetterReason::from_code(rd.u8()?)?;
        let attempts = u32::from_be_bytes(rd.array()?);
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
        let payload = get_opt(&mut rd)?;
        let mut record = Record::new(topic, partition, offset, record_key, payload);
        if let Some(ts) = timestamp {
            record = record.with_timestamp_ms(ts);
        }
        let headers = u32::from_be_bytes(rd.array()?);
        for _ in 0..headers {
            let name = rd.string()?;
            record = record.with_header(name, get_opt(&mut rd)?);
        }
        rd.finish()?;
        Ok(DeadLetter {
            record,
            key,
            reason,
            message,
            attempts,
            failed_at_ms,
        })
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
        ) {
            let mut record = Record::new("t", 1, offset, rkey, payload);
            if let Some(ts) = ts { record = record.with_timestamp_ms(ts); }
            for (n, v) in headers { record = record.with_header(n, v); }
            let dl = DeadLetter { record, key, reason: DeadLetterReason::Conflict, message, attempts, failed_at_ms: 7 };
            prop_assert_eq!(DeadLetter::decode(&dl.encode()).unwrap(), dl);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = DeadLetter::decode(&bytes);
        }
    }
}
