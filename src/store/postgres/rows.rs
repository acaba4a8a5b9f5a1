//! Rows of the dedup table as the store reads and writes them: keys split into their columns,
//! entries as column arrays for one `unnest` statement, and rows read back into entries.

use sqlx::Row;
use sqlx::postgres::{PgConnection, PgRow};

use super::errors::pg;
use super::sql::{Sql, clamp_ms};
use crate::error::{Error, Result};
use crate::identity::{Fingerprint, split_store_key};
use crate::store::entry::{DedupEntry, EntryStatus};

/// Dedup entries as the column arrays of one `unnest` insert.
#[derive(Default)]
pub(super) struct EntryColumns<'a> {
    pub(super) groups: Vec<&'a str>,
    pub(super) tenants: Vec<&'a str>,
    pub(super) keys: Vec<&'a [u8]>,
    pub(super) statuses: Vec<&'static str>,
    pub(super) fingerprints: Vec<&'a [u8]>,
    pub(super) outcomes: Vec<Option<&'a [u8]>>,
    pub(super) topics: Vec<&'a str>,
    pub(super) partitions: Vec<i32>,
    pub(super) offsets: Vec<i64>,
    pub(super) created: Vec<i64>,
    pub(super) expires: Vec<i64>,
}

impl<'a> EntryColumns<'a> {
    pub(super) fn push(&mut self, store_key: &'a [u8], entry: &'a DedupEntry) -> Result<()> {
        let (group, tenant, key) = split(store_key)?;
        self.groups.push(group);
        self.tenants.push(tenant);
        self.keys.push(key);
        self.statuses.push(entry.status.as_str());
        self.fingerprints.push(&entry.fingerprint.0);
        self.outcomes.push(entry.outcome.as_deref());
        self.topics.push(&entry.topic);
        self.partitions.push(entry.partition);
        self.offsets.push(entry.offset);
        self.created.push(clamp_ms(entry.created_at_ms));
        self.expires.push(clamp_ms(entry.expires_at_ms));
        Ok(())
    }
}

/// A dedup row as read back, with whether it is an uncommitted claim.
pub(super) struct ReadEntry {
    pub(super) entry: DedupEntry,
    pub(super) status_is_claimed: bool,
}

pub(super) fn split(store_key: &[u8]) -> Result<(&str, &str, &[u8])> {
    let (g, t, k) = split_store_key(store_key)
        .ok_or_else(|| Error::Corrupt("a dedup key is not a scoped store key".into()))?;
    let text =
        |b| std::str::from_utf8(b).map_err(|_| Error::Corrupt("a key scope is not UTF-8".into()));
    Ok((text(g)?, text(t)?, k))
}

pub(super) type Columns<'a> = (Vec<&'a str>, Vec<&'a str>, Vec<&'a [u8]>);

pub(super) fn split_all<'a>(keys: &[&'a [u8]]) -> Result<Columns<'a>> {
    let mut out = (
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
    );
    for key in keys {
        let (g, t, k) = split(key)?;
        out.0.push(g);
        out.1.push(t);
        out.2.push(k);
    }
    Ok(out)
}

/// The scoped store key of a row's (consumer_group, tenant, idempotency_key) columns.
pub(super) fn store_key_of(row: &PgRow) -> Result<Vec<u8>> {
    let group: &str = row.try_get(0).map_err(pg("reading a key"))?;
    let tenant: &str = row.try_get(1).map_err(pg("reading a key"))?;
    let key: &[u8] = row.try_get(2).map_err(pg("reading a key"))?;
    let scope = crate::identity::Scope::new(group, (!tenant.is_empty()).then_some(tenant));
    let mut out = scope.as_bytes().to_vec();
    out.extend_from_slice(key);
    Ok(out)
}

pub(super) async fn select_entries(
    conn: &mut PgConnection,
    sql: &Sql,
    keys: &[&[u8]],
) -> Result<Vec<(Vec<u8>, ReadEntry)>> {
    let (groups, tenants, bytes) = split_all(keys)?;
    let rows = sqlx::query(sql.select_many.clone())
        .bind(&groups)
        .bind(&tenants)
        .bind(&bytes)
        .fetch_all(conn)
        .await
        .map_err(pg("reading entries"))?;
    rows.iter()
        .map(|row| Ok((store_key_of(row)?, read_entry(row)?)))
        .collect()
}

pub(super) fn read_entry(row: &PgRow) -> Result<ReadEntry> {
    let get = pg("reading an entry");
    let status: &str = row.try_get("status").map_err(get)?;
    let status_is_claimed = status == "claimed";
    let status = match status {
        "completed" | "claimed" => EntryStatus::Completed,
        "dead_lettered" => EntryStatus::DeadLettered,
        "resolved" => EntryStatus::Resolved,
        other => return Err(Error::Corrupt(format!("unknown entry status {other:?}"))),
    };
    let fingerprint: &[u8] = row.try_get("fingerprint").map_err(pg("reading an entry"))?;
    let fingerprint = if status_is_claimed {
        Fingerprint([0; 32])
    } else {
        Fingerprint(
            fingerprint
                .try_into()
                .map_err(|_| Error::Corrupt("a fingerprint is not 32 bytes".into()))?,
        )
    };
    Ok(ReadEntry {
        entry: DedupEntry {
            status,
            fingerprint,
            outcome: row.try_get("outcome").map_err(pg("reading an entry"))?,
            topic: row.try_get("topic").map_err(pg("reading an entry"))?,
            partition: row.try_get("partition").map_err(pg("reading an entry"))?,
            offset: row.try_get("offset").map_err(pg("reading an entry"))?,
            created_at_ms: row.try_get("created_ms").map_err(pg("reading an entry"))?,
            expires_at_ms: row.try_get("expires_ms").map_err(pg("reading an entry"))?,
        },
        status_is_claimed,
    })
}
