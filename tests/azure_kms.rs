//! The Azure Key Vault provider and Event Grid intake, through the daemon's API, events and
//! sweeps, against [`AzurePeer`] (tests/common/azure.rs: a Key Vault and Entra ID test peer,
//! since no Key Vault emulator can be installed here; its module doc says what it models).
//!
//! Binding and its refusals, DEKs through the key-access API and their binding to tenant and
//! id, a new key version as a rotation (by event and by probe) re-wrapped and verified,
//! expiry from `exp` and from `KeyNewVersionCreated`'s `EXP`, disable and deletion found by
//! the probe alone, a vault that refuses byokd (revoked) against throttling, server errors and
//! Entra ID failures (outages), a Managed HSM AES key through a managed identity, and Event
//! Grid's two validation handshakes.

mod common;

use byokd::kms::{Dek, DekContext, KmsError, KmsProvider, WrappedRef};
use chrono::{Duration as ChronoDuration, Utc};
use common::azure::{AzurePeer, Fault, Kty};
use common::sweeps::{run, sweeper};
use common::{TOKEN, TestApp, outbox_count, wait_for};
use secrecy::SecretString;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const EVENTS_TOKEN: &str = "evt-token-0123456789abcdef";

async fn app_with(peer: &AzurePeer) -> TestApp {
    let settings = peer.settings();
    TestApp::spawn_with(|c| {
        c.kms.azure = Some(settings);
        c.events_token = Some(SecretString::from(EVENTS_TOKEN));
    })
    .await
}

/// A tenant bound to a new RSA key `name` with `exp`; returns the key's reference.
async fn tenant_with_key(
    app: &TestApp,
    peer: &AzurePeer,
    tenant: &str,
    name: &str,
    exp: Option<i64>,
) -> String {
    app.create_tenant(tenant).await;
    peer.create_key(name, Kty::Rsa, exp);
    let key_ref = peer.key_ref(name);
    let (status, body) = app.bind_key(tenant, "azure", &key_ref, Value::Null).await;
    assert_eq!(status, 201, "{body}");
    key_ref
}

async fn kek(app: &TestApp, tenant: &str) -> Value {
    app.tenant(tenant).await["keks"][0].clone()
}

/// An Event Grid (Event Grid schema) `KeyNewVersionCreated` for `name`'s new `version`.
fn new_version_event(peer: &AzurePeer, id: &str, name: &str, version: &str, exp: i64) -> String {
    format!(
        r#"[{{"id":"{id}","topic":"/subscriptions/0/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv",
        "subject":"{name}","eventType":"Microsoft.KeyVault.KeyNewVersionCreated","eventTime":"{}",
        "data":{{"Id":"{}","VaultName":"kv","ObjectType":"Key","ObjectName":"{name}",
        "Version":"{version}","NBF":null,"EXP":{exp}}},"dataVersion":"1","metadataVersion":"1"}}]"#,
        (Utc::now() - ChronoDuration::seconds(5)).to_rfc3339(),
        peer.kid(name, version)
    )
}

