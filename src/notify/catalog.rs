//! The catalog of notifications: every notification byokd sends, as one enum.
//!
//! A variant holds its typed facts (tenant, key, versions, dates, counts, cause) and decides
//! its audience ([`Notification::audience`]), its dedupe key, its webhook `type` and its email
//! template pair (`templates/email/<type>.{txt,html}`). [`Notification::outbox_rows`] is the
//! only way a notification enters the outbox; every producer (lifecycle, re-wrap jobs,
//! sweeps, delivery itself) builds a variant and calls it, so wording, rounding and dedupe
//! are decided once.
//!
//! What a recipient should do next is decided here too ([`Notification::next_steps`]): the
//! same list goes into the email and, as `data.next_steps`, into the webhook body, so both
//! channels always give the same advice. It is computed at delivery from the stored facts
//! and the platform's name, so a wording fix reaches notifications already queued.
//!
//! Operators (`BYOKD_OPERATOR_EMAILS`, `[[operator_webhooks]]`) hear of what a tenant cannot
//! fix. A notification for them is queued as one `operator` row, expanded by the dispatcher
//! into one row per operator address with the operator settings it has ([`fan_out`]), so
//! the code that decides to notify needs no configuration.

use crate::domain::JobKind;
use crate::domain::{Access, BlockCause, Blocked, EventKind, KeyState, Provider};
use crate::store::{Channel, NewOutbox, TenantRow};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

/// What changed a tenant's access: an event, an observation of the KMS, the clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// `event`, `observation`, `expiry`, `registration`, `replacement`.
    pub kind: String,
    /// The event's id, for events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Unique per change: the dedupe key of what it causes.
    pub id: String,
}

/// `key.expiring`: a key's expiry date is near.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyExpiring {
    /// Tenant.
    pub tenant_id: String,
    /// Provider of the key.
    pub provider: Provider,
    /// The key.
    pub key_ref: String,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// Whole days left, rounded up ([`days_left`]).
    pub days_left: i64,
    /// The warning threshold crossed; `None` for a warning the provider sent itself.
    pub threshold_days: Option<u32>,
}

/// `key.expired`: the primary key's date passed; new encryption is blocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyExpired {
    /// Tenant.
    pub tenant_id: String,
    /// Provider of the key.
    pub provider: Provider,
    /// The key.
    pub key_ref: String,
    /// When it expired, if known.
    pub expires_at: Option<DateTime<Utc>>,
    /// Existing data stays readable (false where the provider refuses to decrypt too).
    pub decrypts: bool,
    /// Access before.
    pub previous: Access,
    /// Access now.
    pub access: Access,
    /// The reason as the API shows it.
    pub reason: String,
    /// What made byokd notice.
    pub trigger: Trigger,
}

/// `tenant.inaccessible`: nothing can be decrypted or encrypted for the tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInaccessible {
    /// Tenant.
    pub tenant_id: String,
    /// Provider of the key that blocks.
    pub provider: Provider,
    /// The key that blocks.
    pub key_ref: String,
    /// What is wrong with it.
    pub cause: BlockCause,
    /// The KMS confirmed it; `false` while an event's report awaits confirmation.
    pub confirmed: bool,
    /// DEKs the key still holds when it is a key being replaced.
    pub held_deks: Option<i64>,
    /// Access before (the same when only the cause changed, e.g. destroyed after
    /// deletion was scheduled).
    pub previous: Access,
    /// Always `inaccessible`.
    pub access: Access,
    /// The reason as the API shows it.
    pub reason: String,
    /// What made byokd notice.
    pub trigger: Trigger,
}

/// `tenant.restored`: the tenant's keys are usable again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRestored {
    /// Tenant.
    pub tenant_id: String,
    /// The key whose change restored access, when one did.
    pub provider: Option<Provider>,
    /// The key.
    pub key_ref: Option<String>,
    /// Access before.
    pub previous: Access,
    /// Always `accessible`.
    pub access: Access,
    /// What made byokd notice.
    pub trigger: Trigger,
}

