-- The relay's read of waiting rows, always an index scan in id order. A queue table's
-- statistics are always wrong: analysed while nearly empty (or never, right after a burst), the
-- planner takes a backlog of 100,000 rows for a few hundred and reads them with a bitmap scan
-- and a sort of every waiting row, for each round of a thousand: a relay catching up slows
-- down quadratically exactly when it has the most to do. The function plans its query with
-- sorts and bitmap scans off, which leaves the partial index `outbox_waiting` in order.
CREATE OR REPLACE FUNCTION "{schema}"."{prefix}outbox_waiting_after"(after bigint, n bigint)
RETURNS SETOF "{schema}"."{prefix}outbox"
LANGUAGE sql STABLE
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
    SELECT * FROM "{schema}"."{prefix}outbox"
    WHERE reason IS NULL AND id > after
    ORDER BY id
    LIMIT n
$$;
