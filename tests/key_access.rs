//! Key access against the real daemon, PostgreSQL and RabbitMQ: client tokens and their
//! scopes, the admin token's separation of duties, plaintext only to clients, refusal after a
//! revocation on every replica, the DEK cache (served while the tenant's access holds,
//! dropped the moment it changes), revoked clients, and an audit row for every attempt.
//! Every test runs on PostgreSQL and on SQLite (one node there: no second replica).

mod common;

use base64::Engine;
use common::{Backend, TOKEN, TestApp, at, wait_for};
use serde_json::{Value, json};
use std::time::Duration;

async fn call(
    app: &TestApp,
    base: &str,
    token: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let request = app
        .http
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(&body.unwrap_or_else(|| json!({})));
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body, cache)
}

async fn client(app: &TestApp, name: &str, scope: Value) -> String {
    let mut body = json!({ "name": name });
    body.as_object_mut()
        .expect("object")
        .extend(scope.as_object().expect("scope").clone());
    let r = app.post("/v1/clients", body).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.expect("json");
    v["token"].as_str().expect("token").to_owned()
}

fn plaintext(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v["plaintext"].as_str().expect("plaintext"))
        .expect("base64")
}

on_both_backends!(clients_create_and_unwrap_their_tenants_deks_and_nothing_else, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn clients_create_and_unwrap_their_tenants_deks_and_nothing_else(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("ka", "key-ka").await;
    app.tenant_with_key("kb", "key-kb").await;
    let a = client(&app, "svc-a", json!({ "tenants": ["ka"] })).await;
    let all = client(&app, "svc-all", json!({ "all_tenants": true })).await;
    let base = app.base.clone();

    // A client gets the plaintext once, like GenerateDataKey; responses are not cacheable.
    let (status, created, cache) = call(&app, &base, &a, "/v1/tenants/ka/deks", None).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(cache.as_deref(), Some("no-store"));
    let key = plaintext(&created);
    assert_eq!(key.len(), 32);
    let id = created["dek_id"].as_str().expect("id").to_owned();

    // It unwraps to the same key, for this client and for one with every tenant.
    for token in [&a, &all] {
        let (status, got, cache) = call(
            &app,
            &base,
            token,
            &format!("/v1/tenants/ka/deks/{id}/unwrap"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(plaintext(&got), key);
        assert_eq!(got["kcv"], created["kcv"]);
        assert_eq!(cache.as_deref(), Some("no-store"));
    }
    // Out of scope, the admin token, an unknown token, an unknown DEK.
    let (status, body, _) = call(&app, &base, &a, "/v1/tenants/kb/deks", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("scope")),
        "{body}"
    );
    let (status, body, _) = call(
        &app,
        &base,
        TOKEN,
        &format!("/v1/tenants/ka/deks/{id}/unwrap"),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("admin token")),
        "{body}"
    );
    let (status, _, _) = call(
        &app,
        &base,
        "byokd_ct_not-a-real-token",
        &format!("/v1/tenants/ka/deks/{id}/unwrap"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let unknown = uuid::Uuid::now_v7();
    let (status, _, _) = call(
        &app,
        &base,
        &a,
        &format!("/v1/tenants/ka/deks/{unknown}/unwrap"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    // A client token is no admin token; the admin token still creates, without plaintext.
    let r = app
        .http
        .get(app.url("/v1/tenants/ka"))
        .bearer_auth(&a)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);
    let (status, admin_dek, _) = call(&app, &base, TOKEN, "/v1/tenants/ka/deks", None).await;
    assert_eq!(status, 201);
    assert!(admin_dek.get("plaintext").is_none(), "{admin_dek}");

    // Batch: found ones unwrap, unknown and malformed ids are item errors.
    let (status, batch, _) = call(
        &app,
        &base,
        &a,
        "/v1/tenants/ka/deks/unwrap",
        Some(json!({ "dek_ids": [id, admin_dek["dek_id"], unknown, "nope"] })),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    let deks = batch["deks"].as_array().expect("deks");
    assert_eq!(deks.len(), 4);
    assert_eq!(plaintext(&deks[0]), key);
    assert!(deks[1]["plaintext"].is_string());
    assert!(
        deks[2]["error"].is_string() && deks[3]["error"].is_string(),
        "{batch}"
    );
    let (status, _, _) = call(
        &app,
        &base,
        &a,
        "/v1/tenants/ka/deks/unwrap",
        Some(json!({ "dek_ids": vec![id.clone(); 1001] })),
    )
    .await;
    assert_eq!(status, 422);

    // Every attempt is on the audit trail: who, which tenant and DEK, what came of it.
    let rows = app
        .sql(
            "SELECT action, outcome, detail->>'client' FROM audit_log
             WHERE action IN ('dek_unwrap', 'dek_create', 'auth') ORDER BY id",
        )
        .rows()
        .await;
    let count = |action: &str, outcome: &str| {
        rows.iter()
            .filter(|r| r[0] == action && r[1] == outcome)
            .count()
    };
    assert_eq!(count("dek_create", "allowed"), 2, "{rows:?}");
    assert_eq!(count("dek_create", "refused"), 1, "{rows:?}");
    // Two single unwraps, two found in the batch.
    assert_eq!(count("dek_unwrap", "allowed"), 4, "{rows:?}");
    // The admin's attempt; the unknown DEK and the batch's unknown one fail.
    assert_eq!(count("dek_unwrap", "refused"), 1, "{rows:?}");
    assert_eq!(count("dek_unwrap", "failed"), 2, "{rows:?}");
    assert_eq!(count("auth", "refused"), 1, "{rows:?}");
    let secrets = app
        .sql(
            "SELECT count(*) FROM audit_log WHERE CAST(detail AS TEXT) LIKE '%' || $1 || '%'
                OR CAST(detail AS TEXT) LIKE '%' || $2 || '%'",
        )
        .bind(&a)
        .bind(created["plaintext"].as_str().expect("plaintext"))
        .int()
        .await;
    assert_eq!(secrets, 0, "no token or plaintext in the audit trail");
    app.shutdown().await;
}

on_both_backends!(a_revocation_is_refused_at_once_on_every_replica_and_the_cache_goes_with_it, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn a_revocation_is_refused_at_once_on_every_replica_and_the_cache_goes_with_it(
    backend: Backend,
) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("kr", "key-kr").await;
    let svc = client(&app, "svc", json!({ "tenants": ["kr"] })).await;
    // SQLite serves one node: there the one daemon's cache is what goes with the revocation.
    let replica = match backend {
        Backend::Postgres => Some(app.replica().await),
        Backend::Sqlite => None,
    };
    let mut bases = vec![app.base.clone()];
    bases.extend(replica.as_ref().map(|r| r.base.clone()));
    wait_for("replica ready", Duration::from_secs(30), || {
        let http = app.http.clone();
        let url = format!("{}/readyz", bases[bases.len() - 1]);
        async move { matches!(http.get(&url).send().await, Ok(r) if r.status() == 200) }
    })
    .await;
    let (_, hot, _) = call(&app, &bases[0], &svc, "/v1/tenants/kr/deks", None).await;
    let (_, cold, _) = call(&app, &bases[0], &svc, "/v1/tenants/kr/deks", None).await;
    let hot_path = format!(
        "/v1/tenants/kr/deks/{}/unwrap",
        hot["dek_id"].as_str().expect("id")
    );
    let cold_path = format!(
        "/v1/tenants/kr/deks/{}/unwrap",
        cold["dek_id"].as_str().expect("id")
    );
    for base in &bases {
        assert_eq!(call(&app, base, &svc, &hot_path, None).await.0, 200);
    }

    // The key is disabled at the KMS and the event is lost: DEKs in the cache are still
    // served (no KMS call), one that is not is refused by the KMS.
    app.kms_do("key-kr", "disabled", &json!({})).await;
    for base in &bases {
        assert_eq!(
            call(&app, base, &svc, &hot_path, None).await.0,
            200,
            "cached"
        );
        let (status, body, _) = call(&app, base, &svc, &cold_path, None).await;
        assert_eq!(status, 403, "the KMS refuses: {body}");
    }
    // The event arrives: every replica refuses at once, the cache included.
    app.publish("disabled", "key-kr", at(10), json!({})).await;
    for base in &bases {
        wait_for("refused", Duration::from_secs(5), || async {
            call(&app, base, &svc, &hot_path, None).await.0 == 403
        })
        .await;
    }
    let (status, body, _) = call(&app, &bases[bases.len() - 1], &svc, &hot_path, None).await;
    assert_eq!(status, 403);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("inaccessible")),
        "{body}"
    );

    // Re-enabled at the KMS and announced: served again (unwrapped afresh).
    app.kms_do("key-kr", "enabled", &json!({})).await;
    app.publish("enabled", "key-kr", at(20), json!({})).await;
    for base in &bases {
        wait_for("served again", Duration::from_secs(15), || async {
            call(&app, base, &svc, &hot_path, None).await.0 == 200
        })
        .await;
    }

    // A revoked client is refused on every replica within a second.
    let r = app
        .http
        .delete(app.url("/v1/clients/svc"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 200);
    let revoked = std::time::Instant::now();
    for base in &bases {
        wait_for("client refused", Duration::from_secs(1), || async {
            call(&app, base, &svc, &hot_path, None).await.0 == 401
        })
        .await;
    }
    assert!(revoked.elapsed() < Duration::from_secs(2));
    let managed = app
        .sql("SELECT action FROM audit_log WHERE action LIKE 'client_%' ORDER BY id")
        .texts()
        .await;
    assert_eq!(managed, ["client_created", "client_revoked"]);
    if let Some(replica) = replica {
        replica.stop().await;
    }
    app.shutdown().await;
}

on_both_backends!(an_expired_key_still_unwraps_but_creates_nothing, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn an_expired_key_still_unwraps_but_creates_nothing(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("ke", "key-ke").await;
    let svc = client(&app, "svc-e", json!({ "tenants": ["ke"] })).await;
    let (_, dek, _) = call(&app, &app.base, &svc, "/v1/tenants/ke/deks", None).await;
    let path = format!(
        "/v1/tenants/ke/deks/{}/unwrap",
        dek["dek_id"].as_str().expect("id")
    );
    let past = chrono::Utc::now() - chrono::Duration::minutes(1);
    app.kms_do("key-ke", "expiry_changed", &json!({ "expires_at": past }))
        .await;
    app.publish("expired", "key-ke", at(5), json!({})).await;
    wait_for("encrypt_blocked", Duration::from_secs(10), || async {
        app.tenant("ke").await["access"] == "encrypt_blocked"
    })
    .await;
    assert_eq!(call(&app, &app.base, &svc, &path, None).await.0, 200);
    let (status, body, _) = call(&app, &app.base, &svc, "/v1/tenants/ke/deks", None).await;
    assert_eq!(status, 403, "{body}");
    app.shutdown().await;
}
