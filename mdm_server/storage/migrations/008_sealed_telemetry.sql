-- Telemetry sealed at rest under a key per device (crypto-shredding; see
-- mdm_server/storage/sealing.py and docs/architecture.md "Crypto-shredding").
--
-- The keys live in their own schema so that backups can treat them apart: the
-- data may be kept for years, the keystore must not outlive an erasure's deadline.
CREATE SCHEMA keystore;

-- One data key per device, random, wrapped under a key derived from the master
-- key (which is never in the database). Erasure deletes the row; the next record
-- from the device makes a new key with a new key_id.
CREATE TABLE keystore.device_keys (
    key_id     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text        NOT NULL,
    device_id  text        NOT NULL,
    wrapped    bytea       NOT NULL CHECK (length(wrapped) = 60),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, device_id)
);

-- mdm_app owns the table: erasure VACUUMs it right after destroying a key, so the
-- key's dead tuple does not linger in the table's pages (PostgreSQL < 17 lets only
-- the owner VACUUM a table).
GRANT USAGE ON SCHEMA keystore TO mdm_app;
ALTER TABLE keystore.device_keys OWNER TO mdm_app;

-- A record is either sealed (key_id + sealed: version byte, nonce, AES-GCM
-- ciphertext of the JSON data) or, if stored before this migration, plain `data`
-- until retention removes it.
ALTER TABLE telemetry
    ADD COLUMN key_id bigint,
    ADD COLUMN sealed bytea,
    ALTER COLUMN data DROP NOT NULL,
    ADD CONSTRAINT telemetry_sealed_or_plain
        CHECK ((sealed IS NULL) = (key_id IS NULL) AND (sealed IS NULL) <> (data IS NULL));
