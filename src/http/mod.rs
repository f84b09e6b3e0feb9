//! The HTTP surface: health, metrics, the admin API and key access (axum).
//!
//! `/healthz`, `/readyz`, `/metrics` and `/openapi.json` are open; every admin `/v1` route
//! requires `Authorization: Bearer $BYOKD_ADMIN_TOKEN`, and with no token configured `/v1`
//! refuses everyone. Errors are `{"error": "<one sentence>"}` with a meaningful status, the
//! extractors' rejections included (this module's `Query` and `Path`).
//!
//! Every route is added in `routes` through `utoipa_axum`, together with its OpenAPI
//! description (the handler's `#[utoipa::path]`); a route added any other way would be
//! missing from `/openapi.json` (see [`openapi`]).
//!
//! `/readyz` reports what it is told: the consumers' [`ConsumerHealth`] and the daemon's dead
//! tasks in the [`TaskRegistry`] that the daemon's supervisor fills.

mod access;
mod admin;
mod deks;
mod fleet;
mod notifications;
pub mod openapi;

use crate::broker::Publisher;
use crate::config::AmqpSettings;
use crate::events::amqp::{ConsumerHealth, ConsumerState};
use crate::kms::{Kms, KmsError};
use crate::seal::Sealer;
use crate::store::{Store, StoreError};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The names of the daemon's tasks that died, for `/readyz`. Only ever grows: a daemon with a
/// dead task is on its way out and never ready again.
#[derive(Debug, Default)]
pub struct TaskRegistry {
    failed: Mutex<Vec<String>>,
}

impl TaskRegistry {
    /// Records that the task `name` died.
    pub fn record_failure(&self, name: &str) {
        self.lock().push(name.to_owned());
    }

    /// The tasks that died, in the order they did.
    pub fn failed(&self) -> Vec<String> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        // A push or a clone cannot leave the list half-written, so a poisoned lock is usable.
        self.failed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What handlers share: one allocation, so the per-request clones axum makes of the state
/// (the router's, each middleware's) copy a pointer, not the settings and tokens.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

impl From<Services> for AppState {
    fn from(services: Services) -> AppState {
        AppState(Arc::new(services))
    }
}

/// The services and settings behind an [`AppState`].
pub struct Services {
    /// The database.
    pub store: Store,
    /// The admin token, if the admin API is enabled.
    pub admin_token: Option<SecretString>,
    /// The event intake token (`/v1/events` only), if configured.
    pub events_token: Option<SecretString>,
    /// The consumer's state, for `/readyz`.
    pub consumer: Arc<ConsumerHealth>,
    /// The urgent lane consumer's state.
    pub urgent_consumer: Arc<ConsumerHealth>,
    /// Seals webhook secrets.
    pub sealer: Arc<Sealer>,
    /// Publishes events accepted over HTTP; `None` on a node without a broker, which
    /// applies them itself.
    pub publisher: Option<Arc<Publisher>>,
    /// AMQP names and limits.
    pub amqp: AmqpSettings,
    /// The KMS providers.
    pub kms: Kms,
    /// The use cases on keys (registration, DEKs, current access).
    pub keys: crate::keys::Keys,
    /// Key access: client tokens, unwrap, its caches and audit.
    pub gate: crate::access::Gate,
    /// Wakes re-wrap workers when a replacement job is created.
    pub rewrap_work: Arc<Notify>,
    /// Wakes the access relay when the API recorded an access change.
    pub access_changed: Arc<Notify>,
    /// Wakes the confirmation loop (events applied directly).
    pub confirm_work: Arc<Notify>,
    /// Event skew and confirmation settings.
    pub state: crate::config::StateSettings,
    /// The daemon's dead tasks, for `/readyz`.
    pub tasks: Arc<TaskRegistry>,
}

/// An API error: a status and one sentence.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            StoreError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            StoreError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unavailable; retry later",
            ),
            StoreError::Raced(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "a concurrent change raced this request; retry",
            ),
            // A data exception (class 22): a value from the request the database cannot
            // hold, such as a NUL character in a text parameter. The request is at fault.
            StoreError::Other(sqlx::Error::Database(ref db))
                if db.code().is_some_and(|c| c.starts_with("22")) =>
            {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "the request holds a value that cannot be stored or looked up \
                     (such as a NUL character)",
                )
            }
            // An integrity violation the store did not turn into a conflict itself: the
            // request raced a change such as a tenant's deletion. (SQLite's codes are not
            // SQLSTATEs: its constraint errors are known by their kind.)
            StoreError::Other(sqlx::Error::Database(ref db))
                if db.code().is_some_and(|c| c.starts_with("23"))
                    || (db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                        && !matches!(db.kind(), sqlx::error::ErrorKind::Other)) =>
            {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "the request conflicts with a concurrent change; look again and retry",
                )
            }
            other => {
                tracing::error!(error = %other, "store error in API call");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            }
        }
    }
}

