//! Key-access routes: DEK creation and unwrap for clients of the platform (client tokens),
//! and client management for the admin. Every response here carries
//! `Cache-Control: no-store`; plaintext goes only into the body of a successful answer.

use super::openapi::{CommonErrors, ErrorBody};
use super::{ApiError, AppState, Path};
use crate::access::{BatchItem, Caller, ClientError, Refusal, Unwrapped};
use crate::store::access::{AlertRow, ClientRow};
use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An unwrapped DEK (key access only; never stored by a cache: `Cache-Control: no-store`).
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct PlainDek {
    dek_id: Uuid,
    /// The KEK version it is wrapped under.
    kek_version: String,
    /// Key check value.
    kcv: String,
    /// Base64 of the 32-byte DEK.
    plaintext: String,
}

/// A created DEK.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CreatedDek {
    dek_id: Uuid,
    /// The KEK version it is wrapped under.
    kek_version: String,
    /// Key check value.
    kcv: String,
    /// Base64 of the DEK: for a client only, once (like GenerateDataKey).
    #[serde(skip_serializing_if = "Option::is_none")]
    plaintext: Option<String>,
}

/// One DEK of a batch unwrap: unwrapped, or why not.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub(super) enum BatchDek {
    /// Unwrapped.
    Ok(PlainDek),
    /// Refused or failed.
    Err {
        /// The id as asked.
        dek_id: String,
        /// Why.
        error: String,
    },
}

/// A batch unwrap's answer, in the order asked (ids that are not UUIDs last).
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct BatchAnswer {
    deks: Vec<BatchDek>,
}

/// A client with its token, shown this once.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ClientCreated {
    #[serde(flatten)]
    client: ClientRow,
    /// The bearer token; only its hash is stored.
    token: String,
}

/// Every client.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ClientList {
    clients: Vec<ClientRow>,
}

/// Anomaly alerts.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AlertList {
    /// Newest first.
    alerts: Vec<AlertRow>,
}

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

fn unwrapped(u: &Unwrapped) -> PlainDek {
    PlainDek {
        dek_id: u.dek_id,
        kek_version: u.kek_version.clone(),
        kcv: u.kcv.clone(),
        plaintext: b64(u.plaintext.expose()),
    }
}

fn dek_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, format!("DEK {raw:?} not found")))
}

/// `POST /v1/tenants/{id}/deks`: a client gets the plaintext once (like GenerateDataKey);
/// the admin gets the wrapped DEK's id only, as before.
#[utoipa::path(post, path = "/tenants/{id}/deks", tag = "key-access", operation_id = "create_dek",
    params(("id" = String, Path, description = "tenant id")),
    responses(
        (status = 201, description = "created (with the plaintext for a client)", body = CreatedDek),
        (status = 404, description = "no such tenant", body = ErrorBody),
        (status = 409, description = "the tenant is not accessible, or has no KEK", body = ErrorBody),
        (status = 422, description = "the tenant's KMS is not configured", body = ErrorBody),
        CommonErrors,
    ),
    security(("client_token" = []), ("admin_token" = [])))]
pub(super) async fn create_dek(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(tenant_id): Path<String>,
) -> Result<(StatusCode, Json<CreatedDek>), ApiError> {
    let dek = state.gate.create_dek(&caller, &tenant_id).await?;
    let plaintext = match caller {
        Caller::Client(_) => Some(b64(dek.plaintext.expose())),
        _ => None,
    };
    Ok((
        StatusCode::CREATED,
        Json(CreatedDek {
            dek_id: dek.id,
            kek_version: dek.kek_version,
            kcv: dek.kcv,
            plaintext,
        }),
    ))
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
#[utoipa::path(post, path = "/tenants/{id}/deks/{dek_id}/unwrap", tag = "key-access",
    operation_id = "unwrap_dek",
    params(("id" = String, Path, description = "tenant id"),
           ("dek_id" = String, Path, description = "DEK id (a UUID)")),
    responses(
        (status = 200, description = "the DEK", body = PlainDek),
        (status = 404, description = "no such DEK for this tenant", body = ErrorBody),
        (status = 409, description = "the KMS refused the unwrap", body = ErrorBody),
        (status = 422, description = "the tenant's KMS is not configured", body = ErrorBody),
        CommonErrors,
    ),
    security(("client_token" = [])))]
pub(super) async fn unwrap_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((tenant_id, dek)): Path<(String, String)>,
) -> Result<Json<PlainDek>, ApiError> {
    timed("single", async {
        let id = dek_id(&dek)?;
        let u = state.gate.unwrap(&caller, &tenant_id, id).await?;
        Ok(Json(unwrapped(&u)))
    })
    .await
}

