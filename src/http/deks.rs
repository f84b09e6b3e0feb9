//! DEK routes and re-wrap job progress.

use super::openapi::{CommonErrors, ErrorBody};
use super::{ApiError, AppState, Path, Query};
use crate::domain::{KeyState, Provider};
use crate::store::RewrapJobView;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A wrapped DEK.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct WrappedDek {
    dek_id: Uuid,
    /// Its KEK's provider.
    provider: Provider,
    /// Its KEK.
    key_ref: String,
    /// The KEK version it is wrapped under.
    kek_version: String,
    /// Base64 of the wrapped DEK.
    wrapped: String,
    /// Key check value.
    kcv: String,
    /// The KEK is destroyed: no one can unwrap this DEK any more.
    unrecoverable: bool,
}

/// The wrapped form of a DEK, never the plaintext.
#[utoipa::path(get, path = "/tenants/{id}/deks/{dek_id}", tag = "deks", operation_id = "get_dek",
    params(("id" = String, Path, description = "tenant id"),
           ("dek_id" = String, Path, description = "DEK id (a UUID)")),
    responses(
        (status = 200, description = "the wrapped DEK", body = WrappedDek),
        (status = 404, description = "no such DEK for this tenant", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn get_dek(
    State(state): State<AppState>,
    Path((tenant_id, dek_id)): Path<(String, String)>,
) -> Result<Json<WrappedDek>, ApiError> {
    let id = Uuid::parse_str(&dek_id)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("DEK {dek_id:?} not found")))?;
    let dek = state.store.dek(&tenant_id, id).await?;
    Ok(Json(WrappedDek {
        dek_id: dek.id,
        provider: dek.provider,
        key_ref: dek.key_ref,
        kek_version: dek.kek_version,
        wrapped: base64::engine::general_purpose::STANDARD.encode(&dek.wrapped),
        kcv: dek.kcv,
        unrecoverable: dek.kek_state == KeyState::Destroyed,
    }))
}

#[derive(Deserialize)]
pub(super) struct JobsQuery {
    tenant: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

/// Active re-wrap jobs of every tenant, a page.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct JobPage {
    /// Pending, running or waiting jobs in id order.
    jobs: Vec<RewrapJobView>,
    /// Pass as `after` for the next page; `null` on the last page.
    next: Option<i64>,
}

/// The two answers of `GET /v1/rewrap-jobs`.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(super) enum Jobs {
    /// With `tenant`: every job of the tenant, newest first.
    Tenant(Vec<RewrapJobView>),
    /// Without: a page of the active jobs of every tenant.
    Fleet(JobPage),
}

/// With `?tenant=ID`, every re-wrap job of the tenant with its progress, newest first.
/// Without, the active (pending, running, waiting) jobs of every tenant in keyset pages:
/// `after` is the last job id seen, `limit` 1 to 1000 (default 100).
#[utoipa::path(get, path = "/rewrap-jobs", tag = "deks", operation_id = "rewrap_jobs",
    params(
        ("tenant" = Option<String>, Query, description = "one tenant's jobs, all of them"),
        ("after" = Option<i64>, Query, description = "without tenant: the last job id seen"),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 1000,
         description = "without tenant: page size (default 100)"),
    ),
    responses(
        (status = 200, description = "jobs", body = Jobs),
        (status = 404, description = "no such tenant", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn rewrap_jobs(
    State(state): State<AppState>,
    Query(q): Query<JobsQuery>,
) -> Result<Json<Jobs>, ApiError> {
    if q.tenant.is_some() {
        let tenant = super::tenant_param(&state, q.tenant).await?;
        return Ok(Json(Jobs::Tenant(state.store.rewrap_jobs(&tenant).await?)));
    }
    let after = q
        .after
        .as_deref()
        .map(|a| {
            a.parse::<i64>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("after must be a job id (an integer), not {a:?}"),
                )
            })
        })
        .transpose()?;
    let limit = super::fleet::limit_param(q.limit.as_deref())?;
    let jobs = state.store.active_rewrap_jobs(after, limit).await?;
    let next = (jobs.len() as i64 == limit)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    Ok(Json(Jobs::Fleet(JobPage { jobs, next })))
}

/// A job put back to work.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct JobRetried {
    id: i64,
    /// Its tenant.
    tenant: String,
    /// Always `pending`.
    state: String,
}

/// Runs a failed re-wrap job again (its DEKs that failed are tried anew): 202 with the
/// job's tenant; 404 unless the job exists and failed.
#[utoipa::path(post, path = "/rewrap-jobs/{id}/retry", tag = "deks",
    operation_id = "retry_rewrap_job",
    params(("id" = String, Path, description = "job id")),
    responses(
        (status = 202, description = "the job runs again", body = JobRetried),
        (status = 404, description = "no failed job with this id", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn retry_rewrap_job(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
) -> Result<(StatusCode, Json<JobRetried>), ApiError> {
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
        Json(JobRetried {
            id,
            tenant,
            state: "pending".to_owned(),
        }),
    ))
}
