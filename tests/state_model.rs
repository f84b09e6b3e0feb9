//! The state model against the real daemon, broker and database: the KMS is the truth, an
//! event only a hint. Each test is one way the old model (a fold of events ordered by their
//! own times) kept a revoked key usable or locked a tenant out: a forged future time, a
//! lagging KMS clock, same-time events on both queues, expiry set at the KMS, late and lost
//! expiry events, two sources reusing an id, and access changes by registration and
//! replacement. Vault-specific cases (revoked permissions, a proxy's 404, key_ref
//! traversal) are in `state_model_vault.rs`.

mod common;

use chrono::{Duration as Days, Utc};
use common::{TestApp, canonical, next_json, outbox_count, wait_for};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::{Value, json};
use std::time::Duration;

/// Publishes a canonical event with a routing key of our choosing, so a test decides which
/// queue (main or urgent lane) it lands in.
async fn publish_routed(app: &TestApp, routing_key: &str, body: &Value) {
    app.channel
        .basic_publish(
            app.config.amqp.lifecycle_exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

fn event_from(source: &str, id: &str, kind: &str, key: &str, at: chrono::DateTime<Utc>) -> Value {
    let mut e = canonical(id, kind, key, at, json!({}));
    e["source"] = source.into();
    e
}

async fn access(app: &TestApp, tenant: &str) -> String {
    app.tenant(tenant).await["access"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn wait_access(app: &TestApp, tenant: &str, expected: &str) {
    wait_for(
        &format!("{tenant} {expected}"),
        Duration::from_secs(20),
        || async { access(app, tenant).await == expected },
    )
    .await;
}

async fn dek_status(app: &TestApp, tenant: &str) -> u16 {
    app.post(&format!("/v1/tenants/{tenant}/deks"), json!({}))
        .await
        .status()
        .as_u16()
}

/// 1. An event dated far in the future is refused, over AMQP (dead-lettered with the reason)
///    and over HTTP (422); it poisons nothing, and the real `disabled` after it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_from_the_future_is_refused_and_later_real_events_still_apply() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("fut", "key-fut").await;
    let far = Utc::now() + Days::days(365);
    let forged = canonical("forged-1", "enabled", "key-fut", far, json!({}));
    app.publish_raw(forged.to_string().as_bytes()).await;
    let r = app
        .post(
            "/v1/events",
            canonical("forged-2", "enabled", "key-fut", far, json!({})),
        )
        .await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("ahead of byokd's clock")),
        "{body}"
    );
    // Just inside the allowed skew is fine.
    let near = canonical(
        "near",
        "expiring",
        "key-fut",
        Utc::now() + Days::minutes(4),
        json!({}),
    );
    assert_eq!(app.post("/v1/events", near).await.status(), 202);

    let mut dead = common::dead_letter_reader(&app).await;
    let (_, reason) = common::next_dead_letter(&mut dead).await;
    assert!(reason.contains("forged-1"), "{reason}");
    assert!(reason.contains("ahead of byokd's clock"), "{reason}");

    // The KMS disables the key and says so: applies, whatever came before.
    app.kms_do("key-fut", "disabled", &json!({})).await;
    app.publish("disabled", "key-fut", Utc::now(), json!({}))
        .await;
    wait_access(&app, "fut", "inaccessible").await;
    let since = Utc::now();
    app.wait_observed("key-fut", since - Days::seconds(1)).await;
    assert_eq!(access(&app, "fut").await, "inaccessible");
    app.shutdown().await;
}

/// 2. A KMS whose clock lags byokd's: its `disabled`, dated before the key was even
///    registered, still applies at once; and a far-past `enabled` restores nothing the KMS
///    does not confirm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_kms_clock_neither_delays_a_revocation_nor_forges_a_restore() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("lag", "key-lag").await;
    app.kms_do("key-lag", "disabled", &json!({})).await;
    let lagging = Utc::now() - Days::minutes(1) - Days::hours(1);
    app.publish("disabled", "key-lag", lagging, json!({})).await;
    wait_access(&app, "lag", "inaccessible").await;
    // Long-past `enabled` while the key is still disabled: a hint the KMS refutes.
    let since = Utc::now();
    app.publish("enabled", "key-lag", Utc::now() - Days::days(30), json!({}))
        .await;
    app.wait_processed(2).await;
    app.wait_observed("key-lag", since).await;
    assert_eq!(access(&app, "lag").await, "inaccessible");
    assert_eq!(dek_status(&app, "lag").await, 409);
    app.shutdown().await;
}