/// DEKs to unwrap.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchRequest {
    /// 1 to 1000 DEK ids.
    #[schema(min_items = 1, max_items = 1000)]
    dek_ids: Vec<String>,
}

/// `POST /v1/tenants/{id}/deks/unwrap` with `{"dek_ids": [...]}` (up to 1000).
#[utoipa::path(post, path = "/tenants/{id}/deks/unwrap", tag = "key-access",
    operation_id = "unwrap_deks",
    params(("id" = String, Path, description = "tenant id")),
    request_body = BatchRequest,
    responses(
        (status = 200, description = "each DEK, or why not", body = BatchAnswer),
        (status = 404, description = "no such tenant", body = ErrorBody),
        (status = 409, description = "the KMS refused the unwrap", body = ErrorBody),
        (status = 422, description = "dek_ids is empty or too long", body = ErrorBody),
        CommonErrors,
    ),
    security(("client_token" = [])))]
pub(super) async fn unwrap_batch(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<Json<BatchAnswer>, ApiError> {
    timed("batch", unwrap_batch_answer(state, caller, tenant_id, body)).await
}

async fn unwrap_batch_answer(
    state: AppState,
    caller: Caller,
    tenant_id: String,
    body: Bytes,
) -> Result<Json<BatchAnswer>, ApiError> {
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
    let mut deks: Vec<BatchDek> = items
        .iter()
        .map(|item| match item {
            BatchItem::Ok(u) => BatchDek::Ok(unwrapped(u)),
            BatchItem::Err(id, _, why) => BatchDek::Err {
                dek_id: id.to_string(),
                error: why.to_string(),
            },
        })
        .collect();
    deks.extend(bad.into_iter().map(|raw| BatchDek::Err {
        dek_id: raw,
        error: "not a DEK id".to_owned(),
    }));
    Ok(Json(BatchAnswer { deks }))
}

/// A client to create.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ClientRequest {
    /// Unique name: 1 to 64 letters, digits, `.`, `_` or `-`.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    name: String,
    /// The tenants in scope (or `all_tenants`).
    #[serde(default)]
    tenants: Vec<String>,
    /// Every tenant is in scope.
    #[serde(default)]
    all_tenants: bool,
}

/// `POST /v1/clients` `{name, tenants:[..] | all_tenants:true}` -> 201 with the token, shown
/// once.
#[utoipa::path(post, path = "/clients", tag = "clients", operation_id = "create_client",
    request_body = ClientRequest,
    responses(
        (status = 201, description = "created; the token is shown once", body = ClientCreated),
        (status = 404, description = "a tenant in its scope does not exist", body = ErrorBody),
        (status = 409, description = "a client with this name exists", body = ErrorBody),
        (status = 422, description = "a field is invalid", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn create_client(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<ClientCreated>), ApiError> {
    let req: ClientRequest = super::admin::parse_body(&body)?;
    let (client, token) = create(&state, req.name, req.tenants, req.all_tenants).await?;
    Ok((StatusCode::CREATED, Json(ClientCreated { client, token })))
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
#[utoipa::path(get, path = "/clients", tag = "clients", operation_id = "list_clients",
    responses((status = 200, description = "every client", body = ClientList), CommonErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_clients(
    State(state): State<AppState>,
) -> Result<Json<ClientList>, ApiError> {
    Ok(Json(ClientList {
        clients: state.store.clients().await?,
    }))
}

/// `DELETE /v1/clients/{name}`: revokes it on every replica (within the notification's
/// latency; `access.client_cache_ms` at worst).
#[utoipa::path(delete, path = "/clients/{name}", tag = "clients", operation_id = "revoke_client",
    params(("name" = String, Path, description = "client name")),
    responses(
        (status = 200, description = "revoked", body = ClientRow),
        (status = 404, description = "no such client", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn revoke_client(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ClientRow>, ApiError> {
    Ok(Json(
        crate::access::revoke_client(&state.store, &name).await?,
    ))
}

/// `GET /v1/alerts`: anomaly alerts, newest first.
#[utoipa::path(get, path = "/alerts", tag = "audit", operation_id = "alerts",
    responses((status = 200, description = "the last 200 alerts", body = AlertList), CommonErrors),
    security(("admin_token" = [])))]
pub(super) async fn alerts(State(state): State<AppState>) -> Result<Json<AlertList>, ApiError> {
    Ok(Json(AlertList {
        alerts: state.store.alerts(200).await?,
    }))
}
