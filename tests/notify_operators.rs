//! Operator notifications: one `operator` row becomes an email to each operator address
//! (real SMTP, maildev) and a signed webhook to each operator webhook (a real HTTP
//! receiver), once, however often the dispatcher steps or the producer repeats itself; with
//! no operator configured the row is closed with a reason instead of lingering.
//! Every test runs on PostgreSQL and on SQLite.

mod common;

use common::Backend;
use serde_json::json;

use byokd::config::OperatorWebhook;
use byokd::notify::catalog::{Notification, ScheduleFailed};
use byokd::store::Channel;
use chrono::Utc;
use common::notify::{NotifyEnv, Receiver, SECRET, emails_to, ensure_maildev, mailbox};
use secrecy::SecretString;

fn failure() -> Notification {
    Notification::ScheduleFailed(ScheduleFailed {
        schedule: "probe".into(),
        tick: Utc::now(),
        error: "database unavailable: pool timed out".into(),
    })
}

on_both_backends!(an_operator_notification_reaches_every_operator_address_once);
async fn an_operator_notification_reaches_every_operator_address_once(backend: Backend) {
    ensure_maildev().await;
    let env = NotifyEnv::new_on(backend).await;
    let receiver = Receiver::start().await;
    let ops = mailbox("operators");
    let url = receiver.url("/ops");
    let d = env.dispatcher(|c| {
        c.platform_name = "Acme Cloud".into();
        c.operator_emails = vec![ops.clone()];
        c.operator_webhooks = vec![OperatorWebhook {
            name: "pager".into(),
            url: url.clone(),
            secret: SecretString::from(SECRET),
        }];
    });
    let now = Utc::now();
    let n = failure();
    // Produced twice (two replicas ran the same failing tick): queued once.
    for _ in 0..2 {
        env.store
            .enqueue_outbox(&n.outbox_rows(None, now))
            .await
            .expect("enqueue");
    }
    // Rows become due by the database's clock at insert, so each step reads the clock anew:
    // the first expands the operator row, the next delivers what it became.
    let mut delivered = 0;
    for _ in 0..3 {
        delivered += d.run_once(Utc::now()).await.expect("step").delivered;
    }
    assert_eq!(delivered, 2);

    let mails = emails_to(&ops).await;
    assert_eq!(mails.len(), 1);
    let subject = mails[0]["subject"].as_str().expect("subject");
    assert_eq!(subject, "Schedule probe failed");
    let text = mails[0]["text"].as_str().expect("text");
    assert!(text.contains("byokd sweep probe"), "{text}");

    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert!(common::notify::verify_signature(&got[0], SECRET));
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).expect("json");
    assert_eq!(body["type"], "operator.schedule_failed");
    assert_eq!(body["audience"], "operators");
    assert_eq!(body["data"]["schedule"], "probe");
    assert!(
        body["data"]["next_steps"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );

    let rows = env
        .sql("SELECT channel, status FROM outbox ORDER BY seq")
        .rows()
        .await;
    assert_eq!(
        rows,
        [
            [json!("operator"), json!("delivered")],
            [json!("email"), json!("delivered")],
            [json!("webhook"), json!("delivered")],
        ]
    );
    env.cleanup().await;
}

on_both_backends!(without_operators_the_row_is_closed_with_the_reason);
async fn without_operators_the_row_is_closed_with_the_reason(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    let d = env.dispatcher(|_| {});
    let now = Utc::now();
    let rows = failure().outbox_rows(None, now);
    assert_eq!(rows[0].channel, Channel::Operator);
    env.store.enqueue_outbox(&rows).await.expect("enqueue");
    let report = d.run_once(Utc::now()).await.expect("step");
    assert_eq!(report.claimed, 0);
    let log = env.attempts(rows[0].id).await;
    assert_eq!(log.len(), 1);
    assert!(
        log[0]
            .2
            .as_deref()
            .is_some_and(|d| d.contains("BYOKD_OPERATOR_EMAILS")),
        "{log:?}"
    );
    env.cleanup().await;
}
