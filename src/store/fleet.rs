//! Store API of the fleet views: every tenant (by access) and every active re-wrap job,
//! read in keyset pages, and crypto-shredding a tenant.

use super::{AuditRow, Store, StoreError};
use crate::domain::Access;
use crate::store::RewrapJobView;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// One tenant of the fleet listing: its recorded access, without its keys.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TenantSummary {
    /// Tenant id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Access as last recorded (the lifecycle code and the sweeps keep it current).
    pub access: Access,
    /// Why, when not accessible.
    pub reason: Option<String>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// What crypto-shredding a tenant removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ShredCounts {
    /// Wrapped DEKs deleted: data encrypted under them is unrecoverable.
    pub deks: i64,
    /// KEK registrations deleted (the keys themselves stay in the tenant's KMS).
    pub keks: i64,
    /// Re-wrap jobs deleted.
    pub rewrap_jobs: i64,
    /// Webhook endpoints deleted (with their sealed secrets).
    pub webhooks: i64,
    /// Contact addresses deleted.
    pub contacts: i64,
    /// Tenant notifications (email and webhook outbox rows, with their attempts) deleted.
    pub notifications: i64,
    /// Clients whose scope lost the tenant's id and still reach other tenants.
    pub clients_narrowed: i64,
    /// Clients scoped to this tenant alone, revoked with it.
    pub clients_revoked: i64,
}

impl Store {
    /// Up to `limit` tenants with an id after `after`, in id order, with access `access`
    /// if given.
    pub async fn tenants_page(
        &self,
        access: Option<Access>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TenantSummary>, StoreError> {
        dispatch!(self, s => s.tenants_page(access, after, limit).await)
    }

    /// Up to `limit` active (pending, running, waiting) re-wrap jobs of every tenant with an
    /// id after `after`, in id order.
    pub async fn active_rewrap_jobs(
        &self,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<RewrapJobView>, StoreError> {
        dispatch!(self, s => s.active_rewrap_jobs(after, limit).await)
    }

    /// Deletes tenant `id` with its wrapped DEKs, KEK registrations, re-wrap jobs, contacts,
    /// webhook endpoints and tenant notifications, in one transaction with the `audit` row
    /// built from the counts; the audit trail, the platform's access messages and alerts
    /// stay. Every replica drops what it cached about the tenant on commit.
    pub async fn shred_tenant(
        &self,
        id: &str,
        audit: impl FnOnce(&ShredCounts) -> AuditRow,
    ) -> Result<ShredCounts, StoreError> {
        dispatch!(self, s => s.shred_tenant(id, audit).await)
    }
}
