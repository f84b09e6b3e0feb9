//! PostgreSQL SQL of the local KMS keyring.

use super::{PgStore, parse};
use crate::domain::KeyState;
use crate::store::{LocalKeyRow, StoreError};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

fn row(r: &PgRow) -> Result<LocalKeyRow, StoreError> {
    Ok(LocalKeyRow {
        key_ref: r.try_get("key_ref")?,
        state: parse(r, "state")?,
        current_version: r.try_get("current_version")?,
        expires_at: r.try_get("expires_at")?,
    })
}

fn missing(key_ref: &str) -> StoreError {
    StoreError::NotFound(format!("local key {key_ref:?}"))
}

/// Locks a key's row for the rest of the transaction.
async fn lock_key(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    key_ref: &str,
) -> Result<LocalKeyRow, StoreError> {
    let current = sqlx::query(
        "SELECT key_ref, state, current_version, expires_at FROM local_keys
         WHERE key_ref = $1 FOR UPDATE",
    )
    .bind(key_ref)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| missing(key_ref))?;
    row(&current)
}

impl PgStore {
    pub(crate) async fn local_key_create(
        &self,
        key_ref: &str,
        material_sealed: &[u8],
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<LocalKeyRow, StoreError> {
        let mut tx = self.pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO local_keys (key_ref, state, current_version, expires_at)
             VALUES ($1, 'enabled', 1, $2) ON CONFLICT DO NOTHING
             RETURNING key_ref, state, current_version, expires_at",
        )
        .bind(key_ref)
        .bind(expires_at)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("local key {key_ref:?} already exists")))?;
        sqlx::query(
            "INSERT INTO local_key_versions (key_ref, version, material_sealed) VALUES ($1, 1, $2)",
        )
        .bind(key_ref)
        .bind(material_sealed)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        row(&created)
    }

    pub(crate) async fn local_key_rotate(
        &self,
        key_ref: &str,
        material_sealed: &[u8],
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
        sqlx::query(
            "INSERT INTO local_key_versions (key_ref, version, material_sealed) VALUES ($1, $2, $3)",
        )
        .bind(key_ref)
        .bind(next)
        .bind(material_sealed)
        .execute(&mut *tx)
        .await?;
        let updated = sqlx::query(
            "UPDATE local_keys SET current_version = $2, updated_at = now() WHERE key_ref = $1
             RETURNING key_ref, state, current_version, expires_at",
        )
        .bind(key_ref)
        .bind(next)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        row(&updated)
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
            sqlx::query("DELETE FROM local_key_versions WHERE key_ref = $1")
                .bind(key_ref)
                .execute(&mut *tx)
                .await?;
        }
        let updated = sqlx::query(
            "UPDATE local_keys SET state = $2, updated_at = now() WHERE key_ref = $1
             RETURNING key_ref, state, current_version, expires_at",
        )
        .bind(key_ref)
        .bind(to.as_str())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        row(&updated)
    }

    pub(crate) async fn local_key_set_expiry(
        &self,
        key_ref: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<LocalKeyRow, StoreError> {
        let updated = sqlx::query(
            "UPDATE local_keys SET expires_at = $2, updated_at = now()
             WHERE key_ref = $1 AND state <> 'destroyed'
             RETURNING key_ref, state, current_version, expires_at",
        )
        .bind(key_ref)
        .bind(expires_at)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| missing(key_ref))?;
        row(&updated)
    }

    pub(crate) async fn local_key(&self, key_ref: &str) -> Result<LocalKeyRow, StoreError> {
        let r = sqlx::query(
            "SELECT key_ref, state, current_version, expires_at FROM local_keys WHERE key_ref = $1",
        )
        .bind(key_ref)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| missing(key_ref))?;
        row(&r)
    }

    pub(crate) async fn local_key_material(
        &self,
        key_ref: &str,
        versions: &[i32],
    ) -> Result<(LocalKeyRow, Vec<(i32, Vec<u8>)>), StoreError> {
        let rows = sqlx::query(
            "SELECT k.key_ref, k.state, k.current_version, k.expires_at,
                    v.version, v.material_sealed
             FROM local_keys k
             LEFT JOIN local_key_versions v
               ON v.key_ref = k.key_ref
              AND (v.version = ANY($2)
                   OR (cardinality($2) = 0 AND v.version = k.current_version))
             WHERE k.key_ref = $1",
        )
        .bind(key_ref)
        .bind(versions)
        .fetch_all(&self.pool)
        .await?;
        let first = rows.first().ok_or_else(|| missing(key_ref))?;
        let key = row(first)?;
        let mut material = Vec::with_capacity(rows.len());
        for r in &rows {
            let version: Option<i32> = r.try_get("version")?;
            let sealed: Option<Vec<u8>> = r.try_get("material_sealed")?;
            if let (Some(v), Some(s)) = (version, sealed) {
                material.push((v, s));
            }
        }
        Ok((key, material))
    }
}
