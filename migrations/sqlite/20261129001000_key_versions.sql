-- Key versions with a state of their own (GCP, issue 12), as in
-- migrations/postgres/20261129001000_key_versions.sql: the observed state of every version but
-- the primary that still wraps DEKs, as JSON text {"<version>": "<key state>"}.
ALTER TABLE keks ADD COLUMN version_states TEXT NOT NULL DEFAULT '{}';
