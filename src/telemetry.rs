//! Logging (tracing, text or JSON) and the Prometheus metrics registry.
//!
//! Every metric byokd exports is named here, once: [`METRICS`] lists each with its type, unit,
//! labels and help text, [`describe`] hands those to the recorder (so `/metrics` carries a
//! `# HELP` line for each), and the code that records a metric uses the constant, never a
//! literal. Histograms get their buckets from the same table; without buckets the exporter
//! would render summaries, which cannot be aggregated across replicas.
//!
//! Labels are bounded sets only (provider, channel, state, outcome, schedule, and the ids of
//! at most [`MAX_JOB_SERIES`] active re-wrap jobs): never a tenant, a key or a DEK. The
//! gauges read from the database and the broker are refreshed by the daemon's collector task
//! (`daemon::collector`).

use crate::config::LogFormat;
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber; `RUST_LOG` overrides the default `info` level.
/// A second call (tests starting several daemons) is a no-op.
pub fn init_logging(format: LogFormat) {
    init_logging_at(format, "info");
}

/// [`init_logging`] with `default` as the filter when `RUST_LOG` is not set (`byokd demo`
/// keeps the daemon's logs to warnings, under its own timeline).
pub fn init_logging_at(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A gauge not set for this long leaves `/metrics`: the series of a finished re-wrap job
/// goes away instead of lingering at its last value. The collector refreshes every gauge it
/// owns each round, and `metrics.collect_interval_ms` is at most a minute.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The process-wide metrics recorder, installed on first use, with every metric described.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let mut builder =
            PrometheusBuilder::new().idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT));
        for def in METRICS {
            if let Some(buckets) = def.buckets.filter(|b| !b.is_empty()) {
                // Fails only for an empty bucket list, filtered out above (and none in the
                // table, unit-tested); the fallback is never taken.
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(def.name.to_owned()), buckets)
                    .unwrap_or_else(|_| PrometheusBuilder::new());
            }
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed already, in which case ours simply
        // renders nothing; byokd installs no other.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// Most re-wrap jobs with a `byokd_rewrap_deks_remaining` series of their own (the oldest
/// active ones), so a burst of rotations cannot blow up the label set.
pub const MAX_JOB_SERIES: i64 = 100;

/// The process metrics collector (CPU, memory, fds, threads, start time).
pub fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// The build's git commit, when the build was given one (`BYOKD_GIT_SHA` at compile time).
pub fn git_sha() -> &'static str {
    option_env!("BYOKD_GIT_SHA")
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
}

/// The kind of a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution, in buckets.
    Histogram,
}

impl Kind {
    /// The Prometheus `# TYPE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its name in `/metrics`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// What it counts or measures in (`None`: a plain count).
    pub unit: Option<Unit>,
    /// Its labels.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
    /// Histogram buckets (upper bounds, in the metric's unit).
    pub buckets: Option<&'static [f64]>,
}

/// Seconds from a fraction of a millisecond to five minutes: intake and revocation.
const PIPELINE_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Unwraps are answered from the cache in well under a millisecond, or after a KMS call.
const UNWRAP_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// A KMS call: local keyring in milliseconds, remote KMSs up to their timeouts.
const KMS_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Notifications wait out retries with backoff: from a second to a day.
const DELIVERY_SECONDS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
];
/// Events applied in one transaction (`amqp.batch_size` is at most a few thousand).
const BATCH_EVENTS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
];

macro_rules! metric {
    ($const:ident, $name:literal, $kind:ident, $unit:expr, [$($label:literal),*], $buckets:expr, $help:literal) => {
        #[doc = $help]
        pub const $const: &str = $name;
    };
}

macro_rules! metrics_table {
    ($($const:ident, $name:literal, $kind:ident, $unit:expr, [$($label:literal),*], $buckets:expr, $help:literal;)+) => {
        $(metric!($const, $name, $kind, $unit, [$($label),*], $buckets, $help);)+

        /// Every metric byokd describes, in `/metrics` order of importance.
        pub const METRICS: &[Metric] = &[
            $(Metric {
                name: $name,
                kind: Kind::$kind,
                unit: $unit,
                labels: &[$($label),*],
                help: $help,
                buckets: $buckets,
            }),+
        ];
    };
}

