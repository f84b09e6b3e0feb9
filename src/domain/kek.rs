//! The state model of a KEK, and the derivation of a tenant's access from its keys.
//!
//! The tenant's KMS is the truth. byokd keeps, per KEK, what it last *observed* at the KMS
//! (state, permission, version and, where the KMS holds one, expiry), stamped with byokd's
//! own clock, plus at most one unconfirmed *claim*: a revoking event that took effect at once
//! and waits for the KMS to confirm it. Events never write the observed part; an observation
//! replaces it and settles the claim. Access is then a pure function of the tenant's keys and
//! the clock ([`derive_access`]), so expiry needs no event to happen and no event time, order,
//! skew or loss can keep a key the KMS refuses in use for longer than one confirmation.

use super::{EventKind, LifecycleEvent, Provider};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

named_enum!(
    /// The provider-side state of a KEK. Stored observations hold only the first four;
    /// `expired` is computed from `expires_at` and the clock (see [`effective_state`]).
    KeyState, "key state" {
        /// Usable for wrap and unwrap.
        Enabled => "enabled",
        /// Refuses every operation until enabled again.
        Disabled => "disabled",
        /// Scheduled for deletion; refuses every operation.
        PendingDeletion => "pending_deletion",
        /// Gone for good; final once the KMS said so.
        Destroyed => "destroyed",
        /// Past its expiry: no new encryption (or nothing at all, see
        /// [`Provider::expiry_makes_unusable`]).
        Expired => "expired",
    }
);

named_enum!(
    /// A tenant's access, always derived from its keys, never set by hand.
    Access, "access" {
        /// DEKs may be created and used.
        Accessible => "accessible",
        /// Existing DEKs can be read; no new encryption (expired key).
        EncryptBlocked => "encrypt_blocked",
        /// Nothing may be decrypted or encrypted with this tenant's key.
        Inaccessible => "inaccessible",
    }
);

/// What byokd knows about one KEK: the part of a `keks` row the state model reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekStatus {
    /// The provider the key lives in.
    pub provider: Provider,
    /// The provider's name for the key (canonical form).
    pub key_ref: String,
    /// Observed provider-side state (never `Expired`: expiry is computed).
    pub state: KeyState,
    /// Observed: byokd's own access to the key is denied (grant/policy), whatever `state`.
    pub revoked: bool,
    /// Observed primary version new DEKs are wrapped under.
    pub current_version: Option<String>,
    /// When the key expires, if it does (observed where the KMS holds expiry).
    pub expires_at: Option<DateTime<Utc>>,
    /// Provider time of the last event that set `expires_at` (providers whose KMS holds no
    /// expiry only): orders those events among themselves.
    pub expiry_event_at: Option<DateTime<Utc>>,
    /// A revoking event that took effect before the KMS confirmed it.
    pub claim: Option<EventKind>,
    /// Observed states of the key's versions other than the primary that still hold DEKs,
    /// where versions have a state of their own ([`Provider::versions_have_state`]). They
    /// decide whether those DEKs can be unwrapped, never the tenant's access: that is the
    /// primary's (`state`), which alone decides new encryption.
    pub versions: BTreeMap<String, KeyState>,
}

impl EventKind {
    /// Events that take effect at once, before any KMS call (fail-safe direction).
    pub fn is_revoking(self) -> bool {
        matches!(
            self,
            EventKind::Disabled
                | EventKind::DeletionScheduled
                | EventKind::Destroyed
                | EventKind::AccessRevoked
                | EventKind::Expired
        )
    }

    /// How strong a revoking claim is: of two claims the stronger one is kept.
    fn claim_rank(self) -> u8 {
        match self {
            EventKind::Destroyed => 5,
            EventKind::DeletionScheduled => 4,
            EventKind::Disabled => 3,
            EventKind::AccessRevoked => 2,
            EventKind::Expired => 1,
            _ => 0,
        }
    }
}

impl KekStatus {
    /// A key as a registration or observation found it: usable, no claim.
    pub fn observed(
        provider: Provider,
        key_ref: impl Into<String>,
        version: Option<String>,
        expires_at: Option<DateTime<Utc>>,
    ) -> KekStatus {
        KekStatus {
            provider,
            key_ref: key_ref.into(),
            state: KeyState::Enabled,
            revoked: false,
            current_version: version,
            expires_at,
            expiry_event_at: None,
            claim: None,
            versions: BTreeMap::new(),
        }
    }

