//! SQLite SQL of key access: clients, DEK reads for unwrap, alerts, anomaly counts and the
//! change listener (the `changes` table standing in for LISTEN/NOTIFY).

use super::{SqliteStore, get_json, get_strings, get_uuid, json_list, ts, uid};
use crate::store::access::{AlertRow, AttemptCount, Change, ClientRow, NewAlert, NewClient};
use crate::store::{DekRow, StoreError};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use std::collections::VecDeque;
use std::time::Duration;
use uuid::Uuid;

/// How often a listener looks for changes made by another process (a CLI command); changes
/// made in this process wake it at once.
const POLL: Duration = Duration::from_millis(200);

/// How long changes are kept for listeners.
pub(crate) const KEEP_CHANGES: chrono::Duration = chrono::Duration::minutes(10);

fn client_row(r: &SqliteRow) -> Result<ClientRow, StoreError> {
    Ok(ClientRow {
        name: r.try_get("name")?,
        all_tenants: r.try_get("all_tenants")?,
        tenants: get_strings(r, "tenants")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

pub(crate) fn dek_row(r: &SqliteRow) -> Result<DekRow, StoreError> {
    Ok(DekRow {
        id: get_uuid(r, "id")?,
        tenant_id: r.try_get("tenant_id")?,
        provider: r.try_get("provider")?,
        key_ref: r.try_get("key_ref")?,
        kek_state: r.try_get("kek_state")?,
        kek_version: r.try_get("kek_version")?,
        wrapped: r.try_get("wrapped")?,
        kcv: r.try_get("kcv")?,
    })
}

/// Reads the `changes` table from where it stood when the listener was made.
pub(crate) struct SqliteChangeListener {
    store: SqliteStore,
    after: i64,
    pending: VecDeque<Change>,
}

impl SqliteChangeListener {
    pub(crate) async fn next(&mut self) -> Result<Change, StoreError> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Ok(c);
            }
            // Registered before reading, so a commit between the read and the wait wakes it.
            let woken = self.store.shared.changes.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let rows = sqlx::query(
                "SELECT seq, channel, payload FROM changes WHERE seq > ?1 ORDER BY seq LIMIT 1000",
            )
            .bind(self.after)
            .fetch_all(&self.store.pool)
            .await?;
            for r in &rows {
                self.after = r.try_get("seq")?;
                self.pending.push_back(Change {
                    channel: r.try_get("channel")?,
                    payload: r.try_get("payload")?,
                });
            }
            if self.pending.is_empty() {
                let _ = tokio::time::timeout(POLL, woken).await;
            }
        }
    }
}

