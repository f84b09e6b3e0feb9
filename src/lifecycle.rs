//! Applying what byokd learns about keys: lifecycle events, observations of the KMS, and
//! the passing of time. Each is one database transaction that locks the tenants concerned,
//! updates their keys' records, recomputes their access, and writes the audit trail and the
//! outbox (access messages and notifications) in the same commit.
//!
//! * [`apply_batch`]: events from the broker or HTTP. A revoking event takes effect at once
//!   as the key's claim; every event asks for the key to be observed (confirmed) off the
//!   consumer's path, by the confirmation loop (`reconcile`).
//! * [`apply_observations`]: what the KMS said. It replaces the key's observed record and
//!   settles the claim; a revocation the KMS does not confirm is audited and raised.
//! * [`refresh_access`]: recomputes access where nothing but the clock or the tenant's set
//!   of keys changed (expiry, registration, replacement progress).
//!
//! Access is never carried over from the event that changed it: [`Ledger::settle`] derives it
//! from the tenant's keys and the clock after every change, and emits exactly one access
//! message and the tenant's notifications when it differs from the stored value.

use crate::domain::kek::{self, EventOutcome, Usability};
use crate::domain::{
    Access, BlockCause, EventKind, JobKind, KeyState, LifecycleEvent, Observation, Provider,
};
use crate::notify::catalog::{
    self, KeyDestroyedWithDeks, KeyExpired, KeyExpiring, Notification, RevocationUnconfirmed,
    TenantInaccessible, TenantRestored, Trigger,
};
use crate::store::{
    AccessUpdate, AuditRow, Channel, KekRow, NewOutbox, NewRewrapJob, ObserveDone, ObserveTarget,
    Store, StoreError, TenantRow,
};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use uuid::Uuid;

/// How long after a revoking event its confirmation waits: KMS state changes are eventually
/// consistent for a moment, and a confirmation that reads the old state would refute a true
/// revocation.
pub const CLAIM_SETTLE: chrono::Duration = chrono::Duration::seconds(2);

/// After a revocation the KMS did not confirm, the key is looked at once more this much later,
/// in case the first answer was a replica lagging behind.
pub const RECHECK_UNCONFIRMED: chrono::Duration = chrono::Duration::seconds(30);

/// What became of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Seen before (redelivery or duplicate publish): nothing changed.
    Duplicate,
    /// No tenant has registered this key: recorded, nothing else.
    UnknownKey,
    /// Older than the last event that set the same attribute: recorded, nothing changed.
    Stale,
    /// Valid, but changed nothing.
    Unchanged,
    /// The KMS said the key is destroyed; nothing changes it any more.
    IgnoredDestroyed,
    /// A revocation (or an expiry change byokd keeps itself) took effect.
    Applied,
    /// Nothing changes until the KMS confirms (restoring events, rotations).
    Confirming,
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
            Outcome::Confirming => "confirming",
        }
    }
}

