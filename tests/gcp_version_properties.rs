//! Property test of key versions with states of their own (Google Cloud KMS), on the pure
//! state model (`byokd::domain::kek`), without I/O.
//!
//! A simulated Cloud KMS key goes through random sequences of version operations as Cloud KMS
//! allows them (create a version, make one primary, disable / enable, schedule destruction /
//! restore, destruction taking effect), while DEKs are wrapped under the primary and re-wrapped
//! onto it. Each operation's audit-log event (as the GCP normalizer turns it into a
//! `LifecycleEvent`) is delivered or lost, and the key is observed or not afterwards. Checked
//! at every step, against a model that knows only the truth:
//!
//! * an event about the primary that revokes takes effect at once (fail-safe);
//! * an event about any other version changes nothing before the KMS is asked;
//! * after an observation, access is the primary's alone (`accessible` when the primary is
//!   enabled, `inaccessible` otherwise, final once the primary was seen destroyed), whatever
//!   the other versions are; the record holds exactly the states of the other versions still
//!   holding DEKs; and a version's DEKs becoming unreadable is reported exactly when it
//!   happens.

use byokd::domain::kek::{self, KekStatus, TenantKey};
use byokd::domain::{Access, EventKind, KeyState, LifecycleEvent, Observation, Origin, Provider};
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::BTreeMap;

const KEY: &str = "projects/p/locations/global/keyRings/r/cryptoKeys/k";

/// A Cloud KMS version state (`DESTROY_SCHEDULED` is byokd's `pending_deletion`).
type Gcp = KeyState;

#[derive(Debug, Clone)]
enum Op {
    /// `CreateCryptoKeyVersion`, made primary or not (a rotation makes it primary).
    Create { primary: bool },
    /// `UpdateCryptoKeyPrimaryVersion` (the version must be enabled).
    SetPrimary(Index),
    /// `UpdateCryptoKeyVersion` state DISABLED.
    Disable(Index),
    /// `UpdateCryptoKeyVersion` state ENABLED.
    Enable(Index),
    /// `DestroyCryptoKeyVersion`: DESTROY_SCHEDULED.
    Destroy(Index),
    /// `RestoreCryptoKeyVersion`: back to DISABLED.
    Restore(Index),
    /// The scheduled destruction takes effect (no audit entry of its own is mapped).
    Finalize(Index),
    /// A DEK wrapped under the primary.
    Wrap,
    /// Every readable DEK under another version re-wrapped onto the primary.
    Rewrap,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => any::<bool>().prop_map(|primary| Op::Create { primary }),
        2 => any::<Index>().prop_map(Op::SetPrimary),
        3 => any::<Index>().prop_map(Op::Disable),
        3 => any::<Index>().prop_map(Op::Enable),
        2 => any::<Index>().prop_map(Op::Destroy),
        1 => any::<Index>().prop_map(Op::Restore),
        1 => any::<Index>().prop_map(Op::Finalize),
        3 => Just(Op::Wrap),
        1 => Just(Op::Rewrap),
    ]
}

/// What Cloud KMS holds: version `i + 1` is `states[i]`.
#[derive(Debug)]
struct Truth {
    states: Vec<Gcp>,
    primary: usize,
    deks: BTreeMap<usize, u32>,
}

impl Truth {
    fn name(i: usize) -> String {
        (i + 1).to_string()
    }

