//! `/v1` handlers: tenants, KEK registration, event intake.

use super::openapi::{CommonErrors, ErrorBody};
use super::{ApiError, AppState, Path, Query};
use crate::broker::Outgoing;
use crate::domain::{AwsRole, Provider};
use crate::events::amqp::message_routing_key;
use crate::events::normalize::{NormalizeError, binary, check_times, normalize};
use crate::keys::NewKek;
use crate::seal::generate_webhook_secret;
use crate::store::{
    AuditCheckpoint, AuditEntry, AuditFilter, AuditRow, NewTenant, NewWebhook, TenantView,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

/// Parses a JSON body: 400 when it is not JSON, 422 when it is JSON of the wrong shape.
pub(super) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let status = match e.classify() {
            serde_json::error::Category::Data => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, format!("invalid request body: {e}"))
    })
}

fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
}

/// A tenant to create.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TenantRequest {
    /// 1-128 letters, digits, `-`, `_` or `.`; chosen by the caller.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,128}$")]
    id: String,
    /// Display name, not empty.
    #[schema(min_length = 1)]
    name: String,
    /// Email addresses to notify.
    #[serde(default)]
    #[schema(value_type = Vec<String>, format = Email)]
    contacts: Vec<String>,
    /// Webhook endpoints to notify.
    #[serde(default)]
    webhooks: Vec<WebhookRequest>,
}

/// A webhook endpoint to create.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct WebhookRequest {
    /// An http(s) URL.
    url: String,
    /// `whsec_` + base64 of 24 to 64 bytes; generated (and returned once) when absent.
    #[schema(value_type = Option<String>)]
    secret: Option<SecretString>,
}

/// A created tenant.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TenantCreated {
    id: String,
    name: String,
    /// Always `accessible` at first.
    access: crate::domain::Access,
    contacts: Vec<String>,
    webhooks: Vec<WebhookCreated>,
}

/// A created webhook endpoint.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct WebhookCreated {
    id: Uuid,
    url: String,
    /// The generated signing secret, shown this once; absent when the caller gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

fn valid_tenant_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_email(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !email
                    .chars()
                    .any(|c| c.is_whitespace() || c == '<' || c == '>')
                && email.len() <= 254
        }
        None => false,
    }
}

/// Standard Webhooks secrets are `whsec_` + base64 of 24 to 64 bytes.
fn valid_webhook_secret(secret: &str) -> bool {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .is_some_and(|raw| (24..=64).contains(&raw.len()))
}

