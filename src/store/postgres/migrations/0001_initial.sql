-- Tables of the PostgreSQL store. `{schema}` and `{prefix}` are replaced with the configured,
-- validated identifiers before the migration runs.

-- One row per (consumer group, tenant, idempotency key). Rows with status 'claimed' exist only
-- inside an open batch transaction and are never committed.
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}dedup" (
    consumer_group  text        NOT NULL,
    tenant          text        NOT NULL,
    idempotency_key bytea       NOT NULL,
    status          text        NOT NULL CHECK (status IN ('claimed', 'completed', 'dead_lettered')),
    fingerprint     bytea       NOT NULL,
    outcome         bytea,
    topic           text        NOT NULL,
    "partition"     integer     NOT NULL,
    "offset"        bigint      NOT NULL,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (consumer_group, tenant, idempotency_key)
);

CREATE INDEX IF NOT EXISTS "{prefix}dedup_expires_at" ON "{schema}"."{prefix}dedup" (expires_at);

-- The next offset of each partition of each group, and the epoch of its current owner.
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}positions" (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    "partition"    integer     NOT NULL,
    next_offset    bigint,
    epoch          bigint      NOT NULL,
    owner          text        NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, "partition")
);

-- Records that ended on the dead-letter path, with their original bytes. `letter` is the full
-- encoded dead letter (headers included); the other columns are for people and queries.
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}dead_letters" (
    consumer_group    text        NOT NULL,
    topic             text        NOT NULL,
    "partition"       integer     NOT NULL,
    "offset"          bigint      NOT NULL,
    idempotency_key   bytea,
    reason            text        NOT NULL,
    message           text        NOT NULL,
    attempts          integer     NOT NULL,
    record_key        bytea,
    payload           bytea,
    first_failed_at   timestamptz NOT NULL,
    failed_at         timestamptz NOT NULL,
    letter            bytea       NOT NULL,
    PRIMARY KEY (consumer_group, topic, "partition", "offset")
);
