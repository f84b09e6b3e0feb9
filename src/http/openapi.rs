//! The OpenAPI 3.1 description of the HTTP API. It is generated from the code: each handler's
//! `#[utoipa::path]` annotation, and the types the handlers take and answer with. The routes
//! are registered through `utoipa_axum`, which records each one's description as it adds it
//! to the router, so a route cannot exist without one.
//!
//! Served at `GET /openapi.json` (no authentication) and committed as `openapi.json` at the
//! repository root; `tests/openapi.rs` fails when the two drift and runs schemathesis against
//! a live daemon with it.

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, ToSchema};

/// Every error answer: one sentence.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

/// The errors every `/v1` route may answer with besides its own.
#[derive(IntoResponses)]
#[allow(dead_code)] // Only its description is used; the handlers answer with `ApiError`.
pub enum CommonErrors {
    /// A malformed request: a query parameter of the wrong type, a path segment that is not
    /// UTF-8, a value the database cannot store (a NUL character).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No bearer token, or one that is unknown or revoked.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// A valid token that may not do this (a client token on an admin route, the admin
    /// token on unwrap, a tenant out of the client's scope or inaccessible).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The database (or the KMS, the broker) is unavailable; retry later.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The description of the whole API (routes are added by [`super::routes`]).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "byokd",
        description = "The admin and key-access API of byokd, the key-lifecycle daemon behind \
                       Bring Your Own Key. Every /v1 route needs `Authorization: Bearer` with \
                       the admin token (admin routes) or a client token (key access). Errors \
                       are `{\"error\": \"<one sentence>\"}`."
    ),
    modifiers(&BearerTokens),
    tags(
        (name = "health", description = "liveness, readiness, metrics and this description"),
        (name = "tenants", description = "tenants and their KEKs"),
        (name = "fleet", description = "views across tenants, and crypto-shredding a tenant"),
        (name = "deks", description = "wrapped DEKs and re-wrap jobs"),
        (name = "key-access", description = "DEK creation and unwrap for clients of the platform"),
        (name = "clients", description = "clients of the key-access API"),
        (name = "events", description = "lifecycle event intake"),
        (name = "notifications", description = "the notification outbox"),
        (name = "audit", description = "the tamper-evident audit trail and anomaly alerts"),
    )
)]
pub struct ApiDoc;

struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("BYOKD_ADMIN_TOKEN"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "events_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("BYOKD_EVENTS_TOKEN (event intake only)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "events_token_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "BYOKD_EVENTS_TOKEN in the endpoint URL (event intake only): what an Azure \
                 Event Grid subscription can send",
            ))),
        );
        components.add_security_scheme(
            "client_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "a client token from `byokd clients create` or POST /v1/clients",
                    ))
                    .build(),
            ),
        );
    }
}

/// The API's description, as served at `/openapi.json`.
pub fn spec() -> utoipa::openapi::OpenApi {
    super::routes(None).split_for_parts().1
}

/// [`spec`] as pretty JSON with a final newline: the form committed as `openapi.json`.
pub fn spec_json() -> String {
    let mut json = spec()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    json.push('\n');
    json
}
