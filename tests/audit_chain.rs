//! The audit trail's tamper evidence against the real PostgreSQL: `byokd audit verify` on a
//! trail written by real operations, then catching each kind of tampering; concurrent
//! writers on several connections and two replicas ending in one gap-free chain; the order
//! the chainer follows; checkpoints; filters and the JSON lines export.

mod common;

use byokd::audit::{ChainKey, Chainer};
use byokd::config::AuditSettings;
use byokd::store::{AuditRow, Store};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use common::{ROOT_KEY, TestApp, TestDb, at, byokd_command, wait_for, with_service_env};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::Duration;

/// A daemon that chains every 20 ms and checkpoints every second.
async fn fast_chaining_app() -> TestApp {
    TestApp::spawn_with(|c| {
        c.audit.chain_interval_ms = 20;
        c.audit.checkpoint_interval_secs = 1;
    })
    .await
}

/// Runs `byokd ARGS` against the test's database: (stdout, stderr, success).
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

/// `byokd audit verify --json`: the report of a verified chain.
fn verify_ok(app: &TestApp, extra: &[&str]) -> Value {
    let mut args = vec!["audit", "verify", "--json"];
    args.extend_from_slice(extra);
    let (stdout, stderr, ok) = byokd(app, &args);
    assert!(ok, "audit verify failed: {stderr}");
    serde_json::from_str(&stdout).expect("a JSON report")
}

/// `byokd audit verify`, expected to fail: its one line on stderr.
fn verify_fails(app: &TestApp) -> String {
    let (stdout, stderr, ok) = byokd(app, &["audit", "verify", "--json"]);
    assert!(!ok, "audit verify passed a tampered trail: {stdout}");
    let report: Value = serde_json::from_str(&stdout).expect("a JSON failure report");
    assert_eq!(report["ok"], false);
    let line = stderr.trim();
    assert_eq!(line.lines().count(), 1, "one line: {stderr}");
    assert!(
        line.starts_with("byokd: error: audit trail tampered with: "),
        "{line}"
    );
    line.to_owned()
}

async fn scalar_i64(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// `audit verify` names row `id` as unchained too long; then the unchained rows are deleted
/// and the trail verifies again.
async fn named_unchained_then_removed(app: &TestApp, id: i64) {
    let line = verify_fails(app);
    assert!(
        line.contains(&format!("row {id} (recorded ")) && line.contains("still unchained"),
        "{line}"
    );
    sqlx::query(
        "DELETE FROM audit_log a WHERE NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.id = a.id)",
    )
    .execute(&app.pool)
    .await
    .expect("delete the unchained rows");
    verify_ok(app, &[]);
}

/// Waits until every audit row is chained.
async fn wait_chained(pool: &PgPool) {
    let pool = pool.clone();
    wait_for("every audit row chained", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(common::PG_UNCHAINED)
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n == 0)
        }
    })
    .await;
}

fn root_keys() -> byokd::config::RootKeys {
    let config = byokd::config::Config {
        local_kms_root_key: Some(secrecy::SecretString::from(ROOT_KEY)),
        ..byokd::config::Config::default()
    };
    config.require_root_keys().expect("root key")
}

/// A chainer with default settings and the daemon's key on `store`'s database.
async fn default_chainer(store: &Store) -> Chainer {
    Chainer::new(
        store.clone(),
        chain_key(store).await,
        AuditSettings::default(),
    )
}

