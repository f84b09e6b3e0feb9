//! Notification delivery state: leases on email/webhook outbox rows, the attempt log,
//! webhook endpoint health, the operator's view and retention.
//!
//! A worker claims rows by setting a lease (`locked_until`, `lease_id`) in one short
//! statement and delivers with no transaction open; its result is recorded only while the
//! lease is still its own, so a crashed or stalled worker's rows are simply due again once
//! the lease expires.

use super::{Channel, Store, StoreError, StoreTx};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A leased notification, ready to deliver.
#[derive(Debug, Clone)]
pub struct ClaimedNotification {
    /// Row id: the webhook-id and the Message-ID seed, stable across attempts.
    pub id: Uuid,
    /// The lease this worker holds; recording a result needs it.
    pub lease_id: Uuid,
    /// The tenant concerned.
    pub tenant_id: Option<String>,
    /// Email or webhook.
    pub channel: Channel,
    /// Contact address (email) or endpoint id (webhook).
    pub recipient: String,
    /// Notification type (`key.expiring`, ...).
    pub kind: String,
    /// The webhook body; the facts an email renders.
    pub payload: serde_json::Value,
    /// Attempts recorded before this one.
    pub attempts: i32,
    /// When it was enqueued (delivery latency).
    pub created_at: DateTime<Utc>,
}

/// What a claim may take: how many rows, for how long, and which recipients are busy.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    /// Rows due at or before this time are claimed.
    pub now: DateTime<Utc>,
    /// Most rows to claim.
    pub limit: i64,
    /// The lease ends here; after it the row is due again.
    pub lease_until: DateTime<Utc>,
    /// Deliveries already in flight per recipient (recipient, count).
    pub busy: &'a [(String, i64)],
    /// Most deliveries in flight per recipient.
    pub per_recipient: i64,
}

/// A webhook endpoint as the deliverer needs it.
#[derive(Clone)]
pub struct WebhookEndpoint {
    /// Endpoint id.
    pub id: Uuid,
    /// Owning tenant.
    pub tenant_id: String,
    /// Where to POST.
    pub url: String,
    /// The signing secret, sealed.
    pub secret_sealed: Vec<u8>,
    /// The secret it replaced, sealed, while a rotation's grace period lasts.
    pub previous_secret_sealed: Option<Vec<u8>>,
    /// When the previous secret stops signing.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// Disabled endpoints get nothing.
    pub enabled: bool,
    /// First failure since the last success.
    pub failing_since: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for WebhookEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookEndpoint")
            .field("id", &self.id)
            .field("tenant_id", &self.tenant_id)
            .field("url", &self.url)
            .field("enabled", &self.enabled)
            .field("failing_since", &self.failing_since)
            .finish_non_exhaustive()
    }
}

/// How a delivery attempt ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Accepted by the peer: done.
    Delivered,
    /// Failed; try again at this time.
    Retry(DateTime<Utc>),
    /// Failed for good (permanent error or schedule exhausted); kept for the operator.
    Dead,
}

impl Resolution {
    /// The attempt outcome name stored in the attempt log.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Delivered => "delivered",
            Resolution::Retry(_) => "retry",
            Resolution::Dead => "dead",
        }
    }
}

/// One delivery attempt to record.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// When it was made.
    pub at: DateTime<Utc>,
    /// What becomes of the row.
    pub resolution: Resolution,
    /// HTTP status or SMTP reply code, when the peer answered.
    pub status_code: Option<i32>,
    /// The peer's answer or why none came.
    pub detail: Option<String>,
    /// Wall time of the attempt.
    pub duration_ms: i32,
}

/// One attempt as the API shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    /// When.
    pub at: DateTime<Utc>,
    /// `delivered`, `retry` or `dead`.
    pub outcome: String,
    /// HTTP status or SMTP reply code.
    pub status_code: Option<i32>,
    /// Peer's answer or the error.
    pub detail: Option<String>,
    /// Duration in milliseconds.
    pub duration_ms: i32,
}

