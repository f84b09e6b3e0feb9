//! Every event kind through the real broker into committed state: transitions, derived
//! access, the `byok.access` message, outbox rows and the audit trail; duplicates,
//! out-of-order delivery and unknown keys. Every test runs on PostgreSQL and on SQLite.

mod common;

use common::{Backend, TestApp, at, next_json};
use serde_json::{Value, json};
use std::time::Duration;

struct Case {
    name: &'static str,
    events: Vec<(&'static str, Value)>,
    state: &'static str,
    access: &'static str,
    /// Access messages expected on byok.access, in order.
    messages: Vec<&'static str>,
}

fn cases() -> Vec<Case> {
    let future = (chrono::Utc::now() + chrono::Duration::days(90)).to_rfc3339();
    vec![
        Case {
            name: "disabled",
            events: vec![("disabled", json!({}))],
            state: "disabled",
            access: "inaccessible",
            messages: vec!["inaccessible"],
        },
        Case {
            name: "reenabled",
            events: vec![("disabled", json!({})), ("enabled", json!({}))],
            state: "enabled",
            access: "accessible",
            messages: vec!["inaccessible", "accessible"],
        },
        Case {
            name: "pending",
            events: vec![("deletion_scheduled", json!({}))],
            state: "pending_deletion",
            access: "inaccessible",
            messages: vec!["inaccessible"],
        },
        Case {
            name: "cancelled",
            events: vec![
                ("deletion_scheduled", json!({})),
                ("deletion_cancelled", json!({})),
            ],
            state: "disabled",
            access: "inaccessible",
            messages: vec!["inaccessible"],
        },
        Case {
            name: "recovered",
            events: vec![
                ("deletion_scheduled", json!({})),
                ("deletion_cancelled", json!({})),
                ("enabled", json!({})),
            ],
            state: "enabled",
            access: "accessible",
            messages: vec!["inaccessible", "accessible"],
        },
        Case {
            name: "destroyed",
            events: vec![("destroyed", json!({})), ("enabled", json!({}))],
            state: "destroyed",
            access: "inaccessible",
            messages: vec!["inaccessible"],
        },
        // Destroyed after the deletion was scheduled: access stays inaccessible, but the
        // tenant is told again, now that it is final.
        Case {
            name: "deleted",
            events: vec![("deletion_scheduled", json!({})), ("destroyed", json!({}))],
            state: "destroyed",
            access: "inaccessible",
            messages: vec!["inaccessible"],
        },
        Case {
            name: "expired",
            events: vec![("expired", json!({}))],
            state: "expired",
            access: "encrypt_blocked",
            messages: vec!["encrypt_blocked"],
        },
        Case {
            name: "extended",
            events: vec![
                ("expired", json!({})),
                ("expiry_changed", json!({ "expires_at": future })),
            ],
            state: "enabled",
            access: "accessible",
            messages: vec!["encrypt_blocked", "accessible"],
        },
        // The local KMS has no permissions to revoke: its answer refutes the claim, which
        // blocked the tenant only until the KMS was asked.
        Case {
            name: "revoked",
            events: vec![("access_revoked", json!({}))],
            state: "enabled",
            access: "accessible",
            messages: vec!["inaccessible", "accessible"],
        },
        // An event the KMS does not bear out: fail-safe at once, undone by the KMS's answer.
        Case {
            name: "lie-disabled",
            events: vec![("disabled", json!({}))],
            state: "enabled",
            access: "accessible",
            messages: vec!["inaccessible", "accessible"],
        },
        // A restoring event changes nothing the KMS does not confirm.
        Case {
            name: "lie-enabled",
            events: vec![("enabled", json!({}))],
            state: "enabled",
            access: "accessible",
            messages: vec![],
        },
        Case {
            name: "rotated",
            events: vec![("rotated", json!({ "version": "2" }))],
            state: "enabled",
            access: "accessible",
            messages: vec![],
        },
        Case {
            name: "expiring",
            events: vec![("expiring", json!({ "expires_at": future }))],
            state: "enabled",
            access: "accessible",
            messages: vec![],
        },
        Case {
            name: "expirychange",
            events: vec![("expiry_changed", json!({ "expires_at": future }))],
            state: "enabled",
            access: "accessible",
            messages: vec![],
        },
    ]
}

on_both_backends!(every_event_kind_sets_state_and_derived_access, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn every_event_kind_sets_state_and_derived_access(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    let mut access = app.access_listener().await;
    let cases = cases();
    let mut total = 0;
    for case in &cases {
        app.tenant_with_key(case.name, &format!("key-{}", case.name))
            .await;
    }
    // Step by step across all cases: the KMS changes as the event says (except where a case
    // lies), the event is published, and the next step waits for byokd to have looked at the
    // KMS, as the confirmation of a real event would have.
    let steps = cases.iter().map(|c| c.events.len()).max().unwrap_or(0);
    for step in 0..steps {
        let since = chrono::Utc::now();
        for case in cases.iter().filter(|c| c.events.len() > step) {
            let key = format!("key-{}", case.name);
            let (kind, data) = &case.events[step];
            // A destroyed key cannot be enabled: that `enabled` is a lie too.
            let lie = case.name.starts_with("lie") || (case.name == "destroyed" && step == 1);
            if !lie {
                app.kms_do(&key, kind, data).await;
            }
            app.publish(kind, &key, at(step as i64 * 10), data.clone())
                .await;
            total += 1;
        }
        app.wait_processed(total).await;
        // A key the KMS said is destroyed is final: nothing more to ask.
        for case in cases
            .iter()
            .filter(|c| c.events.len() > step && !(c.name == "destroyed" && step > 0))
        {
            app.wait_observed(&format!("key-{}", case.name), since)
                .await;
        }
    }

    let mut expected_messages: usize = 0;
    for case in &cases {
        let tenant = app.tenant(case.name).await;
        assert_eq!(tenant["access"], case.access, "{}: {tenant}", case.name);
        assert_eq!(
            tenant["keks"][0]["state"], case.state,
            "{}: {tenant}",
            case.name
        );
        assert_eq!(
            tenant["keks"][0]["confirmed"], true,
            "{}: {tenant}",
            case.name
        );
        if case.access != "accessible" {
            assert!(
                tenant["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(case.name)),
                "{}: reason should name the key: {tenant}",
                case.name
            );
        }
        expected_messages += case.messages.len();
    }
    let rotated = app.tenant("rotated").await;
    assert_eq!(rotated["keks"][0]["current_version"], "2");
    let extended = app.tenant("expirychange").await;
    assert!(extended["keks"][0]["expires_at"].is_string(), "{extended}");

    // The platform hears every access change, with the contract's body.
    let mut seen: std::collections::HashMap<String, Vec<String>> = Default::default();
    for _ in 0..expected_messages {
        let (key, body) = next_json(&mut access, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("an access message; seen so far: {seen:?}"));
        assert_eq!(
            key,
            format!("tenant.access.{}", body["access"].as_str().unwrap_or(""))
        );
        for field in [
            "tenant_id",
            "access",
            "previous",
            "reason",
            "key_ref",
            "event_id",
            "at",
        ] {
            assert!(body.get(field).is_some(), "missing {field} in {body}");
        }
        seen.entry(body["tenant_id"].as_str().unwrap_or("").to_owned())
            .or_default()
            .push(body["access"].as_str().unwrap_or("").to_owned());
    }
    assert!(
        next_json(&mut access, Duration::from_millis(500))
            .await
            .is_none(),
        "no extra messages"
    );
    for case in &cases {
        let got = seen.remove(case.name).unwrap_or_default();
        assert_eq!(got, case.messages, "{}", case.name);
    }

    // Tenant notifications: one email and one webhook row per notification.
    let rows = app
        .sql("SELECT tenant_id, kind, channel FROM outbox WHERE channel <> 'amqp' ORDER BY seq")
        .rows()
        .await;
    let count = |tenant: &str, kind: &str| {
        rows.iter()
            .filter(|r| r[0] == tenant && r[1] == kind)
            .count()
    };
    assert_eq!(count("disabled", "tenant.inaccessible"), 2);
    let causes = app
        .sql(
            "SELECT payload->'data'->>'cause' FROM outbox
             WHERE tenant_id = 'deleted' AND kind = 'tenant.inaccessible' AND channel = 'email'
             ORDER BY seq",
        )
        .texts()
        .await;
    assert_eq!(causes, ["deletion_scheduled", "destroyed"]);
    // Refuted claims reach the operators (one row each, fanned out by the dispatcher).
    assert_eq!(count("revoked", "operator.revocation_unconfirmed"), 1);
    assert_eq!(count("lie-disabled", "operator.revocation_unconfirmed"), 1);
    assert_eq!(count("disabled", "operator.revocation_unconfirmed"), 0);
    assert_eq!(count("reenabled", "tenant.restored"), 2);
    assert_eq!(count("expired", "key.expired"), 2);
    assert_eq!(count("expiring", "key.expiring"), 2);
    assert_eq!(
        count("rotated", "tenant.inaccessible") + count("rotated", "tenant.restored"),
        0
    );
    let expiring = app
        .sql("SELECT payload FROM outbox WHERE tenant_id = 'expiring' AND channel = 'webhook'")
        .scalar()
        .await;
    assert_eq!(expiring["type"], "key.expiring");
    assert!(
        expiring["data"]["days_left"]
            .as_i64()
            .is_some_and(|d| (88..=90).contains(&d)),
        "{expiring}"
    );

    // The destroyed key ignored the later `enabled`, and the audit trail says so.
    let outcome = app
        .sql("SELECT outcome FROM audit_log WHERE key_ref = 'key-destroyed' AND action = 'enabled'")
        .text()
        .await;
    assert_eq!(outcome, "ignored_destroyed");
    // Each refuted claim is on the audit trail as an alert for operators.
    for key in ["key-revoked", "key-lie-disabled"] {
        let alerts = app
            .sql(
                "SELECT count(*) FROM audit_log WHERE key_ref = $1
                   AND action = 'revocation_unconfirmed' AND detail->'alert' = 'true'",
            )
            .bind(key)
            .int()
            .await;
        assert_eq!(alerts, 1, "{key}");
    }
    app.shutdown().await;
}

on_both_backends!(duplicates_and_redeliveries_change_nothing, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn duplicates_and_redeliveries_change_nothing(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    let mut access = app.access_listener().await;
    app.tenant_with_key("dup", "key-dup").await;
    app.kms_do("key-dup", "disabled", &json!({})).await;
    for _ in 0..3 {
        app.publish_with_id("same-id", "disabled", "key-dup", at(0), json!({}))
            .await;
    }
    // Same id, different content: still the same event for dedupe purposes.
    app.publish_with_id("same-id", "enabled", "key-dup", at(5), json!({}))
        .await;
    let marker = app.publish("expiring", "key-dup", at(6), json!({})).await;
    app.wait_processed(2).await;
    // The marker was published last; once it is in, everything before it was consumed.
    let audit = app
        .sql("SELECT count(*) FROM audit_log WHERE event_id = 'same-id'")
        .int()
        .await;
    assert_eq!(audit, 1);
    let marker_rows = app
        .sql("SELECT count(*) FROM audit_log WHERE event_id = $1")
        .bind(&marker)
        .int()
        .await;
    assert_eq!(marker_rows, 1);
    assert_eq!(app.tenant("dup").await["access"], "inaccessible");
    let (_, first) = next_json(&mut access, Duration::from_secs(20))
        .await
        .expect("message");
    assert_eq!(first["access"], "inaccessible");
    assert!(
        next_json(&mut access, Duration::from_millis(500))
            .await
            .is_none()
    );
    let notifications = app
        .sql("SELECT count(*) FROM outbox WHERE kind = 'tenant.inaccessible'")
        .int()
        .await;
    assert_eq!(notifications, 2, "one email and one webhook, once");
    // Everything was acked.
    common::wait_for("queue drained", Duration::from_secs(10), || async {
        app.queue_depth(&app.config.amqp.lifecycle_queue).await == 0
    })
    .await;
    app.shutdown().await;
}

on_both_backends!(events_out_of_order_end_where_the_kms_is, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn events_out_of_order_end_where_the_kms_is(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    app.tenant_with_key("ooo", "key-ooo").await;
    // The key was disabled and enabled again; the events arrive enabled first, then the
    // older disabled. The late revocation blocks at once (fail-safe) and the KMS undoes it.
    app.kms_do("key-ooo", "disabled", &json!({})).await;
    app.kms_do("key-ooo", "enabled", &json!({})).await;
    let since = chrono::Utc::now();
    app.publish("enabled", "key-ooo", at(30), json!({})).await;
    let late = app.publish("disabled", "key-ooo", at(10), json!({})).await;
    app.wait_processed(2).await;
    app.wait_observed("key-ooo", since).await;
    assert_eq!(app.tenant("ooo").await["access"], "accessible");
    let outcome = app
        .sql("SELECT outcome FROM audit_log WHERE event_id = $1")
        .bind(&late)
        .text()
        .await;
    assert_eq!(outcome, "applied");

    // The audit trail, as an operator reads it: newest first, paged.
    let r = app.get("/v1/audit?tenant=ooo").await;
    assert_eq!(r.status(), 200);
    let trail: Value = r.json().await.expect("json");
    let entries = trail["entries"].as_array().expect("entries");
    let summary: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or(""),
                e["outcome"].as_str().unwrap_or(""),
                e["source"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // The two events come through two queues (the revocation takes the urgent lane), so
    // their order is the broker's; the set is what matters.
    let mut newest: Vec<_> = summary[..4].to_vec();
    newest.sort();
    assert_eq!(
        newest,
        [
            ("disabled", "applied", "event"),
            ("enabled", "confirming", "event"),
            ("observed", "applied", "confirm"),
            ("revocation_unconfirmed", "not_confirmed", "confirm"),
        ]
    );
    assert_eq!(summary[4], ("kek_registered", "applied", "api"));
    let claimed = entries
        .iter()
        .find(|e| e["action"] == "disabled")
        .expect("the disabled event");
    assert_eq!(claimed["detail"]["after"]["claim"], "disabled");
    let first_id = entries[0]["id"].as_i64().expect("id");
    let page: Value = app
        .get(&format!("/v1/audit?tenant=ooo&before={first_id}&limit=1"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page["entries"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["entries"][0]["action"], entries[1]["action"]);
    assert_eq!(app.get("/v1/audit").await.status(), 400);
    assert_eq!(app.get("/v1/audit?tenant=ghost").await.status(), 404);
    app.shutdown().await;
}

on_both_backends!(an_event_for_an_unregistered_key_is_recorded_and_acked, #[tokio::test(flavor = "multi_thread", worker_threads = 2)]);
async fn an_event_for_an_unregistered_key_is_recorded_and_acked(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    let id = app
        .publish("disabled", "nobody-has-this-key", at(0), json!({}))
        .await;
    app.wait_processed(1).await;
    let outcome = app
        .sql("SELECT outcome FROM audit_log WHERE event_id = $1")
        .bind(&id)
        .text()
        .await;
    assert_eq!(outcome, "unknown_key");
    common::wait_for("queue drained", Duration::from_secs(10), || async {
        app.queue_depth(&app.config.amqp.lifecycle_queue).await == 0
            && app.queue_depth(&app.config.amqp.dead_letter_queue).await == 0
    })
    .await;
    app.shutdown().await;
}
