-- The audit log in keyed chains, one per tenant (mdm_server/audit.py has the rules).
--
-- Before: one chain over all tenants, `seq` global, `hash` = plain SHA-256 (anyone
-- who could write the table could re-chain it, and any tenant could count the
-- others' actions from the gaps in its own seq). After:
--   * `chain`: the tenant id, '' for entries of no tenant; `seq` counts 1, 2, 3 ...
--     within a chain (primary key (chain, seq)), so seq says nothing about other
--     tenants, and appends of different tenants no longer wait for each other.
--   * New entries carry an HMAC-SHA256 in `hash` under a key derived from the master
--     key, which the database never holds.
--   * Entries written before this migration are "legacy": their global number moves
--     to `legacy_seq` (their old hash covers it, so they stay verifiable by the old
--     rule) and they are numbered per chain like the rest. Nobody but the table's
--     owner can write `legacy_seq`: the server's role may INSERT the other columns
--     only, so it cannot pass a forged entry off as legacy.
--
-- Runs as the migrating role (a superuser, the table's owner): renumbering the
-- existing entries is an UPDATE, which the append-only trigger refuses, so this
-- migration sets it aside for that one statement, inside its own transaction.

ALTER TABLE audit_log
    ADD COLUMN chain text GENERATED ALWAYS AS (coalesce(tenant_id, '')) STORED,
    ADD COLUMN legacy_seq bigint CHECK (legacy_seq >= 1);

ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey;
ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change;
UPDATE audit_log a SET legacy_seq = a.seq, seq = n.chain_seq
FROM (SELECT seq, row_number() OVER (PARTITION BY coalesce(tenant_id, '') ORDER BY seq)
             AS chain_seq
      FROM audit_log) AS n
WHERE n.seq = a.seq;
ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_change;

ALTER TABLE audit_log ADD PRIMARY KEY (chain, seq);
-- The legacy chain in its old order (verification; the head a chain's first keyed
-- entry names as its prev_hash).
CREATE UNIQUE INDEX audit_log_legacy ON audit_log (legacy_seq) WHERE legacy_seq IS NOT NULL;
-- A tenant's entries are its chain: the primary key serves audit.read.
DROP INDEX audit_log_tenant;

-- The server's role: SELECT, and INSERT of everything but legacy_seq (and chain,
-- which nobody inserts: it is generated).
REVOKE INSERT ON audit_log FROM mdm_app;
GRANT INSERT (seq, at, tenant_id, actor, action, target, details, prev_hash, hash)
    ON audit_log TO mdm_app;
