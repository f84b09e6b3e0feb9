//! Faults on the real peers: the broker connection cut mid-stream, and the database gone and
//! back. Every event must be applied exactly once afterwards and nothing dead-lettered.

mod common;

use common::proxy::Proxy;
use common::{TestApp, at, wait_for};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

const KEYS: usize = 20;

/// Publishes `per_key` alternating disabled/enabled events for each key, in time order, and
/// returns (event id -> key) and the kind of the last event per key.
async fn publish_toggles(
    app: &TestApp,
    per_key: usize,
) -> (HashMap<String, String>, HashMap<String, &'static str>) {
    let mut ids = HashMap::new();
    let mut last = HashMap::new();
    for i in 0..per_key {
        for k in 0..KEYS {
            let key = format!("key-{k}");
            let kind = if i % 2 == 0 { "disabled" } else { "enabled" };
            let id = app.publish(kind, &key, at(i as i64), json!({})).await;
            ids.insert(id, key.clone());
            last.insert(key, kind);
        }
    }
    (ids, last)
}

async fn assert_exactly_once(
    app: &TestApp,
    ids: &HashMap<String, String>,
    last: &HashMap<String, &str>,
) {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT event_id, count(*) FROM audit_log WHERE source = 'event' GROUP BY event_id",
    )
    .fetch_all(&app.pool)
    .await
    .expect("audit");
    assert_eq!(rows.len(), ids.len(), "every event has an audit row");
    for (id, n) in &rows {
        assert!(ids.contains_key(id), "unexpected event {id}");
        assert_eq!(*n, 1, "event {id} applied {n} times");
    }
    for (key, kind) in last {
        let state: String = sqlx::query_scalar("SELECT state FROM keks WHERE key_ref = $1")
            .bind(key)
            .fetch_one(&app.pool)
            .await
            .expect("kek");
        assert_eq!(state, *kind, "{key} ends as its newest event says");
    }
    wait_for("queues empty", Duration::from_secs(20), || async {
        app.queue_depth(&app.config.amqp.lifecycle_queue).await == 0
    })
    .await;
    assert_eq!(
        app.queue_depth(&app.config.amqp.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_cut_mid_stream_applies_every_event_exactly_once() {
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let proxied = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let app = TestApp::spawn_with(|c| c.amqp_url = Some(proxied)).await;
    for k in 0..KEYS {
        app.tenant_with_key(&format!("t{k}"), &format!("key-{k}"))
            .await;
    }
    let per_key = 150;
    let total = (per_key * KEYS) as i64;

    // Cut the daemon's broker connections repeatedly while events drain: each cut is made
    // when some but not all events are applied, so the test does not depend on how fast
    // this machine publishes or drains (bounded: 8 cuts, 60 s).
    let pool = app.pool.clone();
    let cutter = tokio::spawn({
        let proxy_cut = std::sync::Arc::new(proxy);
        let p = proxy_cut.clone();
        async move {
            let mut mid_stream = 0;
            let started = std::time::Instant::now();
            while mid_stream < 8 && started.elapsed() < Duration::from_secs(60) {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(0);
                if n >= total {
                    break;
                }
                if n > 0 {
                    p.cut();
                    mid_stream += 1;
                    // Let the consumer reconnect and apply some more before the next cut.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (mid_stream, p)
        }
    });
    let (ids, last) = publish_toggles(&app, per_key).await;
    let (mid_stream, _proxy) = cutter.await.expect("cutter");
    app.wait_processed(total).await;
    assert!(
        mid_stream > 0,
        "at least one cut must land while events were draining"
    );
    assert_exactly_once(&app, &ids, &last).await;

    // Access messages went out for every change despite the cuts.
    wait_for(
        "access messages published",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM outbox WHERE channel = 'amqp' AND status <> 'delivered'",
            )
            .fetch_one(&app.pool)
            .await
            .is_ok_and(|n| n == 0)
        },
    )
    .await;
    app.wait_ready().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_holds_events_and_applies_them_when_it_returns() {
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let mut app = TestApp::spawn().await;
    // Restart the daemon with its database behind the proxy (the test keeps a direct pool).
    app.stop().await;
    let db_name = app.db.name.clone();
    app.config.database_url = Some(format!("postgres://postgres@{}/{db_name}", proxy.addr));
    app.start().await;
    for k in 0..KEYS {
        app.tenant_with_key(&format!("t{k}"), &format!("key-{k}"))
            .await;
    }

    proxy.set_down(true);
    let readyz = app.url("/readyz");
    let http = app.http.clone();
    let (ids, last) = publish_toggles(&app, 10).await;
    wait_for("readyz reports the outage", Duration::from_secs(20), || {
        let http = http.clone();
        let readyz = readyz.clone();
        async move {
            match http.get(&readyz).send().await {
                Ok(r) if r.status() == 503 => r.json::<serde_json::Value>().await.is_ok_and(|b| {
                    b["consumer"] == "database_unavailable" && b["database"] == "unavailable"
                }),
                _ => false,
            }
        }
    })
    .await;
    let during = app.get("/v1/tenants/t1").await;
    assert_eq!(during.status(), 503);
    assert!(
        during
            .text()
            .await
            .unwrap_or_default()
            .contains("\"error\"")
    );
    assert_eq!(app.processed().await, 0);

    // Longer than several retry rounds: nothing may be dead-lettered meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.queue_depth(&app.config.amqp.dead_letter_queue).await, 0);
    proxy.set_down(false);

    app.wait_processed(ids.len() as i64).await;
    assert_exactly_once(&app, &ids, &last).await;
    app.wait_ready().await;
    app.shutdown().await;
}