impl From<EventOutcome> for Outcome {
    fn from(o: EventOutcome) -> Self {
        match o {
            EventOutcome::Applied => Outcome::Applied,
            EventOutcome::Confirming => Outcome::Confirming,
            EventOutcome::Unchanged => Outcome::Unchanged,
            EventOutcome::Stale => Outcome::Stale,
            EventOutcome::IgnoredDestroyed => Outcome::IgnoredDestroyed,
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
    /// Whether a key now waits for confirmation at its KMS.
    pub confirm_work: bool,
    /// Positions (in the input events) of revoking events whose commit made their tenant
    /// inaccessible, for the revocation-to-effect latency.
    pub revocations: Vec<usize>,
    /// How many times the batch was applied again after losing a race with another
    /// transaction applying a copy of one of its events (the intake sets it; this module
    /// applies a batch once).
    pub raced: u32,
}

/// Everything a transaction writes, decided without I/O.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Outcome per fresh event, in input order (events only).
    pub outcomes: Vec<Outcome>,
    /// KEKs whose record changed, final values.
    pub keks: Vec<KekRow>,
    /// Tenants whose access changed, final values.
    pub access: Vec<AccessUpdate>,
    /// Audit rows.
    pub audit: Vec<AuditRow>,
    /// Outbox rows: access messages and notifications.
    pub outbox: Vec<NewOutbox>,
    /// Re-wrap jobs to create (rotations the KMS confirmed).
    pub jobs: Vec<NewRewrapJob>,
    /// KEKs whose waiting re-wrap jobs can resume (the key is usable again).
    pub resume: Vec<i64>,
    /// KEKs to observe now (restoring events, rotations).
    pub confirm_now: Vec<i64>,
    /// KEKs to observe after [`CLAIM_SETTLE`] (revocations).
    pub confirm_settled: Vec<i64>,
    /// Positions (in the events planned) of revoking events that made their tenant
    /// inaccessible: the revocations this transaction puts into effect.
    pub revocations: Vec<usize>,
}

/// Why a tenant's access is being recomputed: names the change in messages, notifications
/// and their dedupe keys.
#[derive(Debug, Clone)]
pub struct Cause {
    /// Unique per cause: dedupe keys of the outbox rows it produces.
    pub id: String,
    /// What kind of cause: `event`, `observation`, `expiry`, `registration`, `replacement`.
    pub kind: &'static str,
    /// The event id, for events.
    pub event_id: Option<String>,
    /// The key concerned, when one is.
    pub key: Option<(Provider, String)>,
}

impl Cause {
    /// A cause that is not an event, unique by a fresh id.
    pub fn new(kind: &'static str, key: Option<(Provider, String)>) -> Cause {
        Cause {
            id: format!("{kind}:{}", Uuid::now_v7()),
            kind,
            event_id: None,
            key,
        }
    }

    fn event(e: &LifecycleEvent) -> Cause {
        Cause {
            id: format!("event:{}:{}:{}", e.provider, e.source, e.event_id),
            kind: "event",
            event_id: Some(e.event_id.clone()),
            key: Some((e.provider, e.key_ref.clone())),
        }
    }

    fn trigger(&self) -> Trigger {
        Trigger {
            kind: self.kind.to_owned(),
            event_id: self.event_id.clone(),
            id: self.id.clone(),
        }
    }
}

/// The tenants of one transaction with all their keys, and what is decided about them.
struct Ledger {
    now: DateTime<Utc>,
    keks: HashMap<i64, KekRow>,
    by_ref: HashMap<(Provider, String), i64>,
    /// Each tenant's key ids, in id order: settling a tenant reads its own keys, not every
    /// key of the batch (with 20,000 tenants that scan was the quadratic part of a batch).
    by_tenant: HashMap<String, Vec<i64>>,
    tenants: HashMap<String, TenantRow>,
    changed_keks: BTreeSet<i64>,
    changed_tenants: BTreeSet<String>,
    /// Per inaccessible tenant, the cause its contacts were last told of: a new cause (a
    /// key destroyed after its deletion was scheduled) is news even though access stays.
    told: HashMap<String, Option<BlockCause>>,
    plan: Plan,
}

impl Ledger {
    fn new(keks: Vec<KekRow>, tenants: Vec<TenantRow>, now: DateTime<Utc>) -> Ledger {
        let by_ref = keks
            .iter()
            .map(|k| ((k.status.provider, k.status.key_ref.clone()), k.id))
            .collect();
        let keks: HashMap<i64, KekRow> = keks.into_iter().map(|k| (k.id, k)).collect();
        let mut by_tenant: HashMap<String, Vec<i64>> = HashMap::new();
        for k in keks.values() {
            by_tenant.entry(k.tenant_id.clone()).or_default().push(k.id);
        }
        for ids in by_tenant.values_mut() {
            ids.sort_unstable();
        }
        let mut ledger = Ledger {
            told: HashMap::new(),
            now,
            keks,
            by_ref,
            by_tenant,
            tenants: tenants.into_iter().map(|t| (t.id.clone(), t)).collect(),
            changed_keks: BTreeSet::new(),
            changed_tenants: BTreeSet::new(),
            plan: Plan::default(),
        };
        let told = ledger
            .tenants
            .values()
            .filter(|t| t.access == Access::Inaccessible)
            .map(|t| {
                let own: Vec<KekRow> = ledger.keys_of(&t.id).cloned().collect();
                let cause = derive_now(&own, now).blocked.map(|b| b.cause);
                (t.id.clone(), cause)
            })
            .collect();
        ledger.told = told;
        ledger
    }

