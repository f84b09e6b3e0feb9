//! PostgreSQL SQL for notification delivery (see [`crate::store::outbox`]).

use super::{PgStore, PgTx};
use crate::store::StoreError;
use crate::store::outbox::{
    AttemptRecord, AttemptView, ClaimRequest, ClaimedNotification, DisabledEndpoint,
    NotificationView, Resolution, WebhookEndpoint,
};
use chrono::{DateTime, Utc};
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
        let rows = sqlx::query!(
            "WITH busy AS (
                 SELECT * FROM UNNEST($3::text[], $4::int8[]) AS b(recipient, n)
             ), due AS (
                 SELECT o.id, o.recipient, o.seq FROM outbox o
                 WHERE o.status = 'pending' AND o.channel IN ('email', 'webhook')
                   AND o.next_attempt_at <= $1
                   AND (o.locked_until IS NULL OR o.locked_until <= $1)
                   AND o.recipient NOT IN (SELECT recipient FROM busy WHERE n >= $5)
                 ORDER BY o.next_attempt_at, o.seq
                 LIMIT $2::bigint * 4
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
                       o.attempts, o.created_at",
            r.now,
            r.limit,
            &busy_recipients as &[&str],
            &busy_counts,
            r.per_recipient,
            r.lease_until,
            lease_id
        )
        .fetch_all(&self.pool)
        .await?;
        let mut claimed: Vec<(i64, ClaimedNotification)> = rows
            .into_iter()
            .map(|row| {
                let channel = match row.channel.as_str() {
                    "email" => crate::store::Channel::Email,
                    _ => crate::store::Channel::Webhook,
                };
                (
                    row.seq,
                    ClaimedNotification {
                        id: row.id,
                        lease_id,
                        tenant_id: row.tenant_id,
                        channel,
                        recipient: row.recipient,
                        kind: row.kind,
                        payload: row.payload,
                        attempts: row.attempts,
                        created_at: row.created_at,
                    },
                )
            })
            .collect();
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
        let done = sqlx::query!(
            "UPDATE webhook_endpoints
             SET previous_secret_sealed = secret_sealed, previous_secret_expires_at = $4,
                 secret_sealed = $3
             WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            endpoint_id,
            secret_sealed,
            keep_previous_until
        )
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
        Ok(sqlx::query_as!(
            WebhookEndpoint,
            "SELECT id, tenant_id, url, secret_sealed, previous_secret_sealed,
                    previous_secret_expires_at, enabled, failing_since
             FROM webhook_endpoints WHERE id = $1",
            id
        )
        .fetch_optional(&self.pool)
        .await?)
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
        let updated = sqlx::query_scalar!(
            r#"WITH upd AS (
                 UPDATE outbox SET attempts = attempts + 1, status = $3,
                        next_attempt_at = COALESCE($4, next_attempt_at), last_error = $5,
                        delivered_at = CASE WHEN $3 = 'delivered' THEN $6::timestamptz END,
                        dead_at = CASE WHEN $3 = 'dead' THEN $6 END,
                        locked_until = NULL, lease_id = NULL
                 WHERE id = $1 AND lease_id = $2 AND status = 'pending'
                 RETURNING id
             ), log AS (
                 INSERT INTO notification_attempts
                     (outbox_id, at, outcome, status_code, detail, duration_ms)
                 VALUES ($1, $6, $7, $8, $9, $10)
             )
             SELECT count(*) AS "n!" FROM upd"#,
            id,
            lease_id,
            status,
            next,
            last_error,
            a.at,
            a.resolution.as_str(),
            a.status_code,
            a.detail.as_deref(),
            a.duration_ms
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(updated == 1)
    }

    pub(in crate::store) async fn endpoint_succeeded(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query!(
            "UPDATE webhook_endpoints SET failing_since = NULL
             WHERE id = $1 AND failing_since IS NOT NULL",
            id
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn endpoint_failed(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar!(
            r#"UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, $2)
               WHERE id = $1 RETURNING failing_since AS "failing_since!""#,
            id,
            now
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    pub(in crate::store) async fn notifications(
        &self,
        tenant_id: &str,
        limit: i64,
    ) -> Result<Vec<NotificationView>, StoreError> {
        let mut views: Vec<NotificationView> = sqlx::query!(
            "SELECT id, channel, recipient, kind, status, attempts, last_error, next_attempt_at,
                    created_at, delivered_at, dead_at
             FROM outbox WHERE tenant_id = $1 ORDER BY seq DESC LIMIT $2",
            tenant_id,
            limit
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| NotificationView {
            id: r.id,
            channel: r.channel,
            recipient: r.recipient,
            kind: r.kind,
            status: r.status,
            attempts: r.attempts,
            last_error: r.last_error,
            next_attempt_at: r.next_attempt_at,
            created_at: r.created_at,
            delivered_at: r.delivered_at,
            dead_at: r.dead_at,
            attempt_log: Vec::new(),
        })
        .collect();
        let ids: Vec<Uuid> = views.iter().map(|v| v.id).collect();
        let attempts = sqlx::query!(
            "SELECT outbox_id, at, outcome, status_code, detail, duration_ms
             FROM notification_attempts WHERE outbox_id = ANY($1) ORDER BY id",
            &ids
        )
        .fetch_all(&self.pool)
        .await?;
        let mut by_row: HashMap<Uuid, Vec<AttemptView>> = HashMap::new();
        for a in attempts {
            by_row.entry(a.outbox_id).or_default().push(AttemptView {
                at: a.at,
                outcome: a.outcome,
                status_code: a.status_code,
                detail: a.detail,
                duration_ms: a.duration_ms,
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
        let row = sqlx::query_scalar!(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2,
                    locked_until = NULL, lease_id = NULL, dead_at = NULL
             WHERE id = $1 AND status <> 'delivered'
               AND (locked_until IS NULL OR locked_until <= $2)
             RETURNING id",
            id,
            now
        )
        .fetch_optional(&self.pool)
        .await?;
        if row.is_some() {
            return Ok(());
        }
        let status = sqlx::query_scalar!("SELECT status FROM outbox WHERE id = $1", id)
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
            let deleted = sqlx::query!(
                "DELETE FROM outbox WHERE id IN (
                     SELECT id FROM outbox
                     WHERE status = 'delivered' AND delivered_at < $1
                     LIMIT $2)",
                older_than,
                PRUNE_CHUNK
            )
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
        Ok(sqlx::query_as!(
            DisabledEndpoint,
            r#"UPDATE webhook_endpoints w SET enabled = FALSE, disabled_reason = $2
               WHERE w.id = $1 AND w.enabled
               RETURNING w.tenant_id, w.url,
                   ARRAY(SELECT email FROM tenant_contacts c WHERE c.tenant_id = w.tenant_id
                         ORDER BY email) AS "contacts!""#,
            id,
            reason
        )
        .fetch_optional(&mut *self.tx)
        .await?)
    }
}
