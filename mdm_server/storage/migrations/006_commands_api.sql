-- Commands issued by admins: approval, idempotency, delivery timestamps, the
-- per-command event history (the user-notice log is read from it), re-sends on
-- reconnect, and the tenant's default notice texts.

ALTER TABLE commands
    -- Factory reset waits for a second admin; who approved it and when.
    ADD COLUMN approved_by      text,
    ADD COLUMN approved_at      timestamptz,
    ADD COLUMN cancelled_by     text,
    -- Idempotency-Key of the API request that created the command, scoped to the
    -- admin who sent it, with a digest of the request so that reusing a key for a
    -- different request is refused instead of silently answered.
    ADD COLUMN idempotency_key  text CHECK (length(idempotency_key) <= 200),
    ADD COLUMN request_sha256   bytea,
    -- What the device reported, step by step (the user-notice log).
    ADD COLUMN received_at      timestamptz,
    ADD COLUMN notice_shown_at  timestamptz,
    ADD COLUMN finished_at      timestamptz,
    ADD COLUMN outcome_detail   text CHECK (length(outcome_detail) <= 1000),
    -- Set when the device reconnected while the command was 'sent' but not yet
    -- received: the dispatcher publishes the stored bytes again and clears it.
    ADD COLUMN resend           boolean NOT NULL DEFAULT false,
    ADD COLUMN send_count       integer NOT NULL DEFAULT 0,
    -- Commands issued together to a group of devices (a lost shipment) share a
    -- batch id; the batch's progress is counted from its commands.
    ADD COLUMN batch_id         uuid,
    ADD CHECK ((idempotency_key IS NULL) = (request_sha256 IS NULL)),
    -- A factory reset can only leave pending_approval through an approval (or by
    -- being cancelled or expiring): never queued without a second admin.
    ADD CHECK (type <> 'factory_reset' OR state IN ('pending_approval', 'cancelled', 'expired')
               OR (approved_by IS NOT NULL AND approved_by <> requested_by));

CREATE UNIQUE INDEX commands_idempotency
    ON commands (tenant_id, requested_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE INDEX commands_batch ON commands (batch_id) WHERE batch_id IS NOT NULL;

-- One request for a group of devices: what was asked, how many commands it made,
-- which devices the guards refused (ids and codes), its Idempotency-Key.
CREATE TABLE command_batches (
    batch_id        uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       text        NOT NULL REFERENCES tenants ON DELETE CASCADE,
    group_name      text        NOT NULL,
    type            text        NOT NULL,
    params          jsonb       NOT NULL,
    reason          text        NOT NULL,
    requested_by    text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    commands        integer     NOT NULL,
    refused         jsonb       NOT NULL DEFAULT '[]',
    idempotency_key text        CHECK (length(idempotency_key) <= 200),
    request_sha256  bytea,
    CHECK ((idempotency_key IS NULL) = (request_sha256 IS NULL))
);
CREATE UNIQUE INDEX command_batches_idempotency
    ON command_batches (tenant_id, requested_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Re-sends the dispatcher owes.
CREATE INDEX commands_resend ON commands (created_at) WHERE resend;

-- Every step of every command, in order: created, approved, cancelled, published,
-- each ack (accepted or ignored, with the reason), expired. Append-only by use;
-- the tamper-evident record of admin actions is the audit log.
CREATE TABLE command_events (
    event_id    bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id  uuid        NOT NULL REFERENCES commands ON DELETE CASCADE,
    at          timestamptz NOT NULL DEFAULT now(),
    event       text        NOT NULL,
    from_state  text,
    to_state    text,
    accepted    boolean     NOT NULL,
    detail      text        CHECK (length(detail) <= 1000),
    actor       text
);
CREATE INDEX command_events_command ON command_events (command_id, event_id);

-- The tenant's notice text per kind of command (used when an admin gives none).
-- A managed and a full wipe mean different things to the user: two kinds.
CREATE TABLE notice_templates (
    tenant_id   text        NOT NULL REFERENCES tenants ON DELETE CASCADE,
    kind        text        NOT NULL CHECK (kind IN ('lock', 'locate', 'wipe-managed',
                                                     'wipe-full', 'factory_reset')),
    text        text        NOT NULL CHECK (length(text) BETWEEN 1 AND 4000),
    lang        text        NOT NULL CHECK (lang ~ '^[A-Za-z0-9-]{2,35}$'),
    updated_by  text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, kind)
);

-- Key rotation: the server-internal command 'trust_key' hands a device a new public
-- key, signed with a key it already trusts. Each device's confirmed keys are kept,
-- and its commands are signed with the newest of them.
ALTER TABLE commands DROP CONSTRAINT commands_type_check;
ALTER TABLE commands ADD CONSTRAINT commands_type_check
    CHECK (type IN ('lock', 'locate', 'wipe', 'factory_reset', 'sync_policy', 'trust_key'));

ALTER TABLE devices ADD COLUMN trusted_key_ids text[] NOT NULL DEFAULT '{}';
UPDATE devices SET trusted_key_ids =
    ARRAY(SELECT key_id FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at);

-- Whatever enrolls a device, its enrollment carried every unretired public key
-- (mdm_server.storage.devices): it trusts exactly those.
CREATE FUNCTION devices_trust_current_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(NEW.trusted_key_ids) = 0 THEN
        NEW.trusted_key_ids :=
            ARRAY(SELECT key_id FROM signing_keys WHERE retired_at IS NULL ORDER BY created_at);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER devices_trust_current_keys BEFORE INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_trust_current_keys();