    /// Whether `expires_at` has passed at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// The state to show for a key at `now`: the observed state, `expired` when an enabled key's
/// date has passed.
pub fn effective_state(kek: &KekStatus, now: DateTime<Utc>) -> KeyState {
    if kek.state == KeyState::Enabled && kek.is_expired(now) {
        KeyState::Expired
    } else {
        kek.state
    }
}

/// The state to show for a key at `now`, a claim in force included: what access is derived
/// from, so a reader of the API sees why a tenant is blocked before the KMS confirmed it.
pub fn shown_state(kek: &KekStatus, now: DateTime<Utc>) -> KeyState {
    let observed = effective_state(kek, now);
    if observed != KeyState::Enabled {
        return observed;
    }
    match kek.claim {
        Some(EventKind::Disabled) => KeyState::Disabled,
        Some(EventKind::DeletionScheduled) => KeyState::PendingDeletion,
        Some(EventKind::Destroyed) => KeyState::Destroyed,
        Some(EventKind::Expired) => KeyState::Expired,
        _ => observed,
    }
}

named_enum!(
    /// Why a key cannot be used: the thing its owner has to fix, which decides what a
    /// notification tells them to do.
    BlockCause, "block cause" {
        /// Disabled at the KMS.
        Disabled => "disabled",
        /// Scheduled for deletion at the KMS.
        DeletionScheduled => "deletion_scheduled",
        /// Destroyed: final.
        Destroyed => "destroyed",
        /// The platform's permission to use the key (grant, policy, role) was taken away.
        PermissionRevoked => "permission_revoked",
        /// Past its expiry date.
        Expired => "expired",
    }
);

/// Why one key cannot be used, fully or for new encryption. Its `Display` is the
/// human-readable reason stored with the tenant's access.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Blocked {
    /// What is wrong with the key.
    pub cause: BlockCause,
    /// The key's provider.
    pub provider: Provider,
    /// The key's name.
    pub key_ref: String,
    /// The KMS said so; `false` while an event's claim waits for the KMS to confirm it.
    pub confirmed: bool,
    /// DEKs the key still holds, when it is a key being replaced rather than the primary.
    pub held_deks: Option<i64>,
}

impl Blocked {
    fn new(kek: &KekStatus, cause: BlockCause, confirmed: bool) -> Blocked {
        Blocked {
            cause,
            provider: kek.provider,
            key_ref: kek.key_ref.clone(),
            confirmed,
            held_deks: None,
        }
    }
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(held) = self.held_deks {
            write!(f, "{held} DEKs are still held by the key being replaced: ")?;
        }
        let key = format!("{} key {}", self.provider, self.key_ref);
        match (self.cause, self.confirmed) {
            (BlockCause::Expired, confirmed) => {
                let how = if confirmed {
                    "expired"
                } else {
                    "was reported expired"
                };
                let after = if self.provider.expiry_makes_unusable() {
                    " and can no longer decrypt"
                } else {
                    "; existing data stays readable"
                };
                write!(f, "{key} {how}{after}")
            }
            (BlockCause::Destroyed, true) => write!(f, "{key} was destroyed"),
            (BlockCause::DeletionScheduled, true) => {
                write!(f, "{key} is scheduled for deletion")
            }
            (BlockCause::Disabled, true) => write!(f, "{key} is disabled"),
            (BlockCause::PermissionRevoked, true) => {
                write!(f, "the platform's access to {key} was revoked at the KMS")
            }
            (cause, false) => {
                let what = match cause {
                    BlockCause::Disabled => "disabled",
                    BlockCause::DeletionScheduled => "scheduled for deletion",
                    BlockCause::Destroyed => "destroyed",
                    _ => "no longer accessible to the platform",
                };
                write!(
                    f,
                    "{key} was reported {what}; blocked until the KMS says otherwise"
                )
            }
        }
    }
}

