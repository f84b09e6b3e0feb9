//! Notifications through the whole daemon: a lifecycle event published twice becomes exactly
//! one email (maildev) and one signed webhook (a real receiver) per recipient, visible at
//! `GET /v1/notifications`; a dead notification is sent again by
//! `POST /v1/notifications/{id}/retry`. Every test runs on PostgreSQL and on SQLite.

mod common;

use common::notify::{Receiver, Reply, SECRET, emails_to, ensure_maildev, mailbox, maildev_smtp};
use common::{Backend, TestApp, at, wait_for};
use secrecy::SecretString;
use serde_json::{Value, json};
use std::time::Duration;

async fn spawn(backend: Backend, tweak: impl FnOnce(&mut byokd::config::Config)) -> TestApp {
    ensure_maildev().await;
    TestApp::spawn_on_with(backend, |c| {
        c.smtp_url = Some(SecretString::from(format!("smtp://{}", maildev_smtp())));
        c.mail_from = "byokd@platform.example".into();
        c.webhook_allow_cidrs = Some("127.0.0.0/8".into());
        c.notify.poll_ms = 50;
        c.notify.webhook_timeout_ms = 2_000;
        tweak(c);
    })
    .await
}

async fn tenant(app: &TestApp, id: &str, contact: &str, hook: &str) {
    let r = app
        .post(
            "/v1/tenants",
            json!({ "id": id, "name": format!("Tenant {id}"), "contacts": [contact],
                    "webhooks": [{ "url": hook, "secret": SECRET }] }),
        )
        .await;
    assert_eq!(r.status(), 201);
    app.create_local_key(&format!("key-{id}")).await;
    let r = app
        .post(
            &format!("/v1/tenants/{id}/keks"),
            json!({ "provider": "local", "key_ref": format!("key-{id}") }),
        )
        .await;
    assert_eq!(r.status(), 201);
}

async fn notifications(app: &TestApp, tenant: &str) -> Vec<Value> {
    let r = app.get(&format!("/v1/notifications?tenant={tenant}")).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    body["notifications"].as_array().expect("array").clone()
}

on_both_backends!(an_event_becomes_one_email_and_one_signed_webhook);
async fn an_event_becomes_one_email_and_one_signed_webhook(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let rx = Receiver::start().await;
    let contact = mailbox("e2e");
    tenant(&app, "e2e", &contact, &rx.url("/byok")).await;
    // The same event delivered twice (a broker redelivery): one notification per recipient.
    let id = uuid::Uuid::new_v4().to_string();
    app.publish_with_id(&id, "disabled", "key-e2e", at(1), json!({}))
        .await;
    app.publish_with_id(&id, "disabled", "key-e2e", at(1), json!({}))
        .await;
    app.wait_processed(1).await;

    wait_for(
        "email and webhook delivered",
        Duration::from_secs(30),
        || {
            let app = &app;
            async move {
                notifications(app, "e2e")
                    .await
                    .iter()
                    .filter(|n| n["channel"] != "amqp")
                    .all(|n| n["status"] == "delivered")
            }
        },
    )
    .await;
    let rows = notifications(&app, "e2e").await;
    let tenant_rows: Vec<&Value> = rows.iter().filter(|n| n["channel"] != "amqp").collect();
    assert_eq!(tenant_rows.len(), 2, "{rows:?}");
    for n in &tenant_rows {
        assert_eq!(n["kind"], "tenant.inaccessible");
        assert_eq!(n["attempts"], 1);
        assert_eq!(n["attempt_log"][0]["outcome"], "delivered");
    }

    let mails = emails_to(&contact).await;
    assert_eq!(mails.len(), 1, "exactly one email");
    assert!(
        mails[0]["subject"]
            .as_str()
            .expect("subject")
            .contains("e2e")
    );
    let hooks = rx.received();
    assert_eq!(hooks.len(), 1, "exactly one webhook");
    common::notify::verify_with_python(&hooks[0], SECRET).expect("verifies");
    let body: Value = serde_json::from_slice(&hooks[0].body).expect("json");
    assert_eq!(body["type"], "tenant.inaccessible");
    assert_eq!(body["data"]["key_ref"], "key-e2e");
    let webhook_row = tenant_rows
        .iter()
        .find(|n| n["channel"] == "webhook")
        .expect("row");
    assert_eq!(webhook_row["id"], hooks[0].header("webhook-id"));
    app.shutdown().await;
}

on_both_backends!(a_dead_notification_can_be_sent_again);
async fn a_dead_notification_can_be_sent_again(backend: Backend) {
    // No retries: the first failure is final.
    let app = spawn(backend, |c| c.notify.retry_schedule_secs = vec![]).await;
    let rx = Receiver::start().await;
    rx.script([Reply::Status(500)]);
    tenant(&app, "redo", &mailbox("redo"), &rx.url("/byok")).await;
    app.publish("disabled", "key-redo", at(1), json!({})).await;
    app.wait_processed(1).await;

    let webhook = |rows: Vec<Value>| rows.into_iter().find(|n| n["channel"] == "webhook");
    wait_for("webhook dead", Duration::from_secs(30), || {
        let app = &app;
        async move { webhook(notifications(app, "redo").await).is_some_and(|n| n["status"] == "dead") }
    })
    .await;
    let dead = webhook(notifications(&app, "redo").await).expect("row");
    assert!(dead["last_error"].as_str().expect("error").contains("500"));
    let id = dead["id"].as_str().expect("id").to_owned();

    let r = app
        .post(&format!("/v1/notifications/{id}/retry"), json!({}))
        .await;
    assert_eq!(r.status(), 202);
    wait_for(
        "webhook delivered on retry",
        Duration::from_secs(30),
        || {
            let app = &app;
            async move {
                webhook(notifications(app, "redo").await)
                    .is_some_and(|n| n["status"] == "delivered")
            }
        },
    )
    .await;
    let row = webhook(notifications(&app, "redo").await).expect("row");
    let outcomes: Vec<(&str, i64)> = row["attempt_log"]
        .as_array()
        .expect("log")
        .iter()
        .map(|a| {
            (
                a["outcome"].as_str().unwrap_or(""),
                a["status_code"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(outcomes, [("dead", 500), ("delivered", 200)]);
    let ids: Vec<String> = rx
        .received()
        .iter()
        .map(|r| r.header("webhook-id"))
        .collect();
    assert_eq!(
        ids,
        [id.clone(), id.clone()],
        "the same webhook-id on the manual retry"
    );

    // Delivered rows are not sent twice; unknown ids and tenants are 404; no token is 401.
    let r = app
        .post(&format!("/v1/notifications/{id}/retry"), json!({}))
        .await;
    assert_eq!(r.status(), 409);
    let r = app
        .post(
            &format!("/v1/notifications/{}/retry", uuid::Uuid::new_v4()),
            json!({}),
        )
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        app.get("/v1/notifications?tenant=nobody").await.status(),
        404
    );
    assert_eq!(app.get("/v1/notifications").await.status(), 400);
    let anon = app
        .http
        .get(app.url("/v1/notifications?tenant=redo"))
        .send()
        .await
        .expect("request");
    assert_eq!(anon.status(), 401);
    app.shutdown().await;
}
