//! Store API of the audit trail's read side.

use super::{Store, StoreError};
use chrono::{DateTime, Utc};

/// One audit entry as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditEntry {
    /// Sequence number (newest is highest).
    pub id: i64,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// Key provider, when a key is concerned.
    pub provider: Option<String>,
    /// Key, when a key is concerned.
    pub key_ref: Option<String>,
    /// What was attempted.
    pub action: String,
    /// What came of it.
    pub outcome: String,
    /// Who asked: event, api, probe, sweep.
    pub source: String,
    /// The event id, for event-driven entries.
    pub event_id: Option<String>,
    /// States before and after, reasons.
    pub detail: serde_json::Value,
}

impl Store {
    /// A tenant's audit entries, newest first, older than `before` when given.
    pub async fn audit_trail(
        &self,
        tenant_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        dispatch!(self, s => s.audit_trail(tenant_id, before, limit).await)
    }
}