    /// `tenant_id`'s keys in the batch, in id order.
    fn keys_of<'a>(&'a self, tenant_id: &str) -> impl Iterator<Item = &'a KekRow> {
        self.by_tenant
            .get(tenant_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.keks.get(id))
    }

    fn set_status(&mut self, kek_id: i64, status: crate::domain::KekStatus) {
        if let Some(k) = self.keks.get_mut(&kek_id) {
            k.status = status;
            self.changed_keks.insert(kek_id);
        }
    }

    /// Derives `tenant_id`'s access from its keys now; when it differs from the stored value,
    /// records the change with one access message and the tenant's notifications.
    fn settle(&mut self, tenant_id: &str, cause: &Cause) {
        let keys: Vec<&KekRow> = self.keys_of(tenant_id).collect();
        let view: Vec<_> = keys.iter().filter_map(|k| k.tenant_key()).collect();
        let decision = kek::derive_access(&view, self.now);
        let primary_expiry = keys
            .iter()
            .find(|k| k.is_primary)
            .and_then(|k| k.status.expires_at);
        let Some(tenant) = self.tenants.get_mut(tenant_id) else {
            return;
        };
        if decision.access == tenant.access && decision.reason == tenant.access_reason {
            return;
        }
        let previous = tenant.access;
        tenant.access = decision.access;
        tenant.access_reason = decision.reason.clone();
        self.changed_tenants.insert(tenant.id.clone());
        let cause_now = decision.blocked.as_ref().map(|b| b.cause);
        let told = self.told.get(tenant_id).copied().flatten();
        if decision.access == previous && (previous != Access::Inaccessible || told == cause_now) {
            // Same access and nothing new to tell (e.g. a claim confirmed): record quietly.
            return;
        }
        if decision.access == Access::Inaccessible {
            self.told.insert(tenant.id.clone(), cause_now);
        } else {
            self.told.remove(tenant_id);
        }
        let access = decision.access;
        let trigger = cause.trigger();
        if access != previous {
            // The platform's services hear of access changes only; a new cause of the same
            // access is for the tenant's contacts.
            let (provider, key_ref) = cause.key.clone().unzip();
            let message = json!({
                "tenant_id": tenant.id,
                "access": access,
                "previous": previous,
                "reason": decision.reason,
                "provider": provider,
                "key_ref": key_ref,
                "event_id": cause.event_id,
                "cause": cause.kind,
                "at": self.now,
            });
            self.plan.outbox.push(NewOutbox {
                id: Uuid::now_v7(),
                tenant_id: Some(tenant.id.clone()),
                channel: Channel::Amqp,
                recipient: format!("tenant.access.{access}"),
                kind: "tenant.access".to_owned(),
                dedupe_key: format!("access:{}:{}", cause.id, tenant.id),
                payload: message,
            });
        }
        let notice = match (access, decision.blocked) {
            (Access::Inaccessible, Some(blocked)) => Notification::TenantInaccessible(
                TenantInaccessible::new(&tenant.id, &blocked, previous, trigger),
            ),
            (Access::EncryptBlocked, Some(blocked)) => Notification::KeyExpired(KeyExpired {
                tenant_id: tenant.id.clone(),
                provider: blocked.provider,
                key_ref: blocked.key_ref.clone(),
                expires_at: primary_expiry,
                decrypts: !blocked.provider.expiry_makes_unusable(),
                previous,
                access,
                reason: blocked.to_string(),
                trigger,
            }),
            _ => {
                let (provider, key_ref) = cause.key.clone().unzip();
                Notification::TenantRestored(TenantRestored {
                    tenant_id: tenant.id.clone(),
                    provider,
                    key_ref,
                    previous,
                    access,
                    trigger,
                })
            }
        };
        self.plan
            .outbox
            .extend(notice.outbox_rows(Some(tenant), self.now));
    }

    fn finish(mut self) -> Plan {
        let mut keks: Vec<KekRow> = self
            .keks
            .into_values()
            .filter(|k| self.changed_keks.contains(&k.id))
            .collect();
        keks.sort_by_key(|k| k.id);
        self.plan.keks = keks;
        self.plan.access = self
            .changed_tenants
            .iter()
            .filter_map(|id| self.tenants.get(id))
            .map(|t| AccessUpdate {
                tenant_id: t.id.clone(),
                access: t.access,
                reason: t.access_reason.clone(),
            })
            .collect();
        self.plan
    }
}

