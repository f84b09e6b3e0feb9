//! Key access against the real daemon, PostgreSQL and RabbitMQ: client tokens and their
//! scopes, the admin token's separation of duties, plaintext only to clients, refusal after a
//! revocation on every replica, the DEK cache (served while the tenant's access holds,
//! dropped the moment it changes), revoked clients, and an audit row for every attempt.
//! Every test runs on PostgreSQL and on SQLite (one node there: no second replica).

mod common;

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
    let key = common::plaintext(&created);
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
        assert_eq!(common::plaintext(&got), key);
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
    assert_eq!(common::plaintext(&deks[0]), key);
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
    app.audit_shipped().await;
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

/// A client of tenant `tenant` (made with a key) and one DEK of it, unwrapped once.
async fn warm_dek(app: &TestApp, tenant: &str) -> (String, String) {
    app.tenant_with_key(tenant, &format!("key-{tenant}")).await;
    let token = client(
        app,
        &format!("svc-{tenant}"),
        json!({ "tenants": [tenant] }),
    )
    .await;
    let (status, created, _) = call(
        app,
        &app.base,
        &token,
        &format!("/v1/tenants/{tenant}/deks"),
        None,
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let path = format!(
        "/v1/tenants/{tenant}/deks/{}/unwrap",
        created["dek_id"].as_str().expect("id")
    );
    assert_eq!(call(app, &app.base, &token, &path, None).await.0, 200);
    (token, path)
}

/// Spooled rows as an earlier daemon could have left them: `n` attempts, then a record cut
/// by a crash mid-write.
fn leftover_segment(dir: &std::path::Path, tenant: &str, n: usize) -> Vec<uuid::Uuid> {
    let mut buf = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let row = byokd::store::SpooledAudit {
            attempt_id: uuid::Uuid::now_v7(),
            at: chrono::Utc::now() - chrono::Duration::seconds(60),
            row: byokd::store::AuditRow {
                tenant_id: Some(tenant.to_owned()),
                provider: None,
                key_ref: None,
                action: "dek_unwrap".into(),
                outcome: "allowed".into(),
                source: "api".into(),
                event_id: None,
                detail: json!({ "client": "crashed", "n": i }),
            },
        };
        ids.push(row.attempt_id);
        byokd::access::spool::encode(&mut buf, &row);
    }
    let whole = buf.len();
    byokd::access::spool::encode(
        &mut buf,
        &byokd::store::SpooledAudit {
            attempt_id: uuid::Uuid::now_v7(),
            at: chrono::Utc::now(),
            row: byokd::store::AuditRow::operation(Some(tenant), "dek_unwrap", "api", json!({})),
        },
    );
    buf.truncate(whole + 11);
    // Larger than what the shipper reads in one round (1 MiB and a record header), so the
    // records cut by a read's limit are read whole in the next round, not taken for torn.
    assert!(buf.len() > (1 << 20) + 8, "{} bytes", buf.len());
    // Numbered below the segments a daemon makes next.
    std::fs::write(dir.join("seg-00000000000000000000.spool"), &buf).expect("write segment");
    ids
}

async fn spooled_attempts(app: &TestApp, tenant: &str) -> (i64, i64) {
    let rows = app
        .sql(
            "SELECT count(*), count(DISTINCT attempt_id) FROM audit_log
             WHERE tenant_id = $1 AND action = 'dek_unwrap'",
        )
        .bind(tenant)
        .rows()
        .await;
    (
        rows[0][0].as_i64().expect("count"),
        rows[0][1].as_i64().expect("count"),
    )
}