/// 3. `enabled` and `disabled` with the same timestamp, one on the main queue and one on
///    the urgent lane: the end state is the KMS's, both ways round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_time_events_on_both_queues_end_where_the_kms_is() {
    let app = TestApp::spawn().await;
    let when = Utc::now() - Days::seconds(5);
    for (tenant, kms_state, expected) in [
        ("same-off", "disabled", "inaccessible"),
        ("same-on", "enabled", "accessible"),
    ] {
        let key = format!("key-{tenant}");
        app.tenant_with_key(tenant, &key).await;
        app.kms_do(&key, "disabled", &json!({})).await;
        app.kms_do(&key, kms_state, &json!({})).await;
        let since = Utc::now();
        let disabled = canonical(&format!("{tenant}-d"), "disabled", &key, when, json!({}));
        let enabled = canonical(&format!("{tenant}-e"), "enabled", &key, when, json!({}));
        publish_routed(&app, "local.enabled", &enabled).await;
        publish_routed(&app, "local.disabled", &disabled).await;
        wait_for("both consumed", Duration::from_secs(20), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM processed_events WHERE event_id LIKE $1",
            )
            .bind(format!("{tenant}-%"))
            .fetch_one(&app.pool)
            .await
            .is_ok_and(|n| n == 2)
        })
        .await;
        app.wait_observed(&key, since).await;
        assert_eq!(access(&app, tenant).await, expected, "{tenant}");
    }
    app.shutdown().await;
}

/// 4. Expiry set in the past at the KMS (`byokd kms local set-expiry`), then `byokd sweep
///    expiry-scan`: the tenant is encrypt_blocked, the key expired, and the API's answer
///    and its enforcement agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_set_in_the_past_at_the_kms_blocks_encryption_and_the_api_agrees() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("past", "key-past").await;
    let run = |args: &[&str]| {
        let mut cmd = common::byokd_command();
        common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
        let out = cmd
            .env("BYOKD_SCHEDULES_DIR", "schedules")
            .args(args)
            .output()
            .expect("byokd");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let hour_ago = (Utc::now() - Days::hours(1)).to_rfc3339();
    run(&[
        "kms",
        "local",
        "set-expiry",
        "key-past",
        "--expires-at",
        &hour_ago,
    ]);
    run(&["sweep", "expiry-scan"]);
    wait_access(&app, "past", "encrypt_blocked").await;
    let tenant = app.tenant("past").await;
    assert_eq!(tenant["keks"][0]["state"], "expired", "{tenant}");
    assert_eq!(dek_status(&app, "past").await, 409);
    // The same with no event at all: the probe reads the date from the KMS.
    app.tenant_with_key("past2", "key-past2").await;
    run(&[
        "kms",
        "local",
        "set-expiry",
        "key-past2",
        "--expires-at",
        &hour_ago,
        "--no-event",
    ]);
    run(&["sweep", "key-probe"]);
    assert_eq!(access(&app, "past2").await, "encrypt_blocked");
    assert_eq!(dek_status(&app, "past2").await, 409);
    assert_eq!(outbox_count(&app, "past2", "key.expired").await, 2);
    app.shutdown().await;
}

/// 5. A late `expired` does not override a newer extension; a lost extension and a lost
///    re-enable after expiry are both recovered by the probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_and_lost_expiry_events_end_where_the_kms_is() {
    let app = TestApp::spawn().await;
    let future = (Utc::now() + Days::days(90)).to_rfc3339();
    // Late `expired` after the extension: fail-safe for a moment, then the KMS's date.
    app.tenant_with_key("late", "key-late").await;
    app.kms_do("key-late", "expired", &json!({})).await;
    app.kms_do(
        "key-late",
        "expiry_changed",
        &json!({ "expires_at": future }),
    )
    .await;
    let since = Utc::now();
    app.publish(
        "expiry_changed",
        "key-late",
        common::at(20),
        json!({ "expires_at": future }),
    )
    .await;
    app.publish("expired", "key-late", common::at(10), json!({}))
        .await;
    app.wait_processed(2).await;
    app.wait_observed("key-late", since).await;
    assert_eq!(access(&app, "late").await, "accessible");

    // Expired, then extended at the KMS with the event lost; and expired, disabled, then
    // enabled and extended silently.
    for (tenant, extra) in [("lost-ext", None), ("lost-enable", Some("disabled"))] {
        let key = format!("key-{tenant}");
        app.tenant_with_key(tenant, &key).await;
        app.kms_do(&key, "expired", &json!({})).await;
        let since = Utc::now();
        app.publish("expired", &key, Utc::now(), json!({})).await;
        wait_access(&app, tenant, "encrypt_blocked").await;
        // Confirmed by the KMS: from here on only the probe can learn what happens next.
        app.wait_observed(&key, since).await;
        if let Some(kind) = extra {
            app.kms_do(&key, kind, &json!({})).await;
            let since = Utc::now();
            app.publish(kind, &key, Utc::now(), json!({})).await;
            wait_access(&app, tenant, "inaccessible").await;
            app.wait_observed(&key, since).await;
            app.kms_do(&key, "enabled", &json!({})).await;
        }
        app.kms_do(&key, "expiry_changed", &json!({ "expires_at": future }))
            .await;
    }
    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .env("BYOKD_SCHEDULES_DIR", "schedules")
        .args(["sweep", "key-probe"])
        .output()
        .expect("probe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for tenant in ["lost-ext", "lost-enable"] {
        assert_eq!(access(&app, tenant).await, "accessible", "{tenant}");
        assert_eq!(outbox_count(&app, tenant, "tenant.restored").await, 2);
    }
    app.shutdown().await;
}

