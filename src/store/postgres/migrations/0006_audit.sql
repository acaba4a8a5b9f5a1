-- The audit log: one row per operator command (the `idc` tool's), written in the same
-- transaction as the command's change and updated with its counts by each later one.
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}audit" (
    id      text        PRIMARY KEY,
    at      timestamptz NOT NULL,
    who     text        NOT NULL,
    command text        NOT NULL,
    record  jsonb       NOT NULL
);

CREATE INDEX IF NOT EXISTS "{prefix}audit_at" ON "{schema}"."{prefix}audit" (at);

-- Where the redrive of each dead letter stands (`idc dead-letters redrive`), beside the letter.
CREATE TABLE IF NOT EXISTS "{schema}"."{prefix}redrives" (
    consumer_group text    NOT NULL,
    topic          text    NOT NULL,
    "partition"    integer NOT NULL,
    "offset"       bigint  NOT NULL,
    mark           jsonb   NOT NULL,
    PRIMARY KEY (consumer_group, topic, "partition", "offset")
);
