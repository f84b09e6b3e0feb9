//! Ingest benchmark (issue 2): end-to-end throughput of canonical events through RabbitMQ
//! into committed state, beside a bare lapin consumer that only acks, in the same run; and
//! publish-to-`tenant.access.inaccessible` latency of `disabled` events, idle and while a
//! backlog drains.
//!
//! Run with `cargo bench --bench ingest` (needs the local RabbitMQ and PostgreSQL).
//! `BYOKD_BENCH_EVENTS` sets the backlog size (default 100000). Prints figures; asserts none.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use common::{TestApp, at, canonical};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const KEYS: usize = 1000;
const PROBES: usize = 200;

/// With `BYOKD_BENCH_CONTACTS=1` every tenant has a contact, so each access change also
/// queues an email that the notification loop delivers (to .eml files) while the backlog
/// drains, competing for the same two cores. Off by default: the figure is the intake's.
fn contacts() -> bool {
    std::env::var("BYOKD_BENCH_CONTACTS").is_ok_and(|v| v == "1")
}

fn events() -> usize {
    std::env::var("BYOKD_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// Alternating disabled/enabled events over KEYS keys: every event changes state and access,
/// so each writes a KEK, a tenant, an audit row and outbox rows (the heaviest path).
fn backlog_bodies(n: usize, round: &str) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let key = format!("key-{}", i % KEYS);
            let step = (i / KEYS) as i64;
            let kind = if step % 2 == 0 { "disabled" } else { "enabled" };
            canonical(&format!("{round}-{i}"), kind, &key, at(step), json!({}))
                .to_string()
                .into_bytes()
        })
        .collect()
}

async fn publish_pipelined(app: &TestApp, bodies: &[Vec<u8>]) {
    let bodies: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    app.publish_pipelined("local.bench", 1000, &bodies).await;
}

async fn seed(app: &TestApp) {
    sqlx::query(
        "INSERT INTO tenants (id, name) SELECT 't' || g, 'Tenant ' || g FROM generate_series(0, $1 - 1) g",
    )
    .bind((KEYS + PROBES) as i32)
    .execute(&app.pool)
    .await
    .unwrap();
    if contacts() {
        sqlx::query(
            "INSERT INTO tenant_contacts (tenant_id, email) SELECT 't' || g, 'ops@t' || g || '.example'
             FROM generate_series(0, $1 - 1) g",
        )
        .bind((KEYS + PROBES) as i32)
        .execute(&app.pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO keks (tenant_id, provider, key_ref, state, current_version, state_changed_at,
                           version_changed_at, expiry_changed_at)
         SELECT 't' || g, 'local', CASE WHEN g < $2 THEN 'key-' || g ELSE 'probe-' || g END,
                'enabled', '1', now(), now(), now()
         FROM generate_series(0, $1 - 1) g",
    )
    .bind((KEYS + PROBES) as i32)
    .bind(KEYS as i32)
    .execute(&app.pool)
    .await
    .unwrap();
    // The keys exist at the KMS (enabled), as they would: each event is confirmed there.
    app.create_local_keys((0..KEYS + PROBES).map(|g| {
        if g < KEYS {
            format!("key-{g}")
        } else {
            format!("probe-{g}")
        }
    }))
    .await;
}

async fn wait_count(app: &TestApp, n: i64) {
    loop {
        if app.processed().await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `disabled` for probe keys `range`, one every `gap`, and returns publish->access
/// message latencies.
async fn probe_latencies(
    app: &TestApp,
    range: std::ops::Range<usize>,
    gap: Duration,
) -> Vec<Duration> {
    let mut listener = app.access_listener().await;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let expected = range.len();
    let receiver = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while latencies.len() < expected {
                let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_secs(120), listener.next()).await
                else {
                    break;
                };
                let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
                if body["access"] != "inaccessible" {
                    continue;
                }
                let tenant = body["tenant_id"].as_str().unwrap_or_default().to_owned();
                if let Some(start) = sent.lock().await.get(&tenant) {
                    latencies.push(start.elapsed());
                }
            }
            latencies
        })
    };
    for g in range {
        let tenant = format!("t{g}");
        let body = canonical(
            &format!("probe-{g}"),
            "disabled",
            &format!("probe-{g}"),
            chrono::Utc::now(),
            json!({}),
        );
        sent.lock().await.insert(tenant, Instant::now());
        app.publish_raw(body.to_string().as_bytes()).await;
        tokio::time::sleep(gap).await;
    }
    receiver.await.unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn report(label: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    println!(
        "{label}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

async fn bare_drain(app: &TestApp, n: usize) -> Duration {
    let conn =
        lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(app.config.amqp.prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            app.config.amqp.lifecycle_queue.as_str().into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let d = consumer.next().await.unwrap().unwrap();
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let elapsed = start.elapsed();
    let _ = conn.close(200, "done".into()).await;
    elapsed
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = events();
    let mut app = TestApp::spawn().await;
    seed(&app).await;
    app.stop().await;
    println!(
        "ingest benchmark: {n} canonical events over {KEYS} keys (each changes state and access); tenant contacts: {}",
        if contacts() {
            "one each (their emails are delivered meanwhile)"
        } else {
            "none"
        }
    );

    // 1. The broker's own ceiling on this machine, now: a consumer that only acks.
    publish_pipelined(&app, &backlog_bodies(n, "bare")).await;
    let bare = bare_drain(&app, n).await;
    let bare_rate = n as f64 / bare.as_secs_f64();
    println!(
        "bare lapin consumer (ack only): {n} in {:.2} s = {bare_rate:.0} msg/s",
        bare.as_secs_f64()
    );

    // 2. byokd: the same number of events, queued before it starts, drained into committed state.
    publish_pipelined(&app, &backlog_bodies(n, "byokd")).await;
    let start = Instant::now();
    app.start().await;
    // Latency of revocations sent while the backlog drains: they queue behind it.
    let during = probe_latencies(&app, KEYS..KEYS + PROBES / 2, Duration::from_millis(10)).await;
    wait_count(&app, (n + PROBES / 2) as i64).await;
    let byokd = start.elapsed();
    let rate = (n + PROBES / 2) as f64 / byokd.as_secs_f64();
    println!(
        "byokd end to end (commit then ack): {} in {:.2} s = {rate:.0} events/s",
        n + PROBES / 2,
        byokd.as_secs_f64()
    );
    println!(
        "ratio byokd / bare = {:.2} (target >= 0.5)",
        rate / bare_rate
    );
    report(
        "disabled -> tenant.access.inaccessible, sent while the backlog drains",
        during,
    );

    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE channel = 'amqp' AND status = 'pending'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "every access message published {:.2} s after byokd started",
        start.elapsed().as_secs_f64()
    );

    // Every event also asked for its key to be confirmed at the KMS (off the consumer's
    // path); the daemon is idle once those answers are in and broadcast too.
    loop {
        let due: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM keks WHERE confirm_due_at IS NOT NULL)
                  + (SELECT count(*) FROM outbox WHERE channel = 'amqp' AND status = 'pending')",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        if due == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "every key confirmed at the KMS (with the 30 s re-check of refuted revocations) and its access broadcast {:.2} s after byokd started",
        start.elapsed().as_secs_f64()
    );

    // 3. The same latency on an idle daemon.
    let idle = probe_latencies(
        &app,
        KEYS + PROBES / 2..KEYS + PROBES,
        Duration::from_millis(20),
    )
    .await;
    report("disabled -> tenant.access.inaccessible, idle", idle);
    app.shutdown().await;
}
