-- Twin of the PostgreSQL migration: the id of a spooled key-access attempt, so a row
-- shipped twice is inserted once.
ALTER TABLE audit_log ADD COLUMN attempt_id TEXT;
CREATE UNIQUE INDEX audit_log_by_attempt ON audit_log (attempt_id);
