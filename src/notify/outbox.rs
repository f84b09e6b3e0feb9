//! The notification outbox loop: lease due email/webhook rows, deliver each on its channel,
//! log the attempt, and mark the row delivered, rescheduled or dead.
//!
//! Claiming sets a lease and commits at once, so no transaction stays open across a slow
//! SMTP server or endpoint, and replicas never hold the same row (`FOR UPDATE SKIP LOCKED`).
//! A worker that dies mid-delivery leaves a lease that expires; the row is then delivered
//! again, with the same webhook-id / Message-ID, so the receiver can drop the copy. Each
//! delivery runs in its own task, bounded overall and per recipient: a claim never takes
//! rows of a recipient already at its limit, so a slow endpoint holds only its own slots.
//!
//! Notifications for operators arrive as one `operator` row each; every step first expands
//! those into a row per operator address ([`catalog::fan_out`]), in one transaction with
//! marking the row done, so each operator gets each notification once.
//!
//! [`Dispatcher::run_once`] is one step (claim, deliver, record, with `now` injected) for
//! tests; [`outbox_loop`] keeps claiming as slots free up until shutdown.

use super::catalog::{self, EndpointDisabled, Notification, Operators};
use super::email::{Mailer, MailerError};
use super::render;
use super::webhook::{AddressGuard, ClientError, WebhookClient};
use super::{DeliveryError, Verdict};
use crate::config::{Config, NotifySettings, OperatorWebhook};
use crate::seal::Sealer;
use crate::store::outbox::{AttemptRecord, ClaimRequest, ClaimedNotification, Resolution};
use crate::store::{Channel, Store, StoreError};
use chrono::{DateTime, Utc};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use uuid::Uuid;

/// Why the dispatcher could not start or a step failed.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The outbox could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// SMTP / mail directory settings are unusable.
    #[error(transparent)]
    Mailer(#[from] MailerError),
    /// The webhook client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `BYOKD_WEBHOOK_ALLOW_CIDRS` does not parse.
    #[error("BYOKD_WEBHOOK_ALLOW_CIDRS: {0}")]
    AllowList(String),
}

/// What one [`Dispatcher::run_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Rows leased.
    pub claimed: usize,
    /// Delivered.
    pub delivered: usize,
    /// Failed, to be retried.
    pub retried: usize,
    /// Failed for good.
    pub dead: usize,
}

/// Delivers notifications; cheap to clone (shared state).
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    settings: NotifySettings,
    mailer: Mailer,
    webhooks: WebhookClient,
    sealer: Arc<Sealer>,
    /// The name tenants know the platform by.
    platform: String,
    /// Operator addresses the `operator` rows expand to.
    operators: Operators,
    /// Operator webhooks by name.
    operator_webhooks: HashMap<String, OperatorWebhook>,
    /// Deliveries in flight per recipient, to bound concurrency per endpoint / mailbox.
    in_flight: Mutex<HashMap<String, usize>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("mailer", &self.inner.mailer)
            .finish_non_exhaustive()
    }
}

/// Releases a recipient slot however the delivery task ends (even aborted).
struct Slot {
    inner: Arc<Inner>,
    recipient: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.recipient) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.recipient);
            }
        }
    }
}

