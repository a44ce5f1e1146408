-- Issue 11, the shift report (mdm_server/storage/shifts.py, docs/api.md "Shift report").
--
-- shift_settings: a tenant's overdue limit, set by an admin through the API
-- (audited). overdue_after_s NULL (or no row): the default, the longest shift of
-- the last 30 days plus one hour. Holds no personal data.
CREATE TABLE shift_settings (
    tenant_id       text        PRIMARY KEY REFERENCES tenants ON DELETE CASCADE,
    overdue_after_s integer     CHECK (overdue_after_s BETWEEN 300 AND 7776000),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      text        NOT NULL
);

-- The report lists a tenant's check-outs by time across its devices; the primary
-- key (tenant, device, ts, record_id) serves one device's history, this the
-- tenant's. Check-outs are a couple of rows per device and day: cheap to index.
CREATE INDEX checkout_events_tenant_outs ON checkout_events (tenant_id, ts, device_id, record_id)
    WHERE event = 'check_out';

-- When the server received each event, as telemetry has it: a device user's token
-- shows what was recorded since their enrollment began (docs/api.md, "What a user
-- token covers"), shifts included. Events stored before this migration get their
-- event time, the nearest thing known.
ALTER TABLE checkout_events ADD COLUMN received_at timestamptz;
UPDATE checkout_events SET received_at = ts;
ALTER TABLE checkout_events ALTER COLUMN received_at SET DEFAULT statement_timestamp(),
                            ALTER COLUMN received_at SET NOT NULL;
