//! `anomaly_scan`: the key-access anomaly rules, read from the audit trail of the last
//! window (so every replica's attempts count, whichever served them).
//!
//! * `client_rate`: a client unwrapping more than `rate_factor` times its own baseline (its
//!   mean per window over the last `baseline_windows`, never less than `rate_floor`);
//! * `tenant_refusals`: more than `refused_per_window` refused attempts on one tenant;
//! * `inaccessible_attempts`: unwraps attempted on a tenant that became inaccessible less
//!   than `inaccessible_within` ago (a service that does not honour the revocation);
//! * `bad_token`: an unknown or revoked token used more than `bad_token_per_window` times.
//!
//! A rule that fires records an alert (`GET /v1/alerts`), counts in
//! `byokd_access_anomalies_total{rule}` and notifies the operators, once per rule, subject
//! and `alert_window` (the alert's unique key holds all three).

use crate::notify::catalog::{AccessAnomaly, Notification};
use crate::store::access::NewAlert;
use crate::store::{Store, StoreError};
use chrono::{DateTime, Duration, DurationRound, Utc};
use serde_json::json;
use std::collections::HashMap;

/// Thresholds of the rules (`params` of an `anomaly_scan` schedule).
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyRules {
    /// The window each scan looks at, ending at the scan.
    pub window: Duration,
    /// `client_rate` fires above this multiple of the client's baseline.
    pub rate_factor: f64,
    /// The smallest baseline (per window) the factor applies to.
    pub rate_floor: f64,
    /// Windows the baseline is averaged over.
    pub baseline_windows: i32,
    /// `tenant_refusals` fires above this many refusals per window.
    pub refused_per_window: i64,
    /// `inaccessible_attempts` looks at tenants inaccessible for less than this.
    pub inaccessible_within: Duration,
    /// `bad_token` fires above this many uses of one bad token per window.
    pub bad_token_per_window: i64,
    /// One alert per rule and subject per this much time.
    pub alert_window: Duration,
}

impl Default for AnomalyRules {
    fn default() -> Self {
        AnomalyRules {
            window: Duration::minutes(1),
            rate_factor: 5.0,
            rate_floor: 100.0,
            baseline_windows: 60,
            refused_per_window: 20,
            inaccessible_within: Duration::minutes(10),
            bad_token_per_window: 10,
            alert_window: Duration::hours(1),
        }
    }
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AnomalyReport {
    /// Rules that fired (including ones already alerted in this alert window).
    pub fired: usize,
    /// New alerts raised (and notified).
    pub raised: usize,
}

/// Evaluates the rules over `[now - window, now)`.
///
/// # Errors
///
/// Store errors.
pub async fn anomaly_scan(
    store: &Store,
    rules: &AnomalyRules,
    now: DateTime<Utc>,
) -> Result<AnomalyReport, StoreError> {
    let from = now - rules.window;
    let counts = store.attempt_counts(from, now).await?;
    let baselines: HashMap<String, f64> = store
        .client_baselines(from, rules.window, rules.baseline_windows)
        .await?
        .into_iter()
        .collect();
    let inaccessible: HashMap<String, DateTime<Utc>> = store
        .recently_inaccessible(now - rules.inaccessible_within)
        .await?
        .into_iter()
        .collect();
    let window_start = now.duration_trunc(rules.alert_window).unwrap_or(now);
    let mut found = Vec::new();
    for c in &counts {
        let n = c.n as f64;
        match c.group.as_str() {
            "client" => {
                let baseline = baselines.get(&c.subject).copied().unwrap_or(0.0);
                let threshold = rules.rate_factor * baseline.max(rules.rate_floor);
                if n > threshold {
                    found.push(("client_rate", c, None, Some(c.subject.clone()), threshold,
                        format!("{} unwraps in {} s against a baseline of {baseline:.1} per window (threshold {threshold:.0}).",
                            c.n, rules.window.num_seconds())));
                }
            }
            "tenant_refused" if c.n > rules.refused_per_window => {
                found.push((
                    "tenant_refusals",
                    c,
                    c.tenant_id.clone(),
                    None,
                    rules.refused_per_window as f64,
                    format!(
                        "{} refused attempts on the tenant in {} s (threshold {}).",
                        c.n,
                        rules.window.num_seconds(),
                        rules.refused_per_window
                    ),
                ));
            }
            "inaccessible" => {
                if let Some(since) = inaccessible.get(&c.subject) {
                    found.push((
                        "inaccessible_attempts",
                        c,
                        c.tenant_id.clone(),
                        None,
                        0.0,
                        format!(
                            "{} unwraps attempted since the tenant became inaccessible at {}.",
                            c.n,
                            since.format("%H:%M:%S UTC")
                        ),
                    ));
                }
            }
            "token" if c.n > rules.bad_token_per_window => {
                found.push((
                    "bad_token",
                    c,
                    None,
                    None,
                    rules.bad_token_per_window as f64,
                    format!(
                        "an unknown or revoked token (fingerprint {}) was used {} times in {} s.",
                        c.subject,
                        c.n,
                        rules.window.num_seconds()
                    ),
                ));
            }
            _ => {}
        }
    }
    let mut report = AnomalyReport {
        fired: found.len(),
        ..AnomalyReport::default()
    };
    for (rule, count, tenant_id, client, threshold, summary) in found {
        let alert = NewAlert {
            rule: rule.to_owned(),
            subject: count.subject.clone(),
            window_start,
            tenant_id: tenant_id.clone(),
            client: client.clone(),
            observed: count.n as f64,
            threshold,
            detail: json!({ "summary": summary, "scan_from": from, "scan_to": now }),
        };
        if !store.raise_alert(&alert).await? {
            continue;
        }
        report.raised += 1;
        metrics::counter!(crate::telemetry::ACCESS_ANOMALIES, "rule" => rule).increment(1);
        tracing::warn!(rule, subject = %count.subject, observed = count.n, threshold,
            "key-access anomaly");
        let notice = Notification::AccessAnomaly(AccessAnomaly {
            rule: rule.to_owned(),
            subject: count.subject.clone(),
            tenant_id,
            client,
            window_start,
            observed: count.n as f64,
            threshold,
            summary,
        });
        store.enqueue_outbox(&notice.outbox_rows(None, now)).await?;
    }
    Ok(report)
}