impl SqliteStore {
    pub(crate) async fn create_client(&self, c: &NewClient) -> Result<ClientRow, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "INSERT INTO clients (name, token_hash, all_tenants, tenants, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO NOTHING
             RETURNING name, all_tenants, tenants, created_at, revoked_at",
        )
        .bind(&c.name)
        .bind(&c.token_hash)
        .bind(c.all_tenants)
        .bind(json_list(&c.tenants))
        .bind(ts(Utc::now()))
        .fetch_optional(&mut *tx.tx)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("a client named {:?} exists", c.name)))?;
        let client = client_row(&row)?;
        tx.commit().await?;
        Ok(client)
    }

    pub(crate) async fn clients(&self) -> Result<Vec<ClientRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, all_tenants, tenants, created_at, revoked_at FROM clients ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(client_row).collect()
    }

    pub(crate) async fn client_by_token_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<ClientRow>, StoreError> {
        sqlx::query(
            "SELECT name, all_tenants, tenants, created_at, revoked_at FROM clients
             WHERE token_hash = ?1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(client_row)
        .transpose()
    }

    pub(crate) async fn revoke_client(&self, name: &str) -> Result<ClientRow, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE clients SET revoked_at = COALESCE(revoked_at, ?2) WHERE name = ?1
             RETURNING name, all_tenants, tenants, created_at, revoked_at",
        )
        .bind(name)
        .bind(ts(Utc::now()))
        .fetch_optional(&mut *tx.tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("client {name:?}")))?;
        let client = client_row(&row)?;
        tx.notify_change(crate::store::access::CLIENTS_CHANNEL, name)
            .await?;
        tx.commit().await?;
        Ok(client)
    }

    pub(crate) async fn deks_by_ids(
        &self,
        tenant_id: &str,
        ids: &[Uuid],
    ) -> Result<Vec<DekRow>, StoreError> {
        let ids: Vec<String> = ids.iter().map(|id| uid(*id)).collect();
        let rows = sqlx::query(
            "SELECT d.id, d.tenant_id, k.provider, k.key_ref, k.state AS kek_state,
                    d.kek_version, d.wrapped, d.kcv
             FROM deks d JOIN keks k ON k.id = d.kek_id
             WHERE d.tenant_id = ?1 AND d.id IN (SELECT value FROM json_each(?2))",
        )
        .bind(tenant_id)
        .bind(json_list(&ids))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(dek_row).collect()
    }

    pub(crate) async fn raise_alert(&self, a: &NewAlert) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "INSERT INTO alerts (rule, subject, window_start, tenant_id, client, observed,
                                 threshold, detail, raised_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (rule, subject, window_start) DO NOTHING",
        )
        .bind(&a.rule)
        .bind(&a.subject)
        .bind(ts(a.window_start))
        .bind(&a.tenant_id)
        .bind(&a.client)
        .bind(a.observed)
        .bind(a.threshold)
        .bind(a.detail.to_string())
        .bind(ts(Utc::now()))
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn alerts(&self, limit: i64) -> Result<Vec<AlertRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, rule, subject, window_start, tenant_id, client, observed, threshold,
                    detail, raised_at
             FROM alerts ORDER BY id DESC LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AlertRow {
                    id: r.try_get("id")?,
                    rule: r.try_get("rule")?,
                    subject: r.try_get("subject")?,
                    window_start: r.try_get("window_start")?,
                    tenant_id: r.try_get("tenant_id")?,
                    client: r.try_get("client")?,
                    observed: r.try_get("observed")?,
                    threshold: r.try_get("threshold")?,
                    detail: get_json(r, "detail")?,
                    raised_at: r.try_get("raised_at")?,
                })
            })
            .collect()
    }

    pub(crate) async fn attempt_counts(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<AttemptCount>, StoreError> {
        // As in PostgreSQL: allowed unwraps per client; refusals per tenant; uses of unknown
        // or revoked tokens per token fingerprint; refusals of inaccessible tenants.
        let rows = sqlx::query(
            "SELECT 'client' AS grp, detail ->> '$.client' AS subject, NULL AS tenant_id,
                    count(*) AS n
             FROM audit_log
             WHERE at >= ?1 AND at < ?2 AND action = 'dek_unwrap' AND outcome = 'allowed'
               AND detail ->> '$.client' IS NOT NULL
             GROUP BY detail ->> '$.client'
           UNION ALL
             SELECT 'tenant_refused', tenant_id, tenant_id, count(*)
             FROM audit_log
             WHERE at >= ?1 AND at < ?2 AND action IN ('dek_unwrap', 'dek_create')
               AND outcome = 'refused' AND tenant_id IS NOT NULL
             GROUP BY tenant_id
           UNION ALL
             SELECT 'token', detail ->> '$.token', NULL, count(*)
             FROM audit_log
             WHERE at >= ?1 AND at < ?2 AND action = 'auth' AND outcome = 'refused'
               AND detail ->> '$.token' IS NOT NULL
             GROUP BY detail ->> '$.token'
           UNION ALL
             SELECT 'inaccessible', tenant_id, tenant_id, count(*)
             FROM audit_log
             WHERE at >= ?1 AND at < ?2 AND action = 'dek_unwrap' AND outcome = 'refused'
               AND detail ->> '$.cause' = 'inaccessible' AND tenant_id IS NOT NULL
             GROUP BY tenant_id",
        )
        .bind(ts(from))
        .bind(ts(to))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AttemptCount {
                    group: r.try_get("grp")?,
                    subject: r.try_get("subject")?,
                    tenant_id: r.try_get("tenant_id")?,
                    n: r.try_get("n")?,
                })
            })
            .collect()
    }

    pub(crate) async fn client_baselines(
        &self,
        to: DateTime<Utc>,
        width: chrono::Duration,
        windows: i32,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let from = to - width * windows;
        let rows = sqlx::query(
            "SELECT detail ->> '$.client' AS client, count(*) * 1.0 / ?3 AS mean
             FROM audit_log
             WHERE at >= ?1 AND at < ?2 AND action = 'dek_unwrap' AND outcome = 'allowed'
               AND detail ->> '$.client' IS NOT NULL
             GROUP BY detail ->> '$.client'",
        )
        .bind(ts(from))
        .bind(ts(to))
        .bind(f64::from(windows))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("client")?, r.try_get("mean")?)))
            .collect()
    }

    pub(crate) async fn recently_inaccessible(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, updated_at FROM tenants WHERE access = 'inaccessible' AND updated_at >= ?1",
        )
        .bind(ts(since))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("updated_at")?)))
            .collect()
    }

    pub(crate) async fn listener(&self) -> Result<SqliteChangeListener, StoreError> {
        let after: i64 = sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM changes")
            .fetch_one(&self.pool)
            .await?;
        Ok(SqliteChangeListener {
            store: self.clone(),
            after,
            pending: VecDeque::new(),
        })
    }
}
