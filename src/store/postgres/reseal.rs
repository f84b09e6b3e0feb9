//! PostgreSQL SQL of root-key rotation. Rows are walked in primary-key order from a cursor,
//! so each batch reads on from the last one through the index; the prefix test
//! (`substring(... FOR octet_length(prefix)) <> prefix`) picks what is not yet under the
//! current root key.

use super::PgStore;
use crate::store::{SealedCount, SealedMaterial, SealedWebhookSecrets, StoreError};
use uuid::Uuid;

impl PgStore {
    pub(crate) async fn sealed_materials_without(
        &self,
        prefix: &[u8],
        after: Option<(&str, i32)>,
        limit: i64,
    ) -> Result<Vec<SealedMaterial>, StoreError> {
        let (after_key, after_version) = after.unzip();
        Ok(sqlx::query_as!(
            SealedMaterial,
            r#"SELECT key_ref, version, material_sealed AS sealed
               FROM local_key_versions
               WHERE ($2::text IS NULL OR (key_ref, version) > ($2, $3))
                 AND substring(material_sealed FROM 1 FOR octet_length($1::bytea)) <> $1
               ORDER BY key_ref, version
               LIMIT $4"#,
            prefix,
            after_key,
            after_version.unwrap_or(i32::MIN),
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn reseal_materials(
        &self,
        rows: &[(SealedMaterial, Vec<u8>)],
    ) -> Result<Vec<bool>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut replaced = Vec::with_capacity(rows.len());
        for (old, new) in rows {
            let done = sqlx::query!(
                "UPDATE local_key_versions SET material_sealed = $4
                 WHERE key_ref = $1 AND version = $2 AND material_sealed = $3",
                old.key_ref,
                old.version,
                old.sealed,
                new
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            replaced.push(done == 1);
        }
        tx.commit().await?;
        Ok(replaced)
    }

    pub(crate) async fn count_sealed_materials(
        &self,
        prefix: &[u8],
    ) -> Result<SealedCount, StoreError> {
        Ok(sqlx::query_as!(
            SealedCount,
            r#"SELECT count(*) AS "total!",
                      count(*) FILTER (WHERE substring(material_sealed FROM 1
                                                       FOR octet_length($1::bytea)) <> $1)
                        AS "without_prefix!"
               FROM local_key_versions"#,
            prefix
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub(crate) async fn sealed_webhook_secrets_without(
        &self,
        prefix: &[u8],
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<SealedWebhookSecrets>, StoreError> {
        Ok(sqlx::query_as!(
            SealedWebhookSecrets,
            "SELECT id, secret_sealed, previous_secret_sealed
             FROM webhook_endpoints
             WHERE ($2::uuid IS NULL OR id > $2)
               AND (substring(secret_sealed FROM 1 FOR octet_length($1::bytea)) <> $1
                    OR substring(previous_secret_sealed FROM 1 FOR octet_length($1::bytea)) <> $1)
             ORDER BY id
             LIMIT $3",
            prefix,
            after,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn reseal_webhook_secrets(
        &self,
        rows: &[(SealedWebhookSecrets, SealedWebhookSecrets)],
    ) -> Result<Vec<bool>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut replaced = Vec::with_capacity(rows.len());
        for (old, new) in rows {
            let done = sqlx::query!(
                "UPDATE webhook_endpoints SET secret_sealed = $4, previous_secret_sealed = $5
                 WHERE id = $1 AND secret_sealed = $2
                   AND previous_secret_sealed IS NOT DISTINCT FROM $3",
                old.id,
                old.secret_sealed,
                old.previous_secret_sealed,
                new.secret_sealed,
                new.previous_secret_sealed
            )
            .execute(&mut *tx)
            .await?
            .rows_affected();
            replaced.push(done == 1);
        }
        tx.commit().await?;
        Ok(replaced)
    }

    pub(crate) async fn count_sealed_webhook_secrets(
        &self,
        prefix: &[u8],
    ) -> Result<SealedCount, StoreError> {
        Ok(sqlx::query_as!(
            SealedCount,
            r#"SELECT count(*) + count(previous_secret_sealed) AS "total!",
                      count(*) FILTER (WHERE substring(secret_sealed FROM 1
                                                       FOR octet_length($1::bytea)) <> $1)
                      + count(*) FILTER (WHERE substring(previous_secret_sealed FROM 1
                                                         FOR octet_length($1::bytea)) <> $1)
                        AS "without_prefix!"
               FROM webhook_endpoints"#,
            prefix
        )
        .fetch_one(&self.pool)
        .await?)
    }
}
