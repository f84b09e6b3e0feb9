//! Supervision of the daemon's tasks: a task that dies turns `/readyz` to 503 naming it and
//! makes `run` fail after the grace period; on shutdown, work still running when the grace
//! period ends is aborted rather than awaited.

mod common;

use byokd::daemon::{Fault, RunError};
use byokd::store::{Channel, NewOutbox, Store};
use common::{TOKEN, TestApp, http_client, wait_for};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use uuid::Uuid;

const GRACE: Duration = Duration::from_secs(2);

async fn readyz(http: &reqwest::Client, base: &str) -> Option<(u16, Value)> {
    let response = http.get(format!("{base}/readyz")).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// Every loop of the daemon retries what the outside world can do to it (a lost broker,
/// database or KMS: see tests/resilience.rs), so only a bug ends one early. The test arms
/// the daemon's hidden fault injector, which panics inside the real outbox task, as a bug
/// in it would.
#[tokio::test]
async fn a_task_that_dies_turns_readyz_503_and_run_fails_after_the_grace_period() {
    let mut app = TestApp::spawn_with(|c| c.shutdown_grace_secs = GRACE.as_secs()).await;
    // TestApp runs the daemon without a fault armed: stop it and run the same daemon, on the
    // same database and queues, with one.
    app.stop().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (fire, trigger) = oneshot::channel();
    let (keep_running, stopped) = oneshot::channel::<()>();
    let daemon = tokio::spawn(byokd::daemon::run_with_fault(
        app.config.clone(),
        listener,
        async {
            let _ = stopped.await;
        },
        Fault {
            task: "outbox".into(),
            trigger,
        },
    ));
    let http = http_client();
    wait_for("daemon ready", Duration::from_secs(30), || {
        let (http, base) = (http.clone(), base.clone());
        async move { matches!(readyz(&http, &base).await, Some((200, _))) }
    })
    .await;
    let (_, healthy) = readyz(&http, &base).await.expect("readyz");
    assert_eq!(healthy["status"], "ok");
    assert_eq!(healthy["failed_tasks"], json!([]));

    fire.send(()).expect("the outbox task is armed");
    let fired = Instant::now();
    let body = loop {
        if let Some((503, body)) = readyz(&http, &base).await
            && body["failed_tasks"] == json!(["outbox"])
        {
            break body;
        }
        assert!(
            fired.elapsed() < GRACE,
            "/readyz did not turn 503 naming the outbox"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["ready"], false);
    // The fields /readyz always had are still there.
    assert_eq!(body["database"], "ok");
    assert!(body["consumer"].is_string() && body["urgent_consumer"].is_string());
    // The admin API still answers while the daemon winds down.
    let api = http
        .get(format!("{base}/v1/rewrap-jobs?tenant=nobody"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("admin API");
    assert_eq!(api.status(), 404);

    let result = tokio::time::timeout(GRACE * 4, daemon)
        .await
        .expect("run returns after the grace period")
        .expect("daemon task");
    let waited = fired.elapsed();
    assert!(
        waited >= GRACE - Duration::from_millis(100) && waited < GRACE * 3,
        "run returned {waited:?} after the task died; the grace period is {GRACE:?}"
    );
    match result {
        Err(RunError::TaskFailed(names)) => assert_eq!(names, ["outbox"]),
        other => panic!("expected TaskFailed([\"outbox\"]), got {other:?}"),
    }
    let err = RunError::TaskFailed(vec!["outbox".into()]).to_string();
    assert_eq!(
        err,
        "daemon task died: outbox; see the error log for the cause"
    );
    drop(keep_running);
    app.shutdown().await;
}

/// A webhook endpoint that reads the request, never answers, and tells when the client hangs
/// up.
struct SilentEndpoint {
    url: String,
    requested: Arc<AtomicBool>,
    hung_up: Arc<AtomicBool>,
}

impl SilentEndpoint {
    async fn start() -> SilentEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let requested = Arc::new(AtomicBool::new(false));
        let hung_up = Arc::new(AtomicBool::new(false));
        let (seen, gone) = (requested.clone(), hung_up.clone());
        tokio::spawn(async move {
            // One connection: the one delivery this test makes.
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 8192];
            // Bounded by the delivery's own timeout: a test that goes wrong still ends.
            let _ = tokio::time::timeout(Duration::from_secs(60), async {
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        gone.store(true, Ordering::SeqCst);
                        return;
                    }
                    seen.store(true, Ordering::SeqCst);
                }
            })
            .await;
        });
        SilentEndpoint {
            url,
            requested,
            hung_up,
        }
    }
}

/// A webhook delivery that outlasts the grace period (its endpoint never answers, its timeout
/// is far off) holds the outbox task at shutdown: `run` returns when the grace period ends,
/// and the delivery is aborted with its task, not left running to its timeout.
#[tokio::test]
async fn work_still_running_when_the_grace_period_ends_is_aborted() {
    let endpoint = SilentEndpoint::start().await;
    let mut app = TestApp::spawn_with(|c| {
        c.shutdown_grace_secs = GRACE.as_secs();
        c.webhook_allow_cidrs = Some("127.0.0.0/8".into());
        c.notify.webhook_timeout_ms = 60_000;
    })
    .await;
    let created: Value = app
        .post(
            "/v1/tenants",
            json!({ "id": "acme", "name": "Acme", "webhooks": [{ "url": endpoint.url }] }),
        )
        .await
        .json()
        .await
        .expect("tenant");
    let hook = created["webhooks"][0]["id"]
        .as_str()
        .expect("webhook id")
        .to_owned();
    let store = Store::connect(&app.db.url, 1).await.expect("store");
    let id = Uuid::now_v7();
    store
        .enqueue_outbox(&[NewOutbox {
            id,
            tenant_id: Some("acme".into()),
            channel: Channel::Webhook,
            recipient: hook.clone(),
            kind: "key.expired".into(),
            dedupe_key: format!("key.expired:test:{id}:webhook:{hook}"),
            payload: common::notify::payload("acme", "key.expired"),
        }])
        .await
        .expect("enqueue");
    wait_for("the delivery in flight", Duration::from_secs(30), || {
        let requested = endpoint.requested.load(Ordering::SeqCst);
        async move { requested }
    })
    .await;

    let started = Instant::now();
    tokio::time::timeout(GRACE * 4, app.stop())
        .await
        .expect("run returns when the grace period ends");
    let took = started.elapsed();
    assert!(
        took >= GRACE - Duration::from_millis(100) && took < GRACE * 3,
        "run returned after {took:?}; the grace period is {GRACE:?}"
    );
    wait_for(
        "the endpoint sees the delivery aborted",
        Duration::from_secs(5),
        || {
            let gone = endpoint.hung_up.load(Ordering::SeqCst);
            async move { gone }
        },
    )
    .await;
    app.shutdown().await;
}
