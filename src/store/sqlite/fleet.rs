//! SQLite SQL of the fleet views and of crypto-shredding a tenant.

use super::{SqliteStore, ts};
use crate::domain::Access;
use crate::store::fleet::{ShredCounts, TenantSummary};
use crate::store::{AuditRow, RewrapJobView, StoreError};
use chrono::Utc;
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
        // Clients lose the id from their scope, so a tenant created later under the same id
        // is not reachable through them. One scoped to this tenant alone has nothing left
        // and is revoked (a scope is never empty).
        let revoked = sqlx::query(
            "UPDATE clients SET revoked_at = COALESCE(revoked_at, ?2)
             WHERE NOT all_tenants AND json_array_length(tenants) = 1
               AND tenants ->> '$[0]' = ?1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(ts(Utc::now()))
        .execute(&mut *tx.tx)
        .await?
        .rows_affected();
        let narrowed = sqlx::query(
            "UPDATE clients
             SET tenants = (SELECT json_group_array(value) FROM json_each(clients.tenants)
                            WHERE value <> ?1)
             WHERE NOT all_tenants AND json_array_length(tenants) > 1
               AND EXISTS (SELECT 1 FROM json_each(clients.tenants) WHERE value = ?1)",
        )
        .bind(id)
        .execute(&mut *tx.tx)
        .await?
        .rows_affected();
        if revoked + narrowed > 0 {
            tx.notify_change(crate::store::access::CLIENTS_CHANNEL, id)
                .await?;
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
            clients_narrowed: i64::try_from(narrowed).unwrap_or(i64::MAX),
            clients_revoked: i64::try_from(revoked).unwrap_or(i64::MAX),
        };
        tx.audit(&[audit(&counts)]).await?;
        tx.commit().await?;
        Ok(counts)
    }
}
