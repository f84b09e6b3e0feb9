//! The relay that publishes tenant access changes from the outbox to `byok.access`.
//!
//! The lifecycle transaction writes the access message into the outbox together with the
//! state change, so a broker outage or a crash between commit and publish cannot lose it:
//! the relay publishes with confirms and removes the row only after the broker acks.
//! Rows are claimed with `FOR UPDATE SKIP LOCKED`, so replicas never publish one row twice
//! concurrently (a crash after publish but before commit can repeat a message; consumers
//! dedupe on `event_id`).
//!
//! A node without a broker has no `byok.access` exchange and no one listening on it: the
//! relay then removes the access messages as they come (the change itself is in the audit
//! trail, tenants hear of it by email and webhook, and the key-access caches are dropped by
//! the database's notifications), so they do not pile up in the outbox.

use crate::broker::{Backoff, Outgoing, Publisher};
use crate::store::{Channel, Store, StoreError};
use chrono::Utc;
use lapin::BasicProperties;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Rows published per transaction.
const BATCH: i64 = 256;
/// How often to look for rows written by other replicas when not woken.
const POLL: Duration = Duration::from_secs(1);

/// What the relay needs.
#[derive(Clone, Debug)]
pub struct Relay {
    /// The outbox.
    pub store: Store,
    /// Confirmed publisher; `None` on a node without a broker.
    pub publisher: Option<Arc<Publisher>>,
    /// The access exchange.
    pub exchange: String,
}

/// Why a relay step failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The outbox could not be read or updated.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Relay {
    /// Publishes one batch of due access messages; returns how many were delivered.
    ///
    /// # Errors
    ///
    /// Only store errors; a failed publish reschedules the row and is not an error.
    pub async fn run_once(&self) -> Result<usize, RelayError> {
        let mut tx = self.store.begin().await?;
        let rows = tx.claim_outbox(Channel::Amqp, BATCH, Utc::now()).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let Some(publisher) = &self.publisher else {
            let ids: Vec<_> = rows.iter().map(|r| r.id).collect();
            tx.remove_published(&ids).await?;
            tx.commit().await?;
            tracing::debug!(
                count = ids.len(),
                "no broker: access messages removed unpublished"
            );
            return Ok(ids.len());
        };
        let bodies: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| r.payload.to_string().into_bytes())
            .collect();
        let messages: Vec<Outgoing<'_>> = rows
            .iter()
            .zip(&bodies)
            .map(|(row, body)| Outgoing {
                exchange: &self.exchange,
                routing_key: &row.recipient,
                body,
                properties: BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(row.id.to_string().into()),
                mandatory: false,
            })
            .collect();
        let results = publisher.publish_all(&messages).await;
        let mut delivered = Vec::new();
        for (row, result) in rows.iter().zip(results) {
            match result {
                Ok(()) => {
                    metrics::histogram!(crate::telemetry::NOTIFICATION_DELIVERY_LATENCY,
                        "channel" => "amqp")
                    .record(crate::notify::outbox::seconds_since(
                        row.created_at,
                        Utc::now(),
                    ));
                    delivered.push(row.id);
                }
                Err(e) => {
                    let attempt = u32::try_from(row.attempts).unwrap_or(0).min(6);
                    let delay = chrono::Duration::seconds(1 << attempt);
                    tracing::warn!(error = %e, id = %row.id, ?delay, "access message not published; will retry");
                    tx.reschedule(&[row.id], Utc::now() + delay, &e.to_string())
                        .await?;
                }
            }
        }
        tx.remove_published(&delivered).await?;
        tx.commit().await?;
        metrics::counter!(crate::telemetry::ACCESS_MESSAGES_PUBLISHED)
            .increment(delivered.len() as u64);
        Ok(delivered.len())
    }
}

/// Runs [`Relay::run_once`] whenever woken, and at least every second, until shutdown.
pub async fn relay_loop(relay: Relay, wake: Arc<Notify>, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while !*shutdown.borrow() {
        let wait = match relay.run_once().await {
            Ok(n) if n as i64 == BATCH => continue,
            Ok(_) => {
                backoff.reset();
                POLL
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "access relay failed; retrying");
                delay
            }
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }
}