/// Creates a tenant with its contacts and webhook endpoints.
#[utoipa::path(post, path = "/tenants", tag = "tenants", operation_id = "create_tenant",
    request_body = TenantRequest,
    responses(
        (status = 201, description = "created; generated webhook secrets are shown once",
         body = TenantCreated),
        (status = 409, description = "a tenant with this id exists", body = ErrorBody),
        (status = 422, description = "a field is invalid", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn create_tenant(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<TenantCreated>), ApiError> {
    let req: TenantRequest = parse_body(&body)?;
    if !valid_tenant_id(&req.id) {
        return Err(unprocessable(
            "id must be 1-128 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    if req.name.trim().is_empty() {
        return Err(unprocessable("name must not be empty"));
    }
    if let Some(bad) = req.contacts.iter().find(|c| !valid_email(c)) {
        return Err(unprocessable(format!(
            "contact {bad:?} is not an email address"
        )));
    }
    let mut webhooks = Vec::new();
    let mut shown = Vec::new();
    for w in req.webhooks {
        let url = url::Url::parse(&w.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                unprocessable(format!("webhook url {:?} is not an http(s) URL", w.url))
            })?;
        let (secret, generated) = match w.secret {
            Some(s) if valid_webhook_secret(s.expose_secret()) => (s, false),
            Some(_) => {
                return Err(unprocessable(
                    "webhook secret must be whsec_ followed by base64 of 24 to 64 bytes",
                ));
            }
            None => (generate_webhook_secret(), true),
        };
        let id = Uuid::now_v7();
        shown.push(WebhookCreated {
            id,
            url: url.to_string(),
            // Shown once, here; only the sealed form is stored.
            secret: generated.then(|| secret.expose_secret().to_owned()),
        });
        webhooks.push(NewWebhook {
            id,
            url: url.to_string(),
            secret_sealed: state.sealer.seal(&secret),
        });
    }
    let tenant = NewTenant {
        id: req.id,
        name: req.name,
        contacts: req.contacts,
        webhooks,
    };
    state.store.create_tenant(&tenant).await?;
    let endpoints: Vec<Value> = shown
        .iter()
        .map(|w| json!({ "id": w.id, "url": w.url }))
        .collect();
    state
        .store
        .append_audit(&[AuditRow::operation(
            Some(&tenant.id),
            "tenant_created",
            "api",
            json!({ "name": tenant.name, "contacts": tenant.contacts, "webhooks": endpoints }),
        )])
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(TenantCreated {
            id: tenant.id,
            name: tenant.name,
            access: crate::domain::Access::Accessible,
            contacts: tenant.contacts,
            webhooks: shown,
        }),
    ))
}

/// A tenant with its current access (derived now) and its KEKs.
#[utoipa::path(get, path = "/tenants/{id}", tag = "tenants", operation_id = "get_tenant",
    params(("id" = String, Path, description = "tenant id")),
    responses(
        (status = 200, description = "the tenant", body = TenantView),
        (status = 404, description = "no such tenant", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn get_tenant(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    let (_, tenant) = state.keys.current_access(&id, Utc::now()).await?;
    Ok(Json(tenant))
}

/// A KEK to register.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct KekRequest {
    /// `local`, `aws`, `azure`, `gcp` or `vault`.
    #[schema(value_type = Provider)]
    provider: String,
    /// The key's name at its KMS (canonicalised per provider).
    key_ref: String,
    /// When the key expires, if byokd is to track it.
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    /// Replace the tenant's current key: its DEKs move to this one, then it is retired.
    #[serde(default)]
    replace: bool,
    /// AWS: the tenant's IAM role byokd assumes to reach the key.
    #[serde(default)]
    role_arn: Option<String>,
    /// AWS: the external id the role's trust policy requires.
    #[serde(default)]
    external_id: Option<String>,
    /// Whether a rotation at the KMS re-wraps the DEKs (default true).
    #[serde(default)]
    rewrap_on_rotation: Option<bool>,
}

/// A tenant after a KEK registration, with the replacement job it started, if any.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct KekRegistered {
    #[serde(flatten)]
    tenant: TenantView,
    /// The re-wrap job moving the DEKs off the replaced key (`replace: true`).
    rewrap_job: Option<i64>,
}

/// Registers a KEK after a test wrap/unwrap against its KMS succeeds: a key the platform
/// cannot use is refused (422) instead of failing later on the first DEK.
#[utoipa::path(post, path = "/tenants/{id}/keks", tag = "tenants", operation_id = "register_kek",
    params(("id" = String, Path, description = "tenant id")),
    request_body = KekRequest,
    responses(
        (status = 201, description = "registered after a test wrap/unwrap", body = KekRegistered),
        (status = 404, description = "no such tenant", body = ErrorBody),
        (status = 409, description = "the key is bound to another tenant, or the KMS refused it",
         body = ErrorBody),
        (status = 422, description = "a field is invalid, or the provider is not configured",
         body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn register_kek(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<KekRegistered>), ApiError> {
    let req: KekRequest = parse_body(&body)?;
    let provider: Provider = req
        .provider
        .parse()
        .map_err(|e: crate::domain::UnknownName| unprocessable(e.to_string()))?;
    let aws_role = match (&req.role_arn, &req.external_id) {
        (Some(arn), id) => Some(AwsRole::new(arn, id.as_deref()).map_err(unprocessable)?),
        (None, Some(_)) => return Err(unprocessable("external_id needs a role_arn")),
        (None, None) => None,
    };
    let kek = NewKek {
        provider,
        key_ref: req.key_ref,
        expires_at: req.expires_at,
        replace: req.replace,
        aws_role,
        rewrap_on_rotation: req.rewrap_on_rotation.unwrap_or(true),
    };
    let job = state.keys.register_kek(&tenant_id, kek, Utc::now()).await?;
    let tenant = state.store.tenant(&tenant_id).await?;
    Ok((
        StatusCode::CREATED,
        Json(KekRegistered {
            tenant,
            rewrap_job: job,
        }),
    ))
}

/// A new signing secret for a webhook endpoint (the body may be empty).
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateSecretRequest {
    /// `whsec_` + base64 of 24 to 64 bytes; generated (and returned once) when absent.
    #[schema(value_type = Option<String>)]
    secret: Option<SecretString>,
    /// How long the previous secret keeps signing alongside (default 24, at most 168).
    #[schema(maximum = 168)]
    overlap_hours: Option<u32>,
}

/// A rotated webhook secret.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct SecretRotated {
    /// The endpoint.
    id: Uuid,
    /// Until when the previous secret signs too.
    previous_secret_valid_until: DateTime<Utc>,
    /// The generated secret, shown this once; absent when the caller gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

/// Gives a webhook endpoint a new signing secret (generated unless given, shown once). The
/// previous secret keeps signing alongside for `overlap_hours` (default 24, at most 168), so
/// the tenant can switch its receiver without dropping a notification.
#[utoipa::path(post, path = "/tenants/{id}/webhooks/{webhook_id}/rotate-secret", tag = "tenants",
    operation_id = "rotate_webhook_secret",
    params(("id" = String, Path, description = "tenant id"),
           ("webhook_id" = String, Path, description = "webhook endpoint id")),
    request_body(content = Option<RotateSecretRequest>, description = "optional"),
    responses(
        (status = 200, description = "rotated", body = SecretRotated),
        (status = 404, description = "no such tenant or endpoint", body = ErrorBody),
        (status = 422, description = "a field is invalid", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn rotate_webhook_secret(
    State(state): State<AppState>,
    Path((tenant_id, endpoint)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<SecretRotated>, ApiError> {
    let req: RotateSecretRequest = if body.is_empty() {
        RotateSecretRequest::default()
    } else {
        parse_body(&body)?
    };
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("webhook endpoint {endpoint:?} of tenant {tenant_id:?} not found"),
        )
    };
    let endpoint_id = Uuid::parse_str(&endpoint).map_err(|_| not_found())?;
    let overlap = req.overlap_hours.unwrap_or(24);
    if overlap > 168 {
        return Err(unprocessable("overlap_hours must be at most 168"));
    }
    let (secret, generated) = match req.secret {
        Some(s) if valid_webhook_secret(s.expose_secret()) => (s, false),
        Some(_) => {
            return Err(unprocessable(
                "webhook secret must be whsec_ followed by base64 of 24 to 64 bytes",
            ));
        }
        None => (generate_webhook_secret(), true),
    };
    let until = Utc::now() + chrono::Duration::hours(i64::from(overlap));
    state
        .store
        .rotate_webhook_secret(&tenant_id, endpoint_id, &state.sealer.seal(&secret), until)
        .await?;
    state
        .store
        .append_audit(&[AuditRow::operation(
            Some(&tenant_id),
            "webhook_secret_rotated",
            "api",
            json!({ "endpoint_id": endpoint_id, "previous_valid_until": until,
                    "generated": generated }),
        )])
        .await?;
    Ok(Json(SecretRotated {
        id: endpoint_id,
        previous_secret_valid_until: until,
        secret: generated.then(|| secret.expose_secret().to_owned()),
    }))
}

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    tenant: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
    client: Option<String>,
    action: Option<String>,
    outcome: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// An RFC 3339 time from the query string (400 naming the parameter otherwise).
fn time_param(name: &str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "{name} must be an RFC 3339 time such as 2026-11-29T10:00:00Z, \
                             not {v:?}"
                        ),
                    )
                })
        })
        .transpose()
}

