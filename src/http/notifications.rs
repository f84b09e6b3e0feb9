//! `/v1/notifications`: the operator's view of the notification outbox (status, attempts,
//! last error per row) and manual retry of a row, typically a dead one.

use super::openapi::{CommonErrors, ErrorBody};
use super::{ApiError, AppState, Path, Query};
use crate::store::outbox::NotificationView;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Rows returned by one listing, newest first.
const DEFAULT_LIMIT: i64 = 200;
const MAX_LIMIT: i64 = 1000;

#[derive(Deserialize)]
pub(super) struct ListQuery {
    tenant: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
}

/// A tenant's notifications.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct NotificationPage {
    tenant: String,
    /// Newest first.
    notifications: Vec<NotificationView>,
}

/// A tenant's outbox rows, newest first, with their attempt log.
#[utoipa::path(get, path = "/notifications", tag = "notifications",
    operation_id = "list_notifications",
    params(
        ("tenant" = String, Query, description = "tenant id"),
        ("status" = Option<String>, Query, description = "pending, delivered or dead"),
        ("limit" = Option<i64>, Query, description = "rows (1-1000, default 200)"),
    ),
    responses(
        (status = 200, description = "rows", body = NotificationPage),
        (status = 404, description = "no such tenant", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<NotificationPage>, ApiError> {
    if let Some(status) = &q.status
        && !matches!(status.as_str(), "pending" | "delivered" | "dead")
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "status must be pending, delivered or dead",
        ));
    }
    // 404 for an unknown tenant rather than an empty list that hides a typo.
    let tenant = super::tenant_param(&state, q.tenant).await?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mut rows = state.store.notifications(&tenant, limit).await?;
    if let Some(status) = &q.status {
        rows.retain(|r| &r.status == status);
    }
    Ok(Json(NotificationPage {
        tenant,
        notifications: rows,
    }))
}

/// A notification put back in the queue.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Requeued {
    id: Uuid,
    /// Always `pending`.
    status: String,
}

/// Delivers a notification again (typically a dead one).
#[utoipa::path(post, path = "/notifications/{id}/retry", tag = "notifications",
    operation_id = "retry_notification",
    params(("id" = String, Path, description = "notification id (a UUID)")),
    responses(
        (status = 202, description = "queued", body = Requeued),
        (status = 404, description = "no such notification", body = ErrorBody),
        (status = 409, description = "it cannot be retried (pending already)", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Requeued>), ApiError> {
    let id: Uuid = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("notification {id:?} not found"),
        )
    })?;
    state.store.retry_notification(id, Utc::now()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Requeued {
            id,
            status: "pending".to_owned(),
        }),
    ))
}
