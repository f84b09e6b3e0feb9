//! The KEK state machine and the derivation of a tenant's access from its primary KEK.

use super::{EventKind, LifecycleEvent, Provider};
use chrono::{DateTime, Utc};

named_enum!(
    /// The provider-side state of a KEK as byokd last learned it.
    KeyState, "key state" {
        /// Usable for wrap and unwrap.
        Enabled => "enabled",
        /// Refuses every operation until enabled again.
        Disabled => "disabled",
        /// Scheduled for deletion; refuses every operation.
        PendingDeletion => "pending_deletion",
        /// Gone for good; final.
        Destroyed => "destroyed",
        /// Past its expiry: no new encryption (or nothing at all, see
        /// [`Provider::expiry_makes_unusable`]).
        Expired => "expired",
    }
);

named_enum!(
    /// A tenant's access, always derived from its primary KEK, never set by hand.
    Access, "access" {
        /// DEKs may be created and used.
        Accessible => "accessible",
        /// Existing DEKs can be read; no new encryption (expired key).
        EncryptBlocked => "encrypt_blocked",
        /// Nothing may be decrypted or encrypted with this tenant's key.
        Inaccessible => "inaccessible",
    }
);

/// What byokd knows about one KEK: the part of a `keks` row the state machine reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekStatus {
    /// The provider the key lives in.
    pub provider: Provider,
    /// The provider's name for the key.
    pub key_ref: String,
    /// Provider-side state.
    pub state: KeyState,
    /// byokd's own access to the key was revoked (grant/policy), independent of `state`.
    pub revoked: bool,
    /// The primary version new DEKs are wrapped under.
    pub current_version: Option<String>,
    /// When the key expires, if it does.
    pub expires_at: Option<DateTime<Utc>>,
    /// Time of the event that last set `state` or `revoked`.
    pub state_changed_at: DateTime<Utc>,
    /// Time of the event that last set `current_version`.
    pub version_changed_at: DateTime<Utc>,
    /// Time of the event that last set `expires_at`.
    pub expiry_changed_at: DateTime<Utc>,
}

/// The result of applying one event to one KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The KEK changed; the new status is given.
    Changed(KekStatus),
    /// The event was valid but changes nothing (e.g. `enabled` on an enabled key, `expiring`).
    Unchanged,
    /// The event is older than the last change of what it would set; it must not override it.
    Stale,
    /// The key is destroyed; nothing brings it back.
    Final,
}

impl Transition {
    /// The audit outcome name for this transition.
    pub fn outcome(&self) -> &'static str {
        match self {
            Transition::Changed(_) => "applied",
            Transition::Unchanged => "unchanged",
            Transition::Stale => "stale",
            Transition::Final => "ignored_destroyed",
        }
    }
}

/// Applies `event` to `kek`.
///
/// Ordering is per attribute: a `disabled` event older than the last `enabled` is stale, but
/// an old rotation does not make a newer expiry change stale. Events at the same instant
/// apply in arrival order.
pub fn apply(kek: &KekStatus, event: &LifecycleEvent) -> Transition {
    if kek.state == KeyState::Destroyed {
        return Transition::Final;
    }
    let mut next = kek.clone();
    match event.kind {
        EventKind::Rotated => {
            if event.time < kek.version_changed_at {
                return Transition::Stale;
            }
            if event.version.is_some() {
                next.current_version = event.version.clone();
            }
            next.version_changed_at = event.time;
        }
        EventKind::ExpiryChanged => {
            if event.time < kek.expiry_changed_at {
                return Transition::Stale;
            }
            next.expires_at = event.expires_at;
            next.expiry_changed_at = event.time;
            // A new date in the future (or none) lifts an expiry; a date in the past applies it.
            let still_expired = next.expires_at.is_some_and(|at| at <= event.time);
            if kek.state == KeyState::Expired && !still_expired {
                next.state = KeyState::Enabled;
                next.state_changed_at = next.state_changed_at.max(event.time);
            }
        }
        EventKind::Expiring => {
            // A warning only; the notification is the whole effect.
            return Transition::Unchanged;
        }
        kind => {
            if event.time < kek.state_changed_at {
                return Transition::Stale;
            }
            match kind {
                EventKind::Disabled => next.state = KeyState::Disabled,
                EventKind::Enabled => {
                    let expired = kek.expires_at.is_some_and(|at| at <= event.time);
                    next.state = if expired {
                        KeyState::Expired
                    } else {
                        KeyState::Enabled
                    };
                }
                EventKind::DeletionScheduled => next.state = KeyState::PendingDeletion,
                // AWS brings a key back from PendingDeletion as Disabled; enabling is a
                // separate, deliberate act.
                EventKind::DeletionCancelled => next.state = KeyState::Disabled,
                EventKind::Destroyed => next.state = KeyState::Destroyed,
                EventKind::Expired => {
                    // Only an enabled key becomes expired: a disabled key stays disabled (the
                    // stronger restriction) and `enabled` later re-checks `expires_at`.
                    if kek.state == KeyState::Enabled {
                        next.state = KeyState::Expired;
                    }
                    if next.expires_at.is_none_or(|at| at > event.time) {
                        next.expires_at = Some(event.time);
                    }
                }
                EventKind::AccessRevoked => next.revoked = true,
                EventKind::AccessRestored => next.revoked = false,
                EventKind::Rotated | EventKind::ExpiryChanged | EventKind::Expiring => {
                    unreachable!("handled above")
                }
            }
            next.state_changed_at = event.time;
        }
    }
    if next.state == kek.state
        && next.revoked == kek.revoked
        && next.current_version == kek.current_version
        && next.expires_at == kek.expires_at
    {
        // Only timestamps moved; keep them so later stale checks see this event.
        if next != *kek {
            return Transition::Changed(next);
        }
        return Transition::Unchanged;
    }
    Transition::Changed(next)
}

