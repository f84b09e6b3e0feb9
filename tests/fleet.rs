//! Fleet views and crypto-shredding against the real database and RabbitMQ: tenants and
//! active re-wrap jobs in keyset pages with their bad parameters refused, and
//! `DELETE /v1/tenants/{id}?confirm=ID` removing the tenant's DEKs for good while the audit
//! trail stays whole and verifiable. Every test runs on PostgreSQL and on SQLite.

mod common;

use common::{Backend, TOKEN, TestApp, byokd_command, wait_for, with_service_env};
use serde_json::{Value, json};
use std::time::Duration;

async fn body(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn create_tenant(app: &TestApp, id: &str) {
    let r = app
        .post(
            "/v1/tenants",
            json!({ "id": id, "name": format!("Tenant {id}") }),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
}

fn ids(page: &Value, list: &str, field: &str) -> Vec<Value> {
    page[list]
        .as_array()
        .unwrap_or_else(|| panic!("{list} in {page}"))
        .iter()
        .map(|t| t[field].clone())
        .collect()
}

on_both_backends!(tenants_come_in_keyset_pages_filtered_by_access);
async fn tenants_come_in_keyset_pages_filtered_by_access(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    for id in ["t01", "t02", "t04", "t05"] {
        create_tenant(&app, id).await;
    }
    // t03's key is disabled at the KMS and the event says so: inaccessible.
    app.tenant_with_key("t03", "t03-kek").await;
    app.kms_do("t03-kek", "disabled", &json!({})).await;
    app.publish("disabled", "t03-kek", common::at(0), json!({}))
        .await;
    wait_for("t03 inaccessible", Duration::from_secs(30), || async {
        app.tenant("t03").await["access"] == "inaccessible"
    })
    .await;

    let (status, page) = body(app.get("/v1/tenants?limit=2").await).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page, "tenants", "id"), [json!("t01"), json!("t02")]);
    assert_eq!(page["next"], "t02");
    let (_, page) = body(app.get("/v1/tenants?limit=2&after=t02").await).await;
    assert_eq!(ids(&page, "tenants", "id"), [json!("t03"), json!("t04")]);
    assert_eq!(page["tenants"][0]["access"], "inaccessible");
    let (_, page) = body(app.get("/v1/tenants?limit=2&after=t04").await).await;
    assert_eq!(ids(&page, "tenants", "id"), [json!("t05")]);
    assert_eq!(page["next"], Value::Null, "the last page says so");
    let (_, page) = body(app.get("/v1/tenants").await).await;
    assert_eq!(
        ids(&page, "tenants", "id").len(),
        5,
        "default limit holds all"
    );
    assert_eq!(page["next"], Value::Null);

    let (_, page) = body(app.get("/v1/tenants?access=inaccessible").await).await;
    assert_eq!(ids(&page, "tenants", "id"), [json!("t03")]);
    assert_eq!(
        page["tenants"][0]["reason"].as_str().map(str::is_empty),
        Some(false)
    );
    let (_, page) = body(
        app.get("/v1/tenants?access=accessible&after=t01&limit=1000")
            .await,
    )
    .await;
    assert_eq!(
        ids(&page, "tenants", "id"),
        [json!("t02"), json!("t04"), json!("t05")]
    );
    let (_, page) = body(app.get("/v1/tenants?access=encrypt_blocked").await).await;
    assert_eq!(ids(&page, "tenants", "id"), Vec::<Value>::new());

    for (query, says) in [
        ("limit=0", "limit must be an integer from 1 to 1000"),
        ("limit=1001", "limit must be an integer from 1 to 1000"),
        ("limit=ten", "limit must be an integer from 1 to 1000"),
        ("limit=-5", "limit must be an integer from 1 to 1000"),
        (
            "access=revoked",
            "access must be accessible, encrypt_blocked or inaccessible",
        ),
        ("access=", "access must be"),
    ] {
        let (status, error) = body(app.get(&format!("/v1/tenants?{query}")).await).await;
        assert_eq!(status, 400, "{query}: {error}");
        assert!(
            error["error"].as_str().is_some_and(|e| e.contains(says)),
            "{query}: {error}"
        );
    }
    // Hostile cursors find nothing rather than fail.
    let (status, page) = body(app.get("/v1/tenants?after=%00%FF").await).await;
    assert!(status == 200 || status == 400, "{status}: {page}");
    let (status, page) = body(app.get("/v1/tenants?after=zzzz").await).await;
    assert_eq!((status, ids(&page, "tenants", "id").len()), (200, 0));
    app.shutdown().await;
}

/// Inserts a re-wrap job of `tenant`'s key in `state`, due only in a day so no worker runs
/// it meanwhile; returns its id.
async fn job(app: &TestApp, tenant: &str, version: &str, state: &str) -> i64 {
    let tomorrow = chrono::Utc::now() + chrono::Duration::days(1);
    // Columns PostgreSQL fills by default are given, so the same statement runs on SQLite.
    app.sql(
        "INSERT INTO rewrap_jobs (tenant_id, kind, kek_id, target_kek_id, target_version,
                                  state, not_before, created_at, updated_at)
         SELECT $1, 'rotation', id, id, $2, $3, $4, $5, $5
         FROM keks WHERE tenant_id = $1 RETURNING id",
    )
    .bind(tenant)
    .bind(version)
    .bind(state)
    .bind(tomorrow)
    .bind(chrono::Utc::now())
    .int()
    .await
}

