//! Webhook delivery against a real HTTP receiver: Standard Webhooks signatures (checked here
//! and by the `standardwebhooks` Python package), retries on the schedule, timeouts, 410,
//! Retry-After, redirects, an endless error body, the SSRF guard, a crash mid-delivery, concurrent replicas, and
//! auto-disabling an endpoint that keeps failing. The dispatcher is driven step by step with
//! injected time; nothing sleeps to assert.
//! Every test runs on PostgreSQL and on SQLite.

mod common;

use common::Backend;
use serde_json::json;

use byokd::store::Channel;
use byokd::store::outbox::ClaimRequest;
use chrono::{Duration as Chrono, Utc};
use common::http_fault::{ENDLESS_CAP, Responder};
use common::notify::{NotifyEnv, Receiver, Reply, SECRET, verify_signature, verify_with_python};
use std::collections::HashSet;
use std::time::Duration;

const KINDS: [&str; 6] = [
    "tenant.inaccessible",
    "tenant.restored",
    "key.expired",
    "key.expiring",
    "key.rotated",
    "key.unreachable",
];

on_both_backends!(signed_deliveries_verify_with_both_verifiers);
async fn signed_deliveries_verify_with_both_verifiers(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    let ep = env.tenant("acme", &[], &[rx.url("/hooks/byok")]).await[0];
    let mut ids = Vec::new();
    for kind in KINDS {
        ids.push(
            env.enqueue("acme", Channel::Webhook, &ep.to_string(), kind)
                .await,
        );
    }
    // Four in flight per endpoint: a step takes four, the next the rest.
    let d = env.dispatcher(|_| {});
    let now = Utc::now();
    let first = d.run_once(now).await.expect("step");
    assert_eq!(first.delivered, 4, "{first:?}");
    let second = d.run_once(now).await.expect("step");
    assert_eq!(second.delivered, KINDS.len() - 4, "{second:?}");

    let got = rx.received();
    assert_eq!(got.len(), KINDS.len());
    for r in &got {
        assert_eq!(r.path, "/hooks/byok");
        assert_eq!(r.header("content-type"), "application/json");
        assert!(verify_signature(r, SECRET), "own verifier");
        verify_with_python(r, SECRET).expect("standardwebhooks verifies");
        // A wrong secret must fail in the third-party verifier too (the check can fail).
        assert!(verify_with_python(r, "whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").is_err());
        let id: uuid::Uuid = r
            .header("webhook-id")
            .parse()
            .expect("webhook-id is the row id");
        assert!(ids.contains(&id));
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        let ts: i64 = r.header("webhook-timestamp").parse().expect("unix seconds");
        assert!((Utc::now().timestamp() - ts).abs() < 60);
        assert_eq!(body["data"]["tenant_id"], "acme");
        assert!(KINDS.contains(&body["type"].as_str().expect("type")));
    }
    // The secret is nowhere in plaintext: not in the endpoint row, not in any log line.
    let sealed = env
        .sql("SELECT secret_sealed FROM webhook_endpoints")
        .bytes()
        .await;
    let raw = SECRET.strip_prefix("whsec_").expect("prefix").as_bytes();
    assert!(!sealed.windows(raw.len()).any(|w| w == raw));
    let texts = env
        .sql("SELECT detail FROM notification_attempts UNION ALL SELECT last_error FROM outbox")
        .rows()
        .await;
    assert!(
        texts
            .iter()
            .filter_map(|t| t[0].as_str())
            .all(|t| !t.contains(&SECRET[6..]))
    );
    for id in ids {
        assert_eq!(env.row(id).await.status, "delivered");
        let log = env.attempts(id).await;
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].0, "delivered");
        assert_eq!(log[0].1, Some(200));
    }
    env.cleanup().await;
}

