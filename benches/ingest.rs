//! Ingest benchmark (issues 2 and 15): end-to-end throughput of canonical events through
//! RabbitMQ into committed state, beside the best bare lapin consumer in the same run; and
//! publish-to-`tenant.access.inaccessible` latency of `disabled` events, idle and while a
//! backlog drains.
//!
//! The ceiling is the best of bare consumers that do no work per message: a quorum queue like
//! byokd's, prefetch 256, 1024 and 4096, acked with `multiple=true` every 64 deliveries. It is
//! measured before and after byokd's runs, so drift on this shared machine shows. Beside it,
//! the durable floor: the cheapest consumer that keeps intake's promise of a durable dedupe
//! record per event committed before the ack (`durable_drain`), at each batch size, so the
//! share of the gap that durability alone explains is measured rather than guessed.
//!
//! byokd then drains the same number of events, queued before it starts, once per
//! configuration: batch sizes `BYOKD_BENCH_BATCHES` (default 256,1024,4096) with 200
//! tenants, and tenant counts `BYOKD_BENCH_TENANTS` (default 1,200,20000) with batch 1024.
//! Events alternate `disabled`/`enabled` per key, so every event changes its tenant's state
//! and access; with one tenant every event of a batch is about the same key. The prefetch is
//! twice the batch size, so a batch can fill. The 200-tenant, batch-1024 run also measures
//! revocations published while the backlog drains; it is repeated without them, pipelined
//! (`amqp.pipeline`) and one batch at a time.
//!
//! Run with `cargo bench --bench ingest` (needs the local RabbitMQ and PostgreSQL).
//! `BYOKD_BENCH_EVENTS` sets the backlog size (default 50000). Prints figures; asserts none.
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

const PROBES: usize = 200;
/// The bare consumer acks every this many deliveries, with `multiple=true`.
const ACK_EVERY: usize = 64;

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
        .unwrap_or(50_000)
}

fn list(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var).ok().map_or_else(
        || default.to_vec(),
        |v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
    )
}

/// Alternating disabled/enabled events over `keys` keys: every event changes state and
/// access, so each writes a KEK, a tenant, an audit row and outbox rows (the heaviest path).
/// All are dated an hour ago: the state model orders nothing by event time.
fn backlog_bodies(n: usize, keys: usize, round: &str) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let key = format!("key-{}", i % keys);
            let step = i / keys;
            let kind = if step.is_multiple_of(2) {
                "disabled"
            } else {
                "enabled"
            };
            canonical(&format!("{round}-{i}"), kind, &key, at(0), json!({}))
                .to_string()
                .into_bytes()
        })
        .collect()
}

async fn publish_pipelined(app: &TestApp, bodies: &[Vec<u8>]) {
    let bodies: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    app.publish_pipelined("local.bench", 1000, &bodies).await;
}

