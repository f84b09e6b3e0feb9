//! The outbox loop and retention: a slow endpoint holds only its own slots while the others
//! are delivered, the loop stops on shutdown, and pruning removes old delivered rows only.
//! Every test runs on PostgreSQL and on SQLite.

mod common;

use common::Backend;

use byokd::notify::outbox::{outbox_loop, prune};
use byokd::store::Channel;
use chrono::{Duration as Chrono, Utc};
use common::notify::{NotifyEnv, Receiver, Reply};
use std::time::Duration;

on_both_backends!(a_slow_endpoint_does_not_delay_the_others);
async fn a_slow_endpoint_does_not_delay_the_others(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let slow = Receiver::start().await;
    slow.set_default(Reply::Slow(Duration::from_secs(5)));
    let fast = Receiver::start().await;
    let eps = env
        .tenant("tmix", &[], &[slow.url("/slow"), fast.url("/fast")])
        .await;
    // The slow endpoint's rows come first, so a FIFO worker would be stuck behind them.
    for _ in 0..6 {
        env.enqueue("tmix", Channel::Webhook, &eps[0].to_string(), "key.expired")
            .await;
    }
    for _ in 0..30 {
        env.enqueue("tmix", Channel::Webhook, &eps[1].to_string(), "key.expired")
            .await;
    }
    let d = env.dispatcher(|c| {
        c.notify.max_in_flight = 8;
        c.notify.max_in_flight_per_recipient = 2;
        c.notify.poll_ms = 20;
        c.notify.webhook_timeout_ms = 10_000;
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(outbox_loop(d, stopped));

    common::wait_for(
        "the fast endpoint's 30 rows",
        Duration::from_secs(20),
        || {
            let fast = fast.clone();
            async move { fast.received().len() >= 30 }
        },
    )
    .await;
    let slow_done = env
        .sql("SELECT count(*) FROM outbox WHERE recipient = $1 AND status = 'delivered'")
        .bind(eps[0].to_string())
        .int()
        .await;
    assert_eq!(
        slow_done, 0,
        "all fast rows went out while the slow endpoint still held its first two"
    );
    assert_eq!(
        slow.received().len(),
        2,
        "at most two requests in flight to one endpoint"
    );

    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(15), worker)
        .await
        .expect("loop stops after finishing in-flight deliveries")
        .expect("loop task");
    env.cleanup().await;
}

on_both_backends!(prune_deletes_old_delivered_rows_and_keeps_dead_and_pending);
async fn prune_deletes_old_delivered_rows_and_keeps_dead_and_pending(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    env.tenant("tprune", &[], &[]).await;
    let now = Utc::now();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            env.enqueue(
                "tprune",
                Channel::Email,
                "ops@tprune.example",
                "key.expired",
            )
            .await,
        );
    }
    let e = &env;
    let set = |id: uuid::Uuid, status: &'static str, delivered_days_ago: Option<i64>| async move {
        match delivered_days_ago {
            Some(d) => {
                e.sql(
                    "UPDATE outbox SET status = $2, delivered_at = $3 WHERE CAST(id AS TEXT) = $1",
                )
                .bind(id)
                .bind(status)
                .bind(now - Chrono::days(d))
                .rows()
                .await
            }
            None => {
                e.sql(
                    "UPDATE outbox SET status = $2, delivered_at = NULL WHERE CAST(id AS TEXT) = $1",
                )
                .bind(id)
                .bind(status)
                .rows()
                .await
            }
        };
        e.sql(
            "INSERT INTO notification_attempts (outbox_id, at, outcome, duration_ms)
             SELECT id, $2, 'delivered', 1 FROM outbox WHERE CAST(id AS TEXT) = $1",
        )
        .bind(id)
        .bind(now)
        .rows()
        .await;
    };
    set(ids[0], "delivered", Some(40)).await; // old: pruned
    set(ids[1], "delivered", Some(31)).await; // old: pruned
    set(ids[2], "delivered", Some(2)).await; // recent: kept
    set(ids[3], "dead", None).await; // dead: kept however old
    env.sql("UPDATE outbox SET created_at = $1, dead_at = $1 WHERE CAST(id AS TEXT) = $2")
        .bind(now - Chrono::days(90))
        .bind(ids[3])
        .rows()
        .await;
    // ids[4] stays pending.

    let removed = prune(&env.store, now - Chrono::days(30))
        .await
        .expect("prune");
    assert_eq!(removed, 2);
    let left = env
        .sql("SELECT CAST(id AS TEXT) FROM outbox WHERE tenant_id = 'tprune' ORDER BY seq")
        .texts()
        .await;
    let expected: Vec<String> = ids[2..].iter().map(|id| id.to_string()).collect();
    assert_eq!(left, expected);
    let orphans = env
        .sql(
            "SELECT count(*) FROM notification_attempts
             WHERE CAST(outbox_id AS TEXT) IN ($1, $2)",
        )
        .bind(ids[0])
        .bind(ids[1])
        .int()
        .await;
    assert_eq!(orphans, 0, "attempt logs go with their rows");
    assert_eq!(
        prune(&env.store, now - Chrono::days(30))
            .await
            .expect("prune"),
        0
    );
    env.cleanup().await;
}
