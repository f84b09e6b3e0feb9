//! PostgreSQL SQL of key access: clients, DEK reads for unwrap, alerts, anomaly counts and
//! the LISTEN side of the change channels.

use super::PgStore;
use crate::domain::{KeyState, Provider};
use crate::store::access::{AlertRow, AttemptCount, ClientRow, NewAlert, NewClient};
use crate::store::{DekRow, StoreError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

impl PgStore {
    pub(crate) async fn create_client(&self, c: &NewClient) -> Result<ClientRow, StoreError> {
        sqlx::query_as!(
            ClientRow,
            "INSERT INTO clients (name, token_hash, all_tenants, tenants)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING
             RETURNING name, all_tenants, tenants, created_at, revoked_at",
            c.name,
            c.token_hash,
            c.all_tenants,
            &c.tenants
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::Conflict(format!("a client named {:?} exists", c.name)))
    }

    pub(crate) async fn clients(&self) -> Result<Vec<ClientRow>, StoreError> {
        Ok(sqlx::query_as!(
            ClientRow,
            "SELECT name, all_tenants, tenants, created_at, revoked_at FROM clients ORDER BY name"
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn client_by_token_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<ClientRow>, StoreError> {
        Ok(sqlx::query_as!(
            ClientRow,
            "SELECT name, all_tenants, tenants, created_at, revoked_at FROM clients
             WHERE token_hash = $1",
            hash
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    pub(crate) async fn revoke_client(&self, name: &str) -> Result<ClientRow, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query_as!(
            ClientRow,
            "UPDATE clients SET revoked_at = COALESCE(revoked_at, now()) WHERE name = $1
             RETURNING name, all_tenants, tenants, created_at, revoked_at",
            name
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("client {name:?}")))?;
        // Delivered to every replica's listener at commit.
        sqlx::query!("SELECT pg_notify('byokd_clients', $1)", name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    pub(crate) async fn deks_by_ids(
        &self,
        tenant_id: &str,
        ids: &[Uuid],
    ) -> Result<Vec<DekRow>, StoreError> {
        Ok(sqlx::query_as!(
            DekRow,
            r#"SELECT d.id, d.tenant_id, k.provider AS "provider: Provider", k.key_ref,
                      k.state AS "kek_state: KeyState", d.kek_version, d.wrapped, d.kcv
               FROM deks d JOIN keks k ON k.id = d.kek_id
               WHERE d.tenant_id = $1 AND d.id = ANY($2)"#,
            tenant_id,
            ids
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn raise_alert(&self, a: &NewAlert) -> Result<bool, StoreError> {
        let done = sqlx::query!(
            "INSERT INTO alerts (rule, subject, window_start, tenant_id, client, observed,
                                 threshold, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (rule, subject, window_start) DO NOTHING",
            a.rule,
            a.subject,
            a.window_start,
            a.tenant_id,
            a.client,
            a.observed,
            a.threshold,
            a.detail
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(crate) async fn alerts(&self, limit: i64) -> Result<Vec<AlertRow>, StoreError> {
        Ok(sqlx::query_as!(
            AlertRow,
            "SELECT id, rule, subject, window_start, tenant_id, client, observed, threshold,
                    detail, raised_at
             FROM alerts ORDER BY id DESC LIMIT $1",
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn attempt_counts(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<AttemptCount>, StoreError> {
        // Allowed unwraps per client; refusals per tenant; uses of unknown or revoked tokens
        // per token fingerprint; attempts refused because the tenant was inaccessible.
        let rows = sqlx::query!(
            r#"SELECT 'client' AS "group!", detail->>'client' AS "subject!",
                      NULL::text AS tenant_id, count(*) AS "n!"
               FROM audit_log
               WHERE at >= $1 AND at < $2 AND action = 'dek_unwrap' AND outcome = 'allowed'
                 AND detail ? 'client'
               GROUP BY detail->>'client'
             UNION ALL
               SELECT 'tenant_refused', tenant_id, tenant_id, count(*)
               FROM audit_log
               WHERE at >= $1 AND at < $2 AND action IN ('dek_unwrap', 'dek_create')
                 AND outcome = 'refused' AND tenant_id IS NOT NULL
               GROUP BY tenant_id
             UNION ALL
               SELECT 'token', detail->>'token', NULL, count(*)
               FROM audit_log
               WHERE at >= $1 AND at < $2 AND action = 'auth' AND outcome = 'refused'
                 AND detail ? 'token'
               GROUP BY detail->>'token'
             UNION ALL
               SELECT 'inaccessible', tenant_id, tenant_id, count(*)
               FROM audit_log
               WHERE at >= $1 AND at < $2 AND action = 'dek_unwrap' AND outcome = 'refused'
                 AND detail->>'cause' = 'inaccessible' AND tenant_id IS NOT NULL
               GROUP BY tenant_id"#,
            from,
            to
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AttemptCount {
                group: r.group,
                subject: r.subject,
                tenant_id: r.tenant_id,
                n: r.n,
            })
            .collect())
    }

    pub(crate) async fn client_baselines(
        &self,
        to: DateTime<Utc>,
        width: chrono::Duration,
        windows: i32,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let from = to - width * windows;
        let rows = sqlx::query!(
            r#"SELECT detail->>'client' AS "client!", count(*)::float8 / $3 AS "mean!"
               FROM audit_log
               WHERE at >= $1 AND at < $2 AND action = 'dek_unwrap' AND outcome = 'allowed'
                 AND detail ? 'client'
               GROUP BY detail->>'client'"#,
            from,
            to,
            f64::from(windows)
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.client, r.mean)).collect())
    }

    pub(crate) async fn recently_inaccessible(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let rows = sqlx::query!(
            "SELECT id, updated_at FROM tenants WHERE access = 'inaccessible' AND updated_at >= $1",
            since
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.id, r.updated_at)).collect())
    }

    pub(crate) async fn listener(
        &self,
        channels: &[&str],
    ) -> Result<sqlx::postgres::PgListener, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen_all(channels.iter().copied()).await?;
        Ok(listener)
    }
}
