-- Location agents people already run (issue 12): OwnTracks (MQTT, HTTP) and
-- OsmAnd / Traccar Client (HTTP). docs/agents.md; mdm_server/agents/.
--
-- Which agent reports for the device. 'native' speaks docs/protocol.md; the others
-- are read through agent_protocol's adapters and can carry out fewer commands.
ALTER TABLE devices ADD COLUMN agent text NOT NULL DEFAULT 'native'
    CHECK (agent IN ('native', 'owntracks', 'osmand', 'traccar'));
-- The agent's secret, sealed under a key derived from the master key (never raw):
-- OwnTracks' payload encryption passphrase, or OsmAnd's URL key. Re-wrapped by
-- `keys rotate-master`.
ALTER TABLE devices ADD COLUMN agent_secret bytea;
-- A keyed digest (under the master key) of the OsmAnd / Traccar URL key: how a
-- request finds its device. The key itself is never stored raw.
ALTER TABLE devices ADD COLUMN http_key_digest bytea;
CREATE UNIQUE INDEX devices_http_key ON devices (http_key_digest)
    WHERE http_key_digest IS NOT NULL;
ALTER TABLE devices ADD CONSTRAINT devices_agent_secret
    CHECK (agent = 'native' OR agent_secret IS NOT NULL);
ALTER TABLE devices ADD CONSTRAINT devices_http_key
    CHECK ((agent IN ('osmand', 'traccar')) = (http_key_digest IS NOT NULL));

-- What was really sent to a foreign agent for a command (its own form, e.g.
-- OwnTracks' {"_type":"cmd","action":"reportLocation"}): the notice log shows it.
ALTER TABLE commands ADD COLUMN agent_form jsonb;
-- When an HTTP-mode agent took the command with the answer to one of its posts.
ALTER TABLE commands ADD COLUMN fetched_at timestamptz;

-- Whether a device is online, as far as its agent says: OwnTracks' last will
-- (offline), any message since (a sign of life: online).
CREATE TABLE device_presence (
    tenant_id  text        NOT NULL,
    device_id  text        NOT NULL,
    online     boolean     NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    source     text        NOT NULL CHECK (source IN ('lwt', 'status', 'message')),
    PRIMARY KEY (tenant_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE
);
GRANT SELECT, INSERT, UPDATE, DELETE ON device_presence TO mdm_app;
