//! The AWS KMS provider live against moto_server (KMS and STS; `scripts/services
//! --test-peers`), through the daemon's API, events and sweeps: binding by any spelling of a
//! key, the encryption context, revocations found by event and by probe alone, rotation
//! re-wrapped with ReEncrypt, deletion scheduled and cancelled, a key policy that shuts byokd
//! out, the tenant's role assumed through STS, and every native AWS event format.
//!
//! Four things moto does not do are played by [`Gate`], an HTTP server in front of it, and
//! each test that uses it says so: enforcing a revoked grant (moto records grants and never
//! checks them), imported key material with a `ValidTo` (moto has no ImportKeyMaterial),
//! throttling, and a role trust policy that refuses AssumeRole. moto also still encrypts with a disabled key; byokd reads the
//! key's state first, so that gap does not hide a revocation here.

mod common;

use aws_sdk_kms::Client;
use byokd::kms::Dek;
use chrono::{Timelike, Utc};
use common::aws::{self, Gate, create_aliased_key, create_key, tenant_client};
use common::sweeps::{run, sweeper};
use common::{TestApp, at, outbox_count};
use serde_json::{Value, json};
use std::time::Duration;

async fn app_at(endpoint: &str) -> TestApp {
    let settings = aws::settings(endpoint);
    TestApp::spawn_with(|c| c.kms.aws = Some(settings)).await
}