on_both_backends!(active_rewrap_jobs_of_every_tenant_come_in_keyset_pages);
async fn active_rewrap_jobs_of_every_tenant_come_in_keyset_pages(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("acme", "acme-kek").await;
    app.tenant_with_key("globex", "globex-kek").await;
    let a1 = job(&app, "acme", "7", "pending").await;
    let g1 = job(&app, "globex", "7", "waiting").await;
    let done = job(&app, "acme", "8", "completed").await;
    let a2 = job(&app, "acme", "9", "pending").await;
    let g2 = job(&app, "globex", "8", "failed").await;

    let (status, page) = body(app.get("/v1/rewrap-jobs?limit=2").await).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(ids(&page, "jobs", "id"), [json!(a1), json!(g1)]);
    assert_eq!(
        ids(&page, "jobs", "tenant_id"),
        [json!("acme"), json!("globex")]
    );
    assert_eq!(page["next"], g1);
    let (_, page) = body(
        app.get(&format!("/v1/rewrap-jobs?limit=2&after={g1}"))
            .await,
    )
    .await;
    assert_eq!(
        ids(&page, "jobs", "id"),
        [json!(a2)],
        "completed and failed jobs are not active"
    );
    assert_eq!(page["next"], Value::Null);

    // With a tenant: every job of that tenant, newest first, as before.
    let (_, jobs) = body(app.get("/v1/rewrap-jobs?tenant=acme").await).await;
    let listed: Vec<Value> = jobs
        .as_array()
        .expect("a tenant's jobs are an array")
        .iter()
        .map(|j| j["id"].clone())
        .collect();
    assert_eq!(listed, [json!(a2), json!(done), json!(a1)]);
    assert!(!listed.contains(&json!(g2)));

    for query in ["after=x", "after=1.5", "limit=0", "limit=1001"] {
        let (status, error) = body(app.get(&format!("/v1/rewrap-jobs?{query}")).await).await;
        assert_eq!(status, 400, "{query}: {error}");
        assert!(error["error"].is_string(), "{query}: {error}");
    }
    let (status, _) = body(app.get("/v1/rewrap-jobs?tenant=ghost").await).await;
    assert_eq!(status, 404);
    app.shutdown().await;
}

/// `byokd ARGS` against the test's database: (stdout, stderr, success).
fn byokd(app: &TestApp, args: &[&str]) -> (String, String, bool) {
    let mut cmd = byokd_command();
    with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd.args(args).output().expect("run byokd");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.sql(sql).bind("acme").int().await
}

