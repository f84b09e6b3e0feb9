//! Expiry and revocation: cron sweeps driven with an injected clock, tiered warnings once per
//! threshold across sweeps and replicas, expiry and its extension, every revocation kind and
//! its reversal, and key probes that catch what no event said (a disabled key, a missed
//! rotation) while never taking an unreachable KMS (OpenBao behind a proxy) for a revoked key.
//! Every test runs on PostgreSQL and on SQLite.

mod common;

use chrono::{Duration as Days, Utc};
use common::proxy::Proxy;
use common::sweeps::{run, sweeper};
use common::vault::Vault;
use common::{Backend, TestApp, at, next_json, outbox_count};
use serde_json::{Value, json};
use std::time::Duration;

on_both_backends!(each_expiry_threshold_fires_once_then_the_key_expires_and_an_extension_rearms, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn each_expiry_threshold_fires_once_then_the_key_expires_and_an_extension_rearms(
    backend: Backend,
) {
    let app = TestApp::spawn_on(backend).await;
    app.create_local_key("exp-key").await;
    app.post(
        "/v1/tenants",
        json!({ "id": "exp", "name": "Exp", "contacts": ["ops@exp.example"] }),
    )
    .await;
    let t0 = Utc::now();
    let expires = t0 + Days::days(20);
    let r = app
        .post(
            "/v1/tenants/exp/keks",
            json!({ "provider": "local", "key_ref": "exp-key",
            "expires_at": expires.to_rfc3339() }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let (a, b) = (sweeper(&app).await, sweeper(&app).await);

    // 20 days left: the 30-day warning, once, however often and wherever the scan runs.
    let first = run(&a, "expiry-scan", t0).await;
    assert_eq!(first["notifications_queued"], 1, "{first}");
    run(&a, "expiry-scan", t0 + Days::minutes(15)).await;
    run(&b, "expiry-scan", t0 + Days::minutes(30)).await;
    assert_eq!(outbox_count(&app, "exp", "key.expiring").await, 1);

    // Two replicas at the same tick: one runs it, the other finds it done or locked.
    let tick = t0 + Days::hours(1);
    let (ra, rb) = tokio::join!(a.run_due(tick), b.run_due(tick));
    let ran = ra
        .expect("a")
        .into_iter()
        .chain(rb.expect("b"))
        .filter(|r| r.schedule == "expiry-scan")
        .count();
    assert_eq!(ran, 1, "exactly one replica runs a tick");

    for (day, total) in [(7, 2), (8, 2), (13, 3), (19, 4), (19, 4)] {
        run(&a, "expiry-scan", t0 + Days::days(day) + Days::minutes(1)).await;
        assert_eq!(
            outbox_count(&app, "exp", "key.expiring").await,
            total,
            "day {day}"
        );
    }
    let warning = app
        .sql("SELECT payload FROM outbox WHERE tenant_id = 'exp' AND kind = 'key.expiring' ORDER BY seq DESC LIMIT 1")
        .scalar()
        .await;
    assert_eq!(warning["data"]["threshold_days"], 1);
    assert_eq!(warning["data"]["days_left"], 1);

    // The date is moved close at the KMS and no event tells: the probe finds the new date.
    let soon = chrono::SubsecRound::trunc_subsecs(Utc::now() + Days::seconds(2), 3);
    app.local_kms()
        .await
        .set_expiry("exp-key", Some(soon))
        .await
        .expect("shorten");
    run(&a, "key-probe", Utc::now()).await;
    let tenant = app.tenant("exp").await;
    assert_eq!(tenant["access"], "accessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["expires_at"], json!(soon));

    // Past the date: expired, encrypt_blocked, key.expired once, with no event at all.
    tokio::time::sleep((soon - Utc::now()).to_std().unwrap_or_default()).await;
    let report = run(&a, "expiry-scan", Utc::now()).await;
    assert_eq!(report["expired"], 1, "{report}");
    run(&b, "expiry-scan", Utc::now()).await;
    let tenant = app.tenant("exp").await;
    assert_eq!(tenant["access"], "encrypt_blocked");
    assert_eq!(tenant["keks"][0]["state"], "expired");
    assert_eq!(outbox_count(&app, "exp", "key.expired").await, 1);
    assert_eq!(
        app.post("/v1/tenants/exp/deks", json!({})).await.status(),
        409
    );
    let source = app
        .sql("SELECT source FROM audit_log WHERE key_ref = 'exp-key' AND action = 'access_recomputed'")
        .text()
        .await;
    assert_eq!(source, "expiry");

    // Extending the expiry at the KMS restores access (once the KMS confirms the event) and
    // re-arms the warnings for the new date.
    let new_date = Utc::now() + Days::days(60);
    app.local_kms()
        .await
        .set_expiry("exp-key", Some(new_date))
        .await
        .expect("extend");
    app.publish(
        "expiry_changed",
        "exp-key",
        at(0),
        json!({ "expires_at": new_date.to_rfc3339() }),
    )
    .await;
    app.wait_processed(1).await;
    common::wait_for("access restored", Duration::from_secs(20), || async {
        app.tenant("exp").await["access"] == "accessible"
    })
    .await;
    assert_eq!(outbox_count(&app, "exp", "tenant.restored").await, 1);
    run(&a, "expiry-scan", new_date - Days::days(25)).await;
    assert_eq!(
        outbox_count(&app, "exp", "key.expiring").await,
        5,
        "re-armed for the new date"
    );
    app.shutdown().await;
}

on_both_backends!(every_revocation_kind_blocks_at_once_and_its_reversal_restores, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn every_revocation_kind_blocks_at_once_and_its_reversal_restores(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    let mut access = app.access_listener().await;
    // Each change is made at the (local) KMS and its event published, as a KMS would.
    // Permission changes need a KMS with permissions: see the Vault tests.
    let cases: [(&str, &[&str]); 3] = [
        ("disabled", &["enabled"]),
        ("deletion_scheduled", &["deletion_cancelled", "enabled"]),
        ("destroyed", &[]),
    ];
    let mut published = 0;
    for (i, (kind, reversal)) in cases.iter().enumerate() {
        let tenant = format!("rv{i}");
        let key = format!("rv-key-{i}");
        app.tenant_with_key(&tenant, &key).await;
        let dek: Value = app
            .post(&format!("/v1/tenants/{tenant}/deks"), json!({}))
            .await
            .json()
            .await
            .expect("dek");
        app.kms_do(&key, kind, &json!({})).await;
        let since = Utc::now();
        app.publish(kind, &key, at(0), json!({})).await;
        published += 1;
        app.wait_processed(published).await;
        let (routing, body) = next_json(&mut access, Duration::from_secs(10))
            .await
            .expect("access message");
        assert_eq!(routing, "tenant.access.inaccessible", "{kind}");
        assert_eq!(body["tenant_id"], tenant.as_str());
        assert_eq!(
            app.tenant(&tenant).await["access"],
            "inaccessible",
            "{kind}"
        );
        assert_eq!(
            app.post(&format!("/v1/tenants/{tenant}/deks"), json!({}))
                .await
                .status(),
            409,
            "{kind}"
        );
        assert_eq!(
            outbox_count(&app, &tenant, "tenant.inaccessible").await,
            2,
            "{kind}"
        );
        // Confirmed by the KMS (only then is a destroyed key final).
        app.wait_observed(&key, since).await;
        let got: Value = app
            .get(&format!(
                "/v1/tenants/{tenant}/deks/{}",
                dek["dek_id"].as_str().expect("id")
            ))
            .await
            .json()
            .await
            .expect("dek");
        assert_eq!(got["unrecoverable"], *kind == "destroyed", "{kind}");

        let since = Utc::now();
        for (j, back) in reversal.iter().enumerate() {
            app.kms_do(&key, back, &json!({})).await;
            app.publish(back, &key, at(10 + j as i64), json!({})).await;
            published += 1;
        }
        app.wait_processed(published).await;
        let expected = if reversal.is_empty() {
            "inaccessible"
        } else {
            app.wait_observed(&key, since).await;
            "accessible"
        };
        assert_eq!(
            app.tenant(&tenant).await["access"],
            expected,
            "{kind} reversed"
        );
        if !reversal.is_empty() {
            let (routing, _) = next_json(&mut access, Duration::from_secs(10))
                .await
                .expect("restored");
            assert_eq!(routing, "tenant.access.accessible", "{kind}");
            assert_eq!(
                outbox_count(&app, &tenant, "tenant.restored").await,
                2,
                "{kind}"
            );
            assert_eq!(
                app.post(&format!("/v1/tenants/{tenant}/deks"), json!({}))
                    .await
                    .status(),
                201
            );
        }
    }
    app.shutdown().await;
}

on_both_backends!(the_probe_catches_a_disabled_key_and_a_missed_rotation_no_event_told_of, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn the_probe_catches_a_disabled_key_and_a_missed_rotation_no_event_told_of(backend: Backend) {
    use byokd::domain::KeyState::{Disabled, Enabled};
    let app = TestApp::spawn_on(backend).await;
    let mut access = app.access_listener().await;
    app.tenant_with_key("pr", "pr-key").await;
    app.bulk_deks("pr", "pr-key", 200).await;
    let s = sweeper(&app).await;
    let quiet = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(
        (quiet["probed"].as_i64(), quiet["changes"].as_i64()),
        (Some(1), Some(0)),
        "{quiet}"
    );

    // Disabled at the KMS; the event never came.
    let kms = app.local_kms().await;
    kms.transition("pr-key", &[Enabled], Disabled)
        .await
        .expect("disable");
    let found = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(found["changes"], 1, "{found}");
    assert_eq!(app.tenant("pr").await["access"], "inaccessible");
    let (routing, _) = next_json(&mut access, Duration::from_secs(10))
        .await
        .expect("access message");
    assert_eq!(routing, "tenant.access.inaccessible");
    let row = &app
        .sql("SELECT source, detail->'after' FROM audit_log WHERE key_ref = 'pr-key' AND action = 'observed'")
        .rows()
        .await[0];
    assert_eq!(
        (&row[0], &row[1]["state"]),
        (&json!("probe"), &json!("disabled"))
    );

    // Enabled and rotated at the KMS, silently: the probe restores access and starts the
    // re-wrap the lost rotation event would have.
    kms.transition("pr-key", &[Disabled], Enabled)
        .await
        .expect("enable");
    kms.rotate("pr-key").await.expect("rotate");
    let found = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(found["changes"], 1, "one key changed: {found}");
    assert_eq!(app.tenant("pr").await["access"], "accessible");
    let job = app
        .wait_job("pr", "completed", Duration::from_secs(60))
        .await;
    assert_eq!(job["done"], 200);
    let (report, ok) = app.verify_deks("pr");
    assert!(ok, "{report}");
    assert_eq!(report["by_version"], json!({ "2": 200 }));
    app.shutdown().await;
}

on_both_backends!(an_unreachable_kms_is_never_taken_for_a_revoked_key, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn an_unreachable_kms_is_never_taken_for_a_revoked_key(backend: Backend) {
    let vault = Vault::new("sw").await;
    vault.create_key("tenant-kek").await;
    let token = vault.scoped_token().await;
    let proxy = Proxy::start(vault.addr.trim_start_matches("http://")).await;
    let settings = vault.settings(&format!("http://{}", proxy.addr), &token);
    let app = TestApp::spawn_on_with(backend, |c| c.kms.vault = Some(settings)).await;
    app.post(
        "/v1/tenants",
        json!({ "id": "v", "name": "V", "contacts": ["ops@v.example"] }),
    )
    .await;
    let r = app
        .post(
            "/v1/tenants/v/keks",
            json!({ "provider": "vault", "key_ref": "tenant-kek" }),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let r = app
        .post(
            "/v1/tenants/v/keks",
            json!({ "provider": "vault", "key_ref": "no-such-key", "replace": true }),
        )
        .await;
    assert_eq!(
        r.status(),
        422,
        "a key that does not exist is refused, not created"
    );
    let dek: Value = app
        .post("/v1/tenants/v/deks", json!({}))
        .await
        .json()
        .await
        .expect("dek");
    assert_eq!(dek["kek_version"], "1");
    let s = sweeper(&app).await;
    let t0 = Utc::now();
    let quiet = run(&s, "key-probe", t0).await;
    assert_eq!(quiet["unchanged"], 1, "{quiet}");

    // The KMS goes away: unreachable, not revoked; after the grace period, one notification.
    proxy.set_down(true);
    let down = run(&s, "key-probe", t0 + Days::minutes(5)).await;
    assert_eq!(
        (down["unreachable"].as_i64(), down["changes"].as_i64()),
        (Some(1), Some(0)),
        "{down}"
    );
    assert_eq!(app.tenant("v").await["access"], "accessible");
    assert_eq!(
        outbox_count(&app, "v", "key.unreachable").await,
        0,
        "within the grace period"
    );
    run(&s, "key-probe", t0 + Days::minutes(40)).await;
    run(&s, "key-probe", t0 + Days::minutes(45)).await;
    assert_eq!(
        outbox_count(&app, "v", "key.unreachable").await,
        1,
        "once per outage"
    );
    assert_eq!(app.tenant("v").await["access"], "accessible");
    proxy.set_down(false);
    run(&s, "key-probe", t0 + Days::minutes(50)).await;

    // byokd's access is revoked at the KMS: a definitive answer.
    vault.revoke_token(&token).await;
    let revoked = run(&s, "key-probe", t0 + Days::minutes(55)).await;
    assert_eq!(revoked["changes"], 1, "{revoked}");
    let tenant = app.tenant("v").await;
    assert_eq!(tenant["access"], "inaccessible");
    assert!(
        tenant["reason"]
            .as_str()
            .is_some_and(|r| r.contains("revoked")),
        "{tenant}"
    );
    app.shutdown().await;
    vault.cleanup().await;
}

on_both_backends!(byokd_sweep_runs_one_schedule_and_prints_what_it_did, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn byokd_sweep_runs_one_schedule_and_prints_what_it_did(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .args(["sweep", "expiry-scan", "--json"])
        .env(
            "BYOKD_SCHEDULES_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/schedules"),
        )
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["schedule"], "expiry-scan");
    assert_eq!(report["status"], "ok");
    assert_eq!(report["details"]["keys_in_window"], 0);

    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .args(["sweep", "nope"])
        .env(
            "BYOKD_SCHEDULES_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/schedules"),
        )
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1);
    assert!(err.contains("no schedule named \"nope\""), "{err}");

    let dir = std::env::temp_dir().join(format!("byokd-bad-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("broken.toml"),
        "name = \"x\"\ncron = \"sometimes\"\njob = \"expiry_scan\"\n",
    )
    .expect("write");
    let mut cmd = common::byokd_command();
    common::with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .arg("run")
        .env("BYOKD_SCHEDULES_DIR", &dir)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("broken.toml") && err.contains("cron \"sometimes\""),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    app.shutdown().await;
}

on_both_backends!(a_vault_key_rotated_at_the_kms_is_found_by_the_probe_and_every_dek_rewrapped, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn a_vault_key_rotated_at_the_kms_is_found_by_the_probe_and_every_dek_rewrapped(
    backend: Backend,
) {
    let vault = Vault::new("sw").await;
    vault.create_key("kek").await;
    let token = vault.scoped_token().await;
    // byokd's default request timeout: the re-wrap of every DEK goes through it.
    let settings = common::vault::settings(&vault.addr, &token, &vault.mount, None);
    let app = TestApp::spawn_on_with(backend, |c| c.kms.vault = Some(settings)).await;
    app.post("/v1/tenants", json!({ "id": "vr", "name": "VR" }))
        .await;
    let r = app
        .post(
            "/v1/tenants/vr/keks",
            json!({ "provider": "vault", "key_ref": "kek" }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let mut kcvs = Vec::new();
    for _ in 0..40 {
        let dek: Value = app
            .post("/v1/tenants/vr/deks", json!({}))
            .await
            .json()
            .await
            .expect("dek");
        assert_eq!(dek["kek_version"], "1");
        kcvs.push(dek["kcv"].as_str().expect("kcv").to_owned());
    }
    // Rotated in Vault; no event (Vault has none for transit keys): the probe finds it.
    vault.rotate_key("kek").await;
    let s = sweeper(&app).await;
    let found = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(found["changes"], 1, "{found}");
    let job = app
        .wait_job("vr", "completed", Duration::from_secs(60))
        .await;
    assert_eq!(
        (job["done"].as_i64(), job["target_version"].as_str()),
        (Some(40), Some("2"))
    );
    let (report, ok) = app.verify_deks("vr");
    assert!(ok, "{report}");
    assert_eq!(report["by_version"], json!({ "2": 40 }));
    let stored = app.sql("SELECT kcv FROM deks ORDER BY id").texts().await;
    assert_eq!(stored, kcvs, "every DEK survived, kcv unchanged");
    let wrapped = app.sql("SELECT wrapped FROM deks").rows().await;
    assert!(wrapped.iter().all(|w| {
        serde_json::from_value::<Vec<u8>>(w[0].clone()).is_ok_and(|w| w.starts_with(b"vault:v2:"))
    }));
    app.shutdown().await;
    vault.cleanup().await;
}

// Three replicas starting together against schedules that never ran (a fresh one for
// each of 20 rounds): each schedule runs exactly once per tick, never once per replica.
on_both_backends!(replicas_starting_together_run_a_never_run_schedule_once, #[tokio::test(flavor = "multi_thread", worker_threads = 4)]);
async fn replicas_starting_together_run_a_never_run_schedule_once(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(common::sweeps::sweeper(&app).await);
    }
    for round in 0..20 {
        let schedule = byokd::sweeps::parse_schedule(
            "cold.toml",
            &format!(
                "name = \"cold-{round}\"\ncron = \"0 */15 * * * *\"\njob = \"outbox_prune\"\n"
            ),
        )
        .expect("schedule");
        let schedules = std::sync::Arc::new(vec![schedule]);
        let runs = replicas.iter().enumerate().map(|(i, r)| {
            let replica = byokd::sweeps::Sweeper {
                schedules: schedules.clone(),
                ..r.clone()
            };
            // Replicas start within a few milliseconds of each other, each reading its own
            // clock as separate processes would.
            let stagger = std::time::Duration::from_millis((round * 7 + i * 11) as u64 % 25);
            tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                replica.run_due(chrono::Utc::now()).await
            })
        });
        let mut ran = 0;
        for run in futures_util::future::join_all(runs).await {
            ran += run.expect("task").expect("sweep").len();
        }
        assert_eq!(
            ran, 1,
            "round {round}: the never-run schedule ran {ran} times"
        );
    }
    app.shutdown().await;
}