on_both_backends!(spooled_attempts_reach_the_trail_once_across_a_restart, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn spooled_attempts_reach_the_trail_once_across_a_restart(backend: Backend) {
    let mut app = TestApp::spawn_on(backend).await;
    let (token, path) = warm_dek(&app, "sp").await;
    for _ in 0..20 {
        assert_eq!(call(&app, &app.base, &token, &path, None).await.0, 200);
    }
    // An attempt naming a tenant PostgreSQL could not store (a NUL) is refused and
    // recorded, and does not stop the shipper.
    let (status, body, _) = call(
        &app,
        &app.base,
        &token,
        &format!("/v1/tenants/s%00p/deks/{}/unwrap", uuid::Uuid::new_v4()),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // Each attempt reaches audit_log with an id of its own.
    app.audit_shipped().await;
    assert_eq!(spooled_attempts(&app, "sp").await, (21, 21));
    let odd = app
        .sql("SELECT count(*) FROM audit_log WHERE tenant_id = $1")
        .bind("s\u{FFFD}p")
        .int()
        .await;
    assert_eq!(odd, 1);

    // The daemon stops; what it shipped is shipped again by the next one (its shipped
    // position lost, as a crash could lose it), and a segment an earlier daemon left
    // unshipped, ending in a torn record, is shipped too.
    app.stop().await;
    let dir = app.spool_dir();
    std::fs::remove_file(dir.join("shipped")).expect("the shipped position");
    let left = leftover_segment(&dir, "sp", 5_000);
    app.start().await;
    app.audit_shipped().await;
    for _ in 0..3 {
        assert_eq!(call(&app, &app.base, &token, &path, None).await.0, 200);
    }
    app.audit_shipped().await;
    // Exactly once each: 21 + 5,000 + 3, the torn record skipped.
    assert_eq!(spooled_attempts(&app, "sp").await, (5_024, 5_024));
    let crashed = app
        .sql("SELECT count(*) FROM audit_log WHERE client = 'crashed'")
        .int()
        .await;
    assert_eq!(crashed, left.len() as i64);
    // What was shipped is gone from the spool but the segment being written.
    let segments = std::fs::read_dir(&dir)
        .expect("spool dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".spool"))
        })
        .count();
    assert_eq!(segments, 1);
    app.shutdown().await;
}

/// `audit_log` cannot be written for a while (an exclusive lock held by the test, as a
/// stuck or unreachable audit trail): unwraps are served from the spool until its backlog
/// passes `access.audit_spool_max_bytes`, then refused with `/readyz` saying why, and served
/// again once the backlog is shipped; the chain verifies after all that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_trail_unwritable_unwraps_are_served_up_to_the_spool_cap() {
    let app = TestApp::spawn_with(|c| {
        c.access.audit_spool_max_bytes = 4_000;
        c.audit.chain_interval_ms = 20;
    })
    .await;
    let (token, path) = warm_dek(&app, "cap").await;
    app.audit_shipped().await;

    let mut lock = app.pool.begin().await.expect("transaction");
    sqlx::query("LOCK TABLE audit_log IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock audit_log");
    let mut served = 0;
    let mut refused = None;
    for _ in 0..200 {
        let (status, body, _) = call(&app, &app.base, &token, &path, None).await;
        match status {
            200 => served += 1,
            503 => {
                refused = Some(body);
                break;
            }
            other => panic!("{other}: {body}"),
        }
    }
    let refused = refused.expect("refused once the spool is over its cap");
    assert!(
        served >= 5,
        "served from the spool meanwhile: {served} ({refused})"
    );
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("audit_spool_max_bytes")),
        "{refused}"
    );
    let ready = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.expect("json");
    assert!(
        ready["audit"]
            .as_str()
            .is_some_and(|a| a.contains("audit spool")),
        "{ready}"
    );

    // The trail comes back: the backlog is shipped and unwraps are served again.
    lock.rollback().await.expect("unlock");
    app.audit_shipped().await;
    app.wait_ready().await;
    assert_eq!(call(&app, &app.base, &token, &path, None).await.0, 200);
    app.audit_shipped().await;
    let allowed = app
        .sql(
            "SELECT count(*) FROM audit_log
             WHERE tenant_id = 'cap' AND action = 'dek_unwrap' AND outcome = 'allowed'",
        )
        .int()
        .await;
    // The warm-up, those served meanwhile and the last one; a refusal for the backlog is
    // not an attempt the trail could take.
    assert_eq!(allowed, served + 2);

    app.wait_chained().await;
    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .args(["audit", "verify", "--json"])
        .output()
        .expect("byokd audit verify");
    assert!(
        out.status.success(),
        "audit verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.shutdown().await;
}
