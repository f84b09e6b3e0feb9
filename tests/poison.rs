//! Messages that can never succeed land in the dead queue with the reason in a header, and
//! the consumer goes on applying good events.

mod common;

use common::{TestApp, at};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_the_reason_and_the_consumer_goes_on() {
    let app = TestApp::spawn().await;
    app.tenant_with_key("p", "key-p").await;
    let oversized = format!(
        r#"{{"specversion":"1.0","id":"big","source":"s","type":"byok.key.disabled","data":{{"provider":"local","key_ref":"{}"}}}}"#,
        "k".repeat(app.config.amqp.max_message_bytes)
    );
    let poison: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"\x00\x01 definitely not json".to_vec(), "not valid JSON"),
        ("wrong shape", br#"{"specversion":"1.0","id":"x","source":"s","type":"byok.key.disabled","data":{"key_ref":"k"}}"#.to_vec(), "missing field `provider`"),
        ("unknown type", br#"{"specversion":"1.0","id":"y","source":"s","type":"byok.key.melted","data":{"provider":"local","key_ref":"k"}}"#.to_vec(), "byok.key.melted"),
        ("unknown format", br#"{"hello":"world"}"#.to_vec(), "unknown event format"),
        ("oversized", oversized.into_bytes(), "exceeds the"),
    ];
    for (_, body, _) in &poison {
        app.publish_raw(body).await;
    }
    app.publish("disabled", "key-p", at(0), json!({})).await;
    app.wait_processed(1).await;
    assert_eq!(app.tenant("p").await["access"], "inaccessible");

    let mut dead = common::dead_letter_reader(&app).await;
    let mut reasons = Vec::new();
    for _ in 0..poison.len() {
        reasons.push(common::next_dead_letter(&mut dead).await);
    }
    for (name, body, expected) in &poison {
        assert!(
            reasons
                .iter()
                .any(|(len, r)| *len == body.len() && r.contains(expected)),
            "{name}: expected a dead letter with {expected:?}, got {reasons:?}"
        );
    }
    let dead_count: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(&app.pool)
        .await
        .expect("count");
    assert_eq!(dead_count, 1, "only the good event is in the inbox");
    app.shutdown().await;
}
