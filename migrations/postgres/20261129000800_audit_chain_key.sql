-- The audit chain's HMAC key, sealed under the root key (seal purpose "audit-chain-key"), so
-- a root-key rotation re-seals it instead of changing it: rows chained before the rotation
-- keep verifying. One row. Deployments that chained rows before this table existed store
-- the key they used (HKDF of the root key), new ones a random key (byokd does it on start).
CREATE TABLE audit_chain_key (
    id SMALLINT PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    sealed BYTEA NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('random', 'derived')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