/// 8. Two KMS sources both using id `evt-0001`: CloudEvents makes (source, id) unique, so
///    the second source's revocation is not lost as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sources_reusing_an_event_id_are_two_events() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("src-a", "key-src-a").await;
    app.tenant_with_key("src-b", "key-src-b").await;
    app.kms_do("key-src-a", "disabled", &json!({})).await;
    app.kms_do("key-src-b", "disabled", &json!({})).await;
    let now = Utc::now();
    for (source, key) in [("kms://a", "key-src-a"), ("kms://b", "key-src-b")] {
        let e = event_from(source, "evt-0001", "disabled", key, now);
        app.publish_raw(e.to_string().as_bytes()).await;
    }
    // A true duplicate (same source, same id) is still one event.
    let again = event_from("kms://a", "evt-0001", "disabled", "key-src-a", now);
    app.publish_raw(again.to_string().as_bytes()).await;
    app.wait_processed(2).await;
    wait_access(&app, "src-a", "inaccessible").await;
    wait_access(&app, "src-b", "inaccessible").await;
    let audit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE event_id = 'evt-0001'")
            .fetch_one(&app.pool)
            .await
            .expect("audit");
    assert_eq!(audit, 2);
    app.shutdown().await;
}

/// 10. Registration and replacement change access like any other cause (one access message,
///     notifications); a replacement whose old key is disabled shows the tenant inaccessible
///     with the DEKs it holds; destroying that key says how many DEKs were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_replacement_changes_are_broadcast_and_held_deks_count() {
    let app = TestApp::spawn().await;
    let mut messages = app.access_listener().await;
    // A key registered with an expiry already past: encrypt_blocked at once, with its
    // message (byokd's own KMS takes the date; the key passed its test wrap before).
    app.create_local_key("key-reg").await;
    app.post(
        "/v1/tenants",
        json!({ "id": "reg", "name": "Reg", "contacts": ["ops@reg.example"] }),
    )
    .await;
    let r = app
        .post(
            "/v1/tenants/reg/keks",
            json!({ "provider": "local", "key_ref": "key-reg",
                    "expires_at": (Utc::now() - Days::hours(1)).to_rfc3339() }),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let (routing, body) = next_json(&mut messages, Duration::from_secs(10))
        .await
        .expect("access message");
    assert_eq!(routing, "tenant.access.encrypt_blocked");
    assert_eq!(body["cause"], "registration");
    assert_eq!(outbox_count(&app, "reg", "key.expired").await, 1);

    // The tenant's key is disabled: inaccessible. Replacing it with a good key cannot move
    // the DEKs off the disabled one: the tenant stays inaccessible, saying why.
    app.tenant_with_key("rep", "key-old").await;
    app.bulk_deks("rep", "key-old", 25).await;
    app.kms_do("key-old", "disabled", &json!({})).await;
    app.publish("disabled", "key-old", Utc::now(), json!({}))
        .await;
    wait_access(&app, "rep", "inaccessible").await;
    let (routing, _) = next_json(&mut messages, Duration::from_secs(10))
        .await
        .expect("access message");
    assert_eq!(routing, "tenant.access.inaccessible");
    app.create_local_key("key-new").await;
    let r = app
        .post(
            "/v1/tenants/rep/keks",
            json!({ "provider": "local", "key_ref": "key-new", "replace": true }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let job = app
        .wait_job("rep", "waiting", Duration::from_secs(20))
        .await;
    assert_eq!(job["kind"], "replacement", "{job}");
    let tenant = app.tenant("rep").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    let reason = tenant["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("25 DEKs") && reason.contains("key-old") && reason.contains("disabled"),
        "{reason}"
    );
    // Destroyed at the KMS: the 25 DEKs are gone, and the tenant is told how many.
    app.kms_do("key-old", "destroyed", &json!({})).await;
    app.publish("destroyed", "key-old", Utc::now(), json!({}))
        .await;
    wait_for("destroyed with DEKs", Duration::from_secs(20), || async {
        outbox_count(&app, "rep", "key.destroyed_with_deks").await == 2
    })
    .await;
    let lost: Value = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE tenant_id = 'rep' AND kind = 'key.destroyed_with_deks'
         AND channel = 'webhook'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("payload");
    assert_eq!(lost["data"]["dek_count"], 25, "{lost}");
    assert_eq!(access(&app, "rep").await, "inaccessible");

    // A replacement that can move everything: accessible again once the old key is retired.
    app.tenant_with_key("rep2", "key-old2").await;
    app.bulk_deks("rep2", "key-old2", 10).await;
    app.create_local_key("key-new2").await;
    let r = app
        .post(
            "/v1/tenants/rep2/keks",
            json!({ "provider": "local", "key_ref": "key-new2", "replace": true }),
        )
        .await;
    assert_eq!(r.status(), 201);
    app.wait_job("rep2", "completed", Duration::from_secs(30))
        .await;
    assert_eq!(access(&app, "rep2").await, "accessible");
    app.shutdown().await;
}
