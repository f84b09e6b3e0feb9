//! The admin API's contract: auth on every /v1 route, status codes, error bodies, and that a
//! webhook secret is shown once and stored only sealed.

mod common;

use common::{TOKEN, TestApp};
use serde_json::{Value, json};

async fn error_of(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("JSON error body");
    (
        status,
        body["error"].as_str().expect("error field").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_v1_route_requires_the_bearer_token() {
    let app = TestApp::spawn().await;
    let routes = [
        ("POST", "/v1/tenants"),
        ("GET", "/v1/tenants/x"),
        ("POST", "/v1/tenants/x/keks"),
        ("POST", "/v1/events"),
    ];
    for (method, path) in routes {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let none = app
            .http
            .request(m.clone(), app.url(path))
            .send()
            .await
            .expect("send");
        assert_eq!(error_of(none).await.0, 401, "{method} {path} without token");
        let wrong = app
            .http
            .request(m.clone(), app.url(path))
            .bearer_auth(format!("{TOKEN}x"))
            .send()
            .await
            .expect("send");
        assert_eq!(
            error_of(wrong).await,
            (401, "invalid bearer token".to_owned())
        );
    }
    // Health, readiness and metrics are open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = app.http.get(app.url(path)).send().await.expect("send");
        assert_eq!(r.status(), 200, "{path}");
    }
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("send");
    assert!(
        metrics
            .text()
            .await
            .unwrap_or_default()
            .contains("byokd_consumer_up")
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_the_admin_api_refuses_everyone() {
    let app = TestApp::spawn_with(|c| c.admin_token = None).await;
    let r = app
        .http
        .get(app.url("/v1/tenants/x"))
        .bearer_auth("")
        .send()
        .await
        .expect("send");
    let (status, message) = error_of(r).await;
    assert_eq!(status, 401);
    assert!(message.contains("BYOKD_ADMIN_TOKEN"), "{message}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_keks_have_clear_errors() {
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/tenants",
            json!({ "id": "acme", "name": "Acme", "contacts": ["sec@acme.example"],
            "webhooks": [{ "url": "https://hooks.acme.example/byok" }] }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.expect("json");
    let secret = created["webhooks"][0]["secret"]
        .as_str()
        .expect("generated secret shown once")
        .to_owned();
    assert!(secret.starts_with("whsec_"));

    // Stored sealed, never in plaintext.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT secret_sealed FROM webhook_endpoints")
        .fetch_one(&app.pool)
        .await
        .expect("row");
    let b64 = secret.trim_start_matches("whsec_");
    assert!(!stored.windows(b64.len()).any(|w| w == b64.as_bytes()));
    assert!(!stored.windows(6).any(|w| w == b"whsec_"));
    // And not shown again.
    let tenant = app.tenant("acme").await;
    assert!(!tenant.to_string().contains(b64));
    assert_eq!(tenant["access"], "accessible");

    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({ "id": "acme", "name": "Again" }),
            409,
            "already exists",
        ),
        (json!({ "id": "bad id", "name": "x" }), 422, "id must be"),
        (
            json!({ "id": "b", "name": " " }),
            422,
            "name must not be empty",
        ),
        (
            json!({ "id": "b", "name": "B", "contacts": ["nope"] }),
            422,
            "not an email",
        ),
        (
            json!({ "id": "b", "name": "B", "webhooks": [{ "url": "ftp://x" }] }),
            422,
            "http(s) URL",
        ),
        (
            json!({ "id": "b", "name": "B", "webhooks": [{ "url": "https://x.example", "secret": "s" }] }),
            422,
            "whsec_",
        ),
        (json!({ "id": "b" }), 422, "missing field `name`"),
        (
            json!({ "id": "b", "name": "B", "colour": "red" }),
            422,
            "unknown field",
        ),
    ];
    for (body, status, text) in cases {
        let (s, m) = error_of(app.post("/v1/tenants", body.clone()).await).await;
        assert_eq!(s, status, "{body}: {m}");
        assert!(m.contains(text), "{body}: {m}");
    }
    let not_json = app
        .http
        .post(app.url("/v1/tenants"))
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(error_of(not_json).await.0, 400);

    // Rotating the webhook secret shows the new one once; the old keeps signing a while.
    let hook = created["webhooks"][0]["id"]
        .as_str()
        .expect("webhook id")
        .to_owned();
    let r = app
        .post(
            &format!("/v1/tenants/acme/webhooks/{hook}/rotate-secret"),
            json!({ "overlap_hours": 2 }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.expect("json");
    let new_secret = rotated["secret"].as_str().expect("new secret shown once");
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    assert!(rotated["previous_secret_valid_until"].is_string());
    let (s, _) = error_of(
        app.post(
            &format!("/v1/tenants/other/webhooks/{hook}/rotate-secret"),
            json!({}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 404, "another tenant's endpoint");
    let (s, m) = error_of(
        app.post(
            &format!("/v1/tenants/acme/webhooks/{hook}/rotate-secret"),
            json!({ "overlap_hours": 1000 }),
        )
        .await,
    )
    .await;
    assert_eq!((s, m.contains("168")), (422, true), "{m}");

    let (s, m) = error_of(app.get("/v1/tenants/ghost").await).await;
    assert_eq!((s, m.contains("ghost")), (404, true));

    app.create_local_key("acme-kek").await;
    app.create_local_key("other").await;
    let kek = json!({ "provider": "local", "key_ref": "acme-kek" });
    let r = app.post("/v1/tenants/acme/keks", kek.clone()).await;
    assert_eq!(r.status(), 201);
    let view: Value = r.json().await.expect("json");
    assert_eq!(view["keks"][0]["state"], "enabled");
    let kek_cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "acme",
            json!({ "provider": "local", "key_ref": "other" }),
            409,
            "already has a key",
        ),
        ("ghost", kek.clone(), 404, "ghost"),
        (
            "acme",
            json!({ "provider": "ibm", "key_ref": "k" }),
            422,
            "unknown provider",
        ),
        (
            "acme",
            json!({ "provider": "local", "key_ref": "" }),
            422,
            "key_ref",
        ),
    ];
    for (tenant, body, status, text) in kek_cases {
        let (s, m) = error_of(
            app.post(&format!("/v1/tenants/{tenant}/keks"), body.clone())
                .await,
        )
        .await;
        assert_eq!(s, status, "{body}: {m}");
        assert!(m.contains(text), "{body}: {m}");
    }
    app.post("/v1/tenants", json!({ "id": "other", "name": "Other" }))
        .await;
    let (s, m) = error_of(app.post("/v1/tenants/other/keks", kek).await).await;
    assert_eq!((s, m.contains("already registered")), (409, true), "{m}");

    // An expired key at registration makes the tenant encrypt_blocked straight away.
    app.post("/v1/tenants", json!({ "id": "late", "name": "Late" }))
        .await;
    app.create_local_key("late-kek").await;
    let r = app
        .post(
            "/v1/tenants/late/keks",
            json!({ "provider": "local", "key_ref": "late-kek",
            "expires_at": "2020-01-01T00:00:00Z" }),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(app.tenant("late").await["access"], "encrypt_blocked");

    let (s, _) = error_of(app.get("/no/such/route").await).await;
    assert_eq!(s, 404);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_posted_over_http_take_the_broker_path() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("h", "key-h").await;
    let event = common::canonical("http-1", "disabled", "key-h", common::at(0), json!({}));
    let r = app.post("/v1/events", event).await;
    assert_eq!(r.status(), 202);
    app.wait_processed(1).await;
    assert_eq!(app.tenant("h").await["access"], "inaccessible");

    let (s, m) = error_of(
        app.post("/v1/events", json!({ "specversion": "1.0" }))
            .await,
    )
    .await;
    assert_eq!(s, 422, "{m}");
    app.shutdown().await;
}
