//! Applying lifecycle events: dedupe, KEK transition, tenant access, audit and outbox, all in
//! one database transaction per batch.
//!
//! [`apply_batch`] does the I/O: it claims the events in the inbox, locks the tenants they
//! touch, reads their KEKs, and writes what [`plan`] decided. [`plan`] is pure, so the rules
//! for which notifications and access messages a change calls for are unit tested without a
//! database. A batch is applied in delivery order, each event seeing the effect of the ones
//! before it, exactly as if they had been applied one transaction each.

use crate::domain::kek::{self, AccessDecision};
use crate::domain::{Access, EventKind, LifecycleEvent, Provider, Transition};
use crate::notify::tenant_notifications;
use crate::store::{
    AccessUpdate, AuditRow, Channel, JobKind, KekRow, NewOutbox, NewRewrapJob, Store, StoreError,
    TenantRow,
};
use chrono::{DateTime, Utc};
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

/// What became of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Seen before (redelivery or duplicate publish): nothing changed.
    Duplicate,
    /// No tenant has registered this key: recorded, nothing else.
    UnknownKey,
    /// Older than the key's last change of the same attribute: recorded, nothing changed.
    Stale,
    /// Valid, but changed nothing.
    Unchanged,
    /// The key is destroyed; nothing changes it any more.
    IgnoredDestroyed,
    /// Applied.
    Applied,
}

impl Outcome {
    /// The name used in the audit log and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Duplicate => "duplicate",
            Outcome::UnknownKey => "unknown_key",
            Outcome::Stale => "stale",
            Outcome::Unchanged => "unchanged",
            Outcome::IgnoredDestroyed => "ignored_destroyed",
            Outcome::Applied => "applied",
        }
    }
}

/// The result of a batch.
#[derive(Debug, Clone, Default)]
pub struct BatchResult {
    /// One outcome per input event, in order.
    pub outcomes: Vec<Outcome>,
    /// Whether any tenant's access changed (an access message waits in the outbox).
    pub access_changed: bool,
    /// Whether a re-wrap job was created or resumed.
    pub rewrap_work: bool,
}

/// Everything a batch writes, decided without I/O.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Outcome per fresh event, in input order.
    pub outcomes: Vec<Outcome>,
    /// KEKs whose status changed, final values.
    pub keks: Vec<KekRow>,
    /// Tenants whose access changed, final values.
    pub access: Vec<AccessUpdate>,
    /// Audit rows, one per event.
    pub audit: Vec<AuditRow>,
    /// Outbox rows: access messages and notifications.
    pub outbox: Vec<NewOutbox>,
    /// Re-wrap jobs to create (rotations).
    pub jobs: Vec<NewRewrapJob>,
    /// KEKs whose waiting re-wrap jobs can resume (the key is usable again).
    pub resume: Vec<i64>,
}

/// The cause of notifications an event triggers, for their dedupe keys.
fn cause(event: &LifecycleEvent) -> String {
    format!("event:{}:{}", event.provider, event.event_id)
}