/// What the platform may do with one key at `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usability {
    /// Wrap and unwrap.
    Usable,
    /// Unwrap only (expired): why.
    UnwrapOnly(Blocked),
    /// Nothing: why.
    Unusable(Blocked),
}

/// Decides what a key allows at `now`. A claim counts until an observation settles it.
pub fn usability(kek: &KekStatus, now: DateTime<Utc>) -> Usability {
    let expired = |confirmed| {
        let why = Blocked::new(kek, BlockCause::Expired, confirmed);
        if kek.provider.expiry_makes_unusable() {
            Usability::Unusable(why)
        } else {
            Usability::UnwrapOnly(why)
        }
    };
    let observed = match kek.state {
        KeyState::Destroyed => Some(BlockCause::Destroyed),
        KeyState::PendingDeletion => Some(BlockCause::DeletionScheduled),
        KeyState::Disabled => Some(BlockCause::Disabled),
        KeyState::Enabled | KeyState::Expired => {
            kek.revoked.then_some(BlockCause::PermissionRevoked)
        }
    };
    if let Some(cause) = observed {
        return Usability::Unusable(Blocked::new(kek, cause, true));
    }
    let claimed = match kek.claim {
        Some(EventKind::Disabled) => Some(BlockCause::Disabled),
        Some(EventKind::DeletionScheduled) => Some(BlockCause::DeletionScheduled),
        Some(EventKind::Destroyed) => Some(BlockCause::Destroyed),
        Some(EventKind::Expired) | None => None,
        Some(_) => Some(BlockCause::PermissionRevoked),
    };
    if let Some(cause) = claimed {
        return Usability::Unusable(Blocked::new(kek, cause, false));
    }
    if kek.is_expired(now) {
        return expired(true);
    }
    if kek.claim == Some(EventKind::Expired) {
        return expired(false);
    }
    Usability::Usable
}

/// One of a tenant's keys as access derivation sees it.
#[derive(Debug, Clone, Copy)]
pub struct TenantKey<'a> {
    /// The key.
    pub status: &'a KekStatus,
    /// New DEKs are wrapped under it; its usability decides encryption.
    pub primary: bool,
    /// DEKs still wrapped under it (non-primary keys during a replacement).
    pub held_deks: i64,
}

/// A tenant's access, the human-readable reason for it, and the typed cause behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessDecision {
    /// The derived access.
    pub access: Access,
    /// Why, when not `accessible` (the [`Blocked`] shown as text).
    pub reason: Option<String>,
    /// The key that blocks and what is wrong with it, when not `accessible`.
    pub blocked: Option<Blocked>,
}

impl AccessDecision {
    fn blocked(access: Access, why: Blocked) -> AccessDecision {
        AccessDecision {
            access,
            reason: Some(why.to_string()),
            blocked: Some(why),
        }
    }
}

/// Derives a tenant's access at `now` from its keys: the primary, and any key still holding
/// DEKs during a replacement (its DEKs cannot be read while it is unusable, whatever the
/// primary says). No key at all: nothing to block.
pub fn derive_access(keys: &[TenantKey<'_>], now: DateTime<Utc>) -> AccessDecision {
    for key in keys.iter().filter(|k| k.primary) {
        match usability(key.status, now) {
            Usability::Usable => {}
            Usability::Unusable(why) => {
                return AccessDecision::blocked(Access::Inaccessible, why);
            }
            Usability::UnwrapOnly(why) => {
                if let Some(held) = held_by_unusable(keys, now) {
                    return held;
                }
                return AccessDecision::blocked(Access::EncryptBlocked, why);
            }
        }
    }
    held_by_unusable(keys, now).unwrap_or(AccessDecision {
        access: Access::Accessible,
        reason: None,
        blocked: None,
    })
}

fn held_by_unusable(keys: &[TenantKey<'_>], now: DateTime<Utc>) -> Option<AccessDecision> {
    keys.iter()
        .filter(|k| !k.primary && k.held_deks > 0)
        .find_map(|k| match usability(k.status, now) {
            Usability::Unusable(mut why) => {
                why.held_deks = Some(k.held_deks);
                Some(AccessDecision::blocked(Access::Inaccessible, why))
            }
            _ => None,
        })
}

/// What one event does to one KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventEffect {
    /// The KEK's new status, when the event changed it.
    pub next: Option<KekStatus>,
    /// The KMS must be asked to confirm (an observation follows, off the consumer's path).
    pub confirm: bool,
    /// The audit outcome.
    pub outcome: EventOutcome,
}

/// What became of an event, for the audit trail and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// A revocation took effect at once; the KMS will be asked to confirm it.
    Applied,
    /// Nothing to change now; the KMS will be asked (restoring events, rotations).
    Confirming,
    /// Valid, changed nothing (a repeated claim, a warning).
    Unchanged,
    /// Older than the last event that set the same attribute.
    Stale,
    /// The KMS said the key is destroyed; nothing changes it any more.
    IgnoredDestroyed,
}

