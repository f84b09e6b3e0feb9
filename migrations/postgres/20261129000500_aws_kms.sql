-- AWS KMS keys (issue 11).
-- role_arn / external_id: the tenant's IAM role byokd assumes to reach the key (the
-- cross-account BYOK pattern); NULL means byokd's own credentials. Set at registration.
-- rewrap_on_rotation: whether a rotation found at the KMS starts a re-wrap job. AWS decrypts
-- old ciphertexts with the old material by itself, so after an AWS rotation re-wrapping is
-- hygiene, not access: a per-key choice (default: re-wrap, as for every other provider).
ALTER TABLE keks
    ADD COLUMN role_arn TEXT,
    ADD COLUMN external_id TEXT,
    ADD COLUMN rewrap_on_rotation BOOLEAN NOT NULL DEFAULT TRUE,
    ADD CONSTRAINT keks_role_only_for_aws CHECK (role_arn IS NULL OR provider = 'aws'),
    ADD CONSTRAINT keks_external_id_needs_role CHECK (external_id IS NULL OR role_arn IS NOT NULL);
