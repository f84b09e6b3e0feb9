-- Webhook secret rotation: while a tenant moves its receiver to a new secret, requests carry
-- signatures with both, until the previous secret's grace period ends.
ALTER TABLE webhook_endpoints
    ADD COLUMN previous_secret_sealed BYTEA,
    ADD COLUMN previous_secret_expires_at TIMESTAMPTZ;
