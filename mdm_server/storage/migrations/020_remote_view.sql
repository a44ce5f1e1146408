-- Remote view (issue 11): the command 'remote_view' asks the device's user first.
-- The agent shows the notice and acks the user's answer: 'consent_given' (a live
-- state: the view is started, 'completed' follows) or 'consent_refused' (terminal:
-- nothing happened on the device). mdm_server/commands/states.py is the machine;
-- the checks below keep the table to it.
ALTER TABLE commands DROP CONSTRAINT commands_type_check;
ALTER TABLE commands ADD CONSTRAINT commands_type_check
    CHECK (type IN ('lock', 'locate', 'wipe', 'factory_reset', 'sync_policy', 'trust_key',
                    'distrust_key', 'remote_view'));

ALTER TABLE commands DROP CONSTRAINT commands_state_check;
ALTER TABLE commands ADD CONSTRAINT commands_state_check
    CHECK (state IN ('pending_approval', 'queued', 'sent', 'received', 'notice_shown',
                     'consent_given', 'completed', 'failed', 'rejected', 'consent_refused',
                     'expired', 'cancelled'));

-- When the device's user answered (the time the device reports); the state says
-- how (consent_given and what follows it, or consent_refused).
ALTER TABLE commands ADD COLUMN consent_at timestamptz;

-- A remote view carries the notice its user is asked with, and is never completed
-- without the user's answer on record (the state machine accepts 'completed' only
-- from 'consent_given', and a refusal is final).
ALTER TABLE commands ADD CONSTRAINT commands_remote_view_notice
    CHECK (type <> 'remote_view' OR notice IS NOT NULL);
ALTER TABLE commands ADD CONSTRAINT commands_remote_view_consent
    CHECK (type <> 'remote_view' OR state NOT IN ('consent_given', 'completed')
           OR consent_at IS NOT NULL);
