-- The group and tenant parts of the dedup key compare byte by byte (collation "C"). They are
-- identifiers, never sorted for people; the database's default collation (often a linguistic
-- one) made every key comparison in the primary key, and so every claim, several times dearer.
-- Rewrites the table and its indexes once.
ALTER TABLE "{schema}"."{prefix}dedup"
    ALTER COLUMN consumer_group TYPE text COLLATE "C",
    ALTER COLUMN tenant TYPE text COLLATE "C";
