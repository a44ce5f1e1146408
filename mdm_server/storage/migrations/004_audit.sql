-- The audit log: every admin action, append-only and hash-chained (mdm_server/audit.py
-- writes and verifies it); and `mdm_app`, the group role the server runs under.
--
-- Who runs what:
--   * Migrations run as a superuser: this file creates a role, gives tables to it
--     and grants on schema `public` (CREATEROLE, membership in the new role and
--     ownership of `public`; a superuser has all three). The migrating role owns
--     every table, `audit_log` included.
--   * The server runs as a LOGIN role that is a member of `mdm_app`, e.g.
--         CREATE ROLE mdm_server LOGIN PASSWORD '...' IN ROLE mdm_app;
--         ALTER ROLE mdm_server SET role = 'mdm_app';
--     The second line makes every session act as `mdm_app` itself, so the day
--     partitions the ingest creates are owned by `mdm_app` and every server process
--     (and `retention run`) may drop them, whichever login created them.
--   * `mdm_app` may SELECT, INSERT, UPDATE, DELETE every table; it owns the kind
--     partitions of `telemetry` (PostgreSQL lets only the owner of a partitioned
--     table add partitions to it) and may CREATE in `public` (the day partitions).
--     On `audit_log` it has SELECT and INSERT only: no UPDATE, DELETE or TRUNCATE,
--     and triggers refuse those to everybody else as well, superusers included.
--     Only the table's owner (or a superuser) can disable the triggers: that is the
--     tampering `mdm-server audit verify` exists to detect.
--
-- `mdm_app` is cluster-wide and several databases may share a cluster: it is
-- created only if missing (also when another database's migration creates it at
-- the same moment); everything else here is per database.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mdm_app') THEN
        BEGIN
            CREATE ROLE mdm_app NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created concurrently by another database's migration
        END;
    END IF;
END
$$;

-- seq is assigned by audit.append as the last seq + 1 under an advisory lock, not
-- by a sequence: a sequence leaves holes when a transaction rolls back, and a hole
-- is exactly what `audit verify` reports as a removed entry. tenant_id has no
-- foreign key: entries outlive their tenant (and a cascade would be a delete).
CREATE TABLE audit_log (
    seq        bigint      PRIMARY KEY CHECK (seq >= 1),
    at         timestamptz NOT NULL,
    tenant_id  text,
    actor      text        NOT NULL,
    action     text        NOT NULL,
    target     text        NOT NULL,
    details    jsonb       NOT NULL DEFAULT '{}',   -- ids and codes, never personal values
    prev_hash  bytea       NOT NULL CHECK (length(prev_hash) = 32),
    hash       bytea       NOT NULL CHECK (length(hash) = 32)
);
-- A tenant's entries, newest first (audit.read, the admin API).
CREATE INDEX audit_log_tenant ON audit_log (tenant_id, seq);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- What the server needs, on everything that exists now ...
GRANT USAGE, CREATE ON SCHEMA public TO mdm_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO mdm_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO mdm_app;
-- ... and on what later migrations (run by this same role) create.
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO mdm_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO mdm_app;

-- The audit log: read and append, nothing else (for PUBLIC not even that).
REVOKE ALL ON audit_log FROM PUBLIC;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM mdm_app;
GRANT SELECT, INSERT ON audit_log TO mdm_app;

-- The ingest adds day partitions to telemetry_<kind>, and retention drops them:
-- both need ownership. mdm_app owns every partition below the root (the kind
-- partitions and any day partition made before this migration); the root stays
-- with the migrating role.
DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN SELECT relid FROM pg_partition_tree('telemetry') WHERE level >= 1 LOOP
        EXECUTE format('ALTER TABLE %s OWNER TO mdm_app', part);
    END LOOP;
END
$$;
