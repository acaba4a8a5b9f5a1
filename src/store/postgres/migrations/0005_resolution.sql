-- Resolution of valid updates that conflict (feature `resolve`).

-- A record the resolver settled without its handler (superseded, stale, a conflict, rejected)
-- leaves a 'resolved' entry, so its redelivery is a duplicate. The status check is replaced
-- whatever name it was given, keeping every status before it (requests' 'in_flight').
DO $$
DECLARE
    existing text;
BEGIN
    FOR existing IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = '"{schema}"."{prefix}dedup"'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%status%'
    LOOP
        EXECUTE format('ALTER TABLE "{schema}"."{prefix}dedup" DROP CONSTRAINT %I', existing);
    END LOOP;
END
$$;

ALTER TABLE "{schema}"."{prefix}dedup"
    ADD CONSTRAINT "{prefix}dedup_status_check"
        CHECK (status IN ('claimed', 'completed', 'dead_lettered', 'in_flight', 'resolved'));

-- Each entity's current winner (`state`, JSON written by the crate), per consumer group. Locked
-- by the transaction deciding one of its records; never purged by the dedup retention. A row
-- with no state is an entity locked once whose first record was not decided.
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}entities" (
    consumer_group text        NOT NULL,
    entity         text        NOT NULL,
    state          jsonb,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, entity)
);

-- The basis of every decision that was not a plain "newer, applied", numbered per entity from
-- 0 (`seq`), committed with the decision's effect; purged once expired.
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}resolutions" (
    consumer_group text        NOT NULL,
    entity         text        NOT NULL,
    seq            bigint      NOT NULL,
    outcome        text        NOT NULL,
    decided_at     timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    resolution     jsonb       NOT NULL,
    PRIMARY KEY (consumer_group, entity, seq)
);

CREATE INDEX IF NOT EXISTS "{prefix}resolutions_expires_at"
    ON "{schema}"."{prefix}resolutions" (consumer_group, expires_at);