impl From<crate::keys::KeyError> for ApiError {
    fn from(e: crate::keys::KeyError) -> ApiError {
        use crate::keys::KeyError;
        match e {
            KeyError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m),
            KeyError::Refused(m) => ApiError::new(StatusCode::CONFLICT, m),
            KeyError::Store(e) => e.into(),
            KeyError::Kms(e) => e.into(),
        }
    }
}

impl From<KmsError> for ApiError {
    fn from(e: KmsError) -> ApiError {
        if e.is_transient() {
            tracing::warn!(error = %e, "KMS unavailable in API call");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the KMS is unavailable; retry later ({e})"),
            );
        }
        match e {
            KmsError::NotConfigured(_) | KmsError::InvalidKeyRef { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            KmsError::Store(s) => s.into(),
            other => ApiError::new(
                StatusCode::CONFLICT,
                format!("the KMS refused the operation: {other}"),
            ),
        }
    }
}

/// The `tenant` query parameter of a listing route, checked to name an existing tenant
/// (400 when missing, 404 when unknown).
pub(crate) async fn tenant_param(
    state: &AppState,
    tenant: Option<String>,
) -> Result<String, ApiError> {
    let tenant = tenant.filter(|t| !t.is_empty()).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "the tenant query parameter is required",
        )
    })?;
    state.store.tenant(&tenant).await?;
    Ok(tenant)
}

/// `axum::extract::Query` whose rejection is an [`ApiError`] (JSON, 400) like every other
/// error, instead of axum's plain-text answer.
pub(crate) struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid query string: {}", e.body_text()),
                )
            })
    }
}

/// `axum::extract::Path` whose rejection (a segment that is not UTF-8, or not of the
/// expected type) is an [`ApiError`] (JSON, 400).
pub(crate) struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid path: {}", e.body_text()),
                )
            })
    }
}

/// Every route with its OpenAPI description. With `state`, the admin routes require the
/// admin token and the key-access routes authenticate their caller; without, the routes are
/// only there for their description ([`openapi::spec`]).
pub(crate) fn routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    let mut admin = OpenApiRouter::new()
        .routes(routes!(admin::create_tenant, fleet::list_tenants))
        .routes(routes!(admin::get_tenant, fleet::delete_tenant))
        .routes(routes!(admin::register_kek))
        .routes(routes!(admin::rotate_webhook_secret))
        .routes(routes!(deks::get_dek))
        .routes(routes!(deks::rewrap_jobs))
        .routes(routes!(deks::retry_rewrap_job))
        .routes(routes!(admin::audit))
        .routes(routes!(admin::audit_checkpoints))
        .routes(routes!(notifications::list))
        .routes(routes!(notifications::retry))
        .routes(routes!(access::list_clients, access::create_client))
        .routes(routes!(access::revoke_client))
        .routes(routes!(access::alerts));
    // Reached with a client token (or the admin token, which may create but never unwrap).
    let mut keys = OpenApiRouter::new()
        .routes(routes!(access::create_dek))
        .routes(routes!(access::unwrap_batch))
        .routes(routes!(access::unwrap_one));
    // Event intake: the admin token, or the events token (bearer or `?token=`).
    let mut events =
        OpenApiRouter::new().routes(routes!(admin::post_event, admin::events_handshake));
    if let Some(state) = state {
        admin = admin.route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
        events = events.route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_events,
        ));
        keys = keys
            .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
            .layer(axum::middleware::map_response(no_store));
    }
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .nest("/v1", admin.merge(keys).merge(events))
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let (router, _) = routes(Some(&state)).split_for_parts();
    router
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

/// `{"status": "ok"}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "alive", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

/// This API's OpenAPI 3.1 description (also committed as `openapi.json`).
#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "the OpenAPI description",
               content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    static SPEC: std::sync::LazyLock<String> = std::sync::LazyLock::new(openapi::spec_json);
    ([(header::CONTENT_TYPE, "application/json")], SPEC.as_str()).into_response()
}

