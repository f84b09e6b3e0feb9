//! byokd without a broker, against the real daemon and PostgreSQL: events posted over HTTP
//! are applied before the answer (deduplicated, malformed ones refused with nothing
//! changed), the tenant's access and key access follow, its email is written, and
//! `/readyz` does not miss a broker that is not configured; `byokd publish`, `byokd kms
//! local` and `byokd dead` without a broker; and the data dir's root key and admin token.

mod common;

use common::{TOKEN, TestApp, at, byokd_command, canonical, wait_for};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn temp_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("byokd-{what}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A daemon on its own database with no broker, writing emails into `mail`.
async fn brokerless(mail: &Path) -> TestApp {
    let mail = mail.to_owned();
    TestApp::spawn_with(move |c| {
        c.amqp_url = None;
        c.mail_dir = mail;
    })
    .await
}

async fn post_raw(app: &TestApp, body: &str) -> (u16, Value) {
    let r = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn access(app: &TestApp, tenant: &str) -> String {
    sqlx::query_scalar("SELECT access FROM tenants WHERE id = $1")
        .bind(tenant)
        .fetch_one(&app.pool)
        .await
        .expect("tenant")
}

async fn client_token(app: &TestApp, tenant: &str) -> String {
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

/// The .eml files in `dir` addressed to `to`.
fn emails_to(dir: &Path, to: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|eml| eml.contains(&format!("To: {to}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_posted_events_are_applied_before_the_answer() {
    let mail = temp_dir("brokerless-mail");
    let app = brokerless(&mail).await;

    // Ready without a broker: the consumers are not configured, not down.
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 200);
    let ready: Value = r.json().await.expect("json");
    assert_eq!(ready["consumer"], "disabled", "{ready}");
    assert_eq!(ready["urgent_consumer"], "disabled", "{ready}");

    app.tenant_with_key("nb", "key-nb").await;
    let token = client_token(&app, "nb").await;
    let (status, dek) = app.as_client(&token, "/v1/tenants/nb/deks").await;
    assert_eq!(status, 201, "{dek}");
    let unwrap = format!(
        "/v1/tenants/nb/deks/{}/unwrap",
        dek["dek_id"].as_str().expect("id")
    );
    assert_eq!(app.as_client(&token, &unwrap).await.0, 200);

    // Malformed messages are refused with the reason, and change nothing.
    let (status, body) = post_raw(&app, "{not json").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_raw(&app, r#"{"specversion": "1.0", "id": "x"}"#).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    let future = canonical(
        "nb-future",
        "disabled",
        "key-nb",
        at(3600 * 24 * 30),
        json!({}),
    );
    let (status, body) = post_raw(&app, &future.to_string()).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(access(&app, "nb").await, "accessible");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(events, 0);

    // The key is disabled at its KMS and the event posted: 202 means committed, so the
    // tenant is inaccessible the moment the answer arrives.
    app.kms_do("key-nb", "disabled", &json!({})).await;
    let event = canonical("nb-disabled-1", "disabled", "key-nb", at(10), json!({}));
    let (status, body) = post_raw(&app, &event.to_string()).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["applied"], true, "{body}");
    assert_eq!(body["events"][0]["outcome"], "applied", "{body}");
    assert_eq!(access(&app, "nb").await, "inaccessible");

    // The same event again is a duplicate: answered, applied once.
    let (status, body) = post_raw(&app, &event.to_string()).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["events"][0]["outcome"], "duplicate", "{body}");
    let applied: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'disabled' AND event_id = $1",
    )
    .bind("nb-disabled-1")
    .fetch_one(&app.pool)
    .await
    .expect("count");
    let processed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE event_id = $1")
            .bind("nb-disabled-1")
            .fetch_one(&app.pool)
            .await
            .expect("count");
    assert_eq!((processed, applied), (1, 1));

    // Key access is refused at once (the cache was dropped by the database's notification).
    let (status, body) = app.as_client(&token, &unwrap).await;
    assert_eq!(status, 403, "{body}");

    // The tenant's contact is told, by .eml file here (no SMTP server configured).
    wait_for("the tenant's email", Duration::from_secs(30), || async {
        emails_to(&mail, "ops@nb.example")
            .iter()
            .any(|eml| eml.contains("Subject:"))
    })
    .await;

    // The access message has no exchange to go to: it leaves the outbox, unpublished.
    let pool = app.pool.clone();
    wait_for("access messages removed", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE channel = 'amqp'")
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n == 0)
        }
    })
    .await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status(), 200);

    app.shutdown().await;
    let _ = std::fs::remove_dir_all(&mail);
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line expected, got: {stderr}"
    );
    stderr
}

