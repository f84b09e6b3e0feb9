//! The `byokd` binary as an operator uses it: one-line errors, `--help`, `migrate`,
//! `publish`, and a graceful stop on SIGTERM that acks exactly what committed.

mod common;

use common::{TOKEN, TestDb, amqp_url, canonical, unique_amqp, wait_for, with_service_env};
use serde_json::json;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn byokd() -> Command {
    common::byokd_command()
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

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["migrate", "--help"],
        vec!["publish", "--help"],
        vec!["check-config", "--help"],
        vec!["root-key", "generate", "--help"],
        vec!["root-key", "rotate", "--help"],
        vec!["export", "--help"],
        vec!["import", "--help"],
    ] {
        let out = byokd().args(&args).output().expect("run byokd");
        assert!(out.status.success(), "{args:?}");
        assert!(!out.stdout.is_empty());
    }
}

#[test]
fn configuration_mistakes_are_one_clear_line() {
    // With a broker, a database is required (with neither URL, `run` is standalone).
    let out = byokd()
        .arg("run")
        .env("BYOKD_AMQP_URL", amqp_url())
        .output()
        .expect("run");
    assert!(one_line_error(&out).contains("BYOKD_DATABASE_URL is not set"));

    let out = byokd()
        .arg("check-config")
        .env("BYOKD_LOCAL_KMS_ROOT_KEY", "c2hvcnQ=")
        .env("BYOKD_AMQP__PREFETCH", "lots")
        .output()
        .expect("run");
    let line = one_line_error(&out);
    assert!(
        line.contains("BYOKD_AMQP__PREFETCH: invalid type"),
        "{line}"
    );

    let out = byokd()
        .arg("check-config")
        .env("BYOKD_LOCAL_KMS_ROOT_KEY", "c2hvcnQ=")
        .output()
        .expect("run");
    let line = one_line_error(&out);
    assert!(line.contains("32 bytes"), "{line}");
    assert!(
        !line.contains("c2hvcnQ"),
        "the key itself is never printed: {line}"
    );

    let out = valid_config(&mut byokd())
        .args(["check-config", "--json"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"valid\":true"));
    assert!(
        !stdout.contains("hunter2") && !stdout.contains(TOKEN),
        "{stdout}"
    );

    let out = byokd()
        .arg("publish")
        .arg("/nonexistent/event.json")
        .env("BYOKD_AMQP_URL", amqp_url())
        .output()
        .expect("run");
    assert!(one_line_error(&out).contains("cannot read /nonexistent/event.json"));
}

/// Everything `run` needs, none of it reachable (check-config does not connect).
fn valid_config(cmd: &mut Command) -> &mut Command {
    cmd.env("BYOKD_DATABASE_URL", "postgres://app:hunter2@db/byokd")
        .env("BYOKD_AMQP_URL", "amqp://app:hunter3@mq:5672/%2f")
        .env("BYOKD_ADMIN_TOKEN", TOKEN)
        .env("BYOKD_LOCAL_KMS_ROOT_KEY", common::ROOT_KEY)
        .env(
            "BYOKD_SCHEDULES_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/schedules"),
        )
}

fn check_config(cmd: &mut Command) -> (Option<i32>, serde_json::Value) {
    let out = cmd.args(["check-config", "--json"]).output().expect("run");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), report)
}

fn failed_checks(report: &serde_json::Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| format!("{}: {}", c["check"].as_str().unwrap_or(""), c["detail"]))
        .collect()
}

#[test]
fn check_config_fails_where_run_would_and_names_unknown_settings() {
    let (code, report) = check_config(valid_config(&mut byokd()));
    assert_eq!(
        (code, failed_checks(&report)),
        (Some(0), vec![]),
        "{report}"
    );
    assert_eq!(report["valid"], true);

    // What `run` needs but is missing or unparseable: exit 3, each named.
    let (code, report) = check_config(
        valid_config(&mut byokd())
            .env_remove("BYOKD_DATABASE_URL")
            .env("BYOKD_AMQP_URL", "amqp://mq:notaport"),
    );
    assert_eq!(code, Some(3), "{report}");
    let failed = failed_checks(&report).join("\n");
    assert!(
        failed.contains("database_url: \"BYOKD_DATABASE_URL is not set"),
        "{failed}"
    );
    assert!(failed.contains("amqp_url: "), "{failed}");
    assert_eq!(report["valid"], false);

    // A misspelt variable would silently do nothing in `run`.
    let (code, report) = check_config(valid_config(&mut byokd()).env("BYOKD_ADMIN_TOKN", "x"));
    assert_eq!(code, Some(3));
    let failed = failed_checks(&report).join("\n");
    assert!(
        failed.contains("BYOKD_ADMIN_TOKN is not a byokd setting"),
        "{failed}"
    );

    // A schedule `sweep` would reject fails here too; crontab's 5 fields are accepted.
    let dir = tempdir("schedules");
    std::fs::write(
        dir.join("ok.toml"),
        "name = \"probe\"\ncron = \"*/5 * * * *\"\njob = \"key_probe\"\n",
    )
    .expect("write");
    let (code, report) = check_config(valid_config(&mut byokd()).env("BYOKD_SCHEDULES_DIR", &dir));
    assert_eq!(code, Some(0), "{report}");
    std::fs::write(
        dir.join("bad.toml"),
        "name = \"x\"\ncron = \"61 * * * *\"\njob = \"key_probe\"\n",
    )
    .expect("write");
    let (code, report) = check_config(valid_config(&mut byokd()).env("BYOKD_SCHEDULES_DIR", &dir));
    assert_eq!(code, Some(3));
    let failed = failed_checks(&report).join("\n");
    assert!(
        failed.contains("schedules: ") && failed.contains("bad.toml"),
        "{failed}"
    );

    // Text output: one line per check, and the error is one line on stderr.
    let out = valid_config(&mut byokd())
        .env_remove("BYOKD_DATABASE_URL")
        .arg("check-config")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL database_url"), "{stdout}");
    assert!(stdout.contains("ok   templates"), "{stdout}");
    one_line_error(&out);
}

