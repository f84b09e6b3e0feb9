//! DEK routes and re-wrap job progress.

use super::{ApiError, AppState};
use crate::domain::KeyState;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// The wrapped form of a DEK, never the plaintext.
pub(super) async fn get_dek(
    State(state): State<AppState>,
    Path((tenant_id, dek_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&dek_id)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("DEK {dek_id:?} not found")))?;
    let dek = state.store.dek(&tenant_id, id).await?;
    Ok(Json(json!({
        "dek_id": dek.id,
        "provider": dek.provider,
        "key_ref": dek.key_ref,
        "kek_version": dek.kek_version,
        "wrapped": base64::engine::general_purpose::STANDARD.encode(&dek.wrapped),
        "kcv": dek.kcv,
        // The KEK is gone for good: no one can unwrap this DEK any more.
        "unrecoverable": dek.kek_state == KeyState::Destroyed,
    })))
}

#[derive(Deserialize)]
pub(super) struct JobsQuery {
    tenant: Option<String>,
}

/// Re-wrap jobs of a tenant with their progress.
pub(super) async fn rewrap_jobs(
    State(state): State<AppState>,
    Query(q): Query<JobsQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = super::tenant_param(&state, q.tenant).await?;
    let jobs = state.store.rewrap_jobs(&tenant).await?;
    Ok(Json(serde_json::to_value(jobs).unwrap_or_default()))
}

/// Runs a failed re-wrap job again (its DEKs that failed are tried anew): 202 with the
/// job's tenant; 404 unless the job exists and failed.
pub(super) async fn retry_rewrap_job(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("failed re-wrap job {job_id:?} not found"),
        )
    };
    let id: i64 = job_id.parse().map_err(|_| not_found())?;
    let tenant = state.keys.retry_rewrap_job(id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "tenant": tenant, "state": "pending" })),
    ))
}