/// `byokd` pointed at `app`'s database and HTTP listener, with no broker.
fn cli(app: &TestApp) -> std::process::Command {
    let mut cmd = byokd_command();
    cmd.env("BYOKD_DATABASE_URL", &app.db.url)
        .env("BYOKD_ADMIN_TOKEN", TOKEN)
        .env("BYOKD_LOCAL_KMS_ROOT_KEY", common::ROOT_KEY)
        .env("BYOKD_SCHEDULES_DIR", common::no_schedules())
        .env("BYOKD_HTTP_ADDR", app.base.trim_start_matches("http://"));
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_kms_local_post_to_the_daemon_without_a_broker() {
    let mail = temp_dir("brokerless-cli-mail");
    let app = brokerless(&mail).await;
    app.tenant_with_key("nc", "key-nc").await;
    let dir = temp_dir("brokerless-cli");

    // `publish` hands the event to the daemon, which applied it before answering.
    app.kms_do("key-nc", "disabled", &json!({})).await;
    let file = dir.join("disabled.json");
    let event = canonical("nc-disabled", "disabled", "key-nc", at(10), json!({}));
    std::fs::write(&file, event.to_string()).expect("write");
    let out = cli(&app).arg("publish").arg(&file).output().expect("run");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("nc-disabled applied"), "{stdout}");
    assert_eq!(access(&app, "nc").await, "inaccessible");

    // A message the daemon refuses is one line with its reason; nothing is applied.
    std::fs::write(&file, r#"{"specversion": "1.0"}"#).expect("write");
    let out = cli(&app)
        .arg("publish")
        .arg("--raw")
        .arg(&file)
        .output()
        .expect("run");
    let line = one_line_error(&out);
    assert!(line.contains("refused the event (422)"), "{line}");

    // `kms local` changes the key and hands its event to the daemon the same way.
    let out = cli(&app)
        .args(["kms", "local", "enable", "key-nc"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let since = chrono::Utc::now() - chrono::Duration::seconds(60);
    app.wait_observed("key-nc", since).await;
    let pool = app.pool.clone();
    wait_for("access restored", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT access FROM tenants WHERE id = 'nc'")
                .fetch_one(&pool)
                .await
                .is_ok_and(|a| a == "accessible")
        }
    })
    .await;

    // No daemon listening, no token, and the broker-only commands: one line each.
    let port = common::free_port();
    std::fs::write(&file, event.to_string()).expect("write");
    let out = cli(&app)
        .env("BYOKD_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .arg("publish")
        .arg(&file)
        .output()
        .expect("run");
    let line = one_line_error(&out);
    assert!(
        line.contains("no daemon answers") && line.contains("byokd run"),
        "{line}"
    );
    let out = cli(&app)
        .env_remove("BYOKD_ADMIN_TOKEN")
        .arg("publish")
        .arg(&file)
        .output()
        .expect("run");
    let line = one_line_error(&out);
    assert!(line.contains("BYOKD_ADMIN_TOKEN"), "{line}");
    let out = cli(&app).args(["dead", "list"]).output().expect("run");
    let line = one_line_error(&out);
    assert!(line.contains("no broker is configured"), "{line}");

    app.shutdown().await;
    let _ = std::fs::remove_dir_all(&mail);
    let _ = std::fs::remove_dir_all(&dir);
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// The data dir's root key and admin token: made 0600 on first start, reused on the next,
/// explicit settings win, and a bad file is one clear line. The daemon runs on what they
/// hold (on PostgreSQL here: the same secrets serve the SQLite database of standalone mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_makes_its_secrets_once_and_explicit_settings_win() {
    use byokd::config::Config;
    use byokd::standalone::{ADMIN_TOKEN_FILE, Origin, ROOT_KEY_FILE, secrets};
    let dir = temp_dir("data-dir").join("nested");

    // First start: the dir (0700) and both files (0600), random.
    let mut first = Config::default();
    let (root, token) = secrets(&mut first, &dir, true).expect("first start");
    assert_eq!(root, Origin::Created(dir.join(ROOT_KEY_FILE)));
    assert_eq!(token, Origin::Created(dir.join(ADMIN_TOKEN_FILE)));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(ROOT_KEY_FILE)), 0o600);
    assert_eq!(mode(&dir.join(ADMIN_TOKEN_FILE)), 0o600);
    let admin = first.admin_token.clone().expect("token");
    assert!(admin.expose_secret().starts_with("byokd_at_"));
    first.require_root_keys().expect("a valid root key");

    // Second start: the same secrets.
    let mut second = Config::default();
    let (root, token) = secrets(&mut second, &dir, true).expect("second start");
    assert_eq!(root, Origin::Found(dir.join(ROOT_KEY_FILE)));
    assert_eq!(token, Origin::Found(dir.join(ADMIN_TOKEN_FILE)));
    assert_eq!(
        second
            .admin_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned()),
        Some(admin.expose_secret().to_owned())
    );
    assert_eq!(
        second
            .local_kms_root_key
            .as_ref()
            .map(|k| k.expose_secret().to_owned()),
        first
            .local_kms_root_key
            .as_ref()
            .map(|k| k.expose_secret().to_owned())
    );

    // Explicit settings win; the files are left as they are.
    let mut explicit = Config {
        admin_token: Some(TOKEN.to_owned().into()),
        local_kms_root_key: Some(common::ROOT_KEY.to_owned().into()),
        ..Config::default()
    };
    let (root, token) = secrets(&mut explicit, &dir, true).expect("explicit");
    assert_eq!((root, token), (Origin::Setting, Origin::Setting));
    assert_eq!(
        explicit
            .admin_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned()),
        Some(TOKEN.to_owned())
    );

    // The daemon runs on them: the generated token opens the admin API.
    let app = TestApp::spawn_with(|c| {
        c.amqp_url = None;
        c.admin_token = second.admin_token.clone();
        c.local_kms_root_key = second.local_kms_root_key.clone();
    })
    .await;
    let r = app
        .http
        .get(app.url("/v1/tenants"))
        .bearer_auth(admin.expose_secret())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    assert_eq!(app.get("/v1/tenants").await.status(), 401);
    app.shutdown().await;

    // A bad root.key: one line naming the file, never what it holds.
    std::fs::write(dir.join(ROOT_KEY_FILE), "c2hvcnQ=\n").expect("write");
    let e = secrets(&mut Config::default(), &dir, true).expect_err("bad key");
    assert_eq!(e.to_string().lines().count(), 1);
    assert!(
        e.to_string()
            .contains(&dir.join(ROOT_KEY_FILE).display().to_string())
            && e.to_string().contains("32 bytes"),
        "{e}"
    );
    assert!(!e.to_string().contains("c2hvcnQ"), "{e}");
    std::fs::set_permissions(
        dir.join(ROOT_KEY_FILE),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let e = secrets(&mut Config::default(), &dir, true).expect_err("open to others");
    assert!(e.to_string().contains("chmod 600"), "{e}");
    let _ = std::fs::remove_dir_all(dir.parent().expect("parent"));
}

