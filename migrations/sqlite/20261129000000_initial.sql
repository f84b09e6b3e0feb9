-- byokd's schema on SQLite (standalone mode): the schema migrations/postgres/ builds up to,
-- with the same tables and columns. Forward-only: later changes get their own migration.
--
-- Representations (src/store/sqlite/ reads and writes them so):
-- - times are TEXT in one fixed-width UTC form, 'YYYY-MM-DDTHH:MM:SS.ffffffZ' (microseconds,
--   as PostgreSQL keeps them), so comparing and ordering the text compares the times; byokd
--   always passes them in, nothing here defaults to SQLite's clock (its text form differs);
--   '9999-12-31T23:59:59.999999Z' stands for PostgreSQL's 'infinity';
-- - UUIDs are TEXT in their hyphenated lower-case form (ordered like PostgreSQL's uuid);
-- - JSON documents are TEXT holding JSON; text arrays are TEXT holding a JSON array;
-- - booleans are INTEGER 0/1; byte strings are BLOB.

CREATE TABLE tenants (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    -- Derived from the tenant's KEKs by the lifecycle code; never set by hand.
    access        TEXT NOT NULL DEFAULT 'accessible'
                  CHECK (access IN ('accessible', 'encrypt_blocked', 'inaccessible')),
    access_reason TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE TABLE tenant_contacts (
    tenant_id TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email     TEXT NOT NULL,
    PRIMARY KEY (tenant_id, email)
);

CREATE TABLE webhook_endpoints (
    id                         TEXT PRIMARY KEY,
    tenant_id                  TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url                        TEXT NOT NULL,
    -- AES-256-GCM sealed under a key derived from the root key; never the plaintext secret.
    secret_sealed              BLOB NOT NULL,
    enabled                    INTEGER NOT NULL DEFAULT 1,
    disabled_reason            TEXT,
    created_at                 TEXT NOT NULL,
    -- Set by the first failure after a success.
    failing_since              TEXT,
    -- While a tenant moves its receiver to a new secret, requests are signed with both.
    previous_secret_sealed     BLOB,
    previous_secret_expires_at TEXT
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id);

CREATE TABLE keks (
    id                      INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id               TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    provider                TEXT NOT NULL
                            CHECK (provider IN ('local', 'aws', 'azure', 'gcp', 'vault')),
    key_ref                 TEXT NOT NULL,
    -- What byokd last observed at the KMS; `expired` is computed from expires_at.
    state                   TEXT NOT NULL
                            CHECK (state IN ('enabled', 'disabled', 'pending_deletion', 'destroyed', 'expired')),
    revoked                 INTEGER NOT NULL DEFAULT 0,
    current_version         TEXT,
    expires_at              TEXT,
    -- Kept for parity with PostgreSQL, where older rows ordered events by them.
    state_changed_at        TEXT,
    version_changed_at      TEXT,
    expiry_changed_at       TEXT,
    is_primary              INTEGER NOT NULL DEFAULT 1,
    created_at              TEXT NOT NULL,
    updated_at              TEXT NOT NULL,
    -- A replacement moved every DEK off it.
    retired_at              TEXT,
    probed_at               TEXT,
    probe_error             TEXT,
    unreachable_since       TEXT,
    unreachable_notified_at TEXT,
    -- The unconfirmed revoking event in force, if any, and when it was made.
    claim                   TEXT
                            CHECK (claim IN ('disabled', 'deletion_scheduled', 'destroyed', 'access_revoked', 'expired')),
    claimed_at              TEXT,
    observed_at             TEXT,
    expiry_event_at         TEXT,
    confirm_due_at          TEXT,
    confirm_attempts        INTEGER NOT NULL DEFAULT 0,
    watch_gen               INTEGER NOT NULL DEFAULT 0,
    -- AWS: the tenant's role byokd assumes to reach the key.
    role_arn                TEXT,
    external_id             TEXT,
    rewrap_on_rotation      INTEGER NOT NULL DEFAULT 1,
    UNIQUE (provider, key_ref),
    CHECK (role_arn IS NULL OR provider = 'aws'),
    CHECK (external_id IS NULL OR role_arn IS NOT NULL)
);
CREATE UNIQUE INDEX keks_one_primary_per_tenant ON keks (tenant_id) WHERE is_primary;
CREATE INDEX keks_expiry_window ON keks (expires_at)
    WHERE state = 'enabled' AND is_primary AND expires_at IS NOT NULL;
CREATE INDEX keks_confirm_due ON keks (confirm_due_at) WHERE confirm_due_at IS NOT NULL;
CREATE INDEX keks_by_tenant ON keks (tenant_id);

CREATE TABLE deks (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kek_id      INTEGER NOT NULL REFERENCES keks (id),
    kek_version TEXT NOT NULL,
    wrapped     BLOB NOT NULL,
    kcv         TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX deks_by_kek_version ON deks (kek_id, kek_version);
CREATE INDEX deks_by_tenant ON deks (tenant_id);

-- The consumer's inbox: one row per (provider, source, event id) ever applied.
CREATE TABLE processed_events (
    provider    TEXT NOT NULL,
    source      TEXT NOT NULL DEFAULT '',
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    key_ref     TEXT NOT NULL,
    event_time  TEXT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (provider, source, event_id)
);

-- Rows are chained in id order: SQLite serializes writers, so ids are given in commit
-- order and no row can still appear before a committed one (txid stays 0; see
-- src/store/sqlite/audit.rs).
CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        TEXT NOT NULL,
    tenant_id TEXT,
    provider  TEXT,
    key_ref   TEXT,
    action    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    source    TEXT NOT NULL,
    event_id  TEXT,
    detail    TEXT NOT NULL DEFAULT '{}',
    client    TEXT,
    txid      INTEGER NOT NULL DEFAULT 0,
    chain_seq INTEGER,
    chain     BLOB,
    CHECK ((chain_seq IS NULL) = (chain IS NULL)),
    CHECK (chain IS NULL OR length(chain) = 32)
);
CREATE INDEX audit_log_by_tenant ON audit_log (tenant_id, id);
CREATE INDEX audit_log_by_event ON audit_log (provider, event_id);
CREATE INDEX audit_log_access_recent ON audit_log (at)
    WHERE action IN ('dek_unwrap', 'dek_create', 'auth');
CREATE UNIQUE INDEX audit_log_by_chain_seq ON audit_log (chain_seq);
CREATE INDEX audit_log_unchained ON audit_log (txid, id) WHERE chain_seq IS NULL;
CREATE INDEX audit_log_by_at ON audit_log (at, id);

CREATE TABLE audit_checkpoints (
    chain_seq INTEGER PRIMARY KEY,
    chain     BLOB NOT NULL,
    at        TEXT NOT NULL
);

CREATE TABLE audit_chain_key (
    id         INTEGER PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    sealed     BLOB NOT NULL,
    origin     TEXT NOT NULL CHECK (origin IN ('random', 'derived')),
    created_at TEXT NOT NULL
);

-- Everything byokd must tell someone, written in the transaction that decided it.
CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,
    -- Insertion order (PostgreSQL: a BIGSERIAL), given by store code as max + 1 inside the
    -- writing transaction: writers are serialized.
    seq             INTEGER NOT NULL UNIQUE,
    tenant_id       TEXT,
    channel         TEXT NOT NULL CHECK (channel IN ('amqp', 'email', 'webhook', 'operator')),
    recipient       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    dedupe_key      TEXT NOT NULL UNIQUE,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    delivered_at    TEXT,
    locked_until    TEXT,
    lease_id        TEXT,
    dead_at         TEXT
);
CREATE INDEX outbox_due ON outbox (channel, seq) WHERE status = 'pending';
CREATE INDEX outbox_by_tenant ON outbox (tenant_id, seq);
CREATE INDEX outbox_notify_due ON outbox (next_attempt_at)
    WHERE status = 'pending' AND channel IN ('email', 'webhook');
CREATE INDEX outbox_delivered_at ON outbox (delivered_at) WHERE status = 'delivered';
CREATE INDEX outbox_undelivered ON outbox (channel, status, created_at)
    WHERE status <> 'delivered';

CREATE TABLE notification_attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    outbox_id   TEXT NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    at          TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    status_code INTEGER,
    detail      TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX notification_attempts_by_outbox ON notification_attempts (outbox_id, id);

-- The local KMS: versioned 256-bit KEKs, each version's material sealed under the root key.
CREATE TABLE local_keys (
    key_ref         TEXT PRIMARY KEY,
    state           TEXT NOT NULL
                    CHECK (state IN ('enabled', 'disabled', 'pending_deletion', 'destroyed')),
    current_version INTEGER NOT NULL,
    expires_at      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);

CREATE TABLE local_key_versions (
    key_ref         TEXT NOT NULL REFERENCES local_keys (key_ref) ON DELETE CASCADE,
    version         INTEGER NOT NULL,
    material_sealed BLOB NOT NULL,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (key_ref, version)
);

CREATE TABLE rewrap_jobs (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id      TEXT NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    kind           TEXT NOT NULL CHECK (kind IN ('rotation', 'replacement')),
    kek_id         INTEGER NOT NULL REFERENCES keks (id),
    target_kek_id  INTEGER NOT NULL REFERENCES keks (id),
    target_version TEXT NOT NULL,
    state          TEXT NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'running', 'waiting', 'completed', 'failed', 'superseded')),
    -- JSON array of the versions DEKs were found under when the job was planned.
    from_versions  TEXT NOT NULL DEFAULT '[]',
    planned        INTEGER NOT NULL DEFAULT 0,
    total          INTEGER NOT NULL DEFAULT 0,
    done           INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    not_before     TEXT NOT NULL,
    last_error     TEXT,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    completed_at   TEXT,
    UNIQUE (kek_id, target_kek_id, target_version)
);
CREATE INDEX rewrap_jobs_active ON rewrap_jobs (not_before, id)
    WHERE state IN ('pending', 'running', 'waiting');
