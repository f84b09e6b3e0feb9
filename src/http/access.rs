//! Key-access routes: DEK creation and unwrap for clients of the platform (client tokens),
//! and client management for the admin. Every response here carries
//! `Cache-Control: no-store`; plaintext goes only into the body of a successful answer.

use super::{ApiError, AppState};
use crate::access::{BatchItem, Caller, ClientError, Refusal, Unwrapped};
use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// Most DEKs one batch unwrap may ask for.
pub const MAX_BATCH: usize = 1000;

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::Unauthenticated(m) => ApiError::new(StatusCode::UNAUTHORIZED, m),
            Refusal::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, m),
            Refusal::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            Refusal::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
            Refusal::Key(e) => e.into(),
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unwrapped_json(u: &Unwrapped) -> Value {
    json!({ "dek_id": u.dek_id, "kek_version": u.kek_version, "kcv": u.kcv,
            "plaintext": b64(u.plaintext.expose()) })
}

fn dek_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("DEK {raw:?} not found")))
}

/// `POST /v1/tenants/{id}/deks`: a client gets the plaintext once (like GenerateDataKey);
/// the admin gets the wrapped DEK's id only, as before.
pub(super) async fn create_dek(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(tenant_id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let dek = state.gate.create_dek(&caller, &tenant_id).await?;
    let mut body = json!({ "dek_id": dek.id, "kek_version": dek.kek_version, "kcv": dek.kcv });
    if let Caller::Client(_) = caller {
        body["plaintext"] = b64(dek.plaintext.expose()).into();
    }
    Ok((StatusCode::CREATED, Json(body)))
}

/// Times an unwrap route's answer into `byokd_unwrap_duration_seconds`.
async fn timed<T>(
    route: &'static str,
    answer: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let started = std::time::Instant::now();
    let result = answer.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::histogram!(crate::telemetry::UNWRAP_DURATION, "route" => route, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    result
}

/// `POST /v1/tenants/{id}/deks/{dek_id}/unwrap`.
pub(super) async fn unwrap_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((tenant_id, dek)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    timed("single", async {
        let id = dek_id(&dek)?;
        let u = state.gate.unwrap(&caller, &tenant_id, id).await?;
        Ok(Json(unwrapped_json(&u)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchRequest {
    dek_ids: Vec<String>,
}

/// `POST /v1/tenants/{id}/deks/unwrap` with `{"dek_ids": [...]}` (up to 1000).
pub(super) async fn unwrap_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    timed("batch", unwrap_batch_answer(state, caller, tenant_id, body)).await
}

async fn unwrap_batch_answer(
    state: AppState,
    caller: Caller,
    tenant_id: String,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: BatchRequest = super::admin::parse_body(&body)?;
    if req.dek_ids.is_empty() || req.dek_ids.len() > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("dek_ids must hold 1 to {MAX_BATCH} ids"),
        ));
    }
    let mut ids = Vec::with_capacity(req.dek_ids.len());
    let mut bad = Vec::new();
    for raw in &req.dek_ids {
        match Uuid::parse_str(raw) {
            Ok(id) => ids.push(id),
            Err(_) => bad.push(raw.clone()),
        }
    }
    let items = if ids.is_empty() {
        Vec::new()
    } else {
        state.gate.unwrap_many(&caller, &tenant_id, &ids).await?
    };
    let mut deks: Vec<Value> = items
        .iter()
        .map(|item| match item {
            BatchItem::Ok(u) => unwrapped_json(u),
            BatchItem::Err(id, _, why) => json!({ "dek_id": id, "error": why }),
        })
        .collect();
    deks.extend(
        bad.into_iter()
            .map(|raw| json!({ "dek_id": raw, "error": "not a DEK id" })),
    );
    Ok(Json(json!({ "deks": deks })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClientRequest {
    name: String,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    all_tenants: bool,
}

/// `POST /v1/clients` `{name, tenants:[..] | all_tenants:true}` -> 201 with the token, shown
/// once.
pub(super) async fn create_client(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: ClientRequest = super::admin::parse_body(&body)?;
    let (row, token) = create(&state, req.name, req.tenants, req.all_tenants).await?;
    let mut view = serde_json::to_value(row).unwrap_or_default();
    view["token"] = token.into();
    Ok((StatusCode::CREATED, Json(view)))
}

/// Creates a client after checking its name and scope; the token is returned once.
pub(crate) async fn create(
    state: &AppState,
    name: String,
    tenants: Vec<String>,
    all_tenants: bool,
) -> Result<(crate::store::access::ClientRow, String), ApiError> {
    crate::access::create_client(&state.store, &name, tenants, all_tenants)
        .await
        .map_err(|e| match e {
            ClientError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m),
            ClientError::Store(e) => e.into(),
        })
}

/// `GET /v1/clients`.
pub(super) async fn list_clients(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "clients": state.store.clients().await? })))
}

/// `DELETE /v1/clients/{name}`: revokes it on every replica (within the notification's
/// latency; `access.client_cache_ms` at worst).
pub(super) async fn revoke_client(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let row = crate::access::revoke_client(&state.store, &name).await?;
    Ok(Json(serde_json::to_value(row).unwrap_or_default()))
}

/// `GET /v1/alerts`: anomaly alerts, newest first.
pub(super) async fn alerts(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "alerts": state.store.alerts(200).await? })))
}
