//! CloudEvents binary content mode against the real RabbitMQ and PostgreSQL: over HTTP
//! (`ce-*` headers, the body as data) and over AMQP (application properties with the
//! `cloudEvents:`, `cloudEvents_` and `ce_` prefixes), each giving the same event as
//! structured mode; and hostile binary messages refused with the reason (422 over HTTP,
//! dead-lettered over AMQP) while the consumer goes on.

mod common;

use chrono::Utc;
use common::{TOKEN, TestApp, dead_letter_reader, next_dead_letter, wait_for};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Value, json};
use std::time::Duration;

fn data(key_ref: &str) -> String {
    json!({ "provider": "local", "key_ref": key_ref }).to_string()
}

async fn post_binary(app: &TestApp, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut request = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(TOKEN)
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let r = request.send().await.expect("POST /v1/events");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn inbox_has(app: &TestApp, id: &str) -> bool {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processed_events WHERE event_id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .is_ok_and(|n| n > 0)
}

#[tokio::test]
async fn binary_mode_over_http_is_the_same_event_as_structured_mode() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("acme", "acme-kek").await;
    app.kms_do("acme-kek", "disabled", &json!({})).await;
    let time = (Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", "bin-1"),
        ("ce-source", "kms://local/acme"),
        ("ce-type", "byok.key.disabled"),
        ("ce-time", time.as_str()),
        ("ce-subject", "acme-kek"),
        ("content-type", "application/json; charset=utf-8"),
    ];
    let (status, binary) = post_binary(&app, &headers, &data("acme-kek")).await;
    assert_eq!(status, 202, "{binary}");
    let structured = json!({
        "specversion": "1.0", "id": "bin-1", "source": "kms://local/acme",
        "type": "byok.key.disabled", "time": time, "subject": "acme-kek",
        "data": { "provider": "local", "key_ref": "acme-kek" },
    });
    let (status, answer) = post_binary(
        &app,
        &[("content-type", "application/cloudevents+json")],
        &structured.to_string(),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer, binary, "both modes normalise to the same event");
    assert_eq!(binary["kind"], "disabled");

    wait_for("acme inaccessible", Duration::from_secs(30), || async {
        app.tenant("acme").await["access"] == "inaccessible"
    })
    .await;
    // One event: the second copy was a duplicate of the first (same source and id).
    wait_for("bin-1 processed", Duration::from_secs(30), || {
        inbox_has(&app, "bin-1")
    })
    .await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE event_id = 'bin-1'")
            .fetch_one(&app.pool)
            .await
            .expect("inbox");
    assert_eq!(rows, 1);

    // Percent-encoded attribute values are decoded (HTTP binding 3.1.3.2).
    let (status, answer) = post_binary(
        &app,
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "bin%202%20%C3%A9"),
            ("ce-source", "kms://local/acme"),
            ("ce-type", "byok.key.disabled"),
        ],
        &data("acme-kek"),
    )
    .await;
    assert_eq!(
        (status, answer["id"].clone()),
        (202, json!("bin 2 é")),
        "{answer}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn hostile_binary_events_over_http_are_refused_with_the_reason() {
    let app = TestApp::spawn().await;
    let good = [
        ("ce-specversion", "1.0"),
        ("ce-id", "h-1"),
        ("ce-source", "kms://local"),
        ("ce-type", "byok.key.disabled"),
    ];
    let without = |name: &str| -> Vec<(&str, &str)> {
        good.iter().copied().filter(|(n, _)| *n != name).collect()
    };
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&str, &str)> {
        good.iter().copied().chain(extra.iter().copied()).collect()
    };
    let body = data("k");
    // (headers, body, what the error says)
    type Case<'a> = (Vec<(&'a str, &'a str)>, String, &'a str);
    let cases: Vec<Case> = vec![
        (without("ce-id"), body.clone(), "missing ce-id"),
        (without("ce-source"), body.clone(), "missing ce-source"),
        (without("ce-type"), body.clone(), "missing ce-type"),
        (
            without("ce-specversion"),
            body.clone(),
            "missing ce-specversion",
        ),
        (
            without("ce-specversion")
                .into_iter()
                .chain([("ce-specversion", "0.3")])
                .collect(),
            body.clone(),
            "specversion \"0.3\" is not supported",
        ),
        (with(&[("ce-id", "h-2")]), body.clone(), "more than once"),
        (
            with(&[("content-type", "application/cloudevents+json")]),
            body.clone(),
            "structured mode",
        ),
        (
            with(&[
                ("content-type", "application/json"),
                ("ce-datacontenttype", "text/xml"),
            ]),
            body.clone(),
            "conflicting data content types",
        ),
        (
            with(&[("content-type", "text/plain")]),
            body.clone(),
            "is not JSON",
        ),
        (good.to_vec(), "{not json".to_owned(), "is not JSON"),
        (good.to_vec(), String::new(), "is empty"),
        (
            with(&[("ce-data", "x")]),
            body.clone(),
            "the body is the data",
        ),
        (with(&[("ce-id%", "x")]), body.clone(), "attribute name"),
        (with(&[("ce-time", "yesterday")]), body.clone(), "RFC 3339"),
        (
            with(&[("ce-time", "2999-01-01T00:00:00Z")]),
            body.clone(),
            "ahead of byokd's clock",
        ),
        (
            good.to_vec(),
            json!({ "provider": "nope", "key_ref": "k" }).to_string(),
            "provider",
        ),
        (
            without("ce-id")
                .into_iter()
                .chain([("ce-id", "%FF")])
                .collect(),
            body.clone(),
            "not UTF-8",
        ),
    ];
    for (headers, body, says) in cases {
        let (status, answer) = post_binary(&app, &headers, &body).await;
        assert_eq!(status, 422, "{headers:?}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| e.contains(says)),
            "{headers:?}: {answer} should say {says:?}"
        );
    }
    // Nothing of them was published: after a good event sent behind them, the inbox holds
    // that one alone.
    let (status, answer) = post_binary(&app, &good, &body).await;
    assert_eq!(status, 202, "{answer}");
    app.wait_processed(1).await;
    assert!(inbox_has(&app, "h-1").await);
    assert_eq!(app.processed().await, 1);
    app.shutdown().await;
}

