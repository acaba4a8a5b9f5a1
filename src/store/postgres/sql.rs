//! The PostgreSQL store's statements and migrations, built once from the validated table names.
//!
//! Every statement is built here from constant text and the identifiers `PgOptions` validated;
//! every value is a bound parameter. Times cross the wire as milliseconds since the Unix epoch
//! and are converted exactly in SQL (`ts`, `ms`).

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// The migrations, in order: (version, description, SQL template).
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("migrations/0001_initial.sql")),
    (
        2,
        "byte order keys",
        include_str!("migrations/0002_byte_order_keys.sql"),
    ),
    (
        3,
        "request keys",
        include_str!("migrations/0003_request_keys.sql"),
    ),
    (4, "outbox", include_str!("migrations/0004_outbox.sql")),
    (
        5,
        "resolution",
        include_str!("migrations/0005_resolution.sql"),
    ),
    (6, "audit", include_str!("migrations/0006_audit.sql")),
    (
        7,
        "request locks",
        include_str!("migrations/0007_request_locks.sql"),
    ),
    (
        8,
        "outbox read",
        include_str!("migrations/0008_outbox_read.sql"),
    ),
];

/// `$n` (milliseconds since the Unix epoch) as a `timestamptz`, exactly.
pub(super) fn ts(n: u8) -> String {
    format!("(timestamptz 'epoch' + ${n}::bigint * interval '1 millisecond')")
}

/// PostgreSQL's timestamps end in the year 294276: a time past (or before) what it can hold is
/// kept as the furthest it can (an entry that expires "never" stays unexpired).
pub(super) fn clamp_ms(ms: i64) -> i64 {
    const LIMIT: i64 = 8_000_000_000_000_000; // about the year 255,000
    ms.clamp(-LIMIT, LIMIT)
}

/// A `timestamptz` column as milliseconds since the Unix epoch, exactly.
pub(super) fn ms(column: &str) -> String {
    format!("(extract(epoch from {column}) * 1000)::bigint")
}

/// The store's statements, built once from the validated table names.
pub(super) struct Sql {
    pub(super) positions: String,
    pub(super) dedup: String,
    pub(super) dead_letters: String,
    pub(super) acquire: SqlStr,
    pub(super) position: SqlStr,
    pub(super) positions_of: SqlStr,
    pub(super) set_position: SqlStr,
    pub(super) claim_many: SqlStr,
    pub(super) claim_ahead: SqlStr,
    pub(super) select_many: SqlStr,
    pub(super) take_over: SqlStr,
    pub(super) write_entries: SqlStr,
    pub(super) release_claims: SqlStr,
    /// After a handler ended the transaction: its claims, committed with it, deleted where they
    /// are still what the claim wrote.
    pub(super) release_committed_claims: SqlStr,
    pub(super) write_dead_letters: SqlStr,
    pub(super) advance: SqlStr,
    pub(super) epoch: SqlStr,
    pub(super) purge: SqlStr,
    pub(super) dead_letters_of: SqlStr,
    pub(super) purge_dead_letters: SqlStr,
    pub(super) count_entries: SqlStr,
    pub(super) put_audit: SqlStr,
    pub(super) put_redrive: SqlStr,
    pub(super) free_dead_lettered: SqlStr,
    pub(super) release_range: SqlStr,
    pub(super) redrives_of: SqlStr,
    pub(super) audit_log: SqlStr,
    pub(super) estimate_entries: SqlStr,
}

pub(super) fn statement(s: String) -> SqlStr {
    // Built only from the validated identifiers and constant text; values are bound parameters.
    AssertSqlSafe(s).into_sql_str()
}

pub(super) const ENTRY_COLUMNS: &str = "consumer_group, tenant, idempotency_key, status, fingerprint, outcome, topic, \"partition\", \"offset\"";