metrics_table! {
    // Intake.
    EVENTS, "byokd_events_total", Counter, None, ["kind", "outcome"], None,
        "Lifecycle events consumed, by event kind and what became of them (applied, confirming, unchanged, stale, duplicate, unknown_key, ignored_destroyed; ignored for provider messages that change nothing, kind other).";
    EVENTS_DEAD_LETTERED, "byokd_events_dead_lettered_total", Counter, None, [], None,
        "Lifecycle messages byokd could not apply and sent to the dead-letter queue.";
    EVENT_BATCH_SIZE, "byokd_event_batch_size", Histogram, None, [], Some(BATCH_EVENTS),
        "Events applied per database transaction by the consumer.";
    EVENT_COMMIT_LATENCY, "byokd_event_commit_latency_seconds", Histogram, Some(Unit::Seconds), ["from"], Some(PIPELINE_SECONDS),
        "Time from a lifecycle message's publication (from=published: its AMQP timestamp, whole seconds) or, without one, its receipt (from=received) to the commit that applied it.";
    REVOCATION_EFFECT_LATENCY, "byokd_revocation_effect_latency_seconds", Histogram, Some(Unit::Seconds), [], Some(PIPELINE_SECONDS),
        "Time from the receipt of a revoking event (disabled, deletion scheduled, destroyed, access revoked, expired) to the commit that made its tenant inaccessible.";
    CONSUMER_UP, "byokd_consumer_up", Gauge, None, ["queue"], None,
        "1 while the consumer of the queue is subscribed and applying events, else 0.";
    DEAD_LETTER_QUEUE_MESSAGES, "byokd_dead_letter_queue_messages", Gauge, None, [], None,
        "Messages in the lifecycle dead-letter queue (read by a passive declare; the same value on every replica).";
    // Key state and access.
    REVOCATIONS_UNCONFIRMED, "byokd_revocations_unconfirmed_total", Counter, None, [], None,
        "Revoking events the KMS did not confirm when asked (the tenant stays blocked; operators are told).";
    KEYS, "byokd_keys", Gauge, None, ["provider", "state"], None,
        "Tenant KEKs in use (not retired), by provider and state.";
    KEYS_UNREACHABLE, "byokd_keys_unreachable", Gauge, None, ["provider"], None,
        "Tenant KEKs whose KMS the last probe could not reach, by provider.";
    TENANTS, "byokd_tenants", Gauge, None, ["access"], None,
        "Tenants by access (accessible, encrypt_blocked, inaccessible).";
    // KMS.
    KMS_REQUEST_DURATION, "byokd_kms_request_duration_seconds", Histogram, Some(Unit::Seconds), ["provider", "operation"], Some(KMS_SECONDS),
        "Duration of KMS calls by provider and operation (describe, wrap, unwrap, rewrap), failed ones included.";
    KMS_ERRORS, "byokd_kms_errors_total", Counter, None, ["provider", "operation", "class"], None,
        "KMS call failures by provider, operation and class (not_found, unusable, access_denied, unreachable, integrity, sealed_material, no_such_version, invalid_key_ref, not_configured, store); a batch counts once per failed item.";
    AWS_KMS_THROTTLED, "byokd_aws_kms_throttled_total", Counter, None, [], None,
        "AWS KMS requests answered with ThrottlingException (each is retried and, if it persists, an outage: never a revocation).";
    GCP_KMS_THROTTLED, "byokd_gcp_kms_throttled_total", Counter, None, [], None,
        "Cloud KMS requests answered with 429 RESOURCE_EXHAUSTED (each slows the quota and is retried; if it persists, an outage: never a revocation).";
    // Key access.
    UNWRAP_DURATION, "byokd_unwrap_duration_seconds", Histogram, Some(Unit::Seconds), ["route", "outcome"], Some(UNWRAP_SECONDS),
        "Duration of DEK unwrap requests (route single or batch; outcome ok or error), from the handler's start to its answer.";
    ACCESS_ATTEMPTS_AUDITED, "byokd_access_attempts_audited_total", Counter, None, [], None,
        "Key-access attempts (unwraps, DEK creations, refused tokens) written to the audit trail.";
    AUDIT_WRITE_FAILURES, "byokd_audit_write_failures_total", Counter, None, [], None,
        "Failed writes of key-access audit batches (key access fails closed meanwhile).";
    AUDIT_SPOOL_BACKLOG_BYTES, "byokd_audit_spool_backlog_bytes", Gauge, Some(Unit::Bytes), [], None,
        "Bytes of key-access attempts in this replica's audit spool not yet shipped to the audit trail; above access.audit_spool_max_bytes attempts are refused.";
    AUDIT_SPOOL_BACKLOG_ROWS, "byokd_audit_spool_backlog_rows", Gauge, None, [], None,
        "Key-access attempts in this replica's audit spool not yet shipped to the audit trail.";
    AUDIT_SPOOL_OLDEST_SECONDS, "byokd_audit_spool_oldest_unshipped_seconds", Gauge, Some(Unit::Seconds), [], None,
        "Age of the oldest attempt in this replica's audit spool not yet shipped (an upper bound; 0 when none is waiting).";
    AUDIT_SHIP_FAILURES, "byokd_audit_ship_failures_total", Counter, None, [], None,
        "Failed shipments of spooled key-access attempts to the audit trail (retried; the spool keeps them).";
    AUDIT_SPOOL_DAMAGED, "byokd_audit_spool_damaged_records_total", Counter, None, ["kind"], None,
        "Spool records that could not be shipped: kind=torn (a write cut by a crash, at a segment's end) or corrupt (checksum mismatch).";
    ACCESS_ANOMALIES, "byokd_access_anomalies_total", Counter, None, ["rule"], None,
        "Key-access anomaly alerts raised, by rule.";
    ACCESS_MESSAGES_PUBLISHED, "byokd_access_messages_published_total", Counter, None, [], None,
        "Tenant access changes published to the platform's access exchange.";
    // Notifications.
    NOTIFICATIONS_DELIVERED, "byokd_notifications_delivered_total", Counter, None, ["channel"], None,
        "Notifications delivered, by channel (email, webhook).";
    NOTIFICATION_FAILURES, "byokd_notification_failures_total", Counter, None, ["channel", "outcome"], None,
        "Failed notification attempts by channel and what follows (retry, dead).";
    NOTIFICATION_DELIVERY_LATENCY, "byokd_notification_delivery_latency_seconds", Histogram, Some(Unit::Seconds), ["channel"], Some(DELIVERY_SECONDS),
        "Time from a notification's enqueueing to its delivery, retries included, by channel (amqp for access messages, email, webhook).";
    OUTBOX_ROWS, "byokd_outbox_rows", Gauge, None, ["channel", "status"], None,
        "Undelivered outbox rows by channel and status (pending, dead).";
    OUTBOX_OLDEST_AGE, "byokd_outbox_oldest_age_seconds", Gauge, Some(Unit::Seconds), ["channel", "status"], None,
        "Age of the oldest undelivered outbox row by channel and status; 0 when there is none.";
    // Re-wrap.
    REWRAP_DEKS, "byokd_rewrap_deks_total", Counter, None, ["outcome"], None,
        "DEKs processed by re-wrap jobs (rewrapped, failed).";
    REWRAP_JOBS_FINISHED, "byokd_rewrap_jobs_finished_total", Counter, None, ["state"], None,
        "Re-wrap jobs finished, by final state.";
    REWRAP_DEKS_REMAINING, "byokd_rewrap_deks_remaining", Gauge, None, ["job_id", "kind", "state"], None,
        "DEKs an active re-wrap job (pending, running, waiting) still has to move, by job id (label job_id: `job` is Prometheus' own), kind and state; the oldest 100 active jobs only.";
    // Schedules.
    SCHEDULE_LAST_SUCCESS, "byokd_schedule_last_success_timestamp_seconds", Gauge, Some(Unit::Seconds), ["schedule"], None,
        "Unix time of the last successful run of each schedule, on any replica; absent until its first success.";
    SCHEDULE_INTERVAL, "byokd_schedule_interval_seconds", Gauge, Some(Unit::Seconds), ["schedule"], None,
        "The interval between a schedule's next two ticks, for alerting on runs overdue.";
    // The daemon itself.
    BUILD_INFO, "byokd_build_info", Gauge, None, ["version", "git_sha"], None,
        "Always 1; the labels name the running build (git_sha unknown when built outside git).";
    COLLECTOR_ERRORS, "byokd_metrics_collector_errors_total", Counter, None, ["source"], None,
        "Failed refreshes of collector gauges, by source (database, broker); those gauges keep their last value meanwhile.";
}

