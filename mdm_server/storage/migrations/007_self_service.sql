-- The device user's rights: erasure requests (GDPR art. 17), answered within a
-- month: an admin fulfils or refuses (with a reason); unanswered, the server
-- fulfils it when due_at passes. After fulfilment only the fact remains: this
-- row, the audit entry, and the notice log of the device's commands.
CREATE TABLE erasure_requests (
    request_id     uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id      text        NOT NULL,
    device_id      text        NOT NULL,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    due_at         timestamptz NOT NULL DEFAULT now() + interval '30 days',
    state          text        NOT NULL DEFAULT 'pending'
                               CHECK (state IN ('pending', 'fulfilled', 'refused')),
    decided_by     text,
    decided_at     timestamptz,
    refusal_reason text        CHECK (length(refusal_reason) BETWEEN 1 AND 1000),
    erased         jsonb,      -- rows removed, per kind of data (counts only)
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE,
    CHECK ((state = 'pending') = (decided_at IS NULL)),
    CHECK ((state = 'refused') = (refusal_reason IS NOT NULL))
);
-- At most one open request per device.
CREATE UNIQUE INDEX erasure_requests_one_pending ON erasure_requests (tenant_id, device_id)
    WHERE state = 'pending';
CREATE INDEX erasure_requests_due ON erasure_requests (due_at) WHERE state = 'pending';

-- Admin reads of a device's personal data are audit entries with this action
-- and target 'device:{id}'; the device user's access log reads them here.
CREATE INDEX audit_log_personal_reads ON audit_log (tenant_id, target, seq)
    WHERE action = 'personal_data.read';
