//! One sample of every notification of the catalog (and of every cause of the ones whose
//! wording depends on it), with fixed facts: the golden files render these, and the delivery
//! tests send them through real SMTP and HTTP peers.

use byokd::domain::JobKind;
use byokd::domain::{Access, BlockCause, Blocked, EventKind, KeyState, Provider};
use byokd::notify::catalog::*;
use chrono::{DateTime, Utc};
use uuid::Uuid;

pub fn at(s: &str) -> DateTime<Utc> {
    s.parse().expect("time")
}

fn trigger(kind: &str) -> Trigger {
    Trigger {
        kind: kind.to_owned(),
        event_id: (kind == "event").then(|| "evt-1".to_owned()),
        id: format!("{kind}:0001"),
    }
}

fn blocked(tenant: &str, cause: BlockCause, confirmed: bool, held: Option<i64>) -> Blocked {
    Blocked {
        cause,
        provider: Provider::Aws,
        key_ref: format!("key-{tenant}"),
        confirmed,
        held_deks: held,
    }
}

/// `(name, notification)`; the name is the golden file's stem.
pub fn samples(tenant: &str) -> Vec<(String, Notification)> {
    let t = tenant.to_owned();
    let key = format!("key-{tenant}");
    let mut out: Vec<(String, Notification)> = vec![
        (
            "key.expiring".into(),
            Notification::KeyExpiring(KeyExpiring {
                tenant_id: t.clone(),
                provider: Provider::Azure,
                key_ref: key.clone(),
                expires_at: at("2026-12-12T09:30:00Z"),
                days_left: 14,
                threshold_days: Some(14),
            }),
        ),
        (
            "key.expired".into(),
            Notification::KeyExpired(KeyExpired {
                tenant_id: t.clone(),
                provider: Provider::Azure,
                key_ref: key.clone(),
                expires_at: Some(at("2026-11-28T09:30:00Z")),
                decrypts: true,
                previous: Access::Accessible,
                access: Access::EncryptBlocked,
                reason: format!("azure key {key} expired; existing data stays readable"),
                trigger: trigger("expiry"),
            }),
        ),
        (
            "key.rotated".into(),
            Notification::KeyRotated(KeyRotated {
                tenant_id: t.clone(),
                provider: Provider::Vault,
                key_ref: key.clone(),
                from_version: "1".into(),
                to_version: "2".into(),
                dek_count: 42,
                job_id: 7,
            }),
        ),
        (
            "key.replaced".into(),
            Notification::KeyReplaced(KeyReplaced {
                tenant_id: t.clone(),
                previous_provider: Provider::Local,
                previous_key_ref: format!("old-{tenant}"),
                provider: Provider::Vault,
                key_ref: key.clone(),
                to_version: "1".into(),
                dek_count: 42,
                job_id: 8,
            }),
        ),
        (
            "key.rewrap_failed".into(),
            Notification::KeyRewrapFailed(KeyRewrapFailed {
                tenant_id: t.clone(),
                job_id: 9,
                job_kind: JobKind::Rotation,
                provider: Provider::Vault,
                key_ref: key.clone(),
                target_key_ref: key.clone(),
                to_version: "3".into(),
                failed: 2,
                done: 40,
                finished_at: at("2026-11-28T11:30:00Z"),
            }),
        ),
        (
            "key.unreachable".into(),
            Notification::KeyUnreachable(KeyUnreachable {
                tenant_id: t.clone(),
                provider: Provider::Vault,
                key_ref: key.clone(),
                unreachable_since: at("2026-11-28T10:00:00Z"),
                error: "connection refused".into(),
            }),
        ),
        (
            "key.destroyed_with_deks".into(),
            Notification::KeyDestroyedWithDeks(KeyDestroyedWithDeks {
                tenant_id: t.clone(),
                provider: Provider::Aws,
                key_ref: key.clone(),
                dek_count: 42,
                primary: true,
                version: None,
            }),
        ),
        (
            "tenant.restored".into(),
            Notification::TenantRestored(TenantRestored {
                tenant_id: t.clone(),
                provider: Some(Provider::Aws),
                key_ref: Some(key.clone()),
                previous: Access::Inaccessible,
                access: Access::Accessible,
                trigger: trigger("observation"),
            }),
        ),
        (
            "endpoint.disabled".into(),
            Notification::EndpointDisabled(EndpointDisabled {
                tenant_id: t.clone(),
                endpoint_id: Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001),
                url: "https://hooks.example.com/byok".into(),
                reason: "the endpoint answered 410 Gone".into(),
                disabled_at: at("2026-11-28T11:00:00Z"),
            }),
        ),
        (
            "operator.revocation_unconfirmed".into(),
            Notification::RevocationUnconfirmed(RevocationUnconfirmed {
                tenant_id: t.clone(),
                provider: Provider::Aws,
                key_ref: key.clone(),
                claim: EventKind::Disabled,
                observed_state: Some(KeyState::Enabled),
                permission_revoked: false,
                source: "confirm".into(),
                observed_at: at("2026-11-28T11:00:02Z"),
            }),
        ),
        (
            "operator.schedule_failed".into(),
            Notification::ScheduleFailed(ScheduleFailed {
                schedule: "probe".into(),
                tick: at("2026-11-28T11:05:00Z"),
                error: "database unavailable: pool timed out".into(),
            }),
        ),
        (
            "operator.access_anomaly".into(),
            Notification::AccessAnomaly(AccessAnomaly {
                rule: "tenant_refusals".into(),
                subject: t.clone(),
                tenant_id: Some(t.clone()),
                client: None,
                window_start: at("2026-11-28T11:00:00Z"),
                observed: 42.0,
                threshold: 20.0,
                summary: "42 refused attempts on the tenant in one minute (threshold 20).".into(),
            }),
        ),
    ];
    for cause in BlockCause::ALL {
        let why = blocked(tenant, *cause, true, None);
        out.push((
            format!("tenant.inaccessible.{cause}"),
            Notification::TenantInaccessible(TenantInaccessible::new(
                tenant,
                &why,
                Access::Accessible,
                trigger("event"),
            )),
        ));
    }
    let unconfirmed = blocked(tenant, BlockCause::Disabled, false, None);
    out.push((
        "tenant.inaccessible.disabled.unconfirmed".into(),
        Notification::TenantInaccessible(TenantInaccessible::new(
            tenant,
            &unconfirmed,
            Access::Accessible,
            trigger("event"),
        )),
    ));
    let held = blocked(tenant, BlockCause::Disabled, true, Some(7));
    out.push((
        "tenant.inaccessible.replacement_held".into(),
        Notification::TenantInaccessible(TenantInaccessible::new(
            tenant,
            &held,
            Access::Accessible,
            trigger("observation"),
        )),
    ));
    out
}

/// The sample of `kind` (its first one), as the body the outbox stores.
pub fn body(tenant: &str, kind: &str) -> serde_json::Value {
    let (_, n) = samples(tenant)
        .into_iter()
        .find(|(_, n)| n.kind() == kind)
        .unwrap_or_else(|| panic!("no sample of {kind}"));
    n.body(Utc::now())
}
