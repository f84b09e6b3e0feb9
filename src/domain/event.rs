//! The normalized lifecycle event every intake format is turned into.

use super::Provider;
use chrono::{DateTime, Utc};

named_enum!(
    /// What happened to a key. The canonical CloudEvents `type` is `byok.key.<kind>`.
    EventKind, "event kind" {
        /// A new key version became primary.
        Rotated => "rotated",
        /// The key was disabled.
        Disabled => "disabled",
        /// The key was (re-)enabled.
        Enabled => "enabled",
        /// The key is scheduled for deletion (unusable while pending).
        DeletionScheduled => "deletion_scheduled",
        /// A scheduled deletion was cancelled; the key comes back disabled, as in AWS.
        DeletionCancelled => "deletion_cancelled",
        /// The key material is gone for good.
        Destroyed => "destroyed",
        /// The key's expiry date was set, moved or cleared.
        ExpiryChanged => "expiry_changed",
        /// The provider warns that the key expires soon.
        Expiring => "expiring",
        /// The key expired.
        Expired => "expired",
        /// byokd's access to the key was revoked (grant, policy, role).
        AccessRevoked => "access_revoked",
        /// byokd's access to the key was restored.
        AccessRestored => "access_restored",
    }
);

/// One lifecycle event after normalization, whatever format it arrived in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// The provider the key lives in; with `event_id`, the dedupe key.
    pub provider: Provider,
    /// The provider's (or publisher's) own id for this event.
    pub event_id: String,
    /// What happened.
    pub kind: EventKind,
    /// The key, as the provider names it (ARN, vault URL, resource name, transit key name).
    pub key_ref: String,
    /// The key version the event is about (`rotated`: the new primary version).
    pub version: Option<String>,
    /// The new expiry (`expiry_changed`, `expiring`); `None` on `expiry_changed` clears it.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the change happened at the provider; orders events for one key.
    pub time: DateTime<Utc>,
    /// Who reported it (CloudEvents `source`), kept for the audit trail.
    pub source: String,
    /// How byokd learned of it.
    pub origin: Origin,
}

named_enum!(
    /// How byokd learned of an event; the audit log's `source`. Sweeps and probes no longer
    /// make events: what they find is an observation or the clock (lifecycle's causes).
    Origin, "origin" {
        /// A lifecycle event from the KMS (AMQP or HTTP intake).
        Event => "event",
    }
);
