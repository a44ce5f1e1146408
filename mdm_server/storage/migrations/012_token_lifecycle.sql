-- Access that can be taken back: API tokens expire, can be listed and revoked by a
-- public id, and a device user's token is bound to the enrollment it was issued
-- under (mdm_server/storage/tokens.py, docs/api.md "Tokens").

-- A token's public id: random, never derived from the secret (which stays a
-- SHA-256 digest in token_sha256). Listing and revoking use it.
ALTER TABLE api_tokens
    ADD COLUMN token_id     uuid        NOT NULL DEFAULT gen_random_uuid(),
    ADD COLUMN expires_at   timestamptz,
    ADD COLUMN last_used_at timestamptz;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_token_id_key UNIQUE (token_id);
-- Tokens made before expiry existed get the default lifetime from the upgrade on:
-- none stops working at the upgrade, none works for ever.
UPDATE api_tokens SET expires_at = now() + CASE role WHEN 'user' THEN interval '30 days'
                                                     ELSE interval '90 days' END;
ALTER TABLE api_tokens ALTER COLUMN expires_at SET NOT NULL;
CREATE INDEX api_tokens_tenant ON api_tokens (tenant_id, created_at DESC, token_id);
-- admin create: the live tokens of a name; device revoke: the device's user tokens.
CREATE INDEX api_tokens_name ON api_tokens (tenant_id, name) WHERE revoked_at IS NULL;
CREATE INDEX api_tokens_device ON api_tokens (tenant_id, device_id)
    WHERE role = 'user' AND revoked_at IS NULL;

-- A device's enrollment: `device reenroll` starts a new one (a new holder). It is
-- not the MQTT credential generation: credentials may be renewed without a new
-- holder. enrollment_started_at: what the device's user may read starts there.
ALTER TABLE devices
    ADD COLUMN enrollment_no         integer     NOT NULL DEFAULT 1,
    ADD COLUMN enrollment_started_at timestamptz NOT NULL DEFAULT now();
UPDATE devices SET enrollment_started_at = enrolled_at;

-- What a user token covers, fixed when it is issued: its own device and the
-- tenant's devices with the same user e-mail then, each in the enrollment it was
-- in. A device re-enrolled since (a new holder) is covered no more.
CREATE TABLE api_token_devices (
    token_id      uuid    NOT NULL REFERENCES api_tokens (token_id) ON DELETE CASCADE,
    tenant_id     text    NOT NULL,
    device_id     text    NOT NULL,
    enrollment_no integer NOT NULL,
    PRIMARY KEY (token_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE
);
-- The user tokens that exist cover what they covered until now.
INSERT INTO api_token_devices (token_id, tenant_id, device_id, enrollment_no)
SELECT t.token_id, d.tenant_id, d.device_id, d.enrollment_no
FROM api_tokens t
JOIN devices own ON own.tenant_id = t.tenant_id AND own.device_id = t.device_id
JOIN devices d ON d.tenant_id = t.tenant_id
             AND (d.device_id = own.device_id
                  OR (own.user_email IS NOT NULL AND d.user_email = own.user_email))
WHERE t.role = 'user';
