-- The master key (issue 10): which one this database's secrets are under, so that a
-- process started with another key refuses at once instead of writing what nobody
-- can verify or open; and its rotation (`mdm-server keys rotate-master`).
--
-- `fingerprint`: HKDF-SHA256 of the master key with its own label, 16 bytes; it
-- reveals nothing of the key. Written by the first process that runs with a key,
-- replaced by a rotation in the transaction that re-wraps everything.
CREATE TABLE master_key (
    only_one    boolean     PRIMARY KEY DEFAULT true CHECK (only_one),
    fingerprint bytea       NOT NULL CHECK (length(fingerprint) = 16),
    since       timestamptz NOT NULL DEFAULT now()
);

-- A device's MQTT password is derived from the master key. After a rotation the
-- broker keeps the password the device has, but the server can no longer derive
-- it: the device is marked until it is re-enrolled (new credentials under the new
-- key). Reconciling keeps such a device's broker account as it is.
ALTER TABLE devices ADD COLUMN mqtt_stale boolean NOT NULL DEFAULT false;
