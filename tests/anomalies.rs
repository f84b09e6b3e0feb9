//! Key-access anomaly rules over real attempts: refused attempts on a tenant and an unknown
//! token used repeatedly raise one alert each (`GET /v1/alerts`), once per rule, subject and
//! window however often the scan runs, and reach the operators through the real SMTP server
//! (maildev) and a real webhook receiver, signed.

mod common;

use byokd::config::OperatorWebhook;
use byokd::sweeps::anomaly::{AnomalyRules, anomaly_scan};
use common::notify::{Receiver, SECRET, emails_to, ensure_maildev, mailbox, maildev_smtp};
use common::{TestApp, wait_for};
use secrecy::SecretString;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_bad_tokens_alert_the_operators_once_per_window() {
    ensure_maildev().await;
    let receiver = Receiver::start().await;
    let ops = mailbox("anomaly-ops");
    let (ops_mail, hook) = (ops.clone(), receiver.url("/ops"));
    let app = TestApp::spawn_with(move |c| {
        c.smtp_url = Some(SecretString::from(format!("smtp://{}", maildev_smtp())));
        c.mail_from = "byokd@platform.example".into();
        c.webhook_allow_cidrs = Some("127.0.0.0/8".into());
        c.operator_emails = vec![ops_mail];
        c.operator_webhooks = vec![OperatorWebhook {
            name: "siem".into(),
            url: hook,
            secret: SecretString::from(SECRET),
        }];
    })
    .await;
    app.tenant_with_key("an1", "key-an1").await;
    app.tenant_with_key("an2", "key-an2").await;
    let r = app
        .post(
            "/v1/clients",
            json!({ "name": "svc-an", "tenants": ["an1"] }),
        )
        .await;
    let token = r.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    // 25 attempts on a tenant out of the client's scope, 12 uses of a token nobody has.
    for _ in 0..25 {
        let r = app
            .http
            .post(app.url("/v1/tenants/an2/deks"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 403);
    }
    for _ in 0..12 {
        let r = app
            .http
            .post(app.url("/v1/tenants/an1/deks"))
            .bearer_auth("byokd_ct_stolen-or-guessed")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 401);
    }
    // A few allowed attempts stay far below any rate threshold.
    let r = app
        .http
        .post(app.url("/v1/tenants/an1/deks"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 201);

    // The scan reads the audit trail, which the attempts reach through the spool.
    app.audit_shipped().await;
    let store = byokd::store::Store::connect(&app.db.url, 2)
        .await
        .expect("store");
    let rules = AnomalyRules::default();
    let now = chrono::Utc::now() + chrono::Duration::seconds(1);
    let first = anomaly_scan(&store, &rules, now).await.expect("scan");
    assert_eq!((first.fired, first.raised), (2, 2), "{first:?}");
    // The same anomaly seen again in the same alert window raises nothing new.
    let again = anomaly_scan(&store, &rules, now + chrono::Duration::seconds(5))
        .await
        .expect("scan");
    assert_eq!((again.fired, again.raised), (2, 0), "{again:?}");

    let alerts: Value = app.get("/v1/alerts").await.json().await.expect("json");
    let mut rules_seen: Vec<(String, String)> = alerts["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .map(|a| {
            (
                a["rule"].as_str().unwrap_or("").to_owned(),
                a["subject"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    rules_seen.sort();
    assert_eq!(rules_seen[0].0, "bad_token");
    assert_eq!(
        rules_seen[1],
        ("tenant_refusals".to_owned(), "an2".to_owned())
    );

    // The operators hear of each once, by email and by signed webhook.
    wait_for("operator emails", Duration::from_secs(20), || async {
        emails_to(&ops).await.len() >= 2
    })
    .await;
    wait_for("operator webhooks", Duration::from_secs(20), || async {
        receiver.received().len() >= 2
    })
    .await;
    let mails = emails_to(&ops).await;
    assert_eq!(mails.len(), 2);
    assert!(mails.iter().any(|m| {
        m["subject"]
            .as_str()
            .is_some_and(|s| s.contains("tenant_refusals for an2"))
    }));
    for got in receiver.received() {
        assert!(common::notify::verify_signature(&got, SECRET));
        let body: Value = serde_json::from_slice(&got.body).expect("json");
        assert_eq!(body["type"], "operator.access_anomaly");
    }
    app.shutdown().await;
}
