//! Expiry-scan benchmark (issue 4a): sweep wall time over 100,000 and 1,000,000 KEKs of which
//! 1% expire inside the warning window, showing the cost follows the keys found, not the keys
//! that exist. Each size runs the scan twice: the first queues the warnings, the second finds
//! them already queued.
//!
//! `cargo bench --bench expiry` (local PostgreSQL). `BYOKD_BENCH_KEKS=100000,1000000`.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use byokd::store::Store;
use byokd::sweeps::expiry::expiry_scan;
use chrono::Utc;
use common::TestDb;
use std::time::Instant;

fn sizes() -> Vec<i64> {
    std::env::var("BYOKD_BENCH_KEKS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000])
}

async fn run(n: i64) {
    let db = TestDb::create().await;
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let Store::Postgres(pg) = &store else {
        unreachable!("TestDb::create makes a PostgreSQL database");
    };
    let pool = pg.pool();
    let t = Instant::now();
    // Every 100th key expires within 20 days; the rest in 1 to 3 years, or never.
    for sql in [
        "INSERT INTO tenants (id, name) SELECT 't' || g, 'T' || g FROM generate_series(1, $1) g",
        "INSERT INTO tenant_contacts (tenant_id, email) SELECT 't' || g, 'ops@t' || g || '.example' FROM generate_series(1, $1) g",
        "INSERT INTO keks (tenant_id, provider, key_ref, state, current_version, expires_at,
                           state_changed_at, version_changed_at, expiry_changed_at)
         SELECT 't' || g, 'local', 'k' || g, 'enabled', '1',
                CASE WHEN g % 100 = 0 THEN now() + (g / 100 % 20 + 1) * interval '1 day'
                     WHEN g % 3 = 0 THEN NULL
                     ELSE now() + (365 + g % 730) * interval '1 day' END,
                now(), now(), now()
         FROM generate_series(1, $1) g",
    ] {
        sqlx::query(sql).bind(n).execute(pool).await.unwrap();
    }
    sqlx::query("VACUUM ANALYZE").execute(pool).await.unwrap();
    println!(
        "[{n}] seeded {n} tenants and KEKs in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let now = Utc::now();
    let thresholds = [30, 14, 7, 1];
    for pass in ["first", "second"] {
        let t = Instant::now();
        let report = expiry_scan(&store, &thresholds, now).await.unwrap();
        println!(
            "[{n}] expiry_scan ({pass} pass): {:.0} ms; keys in window {}, notifications queued {}",
            t.elapsed().as_secs_f64() * 1e3,
            report.keys_in_window,
            report.notifications_queued
        );
    }
    // The same table, a window holding a tenth of the keys: the scan's cost follows them.
    let t = Instant::now();
    let report = expiry_scan(&store, &[2], now).await.unwrap();
    println!(
        "[{n}] expiry_scan (2-day window): {:.0} ms; keys in window {}",
        t.elapsed().as_secs_f64() * 1e3,
        report.keys_in_window
    );
    drop(store);
    db.drop_db().await;
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    for n in sizes() {
        run(n).await;
    }
}
