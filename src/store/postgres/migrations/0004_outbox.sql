-- The transactional outbox: events published by handlers, written in the same transaction as
-- their effects, produced to Kafka by a relay that deletes each row once the broker
-- acknowledged it. A row with a `reason` is dead: the broker refused it for good; it is kept
-- and never relayed again. `headers` holds the publication's own headers, encoded by the crate
-- (a version byte, then length-prefixed names and values).
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}outbox" (
    id              bigserial   PRIMARY KEY,
    topic           text        NOT NULL,
    record_key      bytea,
    payload         bytea,
    headers         bytea       NOT NULL,
    idempotency_key text        NOT NULL,
    source          text        NOT NULL,
    created_at      timestamptz NOT NULL,
    reason          text,
    failed_at       timestamptz
);

-- The rows waiting, in order: what the relay reads. A partial index, so the read is an index
-- scan in id order whatever the table's statistics say (a queue table's swing from empty to
-- full between two ANALYZEs, and without this index an estimate made on an empty table turns
-- every read of a full one into a scan and a sort of all of it).
CREATE INDEX IF NOT EXISTS "{prefix}outbox_waiting" ON "{schema}"."{prefix}outbox" (id)
    WHERE reason IS NULL;

-- The relays' lease on the outbox: one relay produces at a time; every epoch is a new holder,
-- and only the holder of an unexpired lease deletes rows or marks them dead.
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}outbox_relay" (
    id          smallint    PRIMARY KEY CHECK (id = 0),
    owner       text        NOT NULL,
    epoch       bigint      NOT NULL,
    lease_until timestamptz NOT NULL
);
