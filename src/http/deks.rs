//! DEK routes and re-wrap job progress.

use super::{ApiError, AppState};
use crate::domain::{Access, KeyState};
use crate::kms::{Dek, DekContext, KmsProvider};
use crate::store::NewDek;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// Generates a DEK, wraps it under the tenant's KEK at the KMS's current version, and stores
/// only the wrapped form. Refused (409) unless the tenant is `accessible`.
pub(super) async fn create_dek(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let target = state.store.dek_target(&tenant_id).await?;
    let (access, _) = super::current_access(&state, &tenant_id).await?;
    if access.access != Access::Accessible {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "tenant {tenant_id:?} is {}: {}; no new DEKs",
                access.access,
                access.reason.as_deref().unwrap_or("no reason recorded")
            ),
        ));
    }
    let Some(kek) = target.kek else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("tenant {tenant_id:?} has no key registered"),
        ));
    };
    let dek = Dek::generate();
    let id = Uuid::now_v7();
    let ctx = DekContext {
        tenant_id: &tenant_id,
        dek_id: id,
    };
    let wrapped = state
        .kms
        .provider(kek.provider)?
        .wrap_many(&kek.key_ref, None, &[(&dek, ctx)])
        .await?
        .pop()
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?;
    let kcv = dek.kcv();
    drop(dek);
    state
        .store
        .insert_dek(&NewDek {
            id,
            tenant_id: tenant_id.clone(),
            kek_id: kek.id,
            kek_version: wrapped.version.clone(),
            wrapped: wrapped.ciphertext,
            kcv: kcv.clone(),
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "dek_id": id, "kek_version": wrapped.version, "kcv": kcv })),
    ))
}

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
