//! The state model against a real OpenBao: the KMS is the truth, in both directions.
//!
//! * A permission revoked at Vault (the token's policy stops allowing encrypt/decrypt while
//!   metadata still reads fine) blocks the tenant at once when its event arrives, stays
//!   blocked when the KMS confirms it, is not lifted by a probe or by an `access_restored`
//!   event the KMS refutes, and is lifted once Vault really allows the key again. A lost
//!   revocation is found by the probe's test wrap.
//! * A 404 that is not Vault's own (a misrouted proxy's HTML page) is indeterminate: a
//!   `destroyed` event still blocks at once (fail-safe), but nothing marks the key destroyed,
//!   and once Vault answers again the claim is refuted and every DEK still unwraps. Without an
//!   event, such a 404 never changes access.
//! * A Vault key reference that leaves its key (`x/../acme-kek`) is refused at registration,
//!   and no spelling lets a second tenant bind a key another tenant registered.
//! * (Ignored until byokd is fixed) a confirming event right behind a revocation must not cut
//!   the revocation's settle time.
//!
//! Each test has its own transit mount (and policies) on the shared OpenBao dev server and its
//! own daemon, database and queues. The fault responder stands in front of OpenBao as the
//! daemon's Vault address and switches between forwarding and answering an HTML 404.

mod common;

use chrono::{DateTime, Utc};
use common::http_fault::Responder;
use common::sweeps::{run, sweeper};
use common::vault::Vault;
use common::{TestApp, at, next_json, outbox_count, wait_for};
use serde_json::{Value, json};
use std::time::Duration;

/// What a reverse proxy, an ingress or a load balancer with a wrong route answers.
const HTML_404: &str = "<html>not found</html>";

