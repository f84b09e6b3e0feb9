//! `expiry_scan`: tiered warnings before a key expires, and expiry when its date has passed.

use crate::lifecycle::{self, Cause};
use crate::notify::catalog::{self, KeyExpiring, Notification};
use crate::store::{Store, StoreError};
use chrono::{DateTime, Utc};

/// What a scan did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExpiryReport {
    /// Enabled primary keys inside the largest threshold.
    pub keys_in_window: usize,
    /// Keys inside one of the thresholds.
    pub keys_warned: usize,
    /// Notifications queued now (one already queued for the same key, expiry date and
    /// threshold is not queued again).
    pub notifications_queued: u64,
    /// Tenants whose access changed because their key's date passed.
    pub expired: usize,
}

/// The tightest threshold (days) `left` is within, from thresholds sorted high to low.
pub fn threshold_for(left: chrono::Duration, thresholds_days: &[u32]) -> Option<u32> {
    thresholds_days
        .iter()
        .copied()
        .filter(|t| left <= chrono::Duration::days(i64::from(*t)))
        .min()
}

/// Scans keys expiring within the largest threshold of `now`.
///
/// Warnings are outbox rows whose dedupe key holds the key, its expiry date and the
/// threshold, so each threshold fires once per expiry date however often the scan runs (and
/// on however many replicas), and a new date re-arms them. Expiry itself needs no event: a
/// key past its date is expired wherever the date came from. The scan recomputes the access
/// of tenants whose key's date has passed, so the change is stored, broadcast and notified
/// once (the API derives access from the clock too, so it never waits for the scan).
pub async fn expiry_scan(
    store: &Store,
    thresholds_days: &[u32],
    now: DateTime<Utc>,
) -> Result<ExpiryReport, StoreError> {
    let widest = thresholds_days.iter().copied().max().unwrap_or(0);
    let keys = store
        .expiring_keks(now + chrono::Duration::days(i64::from(widest)))
        .await?;
    let mut report = ExpiryReport {
        keys_in_window: keys.len(),
        ..ExpiryReport::default()
    };
    let mut warnings = Vec::new();
    let mut expired = Vec::new();
    for key in &keys {
        let left = key.expires_at - now;
        if left <= chrono::Duration::zero() {
            expired.push(key);
            continue;
        }
        let Some(threshold) = threshold_for(left, thresholds_days) else {
            continue;
        };
        report.keys_warned += 1;
        let warning = Notification::KeyExpiring(KeyExpiring {
            tenant_id: key.tenant.id.clone(),
            provider: key.provider,
            key_ref: key.key_ref.clone(),
            expires_at: key.expires_at,
            days_left: catalog::days_left(key.expires_at, now),
            threshold_days: Some(threshold),
        });
        warnings.extend(warning.outbox_rows(Some(&key.tenant), now));
    }
    for chunk in warnings.chunks(2000) {
        report.notifications_queued += store.enqueue_outbox(chunk).await?;
    }
    // A tenant already blocked has nothing to change (an expired key stays in the window).
    for key in expired
        .into_iter()
        .filter(|k| k.tenant.access == crate::domain::Access::Accessible)
    {
        let cause = Cause::new("expiry", Some((key.provider, key.key_ref.clone())));
        report.expired +=
            lifecycle::refresh_access(store, std::slice::from_ref(&key.tenant.id), &cause, now)
                .await?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_tightest_threshold_crossed() {
        let t = [30, 14, 7, 1];
        let d = chrono::Duration::days;
        assert_eq!(threshold_for(d(31), &t), None);
        assert_eq!(threshold_for(d(30), &t), Some(30));
        assert_eq!(threshold_for(d(20), &t), Some(30));
        assert_eq!(threshold_for(d(14), &t), Some(14));
        assert_eq!(threshold_for(d(3), &t), Some(7));
        assert_eq!(threshold_for(chrono::Duration::hours(5), &t), Some(1));
    }
}
