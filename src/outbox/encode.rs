//! How outbox rows are kept as bytes: a whole row (the embedded stores, keyed by its id) and a
//! row's headers alone (PostgreSQL's `headers` column). Length-prefixed fields, big-endian
//! numbers, a version byte first.

use super::{OutboxDeadRow, OutboxRow, Outgoing};
use crate::error::{Error, Result};
use crate::store::entry::{Reader, put_bytes};

const ROW_VERSION: u8 = 1;
const HEADERS_VERSION: u8 = 1;
const DEAD_VERSION: u8 = 1;

fn put_optional(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
    }
}

fn optional(r: &mut Reader<'_>) -> Result<Option<Vec<u8>>> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.bytes()?.to_vec())),
        other => Err(Error::Corrupt(format!("bad optional field marker {other}"))),
    }
}

fn put_headers(out: &mut Vec<u8>, headers: &[(String, Vec<u8>)]) {
    let count = u32::try_from(headers.len()).expect("over 4 billion headers");
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in headers {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

fn headers(r: &mut Reader<'_>) -> Result<Vec<(String, Vec<u8>)>> {
    let count = u32::from_be_bytes(r.array()?);
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    for _ in 0..count {
        out.push((r.string()?, r.bytes()?.to_vec()));
    }
    Ok(out)
}

/// A row's headers alone.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn encode_headers(headers: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![HEADERS_VERSION];
    put_headers(&mut out, headers);
    out
}

#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn decode_headers(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut r = Reader::new(bytes, "outbox headers");
    if r.u8()? != HEADERS_VERSION {
        return Err(Error::Corrupt("unknown outbox headers version".into()));
    }
    let out = headers(&mut r)?;
    r.finish()?;
    Ok(out)
}

/// A whole row but its id (the key it is kept under).
#[cfg_attr(not(any(feature = "rocksdb", feature = "memory")), allow(dead_code))]
pub(crate) fn encode_row(row: &Outgoing) -> Vec<u8> {
    let p = &row.publication;
    let mut out = Vec::with_capacity(
        64 + p.topic.len()
            + p.key.as_ref().map_or(0, Vec::len)
            + p.payload.as_ref().map_or(0, Vec::len),
    );
    out.push(ROW_VERSION);
    out.extend_from_slice(&row.created_at_ms.to_be_bytes());
    put_bytes(&mut out, p.topic.as_bytes());
    put_optional(&mut out, p.key.as_deref());
    put_optional(&mut out, p.payload.as_deref());
    put_headers(&mut out, &p.headers);
    put_bytes(&mut out, row.idempotency_key.as_bytes());
    put_bytes(&mut out, row.source.as_bytes());
    out
}

fn row_fields(r: &mut Reader<'_>, id: u64) -> Result<OutboxRow> {
    if r.u8()? != ROW_VERSION {
        return Err(Error::Corrupt("unknown outbox row version".into()));
    }
    let created_at_ms = i64::from_be_bytes(r.array()?);
    Ok(OutboxRow {
        id,
        created_at_ms,
        topic: r.string()?,
        key: optional(r)?,
        payload: optional(r)?,
        headers: headers(r)?,
        idempotency_key: r.string()?,
        source: r.string()?,
    })
}

#[cfg_attr(not(any(feature = "rocksdb", feature = "memory")), allow(dead_code))]
pub(crate) fn decode_row(id: u64, bytes: &[u8]) -> Result<OutboxRow> {
    let mut r = Reader::new(bytes, "outbox row");
    let row = row_fields(&mut r, id)?;
    r.finish()?;
    Ok(row)
}

/// A dead row: the failure first, then the row as it was kept.
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub(crate) fn encode_dead(row_bytes: &[u8], reason: &str, failed_at_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + reason.len() + row_bytes.len());
    out.push(DEAD_VERSION);
    out.extend_from_slice(&failed_at_ms.to_be_bytes());
    put_bytes(&mut out, reason.as_bytes());
    out.extend_from_slice(row_bytes);
    out
}

#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub(crate) fn decode_dead(id: u64, bytes: &[u8]) -> Result<OutboxDeadRow> {
    let mut r = Reader::new(bytes, "outbox dead row");
    if r.u8()? != DEAD_VERSION {
        return Err(Error::Corrupt("unknown outbox dead row version".into()));
    }
    let failed_at_ms = i64::from_be_bytes(r.array()?);
    let reason = r.string()?;
    let row = row_fields(&mut r, id)?;
    r.finish()?;
    Ok(OutboxDeadRow {
        row,
        reason,
        failed_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Publication;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn rows_round_trip(
            topic in "[a-z.]{1,20}",
            key in proptest::option::of(any::<Vec<u8>>()),
            payload in proptest::option::of(any::<Vec<u8>>()),
            headers in proptest::collection::vec(("[a-z-]{0,8}", any::<Vec<u8>>()), 0..4),
            created in any::<i64>(),
            id in any::<u64>(),
        ) {
            let mut publication = Publication::new(topic);
            publication.key = key;
            publication.payload = payload;
            publication.headers = headers.clone();
            let row = Outgoing {
                publication: publication.clone(),
                idempotency_key: "ob1-x".into(),
                source: "t/0@1".into(),
                created_at_ms: created,
            };
            let bytes = encode_row(&row);
            let back = decode_row(id, &bytes).unwrap();
            prop_assert_eq!(back.id, id);
            prop_assert_eq!(&back.topic, &publication.topic);
            prop_assert_eq!(&back.key, &publication.key);
            prop_assert_eq!(&back.payload, &publication.payload);
            prop_assert_eq!(&back.headers, &headers);
            prop_assert_eq!(back.created_at_ms, created);
            prop_assert!(decode_row(id, &bytes[..bytes.len() - 1]).is_err());
            let dead = decode_dead(id, &encode_dead(&bytes, "too large", 7)).unwrap();
            prop_assert_eq!(dead.row, back);
            prop_assert_eq!(dead.reason, "too large");
            prop_assert_eq!(decode_headers(&encode_headers(&headers)).unwrap(), headers);
        }
    }
}