impl EventOutcome {
    /// The name used in the audit trail and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Applied => "applied",
            EventOutcome::Confirming => "confirming",
            EventOutcome::Unchanged => "unchanged",
            EventOutcome::Stale => "stale",
            EventOutcome::IgnoredDestroyed => "ignored_destroyed",
        }
    }
}

/// Applies one event to one KEK at byokd's `now`.
///
/// A revoking event becomes (or strengthens) the key's claim at once. A restoring event, a
/// rotation or an expiry change on a provider whose KMS holds the expiry only asks for
/// confirmation: the observation that follows sets what the KMS says. Only where the KMS
/// holds no expiry (Vault) does an event set `expires_at`, ordered by the provider's times
/// among such events; a date already past is a revocation and applies at once.
pub fn apply_event(kek: &KekStatus, event: &LifecycleEvent, now: DateTime<Utc>) -> EventEffect {
    let effect = |next: Option<KekStatus>, confirm, outcome| EventEffect {
        next,
        confirm,
        outcome,
    };
    if kek.state == KeyState::Destroyed {
        return effect(None, false, EventOutcome::IgnoredDestroyed);
    }
    if is_about_another_version(kek, event) {
        // Not the primary: only the DEKs under that version are concerned, and the KMS says
        // what became of it (the observation records the version's state).
        return effect(None, true, EventOutcome::Confirming);
    }
    match event.kind {
        kind if kind.is_revoking() => {
            if kek
                .claim
                .is_some_and(|c| c.claim_rank() >= kind.claim_rank())
            {
                return effect(None, true, EventOutcome::Unchanged);
            }
            let mut next = kek.clone();
            next.claim = Some(kind);
            effect(Some(next), true, EventOutcome::Applied)
        }
        // A warning; it may carry a date the KMS holds, so look.
        EventKind::Expiring => effect(None, true, EventOutcome::Unchanged),
        EventKind::ExpiryChanged if !event.provider.kms_holds_expiry() => {
            if kek.expiry_event_at.is_some_and(|at| event.time < at) {
                return effect(None, false, EventOutcome::Stale);
            }
            let mut next = kek.clone();
            next.expires_at = event.expires_at;
            next.expiry_event_at = Some(event.time);
            effect(Some(next), false, EventOutcome::Applied)
        }
        EventKind::ExpiryChanged if event.expires_at.is_some_and(|at| at <= now) => {
            // Shortened into the past: a revocation, at once.
            let mut next = kek.clone();
            if kek.claim.is_none() {
                next.claim = Some(EventKind::Expired);
            }
            effect((next != *kek).then_some(next), true, EventOutcome::Applied)
        }
        _ => effect(None, true, EventOutcome::Confirming),
    }
}

/// Whether `event` concerns one version of the key other than its primary, on a provider whose
/// versions have their own state. An event naming no version, or a rotation, is the key's.
pub fn is_about_another_version(kek: &KekStatus, event: &LifecycleEvent) -> bool {
    let per_version = matches!(
        event.kind,
        EventKind::Disabled
            | EventKind::Enabled
            | EventKind::DeletionScheduled
            | EventKind::DeletionCancelled
            | EventKind::Destroyed
    );
    per_version
        && event.provider.versions_have_state()
        && matches!((&event.version, &kek.current_version),
                    (Some(v), Some(primary)) if v != primary)
}

