//! The Google Cloud KMS provider through the daemon's API, native audit-log events and
//! sweeps, against the Cloud KMS test peer of `tests/common/gcp.rs` (no Cloud KMS emulator
//! can be installed here; the peer's docs say what it models and what not): binding and
//! its refusals, DEKs bound to tenant and DEK by the AAD, a new primary version re-wrapped
//! (by event and by probe), the three version scenarios end to end from GCP audit-log
//! entries, a removed IAM binding found as a revocation, and quota, outage and token
//! failures that never revoke.

mod common;

use byokd::kms::DekContext;
use chrono::Utc;
use common::gcp::{CloudKms, Fault, audit_entry};
use common::sweeps::{run, sweeper};
use common::{TestApp, outbox_count, wait_for};
use serde_json::{Value, json};
use std::time::Duration;

async fn app_with(peer: &CloudKms) -> TestApp {
    let settings = peer.settings();
    TestApp::spawn_with(|c| c.kms.gcp = Some(settings)).await
}

/// A tenant bound to a new key of the peer; the key's name.
async fn tenant_with_key(app: &TestApp, peer: &CloudKms, tenant: &str, extra: Value) -> String {
    app.create_tenant(tenant).await;
    let key = peer.create_key(tenant);
    let (status, body) = app.bind_key(tenant, "gcp", &key, extra).await;
    assert_eq!(status, 201, "{body}");
    key
}

async fn audit_count(app: &TestApp, tenant: &str, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = $2")
        .bind(tenant)
        .bind(action)
        .fetch_one(&app.pool)
        .await
        .expect("audit count")
}

fn version(key: &str, n: &str) -> String {
    format!("{key}/cryptoKeyVersions/{n}")
}

/// Publishes one audit-log entry as a log sink would and waits until the key was observed.
async fn event(app: &TestApp, key: &str, entry: Value) {
    let since = Utc::now();
    app.publish_raw(entry.to_string().as_bytes()).await;
    app.wait_observed(key, since).await;
}

