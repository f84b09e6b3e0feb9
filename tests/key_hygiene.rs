//! Key-material hygiene: the local KMS's sealed key material is bound to its key and version;
//! material sealed the legacy way still opens and is re-sealed by `byokd root-key rotate`;
//! and the root key rotates while a daemon keeps unwrapping and signing webhooks.

mod common;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use byokd::config::{Config, RootKeys};
use byokd::kms::{Dek, DekContext, KmsError, KmsProvider, LocalKms, Wrapped, WrappedRef};
use byokd::rootkey::RootKeyRotation;
use byokd::seal::{LOCAL_KMS_PURPOSE, SealError, Sealer, WEBHOOK_SECRET_PURPOSE};
use byokd::store::Store;
use common::notify::{Receiver, SECRET, verify_signature};
use common::{ROOT_KEY, TestApp, TestDb, at, byokd_command, wait_for, with_service_env};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::PgPool;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Root key B (32 bytes of 0x43); root key A is `common::ROOT_KEY` (32 bytes of 0x42).
const ROOT_KEY_B: &str = "Q0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0M=";

fn root_keys(current: &str, previous: &[&str]) -> RootKeys {
    Config {
        local_kms_root_key: Some(SecretString::from(current.to_owned())),
        local_kms_previous_root_keys: (!previous.is_empty())
            .then(|| SecretString::from(previous.join(","))),
        ..Config::default()
    }
    .require_root_keys()
    .expect("root keys")
}

fn local_kms(store: &Store, keys: &RootKeys) -> LocalKms {
    LocalKms::new(
        store.clone(),
        Arc::new(Sealer::with_previous(keys, LOCAL_KMS_PURPOSE)),
    )
}

/// A DEK wrapped for tenant `t`.
struct Item {
    dek: Dek,
    id: Uuid,
    wrapped: Wrapped,
}

async fn wrap(kms: &LocalKms, key: &str, version: Option<&str>) -> Item {
    let dek = Dek::generate();
    let id = Uuid::now_v7();
    let ctx = DekContext {
        tenant_id: "t",
        dek_id: id,
    };
    let wrapped = kms
        .wrap_many(key, version, &[(&dek, ctx)])
        .await
        .expect("wrap")
        .remove(0);
    Item { dek, id, wrapped }
}

/// Unwraps `item` through `key`: the whole call's error or the item's.
async fn unwrap(kms: &LocalKms, key: &str, item: &Item) -> Result<Dek, KmsError> {
    kms.unwrap_many(
        key,
        &[WrappedRef {
            ctx: DekContext {
                tenant_id: "t",
                dek_id: item.id,
            },
            version: &item.wrapped.version,
            ciphertext: &item.wrapped.ciphertext,
        }],
    )
    .await?
    .remove(0)
}

/// Swaps the sealed material of two key versions in one statement, as someone with write
/// access to the database could.
async fn swap(pool: &PgPool, a: (&str, i32), b: (&str, i32)) {
    let swapped = sqlx::query(
        "UPDATE local_key_versions v SET material_sealed = o.material_sealed
         FROM local_key_versions o
         WHERE (v.key_ref = $1 AND v.version = $2 AND o.key_ref = $3 AND o.version = $4)
            OR (v.key_ref = $3 AND v.version = $4 AND o.key_ref = $1 AND o.version = $2)",
    )
    .bind(a.0)
    .bind(a.1)
    .bind(b.0)
    .bind(b.1)
    .execute(pool)
    .await
    .expect("swap")
    .rows_affected();
    assert_eq!(swapped, 2);
}