/// Whether `candidate` is a newer key version than `current`. Numbered versions (local, Vault)
/// only move forward, so a DEK already under a newer version is never rolled back; opaque
/// versions (AWS) are newer whenever they differ.
pub fn is_newer_version(current: &str, candidate: &str) -> bool {
    if current == candidate {
        return false;
    }
    match (current.parse::<u64>(), candidate.parse::<u64>()) {
        (Ok(c), Ok(n)) => c < n,
        _ => true,
    }
}

/// What a KMS said about a key, definitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The key's state (`None`: the KMS would not say, e.g. byokd may no longer read it).
    pub state: Option<KeyState>,
    /// byokd's permission on the key is denied.
    pub revoked: bool,
    /// The primary version, when the KMS told.
    pub version: Option<String>,
    /// The expiry, where the KMS holds one (`Some(None)`: none set).
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// The states of the versions other than the primary that still hold DEKs, where
    /// versions have their own state (`None`: the KMS reports no such thing).
    pub versions: Option<BTreeMap<String, KeyState>>,
}

/// What an observation does to one KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservationEffect {
    /// The KEK's new status (`None`: the observation matched the record).
    pub next: Option<KekStatus>,
    /// The claim the KMS did not confirm: it says the key is usable.
    pub unconfirmed: Option<EventKind>,
    /// The key now stands destroyed, as the KMS said (it was not before).
    pub destroyed: bool,
    /// Versions other than the primary, holding DEKs, that the KMS now reports in a state
    /// that refuses to decrypt and that was not recorded before: their DEKs cannot be
    /// unwrapped (for good, if `destroyed`), news for the tenant. Access does not change.
    pub versions_unusable: Vec<(String, KeyState)>,
}

