-- Issue 10: a tenant's stored policy versions are capped in bytes
-- (MDM_POLICY_STORE_MB; mdm_server/storage/policies.py).
--
-- body_bytes: the size of a version's body as PostgreSQL renders it as JSON text,
-- 0 for a deletion or a pruned version; what counts against the cap.
-- pruned_at: when the body of an old version (never the newest of its policy) was
-- dropped to make room under the cap. Its number, author and time stay.
ALTER TABLE policies ADD COLUMN pruned_at timestamptz;
ALTER TABLE policies ADD COLUMN body_bytes integer NOT NULL
    GENERATED ALWAYS AS (coalesce(octet_length(body::text), 0)) STORED;

-- Was CHECK (deleted = (body IS NULL)): a pruned version has no body either.
ALTER TABLE policies DROP CONSTRAINT policies_check;
ALTER TABLE policies ADD CONSTRAINT policies_body_state CHECK (
    CASE WHEN deleted THEN body IS NULL AND pruned_at IS NULL
         ELSE (body IS NULL) = (pruned_at IS NOT NULL) END);
