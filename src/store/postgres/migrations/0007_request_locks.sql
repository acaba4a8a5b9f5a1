-- Idempotency keys of requests claimed inside the handler's own transaction: the claim is a
-- transaction-level advisory lock on a 64-bit hash of the key (taken by this function), held
-- until the transaction commits or rolls back, and the key's row is written once, completed,
-- with the handler's writes. The function is VOLATILE so that its read of the key runs on a
-- snapshot taken after the lock was granted: a request that completed and let the lock go just
-- before is seen, never run again.
CREATE OR REPLACE FUNCTION "{schema}"."{prefix}claim_request"(
    lock_key bigint,
    lease_ms integer,
    key_group text,
    key_tenant text,
    key_bytes bytea
)
RETURNS TABLE (
    held boolean,
    found_status text,
    found_fingerprint bytea,
    found_outcome bytea,
    found_until_ms bigint,
    found_expires_ms bigint,
    db_now_ms bigint
)
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock(lock_key) THEN
        RETURN QUERY SELECT false, NULL::text, NULL::bytea, NULL::bytea, NULL::bigint,
            NULL::bigint, (extract(epoch from clock_timestamp()) * 1000)::bigint;
        RETURN;
    END IF;
    -- The lease: a holder whose transaction stays idle this long loses its session, its
    -- writes and the lock.
    PERFORM set_config('idle_in_transaction_session_timeout', lease_ms::text, true);
    RETURN QUERY
        SELECT true, d.status, d.fingerprint, d.outcome,
               (extract(epoch from d.lease_until) * 1000)::bigint,
               (extract(epoch from d.expires_at) * 1000)::bigint,
               (extract(epoch from clock_timestamp()) * 1000)::bigint
        FROM (SELECT 1) AS one
        LEFT JOIN "{schema}"."{prefix}dedup" AS d
            ON d.consumer_group = key_group AND d.tenant = key_tenant
           AND d.idempotency_key = key_bytes;
END
$$;