/// A tenant bound to a new aliased key; returns the key's (id, ARN).
async fn tenant_with_key(app: &TestApp, kms: &Client, tenant: &str) -> (String, String) {
    app.create_tenant(tenant).await;
    let (alias, id, arn) = create_aliased_key(kms, tenant).await;
    let (status, body) = app.bind_key(tenant, "aws", &alias, json!({})).await;
    assert_eq!(status, 201, "{body}");
    (id, arn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_binds_the_key_arn_once_and_bad_keys_are_refused_with_the_kms_reason() {
    let app = app_at(&aws::moto_url()).await;
    let kms = tenant_client();
    app.create_tenant("ab").await;
    app.create_tenant("ab2").await;
    let (alias, id, arn) = create_aliased_key(&kms, "ab").await;

    let (status, body) = app.bind_key("ab", "aws", &alias, json!({})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["keks"][0]["key_ref"],
        arn.as_str(),
        "stored as the key ARN"
    );
    assert_eq!(body["keks"][0]["state"], "enabled");

    // Every other spelling of the same key finds it bound.
    let alias_arn = format!("arn:aws:kms:{}:{}:{alias}", aws::REGION, aws::ACCOUNT);
    for other in [id.as_str(), arn.as_str(), alias_arn.as_str()] {
        let (status, body) = app.bind_key("ab2", "aws", other, json!({})).await;
        assert_eq!(status, 409, "{other}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(&arn)),
            "{body}"
        );
    }

    // Refused before any request: not a key reference, an AWS managed key.
    for bad in [
        "acme-kek",
        "alias/aws/s3",
        "alias/a b",
        "arn:aws:iam::123456789012:role/x",
    ] {
        let (status, body) = app.bind_key("ab2", "aws", bad, json!({})).await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("invalid aws key_ref")),
            "{bad}: {body}"
        );
    }
    // Refused with KMS's own reason: no such alias, a signing key, a disabled key.
    let (status, body) = app
        .bind_key("ab2", "aws", "alias/no-such-alias-ab", json!({}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not exist")),
        "{body}"
    );
    let rsa = kms
        .create_key()
        .key_spec(aws_sdk_kms::types::KeySpec::Rsa2048)
        .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
        .send()
        .await
        .expect("CreateKey RSA")
        .key_metadata
        .expect("metadata");
    let (status, body) = app.bind_key("ab2", "aws", rsa.key_id(), json!({})).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("SYMMETRIC_DEFAULT")),
        "{body}"
    );
    let (disabled, _) = create_key(&kms).await;
    kms.disable_key()
        .key_id(&disabled)
        .send()
        .await
        .expect("DisableKey");
    let (status, body) = app.bind_key("ab2", "aws", &disabled, json!({})).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("disabled")),
        "{body}"
    );

    // Role fields: only for AWS, well-formed, and an external id needs a role.
    let (status, body) = app
        .bind_key(
            "ab2",
            "aws",
            &id,
            json!({ "role_arn": "arn:aws:iam::123456789012:role/r", "provider": "local" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("for aws keys")),
        "{body}"
    );
    for (extra, says) in [
        (json!({ "role_arn": "not-an-arn" }), "role_arn"),
        (json!({ "role_arn": "arn:aws:iam::1:role/r" }), "role_arn"),
        (
            json!({ "external_id": "abc" }),
            "external_id needs a role_arn",
        ),
        (
            json!({ "role_arn": "arn:aws:iam::123456789012:role/r", "external_id": "a b" }),
            "external_id",
        ),
    ] {
        let (status, body) = app.bind_key("ab2", "aws", &id, extra.clone()).await;
        assert_eq!(status, 422, "{extra}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(says)),
            "{extra}: {body}"
        );
    }
    // Nothing of the refused attempts was bound.
    let keks: i64 = sqlx::query_scalar("SELECT count(*) FROM keks")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(keks, 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deks_are_bound_to_tenant_and_dek_by_the_encryption_context() {
    let app = app_at(&aws::moto_url()).await;
    let kms = tenant_client();
    let (_, arn) = tenant_with_key(&app, &kms, "ec").await;
    let deks = app.create_deks("ec", 3).await;
    let (report, ok) = app.verify_deks("ec");
    assert!(ok, "{report}");
    assert_eq!(
        (report["total"].as_u64(), report["ok"].as_u64()),
        (Some(3), Some(3))
    );

    // The tenant's KMS decrypts a stored DEK only with the context {tenant, dek}.
    let rows: Vec<(uuid::Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, wrapped FROM deks ORDER BY id")
            .fetch_all(&app.pool)
            .await
            .expect("deks");
    let (id, wrapped) = &rows[0];
    let decrypt = |context: Vec<(&str, String)>| {
        let mut call = kms
            .decrypt()
            .key_id(&arn)
            .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(wrapped.clone()));
        for (k, v) in context {
            call = call.encryption_context(k, v);
        }
        call.send()
    };
    let out = decrypt(vec![("tenant", "ec".into()), ("dek", id.to_string())])
        .await
        .expect("Decrypt with the binding");
    let plain = out.plaintext.expect("plaintext").into_inner();
    let kcv = Dek::from_bytes(&plain).expect("32 bytes").kcv();
    let listed = deks
        .iter()
        .find(|d| d["dek_id"] == id.to_string())
        .expect("the DEK");
    assert_eq!(listed["kcv"], kcv.as_str());
    for wrong in [
        vec![("tenant", "other".to_owned()), ("dek", id.to_string())],
        vec![("tenant", "ec".to_owned()), ("dek", rows[1].0.to_string())],
        vec![("tenant", "ec".to_owned())],
    ] {
        let e = decrypt(wrong.clone()).await.expect_err("another binding");
        assert_eq!(
            aws_sdk_kms::error::ProvideErrorMetadata::code(&e),
            Some("InvalidCiphertextException"),
            "{wrong:?}"
        );
    }

    // A wrapped DEK moved to another row fails there, alone: the other rows still verify.
    sqlx::query("UPDATE deks SET wrapped = $1 WHERE id = $2")
        .bind(wrapped)
        .bind(rows[1].0)
        .execute(&app.pool)
        .await
        .expect("swap");
    let (report, ok) = app.verify_deks("ec");
    assert!(!ok, "{report}");
    assert_eq!(
        (report["ok"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(1)),
        "{report}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_key_blocks_the_tenant_by_event_and_by_probe_alone() {
    let app = app_at(&aws::moto_url()).await;
    let kms = tenant_client();
    let (id_e, arn_e) = tenant_with_key(&app, &kms, "de").await;
    let (id_p, _) = tenant_with_key(&app, &kms, "dp").await;
    app.create_deks("de", 1).await;

    // By event: the tenant is blocked at once; the confirmation reads Disabled at KMS.
    kms.disable_key()
        .key_id(&id_e)
        .send()
        .await
        .expect("DisableKey");
    let since = Utc::now();
    app.publish("disabled", &arn_e, Utc::now(), json!({ "provider": "aws" }))
        .await;
    app.wait_access("de", "inaccessible").await;
    app.wait_observed(&arn_e, since).await;
    let tenant = app.tenant("de").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["observed_state"], "disabled", "{tenant}");
    let refused = app.post("/v1/tenants/de/deks", json!({})).await;
    assert_eq!(refused.status(), 409);
    assert_eq!(outbox_count(&app, "de", "tenant.inaccessible").await, 1);

    // By probe alone: no event ever comes.
    kms.disable_key()
        .key_id(&id_p)
        .send()
        .await
        .expect("DisableKey");
    assert_eq!(
        app.access("dp").await,
        "accessible",
        "nothing told byokd yet"
    );
    let s = sweeper(&app).await;
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("dp").await, "inaccessible");
    assert_eq!(
        app.tenant("dp").await["keks"][0]["observed_state"],
        "disabled"
    );

    // Enabled again at KMS: the next probe restores both.
    for id in [&id_e, &id_p] {
        kms.enable_key()
            .key_id(id.as_str())
            .send()
            .await
            .expect("EnableKey");
    }
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("de").await, "accessible");
    assert_eq!(app.access("dp").await, "accessible");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_rotation_is_rewrapped_with_reencrypt_unless_the_key_opted_out() {
    let gate = Gate::start().await;
    let app = app_at(&gate.url).await;
    let kms = tenant_client();
    let (id, arn) = tenant_with_key(&app, &kms, "rt").await;
    let before = app.tenant("rt").await["keks"][0]["current_version"].clone();
    assert_eq!(before, "original", "never rotated");
    app.create_deks("rt", 5).await;
    // A second tenant keeps its DEKs where they are after a rotation (AWS decrypts them).
    app.create_tenant("rt2").await;
    let (alias2, id2, _) = create_aliased_key(&kms, "rt2").await;
    let (status, body) = app
        .bind_key(
            "rt2",
            "aws",
            &alias2,
            json!({ "rewrap_on_rotation": false }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        app.tenant("rt2").await["keks"][0]["rewrap_on_rotation"],
        false
    );
    assert_eq!(
        app.tenant("rt").await["keks"][0]["rewrap_on_rotation"],
        true
    );
    app.create_deks("rt2", 2).await;

    let decrypts = gate.count("Decrypt/rt");
    for key in [&id, &id2] {
        kms.rotate_key_on_demand()
            .key_id(key.as_str())
            .send()
            .await
            .expect("RotateKeyOnDemand");
    }
    // The CloudTrail record of the rotation, as EventBridge delivers it.
    app.publish_raw(
        cloudtrail("RotateKeyOnDemand", &arn, "")
            .to_string()
            .as_bytes(),
    )
    .await;
    let job = app
        .wait_job("rt", "completed", Duration::from_secs(60))
        .await;
    assert_eq!(job["done"], 5, "{job}");
    let after = app.tenant("rt").await["keks"][0]["current_version"].clone();
    assert!(
        after.as_str().is_some_and(|v| v.starts_with("rotated@")),
        "{after}"
    );
    assert_eq!(job["target_version"], after, "{job}");
    assert!(gate.count("ReEncrypt/rt") >= 5, "re-wrapped inside KMS");
    assert_eq!(
        gate.count("Decrypt/rt"),
        decrypts,
        "no DEK of the tenant was decrypted to re-wrap it"
    );
    let (report, ok) = app.verify_deks("rt");
    assert!(ok, "{report}");
    assert_eq!(
        report["by_version"][after.as_str().unwrap_or_default()],
        5,
        "{report}"
    );

    // The opted-out key: the probe finds the new version, and no job moves its DEKs, which
    // still decrypt under the old label.
    let s = sweeper(&app).await;
    run(&s, "key-probe", Utc::now()).await;
    let kek = app.tenant("rt2").await["keks"][0].clone();
    assert!(
        kek["current_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("rotated@")),
        "{kek}"
    );
    assert!(app.rewrap_jobs("rt2").await.is_empty());
    let (report, ok) = app.verify_deks("rt2");
    assert!(ok, "{report}");
    assert_eq!(report["by_version"]["original"], 2, "{report}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_deletion_blocks_and_its_cancellation_leaves_the_key_disabled() {
    let app = app_at(&aws::moto_url()).await;
    let kms = tenant_client();
    let (id, _) = tenant_with_key(&app, &kms, "sd").await;
    let s = sweeper(&app).await;
    kms.schedule_key_deletion()
        .key_id(&id)
        .pending_window_in_days(7)
        .send()
        .await
        .expect("ScheduleKeyDeletion");
    run(&s, "key-probe", Utc::now()).await;
    let tenant = app.tenant("sd").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(
        tenant["keks"][0]["observed_state"], "pending_deletion",
        "{tenant}"
    );

    // Cancelled: AWS leaves the key disabled, so the tenant stays blocked until enabled.
    kms.cancel_key_deletion()
        .key_id(&id)
        .send()
        .await
        .expect("CancelKeyDeletion");
    run(&s, "key-probe", Utc::now()).await;
    let tenant = app.tenant("sd").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["observed_state"], "disabled", "{tenant}");
    kms.enable_key()
        .key_id(&id)
        .send()
        .await
        .expect("EnableKey");
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("sd").await, "accessible");
    app.shutdown().await;
}

/// moto records grants but never enforces them, so [`Gate`] answers AccessDeniedException
/// where AWS would after RevokeGrant: the key's metadata still says Enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_grant_is_found_by_the_probe_and_a_denying_key_policy_too() {
    let gate = Gate::start().await;
    let app = app_at(&gate.url).await;
    let kms = tenant_client();
    let (id, arn) = tenant_with_key(&app, &kms, "rg").await;
    let (id2, _) = tenant_with_key(&app, &kms, "kp").await;
    app.create_deks("rg", 1).await;
    let s = sweeper(&app).await;

    let grant = kms
        .create_grant()
        .key_id(&id)
        .grantee_principal(format!("arn:aws:iam::{}:role/byokd", aws::ACCOUNT))
        .operations(aws_sdk_kms::types::GrantOperation::Encrypt)
        .operations(aws_sdk_kms::types::GrantOperation::Decrypt)
        .send()
        .await
        .expect("CreateGrant");
    kms.revoke_grant()
        .key_id(&id)
        .grant_id(grant.grant_id.expect("grant id"))
        .send()
        .await
        .expect("RevokeGrant");
    gate.revoke_grant(&arn);
    run(&s, "key-probe", Utc::now()).await;
    let tenant = app.tenant("rg").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["revoked"], true, "{tenant}");
    assert_eq!(tenant["keks"][0]["observed_state"], "enabled", "{tenant}");
    assert!(gate.denied() >= 1);
    gate.restore_grant(&arn);
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("rg").await, "accessible");

    // A key policy that denies byokd (moto enforces a Deny on DescribeKey): found live.
    let deny = json!({ "Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": { "AWS": "*" }, "Action": "kms:DescribeKey",
        "Resource": "*" }] });
    let original = kms
        .get_key_policy()
        .key_id(&id2)
        .policy_name("default")
        .send()
        .await
        .expect("GetKeyPolicy")
        .policy
        .expect("policy");
    kms.put_key_policy()
        .key_id(&id2)
        .policy_name("default")
        .policy(deny.to_string())
        .send()
        .await
        .expect("PutKeyPolicy");
    run(&s, "key-probe", Utc::now()).await;
    let tenant = app.tenant("kp").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["revoked"], true, "{tenant}");
    kms.put_key_policy()
        .key_id(&id2)
        .policy_name("default")
        .policy(original)
        .send()
        .await
        .expect("PutKeyPolicy");
    run(&s, "key-probe", Utc::now()).await;
    assert_eq!(app.access("kp").await, "accessible");
    app.shutdown().await;
}