/// Process metrics (from `metrics-process`, described by it): the standard Prometheus
/// process collector's names.
pub const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];

/// Describes every metric to the installed recorder. [`metrics`] calls it once.
pub fn describe() {
    for def in METRICS {
        match (def.kind, def.unit) {
            (Kind::Counter, Some(unit)) => metrics::describe_counter!(def.name, unit, def.help),
            (Kind::Counter, None) => metrics::describe_counter!(def.name, def.help),
            (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(def.name, unit, def.help),
            (Kind::Gauge, None) => metrics::describe_gauge!(def.name, def.help),
            (Kind::Histogram, Some(unit)) => {
                metrics::describe_histogram!(def.name, unit, def.help);
            }
            (Kind::Histogram, None) => metrics::describe_histogram!(def.name, def.help),
        }
    }
    process().describe();
}

/// Every metric name a dashboard or an alert may use: byokd's own, the series a histogram
/// renders (`_bucket`, `_sum`, `_count`) and the process metrics.
pub fn exported_names() -> Vec<String> {
    let mut names = Vec::new();
    for def in METRICS {
        names.push(def.name.to_owned());
        if def.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.push(format!("{}{suffix}", def.name));
            }
        }
    }
    names.extend(PROCESS_METRICS.iter().map(|n| (*n).to_owned()));
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_prometheus_names_with_unit_suffixes() {
        let mut seen = HashSet::new();
        for def in METRICS {
            assert!(seen.insert(def.name), "{} listed twice", def.name);
            assert!(def.name.starts_with("byokd_"), "{}", def.name);
            assert!(
                def.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                def.name
            );
            assert_eq!(
                def.kind == Kind::Counter,
                def.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                def.name
            );
            if def.unit == Some(Unit::Seconds) {
                assert!(
                    def.name.ends_with("_seconds"),
                    "{}: the unit is in the name",
                    def.name
                );
            }
            assert!(
                def.help.len() > 20 && def.help.ends_with('.'),
                "{}",
                def.name
            );
        }
    }

    #[test]
    fn every_histogram_has_increasing_buckets_and_nothing_else_has_any() {
        for def in METRICS {
            match (def.kind, def.buckets) {
                (Kind::Histogram, Some(b)) => {
                    assert!(!b.is_empty(), "{}", def.name);
                    assert!(b.windows(2).all(|w| w[0] < w[1]), "{}", def.name);
                }
                (Kind::Histogram, None) => panic!("{} has no buckets", def.name),
                (_, Some(_)) => panic!("{} has buckets but is no histogram", def.name),
                (_, None) => {}
            }
        }
    }

    #[test]
    fn no_label_names_a_tenant_key_or_dek() {
        for def in METRICS {
            for label in def.labels {
                assert!(
                    ![
                        "tenant",
                        "tenant_id",
                        "key_ref",
                        "dek",
                        "dek_id",
                        "recipient"
                    ]
                    .contains(label),
                    "{} has the unbounded label {label}",
                    def.name
                );
            }
        }
    }

    #[test]
    fn exported_names_cover_histogram_series_and_process_metrics() {
        let names = exported_names();
        assert!(names.contains(&"byokd_unwrap_duration_seconds_bucket".to_owned()));
        assert!(names.contains(&"byokd_events_total".to_owned()));
        assert!(names.contains(&"process_resident_memory_bytes".to_owned()));
        assert!(!names.contains(&"byokd_events_total_bucket".to_owned()));
    }
}