async fn seed(app: &TestApp, keys: usize) {
    let total = (keys + PROBES) as i32;
    sqlx::query(
        "INSERT INTO tenants (id, name) SELECT 't' || g, 'Tenant ' || g FROM generate_series(0, $1 - 1) g",
    )
    .bind(total)
    .execute(&app.pool)
    .await
    .unwrap();
    if contacts() {
        sqlx::query(
            "INSERT INTO tenant_contacts (tenant_id, email) SELECT 't' || g, 'ops@t' || g || '.example'
             FROM generate_series(0, $1 - 1) g",
        )
        .bind(total)
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
    .bind(total)
    .bind(keys as i32)
    .execute(&app.pool)
    .await
    .unwrap();
    // The keys exist at the KMS (enabled), as they would: each event is confirmed there.
    app.create_local_keys((0..keys + PROBES).map(|g| {
        if g < keys {
            format!("key-{g}")
        } else {
            format!("probe-{g}")
        }
    }))
    .await;
}

/// Waits until `n` events are in the inbox. Counting the inbox takes PostgreSQL a few ms per
/// 50k rows, CPU the daemon under test would otherwise have; so the broker is asked first
/// (a passive declare: messages not yet delivered) and the inbox counted only once the
/// queue holds nothing undelivered, when at most a prefetch is left to commit.
async fn wait_count(app: &TestApp, n: i64) {
    while app.queue_depth(&app.config.amqp.lifecycle_queue).await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// A fresh connection consuming `queue` with prefetch `prefetch` under consumer tag `tag`.
async fn subscribe(queue: &str, prefetch: u16, tag: &str) -> (lapin::Connection, lapin::Consumer) {
    let conn =
        lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, consumer)
}

/// Drains `n` messages from `queue` doing no work: prefetch `prefetch`, one `multiple=true`
/// ack every [`ACK_EVERY`] deliveries (and one for the rest).
async fn bare_drain(queue: &str, n: usize, prefetch: u16) -> Duration {
    let (conn, mut consumer) = subscribe(queue, prefetch, "bare").await;
    let start = Instant::now();
    for i in 1..=n {
        let d = consumer.next().await.unwrap().unwrap();
        if i.is_multiple_of(ACK_EVERY) || i == n {
            d.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    let elapsed = start.elapsed();
    let _ = conn.close(200, "done".into()).await;
    elapsed
}

/// Drains `n` messages from `queue` the cheapest way that keeps intake's own promise (each
/// event deduplicated by a durable record, acked only after that record commits): per batch
/// of `batch` deliveries, each body parsed for its `source` and `id` only, one `INSERT ...
/// SELECT FROM UNNEST` into a table keyed by them (its own transaction), then
/// one `multiple=true` ack. Two batches in flight (the next is received while one commits),
/// acked in order. It writes nothing else: no state, no audit row, no access message.
async fn durable_drain(app: &TestApp, n: usize, batch: usize) -> Duration {
    #[derive(serde::Deserialize)]
    struct Ids {
        source: String,
        id: String,
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS floor_inbox (source TEXT NOT NULL, id TEXT NOT NULL,
             received_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (source, id))",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let (conn, mut consumer) = subscribe(
        &app.config.amqp.lifecycle_queue,
        u16::try_from(batch * 2).unwrap_or(u16::MAX),
        "durable",
    )
    .await;
    let start = Instant::now();
    let mut in_flight: Option<tokio::task::JoinHandle<()>> = None;
    let mut received = 0;
    while received < n {
        let mut sources = Vec::with_capacity(batch);
        let mut ids = Vec::with_capacity(batch);
        let mut last = None;
        while sources.len() < batch && received < n {
            // A partial batch goes as soon as nothing more arrives for a moment.
            let next = if sources.is_empty() {
                consumer.next().await
            } else {
                match tokio::time::timeout(Duration::from_millis(5), consumer.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            };
            let d = next.unwrap().unwrap();
            let e: Ids = serde_json::from_slice(&d.data).unwrap();
            sources.push(e.source);
            ids.push(e.id);
            last = Some(d.acker);
            received += 1;
        }
        let pool = app.pool.clone();
        let previous = in_flight.take();
        in_flight = Some(tokio::spawn(async move {
            // A plain insert (speculative insertion costs about twice as much); only a batch
            // holding a copy of a recorded event, none in this backlog, goes again with
            // ON CONFLICT.
            let plain = sqlx::query(
                "INSERT INTO floor_inbox (source, id) SELECT * FROM UNNEST($1::text[], $2::text[])",
            )
            .bind(&sources)
            .bind(&ids)
            .execute(&pool)
            .await;
            if plain.is_err() {
                sqlx::query(
                    "INSERT INTO floor_inbox (source, id)
                     SELECT * FROM UNNEST($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                )
                .bind(&sources)
                .bind(&ids)
                .execute(&pool)
                .await
                .unwrap();
            }
            // Acks in delivery order: a multiple ack must not cover an uncommitted batch.
            if let Some(previous) = previous {
                previous.await.unwrap();
            }
            last.unwrap()
                .ack(BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }));
    }
    if let Some(last) = in_flight {
        last.await.unwrap();
    }
    let elapsed = start.elapsed();
    let _ = conn.close(200, "done".into()).await;
    elapsed
}

/// The best bare rate over three prefetches, each on a fresh backlog of `n` in `app`'s queue
/// (whose consumer is stopped).
async fn ceiling(app: &TestApp, n: usize, label: &str) -> f64 {
    let mut best: f64 = 0.0;
    for prefetch in [256u16, 1024, 4096] {
        publish_pipelined(
            app,
            &backlog_bodies(n, 1000, &format!("bare-{label}-{prefetch}")),
        )
        .await;
        let took = bare_drain(&app.config.amqp.lifecycle_queue, n, prefetch).await;
        let rate = n as f64 / took.as_secs_f64();
        println!(
            "  bare lapin consumer ({label}), prefetch {prefetch}, multiple ack every {ACK_EVERY}: {n} in {:.2} s = {rate:.0} msg/s",
            took.as_secs_f64()
        );
        best = best.max(rate);
    }
    best
}

/// One byokd configuration: a fresh database and queue, `keys` tenants, batch size `batch`;
/// `n` events queued before the daemon starts. Returns events/s, with the drain-time probe
/// latencies when `probes` is set.
async fn byokd_drain(n: usize, keys: usize, batch: usize, pipeline: usize, probes: bool) -> f64 {
    let mut app = TestApp::spawn_with(|c| {
        c.amqp.batch_size = batch;
        c.amqp.pipeline = pipeline;
        c.amqp.prefetch = u16::try_from(batch * 2).unwrap_or(u16::MAX);
        c.amqp.prefetch_bytes = batch * 2 * c.amqp.max_message_bytes;
    })
    .await;
    seed(&app, keys).await;
    app.stop().await;
    publish_pipelined(&app, &backlog_bodies(n, keys, "byokd")).await;
    let start = Instant::now();
    app.start().await;
    let extra = if probes { PROBES / 2 } else { 0 };
    let during = if probes {
        // Latency of revocations sent while the backlog drains: they queue behind it.
        Some(probe_latencies(&app, keys..keys + extra, Duration::from_millis(10)).await)
    } else {
        None
    };
    wait_count(&app, (n + extra) as i64).await;
    let took = start.elapsed();
    let rate = (n + extra) as f64 / took.as_secs_f64();
    println!(
        "  byokd, {keys} tenants, batch {batch}, pipeline {pipeline} (prefetch {}): {} in {:.2} s = {rate:.0} events/s",
        app.config.amqp.effective_prefetch(),
        n + extra,
        took.as_secs_f64()
    );
    if let Some(during) = during {
        report(
            "  disabled -> tenant.access.inaccessible, sent while the backlog drains",
            during,
        );
        settle(&app, start).await;
        // The same latency on an idle daemon.
        let idle =
            probe_latencies(&app, keys + extra..keys + PROBES, Duration::from_millis(20)).await;
        report("  disabled -> tenant.access.inaccessible, idle", idle);
    }
    app.shutdown().await;
    rate
}

/// Waits for every access message to be published and every key confirmed at the KMS.
async fn settle(app: &TestApp, start: Instant) {
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
        "  every access message published {:.2} s after byokd started",
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
        "  every key confirmed at the KMS (with the 30 s re-check of refuted revocations) and its access broadcast {:.2} s after byokd started",
        start.elapsed().as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = events();
    let batches = list("BYOKD_BENCH_BATCHES", &[256, 1024, 4096]);
    let tenants = list("BYOKD_BENCH_TENANTS", &[1, 200, 20_000]);
    println!(
        "ingest benchmark: {n} canonical events per run, each changing its key's state and its tenant's access; tenant contacts: {}",
        if contacts() {
            "one each (their emails are delivered meanwhile)"
        } else {
            "none"
        }
    );
    // The broker's own ceiling on this machine, now.
    let mut bare_app = TestApp::spawn().await;
    bare_app.stop().await;
    let before = ceiling(&bare_app, n, "before").await;

    let pipeline = byokd::config::AmqpSettings::default().pipeline;
    let mut results = Vec::new();
    for &batch in &batches {
        let rate = byokd_drain(n, 200, batch, pipeline, batch == 1024).await;
        results.push((200, batch, pipeline, rate));
    }
    for &keys in tenants.iter().filter(|&&t| t != 200) {
        let rate = byokd_drain(n, keys, 1024, pipeline, false).await;
        results.push((keys, 1024, pipeline, rate));
    }
    // Pipelined against one batch at a time, both without the probes that the row above
    // publishes meanwhile, back to back.
    if pipeline != 1 {
        for p in [pipeline, 1] {
            let rate = byokd_drain(n, 200, 1024, p, false).await;
            results.push((200, 1024, p, rate));
        }
    }

    let after = ceiling(&bare_app, n, "after").await;
    // The floor every design keeping a durable dedupe record per event pays.
    let mut durable = 0.0f64;
    for &batch in &batches {
        publish_pipelined(
            &bare_app,
            &backlog_bodies(n, 1000, &format!("durable-{batch}")),
        )
        .await;
        let took = durable_drain(&bare_app, n, batch).await;
        let rate = n as f64 / took.as_secs_f64();
        println!(
            "  durable bare consumer (one dedupe row per event, committed before a multiple ack), batch {batch}: {n} in {:.2} s = {rate:.0} msg/s",
            took.as_secs_f64()
        );
        durable = durable.max(rate);
    }
    bare_app.shutdown().await;
    let best = before.max(after);
    println!("ceiling: best bare consumer {best:.0} msg/s (before {before:.0}, after {after:.0})");
    println!(
        "durable floor: best durable bare consumer {durable:.0} msg/s ({:.2} of the ceiling)",
        durable / best
    );
    println!(
        "| tenants | batch | batches in flight | byokd events/s | ratio to the best bare consumer | ratio to the durable floor |"
    );
    println!("|---|---|---|---|---|---|");
    for (keys, batch, pipeline, rate) in results {
        println!(
            "| {keys} | {batch} | {pipeline} | {rate:.0} | {:.2} | {:.2} |",
            rate / best,
            rate / durable
        );
    }
}
