//! PostgreSQL SQL for notification delivery (see [`crate::store::outbox`]).

use super::{PgStore, PgTx};
use crate::store::StoreError;
use crate::store::outbox::{
    AttemptRecord, AttemptView, ClaimRequest, ClaimedNotification, DisabledEndpoint,
    NotificationView, Resolution, WebhookEndpoint,
};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::collections::HashMap;
use uuid::Uuid;

/// Rows deleted per statement when pruning, so a large backlog never holds long locks.
const PRUNE_CHUNK: i64 = 10_000;

impl PgStore {
    pub(in crate::store) async fn claim_notifications(
        &self,
        r: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedNotification>, StoreError> {
        if r.limit <= 0 {
            return Ok(Vec::new());
        }
        let (busy_recipients, busy_counts): (Vec<&str>, Vec<i64>) =
            r.busy.iter().map(|(k, n)| (k.as_str(), *n)).unzip();
        let lease_id = Uuid::new_v4();
        // The scan window is wider than the limit so that one recipient's backlog cannot
        // fill it; recipients at their limit are excluded before the window is taken.
        let rows = sqlx::query(
            "WITH busy AS (
                 SELECT * FROM UNNEST($3::text[], $4::int8[]) AS b(recipient, n)
             ), due AS (
                 SELECT o.id, o.recipient, o.seq FROM outbox o
                 WHERE o.status = 'pending' AND o.channel IN ('email', 'webhook')
                   AND o.next_attempt_at <= $1
                   AND (o.locked_until IS NULL OR o.locked_until <= $1)
                   AND o.recipient NOT IN (SELECT recipient FROM busy WHERE n >= $5)
                 ORDER BY o.next_attempt_at, o.seq
                 LIMIT $2 * 4
                 FOR UPDATE SKIP LOCKED
             ), ranked AS (
                 SELECT d.id, d.seq,
                        row_number() OVER (PARTITION BY d.recipient ORDER BY d.seq)
                            + COALESCE(b.n, 0) AS slot
                 FROM due d LEFT JOIN busy b ON b.recipient = d.recipient
             ), picked AS (
                 SELECT id FROM ranked WHERE slot <= $5 ORDER BY seq LIMIT $2
             )
             UPDATE outbox o SET locked_until = $6, lease_id = $7
             FROM picked WHERE o.id = picked.id
             RETURNING o.id, o.seq, o.tenant_id, o.channel, o.recipient, o.kind, o.payload,
                       o.attempts",
        )
        .bind(r.now)
        .bind(r.limit)
        .bind(&busy_recipients)
        .bind(&busy_counts)
        .bind(r.per_recipient)
        .bind(r.lease_until)
        .bind(lease_id)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let channel: String = row.try_get("channel")?;
                let channel = match channel.as_str() {
                    "email" => crate::store::Channel::Email,
                    _ => crate::store::Channel::Webhook,
                };
                Ok((
                    row.try_get::<i64, _>("seq")?,
                    ClaimedNotification {
                        id: row.try_get("id")?,
                        lease_id,
                        tenant_id: row.try_get("tenant_id")?,
                        channel,
                        recipient: row.try_get("recipient")?,
                        kind: row.try_get("kind")?,
                        payload: row.try_get("payload")?,
                        attempts: row.try_get("attempts")?,
                    },
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        claimed.sort_by_key(|(seq, _)| *seq);
        Ok(claimed.into_iter().map(|(_, c)| c).collect())
    }

    pub(in crate::store) async fn rotate_webhook_secret(
        &self,
        tenant_id: &str,
        endpoint_id: Uuid,
        secret_sealed: &[u8],
        keep_previous_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_endpoints
             SET previous_secret_sealed = secret_sealed, previous_secret_expires_at = $4,
                 secret_sealed = $3
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant_id)
        .bind(endpoint_id)
        .bind(secret_sealed)
        .bind(keep_previous_until)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "webhook endpoint {endpoint_id} of tenant {tenant_id:?}"
            )));
        }
        Ok(())
    }

    pub(in crate::store) async fn webhook_endpoint(
        &self,
        id: Uuid,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, url, secret_sealed, previous_secret_sealed,
                    previous_secret_expires_at, enabled, failing_since
             FROM webhook_endpoints WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(WebhookEndpoint {
                id: r.try_get("id")?,
                tenant_id: r.try_get("tenant_id")?,
                url: r.try_get("url")?,
                secret_sealed: r.try_get("secret_sealed")?,
                previous_secret_sealed: r.try_get("previous_secret_sealed")?,
                previous_secret_expires_at: r.try_get("previous_secret_expires_at")?,
                enabled: r.try_get("enabled")?,
                failing_since: r.try_get("failing_since")?,
            })
        })
        .transpose()
    }

    pub(in crate::store) async fn record_attempt(
        &self,
        id: Uuid,
        lease_id: Uuid,
        a: &AttemptRecord,
    ) -> Result<bool, StoreError> {
        let (status, next) = match a.resolution {
            Resolution::Delivered => ("delivered", None),
            Resolution::Retry(at) => ("pending", Some(at)),
            Resolution::Dead => ("dead", None),
        };
        let last_error = match a.resolution {
            Resolution::Delivered => None,
            _ => a.detail.as_deref(),
        };
        // One statement: the attempt is logged even when the lease was lost, the row is
        // updated only under its own lease.
        let updated: i64 = sqlx::query_scalar(
            "WITH upd AS (
                 UPDATE outbox SET attempts = attempts + 1, status = $3,
                        next_attempt_at = COALESCE($4, next_attempt_at), last_error = $5,
                        delivered_at = CASE WHEN $3 = 'delivered' THEN $6 END,
                        dead_at = CASE WHEN $3 = 'dead' THEN $6 END,
                        locked_until = NULL, lease_id = NULL
                 WHERE id = $1 AND lease_id = $2 AND status = 'pending'
                 RETURNING id
             ), log AS (
                 INSERT INTO notification_attempts
                     (outbox_id, at, outcome, status_code, detail, duration_ms)
                 VALUES ($1, $6, $7, $8, $9, $10)
             )
             SELECT count(*) FROM upd",
        )
        .bind(id)
        .bind(lease_id)
        .bind(status)
        .bind(next)
        .bind(last_error)
        .bind(a.at)
        .bind(a.resolution.as_str())
        .bind(a.status_code)
        .bind(a.detail.as_deref())
        .bind(a.duration_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(updated == 1)
    }

    pub(in crate::store) async fn endpoint_succeeded(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhook_endpoints SET failing_since = NULL
             WHERE id = $1 AND failing_since IS NOT NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn endpoint_failed(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let since = sqlx::query_scalar(
            "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, $2)
             WHERE id = $1 RETURNING failing_since",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(since.flatten())
    }

    pub(in crate::store) async fn notifications(
        &self,
        tenant_id: &str,
        limit: i64,
    ) -> Result<Vec<NotificationView>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, channel, recipient, kind, status, attempts, last_error, next_attempt_at,
                    created_at, delivered_at, dead_at
             FROM outbox WHERE tenant_id = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(tenant_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut views = rows
            .iter()
            .map(|r| {
                Ok(NotificationView {
                    id: r.try_get("id")?,
                    channel: r.try_get("channel")?,
                    recipient: r.try_get("recipient")?,
                    kind: r.try_get("kind")?,
                    status: r.try_get("status")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                    next_attempt_at: r.try_get("next_attempt_at")?,
                    created_at: r.try_get("created_at")?,
                    delivered_at: r.try_get("delivered_at")?,
                    dead_at: r.try_get("dead_at")?,
                    attempt_log: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let ids: Vec<Uuid> = views.iter().map(|v| v.id).collect();
        let attempts = sqlx::query(
            "SELECT outbox_id, at, outcome, status_code, detail, duration_ms
             FROM notification_attempts WHERE outbox_id = ANY($1) ORDER BY id",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut by_row: HashMap<Uuid, Vec<AttemptView>> = HashMap::new();
        for a in &attempts {
            by_row
                .entry(a.try_get("outbox_id")?)
                .or_default()
                .push(AttemptView {
                    at: a.try_get("at")?,
                    outcome: a.try_get("outcome")?,
                    status_code: a.try_get("status_code")?,
                    detail: a.try_get("detail")?,
                    duration_ms: a.try_get("duration_ms")?,
                });
        }
        for v in &mut views {
            v.attempt_log = by_row.remove(&v.id).unwrap_or_default();
        }
        Ok(views)
    }

    pub(in crate::store) async fn retry_notification(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let row = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2,
                    locked_until = NULL, lease_id = NULL, dead_at = NULL
             WHERE id = $1 AND status <> 'delivered'
               AND (locked_until IS NULL OR locked_until <= $2)
             RETURNING id",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if row.is_some() {
            return Ok(());
        }
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match status.as_deref() {
            Some("delivered") => Err(StoreError::Conflict(format!(
                "notification {id} was delivered already; it is not sent twice"
            ))),
            Some(_) => Err(StoreError::Conflict(format!(
                "notification {id} is being delivered right now"
            ))),
            None => Err(StoreError::NotFound(format!("notification {id}"))),
        }
    }

    pub(in crate::store) async fn prune_delivered(
        &self,
        older_than: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM outbox WHERE id IN (
                     SELECT id FROM outbox
                     WHERE status = 'delivered' AND delivered_at < $1
                     LIMIT $2)",
            )
            .bind(older_than)
            .bind(PRUNE_CHUNK)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += deleted;
            if deleted < PRUNE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }
}

impl PgTx {
    pub(in crate::store) async fn disable_endpoint(
        &mut self,
        id: Uuid,
        reason: &str,
    ) -> Result<Option<DisabledEndpoint>, StoreError> {
        let row = sqlx::query(
            "UPDATE webhook_endpoints w SET enabled = FALSE, disabled_reason = $2
             WHERE w.id = $1 AND w.enabled
             RETURNING w.tenant_id, w.url,
                 ARRAY(SELECT email FROM tenant_contacts c WHERE c.tenant_id = w.tenant_id
                       ORDER BY email) AS contacts",
        )
        .bind(id)
        .bind(reason)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| {
            Ok(DisabledEndpoint {
                tenant_id: r.try_get("tenant_id")?,
                url: r.try_get("url")?,
                contacts: r.try_get("contacts")?,
            })
        })
        .transpose()
    }
}