/// `key.rotated`: every DEK moved to the key's new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotated {
    /// Tenant.
    pub tenant_id: String,
    /// Provider of the key.
    pub provider: Provider,
    /// The key.
    pub key_ref: String,
    /// Versions the DEKs moved off, comma-separated.
    pub from_version: String,
    /// The version they are under now.
    pub to_version: String,
    /// DEKs re-wrapped.
    pub dek_count: i64,
    /// The re-wrap job.
    pub job_id: i64,
}

/// `key.replaced`: every DEK moved from the old key to the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReplaced {
    /// Tenant.
    pub tenant_id: String,
    /// Provider of the old key.
    pub previous_provider: Provider,
    /// The old key, which holds no DEK any more.
    pub previous_key_ref: String,
    /// Provider of the new key.
    pub provider: Provider,
    /// The new key.
    pub key_ref: String,
    /// The new key's version the DEKs are under.
    pub to_version: String,
    /// DEKs moved.
    pub dek_count: i64,
    /// The re-wrap job.
    pub job_id: i64,
}

/// `key.rewrap_failed`: a re-wrap job ended with DEKs it could not re-wrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRewrapFailed {
    /// Tenant.
    pub tenant_id: String,
    /// The job.
    pub job_id: i64,
    /// Rotation or replacement.
    pub job_kind: JobKind,
    /// Provider of the key the DEKs are under.
    pub provider: Provider,
    /// The key the DEKs are under.
    pub key_ref: String,
    /// The key they were to move to (the same key for a rotation).
    pub target_key_ref: String,
    /// The version they were to move to.
    pub to_version: String,
    /// DEKs that could not be re-wrapped.
    pub failed: i64,
    /// DEKs re-wrapped.
    pub done: i64,
    /// When the job ended (a retried job that fails again is a new occurrence).
    pub finished_at: DateTime<Utc>,
}

/// `key.unreachable`: the key's KMS has given no answer for a while.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUnreachable {
    /// Tenant.
    pub tenant_id: String,
    /// Provider of the key.
    pub provider: Provider,
    /// The key.
    pub key_ref: String,
    /// Since when no probe got an answer.
    pub unreachable_since: DateTime<Utc>,
    /// The last error.
    pub error: String,
}

/// `key.destroyed_with_deks`: a key was destroyed while DEKs were still wrapped only by it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDestroyedWithDeks {
    /// Tenant.
    pub tenant_id: String,
    /// Provider of the key.
    pub provider: Provider,
    /// The key.
    pub key_ref: String,
    /// DEKs now unrecoverable.
    pub dek_count: i64,
    /// It was the tenant's primary key.
    pub primary: bool,
    /// The one version destroyed, where versions have their own state (GCP): the key and
    /// its primary version live on, the DEKs under this version are lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `endpoint.disabled`: a webhook endpoint kept failing (or answered 410) and was disabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDisabled {
    /// Tenant.
    pub tenant_id: String,
    /// The endpoint.
    pub endpoint_id: Uuid,
    /// Its URL without query, fragment or password.
    pub url: String,
    /// Why.
    pub reason: String,
    /// When.
    pub disabled_at: DateTime<Utc>,
}

/// `operator.revocation_unconfirmed`: an event said a key was revoked; its KMS says it is
/// usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationUnconfirmed {
    /// Tenant.
    pub tenant_id: String,
    /// Provider of the key.
    pub provider: Provider,
    /// The key.
    pub key_ref: String,
    /// What the event claimed.
    pub claim: EventKind,
    /// What the KMS said of the key's state (`None`: it answered on permission only).
    pub observed_state: Option<KeyState>,
    /// Whether the KMS refused the platform's test wrap.
    pub permission_revoked: bool,
    /// Who asked the KMS (`confirm`, `probe`).
    pub source: String,
    /// When.
    pub observed_at: DateTime<Utc>,
}

/// `operator.schedule_failed`: a sweep schedule's run failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleFailed {
    /// The schedule's name.
    pub schedule: String,
    /// The tick that failed.
    pub tick: DateTime<Utc>,
    /// The error.
    pub error: String,
}

