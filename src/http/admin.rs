//! `/v1` handlers: tenants, KEK registration, event intake.

use super::{ApiError, AppState};
use crate::broker::Outgoing;
use crate::domain::{AwsRole, Provider};
use crate::events::amqp::message_routing_key;
use crate::events::normalize::{NormalizeError, check_times, normalize};
use crate::keys::NewKek;
use crate::seal::generate_webhook_secret;
use crate::store::{AuditFilter, AuditRow, NewTenant, NewWebhook};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TenantRequest {
    id: String,
    name: String,
    #[serde(default)]
    contacts: Vec<String>,
    #[serde(default)]
    webhooks: Vec<WebhookRequest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WebhookRequest {
    url: String,
    secret: Option<SecretString>,
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

pub(super) async fn create_tenant(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
        let mut view = json!({ "id": id, "url": url.as_str() });
        if generated {
            // Shown once, here; only the sealed form is stored.
            view["secret"] = secret.expose_secret().into();
        }
        shown.push(view);
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
        .map(|w| json!({ "id": w["id"], "url": w["url"] }))
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
        Json(json!({
            "id": tenant.id,
            "name": tenant.name,
            "access": "accessible",
            "contacts": tenant.contacts,
            "webhooks": shown,
        })),
    ))
}

pub(super) async fn get_tenant(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, tenant) = state.keys.current_access(&id, Utc::now()).await?;
    Ok(Json(serde_json::to_value(tenant).unwrap_or_default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KekRequest {
    provider: String,
    key_ref: String,
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

/// Registers a KEK after a test wrap/unwrap against its KMS succeeds: a key the platform
/// cannot use is refused (422) instead of failing later on the first DEK.
pub(super) async fn register_kek(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    let mut view = serde_json::to_value(tenant).unwrap_or_default();
    view["rewrap_job"] = json!(job);
    Ok((StatusCode::CREATED, Json(view)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateSecretRequest {
    secret: Option<SecretString>,
    overlap_hours: Option<u32>,
}

/// Gives a webhook endpoint a new signing secret (generated unless given, shown once). The
/// previous secret keeps signing alongside for `overlap_hours` (default 24, at most 168), so
/// the tenant can switch its receiver without dropping a notification.
pub(super) async fn rotate_webhook_secret(
    State(state): State<AppState>,
    Path((tenant_id, endpoint)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
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
    let mut view = json!({ "id": endpoint_id, "previous_secret_valid_until": until });
    if generated {
        view["secret"] = secret.expose_secret().into();
    }
    Ok(Json(view))
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

/// A tenant's audit trail, newest first: every key operation and access decision, with
/// where it came from (event, api, probe, sweep) and its place in the chain. Filters:
/// `client`, `action`, `outcome` (exact), `since` (inclusive) and `until` (exclusive), RFC
/// 3339. Page with `before=<id>`.
pub(super) async fn audit(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let filter = AuditFilter {
        since: time_param("since", q.since.as_deref())?,
        until: time_param("until", q.until.as_deref())?,
        tenant: Some(super::tenant_param(&state, q.tenant).await?),
        client: q.client,
        action: q.action,
        outcome: q.outcome,
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let entries = state.store.audit_trail(&filter, q.before, limit).await?;
    Ok(Json(json!({ "tenant": filter.tenant, "entries": entries })))
}

#[derive(Deserialize)]
pub(super) struct CheckpointsQuery {
    before: Option<i64>,
    limit: Option<i64>,
}

/// Checkpoints of the audit chain's head, newest first: `{chain_seq, chain, at}`. Page with
/// `before=<chain_seq>`.
pub(super) async fn audit_checkpoints(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<CheckpointsQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let checkpoints = state.store.audit_checkpoints(q.before, limit).await?;
    Ok(Json(json!({ "checkpoints": checkpoints })))
}

/// Accepts one lifecycle message in any supported format and publishes it to the lifecycle
/// exchange (with confirms), so it takes the same path as events from a KMS. A message may
/// hold several events (an Event Grid array); it is published once, as received. A provider
/// event that changes nothing (a failed API call, a secret's expiry) is answered 200 with the
/// reason and not published.
pub(super) async fn post_event(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let parsed = normalize(&body, state.amqp.max_message_bytes).and_then(|events| {
        check_times(&events, Utc::now(), state.state.max_skew()).map(|()| events)
    });
    let events = match parsed {
        Ok(events) => events,
        Err(NormalizeError::Ignored(reason)) => {
            return Ok((StatusCode::OK, Json(json!({ "ignored": reason }))));
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
            body: &body,
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
    let all: Vec<Value> = events
        .iter()
        .map(|e| json!({ "id": e.event_id, "provider": e.provider, "kind": e.kind }))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": first.event_id,
            "provider": first.provider,
            "kind": first.kind,
            "events": all,
        })),
    ))
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