/// moto implements no ImportKeyMaterial, so [`Gate`] adds the `ValidTo` AWS reports for a
/// key with expiring imported material to moto's DescribeKey answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_material_valid_to_becomes_the_keys_expiry_and_blocks_once_past() {
    let gate = Gate::start().await;
    let app = app_at(&gate.url).await;
    let kms = tenant_client();
    let (_, arn) = tenant_with_key(&app, &kms, "im").await;
    assert_eq!(app.tenant("im").await["keks"][0]["expires_at"], Value::Null);
    let s = sweeper(&app).await;

    let valid_to = (Utc::now() + chrono::Duration::days(10))
        .with_nanosecond(0)
        .expect("whole seconds");
    gate.set_valid_to(&arn, valid_to);
    run(&s, "key-probe", Utc::now()).await;
    let tenant = app.tenant("im").await;
    let expires: chrono::DateTime<Utc> =
        serde_json::from_value(tenant["keks"][0]["expires_at"].clone()).expect("expires_at");
    assert_eq!(expires, valid_to, "{tenant}");
    assert_eq!(tenant["access"], "accessible", "{tenant}");

    // The material's date passed: AWS refuses every operation with it, so the tenant is
    // blocked outright, not only from new DEKs.
    gate.set_valid_to(&arn, Utc::now() - chrono::Duration::minutes(1));
    gate.set_key_state(&arn, "PendingImport");
    run(&s, "key-probe", Utc::now()).await;
    let tenant = app.tenant("im").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["state"], "expired", "{tenant}");
    app.shutdown().await;
}