/// Writes a plan inside `tx`.
async fn write(
    tx: &mut crate::store::StoreTx,
    plan: &Plan,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    tx.update_keks(&plan.keks, now).await?;
    tx.update_access(&plan.access).await?;
    tx.audit(&plan.audit).await?;
    tx.enqueue(&plan.outbox).await?;
    tx.create_rewrap_jobs(&plan.jobs).await?;
    tx.resume_rewrap_jobs(&plan.resume).await?;
    tx.request_confirmation(&plan.confirm_now, now).await?;
    tx.request_confirmation(&plan.confirm_settled, now + CLAIM_SETTLE)
        .await?;
    Ok(())
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
        (events[a].provider, &events[a].source, &events[a].event_id).cmp(&(
            events[b].provider,
            &events[b].source,
            &events[b].event_id,
        ))
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
        let ids: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();
        let keks = tx.keks_of_tenants(&ids).await?;
        (tenants, keks)
    };
    let plan = plan(&fresh_events, keks, tenants, now);
    write(&mut tx, &plan, now).await?;
    tx.commit().await?;

    // Planned positions count fresh events only; map them back to input positions.
    let fresh_positions: Vec<usize> = (0..events.len()).filter(|&i| fresh[i]).collect();
    let revocations = plan
        .revocations
        .iter()
        .filter_map(|&k| fresh_positions.get(k).copied())
        .collect();
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
        confirm_work: !plan.confirm_now.is_empty() || !plan.confirm_settled.is_empty(),
        revocations,
        raced: 0,
    })
}

/// Decides what `events` (fresh, in delivery order) do to the `keks` of their `tenants`.
pub fn plan(
    events: &[&LifecycleEvent],
    keks: Vec<KekRow>,
    tenants: Vec<TenantRow>,
    now: DateTime<Utc>,
) -> Plan {
    let mut ledger = Ledger::new(keks, tenants, now);
    let mut confirm_now = BTreeSet::new();
    let mut confirm_settled = BTreeSet::new();
    for (position, event) in events.iter().enumerate() {
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
        let Some(kek) = ledger
            .by_ref
            .get(&(event.provider, event.key_ref.clone()))
            .and_then(|id| ledger.keks.get(id))
        else {
            audit.outcome = Outcome::UnknownKey.as_str().to_owned();
            ledger.plan.outcomes.push(Outcome::UnknownKey);
            ledger.plan.audit.push(audit);
            continue;
        };
        let (kek_id, tenant_id) = (kek.id, kek.tenant_id.clone());
        audit.tenant_id = Some(tenant_id.clone());
        let effect = kek::apply_event(&kek.status, event, now);
        let outcome = Outcome::from(effect.outcome);
        audit.outcome = outcome.as_str().to_owned();
        audit.detail["before"] = record(&kek.status);
        if effect.confirm {
            if event.kind.is_revoking() || effect.next.as_ref().is_some_and(|n| n.claim.is_some()) {
                confirm_settled.insert(kek_id);
            } else {
                confirm_now.insert(kek_id);
            }
        }
        if event.kind == EventKind::Expiring
            && let Some(tenant) = ledger.tenants.get(&tenant_id)
            && let Some(expires_at) = event.expires_at.or(kek.status.expires_at)
        {
            let warning = Notification::KeyExpiring(KeyExpiring {
                tenant_id: tenant.id.clone(),
                provider: event.provider,
                key_ref: event.key_ref.clone(),
                expires_at,
                days_left: catalog::days_left(expires_at, now),
                threshold_days: None,
            });
            ledger
                .plan
                .outbox
                .extend(warning.outbox_rows(Some(tenant), now));
        }
        if let Some(next) = effect.next {
            audit.detail["after"] = record(&next);
            ledger.set_status(kek_id, next);
        }
        ledger.plan.outcomes.push(outcome);
        ledger.plan.audit.push(audit);
        let access = |l: &Ledger| l.tenants.get(&tenant_id).map(|t| t.access);
        let before = access(&ledger);
        ledger.settle(&tenant_id, &Cause::event(event));
        if event.kind.is_revoking()
            && before != Some(Access::Inaccessible)
            && access(&ledger) == Some(Access::Inaccessible)
        {
            ledger.plan.revocations.push(position);
        }
    }
    // A key asked about at once need not be asked again later.
    ledger.plan.confirm_now = confirm_now.into_iter().collect();
    ledger.plan.confirm_settled = confirm_settled
        .into_iter()
        .filter(|id| !ledger.plan.confirm_now.contains(id))
        .collect();
    ledger.finish()
}

