-- Rotation: byokd's local KMS keyring, DEK re-wrap jobs, and key replacement.

-- The local KMS: versioned 256-bit KEKs, each version's material sealed under the root key.
CREATE TABLE local_keys (
    key_ref         TEXT PRIMARY KEY,
    state           TEXT NOT NULL
                    CHECK (state IN ('enabled', 'disabled', 'pending_deletion', 'destroyed')),
    current_version INTEGER NOT NULL,
    expires_at      TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE local_key_versions (
    key_ref         TEXT NOT NULL REFERENCES local_keys (key_ref) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    material_sealed BYTEA NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (key_ref, version)
);

-- A KEK being replaced stays readable until every DEK moved off it, then is retired.
ALTER TABLE keks ADD COLUMN retired_at TIMESTAMPTZ;

-- One job per (source KEK, target KEK, target version): a duplicate rotation event finds the
-- job already there. Rotation: target_kek_id = kek_id. Replacement: another KEK.
CREATE TABLE rewrap_jobs (
    id             BIGSERIAL PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind           TEXT NOT NULL CHECK (kind IN ('rotation', 'replacement')),
    kek_id         BIGINT NOT NULL REFERENCES keks (id),
    target_kek_id  BIGINT NOT NULL REFERENCES keks (id),
    target_version TEXT NOT NULL,
    -- pending -> running -> completed | failed; waiting while the KMS refuses the key;
    -- superseded when a newer rotation of the same key takes over.
    state          TEXT NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'running', 'waiting', 'completed', 'failed', 'superseded')),
    -- Versions DEKs were found under when the job was planned (a rotation's "from").
    from_versions  TEXT[] NOT NULL DEFAULT '{}',
    planned        BOOLEAN NOT NULL DEFAULT FALSE,
    total          BIGINT NOT NULL DEFAULT 0,
    done           BIGINT NOT NULL DEFAULT 0,
    failed         BIGINT NOT NULL DEFAULT 0,
    not_before     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error     TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    completed_at   TIMESTAMPTZ,
    UNIQUE (kek_id, target_kek_id, target_version)
);
CREATE INDEX rewrap_jobs_active ON rewrap_jobs (not_before, id)
    WHERE state IN ('pending', 'running', 'waiting');
CREATE INDEX rewrap_jobs_by_tenant ON rewrap_jobs (tenant_id, id);

-- DEKs that failed to re-wrap: retried with backoff, never blocking the rest of the job.
CREATE TABLE rewrap_failures (
    job_id          BIGINT NOT NULL REFERENCES rewrap_jobs (id) ON DELETE CASCADE,
    dek_id          UUID NOT NULL REFERENCES deks (id) ON DELETE CASCADE,
    reason          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 1,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (job_id, dek_id)
);

