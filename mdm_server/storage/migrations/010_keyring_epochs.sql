-- Device data keys wrapped under a key-ring epoch whose secret lives OUTSIDE the
-- database (MDM_KEYRING_DIR, one file per epoch): mdm_server/storage/keyring.py and
-- docs/architecture.md "Crypto-shredding".
--
-- Erasure destroys a device's key row; compaction then re-wraps every surviving
-- key under a new epoch and retires the old ones (their rows here are deleted,
-- their files overwritten and unlinked). A destroyed key's bytes that PostgreSQL
-- keeps (heap pages, WAL, old backups of the keystore) are then wrapped under an
-- epoch whose secret no longer exists anywhere.

-- Which key ring belongs to this database: MDM_KEYRING_DIR/keyring.id holds the
-- same id, so a server pointed at another database's key ring refuses to start
-- instead of making keys nobody can open (or retiring files that are not its own).
CREATE TABLE keystore.keyring (
    only_one   boolean     PRIMARY KEY DEFAULT true CHECK (only_one),
    keyring_id text        NOT NULL CHECK (keyring_id ~ '^[0-9a-f]{32}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The epochs in use; the newest is current (new keys are wrapped under it). Epoch 0
-- is the scheme before this migration (a key derived from the master key alone, no
-- file): it exists only while keys wrapped that way remain, and the first
-- compaction re-wraps them. `fingerprint` binds an epoch's file to this database
-- (HMAC of the key ring id and epoch number under the epoch secret; it reveals
-- nothing about the secret). `shredded`: a device key wrapped under this epoch was
-- destroyed, so the epoch must be retired (serve's schedule catches up if the
-- compaction that follows every erasure did not finish).
CREATE TABLE keystore.epochs (
    epoch       integer     PRIMARY KEY CHECK (epoch >= 0),
    fingerprint bytea       CHECK ((epoch = 0) = (fingerprint IS NULL)
                                   AND (fingerprint IS NULL OR length(fingerprint) = 16)),
    shredded    boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO keystore.epochs (epoch)
SELECT 0 WHERE EXISTS (SELECT 1 FROM keystore.device_keys);

-- A key is wrapped under an epoch that exists. Compaction deletes the old epochs'
-- rows in the transaction that re-wraps their keys: a key made under one of them
-- meanwhile either makes that DELETE fail (compaction re-wraps again) or fails its
-- own INSERT (the ingest wraps it again under the current epoch). Nothing is ever
-- left under an epoch whose file is about to be destroyed.
ALTER TABLE keystore.device_keys ADD COLUMN epoch integer NOT NULL DEFAULT 0;
ALTER TABLE keystore.device_keys ALTER COLUMN epoch DROP DEFAULT;
ALTER TABLE keystore.device_keys
    ADD CONSTRAINT device_keys_epoch_fkey FOREIGN KEY (epoch) REFERENCES keystore.epochs
        ON DELETE NO ACTION;
CREATE INDEX device_keys_epoch ON keystore.device_keys (epoch);

GRANT SELECT, INSERT, UPDATE, DELETE ON keystore.keyring, keystore.epochs TO mdm_app;