impl Dispatcher {
    /// A dispatcher from the daemon's configuration.
    ///
    /// # Errors
    ///
    /// Unusable SMTP URL, sender, mail directory or allowlist.
    pub fn new(store: Store, config: &Config, sealer: Arc<Sealer>) -> Result<Self, NotifyError> {
        let settings = config.notify.clone();
        let guard = AddressGuard::parse(config.webhook_allow_cidrs.as_deref().unwrap_or(""))
            .map_err(NotifyError::AllowList)?;
        let pool = u32::try_from(settings.max_in_flight)
            .unwrap_or(u32::MAX)
            .min(32);
        let mailer = Mailer::new(
            config.smtp_url.as_ref(),
            &config.mail_from,
            &config.mail_dir,
            Duration::from_millis(settings.smtp_timeout_ms),
            pool,
        )?;
        let webhooks =
            WebhookClient::new(guard, Duration::from_millis(settings.webhook_timeout_ms))?;
        Ok(Dispatcher {
            inner: Arc::new(Inner {
                store,
                settings,
                mailer,
                webhooks,
                sealer,
                platform: config.platform_name.clone(),
                operators: Operators {
                    emails: config.operator_emails.clone(),
                    webhooks: config
                        .operator_webhooks
                        .iter()
                        .map(|w| w.name.clone())
                        .collect(),
                },
                operator_webhooks: config
                    .operator_webhooks
                    .iter()
                    .map(|w| (w.name.clone(), w.clone()))
                    .collect(),
                in_flight: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn in_flight_total(&self) -> usize {
        self.lock_in_flight().values().sum()
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Leases as many due rows as there are free slots and reserves their slots.
    async fn claim(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(ClaimedNotification, Slot)>, StoreError> {
        let s = &self.inner.settings;
        let free = s.max_in_flight.saturating_sub(self.in_flight_total());
        if free == 0 {
            return Ok(Vec::new());
        }
        let busy: Vec<(String, i64)> = self
            .lock_in_flight()
            .iter()
            .map(|(k, v)| (k.clone(), *v as i64))
            .collect();
        let lease = chrono::Duration::seconds(i64::try_from(s.lease_secs).unwrap_or(i64::MAX / 2));
        let rows = self
            .inner
            .store
            .claim_notifications(&ClaimRequest {
                now,
                limit: free as i64,
                lease_until: now + lease,
                busy: &busy,
                per_recipient: s.max_in_flight_per_recipient as i64,
            })
            .await?;
        let mut map = self.lock_in_flight();
        Ok(rows
            .into_iter()
            .map(|row| {
                *map.entry(row.recipient.clone()).or_default() += 1;
                let slot = Slot {
                    inner: self.inner.clone(),
                    recipient: row.recipient.clone(),
                };
                (row, slot)
            })
            .collect())
    }

    /// One step: claims due rows, delivers them concurrently, records every attempt, and
    /// returns when all are recorded. `now` decides what is due and when retries happen.
    ///
    /// # Errors
    ///
    /// Store errors while claiming; a failed delivery is recorded, not returned.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<StepReport, NotifyError> {
        self.fan_out_operators(now).await?;
        let claimed = self.claim(now).await?;
        let mut report = StepReport {
            claimed: claimed.len(),
            ..StepReport::default()
        };
        let mut tasks = JoinSet::new();
        for (row, slot) in claimed {
            let this = self.clone();
            tasks.spawn(async move { this.process(row, slot, Some(now)).await });
        }
        // Every delivery finishes even if recording one failed: returning early would drop
        // the set and abort deliveries in flight.
        let mut first_error = None;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(Resolution::Delivered)) => report.delivered += 1,
                Ok(Ok(Resolution::Retry(_))) => report.retried += 1,
                Ok(Ok(Resolution::Dead)) => report.dead += 1,
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(join) => tracing::error!(error = %join, "delivery task failed"),
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(report),
        }
    }

    /// Expands due `operator` rows into one row per operator address, and marks them done in
    /// the same transaction. Returns how many rows were expanded.
    ///
    /// # Errors
    ///
    /// Store errors; nothing was written then.
    pub async fn fan_out_operators(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let mut tx = self.inner.store.begin().await?;
        let rows = tx.claim_outbox(Channel::Operator, 100, now).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let operators = &self.inner.operators;
        let mut expanded = Vec::new();
        for row in &rows {
            expanded.extend(catalog::fan_out(
                &row.kind,
                &row.dedupe_key,
                row.tenant_id.as_deref(),
                &row.payload,
                operators,
            ));
        }
        tx.enqueue(&expanded).await?;
        let detail = if expanded.is_empty() {
            "no operator address configured (BYOKD_OPERATOR_EMAILS, operator_webhooks)".to_owned()
        } else {
            format!(
                "sent to {} operator email(s) and {} operator webhook(s)",
                operators.emails.len(),
                operators.webhooks.len()
            )
        };
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        tx.mark_delivered(&ids, now, &detail).await?;
        tx.commit().await?;
        if expanded.is_empty() {
            for row in &rows {
                tracing::warn!(kind = %row.kind, "an operator notification has no operator to go to");
            }
        }
        Ok(rows.len())
    }

    /// Delivers one row and records the outcome. `now` is fixed in tests, else read when the
    /// attempt ends (a retry is scheduled from the failure, not from the claim).
    async fn process(
        self,
        row: ClaimedNotification,
        slot: Slot,
        now: Option<DateTime<Utc>>,
    ) -> Result<Resolution, StoreError> {
        let started = Instant::now();
        let attempt_at = now.unwrap_or_else(Utc::now);
        let result = match row.channel {
            Channel::Email => self.send_email(&row).await,
            // The header carries the real attempt time: receivers check it against their clock.
            _ => self.send_webhook(&row, attempt_at, Utc::now()).await,
        };
        let elapsed = started.elapsed();
        let now = now.unwrap_or_else(Utc::now);
        let (resolution, status_code, detail) = match &result {
            Ok((code, detail)) => (
                Resolution::Delivered,
                code.map(i32::from),
                Some(detail.clone()),
            ),
            Err(e) => (
                self.resolve_failure(&row, e, now).await?,
                e.status_code().map(i32::from),
                Some(e.to_string()),
            ),
        };
        let kept = self
            .inner
            .store
            .record_attempt(
                row.id,
                row.lease_id,
                &AttemptRecord {
                    at: attempt_at,
                    resolution,
                    status_code,
                    detail,
                    duration_ms: i32::try_from(elapsed.as_millis()).unwrap_or(i32::MAX),
                },
            )
            .await?;
        if !kept {
            tracing::warn!(id = %row.id, "lease expired during delivery; another worker owns the row");
        }
        if result.is_ok() {
            metrics::histogram!(crate::telemetry::NOTIFICATION_DELIVERY_LATENCY,
                "channel" => row.channel.as_str())
            .record(seconds_since(row.created_at, now));
        }
        match (&result, row.channel) {
            (Ok(_), Channel::Webhook) => {
                if let Ok(endpoint) = row.recipient.parse::<Uuid>() {
                    self.inner.store.endpoint_succeeded(endpoint).await?;
                }
                metrics::counter!(crate::telemetry::NOTIFICATIONS_DELIVERED, "channel" => "webhook")
                    .increment(1);
            }
            (Ok(_), _) => {
                metrics::counter!(crate::telemetry::NOTIFICATIONS_DELIVERED, "channel" => "email")
                    .increment(1);
            }
            (Err(e), _) => {
                tracing::warn!(id = %row.id, kind = %row.kind, channel = row.channel.as_str(),
                    error = %e, outcome = resolution.as_str(), "notification attempt failed");
                metrics::counter!(crate::telemetry::NOTIFICATION_FAILURES,
                    "channel" => row.channel.as_str(), "outcome" => resolution.as_str())
                .increment(1);
            }
        }
        drop(slot);
        Ok(resolution)
    }

    /// Turns a failure's verdict into the row's fate, and tracks webhook endpoint health.
    async fn resolve_failure(
        &self,
        row: &ClaimedNotification,
        error: &DeliveryError,
        now: DateTime<Utc>,
    ) -> Result<Resolution, StoreError> {
        let verdict = error.verdict();
        let endpoint = match row.channel {
            Channel::Webhook => row.recipient.parse::<Uuid>().ok(),
            _ => None,
        };
        if let Some(endpoint) = endpoint
            && !matches!(error, DeliveryError::EndpointGone(_))
        {
            if verdict == Verdict::DisableEndpoint {
                self.disable_endpoint(endpoint, "the endpoint answered 410 Gone", now)
                    .await?;
            } else if let Some(since) = self.inner.store.endpoint_failed(endpoint, now).await? {
                let limit = chrono::Duration::seconds(
                    i64::try_from(self.inner.settings.disable_endpoint_after_secs)
                        .unwrap_or(i64::MAX / 2),
                );
                if now - since >= limit {
                    let reason = format!(
                        "every delivery failed since {} (last error: {error})",
                        since.format("%Y-%m-%d %H:%M UTC")
                    );
                    self.disable_endpoint(endpoint, &reason, now).await?;
                }
            }
        }
        Ok(match verdict {
            Verdict::Dead | Verdict::DisableEndpoint => Resolution::Dead,
            Verdict::Retry { at_least } => {
                match retry_delay(
                    &self.inner.settings,
                    row.attempts,
                    at_least,
                    &mut rand::rng(),
                ) {
                    Some(delay) => Resolution::Retry(
                        now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX),
                    ),
                    None => Resolution::Dead,
                }
            }
        })
    }

    /// Disables an endpoint and, in the same transaction, emails the tenant's contacts.
    async fn disable_endpoint(
        &self,
        endpoint: Uuid,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.inner.store.begin().await?;
        let Some(disabled) = tx.disable_endpoint(endpoint, reason).await? else {
            return Ok(());
        };
        tracing::warn!(%endpoint, tenant = %disabled.tenant_id, reason, "webhook endpoint disabled");
        let notice = Notification::EndpointDisabled(EndpointDisabled {
            tenant_id: disabled.tenant_id.clone(),
            endpoint_id: endpoint,
            // Only scheme, host and path: a query string may carry the tenant's token.
            url: crate::config::redact_query(&disabled.url),
            reason: reason.to_owned(),
            disabled_at: now,
        });
        let contacts = crate::store::TenantRow {
            id: disabled.tenant_id.clone(),
            access: crate::domain::Access::Accessible,
            access_reason: None,
            contacts: disabled.contacts.clone(),
            webhooks: Vec::new(),
        };
        let rows = notice.outbox_rows(Some(&contacts), now);
        tx.enqueue(&rows).await?;
        tx.commit().await
    }

    async fn send_email(
        &self,
        row: &ClaimedNotification,
    ) -> Result<(Option<u16>, String), DeliveryError> {
        let content = render::render(row.id, &row.kind, &row.payload, &self.inner.platform)
            .map_err(|e| DeliveryError::Invalid(e.to_string()))?;
        let receipt = self
            .inner
            .mailer
            .send(row.id, &row.recipient, &content)
            .await?;
        Ok((receipt.code, receipt.detail))
    }

    /// `now` is the dispatcher's clock (secret grace periods); `sent_at` the real time the
    /// `webhook-timestamp` header carries.
    async fn send_webhook(
        &self,
        row: &ClaimedNotification,
        now: DateTime<Utc>,
        sent_at: DateTime<Utc>,
    ) -> Result<(Option<u16>, String), DeliveryError> {
        let body = catalog::webhook_body(&row.payload, &self.inner.platform)
            .to_string()
            .into_bytes();
        if let Some(name) = row.recipient.strip_prefix(catalog::OPERATOR_WEBHOOK_PREFIX) {
            let hook = self
                .inner
                .operator_webhooks
                .get(name)
                .ok_or(DeliveryError::EndpointGone("is no longer configured"))?;
            let receipt = self
                .inner
                .webhooks
                .deliver(
                    &hook.url,
                    std::slice::from_ref(&hook.secret),
                    &row.id.to_string(),
                    sent_at.timestamp(),
                    body,
                )
                .await?;
            return Ok((Some(receipt.status), format!("HTTP {}", receipt.status)));
        }
        let id = row
            .recipient
            .parse::<Uuid>()
            .map_err(|_| DeliveryError::Invalid("recipient is not an endpoint id".into()))?;
        let endpoint = self
            .inner
            .store
            .webhook_endpoint(id)
            .await
            .map_err(|e| DeliveryError::Connect(format!("reading the endpoint: {e}")))?
            .ok_or(DeliveryError::EndpointGone("was deleted"))?;
        if !endpoint.enabled {
            return Err(DeliveryError::EndpointGone("is disabled"));
        }
        // The previous secret signs too while its grace period lasts (secret rotation).
        let previous = endpoint.previous_secret_sealed.as_deref().filter(|_| {
            endpoint
                .previous_secret_expires_at
                .is_some_and(|at| at > now)
        });
        let secrets = std::iter::once(endpoint.secret_sealed.as_slice())
            .chain(previous)
            .map(|sealed| self.inner.sealer.open(sealed))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DeliveryError::Invalid(e.to_string()))?;
        let receipt = self
            .inner
            .webhooks
            .deliver(
                &endpoint.url,
                &secrets,
                &row.id.to_string(),
                sent_at.timestamp(),
                body,
            )
            .await?;
        Ok((Some(receipt.status), format!("HTTP {}", receipt.status)))
    }
}

/// The delay before the next attempt after `attempts` earlier ones failed and this one too,
/// or `None` when the schedule is exhausted. Jittered; a peer's `Retry-After` is honoured
/// (never shorter than the schedule, never longer than `retry_after_max_secs`).
pub fn retry_delay(
    settings: &NotifySettings,
    attempts: i32,
    at_least: Option<Duration>,
    rng: &mut impl Rng,
) -> Option<Duration> {
    let index = usize::try_from(attempts).unwrap_or(0);
    let base = Duration::from_secs(*settings.retry_schedule_secs.get(index)?);
    let jitter = settings.retry_jitter;
    let factor = if jitter > 0.0 {
        rng.random_range((1.0 - jitter)..=(1.0 + jitter))
    } else {
        1.0
    };
    let delay = base.mul_f64(factor);
    let cap = Duration::from_secs(settings.retry_after_max_secs);
    Some(match at_least {
        Some(asked) => delay.max(asked.min(cap)),
        None => delay,
    })
}

/// Runs the dispatcher until shutdown: claims whenever slots are free and rows are due,
/// spawning one task per delivery, then waits for the deliveries in flight.
pub async fn outbox_loop(dispatcher: Dispatcher, mut shutdown: watch::Receiver<bool>) {
    let poll = Duration::from_millis(dispatcher.inner.settings.poll_ms.max(10));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut failures: u32 = 0;
    // Claim in batches: waiting for a quarter of the slots to free up costs little latency
    // and saves a claim query per completed delivery.
    let batch_min = (dispatcher.inner.settings.max_in_flight / 4).max(1);
    // Operator rows are rare: looking for them once per poll interval is plenty.
    let mut fanned_out: Option<Instant> = None;
    while !*shutdown.borrow() {
        let mut wait = poll;
        if fanned_out.is_none_or(|at| at.elapsed() >= poll) {
            fanned_out = Some(Instant::now());
            if let Err(e) = dispatcher.fan_out_operators(Utc::now()).await {
                tracing::warn!(error = %e, "expanding operator notifications failed; retrying");
            }
        }
        let free = dispatcher
            .inner
            .settings
            .max_in_flight
            .saturating_sub(dispatcher.in_flight_total());
        let claimed = if free < batch_min && !tasks.is_empty() {
            Ok(Vec::new())
        } else {
            dispatcher.claim(Utc::now()).await
        };
        match claimed {
            Ok(batch) => {
                failures = 0;
                for (row, slot) in batch {
                    let this = dispatcher.clone();
                    tasks.spawn(async move {
                        if let Err(e) = this.process(row, slot, None).await {
                            // The lease expires and the row is delivered again.
                            tracing::warn!(error = %e, "could not record a delivery");
                        }
                    });
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                wait = poll * failures.min(20);
                tracing::warn!(error = %e, ?wait, "claiming notifications failed; retrying");
            }
        }
        tokio::select! {
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {
                // A slot freed: collect any others that finished, then claim again.
                while tasks.try_join_next().is_some() {}
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }
    // Finish what is in flight; the daemon's grace period bounds this, and anything cut off
    // is redelivered when its lease expires.
    while tasks.join_next().await.is_some() {}
}

/// Deletes delivered rows (and their attempt logs) delivered before `older_than`; dead rows
/// are kept for the operator. The `outbox_prune` schedule calls this.
///
/// # Errors
///
/// Store errors.
pub async fn prune(store: &Store, older_than: DateTime<Utc>) -> Result<u64, StoreError> {
    store.prune_delivered(older_than).await
}

/// Seconds from `then` to `now`; 0 when another replica's clock put `then` ahead.
pub fn seconds_since(then: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    ((now - then).num_milliseconds() as f64 / 1000.0).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn schedule_is_followed_with_bounded_jitter_then_exhausted() {
        let settings = NotifySettings::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (attempts, base) in settings.retry_schedule_secs.iter().enumerate() {
            for _ in 0..50 {
                let d = retry_delay(&settings, attempts as i32, None, &mut rng)
                    .expect("within schedule")
                    .as_secs_f64();
                let base = *base as f64;
                assert!(
                    d >= base * 0.8 - 1e-9 && d <= base * 1.2 + 1e-9,
                    "{d} vs {base}"
                );
            }
        }
        assert_eq!(retry_delay(&settings, 7, None, &mut rng), None);
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let settings = NotifySettings {
            retry_jitter: 0.0,
            ..NotifySettings::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs());
        // Longer than the schedule: honoured.
        assert_eq!(
            secs(retry_delay(
                &settings,
                0,
                Some(Duration::from_secs(120)),
                &mut rng
            )),
            Some(120)
        );
        // Shorter than the schedule: the schedule wins.
        assert_eq!(
            secs(retry_delay(
                &settings,
                1,
                Some(Duration::from_secs(1)),
                &mut rng
            )),
            Some(300)
        );
        // Absurdly long: capped.
        assert_eq!(
            secs(retry_delay(
                &settings,
                0,
                Some(Duration::from_secs(86400 * 30)),
                &mut rng
            )),
            Some(3600)
        );
    }
}
