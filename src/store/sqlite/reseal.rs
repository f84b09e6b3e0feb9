//! SQLite SQL of root-key rotation. Rows are walked in primary-key order from a cursor; the
//! prefix test (`substr(sealed, 1, length(prefix)) <> prefix`) picks what is not yet under
//! the current root key.

use super::{SqliteStore, get_uuid, uid};
use crate::store::{SealedCount, SealedMaterial, SealedWebhookSecrets, StoreError};
use sqlx::Row;
use uuid::Uuid;

impl SqliteStore {
    pub(crate) async fn sealed_materials_without(
        &self,
        prefix: &[u8],
        after: Option<(&str, i32)>,
        limit: i64,
    ) -> Result<Vec<SealedMaterial>, StoreError> {
        let (after_key, after_version) = after.unzip();
        let rows = sqlx::query(
            "SELECT key_ref, version, material_sealed FROM local_key_versions
             WHERE (?2 IS NULL OR key_ref > ?2 OR (key_ref = ?2 AND version > ?3))
               AND substr(material_sealed, 1, length(?1)) <> ?1
             ORDER BY key_ref, version
             LIMIT ?4",
        )
        .bind(prefix)
        .bind(after_key)
        .bind(after_version.unwrap_or(i32::MIN))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SealedMaterial {
                    key_ref: r.try_get("key_ref")?,
                    version: r.try_get("version")?,
                    sealed: r.try_get("material_sealed")?,
                })
            })
            .collect()
    }

    pub(crate) async fn reseal_materials(
        &self,
        rows: &[(SealedMaterial, Vec<u8>)],
    ) -> Result<Vec<bool>, StoreError> {
        let mut tx = self.begin().await?;
        let mut replaced = Vec::with_capacity(rows.len());
        for (old, new) in rows {
            let done = sqlx::query(
                "UPDATE local_key_versions SET material_sealed = ?4
                 WHERE key_ref = ?1 AND version = ?2 AND material_sealed = ?3",
            )
            .bind(&old.key_ref)
            .bind(old.version)
            .bind(&old.sealed)
            .bind(new)
            .execute(&mut *tx.tx)
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
        let r = sqlx::query(
            "SELECT count(*) AS total,
                    count(*) FILTER (WHERE substr(material_sealed, 1, length(?1)) <> ?1)
                        AS without_prefix
             FROM local_key_versions",
        )
        .bind(prefix)
        .fetch_one(&self.pool)
        .await?;
        Ok(SealedCount {
            total: r.try_get("total")?,
            without_prefix: r.try_get("without_prefix")?,
        })
    }

    pub(crate) async fn sealed_webhook_secrets_without(
        &self,
        prefix: &[u8],
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<SealedWebhookSecrets>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, secret_sealed, previous_secret_sealed FROM webhook_endpoints
             WHERE (?2 IS NULL OR id > ?2)
               AND (substr(secret_sealed, 1, length(?1)) <> ?1
                    OR substr(previous_secret_sealed, 1, length(?1)) <> ?1)
             ORDER BY id
             LIMIT ?3",
        )
        .bind(prefix)
        .bind(after.map(uid))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SealedWebhookSecrets {
                    id: get_uuid(r, "id")?,
                    secret_sealed: r.try_get("secret_sealed")?,
                    previous_secret_sealed: r.try_get("previous_secret_sealed")?,
                })
            })
            .collect()
    }

    pub(crate) async fn reseal_webhook_secrets(
        &self,
        rows: &[(SealedWebhookSecrets, SealedWebhookSecrets)],
    ) -> Result<Vec<bool>, StoreError> {
        let mut tx = self.begin().await?;
        let mut replaced = Vec::with_capacity(rows.len());
        for (old, new) in rows {
            let done = sqlx::query(
                "UPDATE webhook_endpoints SET secret_sealed = ?4, previous_secret_sealed = ?5
                 WHERE id = ?1 AND secret_sealed = ?2 AND previous_secret_sealed IS ?3",
            )
            .bind(uid(old.id))
            .bind(&old.secret_sealed)
            .bind(&old.previous_secret_sealed)
            .bind(&new.secret_sealed)
            .bind(&new.previous_secret_sealed)
            .execute(&mut *tx.tx)
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
        let r = sqlx::query(
            "SELECT count(*) + count(previous_secret_sealed) AS total,
                    count(*) FILTER (WHERE substr(secret_sealed, 1, length(?1)) <> ?1)
                    + count(*) FILTER (WHERE substr(previous_secret_sealed, 1, length(?1)) <> ?1)
                        AS without_prefix
             FROM webhook_endpoints",
        )
        .bind(prefix)
        .fetch_one(&self.pool)
        .await?;
        Ok(SealedCount {
            total: r.try_get("total")?,
            without_prefix: r.try_get("without_prefix")?,
        })
    }
}
