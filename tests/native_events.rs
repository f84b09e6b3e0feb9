//! Provider-native events (AWS CloudTrail via EventBridge, Azure Event Grid arrays, GCP audit
//! log entries in a Pub/Sub push envelope) through the real broker and database.

mod common;

use base64::Engine;
use common::{TestApp, wait_for};
use std::time::Duration;

const AWS_KEY: &str = "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const AZURE_KEY: &str = "https://sample-kv.vault.azure.net/keys/tenant-kek";
const GCP_KEY: &str = "projects/acme/locations/europe-west1/keyRings/byok/cryptoKeys/tenant-kek";

/// A CloudTrail record of `name` in its EventBridge envelope; `extra` is appended to `detail`.
fn cloudtrail(name: &str, event_id: &str, extra: &str) -> String {
    format!(
        r#"{{"version":"0","id":"eb-{event_id}","detail-type":"AWS API Call via CloudTrail","source":"aws.kms",
        "account":"111122223333","time":"2026-11-28T10:00:01Z","region":"us-west-2","resources":[],
        "detail":{{"eventVersion":"1.08","eventTime":"2026-11-28T10:00:00Z","eventSource":"kms.amazonaws.com",
        "eventName":"{name}","awsRegion":"us-west-2","requestParameters":{{"keyId":"1234abcd-12ab-34cd-56ef-1234567890ab"}},
        "responseElements":{{"keyId":"{AWS_KEY}"}},"eventID":"{event_id}","readOnly":false,
        "resources":[{{"ARN":"{AWS_KEY}","accountId":"111122223333"}}],"eventType":"AwsApiCall",
        "recipientAccountId":"111122223333"{extra}}}}}"#
    )
}

async fn kek(app: &TestApp, tenant: &str) -> serde_json::Value {
    app.tenant(tenant).await["keks"][0].clone()
}

#[tokio::test]
async fn cloudtrail_disable_key_makes_the_tenant_inaccessible() {
    let app = TestApp::spawn().await;
    app.tenant_with_native_key("acme", "aws", AWS_KEY).await;
    app.publish_raw(cloudtrail("DisableKey", "ct-1", "").as_bytes())
        .await;
    app.wait_processed(1).await;
    let t = app.tenant("acme").await;
    assert_eq!(t["access"], "inaccessible", "{t}");
    assert_eq!(t["keks"][0]["state"], "disabled");
    app.shutdown().await;
}

#[tokio::test]
async fn an_event_grid_array_applies_every_event() {
    let app = TestApp::spawn().await;
    app.tenant_with_native_key("contoso", "azure", AZURE_KEY)
        .await;
    let event = |id: &str, event_type: &str, version: &str| {
        format!(
            r#"{{"id":"{id}","topic":"/subscriptions/0/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/sample-kv",
            "subject":"tenant-kek","eventType":"Microsoft.KeyVault.{event_type}","eventTime":"2026-11-28T10:00:0{}Z",
            "data":{{"Id":"{AZURE_KEY}/{version}","VaultName":"sample-kv","ObjectType":"Key","ObjectName":"tenant-kek",
            "Version":"{version}","NBF":"1764000000","EXP":1764320000}},"dataVersion":"1","metadataVersion":"1"}}"#,
            id.len()
        )
    };
    let body = format!(
        "[{},{}]",
        event("a", "KeyNewVersionCreated", "v2"),
        event("bb", "KeyExpired", "v2")
    );
    app.publish_raw(body.as_bytes()).await;
    app.wait_processed(2).await;
    let k = kek(&app, "contoso").await;
    // Both events were applied: the expiry at once; the new version is a hint the KMS must
    // confirm, and this byokd has no Azure settings, so the version stays as observed.
    let outcomes: Vec<String> = sqlx::query_scalar(
        "SELECT outcome FROM audit_log WHERE event_id IN ('a', 'bb') ORDER BY event_id",
    )
    .fetch_all(&app.pool)
    .await
    .expect("audit");
    assert_eq!(outcomes, ["confirming", "applied"]);
    assert_eq!(k["current_version"], "1", "{k}");
    assert_eq!(k["state"], "expired", "{k}");
    assert_eq!(app.tenant("contoso").await["access"], "encrypt_blocked");
    app.shutdown().await;
}

#[tokio::test]
async fn a_gcp_destroy_in_a_pubsub_push_envelope_schedules_deletion() {
    let app = TestApp::spawn().await;
    app.tenant_with_native_key("initech", "gcp", GCP_KEY).await;
    let entry = format!(
        r#"{{"logName":"projects/acme/logs/cloudaudit.googleapis.com%2Factivity",
        "protoPayload":{{"@type":"type.googleapis.com/google.cloud.audit.AuditLog","serviceName":"cloudkms.googleapis.com",
        "methodName":"google.cloud.kms.v1.KeyManagementService.DestroyCryptoKeyVersion",
        "resourceName":"{GCP_KEY}/cryptoKeyVersions/1","request":{{}},"response":{{"state":"DESTROY_SCHEDULED"}},"status":{{}}}},
        "insertId":"gcp-1","timestamp":"2026-11-28T10:00:00Z"}}"#
    );
    let data = base64::engine::general_purpose::STANDARD.encode(entry);
    let push = format!(r#"{{"message":{{"data":"{data}","messageId":"1"}},"subscription":"s"}}"#);
    app.publish_raw(push.as_bytes()).await;
    app.wait_processed(1).await;
    let t = app.tenant("initech").await;
    assert_eq!(t["keks"][0]["state"], "pending_deletion", "{t}");
    assert_eq!(t["access"], "inaccessible");
    app.shutdown().await;
}

#[tokio::test]
async fn a_failed_call_is_acked_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.tenant_with_native_key("acme", "aws", AWS_KEY).await;
    let failed = cloudtrail(
        "DisableKey",
        "ct-failed",
        r#","errorCode":"AccessDeniedException","errorMessage":"denied""#,
    );
    // Over HTTP: answered with the reason, not published.
    let r = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(common::TOKEN)
        .body(failed.clone())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["ignored"]
            .as_str()
            .is_some_and(|s| s.contains("AccessDeniedException")),
        "{body}"
    );
    // Over AMQP: acked, then a later event still goes through behind it.
    app.publish_raw(failed.as_bytes()).await;
    app.publish_raw(cloudtrail("Encrypt", "ct-encrypt", "").as_bytes())
        .await;
    app.publish_raw(cloudtrail("EnableKey", "ct-enable", "").as_bytes())
        .await;
    app.wait_processed(1).await;
    let t = app.tenant("acme").await;
    assert_eq!(t["access"], "accessible", "{t}");
    assert_eq!(t["keks"][0]["state"], "enabled");
    let processed: Vec<String> = sqlx::query_scalar("SELECT event_id FROM processed_events")
        .fetch_all(&app.pool)
        .await
        .expect("processed");
    assert_eq!(processed, ["ct-enable"]);
    let s = &app.config.amqp;
    wait_for(
        "the lifecycle queue to drain",
        Duration::from_secs(10),
        || async { app.queue_depth(&s.lifecycle_queue).await == 0 },
    )
    .await;
    assert_eq!(app.queue_depth(&s.dead_letter_queue).await, 0);
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("byokd_events_total{") && l.contains("outcome=\"ignored\"")),
        "{metrics}"
    );
    app.shutdown().await;
}
