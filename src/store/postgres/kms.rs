//! PostgreSQL SQL of the local KMS keyring.

use super::PgStore;
use crate::domain::KeyState;
use crate::store::{LocalKeyRow, StoreError};
use chrono::{DateTime, Utc};

fn missing(key_ref: &str) -> StoreError {
    StoreError::NotFound(format!("local key {key_ref:?}"))
}

/// Locks a key's row for the rest of the transaction.
async fn lock_key(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    key_ref: &str,
) -> Result<LocalKeyRow, StoreError> {
    sqlx::query_as!(
        LocalKeyRow,
        r#"SELECT key_ref, state AS "state: KeyState", current_version, expires_at
           FROM local_keys WHERE key_ref = $1 FOR UPDATE"#,
        key_ref
    )
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| missing(key_ref))
}

impl PgStore {
    pub(crate) async fn local_key_create(
        &self,
        key_ref: &str,
        material_sealed: &[u8],
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<LocalKeyRow, StoreError> {
        let mut tx = self.pool.begin().await?;
        let created = sqlx::query_as!(
            LocalKeyRow,
            r#"INSERT INTO local_keys (key_ref, state, current_version, expires_at)
               VALUES ($1, 'enabled', 1, $2) ON CONFLICT DO NOTHING
               RETURNING key_ref, state AS "state: KeyState", current_version, expires_at"#,
            key_ref,
            expires_at
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("local key {key_ref:?} already exists")))?;
        sqlx::query!(
            "INSERT INTO local_key_versions (key_ref, version, material_sealed) VALUES ($1, 1, $2)",
            key_ref,
            material_sealed
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    pub(crate) async fn local_key_rotate(
        &self,
        key_ref: &str,
        material: impl FnOnce(i32) -> Vec<u8> + Send,
    ) -> Result<LocalKeyRow, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = lock_key(&mut tx, key_ref).await?;
        if matches!(
            current.state,
            KeyState::PendingDeletion | KeyState::Destroyed
        ) {
            return Err(StoreError::Conflict(format!(
                "local key {key_ref:?} is {} and cannot be rotated",
                current.state
            )));
        }
        let next = current.current_version + 1;
        let material_sealed = material(next);
        sqlx::query!(
            "INSERT INTO local_key_versions (key_ref, version, material_sealed) VALUES ($1, $2, $3)",
            key_ref,
            next,
            &material_sealed
        )
        .execute(&mut *tx)
        .await?;
        let updated = sqlx::query_as!(
            LocalKeyRow,
            r#"UPDATE local_keys SET current_version = $2, updated_at = now() WHERE key_ref = $1
               RETURNING key_ref, state AS "state: KeyState", current_version, expires_at"#,
            key_ref,
            next
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(updated)
    }

    pub(crate) async fn local_key_transition(
        &self,
        key_ref: &str,
        from: &[KeyState],
        to: KeyState,
    ) -> Result<LocalKeyRow, StoreError> {
        let mut tx = self.pool.begin().await?;
        let current = lock_key(&mut tx, key_ref).await?;
        if !from.contains(&current.state) {
            return Err(StoreError::Conflict(format!(
                "local key {key_ref:?} is {}; cannot make it {to}",
                current.state
            )));
        }
        if to == KeyState::Destroyed {
            sqlx::query!("DELETE FROM local_key_versions WHERE key_ref = $1", key_ref)
                .execute(&mut *tx)
                .await?;
        }
        let updated = sqlx::query_as!(
            LocalKeyRow,
            r#"UPDATE local_keys SET state = $2, updated_at = now() WHERE key_ref = $1
               RETURNING key_ref, state AS "state: KeyState", current_version, expires_at"#,
            key_ref,
            to.as_str()
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(updated)
    }

    pub(crate) async fn local_key_set_expiry(
        &self,
        key_ref: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<LocalKeyRow, StoreError> {
        sqlx::query_as!(
            LocalKeyRow,
            r#"UPDATE local_keys SET expires_at = $2, updated_at = now()
               WHERE key_ref = $1 AND state <> 'destroyed'
               RETURNING key_ref, state AS "state: KeyState", current_version, expires_at"#,
            key_ref,
            expires_at
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| missing(key_ref))
    }

    pub(crate) async fn local_key(&self, key_ref: &str) -> Result<LocalKeyRow, StoreError> {
        sqlx::query_as!(
            LocalKeyRow,
            r#"SELECT key_ref, state AS "state: KeyState", current_version, expires_at
               FROM local_keys WHERE key_ref = $1"#,
            key_ref
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| missing(key_ref))
    }

    pub(crate) async fn local_key_material(
        &self,
        key_ref: &str,
        versions: &[i32],
    ) -> Result<(LocalKeyRow, Vec<(i32, Vec<u8>)>), StoreError> {
        let rows = sqlx::query!(
            r#"SELECT k.key_ref, k.state AS "state: KeyState", k.current_version, k.expires_at,
                      v.version AS "version?", v.material_sealed AS "material_sealed?"
               FROM local_keys k
               LEFT JOIN local_key_versions v
                 ON v.key_ref = k.key_ref
                AND (v.version = ANY($2)
                     OR (cardinality($2) = 0 AND v.version = k.current_version))
               WHERE k.key_ref = $1"#,
            key_ref,
            versions
        )
        .fetch_all(&self.pool)
        .await?;
        let first = rows.first().ok_or_else(|| missing(key_ref))?;
        let key = LocalKeyRow {
            key_ref: first.key_ref.clone(),
            state: first.state,
            current_version: first.current_version,
            expires_at: first.expires_at,
        };
        let material = rows
            .into_iter()
            .filter_map(|r| Some((r.version?, r.material_sealed?)))
            .collect();
        Ok((key, material))
    }
}