impl Sql {
    pub(super) fn new(schema: &str, prefix: &str) -> Sql {
        let positions = format!("\"{schema}\".\"{prefix}positions\"");
        let dedup = format!("\"{schema}\".\"{prefix}dedup\"");
        let dead_letters = format!("\"{schema}\".\"{prefix}dead_letters\"");
        let audit = format!("\"{schema}\".\"{prefix}audit\"");
        let redrives = format!("\"{schema}\".\"{prefix}redrives\"");
        let entry_select = format!(
            "{ENTRY_COLUMNS}, {} AS created_ms, {} AS expires_ms",
            ms("created_at"),
            ms("expires_at")
        );
        Sql {
            acquire: statement(format!(
                "INSERT INTO {positions} AS p (consumer_group, topic, \"partition\", next_offset, epoch, owner, updated_at) \
                 VALUES ($1, $2, $3, NULL, 1, $4, now()) \
                 ON CONFLICT (consumer_group, topic, \"partition\") \
                 DO UPDATE SET epoch = p.epoch + 1, owner = EXCLUDED.owner, updated_at = now() \
                 RETURNING epoch, next_offset"
            )),
            position: statement(format!(
                "SELECT next_offset, epoch FROM {positions} \
                 WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3"
            )),
            positions_of: statement(format!(
                "SELECT topic, \"partition\", next_offset, epoch FROM {positions} \
                 WHERE consumer_group = $1 ORDER BY topic COLLATE \"C\", \"partition\""
            )),
            // A partition never acquired gets its row (epoch 0, no owner yet): the first
            // owner's acquire starts there.
            set_position: statement(format!(
                "INSERT INTO {positions} AS p (consumer_group, topic, \"partition\", next_offset, epoch, owner, updated_at) \
                 VALUES ($1, $2, $3, $4, 0, '', now()) \
                 ON CONFLICT (consumer_group, topic, \"partition\") \
                 DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()"
            )),
            // Sorted, so two batches claiming overlapping keys lock them in the same order.
            claim_many: statement(format!(
                "INSERT INTO {dedup} (consumer_group, tenant, idempotency_key, status, fingerprint, topic, \"partition\", \"offset\", created_at, expires_at) \
                 SELECT u.g, u.t, u.k, 'claimed', '\\x'::bytea, $4, -1, -1, {now}, {now} \
                 FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(g, t, k) \
                 ORDER BY u.g COLLATE \"C\", u.t COLLATE \"C\", u.k \
                 ON CONFLICT (consumer_group, tenant, idempotency_key) DO NOTHING \
                 RETURNING consumer_group, tenant, idempotency_key, txid_current() AS xid",
                now = ts(5)
            )),
            // The same, each row holding the entry its record usually leaves.
            claim_ahead: statement(format!(
                "INSERT INTO {dedup} (consumer_group, tenant, idempotency_key, status, fingerprint, topic, \"partition\", \"offset\", created_at, expires_at) \
                 SELECT u.g, u.t, u.k, 'completed', u.f, u.tp, u.p, u.o, \
                 timestamptz 'epoch' + u.c * interval '1 millisecond', timestamptz 'epoch' + u.e * interval '1 millisecond' \
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[], $6::int4[], $7::int8[], $8::int8[], $9::int8[]) \
                      AS u(g, t, k, tp, f, p, o, c, e) \
                 ORDER BY u.g COLLATE \"C\", u.t COLLATE \"C\", u.k \
                 ON CONFLICT (consumer_group, tenant, idempotency_key) DO NOTHING \
                 RETURNING consumer_group, tenant, idempotency_key, txid_current() AS xid"
            )),
            select_many: statement(format!(
                "SELECT {entry_select} FROM {dedup} d \
                 JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS u(g, t, k) \
                 ON d.consumer_group = u.g AND d.tenant = u.t AND d.idempotency_key = u.k"
            )),
            take_over: statement(format!(
                "UPDATE {dedup} SET status = 'claimed', fingerprint = '\\x'::bytea, outcome = NULL, \
                 topic = $4, \"partition\" = -1, \"offset\" = -1, created_at = {now}, expires_at = {now} \
                 WHERE consumer_group = $1 AND tenant = $2 AND idempotency_key = $3 \
                   AND expires_at <= LEAST({now}, now()) \
                 RETURNING 1",
                now = ts(5)
            )),
            write_entries: statement(format!(
                "INSERT INTO {dedup} ({ENTRY_COLUMNS}, created_at, expires_at) \
                 SELECT g, t, k, s, f, o, tp, p, off, \
                 timestamptz 'epoch' + c * interval '1 millisecond', timestamptz 'epoch' + e * interval '1 millisecond' \
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bytea[], $6::bytea[], \
                             $7::text[], $8::int4[], $9::int8[], $10::int8[], $11::int8[]) \
                      AS u(g, t, k, s, f, o, tp, p, off, c, e) \
                 ON CONFLICT (consumer_group, tenant, idempotency_key) DO UPDATE SET \
                 status = EXCLUDED.status, fingerprint = EXCLUDED.fingerprint, outcome = EXCLUDED.outcome, \
                 topic = EXCLUDED.topic, \"partition\" = EXCLUDED.\"partition\", \"offset\" = EXCLUDED.\"offset\", \
                 created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at"
            )),
            release_claims: statement(format!(
                "DELETE FROM {dedup} d USING unnest($1::text[], $2::text[], $3::bytea[]) AS u(g, t, k) \
                 WHERE d.consumer_group = u.g AND d.tenant = u.t AND d.idempotency_key = u.k"
            )),
            release_committed_claims: statement(format!(
                "DELETE FROM {dedup} d USING unnest($1::text[], $2::text[], $3::bytea[], $4::int8[]) AS u(g, t, k, o) \
                 WHERE d.consumer_group = u.g AND d.tenant = u.t AND d.idempotency_key = u.k \
                   AND (d.status = 'claimed' OR (u.o IS NOT NULL AND d.status = 'completed' \
                        AND d.topic = $5 AND d.\"partition\" = $6 AND d.\"offset\" = u.o))"
            )),
            write_dead_letters: statement(format!(
                "INSERT INTO {dead_letters} (consumer_group, topic, \"partition\", \"offset\", idempotency_key, reason, message, \
                 attempts, record_key, payload, first_failed_at, failed_at, letter) \
                 SELECT $1, tp, p, off, k, r, m, a, rk, pl, \
                 timestamptz 'epoch' + ff * interval '1 millisecond', timestamptz 'epoch' + lf * interval '1 millisecond', l \
                 FROM unnest($2::text[], $3::int4[], $4::int8[], $5::bytea[], $6::text[], $7::text[], $8::int4[], \
                             $9::bytea[], $10::bytea[], $11::int8[], $12::int8[], $13::bytea[]) \
                      AS u(tp, p, off, k, r, m, a, rk, pl, ff, lf, l) \
                 ON CONFLICT (consumer_group, topic, \"partition\", \"offset\") DO UPDATE SET \
                 idempotency_key = EXCLUDED.idempotency_key, reason = EXCLUDED.reason, message = EXCLUDED.message, \
                 attempts = EXCLUDED.attempts, record_key = EXCLUDED.record_key, payload = EXCLUDED.payload, \
                 first_failed_at = EXCLUDED.first_failed_at, failed_at = EXCLUDED.failed_at, letter = EXCLUDED.letter"
            )),
            advance: statement(format!(
                "UPDATE {positions} SET next_offset = $4, owner = $6, updated_at = now() \
                 WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3 AND epoch = $5 \
                   AND ($7::int8 IS NULL OR txid_current() = $7) \
                 RETURNING 1"
            )),
            epoch: statement(format!(
                "SELECT epoch FROM {positions} WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3"
            )),
            purge: statement(format!(
                "DELETE FROM {dedup} d USING ( \
                   SELECT consumer_group, tenant, idempotency_key FROM {dedup} \
                   WHERE consumer_group = $3 AND expires_at <= {now} AND status <> 'claimed' \
                   ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) x \
                 WHERE d.consumer_group = x.consumer_group AND d.tenant = x.tenant \
                   AND d.idempotency_key = x.idempotency_key AND d.expires_at <= {now}",
                now = format!("LEAST({}, now())", ts(1))
            )),
            // Older than the retention by the caller's clock and the database's alike.
            purge_dead_letters: statement(format!(
                "DELETE FROM {dead_letters} d USING ( \
                   SELECT consumer_group, topic, \"partition\", \"offset\" FROM {dead_letters} \
                   WHERE consumer_group = $1 \
                     AND failed_at < LEAST({now}, now()) - $3::bigint * interval '1 millisecond' \
                   ORDER BY failed_at LIMIT $4 FOR UPDATE SKIP LOCKED) x \
                 WHERE d.consumer_group = x.consumer_group AND d.topic = x.topic \
                   AND d.\"partition\" = x.\"partition\" AND d.\"offset\" = x.\"offset\"",
                now = ts(2)
            )),
            dead_letters_of: statement(format!(
                "SELECT letter, payload FROM {dead_letters} \
                 WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3 ORDER BY \"offset\""
            )),
            count_entries: statement(format!(
                "SELECT count(*) FROM {dedup} WHERE status <> 'claimed'"
            )),
            put_audit: statement(format!(
                "INSERT INTO {audit} (id, at, who, command, record) \
                 VALUES ($1, {at}, $3, $4, $5::jsonb) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record",
                at = ts(2)
            )),
            put_redrive: statement(format!(
                "INSERT INTO {redrives} (consumer_group, topic, \"partition\", \"offset\", mark) \
                 VALUES ($1, $2, $3, $4, $5::jsonb) \
                 ON CONFLICT (consumer_group, topic, \"partition\", \"offset\") \
                 DO UPDATE SET mark = EXCLUDED.mark"
            )),
            free_dead_lettered: statement(format!(
                "DELETE FROM {dedup} WHERE consumer_group = $1 AND tenant = $2 \
                 AND idempotency_key = $3 AND status = 'dead_lettered'"
            )),
            // Every status but the ones of a key in flight (a batch's claim, a request's lease).
            release_range: statement(format!(
                "DELETE FROM {dedup} WHERE consumer_group = $1 AND topic = $2 AND \"partition\" = $3 \
                 AND \"offset\" >= $4 AND \"offset\" < $5 AND status NOT IN ('claimed', 'in_flight')"
            )),
            redrives_of: statement(format!(
                "SELECT mark::text FROM {redrives} WHERE consumer_group = $1 \
                 ORDER BY topic COLLATE \"C\", \"partition\", \"offset\""
            )),
            audit_log: statement(format!(
                "SELECT record::text FROM {audit} ORDER BY at DESC, id DESC LIMIT $1"
            )),
            // The planner's estimate; -1 before the table was first vacuumed or analyzed.
            estimate_entries: statement(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)".to_owned(),
            ),
            positions,
            dedup,
            dead_letters,
        }
    }
}

/// The embedded migrations, with the table names filled in; tracked in
/// `<schema>.<prefix>migrations`.
pub(super) fn migrator(schema: &str, prefix: &str) -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, template)| {
            let text = template
                .replace("{schema}", schema)
                .replace("{prefix}", prefix);
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                statement(text),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(format!("\"{schema}\".\"{prefix}migrations\""));
    migrator.create_schema(format!("\"{schema}\""));
    migrator
}
