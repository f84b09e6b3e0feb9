//! SQLite SQL for notification delivery (see [`crate::store::outbox`]).

use super::{SqliteStore, SqliteTx, get_json, get_strings, get_uuid, json_list, ots, ts, uid};
use crate::store::outbox::{
    AttemptRecord, AttemptView, ClaimRequest, ClaimedNotification, DisabledEndpoint,
    NotificationView, Resolution, WebhookEndpoint,
};
use crate::store::{Channel, StoreError};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::collections::HashMap;
use uuid::Uuid;

impl SqliteStore {
    pub(in crate::store) async fn claim_notifications(
        &self,
        r: &ClaimRequest<'_>,
    ) -> Result<Vec<ClaimedNotification>, StoreError> {
        if r.limit <= 0 {
            return Ok(Vec::new());
        }
        let busy: Vec<(&str, i64)> = r.busy.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let now = ts(r.now);
        let mut tx = self.begin().await?;
        // The scan window is wider than the limit so that one recipient's backlog cannot
        // fill it; recipients at their limit are left out before the window is taken.
        let due = sqlx::query(
            "SELECT id, seq, tenant_id, channel, recipient, kind, payload, attempts, created_at
             FROM outbox
             WHERE status = 'pending' AND channel IN ('email', 'webhook')
               AND next_attempt_at <= ?1
               AND (locked_until IS NULL OR locked_until <= ?1)
               AND recipient NOT IN (SELECT value ->> 0 FROM json_each(?3)
                                     WHERE value ->> 1 >= ?4)
             ORDER BY next_attempt_at, seq
             LIMIT ?2 * 4",
        )
        .bind(&now)
        .bind(r.limit)
        .bind(json_list(&busy))
        .bind(r.per_recipient)
        .fetch_all(&mut *tx.tx)
        .await?;
        // Each recipient's rows in seq order take the slots its deliveries in flight left.
        let mut slots: HashMap<String, i64> =
            busy.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect();
        let mut by_seq: Vec<(i64, &sqlx::sqlite::SqliteRow)> = due
            .iter()
            .map(|row| Ok((row.try_get("seq")?, row)))
            .collect::<Result<_, StoreError>>()?;
        by_seq.sort_by_key(|(seq, _)| *seq);
        let lease_id = Uuid::new_v4();
        let mut claimed = Vec::new();
        for (_, row) in by_seq {
            if claimed.len() as i64 >= r.limit {
                break;
            }
            let recipient: String = row.try_get("recipient")?;
            let used = slots.entry(recipient.clone()).or_insert(0);
            if *used >= r.per_recipient {
                continue;
            }
            *used += 1;
            let channel: String = row.try_get("channel")?;
            claimed.push(ClaimedNotification {
                id: get_uuid(row, "id")?,
                lease_id,
                tenant_id: row.try_get("tenant_id")?,
                channel: if channel == "email" {
                    Channel::Email
                } else {
                    Channel::Webhook
                },
                recipient,
                kind: row.try_get("kind")?,
                payload: get_json(row, "payload")?,
                attempts: row.try_get("attempts")?,
                created_at: row.try_get("created_at")?,
            });
        }
        let ids: Vec<String> = claimed.iter().map(|c| uid(c.id)).collect();
        sqlx::query(
            "UPDATE outbox SET locked_until = ?2, lease_id = ?3
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_list(&ids))
        .bind(ts(r.lease_until))
        .bind(uid(lease_id))
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        Ok(claimed)
    }