/// A page of a tenant's audit trail.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AuditPage {
    tenant: Option<String>,
    /// Newest first.
    entries: Vec<AuditEntry>,
}

/// A tenant's audit trail, newest first: every key operation and access decision, with
/// where it came from (event, api, probe, sweep) and its place in the chain. Filters:
/// `client`, `action`, `outcome` (exact), `since` (inclusive) and `until` (exclusive), RFC
/// 3339. Page with `before=<id>`.
#[utoipa::path(get, path = "/audit", tag = "audit", operation_id = "audit_trail",
    params(
        ("tenant" = String, Query, description = "tenant id"),
        ("before" = Option<i64>, Query, description = "entries with an id below this"),
        ("limit" = Option<i64>, Query, description = "page size (1-1000, default 100)"),
        ("client" = Option<String>, Query), ("action" = Option<String>, Query),
        ("outcome" = Option<String>, Query),
        ("since" = Option<String>, Query, description = "RFC 3339, inclusive"),
        ("until" = Option<String>, Query, description = "RFC 3339, exclusive"),
    ),
    responses(
        (status = 200, description = "entries", body = AuditPage),
        (status = 404, description = "no such tenant, now or in the trail", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = [])))]
pub(super) async fn audit(
    State(state): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let tenant = q.tenant.filter(|t| !t.is_empty()).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "the tenant query parameter is required",
        )
    })?;
    let filter = AuditFilter {
        since: time_param("since", q.since.as_deref())?,
        until: time_param("until", q.until.as_deref())?,
        tenant: Some(tenant.clone()),
        client: q.client,
        action: q.action,
        outcome: q.outcome,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let entries = state.store.audit_trail(&filter, q.before, limit).await?;
    // The trail outlives its tenant: a deleted tenant's history stays readable. Only an id
    // that names no tenant and has no history is unknown.
    if entries.is_empty() {
        let any = AuditFilter {
            tenant: Some(tenant.clone()),
            ..AuditFilter::default()
        };
        if state.store.audit_trail(&any, None, 1).await?.is_empty() {
            state.store.tenant(&tenant).await?;
        }
    }
    Ok(Json(AuditPage {
        tenant: filter.tenant,
        entries,
    }))
}