/// Answers of the key-access routes may carry DEK plaintext: never stored by a cache.
async fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// Compares digests, so the comparison takes the same time wherever the tokens differ.
fn token_matches(given: &str, expected: &SecretString) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.expose_secret().as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Admin routes: the admin token only. A client token is refused with 403 (it is valid,
/// just not here); anything else with 401, audited.
async fn require_admin(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.admin_token else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the admin API is disabled because BYOKD_ADMIN_TOKEN is not set",
        )
        .into_response();
    };
    let route = request.uri().path().to_owned();
    match bearer(&request) {
        Some(token) if token_matches(token, expected) => next.run(request).await,
        Some(token) if token.starts_with(crate::access::TOKEN_PREFIX) => {
            match state.gate.authenticate(token, &route).await {
                Ok(_) => ApiError::new(
                    StatusCode::FORBIDDEN,
                    "a client token can only create and unwrap DEKs",
                )
                .into_response(),
                Err(refusal) => ApiError::from(refusal).into_response(),
            }
        }
        Some(token) => {
            state.gate.admin_refused(Some(token), &route).await;
            ApiError::new(StatusCode::UNAUTHORIZED, "invalid bearer token").into_response()
        }
        None => {
            state.gate.admin_refused(None, &route).await;
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing Authorization: Bearer token",
            )
            .into_response()
        }
    }
}

/// The `token` query parameter, percent-decoded.
fn query_token(request: &Request) -> Option<String> {
    url::form_urlencoded::parse(request.uri().query()?.as_bytes())
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value.into_owned())
}

/// Event intake: the events token (as a bearer token or the `token` query parameter, which
/// is what an Event Grid subscription's endpoint URL can carry) or else the admin token,
/// checked as on the admin routes. The query parameter is taken for the events token only:
/// the admin token never travels in a URL.
async fn require_events(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.events_token {
        let query = query_token(&request);
        let given = bearer(&request).or(query.as_deref());
        if given.is_some_and(|token| token_matches(token, expected)) {
            return next.run(request).await;
        }
        if query.is_some() {
            let route = request.uri().path().to_owned();
            state.gate.admin_refused(query.as_deref(), &route).await;
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid events token").into_response();
        }
    }
    require_admin(State(state), request, next).await
}

/// Key-access routes: who is calling ([`Caller`](crate::access::Caller)) goes into the
/// request for the handler; an unknown or revoked token is refused with 401, audited.
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let route = request.uri().path();
    let caller = match bearer(&request) {
        Some(token)
            if state
                .admin_token
                .as_ref()
                .is_some_and(|expected| token_matches(token, expected)) =>
        {
            crate::access::Caller::Admin
        }
        Some(token) => match state.gate.authenticate(token, route).await {
            Ok(caller) => caller,
            Err(refusal) => return ApiError::from(refusal).into_response(),
        },
        None => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing Authorization: Bearer token",
            )
            .into_response();
        }
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Readiness: the database, the consumers and the daemon's tasks.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ok` or `unavailable`.
    pub status: String,
    /// Whether this replica should get traffic.
    pub ready: bool,
    /// `ok` or `unavailable`.
    pub database: String,
    /// The lifecycle consumer's state (`consuming`, `reconnecting`, ...; `disabled` on a
    /// node without a broker).
    pub consumer: String,
    /// The urgent lane consumer's state (`disabled` when switched off).
    pub urgent_consumer: String,
    /// The daemon's tasks that died.
    pub failed_tasks: Vec<String>,
    /// `ok`, or why key access refuses every attempt (the audit spool holds too much not
    /// yet shipped to the audit trail).
    pub audit: String,
}

/// Ready when the database answers, the consumers consume (or there is no broker to consume
/// from), no task died and key access's audit spool is not over its cap.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready", body = Readiness),
              (status = 503, description = "not ready", body = Readiness)))]
async fn readyz(State(state): State<AppState>) -> Response {
    let db = tokio::time::timeout(Duration::from_secs(2), state.store.ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let consumer = state.consumer.get();
    let urgent = state.urgent_consumer.get();
    let failed = state.tasks.failed();
    let audit = state.gate.audit_refusing();
    let ready = db
        && audit.is_none()
        && matches!(consumer, ConsumerState::Consuming | ConsumerState::Disabled)
        && matches!(urgent, ConsumerState::Consuming | ConsumerState::Disabled)
        && failed.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { "ok" } else { "unavailable" }.to_owned(),
        ready,
        database: if db { "ok" } else { "unavailable" }.to_owned(),
        consumer: consumer.as_str().to_owned(),
        urgent_consumer: urgent.as_str().to_owned(),
        failed_tasks: failed,
        audit: audit.unwrap_or_else(|| "ok".to_owned()),
    };
    (status, Json(body)).into_response()
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition",
               content_type = "text/plain", body = String)))]
async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics().render(),
    )
        .into_response()
}