#[test]
fn secrets_can_come_from_files() {
    let dir = tempdir("secrets");
    let token = dir.join("admin-token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write");
    let root = dir.join("root-key");
    std::fs::write(&root, common::ROOT_KEY).expect("write");
    let vault = dir.join("vault-token");
    std::fs::write(&vault, "s.vault-token-from-a-file").expect("write");
    let mut cmd = byokd();
    valid_config(&mut cmd)
        .env_remove("BYOKD_ADMIN_TOKEN")
        .env_remove("BYOKD_LOCAL_KMS_ROOT_KEY")
        .env("BYOKD_ADMIN_TOKEN_FILE", &token)
        .env("BYOKD_LOCAL_KMS_ROOT_KEY_FILE", &root)
        .env("BYOKD_KMS__VAULT__ADDRESS", "http://127.0.0.1:8200")
        .env("BYOKD_KMS__VAULT__TOKEN_FILE", &vault);
    let (code, report) = check_config(&mut cmd);
    assert_eq!(
        (code, failed_checks(&report)),
        (Some(0), vec![]),
        "{report}"
    );
    let text = report.to_string();
    assert!(text.contains("[REDACTED]"), "{text}");
    assert!(
        !text.contains(TOKEN) && !text.contains("vault-token-from"),
        "{text}"
    );
    assert!(
        !report["warnings"].to_string().contains("admin API"),
        "{report}"
    );

    // Both ways at once, or a file that cannot be read: one clear line, exit 3, no secret.
    let (code, report) =
        check_config(valid_config(&mut byokd()).env("BYOKD_ADMIN_TOKEN_FILE", &token));
    assert_eq!(code, Some(3));
    assert!(
        failed_checks(&report)
            .join("")
            .contains("set BYOKD_ADMIN_TOKEN or BYOKD_ADMIN_TOKEN_FILE, not both"),
        "{report}"
    );
    let out = valid_config(&mut byokd())
        .env_remove("BYOKD_ADMIN_TOKEN")
        .env("BYOKD_ADMIN_TOKEN_FILE", dir.join("missing"))
        .arg("run")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(one_line_error(&out).contains("BYOKD_ADMIN_TOKEN_FILE: cannot read"));
}