/// The chain key the daemon uses on this database (stored on first use).
async fn chain_key(store: &Store) -> ChainKey {
    ChainKey::load(store, &root_keys())
        .await
        .expect("chain key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_catches_a_modified_a_deleted_an_inserted_row_and_a_truncated_tail() {
    let mut app = fast_chaining_app().await;
    // Rows from real operations: registrations (API), revocations and restorations (events
    // and their confirmations at the KMS).
    for tenant in ["acme", "beta"] {
        let key = format!("{tenant}-kek");
        app.tenant_with_key(tenant, &key).await;
        let since = Utc::now();
        app.kms_do(&key, "disabled", &json!({})).await;
        app.publish("disabled", &key, at(10), json!({})).await;
        app.wait_observed(&key, since).await;
        let since = Utc::now();
        app.kms_do(&key, "enabled", &json!({})).await;
        app.publish("enabled", &key, at(20), json!({})).await;
        app.wait_observed(&key, since).await;
    }
    wait_chained(&app.pool).await;
    let pool = app.pool.clone();
    wait_for("a checkpoint of the head", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT (SELECT max(chain_seq) FROM audit_checkpoints)
                        = (SELECT max(chain_seq) FROM audit_chain)",
            )
            .fetch_one(&pool)
            .await
            .is_ok_and(|same| same)
        }
    })
    .await;
    // Tampering is done with the daemon down, so nothing moves meanwhile.
    app.stop().await;

    let total = scalar_i64(&app.pool, "SELECT count(*) FROM audit_log").await;
    assert!(total >= 8, "rows from real operations: {total}");
    let report = verify_ok(&app, &[]);
    assert_eq!(report["ok"], true);
    assert_eq!(report["rows"], total);
    assert_eq!(report["head"]["chain_seq"], total);
    assert_eq!(report["pending"], 0);
    assert!(report["checkpoints"].as_i64() >= Some(1), "{report}");
    let acme = scalar_i64(
        &app.pool,
        "SELECT count(*) FROM audit_log WHERE tenant_id = 'acme'",
    )
    .await;
    let report = verify_ok(&app, &["--tenant", "acme"]);
    assert_eq!(report["rows"], total, "the whole chain is walked");
    assert_eq!(
        report["tenant"],
        json!({ "id": "acme", "rows": acme, "pending": 0 })
    );
    let (_, stderr, ok) = byokd(&app, &["audit", "verify", "--tenant", "ghost"]);
    assert!(!ok && stderr.contains("ghost"), "{stderr}");

    let id_at = |seq: i64| {
        let pool = app.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT id FROM audit_chain WHERE chain_seq = $1")
                .bind(seq)
                .fetch_one(&pool)
                .await
                .expect("row at chain_seq")
        }
    };
    let exec = |sql: &'static str| {
        let pool = app.pool.clone();
        async move {
            sqlx::query(sql)
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    };

    // UPDATE of a row's content.
    let modified = id_at(3).await;
    exec(
        "CREATE TABLE saved AS SELECT * FROM audit_log
         WHERE id = (SELECT id FROM audit_chain WHERE chain_seq = 3)",
    )
    .await;
    exec(
        "UPDATE audit_log SET outcome = 'not_confirmed'
         WHERE id = (SELECT id FROM audit_chain WHERE chain_seq = 3)",
    )
    .await;
    assert!(verify_fails(&app).ends_with(&format!(
        "row {modified} (chain_seq 3) was modified: its content no longer matches its \
             chain value"
    )));
    exec("UPDATE audit_log a SET outcome = s.outcome FROM saved s WHERE a.id = s.id").await;
    exec("DROP TABLE saved").await;
    verify_ok(&app, &[]);

    // DELETE in the middle: the row, and then its place in the chain too.
    let (before, after) = (id_at(3).await, id_at(5).await);
    exec(
        "CREATE TABLE saved AS SELECT * FROM audit_log
         WHERE id = (SELECT id FROM audit_chain WHERE chain_seq = 4)",
    )
    .await;
    exec("CREATE TABLE saved_place AS SELECT * FROM audit_chain WHERE chain_seq = 4").await;
    exec("DELETE FROM audit_log WHERE id = (SELECT id FROM saved)").await;
    let deleted = format!(
        "rows were deleted: chain_seq 4..=4 missing between row {before} (chain_seq 3) and \
         row {after} (chain_seq 5)"
    );
    assert!(verify_fails(&app).ends_with(&deleted));
    exec("DELETE FROM audit_chain WHERE chain_seq = 4").await;
    assert!(verify_fails(&app).ends_with(&deleted));
    exec("INSERT INTO audit_log SELECT * FROM saved").await;
    exec("INSERT INTO audit_chain SELECT * FROM saved_place").await;
    exec("DROP TABLE saved, saved_place").await;
    verify_ok(&app, &[]);

    // INSERT in the middle: later rows renumbered to make room, and the forged row carries
    // the chain value of the row it displaced.
    // (Renumbered through a large offset: chain_seq is unique and positive.)
    exec("UPDATE audit_chain SET chain_seq = chain_seq + 1000000 WHERE chain_seq >= 4").await;
    exec("UPDATE audit_chain SET chain_seq = chain_seq - 999999 WHERE chain_seq > 1000000").await;
    let forged: i64 = sqlx::query_scalar(
        "WITH forged AS (
             INSERT INTO audit_log (tenant_id, provider, key_ref, action, outcome, source, detail)
             SELECT tenant_id, provider, key_ref, 'enabled', 'applied', 'api', detail
             FROM audit_log WHERE id = (SELECT id FROM audit_chain WHERE chain_seq = 5)
             RETURNING id, txid)
         INSERT INTO audit_chain (chain_seq, id, row_txid, chain)
         SELECT 4, id, txid, (SELECT chain FROM audit_chain WHERE chain_seq = 5) FROM forged
         RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .expect("forged row");
    assert!(verify_fails(&app).contains(&format!("row {forged} (chain_seq 4) was inserted")));
    exec("DELETE FROM audit_log WHERE id = (SELECT id FROM audit_chain WHERE chain_seq = 4)").await;
    exec("DELETE FROM audit_chain WHERE chain_seq = 4").await;
    exec("UPDATE audit_chain SET chain_seq = chain_seq + 1000000 WHERE chain_seq > 4").await;
    exec("UPDATE audit_chain SET chain_seq = chain_seq - 1000001 WHERE chain_seq > 1000000").await;
    verify_ok(&app, &[]);

    // A row nobody chained, dated long ago: inserted behind byokd's back.
    let stale: i64 = sqlx::query_scalar(
        "INSERT INTO audit_log (at, action, outcome, source)
         VALUES (now() - interval '1 hour', 'kek_registered', 'applied', 'api') RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .expect("unchained row");
    named_unchained_then_removed(&app, stale).await;

    // A row given a transaction id from the chained past: the chainer reads only after its
    // head's (txid, id), so it never takes the row, even while running; verify names it.
    let backdated: i64 = sqlx::query_scalar(
        "INSERT INTO audit_log (at, txid, action, outcome, source)
         VALUES (now() - interval '1 hour', '3', 'kek_registered', 'applied', 'api')
         RETURNING id",
    )
    .fetch_one(&app.pool)
    .await
    .expect("backdated row");
    {
        let store = Store::connect(&app.db.url, 2).await.expect("store");
        let chainer = default_chainer(&store).await;
        let mut seat = chainer.seat().await.expect("seat");
        let round = chainer.round(&mut seat, Utc::now()).await.expect("round");
        assert_eq!(round.chained, 0, "a row behind the head is not chained");
        seat.close().await;
    }
    assert_eq!(chain_seq_of(&app.pool, backdated).await, None);
    named_unchained_then_removed(&app, backdated).await;

    // A truncated tail: the last rows, up to and including the latest checkpoint's, deleted.
    let checkpoint = scalar_i64(&app.pool, "SELECT max(chain_seq) FROM audit_checkpoints").await;
    sqlx::query(
        "DELETE FROM audit_log WHERE id IN (SELECT id FROM audit_chain WHERE chain_seq >= $1)",
    )
    .bind(checkpoint)
    .execute(&app.pool)
    .await
    .expect("truncate");
    sqlx::query("DELETE FROM audit_chain WHERE chain_seq >= $1")
        .bind(checkpoint)
        .execute(&app.pool)
        .await
        .expect("truncate the chain");
    let line = verify_fails(&app);
    assert!(
        line.contains(&format!(
            "rows were deleted from the end: the chain ends at chain_seq {}",
            checkpoint - 1
        )) && line.contains(&format!("had reached chain_seq {checkpoint}")),
        "{line}"
    );

    // Growing the chain again past the checkpoint from the cut: the chain now disagrees
    // with what was checkpointed there.
    exec(
        "INSERT INTO audit_log (action, outcome, source)
         SELECT 'kek_registered', 'applied', 'api' FROM generate_series(1, 3)",
    )
    .await;
    let store = Store::connect(&app.db.url, 2).await.expect("store");
    let chainer = default_chainer(&store).await;
    let mut seat = chainer.seat().await.expect("seat");
    let rounds = chain_everything(&chainer, &mut seat, &app.pool, Utc::now()).await;
    assert_eq!(rounds.iter().map(|r| r.chained).sum::<usize>(), 3);
    seat.close().await;
    let line = verify_fails(&app);
    assert!(
        line.contains(&format!(
            "the chain at chain_seq {checkpoint} no longer has the value checkpointed"
        )),
        "{line}"
    );
    app.shutdown().await;
}