/// `operator.access_anomaly`: a key-access anomaly rule fired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessAnomaly {
    /// The rule (`client_rate`, `tenant_refusals`, `inaccessible_attempts`, `bad_token`).
    pub rule: String,
    /// What it is about: a client name, a tenant id, a token fingerprint.
    pub subject: String,
    /// The tenant concerned, if one is.
    pub tenant_id: Option<String>,
    /// The client concerned, if one is.
    pub client: Option<String>,
    /// Start of the alert window (one alert per rule, subject and window).
    pub window_start: DateTime<Utc>,
    /// What was observed in the last scan window.
    pub observed: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// The rule's explanation of the numbers.
    pub summary: String,
}

/// Every notification byokd sends. The serde tag is the webhook `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Notification {
    /// A key expires soon.
    #[serde(rename = "key.expiring")]
    KeyExpiring(KeyExpiring),
    /// The primary key expired.
    #[serde(rename = "key.expired")]
    KeyExpired(KeyExpired),
    /// A key was rotated and every DEK re-wrapped.
    #[serde(rename = "key.rotated")]
    KeyRotated(KeyRotated),
    /// A key was replaced and every DEK moved.
    #[serde(rename = "key.replaced")]
    KeyReplaced(KeyReplaced),
    /// A re-wrap job failed for some DEKs.
    #[serde(rename = "key.rewrap_failed")]
    KeyRewrapFailed(KeyRewrapFailed),
    /// A key's KMS does not answer.
    #[serde(rename = "key.unreachable")]
    KeyUnreachable(KeyUnreachable),
    /// A key was destroyed with DEKs under it.
    #[serde(rename = "key.destroyed_with_deks")]
    KeyDestroyedWithDeks(KeyDestroyedWithDeks),
    /// The tenant's data cannot be used.
    #[serde(rename = "tenant.inaccessible")]
    TenantInaccessible(TenantInaccessible),
    /// The tenant's data can be used again.
    #[serde(rename = "tenant.restored")]
    TenantRestored(TenantRestored),
    /// A webhook endpoint was disabled.
    #[serde(rename = "endpoint.disabled")]
    EndpointDisabled(EndpointDisabled),
    /// A revocation the KMS did not confirm.
    #[serde(rename = "operator.revocation_unconfirmed")]
    RevocationUnconfirmed(RevocationUnconfirmed),
    /// A schedule's run failed.
    #[serde(rename = "operator.schedule_failed")]
    ScheduleFailed(ScheduleFailed),
    /// A key-access anomaly rule fired.
    #[serde(rename = "operator.access_anomaly")]
    AccessAnomaly(AccessAnomaly),
}

/// Who a notification is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audience {
    /// The tenant's contact emails.
    pub contacts: bool,
    /// The tenant's webhook endpoints.
    pub webhooks: bool,
    /// The platform's operators.
    pub operators: bool,
}

const TENANT: Audience = Audience {
    contacts: true,
    webhooks: true,
    operators: false,
};
const OPERATORS: Audience = Audience {
    contacts: false,
    webhooks: false,
    operators: true,
};

/// The recipient of the one `operator` row a notification for operators is queued as.
pub const OPERATORS_RECIPIENT: &str = "operators";
/// Prefix of an operator webhook's recipient (`operator:<name>`).
pub const OPERATOR_WEBHOOK_PREFIX: &str = "operator:";

/// Whole days from `now` until `at`, rounded up: a key expiring in 5 hours has 1 day left,
/// never 0 while it has not expired. The one rounding every producer uses.
pub fn days_left(at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let seconds = (at - now).num_seconds().max(0);
    (seconds + 86_399) / 86_400
}