/// A key's record, for audit details.
fn record(s: &crate::domain::KekStatus) -> Value {
    json!({ "state": s.state, "revoked": s.revoked, "version": s.current_version,
            "expires_at": s.expires_at, "claim": s.claim })
}

/// What the KMS answered about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A definitive answer.
    Known(Observation),
    /// No answer about the key (timeout, 5xx, a 404 that is not the KMS's own, TLS/DNS).
    Indeterminate(String),
    /// byokd has no settings for the provider.
    NotConfigured,
}

/// What applying observations did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ObservedReport {
    /// Keys whose record changed.
    pub changed: usize,
    /// Revocations the KMS did not confirm (raised to operators).
    pub unconfirmed: usize,
    /// Tenants whose access changed.
    pub access_changed: usize,
    /// Re-wrap jobs created or resumed.
    pub rewrap_work: usize,
}

/// How an observation run reschedules keys it could not get an answer for.
#[derive(Debug, Clone, Copy)]
pub enum Unanswered {
    /// Confirmations: try again at this time (the claim stays in force meanwhile).
    RetryAt(DateTime<Utc>),
    /// The probe: leave any pending confirmation as it is.
    Leave,
}

/// Applies what the KMS said about keys, in one transaction: observed records replace the
/// stored ones, claims are settled, rotations the KMS shows start re-wrap jobs, and access is
/// recomputed. `origin` (`confirm`, `probe`) goes to the audit trail.
///
/// # Errors
///
/// A [`StoreError`]; nothing was written.
pub async fn apply_observations(
    store: &Store,
    answers: &[(ObserveTarget, Answer)],
    origin: &str,
    unanswered: Unanswered,
    now: DateTime<Utc>,
) -> Result<ObservedReport, StoreError> {
    let mut report = ObservedReport::default();
    if answers.is_empty() {
        return Ok(report);
    }
    // Answers arrive in whatever order the KMSs answered; apply them in key order so what
    // they create (jobs, outbox rows) is ordered the same way on every run.
    let mut answers: Vec<&(ObserveTarget, Answer)> = answers.iter().collect();
    answers.sort_by_key(|(t, _)| t.kek_id);
    let ids: Vec<i64> = answers.iter().map(|(t, _)| t.kek_id).collect();
    let mut tx = store.begin().await?;
    let tenants = tx.lock_tenants_of_keks(&ids).await?;
    let tenant_ids: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();
    let keks = tx.keks_of_tenants(&tenant_ids).await?;
    let mut ledger = Ledger::new(keks, tenants, now);
    let mut done = Vec::with_capacity(answers.len());
    let mut destroyed = Vec::new();
    let mut versions_destroyed = Vec::new();
    // Where the KMS reported version states, only the versions other than the primary that
    // still hold DEKs are kept.
    let with_versions: Vec<(i64, Option<String>)> = answers
        .iter()
        .filter_map(|(t, a)| match a {
            Answer::Known(o) if o.versions.is_some() => Some((t.kek_id, o.version.clone())),
            _ => None,
        })
        .collect();
    let mut held_by_version: HashMap<(i64, String), i64> = HashMap::new();
    for (kek_id, version, n) in tx.dek_version_counts(&with_versions).await? {
        held_by_version.insert((kek_id, version), n);
    }
    for &(target, answer) in &answers {
        let mut finish = ObserveDone {
            kek_id: target.kek_id,
            watch_gen: target.watch_gen,
            answered: false,
            next_due: match unanswered {
                Unanswered::RetryAt(at) => Some(Some(at)),
                Unanswered::Leave => None,
            },
        };
        let observation = match answer {
            Answer::Known(o) => o,
            Answer::NotConfigured => {
                // Nothing can confirm anything for this key: stop asking; the probe reports it.
                finish.next_due = Some(None);
                done.push(finish);
                continue;
            }
            Answer::Indeterminate(_) => {
                done.push(finish);
                continue;
            }
        };
        finish.answered = true;
        finish.next_due = Some(None);
        let Some(kek) = ledger.keks.get(&target.kek_id) else {
            done.push(finish);
            continue;
        };
        let (kek_id, tenant_id, is_primary) = (kek.id, kek.tenant_id.clone(), kek.is_primary);
        let before = kek.status.clone();
        // A claim made while the KMS was being asked, or too recently for the KMS to show
        // it yet, waits for an answer of its own.
        let young = kek
            .claimed_at
            .filter(|at| now - *at < CLAIM_SETTLE)
            .map(|at| at + CLAIM_SETTLE);
        let newer_claim = kek.watch_gen != target.watch_gen || young.is_some();
        if let Some(settled) = young {
            finish.next_due = Some(Some(settled));
        }
        let kept;
        let observation = match &observation.versions {
            Some(versions) => {
                kept = Observation {
                    versions: Some(
                        versions
                            .iter()
                            .filter(|(v, _)| held_by_version.contains_key(&(kek_id, (*v).clone())))
                            .map(|(v, s)| (v.clone(), *s))
                            .collect(),
                    ),
                    ..observation.clone()
                };
                &kept
            }
            None => observation,
        };
        let effect = kek::apply_observation(&before, observation, newer_claim, now);
        let key = (before.provider, before.key_ref.clone());
        for (version, state) in &effect.versions_unusable {
            // Access stays the primary's; the DEKs under this version cannot be unwrapped.
            let held = held_by_version
                .get(&(kek_id, version.clone()))
                .copied()
                .unwrap_or(0);
            tracing::warn!(provider = %before.provider, key_ref = %before.key_ref, %version,
                %state, held, "a key version still holding DEKs refuses to decrypt");
            ledger.plan.audit.push(AuditRow {
                tenant_id: Some(tenant_id.clone()),
                provider: Some(before.provider),
                key_ref: Some(before.key_ref.clone()),
                action: "version_unusable".into(),
                outcome: state.as_str().into(),
                source: origin.to_owned(),
                event_id: None,
                detail: json!({ "version": version, "state": state, "held_deks": held,
                                "primary_version": effect.next.as_ref()
                                    .and_then(|n| n.current_version.clone()) }),
            });
            if *state == KeyState::Destroyed {
                versions_destroyed.push((tenant_id.clone(), key.clone(), version.clone(), held));
            }
        }
        if let Some(claim) = effect.unconfirmed {
            report.unconfirmed += 1;
            metrics::counter!(crate::telemetry::REVOCATIONS_UNCONFIRMED).increment(1);
            tracing::warn!(provider = %before.provider, key_ref = %before.key_ref, %claim,
                "a revocation the KMS does not confirm: the key is usable at its KMS");
            ledger.plan.audit.push(AuditRow {
                tenant_id: Some(tenant_id.clone()),
                provider: Some(before.provider),
                key_ref: Some(before.key_ref.clone()),
                action: "revocation_unconfirmed".into(),
                outcome: "not_confirmed".into(),
                source: origin.to_owned(),
                event_id: None,
                detail: json!({ "claim": claim, "observed": observation_json(observation),
                                "alert": true }),
            });
            let alert = Notification::RevocationUnconfirmed(RevocationUnconfirmed {
                tenant_id: tenant_id.clone(),
                provider: before.provider,
                key_ref: before.key_ref.clone(),
                claim,
                observed_state: observation.state,
                permission_revoked: observation.revoked,
                source: origin.to_owned(),
                observed_at: now,
            });
            ledger.plan.outbox.extend(alert.outbox_rows(None, now));
            finish.next_due = Some(Some(now + RECHECK_UNCONFIRMED));
        }
        if let Some(next) = effect.next {
            report.changed += 1;
            ledger.plan.audit.push(AuditRow {
                tenant_id: Some(tenant_id.clone()),
                provider: Some(before.provider),
                key_ref: Some(before.key_ref.clone()),
                action: "observed".into(),
                outcome: "applied".into(),
                source: origin.to_owned(),
                event_id: None,
                detail: json!({ "before": record(&before), "after": record(&next) }),
            });
            if let (Some(old), Some(new)) = (&before.current_version, &next.current_version)
                && kek::is_newer_version(old, new)
            {
                ledger.plan.jobs.push(NewRewrapJob {
                    tenant_id: tenant_id.clone(),
                    kind: JobKind::Rotation,
                    kek_id,
                    target_kek_id: kek_id,
                    target_version: new.clone(),
                });
            }
            // A key usable again lets jobs the KMS refused resume now.
            let was_blocked = matches!(kek::usability(&before, now), Usability::Unusable(_));
            if was_blocked && !matches!(kek::usability(&next, now), Usability::Unusable(_)) {
                ledger.plan.resume.push(kek_id);
            }
            if effect.destroyed {
                destroyed.push((kek_id, tenant_id.clone(), key.clone(), is_primary));
            }
            ledger.set_status(kek_id, next);
        }
        done.push(finish);
        ledger.settle(&tenant_id, &Cause::new("observation", Some(key)));
    }
    // A key destroyed while it still wraps DEKs: those DEKs are lost; say how many.
    if !destroyed.is_empty() {
        let ids: Vec<i64> = destroyed.iter().map(|d| d.0).collect();
        let counts: HashMap<i64, i64> = tx.dek_counts(&ids).await?.into_iter().collect();
        for (kek_id, tenant_id, (provider, key_ref), primary) in destroyed {
            let lost = counts.get(&kek_id).copied().unwrap_or(0);
            if lost == 0 {
                continue;
            }
            let lost = Notification::KeyDestroyedWithDeks(KeyDestroyedWithDeks {
                tenant_id: tenant_id.clone(),
                provider,
                key_ref,
                dek_count: lost,
                primary,
                version: None,
            });
            let tenant = ledger.tenants.get(&tenant_id);
            ledger.plan.outbox.extend(lost.outbox_rows(tenant, now));
        }
    }
    // A version other than the primary destroyed while it still wraps DEKs: those are lost.
    for (tenant_id, (provider, key_ref), version, held) in versions_destroyed {
        if held == 0 {
            continue;
        }
        let lost = Notification::KeyDestroyedWithDeks(KeyDestroyedWithDeks {
            tenant_id: tenant_id.clone(),
            provider,
            key_ref,
            dek_count: held,
            primary: false,
            version: Some(version),
        });
        let tenant = ledger.tenants.get(&tenant_id);
        ledger.plan.outbox.extend(lost.outbox_rows(tenant, now));
    }
    let plan = ledger.finish();
    report.access_changed = plan.access.len();
    report.rewrap_work = plan.jobs.len() + plan.resume.len();
    write(&mut tx, &plan, now).await?;
    tx.finish_observations(&done, now).await?;
    tx.commit().await?;
    Ok(report)
}

