//! PostgreSQL SQL of the audit trail's read side.

use super::PgStore;
use crate::store::{AuditEntry, StoreError};

impl PgStore {
    pub(crate) async fn audit_trail(
        &self,
        tenant_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(sqlx::query_as!(
            AuditEntry,
            "SELECT id, at, provider, key_ref, action, outcome, source, event_id, detail
             FROM audit_log
             WHERE tenant_id = $1 AND ($2::bigint IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3",
            tenant_id,
            before,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
