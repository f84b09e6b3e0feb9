//! `byokd dead`: an operator lists the dead-letter queue without disturbing it, reads one
//! message, replays one whose cause has passed (an event dated ahead of byokd's clock) so
//! it applies, and purges the rest; replay and purge are audited.

mod common;

use chrono::{Duration as ChronoDuration, Utc};
use common::{TestApp, canonical, wait_for, with_service_env};
use serde_json::{Value, json};
use std::process::Output;
use std::time::Duration;

fn dead(app: &TestApp, args: &[&str]) -> Output {
    let mut cmd = common::byokd_command();
    with_service_env(&mut cmd, &app.db.url, &app.config.amqp);
    cmd.arg("dead").args(args).output().expect("run byokd dead")
}

fn dead_json(app: &TestApp, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = dead(app, &all);
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("json")
}

async fn audited(app: &TestApp, action: &str) -> Vec<Value> {
    sqlx::query_scalar("SELECT detail FROM audit_log WHERE action = $1 ORDER BY id")
        .bind(action)
        .fetch_all(&app.pool)
        .await
        .expect("audit rows")
}

/// Waits for the dead-letter queue to hold `n` ready messages again. The CLI leaves what it
/// read but did not ack to the broker, which requeues it when the channel closes; a quorum
/// queue applies that return through its log after the CLI has exited, so the ready count
/// catches up a moment later. A message lost for good never comes back and fails this.
async fn settled(app: &TestApp, queue: &str, n: u32) {
    wait_for(
        &format!("{n} ready dead letters"),
        Duration::from_secs(10),
        || async { app.queue_depth(queue).await == n },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_purged() {
    let app = TestApp::spawn_with(|c| c.state.max_event_skew_secs = 2).await;
    app.tenant_with_key("dl", "key-dl").await;
    // The key really is disabled; its event says so, dated 8 s ahead of byokd's clock.
    app.kms_do("key-dl", "disabled", &json!({})).await;
    app.publish_raw(b"\x00 not json at all").await;
    let time = Utc::now() + ChronoDuration::seconds(8);
    let file = std::env::temp_dir().join(format!("byokd-dead-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        canonical("evt-ahead", "disabled", "key-dl", time, json!({})).to_string(),
    )
    .expect("write event");
    let mut publish = common::byokd_command();
    with_service_env(&mut publish, &app.db.url, &app.config.amqp);
    let out = publish.arg("publish").arg(&file).output().expect("publish");
    assert!(out.status.success(), "{out:?}");
    let queue = app.config.amqp.dead_letter_queue.clone();
    // The revocation went to the main queue and to the urgent lane, and both refused it.
    wait_for("three dead letters", Duration::from_secs(20), || async {
        app.queue_depth(&queue).await == 3
    })
    .await;

    // Listing twice disturbs nothing.
    for _ in 0..2 {
        let listed = dead_json(&app, &["list"]);
        settled(&app, &queue, 3).await;
        let messages = listed["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 3, "{listed}");
        assert_eq!(
            messages.iter().filter(|m| m["id"] == "evt-ahead").count(),
            2,
            "{listed}"
        );
        let ahead = messages
            .iter()
            .find(|m| m["id"] == "evt-ahead")
            .unwrap_or_else(|| panic!("evt-ahead listed: {listed}"));
        assert_eq!(ahead["routing_key"], "local.disabled");
        assert!(
            ahead["reason"]
                .as_str()
                .is_some_and(|r| r.contains("ahead of byokd's clock")),
            "{ahead}"
        );
        assert!(ahead["dead_lettered_at"].is_string(), "{ahead}");
        let junk = messages
            .iter()
            .find(|m| m["id"] != "evt-ahead")
            .expect("the junk message");
        assert!(
            junk["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("sha256:"))
        );
        assert!(
            junk["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not valid JSON"))
        );
    }
    settled(&app, &queue, 3).await;
    let shown = dead_json(&app, &["show", "evt-ahead"]);
    assert!(
        shown["body"]["text"]
            .as_str()
            .is_some_and(|b| b.contains("\"evt-ahead\"")),
        "{shown}"
    );
    assert!(shown["headers"]["x-byokd-error"].is_string(), "{shown}");
    let out = dead(&app, &["show", "no-such-message"]);
    assert_eq!(out.status.code(), Some(1));

    // byokd has not looked at the key: the refused event changed nothing.
    assert_eq!(app.tenant("dl").await["access"], "accessible");
    // Once the event is no longer ahead of the clock, replaying it applies it.
    let wait = (time - ChronoDuration::seconds(1)) - Utc::now();
    if let Ok(wait) = wait.to_std() {
        tokio::time::sleep(wait).await;
    }
    // An id names every copy; intake applies the event once.
    let replayed = dead_json(&app, &["replay", "evt-ahead"]);
    assert_eq!(
        replayed["replayed"].as_array().map(Vec::len),
        Some(2),
        "{replayed}"
    );
    wait_for(
        "the replayed event to apply",
        Duration::from_secs(20),
        || async { app.tenant("dl").await["access"] == "inaccessible" },
    )
    .await;
    settled(&app, &queue, 1).await;
    let rows = audited(&app, "dead_letter_replayed").await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["message_id"], "evt-ahead");

    // An unknown id is reported, and nothing else is touched.
    let out = dead(&app, &["purge", "no-such-message"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the dead-letter queue"));
    settled(&app, &queue, 1).await;
    // Naming nothing is a usage error.
    assert_eq!(dead(&app, &["purge"]).status.code(), Some(2));
    let purged = dead_json(&app, &["purge", "--all"]);
    assert_eq!(
        purged["purged"].as_array().map(Vec::len),
        Some(1),
        "{purged}"
    );
    settled(&app, &queue, 0).await;
    assert_eq!(audited(&app, "dead_letter_purged").await.len(), 1);
    assert_eq!(
        dead_json(&app, &["list"])["messages"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    let _ = std::fs::remove_file(file);
    app.shutdown().await;
}
