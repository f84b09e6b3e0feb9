-- The exact `detail` text an audit row was chained with, where it is not `detail::text`: rows
-- brought over from SQLite by `byokd import`, whose JSON text jsonb re-formats (key order,
-- spacing). The chain covers that text, so it is kept beside the jsonb, and must say the same
-- thing as the jsonb: the chain is read through both (src/store/postgres/audit.rs,
-- CHAINED_DETAIL), so changing either one still breaks the chain. NULL for every row written here.
ALTER TABLE audit_log
    ADD COLUMN detail_text TEXT,
    ADD CONSTRAINT audit_log_detail_text_agrees
        CHECK (detail_text IS NULL OR detail_text::jsonb = detail);
