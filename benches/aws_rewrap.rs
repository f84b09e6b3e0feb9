//! AWS re-wrap under a quota (issue 11): one tenant's DEKs re-wrapped with ReEncrypt after an
//! on-demand rotation, against moto_server behind an artificial AWS quota (the tests' `Gate`,
//! which answers `ThrottlingException` beyond its rate, like AWS's shared quota), with byokd
//! configured for the same quota. Reports the achieved rate against the configured one (goal:
//! at least 90%) and how many requests the quota throttled (goal: no throttle storm).
//!
//! `cargo bench --bench aws_rewrap` (local RabbitMQ and PostgreSQL, moto_server on 5005:
//! `scripts/services --test-peers`). `BYOKD_BENCH_DEKS` (100000) and `BYOKD_BENCH_AWS_QUOTA`
//! (requests per second, 300) set the size and the quota. Prints figures; asserts none.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use aws_sdk_kms::primitives::Blob;
use byokd::kms::Dek;
use chrono::Utc;
use common::TestApp;
use common::aws::{self, Gate, create_aliased_key, tenant_client};
use futures_util::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seeds `n` DEKs of `tenant`, each encrypted (for real, straight at moto, outside the
/// quota) under `arn` with its encryption context, labelled `original`.
async fn seed(app: &TestApp, tenant: &str, arn: &str, n: usize) {
    let kms = tenant_client();
    let kek_id: i64 = sqlx::query_scalar("SELECT id FROM keks WHERE key_ref = $1")
        .bind(arn)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let mut left = n;
    while left > 0 {
        let chunk = left.min(5_000);
        left -= chunk;
        let rows: Vec<(Uuid, Vec<u8>, String)> = futures_util::stream::iter(0..chunk)
            .map(|_| {
                let kms = kms.clone();
                async move {
                    let id = Uuid::now_v7();
                    let dek = Dek::generate();
                    let out = kms
                        .encrypt()
                        .key_id(arn)
                        .plaintext(Blob::new(dek.expose().to_vec()))
                        .encryption_context("tenant", tenant)
                        .encryption_context("dek", id.to_string())
                        .send()
                        .await
                        .unwrap();
                    (id, out.ciphertext_blob.unwrap().into_inner(), dek.kcv())
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
        let blobs: Vec<Vec<u8>> = rows.iter().map(|r| r.1.clone()).collect();
        let kcvs: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
        sqlx::query(
            "INSERT INTO deks (id, tenant_id, kek_id, kek_version, wrapped, kcv)
             SELECT u.id, $1, $2, 'original', u.w, u.k
             FROM UNNEST($3::uuid[], $4::bytea[], $5::text[]) AS u(id, w, k)",
        )
        .bind(tenant)
        .bind(kek_id)
        .bind(&ids)
        .bind(&blobs)
        .bind(&kcvs)
        .execute(&app.pool)
        .await
        .unwrap();
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = env_or("BYOKD_BENCH_DEKS", 100_000) as usize;
    let quota = env_or("BYOKD_BENCH_AWS_QUOTA", 300) as u32;
    let gate = Gate::with_quota(quota).await;
    let mut settings = aws::settings(&gate.url);
    settings.crypto_requests_per_sec = quota;
    settings.describe_requests_per_sec = quota;
    settings.max_attempts = 5;
    let app = TestApp::spawn_with(|c| {
        c.kms.aws = Some(settings);
        c.rewrap.batch_size = 1000;
    })
    .await;
    let kms = tenant_client();
    let tenant = "bench-aws";
    let r = app
        .post("/v1/tenants", json!({ "id": tenant, "name": tenant }))
        .await;
    assert_eq!(r.status(), 201);
    let (alias, id, arn) = create_aliased_key(&kms, "bench").await;
    let r = app
        .post(
            &format!("/v1/tenants/{tenant}/keks"),
            json!({ "provider": "aws", "key_ref": alias }),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());

    let t = Instant::now();
    seed(&app, tenant, &arn, n).await;
    println!(
        "seeded {n} DEKs with real Encrypt calls to moto in {:.1} s ({:.0}/s: moto's own pace, no quota)",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64()
    );

    kms.rotate_key_on_demand().key_id(&id).send().await.unwrap();
    let (throttled, forwarded) = (gate.throttled(), gate.forwarded());
    let start = Instant::now();
    // The probe finds the new version and starts the job, as after a lost event.
    let s = common::sweeps::sweeper(&app).await;
    common::sweeps::run(&s, "key-probe", Utc::now()).await;
    let job = app
        .wait_job(tenant, "completed", Duration::from_secs(3600))
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    let job_secs: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM (completed_at - created_at))::float8 FROM rewrap_jobs
         WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    println!(
        "job created -> completed: {job_secs:.1} s = {:.0} DEKs/s ({:.1}% of the configured rate)",
        n as f64 / job_secs,
        100.0 * n as f64 / job_secs / f64::from(quota)
    );
    let achieved = n as f64 / elapsed;
    let throttled = gate.throttled() - throttled;
    let requests = gate.forwarded() - forwarded;
    println!(
        "re-wrapped {} DEKs with ReEncrypt in {elapsed:.1} s: {achieved:.0} DEKs/s against a configured {quota}/s = {:.1}% (goal >= 90%)",
        job["done"],
        100.0 * achieved / f64::from(quota)
    );
    println!(
        "requests reaching moto {requests}, throttled by the quota {throttled} ({:.2}% of attempts), ReEncrypt {}",
        100.0 * throttled as f64 / (requests + throttled).max(1) as f64,
        gate.count("ReEncrypt/bench-aws"),
    );
    app.shutdown().await;
}
