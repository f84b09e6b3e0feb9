-- byokd's initial schema. Forward-only: later changes get their own migration.

CREATE TABLE tenants (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    -- Derived from the primary KEK by the lifecycle code; never set by hand.
    access        TEXT NOT NULL DEFAULT 'accessible'
                  CHECK (access IN ('accessible', 'encrypt_blocked', 'inaccessible')),
    access_reason TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE tenant_contacts (
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email     TEXT NOT NULL,
    PRIMARY KEY (tenant_id, email)
);

CREATE TABLE webhook_endpoints (
    id              UUID PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url             TEXT NOT NULL,
    -- AES-256-GCM sealed under a key derived from the root key; never the plaintext secret.
    secret_sealed   BYTEA NOT NULL,
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    disabled_reason TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id);

CREATE TABLE keks (
    id                 BIGSERIAL PRIMARY KEY,
    tenant_id          TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    provider           TEXT NOT NULL CHECK (provider IN ('local', 'aws', 'azure', 'gcp', 'vault')),
    key_ref            TEXT NOT NULL,
    state              TEXT NOT NULL
                       CHECK (state IN ('enabled', 'disabled', 'pending_deletion', 'destroyed', 'expired')),
    revoked            BOOLEAN NOT NULL DEFAULT FALSE,
    current_version    TEXT,
    expires_at         TIMESTAMPTZ,
    -- Provider-side times of the last event that set each attribute: older events lose.
    state_changed_at   TIMESTAMPTZ NOT NULL,
    version_changed_at TIMESTAMPTZ NOT NULL,
    expiry_changed_at  TIMESTAMPTZ NOT NULL,
    is_primary         BOOLEAN NOT NULL DEFAULT TRUE,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (provider, key_ref)
);
CREATE UNIQUE INDEX keks_one_primary_per_tenant ON keks (tenant_id) WHERE is_primary;
-- The expiry sweep reads only keys inside its window.
CREATE INDEX keks_expires_at ON keks (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE deks (
    id          UUID PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kek_id      BIGINT NOT NULL REFERENCES keks (id),
    kek_version TEXT NOT NULL,
    wrapped     BYTEA NOT NULL,
    kcv         TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX deks_by_kek_version ON deks (kek_id, kek_version);
CREATE INDEX deks_by_tenant ON deks (tenant_id);

-- The consumer's inbox: one row per (provider, event id) ever applied, claimed first in the
-- transaction that applies the event, so a redelivery or duplicate is a no-op.
CREATE TABLE processed_events (
    provider    TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    key_ref     TEXT NOT NULL,
    event_time  TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

CREATE TABLE audit_log (
    id        BIGSERIAL PRIMARY KEY,
    at        TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    tenant_id TEXT,
    provider  TEXT,
    key_ref   TEXT,
    action    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    -- event | api | probe | sweep
    source    TEXT NOT NULL,
    event_id  TEXT,
    detail    JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_by_tenant ON audit_log (tenant_id, id);
CREATE INDEX audit_log_by_event ON audit_log (provider, event_id);

-- Everything byokd must tell someone, written in the transaction that decided it:
-- access changes for the platform (amqp), emails and webhooks for tenants.
CREATE TABLE outbox (
    id              UUID PRIMARY KEY,
    seq             BIGSERIAL NOT NULL,
    tenant_id       TEXT,
    channel         TEXT NOT NULL CHECK (channel IN ('amqp', 'email', 'webhook')),
    recipient       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    -- One row per cause, channel and recipient, however often the cause is processed.
    dedupe_key      TEXT NOT NULL UNIQUE,
    payload         JSONB NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at    TIMESTAMPTZ
);
CREATE INDEX outbox_due ON outbox (channel, seq) WHERE status = 'pending';
CREATE INDEX outbox_by_tenant ON outbox (tenant_id, seq);