fn assert_sealed_material_error(result: Result<Dek, KmsError>, key: &str, version: i32) {
    let e = match result {
        Err(e) => e,
        Ok(dek) => panic!("unwrapped {dek:?} with material moved from another row"),
    };
    assert_eq!(
        e.to_string(),
        format!(
            "local key {key:?} version {version}: cannot open its key material: it fails its \
             integrity check (corrupted, tampered with, or moved from the row it was sealed for)"
        )
    );
    assert!(matches!(
        e,
        KmsError::SealedMaterial {
            reason: SealError::Integrity,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn material_swapped_between_keys_or_versions_fails_its_integrity_check() {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 4).await.expect("store");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&db.url).await.expect("pool");
    let kms = local_kms(&store, &root_keys(ROOT_KEY, &[]));
    for key in ["key-a", "key-b"] {
        kms.create(key, None).await.expect("create");
    }
    let a1 = wrap(&kms, "key-a", None).await;
    let b1 = wrap(&kms, "key-b", None).await;
    kms.rotate("key-a").await.expect("rotate");
    let a2 = wrap(&kms, "key-a", None).await;
    assert_eq!(
        (a1.wrapped.version.as_str(), a2.wrapped.version.as_str()),
        ("1", "2")
    );
    for (key, item) in [("key-a", &a1), ("key-b", &b1), ("key-a", &a2)] {
        assert_eq!(
            unwrap(&kms, key, item).await.expect("unwraps").kcv(),
            item.dek.kcv()
        );
    }

    // Between keys: neither key opens the other's material. Without the binding, key-b would
    // now unwrap key-a's DEKs (the DEK's own binding names the tenant and DEK, not the key).
    swap(&pool, ("key-a", 1), ("key-b", 1)).await;
    assert_sealed_material_error(unwrap(&kms, "key-a", &a1).await, "key-a", 1);
    assert_sealed_material_error(unwrap(&kms, "key-b", &b1).await, "key-b", 1);
    assert_sealed_material_error(unwrap(&kms, "key-b", &a1).await, "key-b", 1);
    swap(&pool, ("key-a", 1), ("key-b", 1)).await;
    assert!(unwrap(&kms, "key-a", &a1).await.is_ok());
    assert!(unwrap(&kms, "key-b", &b1).await.is_ok());

    // Between versions of one key: neither unwraps, and nothing is wrapped under the current
    // version with another version's material.
    swap(&pool, ("key-a", 1), ("key-a", 2)).await;
    assert_sealed_material_error(unwrap(&kms, "key-a", &a1).await, "key-a", 1);
    assert_sealed_material_error(unwrap(&kms, "key-a", &a2).await, "key-a", 2);
    let dek = Dek::generate();
    let refused = kms
        .wrap_many(
            "key-a",
            None,
            &[(
                &dek,
                DekContext {
                    tenant_id: "t",
                    dek_id: Uuid::now_v7(),
                },
            )],
        )
        .await
        .map(|_| dek);
    assert_sealed_material_error(refused, "key-a", 2);

    pool.close().await;
    db.drop_db().await;
}

/// Seals `secret` the way byokd did before seal version 2 (pinned here: existing rows hold
/// exactly this).
fn legacy_seal(root_b64: &str, purpose: &str, secret: &[u8]) -> Vec<u8> {
    let root = base64::engine::general_purpose::STANDARD
        .decode(root_b64)
        .expect("root key");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&root).expect("key");
    mac.update(b"byokd/seal/v1/");
    mac.update(purpose.as_bytes());
    let cipher = Aes256Gcm::new_from_slice(&mac.finalize().into_bytes()).expect("cipher");
    let nonce = [5u8; 12];
    let ciphertext = cipher
        .encrypt(
            &nonce.into(),
            Payload {
                msg: secret,
                aad: purpose.as_bytes(),
            },
        )
        .expect("encrypt");
    [&[1u8][..], &nonce, &ciphertext].concat()
}

/// `byokd root-key rotate` on `db_url` with these root keys.
fn rotate_cli(db_url: &str, current: &str, previous: &[&str], json: bool) -> Output {
    let mut cmd = byokd_command();
    cmd.env("BYOKD_DATABASE_URL", db_url)
        .env("BYOKD_LOCAL_KMS_ROOT_KEY", current)
        .args(["root-key", "rotate", "--batch-size", "2"]);
    if !previous.is_empty() {
        cmd.env("BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS", previous.join(","));
    }
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("run byokd root-key rotate")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_seals_still_open_and_rotation_rewrites_them_bound_once() {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 4).await.expect("store");
    store.migrate().await.expect("migrate");
    let pool = PgPool::connect(&db.url).await.expect("pool");
    // Rows as an earlier byokd wrote them: a local key and a webhook endpoint with a secret
    // and a previous secret.
    let material = [7u8; 32];
    sqlx::query(
        "INSERT INTO local_keys (key_ref, state, current_version) VALUES ('old-kek', 'enabled', 1)",
    )
    .execute(&pool)
    .await
    .expect("key");
    sqlx::query(
        "INSERT INTO local_key_versions (key_ref, version, material_sealed) VALUES ('old-kek', 1, $1)",
    )
    .bind(legacy_seal(ROOT_KEY, LOCAL_KMS_PURPOSE, &material))
    .execute(&pool)
    .await
    .expect("version");
    let previous_secret = "whsec_cHJldmlvdXMtc2VjcmV0LXByZXZpb3VzLXNl";
    let endpoint = Uuid::now_v7();
    sqlx::query("INSERT INTO tenants (id, name) VALUES ('t', 't')")
        .execute(&pool)
        .await
        .expect("tenant");
    sqlx::query(
        "INSERT INTO webhook_endpoints (id, tenant_id, url, secret_sealed, previous_secret_sealed,
                                        previous_secret_expires_at)
         VALUES ($1, 't', 'https://hooks.t.example/', $2, $3, now() + interval '1 hour')",
    )
    .bind(endpoint)
    .bind(legacy_seal(
        ROOT_KEY,
        WEBHOOK_SECRET_PURPOSE,
        SECRET.as_bytes(),
    ))
    .bind(legacy_seal(
        ROOT_KEY,
        WEBHOOK_SECRET_PURPOSE,
        previous_secret.as_bytes(),
    ))
    .execute(&pool)
    .await
    .expect("endpoint");

    // The legacy material still works, and is the material that was sealed.
    let keys = root_keys(ROOT_KEY, &[]);
    let kms = local_kms(&store, &keys);
    let before = wrap(&kms, "old-kek", None).await;
    let (nonce, sealed) = before.wrapped.ciphertext.split_at(12);
    let by_hand = Aes256Gcm::new_from_slice(&material)
        .expect("cipher")
        .decrypt(
            nonce.try_into().expect("nonce"),
            Payload {
                msg: sealed,
                aad: &DekContext {
                    tenant_id: "t",
                    dek_id: before.id,
                }
                .aad(),
            },
        )
        .expect("wrapped under the legacy material");
    assert_eq!(by_hand, before.dek.expose());

    // The rotation (same root key, none previous) rewrites every legacy value as version 2.
    let out = rotate_cli(&db.url, ROOT_KEY, &[], true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = stdout_json(&out);
    assert_eq!(
        report,
        json!({
            "local_kms_keys": { "total": 1, "resealed": 1, "failed": 0, "remaining": 0 },
            "webhook_secrets": { "total": 2, "resealed": 2, "failed": 0, "remaining": 0 },
            "audit_chain_key": { "total": 0, "resealed": 0, "failed": 0, "remaining": 0 },
            "failures": [],
        })
    );
    let prefix = Sealer::new(&keys.current, LOCAL_KMS_PURPOSE).current_prefix();
    let (material_sealed, secret_sealed, previous_sealed): (Vec<u8>, Vec<u8>, Vec<u8>) =
        sqlx::query_as(
            "SELECT material_sealed, secret_sealed, previous_secret_sealed
             FROM local_key_versions, webhook_endpoints",
        )
        .fetch_one(&pool)
        .await
        .expect("rows");
    for blob in [&material_sealed, &secret_sealed, &previous_sealed] {
        assert!(blob.starts_with(&prefix), "re-sealed as version 2");
    }
    // Same material, now bound: the DEK wrapped before still unwraps, and the material no
    // longer opens as another key's.
    assert_eq!(
        unwrap(&kms, "old-kek", &before)
            .await
            .expect("unwraps")
            .kcv(),
        before.dek.kcv()
    );
    assert_eq!(
        Sealer::new(&keys.current, LOCAL_KMS_PURPOSE).open_bytes(
            &material_sealed,
            &byokd::kms::local::material_binding("other-kek", 1)
        ),
        Err(SealError::Integrity)
    );
    let webhooks = Sealer::new(&keys.current, WEBHOOK_SECRET_PURPOSE);
    assert_eq!(
        webhooks
            .open(&secret_sealed)
            .expect("opens")
            .expose_secret(),
        SECRET
    );
    assert_eq!(
        webhooks
            .open(&previous_sealed)
            .expect("opens")
            .expose_secret(),
        previous_secret
    );

    // Idempotent: a second run finds nothing to do.
    let again = rotate_cli(&db.url, ROOT_KEY, &[], false);
    assert!(again.status.success());
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(
        text.contains(
            "0 of 1 local KMS key versions, 0 of 2 webhook secrets, 0 of 0 audit chain keys; \
             0 failed, 0 still"
        ),
        "{text}"
    );

    pool.close().await;
    db.drop_db().await;
}

/// Rotates a local key through the test's KMS and publishes `rotated`; returns the version.
async fn rotate_kek(app: &TestApp, key: &str, when: i64) -> String {
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

/// Waits for the re-wrap job to `version` to complete and for its `key.rotated` webhook,
/// which must carry a valid signature by `SECRET`.
async fn wait_rotated(app: &TestApp, receiver: &Receiver, tenant: &str, version: &str) {
    wait_for(
        &format!("the re-wrap job to version {version}"),
        Duration::from_secs(60),
        || async move {
            app.rewrap_jobs(tenant).await.iter().any(|j| {
                j["target_version"] == version && j["state"] == "completed" && j["failed"] == 0
            })
        },
    )
    .await;
    wait_for(
        &format!("key.rotated to version {version} at the webhook receiver"),
        Duration::from_secs(30),
        || async move {
            receiver.received().iter().any(|r| {
                let body: Value = serde_json::from_slice(&r.body).unwrap_or_default();
                body["type"] == "key.rotated"
                    && body["data"]["to_version"] == version
                    && verify_signature(r, SECRET)
            })
        },
    )
    .await;
}

/// `byokd deks verify --tenant T --json` with these root keys: the report and success.
fn verify_with(app: &TestApp, tenant: &str, current: &str, previous: &[&str]) -> (Value, Output) {
    let mut cmd = byokd_command();
    with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    cmd.env("BYOKD_LOCAL_KMS_ROOT_KEY", current)
        .args(["deks", "verify", "--json", "--tenant", tenant]);
    if !previous.is_empty() {
        cmd.env("BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS", previous.join(","));
    }
    let out = cmd.output().expect("deks verify");
    (stdout_json(&out), out)
}

/// Waits until the daemon's chainer has chained every audit row.
async fn wait_chained(pool: &sqlx::PgPool) {
    common::wait_for(
        "every audit row chained",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, i64>(common::PG_UNCHAINED)
                .fetch_one(pool)
                .await
                .is_ok_and(|n| n == 0)
        },
    )
    .await;
}

/// `byokd audit verify --json` with these root keys: the report and success.
fn audit_verify_with(app: &TestApp, current: &str, previous: &[&str]) -> (Value, Output) {
    let mut cmd = byokd_command();
    with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    cmd.env("BYOKD_LOCAL_KMS_ROOT_KEY", current)
        .args(["audit", "verify", "--json"]);
    if !previous.is_empty() {
        cmd.env("BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS", previous.join(","));
    }
    let out = cmd.output().expect("audit verify");
    (stdout_json(&out), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_key_rotates_while_a_daemon_keeps_unwrapping_and_signing_webhooks() {
    let receiver = Receiver::start().await;
    let mut app = TestApp::spawn_with(|c| {
        c.webhook_allow_cidrs = Some("127.0.0.0/8".into());
        c.rewrap.batch_size = 100;
    })
    .await;
    // Under root key A: 40 local keys around the tenant's (so the keyring takes several
    // batches), and a tenant with a webhook and 1,000 DEKs.
    for i in 0..20 {
        app.create_local_key(&format!("a-{i:02}")).await;
        app.create_local_key(&format!("z-{i:02}")).await;
    }
    app.create_local_key("m-kek").await;
    let r = app
        .post(
            "/v1/tenants",
            json!({
                "id": "t", "name": "T", "contacts": ["sec@t.example"],
                "webhooks": [{ "url": receiver.url("/hook"), "secret": SECRET }],
            }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = app
        .post(
            "/v1/tenants/t/keks",
            json!({ "provider": "local", "key_ref": "m-kek" }),
        )
        .await;
    assert_eq!(r.status(), 201);
    app.bulk_deks("t", "m-kek", 1000).await;

    // The daemon restarts with B as the current root key and A as the previous one: what A
    // sealed still opens.
    wait_chained(&app.pool).await;
    let (audit, out) = audit_verify_with(&app, ROOT_KEY, &[]);
    assert!(out.status.success(), "{audit} {out:?}");
    let chained_under_a = audit["rows"].as_i64().expect("rows");
    assert!(chained_under_a > 0, "{audit}");
    app.stop().await;
    app.config.local_kms_root_key = Some(SecretString::from(ROOT_KEY_B));
    app.config.local_kms_previous_root_keys = Some(SecretString::from(ROOT_KEY));
    app.start().await;
    let (report, out) = verify_with(&app, "t", ROOT_KEY_B, &[ROOT_KEY]);
    assert!(out.status.success(), "{report}");
    assert_eq!(report["ok"], 1000);
    // The audit chain goes on under the same key: rows chained under A and under B verify.
    wait_chained(&app.pool).await;
    let (audit, out) = audit_verify_with(&app, ROOT_KEY_B, &[ROOT_KEY]);
    assert!(out.status.success(), "{audit} {out:?}");

    // The rotation re-seals the first two batches (keys a-00..a-19) ...
    let keys = root_keys(ROOT_KEY_B, &[ROOT_KEY]);
    let store = Store::connect(&app.db.url, 4).await.expect("store");
    let mut rotation = RootKeyRotation::new(store.clone(), &keys, 10);
    for _ in 0..2 {
        assert!(rotation.next_batch().await.expect("batch"));
    }
    let prefix = Sealer::with_previous(&keys, LOCAL_KMS_PURPOSE).current_prefix();
    let count = store.count_sealed_materials(&prefix).await.expect("count");
    assert_eq!((count.total, count.without_prefix), (41, 21), "half-way");

    // ... and meanwhile the daemon rotates the tenant's KEK (every DEK unwrapped under the
    // material A sealed, wrapped under a version B sealed), creates a DEK, and signs the
    // `key.rotated` webhook with the secret A sealed.
    assert_eq!(rotate_kek(&app, "m-kek", 1).await, "2");
    wait_rotated(&app, &receiver, "t", "2").await;
    assert_eq!(
        app.post("/v1/tenants/t/deks", json!({})).await.status(),
        201
    );

    // The rest of the rotation; every value ends up under B.
    let report = rotation.run().await.expect("rotation");
    assert!(report.complete(), "{report:?}");
    assert_eq!(
        (
            report.local_kms_keys.total,
            report.local_kms_keys.resealed,
            report.local_kms_keys.failed
        ),
        (42, 41, 0),
        "version 2 of m-kek was sealed under B to begin with"
    );
    assert_eq!(
        (
            report.webhook_secrets.total,
            report.webhook_secrets.resealed
        ),
        (1, 1)
    );
    assert_eq!(
        (
            report.audit_chain_key.total,
            report.audit_chain_key.resealed
        ),
        (1, 1),
        "the chain key the daemon stored under A"
    );
    let again = RootKeyRotation::new(store.clone(), &keys, 10)
        .run()
        .await
        .expect("second rotation");
    assert_eq!(
        (
            again.local_kms_keys.resealed,
            again.webhook_secrets.resealed
        ),
        (0, 0)
    );

    // The daemon keeps working on the re-sealed values.
    assert_eq!(rotate_kek(&app, "m-kek", 2).await, "3");
    wait_rotated(&app, &receiver, "t", "3").await;

    // With B alone, everything opens: DEKs and the webhook secret.
    app.stop().await;
    app.config.local_kms_previous_root_keys = None;
    app.start().await;
    let (report, out) = verify_with(&app, "t", ROOT_KEY_B, &[]);
    assert!(out.status.success(), "{report}");
    assert_eq!(report["ok"], 1001);
    wait_chained(&app.pool).await;
    let (audit, out) = audit_verify_with(&app, ROOT_KEY_B, &[]);
    assert!(out.status.success(), "{audit} {out:?}");
    assert!(
        audit["rows"].as_i64().is_some_and(|n| n > chained_under_a),
        "{audit}"
    );
    // ... and A alone cannot open the chain key any more: a configuration error.
    let mut cmd = byokd_command();
    with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    let out = cmd
        .env("BYOKD_LOCAL_KMS_ROOT_KEY", ROOT_KEY)
        .args(["audit", "verify"])
        .output()
        .expect("audit verify");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(one_line_error(&out).contains("the audit chain key cannot be opened"));
    assert_eq!(rotate_kek(&app, "m-kek", 3).await, "4");
    wait_rotated(&app, &receiver, "t", "4").await;

    // With A alone after the rotation: a clear error, naming the cause.
    let (report, out) = verify_with(&app, "t", ROOT_KEY, &[]);
    let line = one_line_error(&out);
    assert!(
        line.contains("1001 of 1001 DEKs failed verification"),
        "{line}"
    );
    let reason = report["failures"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("sealed under a root key that is not configured"),
        "{report}"
    );
    let out = rotate_cli(&app.db.url, ROOT_KEY, &[], false);
    let line = one_line_error(&out);
    assert!(
        line.contains("cannot be opened with any configured root key")
            && line.contains("sealed under a root key that is not configured"),
        "{line}"
    );
    assert!(
        !line.contains(ROOT_KEY) && !line.contains(ROOT_KEY_B),
        "{line}"
    );

    drop(store);
    app.shutdown().await;
}