on_both_backends!(server_errors_retry_on_the_schedule_with_the_same_webhook_id);
async fn server_errors_retry_on_the_schedule_with_the_same_webhook_id(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.script([Reply::Status(500), Reply::Status(500)]);
    let ep = env.tenant("t500", &[], &[rx.url("/h")]).await[0];
    let id = env
        .enqueue("t500", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    let d = env.dispatcher(|_| {});
    let t0 = Utc::now();

    assert_eq!(d.run_once(t0).await.expect("step").retried, 1);
    let row = env.row(id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("pending", 1));
    let wait = row.next_attempt_at - t0;
    assert!(
        wait >= Chrono::seconds(4) && wait <= Chrono::seconds(6),
        "{wait:?}"
    );
    // Not due yet: nothing is claimed.
    assert_eq!(
        d.run_once(t0 + Chrono::seconds(1))
            .await
            .expect("step")
            .claimed,
        0
    );

    let t1 = t0 + Chrono::seconds(10);
    assert_eq!(d.run_once(t1).await.expect("step").retried, 1);
    let wait = env.row(id).await.next_attempt_at - t1;
    assert!(
        wait >= Chrono::seconds(240) && wait <= Chrono::seconds(360),
        "{wait:?}"
    );

    assert_eq!(
        d.run_once(t1 + Chrono::hours(1))
            .await
            .expect("step")
            .delivered,
        1
    );
    let got = rx.received();
    assert_eq!(got.len(), 3);
    let ids: HashSet<String> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids, HashSet::from([id.to_string()]));
    let log = env.attempts(id).await;
    let outcomes: Vec<(&str, Option<i32>)> = log.iter().map(|a| (a.0.as_str(), a.1)).collect();
    assert_eq!(
        outcomes,
        [
            ("retry", Some(500)),
            ("retry", Some(500)),
            ("delivered", Some(200))
        ]
    );
    env.cleanup().await;
}

on_both_backends!(exhausted_schedule_marks_dead);
async fn exhausted_schedule_marks_dead(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(503));
    let ep = env.tenant("tex", &[], &[rx.url("/h")]).await[0];
    let id = env
        .enqueue("tex", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    let d = env.dispatcher(|c| c.notify.retry_schedule_secs = vec![1, 1]);
    let t = Utc::now();
    for step in 0..3 {
        d.run_once(t + Chrono::seconds(10 * step))
            .await
            .expect("step");
    }
    let row = env.row(id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("dead", 3));
    assert!(row.last_error.expect("error").contains("503"));
    assert_eq!(
        d.run_once(t + Chrono::days(1)).await.expect("step").claimed,
        0
    );
    env.cleanup().await;
}

on_both_backends!(slow_endpoint_times_out_and_is_retried);
async fn slow_endpoint_times_out_and_is_retried(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.script([Reply::Slow(Duration::from_secs(5))]);
    let ep = env.tenant("tslow", &[], &[rx.url("/h")]).await[0];
    let id = env
        .enqueue("tslow", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    let d = env.dispatcher(|c| c.notify.webhook_timeout_ms = 300);
    let started = std::time::Instant::now();
    assert_eq!(d.run_once(Utc::now()).await.expect("step").retried, 1);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout bounded the attempt"
    );
    let log = env.attempts(id).await;
    assert_eq!(log[0].0, "retry");
    assert!(
        log[0]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("no answer within"),
        "{log:?}"
    );
    env.cleanup().await;
}