impl Notification {
    /// The webhook `type`, outbox `kind` and template name.
    pub fn kind(&self) -> &'static str {
        match self {
            Notification::KeyExpiring(_) => "key.expiring",
            Notification::KeyExpired(_) => "key.expired",
            Notification::KeyRotated(_) => "key.rotated",
            Notification::KeyReplaced(_) => "key.replaced",
            Notification::KeyRewrapFailed(_) => "key.rewrap_failed",
            Notification::KeyUnreachable(_) => "key.unreachable",
            Notification::KeyDestroyedWithDeks(_) => "key.destroyed_with_deks",
            Notification::TenantInaccessible(_) => "tenant.inaccessible",
            Notification::TenantRestored(_) => "tenant.restored",
            Notification::EndpointDisabled(_) => "endpoint.disabled",
            Notification::RevocationUnconfirmed(_) => "operator.revocation_unconfirmed",
            Notification::ScheduleFailed(_) => "operator.schedule_failed",
            Notification::AccessAnomaly(_) => "operator.access_anomaly",
        }
    }

    /// Every webhook `type` in the catalog.
    pub const KINDS: &'static [&'static str] = &[
        "key.expiring",
        "key.expired",
        "key.rotated",
        "key.replaced",
        "key.rewrap_failed",
        "key.unreachable",
        "key.destroyed_with_deks",
        "tenant.inaccessible",
        "tenant.restored",
        "endpoint.disabled",
        "operator.revocation_unconfirmed",
        "operator.schedule_failed",
        "operator.access_anomaly",
    ];

    /// Who it is for.
    pub fn audience(&self) -> Audience {
        match self {
            Notification::KeyExpiring(_)
            | Notification::KeyExpired(_)
            | Notification::KeyRotated(_)
            | Notification::KeyReplaced(_)
            | Notification::KeyUnreachable(_)
            | Notification::KeyDestroyedWithDeks(_)
            | Notification::TenantInaccessible(_)
            | Notification::TenantRestored(_) => TENANT,
            // A failed job needs the platform's hand as much as the tenant's attention.
            Notification::KeyRewrapFailed(_) => Audience {
                operators: true,
                ..TENANT
            },
            // The endpoint itself is what failed: tell the contacts, and the operators in
            // case the platform's network is to blame.
            Notification::EndpointDisabled(_) => Audience {
                contacts: true,
                webhooks: false,
                operators: true,
            },
            Notification::RevocationUnconfirmed(_)
            | Notification::ScheduleFailed(_)
            | Notification::AccessAnomaly(_) => OPERATORS,
        }
    }

    /// The tenant concerned, if one is.
    pub fn tenant_id(&self) -> Option<&str> {
        Some(match self {
            Notification::KeyExpiring(n) => &n.tenant_id,
            Notification::KeyExpired(n) => &n.tenant_id,
            Notification::KeyRotated(n) => &n.tenant_id,
            Notification::KeyReplaced(n) => &n.tenant_id,
            Notification::KeyRewrapFailed(n) => &n.tenant_id,
            Notification::KeyUnreachable(n) => &n.tenant_id,
            Notification::KeyDestroyedWithDeks(n) => &n.tenant_id,
            Notification::TenantInaccessible(n) => &n.tenant_id,
            Notification::TenantRestored(n) => &n.tenant_id,
            Notification::EndpointDisabled(n) => &n.tenant_id,
            Notification::RevocationUnconfirmed(n) => &n.tenant_id,
            Notification::AccessAnomaly(n) => return n.tenant_id.as_deref(),
            Notification::ScheduleFailed(_) => return None,
        })
    }

    /// What makes this notification unique: the same occurrence processed twice (a
    /// redelivered event, a sweep on two replicas) yields the same key, so it is sent once.
    pub fn dedupe_key(&self) -> String {
        let ms = |at: DateTime<Utc>| at.timestamp_millis();
        match self {
            // Once per key, expiry date and threshold; the provider's own warning once per
            // key and date.
            Notification::KeyExpiring(n) => format!(
                "{}:{}:{}:{}",
                n.provider,
                n.key_ref,
                ms(n.expires_at),
                n.threshold_days
                    .map_or_else(|| "provider".to_owned(), |t| format!("{t}d"))
            ),
            Notification::KeyExpired(n) => format!("{}:{}", n.tenant_id, n.trigger.id),
            Notification::TenantInaccessible(n) => format!("{}:{}", n.tenant_id, n.trigger.id),
            Notification::TenantRestored(n) => format!("{}:{}", n.tenant_id, n.trigger.id),
            Notification::KeyRotated(n) => format!("rewrap-job:{}", n.job_id),
            Notification::KeyReplaced(n) => format!("rewrap-job:{}", n.job_id),
            Notification::KeyRewrapFailed(n) => {
                format!("rewrap-job:{}:{}", n.job_id, ms(n.finished_at))
            }
            Notification::KeyUnreachable(n) => {
                format!("{}:{}:{}", n.provider, n.key_ref, ms(n.unreachable_since))
            }
            // Destroyed is final: once per key.
            Notification::KeyDestroyedWithDeks(n) => match &n.version {
                Some(v) => format!("{}:{}:version:{v}", n.provider, n.key_ref),
                None => format!("{}:{}", n.provider, n.key_ref),
            },
            Notification::EndpointDisabled(n) => {
                format!("{}:{}", n.endpoint_id, n.disabled_at.timestamp_micros())
            }
            Notification::RevocationUnconfirmed(n) => format!(
                "{}:{}:{}",
                n.provider,
                n.key_ref,
                n.observed_at.timestamp_micros()
            ),
            Notification::AccessAnomaly(n) => {
                format!("{}:{}:{}", n.rule, n.subject, ms(n.window_start))
            }
            // A schedule failing every few minutes tells operators once an hour.
            Notification::ScheduleFailed(n) => {
                format!("{}:{}", n.schedule, n.tick.timestamp() / 3600)
            }
        }
    }

    /// The stored body: `{type, timestamp, data}` with the facts only (advice is added at
    /// delivery, see [`webhook_body`]).
    pub fn body(&self, now: DateTime<Utc>) -> Value {
        let mut body = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        if let Some(map) = body.as_object_mut() {
            map.insert("timestamp".into(), json!(now));
        }
        body
    }

    /// Reads a stored body back; `None` for a type or shape the catalog does not know (rows
    /// queued by an older version), which then go out as stored with the default template.
    pub fn from_body(body: &Value) -> Option<Notification> {
        let shape = json!({ "type": body.get("type")?, "data": body.get("data")? });
        serde_json::from_value(shape).ok()
    }

    /// The outbox rows that deliver it: one per contact and per enabled webhook endpoint of
    /// `tenant` as its audience says, and one `operator` row to fan out. The dedupe key
    /// `type:occurrence:channel:recipient` makes each unique however often it is produced.
    pub fn outbox_rows(&self, tenant: Option<&TenantRow>, now: DateTime<Utc>) -> Vec<NewOutbox> {
        let audience = self.audience();
        let kind = self.kind();
        let body = self.body(now);
        let occurrence = self.dedupe_key();
        let mut recipients: Vec<(Channel, String)> = Vec::new();
        if let Some(tenant) = tenant {
            if audience.contacts {
                recipients.extend(tenant.contacts.iter().map(|c| (Channel::Email, c.clone())));
            }
            if audience.webhooks {
                recipients.extend(
                    tenant
                        .webhooks
                        .iter()
                        .map(|w| (Channel::Webhook, w.to_string())),
                );
            }
        }
        if audience.operators {
            recipients.push((Channel::Operator, OPERATORS_RECIPIENT.to_owned()));
        }
        recipients
            .into_iter()
            .map(|(channel, recipient)| NewOutbox {
                id: Uuid::now_v7(),
                tenant_id: self.tenant_id().map(str::to_owned),
                channel,
                kind: kind.to_owned(),
                dedupe_key: format!("{kind}:{occurrence}:{}:{recipient}", channel.as_str()),
                recipient,
                payload: body.clone(),
            })
            .collect()
    }

    /// What the recipient should do now, in order. `platform` is the name tenants know the
    /// platform by; `operator` selects the advice for the platform's operators.
    pub fn next_steps(&self, platform: &str, operator: bool) -> Vec<String> {
        let s = |text: &str| text.to_owned();
        #[allow(non_snake_case)]
        let Platform = sentence_start(platform);
        match self {
            Notification::KeyExpiring(n) => vec![
                format!(
                    "Extend the key's expiry date in your KMS ({}), or",
                    n.provider
                ),
                format!(
                    "register a new key with {platform}; existing data moves to it automatically."
                ),
                format!("{Platform} notices either change on its own; nothing else is needed."),
            ],
            Notification::KeyExpired(n) => {
                let mut steps = vec![
                    format!(
                        "Extend the key's expiry date in your KMS ({}), or",
                        n.provider
                    ),
                    format!("register a new key with {platform}."),
                ];
                steps.push(format!(
                    "{platform} notices either change on its own; nothing else is needed."
                ));
                steps
            }
            Notification::TenantInaccessible(n) => inaccessible_steps(n, platform),
            Notification::TenantRestored(_) => vec![s("No action is needed.")],
            Notification::KeyRotated(n) => vec![
                s("No action is needed."),
                format!(
                    "Keep version(s) {} of the key enabled for as long as you keep backups made before this rotation.",
                    n.from_version
                ),
            ],
            Notification::KeyReplaced(n) => vec![
                s("No action is needed for your data."),
                format!(
                    "The old key {} no longer protects any data of {platform}; keep it only as long as you keep backups made before this change, then you may disable it.",
                    n.previous_key_ref
                ),
            ],
            Notification::KeyRewrapFailed(n) if operator => vec![
                format!(
                    "List the failed DEKs and their errors: GET /v1/rewrap-jobs?tenant={} (job {}).",
                    n.tenant_id, n.job_id
                ),
                s(
                    "Fix the cause (a corrupted DEK, a key the KMS refuses), then run the re-wrap again by registering the rotation or replacement once more.",
                ),
                format!(
                    "Run `byokd deks verify --tenant {}` to see which DEKs still decrypt.",
                    n.tenant_id
                ),
            ],
            Notification::KeyRewrapFailed(n) => vec![
                format!(
                    "Keep the key {} and all its versions enabled: {} data keys still depend on it.",
                    n.key_ref, n.failed
                ),
                format!(
                    "{Platform}'s operators have been told and will retry the job (job {}); you do not need to do anything else.",
                    n.job_id
                ),
            ],
            Notification::KeyUnreachable(n) => vec![
                format!(
                    "Meanwhile {platform} keeps using the key as last confirmed: access does not change because of an outage."
                ),
                format!(
                    "Check that your KMS ({}) is up and reachable from {platform}, and that its endpoint, network rules and credentials for {platform} are unchanged.",
                    n.provider
                ),
                format!(
                    "When the KMS answers again, {platform} resumes on its own; a key that turns out disabled or revoked then blocks access."
                ),
            ],
            Notification::KeyDestroyedWithDeks(n) => vec![
                format!(
                    "{} data keys were wrapped only by this key and can no longer be decrypted by anyone; the data they protect is lost.",
                    n.dek_count
                ),
                if n.primary {
                    format!("Register a new key with {platform} so that new data can be stored.")
                } else if n.version.is_some() {
                    s(
                        "The key's primary version is not affected: new data is still stored and read as before.",
                    )
                } else {
                    s("Your current key is not affected.")
                },
                s(
                    "If you hold a backup of the key material, restore it under the same key name in your KMS before doing anything else.",
                ),
            ],
            Notification::EndpointDisabled(n) if operator => vec![
                format!(
                    "The endpoint of tenant {} kept failing; its contacts were emailed.",
                    n.tenant_id
                ),
                s(
                    "If the platform's network or proxy is to blame, fix that and ask the tenant to re-register the endpoint.",
                ),
            ],
            Notification::EndpointDisabled(_) => vec![
                s("Notifications continue by email meanwhile."),
                format!(
                    "Fix the endpoint, then register it again with {platform} to receive webhooks again."
                ),
            ],
            Notification::RevocationUnconfirmed(n) => vec![
                format!(
                    "An event said the key was {}, but its KMS answers that it is {}{}: the tenant stays blocked only until the KMS's answer is applied.",
                    n.claim,
                    n.observed_state
                        .map_or("in an unreported state".to_owned(), |s| s.to_string()),
                    if n.permission_revoked {
                        " with permission revoked"
                    } else {
                        " and usable"
                    }
                ),
                s(
                    "Find out who published the event (GET /v1/audit?tenant=...): a forged or misrouted event is a security incident.",
                ),
                s("The key is checked again in 30 seconds in case the KMS was lagging."),
            ],
            Notification::AccessAnomaly(n) => {
                let look = match (&n.tenant_id, &n.client) {
                    (Some(t), _) => format!("tenant={t}"),
                    (None, Some(c)) => format!("client={c}"),
                    (None, None) => "action=auth&outcome=refused".to_owned(),
                };
                let act = match n.rule.as_str() {
                    "client_rate" => {
                        "If the client's load did not grow for a known reason, treat its token as leaked: revoke it (byokd clients revoke NAME) and issue a new one."
                    }
                    "bad_token" => {
                        "Someone holds a token that is unknown or revoked: find the caller in your network logs; a revoked client still calling may be a stale deployment or a leak."
                    }
                    "inaccessible_attempts" => {
                        "A service keeps asking for a tenant whose key was revoked: check that it honours byok.access messages, and that the tenant knows."
                    }
                    _ => {
                        "Find which service makes the refused attempts and why (scope, tenant access)."
                    }
                };
                vec![
                    format!("Look at the attempts: GET /v1/audit?{look}"),
                    s(act),
                    format!(
                        "One alert per rule, subject and window: nothing more is sent for this until the window starting {} ends.",
                        n.window_start.format("%Y-%m-%d %H:%M UTC")
                    ),
                ]
            }
            Notification::ScheduleFailed(n) => vec![
                format!(
                    "Look at the daemon's log around {} for the schedule {}.",
                    n.tick.format("%Y-%m-%d %H:%M:%S UTC"),
                    n.schedule
                ),
                format!("Run it by hand to check: `byokd sweep {}`.", n.schedule),
            ],
        }
    }
}

