-- Nothing an agent chose is kept in the clear outside the sealed data (issue 9):
--
-- * Record ids: from now on the ingest stores a keyed digest of the id the agent
--   sent (mdm_server/ingest/record_ids.py), in telemetry.record_id and
--   checkout_events.record_id. Rows stored before keep the id they had until
--   retention removes them: digesting them needs the master key, which a
--   migration does not have, and their sealed data is bound to the id.
-- * Dead letters keep what of a topic parsed, never the topic as sent: the
--   tenant and device when they parse (so the tenant's admin sees the dead letter
--   and erasure deletes it) and the name of the first level that did not.
ALTER TABLE dead_letters
    ADD COLUMN failed_level text
        CHECK (failed_level IN ('prefix', 'tenant', 'device', 'channel', 'kind', 'extra'));

-- Dead letters kept so far with a topic that did not parse: keep only what parses.
UPDATE dead_letters SET
    tenant_id = substring(topic FROM '^mdm/v1/([A-Za-z0-9_-]{1,64})/devices/[A-Za-z0-9_-]{1,64}/telemetry/'),
    device_id = substring(topic FROM '^mdm/v1/[A-Za-z0-9_-]{1,64}/devices/([A-Za-z0-9_-]{1,64})/telemetry/'),
    topic = regexp_replace(topic, '^(mdm/v1/[A-Za-z0-9_-]{1,64}/devices/[A-Za-z0-9_-]{1,64}/telemetry)/.*$', '\1/{kind}'),
    failed_level = 'kind'
WHERE tenant_id IS NULL
  AND topic ~ '^mdm/v1/[A-Za-z0-9_-]{1,64}/devices/[A-Za-z0-9_-]{1,64}/telemetry/';
UPDATE dead_letters SET topic = '{topic}', failed_level = 'prefix' WHERE tenant_id IS NULL;

-- Retention of what devices report about commands (mdm_server/retention.py): ack
-- details are cleared, and events of finished commands deleted, by age.
CREATE INDEX command_events_at ON command_events (at);