/// An account whose shared quota others use up: [`Gate`] throttles every request (moto never
/// throttles). Throttling says nothing about the key, so it never blocks the tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_an_outage_and_never_a_revocation() {
    let gate = Gate::start().await;
    let app = app_at(&gate.url).await;
    let kms = tenant_client();
    tenant_with_key(&app, &kms, "th").await;
    app.create_deks("th", 1).await;
    gate.throttle_all(true);
    let s = sweeper(&app).await;
    let report = run(&s, "key-probe", Utc::now()).await;
    assert_eq!(report["unreachable"], 1, "{report}");
    assert_eq!(report["changes"], 0, "{report}");
    let tenant = app.tenant("th").await;
    assert_eq!(tenant["access"], "accessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["revoked"], false, "{tenant}");
    // A new DEK cannot be wrapped now: retry later (503), not refused (409).
    let r = app.post("/v1/tenants/th/deks", json!({})).await;
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap_or_default());
    assert!(gate.throttled() > 0);
    gate.throttle_all(false);
    app.create_deks("th", 1).await;
    app.shutdown().await;
}

/// Material deleted (DeleteImportedKeyMaterial) leaves the key `PendingImport` with no
/// `ValidTo`; [`Gate`] reports that state, which moto cannot reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_its_imported_material_blocks_the_tenant_even_with_no_date() {
    let gate = Gate::start().await;
    let app = app_at(&gate.url).await;
    let kms = tenant_client();
    let (_, arn) = tenant_with_key(&app, &kms, "pi").await;
    gate.set_key_state(&arn, "PendingImport");
    let s = sweeper(&app).await;
    run(&s, "key-probe", Utc::now()).await;
    let tenant = app.tenant("pi").await;
    assert_eq!(tenant["access"], "inaccessible", "{tenant}");
    assert_eq!(tenant["keks"][0]["observed_state"], "disabled", "{tenant}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenants_role_is_assumed_to_reach_a_key_in_its_own_account() {
    let app = app_at(&aws::moto_url()).await;
    let role = "arn:aws:iam::210987654321:role/byok-platform";
    let tenant_kms = aws::client_as(role, "tenant-xr-7").await;
    let (_, arn) = create_key(&tenant_kms).await;
    assert!(arn.contains(":210987654321:key/"), "{arn}");
    app.create_tenant("xr").await;

    // byokd's own credentials act in another account: no such key there.
    let (status, body) = app.bind_key("xr", "aws", &arn, json!({})).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = app
        .bind_key(
            "xr",
            "aws",
            &arn,
            json!({ "role_arn": role, "external_id": "tenant-xr-7" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["keks"][0]["key_ref"], arn.as_str());
    // The tenant shows the role byokd assumes, not the external id.
    let tenant = app.tenant("xr").await;
    assert_eq!(tenant["keks"][0]["role_arn"], role, "{tenant}");
    assert!(!tenant.to_string().contains("tenant-xr-7"), "{tenant}");
    app.create_deks("xr", 2).await;
    // The CLI (another process) reads the role from the database too.
    let (report, ok) = app.verify_deks("xr");
    assert!(ok, "{report}");
    let stored: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT role_arn, external_id FROM keks WHERE key_ref = $1")
            .bind(&arn)
            .fetch_one(&app.pool)
            .await
            .expect("kek");
    assert_eq!(
        stored,
        (Some(role.to_owned()), Some("tenant-xr-7".to_owned()))
    );
    app.shutdown().await;
}

/// A role whose trust policy does not let byokd in is refused at registration with STS's
/// reason (422), not "retry later"; STS here is [`Gate`] in front of moto, which checks no
/// trust policy. The same refusal for a key already bound is an outage (module docs of
/// `kms::aws`), so it is checked at registration only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_does_not_trust_byokd_is_refused_at_registration_with_stss_reason() {
    let gate = Gate::start().await;
    let mut settings = aws::settings(&aws::moto_url());
    settings.sts_endpoint_url = Some(gate.url.clone());
    let app = TestApp::spawn_with(|c| c.kms.aws = Some(settings)).await;
    let role = "arn:aws:iam::210987654322:role/byok-platform";
    let tenant_kms = aws::client_as(role, "tenant-nt-1").await;
    let (_, arn) = create_key(&tenant_kms).await;
    app.create_tenant("nt").await;
    gate.distrust_role(role);
    let (status, body) = app
        .bind_key(
            "nt",
            "aws",
            &arn,
            json!({ "role_arn": role, "external_id": "tenant-nt-1" }),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("STS refused")
            && error.contains("not authorized to perform: sts:AssumeRole"),
        "{body}"
    );
    assert!(
        !error.contains("tenant-nt-1"),
        "the external id stays out: {body}"
    );
    assert_eq!(gate.denied(), 1);
    // Another role, which STS lets byokd assume, binds through the same STS.
    let trusting = "arn:aws:iam::210987654323:role/byok-platform";
    let tenant_kms = aws::client_as(trusting, "tenant-nt-2").await;
    let (_, arn) = create_key(&tenant_kms).await;
    let (status, body) = app
        .bind_key(
            "nt",
            "aws",
            &arn,
            json!({ "role_arn": trusting, "external_id": "tenant-nt-2" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    app.shutdown().await;
}

/// A CloudTrail record of `name` on `arn` in its EventBridge envelope; `extra` adds fields
/// to `detail` (e.g. `,"requestParameters":{...}`).
fn cloudtrail(name: &str, arn: &str, extra: &str) -> Value {
    let id = uuid::Uuid::new_v4();
    let mut detail = json!({
        "eventVersion": "1.08", "eventSource": "kms.amazonaws.com", "eventName": name,
        "eventTime": at(-60).to_rfc3339(), "awsRegion": aws::REGION,
        "userIdentity": { "type": "IAMUser", "accountId": aws::ACCOUNT },
        "requestParameters": { "keyId": arn },
        "responseElements": null, "eventID": id.to_string(), "readOnly": false,
        "resources": [{ "ARN": arn, "accountId": aws::ACCOUNT }],
        "eventType": "AwsApiCall", "recipientAccountId": aws::ACCOUNT,
    });
    if !extra.is_empty()
        && let (Some(d), Ok(Value::Object(more))) = (
            detail.as_object_mut(),
            serde_json::from_str::<Value>(&format!("{{{}}}", extra.trim_start_matches(','))),
        )
    {
        d.extend(more);
    }
    json!({ "version": "0", "id": format!("eb-{id}"), "detail-type": "AWS API Call via CloudTrail",
            "source": "aws.kms", "account": aws::ACCOUNT, "time": at(-60).to_rfc3339(),
            "region": aws::REGION, "resources": [], "detail": detail })
}

/// One of the KMS service events on `arn`.
fn service_event(detail_type: &str, arn: &str, detail: Value) -> Value {
    json!({ "version": "0", "id": uuid::Uuid::new_v4().to_string(), "detail-type": detail_type,
            "source": "aws.kms", "account": aws::ACCOUNT, "time": at(-60).to_rfc3339(),
            "region": aws::REGION, "resources": [arn], "detail": detail })
}

/// What the test does at KMS before publishing an event.
#[derive(Clone, Copy, Debug)]
enum AtKms {
    Nothing,
    Disable,
    Rotate,
    ScheduleDeletion,
    CancelDeletion,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_native_aws_event_format_reaches_its_bound_key() {
    let app = app_at(&aws::moto_url()).await;
    let kms = tenant_client();
    // (name, what happened at KMS, the event, the access once KMS has been asked).
    type Build = fn(&str) -> Value;
    let cases: Vec<(&str, AtKms, Build, &str)> = vec![
        (
            "svc-rotation",
            AtKms::Rotate,
            |arn| {
                service_event(
                    "KMS CMK Rotation",
                    arn,
                    json!({ "key-id": arn.rsplit('/').next() }),
                )
            },
            "accessible",
        ),
        (
            "svc-deletion",
            AtKms::ScheduleDeletion,
            |arn| {
                service_event(
                    "KMS CMK Deletion",
                    arn,
                    json!({ "key-id": arn.rsplit('/').next() }),
                )
            },
            "inaccessible",
        ),
        (
            "svc-material-expired",
            AtKms::Nothing,
            |arn| {
                service_event(
                    "KMS Imported Key Material Expiration",
                    arn,
                    json!({ "key-id": arn.rsplit('/').next() }),
                )
            },
            "accessible",
        ),
        (
            "ct-disable",
            AtKms::Disable,
            |arn| cloudtrail("DisableKey", arn, ""),
            "inaccessible",
        ),
        (
            "ct-enable",
            AtKms::Nothing,
            |arn| cloudtrail("EnableKey", arn, ""),
            "accessible",
        ),
        (
            "ct-schedule",
            AtKms::ScheduleDeletion,
            |arn| cloudtrail("ScheduleKeyDeletion", arn, ""),
            "inaccessible",
        ),
        (
            "ct-cancel",
            AtKms::CancelDeletion,
            |arn| cloudtrail("CancelKeyDeletion", arn, ""),
            "inaccessible",
        ),
        (
            "ct-rotate",
            AtKms::Rotate,
            |arn| cloudtrail("RotateKey", arn, ""),
            "accessible",
        ),
        (
            "ct-rotate-od",
            AtKms::Rotate,
            |arn| cloudtrail("RotateKeyOnDemand", arn, ""),
            "accessible",
        ),
        (
            "ct-import",
            AtKms::Nothing,
            |arn| {
                let mut e = cloudtrail("ImportKeyMaterial", arn, "");
                e["detail"]["requestParameters"]["expirationModel"] =
                    json!("KEY_MATERIAL_DOES_NOT_EXPIRE");
                e
            },
            "accessible",
        ),
        (
            "ct-delete-material",
            AtKms::Nothing,
            |arn| cloudtrail("DeleteImportedKeyMaterial", arn, ""),
            "accessible",
        ),
        (
            "ct-delete-expired",
            AtKms::Nothing,
            |arn| cloudtrail("DeleteExpiredKeyMaterial", arn, ""),
            "accessible",
        ),
        (
            "ct-delete-key",
            AtKms::ScheduleDeletion,
            |arn| cloudtrail("DeleteKey", arn, ""),
            "inaccessible",
        ),
    ];
    let mut published = Vec::new();
    for (i, (name, at_kms, build, want)) in cases.iter().enumerate() {
        let tenant = format!("ne{i}");
        let (id, arn) = tenant_with_key(&app, &kms, &tenant).await;
        match at_kms {
            AtKms::Nothing => {}
            AtKms::Disable => {
                kms.disable_key()
                    .key_id(&id)
                    .send()
                    .await
                    .expect("DisableKey");
            }
            AtKms::Rotate => {
                kms.rotate_key_on_demand()
                    .key_id(&id)
                    .send()
                    .await
                    .expect("Rotate");
            }
            AtKms::ScheduleDeletion | AtKms::CancelDeletion => {
                kms.schedule_key_deletion()
                    .key_id(&id)
                    .pending_window_in_days(7)
                    .send()
                    .await
                    .expect("ScheduleKeyDeletion");
                if matches!(at_kms, AtKms::CancelDeletion) {
                    kms.cancel_key_deletion()
                        .key_id(&id)
                        .send()
                        .await
                        .expect("CancelKeyDeletion");
                }
            }
        }
        let event = build(&arn);
        app.publish_raw(event.to_string().as_bytes()).await;
        published.push((name, tenant, arn, *want));
    }
    app.wait_processed(published.len() as i64).await;
    for (name, tenant, arn, want) in &published {
        // Matched to the key (not `unknown_key`), then settled by what KMS says.
        let matched: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE key_ref = $1 AND source = 'event'
               AND outcome <> 'unknown_key'",
        )
        .bind(arn)
        .fetch_one(&app.pool)
        .await
        .expect("audit");
        assert!(matched >= 1, "{name}: the event reached {arn}");
        app.wait_access(tenant, want).await;
    }
    // The revocations KMS does not bear out (material "expired" or deleted while the key is
    // enabled, with no ValidTo) were claims, refuted by the confirmation and audited so.
    for (name, _, arn, _) in published.iter().filter(|p| {
        matches!(
            *p.0,
            "svc-material-expired" | "ct-delete-material" | "ct-delete-expired"
        )
    }) {
        let refuted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE key_ref = $1 AND action = 'revocation_unconfirmed'",
        )
        .bind(arn)
        .fetch_one(&app.pool)
        .await
        .expect("audit");
        assert_eq!(refuted, 1, "{name}");
    }
    app.shutdown().await;
}
