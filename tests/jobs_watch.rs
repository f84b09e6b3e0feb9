//! `byokd jobs watch`: follows a re-wrap job as it runs and exits when none is left active.

mod common;

use common::{TestApp, at, with_service_env};
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_watch_follows_a_rewrap_to_its_end_and_exits() {
    // Slow enough to be watched: 3,000 DEKs at 1,000 per second.
    let app = TestApp::spawn_with(|c| {
        c.rewrap.batch_size = 100;
        c.rewrap.rate_limits.insert("local".into(), 1000);
    })
    .await;
    app.tenant_with_key("w", "key-w").await;
    app.bulk_deks("w", "key-w", 3000).await;

    let (db_url, amqp) = (app.db.url.clone(), app.config.amqp.clone());
    let watch = move |args: &[&str]| {
        let mut cmd = common::byokd_command();
        with_service_env(&mut cmd, &db_url, &amqp);
        cmd.args(["jobs", "watch", "--interval-ms", "200"])
            .args(args);
        cmd
    };
    // Nothing to watch: says so and exits 0 at once.
    let out = watch(&["--tenant", "w"]).output().expect("run");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no active re-wrap jobs"
    );

    let info = app.local_kms().await.rotate("key-w").await.expect("rotate");
    app.publish(
        "rotated",
        "key-w",
        at(0),
        json!({ "version": info.current_version }),
    )
    .await;
    common::wait_for("the job to start", Duration::from_secs(20), || async {
        !app.rewrap_jobs("w").await.is_empty()
    })
    .await;
    // Fleet-wide (no --tenant) and as JSON lines, until the job is done.
    let mut fleet = watch(&["--json"]);
    let out = tokio::task::spawn_blocking(move || fleet.output().expect("run"))
        .await
        .expect("join");
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let mine: Vec<&Value> = lines.iter().filter(|l| l["tenant_id"] == "w").collect();
    assert!(mine.len() >= 3, "progress was followed: {lines:?}");
    let done: Vec<i64> = mine.iter().filter_map(|l| l["done"].as_i64()).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    let last = mine.last().expect("a last line");
    assert_eq!(last["state"], "completed", "{last}");
    assert_eq!(
        (last["done"].as_i64(), last["total"].as_i64()),
        (Some(3000), Some(3000))
    );
    assert!(
        mine.iter().any(|l| l["state"] == "running"
            && l["eta_secs"].as_u64().is_some()
            && l["rate_per_sec"].as_f64().is_some_and(|r| r > 0.0)),
        "a running line with a rate and an ETA: {mine:?}"
    );
    app.shutdown().await;
}