/// `check-config` names the mode a configuration runs in, and in standalone mode where the
/// data dir's files are, without making any of them.
#[test]
fn check_config_reports_the_mode() {
    let dir = temp_dir("check-mode").join("data");
    let mode = |cmd: &mut std::process::Command| {
        let out = cmd
            .env("BYOKD_SCHEDULES_DIR", common::no_schedules())
            .args(["check-config", "--json"])
            .output()
            .expect("run");
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["check"] == "mode")
            .map(|c| c["detail"].as_str().unwrap_or_default().to_owned())
            .expect("a mode check")
    };
    let standalone = mode(byokd_command().env("BYOKD_DATA_DIR", &dir));
    assert!(standalone.starts_with("standalone:"), "{standalone}");
    assert!(!dir.exists(), "check-config made {}", dir.display());
    let single = mode(
        byokd_command()
            .env("BYOKD_DATABASE_URL", "postgres://db/byokd")
            .env("BYOKD_DATA_DIR", &dir),
    );
    assert!(
        single.starts_with("single node without a broker"),
        "{single}"
    );
    let broker = mode(
        byokd_command()
            .env("BYOKD_DATABASE_URL", "postgres://db/byokd")
            .env("BYOKD_AMQP_URL", "amqp://mq:5672/%2f"),
    );
    assert!(broker.starts_with("with a broker"), "{broker}");
    let _ = std::fs::remove_dir_all(dir.parent().expect("parent"));
}

