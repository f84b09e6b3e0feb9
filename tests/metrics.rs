//! `/metrics` against the real daemon, PostgreSQL and RabbitMQ: after a revocation, a DEK
//! created and unwrapped with a client token, a notification delivered, a dead letter, a
//! refused key registration and a schedule run, every metric family on the page has HELP
//! and TYPE lines matching what byokd describes, none is undescribed, and the latency
//! histograms and the collector's gauges show that work with plausible values.

mod common;

use byokd::telemetry::{Kind, METRICS, exported_names};
use common::{TestApp, at, wait_for};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One scrape of `/metrics`, parsed.
#[derive(Debug, Default)]
struct Scrape {
    help: HashMap<String, String>,
    types: HashMap<String, String>,
    /// (series name, labels as written, value).
    samples: Vec<(String, String, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                scrape.help.insert(name.to_owned(), help.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
                scrape.types.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').expect("sample has a value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, labels.trim_end_matches('}')),
                    None => (series, ""),
                };
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
                scrape
                    .samples
                    .push((name.to_owned(), labels.to_owned(), value));
            }
        }
        scrape
    }

    /// Samples of `name` whose labels include every `key="value"` of `with`.
    fn values(&self, name: &str, with: &[(&str, &str)]) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && with
                        .iter()
                        .all(|(k, v)| labels.split(',').any(|l| l == format!("{k}=\"{v}\"")))
            })
            .map(|(_, _, v)| *v)
            .collect()
    }

    /// The sum over the matching samples (0 when none).
    fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.values(name, with).iter().sum()
    }
}

async fn scrape(app: &TestApp) -> Scrape {
    let r = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status(), 200);
    Scrape::parse(&r.text().await.expect("body"))
}

/// Checks a histogram's series with `with` labels: cumulative buckets, `+Inf` equal to the
/// count, at least `min_count` observations, each between 0 and `at_most` seconds.
fn check_histogram(s: &Scrape, name: &str, with: &[(&str, &str)], min_count: f64, at_most: f64) {
    let count = s.sum(&format!("{name}_count"), with);
    let sum = s.sum(&format!("{name}_sum"), with);
    assert!(
        count >= min_count,
        "{name}{with:?}: {count} observations, expected at least {min_count}"
    );
    assert!(
        sum >= 0.0 && sum <= count * at_most,
        "{name}{with:?}: sum {sum} over {count} observations is outside 0..={at_most} each"
    );
    let mut buckets: Vec<(f64, f64)> = s
        .samples
        .iter()
        .filter(|(n, labels, _)| {
            n == &format!("{name}_bucket")
                && with
                    .iter()
                    .all(|(k, v)| labels.split(',').any(|l| l == format!("{k}=\"{v}\"")))
        })
        .map(|(_, labels, v)| {
            let le = labels
                .split(',')
                .find_map(|l| l.strip_prefix("le=\""))
                .expect("le label")
                .trim_end_matches('"');
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("numeric le")
            };
            (bound, *v)
        })
        .collect();
    assert!(
        buckets.len() > 2,
        "{name}{with:?} renders buckets, not a summary"
    );
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Several label sets may match `with`: compare per bound totals.
    let mut totals: Vec<(f64, f64)> = Vec::new();
    for (bound, v) in buckets {
        match totals.last_mut() {
            Some((b, t)) if *b == bound => *t += v,
            _ => totals.push((bound, v)),
        }
    }
    assert!(
        totals.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name}{with:?}: buckets are not cumulative: {totals:?}"
    );
    assert_eq!(
        totals.last().map(|t| t.1),
        Some(count),
        "{name}: +Inf == count"
    );
}

