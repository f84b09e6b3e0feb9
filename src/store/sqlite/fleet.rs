//! SQLite SQL of the fleet views and of crypto-shredding a tenant.

use super::SqliteStore;
use crate::domain::Access;
use crate::store::fleet::{ShredCounts, TenantSummary};
use crate::store::{AuditRow, RewrapJobView, StoreError};
use sqlx::Row;

impl SqliteStore {
    pub(crate) async fn tenants_page(
        &self,
        access: Option<Access>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TenantSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, access, access_reason, updated_at FROM tenants
             WHERE (?1 IS NULL OR access = ?1) AND (?2 IS NULL OR id > ?2)
             ORDER BY id LIMIT ?3",
        )
        .bind(access.map(Access::as_str))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TenantSummary {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    access: r.try_get("access")?,
                    reason: r.try_get("access_reason")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }

    pub(crate) async fn active_rewrap_jobs(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RewrapJobView>, StoreError> {
        let rows = sqlx::query(concat!(
            super::rewrap::job_view_select!(),
            "WHERE j.state IN ('pending', 'running', 'waiting') AND (?1 IS NULL OR j.id > ?1)
             ORDER BY j.id LIMIT ?2"
        ))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(super::rewrap::job_view).collect()
    }

    pub(crate) async fn shred_tenant(
        &self,
        id: &str,
        audit: impl FnOnce(&ShredCounts) -> AuditRow,
    ) -> Result<ShredCounts, StoreError> {
        // The write transaction keeps every event and re-wrap batch out while it goes.
        let mut tx = self.begin().await?;
        let found = sqlx::query("SELECT id FROM tenants WHERE id = ?1")
            .bind(id)
            .fetch_optional(&mut *tx.tx)
            .await?;
        if found.is_none() {
            return Err(StoreError::NotFound(format!("tenant {id:?}")));
        }
        let c = sqlx::query(
            "SELECT (SELECT count(*) FROM deks WHERE tenant_id = ?1) AS deks,
                    (SELECT count(*) FROM keks WHERE tenant_id = ?1) AS keks,
                    (SELECT count(*) FROM rewrap_jobs WHERE tenant_id = ?1) AS jobs,
                    (SELECT count(*) FROM webhook_endpoints WHERE tenant_id = ?1) AS webhooks,
                    (SELECT count(*) FROM tenant_contacts WHERE tenant_id = ?1) AS contacts",
        )
        .bind(id)
        .fetch_one(&mut *tx.tx)
        .await?;
        // Tenant notifications go with their recipients; access messages and operator rows
        // stay.
        let notifications = sqlx::query(
            "DELETE FROM outbox WHERE tenant_id = ?1 AND channel IN ('email', 'webhook')",
        )
        .bind(id)
        .execute(&mut *tx.tx)
        .await?
        .rows_affected();
        // The DEKs first: they reference the KEKs, which go with the tenant (as do its
        // contacts, endpoints, jobs and their failure records, by ON DELETE CASCADE).
        for sql in [
            "DELETE FROM deks WHERE tenant_id = ?1",
            "DELETE FROM rewrap_jobs WHERE tenant_id = ?1",
            "DELETE FROM tenants WHERE id = ?1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx.tx).await?;
        }
        tx.notify_change(crate::store::access::ACCESS_CHANNEL, id)
            .await?;
        let counts = ShredCounts {
            deks: c.try_get("deks")?,
            keks: c.try_get("keks")?,
            rewrap_jobs: c.try_get("jobs")?,
            webhooks: c.try_get("webhooks")?,
            contacts: c.try_get("contacts")?,
            notifications: i64::try_from(notifications).unwrap_or(i64::MAX),
        };
        tx.audit(&[audit(&counts)]).await?;
        tx.commit().await?;
        Ok(counts)
    }
}