CREATE INDEX rewrap_jobs_by_tenant ON rewrap_jobs (tenant_id, id);

CREATE TABLE rewrap_failures (
    job_id          INTEGER NOT NULL REFERENCES rewrap_jobs (id) ON DELETE CASCADE,
    dek_id          TEXT NOT NULL REFERENCES deks (id) ON DELETE CASCADE,
    reason          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 1,
    next_attempt_at TEXT NOT NULL,
    PRIMARY KEY (job_id, dek_id)
);

CREATE TABLE schedule_runs (
    name             TEXT PRIMARY KEY,
    last_tick_at     TEXT NOT NULL,
    last_started_at  TEXT NOT NULL,
    last_finished_at TEXT NOT NULL,
    last_status      TEXT NOT NULL,
    last_report      TEXT NOT NULL DEFAULT '{}',
    last_success_at  TEXT
);

-- Clients of the key-access API; `tenants` is a JSON array.
CREATE TABLE clients (
    name        TEXT PRIMARY KEY,
    token_hash  BLOB NOT NULL UNIQUE,
    all_tenants INTEGER NOT NULL,
    tenants     TEXT NOT NULL DEFAULT '[]',
    created_at  TEXT NOT NULL,
    revoked_at  TEXT,
    CHECK (all_tenants OR json_array_length(tenants) > 0)
);

CREATE TABLE alerts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    rule         TEXT NOT NULL,
    subject      TEXT NOT NULL,
    window_start TEXT NOT NULL,
    tenant_id    TEXT,
    client       TEXT,
    observed     REAL NOT NULL,
    threshold    REAL NOT NULL,
    detail       TEXT NOT NULL DEFAULT '{}',
    raised_at    TEXT NOT NULL,
    UNIQUE (rule, subject, window_start)
);
CREATE INDEX alerts_recent ON alerts (raised_at DESC);

-- What PostgreSQL's LISTEN/NOTIFY carries: tenant access changes and client revocations,
-- written in the transaction that makes them and read by every listener (in this process
-- or another on the same file, such as a CLI command) after commit. Pruned by age.
CREATE TABLE changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    payload TEXT NOT NULL,
    at      TEXT NOT NULL
);
