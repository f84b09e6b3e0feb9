//! What only the SQLite back end has: one node per database file (a second daemon is refused
//! in one line, while CLI commands still work beside the daemon), SQLite's busy errors
//! counted as transient, changes committed by another process reaching the daemon's caches,
//! and the store's times ordered as times.

mod common;

use byokd::store::{AuditFilter, AuditRow, SpooledAudit, Store, StoreError};
use chrono::{Duration as Chrono, TimeZone, Utc};
use common::{Backend, TOKEN, TestApp, TestDb, wait_for};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_file_is_refused_in_one_line() {
    let app = TestApp::spawn_on(Backend::Sqlite).await;
    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &common::unique_amqp());
    let out = cmd
        .arg("run")
        .env(
            "BYOKD_HTTP_ADDR",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .output()
        .expect("run a second daemon");
    assert!(!out.status.success(), "the second daemon must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("another byokd daemon is running on the SQLite database")
            && lines[0].contains("several replicas need PostgreSQL"),
        "{err}"
    );
    // The first daemon is untouched, and a CLI command may still use the file beside it.
    assert_eq!(app.get("/readyz").await.status(), 200);
    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .args(["clients", "create", "cli-made", "--all-tenants"])
        .output()
        .expect("byokd clients create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = app.get("/v1/clients").await;
    let clients: serde_json::Value = r.json().await.expect("json");
    assert!(
        clients.to_string().contains("cli-made"),
        "the daemon reads what the CLI wrote: {clients}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_revoked_by_another_process_is_refused_by_the_daemon_at_once() {
    let app = TestApp::spawn_on(Backend::Sqlite).await;
    app.tenant_with_key("xp", "key-xp").await;
    let r = app
        .post(
            "/v1/clients",
            json!({ "name": "svc-xp", "tenants": ["xp"] }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let token = r.json::<serde_json::Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let create = |token: String| {
        let http = app.http.clone();
        let url = app.url("/v1/tenants/xp/deks");
        async move {
            http.post(url)
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(create(token.clone()).await, 201);
    // Revoked through the store of another "process" (its own pool and no shared memory
    // with the daemon's listener but the database file): the change table carries it.
    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .args(["clients", "revoke", "svc-xp"])
        .output()
        .expect("byokd clients revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = std::time::Instant::now();
    wait_for("revoked client refused", Duration::from_secs(2), || {
        let token = token.clone();
        let create = &create;
        async move { create(token).await == 401 }
    })
    .await;
    assert!(revoked.elapsed() < Duration::from_secs(2));
    assert_ne!(TOKEN, token);
    app.shutdown().await;
}

#[tokio::test]
async fn a_writer_kept_waiting_past_the_busy_timeout_is_a_transient_error() {
    let db = TestDb::create_on(Backend::Sqlite).await;
    let store = Store::connect(&db.url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    // Another process holds the write lock (a plain connection, outside byokd's queue).
    let options: sqlx::sqlite::SqliteConnectOptions = db.url.parse().expect("url");
    let mut holder = sqlx::ConnectOptions::connect(&options)
        .await
        .expect("connect");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("hold the write lock");
    let mut waiter =
        sqlx::ConnectOptions::connect(&options.clone().busy_timeout(Duration::from_millis(100)))
            .await
            .expect("connect");
    let err = sqlx::query("INSERT INTO changes (channel, payload, at) VALUES ('c', 'p', 'now')")
        .execute(&mut waiter)
        .await
        .expect_err("the database is locked");
    assert!(byokd::store::is_transient_sqlx(&err), "{err:?}");
    assert!(StoreError::from(err).is_transient());
    // Anything else stays permanent.
    let err = sqlx::query("INSERT INTO no_such_table VALUES (1)")
        .execute(&mut waiter)
        .await
        .expect_err("no such table");
    assert!(!byokd::store::is_transient_sqlx(&err), "{err:?}");
    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release");
    db.drop_db().await;
}

#[tokio::test]
async fn times_are_ordered_as_times_whatever_their_fraction_of_a_second() {
    let db = TestDb::create_on(Backend::Sqlite).await;
    let store = Store::connect(&db.url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    // A whole second, a microsecond after it, and half a second before it: as text of
    // varying length these would sort wrongly ("…:00Z" after "…:00.000001Z").
    let whole = Utc
        .with_ymd_and_hms(2026, 11, 29, 12, 0, 0)
        .single()
        .expect("time");
    let times = [
        whole,
        whole + Chrono::microseconds(1),
        whole - Chrono::milliseconds(500),
    ];
    for (i, t) in times.iter().enumerate() {
        let mut tx = store.begin().await.expect("begin");
        tx.audit(&[AuditRow::operation(
            Some("t"),
            &format!("step_{i}"),
            "api",
            json!({}),
        )])
        .await
        .expect("audit");
        tx.commit().await.expect("commit");
        // The row's time is byokd's clock; move it to the test's time.
        sqlx::query("UPDATE audit_log SET at = ?1 WHERE action = ?2")
            .bind(t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
            .bind(format!("step_{i}"))
            .execute(&sqlx::SqlitePool::connect(&db.url).await.expect("pool"))
            .await
            .expect("set time");
    }
    let filter = AuditFilter {
        tenant: Some("t".into()),
        since: Some(whole),
        until: Some(whole + Chrono::seconds(1)),
        ..AuditFilter::default()
    };
    let page = store
        .audit_export_page(&filter, None, 10)
        .await
        .expect("export");
    let got: Vec<(String, chrono::DateTime<Utc>)> =
        page.into_iter().map(|e| (e.action, e.at)).collect();
    assert_eq!(
        got,
        [
            ("step_0".to_owned(), times[0]),
            ("step_1".to_owned(), times[1])
        ],
        "since is inclusive, the earlier row is out, order is by time"
    );
    db.drop_db().await;
}

/// The `client` column that `GET /v1/audit?client=` filters on is filled from each row's
/// detail, by both inserts (an audited operation, and a key-access attempt shipped from a
/// spool); a row without a client has none.
#[tokio::test]
async fn audit_rows_are_found_by_the_client_in_their_detail() {
    let db = TestDb::create_on(Backend::Sqlite).await;
    let store = Store::connect(&db.url, 2).await.expect("store");
    store.migrate().await.expect("migrate");
    let mut tx = store.begin().await.expect("begin");
    tx.audit(&[
        AuditRow::operation(Some("t"), "by_svc", "api", json!({"client": "svc-a"})),
        AuditRow::operation(Some("t"), "by_nobody", "api", json!({})),
    ])
    .await
    .expect("audit");
    let shipped = tx
        .ship_audit(&[SpooledAudit {
            attempt_id: uuid::Uuid::new_v4(),
            at: Utc::now(),
            row: AuditRow::operation(Some("t"), "shipped", "api", json!({"client": "svc-a"})),
        }])
        .await
        .expect("ship");
    assert_eq!(shipped, 1);
    tx.commit().await.expect("commit");
    let filter = AuditFilter {
        client: Some("svc-a".into()),
        ..AuditFilter::default()
    };
    let page = store
        .audit_export_page(&filter, None, 10)
        .await
        .expect("export");
    let mut actions: Vec<String> = page.into_iter().map(|e| e.action).collect();
    actions.sort();
    assert_eq!(actions, ["by_svc", "shipped"]);
    db.drop_db().await;
}

/// Runs `byokd audit verify --json` on the test's database: (report, stderr, success).
fn audit_verify(app: &TestApp) -> (serde_json::Value, String, bool) {
    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .args(["audit", "verify", "--json"])
        .output()
        .expect("byokd audit verify");
    (
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_grows_verifies_and_catches_a_modified_row_on_sqlite() {
    let app = TestApp::spawn_on_with(Backend::Sqlite, |c| {
        c.audit.chain_interval_ms = 20;
        c.audit.checkpoint_interval_secs = 1;
    })
    .await;
    for t in ["ca", "cb", "cc"] {
        app.tenant_with_key(t, &format!("key-{t}")).await;
        assert_eq!(
            app.post(&format!("/v1/tenants/{t}/deks"), json!({}))
                .await
                .status(),
            201
        );
    }
    app.wait_chained().await;
    wait_for("a checkpoint", Duration::from_secs(10), || async {
        app.sql("SELECT count(*) FROM audit_checkpoints")
            .int()
            .await
            > 0
    })
    .await;
    // Dense from 1, in id order (writers are serialized: id order is commit order).
    let seqs = app
        .sql("SELECT chain_seq, id FROM audit_log ORDER BY id")
        .rows()
        .await;
    for (i, r) in seqs.iter().enumerate() {
        assert_eq!(r[0], json!(i + 1), "{seqs:?}");
    }
    let (report, stderr, ok) = audit_verify(&app);
    assert!(ok, "{stderr}");
    assert_eq!(report["ok"], true, "{report}");

    let row = app
        .sql("SELECT id FROM audit_log WHERE chain_seq = 3")
        .int()
        .await;
    app.sql("UPDATE audit_log SET outcome = 'forged' WHERE id = $1")
        .bind(row)
        .rows()
        .await;
    let (report, stderr, ok) = audit_verify(&app);
    assert!(!ok, "a modified row must fail: {report}");
    assert!(
        stderr.contains(&format!("row {row} (chain_seq 3) was modified")),
        "{stderr}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_in_memory_database_is_refused_with_a_clear_error() {
    for url in [
        "sqlite::memory:",
        "sqlite://:memory:",
        "sqlite://x.db?mode=memory",
    ] {
        let err = Store::connect(url, 2).await.expect_err(url);
        assert!(
            err.to_string()
                .contains("must be a file (sqlite://PATH), not in memory"),
            "{url}: {err}"
        );
    }
}