/// A tenant's access and the human-readable reason for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessDecision {
    /// The derived access.
    pub access: Access,
    /// Why, when not `accessible`.
    pub reason: Option<String>,
}

/// Derives a tenant's access from its primary KEK (`None`: the tenant has no key yet).
pub fn derive_access(primary: Option<&KekStatus>) -> AccessDecision {
    let Some(kek) = primary else {
        return AccessDecision {
            access: Access::Accessible,
            reason: None,
        };
    };
    let key = format!("{} key {}", kek.provider, kek.key_ref);
    let (access, reason) = if kek.revoked {
        (
            Access::Inaccessible,
            Some(format!("access to {key} was revoked")),
        )
    } else {
        match kek.state {
            KeyState::Enabled => (Access::Accessible, None),
            KeyState::Disabled => (Access::Inaccessible, Some(format!("{key} is disabled"))),
            KeyState::PendingDeletion => (
                Access::Inaccessible,
                Some(format!("{key} is scheduled for deletion")),
            ),
            KeyState::Destroyed => (Access::Inaccessible, Some(format!("{key} was destroyed"))),
            KeyState::Expired if kek.provider.expiry_makes_unusable() => (
                Access::Inaccessible,
                Some(format!("{key} expired and can no longer decrypt")),
            ),
            KeyState::Expired => (
                Access::EncryptBlocked,
                Some(format!("{key} expired; existing data stays readable")),
            ),
        }
    };
    AccessDecision { access, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0)
            .single()
            .expect("valid time")
    }

    fn kek(provider: Provider) -> KekStatus {
        KekStatus {
            provider,
            key_ref: "k1".into(),
            state: KeyState::Enabled,
            revoked: false,
            current_version: Some("1".into()),
            expires_at: None,
            state_changed_at: t(0),
            version_changed_at: t(0),
            expiry_changed_at: t(0),
        }
    }

    fn event(kind: EventKind, at: i64) -> LifecycleEvent {
        LifecycleEvent {
            provider: Provider::Local,
            event_id: format!("e{at}"),
            kind,
            key_ref: "k1".into(),
            version: None,
            expires_at: None,
            time: t(at),
            source: "test".into(),
            origin: crate::domain::Origin::Event,
        }
    }

    fn changed(tr: Transition) -> KekStatus {
        match tr {
            Transition::Changed(k) => k,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn every_kind_maps_to_the_documented_state_and_access() {
        use Access::*;
        let cases = [
            (EventKind::Disabled, KeyState::Disabled, false, Inaccessible),
            (
                EventKind::DeletionScheduled,
                KeyState::PendingDeletion,
                false,
                Inaccessible,
            ),
            (
                EventKind::DeletionCancelled,
                KeyState::Disabled,
                false,
                Inaccessible,
            ),
            (
                EventKind::Destroyed,
                KeyState::Destroyed,
                false,
                Inaccessible,
            ),
            (EventKind::Expired, KeyState::Expired, false, EncryptBlocked),
            (
                EventKind::AccessRevoked,
                KeyState::Enabled,
                true,
                Inaccessible,
            ),
        ];
        for (kind, state, revoked, access) in cases {
            let next = changed(apply(&kek(Provider::Local), &event(kind, 10)));
            assert_eq!((next.state, next.revoked), (state, revoked), "{kind}");
            assert_eq!(derive_access(Some(&next)).access, access, "{kind}");
            assert!(derive_access(Some(&next)).reason.is_some(), "{kind}");
        }
    }

    #[test]
    fn reversals_restore_access() {
        let disabled = changed(apply(
            &kek(Provider::Local),
            &event(EventKind::Disabled, 10),
        ));
        let enabled = changed(apply(&disabled, &event(EventKind::Enabled, 20)));
        assert_eq!(derive_access(Some(&enabled)).access, Access::Accessible);

        let revoked = changed(apply(
            &kek(Provider::Local),
            &event(EventKind::AccessRevoked, 10),
        ));
        let restored = changed(apply(&revoked, &event(EventKind::AccessRestored, 20)));
        assert_eq!(derive_access(Some(&restored)).access, Access::Accessible);

        let pending = changed(apply(
            &kek(Provider::Local),
            &event(EventKind::DeletionScheduled, 10),
        ));
        let cancelled = changed(apply(&pending, &event(EventKind::DeletionCancelled, 20)));
        assert_eq!(cancelled.state, KeyState::Disabled);
        let enabled = changed(apply(&cancelled, &event(EventKind::Enabled, 30)));
        assert_eq!(derive_access(Some(&enabled)).access, Access::Accessible);
    }

    #[test]
    fn an_older_event_does_not_override_a_newer_state() {
        let enabled_late = changed(apply(
            &changed(apply(
                &kek(Provider::Local),
                &event(EventKind::Disabled, 10),
            )),
            &event(EventKind::Enabled, 30),
        ));
        assert_eq!(
            apply(&enabled_late, &event(EventKind::Disabled, 20)),
            Transition::Stale
        );
        // ...but an old rotation is judged against rotations only.
        let mut rotated = event(EventKind::Rotated, 20);
        rotated.version = Some("2".into());
        assert_eq!(
            changed(apply(&enabled_late, &rotated))
                .current_version
                .as_deref(),
            Some("2")
        );
    }

    #[test]
    fn an_older_rotation_does_not_roll_the_version_back() {
        let mut newer = event(EventKind::Rotated, 20);
        newer.version = Some("3".into());
        let mut older = event(EventKind::Rotated, 10);
        older.version = Some("2".into());
        let at3 = changed(apply(&kek(Provider::Local), &newer));
        assert_eq!(apply(&at3, &older), Transition::Stale);
    }

    #[test]
    fn destroyed_is_final() {
        let gone = changed(apply(
            &kek(Provider::Local),
            &event(EventKind::Destroyed, 10),
        ));
        for kind in EventKind::ALL {
            assert_eq!(apply(&gone, &event(*kind, 20)), Transition::Final, "{kind}");
        }
    }

    #[test]
    fn extending_expiry_lifts_encrypt_blocked() {
        let expired = changed(apply(&kek(Provider::Local), &event(EventKind::Expired, 10)));
        assert_eq!(expired.expires_at, Some(t(10)));
        let mut extend = event(EventKind::ExpiryChanged, 20);
        extend.expires_at = Some(t(10_000));
        let extended = changed(apply(&expired, &extend));
        assert_eq!(extended.state, KeyState::Enabled);
        assert_eq!(derive_access(Some(&extended)).access, Access::Accessible);

        // Moving the date into the past does not lift it.
        let mut past = event(EventKind::ExpiryChanged, 30);
        past.expires_at = Some(t(5));
        let still = changed(apply(&expired, &past));
        assert_eq!(still.state, KeyState::Expired);
    }

    #[test]
    fn enabling_an_expired_key_leaves_it_expired() {
        let mut k = kek(Provider::Local);
        k.state = KeyState::Disabled;
        k.expires_at = Some(t(5));
        let next = changed(apply(&k, &event(EventKind::Enabled, 10)));
        assert_eq!(next.state, KeyState::Expired);
    }

    #[test]
    fn expiry_of_aws_imported_material_makes_the_tenant_inaccessible() {
        let next = changed(apply(&kek(Provider::Aws), &event(EventKind::Expired, 10)));
        assert_eq!(derive_access(Some(&next)).access, Access::Inaccessible);
    }

    #[test]
    fn repeated_and_warning_events_change_nothing() {
        assert_eq!(
            apply(&kek(Provider::Local), &event(EventKind::Expiring, 10)),
            Transition::Unchanged
        );
        let enabled = apply(&kek(Provider::Local), &event(EventKind::Enabled, 0));
        assert_eq!(enabled, Transition::Unchanged);
    }

    #[test]
    fn no_key_means_nothing_to_block() {
        assert_eq!(derive_access(None).access, Access::Accessible);
    }
}
