-- Notification delivery (email, webhook): leases on outbox rows, one row per delivery
-- attempt, and endpoint health for auto-disabling webhooks that keep failing.

-- A worker claims a row by setting a lease and committing, then delivers without holding a
-- transaction; `lease_id` makes its result count only while the lease is still its own. A
-- crashed worker's lease simply expires and the row is due again.
ALTER TABLE outbox
    ADD COLUMN locked_until TIMESTAMPTZ,
    ADD COLUMN lease_id     UUID,
    ADD COLUMN dead_at      TIMESTAMPTZ;

CREATE INDEX outbox_notify_due ON outbox (next_attempt_at)
    WHERE status = 'pending' AND channel IN ('email', 'webhook');
-- Retention pruning deletes old delivered rows.
CREATE INDEX outbox_delivered_at ON outbox (delivered_at) WHERE status = 'delivered';

CREATE TABLE notification_attempts (
    id          BIGSERIAL PRIMARY KEY,
    outbox_id   UUID NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    at          TIMESTAMPTZ NOT NULL,
    -- delivered | retry | dead | disabled
    outcome     TEXT NOT NULL,
    -- HTTP status of a webhook attempt, SMTP reply code of an email attempt.
    status_code INTEGER,
    -- What the peer said or why no answer came (never a secret).
    detail      TEXT,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX notification_attempts_by_outbox ON notification_attempts (outbox_id, id);

-- Set by the first failure after a success; an endpoint failing longer than the configured
-- period is disabled.
ALTER TABLE webhook_endpoints ADD COLUMN failing_since TIMESTAMPTZ;
