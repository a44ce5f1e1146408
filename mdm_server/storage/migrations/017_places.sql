-- Issue 11: named places for the location history analysis, versioned like policies
-- (mdm_server/storage/places.py): every PUT and DELETE is a version of its own, the
-- newest non-deleted one is in force, and a tenant's stored versions are capped in
-- bytes (MDM_PLACE_STORE_MB): the oldest bodies that are not the newest of their
-- place are pruned first (their number, author and time stay).
--
-- body: the place's GeoJSON area (Polygon, MultiPolygon, or a Feature of one), as
-- validated; NULL for a deletion or a pruned version. Places are the tenant's,
-- not a device's: erasure has nothing to remove here.
CREATE TABLE places (
    tenant_id   text        NOT NULL REFERENCES tenants ON DELETE CASCADE,
    name        text        NOT NULL CHECK (name ~ '^[A-Za-z0-9_-]{1,64}$'),
    version     integer     NOT NULL CHECK (version >= 1),
    body        jsonb,
    deleted     boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL,
    pruned_at   timestamptz,
    body_bytes  integer     NOT NULL
        GENERATED ALWAYS AS (coalesce(octet_length(body::text), 0)) STORED,
    PRIMARY KEY (tenant_id, name, version),
    CONSTRAINT places_body_state CHECK (
        CASE WHEN deleted THEN body IS NULL AND pruned_at IS NULL
             ELSE (body IS NULL) = (pruned_at IS NOT NULL) END)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON places TO mdm_app;
