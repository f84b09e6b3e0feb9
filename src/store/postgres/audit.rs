//! PostgreSQL SQL of the audit trail's read side.

use super::PgStore;
use crate::store::{AuditEntry, StoreError};
use sqlx::Row;

impl PgStore {
    pub(crate) async fn audit_trail(
        &self,
        tenant_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, provider, key_ref, action, outcome, source, event_id, detail
             FROM audit_log
             WHERE tenant_id = $1 AND ($2::bigint IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3",
        )
        .bind(tenant_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    provider: r.try_get("provider")?,
                    key_ref: r.try_get("key_ref")?,
                    action: r.try_get("action")?,
                    outcome: r.try_get("outcome")?,
                    source: r.try_get("source")?,
                    event_id: r.try_get("event_id")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}
