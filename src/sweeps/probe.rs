//! `key_probe`: asks each KEK's KMS whether the key is usable, so a lost event never leaves a
//! revoked key in use, and an unreachable KMS is never taken for a revoked key.
//!
//! A definitive answer that differs from what byokd recorded becomes a lifecycle event with
//! origin `probe` (the audit trail says where it came from) and goes through the same code
//! as a KMS event. A newer key version than recorded becomes a `rotated` event, starting the
//! re-wrap a lost rotation event would have. A timeout or server error only starts an outage
//! episode; after the grace period it notifies `key.unreachable` once, and never changes the
//! tenant's access.

use crate::domain::{EventKind, KeyState, LifecycleEvent, Origin};
use crate::kms::{Kms, KmsError, KmsProvider};
use crate::lifecycle;
use crate::notify::tenant_notifications;
use crate::rewrap::needs_rewrap;
use crate::store::{JobKind, ProbeRecord, ProbeTarget, Store, StoreError};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde_json::json;
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
}

/// What the KMS said about a key, reduced to what byokd records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A definitive answer.
    Known {
        /// Provider-side state.
        state: KeyState,
        /// Whether byokd's access is denied.
        revoked: bool,
        /// Current version, when the KMS told.
        version: Option<String>,
    },
    /// No answer (timeout, connection failure, server error).
    Unreachable(String),
    /// byokd cannot ask this provider.
    NotConfigured,
}

/// Classifies a describe call's outcome. Only a timeout or an error the KMS calls transient
/// is "unreachable"; not found and access denied are answers about the key.
pub fn observe(
    result: Result<Result<crate::kms::KeyInfo, KmsError>, tokio::time::error::Elapsed>,
) -> Observation {
    match result {
        Err(_) => Observation::Unreachable("timed out".to_owned()),
        Ok(Ok(info)) => Observation::Known {
            state: info.state,
            revoked: false,
            version: Some(info.current_version),
        },
        Ok(Err(e)) if e.is_transient() => Observation::Unreachable(e.to_string()),
        Ok(Err(KmsError::NotFound { .. })) => Observation::Known {
            state: KeyState::Destroyed,
            revoked: false,
            version: None,
        },
        Ok(Err(KmsError::AccessDenied { .. })) => Observation::Known {
            state: KeyState::Enabled,
            revoked: true,
            version: None,
        },
        Ok(Err(KmsError::Unusable { state, .. })) => Observation::Known {
            state,
            revoked: false,
            version: None,
        },
        Ok(Err(KmsError::NotConfigured(_))) => Observation::NotConfigured,
        Ok(Err(other)) => Observation::Unreachable(other.to_string()),
    }
}

