//! Revocation latency benchmark (issue 4b): from publishing a `disabled` event to the committed
//! `inaccessible` state and to the `byok.access` message being received, measured while a
//! 1,000,000-DEK re-wrap runs and a 10,000-event backlog drains. Revocations are published
//! with their `<provider>.disabled` routing key, so they also reach the urgent lane; for
//! comparison the same measurement is repeated with a routing key only the main queue takes.
//!
//! `cargo bench --bench revocation` (local RabbitMQ and PostgreSQL). `BYOKD_BENCH_DEKS` and
//! `BYOKD_BENCH_BACKLOG` change the sizes. Prints figures; asserts none.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use common::{TestApp, at, canonical};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const PROBES: usize = 100;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn publish(app: &TestApp, key: &str, body: &[u8]) -> lapin::PublisherConfirm {
    app.channel
        .basic_publish(
            app.config.amqp.lifecycle_exchange.as_str().into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// Publishes a backlog, then `PROBES` revocations for probe tenants `first..`, and measures
/// both latencies per revocation.
async fn measure(
    app: &TestApp,
    label: &str,
    routing_key: &str,
    first: usize,
    backlog: usize,
    round: &str,
) {
    let mut listener = app.access_listener().await;
    let mut confirms = Vec::with_capacity(backlog);
    for i in 0..backlog {
        let key = format!("key-{}", i % 1000);
        let kind = if (i / 1000) % 2 == 0 {
            "disabled"
        } else {
            "enabled"
        };
        let body = canonical(
            &format!("{round}-{i}"),
            kind,
            &key,
            at((i / 1000) as i64),
            json!({}),
        )
        .to_string();
        confirms.push(publish(app, "local.bench", body.as_bytes()).await);
    }
    for c in confirms {
        c.await.unwrap();
    }
    // Send the revocations from a task while this one watches, so each latency is measured
    // from its own publish.
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let sender = {
        let sent = sent.clone();
        let channel = app.channel.clone();
        let exchange = app.config.amqp.lifecycle_exchange.clone();
        let routing_key = routing_key.to_owned();
        let round = round.to_owned();
        tokio::spawn(async move {
            for p in first..first + PROBES {
                let body = canonical(
                    &format!("{round}-probe-{p}"),
                    "disabled",
                    &format!("probe-{p}"),
                    chrono::Utc::now(),
                    json!({}),
                );
                sent.lock().await.insert(format!("p{p}"), Instant::now());
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut committed: HashMap<String, Duration> = HashMap::new();
    let mut received: HashMap<String, Duration> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (committed.len() < PROBES || received.len() < PROBES) && Instant::now() < deadline {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM tenants WHERE id LIKE 'p%' AND access = 'inaccessible'",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        let sent_now = sent.lock().await.clone();
        for id in ids {
            if let Some(start) = sent_now.get(&id) {
                committed.entry(id).or_insert_with(|| start.elapsed());
            }
        }
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(2), listener.next()).await
        {
            let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            let tenant = body["tenant_id"].as_str().unwrap_or_default().to_owned();
            // Looked up now, not in the snapshot above: a message may overtake the snapshot
            // of a revocation sent just after it was taken.
            if body["access"] == "inaccessible"
                && let Some(start) = sent.lock().await.get(&tenant).copied()
            {
                received.entry(tenant).or_insert_with(|| start.elapsed());
            }
        }
    }
    sender.await.unwrap();
    let mut c: Vec<Duration> = committed.into_values().collect();
    let mut r: Vec<Duration> = received.into_values().collect();
    println!(
        "{label}: committed inaccessible n={} p50={:.0} ms p99={:.0} ms; byok.access received n={} p50={:.0} ms p99={:.0} ms",
        c.len(),
        percentile(&mut c, 0.5),
        percentile(&mut c, 0.99),
        r.len(),
        percentile(&mut r, 0.5),
        percentile(&mut r, 0.99),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let deks = env("BYOKD_BENCH_DEKS", 1_000_000);
    let backlog = env("BYOKD_BENCH_BACKLOG", 10_000);
    let mut app = TestApp::spawn().await;
    app.stop().await;
    app.tenant_with_key_offline("big", "big-key").await;
    let t = Instant::now();
    app.bulk_deks("big", "big-key", deks).await;
    // Tenants whose keys the backlog toggles, and the probe tenants.
    for sql in [
        "INSERT INTO tenants (id, name) SELECT 'b' || g, 'B' FROM generate_series(0, 999) g",
        "INSERT INTO keks (tenant_id, provider, key_ref, state, current_version, state_changed_at, version_changed_at, expiry_changed_at)
         SELECT 'b' || g, 'local', 'key-' || g, 'enabled', '1', now(), now(), now() FROM generate_series(0, 999) g",
        "INSERT INTO tenants (id, name) SELECT 'p' || g, 'P' FROM generate_series(0, 2 * 100 - 1) g",
        "INSERT INTO keks (tenant_id, provider, key_ref, state, current_version, state_changed_at, version_changed_at, expiry_changed_at)
         SELECT 'p' || g, 'local', 'probe-' || g, 'enabled', '1', now(), now(), now() FROM generate_series(0, 2 * 100 - 1) g",
    ] {
        sqlx::query(sql).execute(&app.pool).await.unwrap();
    }
    // The keys exist at the KMS (enabled), as they would: each event is confirmed there.
    app.create_local_keys(
        (0..1000)
            .map(|g| format!("key-{g}"))
            .chain((0..2 * PROBES).map(|g| format!("probe-{g}"))),
    )
    .await;
    sqlx::query("VACUUM ANALYZE")
        .execute(&app.pool)
        .await
        .unwrap();
    println!(
        "seeded {deks} DEKs and {} tenants in {:.1} s",
        1000 + 2 * PROBES,
        t.elapsed().as_secs_f64()
    );

    let extra: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("BYOKD_STATE__") || k.starts_with("BYOKD_AMQP__"))
        .collect();
    let extra: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (mut child, port) = app.daemon_process(&extra);
    common::wait_for("daemon ready", Duration::from_secs(30), || {
        let url = format!("http://127.0.0.1:{port}/readyz");
        async move { reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) }
    })
    .await;

    let info = app.local_kms().await.rotate("big-key").await.unwrap();
    app.publish(
        "rotated",
        "big-key",
        at(0),
        json!({ "version": info.current_version }),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done: i64 = sqlx::query_scalar("SELECT COALESCE(max(done), 0) FROM rewrap_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    println!(
        "re-wrap of {deks} DEKs running ({done} done after 2 s); backlog {backlog} events; {PROBES} revocations 10 ms apart"
    );
    measure(
        &app,
        "urgent lane (routing key local.disabled)",
        "local.disabled",
        0,
        backlog,
        "u",
    )
    .await;
    measure(
        &app,
        "main queue only (routing key local.other)",
        "local.other",
        PROBES,
        backlog,
        "m",
    )
    .await;
    let (state, done): (String, i64) = sqlx::query_as("SELECT state, done FROM rewrap_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    println!("re-wrap job at the end of the measurements: {state}, {done} done");
    child.kill().unwrap();
    child.wait().unwrap();
    app.shutdown().await;
}