async fn publish_binary(
    app: &TestApp,
    headers: &[(&str, AMQPValue)],
    content_type: Option<&str>,
    body: &[u8],
) {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(ShortString::from(*name), value.clone());
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(ct) = content_type {
        properties = properties.with_content_type(ct.into());
    }
    app.channel
        .basic_publish(
            app.config.amqp.lifecycle_exchange.as_str().into(),
            "test".into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

fn s(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[tokio::test]
async fn binary_mode_over_amqp_with_every_prefix_and_hostile_messages_dead_lettered() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("acme", "acme-kek").await;
    let mut dead = dead_letter_reader(&app).await;
    let body = data("acme-kek");
    let when = Utc::now().timestamp() - 60;

    // The same disabled event in each spelling, then a restoring one in structured mode:
    // every binary copy is one event (dedupe on source and id), applied once.
    app.kms_do("acme-kek", "disabled", &json!({})).await;
    for prefix in ["cloudEvents:", "cloudEvents_", "ce_"] {
        let name = |a: &str| format!("{prefix}{a}");
        let (v, i, so, t, ti) = (
            name("specversion"),
            name("id"),
            name("source"),
            name("type"),
            name("time"),
        );
        publish_binary(
            &app,
            &[
                (v.as_str(), s("1.0")),
                (i.as_str(), s("amqp-1")),
                (so.as_str(), s("kms://local/acme")),
                (t.as_str(), s("byok.key.disabled")),
                // The AMQP binding's timestamp type for `time`.
                (
                    ti.as_str(),
                    AMQPValue::Timestamp(u64::try_from(when).expect("time")),
                ),
            ],
            Some("application/json"),
            body.as_bytes(),
        )
        .await;
    }
    wait_for("acme inaccessible", Duration::from_secs(30), || async {
        app.tenant("acme").await["access"] == "inaccessible"
    })
    .await;

    // Hostile binary messages: each dead-lettered with its reason.
    // (application properties, content type, body, what the reason says)
    type Case<'a> = (Vec<(&'a str, AMQPValue)>, Option<&'a str>, &'a str, &'a str);
    let hostile: Vec<Case> = vec![
        (
            vec![
                ("cloudEvents:specversion", s("1.0")),
                ("cloudEvents:source", s("kms://x")),
                ("cloudEvents:type", s("byok.key.disabled")),
            ],
            None,
            body.as_str(),
            "missing cloudEvents:id",
        ),
        (
            vec![
                ("cloudEvents:specversion", s("2.0")),
                ("cloudEvents:id", s("h-2")),
                ("cloudEvents:source", s("kms://x")),
                ("cloudEvents:type", s("byok.key.disabled")),
            ],
            None,
            body.as_str(),
            "specversion \"2.0\" is not supported",
        ),
        (
            vec![
                ("cloudEvents:specversion", s("1.0")),
                ("cloudEvents:id", s("h-3")),
                ("ce_id", s("h-4")),
                ("cloudEvents:source", s("kms://x")),
                ("cloudEvents:type", s("byok.key.disabled")),
            ],
            None,
            body.as_str(),
            "conflicting values for attribute id",
        ),
        (
            vec![
                ("cloudEvents:specversion", s("1.0")),
                ("cloudEvents:id", s("h-5")),
                ("cloudEvents:source", s("kms://x")),
                ("cloudEvents:type", s("byok.key.disabled")),
            ],
            Some("application/cloudevents+json"),
            body.as_str(),
            "structured mode",
        ),
        (
            vec![
                ("cloudEvents:specversion", s("1.0")),
                ("cloudEvents:id", s("h-6")),
                ("cloudEvents:source", s("kms://x")),
                ("cloudEvents:type", s("byok.key.disabled")),
                (
                    "cloudEvents:extra",
                    AMQPValue::FieldTable(FieldTable::default()),
                ),
            ],
            None,
            body.as_str(),
            "is not a UTF-8 string",
        ),
        (
            vec![
                ("cloudEvents:specversion", s("1.0")),
                ("cloudEvents:id", s("h-7")),
                ("cloudEvents:source", s("kms://x")),
                ("cloudEvents:type", s("byok.key.disabled")),
            ],
            None,
            "<xml/>",
            "is not JSON",
        ),
    ];
    for (headers, content_type, body, says) in &hostile {
        publish_binary(&app, headers, *content_type, body.as_bytes()).await;
        let (_, reason) = next_dead_letter(&mut dead).await;
        assert!(reason.contains(says), "{reason:?} should say {says:?}");
    }

    // The consumer went on: a good binary event after them is applied.
    app.kms_do("acme-kek", "enabled", &json!({})).await;
    publish_binary(
        &app,
        &[
            ("ce_specversion", s("1.0")),
            ("ce_id", s("amqp-2")),
            ("ce_source", s("kms://local/acme")),
            ("ce_type", s("byok.key.enabled")),
        ],
        None,
        body.as_bytes(),
    )
    .await;
    wait_for("acme accessible again", Duration::from_secs(30), || async {
        app.tenant("acme").await["access"] == "accessible"
    })
    .await;
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM processed_events WHERE event_id IN ('amqp-1', 'amqp-2')",
    )
    .fetch_one(&app.pool)
    .await
    .expect("inbox");
    assert_eq!(rows, 2, "three copies of amqp-1 are one event");
    app.shutdown().await;
}