fn inaccessible_steps(n: &TenantInaccessible, platform: &str) -> Vec<String> {
    #[allow(non_snake_case)]
    let Platform = sentence_start(platform);
    let provider = n.provider;
    let mut steps = match n.cause {
        BlockCause::Disabled => vec![format!(
            "Enable the key in your KMS ({provider}); access returns within moments, without anything else to do."
        )],
        BlockCause::DeletionScheduled => vec![
            format!(
                "Cancel the key's scheduled deletion in your KMS ({provider}) before the deletion date, or the key and the data it protects are lost for good."
            ),
            "Then enable the key: a cancelled deletion leaves the key disabled.".to_owned(),
            "Access returns once the key is enabled.".to_owned(),
        ],
        BlockCause::Destroyed => vec![
            "The key was destroyed: this is final. Data wrapped only by this key can no longer be decrypted by anyone.".to_owned(),
            format!("Register a new key with {platform} so that new data can be stored."),
        ],
        BlockCause::PermissionRevoked => vec![
            format!(
                "Restore {platform}'s permission to use the key in your KMS ({provider}): the grant, key policy, role assignment or policy that allowed it."
            ),
            "Access returns within moments once the permission is back.".to_owned(),
        ],
        BlockCause::Expired => vec![
            format!(
                "Extend the key's expiry date in your KMS ({provider}), or register a new key with {platform}."
            ),
        ],
    };
    if !n.confirmed {
        steps.push(format!(
            "{Platform} acted on your KMS's event and is confirming with the KMS; if the key is in fact usable, access returns on its own."
        ));
    }
    if let Some(held) = n.held_deks {
        steps.insert(
            0,
            format!(
                "This is the key being replaced: {held} data keys are still under it and cannot be moved to the new key until it is usable again."
            ),
        );
    }
    steps
}

