-- Device identity on the broker (issue 4). A device's MQTT password is derived
-- from the master key, its tenant and id, and this credential generation
-- (mdm_server/broker/credentials.py), so the server can give a broker that lost
-- its state every device's client again without storing a password. Enrollment
-- starts at 1; every re-enrollment adds 1, which makes the old password useless.
-- Devices enrolled before this migration got a random password that cannot be
-- derived: generation 0; `mdm-server device reenroll` gives them new credentials
-- before the broker lets them in.
ALTER TABLE devices
    ADD COLUMN mqtt_generation integer NOT NULL DEFAULT 0 CHECK (mqtt_generation >= 0);

-- The password itself is never stored, and its hash is not needed either: the
-- broker keeps its own, and the server can derive (and so check) any device's
-- password. Enrollment no longer spends 100,000 PBKDF2 rounds on a hash nobody
-- reads; hashes of passwords from before this migration are dropped with them.
ALTER TABLE devices ALTER COLUMN mqtt_password_hash DROP NOT NULL;
UPDATE devices SET mqtt_password_hash = NULL;
