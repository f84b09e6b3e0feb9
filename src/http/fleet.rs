//! Fleet views for operators: every tenant by access and every active re-wrap job, in
//! keyset pages (`after` = the last id seen, `next` = the cursor of the following page),
//! and crypto-shredding a tenant.

use super::{ApiError, AppState, Query};
use crate::domain::Access;
use crate::store::AuditRow;
use crate::store::fleet::{ShredCounts, TenantSummary};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 100;
/// Largest page.
pub const MAX_LIMIT: i64 = 1000;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// The `limit` query parameter: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent. Taken as
/// text so a bad value gets this sentence rather than a deserializer's.
pub(super) fn limit_param(raw: Option<&str>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                bad_request(format!(
                    "limit must be an integer from 1 to {MAX_LIMIT}, not {v:?}"
                ))
            }),
    }
}

#[derive(Deserialize)]
pub(super) struct TenantsQuery {
    access: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// A page of tenants.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TenantPage {
    /// Tenants in id order.
    pub tenants: Vec<TenantSummary>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
}

/// `GET /v1/tenants`: every tenant in id order, optionally only those with one access.
#[utoipa::path(
    get, path = "/tenants", tag = "fleet",
    operation_id = "list_tenants",
    params(
        ("access" = Option<Access>, Query, description = "only tenants with this access"),
        ("after" = Option<String>, Query, description = "the last tenant id of the previous page"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000,
         description = "page size (default 100)"),
    ),
    responses(
        (status = 200, description = "a page of tenants", body = TenantPage),
        (status = 400, description = "a bad query parameter", body = super::openapi::ErrorBody),
        (status = 401, description = "missing or invalid token", body = super::openapi::ErrorBody),
        (status = 403, description = "a client token", body = super::openapi::ErrorBody),
        (status = 503, description = "the database is unavailable", body = super::openapi::ErrorBody),
    ),
    security(("admin_token" = [])),
)]
pub(super) async fn list_tenants(
    State(state): State<AppState>,
    Query(q): Query<TenantsQuery>,
) -> Result<Json<TenantPage>, ApiError> {
    let access = q
        .access
        .as_deref()
        .map(|a| {
            a.parse::<Access>().map_err(|_| {
                bad_request(format!(
                    "access must be accessible, encrypt_blocked or inaccessible, not {a:?}"
                ))
            })
        })
        .transpose()?;
    let limit = limit_param(q.limit.as_deref())?;
    let tenants = state
        .store
        .tenants_page(access, q.after.as_deref(), limit)
        .await?;
    let next = (tenants.len() as i64 == limit)
        .then(|| tenants.last().map(|t| t.id.clone()))
        .flatten();
    Ok(Json(TenantPage { tenants, next }))
}

/// The answer to a crypto-shred.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Shredded {
    /// The tenant that is gone.
    pub id: String,
    /// Always `true`.
    pub deleted: bool,
    /// What was removed.
    pub removed: ShredCounts,
}

#[derive(Deserialize)]
pub(super) struct ShredQuery {
    confirm: Option<String>,
}

/// `DELETE /v1/tenants/{id}?confirm={id}`: crypto-shredding. The tenant's wrapped DEKs are
/// deleted, so whatever was encrypted under them can never be decrypted again, by anyone.
/// Clients lose the id from their scope (one scoped to this tenant alone is revoked), so a
/// tenant created later under the same id is not reachable through them.
#[utoipa::path(
    delete, path = "/tenants/{id}", tag = "fleet",
    operation_id = "delete_tenant",
    params(
        ("id" = String, Path, description = "tenant id"),
        ("confirm" = String, Query, description = "must equal the tenant id"),
    ),
    responses(
        (status = 200, description = "the tenant and its DEKs are gone", body = Shredded),
        (status = 400, description = "confirm missing or not the tenant id", body = super::openapi::ErrorBody),
        (status = 401, description = "missing or invalid token", body = super::openapi::ErrorBody),
        (status = 403, description = "a client token", body = super::openapi::ErrorBody),
        (status = 404, description = "no such tenant", body = super::openapi::ErrorBody),
        (status = 503, description = "the database is unavailable", body = super::openapi::ErrorBody),
    ),
    security(("admin_token" = [])),
)]
pub(super) async fn delete_tenant(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ShredQuery>,
) -> Result<Json<Shredded>, ApiError> {
    if q.confirm.as_deref() != Some(id.as_str()) {
        return Err(bad_request(format!(
            "deleting a tenant destroys its DEKs and every piece of data encrypted under \
             them for good; repeat the tenant id as ?confirm={id} to proceed"
        )));
    }
    let removed = state
        .store
        .shred_tenant(&id, |counts| {
            AuditRow::operation(
                Some(&id),
                "tenant_deleted",
                "api",
                json!({ "removed": counts }),
            )
        })
        .await?;
    tracing::warn!(tenant = %id, deks = removed.deks, "tenant crypto-shredded");
    // This replica forgets the tenant now; the others on the commit's notification.
    state.gate.tenant_changed(&id);
    if removed.clients_narrowed + removed.clients_revoked > 0 {
        state.gate.clients_changed();
    }
    Ok(Json(Shredded {
        id,
        deleted: true,
        removed,
    }))
}
