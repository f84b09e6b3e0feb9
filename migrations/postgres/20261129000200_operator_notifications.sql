-- Notifications for the platform's operators are queued as one `operator` row each, which
-- the dispatcher expands into a row per configured operator address.
ALTER TABLE outbox DROP CONSTRAINT outbox_channel_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_channel_check
    CHECK (channel IN ('amqp', 'email', 'webhook', 'operator'));