#[derive(Deserialize)]
pub(super) struct CheckpointsQuery {
    before: Option<i64>,
    limit: Option<i64>,
}

/// Checkpoints of the chain's head.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CheckpointPage {
    /// Newest first.
    checkpoints: Vec<AuditCheckpoint>,
}

/// Checkpoints of the audit chain's head, newest first: `{chain_seq, chain, at}`. Page with
/// `before=<chain_seq>`.
#[utoipa::path(get, path = "/audit/checkpoints", tag = "audit",
    operation_id = "audit_checkpoints",
    params(
        ("before" = Option<i64>, Query, description = "checkpoints below this chain_seq"),
        ("limit" = Option<i64>, Query, description = "page size (1-1000, default 100)"),
    ),
    responses((status = 200, description = "checkpoints", body = CheckpointPage), CommonErrors),
    security(("admin_token" = [])))]
pub(super) async fn audit_checkpoints(
    State(state): State<AppState>,
    Query(q): Query<CheckpointsQuery>,
) -> Result<Json<CheckpointPage>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let checkpoints = state.store.audit_checkpoints(q.before, limit).await?;
    Ok(Json(CheckpointPage { checkpoints }))
}

/// The CloudEvents attributes of a binary-mode request: its `ce-*` headers, prefix removed
/// and percent-decoded (HTTP binding 3.1.3.2). Empty when there are none (structured mode
/// or a provider's native format).
fn ce_headers(headers: &HeaderMap) -> Result<Vec<(String, String)>, ApiError> {
    let mut attributes: Vec<(String, String)> = Vec::new();
    for name in headers.keys() {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let mut values = headers.get_all(name).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(unprocessable(format!(
                "header {name} is given more than once; a CloudEvents attribute has one value"
            )));
        };
        let decoded = percent_encoding::percent_decode(value.as_bytes())
            .decode_utf8()
            .map_err(|_| {
                unprocessable(format!("header {name} is not UTF-8 once percent-decoded"))
            })?;
        attributes.push((attribute.to_owned(), decoded.into_owned()));
    }
    Ok(attributes)
}

/// An event message accepted and published.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EventAccepted {
    /// The first event's id.
    id: String,
    /// The first event's provider.
    provider: Provider,
    /// The first event's kind.
    kind: crate::domain::EventKind,
    /// Every event of the message.
    events: Vec<EventSummary>,
}

/// One event of a message.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EventSummary {
    id: String,
    provider: Provider,
    kind: crate::domain::EventKind,
}

/// A provider event that changes nothing, not published.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct EventIgnored {
    /// Why it changes nothing.
    ignored: String,
}

/// The answer to an Event Grid subscription validation handshake.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ValidationResponse {
    /// The `data.validationCode` of the validation event, echoed.
    #[serde(rename = "validationResponse")]
    validation_response: String,
}