/// An outbox row as the API shows it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct NotificationView {
    /// Row id (the webhook-id).
    pub id: Uuid,
    /// `email`, `webhook` or `amqp`.
    pub channel: String,
    /// Contact address, endpoint id or routing key.
    pub recipient: String,
    /// Notification type.
    pub kind: String,
    /// `pending`, `delivered` or `dead`.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last failure, if the last attempt failed.
    pub last_error: Option<String>,
    /// Next attempt, while pending.
    pub next_attempt_at: DateTime<Utc>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Delivered.
    pub delivered_at: Option<DateTime<Utc>>,
    /// Given up.
    pub dead_at: Option<DateTime<Utc>>,
    /// The attempt log, oldest first.
    pub attempt_log: Vec<AttemptView>,
}

/// An endpoint that was just disabled, with whom to tell.
#[derive(Debug, Clone)]
pub struct DisabledEndpoint {
    /// Owning tenant.
    pub tenant_id: String,
    /// The endpoint's URL.
    pub url: String,
    /// The tenant's contacts.
    pub contacts: Vec<String>,
}

impl Store {
    /// Replaces an endpoint's signing secret; the old one keeps signing (alongside) until
    /// `keep_previous_until`. [`StoreError::NotFound`] unless the endpoint is the tenant's.
    pub async fn rotate_webhook_secret(
        &self,
        tenant_id: &str,
        endpoint_id: Uuid,
        secret_sealed: &[u8],
        keep_previous_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.rotate_webhook_secret(tenant_id, endpoint_id, secret_sealed, keep_previous_until).await)
    }

    /// Leases due email/webhook rows, oldest first, skipping rows another worker holds and
    /// recipients already at their concurrency limit.
    pub async fn claim_notifications(
        &self,
        request: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedNotification>, StoreError> {
        dispatch!(self, s => s.claim_notifications(request).await)
    }

    /// Reads one webhook endpoint.
    pub async fn webhook_endpoint(&self, id: Uuid) -> Result<Option<WebhookEndpoint>, StoreError> {
        dispatch!(self, s => s.webhook_endpoint(id).await)
    }

    /// Records an attempt and what becomes of the row; `false` when the lease was lost
    /// (the attempt is logged, the row left to whoever holds it now).
    pub async fn record_attempt(
        &self,
        id: Uuid,
        lease_id: Uuid,
        attempt: &AttemptRecord,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.record_attempt(id, lease_id, attempt).await)
    }

    /// Clears an endpoint's failure clock after a success.
    pub async fn endpoint_succeeded(&self, id: Uuid) -> Result<(), StoreError> {
        dispatch!(self, s => s.endpoint_succeeded(id).await)
    }

    /// Starts an endpoint's failure clock if it is not running; returns when it started.
    pub async fn endpoint_failed(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        dispatch!(self, s => s.endpoint_failed(id, now).await)
    }

    /// A tenant's notifications, newest first, with their attempts.
    pub async fn notifications(
        &self,
        tenant_id: &str,
        limit: i64,
    ) -> Result<Vec<NotificationView>, StoreError> {
        dispatch!(self, s => s.notifications(tenant_id, limit).await)
    }

    /// Makes a pending or dead row due now with a fresh retry schedule.
    /// `NotFound` for no such row, `Conflict` for a delivered one.
    pub async fn retry_notification(&self, id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
        dispatch!(self, s => s.retry_notification(id, now).await)
    }

    /// Deletes delivered rows delivered before `older_than` (dead rows stay); returns how many.
    pub async fn prune_delivered(&self, older_than: DateTime<Utc>) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_delivered(older_than).await)
    }
}

impl StoreTx {
    /// Disables an enabled endpoint; `None` when it was already disabled or is gone.
    pub async fn disable_endpoint(
        &mut self,
        id: Uuid,
        reason: &str,
    ) -> Result<Option<DisabledEndpoint>, StoreError> {
        dispatch!(self, t => t.disable_endpoint(id, reason).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_debug_output_leaves_the_sealed_secret_out() {
        let endpoint = WebhookEndpoint {
            id: Uuid::nil(),
            tenant_id: "acme".into(),
            url: "https://hooks.acme.example/byok".into(),
            secret_sealed: vec![0xAB; 40],
            previous_secret_sealed: Some(vec![0xCD; 40]),
            previous_secret_expires_at: None,
            enabled: true,
            failing_since: None,
        };
        let debug = format!("{endpoint:?}");
        assert!(debug.contains("hooks.acme.example"));
        assert!(
            !debug.contains("secret") && !debug.contains("171"),
            "{debug}"
        );
    }
}