fn write_row(writer: usize, tx: usize, n: usize) -> AuditRow {
    AuditRow {
        tenant_id: None,
        provider: None,
        key_ref: None,
        action: "test_write".into(),
        outcome: "applied".into(),
        source: "test".into(),
        event_id: None,
        detail: json!({ "writer": writer, "tx": tx, "n": n }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_two_replicas_end_in_one_gap_free_chain() {
    let app = TestApp::spawn_with(|c| {
        c.audit.chain_interval_ms = 20;
        c.audit.batch_size = 25;
    })
    .await;
    let replica = app.replica().await;

    // Six writers, each on a connection of its own, interleave transactions of one to four
    // rows; every fifth rolls back; writer 0 also holds one transaction open for a while,
    // so the chainer must wait for it while the others commit around it.
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..6 {
        let url = app.db.url.clone();
        writers.spawn(async move {
            let store = Store::connect(&url, 1).await.expect("writer store");
            let mut committed = 0;
            for tx_no in 0..30 {
                let mut tx = store.begin().await.expect("begin");
                let n = 1 + (writer + tx_no) % 4;
                for i in 0..n {
                    tx.audit(&[write_row(writer, tx_no, i)])
                        .await
                        .expect("audit row");
                    if (writer + tx_no) % 3 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                if writer == 0 && tx_no == 3 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                if tx_no % 5 == 4 {
                    drop(tx);
                } else {
                    tx.commit().await.expect("commit");
                    committed += n as i64;
                }
            }
            committed
        });
    }
    let mut committed = 0;
    while let Some(n) = writers.join_next().await {
        committed += n.expect("writer");
    }
    wait_chained(&app.pool).await;

    let written = scalar_i64(
        &app.pool,
        "SELECT count(*) FROM audit_log WHERE action = 'test_write'",
    )
    .await;
    assert_eq!(written, committed, "rolled-back rows never appear");
    let (rows, first, last): (i64, i64, i64) =
        sqlx::query_as("SELECT count(*), min(chain_seq), max(chain_seq) FROM audit_chain")
            .fetch_one(&app.pool)
            .await
            .expect("chain bounds");
    assert_eq!((first, last), (1, rows), "chain_seq is dense from 1");
    // The order is the rows' own: (inserting transaction, id), whoever chained them.
    let out_of_order = scalar_i64(
        &app.pool,
        "SELECT count(*) FROM (
             SELECT (txid, id) < lag((txid, id)) OVER (ORDER BY chain_seq) AS back
             FROM audit_log JOIN audit_chain USING (id)) o
         WHERE back",
    )
    .await;
    assert_eq!(out_of_order, 0);
    let report = verify_ok(&app, &[]);
    assert_eq!(report["rows"], rows);
    replica.stop().await;
    app.shutdown().await;
}

/// Inserts one audit row in `tx` (which must stay open or commit as the test says).
async fn insert_in(tx: &mut sqlx::PgConnection, action: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO audit_log (action, outcome, source) VALUES ($1, 'applied', 'test')
         RETURNING id",
    )
    .bind(action)
    .fetch_one(tx)
    .await
    .expect("insert")
}

/// Runs chainer rounds until no row is left unchained. Transactions of other tests on the
/// same PostgreSQL hold the horizon back for moments (transaction ids are the cluster's),
/// so this may take a few rounds.
async fn chain_everything(
    chainer: &Chainer,
    seat: &mut byokd::audit::Seat,
    pool: &PgPool,
    now: DateTime<Utc>,
) -> Vec<byokd::audit::Round> {
    let start = std::time::Instant::now();
    let mut rounds = Vec::new();
    loop {
        rounds.push(chainer.round(seat, now).await.expect("round"));
        let left: i64 = sqlx::query_scalar(common::PG_UNCHAINED)
            .fetch_one(pool)
            .await
            .expect("unchained");
        if left == 0 {
            return rounds;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "rows left unchained"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn chain_seq_of(pool: &PgPool, id: i64) -> Option<i64> {
    sqlx::query_scalar("SELECT chain_seq FROM audit_chain WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .expect("row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_wait_for_every_older_transaction_and_one_seat_leads() {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 4).await.expect("store");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&db.url).await.expect("pool");
    let settings = AuditSettings {
        checkpoint_interval_secs: 60,
        ..AuditSettings::default()
    };
    let chainer = Chainer::new(store.clone(), chain_key(&store).await, settings);
    let mut seat = chainer.seat().await.expect("seat");

    // An open transaction that has written holds back every row inserted after it began.
    let mut older = pool.begin().await.expect("begin");
    let _: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(&mut *older)
        .await
        .expect("xid");
    let mut newer = pool.begin().await.expect("begin");
    let newer_row = insert_in(&mut newer, "newer").await;
    newer.commit().await.expect("commit");
    let older_row = insert_in(&mut older, "older").await;
    assert!(older_row > newer_row, "ids are in insertion order");
    let round = chainer.round(&mut seat, Utc::now()).await.expect("round");
    assert!(round.leading);
    assert_eq!(
        round.chained, 0,
        "the newer row waits for the older transaction"
    );
    assert_eq!(chain_seq_of(&pool, newer_row).await, None);
    older.commit().await.expect("commit");

    let rounds = chain_everything(&chainer, &mut seat, &pool, Utc::now()).await;
    // The older transaction's row comes first though its id is higher.
    assert_eq!(chain_seq_of(&pool, older_row).await, Some(1));
    assert_eq!(chain_seq_of(&pool, newer_row).await, Some(2));
    let checkpoints: Vec<i64> = rounds
        .iter()
        .filter_map(|r| r.checkpoint.as_ref().map(|c| c.chain_seq))
        .collect();
    assert_eq!(
        checkpoints.len(),
        1,
        "the first head is checkpointed at once"
    );

    // Checkpoints: only once the interval passed and the head moved.
    let mut tx = pool.begin().await.expect("begin");
    insert_in(&mut tx, "third").await;
    tx.commit().await.expect("commit");
    let rounds = chain_everything(&chainer, &mut seat, &pool, Utc::now()).await;
    assert!(rounds.iter().all(|r| r.checkpoint.is_none()));
    let later = Utc::now() + ChronoDuration::seconds(61);
    let round = chainer.round(&mut seat, later).await.expect("round");
    assert_eq!(round.chained, 0);
    assert_eq!(round.checkpoint.map(|c| c.chain_seq), Some(3));
    let round = chainer.round(&mut seat, later).await.expect("round");
    assert_eq!(round.checkpoint, None, "the head did not move");

    // Another replica's seat waits while this one leads, and takes over when it is gone.
    let other = default_chainer(&store).await;
    let mut other_seat = other.seat().await.expect("seat");
    let round = other
        .round(&mut other_seat, Utc::now())
        .await
        .expect("round");
    assert!(!round.leading);
    seat.close().await;
    let round = other
        .round(&mut other_seat, Utc::now())
        .await
        .expect("round");
    assert!(round.leading);
    other_seat.close().await;

    let report = byokd::audit::verify(
        &store,
        &chain_key(&store).await,
        None,
        Duration::from_secs(300),
        Utc::now(),
    )
    .await
    .expect("verified");
    assert_eq!((report.rows, report.checkpoints), (3, 2));
    pool.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_filters_checkpoints_and_the_jsonl_export() {
    let app = fast_chaining_app().await;
    app.tenant_with_key("acme", "acme-kek").await;
    app.tenant_with_key("beta", "beta-kek").await;
    let base: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().expect("time");
    // 1,200 rows of acme's API clients, one a second; 10 of beta's.
    sqlx::query(
        "INSERT INTO audit_log (at, tenant_id, client, action, outcome, source, detail)
         SELECT $1 + make_interval(secs => i), 'acme',
                CASE WHEN i % 2 = 0 THEN 'svc-a' ELSE 'svc-b' END,
                CASE WHEN i % 3 = 0 THEN 'dek_unwrapped' ELSE 'dek_created' END,
                CASE WHEN i % 5 = 0 THEN 'refused' ELSE 'allowed' END,
                'api', jsonb_build_object('i', i)
         FROM generate_series(0, 1199) i",
    )
    .bind(base)
    .execute(&app.pool)
    .await
    .expect("acme rows");
    sqlx::query(
        "INSERT INTO audit_log (at, tenant_id, client, action, outcome, source)
         SELECT $1 + make_interval(secs => i), 'beta', 'svc-a', 'dek_created', 'allowed', 'api'
         FROM generate_series(0, 9) i",
    )
    .bind(base)
    .execute(&app.pool)
    .await
    .expect("beta rows");
    wait_chained(&app.pool).await;

    let entries = |query: String| {
        let app = &app;
        async move {
            let r = app.get(&format!("/v1/audit?{query}")).await;
            assert_eq!(r.status(), 200, "{query}");
            let body: Value = r.json().await.expect("json");
            body["entries"].as_array().cloned().expect("entries")
        }
    };
    let svc_a = entries("tenant=acme&client=svc-a&limit=1000".into()).await;
    assert_eq!(svc_a.len(), 600);
    assert!(
        svc_a
            .iter()
            .all(|e| e["client"] == "svc-a" && e["tenant_id"] == "acme")
    );
    assert!(
        svc_a
            .iter()
            .all(|e| e["chain_seq"].is_i64() && e["chain"].is_string())
    );
    // i % 3 == 0 and i % 5 == 0: every 15th of 1,200.
    let refused =
        entries("tenant=acme&action=dek_unwrapped&outcome=refused&limit=1000".into()).await;
    assert_eq!(refused.len(), 80);
    let since = (base + ChronoDuration::seconds(100)).to_rfc3339();
    let until = (base + ChronoDuration::seconds(200)).to_rfc3339();
    let window = entries(format!(
        "tenant=acme&since={}&until={}&limit=1000",
        urlencode(&since),
        urlencode(&until)
    ))
    .await;
    assert_eq!(window.len(), 100, "since inclusive, until exclusive");
    assert_eq!(window[0]["detail"]["i"], 199, "newest first");
    assert_eq!(window[99]["detail"]["i"], 100);
    let r = app.get("/v1/audit?tenant=acme&since=yesterday").await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("since must be an RFC 3339"))
    );

    // Checkpoints, newest first, admin only.
    let pool = app.pool.clone();
    wait_for("two checkpoints", Duration::from_secs(30), || {
        let pool = pool.clone();
        async move {
            sqlx::query("INSERT INTO audit_log (action, outcome, source) VALUES ('x', 'y', 'z')")
                .execute(&pool)
                .await
                .expect("a row to move the head");
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_checkpoints")
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n >= 2)
        }
    })
    .await;
    let r = app.get("/v1/audit/checkpoints").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    let checkpoints = body["checkpoints"].as_array().expect("checkpoints");
    assert!(checkpoints.len() >= 2);
    assert!(checkpoints[0]["chain_seq"].as_i64() > checkpoints[1]["chain_seq"].as_i64());
    let stored: String =
        sqlx::query_scalar("SELECT encode(chain, 'hex') FROM audit_chain WHERE chain_seq = $1")
            .bind(checkpoints[0]["chain_seq"].as_i64())
            .fetch_one(&app.pool)
            .await
            .expect("chain at the checkpoint");
    assert_eq!(checkpoints[0]["chain"], stored.as_str());
    let anonymous = app
        .http
        .get(app.url("/v1/audit/checkpoints"))
        .send()
        .await
        .expect("request");
    assert_eq!(anonymous.status(), 401);

    // The export: 1,000 of acme's rows across pages, oldest first, each with its chain.
    let until = (base + ChronoDuration::seconds(1100)).to_rfc3339();
    let (stdout, stderr, ok) = byokd(
        &app,
        &[
            "audit", "export", "--since", &since, "--until", &until, "--tenant", "acme",
            "--format", "jsonl",
        ],
    );
    assert!(ok, "{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 1000);
    assert!(lines.iter().all(|e| e["tenant_id"] == "acme"));
    assert!(
        lines
            .iter()
            .all(|e| e["chain"].as_str().is_some_and(|c| c.len() == 64))
    );
    let order: Vec<i64> = lines
        .iter()
        .filter_map(|e| e["detail"]["i"].as_i64())
        .collect();
    assert_eq!(order, (100..1100).collect::<Vec<_>>());
    let chain_at: String =
        sqlx::query_scalar("SELECT encode(chain, 'hex') FROM audit_chain WHERE id = $1")
            .bind(lines[0]["id"].as_i64())
            .fetch_one(&app.pool)
            .await
            .expect("chain");
    assert_eq!(lines[0]["chain"], chain_at.as_str());
    // Without a tenant, every tenant's rows in the window.
    let until = (base + ChronoDuration::seconds(10)).to_rfc3339();
    let (stdout, stderr, ok) = byokd(
        &app,
        &[
            "audit",
            "export",
            "--since",
            &base.to_rfc3339(),
            "--until",
            &until,
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 20);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains(r#""tenant_id":"beta""#))
            .count(),
        10
    );
    app.shutdown().await;
}

/// Percent-encodes the `+` and `:` of an RFC 3339 time for a query string.
fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_from_before_stored_keys_keeps_verifying_and_a_new_one_gets_a_random_key() {
    // A deployment from before the key was stored chained with HKDF(root key).
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 4).await.expect("store");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&db.url).await.expect("pool");
    let derived = ChainKey::derive(&root_keys().current);
    let chainer = Chainer::new(store.clone(), derived, AuditSettings::default());
    let mut seat = chainer.seat().await.expect("seat");
    for i in 0..3 {
        insert_in(
            &mut pool.acquire().await.expect("conn"),
            &format!("legacy-{i}"),
        )
        .await;
    }
    let rounds = chain_everything(&chainer, &mut seat, &pool, Utc::now()).await;
    assert_eq!(rounds.iter().map(|r| r.chained).sum::<usize>(), 3);
    seat.close().await;
    let origin = || async {
        sqlx::query_scalar::<_, String>("SELECT origin FROM audit_chain_key")
            .fetch_optional(&pool)
            .await
            .expect("origin")
    };
    assert_eq!(origin().await, None, "nothing stored before a daemon asks");
    let verify = |key: ChainKey| {
        let store = store.clone();
        async move {
            byokd::audit::verify(&store, &key, None, Duration::from_secs(300), Utc::now()).await
        }
    };
    let report = verify(chain_key(&store).await).await.expect("verified");
    assert_eq!(report.rows, 3);
    assert_eq!(origin().await.as_deref(), Some("derived"));

    // A new deployment's key is random: the derived one does not verify its chain.
    let fresh = TestDb::create().await;
    let fresh_store = Store::connect(&fresh.url, 4).await.expect("store");
    fresh_store.migrate().await.expect("migrate");
    let fresh_pool = PgPool::connect(&fresh.url).await.expect("pool");
    let chainer = default_chainer(&fresh_store).await;
    let mut seat = chainer.seat().await.expect("seat");
    insert_in(&mut fresh_pool.acquire().await.expect("conn"), "new").await;
    chain_everything(&chainer, &mut seat, &fresh_pool, Utc::now()).await;
    seat.close().await;
    let stored: String = sqlx::query_scalar("SELECT origin FROM audit_chain_key")
        .fetch_one(&fresh_pool)
        .await
        .expect("origin");
    assert_eq!(stored, "random");
    let derived = ChainKey::derive(&root_keys().current);
    let wrong = byokd::audit::verify(
        &fresh_store,
        &derived,
        None,
        Duration::from_secs(300),
        Utc::now(),
    )
    .await;
    assert!(
        wrong.is_err(),
        "the derived key must not verify a random-key chain"
    );
    let ok = byokd::audit::verify(
        &fresh_store,
        &chain_key(&fresh_store).await,
        None,
        Duration::from_secs(300),
        Utc::now(),
    )
    .await
    .expect("verified");
    assert_eq!(ok.rows, 1);
    fresh.drop_db().await;
    db.drop_db().await;
}

/// A chain whose head came from a cluster whose transaction ids ran ahead of this one's (an
/// archive of another PostgreSQL imported, a dump restored elsewhere): this cluster's new
/// rows sort before the head, yet they are chained after it, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_after_a_head_from_a_cluster_ahead_are_chained() {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 4).await.expect("store");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&db.url).await.expect("pool");
    let key = chain_key(&store).await;
    let chainer = default_chainer(&store).await;
    let mut seat = chainer.seat().await.expect("seat");
    for _ in 0..2 {
        let mut conn = pool.acquire().await.expect("conn");
        insert_in(&mut conn, "before").await;
    }
    chain_everything(&chainer, &mut seat, &pool, Utc::now()).await;

    // The imported head: a row stamped with a transaction id a million ahead, chained after
    // the head as the other cluster's chainer would have.
    let (head_seq, head_chain): (i64, Vec<u8>) =
        sqlx::query_as("SELECT chain_seq, chain FROM audit_chain ORDER BY chain_seq DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("head");
    let (id, txid, at): (i64, i64, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO audit_log (action, outcome, source, txid)
         VALUES ('imported', 'applied', 'test', (pg_current_xact_id()::text::bigint + 1000000)::text::xid8)
         RETURNING id, txid::text::bigint, at",
    )
    .fetch_one(&pool)
    .await
    .expect("imported row");
    let record = byokd::store::ChainRecord {
        id,
        chain_seq: None,
        chain: None,
        txid,
        at,
        tenant_id: None,
        client: None,
        provider: None,
        key_ref: None,
        action: "imported".into(),
        outcome: "applied".into(),
        source: "test".into(),
        event_id: None,
        detail: "{}".into(),
    };
    let value = key.link(&head_chain, head_seq + 1, &record);
    sqlx::query("INSERT INTO audit_chain (chain_seq, id, row_txid, chain) VALUES ($1, $2, $3::text::xid8, $4)")
        .bind(head_seq + 1)
        .bind(id)
        .bind(txid.to_string())
        .bind(value.to_vec())
        .execute(&pool)
        .await
        .expect("imported place");

    // New rows of this cluster: their transaction ids are far below the head's.
    let mut conn = pool.acquire().await.expect("conn");
    let after = insert_in(&mut conn, "after").await;
    drop(conn);
    chain_everything(&chainer, &mut seat, &pool, Utc::now()).await;
    assert_eq!(chain_seq_of(&pool, after).await, Some(head_seq + 2));
    seat.close().await;
    let mut cmd = byokd_command();
    with_service_env(&mut cmd, &db.url, &byokd::config::AmqpSettings::default());
    let out = cmd
        .args(["audit", "verify", "--json"])
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pool.close().await;
    db.drop_db().await;
}
