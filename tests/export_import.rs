//! `byokd export` / `byokd import` through the binary, from a real standalone (SQLite)
//! deployment into a real PostgreSQL database: everything arrives (counts, DEKs that unwrap
//! to the same keys, clients, dedupe, the audit chain and its checkpoints), the deployment
//! goes on there without collisions, and back to SQLite; a truncated, edited or reordered
//! archive, a non-empty database and another root key are refused with nothing written; an
//! audit row edited in the archive (hash recomputed) is imported and then caught by
//! `audit verify`. Every carried table is checked against both schemas.

mod common;

use byokd::config::AmqpSettings;
use byokd::store::transfer::TABLES;
use common::{
    Backend, Sql, TestApp, TestDb, at, byokd_command, plaintext, wait_for, with_service_env,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, SqlitePool};
use std::path::PathBuf;
use std::time::Duration;

/// Runs `byokd ARGS` on the database at `url`: (stdout, stderr, exit code).
fn byokd(
    url: &str,
    amqp: &AmqpSettings,
    args: &[&str],
    env: &[(&str, &str)],
) -> (String, String, i32) {
    let mut cmd = byokd_command();
    with_service_env(&mut cmd, url, amqp);
    cmd.envs(env.iter().copied());
    let out = cmd.args(args).output().expect("run byokd");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// A fresh archive path.
fn archive_path() -> PathBuf {
    let dir = std::env::temp_dir().join("byokd-test-archives");
    std::fs::create_dir_all(&dir).expect("archive dir");
    dir.join(format!("{}.jsonl", uuid::Uuid::new_v4().simple()))
}

fn export(url: &str, amqp: &AmqpSettings) -> (PathBuf, Value) {
    let path = archive_path();
    let p = path.to_str().expect("utf-8 path");
    let (out, err, code) = byokd(url, amqp, &["export", "--out", p, "--json"], &[]);
    assert_eq!(code, 0, "export failed: {err}");
    (path, serde_json::from_str(&out).expect("export report"))
}

fn import(url: &str, amqp: &AmqpSettings, archive: &[u8]) -> (String, String, i32) {
    let path = archive_path();
    std::fs::write(&path, archive).expect("write archive");
    let r = byokd(
        url,
        amqp,
        &["import", "--in", path.to_str().expect("utf-8"), "--json"],
        &[],
    );
    let _ = std::fs::remove_file(path);
    r
}

/// `byokd audit verify --json` on `url`: its report, and whether it passed.
fn audit_verify(url: &str, amqp: &AmqpSettings) -> (Value, String, bool) {
    let (out, err, code) = byokd(url, amqp, &["audit", "verify", "--json"], &[]);
    (
        serde_json::from_str(&out).unwrap_or(Value::Null),
        err,
        code == 0,
    )
}

/// A daemon that chains every 20 ms and checkpoints every second.
fn fast_chaining(c: &mut byokd::config::Config) {
    c.audit.chain_interval_ms = 20;
    c.audit.checkpoint_interval_secs = 1;
}

/// Waits until every audit row is chained and the head is checkpointed.
async fn wait_chained_and_checkpointed(app: &TestApp) {
    wait_for(
        "every audit row chained and the head checkpointed",
        Duration::from_secs(60),
        || async {
            let unchained = app.unchained_audit_rows().await;
            let head = app.audit_head_seq().await;
            let checkpoint = app
                .sql("SELECT coalesce(max(chain_seq), 0) FROM audit_checkpoints")
                .int()
                .await;
            unchained == 0 && head > 0 && checkpoint == head
        },
    )
    .await;
}

/// A standalone deployment as a trial leaves it: two tenants with local keys, contacts and a
/// webhook each; a client that created and unwrapped a DEK (and was refused once); `bulk`
/// more DEKs; acme's key rotated and every DEK re-wrapped; beta's key revoked (beta
/// inaccessible, its notifications pending). Every audit row chained and checkpointed.
/// Returns the app (still running), the client's token, the DEK's id and its plaintext, and
/// the id of the event that revoked beta's key.
async fn standalone_deployment(bulk: usize) -> (TestApp, String, String, Vec<u8>, String) {
    let app = TestApp::spawn_on_with(Backend::Sqlite, fast_chaining).await;
    app.tenant_with_key("acme", "acme-kek").await;
    app.tenant_with_key("beta", "beta-kek").await;
    let r = app
        .post("/v1/clients", json!({ "name": "svc", "all_tenants": true }))
        .await;
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let (status, created) = app.as_client(&token, "/v1/tenants/acme/deks").await;
    assert_eq!(status, 201, "{created}");
    let dek_id = created["dek_id"].as_str().expect("id").to_owned();
    let (status, got) = app
        .as_client(&token, &format!("/v1/tenants/acme/deks/{dek_id}/unwrap"))
        .await;
    assert_eq!(status, 200, "{got}");
    let unknown = uuid::Uuid::now_v7();
    let (status, _) = app
        .as_client(&token, &format!("/v1/tenants/acme/deks/{unknown}/unwrap"))
        .await;
    assert_eq!(status, 404);
    if bulk > 0 {
        app.bulk_deks("acme", "acme-kek", bulk).await;
    }
    let info = app
        .local_kms()
        .await
        .rotate("acme-kek")
        .await
        .expect("rotate");
    app.publish(
        "rotated",
        "acme-kek",
        at(5),
        json!({ "version": info.current_version }),
    )
    .await;
    app.wait_job("acme", "completed", Duration::from_secs(120))
        .await;
    let since = chrono::Utc::now();
    app.kms_do("beta-kek", "disabled", &json!({})).await;
    let revoked = app.publish("disabled", "beta-kek", at(10), json!({})).await;
    app.wait_observed("beta-kek", since).await;
    assert_eq!(app.tenant("beta").await["access"], "inaccessible");
    wait_chained_and_checkpointed(&app).await;
    (app, token, dek_id, plaintext(&created), revoked)
}

/// Rows per carried table, on the SQLite database when given, else on the PostgreSQL one.
async fn counts(pg: &PgPool, sqlite: Option<&SqlitePool>) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for t in TABLES {
        let sql = format!("SELECT count(*) FROM {}", t.name);
        out.push((t.name, Sql::on(pg, sqlite, &sql).int().await));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_deployment_moves_to_postgres_intact_and_goes_on_there() {
    let (mut src, token, dek_id, key, revoked) = standalone_deployment(300).await;
    let amqp = src.config.amqp.clone();

    // While the daemon holds the SQLite file, export refuses: it would go on writing.
    let (_, err, code) = byokd(&src.db.url, &amqp, &["export", "--out", "-"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("stop the daemon"), "{err}");
    src.stop().await;
    let (report, ok) = src.verify_deks("acme");
    assert!(ok, "{report}");
    // The verification's own audit row stays unchained (no daemon): it is carried as such.
    let sqlite = src.sqlite.clone().expect("SQLite pool");
    let source_counts = counts(&src.pool, Some(&sqlite)).await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE chain_seq IS NULL")
        .fetch_one(&sqlite)
        .await
        .expect("pending");
    assert_eq!(pending, 1);

    let (archive, summary) = export(&src.db.url, &amqp);
    assert_eq!(summary["source"], "sqlite");
    let total: i64 = source_counts.iter().map(|(_, n)| n).sum();
    assert_eq!(summary["rows"], total);
    for (t, n) in &source_counts {
        assert_eq!(summary["counts"][t], *n, "{t}");
    }
    for t in [
        "tenants",
        "tenant_contacts",
        "webhook_endpoints",
        "keks",
        "deks",
        "local_keys",
        "local_key_versions",
        "processed_events",
        "audit_chain_key",
        "audit_log",
        "audit_checkpoints",
        "outbox",
        "rewrap_jobs",
        "clients",
    ] {
        assert!(
            summary["counts"][t].as_i64() > Some(0),
            "a realistic deployment has {t}"
        );
    }

    // Into a fresh PostgreSQL database.
    let target = TestDb::create_on(Backend::Postgres).await;
    let bytes = std::fs::read(&archive).expect("archive");
    let (out, err, code) = import(&target.url, &amqp, &bytes);
    assert_eq!(code, 0, "import failed: {err}");
    let imported: Value = serde_json::from_str(&out).expect("import report");
    assert_eq!(imported["archive"]["rows"], total);
    let pg = PgPool::connect(&target.url).await.expect("pg");
    for ((t, n), (_, m)) in source_counts.iter().zip(counts(&pg, None).await) {
        // The import is recorded in the trail.
        let expected = if *t == "audit_log" { n + 1 } else { *n };
        assert_eq!(m, expected, "{t}");
    }
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'archive_imported'")
            .fetch_one(&pg)
            .await
            .expect("count");
    assert_eq!(recorded, 1);
    // SQLite chained its JSON text, which jsonb prints otherwise: that text came along.
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE detail_text IS NOT NULL")
            .fetch_one(&pg)
            .await
            .expect("count");
    assert!(kept > 0, "no row needed its chained text kept");
    // Times to the microsecond, bytes and chain values as they were.
    let src_rows: Vec<(i64, String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT id, at, chain FROM audit_log ORDER BY id")
            .fetch_all(&sqlite)
            .await
            .expect("rows");
    let pg_rows: Vec<(i64, chrono::DateTime<chrono::Utc>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT id, at, chain FROM audit_log LEFT JOIN audit_chain USING (id)
         WHERE action <> 'archive_imported' ORDER BY id",
    )
    .fetch_all(&pg)
    .await
    .expect("rows");
    assert_eq!(src_rows.len(), pg_rows.len());
    for (a, b) in src_rows.iter().zip(&pg_rows) {
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
        assert_eq!(a.2, b.2);
    }
    let src_deks: Vec<(String, Vec<u8>, String)> =
        sqlx::query_as("SELECT id, wrapped, kcv FROM deks ORDER BY id")
            .fetch_all(&sqlite)
            .await
            .expect("deks");
    let pg_deks: Vec<(uuid::Uuid, Vec<u8>, String)> =
        sqlx::query_as("SELECT id, wrapped, kcv FROM deks ORDER BY id")
            .fetch_all(&pg)
            .await
            .expect("deks");
    assert_eq!(src_deks.len(), pg_deks.len());
    for (a, b) in src_deks.iter().zip(&pg_deks) {
        assert_eq!(
            (a.0.as_str(), &a.1, &a.2),
            (b.0.hyphenated().to_string().as_str(), &b.1, &b.2)
        );
    }

    // The chain verifies on PostgreSQL, checkpoints included and equal.
    let (report, err, ok) = audit_verify(&target.url, &amqp);
    assert!(ok, "audit verify failed after the move: {err}");
    assert_eq!(report["rows"], source_counts[9].1 - 1);
    assert!(report["checkpoints"].as_i64() > Some(0), "{report}");
    assert_eq!(
        report["pending"], 2,
        "the unchained row and the import's own"
    );
    let src_cps: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT chain_seq, chain FROM audit_checkpoints ORDER BY chain_seq")
            .fetch_all(&sqlite)
            .await
            .expect("checkpoints");
    let pg_cps: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT chain_seq, chain FROM audit_checkpoints ORDER BY chain_seq")
            .fetch_all(&pg)
            .await
            .expect("checkpoints");
    assert_eq!(src_cps, pg_cps);

    // A daemon on PostgreSQL: the same DEKs, the same client, the same access.
    let mut dst = TestApp::spawn_on_db(target, fast_chaining).await;
    let (report, ok) = dst.verify_deks("acme");
    assert!(ok, "{report}");
    assert_eq!(report["total"], 301);
    assert_eq!(report["by_version"], json!({ "2": 301 }));
    let (status, got) = dst
        .as_client(&token, &format!("/v1/tenants/acme/deks/{dek_id}/unwrap"))
        .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(plaintext(&got), key);
    assert_eq!(dst.tenant("beta").await["access"], "inaccessible");
    assert_eq!(dst.tenant("acme").await["keks"][0]["current_version"], "2");
    let r = dst.get("/v1/audit/checkpoints").await;
    assert_eq!(r.status(), 200);
    // Dedupe survived the move: the revoking event delivered again is not applied again.
    let rows_of = |id: String| {
        let dst = &dst;
        async move {
            dst.sql("SELECT count(*) FROM audit_log WHERE event_id = $1")
                .bind(id)
                .int()
                .await
        }
    };
    let before = rows_of(revoked.clone()).await;
    assert!(before > 0);
    let processed = dst.processed().await;
    dst.publish_with_id(&revoked, "disabled", "beta-kek", at(10), json!({}))
        .await;
    let marker = dst.publish("expiring", "acme-kek", at(20), json!({})).await;
    dst.wait_processed(processed + 1).await;
    // The marker was published last; once it is in, everything before it was consumed.
    assert_eq!(rows_of(marker).await, 1);
    assert_eq!(
        rows_of(revoked.clone()).await,
        before,
        "the event was applied twice"
    );
    assert_eq!(dst.processed().await, processed + 1);
    // New rows after the import collide with nothing: a tenant and key (keks' sequence), a
    // DEK, audit rows (audit_log's sequence), and the chain goes on from the imported head.
    dst.tenant_with_key("gamma", "gamma-kek").await;
    let (status, created) = dst.as_client(&token, "/v1/tenants/gamma/deks").await;
    assert_eq!(status, 201, "{created}");
    let (status, created) = dst.as_client(&token, "/v1/tenants/acme/deks").await;
    assert_eq!(status, 201, "{created}");
    wait_chained_and_checkpointed(&dst).await;
    let (report, err, ok) = audit_verify(&dst.db.url, &amqp);
    assert!(ok, "audit verify failed after new rows: {err}");
    assert!(
        report["rows"].as_i64() > Some(source_counts[9].1 + 1),
        "{report}"
    );
    assert_eq!(report["pending"], 0);
    let (pg_id, src_max): (i64, i64) = (
        sqlx::query_scalar("SELECT max(id) FROM keks")
            .fetch_one(&pg)
            .await
            .expect("max"),
        sqlx::query_scalar("SELECT max(id) FROM keks")
            .fetch_one(&sqlite)
            .await
            .expect("max"),
    );
    assert_eq!(pg_id, src_max + 1);

    // And back: PostgreSQL to a new SQLite file, the chain intact there too.
    dst.stop().await;
    let (archive2, summary2) = export(&dst.db.url, &amqp);
    assert_eq!(summary2["source"], "postgres");
    let back = TestDb::create_on(Backend::Sqlite).await;
    let (_, err, code) = import(
        &back.url,
        &amqp,
        &std::fs::read(&archive2).expect("archive"),
    );
    assert_eq!(code, 0, "import into SQLite failed: {err}");
    let (report, err, ok) = audit_verify(&back.url, &amqp);
    assert!(
        ok,
        "audit verify failed on SQLite after the way back: {err}"
    );
    assert!(
        report["rows"].as_i64() > Some(source_counts[9].1 + 1),
        "{report}"
    );

    pg.close().await;
    back.drop_db().await;
    let _ = std::fs::remove_file(archive);
    let _ = std::fs::remove_file(archive2);
    src.shutdown().await;
    dst.shutdown().await;
}

/// The lines of an archive, each without its newline.
fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8(bytes.to_vec())
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `lines` (the trailer last) with the trailer's hash recomputed over the others.
fn rehashed(lines: &[String]) -> Vec<u8> {
    let (trailer, body) = lines.split_last().expect("lines");
    let mut text = String::new();
    for l in body {
        text.push_str(l);
        text.push('\n');
    }
    let mut trailer: Value = serde_json::from_str(trailer).expect("trailer");
    let hash: String = Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    trailer["trailer"]["sha256"] = hash.into();
    text.push_str(&trailer.to_string());
    text.push('\n');
    text.into_bytes()
}

fn table_of(line: &str) -> String {
    serde_json::from_str::<Value>(line).expect("line")["table"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn assert_refused(r: &(String, String, i32), code: i32, says: &str) {
    let (_, err, got) = r;
    assert_eq!(*got, code, "{err}");
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "one line: {err}");
    assert!(line.contains(says), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_archives_and_a_non_empty_database_are_refused_with_nothing_written() {
    let (mut src, ..) = standalone_deployment(20).await;
    src.stop().await;
    let amqp = src.config.amqp.clone();
    let (path, _) = export(&src.db.url, &amqp);
    let good = std::fs::read(&path).expect("archive");
    let original = lines(&good);
    let target = TestDb::create_on(Backend::Postgres).await;

    // One byte of a DEK's wrapped key changed.
    let mut edited = original.clone();
    let i = edited
        .iter()
        .position(|l| table_of(l) == "deks")
        .expect("a DEK line");
    let at = edited[i].find("\"wrapped\":\"").expect("wrapped") + 12;
    let mut bytes = edited[i].clone().into_bytes();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    edited[i] = String::from_utf8(bytes).expect("utf-8");
    let mut archive = edited.join("\n");
    archive.push('\n');
    let r = import(&target.url, &amqp, archive.as_bytes());
    assert_refused(&r, 1, "SHA-256 does not match");

    // A line dropped.
    let mut dropped = original.clone();
    dropped.remove(i);
    let mut archive = dropped.join("\n");
    archive.push('\n');
    assert_refused(
        &import(&target.url, &amqp, archive.as_bytes()),
        1,
        "SHA-256 does not match",
    );
    // Dropped and the hash recomputed: the counts tell.
    assert_refused(
        &import(&target.url, &amqp, &rehashed(&dropped)),
        1,
        "counts other rows (deks",
    );

    // Truncated, at a line boundary and in the middle of one.
    let cut = good.len() / 2;
    let boundary = good[..cut]
        .iter()
        .rposition(|b| *b == b'\n')
        .expect("a line")
        + 1;
    assert_refused(
        &import(&target.url, &amqp, &good[..boundary]),
        1,
        "truncated",
    );
    assert_refused(&import(&target.url, &amqp, &good[..cut]), 1, "truncated");
    assert_refused(&import(&target.url, &amqp, b""), 1, "truncated");

    // Nothing of that was written: the good archive imports now, once.
    let (_, err, code) = import(&target.url, &amqp, &good);
    assert_eq!(code, 0, "{err}");
    let r = import(&target.url, &amqp, &good);
    assert_refused(&r, 2, "not empty");

    // Another root key than the archive's: refused before anything is written.
    let other = TestDb::create_on(Backend::Postgres).await;
    let path2 = archive_path();
    std::fs::write(&path2, &good).expect("write");
    let r = byokd(
        &other.url,
        &amqp,
        &["import", "--in", path2.to_str().expect("utf-8")],
        &[(
            "BYOKD_LOCAL_KMS_ROOT_KEY",
            "Q0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0M=",
        )],
    );
    assert_refused(&r, 3, "root key");
    let (_, err, code) = import(&other.url, &amqp, &good);
    assert_eq!(code, 0, "nothing was written by the refused import: {err}");

    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path2);
    other.drop_db().await;
    target.drop_db().await;
    src.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_row_edited_in_the_archive_is_imported_and_caught_by_audit_verify() {
    let (mut src, ..) = standalone_deployment(0).await;
    src.stop().await;
    let amqp = src.config.amqp.clone();
    let (path, _) = export(&src.db.url, &amqp);
    let original = lines(&std::fs::read(&path).expect("archive"));

    // An audit row's detail changed (say, to hide which key a change was about), and the
    // hash recomputed as whoever edits the archive can.
    let mut edited = original.clone();
    let (i, mut line) = edited
        .iter()
        .enumerate()
        .map(|(i, l)| (i, serde_json::from_str::<Value>(l).expect("line")))
        .find(|(_, v)| {
            v["table"] == "audit_log"
                && v["row"]["chain_seq"].is_i64()
                && v["row"]["detail"].as_str().is_some_and(|d| d.len() > 2)
        })
        .expect("a chained audit row with detail");
    let id = line["row"]["id"].as_i64().expect("id");
    let mut detail: Value =
        serde_json::from_str(line["row"]["detail"].as_str().expect("detail")).expect("json");
    detail["edited"] = true.into();
    line["row"]["detail"] = detail.to_string().into();
    edited[i] = line.to_string();
    let target = TestDb::create_on(Backend::Postgres).await;
    let (_, err, code) = import(&target.url, &amqp, &rehashed(&edited));
    assert_eq!(
        code, 0,
        "an edit that keeps the archive well-formed imports: {err}"
    );
    let (_, err, ok) = audit_verify(&target.url, &amqp);
    assert!(!ok, "audit verify passed an edited row");
    assert!(
        err.contains("audit trail tampered with") && err.contains(&format!("row {id} ")),
        "{err}"
    );

    // The unedited archive verifies, so it was the edit that was caught.
    let clean = TestDb::create_on(Backend::Postgres).await;
    let (_, err, code) = import(&clean.url, &amqp, &rehashed(&original));
    assert_eq!(code, 0, "{err}");
    let (_, err, ok) = audit_verify(&clean.url, &amqp);
    assert!(ok, "{err}");
    // On PostgreSQL, the kept text and the jsonb must agree; the jsonb changed alone (its
    // CHECK dropped first) is caught all the same.
    let pg = PgPool::connect(&clean.url).await.expect("pg");
    let id: i64 = sqlx::query_scalar(
        "SELECT min(id) FROM audit_log JOIN audit_chain USING (id) WHERE detail_text IS NOT NULL",
    )
    .fetch_one(&pg)
    .await
    .expect("a row with its chained text kept");
    let edit =
        format!("UPDATE audit_log SET detail = detail || '{{\"edited\": true}}' WHERE id = {id}");
    let refused = sqlx::query(sqlx::AssertSqlSafe(edit.clone()))
        .execute(&pg)
        .await;
    assert!(
        refused.is_err(),
        "the CHECK lets the jsonb disagree with the chained text"
    );
    sqlx::query("ALTER TABLE audit_log DROP CONSTRAINT audit_log_detail_text_agrees")
        .execute(&pg)
        .await
        .expect("drop the check");
    sqlx::query(sqlx::AssertSqlSafe(edit))
        .execute(&pg)
        .await
        .expect("edit");
    let (_, err, ok) = audit_verify(&clean.url, &amqp);
    assert!(
        !ok,
        "audit verify passed a jsonb edited beside its chained text"
    );
    assert!(err.contains(&format!("row {id} ")), "{err}");
    pg.close().await;

    let _ = std::fs::remove_file(path);
    target.drop_db().await;
    clean.drop_db().await;
    src.shutdown().await;
}

#[tokio::test]
async fn every_table_and_column_of_both_schemas_is_carried() {
    let mut carried: Vec<(String, String)> = TABLES
        .iter()
        .flat_map(|t| {
            t.columns
                .iter()
                .map(|(c, _)| (t.name.to_owned(), (*c).to_owned()))
        })
        .collect();
    carried.sort();

    let pg_db = TestDb::create_on(Backend::Postgres).await;
    let store = byokd::store::Store::connect(&pg_db.url, 2)
        .await
        .expect("store");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&pg_db.url).await.expect("pg");
    let mut pg: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'
         ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .expect("columns");
    // PostgreSQL's own column beside audit_log.detail (what an imported row was chained with).
    pg.retain(|(t, c)| !(t == "audit_log" && c == "detail_text"));
    // PostgreSQL keeps audit_log's place and chain value in audit_chain, joined on the id
    // (its row_txid repeats audit_log.txid, as the chainer's cursor).
    pg.retain(|(t, c)| !(t == "audit_chain" && (c == "id" || c == "row_txid")));
    for (t, c) in &mut pg {
        if t == "audit_chain" {
            *t = "audit_log".to_owned();
            debug_assert!(c == "chain_seq" || c == "chain");
        }
    }
    pg.sort();
    assert_eq!(
        pg, carried,
        "a PostgreSQL table or column export does not carry"
    );

    let sqlite_db = TestDb::create_on(Backend::Sqlite).await;
    let store = byokd::store::Store::connect(&sqlite_db.url, 2)
        .await
        .expect("store");
    store.migrate().await.expect("migrate");
    let lite = SqlitePool::connect(&sqlite_db.url).await.expect("sqlite");
    let mut sqlite: Vec<(String, String)> = sqlx::query_as(
        "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'
           AND m.name NOT IN ('_sqlx_migrations', 'changes')",
    )
    .fetch_all(&lite)
    .await
    .expect("columns");
    sqlite.sort();
    assert_eq!(
        sqlite, carried,
        "a SQLite table or column export does not carry"
    );

    pool.close().await;
    lite.close().await;
    pg_db.drop_db().await;
    sqlite_db.drop_db().await;
}