    /// Applies `op` as Cloud KMS would (refusing what it refuses) and returns the normalized
    /// event its audit-log entry gives, if any.
    fn apply(&mut self, op: &Op) -> Option<(EventKind, String)> {
        let pick = |ix: &Index, n: usize| ix.index(n);
        match op {
            Op::Create { primary } => {
                self.states.push(KeyState::Enabled);
                let i = self.states.len() - 1;
                if *primary {
                    self.primary = i;
                    return Some((EventKind::Rotated, Truth::name(i)));
                }
                None
            }
            Op::SetPrimary(ix) => {
                let i = pick(ix, self.states.len());
                (self.states[i] == KeyState::Enabled).then(|| {
                    self.primary = i;
                    (EventKind::Rotated, Truth::name(i))
                })
            }
            Op::Disable(ix) => self.change(
                pick(ix, self.states.len()),
                KeyState::Enabled,
                KeyState::Disabled,
                EventKind::Disabled,
            ),
            Op::Enable(ix) => self.change(
                pick(ix, self.states.len()),
                KeyState::Disabled,
                KeyState::Enabled,
                EventKind::Enabled,
            ),
            Op::Destroy(ix) => {
                let i = pick(ix, self.states.len());
                matches!(self.states[i], KeyState::Enabled | KeyState::Disabled).then(|| {
                    self.states[i] = KeyState::PendingDeletion;
                    (EventKind::DeletionScheduled, Truth::name(i))
                })
            }
            Op::Restore(ix) => self.change(
                pick(ix, self.states.len()),
                KeyState::PendingDeletion,
                KeyState::Disabled,
                EventKind::DeletionCancelled,
            ),
            Op::Finalize(ix) => {
                let i = pick(ix, self.states.len());
                if self.states[i] == KeyState::PendingDeletion {
                    self.states[i] = KeyState::Destroyed;
                }
                None
            }
            Op::Wrap => {
                if self.states[self.primary] == KeyState::Enabled {
                    *self.deks.entry(self.primary).or_default() += 1;
                }
                None
            }
            Op::Rewrap => {
                if self.states[self.primary] == KeyState::Enabled {
                    let movable: Vec<usize> = self
                        .deks
                        .keys()
                        .copied()
                        .filter(|v| *v != self.primary && self.states[*v] == KeyState::Enabled)
                        .collect();
                    for v in movable {
                        let n = self.deks.remove(&v).unwrap_or(0);
                        *self.deks.entry(self.primary).or_default() += n;
                    }
                }
                None
            }
        }
    }

    fn change(
        &mut self,
        i: usize,
        from: Gcp,
        to: Gcp,
        kind: EventKind,
    ) -> Option<(EventKind, String)> {
        (self.states[i] == from).then(|| {
            self.states[i] = to;
            (kind, Truth::name(i))
        })
    }

    /// What byokd's observation of the key holds once the lifecycle kept only the versions
    /// still holding DEKs (`cryptoKeys.get` + `cryptoKeyVersions.list`).
    fn observation(&self) -> Observation {
        let versions = self
            .deks
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(v, _)| (Truth::name(*v), self.states[*v]))
            .collect();
        Observation {
            state: Some(self.states[self.primary]),
            revoked: false,
            version: Some(Truth::name(self.primary)),
            expires_at: None,
            versions: Some(versions),
        }
    }

    /// The non-primary versions holding DEKs, with their states.
    fn held_elsewhere(&self) -> BTreeMap<String, KeyState> {
        self.deks
            .iter()
            .filter(|(v, n)| **n > 0 && **v != self.primary)
            .map(|(v, _)| (Truth::name(*v), self.states[*v]))
            .collect()
    }
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0)
        .single()
        .expect("valid time")
}

fn access(kek: &KekStatus, now: DateTime<Utc>) -> Access {
    kek::derive_access(
        &[TenantKey {
            status: kek,
            primary: true,
            held_deks: 0,
        }],
        now,
    )
    .access
}

