-- Idempotency keys of requests (HTTP): a request claims its key with a committed 'in_flight'
-- row that holds a lease (a token and the time it runs out), taken over once the lease ran
-- out; the row becomes 'completed', with the stored answer in `outcome`, in the handler's
-- transaction. The status check is replaced whatever name it was given.
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
        CHECK (status IN ('claimed', 'completed', 'dead_lettered', 'in_flight')),
    ADD COLUMN IF NOT EXISTS lease_token text,
    ADD COLUMN IF NOT EXISTS lease_until timestamptz;
