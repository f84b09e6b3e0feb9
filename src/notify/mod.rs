//! Delivery of what the lifecycle code put in the outbox.
//!
//! [`access`] relays tenant access changes to the `byok.access` exchange. Email and webhook
//! delivery of tenant notifications will live beside it; their rows already accumulate in the
//! outbox with one row per cause, channel and recipient, built by [`tenant_notifications`].

pub mod access;

use crate::store::{Channel, NewOutbox, TenantRow};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

/// One outbox row per contact (email) and per enabled webhook endpoint of `tenant`, with the
/// webhook body `{type, timestamp, data}`. `cause` names what triggered it (an event, a job);
/// the dedupe key `kind:cause:channel:recipient` makes the notification unique however often
/// the cause is processed.
pub fn tenant_notifications(
    tenant: &TenantRow,
    kind: &str,
    cause: &str,
    data: Value,
    now: DateTime<Utc>,
) -> Vec<NewOutbox> {
    let body = json!({ "type": kind, "timestamp": now, "data": data });
    let recipients = tenant
        .contacts
        .iter()
        .map(|c| (Channel::Email, c.clone()))
        .chain(
            tenant
                .webhooks
                .iter()
                .map(|w| (Channel::Webhook, w.to_string())),
        );
    recipients
        .map(|(channel, recipient)| NewOutbox {
            id: Uuid::now_v7(),
            tenant_id: Some(tenant.id.clone()),
            channel,
            kind: kind.to_owned(),
            dedupe_key: format!("{kind}:{cause}:{}:{recipient}", channel.as_str()),
            recipient,
            payload: body.clone(),
        })
        .collect()
}
