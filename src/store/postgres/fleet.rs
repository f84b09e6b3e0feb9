//! PostgreSQL SQL of the fleet views and of crypto-shredding a tenant.

use super::PgStore;
use crate::domain::{Access, JobKind, JobState, Provider};
use crate::store::fleet::{ShredCounts, TenantSummary};
use crate::store::{AuditRow, RewrapJobView, StoreError};

impl PgStore {
    pub(crate) async fn tenants_page(
        &self,
        access: Option<Access>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TenantSummary>, StoreError> {
        Ok(sqlx::query_as!(
            TenantSummary,
            r#"SELECT id, name, access AS "access: Access", access_reason AS reason, updated_at
               FROM tenants
               WHERE ($1::text IS NULL OR access = $1) AND ($2::text IS NULL OR id > $2)
               ORDER BY id LIMIT $3"#,
            access.map(Access::as_str),
            after,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn active_rewrap_jobs(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RewrapJobView>, StoreError> {
        Ok(sqlx::query_as!(
            RewrapJobView,
            r#"SELECT j.id, j.tenant_id, j.kind AS "kind: JobKind",
                      s.provider AS "provider: Provider", s.key_ref,
                      t.key_ref AS target_key_ref, j.from_versions, j.target_version,
                      j.state AS "state: JobState", j.total, j.done, j.failed, j.last_error,
                      j.created_at, j.completed_at
               FROM rewrap_jobs j JOIN keks s ON s.id = j.kek_id
                    JOIN keks t ON t.id = j.target_kek_id
               WHERE j.state IN ('pending', 'running', 'waiting')
                 AND ($1::bigint IS NULL OR j.id > $1)
               ORDER BY j.id LIMIT $2"#,
            after,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn shred_tenant(
        &self,
        id: &str,
        audit: impl FnOnce(&ShredCounts) -> AuditRow,
    ) -> Result<ShredCounts, StoreError> {
        let mut tx = self.begin().await?;
        // Locks the tenant against the lifecycle code (which locks tenants first too), so no
        // event or re-wrap batch writes under it while it goes.
        let found = sqlx::query_scalar!("SELECT id FROM tenants WHERE id = $1 FOR UPDATE", id)
            .fetch_optional(&mut *tx.tx)
            .await?;
        if found.is_none() {
            return Err(StoreError::NotFound(format!("tenant {id:?}")));
        }
        let c = sqlx::query!(
            r#"SELECT (SELECT count(*) FROM deks WHERE tenant_id = $1) AS "deks!",
                      (SELECT count(*) FROM keks WHERE tenant_id = $1) AS "keks!",
                      (SELECT count(*) FROM rewrap_jobs WHERE tenant_id = $1) AS "jobs!",
                      (SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1) AS "webhooks!",
                      (SELECT count(*) FROM tenant_contacts WHERE tenant_id = $1) AS "contacts!""#,
            id
        )
        .fetch_one(&mut *tx.tx)
        .await?;
        // Tenant notifications go: their recipients (contacts, endpoints) are deleted with
        // the tenant. Access messages for the platform and operator rows stay.
        let notifications = sqlx::query!(
            "DELETE FROM outbox WHERE tenant_id = $1 AND channel IN ('email', 'webhook')",
            id
        )
        .execute(&mut *tx.tx)
        .await?
        .rows_affected();
        // The DEKs first: they reference the KEKs, which go with the tenant (as do its
        // contacts, endpoints, jobs and their failure records, by ON DELETE CASCADE).
        sqlx::query!("DELETE FROM deks WHERE tenant_id = $1", id)
            .execute(&mut *tx.tx)
            .await?;
        sqlx::query!("DELETE FROM rewrap_jobs WHERE tenant_id = $1", id)
            .execute(&mut *tx.tx)
            .await?;
        sqlx::query!("DELETE FROM tenants WHERE id = $1", id)
            .execute(&mut *tx.tx)
            .await?;
        // Clients lose the id from their scope, so a tenant created later under the same id
        // is not reachable through them. One scoped to this tenant alone has nothing left
        // and is revoked (a scope is never empty).
        let revoked = sqlx::query!(
            "UPDATE clients SET revoked_at = coalesce(revoked_at, now())
             WHERE NOT all_tenants AND tenants = ARRAY[$1]::text[] AND revoked_at IS NULL",
            id
        )
        .execute(&mut *tx.tx)
        .await?
        .rows_affected();
        let narrowed = sqlx::query!(
            "UPDATE clients SET tenants = array_remove(tenants, $1)
             WHERE NOT all_tenants AND $1 = ANY(tenants) AND cardinality(tenants) > 1",
            id
        )
        .execute(&mut *tx.tx)
        .await?
        .rows_affected();
        if revoked + narrowed > 0 {
            sqlx::query!("SELECT pg_notify('byokd_clients', $1)", id)
                .execute(&mut *tx.tx)
                .await?;
        }
        sqlx::query!("SELECT pg_notify('byokd_access', $1)", id)
            .execute(&mut *tx.tx)
            .await?;
        let counts = ShredCounts {
            deks: c.deks,
            keks: c.keks,
            rewrap_jobs: c.jobs,
            webhooks: c.webhooks,
            contacts: c.contacts,
            notifications: i64::try_from(notifications).unwrap_or(i64::MAX),
            clients_narrowed: i64::try_from(narrowed).unwrap_or(i64::MAX),
            clients_revoked: i64::try_from(revoked).unwrap_or(i64::MAX),
        };
        tx.audit(&[audit(&counts)]).await?;
        tx.tx.commit().await?;
        Ok(counts)
    }
}
