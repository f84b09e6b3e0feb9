//! `/v1/notifications`: the operator's view of the notification outbox (status, attempts,
//! last error per row) and manual retry of a row, typically a dead one.

use super::{ApiError, AppState};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
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

pub(super) async fn list(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "tenant": tenant, "notifications": rows })))
}

pub(super) async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id: Uuid = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("notification {id:?} not found"),
        )
    })?;
    state.store.retry_notification(id, Utc::now()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": "pending" })),
    ))
}
