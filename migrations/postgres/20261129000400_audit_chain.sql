-- Tamper evidence of the audit trail (src/audit/). Any transaction on any replica inserts
-- audit rows unchained; one chainer at a time (the holder of an advisory lock) later gives
-- each row its place in one total order (chain_seq: dense, from 1, following (txid, id))
-- and its HMAC chain value.
ALTER TABLE audit_log
    -- The API client whose request the row records; NULL for everything else.
    ADD COLUMN client    TEXT,
    -- The inserting transaction. The chainer takes a row only once this is older than every
    -- running transaction: then no row it has not seen can still commit before it.
    ADD COLUMN txid      xid8 NOT NULL DEFAULT pg_current_xact_id(),
    ADD COLUMN chain_seq BIGINT,
    ADD COLUMN chain     BYTEA,
    ADD CONSTRAINT audit_log_chained_whole CHECK ((chain_seq IS NULL) = (chain IS NULL)),
    ADD CONSTRAINT audit_log_chain_is_hmac CHECK (octet_length(chain) = 32);

CREATE UNIQUE INDEX audit_log_by_chain_seq ON audit_log (chain_seq);
-- What the chainer reads each round, in chain order: only the rows still waiting.
CREATE INDEX audit_log_unchained ON audit_log (txid, id) WHERE chain_seq IS NULL;
-- Exports and time filters read a time range in order.
CREATE INDEX audit_log_by_at ON audit_log (at, id);

-- The chain's head, recorded periodically (and logged): a chain cut back to before a
-- checkpoint, or rebuilt up to one, no longer matches it.
CREATE TABLE audit_checkpoints (
    chain_seq BIGINT PRIMARY KEY,
    chain     BYTEA NOT NULL,
    at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