/// `name` at the start of a sentence: its first letter capitalised ("the platform" ->
/// "The platform"; "acme Cloud" keeps the rest as written).
pub fn sentence_start(name: &str) -> String {
    let mut chars = name.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_uppercase().chain(chars).collect()
    })
}

/// The webhook body to send for a stored one: the stored facts plus `data.next_steps`.
/// A body the catalog does not know is sent as stored.
pub fn webhook_body(payload: &Value, platform: &str) -> Value {
    let mut body = payload.clone();
    if let Some(n) = Notification::from_body(payload)
        && let Some(data) = body.get_mut("data").and_then(Value::as_object_mut)
    {
        data.insert(
            "next_steps".into(),
            json!(n.next_steps(platform, is_for_operators(payload))),
        );
    }
    body
}

/// Whether a stored body was fanned out to operators (see [`fan_out`]).
pub fn is_for_operators(payload: &Value) -> bool {
    payload.get("audience").and_then(Value::as_str) == Some("operators")
}

/// Operator addresses, from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Operators {
    /// Emails.
    pub emails: Vec<String>,
    /// Names of the configured operator webhooks.
    pub webhooks: Vec<String>,
}

/// Expands one `operator` row (its kind, dedupe key and body) into a row per operator
/// address. The new rows' dedupe keys derive from the operator row's, so expanding the same
/// row twice (a crash between expanding and marking it) adds nothing.
pub fn fan_out(
    kind: &str,
    dedupe_key: &str,
    tenant_id: Option<&str>,
    payload: &Value,
    operators: &Operators,
) -> Vec<NewOutbox> {
    let suffix = format!(":{}:{OPERATORS_RECIPIENT}", Channel::Operator.as_str());
    let occurrence = dedupe_key.strip_suffix(&suffix).unwrap_or(dedupe_key);
    let mut body = payload.clone();
    if let Some(map) = body.as_object_mut() {
        map.insert("audience".into(), json!("operators"));
    }
    let emails = operators.emails.iter().map(|e| (Channel::Email, e.clone()));
    let hooks = operators
        .webhooks
        .iter()
        .map(|name| (Channel::Webhook, format!("{OPERATOR_WEBHOOK_PREFIX}{name}")));
    emails
        .chain(hooks)
        .map(|(channel, recipient)| NewOutbox {
            id: Uuid::now_v7(),
            tenant_id: tenant_id.map(str::to_owned),
            channel,
            kind: kind.to_owned(),
            dedupe_key: format!("{occurrence}:{}:{recipient}", channel.as_str()),
            recipient,
            payload: body.clone(),
        })
        .collect()
}

