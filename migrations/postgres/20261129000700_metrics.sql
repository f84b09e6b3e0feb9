-- Metrics (issue 14).
--
-- When each schedule last ran successfully: the byokd_schedule_last_success_timestamp_seconds
-- gauge, so an alert can tell a schedule that stopped running (or keeps failing) from one
-- that ran. Runs recorded before this migration count from their last success if it was
-- the last run.
ALTER TABLE schedule_runs ADD COLUMN last_success_at TIMESTAMPTZ;
UPDATE schedule_runs SET last_success_at = last_finished_at WHERE last_status = 'ok';

-- The metrics collector counts undelivered outbox rows by channel and status (and their
-- oldest age) every 15 s on every replica; delivered rows, the bulk of the table until the
-- prune, stay out of that scan.
CREATE INDEX outbox_undelivered ON outbox (channel, status, created_at)
    WHERE status <> 'delivered';
