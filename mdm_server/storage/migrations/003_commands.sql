-- Signed commands to devices: the server's signing keys and the command outbox.

-- Ed25519 keys the server signs commands with. The private key is stored only
-- encrypted (AES-256-GCM under a key derived from MDM_MASTER_KEY, which is never
-- in the database; the 12-byte nonce is prepended, the key id is the associated
-- data), so a database dump alone cannot forge commands. Agents trust the public
-- keys they were enrolled with; a retired key signs nothing new.
CREATE TABLE signing_keys (
    key_id          text        PRIMARY KEY CHECK (key_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    public_key      bytea       NOT NULL CHECK (length(public_key) = 32),
    private_key_enc bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    retired_at      timestamptz
);

-- One row per command: the outbox. The API inserts a row in the transaction of
-- the change that asks for it ('queued'); the dispatcher signs it (payload, nonce,
-- key_id, issued_at stored, so that a resend is byte-identical and the agent's
-- nonce check absorbs a duplicate), publishes it at QoS 1 and marks it 'sent'
-- once the broker acknowledged it. The full lifecycle is listed already; acks,
-- approvals and expiry handling add the later states.
CREATE TABLE commands (
    command_id   uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    text        NOT NULL,
    device_id    text        NOT NULL,
    type         text        NOT NULL CHECK (type IN ('lock', 'locate', 'wipe',
                                                      'factory_reset', 'sync_policy')),
    params       jsonb       NOT NULL DEFAULT '{}',
    notice       jsonb,
    state        text        NOT NULL CHECK (state IN ('pending_approval', 'queued', 'sent',
                                                       'received', 'notice_shown', 'completed',
                                                       'failed', 'rejected', 'expired',
                                                       'cancelled')),
    reason       text,
    requested_by text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    issued_at    timestamptz,
    expires_at   timestamptz NOT NULL,
    sent_at      timestamptz,
    nonce        text,
    key_id       text        REFERENCES signing_keys,
    payload      bytea,
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE,
    CHECK (expires_at > created_at),
    CHECK ((payload IS NULL) = (nonce IS NULL) AND (payload IS NULL) = (key_id IS NULL)
           AND (payload IS NULL) = (issued_at IS NULL))
);

-- The dispatcher's work: queued commands, oldest first.
CREATE INDEX commands_outbox ON commands (created_at) WHERE state = 'queued';
-- A device's commands, newest first (API, later the ack handler).
CREATE INDEX commands_device ON commands (tenant_id, device_id, created_at);