impl TenantInaccessible {
    /// The notification for an access decision that blocks everything.
    pub fn new(
        tenant_id: &str,
        blocked: &Blocked,
        previous: Access,
        trigger: Trigger,
    ) -> TenantInaccessible {
        TenantInaccessible {
            tenant_id: tenant_id.to_owned(),
            provider: blocked.provider,
            key_ref: blocked.key_ref.clone(),
            cause: blocked.cause,
            confirmed: blocked.confirmed,
            held_deks: blocked.held_deks,
            previous,
            access: Access::Inaccessible,
            reason: blocked.to_string(),
            trigger,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_left_rounds_up_and_never_reaches_zero_before_expiry() {
        let now: DateTime<Utc> = "2026-11-01T00:00:00Z".parse().expect("time");
        let h = chrono::Duration::hours;
        assert_eq!(days_left(now + h(5), now), 1);
        assert_eq!(days_left(now + h(24), now), 1);
        assert_eq!(days_left(now + h(25), now), 2);
        assert_eq!(days_left(now + chrono::Duration::days(14), now), 14);
        assert_eq!(days_left(now - h(1), now), 0);
    }

    #[test]
    fn every_kind_is_listed_once() {
        let mut kinds = Notification::KINDS.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), Notification::KINDS.len());
    }

    #[test]
    fn fan_out_is_idempotent_by_dedupe_key() {
        let n = Notification::ScheduleFailed(ScheduleFailed {
            schedule: "probe".into(),
            tick: "2026-11-01T00:00:00Z".parse().expect("time"),
            error: "boom".into(),
        });
        let now = Utc::now();
        let rows = n.outbox_rows(None, now);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].channel, Channel::Operator);
        let operators = Operators {
            emails: vec!["ops@example.com".into()],
            webhooks: vec!["pager".into()],
        };
        let a = fan_out(
            &rows[0].kind,
            &rows[0].dedupe_key,
            None,
            &rows[0].payload,
            &operators,
        );
        let b = fan_out(
            &rows[0].kind,
            &rows[0].dedupe_key,
            None,
            &rows[0].payload,
            &operators,
        );
        let keys = |r: &[NewOutbox]| r.iter().map(|r| r.dedupe_key.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&a), keys(&b));
        assert_eq!(
            keys(&a),
            [
                "operator.schedule_failed:probe:498192:email:ops@example.com",
                "operator.schedule_failed:probe:498192:webhook:operator:pager"
            ]
        );
        assert!(is_for_operators(&a[0].payload));
    }
}
