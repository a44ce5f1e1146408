-- Collection and masking policies, every version kept; what the policy engine
-- needs at ingest (check-out events) and what it keeps of suppressed points.

CREATE TABLE policies (
    tenant_id   text        NOT NULL REFERENCES tenants ON DELETE CASCADE,
    name        text        NOT NULL CHECK (name ~ '^[A-Za-z0-9_-]{1,64}$'),
    version     integer     NOT NULL CHECK (version >= 1),
    body        jsonb,                       -- NULL on a deletion
    deleted     boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL,
    PRIMARY KEY (tenant_id, name, version),
    CHECK (deleted = (body IS NULL))
);

-- Every tenant has a default policy (collect everything, keep 90 days) that an
-- admin may change but not delete.
INSERT INTO policies (tenant_id, name, version, body, created_by)
SELECT tenant_id, 'default', 1, '{"applies_to": {}}'::jsonb, 'system' FROM tenants;

-- Check-out/check-in events by event time, kept whatever the policy collects:
-- "only while checked out" is decided from them. No personal data beyond the
-- fact and time of a check-out.
CREATE TABLE checkout_events (
    tenant_id  text        NOT NULL,
    device_id  text        NOT NULL,
    ts         timestamptz NOT NULL,
    record_id  text        NOT NULL,
    event      text        NOT NULL CHECK (event IN ('check_out', 'check_in')),
    PRIMARY KEY (tenant_id, device_id, ts, record_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE
);

-- Locations a policy kept out of storage: only how many, per device and day.
CREATE TABLE suppressed_locations (
    tenant_id  text   NOT NULL,
    device_id  text   NOT NULL,
    day        date   NOT NULL,
    count      bigint NOT NULL CHECK (count >= 0),
    PRIMARY KEY (tenant_id, device_id, day),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE
);