/// `byokd run` with nothing configured but `BYOKD_DATA_DIR`: standalone mode on SQLite. The
/// first start makes the data dir and its secrets, a second start reuses them (the same
/// token opens the API, the tenant made before is there), `byokd publish` finds the daemon
/// and its token through the data dir alone, and a bad root.key is one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byokd_run_standalone_makes_its_data_dir_once() {
    let dir = temp_dir("standalone-run").join("data");
    let port = common::free_port();
    let start = || {
        byokd_command()
            .env("BYOKD_DATA_DIR", &dir)
            .env("BYOKD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("BYOKD_SCHEDULES_DIR", common::no_schedules())
            .env("RUST_LOG", "info")
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("byokd run")
    };
    let http = common::http_client();
    let base = format!("http://127.0.0.1:{port}");
    let ready = || async {
        let http = http.clone();
        let url = format!("{base}/readyz");
        wait_for(
            "standalone daemon ready",
            Duration::from_secs(30),
            move || {
                let (http, url) = (http.clone(), url.clone());
                async move { matches!(http.get(&url).send().await, Ok(r) if r.status() == 200) }
            },
        )
        .await;
    };
    let stop = |child: std::process::Child| {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let first = start();
    ready().await;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("root.key")), 0o600);
    assert_eq!(mode(&dir.join("admin-token")), 0o600);
    let token = std::fs::read_to_string(dir.join("admin-token")).expect("token");
    let token = token.trim().to_owned();
    let r = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(&token)
        .json(&json!({ "id": "solo", "name": "Solo" }))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 201);
    // The CLI finds the daemon's token in the data dir; the event names no registered key.
    let file = dir.parent().expect("parent").join("event.json");
    let event = canonical("solo-1", "disabled", "no-such-key", at(10), json!({}));
    std::fs::write(&file, event.to_string()).expect("write");
    let out = byokd_command()
        .env("BYOKD_DATA_DIR", &dir)
        .env("BYOKD_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .arg("publish")
        .arg(&file)
        .output()
        .expect("publish");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("solo-1 unknown_key"),
        "{out:?}"
    );
    let log = stop(first);
    assert!(log.contains("root.key (created)"), "{log}");
    assert!(!log.contains(&token), "the token itself is never logged");
    let key = std::fs::read_to_string(dir.join("root.key")).expect("root key");
    assert!(
        !log.contains(key.trim()),
        "the root key itself is never logged"
    );

    // Second start: the same secrets, the same database.
    let second = start();
    ready().await;
    let r = http
        .get(format!("{base}/v1/tenants/solo"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let log = stop(second);
    assert!(!log.contains("(created)"), "{log}");
    assert_eq!(
        std::fs::read_to_string(dir.join("root.key")).expect("root key"),
        key
    );

    // A root.key that is no key: one line, naming the file, exit 3.
    std::fs::write(dir.join("root.key"), "bm90IGEga2V5\n").expect("write");
    let out = start().wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let line = one_line_error(&out);
    assert!(
        line.contains("root.key") && line.contains("32 bytes"),
        "{line}"
    );
    assert!(!line.contains("bm90IGEga2V5"), "{line}");
    let _ = std::fs::remove_dir_all(dir.parent().expect("parent"));
}