/// Posts `body` to `/v1/events` with the events token in the query, as Event Grid would.
async fn post_event(app: &TestApp, body: &str) -> (u16, Value) {
    let r = app
        .http
        .post(app.url(&format!("/v1/events?token={EVENTS_TOKEN}")))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_grid_handshakes_are_answered_for_the_events_token() {
    let app = TestApp::spawn_with(|c| {
        c.events_token = Some(SecretString::from(EVENTS_TOKEN));
    })
    .await;
    // Event Grid schema: the documented validation delivery, answered with its code.
    let validation = r#"[{"id":"2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
        "topic":"/subscriptions/xx/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv",
        "subject":"","data":{"validationCode":"512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
        "validationUrl":"https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/s/validate?id=512d38b6"},
        "eventType":"Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime":"2018-01-25T22:12:19.4556811Z","metadataVersion":"1","dataVersion":"1"}]"#;
    let (status, body) = post_event(&app, validation).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({ "validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6" })
    );
    // The admin token still works; no token, a wrong one, or the events token against
    // another route do not.
    let r = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(TOKEN)
        .body(validation)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    for url in [
        "/v1/events".to_owned(),
        "/v1/events?token=wrong-token-0123456789".to_owned(),
    ] {
        let r = app
            .http
            .post(app.url(&url))
            .body(validation)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401, "{url}");
    }
    let r = app
        .http
        .get(app.url(&format!("/v1/tenants?token={EVENTS_TOKEN}")))
        .bearer_auth(EVENTS_TOKEN)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401, "the events token is for /v1/events only");
    // A validation event without a code is refused with the reason.
    let (status, body) = post_event(
        &app,
        &validation.replace(
            r#""validationCode":"512d38b6-c7b8-40c8-89fe-f46f9e9622b6","#,
            "",
        ),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("validationCode")
    );

    // CloudEvents schema: the webhook abuse-protection handshake.
    let options = |url: String, origin: Option<&str>| {
        let mut r = app
            .http
            .request(reqwest::Method::OPTIONS, app.url(&url))
            .header("WebHook-Request-Rate", "120");
        if let Some(origin) = origin {
            r = r.header("WebHook-Request-Origin", origin);
        }
        r.send()
    };
    let r = options(
        format!("/v1/events?token={EVENTS_TOKEN}"),
        Some("eventgrid.azure.net"),
    )
    .await
    .expect("OPTIONS");
    assert_eq!(r.status(), 200);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(
        header("webhook-allowed-origin").as_deref(),
        Some("eventgrid.azure.net")
    );
    assert_eq!(header("webhook-allowed-rate").as_deref(), Some("*"));
    assert!(header("allow").is_some_and(|a| a.contains("POST")));
    let r = options(format!("/v1/events?token={EVENTS_TOKEN}"), None)
        .await
        .expect("OPTIONS");
    assert_eq!(r.status(), 400);
    let r = options("/v1/events".to_owned(), Some("eventgrid.azure.net"))
        .await
        .expect("OPTIONS");
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("webhook-allowed-origin").is_none());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_byokd_cannot_use_are_refused_with_the_reason() {
    let peer = AzurePeer::vault("acme-kv").await;
    let app = app_with(&peer).await;
    app.create_tenant("ref").await;
    let refused = |status: u16, body: &Value, needle: &str| {
        assert_eq!(status, 422, "{needle}: {body}");
        let e = body["error"].as_str().unwrap_or_default();
        assert!(e.contains(needle), "{needle}: {e}");
    };
    peer.create_key("ec-key", Kty::Ec, None);
    let (s, b) = app
        .bind_key("ref", "azure", &peer.key_ref("ec-key"), Value::Null)
        .await;
    refused(s, &b, "key type is EC");
    peer.create_key("no-unwrap", Kty::Rsa, None);
    peer.set_key_ops("no-unwrap", &["encrypt", "wrapKey"]);
    let (s, b) = app
        .bind_key("ref", "azure", &peer.key_ref("no-unwrap"), Value::Null)
        .await;
    refused(s, &b, "do not permit unwrapKey");
    peer.create_key("off", Kty::Rsa, None);
    peer.set_enabled("off", false);
    let (s, b) = app
        .bind_key("ref", "azure", &peer.key_ref("off"), Value::Null)
        .await;
    refused(s, &b, "is disabled");
    peer.create_key("later", Kty::Rsa, None);
    peer.set_nbf("later", Some(Utc::now().timestamp() + 86_400));
    let (s, b) = app
        .bind_key("ref", "azure", &peer.key_ref("later"), Value::Null)
        .await;
    refused(s, &b, "is disabled");
    let (s, b) = app
        .bind_key("ref", "azure", &peer.key_ref("missing"), Value::Null)
        .await;
    refused(s, &b, "does not exist");
    let (s, b) = app
        .bind_key("ref", "azure", "https://evil.example/keys/k", Value::Null)
        .await;
    refused(s, &b, "not a Key Vault or Managed HSM host");
    peer.set_recovery_level("Purgeable");
    peer.create_key("purgeable", Kty::Rsa, None);
    let (s, b) = app
        .bind_key("ref", "azure", &peer.key_ref("purgeable"), Value::Null)
        .await;
    refused(s, &b, "not recoverable");
    peer.set_recovery_level("Recoverable+Purgeable");

    // A usable key binds by any spelling, stored versionless and lower-case, once.
    let version = peer.create_key("good", Kty::RsaHsm, None);
    let spelled = format!("https://ACME-KV.vault.azure.net/keys/Good/{version}");
    let (s, b) = app.bind_key("ref", "azure", &spelled, Value::Null).await;
    assert_eq!(s, 201, "{b}");
    let k = kek(&app, "ref").await;
    assert_eq!(k["key_ref"], peer.key_ref("good"), "{k}");
    assert_eq!(k["current_version"], version.as_str(), "{k}");
    app.create_tenant("ref2").await;
    let (s, b) = app
        .bind_key("ref2", "azure", &peer.key_ref("good"), Value::Null)
        .await;
    assert_eq!(s, 409, "one key, one tenant: {b}");

    // Every Key Vault request named the pinned api-version and carried a token (the peer
    // answers 400 or 401 otherwise); one token served them all.
    let seen = peer.seen();
    assert!(
        seen.iter().all(|s| s.api_version.as_deref() == Some("7.5")),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|s| s.status != 401 && s.status != 400),
        "{seen:?}"
    );
    assert!(seen.iter().any(|s| s.path.ends_with("/wrapkey")));
    assert!(seen.iter().any(|s| s.path.ends_with("/unwrapkey")));
    assert_eq!(peer.token_requests(), 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deks_round_trip_through_key_access_and_a_moved_dek_fails() {
    let peer = AzurePeer::vault("dek-kv").await;
    let app = app_with(&peer).await;
    tenant_with_key(&app, &peer, "ka", "kek-a", None).await;
    tenant_with_key(&app, &peer, "kb", "kek-b", None).await;
    let r = app
        .post("/v1/clients", json!({ "name": "svc", "all_tenants": true }))
        .await;
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let call = |path: String| {
        app.http
            .post(app.url(&path))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
    };
    let created: Value = call("/v1/tenants/ka/deks".to_owned())
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let key = common::plaintext(&created);
    assert_eq!(key.len(), 32);
    let id = created["dek_id"].as_str().expect("id").to_owned();
    let r = call(format!("/v1/tenants/ka/deks/{id}/unwrap"))
        .await
        .expect("unwrap");
    assert_eq!(r.status(), 200);
    let got: Value = r.json().await.expect("json");
    assert_eq!(common::plaintext(&got), key);
    assert_eq!(got["kcv"], created["kcv"]);
    app.create_deks("ka", 2).await;
    let (report, ok) = app.verify_deks("ka");
    assert!(ok, "{report}");
    assert_eq!(report["ok"], 3, "{report}");

    // The stored form is byokd's binding around Key Vault's RSA-OAEP-256 wrap (2048 bits).
    let rows: Vec<(uuid::Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, wrapped FROM deks WHERE tenant_id = 'ka' ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .expect("deks");
    assert_eq!(rows[0].1.len(), 1 + 32 + 256);
    // Moved to another row of the same tenant, and to another tenant's key: both fail,
    // alone.
    sqlx::query("UPDATE deks SET wrapped = $1 WHERE id = $2")
        .bind(&rows[0].1)
        .bind(rows[1].0)
        .execute(&app.pool)
        .await
        .expect("move");
    let (report, ok) = app.verify_deks("ka");
    assert!(!ok, "{report}");
    assert_eq!(
        (report["ok"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(1))
    );
    let r = call(format!("/v1/tenants/ka/deks/{}/unwrap", rows[1].0))
        .await
        .expect("unwrap moved");
    assert_ne!(r.status(), 200, "a moved DEK must not unwrap");

    // The binding, straight against the vault: a wrap bound to ka unwraps for ka only, with
    // the same key and version (Key Vault's RSA wrap itself takes no context).
    let kms = byokd::kms::AzureKms::new(&peer.settings()).expect("client");
    let key_ref = peer.key_ref("kek-a");
    let dek = Dek::generate();
    let id = uuid::Uuid::now_v7();
    let bound = |tenant_id| DekContext {
        tenant_id,
        dek_id: id,
    };
    let wrapped = kms
        .wrap_many(&key_ref, None, &[(&dek, bound("ka"))])
        .await
        .expect("wrap")
        .remove(0);
    let unwrap = |ctx| {
        let item = WrappedRef {
            ctx,
            version: &wrapped.version,
            ciphertext: &wrapped.ciphertext,
        };
        let kms = kms.clone();
        let key_ref = key_ref.clone();
        async move {
            kms.unwrap_many(&key_ref, &[item])
                .await
                .expect("batch")
                .remove(0)
        }
    };
    assert_eq!(
        unwrap(bound("ka")).await.expect("ka's own").kcv(),
        dek.kcv()
    );
    assert!(matches!(
        unwrap(bound("kb")).await,
        Err(KmsError::Integrity)
    ));
    let other_id = DekContext {
        tenant_id: "ka",
        dek_id: uuid::Uuid::now_v7(),
    };
    assert!(matches!(unwrap(other_id).await, Err(KmsError::Integrity)));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_is_a_rotation_by_event_or_probe_rewrapped_and_verified() {
    let peer = AzurePeer::vault("rot-kv").await;
    let app = app_with(&peer).await;
    tenant_with_key(&app, &peer, "re", "kek-e", None).await;
    tenant_with_key(&app, &peer, "rp", "kek-p", None).await;
    let old = kek(&app, "re").await["current_version"].clone();
    app.create_deks("re", 3).await;
    app.create_deks("rp", 2).await;

    // By event: Event Grid delivers KeyNewVersionCreated to POST /v1/events.
    let exp = Utc::now().timestamp() + 400 * 86_400;
    let v2 = peer.rotate("kek-e", Some(exp));
    let (status, body) =
        post_event(&app, &new_version_event(&peer, "nv-1", "kek-e", &v2, exp)).await;
    assert_eq!(status, 202, "{body}");
    wait_for(
        "the new version observed",
        Duration::from_secs(30),
        || async { kek(&app, "re").await["current_version"] == v2.as_str() },
    )
    .await;
    let job = app
        .wait_job("re", "completed", Duration::from_secs(60))
        .await;
    assert_eq!(job["done"], 3, "{job}");
    let (report, ok) = app.verify_deks("re");
    assert!(ok, "{report}");
    assert_eq!(
        report["by_version"],
        json!({ v2.as_str(): 3 }),
        "{report} (was {old})"
    );
    assert_eq!(
        kek(&app, "re").await["expires_at"],
        json!(chrono::DateTime::from_timestamp(exp, 0).expect("t")),
        "the new version's exp"
    );

    // By probe alone: no event.
    let v3 = peer.rotate("kek-p", None);
    let s = sweeper(&app).await;
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(kek(&app, "rp").await["current_version"], v3.as_str());
    app.wait_job("rp", "completed", Duration::from_secs(60))
        .await;
    let (report, ok) = app.verify_deks("rp");
    assert!(ok, "{report}");
    assert_eq!(report["by_version"], json!({ v3.as_str(): 2 }), "{report}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_versions_exp_stops_the_warnings_and_the_old_date_no_longer_blocks() {
    let peer = AzurePeer::vault("exp-kv").await;
    let app = app_with(&peer).await;
    let old_exp = Utc::now() + ChronoDuration::days(3);
    // Two tenants whose keys expire in three days; one key gets a new version.
    tenant_with_key(&app, &peer, "xr", "kek-r", Some(old_exp.timestamp())).await;
    tenant_with_key(&app, &peer, "xc", "kek-c", Some(old_exp.timestamp())).await;
    assert_eq!(
        kek(&app, "xr").await["expires_at"],
        json!(chrono::DateTime::from_timestamp(old_exp.timestamp(), 0).expect("t")),
        "exp is the key's expiry"
    );
    let s = sweeper(&app).await;
    run(&s, "expiry-scan", Utc::now()).await;
    let warned = outbox_count(&app, "xr", "key.expiring").await;
    assert!(warned >= 1, "a warning inside the 7-day threshold");

    let new_exp = Utc::now().timestamp() + 400 * 86_400;
    let v2 = peer.rotate("kek-r", Some(new_exp));
    // CloudEvents schema this time.
    let event = json!({
        "specversion": "1.0", "id": "nv-exp", "type": "Microsoft.KeyVault.KeyNewVersionCreated",
        "source": "/subscriptions/0/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/exp-kv",
        "subject": "kek-r", "time": (Utc::now() - ChronoDuration::seconds(5)).to_rfc3339(),
        "data": { "Id": peer.kid("kek-r", &v2), "VaultName": "exp-kv", "ObjectType": "Key",
                  "ObjectName": "kek-r", "Version": v2, "NBF": null, "EXP": new_exp },
    });
    let (status, body) = post_event(&app, &format!("[{event}]")).await;
    assert_eq!(status, 202, "{body}");
    let want = json!(chrono::DateTime::from_timestamp(new_exp, 0).expect("t"));
    wait_for(
        "the new expiry observed",
        Duration::from_secs(30),
        || async { kek(&app, "xr").await["expires_at"] == want },
    )
    .await;

    // Warnings stop: the scans on the next days warn only the key that kept its date.
    for day in 1..=2 {
        run(&s, "expiry-scan", Utc::now() + ChronoDuration::days(day)).await;
    }
    assert_eq!(outbox_count(&app, "xr", "key.expiring").await, warned);
    assert!(outbox_count(&app, "xc", "key.expiring").await > warned);
    // Past the old date, only the key without a new version blocks its tenant.
    let report = run(&s, "expiry-scan", old_exp + ChronoDuration::days(1)).await;
    assert_eq!(report["expired"], 1, "{report}");
    assert_eq!(outbox_count(&app, "xr", "key.expired").await, 0);
    assert_eq!(outbox_count(&app, "xc", "key.expired").await, 1);
    assert_eq!(app.access("xr").await, "accessible");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_deletion_are_found_by_the_probe_alone() {
    let peer = AzurePeer::vault("probe-kv").await;
    let app = app_with(&peer).await;
    tenant_with_key(&app, &peer, "pd", "kek-d", None).await;
    tenant_with_key(&app, &peer, "px", "kek-x", None).await;
    app.create_deks("pd", 1).await;
    let s = sweeper(&app).await;

    peer.set_enabled("kek-d", false);
    assert_eq!(
        app.access("pd").await,
        "accessible",
        "nothing told byokd yet"
    );
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("pd").await, "inaccessible");
    assert_eq!(kek(&app, "pd").await["observed_state"], "disabled");
    let refused = app.post("/v1/tenants/pd/deks", json!({})).await;
    assert_eq!(refused.status(), 409);
    peer.set_enabled("kek-d", true);
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("pd").await, "accessible");

    // Soft-deleted: pending deletion (recoverable); purged: destroyed.
    peer.delete("kek-x");
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("px").await, "inaccessible");
    assert_eq!(kek(&app, "px").await["observed_state"], "pending_deletion");
    peer.purge("kek-x");
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(kek(&app, "px").await["observed_state"], "destroyed");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_refusing_byokd_revokes_and_outages_never_do() {
    let peer = AzurePeer::vault("fail-kv").await;
    let app = app_with(&peer).await;
    tenant_with_key(&app, &peer, "fa", "kek-f", None).await;
    app.create_deks("fa", 1).await;
    let s = sweeper(&app).await;

    // 403 from the vault itself (access policy, then RBAC): revoked.
    for inner in ["AccessDenied", "ForbiddenByRbac"] {
        peer.deny(Some(inner));
        run(&s, "key-probe", Utc::now()).await;
        assert_eq!(app.access("fa").await, "inaccessible", "{inner}");
        peer.deny(None);
        run(&s, "key-probe", Utc::now()).await;
        assert_eq!(app.access("fa").await, "accessible", "{inner} lifted");
    }

    // Throttled past every retry, server errors, Entra ID down or refusing byokd's secret:
    // outages, the tenant keeps its access.
    for what in ["429", "500", "token endpoint down", "client secret refused"] {
        match what {
            "429" => peer.fail_next(50, Fault::Throttle(0)),
            "500" => peer.fail_next(50, Fault::ServerError),
            "token endpoint down" => peer.tokens_down(true),
            _ => {
                // Forget the tokens issued, then refuse byokd's secret.
                peer.tokens_down(true);
                peer.tokens_down(false);
                peer.rotate_client_secret("another-secret-0123456789");
            }
        }
        let report = run(&s, "key-probe", Utc::now()).await;
        assert_eq!(report["unreachable"], 1, "{what}: {report}");
        assert_eq!(app.access("fa").await, "accessible", "{what}: {report}");
        assert_eq!(kek(&app, "fa").await["observed_state"], "enabled", "{what}");
        peer.fail_next(0, Fault::ServerError);
        peer.tokens_down(false);
        peer.rotate_client_secret(common::azure::CLIENT_SECRET);
    }

    // A 429 within the retries is waited out (Retry-After) and the call succeeds.
    peer.fail_next(1, Fault::Throttle(1));
    let started = Instant::now();
    app.create_deks("fa", 1).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After was honoured"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_hsm_aes_key_through_a_managed_identity() {
    let peer = AzurePeer::managed_hsm("acme-hsm").await;
    let settings = peer.managed_identity_settings();
    let app = TestApp::spawn_with(|c| c.kms.azure = Some(settings)).await;
    app.create_tenant("hsm").await;
    let version = peer.create_key("aes-kek", Kty::OctHsm, None);
    let (status, body) = app
        .bind_key("hsm", "azure", &peer.key_ref("aes-kek"), Value::Null)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(kek(&app, "hsm").await["current_version"], version.as_str());
    app.create_deks("hsm", 2).await;
    assert_eq!(
        peer.token_requests(),
        1,
        "one managed identity token, cached"
    );
    let (report, ok) = app.verify_deks("hsm");
    assert!(ok, "{report}");
    // A256KW of 32 bytes is 40 bytes, behind byokd's binding.
    let len: i32 = sqlx::query_scalar("SELECT length(wrapped) FROM deks LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .expect("len");
    assert_eq!(len, 1 + 32 + 40);
    app.shutdown().await;
}

/// A self-signed certificate for `key` (PEM of the key and the certificate) and its DER.
fn certificate(key: &rsa::RsaPrivateKey) -> (String, Vec<u8>) {
    use rsa::pkcs8::EncodePrivateKey;
    let key_pem = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .expect("pkcs8")
        .to_string();
    let pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&key_pem, &rcgen::PKCS_RSA_SHA256)
        .expect("key pair");
    let cert = rcgen::CertificateParams::new(vec!["byokd.example".to_owned()])
        .expect("params")
        .self_signed(&pair)
        .expect("certificate");
    (format!("{key_pem}{}", cert.pem()), cert.der().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_credential_signs_its_client_assertion() {
    let peer = AzurePeer::vault("cert-kv").await;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa");
    let (pem, der) = certificate(&key);
    peer.register_certificate(&der, rsa::RsaPublicKey::from(&key));
    let dir = std::env::temp_dir().join(format!("byokd-azure-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("app.pem");
    std::fs::write(&path, &pem).expect("pem");
    let settings = peer.certificate_settings(&path);
    let app = TestApp::spawn_with(|c| c.kms.azure = Some(settings)).await;
    app.create_tenant("cc").await;
    peer.create_key("kek", Kty::Rsa, None);
    let (status, body) = app
        .bind_key("cc", "azure", &peer.key_ref("kek"), Value::Null)
        .await;
    assert_eq!(status, 201, "{body}");
    app.create_deks("cc", 1).await;
    assert_eq!(peer.token_requests(), 1);

    // A certificate Entra ID does not know: no token, an outage (not a refusal of the key).
    let other = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa");
    let unknown = dir.join("unknown.pem");
    std::fs::write(&unknown, certificate(&other).0).expect("pem");
    let kms = byokd::kms::AzureKms::new(&peer.certificate_settings(&unknown)).expect("client");
    match kms.describe(&peer.key_ref("kek")).await {
        Err(e @ KmsError::Unreachable { .. }) => {
            assert!(e.to_string().contains("invalid_client"), "{e}");
        }
        other => panic!("expected an outage, got {other:?}"),
    }
    // A file without a key is refused at start.
    let bad = dir.join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("pem");
    assert!(byokd::kms::AzureKms::new(&peer.certificate_settings(&bad)).is_err());
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
