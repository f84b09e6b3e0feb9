-- Sweeps: schedule bookkeeping, key-probe state, and the expiry window index.

-- The last tick each schedule ran for, so a tick runs once across replicas and a missed
-- tick runs once on start.
CREATE TABLE schedule_runs (
    name             TEXT PRIMARY KEY,
    last_tick_at     TIMESTAMPTZ NOT NULL,
    last_started_at  TIMESTAMPTZ NOT NULL,
    last_finished_at TIMESTAMPTZ NOT NULL,
    last_status      TEXT NOT NULL,
    last_report      JSONB NOT NULL DEFAULT '{}'
);

-- What the last probe of a key found. `unreachable_since` starts an outage episode (a
-- timeout or server error says nothing about the key); `unreachable_notified_at` marks the
-- episode's one key.unreachable notification.
ALTER TABLE keks
    ADD COLUMN probed_at TIMESTAMPTZ,
    ADD COLUMN probe_error TEXT,
    ADD COLUMN unreachable_since TIMESTAMPTZ,
    ADD COLUMN unreachable_notified_at TIMESTAMPTZ;

-- The expiry sweep reads only enabled primary keys inside its window: its cost follows the
-- keys it finds, not the keys that exist.
DROP INDEX keks_expires_at;
CREATE INDEX keks_expiry_window ON keks (expires_at)
    WHERE state = 'enabled' AND is_primary AND expires_at IS NOT NULL;