// An endpoint answering 500 with a body that never ends: byokd reads a bounded prefix, hangs
// up, and logs the start of the body marked as cut, long before the request timeout.
on_both_backends!(an_endless_error_body_is_cut_short_and_logged_truncated);
async fn an_endless_error_body_is_cut_short_and_logged_truncated(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let endpoint = Responder::endless("500 Internal Server Error").await;
    let ep = env
        .tenant("tendless", &[], &[format!("{}/h", endpoint.url())])
        .await[0];
    let id = env
        .enqueue("tendless", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    // The timeout is far off: only reading a bounded prefix can end the attempt promptly.
    let d = env.dispatcher(|c| c.notify.webhook_timeout_ms = 60_000);
    let started = std::time::Instant::now();
    assert_eq!(d.run_once(Utc::now()).await.expect("step").retried, 1);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the attempt took {took:?}");

    let log = env.attempts(id).await;
    assert_eq!((log[0].0.as_str(), log[0].1), ("retry", Some(500)));
    let expected = format!("endpoint answered HTTP 500: {}…", "x".repeat(200));
    assert_eq!(log[0].2.as_deref(), Some(expected.as_str()));
    assert_eq!(
        env.row(id).await.last_error.as_deref(),
        Some(expected.as_str())
    );
    // byokd hung up: the endpoint's answer ended long before its body did.
    common::wait_for(
        "the endpoint sees byokd hang up",
        Duration::from_secs(10),
        || {
            let ended = endpoint.answered() == 1;
            async move { ended }
        },
    )
    .await;
    assert!(
        endpoint.streamed() < ENDLESS_CAP / 16,
        "{} bytes streamed before byokd hung up",
        endpoint.streamed()
    );
    env.cleanup().await;
}

on_both_backends!(gone_disables_the_endpoint_and_emails_the_contacts);
async fn gone_disables_the_endpoint_and_emails_the_contacts(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.script([Reply::Status(410)]);
    let contact = common::notify::mailbox("gone");
    let ep = env
        .tenant("tgone", std::slice::from_ref(&contact), &[rx.url("/h")])
        .await[0];
    let first = env
        .enqueue("tgone", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    let second = env
        .enqueue(
            "tgone",
            Channel::Webhook,
            &ep.to_string(),
            "tenant.restored",
        )
        .await;
    let d = env.dispatcher(|c| c.notify.max_in_flight_per_recipient = 1);
    d.run_once(Utc::now()).await.expect("step");
    assert_eq!(env.row(first).await.status, "dead");
    let endpoint = &env
        .sql(
            "SELECT CASE WHEN enabled THEN 1 ELSE 0 END, disabled_reason FROM webhook_endpoints
             WHERE CAST(id AS TEXT) = $1",
        )
        .bind(ep)
        .rows()
        .await[0];
    assert_eq!(endpoint[0], 0, "disabled");
    assert!(endpoint[1].as_str().expect("reason").contains("410"));
    let notices = env
        .sql("SELECT recipient, kind FROM outbox WHERE channel = 'email' AND tenant_id = 'tgone'")
        .rows()
        .await;
    assert_eq!(notices, [[json!(contact), json!("endpoint.disabled")]]);
    // The next notification for the endpoint is not sent at all.
    d.run_once(Utc::now()).await.expect("step");
    let row = env.row(second).await;
    assert_eq!(row.status, "dead");
    assert!(row.last_error.expect("error").contains("disabled"));
    assert_eq!(rx.received().len(), 1);
    env.cleanup().await;
}

on_both_backends!(retry_after_is_honoured);
async fn retry_after_is_honoured(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.script([
        Reply::StatusWith(503, vec![("retry-after", "120".into())]),
        Reply::StatusWith(429, vec![("retry-after", "900".into())]),
    ]);
    let ep = env.tenant("tra", &[], &[rx.url("/h")]).await[0];
    let id = env
        .enqueue("tra", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    let d = env.dispatcher(|c| c.notify.retry_jitter = 0.0);
    let t0 = Utc::now();
    // Stored with microsecond precision.
    let close = |d: Chrono, secs: i64| (d - Chrono::seconds(secs)).abs() < Chrono::milliseconds(1);
    d.run_once(t0).await.expect("step");
    let wait = env.row(id).await.next_attempt_at - t0;
    assert!(close(wait, 120), "{wait:?}");
    let t1 = t0 + Chrono::seconds(120);
    d.run_once(t1).await.expect("step");
    // 900 s asked, longer than the 300 s the schedule would wait.
    let wait = env.row(id).await.next_attempt_at - t1;
    assert!(close(wait, 900), "{wait:?}");
    env.cleanup().await;
}

on_both_backends!(redirects_are_not_followed);
async fn redirects_are_not_followed(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.script([Reply::StatusWith(
        307,
        vec![("location", rx.url("/elsewhere"))],
    )]);
    let ep = env.tenant("tredir", &[], &[rx.url("/h")]).await[0];
    let id = env
        .enqueue("tredir", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    env.dispatcher(|_| {})
        .run_once(Utc::now())
        .await
        .expect("step");
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/h");
    let row = env.row(id).await;
    assert_eq!(row.status, "pending");
    assert!(row.last_error.expect("error").contains("redirect"));
    assert_eq!(env.attempts(id).await[0].1, Some(307));
    env.cleanup().await;
}

on_both_backends!(internal_addresses_are_refused_before_connecting);
async fn internal_addresses_are_refused_before_connecting(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    let port = rx.addr.port();
    // 10.0.0.1 and 169.254.169.254 must never see traffic: the guard refuses them before
    // any socket is opened, which the error kind proves (a connection attempt to an
    // unroutable address would time out or fail to connect instead).
    let urls = [
        format!("http://127.0.0.1:{port}/h"),
        format!("http://localhost:{port}/h"),
        "http://10.0.0.1/h".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://[::ffff:127.0.0.1]:{port}/h"),
    ];
    let eps = env.tenant("tssrf", &[], &urls).await;
    let mut ids = Vec::new();
    for ep in &eps {
        ids.push(
            env.enqueue("tssrf", Channel::Webhook, &ep.to_string(), "key.expired")
                .await,
        );
    }
    // No allowlist: the production default.
    let d = env.dispatcher(|c| c.webhook_allow_cidrs = None);
    let started = std::time::Instant::now();
    let report = d.run_once(Utc::now()).await.expect("step");
    assert_eq!(report.dead, urls.len(), "{report:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no connect timeout was waited for"
    );
    for (id, url) in ids.iter().zip(&urls) {
        let log = env.attempts(*id).await;
        assert_eq!(log.len(), 1, "{url}");
        let detail = log[0].2.clone().unwrap_or_default();
        assert!(
            detail.starts_with("refused before connecting"),
            "{url}: {detail}"
        );
        assert_eq!(log[0].1, None, "{url}: no HTTP status, no request");
    }
    assert!(
        rx.received().is_empty(),
        "the receiver on loopback saw nothing"
    );
    env.cleanup().await;
}

on_both_backends!(a_crash_mid_delivery_is_redelivered_after_the_lease_expires);
async fn a_crash_mid_delivery_is_redelivered_after_the_lease_expires(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.script([Reply::Slow(Duration::from_secs(60))]);
    let ep = env.tenant("tcrash", &[], &[rx.url("/h")]).await[0];
    let id = env
        .enqueue("tcrash", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    let d = env.dispatcher(|c| c.notify.webhook_timeout_ms = 120_000);
    let t0 = Utc::now();
    let worker = {
        let d = d.clone();
        tokio::spawn(async move { d.run_once(t0).await })
    };
    common::wait_for(
        "the request reached the receiver",
        Duration::from_secs(10),
        || {
            let rx = rx.clone();
            async move { !rx.received().is_empty() }
        },
    )
    .await;
    // The worker dies mid-delivery (its tasks are dropped with it).
    worker.abort();
    let _ = worker.await;

    // A second worker (fresh process, same database) does not take the leased row...
    let restarted = env.dispatcher(|_| {});
    assert_eq!(
        restarted
            .run_once(t0 + Chrono::seconds(5))
            .await
            .expect("step")
            .claimed,
        0
    );
    // ...until the lease (30 s in tests) has expired; then it delivers it.
    let report = restarted
        .run_once(t0 + Chrono::seconds(31))
        .await
        .expect("step");
    assert_eq!(report.delivered, 1, "{report:?}");
    assert_eq!(env.row(id).await.status, "delivered");
    let got = rx.received();
    assert_eq!(got.len(), 2, "delivered at least once more");
    // The receiver dedupes by webhook-id: both requests are one message.
    let unique: HashSet<String> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(unique, HashSet::from([id.to_string()]));
    env.cleanup().await;
}

on_both_backends!(a_stale_lease_cannot_overwrite_the_new_owner);
async fn a_stale_lease_cannot_overwrite_the_new_owner(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    let ep = env.tenant("tlease", &[], &[rx.url("/h")]).await[0];
    let id = env
        .enqueue("tlease", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    let t0 = Utc::now();
    let claim = |now| ClaimRequest {
        now,
        limit: 10,
        lease_until: now + Chrono::seconds(30),
        busy: &[],
        per_recipient: 4,
    };
    let first = env
        .store
        .claim_notifications(&claim(t0))
        .await
        .expect("claim");
    assert_eq!(first.len(), 1);
    assert!(
        env.store
            .claim_notifications(&claim(t0))
            .await
            .expect("claim")
            .is_empty()
    );
    // A manual retry does not steal a row from the worker delivering it.
    assert!(matches!(
        env.store.retry_notification(id, t0).await,
        Err(byokd::store::StoreError::Conflict(_))
    ));
    let second = env
        .store
        .claim_notifications(&claim(t0 + Chrono::seconds(31)))
        .await
        .expect("claim");
    assert_eq!(second.len(), 1);
    let record = byokd::store::outbox::AttemptRecord {
        at: t0,
        resolution: byokd::store::outbox::Resolution::Dead,
        status_code: None,
        detail: Some("late".into()),
        duration_ms: 1,
    };
    assert!(
        !env.store
            .record_attempt(id, first[0].lease_id, &record)
            .await
            .expect("record")
    );
    assert_eq!(env.row(id).await.status, "pending");
    env.cleanup().await;
}

on_both_backends!(concurrent_replicas_deliver_each_row_once);
async fn concurrent_replicas_deliver_each_row_once(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    let eps = env
        .tenant("trep", &[], &[rx.url("/a"), rx.url("/b"), rx.url("/c")])
        .await;
    let mut ids = HashSet::new();
    for i in 0..60 {
        let ep = eps[i % eps.len()].to_string();
        ids.insert(
            env.enqueue("trep", Channel::Webhook, &ep, "key.expired")
                .await
                .to_string(),
        );
    }
    let replicas: Vec<_> = (0..3).map(|_| env.dispatcher(|_| {})).collect();
    let now = Utc::now();
    for _ in 0..10 {
        let steps = replicas.iter().map(|d| d.run_once(now));
        for r in futures_util::future::join_all(steps).await {
            r.expect("step");
        }
    }
    let got: Vec<String> = rx
        .received()
        .iter()
        .map(|r| r.header("webhook-id"))
        .collect();
    assert_eq!(got.len(), 60, "no duplicates, none missing");
    assert_eq!(got.into_iter().collect::<HashSet<_>>(), ids);
    env.cleanup().await;
}

on_both_backends!(an_endpoint_failing_for_the_configured_period_is_disabled);
async fn an_endpoint_failing_for_the_configured_period_is_disabled(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.set_default(Reply::Status(500));
    let contact = common::notify::mailbox("failing");
    let ep = env
        .tenant("tfail", std::slice::from_ref(&contact), &[rx.url("/h")])
        .await[0];
    env.enqueue("tfail", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    let d = env.dispatcher(|c| c.notify.disable_endpoint_after_secs = 3600);
    let t0 = Utc::now();
    d.run_once(t0).await.expect("step");
    let enabled = || async {
        env.sql(
            "SELECT CASE WHEN enabled THEN 1 ELSE 0 END FROM webhook_endpoints
             WHERE CAST(id AS TEXT) = $1",
        )
        .bind(ep)
        .int()
        .await
            == 1
    };
    assert!(enabled().await, "one failure does not disable");
    d.run_once(t0 + Chrono::minutes(30)).await.expect("step");
    assert!(enabled().await, "failing for 30 min of a 60 min period");
    d.run_once(t0 + Chrono::minutes(70)).await.expect("step");
    assert!(!enabled().await, "failing for 70 min");
    let notices = env
        .sql("SELECT count(*) FROM outbox WHERE kind = 'endpoint.disabled' AND recipient = $1")
        .bind(&contact)
        .int()
        .await;
    assert_eq!(notices, 1);
    env.cleanup().await;
}

on_both_backends!(a_success_resets_the_failure_clock);
async fn a_success_resets_the_failure_clock(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    rx.script([Reply::Status(500), Reply::Status(200), Reply::Status(500)]);
    let ep = env.tenant("treset", &[], &[rx.url("/h")]).await[0];
    let d = env.dispatcher(|c| {
        c.notify.disable_endpoint_after_secs = 3600;
        c.notify.max_in_flight_per_recipient = 1;
    });
    let t0 = Utc::now();
    env.enqueue("treset", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    d.run_once(t0).await.expect("step"); // 500
    d.run_once(t0 + Chrono::minutes(50)).await.expect("step"); // 200
    env.enqueue(
        "treset",
        Channel::Webhook,
        &ep.to_string(),
        "tenant.restored",
    )
    .await;
    d.run_once(t0 + Chrono::minutes(70)).await.expect("step"); // 500, clock restarts
    let enabled = env
        .sql(
            "SELECT CASE WHEN enabled THEN 1 ELSE 0 END FROM webhook_endpoints
             WHERE CAST(id AS TEXT) = $1",
        )
        .bind(ep)
        .int()
        .await;
    assert_eq!(enabled, 1);
    env.cleanup().await;
}

on_both_backends!(while_a_secret_rotates_requests_carry_both_signatures_until_the_grace_ends);
async fn while_a_secret_rotates_requests_carry_both_signatures_until_the_grace_ends(
    backend: Backend,
) {
    const NEW: &str = "whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=";
    let env = NotifyEnv::new_on(backend).await;
    let rx = Receiver::start().await;
    let ep = env.tenant("rot", &[], &[rx.url("/h")]).await[0];
    let t0 = Utc::now();
    env.store
        .rotate_webhook_secret(
            "rot",
            ep,
            &env.sealer.seal(&secrecy::SecretString::from(NEW)),
            t0 + Chrono::hours(24),
        )
        .await
        .expect("rotate");
    assert!(
        env.store
            .rotate_webhook_secret("other", ep, &[], t0)
            .await
            .is_err(),
        "another tenant's endpoint is not found"
    );
    let d = env.dispatcher(|_| {});
    env.enqueue("rot", Channel::Webhook, &ep.to_string(), "key.rotated")
        .await;
    assert_eq!(
        d.run_once(Utc::now()).await.expect("step").delivered,
        1,
        "due from its creation"
    );
    // After the grace period only the new secret signs.
    env.enqueue("rot", Channel::Webhook, &ep.to_string(), "key.expired")
        .await;
    assert_eq!(
        d.run_once(t0 + Chrono::hours(25))
            .await
            .expect("step")
            .delivered,
        1
    );
    let got = rx.received();
    assert_eq!(got.len(), 2);
    let during = &got[0];
    assert_eq!(during.header("webhook-signature").split(' ').count(), 2);
    for secret in [SECRET, NEW] {
        assert!(verify_signature(during, secret), "own verifier, {secret}");
        verify_with_python(during, secret).expect("standardwebhooks verifies either secret");
    }
    let after = &got[1];
    assert_eq!(after.header("webhook-signature").split(' ').count(), 1);
    assert!(verify_signature(after, NEW));
    assert!(
        !verify_signature(after, SECRET),
        "the old secret no longer signs"
    );
    env.cleanup().await;
}