fn observation_json(o: &Observation) -> Value {
    json!({ "state": o.state, "revoked": o.revoked, "version": o.version,
            "expires_at": o.expires_at.flatten() })
}

/// Recomputes the access of `tenant_ids` from their keys and the clock, in one transaction,
/// and records any change with its message and notifications. Returns how many changed.
///
/// # Errors
///
/// A [`StoreError`]; nothing was written.
pub async fn refresh_access(
    store: &Store,
    tenant_ids: &[String],
    cause: &Cause,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    if tenant_ids.is_empty() {
        return Ok(0);
    }
    let mut tx = store.begin().await?;
    let tenants = tx.lock_tenants(tenant_ids).await?;
    let ids: Vec<String> = tenants.iter().map(|t| t.id.clone()).collect();
    let keks = tx.keks_of_tenants(&ids).await?;
    let mut ledger = Ledger::new(keks, tenants, now);
    for id in &ids {
        ledger.settle(id, cause);
    }
    let mut plan = ledger.finish();
    let changed = plan.access.len();
    if changed > 0 {
        let recomputed: Vec<AuditRow> = plan
            .access
            .iter()
            .map(|u| AuditRow {
                tenant_id: Some(u.tenant_id.clone()),
                provider: cause.key.as_ref().map(|k| k.0),
                key_ref: cause.key.as_ref().map(|k| k.1.clone()),
                action: "access_recomputed".into(),
                outcome: u.access.as_str().into(),
                source: cause.kind.into(),
                event_id: None,
                detail: json!({ "reason": u.reason }),
            })
            .collect();
        plan.audit.extend(recomputed);
        write(&mut tx, &plan, now).await?;
        tx.commit().await?;
    }
    Ok(changed)
}