fn run(steps: &[(Op, bool, bool)]) -> Result<(), TestCaseError> {
    let mut truth = Truth {
        states: vec![KeyState::Enabled],
        primary: 0,
        deks: BTreeMap::new(),
    };
    let mut kek = KekStatus::observed(Provider::Gcp, KEY, Some("1".into()), None);
    let mut destroyed_seen = false;
    // Every version's state at the last observation.
    let mut last_seen: Vec<KeyState> = truth.states.clone();
    for (n, (op, delivered, observed)) in steps.iter().enumerate() {
        let now = t(n as i64 * 10);
        let event = truth.apply(op);
        if let (Some((kind, version)), true) = (event, *delivered) {
            let e = LifecycleEvent {
                provider: Provider::Gcp,
                event_id: format!("ins-{n}"),
                kind,
                key_ref: KEY.into(),
                version: Some(version.clone()),
                expires_at: None,
                time: now,
                source: "projects/p/logs/cloudaudit.googleapis.com%2Factivity".into(),
                origin: Origin::Event,
            };
            let before = access(&kek, now);
            let about_primary = kek.current_version.as_deref() == Some(version.as_str());
            let elsewhere = kek::is_about_another_version(&kek, &e);
            let final_ = kek.state == KeyState::Destroyed;
            let effect = kek::apply_event(&kek, &e, now);
            if let Some(next) = effect.next {
                kek = next;
            }
            let after = access(&kek, now);
            if kind.is_revoking() && about_primary {
                prop_assert_ne!(
                    after,
                    Access::Accessible,
                    "step {}: {:?} on the primary",
                    n,
                    op
                );
            }
            if !about_primary && kind != EventKind::Rotated {
                prop_assert_eq!(after, before, "step {}: {:?} on another version", n, op);
                // The KMS is asked, unless byokd already knows the key is gone for good.
                prop_assert!(!elsewhere || final_ || effect.confirm);
                prop_assert!(effect.outcome != kek::EventOutcome::Applied || !elsewhere);
            }
        }
        if *observed {
            let obs = truth.observation();
            let effect = kek::apply_observation(&kek, &obs, false, now);
            if let Some(next) = effect.next {
                kek = next;
            }
            if truth.states[truth.primary] == KeyState::Destroyed {
                destroyed_seen = true;
            }
            let expected = if destroyed_seen || truth.states[truth.primary] != KeyState::Enabled {
                Access::Inaccessible
            } else {
                Access::Accessible
            };
            prop_assert_eq!(
                access(&kek, now),
                expected,
                "step {}: {:?}, truth {:?}",
                n,
                op,
                truth
            );
            if !destroyed_seen {
                prop_assert_eq!(&kek.versions, &truth.held_elsewhere(), "step {}", n);
                prop_assert_eq!(
                    kek.current_version.clone(),
                    Some(Truth::name(truth.primary))
                );
                // News only of versions holding DEKs now refusing to decrypt, and always of
                // one that was usable at the last observation.
                let now_held = truth.held_elsewhere();
                for (v, s) in &effect.versions_unusable {
                    prop_assert_eq!(now_held.get(v), Some(s));
                    prop_assert_ne!(*s, KeyState::Enabled);
                }
                for (v, s) in &now_held {
                    let i: usize = v.parse::<usize>().expect("numbered") - 1;
                    if *s != KeyState::Enabled && last_seen.get(i) == Some(&KeyState::Enabled) {
                        prop_assert!(
                            effect.versions_unusable.contains(&(v.clone(), *s)),
                            "step {}: version {} went {} unreported",
                            n,
                            v,
                            s
                        );
                    }
                }
            }
            last_seen = truth.states.clone();
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512)))]

    #[test]
    fn access_follows_the_primary_and_versions_only_their_deks(
        steps in prop::collection::vec((op(), prop::bool::weighted(0.8), prop::bool::weighted(0.6)), 1..40)
    ) {
        run(&steps)?;
    }
}

/// The case: disabling the primary, then enabling an old version, leaves the tenant
/// inaccessible, before and after the KMS is asked.
#[test]
fn disabling_the_primary_then_enabling_an_old_version_stays_inaccessible() {
    // Version 1 disabled while version 2 is primary, then: disable 2, enable 1.
    let mut truth = Truth {
        states: vec![KeyState::Disabled, KeyState::Enabled],
        primary: 1,
        deks: BTreeMap::from([(0, 3)]),
    };
    let mut kek = KekStatus::observed(Provider::Gcp, KEY, Some("2".into()), None);
    kek = kek::apply_observation(&kek, &truth.observation(), false, t(0))
        .next
        .expect("version 1 recorded");
    assert_eq!(kek.versions.get("1"), Some(&KeyState::Disabled));
    assert_eq!(access(&kek, t(0)), Access::Accessible);
    let event = |kind, version: &str, at| LifecycleEvent {
        provider: Provider::Gcp,
        event_id: format!("ins-{at}"),
        kind,
        key_ref: KEY.into(),
        version: Some(version.into()),
        expires_at: None,
        time: t(at),
        source: "log".into(),
        origin: Origin::Event,
    };
    truth.states[1] = KeyState::Disabled;
    kek = kek::apply_event(&kek, &event(EventKind::Disabled, "2", 1), t(1))
        .next
        .expect("a claim on the primary");
    assert_eq!(access(&kek, t(1)), Access::Inaccessible);
    truth.states[0] = KeyState::Enabled;
    let enabled = kek::apply_event(&kek, &event(EventKind::Enabled, "1", 2), t(2));
    assert_eq!(enabled.next, None);
    assert!(enabled.confirm);
    assert_eq!(access(&kek, t(2)), Access::Inaccessible);
    let observed = kek::apply_observation(&kek, &truth.observation(), false, t(5));
    assert_eq!(observed.unconfirmed, None);
    let kek = observed.next.expect("settled");
    assert_eq!(access(&kek, t(5)), Access::Inaccessible);
    assert_eq!(kek.state, KeyState::Disabled);
    assert_eq!(kek.versions.get("1"), Some(&KeyState::Enabled));
}
