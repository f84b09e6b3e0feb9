//! Envelope encryption with the local KMS and the DEK re-wrap engine: rotation, concurrent
//! workers and replicas, crashes (SIGKILL) mid-job, DEKs created during a rotation, key
//! replacement, and a rotation the KMS refuses until the key is enabled again. Every test
//! but one (PostgreSQL row locks, said there) runs on PostgreSQL and on SQLite.

mod common;

use base64::Engine;
use byokd::kms::{Dek, DekContext, KmsError, KmsProvider, WrappedRef};
use common::{Backend, TestApp, at, outbox_count, wait_for};
use rand::Rng;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

/// A `rotated` event as the KMS would send it, for tests that apply events themselves.
fn rotated(id: &str, key: &str, version: String) -> byokd::domain::LifecycleEvent {
    byokd::domain::LifecycleEvent {
        provider: byokd::domain::Provider::Local,
        event_id: id.into(),
        kind: byokd::domain::EventKind::Rotated,
        key_ref: key.into(),
        version: Some(version),
        expires_at: None,
        time: at(0),
        source: "test".into(),
        origin: byokd::domain::Origin::Event,
    }
}

/// Corrupts (or, applied again, restores) byte 20 of each DEK's ciphertext.
async fn flip_byte_20(app: &TestApp, ids: &[Uuid]) {
    for id in ids {
        let mut wrapped = app
            .sql("SELECT wrapped FROM deks WHERE CAST(id AS TEXT) = $1")
            .bind(*id)
            .bytes()
            .await;
        wrapped[20] ^= 1;
        app.sql("UPDATE deks SET wrapped = $1 WHERE CAST(id AS TEXT) = $2")
            .bind(wrapped)
            .bind(*id)
            .rows()
            .await;
    }
}

/// Rotates a local key and publishes the `rotated` event, as `byokd kms local rotate` does.
async fn rotate(app: &TestApp, key: &str, when: i64) -> String {
    let info = app.local_kms().await.rotate(key).await.expect("rotate");
    app.publish(
        "rotated",
        key,
        at(when),
        json!({ "version": info.current_version }),
    )
    .await;
    info.current_version
}