/// Creates a tenant with one contact (so each notification is one outbox row) and registers
/// its Vault key through the API (test wrap/unwrap at OpenBao).
async fn tenant_with_vault_key(app: &TestApp, tenant: &str, key_ref: &str) {
    let r = app
        .post(
            "/v1/tenants",
            json!({ "id": tenant, "name": format!("Tenant {tenant}"),
                    "contacts": [format!("ops@{tenant}.example")] }),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let r = app
        .post(
            &format!("/v1/tenants/{tenant}/keks"),
            json!({ "provider": "vault", "key_ref": key_ref }),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
}

/// Publishes a canonical event about a Vault key.
async fn publish_vault(app: &TestApp, kind: &str, key_ref: &str) -> String {
    app.publish(kind, key_ref, at(0), json!({ "provider": "vault" }))
        .await
}

async fn create_dek(app: &TestApp, tenant: &str) -> reqwest::Response {
    app.post(&format!("/v1/tenants/{tenant}/deks"), json!({}))
        .await
}

/// The next `byok.access` message, which must say `access` and come from `cause`.
async fn expect_access(
    consumer: &mut lapin::Consumer,
    tenant: &str,
    access: &str,
    cause: &str,
) -> Value {
    let (routing, body) = next_json(consumer, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no access message ({access} from {cause})"));
    assert_eq!(routing, format!("tenant.access.{access}"), "{body}");
    assert_eq!(body["tenant_id"], tenant, "{body}");
    assert_eq!(body["cause"], cause, "{body}");
    body
}

/// A mount of this test's own with key `name`, and a token holding what byokd needs on it
/// (the policy `byokd`, rewritten by tests that revoke it).
async fn vault_with_key(name: &str) -> (Vault, String) {
    let vault = Vault::new("smv").await;
    vault.create_key(name).await;
    vault.put_policy("byokd", &vault.full_rules()).await;
    let token = vault.token("byokd").await;
    (vault, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permission_revoked_at_vault_blocks_until_vault_allows_the_key_again() {
    let (vault, token) = vault_with_key("tenant-kek").await;
    let settings = vault.settings(&vault.addr, &token);
    let app = TestApp::spawn_with(|c| c.kms.vault = Some(settings)).await;
    let mut access = app.access_listener().await;
    tenant_with_vault_key(&app, "pv", "tenant-kek").await;
    assert_eq!(create_dek(&app, "pv").await.status(), 201);

    // The operator takes encrypt/decrypt away from byokd's token; metadata still reads.
    vault.put_policy("byokd", &vault.read_only_rules()).await;
    assert_eq!(vault.try_read(&token, "tenant-kek").await, 200);
    let (status, body) = vault.try_encrypt(&token, "tenant-kek").await;
    assert_eq!(status, 403, "encrypt is denied: {body}");

    // (a) The event blocks at once (the access change is the event's own, not an
    // observation's), and the confirmation, whose test wrap gets a 403, keeps it blocked.
    let since = Utc::now();
    let revoked_id = publish_vault(&app, "access_revoked", "tenant-kek").await;
    app.wait_processed(1).await;
    let message = expect_access(&mut access, "pv", "inaccessible", "event").await;
    assert_eq!(message["event_id"], revoked_id.as_str());
    assert_eq!(app.tenant("pv").await["access"], "inaccessible");
    app.wait_observed("tenant-kek", since).await;
    let tenant = app.tenant("pv").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    let kek = &tenant["keks"][0];
    assert_eq!(kek["revoked"], true, "observed revoked: {tenant}");
    assert_eq!(kek["confirmed"], true, "{tenant}");
    assert_eq!(kek["observed_state"], "enabled", "{tenant}");
    assert!(
        tenant["reason"]
            .as_str()
            .is_some_and(|r| r.contains("revoked at the KMS")),
        "the reason is the KMS's answer now: {tenant}"
    );
    let refused = create_dek(&app, "pv").await;
    assert_eq!(refused.status(), 409);
    assert_eq!(outbox_count(&app, "pv", "tenant.inaccessible").await, 1);
    let unconfirmed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'revocation_unconfirmed'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("audit");
    assert_eq!(unconfirmed, 0, "the KMS confirmed the revocation");

    // (b) The probe asks Vault too: same answer, access is not restored.
    let s = sweeper(&app).await;
    let report = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(
        (
            report["probed"].as_i64(),
            report["changes"].as_i64(),
            report["unreachable"].as_i64(),
            report["unconfirmed"].as_i64()
        ),
        (Some(1), Some(0), Some(0), Some(0)),
        "{report}"
    );
    assert_eq!(app.tenant("pv").await["access"], "inaccessible");
    assert_eq!(outbox_count(&app, "pv", "tenant.restored").await, 0);
    assert_eq!(create_dek(&app, "pv").await.status(), 409);

    // (c) An `access_restored` the KMS refutes changes nothing.
    let since = Utc::now();
    publish_vault(&app, "access_restored", "tenant-kek").await;
    app.wait_processed(2).await;
    app.wait_observed("tenant-kek", since).await;
    let tenant = app.tenant("pv").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["revoked"], true, "{tenant}");
    assert_eq!(outbox_count(&app, "pv", "tenant.restored").await, 0);
    assert_eq!(outbox_count(&app, "pv", "tenant.inaccessible").await, 1);
    assert_eq!(create_dek(&app, "pv").await.status(), 409);

    // (d) Vault allows the key again and says so: accessible within the confirmation delay,
    // with one restored notification and one access message. (AMQP outbox rows are deleted
    // once published, so messages are counted on the listener: the next one after the
    // event's is this one, stamped after the restoration, so (b) and (c) sent none.)
    vault.put_policy("byokd", &vault.full_rules()).await;
    let since = Utc::now();
    assert_eq!(vault.try_encrypt(&token, "tenant-kek").await.0, 200);
    publish_vault(&app, "access_restored", "tenant-kek").await;
    app.wait_processed(3).await;
    wait_for("access restored", Duration::from_secs(15), || async {
        app.tenant("pv").await["access"] == "accessible"
    })
    .await;
    let message = expect_access(&mut access, "pv", "accessible", "observation").await;
    let stamped: DateTime<Utc> = serde_json::from_value(message["at"].clone()).expect("at");
    assert!(stamped >= since, "{message}");
    let tenant = app.tenant("pv").await;
    assert_eq!(tenant["keks"][0]["revoked"], false, "{tenant}");
    assert_eq!(outbox_count(&app, "pv", "tenant.restored").await, 1);
    assert_eq!(outbox_count(&app, "pv", "tenant.inaccessible").await, 1);
    assert_eq!(create_dek(&app, "pv").await.status(), 201);
    let (report, ok) = app.verify_deks("pv");
    assert!(ok, "{report}");
    assert_eq!(report["total"], 2, "{report}");

    app.shutdown().await;
    vault.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_permission_revocation_at_vault_is_found_by_the_probe() {
    let (vault, token) = vault_with_key("lost-kek").await;
    let settings = vault.settings(&vault.addr, &token);
    let app = TestApp::spawn_with(|c| c.kms.vault = Some(settings)).await;
    let mut access = app.access_listener().await;
    tenant_with_vault_key(&app, "lr", "lost-kek").await;
    let s = sweeper(&app).await;
    let quiet = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(
        (quiet["probed"].as_i64(), quiet["unchanged"].as_i64()),
        (Some(1), Some(1)),
        "{quiet}"
    );

    // Revoked at Vault; no event ever comes. Metadata alone would say "enabled": only the
    // probe's test wrap finds it.
    vault.put_policy("byokd", &vault.read_only_rules()).await;
    assert_eq!(vault.try_read(&token, "lost-kek").await, 200);
    let found = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(
        (found["changes"].as_i64(), found["unreachable"].as_i64()),
        (Some(1), Some(0)),
        "{found}"
    );
    let tenant = app.tenant("lr").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["revoked"], true, "{tenant}");
    assert_eq!(tenant["keks"][0]["observed_state"], "enabled", "{tenant}");
    assert!(
        tenant["reason"]
            .as_str()
            .is_some_and(|r| r.contains("revoked")),
        "{tenant}"
    );
    assert_eq!(create_dek(&app, "lr").await.status(), 409);
    assert_eq!(outbox_count(&app, "lr", "tenant.inaccessible").await, 1);
    expect_access(&mut access, "lr", "inaccessible", "observation").await;
    let source: String = sqlx::query_scalar(
        "SELECT source FROM audit_log WHERE key_ref = 'lost-kek' AND action = 'observed'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("audit");
    assert_eq!(source, "probe");

    // Allowed again, again with no event: the next probe restores.
    vault.put_policy("byokd", &vault.full_rules()).await;
    let back = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(back["changes"], 1, "{back}");
    assert_eq!(app.tenant("lr").await["access"], "accessible");
    assert_eq!(outbox_count(&app, "lr", "tenant.restored").await, 1);

    // Only decrypt is taken away: wrapping still works, so only the test unwrap can tell.
    vault.put_policy("byokd", &vault.encrypt_only_rules()).await;
    assert_eq!(vault.try_encrypt(&token, "lost-kek").await.0, 200);
    let half = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(half["changes"], 1, "{half}");
    let tenant = app.tenant("lr").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["revoked"], true, "{tenant}");
    assert_eq!(outbox_count(&app, "lr", "tenant.inaccessible").await, 2);
    app.shutdown().await;
    vault.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misrouted_404_never_destroys_a_key_and_vault_refutes_the_claim_once_it_answers() {
    let (vault, token) = vault_with_key("m-kek").await;
    let proxy = Responder::forwarding(vault.addr.trim_start_matches("http://")).await;
    let settings = vault.settings(&proxy.url(), &token);
    let app = TestApp::spawn_with(|c| c.kms.vault = Some(settings)).await;
    let mut access = app.access_listener().await;
    tenant_with_vault_key(&app, "mr", "m-kek").await;
    let dek: Value = create_dek(&app, "mr").await.json().await.expect("dek");
    let dek_id = dek["dek_id"].as_str().expect("dek id").to_owned();
    let kcv = dek["kcv"].clone();

    // The route to Vault breaks: every answer is a proxy's HTML 404. Then `destroyed` arrives.
    proxy.answer("404 Not Found", Some("text/html"), HTML_404);
    let destroyed_id = publish_vault(&app, "destroyed", "m-kek").await;
    app.wait_processed(1).await;
    let message = expect_access(&mut access, "mr", "inaccessible", "event").await;
    assert_eq!(message["event_id"], destroyed_id.as_str());
    assert_eq!(create_dek(&app, "mr").await.status(), 409);

    // The confirmation asks (after the claim's settle time) and gets no answer about the key.
    let pool = app.pool.clone();
    wait_for(
        "a confirmation attempt without an answer",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i32>(
                    "SELECT confirm_attempts FROM keks WHERE key_ref = 'm-kek'",
                )
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n >= 1)
            }
        },
    )
    .await;
    assert!(proxy.answered() >= 1, "the confirmation met the HTML 404");
    let claim_stands = |tenant: &Value| {
        let kek = &tenant["keks"][0];
        assert_eq!(tenant["access"], "inaccessible", "{tenant}");
        assert_eq!(kek["observed_state"], "enabled", "not destroyed: {tenant}");
        assert_eq!(kek["confirmed"], false, "{tenant}");
        assert_eq!(kek["claim"], "destroyed", "{tenant}");
        assert_eq!(kek["state"], "destroyed", "the claim is shown: {tenant}");
    };
    claim_stands(&app.tenant("mr").await);
    let stored: String = sqlx::query_scalar("SELECT state FROM keks WHERE key_ref = 'm-kek'")
        .fetch_one(&app.pool)
        .await
        .expect("state");
    assert_eq!(stored, "enabled");
    let got: Value = app
        .get(&format!("/v1/tenants/mr/deks/{dek_id}"))
        .await
        .json()
        .await
        .expect("dek");
    assert_eq!(got["unrecoverable"], false, "{got}");

    // The probe meets the same 404: unreachable, not destroyed.
    let s = sweeper(&app).await;
    let report = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(
        (
            report["probed"].as_i64(),
            report["unreachable"].as_i64(),
            report["changes"].as_i64()
        ),
        (Some(1), Some(1), Some(0)),
        "{report}"
    );
    claim_stands(&app.tenant("mr").await);
    let destroyed_notes = outbox_count(&app, "mr", "key.destroyed_with_deks").await;
    assert_eq!(destroyed_notes, 0, "no DEK was declared lost");

    // Vault answers again: the confirmation's retry finds the key usable, the claim is
    // refuted (and raised), the tenant is accessible, and the DEK still unwraps.
    proxy.forward();
    wait_for("the claim refuted", Duration::from_secs(30), || async {
        app.tenant("mr").await["access"] == "accessible"
    })
    .await;
    let tenant = app.tenant("mr").await;
    let kek = &tenant["keks"][0];
    assert_eq!(
        (
            &kek["state"],
            &kek["observed_state"],
            &kek["confirmed"],
            &kek["claim"]
        ),
        (
            &json!("enabled"),
            &json!("enabled"),
            &json!(true),
            &Value::Null
        ),
        "{tenant}"
    );
    expect_access(&mut access, "mr", "accessible", "observation").await;
    assert_eq!(outbox_count(&app, "mr", "tenant.restored").await, 1);
    let (source, claim): (String, Value) = sqlx::query_as(
        "SELECT source, detail->'claim' FROM audit_log WHERE action = 'revocation_unconfirmed'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("the unconfirmed revocation is audited");
    assert_eq!((source.as_str(), claim), ("confirm", json!("destroyed")));
    let (report, ok) = app.verify_deks("mr");
    assert!(ok, "{report}");
    assert_eq!((&report["total"], &report["ok"]), (&json!(1), &json!(1)));
    let got: Value = app
        .get(&format!("/v1/tenants/mr/deks/{dek_id}"))
        .await
        .json()
        .await
        .expect("dek");
    assert_eq!((&got["unrecoverable"], &got["kcv"]), (&json!(false), &kcv));
    assert_eq!(create_dek(&app, "mr").await.status(), 201);
    let quiet = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(
        (quiet["unchanged"].as_i64(), quiet["unreachable"].as_i64()),
        (Some(1), Some(0)),
        "{quiet}"
    );
    app.shutdown().await;
    vault.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misrouted_404_during_a_probe_never_changes_access() {
    let (vault, token) = vault_with_key("q-kek").await;
    let proxy = Responder::forwarding(vault.addr.trim_start_matches("http://")).await;
    let settings = vault.settings(&proxy.url(), &token);
    let app = TestApp::spawn_with(|c| c.kms.vault = Some(settings)).await;
    tenant_with_vault_key(&app, "mq", "q-kek").await;
    assert_eq!(create_dek(&app, "mq").await.status(), 201);
    let s = sweeper(&app).await;

    proxy.answer("404 Not Found", Some("text/html"), HTML_404);
    let t0 = Utc::now();
    for minutes in [0, 5, 10] {
        let report = run(&s, "key-probe", t0 + chrono::Duration::minutes(minutes)).await;
        assert_eq!(
            (
                report["unreachable"].as_i64(),
                report["changes"].as_i64(),
                report["unconfirmed"].as_i64()
            ),
            (Some(1), Some(0), Some(0)),
            "{report}"
        );
        let tenant = app.tenant("mq").await;
        assert_eq!(tenant["access"], "accessible", "{tenant}");
        let kek = &tenant["keks"][0];
        assert_eq!(
            (&kek["state"], &kek["revoked"], &kek["confirmed"]),
            (&json!("enabled"), &json!(false), &json!(true)),
            "{tenant}"
        );
    }
    assert!(proxy.answered() >= 3, "every probe met the HTML 404");
    let keks: Vec<(String, bool)> = sqlx::query_as("SELECT state, revoked FROM keks")
        .fetch_all(&app.pool)
        .await
        .expect("keks");
    assert_eq!(keks, vec![("enabled".to_owned(), false)]);
    for kind in ["tenant.inaccessible", "tenant.restored", "key.unreachable"] {
        assert_eq!(outbox_count(&app, "mq", kind).await, 0, "{kind}");
    }
    let observed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'observed'")
            .fetch_one(&app.pool)
            .await
            .expect("audit");
    assert_eq!(observed, 0, "no observation recorded from a proxy's page");

    proxy.forward();
    let back = run(&s, "key-probe", t0 + chrono::Duration::minutes(15)).await;
    assert_eq!(
        (back["unchanged"].as_i64(), back["unreachable"].as_i64()),
        (Some(1), Some(0)),
        "{back}"
    );
    assert_eq!(create_dek(&app, "mq").await.status(), 201);
    app.shutdown().await;
    vault.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_key_refs_that_leave_their_key_are_refused_at_registration() {
    let (vault, token) = vault_with_key("acme-kek").await;
    let settings = vault.settings(&vault.addr, &token);
    let app = TestApp::spawn_with(|c| c.kms.vault = Some(settings)).await;
    for id in ["ta", "tb"] {
        let r = app
            .post("/v1/tenants", json!({ "id": id, "name": id }))
            .await;
        assert_eq!(r.status(), 201);
    }
    let register = |tenant: &'static str, key_ref: String| {
        let app = &app;
        async move {
            let r = app
                .post(
                    &format!("/v1/tenants/{tenant}/keks"),
                    json!({ "provider": "vault", "key_ref": key_ref }),
                )
                .await;
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (
                status,
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
    };

    // References that leave their key are refused before the store or Vault sees them.
    for bad in ["x/../acme-kek", "../../sys/mounts", "acme-kek/"] {
        let (status, error) = register("ta", bad.to_owned()).await;
        assert_eq!(status, 422, "{bad:?}: {error}");
        assert!(error.contains("key_ref"), "{bad:?}: {error}");
    }
    let (status, error) = register("ta", "acme-kek".to_owned()).await;
    assert_eq!(status, 201, "{error}");

    // No spelling lets tenant B bind tenant A's key.
    for spelling in [
        "./acme-kek",
        "x/../acme-kek",
        "acme-kek/",
        "acme-kek/.",
        "/acme-kek",
        "transit/../acme-kek",
        "acme-kek%2F",
        "acme%2Dkek",
        " acme-kek",
        "acme-kek\n",
        ".",
        "..",
    ] {
        let (status, error) = register("tb", spelling.to_owned()).await;
        assert_eq!(status, 422, "{spelling:?}: {error}");
        assert!(
            error.contains("invalid vault key_ref"),
            "{spelling:?} is refused as invalid: {error}"
        );
    }
    // Valid names that are other keys (Transit names are case-sensitive): no such key.
    for other in ["ACME-KEK", "acme-kek.", ".acme-kek"] {
        let (status, error) = register("tb", other.to_owned()).await;
        assert_eq!(status, 422, "{other:?}: {error}");
        assert!(error.contains("test wrap"), "{other:?}: {error}");
    }
    let (status, error) = register("tb", "acme-kek".to_owned()).await;
    assert_eq!(status, 409, "{error}");
    assert!(error.contains("already registered"), "{error}");

    let owners: Vec<(String, String)> =
        sqlx::query_as("SELECT tenant_id, key_ref FROM keks ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .expect("keks");
    assert_eq!(owners, vec![("ta".to_owned(), "acme-kek".to_owned())]);
    assert_eq!(app.tenant("tb").await["keks"], json!([]));
    let r = app.post("/v1/tenants/tb/deks", json!({})).await;
    assert_eq!(r.status(), 409, "tenant B has no key");
    // Nothing was created in Vault by the refused names.
    let keys = vault
        .root(
            reqwest::Method::from_bytes(b"LIST").expect("method"),
            &format!("{}/keys", vault.mount),
            None,
        )
        .await;
    assert_eq!(keys["data"]["keys"], json!(["acme-kek"]), "{keys}");
    app.shutdown().await;
    vault.cleanup().await;
}

/// byokd bug, found by this file (ignored until fixed; run with `--ignored`). A revocation's
/// confirmation waits [`byokd::lifecycle::CLAIM_SETTLE`] so that a KMS read that still shows
/// the old state cannot refute a true revocation. But any event that asks for an immediate
/// confirmation (`access_restored`, `enabled`, `rotated`, `expiring`, ...) and arrives within
/// that window pulls the key's confirmation forward (`request_confirmation` takes
/// `LEAST(due, now)`, and `lifecycle::plan` drops the settled one), and the observation made at
/// once settles the young claim: here Vault denies from +0.7 s, yet the claim is refuted a few
/// milliseconds after the event, the tenant is reopened with a `tenant.restored`, a false
/// `revocation_unconfirmed` alert is raised, and the tenant is blocked again only by the
/// recheck 30 s later (a second `tenant.inaccessible`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirming_event_right_behind_a_revocation_does_not_cut_its_settle_time() {
    let (vault, token) = vault_with_key("s-kek").await;
    let settings = vault.settings(&vault.addr, &token);
    let app = TestApp::spawn_with(|c| c.kms.vault = Some(settings)).await;
    tenant_with_vault_key(&app, "st", "s-kek").await;

    // The revocation's event arrives a moment before Vault shows it (what the settle time is
    // for); an `access_restored` is delivered right behind it (late, out of order).
    let t0 = Utc::now();
    publish_vault(&app, "access_revoked", "s-kek").await;
    publish_vault(&app, "access_restored", "s-kek").await;
    app.wait_processed(2).await;
    // A step of the scenario, not an assertion: Vault shows the revocation 0.7 s later.
    tokio::time::sleep(Duration::from_millis(700)).await;
    vault.put_policy("byokd", &vault.read_only_rules()).await;
    let changed = Utc::now();
    assert!(
        changed - t0 < byokd::lifecycle::CLAIM_SETTLE - chrono::Duration::milliseconds(500),
        "too slow to stage the change inside the settle time"
    );
    let tenant = app.tenant("st").await;
    assert_eq!(
        tenant["access"], "inaccessible",
        "an observation made before the claim's settle time refuted it: {tenant}"
    );
    let pool = app.pool.clone();
    wait_for(
        "the revocation confirmed after its settle time",
        Duration::from_secs(15),
        || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, bool>(
                    "SELECT observed_at > $1 AND claim IS NULL FROM keks WHERE key_ref = 's-kek'",
                )
                .bind(changed)
                .fetch_one(&pool)
                .await
                .unwrap_or(false)
            }
        },
    )
    .await;
    let tenant = app.tenant("st").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["revoked"], true, "{tenant}");
    assert_eq!(outbox_count(&app, "st", "tenant.restored").await, 0);
    assert_eq!(outbox_count(&app, "st", "tenant.inaccessible").await, 1);
    let unconfirmed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'revocation_unconfirmed'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("audit");
    assert_eq!(unconfirmed, 0, "no false alert");
    app.shutdown().await;
    vault.cleanup().await;
}