#[test]
fn exit_codes_tell_usage_configuration_and_unavailable_apart() {
    let code = |cmd: &mut Command| cmd.output().expect("run").status.code();
    assert_eq!(code(byokd().arg("no-such-command")), Some(2));
    assert_eq!(code(byokd().args(["deks", "verify"])), Some(2));
    assert_eq!(
        code(byokd().arg("run").env("BYOKD_AMQP_URL", amqp_url())),
        Some(3)
    );
    // Nothing listens on port 1: the database is unavailable, not misconfigured.
    let mut migrate = byokd();
    migrate.arg("migrate").env(
        "BYOKD_DATABASE_URL",
        "postgres://postgres@127.0.0.1:1/byokd",
    );
    assert_eq!(code(&mut migrate), Some(4));
    let mut sweep = byokd();
    valid_config(&mut sweep)
        .env(
            "BYOKD_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/byokd",
        )
        .args(["sweep", "no-such-schedule"]);
    let out = sweep.output().expect("run");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("byokd-{what}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

#[test]
fn root_key_generate_needs_no_configuration_and_rotate_needs_a_key() {
    let keys: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            // A broken configuration does not stop a key from being made.
            let out = byokd()
                .args(["root-key", "generate", "--json"])
                .env("BYOKD_AMQP__PREFETCH", "lots")
                .output()
                .expect("run");
            assert!(out.status.success(), "{out:?}");
            let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                printed["root_key"].as_str().expect("root_key"),
            )
            .expect("base64")
        })
        .collect();
    assert_eq!(keys[0].len(), 32);
    assert_ne!(keys[0], keys[1]);

    let out = byokd().args(["root-key", "rotate"]).output().expect("run");
    let line = one_line_error(&out);
    assert!(
        line.contains(
            "BYOKD_LOCAL_KMS_ROOT_KEY is not set (generate one with: byokd root-key generate)"
        ),
        "{line}"
    );
    let out = byokd()
        .args(["root-key", "rotate"])
        .env("BYOKD_LOCAL_KMS_ROOT_KEY", common::ROOT_KEY)
        .env(
            "BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS",
            format!("{},c2hvcnQ=", common::ROOT_KEY),
        )
        .output()
        .expect("run");
    let line = one_line_error(&out);
    assert!(
        line.contains("BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS (key 1 of 2) is the current root key"),
        "{line}"
    );
    assert!(!line.contains(common::ROOT_KEY), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_then_publish_then_sigterm_acks_exactly_what_committed() {
    let db = TestDb::create().await;
    let amqp = unique_amqp();
    let out = byokd()
        .arg("migrate")
        .env("BYOKD_DATABASE_URL", &db.url)
        .output()
        .expect("migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut cmd = byokd();
    with_service_env(&mut cmd, &db.url, &amqp);
    let mut child = cmd
        .arg("run")
        .env("BYOKD_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let base = format!("http://127.0.0.1:{port}");
    let http = common::http_client();
    wait_for("daemon ready", Duration::from_secs(30), || {
        let http = http.clone();
        let url = format!("{base}/readyz");
        async move { matches!(http.get(&url).send().await, Ok(r) if r.status() == 200) }
    })
    .await;
    let r = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(TOKEN)
        .json(&json!({ "id": "sig", "name": "Sig" }))
        .send()
        .await
        .expect("tenant");
    assert_eq!(r.status(), 201);
    let mut create = byokd();
    with_service_env(&mut create, &db.url, &amqp);
    let out = create
        .args(["kms", "local", "create", "key-sig"])
        .output()
        .expect("create key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = http
        .post(format!("{base}/v1/tenants/sig/keks"))
        .bearer_auth(TOKEN)
        .json(&json!({ "provider": "local", "key_ref": "key-sig" }))
        .send()
        .await
        .expect("kek");
    assert_eq!(r.status(), 201);

    // `byokd publish` from a file, as an operator would.
    let dir = std::env::temp_dir().join(format!("byokd-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let total = 300;
    for i in 0..total {
        let kind = if i % 2 == 0 { "disabled" } else { "enabled" };
        let file = dir.join(format!("{i}.json"));
        std::fs::write(
            &file,
            canonical(
                &format!("cli-{i}"),
                kind,
                "key-sig",
                common::at(i),
                json!({}),
            )
            .to_string(),
        )
        .expect("write");
        if i < 3 {
            let mut publish = byokd();
            with_service_env(&mut publish, &db.url, &amqp);
            let out = publish
                .args(["publish", "--json", "--routing-key", "local.test"])
                .arg(&file)
                .output()
                .expect("publish");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("\"id\":\"cli-{i}\"")));
        }
    }
    // The rest through a direct connection, fast, so SIGTERM lands mid-stream.
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    for i in 3..total {
        let body = std::fs::read(dir.join(format!("{i}.json"))).expect("read");
        ch.basic_publish(
            amqp.lifecycle_exchange.as_str().into(),
            "local.test".into(),
            lapin::options::BasicPublishOptions::default(),
            &body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish");
    }
    let pid = child.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "daemon did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");

    // Committed events were acked; the rest went back to the queue. Nothing lost, nothing
    // both committed and still queued.
    let pool = sqlx::PgPool::connect(&db.url).await.expect("pool");
    let processed: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(&pool)
        .await
        .expect("count");
    let ready = || async {
        let q = ch
            .queue_declare(
                amqp.lifecycle_queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("queue");
        i64::from(q.message_count())
    };
    // The quorum queue takes back what the stopped daemon held unacked through its log, a
    // moment after the connection closed: wait for the ready count to stop short of the
    // total (bounded), then check it exactly. Only growth is awaited, so a count that
    // overshoots (an event both committed and queued) still fails.
    wait_for(
        "the unacked deliveries back in the queue",
        Duration::from_secs(10),
        || async { processed + ready().await >= total },
    )
    .await;
    assert_eq!(processed + ready().await, total, "processed {processed}");
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    for queue in [
        &amqp.lifecycle_queue,
        &amqp.urgent_queue,
        &amqp.dead_letter_queue,
    ] {
        let _ = ch
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    for ex in [
        &amqp.lifecycle_exchange,
        &amqp.dead_letter_exchange,
        &amqp.access_exchange,
    ] {
        let _ = ch
            .exchange_delete(ex.as_str().into(), Default::default())
            .await;
    }
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_quiet_and_an_unknown_schedule_is_a_usage_error() {
    let db = TestDb::create().await;
    for _ in 0..2 {
        let out = byokd()
            .arg("migrate")
            .env("BYOKD_DATABASE_URL", &db.url)
            .env("RUST_LOG", "info")
            .output()
            .expect("run");
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("already exists"), "{stderr}");
    }
    let out = valid_config(&mut byokd())
        .env("BYOKD_DATABASE_URL", &db.url)
        .args(["sweep", "no-such-schedule"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(one_line_error(&out).contains("no schedule named \"no-such-schedule\""));
}
