//! Re-wrap benchmark (issue 3): DEKs/s of a rotation of one tenant's DEKs with the local KMS
//! against PostgreSQL and against SQLite (standalone mode's store), the daemon's peak RSS,
//! and, in the same run, the rate of a plain batched `UPDATE` rewriting the same rows'
//! `wrapped` column (the database's own ceiling). Runs at 100k and 1M DEKs to show memory
//! stays flat as the count grows.
//!
//! `cargo bench --bench rewrap` (local RabbitMQ and PostgreSQL). `BYOKD_BENCH_DEKS=100000,1000000`
//! sets the sizes, `BYOKD_BENCH_BACKENDS=postgres,sqlite` the back ends. Prints figures;
//! asserts none.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use byokd::kms::{Dek, DekContext, KmsProvider};
use common::{Backend, TestApp, at};
use serde_json::json;
use std::time::{Duration, Instant};
use uuid::Uuid;

const BATCH: usize = 1000;

fn backends() -> Vec<Backend> {
    std::env::var("BYOKD_BENCH_BACKENDS")
        .unwrap_or_else(|_| "postgres,sqlite".to_owned())
        .split(',')
        .filter_map(|b| match b.trim() {
            "postgres" => Some(Backend::Postgres),
            "sqlite" => Some(Backend::Sqlite),
            _ => None,
        })
        .collect()
}

fn sizes() -> Vec<usize> {
    std::env::var("BYOKD_BENCH_DEKS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000])
}

/// Seeds `n` DEKs wrapped (for real) under version 1 of `key`; returns their ids.
async fn seed(app: &TestApp, tenant: &str, key: &str, n: usize) -> Vec<Uuid> {
    let kms = app.local_kms().await;
    let kek_id = app
        .sql("SELECT id FROM keks WHERE key_ref = $1")
        .bind(key)
        .int()
        .await;
    let mut all = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let chunk = left.min(10_000);
        left -= chunk;
        let deks: Vec<(Uuid, Dek)> = (0..chunk)
            .map(|_| (Uuid::now_v7(), Dek::generate()))
            .collect();
        let items: Vec<_> = deks
            .iter()
            .map(|(id, d)| {
                (
                    d,
                    DekContext {
                        tenant_id: tenant,
                        dek_id: *id,
                    },
                )
            })
            .collect();
        let wrapped = kms.wrap_many(key, None, &items).await.unwrap();
        let ids: Vec<Uuid> = deks.iter().map(|(id, _)| *id).collect();
        let kcvs: Vec<String> = deks.iter().map(|(_, d)| d.kcv()).collect();
        let blobs: Vec<Vec<u8>> = wrapped.into_iter().map(|w| w.ciphertext).collect();
        if let Some(pool) = &app.sqlite {
            let mut tx = pool.begin().await.unwrap();
            let now = chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string();
            for ((id, blob), kcv) in ids.iter().zip(&blobs).zip(&kcvs) {
                sqlx::query(
                    "INSERT INTO deks (id, tenant_id, kek_id, kek_version, wrapped, kcv,
                                       created_at, updated_at)
                     VALUES ($1, $2, $3, '1', $4, $5, $6, $6)",
                )
                .bind(id.hyphenated().to_string())
                .bind(tenant)
                .bind(kek_id)
                .bind(blob)
                .bind(kcv)
                .bind(&now)
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
            all.extend(ids);
            continue;
        }
        sqlx::query(
            "INSERT INTO deks (id, tenant_id, kek_id, kek_version, wrapped, kcv)
             SELECT u.id, $1, $2, '1', u.w, u.k FROM UNNEST($3::uuid[], $4::bytea[], $5::text[]) AS u(id, w, k)",
        )
        .bind(tenant)
        .bind(kek_id)
        .bind(&ids)
        .bind(&blobs)
        .bind(&kcvs)
        .execute(&app.pool)
        .await
        .unwrap();
        all.extend(ids);
    }
    all
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Refreshes the planner's statistics on `deks`.
async fn analyze(app: &TestApp) {
    match &app.sqlite {
        Some(pool) => sqlx::query("ANALYZE deks").execute(pool).await.map(drop),
        None => sqlx::query("VACUUM ANALYZE deks")
            .execute(&app.pool)
            .await
            .map(drop),
    }
    .unwrap();
}

async fn run(backend: Backend, n: usize) {
    let name = format!("{n} {backend:?}");
    let mut app = TestApp::spawn_on(backend).await;
    let tenant = format!("bench{n}");
    app.tenant_with_key(&tenant, "bench-key").await;
    app.stop().await;
    let t = Instant::now();
    let ids = seed(&app, &tenant, "bench-key", n).await;
    analyze(&app).await;
    println!(
        "[{name}] seeded {n} wrapped DEKs in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The daemon in its own process, so its peak RSS is its own.
    let batch = BATCH.to_string();
    let (mut child, port) = app.daemon_process(&[("BYOKD_REWRAP__BATCH_SIZE", &batch)]);
    let base = format!("http://127.0.0.1:{port}");
    common::wait_for("daemon ready", Duration::from_secs(30), || {
        let url = format!("{base}/readyz");
        async move { reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let rss_idle = peak_rss_mb(child.id());

    let info = app.local_kms().await.rotate("bench-key").await.unwrap();
    let start = Instant::now();
    app.publish(
        "rotated",
        "bench-key",
        at(0),
        json!({ "version": info.current_version }),
    )
    .await;
    loop {
        let state = app
            .sql("SELECT state FROM rewrap_jobs LIMIT 1")
            .rows()
            .await;
        if state.first().is_some_and(|r| r[0] == "completed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rewrap = start.elapsed();
    let rss = peak_rss_mb(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    let rate = n as f64 / rewrap.as_secs_f64();
    println!(
        "[{name}] byokd re-wrap (local KMS, 2 workers, batch {BATCH}): {:.1} s = {rate:.0} DEKs/s; daemon peak RSS {rss:.1} MB (idle {rss_idle:.1} MB)",
        rewrap.as_secs_f64()
    );

    // The database's own ceiling: the same rows' wrapped column rewritten by plain batched
    // UPDATEs of the same batch size, one transaction each (SQLite: one UPDATE per row by
    // primary key inside the batch's transaction, its way of batching).
    analyze(&app).await;
    let start = Instant::now();
    for chunk in ids.chunks(BATCH) {
        let blobs: Vec<Vec<u8>> = chunk
            .iter()
            .map(|_| rand::random::<[u8; 60]>().to_vec())
            .collect();
        if let Some(pool) = &app.sqlite {
            let mut tx = pool.begin().await.unwrap();
            for (id, blob) in chunk.iter().zip(&blobs) {
                sqlx::query("UPDATE deks SET wrapped = $2 WHERE id = $1")
                    .bind(id.hyphenated().to_string())
                    .bind(blob)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
            continue;
        }
        sqlx::query(
            "UPDATE deks d SET wrapped = u.w FROM UNNEST($1::uuid[], $2::bytea[]) AS u(id, w) WHERE d.id = u.id",
        )
        .bind(chunk)
        .bind(&blobs)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let plain = start.elapsed();
    let plain_rate = n as f64 / plain.as_secs_f64();
    println!(
        "[{name}] plain batched UPDATE: {:.1} s = {plain_rate:.0} rows/s",
        plain.as_secs_f64()
    );
    println!(
        "[{name}] ratio re-wrap / plain UPDATE = {:.2} (target >= 0.5)",
        rate / plain_rate
    );
    app.shutdown().await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    for n in sizes() {
        for backend in backends() {
            run(backend, n).await;
        }
    }
}
