-- Foundation: tenants, API tokens, devices, telemetry (partitioned), dead letters.

CREATE TABLE tenants (
    tenant_id    text PRIMARY KEY CHECK (tenant_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Bearer tokens are stored as SHA-256 digests; the token itself is shown once.
CREATE TABLE api_tokens (
    token_sha256 bytea PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES tenants ON DELETE CASCADE,
    role         text NOT NULL CHECK (role IN ('admin', 'auditor', 'user')),
    name         text NOT NULL,
    device_id    text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

CREATE TABLE devices (
    tenant_id          text NOT NULL REFERENCES tenants ON DELETE CASCADE,
    device_id          text NOT NULL CHECK (device_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    ownership          text NOT NULL CHECK (ownership IN ('corporate', 'personal')),
    user_email         text,
    groups             text[] NOT NULL DEFAULT '{}',
    mqtt_username      text NOT NULL UNIQUE,
    mqtt_password_hash text NOT NULL,
    status             text NOT NULL DEFAULT 'enrolled' CHECK (status IN ('enrolled', 'revoked')),
    enrolled_at        timestamptz NOT NULL DEFAULT now(),
    revoked_at         timestamptz,
    PRIMARY KEY (tenant_id, device_id)
);

-- One parent for all six kinds. LIST by kind, then RANGE by event time (one
-- partition a day, created on demand by the ingest sink), so that retention can
-- drop whole partitions per kind. The key holds the partition columns (kind, ts),
-- as PostgreSQL requires; its order serves "one device over a time range".
-- A redelivered message has the same (id, ts), so it is absorbed by this key.
CREATE TABLE telemetry (
    tenant_id      text        NOT NULL,
    device_id      text        NOT NULL,
    kind           text        NOT NULL,
    record_id      text        NOT NULL,
    ts             timestamptz NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    policy_id      text,
    policy_version integer,
    data           jsonb       NOT NULL,
    PRIMARY KEY (tenant_id, device_id, ts, record_id, kind)
) PARTITION BY LIST (kind);

CREATE TABLE telemetry_location   PARTITION OF telemetry FOR VALUES IN ('location')   PARTITION BY RANGE (ts);
CREATE TABLE telemetry_identity   PARTITION OF telemetry FOR VALUES IN ('identity')   PARTITION BY RANGE (ts);
CREATE TABLE telemetry_sim        PARTITION OF telemetry FOR VALUES IN ('sim')        PARTITION BY RANGE (ts);
CREATE TABLE telemetry_network    PARTITION OF telemetry FOR VALUES IN ('network')    PARTITION BY RANGE (ts);
CREATE TABLE telemetry_apps       PARTITION OF telemetry FOR VALUES IN ('apps')       PARTITION BY RANGE (ts);
CREATE TABLE telemetry_checkinout PARTITION OF telemetry FOR VALUES IN ('checkinout') PARTITION BY RANGE (ts);

-- Bad input is kept with its reason, never with its payload (it may hold
-- personal data): topic, reason code, a detail that names fields but no values,
-- and the size.
CREATE TABLE dead_letters (
    id             bigserial PRIMARY KEY,
    received_at    timestamptz NOT NULL DEFAULT now(),
    topic          text        NOT NULL,
    tenant_id      text,
    device_id      text,
    reason         text        NOT NULL,
    detail         text        NOT NULL,
    payload_bytes  integer     NOT NULL
);
CREATE INDEX dead_letters_tenant_time ON dead_letters (tenant_id, received_at);