/// Accepts one lifecycle message in any supported format and publishes it to the lifecycle
/// exchange (with confirms), so it takes the same path as events from a KMS. A message may
/// hold several events (an Event Grid array); it is published once, as received. A provider
/// event that changes nothing (a failed API call, a secret's expiry) is answered 200 with the
/// reason and not published.
///
/// CloudEvents come in structured mode (the body is the event) or binary mode (`ce-*`
/// headers hold the attributes, the body is the data, `Content-Type` its type); a binary
/// event is published in its structured form, so the consumer sees one format.
///
/// An Azure Event Grid subscription (Event Grid schema) is validated with a delivery holding
/// one `Microsoft.EventGrid.SubscriptionValidationEvent`: answered 200
/// `{"validationResponse": "<data.validationCode>"}` and not published. (A CloudEvents schema
/// subscription is validated with `OPTIONS /v1/events` instead.) Event Grid sends no bearer
/// token: give the subscription an endpoint URL with `?token=<BYOKD_EVENTS_TOKEN>`.
#[utoipa::path(post, path = "/events", tag = "events", operation_id = "post_event",
    params(
        ("token" = Option<String>, Query, description = "BYOKD_EVENTS_TOKEN, for a sender \
            that cannot send a bearer token (an Event Grid subscription's endpoint URL)"),
        ("ce-specversion" = Option<String>, Header, description = "binary mode: 1.0"),
        ("ce-id" = Option<String>, Header, description = "binary mode: the event id"),
        ("ce-source" = Option<String>, Header, description = "binary mode: the event source"),
        ("ce-type" = Option<String>, Header, description = "binary mode: byok.key.<kind>"),
        ("ce-time" = Option<String>, Header, description = "binary mode: RFC 3339"),
        ("ce-subject" = Option<String>, Header, description = "binary mode: the subject"),
    ),
    request_body(content = Object, description = "a lifecycle event: canonical CloudEvents \
        (structured mode, or its data in binary mode), AWS EventBridge, Azure Event Grid, GCP \
        audit log"),
    responses(
        (status = 202, description = "published", body = EventAccepted),
        (status = 200, description = "valid, but changes nothing; not published \
         (or, for an Event Grid subscription validation, the handshake's answer, \
         ValidationResponse)", body = EventIgnored),
        (status = 400, description = "not JSON", body = ErrorBody),
        (status = 422, description = "not a lifecycle event byokd can apply, with the reason",
         body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = []), ("events_token" = []), ("events_token_query" = [])))]
pub(super) async fn post_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let limit = state.amqp.max_message_bytes;
    if body.len() <= limit
        && let Ok(value) = serde_json::from_slice::<Value>(&body)
        && let Some(code) = crate::events::normalize::azure::validation_code(&value)
    {
        let code = code.map_err(|e| unprocessable(e.to_string()))?;
        tracing::info!("answered an Event Grid subscription validation handshake");
        return Ok(Json(ValidationResponse {
            validation_response: code,
        })
        .into_response());
    }
    let attributes = ce_headers(&headers)?;
    // A binary event's body was held to the limit; its attributes add what the headers did.
    let (message, normalize_limit) = if attributes.is_empty() {
        (body, limit)
    } else {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .map(|v| {
                v.to_str()
                    .map_err(|_| unprocessable("the Content-Type header is not ASCII"))
            })
            .transpose()?;
        let structured = binary::to_structured(&attributes, "ce-", content_type, &body, limit)
            .map_err(|e| unprocessable(e.to_string()))?;
        let len = structured.len();
        (Bytes::from(structured), limit.saturating_add(len))
    };
    let parsed = normalize(&message, normalize_limit).and_then(|events| {
        check_times(&events, Utc::now(), state.state.max_skew()).map(|()| events)
    });
    let events = match parsed {
        Ok(events) => events,
        Err(NormalizeError::Ignored(reason)) => {
            return Ok((StatusCode::OK, Json(EventIgnored { ignored: reason })).into_response());
        }
        Err(e) => {
            let status = match e {
                NormalizeError::NotJson(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            return Err(ApiError::new(status, e.to_string()));
        }
    };
    let Some(first) = events.first() else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the message holds no events",
        ));
    };
    let key = message_routing_key(&events);
    state
        .publisher
        .publish(Outgoing {
            exchange: &state.amqp.lifecycle_exchange,
            routing_key: &key,
            body: &message,
            properties: BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(first.event_id.as_str().into()),
            mandatory: true,
        })
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "could not publish event received over HTTP");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the message broker did not accept the event; retry later",
            )
        })?;
    let all = events
        .iter()
        .map(|e| EventSummary {
            id: e.event_id.clone(),
            provider: e.provider,
            kind: e.kind,
        })
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(EventAccepted {
            id: first.event_id.clone(),
            provider: first.provider,
            kind: first.kind,
            events: all,
        }),
    )
        .into_response())
}

