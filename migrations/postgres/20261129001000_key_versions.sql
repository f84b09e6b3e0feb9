-- Key versions with a state of their own (GCP, issue 12). A Cloud KMS key's versions are
-- enabled, disabled, scheduled for destruction or destroyed one by one; the key's `state` is
-- its primary version's, and `version_states` holds the observed state of every other version
-- that still wraps DEKs: {"<version>": "<key state>"}. Those decide only whether their DEKs
-- can be unwrapped, never the tenant's access.
ALTER TABLE keks ADD COLUMN version_states JSONB NOT NULL DEFAULT '{}';
