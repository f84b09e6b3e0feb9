-- Key-access attempts reach audit_log through each replica's local spool (src/access/spool.rs),
-- which may ship a row again after a crash: each attempt carries its own id, and a row
-- shipped twice is inserted once (ON CONFLICT DO NOTHING). NULL for every other row.
ALTER TABLE audit_log ADD COLUMN attempt_id UUID;
CREATE UNIQUE INDEX audit_log_by_attempt ON audit_log (attempt_id);