/// The events that bring byokd's record of `target` in line with what the KMS said.
pub fn events_for(
    target: &ProbeTarget,
    observed: &Observation,
    now: DateTime<Utc>,
) -> Vec<LifecycleEvent> {
    let Observation::Known {
        state,
        revoked,
        version,
    } = observed
    else {
        return Vec::new();
    };
    let mut kinds = Vec::new();
    if *revoked && !target.revoked {
        kinds.push(EventKind::AccessRevoked);
    }
    if !*revoked && target.revoked {
        kinds.push(EventKind::AccessRestored);
    }
    if !*revoked {
        let kind = match (state, target.state) {
            (a, b) if *a == b => None,
            (KeyState::Disabled, _) => Some(EventKind::Disabled),
            (KeyState::PendingDeletion, _) => Some(EventKind::DeletionScheduled),
            (KeyState::Destroyed, _) => Some(EventKind::Destroyed),
            (KeyState::Expired, KeyState::Enabled) => Some(EventKind::Expired),
            (KeyState::Enabled, _) => Some(EventKind::Enabled),
            _ => None,
        };
        kinds.extend(kind);
    }
    let rotated = match (version, &target.current_version) {
        (Some(v), Some(recorded)) => needs_rewrap(JobKind::Rotation, recorded, v),
        (Some(_), None) => true,
        _ => false,
    };
    if rotated {
        kinds.push(EventKind::Rotated);
    }
    kinds
        .into_iter()
        .map(|kind| LifecycleEvent {
            provider: target.provider,
            event_id: format!("probe:{}:{kind}:{}", target.kek_id, now.timestamp_millis()),
            kind,
            key_ref: target.key_ref.clone(),
            version: (kind == EventKind::Rotated)
                .then(|| version.clone())
                .flatten(),
            expires_at: None,
            time: now,
            source: "byokd://sweep/key_probe".to_owned(),
            origin: Origin::Probe,
        })
        .collect()
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
    let observations: Vec<(ProbeTarget, Observation)> = futures_util::stream::iter(targets)
        .map(|target| async move {
            let observed = match kms.provider(target.provider) {
                Ok(p) => observe(
                    tokio::time::timeout(settings.timeout, p.describe(&target.key_ref)).await,
                ),
                Err(_) => Observation::NotConfigured,
            };
            (target, observed)
        })
        .buffer_unordered(settings.concurrency)
        .collect()
        .await;

    let mut events = Vec::new();
    for (target, observed) in &observations {
        match observed {
            Observation::NotConfigured => report.not_configured += 1,
            Observation::Unreachable(error) => {
                report.unreachable += 1;
                let since = store
                    .record_probe(
                        target.kek_id,
                        &ProbeRecord::Unreachable {
                            error: error.clone(),
                        },
                        now,
                    )
                    .await?
                    .unwrap_or(now);
                let grace = chrono::Duration::from_std(settings.unreachable_grace)
                    .unwrap_or(chrono::Duration::minutes(30));
                if !target.unreachable_notified && now - since >= grace {
                    let data = json!({
                        "tenant_id": target.tenant.id,
                        "provider": target.provider,
                        "key_ref": target.key_ref,
                        "unreachable_since": since,
                        "error": error,
                    });
                    let rows = tenant_notifications(
                        &target.tenant,
                        "key.unreachable",
                        &format!("unreachable:{}:{}", target.kek_id, since.timestamp_millis()),
                        data,
                        now,
                    );
                    if store.notify_unreachable(target.kek_id, &rows, now).await? {
                        report.unreachable_notified += 1;
                    }
                }
            }
            Observation::Known { .. } => {
                store
                    .record_probe(target.kek_id, &ProbeRecord::Answered, now)
                    .await?;
                let found = events_for(target, observed, now);
                if found.is_empty() {
                    report.unchanged += 1;
                }
                events.extend(found);
            }
        }
    }
    report.changes = lifecycle::apply_found(store, &events, now).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Access, Provider};
    use crate::store::TenantRow;

    fn target(state: KeyState, revoked: bool, version: &str) -> ProbeTarget {
        ProbeTarget {
            kek_id: 1,
            tenant: TenantRow {
                id: "t".into(),
                access: Access::Accessible,
                access_reason: None,
                contacts: vec![],
                webhooks: vec![],
            },
            provider: Provider::Local,
            key_ref: "k".into(),
            state,
            revoked,
            current_version: Some(version.into()),
            unreachable_since: None,
            unreachable_notified: false,
        }
    }

    fn known(state: KeyState, revoked: bool, version: Option<&str>) -> Observation {
        Observation::Known {
            state,
            revoked,
            version: version.map(str::to_owned),
        }
    }

    fn kinds(t: &ProbeTarget, o: &Observation) -> Vec<EventKind> {
        events_for(t, o, Utc::now())
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    #[test]
    fn definitive_answers_map_to_the_matching_events() {
        let enabled = target(KeyState::Enabled, false, "1");
        assert_eq!(
            kinds(&enabled, &known(KeyState::Enabled, false, Some("1"))),
            vec![]
        );
        assert_eq!(
            kinds(&enabled, &known(KeyState::Disabled, false, None)),
            vec![EventKind::Disabled]
        );
        assert_eq!(
            kinds(&enabled, &known(KeyState::Destroyed, false, None)),
            vec![EventKind::Destroyed]
        );
        assert_eq!(
            kinds(&enabled, &known(KeyState::Enabled, true, None)),
            vec![EventKind::AccessRevoked]
        );
        assert_eq!(
            kinds(&enabled, &known(KeyState::Enabled, false, Some("2"))),
            vec![EventKind::Rotated]
        );
        assert_eq!(
            kinds(&enabled, &known(KeyState::Enabled, false, Some("1"))).len(),
            0
        );
        let disabled = target(KeyState::Disabled, true, "3");
        assert_eq!(
            kinds(&disabled, &known(KeyState::Enabled, false, Some("3"))),
            vec![EventKind::AccessRestored, EventKind::Enabled]
        );
    }

    #[test]
    fn unreachable_is_never_an_answer_about_the_key() {
        let t = target(KeyState::Enabled, false, "1");
        let timeout = Observation::Unreachable("timed out".into());
        assert!(events_for(&t, &timeout, Utc::now()).is_empty());
        let e = KmsError::Unreachable {
            provider: Provider::Vault,
            detail: "503".into(),
        };
        assert!(matches!(observe(Ok(Err(e))), Observation::Unreachable(_)));
        let gone = KmsError::NotFound {
            provider: Provider::Vault,
            key_ref: "k".into(),
        };
        assert!(matches!(
            observe(Ok(Err(gone))),
            Observation::Known {
                state: KeyState::Destroyed,
                ..
            }
        ));
    }
}