async fn client(app: &TestApp, tenant: &str) -> String {
    let r = app
        .post(
            "/v1/clients",
            json!({ "name": format!("svc-{tenant}"), "tenants": [tenant] }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.expect("json");
    v["token"].as_str().expect("token").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_binds_after_a_test_wrap_and_bad_keys_are_refused_with_the_reason() {
    let peer = CloudKms::start().await;
    let app = app_with(&peer).await;
    let key = tenant_with_key(&app, &peer, "gb", json!({})).await;
    let kek = app.tenant("gb").await["keks"][0].clone();
    assert_eq!(
        (kek["provider"].as_str(), kek["current_version"].as_str()),
        (Some("gcp"), Some("1")),
        "{kek}"
    );
    assert!(peer.count("encrypt") >= 1 && peer.count("decrypt") >= 1);

    app.create_tenant("gb2").await;
    let sign = peer.create_key_with("signer", "ASYMMETRIC_SIGN");
    let denied = peer.create_key("denied");
    peer.deny(&denied, true);
    let disabled = peer.create_key("off");
    peer.set_state(&disabled, "1", "DISABLED");
    let missing = sign.replace("signer", "missing");
    for (key_ref, reason) in [
        (sign.as_str(), "ENCRYPT_DECRYPT"),
        (&version(&key, "1"), "not one of its versions"),
        (
            "projects/x/locations/global/keyRings/r/cryptoKeys/k",
            "project id",
        ),
        (&denied, "denied"),
        (&disabled, "disabled"),
        (&missing, "does not exist"),
    ] {
        let (status, body) = app.bind_key("gb2", "gcp", key_ref, json!({})).await;
        assert_eq!(status, 422, "{key_ref}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(reason)),
            "{key_ref}: {body}"
        );
    }
    // One key, one tenant.
    let (status, body) = app.bind_key("gb2", "gcp", &key, json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        peer.missing_checksums(),
        0,
        "every crypto call carried CRC32C fields"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deks_round_trip_through_key_access_bound_to_tenant_and_dek_by_the_aad() {
    let peer = CloudKms::start().await;
    let app = app_with(&peer).await;
    let key = tenant_with_key(&app, &peer, "ga", json!({})).await;
    let token = client(&app, "ga").await;
    let (status, created) = app.as_client(&token, "/v1/tenants/ga/deks").await;
    assert_eq!(status, 201, "{created}");
    let id = created["dek_id"].as_str().expect("id").to_owned();
    let (status, got) = app
        .as_client(&token, &format!("/v1/tenants/ga/deks/{id}/unwrap"))
        .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["plaintext"], created["plaintext"]);
    assert_eq!(got["kek_version"], "1");
    app.create_deks("ga", 2).await;
    // One token served every call so far (cached).
    assert_eq!(peer.count("token"), 1);

    // Cloud KMS itself decrypts a stored DEK only with the binding {tenant, dek}.
    let rows: Vec<(uuid::Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, wrapped FROM deks ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .expect("deks");
    let (first, wrapped) = &rows[0];
    let aad = |tenant: &str, dek| {
        DekContext {
            tenant_id: tenant,
            dek_id: dek,
        }
        .aad()
    };
    assert!(peer.decrypts(&key, wrapped, &aad("ga", *first)));
    assert!(!peer.decrypts(&key, wrapped, &aad("other", *first)));
    assert!(!peer.decrypts(&key, wrapped, &aad("ga", rows[1].0)));
    assert!(!peer.decrypts(&key, wrapped, b""));

    // A wrapped DEK moved to another row fails there, alone.
    sqlx::query("UPDATE deks SET wrapped = $1 WHERE id = $2")
        .bind(wrapped)
        .bind(rows[1].0)
        .execute(&app.pool)
        .await
        .expect("move");
    let (report, ok) = app.verify_deks("ga");
    assert!(!ok, "{report}");
    assert_eq!(
        (report["ok"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(1)),
        "{report}"
    );
    let moved = rows[1].0.to_string();
    let (status, body) = app
        .as_client(&token, &format!("/v1/tenants/ga/deks/{moved}/unwrap"))
        .await;
    assert_ne!(status, 200, "{body}");
    assert!(body.get("plaintext").is_none(), "{body}");
    assert_eq!(peer.missing_checksums(), 0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_primary_version_is_rewrapped_by_event_and_by_probe_alone() {
    let peer = CloudKms::start().await;
    let app = app_with(&peer).await;
    let key = tenant_with_key(&app, &peer, "gr", json!({})).await;
    app.create_deks("gr", 4).await;

    // Rotation as Cloud KMS logs it: a new version, then UpdateCryptoKeyPrimaryVersion.
    let v2 = peer.add_version(&key, true);
    app.publish_raw(
        audit_entry(
            "UpdateCryptoKeyPrimaryVersion",
            &key,
            json!({ "name": key, "cryptoKeyVersionId": v2 }),
            json!({}),
        )
        .to_string()
        .as_bytes(),
    )
    .await;
    let job = app
        .wait_job("gr", "completed", Duration::from_secs(60))
        .await;
    assert_eq!(
        (job["done"].as_u64(), job["target_version"].as_str()),
        (Some(4), Some("2")),
        "{job}"
    );
    let (report, ok) = app.verify_deks("gr");
    assert!(ok, "{report}");
    assert_eq!(report["by_version"]["2"], 4, "{report}");

    // The next rotation without any event: the probe finds it.
    let v3 = peer.add_version(&key, true);
    let s = sweeper(&app).await;
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(
        app.tenant("gr").await["keks"][0]["current_version"],
        v3.as_str()
    );
    wait_for("second job", Duration::from_secs(60), || async {
        app.rewrap_jobs("gr")
            .await
            .iter()
            .any(|j| j["target_version"] == v3.as_str() && j["state"] == "completed")
    })
    .await;
    let (report, ok) = app.verify_deks("gr");
    assert!(ok, "{report}");
    assert_eq!(report["by_version"]["3"], 4, "{report}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_events_act_on_their_version_only_end_to_end() {
    let peer = CloudKms::start().await;
    let app = app_with(&peer).await;

    // 1. An old version with no DEKs left under it is destroyed: nothing changes.
    let a = tenant_with_key(&app, &peer, "va", json!({})).await;
    app.create_deks("va", 2).await;
    let v2 = peer.add_version(&a, true);
    app.publish_raw(
        audit_entry(
            "CreateCryptoKeyVersion",
            &version(&a, &v2),
            json!({}),
            json!({ "primary": { "name": version(&a, &v2), "state": "ENABLED" } }),
        )
        .to_string()
        .as_bytes(),
    )
    .await;
    app.wait_job("va", "completed", Duration::from_secs(60))
        .await;
    peer.set_state(&a, "1", "DESTROY_SCHEDULED");
    event(
        &app,
        &a,
        audit_entry(
            "DestroyCryptoKeyVersion",
            &version(&a, "1"),
            json!({}),
            json!({ "state": "DESTROY_SCHEDULED", "destroyTime": "2026-12-29T00:00:00Z" }),
        ),
    )
    .await;
    // Not even for a moment: no access message, no revocation for the KMS to refute.
    assert_eq!(app.access("va").await, "accessible");
    assert_eq!(outbox_count(&app, "va", "tenant.inaccessible").await, 0);
    assert_eq!(audit_count(&app, "va", "revocation_unconfirmed").await, 0);
    app.create_deks("va", 1).await;
    let (report, ok) = app.verify_deks("va");
    assert!(ok, "{report}");

    // 2. An old version still holding DEKs is destroyed: access stays the primary's, those
    //    DEKs no longer unwrap, and the tenant hears of it once the destruction is final.
    let b = tenant_with_key(&app, &peer, "vb", json!({ "rewrap_on_rotation": false })).await;
    app.create_deks("vb", 2).await;
    let w2 = peer.add_version(&b, true);
    event(
        &app,
        &b,
        audit_entry(
            "UpdateCryptoKeyPrimaryVersion",
            &b,
            json!({ "cryptoKeyVersionId": w2 }),
            json!({}),
        ),
    )
    .await;
    assert_eq!(
        app.tenant("vb").await["keks"][0]["current_version"],
        w2.as_str()
    );
    peer.set_state(&b, "1", "DESTROY_SCHEDULED");
    event(
        &app,
        &b,
        audit_entry(
            "DestroyCryptoKeyVersion",
            &version(&b, "1"),
            json!({}),
            json!({ "state": "DESTROY_SCHEDULED" }),
        ),
    )
    .await;
    assert_eq!(app.access("vb").await, "accessible");
    assert_eq!(outbox_count(&app, "vb", "tenant.inaccessible").await, 0);
    assert_eq!(audit_count(&app, "vb", "revocation_unconfirmed").await, 0);
    app.create_deks("vb", 1).await;
    let (report, ok) = app.verify_deks("vb");
    assert!(!ok, "{report}");
    assert_eq!(
        (report["ok"].as_u64(), report["failed"].as_u64()),
        (Some(1), Some(2)),
        "{report}"
    );
    assert_eq!(audit_count(&app, "vb", "version_unusable").await, 1);
    peer.set_state(&b, "1", "DESTROYED");
    let s = sweeper(&app).await;
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("vb").await, "accessible");
    // One email to the tenant's one contact, naming the version.
    assert_eq!(outbox_count(&app, "vb", "key.destroyed_with_deks").await, 1);
    let payload: Value = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE tenant_id = 'vb' AND kind = 'key.destroyed_with_deks'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("payload");
    assert_eq!(payload["data"]["version"], "1", "{payload}");
    assert_eq!(payload["data"]["dek_count"], 2, "{payload}");
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(
        outbox_count(&app, "vb", "key.destroyed_with_deks").await,
        1,
        "told once"
    );

    // 3. The primary disabled, then an old version enabled: still inaccessible.
    let c = tenant_with_key(&app, &peer, "vc", json!({})).await;
    let u2 = peer.add_version(&c, true);
    event(
        &app,
        &c,
        audit_entry(
            "UpdateCryptoKeyPrimaryVersion",
            &c,
            json!({ "cryptoKeyVersionId": u2 }),
            json!({}),
        ),
    )
    .await;
    peer.set_state(&c, "1", "DISABLED");
    event(
        &app,
        &c,
        audit_entry(
            "UpdateCryptoKeyVersion",
            &version(&c, "1"),
            json!({ "cryptoKeyVersion": { "state": "DISABLED" }, "updateMask": "state" }),
            json!({ "state": "DISABLED" }),
        ),
    )
    .await;
    assert_eq!(
        app.access("vc").await,
        "accessible",
        "an old version without DEKs"
    );
    peer.set_state(&c, &u2, "DISABLED");
    app.publish_raw(
        audit_entry(
            "UpdateCryptoKeyVersion",
            &version(&c, &u2),
            json!({}),
            json!({ "state": "DISABLED" }),
        )
        .to_string()
        .as_bytes(),
    )
    .await;
    app.wait_access("vc", "inaccessible").await;
    peer.set_state(&c, "1", "ENABLED");
    event(
        &app,
        &c,
        audit_entry(
            "UpdateCryptoKeyVersion",
            &version(&c, "1"),
            json!({}),
            json!({ "state": "ENABLED" }),
        ),
    )
    .await;
    let tenant = app.tenant("vc").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["observed_state"], "disabled", "{tenant}");
    assert_eq!(
        app.post("/v1/tenants/vc/deks", json!({})).await.status(),
        409
    );
    // The primary enabled again: accessible.
    peer.set_state(&c, &u2, "ENABLED");
    event(
        &app,
        &c,
        audit_entry(
            "UpdateCryptoKeyVersion",
            &version(&c, &u2),
            json!({}),
            json!({ "state": "ENABLED" }),
        ),
    )
    .await;
    assert_eq!(app.access("vc").await, "accessible");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_iam_binding_revokes_and_quota_outage_or_token_failures_never_do() {
    let peer = CloudKms::start().await;
    let app = app_with(&peer).await;
    let key = tenant_with_key(&app, &peer, "gf", json!({})).await;
    app.create_deks("gf", 1).await;
    let s = sweeper(&app).await;

    // 429 and 503, however long they last, and a token endpoint that fails: outages.
    for fault in [Fault::Quota, Fault::Unavailable] {
        peer.fault(fault, 1000);
        run(&s, "key-probe", Utc::now()).await;
        let kek = app.tenant("gf").await["keks"][0].clone();
        assert_eq!(app.access("gf").await, "accessible", "{fault:?}");
        assert_eq!(kek["state"], "enabled", "{fault:?}: {kek}");
        assert_eq!(kek["revoked"], false, "{fault:?}: {kek}");
        let r = app.post("/v1/tenants/gf/deks", json!({})).await;
        assert_eq!(r.status(), 503, "{fault:?}");
        peer.fault(fault, 0);
    }
    peer.expire_tokens();
    peer.fail_tokens(1000);
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("gf").await, "accessible");
    assert_eq!(
        app.post("/v1/tenants/gf/deks", json!({})).await.status(),
        503
    );
    peer.fail_tokens(0);
    // A 429 that passes is retried after its Retry-After and succeeds.
    peer.fault(Fault::Quota, 1);
    app.create_deks("gf", 1).await;
    // A token Cloud KMS no longer takes (401) is replaced and the call goes through.
    let tokens = peer.count("token");
    peer.expire_tokens();
    app.create_deks("gf", 1).await;
    assert_eq!(peer.count("token"), tokens + 1);

    // Cloud KMS's own 403: byokd's access was revoked; found by the probe alone.
    peer.deny(&key, true);
    run(&s, "key-probe", Utc::now()).await;
    let tenant = app.tenant("gf").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["revoked"], true, "{tenant}");
    peer.deny(&key, false);
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("gf").await, "accessible");
    let (report, ok) = app.verify_deks("gf");
    assert!(ok, "{report}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_servers_token_serves_when_no_key_file_is_set() {
    let peer = CloudKms::start().await;
    let settings = peer.metadata_settings();
    let app = TestApp::spawn_with(|c| c.kms.gcp = Some(settings)).await;
    tenant_with_key(&app, &peer, "gm", json!({})).await;
    app.create_deks("gm", 2).await;
    assert_eq!((peer.count("metadata"), peer.count("token")), (1, 0));
    app.shutdown().await;
}