/// Applies `events` in one transaction and reports what became of each.
///
/// # Errors
///
/// A [`StoreError`]; when [`StoreError::is_transient`], nothing was written and the whole
/// batch can be retried as is.
pub async fn apply_batch(
    store: &Store,
    events: &[LifecycleEvent],
    now: DateTime<Utc>,
) -> Result<BatchResult, StoreError> {
    if events.is_empty() {
        return Ok(BatchResult::default());
    }
    let mut tx = store.begin().await?;
    // Claim in a stable order so two replicas handed overlapping batches lock inbox rows in
    // the same order. The sort is stable, so of two copies of one event inside the batch the
    // earlier delivery is the one `record_events` calls fresh.
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by(|&a, &b| {
        (events[a].provider, &events[a].event_id).cmp(&(events[b].provider, &events[b].event_id))
    });
    let sorted: Vec<&LifecycleEvent> = order.iter().map(|&i| &events[i]).collect();
    let fresh_sorted = tx.record_events(&sorted).await?;
    let mut fresh = vec![false; events.len()];
    for (pos, &i) in order.iter().enumerate() {
        fresh[i] = fresh_sorted[pos];
    }
    let fresh_events: Vec<&LifecycleEvent> = events
        .iter()
        .zip(&fresh)
        .filter(|(_, f)| **f)
        .map(|(e, _)| e)
        .collect();
    let mut keys: Vec<(Provider, String)> = fresh_events
        .iter()
        .map(|e| (e.provider, e.key_ref.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    let (tenants, keks) = if keys.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        let tenants = tx.lock_tenants_of(&keys).await?;
        let keks = tx.keks(&keys).await?;
        (tenants, keks)
    };
    let plan = plan(&fresh_events, keks, tenants, now);
    tx.update_keks(&plan.keks).await?;
    tx.update_access(&plan.access).await?;
    tx.audit(&plan.audit).await?;
    tx.enqueue(&plan.outbox).await?;
    tx.create_rewrap_jobs(&plan.jobs).await?;
    tx.resume_rewrap_jobs(&plan.resume).await?;
    tx.commit().await?;

    let mut planned = plan.outcomes.into_iter();
    let outcomes = fresh
        .iter()
        .map(|f| {
            if *f {
                planned.next().unwrap_or(Outcome::Applied)
            } else {
                Outcome::Duplicate
            }
        })
        .collect();
    Ok(BatchResult {
        outcomes,
        access_changed: !plan.access.is_empty(),
        rewrap_work: !plan.jobs.is_empty() || !plan.resume.is_empty(),
    })
}

/// Applies events byokd itself found (sweeps, probes) in transactions of up to 500 and
/// returns how many changed something.
///
/// # Errors
///
/// A [`StoreError`]; batches applied before it stay applied.
pub async fn apply_found(
    store: &Store,
    events: &[LifecycleEvent],
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let mut applied = 0;
    for chunk in events.chunks(500) {
        let result = apply_batch(store, chunk, now).await?;
        applied += result
            .outcomes
            .iter()
            .filter(|o| **o == Outcome::Applied)
            .count();
    }
    Ok(applied)
}

/// Decides what `events` (fresh, in delivery order) do to `keks` and their `tenants`.
pub fn plan(
    events: &[&LifecycleEvent],
    keks: Vec<KekRow>,
    tenants: Vec<TenantRow>,
    now: DateTime<Utc>,
) -> Plan {
    let mut keks: HashMap<(Provider, String), KekRow> = keks
        .into_iter()
        .map(|k| ((k.status.provider, k.status.key_ref.clone()), k))
        .collect();
    let mut tenants: HashMap<String, TenantRow> =
        tenants.into_iter().map(|t| (t.id.clone(), t)).collect();
    let mut changed_keks: BTreeSet<i64> = BTreeSet::new();
    let mut changed_tenants: BTreeSet<String> = BTreeSet::new();
    let mut plan = Plan::default();

    for event in events {
        let key = (event.provider, event.key_ref.clone());
        let mut audit = AuditRow {
            tenant_id: None,
            provider: Some(event.provider),
            key_ref: Some(event.key_ref.clone()),
            action: event.kind.as_str().to_owned(),
            outcome: String::new(),
            source: event.origin.as_str().to_owned(),
            event_id: Some(event.event_id.clone()),
            detail: json!({ "source": event.source, "time": event.time }),
        };
        let Some(kek) = keks.get_mut(&key) else {
            audit.outcome = Outcome::UnknownKey.as_str().to_owned();
            plan.outcomes.push(Outcome::UnknownKey);
            plan.audit.push(audit);
            continue;
        };
        audit.tenant_id = Some(kek.tenant_id.clone());
        let before = kek.status.clone();
        let transition = kek::apply(&kek.status, event);
        let outcome = match &transition {
            Transition::Changed(next) => {
                kek.status = next.clone();
                changed_keks.insert(kek.id);
                Outcome::Applied
            }
            Transition::Unchanged => Outcome::Unchanged,
            Transition::Stale => Outcome::Stale,
            Transition::Final => Outcome::IgnoredDestroyed,
        };
        audit.outcome = outcome.as_str().to_owned();
        audit.detail["before"] = json!({ "state": before.state, "revoked": before.revoked,
            "version": before.current_version, "expires_at": before.expires_at });
        if outcome == Outcome::Applied {
            audit.detail["after"] = json!({ "state": kek.status.state,
                "revoked": kek.status.revoked, "version": kek.status.current_version,
                "expires_at": kek.status.expires_at });
        }
        plan.outcomes.push(outcome);
        plan.audit.push(audit);
        if outcome == Outcome::Applied {
            if event.kind == EventKind::Rotated
                && let Some(version) = &kek.status.current_version
            {
                plan.jobs.push(NewRewrapJob {
                    tenant_id: kek.tenant_id.clone(),
                    kind: JobKind::Rotation,
                    kek_id: kek.id,
                    target_kek_id: kek.id,
                    target_version: version.clone(),
                });
            }
            // A key usable again lets jobs that were refused by the KMS resume now.
            let reenabling = matches!(
                event.kind,
                EventKind::Enabled | EventKind::AccessRestored | EventKind::ExpiryChanged
            );
            if reenabling && kek::derive_access(Some(&kek.status)).access != Access::Inaccessible {
                plan.resume.push(kek.id);
            }
        }

        let Some(tenant) = tenants.get_mut(&kek.tenant_id) else {
            continue;
        };
        if event.kind == EventKind::Expiring && outcome == Outcome::Unchanged {
            let expires_at = event.expires_at.or(kek.status.expires_at);
            let data = json!({
                "tenant_id": tenant.id,
                "provider": event.provider,
                "key_ref": event.key_ref,
                "expires_at": expires_at,
                "days_left": expires_at.map(|at| (at - now).num_days().max(0)),
            });
            plan.outbox.extend(tenant_notifications(
                tenant,
                "key.expiring",
                &cause(event),
                data,
                now,
            ));
        }
        if outcome != Outcome::Applied || !kek.is_primary {
            continue;
        }
        let AccessDecision { access, reason } = kek::derive_access(Some(&kek.status));
        if access == tenant.access && reason == tenant.access_reason {
            continue;
        }
        let previous = tenant.access;
        tenant.access = access;
        tenant.access_reason = reason.clone();
        changed_tenants.insert(tenant.id.clone());
        if access == previous {
            // Same access, new reason (e.g. disabled, then also revoked): record it quietly.
            continue;
        }
        let message = json!({
            "tenant_id": tenant.id,
            "access": access,
            "previous": previous,
            "reason": reason,
            "provider": event.provider,
            "key_ref": event.key_ref,
            "event_id": event.event_id,
            "at": now,
        });
        plan.outbox.push(NewOutbox {
            id: Uuid::now_v7(),
            tenant_id: Some(tenant.id.clone()),
            channel: Channel::Amqp,
            recipient: format!("tenant.access.{access}"),
            kind: "tenant.access".to_owned(),
            dedupe_key: format!("access:{}:{}:{}", event.provider, event.event_id, tenant.id),
            payload: message.clone(),
        });
        let kind = match access {
            Access::Inaccessible => "tenant.inaccessible",
            Access::EncryptBlocked => "key.expired",
            Access::Accessible => "tenant.restored",
        };
        let mut data = message;
        if let Some(obj) = data.as_object_mut() {
            obj.remove("at");
            obj.insert("expires_at".into(), json!(kek.status.expires_at));
        }
        plan.outbox
            .extend(tenant_notifications(tenant, kind, &cause(event), data, now));
    }

    plan.keks = keks
        .into_values()
        .filter(|k| changed_keks.contains(&k.id))
        .collect();
    plan.keks.sort_by_key(|k| k.id);
    plan.access = changed_tenants
        .iter()
        .filter_map(|id| tenants.get(id))
        .map(|t| AccessUpdate {
            tenant_id: t.id.clone(),
            access: t.access,
            reason: t.access_reason.clone(),
        })
        .collect();
    plan
}