/// A tenant's access derived now from its keys, as [`refresh_access`] would store it: what
/// the API answers and enforces, so the two never disagree.
pub fn derive_now(keks: &[KekRow], now: DateTime<Utc>) -> kek::AccessDecision {
    let view: Vec<_> = keks.iter().filter_map(|k| k.tenant_key()).collect();
    kek::derive_access(&view, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Origin;
    use crate::domain::kek::KekStatus;

    fn key(id: i64, tenant: &str, primary: bool) -> KekRow {
        KekRow {
            id,
            tenant_id: tenant.to_owned(),
            is_primary: primary,
            retired: false,
            held_deks: if primary { 0 } else { 5 },
            watch_gen: 0,
            claimed_at: None,
            status: KekStatus::observed(Provider::Local, format!("k{id}"), None, None),
        }
    }

    fn tenant(id: &str) -> TenantRow {
        TenantRow {
            id: id.to_owned(),
            access: Access::Accessible,
            access_reason: None,
            contacts: Vec::new(),
            webhooks: Vec::new(),
        }
    }

    fn disabled(key_ref: &str, n: usize, now: DateTime<Utc>) -> LifecycleEvent {
        LifecycleEvent {
            provider: Provider::Local,
            event_id: format!("e{n}"),
            kind: EventKind::Disabled,
            key_ref: key_ref.to_owned(),
            version: None,
            expires_at: None,
            time: now - chrono::Duration::seconds(60),
            source: "test".to_owned(),
            origin: Origin::Event,
        }
    }

    /// Two keys each for tenants a and b, ids interleaved between them and out of order, as
    /// no query promises.
    fn two_tenants_keys() -> Vec<KekRow> {
        vec![
            key(4, "b", false),
            key(1, "a", true),
            key(3, "b", true),
            key(2, "a", false),
        ]
    }

    /// A batch over several tenants settles each on its own keys only, whatever order the
    /// keys arrive in: a revoked key of one tenant never blocks another.
    #[test]
    fn each_tenant_is_settled_on_its_own_keys() {
        let now = Utc::now();
        let tenants = vec![tenant("a"), tenant("b"), tenant("c")];
        // Tenant a's primary (k1) and tenant b's key still holding DEKs (k4) are disabled.
        let events = [disabled("k1", 1, now), disabled("k4", 2, now)];
        let refs: Vec<&LifecycleEvent> = events.iter().collect();
        let first = plan(&refs, two_tenants_keys(), tenants, now);
        let access: HashMap<&str, Access> = first
            .access
            .iter()
            .map(|u| (u.tenant_id.as_str(), u.access))
            .collect();
        assert_eq!(access.get("a"), Some(&Access::Inaccessible), "{access:?}");
        assert_eq!(access.get("b"), Some(&Access::Inaccessible), "{access:?}");
        assert!(!access.contains_key("c"), "{access:?}");
        assert_eq!(first.revocations, vec![0, 1]);

        // Only b's key holding DEKs is disabled: a stays accessible.
        let events = [disabled("k4", 3, now)];
        let refs: Vec<&LifecycleEvent> = events.iter().collect();
        let second = plan(
            &refs,
            two_tenants_keys(),
            vec![tenant("a"), tenant("b")],
            now,
        );
        let changed: Vec<&str> = second.access.iter().map(|u| u.tenant_id.as_str()).collect();
        assert_eq!(changed, ["b"]);
    }
}
