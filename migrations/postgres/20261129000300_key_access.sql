-- Clients of the key-access API: a name, the SHA-256 of its token (the token itself is shown
-- once and never stored), and its scope.
CREATE TABLE clients (
    name        TEXT PRIMARY KEY,
    token_hash  BYTEA NOT NULL UNIQUE,
    all_tenants BOOLEAN NOT NULL,
    tenants     TEXT[] NOT NULL DEFAULT '{}',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ,
    CHECK (all_tenants OR cardinality(tenants) > 0)
);

-- Alerts raised by the anomaly rules: one per rule, subject and window.
CREATE TABLE alerts (
    id           BIGSERIAL PRIMARY KEY,
    rule         TEXT NOT NULL,
    subject      TEXT NOT NULL,
    window_start TIMESTAMPTZ NOT NULL,
    tenant_id    TEXT,
    client       TEXT,
    observed     DOUBLE PRECISION NOT NULL,
    threshold    DOUBLE PRECISION NOT NULL,
    detail       JSONB NOT NULL DEFAULT '{}',
    raised_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (rule, subject, window_start)
);
CREATE INDEX alerts_recent ON alerts (raised_at DESC);

-- Access attempts are audited at the rate DEKs are unwrapped; the anomaly scan reads the
-- last minutes of them by time.
CREATE INDEX audit_log_access_recent ON audit_log (at) WHERE action IN ('dek_unwrap', 'dek_create', 'auth');
