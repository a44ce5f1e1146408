-- Retiring a signing key (issue 10): every device that trusts it is sent a signed
-- 'distrust_key' (the agent drops the key), and the retired key's private half is
-- deleted: nothing can be signed with it again, whoever gets the master key later.
ALTER TABLE commands DROP CONSTRAINT commands_type_check;
ALTER TABLE commands ADD CONSTRAINT commands_type_check
    CHECK (type IN ('lock', 'locate', 'wipe', 'factory_reset', 'sync_policy', 'trust_key',
                    'distrust_key'));

ALTER TABLE signing_keys ALTER COLUMN private_key_enc DROP NOT NULL;
ALTER TABLE signing_keys ADD CONSTRAINT signing_keys_private_until_retired
    CHECK (private_key_enc IS NOT NULL OR retired_at IS NOT NULL);
-- Keys retired before this migration lose their private half now.
UPDATE signing_keys SET private_key_enc = NULL WHERE retired_at IS NOT NULL;
