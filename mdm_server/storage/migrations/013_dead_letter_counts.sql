-- Dead letters counted, not kept one row each (issue 10): a device that sent
-- 202,000 junk messages left 202,000 rows. From now on a row is an aggregate of
-- one (tenant, device, reason, topic outline, UTC hour): how many messages, their
-- total size, when the first and the last arrived, and the detail of the first
-- (names fields, never values). A flood is a handful of rows. The topic outline is
-- what of the topic parsed (migration 009): a fixed, small set per device.
--
-- Also counted here, with reason 'rate_limited' and topic
-- 'mdm/v1/{tenant}/devices/{device}/#': messages the ingest acknowledged without
-- decoding or storing them because their device was over its rate limit
-- (MDM_INGEST_DEVICE_RATE / MDM_INGEST_DEVICE_BURST): the one kind of message
-- accepted by the broker that is deliberately not stored.
--
-- Rows kept so far become aggregates of their hour; nothing is lost but the
-- individual times and all details but each group's first.
CREATE TEMP TABLE dead_letters_013 ON COMMIT DROP AS
SELECT tenant_id, device_id, topic, min(failed_level) AS failed_level, reason,
       date_trunc('hour', received_at, 'UTC') AS hour,
       count(*) AS count, sum(payload_bytes) AS payload_bytes,
       min(received_at) AS first_seen, max(received_at) AS last_seen,
       (array_agg(detail ORDER BY id))[1] AS detail
FROM dead_letters
GROUP BY tenant_id, device_id, topic, reason, date_trunc('hour', received_at, 'UTC');

DROP TABLE dead_letters;

CREATE TABLE dead_letters (
    id             bigserial   PRIMARY KEY,
    tenant_id      text,
    device_id      text,
    topic          text        NOT NULL,
    failed_level   text
        CHECK (failed_level IN ('prefix', 'tenant', 'device', 'channel', 'kind', 'extra')),
    reason         text        NOT NULL,
    hour           timestamptz NOT NULL,  -- the start of the UTC hour counted
    count          bigint      NOT NULL CHECK (count > 0),
    payload_bytes  bigint      NOT NULL CHECK (payload_bytes >= 0),  -- all of them
    first_seen     timestamptz NOT NULL,
    last_seen      timestamptz NOT NULL,
    detail         text        NOT NULL,  -- the first one's
    -- What the ingest adds to (ON CONFLICT); also serves erasure (tenant, device).
    CONSTRAINT dead_letters_per_hour
        UNIQUE NULLS NOT DISTINCT (tenant_id, device_id, reason, topic, hour)
)
-- Every write updates count, payload_bytes and last_seen, none of them indexed:
-- room on the page keeps those updates HOT.
WITH (fillfactor = 80);
-- The admin listing, newest first (id), and retention (by hour).
CREATE INDEX dead_letters_tenant_id ON dead_letters (tenant_id, id);
CREATE INDEX dead_letters_hour ON dead_letters (hour);

INSERT INTO dead_letters (tenant_id, device_id, topic, failed_level, reason, hour, count,
                          payload_bytes, first_seen, last_seen, detail)
SELECT tenant_id, device_id, topic, failed_level, reason, hour, count, payload_bytes,
       first_seen, last_seen, detail
FROM dead_letters_013 ORDER BY first_seen;

GRANT SELECT, INSERT, UPDATE, DELETE ON dead_letters TO mdm_app;
GRANT USAGE, SELECT ON SEQUENCE dead_letters_id_seq TO mdm_app;