fn one_second_prune_schedule() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("byokd-metrics-schedules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("schedules dir");
    std::fs::write(
        dir.join("prune.toml"),
        "name = \"metrics-prune\"\ncron = \"* * * * * *\"\njob = \"outbox_prune\"\n\n[params]\nretention_days = 30\n",
    )
    .expect("schedule file");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_described_and_show_the_work_done() {
    let started = Instant::now();
    let started_unix = chrono::Utc::now().timestamp() as f64;
    let schedules = one_second_prune_schedule();
    let app = TestApp::spawn_with(|c| {
        c.metrics.collect_interval_ms = 200;
        c.schedules_dir = schedules.clone();
    })
    .await;
    app.tenant_with_key("mt", "key-mt").await;

    // A client creates a DEK and unwraps it.
    let r = app
        .post(
            "/v1/clients",
            json!({ "name": "svc-mt", "tenants": ["mt"] }),
        )
        .await;
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let r = app
        .http
        .post(app.url("/v1/tenants/mt/deks"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("create DEK");
    assert_eq!(r.status(), 201);
    let dek = r.json::<Value>().await.expect("json")["dek_id"]
        .as_str()
        .expect("dek_id")
        .to_owned();
    let r = app
        .http
        .post(app.url(&format!("/v1/tenants/mt/deks/{dek}/unwrap")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("unwrap");
    assert_eq!(r.status(), 200);

    // A key that does not exist at the KMS is refused at registration: a KMS error.
    let r = app
        .post(
            "/v1/tenants/mt/keks",
            json!({ "provider": "local", "key_ref": "no-such-key" }),
        )
        .await;
    assert!(r.status().is_client_error(), "{}", r.status());

    // The tenant's key is disabled: the revocation takes effect and the contact is told.
    app.kms_do("key-mt", "disabled", &json!({})).await;
    app.publish("disabled", "key-mt", at(3500), json!({})).await;
    // An event for an unknown key with the publisher's timestamp, and one message that is
    // not an event at all.
    let now = chrono::Utc::now().timestamp() as u64;
    app.channel
        .basic_publish(
            app.config.amqp.lifecycle_exchange.as_str().into(),
            "local.disabled".into(),
            BasicPublishOptions::default(),
            common::canonical("ts-1", "disabled", "nobody-s-key", at(3500), json!({}))
                .to_string()
                .as_bytes(),
            BasicProperties::default().with_timestamp(now),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    app.publish_raw(b"this is not an event").await;

    let pool = app.pool.clone();
    wait_for(
        "the contact's email delivered",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM outbox
                     WHERE tenant_id = 'mt' AND channel = 'email' AND status = 'delivered'",
                )
                .fetch_one(&pool)
                .await
                .is_ok_and(|n| n >= 1)
            }
        },
    )
    .await;
    // The collector catches up within a few rounds.
    let mut last = Scrape::default();
    let ready = |s: &Scrape| {
        s.sum("byokd_tenants", &[("access", "inaccessible")]) == 1.0
            && s.sum("byokd_dead_letter_queue_messages", &[]) == 1.0
            && !s
                .values(
                    "byokd_schedule_last_success_timestamp_seconds",
                    &[("schedule", "metrics-prune")],
                )
                .is_empty()
            && s.sum("byokd_events_total", &[("outcome", "unknown_key")]) >= 1.0
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        last = scrape(&app).await;
        if ready(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = last;
    assert!(ready(&s), "collector gauges never caught up: {s:#?}");
    let elapsed = started.elapsed().as_secs_f64();

    // Every family on the page is one byokd describes, with HELP and the right TYPE.
    let known = exported_names();
    for (family, kind) in &s.types {
        assert!(
            known.contains(family),
            "{family} is exported but not described in telemetry"
        );
        assert!(
            s.help.get(family).is_some_and(|h| !h.is_empty()),
            "{family} has no HELP"
        );
        if let Some(def) = METRICS.iter().find(|d| d.name == family) {
            assert_eq!(kind, def.kind.as_str(), "{family}: TYPE");
        }
    }
    for (name, _, _) in &s.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|f| s.types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(s.types.contains_key(family), "{name} has no TYPE line");
    }
    // What this test exercised is all there.
    for def in METRICS {
        let expected_absent = [
            // Nothing in this test re-wraps, raises an anomaly, fails an audit write,
            // leaves a revocation unconfirmed, fails the collector, or is throttled by AWS
            // (tests/aws_kms.rs covers throttling).
            "byokd_rewrap_deks_total",
            "byokd_rewrap_jobs_finished_total",
            "byokd_rewrap_deks_remaining",
            "byokd_access_anomalies_total",
            "byokd_audit_write_failures_total",
            "byokd_audit_spool_damaged_records_total",
            "byokd_revocations_unconfirmed_total",
            "byokd_metrics_collector_errors_total",
            "byokd_notification_failures_total",
            "byokd_aws_kms_throttled_total",
            "byokd_gcp_kms_throttled_total",
        ];
        if !expected_absent.contains(&def.name) {
            assert!(
                s.types.contains_key(def.name),
                "{} ({}) is missing from /metrics",
                def.name,
                def.kind.as_str()
            );
        }
        if def.kind == Kind::Histogram {
            assert!(
                s.help.contains_key(def.name) || !s.types.contains_key(def.name),
                "{}",
                def.name
            );
        }
    }
    for process in [
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    ] {
        assert!(s.help.contains_key(process), "{process} has no HELP");
    }

    // Intake.
    assert!(
        s.sum(
            "byokd_events_total",
            &[("kind", "disabled"), ("outcome", "applied")]
        ) >= 1.0
    );
    assert!(s.sum("byokd_events_dead_lettered_total", &[]) >= 1.0);
    check_histogram(
        &s,
        "byokd_event_commit_latency_seconds",
        &[("from", "received")],
        1.0,
        elapsed,
    );
    // The publisher's timestamp has whole seconds: allow one more.
    check_histogram(
        &s,
        "byokd_event_commit_latency_seconds",
        &[("from", "published")],
        1.0,
        elapsed + 1.0,
    );
    check_histogram(
        &s,
        "byokd_revocation_effect_latency_seconds",
        &[],
        1.0,
        elapsed,
    );
    // Only the revocation that made a tenant inaccessible counts, not the one for a key no
    // tenant has.
    assert_eq!(
        s.sum("byokd_revocation_effect_latency_seconds_count", &[]),
        1.0
    );
    check_histogram(&s, "byokd_event_batch_size", &[], 1.0, 10_000.0);
    assert_eq!(
        s.values(
            "byokd_consumer_up",
            &[("queue", app.config.amqp.lifecycle_queue.as_str())]
        ),
        vec![1.0]
    );
    assert_eq!(s.sum("byokd_dead_letter_queue_messages", &[]), 1.0);

    // Key access and the KMS.
    check_histogram(
        &s,
        "byokd_unwrap_duration_seconds",
        &[("route", "single"), ("outcome", "ok")],
        1.0,
        elapsed,
    );
    for operation in ["describe", "wrap", "unwrap"] {
        check_histogram(
            &s,
            "byokd_kms_request_duration_seconds",
            &[("provider", "local"), ("operation", operation)],
            1.0,
            elapsed,
        );
    }
    assert!(
        s.sum(
            "byokd_kms_errors_total",
            &[("provider", "local"), ("class", "not_found")]
        ) >= 1.0,
        "the refused registration counts as a not_found KMS error"
    );

    // Notifications.
    check_histogram(
        &s,
        "byokd_notification_delivery_latency_seconds",
        &[("channel", "email")],
        1.0,
        elapsed,
    );
    check_histogram(
        &s,
        "byokd_notification_delivery_latency_seconds",
        &[("channel", "amqp")],
        1.0,
        elapsed,
    );
    assert!(
        s.sum(
            "byokd_notifications_delivered_total",
            &[("channel", "email")]
        ) >= 1.0
    );
    for status in ["pending", "dead"] {
        assert!(
            !s.values(
                "byokd_outbox_rows",
                &[("channel", "email"), ("status", status)]
            )
            .is_empty()
        );
        for age in s.values("byokd_outbox_oldest_age_seconds", &[("status", status)]) {
            assert!((0.0..=elapsed).contains(&age), "outbox age {age}");
        }
    }

    // Keys, tenants, schedules, the build and the process.
    // One key in use (the refused one was never recorded); its state column follows the
    // KMS once the revocation is confirmed there, so either state may show.
    assert_eq!(s.sum("byokd_keys", &[("provider", "local")]), 1.0);
    assert_eq!(s.sum("byokd_keys", &[("provider", "vault")]), 0.0);
    assert_eq!(s.sum("byokd_tenants", &[("access", "accessible")]), 0.0);
    let ran = s.sum(
        "byokd_schedule_last_success_timestamp_seconds",
        &[("schedule", "metrics-prune")],
    );
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (started_unix - 1.0..=now + 1.0).contains(&ran),
        "last success {ran} outside the test's run {started_unix}..{now}"
    );
    assert_eq!(
        s.values(
            "byokd_schedule_interval_seconds",
            &[("schedule", "metrics-prune")]
        ),
        vec![1.0]
    );
    assert_eq!(
        s.values(
            "byokd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        vec![1.0]
    );
    assert!(s.sum("process_resident_memory_bytes", &[]) > 1_000_000.0);
    let process_start = s.sum("process_start_time_seconds", &[]);
    assert!(process_start > 0.0 && process_start <= now + 1.0);
    assert!(s.sum("process_open_fds", &[]) > 0.0);

    // No label carries a tenant, key or DEK.
    for (name, labels, _) in &s.samples {
        for secretish in [
            "mt\"",
            "key-mt",
            "nobody-s-key",
            dek.as_str(),
            token.as_str(),
        ] {
            assert!(
                !labels.contains(secretish),
                "{name}{{{labels}}} names {secretish}"
            );
        }
    }
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(schedules);
}