on_both_backends!(deleting_a_tenant_shreds_its_deks_and_keeps_the_audit_trail_verifiable);
async fn deleting_a_tenant_shreds_its_deks_and_keeps_the_audit_trail_verifiable(backend: Backend) {
    let app = TestApp::spawn_on_with(backend, |c| c.audit.chain_interval_ms = 20).await;
    app.tenant_with_key("acme", "acme-kek").await;
    app.tenant_with_key("globex", "globex-kek").await;
    let r = app
        .post(
            "/v1/clients",
            json!({ "name": "billing", "tenants": ["acme"] }),
        )
        .await;
    let client: Value = r.json().await.expect("client");
    let token = client["token"].as_str().expect("token").to_owned();
    let r = app
        .post(
            "/v1/clients",
            json!({ "name": "reporting", "tenants": ["acme", "globex"] }),
        )
        .await;
    let reporting: Value = r.json().await.expect("client");
    let reporting = reporting["token"].as_str().expect("token").to_owned();
    let mut deks = Vec::new();
    for _ in 0..3 {
        let r = app
            .http
            .post(app.url("/v1/tenants/acme/deks"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("create DEK");
        let (status, dek) = body(r).await;
        assert_eq!(status, 201, "{dek}");
        deks.push(dek["dek_id"].as_str().expect("id").to_owned());
    }
    let unwrap = |dek: String| {
        let app = &app;
        let token = token.clone();
        async move {
            body(
                app.http
                    .post(app.url(&format!("/v1/tenants/acme/deks/{dek}/unwrap")))
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("unwrap"),
            )
            .await
        }
    };
    // Unwrapped once, so the DEK sits in the key-access cache too.
    assert_eq!(unwrap(deks[0].clone()).await.0, 200);
    let globex_dek = body(app.post("/v1/tenants/globex/deks", json!({})).await)
        .await
        .1;

    // Refused unless confirmed with the id itself; nothing is lost meanwhile.
    for query in [
        "",
        "?confirm=",
        "?confirm=ACME",
        "?confirm=globex",
        "?confirm=acme%20",
    ] {
        let r = app
            .http
            .delete(app.url(&format!("/v1/tenants/acme{query}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("delete");
        let (status, error) = body(r).await;
        assert_eq!(status, 400, "{query}: {error}");
        assert!(
            error["error"]
                .as_str()
                .is_some_and(|e| e.contains("?confirm=acme")),
            "{query}: {error}"
        );
    }
    assert_eq!(
        count(&app, "SELECT count(*) FROM deks WHERE tenant_id = $1").await,
        3
    );
    let r = app
        .http
        .delete(app.url("/v1/tenants/acme?confirm=acme"))
        .send()
        .await
        .expect("delete without a token");
    assert_eq!(r.status(), 401);
    let r = app
        .http
        .delete(app.url("/v1/tenants/acme?confirm=acme"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("delete with a client token");
    assert_eq!(r.status(), 403);

    let r = app
        .http
        .delete(app.url("/v1/tenants/acme?confirm=acme"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("delete");
    let (status, answer) = body(r).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({ "id": "acme", "deleted": true, "removed": {
            "deks": 3, "keks": 1, "rewrap_jobs": 0, "webhooks": 1, "contacts": 1,
            "notifications": 0, "clients_narrowed": 1, "clients_revoked": 1 } })
    );

    // Gone: the tenant, its DEKs (cached plaintext included), its key registration.
    assert_eq!(app.get("/v1/tenants/acme").await.status(), 404);
    assert_eq!(
        app.get(&format!("/v1/tenants/acme/deks/{}", deks[1]))
            .await
            .status(),
        404
    );
    let (status, refused) = unwrap(deks[0].clone()).await;
    assert!(
        (400..500).contains(&status) && refused.get("plaintext").is_none(),
        "{status}: {refused}"
    );
    for table in [
        "deks",
        "keks",
        "tenant_contacts",
        "webhook_endpoints",
        "rewrap_jobs",
    ] {
        let sql = format!("SELECT count(*) FROM {table} WHERE tenant_id = $1");
        assert_eq!(count(&app, &sql).await, 0, "{table}");
    }
    let r = app
        .http
        .delete(app.url("/v1/tenants/acme?confirm=acme"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("delete again");
    assert_eq!(r.status(), 404);
    // The other tenant is untouched.
    let r = app
        .get(&format!(
            "/v1/tenants/globex/deks/{}",
            globex_dek["dek_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(r.status(), 200);
    // The key is free again: the KMS still holds it, byokd no longer binds it to anyone.
    create_tenant(&app, "acme-2").await;
    let r = app
        .post(
            "/v1/tenants/acme-2/keks",
            json!({ "provider": "local", "key_ref": "acme-kek" }),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());

    // The audit trail keeps the tenant's history and says what was removed, over the API
    // too.
    let (status, page) = body(app.get("/v1/audit?tenant=acme&action=tenant_deleted").await).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["entries"].as_array().map(Vec::len), Some(1), "{page}");
    let (status, page) = body(app.get("/v1/audit?tenant=acme&action=no-such-action").await).await;
    assert_eq!(
        (status, page["entries"].clone()),
        (200, json!([])),
        "{page}"
    );
    assert_eq!(app.get("/v1/audit?tenant=never-was").await.status(), 404);
    let detail = app
        .sql("SELECT detail FROM audit_log WHERE tenant_id = $1 AND action = 'tenant_deleted'")
        .bind("acme")
        .scalar()
        .await;
    assert_eq!(detail["removed"]["deks"], 3);
    assert!(
        count(
            &app,
            "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = 'tenant_created'"
        )
        .await
            == 1
    );
    // The unwraps' attempts reach the trail through the spool.
    app.audit_shipped().await;
    app.wait_chained().await;
    let (stdout, stderr, ok) = byokd(&app, &["audit", "verify", "--json"]);
    assert!(ok, "audit verify after a deletion: {stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("report");
    assert_eq!(report["ok"], true, "{report}");
    // The deleted tenant's own rows still verify by its id.
    let (stdout, stderr, ok) = byokd(&app, &["audit", "verify", "--json", "--tenant", "acme"]);
    assert!(ok, "audit verify --tenant of a deleted tenant: {stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("report");
    let rows = count(&app, "SELECT count(*) FROM audit_log WHERE tenant_id = $1").await;
    assert_eq!(report["tenant"]["rows"], rows, "{report}");
    assert!(rows >= 3, "created, key registered, deleted: {rows}");
    // A tenant created again under the same id is not reachable through the old clients:
    // the one scoped to acme alone is revoked, the other no longer names acme.
    app.tenant_with_key("acme", "acme-kek-new").await;
    let create = |token: String, tenant: &'static str| {
        let app = &app;
        async move {
            app.http
                .post(app.url(&format!("/v1/tenants/{tenant}/deks")))
                .bearer_auth(token)
                .send()
                .await
                .expect("create DEK")
                .status()
        }
    };
    assert_eq!(create(token.clone(), "acme").await, 401);
    assert_eq!(create(reporting.clone(), "acme").await, 403);
    assert_eq!(create(reporting.clone(), "globex").await, 201);
    let clients = app.get("/v1/clients").await.text().await.expect("clients");
    assert!(clients.contains(r#""tenants":["globex"]"#), "{clients}");

    app.shutdown().await;
}