on_both_backends!(local_kms_round_trips_binds_aad_detects_tampering_and_never_reuses_nonces, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn local_kms_round_trips_binds_aad_detects_tampering_and_never_reuses_nonces(
    backend: Backend,
) {
    let app = TestApp::spawn_on(backend).await;
    let kms = app.local_kms().await;
    kms.create("k", None).await.expect("create");
    let dek = Dek::generate();
    let ctx = DekContext {
        tenant_id: "t1",
        dek_id: Uuid::now_v7(),
    };
    let wrapped = kms
        .wrap_many("k", None, &[(&dek, ctx)])
        .await
        .expect("wrap")
        .remove(0);
    assert_eq!(wrapped.version, "1");
    let unwrap = |c: DekContext<'static>, ct: Vec<u8>, v: &'static str| {
        let kms = kms.clone();
        async move {
            kms.unwrap_many(
                "k",
                &[WrappedRef {
                    ctx: c,
                    version: v,
                    ciphertext: &ct,
                }],
            )
            .await
            .expect("key usable")
            .remove(0)
        }
    };
    let ct = wrapped.ciphertext.clone();
    let ctx_static = DekContext {
        tenant_id: "t1",
        dek_id: ctx.dek_id,
    };
    let back = unwrap(ctx_static, ct.clone(), "1")
        .await
        .expect("round trip");
    assert_eq!(back.kcv(), dek.kcv());

    // Moved to another DEK row or another tenant: the binding no longer matches.
    let other_row = DekContext {
        tenant_id: "t1",
        dek_id: Uuid::now_v7(),
    };
    assert!(matches!(
        unwrap(other_row, ct.clone(), "1").await,
        Err(KmsError::Integrity)
    ));
    let other_tenant = DekContext {
        tenant_id: "t2",
        dek_id: ctx.dek_id,
    };
    assert!(matches!(
        unwrap(other_tenant, ct.clone(), "1").await,
        Err(KmsError::Integrity)
    ));
    // Every single flipped byte is detected.
    for i in 0..ct.len() {
        let mut tampered = ct.clone();
        tampered[i] ^= 0x01;
        assert!(
            matches!(
                unwrap(ctx_static, tampered, "1").await,
                Err(KmsError::Integrity)
            ),
            "byte {i}"
        );
    }
    // Nonces are never reused across many wraps of the same DEK.
    let items: Vec<_> = (0..2000).map(|_| (&dek, ctx)).collect();
    let many = kms.wrap_many("k", None, &items).await.expect("wrap many");
    let nonces: HashSet<Vec<u8>> = many.iter().map(|w| w.ciphertext[..12].to_vec()).collect();
    assert_eq!(nonces.len(), 2000);
    // After a rotation the old version still unwraps; a disabled key refuses both ways.
    kms.rotate("k").await.expect("rotate");
    assert!(unwrap(ctx_static, ct.clone(), "1").await.is_ok());
    use byokd::domain::KeyState::{Disabled, Enabled};
    kms.transition("k", &[Enabled], Disabled)
        .await
        .expect("disable");
    let refused = kms
        .unwrap_many(
            "k",
            &[WrappedRef {
                ctx,
                version: "1",
                ciphertext: &ct,
            }],
        )
        .await
        .expect_err("disabled key refuses");
    assert!(refused.to_string().contains("disabled"), "{refused}");
    assert!(kms.wrap_many("k", None, &[(&dek, ctx)]).await.is_err());
    // The key material is stored sealed, never in plaintext.
    let sealed = app
        .sql("SELECT length(material_sealed) FROM local_key_versions")
        .rows()
        .await;
    assert!(
        sealed
            .iter()
            .all(|m| m[0] == (byokd::seal::PREFIX_LEN + 12 + 32 + 16) as i64),
        "version and root key id, nonce, key, tag: {sealed:?}"
    );
    app.shutdown().await;
}

on_both_backends!(dek_api_wraps_stores_only_ciphertext_and_refuses_when_not_accessible, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn dek_api_wraps_stores_only_ciphertext_and_refuses_when_not_accessible(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("d", "key-d").await;
    let r = app.post("/v1/tenants/d/deks", json!({})).await;
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.expect("json");
    assert_eq!(created["kek_version"], "1");
    let kcv = created["kcv"].as_str().expect("kcv").to_owned();
    let id = created["dek_id"].as_str().expect("id").to_owned();
    let got: Value = app
        .get(&format!("/v1/tenants/d/deks/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(got["kcv"], kcv.as_str());
    assert_eq!(got["unrecoverable"], false);
    let wrapped = base64::engine::general_purpose::STANDARD
        .decode(got["wrapped"].as_str().expect("wrapped"))
        .expect("base64");
    assert_eq!(wrapped.len(), 12 + 32 + 16, "nonce + ciphertext + tag");
    assert!(got.get("plaintext").is_none() && got.get("dek").is_none());
    assert_eq!(app.get("/v1/tenants/d/deks/not-a-uuid").await.status(), 404);
    assert_eq!(
        app.get(&format!("/v1/tenants/x/deks/{id}")).await.status(),
        404
    );

    app.publish("disabled", "key-d", at(0), json!({})).await;
    app.wait_processed(1).await;
    let r = app.post("/v1/tenants/d/deks", json!({})).await;
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("inaccessible")),
        "{body}"
    );
    let (report, ok) = app.verify_deks("d");
    assert!(ok, "{report}");
    assert_eq!(report["total"], 1);
    app.shutdown().await;
}

on_both_backends!(
    rotation_rewraps_thousands_of_deks_across_workers_and_replicas_with_kcvs_intact,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
);
async fn rotation_rewraps_thousands_of_deks_across_workers_and_replicas_with_kcvs_intact(
    backend: Backend,
) {
    let app = TestApp::spawn_on_with(backend, |c| {
        c.rewrap.batch_size = 100;
        c.rewrap.concurrency = 3;
    })
    .await;
    app.tenant_with_key("r", "key-r").await;
    let deks = app.bulk_deks("r", "key-r", 4000).await;
    // A second replica on the same database and queue shares the job (PostgreSQL; SQLite
    // serves one node, whose three workers share it).
    let second = match backend {
        Backend::Postgres => Some(app.replica().await),
        Backend::Sqlite => None,
    };

    let v2 = rotate(&app, "key-r", 0).await;
    let job = app
        .wait_job("r", "completed", Duration::from_secs(120))
        .await;
    assert_eq!(
        (
            job["total"].as_i64(),
            job["done"].as_i64(),
            job["failed"].as_i64()
        ),
        (Some(4000), Some(4000), Some(0))
    );
    assert_eq!(job["from_versions"], json!(["1"]));
    assert_eq!(job["target_version"], v2.as_str());

    // Every DEK moved to the new version with its kcv unchanged.
    let (report, ok) = app.verify_deks("r");
    assert!(ok, "{report}");
    assert_eq!(report["total"], 4000);
    assert_eq!(report["by_version"], json!({ "2": 4000 }));
    let stored: Vec<(Uuid, String)> = app
        .sql("SELECT id, kcv FROM deks ORDER BY id")
        .rows()
        .await
        .iter()
        .map(|r| {
            (
                r[0].as_str().and_then(|s| s.parse().ok()).expect("id"),
                r[1].as_str().expect("kcv").to_owned(),
            )
        })
        .collect();
    let mut expected = deks.clone();
    expected.sort();
    assert_eq!(stored, expected);
    assert_eq!(app.tenant("r").await["access"], "accessible");

    // key.rotated is in the outbox once per recipient, with the counts.
    let payloads = app
        .sql("SELECT payload FROM outbox WHERE kind = 'key.rotated'")
        .rows()
        .await;
    assert_eq!(payloads.len(), 2, "one email, one webhook");
    assert_eq!(payloads[0][0]["data"]["dek_count"], 4000);
    assert_eq!(payloads[0][0]["data"]["from_version"], "1");
    assert_eq!(payloads[0][0]["data"]["to_version"], "2");

    // A duplicate rotation event creates no second job.
    app.publish("rotated", "key-r", at(1), json!({ "version": "2" }))
        .await;
    app.wait_processed(2).await;
    assert_eq!(app.rewrap_jobs("r").await.len(), 1);
    if let Some(second) = second {
        second.stop().await;
    }
    app.shutdown().await;
}

on_both_backends!(a_rewrap_killed_repeatedly_resumes_to_completion_with_every_dek_intact, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn a_rewrap_killed_repeatedly_resumes_to_completion_with_every_dek_intact(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("k9", "key-k9").await;
    let total = 12_000;
    app.bulk_deks("k9", "key-k9", total).await;
    let mut app = app;
    // The in-process daemon only set things up; the re-wrap runs in a child process we kill.
    app.stop().await;
    let spawn = || {
        app.daemon_process(&[
            ("BYOKD_REWRAP__BATCH_SIZE", "150"),
            ("BYOKD_REWRAP__CONCURRENCY", "2"),
        ])
        .0
    };
    let done = || async {
        app.sql("SELECT count(*) FROM deks WHERE kek_version = '2'")
            .int()
            .await
    };
    let mut child = spawn();
    rotate(&app, "key-k9", 0).await;
    let mut kills = 0;
    let mut rng = rand::rng();
    let mut last = 0;
    while kills < 4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        let now = done().await;
        if now >= total as i64 {
            break;
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        if now > last {
            kills += 1;
        }
        last = now;
        child = spawn();
    }
    assert!(
        kills >= 2,
        "the daemon must die mid-job at least twice (killed {kills} times)"
    );
    wait_for(
        "job completed after restarts",
        Duration::from_secs(180),
        || async { app.sql("SELECT state FROM rewrap_jobs").text().await == "completed" },
    )
    .await;
    child.kill().expect("stop");
    child.wait().expect("reap");
    let (report, ok) = app.verify_deks("k9");
    assert!(ok, "{report}");
    assert_eq!(report["by_version"], json!({ "2": total }));
    let job = app.sql("SELECT total, done FROM rewrap_jobs").rows().await;
    assert_eq!(
        job,
        [[json!(total), json!(total)]],
        "no DEK counted twice or skipped"
    );
    app.shutdown().await;
}

on_both_backends!(deks_created_during_a_rotation_all_end_on_the_new_version, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn deks_created_during_a_rotation_all_end_on_the_new_version(backend: Backend) {
    let app = TestApp::spawn_on_with(backend, |c| c.rewrap.batch_size = 50).await;
    app.tenant_with_key("c", "key-c").await;
    app.bulk_deks("c", "key-c", 1500).await;
    let creator = {
        let http = app.http.clone();
        let url = app.url("/v1/tenants/c/deks");
        tokio::spawn(async move {
            let mut created = 0;
            for _ in 0..150 {
                let r = http
                    .post(&url)
                    .bearer_auth(common::TOKEN)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 201);
                created += 1;
            }
            created
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    rotate(&app, "key-c", 0).await;
    let created = creator.await.expect("creator");
    app.wait_job("c", "completed", Duration::from_secs(120))
        .await;
    let (report, ok) = app.verify_deks("c");
    assert!(ok, "{report}");
    assert_eq!(report["total"], 1500 + created);
    assert_eq!(report["by_version"], json!({ "2": 1500 + created }));
    app.shutdown().await;
}

on_both_backends!(replacing_a_key_moves_every_dek_then_retires_the_old_one, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn replacing_a_key_moves_every_dek_then_retires_the_old_one(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("rp", "old-key").await;
    let deks = app.bulk_deks("rp", "old-key", 800).await;
    app.create_local_key("new-key").await;
    let r = app
        .post(
            "/v1/tenants/rp/keks",
            json!({ "provider": "local", "key_ref": "new-key", "replace": true }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let view: Value = r.json().await.expect("json");
    assert!(view["rewrap_job"].is_i64(), "{view}");
    // New DEKs use the new key at once.
    let fresh: Value = app
        .post("/v1/tenants/rp/deks", json!({}))
        .await
        .json()
        .await
        .expect("json");
    let fresh_id = fresh["dek_id"].as_str().expect("id").to_owned();
    let job = app
        .wait_job("rp", "completed", Duration::from_secs(120))
        .await;
    assert_eq!(job["kind"], "replacement");
    assert_eq!(job["done"], 800);
    let tenant = app.tenant("rp").await;
    let keks = tenant["keks"].as_array().expect("keks");
    assert_eq!(keks[0]["key_ref"], "new-key");
    assert_eq!(keks[0]["primary"], true);
    assert_eq!(keks[1]["key_ref"], "old-key");
    assert!(keks[1]["retired_at"].is_string(), "{tenant}");
    for id in [deks[0].0.to_string(), fresh_id] {
        let d: Value = app
            .get(&format!("/v1/tenants/rp/deks/{id}"))
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(d["key_ref"], "new-key");
    }
    let (report, ok) = app.verify_deks("rp");
    assert!(ok, "{report}");
    assert_eq!(report["total"], 801);
    // The tenant hears of a replacement, naming both keys, not of a rotation.
    let replaced = app
        .sql("SELECT payload FROM outbox WHERE kind = 'key.replaced'")
        .rows()
        .await;
    assert!(!replaced.is_empty());
    for body in replaced.iter().map(|r| &r[0]) {
        assert_eq!(body["data"]["previous_key_ref"], "old-key");
        assert_eq!(body["data"]["key_ref"], "new-key");
        assert_eq!(body["data"]["dek_count"], 800);
    }
    assert_eq!(outbox_count(&app, "rp", "key.rotated").await, 0);
    // The trail holds the whole replacement: registered, started, completed, retired.
    let actions = app
        .sql("SELECT action FROM audit_log WHERE tenant_id = 'rp' ORDER BY id")
        .texts()
        .await;
    let pos = |a: &str| {
        actions
            .iter()
            .position(|x| x == a)
            .unwrap_or_else(|| panic!("{a} missing: {actions:?}"))
    };
    assert!(pos("tenant_created") < pos("kek_replaced"));
    assert!(pos("kek_replaced") < pos("rewrap_started"));
    assert!(pos("rewrap_started") < pos("rewrap_completed"));
    assert!(pos("rewrap_completed") < pos("kek_retired"));
    assert!(actions.contains(&"deks_verified".to_owned()), "{actions:?}");
    // The old key's lifecycle no longer decides the tenant's access.
    app.publish("disabled", "old-key", at(0), json!({})).await;
    app.wait_processed(1).await;
    assert_eq!(app.tenant("rp").await["access"], "accessible");
    app.shutdown().await;
}

on_both_backends!(rotating_a_disabled_key_waits_and_resumes_when_it_is_enabled, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn rotating_a_disabled_key_waits_and_resumes_when_it_is_enabled(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("w", "key-w").await;
    app.bulk_deks("w", "key-w", 300).await;
    use byokd::domain::KeyState::{Disabled, Enabled};
    let kms = app.local_kms().await;
    kms.transition("key-w", &[Enabled], Disabled)
        .await
        .expect("disable");
    app.publish("disabled", "key-w", at(0), json!({})).await;
    rotate(&app, "key-w", 10).await;
    let job = app.wait_job("w", "waiting", Duration::from_secs(60)).await;
    assert!(
        job["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("disabled")),
        "{job}"
    );
    assert_eq!(job["done"], 0);
    // Reads of existing DEKs are what the KMS refuses too; nothing was lost meanwhile.
    let (report, ok) = app.verify_deks("w");
    assert!(
        !ok && report["failed"] == 300,
        "a disabled key cannot unwrap: {report}"
    );

    kms.transition("key-w", &[Disabled], Enabled)
        .await
        .expect("enable");
    app.publish("enabled", "key-w", at(20), json!({})).await;
    let job = app
        .wait_job("w", "completed", Duration::from_secs(30))
        .await;
    assert_eq!(job["done"], 300);
    let (report, ok) = app.verify_deks("w");
    assert!(ok, "{report}");
    assert_eq!(report["by_version"], json!({ "2": 300 }));
    app.shutdown().await;
}

on_both_backends!(a_dek_that_fails_to_rewrap_is_retried_with_backoff_and_never_blocks_the_rest, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn a_dek_that_fails_to_rewrap_is_retried_with_backoff_and_never_blocks_the_rest(
    backend: Backend,
) {
    use byokd::config::RewrapSettings;
    use byokd::rewrap::{Rewrapper, Step};
    let mut app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("f", "key-f").await;
    let deks = app.bulk_deks("f", "key-f", 300).await;
    let broken = [deks[0].0, deks[1].0];
    flip_byte_20(&app, &broken).await;
    // The test drives the engine itself, with its own clock.
    app.stop().await;
    let store = byokd::store::Store::connect(&app.db.url, 4)
        .await
        .expect("store");
    let root = app.config.require_root_keys().expect("root");
    let kms = byokd::daemon::build_kms(&store, &root, &app.config.kms).expect("kms");
    let info = app.local_kms().await.rotate("key-f").await.expect("rotate");
    let event = rotated("rot-f", "key-f", info.current_version);
    byokd::lifecycle::apply_batch(&store, &[event], chrono::Utc::now())
        .await
        .expect("apply");
    // The event is a hint: the job starts once the KMS confirms the new version.
    common::confirm_round(&store, &kms).await;
    // The engine's clock starts after the job was created (it is due from its creation).
    let t0 = chrono::Utc::now() + chrono::Duration::seconds(1);
    let settings = RewrapSettings {
        batch_size: 100,
        max_attempts: 3,
        ..RewrapSettings::default()
    };
    let engine = Rewrapper::new(
        store.clone(),
        kms.clone(),
        settings,
        std::sync::Arc::new(tokio::sync::Notify::new()),
    );
    let drain = |now| {
        let engine = engine.clone();
        async move {
            let mut failed = 0;
            loop {
                match engine.run_once(now).await.expect("step") {
                    Step::Batch { failed: f, .. } => failed += f,
                    other => return (other, failed),
                }
            }
        }
    };
    let job = || async {
        let r = &app
            .sql("SELECT state, done, failed FROM rewrap_jobs")
            .rows()
            .await[0];
        (
            r[0].as_str().expect("state").to_owned(),
            r[1].as_i64().expect("done"),
            r[2].as_i64().expect("failed"),
        )
    };

    // Everything else moves at once; the two bad DEKs are recorded and wait their backoff.
    let (step, failed) = drain(t0).await;
    assert_eq!((step, failed), (Step::Busy, 2));
    assert_eq!(job().await, ("running".to_owned(), 298, 0));
    let reasons = app
        .sql("SELECT reason, attempts FROM rewrap_failures ORDER BY dek_id")
        .rows()
        .await;
    assert_eq!(reasons.len(), 2);
    assert!(
        reasons.iter().all(|r| r[0]
            .as_str()
            .is_some_and(|r| r.contains("does not authenticate"))
            && r[1] == 1),
        "{reasons:?}"
    );
    assert_eq!(
        drain(t0 + chrono::Duration::seconds(1)).await,
        (Step::Busy, 0),
        "backing off"
    );

    // Retried after each backoff; after max_attempts they count as failed for good.
    assert_eq!(drain(t0 + chrono::Duration::seconds(6)).await.1, 2);
    // The third failure is the last: with nothing else left, the job ends.
    assert_eq!(
        drain(t0 + chrono::Duration::seconds(17)).await,
        (Step::Finished, 2)
    );
    assert_eq!(
        drain(t0 + chrono::Duration::seconds(3600)).await,
        (Step::Idle, 0)
    );
    let (state, done, failed) = job().await;
    assert_eq!((state.as_str(), done, failed), ("failed", 298, 2));
    let jobs = app.rewrap_jobs_offline("f").await;
    assert!(
        jobs[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("2 DEKs")),
        "{jobs:?}"
    );
    // Only a completed job announces key.rotated.
    let rotated = app
        .sql("SELECT count(*) FROM outbox WHERE kind = 'key.rotated'")
        .int()
        .await;
    assert_eq!(rotated, 0);
    // A failed job tells the tenant's contacts and webhooks, and the operators.
    let failed = app
        .sql("SELECT channel, payload FROM outbox WHERE kind = 'key.rewrap_failed' ORDER BY seq")
        .rows()
        .await;
    assert!(failed.iter().any(|r| r[0] == "email"), "{failed:?}");
    assert!(failed.iter().any(|r| r[0] == "operator"), "{failed:?}");
    for body in failed.iter().map(|r| &r[1]) {
        assert_eq!(body["data"]["failed"], 2);
        assert_eq!(body["data"]["done"], 298);
    }
    let (report, ok) = app.verify_deks("f");
    assert!(!ok);
    assert_eq!(
        (report["ok"].as_i64(), report["failed"].as_i64()),
        (Some(298), Some(2))
    );
    assert_eq!(report["by_version"], json!({ "1": 2, "2": 298 }));

    // The cause fixed (the two DEKs restored), the operator retries the job: it completes.
    flip_byte_20(&app, &broken).await;
    let keys = byokd::keys::Keys::new(store, kms, Default::default(), Default::default());
    let job_id = app.sql("SELECT id FROM rewrap_jobs").int().await;
    assert_eq!(keys.retry_rewrap_job(job_id).await.expect("retry"), "f");
    assert!(
        keys.retry_rewrap_job(job_id).await.is_err(),
        "only a failed job can be retried"
    );
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    let (step, failed) = drain(later).await;
    assert_eq!((step, failed), (Step::Finished, 0));
    assert_eq!(job().await, ("completed".to_owned(), 300, 0));
    assert!(outbox_count(&app, "f", "key.rotated").await > 0);
    let (report, ok) = app.verify_deks("f");
    assert!(ok, "{report}");
    app.shutdown().await;
}

/// PostgreSQL only: workers of several replicas claim DEKs with SKIP LOCKED, and this test
/// holds row locks from outside. SQLite serializes writers (one node), so no worker can hold
/// DEKs while another claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_moves_on_to_the_next_job_while_others_hold_the_rest_of_one() {
    use byokd::config::RewrapSettings;
    use byokd::rewrap::{Rewrapper, Step};
    let mut app = TestApp::spawn().await;
    for t in ["ja", "jb"] {
        app.tenant_with_key(t, &format!("key-{t}")).await;
        app.bulk_deks(t, &format!("key-{t}"), 50).await;
    }
    app.stop().await;
    let store = byokd::store::Store::connect(&app.db.url, 4)
        .await
        .expect("store");
    let root = app.config.require_root_keys().expect("root");
    let kms = byokd::daemon::build_kms(&store, &root, &app.config.kms).expect("kms");
    let mut events = Vec::new();
    for t in ["ja", "jb"] {
        let key = format!("key-{t}");
        let info = app.local_kms().await.rotate(&key).await.expect("rotate");
        events.push(rotated(&format!("rot-{t}"), &key, info.current_version));
    }
    byokd::lifecycle::apply_batch(&store, &events, chrono::Utc::now())
        .await
        .expect("apply");
    common::confirm_round(&store, &kms).await;
    let now = chrono::Utc::now() + chrono::Duration::seconds(1);
    // Another worker holds every DEK of the older job.
    let mut held = app.pool.begin().await.expect("tx");
    let locked: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM deks WHERE tenant_id = 'ja' FOR UPDATE")
            .fetch_all(&mut *held)
            .await
            .expect("lock");
    assert_eq!(locked.len(), 50);
    let engine = Rewrapper::new(
        store,
        kms,
        RewrapSettings::default(),
        std::sync::Arc::new(tokio::sync::Notify::new()),
    );
    assert_eq!(
        engine.run_once(now).await.expect("step"),
        Step::Batch {
            done: 50,
            failed: 0
        }
    );
    let moved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deks WHERE tenant_id = 'jb' AND kek_version = '2'",
    )
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(moved, 50, "the newer job progressed");
    held.rollback().await.expect("release");
    assert_eq!(
        engine.run_once(now).await.expect("step"),
        Step::Batch {
            done: 50,
            failed: 0
        }
    );
    app.shutdown().await;
}
