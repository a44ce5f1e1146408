-- Live tracking and the device user's live view (issue 11).
--
-- What happens to a device is announced on the channel 'mdm_live' when it commits
-- (NOTIFY is delivered at commit, never for a rolled-back transaction); `serve`
-- LISTENs and fans it out to the Server-Sent Event streams (mdm_server/live/).
-- Stored location points are announced by the ingest itself, once per committed
-- batch (mdm_server/ingest/sink.py), never per record. The two triggers below
-- announce what is rare: an admin's read of a device's personal data (an access-log
-- entry) and a command's event. Payloads carry ids only; the listener reads the
-- rows (and checks the audit entry's MAC) before it tells anyone.

CREATE FUNCTION live_notify_read() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mdm_live', json_build_object(
        'k', 'read', 't', NEW.tenant_id, 'd', substr(NEW.target, 8), 's', NEW.seq)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER audit_log_live AFTER INSERT ON audit_log
    FOR EACH ROW WHEN (NEW.action = 'personal_data.read' AND NEW.target LIKE 'device:%'
                       AND NEW.tenant_id IS NOT NULL)
    EXECUTE FUNCTION live_notify_read();

CREATE FUNCTION live_notify_command() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    SELECT tenant_id, device_id, type INTO c FROM commands WHERE command_id = NEW.command_id;
    IF FOUND AND c.type IN ('lock', 'locate', 'wipe', 'factory_reset', 'remote_view') THEN
        PERFORM pg_notify('mdm_live', json_build_object(
            'k', 'cmd', 't', c.tenant_id, 'd', c.device_id, 'e', NEW.event_id)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER command_events_live AFTER INSERT ON command_events
    FOR EACH ROW EXECUTE FUNCTION live_notify_command();

-- Who is watching a device's live location now: a row per admin stream and device,
-- written with the watch's 'start' audit entry and deleted with its 'end' entry.
-- The serving process holds a session advisory lock on its `server_key` (two-key
-- lock, class 0x6C697665 "live") while it runs; a row whose server no longer holds
-- its lock belongs to a process that died without logging the end, and the next
-- sweep of any `serve` logs that end for it (ended: server_stopped).
CREATE TABLE live_watches (
    watch_id    uuid        NOT NULL,
    tenant_id   text        NOT NULL,
    device_id   text        NOT NULL,
    actor       text        NOT NULL,
    role        text        NOT NULL,
    started_at  timestamptz NOT NULL,
    server_key  integer     NOT NULL,
    PRIMARY KEY (watch_id, tenant_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE
);
CREATE INDEX live_watches_device ON live_watches (tenant_id, device_id);
CREATE INDEX live_watches_server ON live_watches (server_key);
