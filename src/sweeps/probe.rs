//! `key_probe`: the reconciler. Asks each KEK's KMS what the key is (metadata and a test
//! wrap/unwrap, see [`crate::reconcile`]) and converges byokd's record to the answer in both
//! directions, so a lost event never leaves a revoked key in use, nor a restored key blocked.
//!
//! A definitive answer goes through [`lifecycle::apply_observations`], like a confirmation:
//! it settles claims, starts the re-wrap a lost rotation event would have, recomputes access,
//! and writes an audit row only when something changed. A timeout, a server error or a 404
//! that is not the KMS's own only starts an outage episode; after the grace period it
//! notifies `key.unreachable` once, and never changes the tenant's access.

use crate::kms::Kms;
use crate::lifecycle::{self, Answer, Unanswered};
use crate::notify::catalog::{KeyUnreachable, Notification};
use crate::reconcile;
use crate::store::{ProbeRecord, ProbeTarget, Store, StoreError};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// Probe tuning from the schedule's params.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// How long a key may be unreachable before `key.unreachable` is notified.
    pub unreachable_grace: Duration,
    /// Per-key timeout.
    pub timeout: Duration,
    /// Keys probed at once.
    pub concurrency: usize,
}

/// What a probe run found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProbeReport {
    /// Keys probed.
    pub probed: usize,
    /// Keys whose KMS answered and agreed with what byokd recorded.
    pub unchanged: usize,
    /// Changes found and applied (state, revocation, version).
    pub changes: usize,
    /// Keys whose KMS could not be reached.
    pub unreachable: usize,
    /// `key.unreachable` notifications queued now.
    pub unreachable_notified: usize,
    /// Keys of providers byokd has no settings for.
    pub not_configured: usize,
    /// Revocations in force that the KMS did not confirm (raised to operators).
    pub unconfirmed: usize,
}

/// Probes every KEK that is not destroyed or retired.
pub async fn key_probe(
    store: &Store,
    kms: &Kms,
    settings: &ProbeSettings,
    now: DateTime<Utc>,
) -> Result<ProbeReport, StoreError> {
    let targets = store.probe_targets().await?;
    let mut report = ProbeReport {
        probed: targets.len(),
        ..ProbeReport::default()
    };
    let by_id: std::collections::HashMap<i64, ProbeTarget> =
        targets.iter().map(|t| (t.key.kek_id, t.clone())).collect();
    let answers = reconcile::observe_all(
        kms,
        targets.into_iter().map(|t| t.key).collect(),
        settings.timeout,
        settings.concurrency,
    )
    .await;
    for (key, answer) in &answers {
        let Some(target) = by_id.get(&key.kek_id) else {
            continue;
        };
        match answer {
            Answer::NotConfigured => report.not_configured += 1,
            Answer::Indeterminate(error) => {
                report.unreachable += 1;
                unreachable(store, target, error, settings, &mut report, now).await?;
            }
            Answer::Known(_) => {
                store
                    .record_probe(key.kek_id, &ProbeRecord::Answered, now)
                    .await?;
            }
        }
    }
    for chunk in answers.chunks(500) {
        let applied =
            lifecycle::apply_observations(store, chunk, "probe", Unanswered::Leave, now).await?;
        report.changes += applied.changed;
        report.unconfirmed += applied.unconfirmed;
    }
    report.unchanged = report
        .probed
        .saturating_sub(report.changes + report.unreachable + report.not_configured);
    Ok(report)
}

/// Records an outage episode and notifies `key.unreachable` once it outlasts the grace.
async fn unreachable(
    store: &Store,
    target: &ProbeTarget,
    error: &str,
    settings: &ProbeSettings,
    report: &mut ProbeReport,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let kek_id = target.key.kek_id;
    let since = store
        .record_probe(
            kek_id,
            &ProbeRecord::Unreachable {
                error: error.to_owned(),
            },
            now,
        )
        .await?
        .unwrap_or(now);
    let grace = chrono::Duration::from_std(settings.unreachable_grace)
        .unwrap_or(chrono::Duration::minutes(30));
    if !target.unreachable_notified && now - since >= grace {
        let notice = Notification::KeyUnreachable(KeyUnreachable {
            tenant_id: target.tenant.id.clone(),
            provider: target.key.provider,
            key_ref: target.key.key_ref.clone(),
            unreachable_since: since,
            error: error.to_owned(),
        });
        let rows = notice.outbox_rows(Some(&target.tenant), now);
        if store.notify_unreachable(kek_id, &rows, now).await? {
            report.unreachable_notified += 1;
        }
    }
    Ok(())
}