/// Sets the observed part of `kek` to what the KMS said and settles the claim, unless a newer
/// claim arrived while the KMS was being asked (`claim_is_newer`): that one waits for its own
/// confirmation. A claim is confirmed when the KMS finds the key unusable (in whatever way:
/// a `destroyed` claim on a key the KMS calls disabled still blocks, but only the KMS's own
/// `destroyed` makes the key final).
pub fn apply_observation(
    kek: &KekStatus,
    observed: &Observation,
    claim_is_newer: bool,
    now: DateTime<Utc>,
) -> ObservationEffect {
    if kek.state == KeyState::Destroyed {
        // Final: a claim on a destroyed key has nothing left to confirm.
        return ObservationEffect {
            next: kek.claim.map(|_| KekStatus {
                claim: None,
                ..kek.clone()
            }),
            unconfirmed: None,
            destroyed: false,
            versions_unusable: Vec::new(),
        };
    }
    let mut next = kek.clone();
    if let Some(state) = observed.state {
        next.state = match state {
            KeyState::Expired => KeyState::Enabled,
            s => s,
        };
    }
    next.revoked = observed.revoked;
    if let Some(version) = &observed.version {
        next.current_version = Some(version.clone());
    }
    if let Some(expires_at) = observed.expires_at {
        next.expires_at = expires_at;
    }
    let mut versions_unusable = Vec::new();
    if let Some(versions) = &observed.versions {
        let mut others = versions.clone();
        if let Some(primary) = &next.current_version {
            others.remove(primary);
        }
        for (version, state) in &others {
            // A version that was the primary had the key's state; one not seen before was
            // usable when its DEKs were wrapped.
            let before = match kek.versions.get(version) {
                Some(s) => *s,
                None if kek.current_version.as_ref() == Some(version) => kek.state,
                None => KeyState::Enabled,
            };
            if *state != KeyState::Enabled && *state != KeyState::Expired && *state != before {
                versions_unusable.push((version.clone(), *state));
            }
        }
        next.versions = others;
    }
    let mut unconfirmed = None;
    if !claim_is_newer && let Some(claim) = kek.claim {
        next.claim = None;
        if usability(&next, now) == Usability::Usable {
            unconfirmed = Some(claim);
        }
    }
    if next.state == KeyState::Destroyed {
        // Whatever claim came in meanwhile, the KMS's own `destroyed` outranks it for good.
        next.claim = None;
    }
    ObservationEffect {
        destroyed: next.state == KeyState::Destroyed,
        next: (next != *kek).then_some(next),
        unconfirmed,
        versions_unusable,
    }
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
        KekStatus::observed(provider, "k1", Some("1".into()), None)
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

    fn primary(k: &KekStatus) -> [TenantKey<'_>; 1] {
        [TenantKey {
            status: k,
            primary: true,
            held_deks: 0,
        }]
    }

    fn access(k: &KekStatus, now: i64) -> Access {
        derive_access(&primary(k), t(now)).access
    }

    fn observe(state: KeyState, revoked: bool) -> Observation {
        Observation {
            state: Some(state),
            revoked,
            version: None,
            expires_at: None,
            versions: None,
        }
    }

    #[test]
    fn a_revoking_event_blocks_at_once_whatever_its_time() {
        for kind in EventKind::ALL.iter().filter(|k| k.is_revoking()) {
            // Dated long before, or after, anything byokd knows: it still applies.
            for at in [-1_000_000, 0, 250] {
                let effect = apply_event(&kek(Provider::Local), &event(*kind, at), t(0));
                let next = effect.next.expect("a claim");
                assert!(effect.confirm, "{kind}");
                let expected = if *kind == EventKind::Expired {
                    Access::EncryptBlocked
                } else {
                    Access::Inaccessible
                };
                assert_eq!(access(&next, 0), expected, "{kind}");
            }
        }
    }

    #[test]
    fn a_restoring_event_changes_nothing_until_the_kms_confirms() {
        let mut disabled = kek(Provider::Local);
        disabled.state = KeyState::Disabled;
        for kind in [
            EventKind::Enabled,
            EventKind::DeletionCancelled,
            EventKind::AccessRestored,
            EventKind::Rotated,
        ] {
            let effect = apply_event(&disabled, &event(kind, 10), t(10));
            assert_eq!(effect.next, None, "{kind}");
            assert!(effect.confirm, "{kind}");
            assert_eq!(effect.outcome, EventOutcome::Confirming);
        }
        let fine = apply_observation(&disabled, &observe(KeyState::Enabled, false), false, t(10));
        assert_eq!(access(&fine.next.expect("changed"), 10), Access::Accessible);
    }

    #[test]
    fn the_kms_settles_a_claim_both_ways() {
        let claimed = apply_event(&kek(Provider::Local), &event(EventKind::Disabled, 0), t(0))
            .next
            .expect("claim");
        let confirmed =
            apply_observation(&claimed, &observe(KeyState::Disabled, false), false, t(1));
        assert_eq!(confirmed.unconfirmed, None);
        assert_eq!(
            access(&confirmed.next.expect("changed"), 1),
            Access::Inaccessible
        );
        let refuted = apply_observation(&claimed, &observe(KeyState::Enabled, false), false, t(1));
        assert_eq!(refuted.unconfirmed, Some(EventKind::Disabled));
        assert_eq!(
            access(&refuted.next.expect("changed"), 1),
            Access::Accessible
        );
        // A claim that arrived while the KMS was being asked waits for its own answer.
        let newer = apply_observation(&claimed, &observe(KeyState::Enabled, false), true, t(1));
        assert_eq!(newer.unconfirmed, None);
        assert_eq!(newer.next, None);
    }

    #[test]
    fn claims_keep_the_strongest() {
        let k = kek(Provider::Local);
        let expired = apply_event(&k, &event(EventKind::Expired, 0), t(0))
            .next
            .expect("claim");
        let destroyed = apply_event(&expired, &event(EventKind::Destroyed, 0), t(0))
            .next
            .expect("stronger");
        assert_eq!(destroyed.claim, Some(EventKind::Destroyed));
        let again = apply_event(&destroyed, &event(EventKind::Disabled, 0), t(0));
        assert_eq!(again.next, None);
        assert_eq!(again.outcome, EventOutcome::Unchanged);
    }

    #[test]
    fn expiry_is_computed_from_the_clock() {
        let mut k = kek(Provider::Local);
        k.expires_at = Some(t(100));
        assert_eq!(access(&k, 99), Access::Accessible);
        assert_eq!(access(&k, 100), Access::EncryptBlocked);
        assert_eq!(effective_state(&k, t(100)), KeyState::Expired);
        let mut aws = k.clone();
        aws.provider = Provider::Aws;
        assert_eq!(access(&aws, 100), Access::Inaccessible);
    }

    #[test]
    fn an_observed_extension_lifts_expiry_and_a_late_expired_event_is_refuted() {
        let mut k = kek(Provider::Local);
        k.expires_at = Some(t(100));
        let late = apply_event(&k, &event(EventKind::Expired, 50), t(50))
            .next
            .expect("claim");
        assert_eq!(access(&late, 50), Access::EncryptBlocked);
        let obs = Observation {
            expires_at: Some(Some(t(10_000))),
            ..observe(KeyState::Enabled, false)
        };
        let settled = apply_observation(&late, &obs, false, t(60));
        assert_eq!(settled.unconfirmed, Some(EventKind::Expired));
        assert_eq!(
            access(&settled.next.expect("changed"), 200),
            Access::Accessible
        );
    }

    #[test]
    fn vault_expiry_events_order_among_themselves() {
        let mut k = kek(Provider::Vault);
        k.expires_at = Some(t(100));
        let mut newer = event(EventKind::ExpiryChanged, 20);
        newer.provider = Provider::Vault;
        newer.expires_at = Some(t(10_000));
        let extended = apply_event(&k, &newer, t(30)).next.expect("applied");
        let mut older = newer.clone();
        older.time = t(10);
        older.expires_at = Some(t(40));
        assert_eq!(
            apply_event(&extended, &older, t(30)).outcome,
            EventOutcome::Stale
        );
    }

    #[test]
    fn destroyed_is_final_once_the_kms_says_so() {
        let claimed = apply_event(&kek(Provider::Local), &event(EventKind::Destroyed, 0), t(0))
            .next
            .expect("claim");
        // The claim alone is not final: the KMS may refute it.
        let refuted = apply_observation(&claimed, &observe(KeyState::Enabled, false), false, t(1));
        assert_eq!(refuted.unconfirmed, Some(EventKind::Destroyed));
        let gone = apply_observation(&claimed, &observe(KeyState::Destroyed, false), false, t(1));
        assert!(gone.destroyed);
        let gone = gone.next.expect("changed");
        for kind in EventKind::ALL {
            assert_eq!(
                apply_event(&gone, &event(*kind, 20), t(20)).outcome,
                EventOutcome::IgnoredDestroyed
            );
        }
        let after = apply_observation(&gone, &observe(KeyState::Enabled, false), false, t(2));
        assert_eq!(after.next, None);
        // A claim that raced with the destroying observation does not outlive it.
        let raced = apply_observation(&claimed, &observe(KeyState::Destroyed, false), true, t(1));
        assert_eq!(raced.next.expect("changed").claim, None);
        let mut late = gone.clone();
        late.claim = Some(EventKind::Disabled);
        let cleared = apply_observation(&late, &observe(KeyState::Destroyed, false), true, t(3));
        assert_eq!(cleared.next.expect("changed").claim, None);
    }

    #[test]
    fn a_replaced_key_still_holding_deks_decides_access_while_unusable() {
        let new = kek(Provider::Local);
        let mut old = kek(Provider::Local);
        old.key_ref = "old".into();
        old.state = KeyState::Disabled;
        let keys = |held| {
            [
                TenantKey {
                    status: &new,
                    primary: true,
                    held_deks: 0,
                },
                TenantKey {
                    status: &old,
                    primary: false,
                    held_deks: held,
                },
            ]
        };
        let blocked = derive_access(&keys(7), t(0));
        assert_eq!(blocked.access, Access::Inaccessible);
        assert!(blocked.reason.expect("reason").contains("7 DEKs"));
        assert_eq!(derive_access(&keys(0), t(0)).access, Access::Accessible);
    }

    #[test]
    fn revoked_permission_blocks_whatever_the_state() {
        let fine = kek(Provider::Vault);
        let denied = apply_observation(&fine, &observe(KeyState::Enabled, true), false, t(0))
            .next
            .expect("changed");
        assert_eq!(access(&denied, 0), Access::Inaccessible);
    }

    #[test]
    fn no_key_means_nothing_to_block() {
        assert_eq!(derive_access(&[], t(0)).access, Access::Accessible);
    }
}