/// Headers of the CloudEvents webhook abuse-protection exchange (CloudEvents "HTTP 1.1 Web
/// Hooks for Event Delivery", section 4: Abuse Protection).
const REQUEST_ORIGIN: &str = "webhook-request-origin";
const ALLOWED_ORIGIN: &str = "webhook-allowed-origin";
const REQUEST_RATE: &str = "webhook-request-rate";
const ALLOWED_RATE: &str = "webhook-allowed-rate";

/// The CloudEvents webhook validation handshake (abuse protection), as Azure Event Grid
/// sends it before delivering CloudEvents: `OPTIONS` with `WebHook-Request-Origin` (Event Grid:
/// `eventgrid.azure.net`) is answered 200 with `WebHook-Allowed-Origin` naming that origin and,
/// when a rate was asked, `WebHook-Allowed-Rate: *` (byokd limits nothing per sender). The
/// request passed the same authentication as a delivery (the admin token, or the events
/// token as bearer or `?token=`), which is what makes the origin one this deployment chose
/// to receive from. `WebHook-Request-Callback` (asynchronous confirmation) is not used: the
/// synchronous answer suffices.
#[utoipa::path(options, path = "/events", tag = "events", operation_id = "events_handshake",
    params(
        ("WebHook-Request-Origin" = String, Header, description = "the sender's origin, e.g. \
            eventgrid.azure.net"),
        ("WebHook-Request-Rate" = Option<String>, Header, description = "requests per minute \
            the sender asks to send"),
        ("token" = Option<String>, Query, description = "BYOKD_EVENTS_TOKEN, as in POST"),
    ),
    responses(
        (status = 200, description = "deliveries from this origin are allowed; headers \
         WebHook-Allowed-Origin (the origin), WebHook-Allowed-Rate (`*`, when a rate was \
         asked) and Allow (`POST, OPTIONS`)"),
        (status = 400, description = "no WebHook-Request-Origin header", body = ErrorBody),
        CommonErrors,
    ),
    security(("admin_token" = []), ("events_token" = []), ("events_token_query" = [])))]
pub(super) async fn events_handshake(headers: HeaderMap) -> Result<Response, ApiError> {
    let origin = headers
        .get(REQUEST_ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|o| !o.is_empty() && o.len() <= 255)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "OPTIONS /v1/events is the CloudEvents webhook handshake and needs a \
                 WebHook-Request-Origin header",
            )
        })?;
    let mut response = StatusCode::OK.into_response();
    let out = response.headers_mut();
    if let Ok(value) = header::HeaderValue::from_str(origin) {
        out.insert(ALLOWED_ORIGIN, value);
    }
    if headers.contains_key(REQUEST_RATE) {
        out.insert(ALLOWED_RATE, header::HeaderValue::from_static("*"));
    }
    out.insert(
        header::ALLOW,
        header::HeaderValue::from_static("POST, OPTIONS"),
    );
    tracing::info!(origin, "answered a CloudEvents webhook handshake");
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_ids_emails_and_secrets() {
        assert!(valid_tenant_id("acme-prod_1.eu"));
        assert!(!valid_tenant_id("acme prod"));
        assert!(!valid_tenant_id(""));
        assert!(valid_email("ops@acme.example"));
        assert!(!valid_email("ops@localhost"));
        assert!(!valid_email("not an email"));
        assert!(valid_webhook_secret(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        ));
        assert!(!valid_webhook_secret("whsec_c2hvcnQ="));
        assert!(!valid_webhook_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
    }
}
