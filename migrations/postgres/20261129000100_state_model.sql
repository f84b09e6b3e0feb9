-- The state model: the KMS is the truth.
--
-- A KEK's state, revoked, current_version and expires_at now hold what byokd last observed
-- at the KMS (or found at registration), never what an event claimed. A revoking event that
-- took effect before the KMS confirmed it is the key's `claim`; the observation that follows
-- settles it. `expired` is computed from expires_at and the clock, never stored.

UPDATE keks SET state = 'enabled' WHERE state = 'expired';

ALTER TABLE keks
    -- The unconfirmed revoking event in force, if any (the strongest of those received).
    ADD COLUMN claim TEXT
        CHECK (claim IN ('disabled', 'deletion_scheduled', 'destroyed', 'access_revoked', 'expired')),
    -- When the claim in force was made (byokd's clock): a claim younger than the settle
    -- time is not settled by an observation, which may still see the KMS's old state.
    ADD COLUMN claimed_at TIMESTAMPTZ,
    -- When byokd last had a definitive answer from the KMS about this key (byokd's clock).
    ADD COLUMN observed_at TIMESTAMPTZ,
    -- Provider time of the last expiry event (providers whose KMS holds no expiry).
    ADD COLUMN expiry_event_at TIMESTAMPTZ,
    -- The key must be observed at or after this time (an event asked for confirmation).
    ADD COLUMN confirm_due_at TIMESTAMPTZ,
    -- Failed confirmation attempts in a row (KMS unreachable): the backoff.
    ADD COLUMN confirm_attempts INTEGER NOT NULL DEFAULT 0,
    -- Bumped by every event that asks for confirmation: an observation settles the claim
    -- only if no event arrived while the KMS was being asked.
    ADD COLUMN watch_gen BIGINT NOT NULL DEFAULT 0;

-- The old event-time columns order nothing any more; new rows need not set them.
ALTER TABLE keks
    ALTER COLUMN state_changed_at SET DEFAULT now(),
    ALTER COLUMN version_changed_at SET DEFAULT now(),
    ALTER COLUMN expiry_changed_at SET DEFAULT now();

CREATE INDEX keks_confirm_due ON keks (confirm_due_at) WHERE confirm_due_at IS NOT NULL;
-- Access derives from all of a tenant's keys (a replacement's old key too), read by tenant.
CREATE INDEX keks_by_tenant ON keks (tenant_id);

-- CloudEvents make (source, id) unique, not (provider, id): two KMS sources may both use
-- id "evt-0001". Native formats carry a fixed source per provider, so their own id still
-- decides.
ALTER TABLE processed_events ADD COLUMN source TEXT NOT NULL DEFAULT '';
ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey;
ALTER TABLE processed_events ADD PRIMARY KEY (provider, source, event_id);
