//! SQLite SQL of the local KMS keyring.

use super::{SqliteStore, SqliteTx, json_list, ots, ts};
use crate::domain::KeyState;
use crate::store::{LocalKeyRow, StoreError};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

fn missing(key_ref: &str) -> StoreError {
    StoreError::NotFound(format!("local key {key_ref:?}"))
}

fn key_row(r: &SqliteRow) -> Result<LocalKeyRow, StoreError> {
    Ok(LocalKeyRow {
        key_ref: r.try_get("key_ref")?,
        state: r.try_get("state")?,
        current_version: r.try_get("current_version")?,
        expires_at: r.try_get("expires_at")?,
    })
}

/// Reads a key inside a write transaction (which holds it for the rest of the transaction).
async fn lock_key(tx: &mut SqliteTx, key_ref: &str) -> Result<LocalKeyRow, StoreError> {
    sqlx::query(
        "SELECT key_ref, state, current_version, expires_at FROM local_keys WHERE key_ref = ?1",
    )
    .bind(key_ref)
    .fetch_optional(&mut *tx.tx)
    .await?
    .as_ref()
    .map(key_row)
    .transpose()?
    .ok_or_else(|| missing(key_ref))
}

impl SqliteStore {
    pub(crate) async fn local_key_create(
        &self,
        key_ref: &str,
        material_sealed: &[u8],
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<LocalKeyRow, StoreError> {
        let mut tx = self.begin().await?;
        let now = ts(Utc::now());
        let created = sqlx::query(
            "INSERT INTO local_keys (key_ref, state, current_version, expires_at, created_at,
                                     updated_at)
             VALUES (?1, 'enabled', 1, ?2, ?3, ?3) ON CONFLICT DO NOTHING
             RETURNING key_ref, state, current_version, expires_at",
        )
        .bind(key_ref)
        .bind(ots(expires_at))
        .bind(&now)
        .fetch_optional(&mut *tx.tx)
        .await?
        .as_ref()
        .map(key_row)
        .transpose()?
        .ok_or_else(|| StoreError::Conflict(format!("local key {key_ref:?} already exists")))?;
        sqlx::query(
            "INSERT INTO local_key_versions (key_ref, version, material_sealed, created_at)
             VALUES (?1, 1, ?2, ?3)",
        )
        .bind(key_ref)
        .bind(material_sealed)
        .bind(&now)
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    pub(crate) async fn local_key_rotate(
        &self,
        key_ref: &str,
        material: impl FnOnce(i32) -> Vec<u8> + Send,
    ) -> Result<LocalKeyRow, StoreError> {
        let mut tx = self.begin().await?;
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
        let now = ts(Utc::now());
        sqlx::query(
            "INSERT INTO local_key_versions (key_ref, version, material_sealed, created_at)
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(key_ref)
        .bind(next)
        .bind(&material_sealed)
        .bind(&now)
        .execute(&mut *tx.tx)
        .await?;
        let updated = sqlx::query(
            "UPDATE local_keys SET current_version = ?2, updated_at = ?3 WHERE key_ref = ?1
             RETURNING key_ref, state, current_version, expires_at",
        )
        .bind(key_ref)
        .bind(next)
        .bind(&now)
        .fetch_one(&mut *tx.tx)
        .await?;
        let updated = key_row(&updated)?;
        tx.commit().await?;
        Ok(updated)
    }

    pub(crate) async fn local_key_transition(
        &self,
        key_ref: &str,
        from: &[KeyState],
        to: KeyState,
    ) -> Result<LocalKeyRow, StoreError> {
        let mut tx = self.begin().await?;
        let current = lock_key(&mut tx, key_ref).await?;
        if !from.contains(&current.state) {
            return Err(StoreError::Conflict(format!(
                "local key {key_ref:?} is {}; cannot make it {to}",
                current.state
            )));
        }
        if to == KeyState::Destroyed {
            sqlx::query("DELETE FROM local_key_versions WHERE key_ref = ?1")
                .bind(key_ref)
                .execute(&mut *tx.tx)
                .await?;
        }
        let updated = sqlx::query(
            "UPDATE local_keys SET state = ?2, updated_at = ?3 WHERE key_ref = ?1
             RETURNING key_ref, state, current_version, expires_at",
        )
        .bind(key_ref)
        .bind(to.as_str())
        .bind(ts(Utc::now()))
        .fetch_one(&mut *tx.tx)
        .await?;
        let updated = key_row(&updated)?;
        tx.commit().await?;
        Ok(updated)
    }

    pub(crate) async fn local_key_set_expiry(
        &self,
        key_ref: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<LocalKeyRow, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE local_keys SET expires_at = ?2, updated_at = ?3
             WHERE key_ref = ?1 AND state <> 'destroyed'
             RETURNING key_ref, state, current_version, expires_at",
        )
        .bind(key_ref)
        .bind(ots(expires_at))
        .bind(ts(Utc::now()))
        .fetch_optional(&mut *tx.tx)
        .await?
        .as_ref()
        .map(key_row)
        .transpose()?
        .ok_or_else(|| missing(key_ref))?;
        tx.commit().await?;
        Ok(row)
    }

    pub(crate) async fn local_key(&self, key_ref: &str) -> Result<LocalKeyRow, StoreError> {
        sqlx::query(
            "SELECT key_ref, state, current_version, expires_at FROM local_keys WHERE key_ref = ?1",
        )
        .bind(key_ref)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(key_row)
        .transpose()?
        .ok_or_else(|| missing(key_ref))
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
              AND (v.version IN (SELECT value FROM json_each(?2))
                   OR (json_array_length(?2) = 0 AND v.version = k.current_version))
             WHERE k.key_ref = ?1",
        )
        .bind(key_ref)
        .bind(json_list(versions))
        .fetch_all(&self.pool)
        .await?;
        let first = rows.first().ok_or_else(|| missing(key_ref))?;
        let key = key_row(first)?;
        let mut material = Vec::new();
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