    pub(in crate::store) async fn rotate_webhook_secret(
        &self,
        tenant_id: &str,
        endpoint_id: Uuid,
        secret_sealed: &[u8],
        keep_previous_until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE webhook_endpoints
             SET previous_secret_sealed = secret_sealed, previous_secret_expires_at = ?4,
                 secret_sealed = ?3
             WHERE tenant_id = ?1 AND id = ?2",
        )
        .bind(tenant_id)
        .bind(uid(endpoint_id))
        .bind(secret_sealed)
        .bind(ts(keep_previous_until))
        .execute(&mut *tx.tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "webhook endpoint {endpoint_id} of tenant {tenant_id:?}"
            )));
        }
        tx.commit().await
    }

    pub(in crate::store) async fn webhook_endpoint(
        &self,
        id: Uuid,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, url, secret_sealed, previous_secret_sealed,
                    previous_secret_expires_at, enabled, failing_since
             FROM webhook_endpoints WHERE id = ?1",
        )
        .bind(uid(id))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(WebhookEndpoint {
                id: get_uuid(&r, "id")?,
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
        let at = ts(a.at);
        let mut tx = self.begin().await?;
        // The attempt is logged even when the lease was lost; the row is updated only under
        // its own lease.
        let updated = sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, status = ?3,
                    next_attempt_at = COALESCE(?4, next_attempt_at), last_error = ?5,
                    delivered_at = CASE WHEN ?3 = 'delivered' THEN ?6 END,
                    dead_at = CASE WHEN ?3 = 'dead' THEN ?6 END,
                    locked_until = NULL, lease_id = NULL
             WHERE id = ?1 AND lease_id = ?2 AND status = 'pending'",
        )
        .bind(uid(id))
        .bind(uid(lease_id))
        .bind(status)
        .bind(ots(next))
        .bind(last_error)
        .bind(&at)
        .execute(&mut *tx.tx)
        .await?
        .rows_affected();
        sqlx::query(
            "INSERT INTO notification_attempts
                 (outbox_id, at, outcome, status_code, detail, duration_ms)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM outbox WHERE id = ?1)",
        )
        .bind(uid(id))
        .bind(&at)
        .bind(a.resolution.as_str())
        .bind(a.status_code)
        .bind(a.detail.as_deref())
        .bind(a.duration_ms)
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        Ok(updated == 1)
    }

    pub(in crate::store) async fn endpoint_succeeded(&self, id: Uuid) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE webhook_endpoints SET failing_since = NULL
             WHERE id = ?1 AND failing_since IS NOT NULL",
        )
        .bind(uid(id))
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await
    }

    pub(in crate::store) async fn endpoint_failed(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let mut tx = self.begin().await?;
        let since: Option<DateTime<Utc>> = sqlx::query_scalar(
            "UPDATE webhook_endpoints SET failing_since = COALESCE(failing_since, ?2)
             WHERE id = ?1 RETURNING failing_since",
        )
        .bind(uid(id))
        .bind(ts(now))
        .fetch_optional(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        Ok(since)
    }

    pub(in crate::store) async fn notifications(
        &self,
        tenant_id: &str,
        limit: i64,
    ) -> Result<Vec<NotificationView>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, channel, recipient, kind, status, attempts, last_error, next_attempt_at,
                    created_at, delivered_at, dead_at
             FROM outbox WHERE tenant_id = ?1 ORDER BY seq DESC LIMIT ?2",
        )
        .bind(tenant_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut views = rows
            .iter()
            .map(|r| {
                Ok(NotificationView {
                    id: get_uuid(r, "id")?,
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
        let ids: Vec<String> = views.iter().map(|v| uid(v.id)).collect();
        let attempts = sqlx::query(
            "SELECT outbox_id, at, outcome, status_code, detail, duration_ms
             FROM notification_attempts
             WHERE outbox_id IN (SELECT value FROM json_each(?1)) ORDER BY id",
        )
        .bind(json_list(&ids))
        .fetch_all(&self.pool)
        .await?;
        let mut by_row: HashMap<Uuid, Vec<AttemptView>> = HashMap::new();
        for a in &attempts {
            by_row
                .entry(get_uuid(a, "outbox_id")?)
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
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?2,
                    locked_until = NULL, lease_id = NULL, dead_at = NULL
             WHERE id = ?1 AND status <> 'delivered'
               AND (locked_until IS NULL OR locked_until <= ?2)",
        )
        .bind(uid(id))
        .bind(ts(now))
        .execute(&mut *tx.tx)
        .await?
        .rows_affected();
        if done == 1 {
            return tx.commit().await;
        }
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM outbox WHERE id = ?1")
            .bind(uid(id))
            .fetch_optional(&mut *tx.tx)
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
        // In chunks, so a large backlog never holds the write lock for long.
        const CHUNK: i64 = 10_000;
        let mut total = 0;
        loop {
            let mut tx = self.begin().await?;
            let deleted = sqlx::query(
                "DELETE FROM outbox WHERE id IN (
                     SELECT id FROM outbox
                     WHERE status = 'delivered' AND delivered_at < ?1
                     LIMIT ?2)",
            )
            .bind(ts(older_than))
            .bind(CHUNK)
            .execute(&mut *tx.tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            total += deleted;
            if deleted < CHUNK as u64 {
                return Ok(total);
            }
        }
    }
}

impl SqliteTx {
    pub(in crate::store) async fn disable_endpoint(
        &mut self,
        id: Uuid,
        reason: &str,
    ) -> Result<Option<DisabledEndpoint>, StoreError> {
        let row = sqlx::query(
            "UPDATE webhook_endpoints SET enabled = 0, disabled_reason = ?2
             WHERE id = ?1 AND enabled
             RETURNING tenant_id, url,
                 (SELECT json_group_array(email) FROM
                     (SELECT email FROM tenant_contacts c
                      WHERE c.tenant_id = webhook_endpoints.tenant_id ORDER BY email))
                     AS contacts",
        )
        .bind(uid(id))
        .bind(reason)
        .fetch_optional(&mut *self.tx)
        .await?;
        row.map(|r| {
            Ok(DisabledEndpoint {
                tenant_id: r.try_get("tenant_id")?,
                url: r.try_get("url")?,
                contacts: get_strings(&r, "contacts")?,
            })
        })
        .transpose()
    }
}
