//! The batching lifecycle consumer and dead-lettering; the topology and the confirmed
//! [`Publisher`] it uses live in [`crate::broker`].
//!
//! The consumer applies deliveries in batches (whatever is already prefetched, up to
//! `amqp.batch_size`) in one database transaction, and acks them only after it commits; up to
//! `amqp.pipeline` batches are in flight at once and acked in delivery order. While
//! the database is down it holds the batch and retries with backoff instead of requeueing,
//! so good events never burn their quorum-queue delivery limit on an outage. A message that
//! can never succeed is published to the dead-letter exchange with the reason in the
//! `x-byokd-error` header and then acked; the consumer goes on with the next one.
//!
//! Events come in CloudEvents structured mode (the body is the event) or binary mode (the
//! attributes are application properties, `cloudEvents:` or the older `cloudEvents_` and
//! `ce_` prefixes, and the body is the data): [`normalize_delivery`] turns both into the
//! same events; a binary-mode message with a missing or conflicting attribute is
//! dead-lettered with the reason like any other message that can never succeed.
//!
//! Revocations must not wait behind a backlog: an urgent lane (a second quorum queue bound to
//! the lifecycle exchange with the revocation routing keys, `<provider>.disabled` etc.) gets
//! its own copy of those events and its own consumer. Whichever copy is applied first wins;
//! the other is a duplicate. Events are ordered by their own time, not by arrival, so the
//! lane cannot reorder a key's history.

use crate::broker::{
    AmqpError, Backoff, ERROR_HEADER, Outgoing, Publisher, SETUP_TIMEOUT, declare_topology,
};
use crate::config::AmqpSettings;
use crate::domain::LifecycleEvent;
use crate::events::intake::{self, Wakers};
use crate::events::normalize::{NormalizeError, binary, normalize};
use crate::lifecycle::BatchResult;
use crate::store::{Store, StoreError};
use crate::telemetry::{
    CONSUMER_UP, EVENT_BATCH_SIZE, EVENT_COMMIT_LATENCY, EVENTS, EVENTS_DEAD_LETTERED,
    REVOCATION_EFFECT_LATENCY,
};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties, message::Delivery};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The consumer's state, for `/readyz` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConsumerState {
    /// Not connected yet.
    Starting = 0,
    /// Subscribed and applying events.
    Consuming = 1,
    /// Lost the broker; reconnecting with backoff.
    Reconnecting = 2,
    /// Holding a batch while the database is unreachable.
    DatabaseUnavailable = 3,
    /// Shut down.
    Stopped = 4,
    /// Not configured: an urgent lane switched off, or no broker at all.
    Disabled = 5,
}

impl ConsumerState {
    /// Name for `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerState::Starting => "starting",
            ConsumerState::Consuming => "consuming",
            ConsumerState::Reconnecting => "reconnecting",
            ConsumerState::DatabaseUnavailable => "database_unavailable",
            ConsumerState::Stopped => "stopped",
            ConsumerState::Disabled => "disabled",
        }
    }
}

/// Shared, lock-free view of the consumer's state.
#[derive(Debug, Default)]
pub struct ConsumerHealth(AtomicU8);

impl ConsumerHealth {
    /// The current state.
    pub fn get(&self) -> ConsumerState {
        match self.0.load(Ordering::Relaxed) {
            1 => ConsumerState::Consuming,
            2 => ConsumerState::Reconnecting,
            3 => ConsumerState::DatabaseUnavailable,
            4 => ConsumerState::Stopped,
            5 => ConsumerState::Disabled,
            _ => ConsumerState::Starting,
        }
    }

    /// Marks a consumer that is not configured.
    pub fn disable(&self) {
        self.0
            .store(ConsumerState::Disabled as u8, Ordering::Relaxed);
    }

    fn set(&self, state: ConsumerState, queue: &str) {
        let previous = self.0.swap(state as u8, Ordering::Relaxed);
        if previous != state as u8 {
            metrics::gauge!(CONSUMER_UP, "queue" => queue.to_owned())
                .set(f64::from(u8::from(state == ConsumerState::Consuming)));
        }
    }
}

/// What the consumer needs.
#[derive(Clone)]
pub struct Intake {
    /// The queue this consumer drains (the lifecycle queue or the urgent lane).
    pub queue: String,
    /// Where events are applied.
    pub store: Store,
    /// Broker URL.
    pub url: String,
    /// Names and tuning.
    pub settings: AmqpSettings,
    /// Shared state for `/readyz`.
    pub health: Arc<ConsumerHealth>,
    /// The loops a commit may give work to.
    pub wake: Wakers,
    /// Events dated further ahead of byokd's clock than this are refused.
    pub max_skew: chrono::Duration,
    /// Publishes dead letters.
    pub publisher: Arc<Publisher>,
}

/// How often a consumer waiting for deliveries checks that its connection is still up.
const CONNECTION_CHECK: Duration = Duration::from_secs(1);

/// How long an ack or reject may take before the session is given up: a frame queued on a
/// connection whose I/O loop died is never written, and would hold the consumer forever.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// `settle` (an ack or reject), bounded by [`SETTLE_TIMEOUT`].
async fn bounded<T>(
    settle: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, AmqpError> {
    tokio::time::timeout(SETTLE_TIMEOUT, settle)
        .await
        .map_err(|_| AmqpError::Unavailable(format!("no ack written within {SETTLE_TIMEOUT:?}")))?
        .map_err(AmqpError::from)
}

/// Runs the consumer until `shutdown` turns true: connects, declares, consumes, and after
/// any broker failure reconnects with backoff.
pub async fn consume_loop(intake: Intake, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    while !*shutdown.borrow() {
        match session(&intake, &mut shutdown, &mut backoff).await {
            Ok(()) => break,
            Err(e) => {
                intake
                    .health
                    .set(ConsumerState::Reconnecting, &intake.queue);
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "AMQP consumer lost its session; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
    intake.health.set(ConsumerState::Stopped, &intake.queue);
    tracing::info!("consumer stopped");
}

/// One connection's worth of consuming. `Ok` only on shutdown.
async fn session(
    intake: &Intake,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<(), AmqpError> {
    let s = &intake.settings;
    let tag = format!("byokd-{}", uuid::Uuid::new_v4());
    let setup = async {
        let conn = Connection::connect(&intake.url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        declare_topology(&channel, s).await?;
        channel
            .basic_qos(s.effective_prefetch(), BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                intake.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, AmqpError>((conn, channel, consumer))
    };
    // A connection cut mid-handshake can leave lapin waiting forever for the next frame;
    // give up and reconnect instead of leaving the queue without a consumer.
    let (conn, channel, mut consumer) = tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| AmqpError::Unavailable(format!("no session within {SETUP_TIMEOUT:?}")))??;
    intake.health.set(ConsumerState::Consuming, &intake.queue);
    backoff.reset();
    tracing::info!(queue = %intake.queue, prefetch = s.effective_prefetch(),
        max_message_bytes = s.max_message_bytes, "consuming lifecycle events");

    // A cut connection normally ends the consumer's stream with an error; should lapin's
    // I/O loop give up without saying so, the stream would wait forever while the broker
    // hands the queue to nobody. Look at the connection now and then as well.
    let mut watchdog = tokio::time::interval(CONNECTION_CHECK);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Up to `pipeline` batches are applied at once, each in its own transaction, so the
    // next batch is parsed and planned while the database works on the previous one. They
    // finish (and are acked, `multiple`) in delivery order: an ack never covers a delivery
    // whose transaction has not committed.
    let mut in_flight = FuturesOrdered::new();
    let pipeline = s.pipeline.max(1);
    let mut pending_error: Option<lapin::Error> = None;
    // Set when a batch gave up at shutdown: nothing after it may be acked.
    let mut unacked_gap = false;
    loop {
        if in_flight.is_empty()
            && let Some(e) = pending_error.take()
        {
            return Err(e.into());
        }
        let taking = in_flight.len() < pipeline && pending_error.is_none();
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                match done? {
                    BatchEnd::Done(Some(last)) => {
                        bounded(last.ack(BasicAckOptions { multiple: true })).await?;
                    }
                    BatchEnd::Done(None) => {}
                    BatchEnd::Shutdown => {
                        unacked_gap = true;
                        break;
                    }
                }
                continue;
            }
            next = consumer.next(), if taking => {
                let first = next.ok_or(AmqpError::ConsumerCancelled)??;
                // Receipt time: whatever else is prefetched joins the batch at once.
                let received = Instant::now();
                let mut batch = vec![first];
                while batch.len() < s.batch_size {
                    match consumer.next().now_or_never() {
                        Some(Some(Ok(d))) => batch.push(d),
                        Some(Some(Err(e))) => {
                            pending_error = Some(e);
                            break;
                        }
                        _ => break,
                    }
                }
                in_flight.push_back(process_batch(intake, batch, received, shutdown.clone()));
                continue;
            }
            _ = watchdog.tick() => {
                if conn.status().connected() && channel.status().connected() {
                    continue;
                }
                return Err(AmqpError::Unavailable(
                    "the connection to the broker is closed".to_owned(),
                ));
            }
        }
    }
    // Shutdown: stop new deliveries, let the batches in flight finish (or give up their
    // retries) and ack what committed; whatever is prefetched but unacked goes back to the
    // queue when the channel closes.
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    while !unacked_gap && let Some(done) = in_flight.next().await {
        match done {
            Ok(BatchEnd::Done(Some(last))) => {
                let _ = bounded(last.ack(BasicAckOptions { multiple: true })).await;
            }
            Ok(BatchEnd::Done(None)) => {}
            // Later batches must not be acked past one that did not commit.
            Ok(BatchEnd::Shutdown) | Err(_) => break,
        }
    }
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

enum BatchEnd {
    /// Applied; the acker of the last delivery whose events committed, to ack (`multiple`)
    /// once every earlier batch is acked. `None` when nothing is left to ack.
    Done(Option<Acker>),
    /// Shutdown came while the batch waited for the database; it is not acked.
    Shutdown,
}

/// The outcome of applying events with retries.
enum Applied {
    Ok(BatchResult),
    Permanent(StoreError),
    Shutdown,
}

/// Applies `events`, retrying transient failures with backoff until the database answers
/// or shutdown is requested.
async fn apply_with_retry(
    intake: &Intake,
    events: &[crate::domain::LifecycleEvent],
    shutdown: &mut watch::Receiver<bool>,
) -> Applied {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match intake::apply(&intake.store, events, &intake.wake).await {
            Ok(result) => {
                intake.health.set(ConsumerState::Consuming, &intake.queue);
                return Applied::Ok(result);
            }
            Err(e) if e.is_transient() => {
                intake
                    .health
                    .set(ConsumerState::DatabaseUnavailable, &intake.queue);
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, held = events.len(),
                    "database unavailable; holding the batch and retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return Applied::Shutdown,
                }
            }
            Err(e) => return Applied::Permanent(e),
        }
    }
}

/// Seconds from a message's publication (its AMQP `timestamp`, whole seconds since the
/// epoch, when the publisher set one) to `committed_unix` seconds; `None` without one. A
/// publisher's clock ahead of ours gives 0, not a negative latency.
pub fn publish_latency(timestamp: Option<u64>, committed_unix: f64) -> Option<f64> {
    timestamp
        .filter(|t| *t > 0)
        .map(|t| (committed_unix - t as f64).max(0.0))
}

/// Records the publish-to-commit latency of each delivery and the revocation-to-effect
/// latency of each revoking event that made its tenant inaccessible (`revocations`; every
/// event of a batch was received at the same moment).
fn record_latencies(deliveries: &[&Delivery], revocations: &[usize], received: Instant) {
    let committed = received.elapsed().as_secs_f64();
    let committed_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    // The handles are looked up once per batch, not once per delivery.
    let published = metrics::histogram!(EVENT_COMMIT_LATENCY, "from" => "published");
    let unstamped = metrics::histogram!(EVENT_COMMIT_LATENCY, "from" => "received");
    for delivery in deliveries {
        match publish_latency(*delivery.properties.timestamp(), committed_unix) {
            Some(latency) => published.record(latency),
            None => unstamped.record(committed),
        }
    }
    if !revocations.is_empty() {
        let effect = metrics::histogram!(REVOCATION_EFFECT_LATENCY);
        for _ in revocations {
            effect.record(committed);
        }
    }
}

/// Parses, dead-letters and applies one batch. A batch applied whole is acked by the caller
/// ([`BatchEnd::Done`]), in delivery order; deliveries settled one by one (dead letters, a
/// batch split after a permanent failure) are acked here.
async fn process_batch(
    intake: &Intake,
    batch: Vec<Delivery>,
    received: Instant,
    mut shutdown: watch::Receiver<bool>,
) -> Result<BatchEnd, AmqpError> {
    let shutdown = &mut shutdown;
    // A delivery may hold several events (an Event Grid array); `good[i]` owns the next
    // `counts[i]` events, so a delivery's events are applied, acked or dead-lettered together.
    let mut events = Vec::with_capacity(batch.len());
    let mut good = Vec::with_capacity(batch.len());
    let mut counts = Vec::with_capacity(batch.len());
    for delivery in batch {
        let parsed = normalize_delivery(&delivery, intake.settings.max_message_bytes)
            .and_then(|parsed| intake::in_time(parsed, intake.max_skew));
        match parsed {
            Ok(parsed) => {
                counts.push(parsed.len());
                events.extend(parsed);
                good.push(delivery);
            }
            Err(e) if e.is_ignored() => {
                metrics::counter!(EVENTS, "kind" => "other", "outcome" => "ignored").increment(1);
                tracing::debug!(reason = %e, "acking a provider event that changes nothing");
                bounded(delivery.acker.ack(BasicAckOptions::default())).await?;
            }
            Err(e) => dead_letter(intake, &delivery, &e.to_string()).await?,
        }
    }
    if events.is_empty() {
        return Ok(BatchEnd::Done(None));
    }
    metrics::histogram!(EVENT_BATCH_SIZE).record(events.len() as f64);
    match apply_with_retry(intake, &events, shutdown).await {
        Applied::Ok(result) => {
            let deliveries: Vec<&Delivery> = good.iter().collect();
            record_latencies(&deliveries, &result.revocations, received);
            return Ok(BatchEnd::Done(good.last().map(|d| d.acker.clone())));
        }
        Applied::Shutdown => return Ok(BatchEnd::Shutdown),
        Applied::Permanent(e) => {
            // Something in the batch cannot be written; find it by applying one delivery at a
            // time so the rest still goes through.
            tracing::error!(error = %e, size = events.len(),
                "batch failed permanently; applying its deliveries one by one");
            let mut rest = events.as_slice();
            for (delivery, count) in good.into_iter().zip(counts) {
                let (mine, after) = rest.split_at(count.min(rest.len()));
                rest = after;
                match apply_with_retry(intake, mine, shutdown).await {
                    Applied::Ok(result) => {
                        record_latencies(&[&delivery], &result.revocations, received);
                        bounded(delivery.acker.ack(BasicAckOptions::default())).await?;
                    }
                    Applied::Shutdown => return Ok(BatchEnd::Shutdown),
                    Applied::Permanent(e) => dead_letter(intake, &delivery, &e.to_string()).await?,
                }
            }
        }
    }
    Ok(BatchEnd::Done(None))
}

/// Application-property prefixes of CloudEvents attributes in binary mode: the AMQP
/// binding's `cloudEvents:`, the `cloudEvents_` of its earlier drafts (for brokers that
/// refuse `:` in names), and the `ce_` some SDKs send.
pub const CE_PREFIXES: [&str; 3] = ["cloudEvents:", "cloudEvents_", "ce_"];

/// The events of one delivery, whichever CloudEvents content mode it uses (or a provider's
/// native format).
///
/// # Errors
///
/// Whatever [`normalize`] or [`binary::to_structured`] refuses, to dead-letter with.
pub fn normalize_delivery(
    delivery: &Delivery,
    limit: usize,
) -> Result<Vec<LifecycleEvent>, NormalizeError> {
    let attributes = binary_attributes(delivery.properties.headers().as_ref())?;
    if attributes.is_empty() {
        return normalize(&delivery.data, limit);
    }
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|c| c.as_str());
    let structured = binary::to_structured(
        &attributes,
        CE_PREFIXES[0],
        content_type,
        &delivery.data,
        limit,
    )?;
    // The body was checked against the limit; the attributes add what the frame allowed.
    normalize(&structured, limit.saturating_add(structured.len()))
}

/// The CloudEvents attributes among a message's application properties, prefix removed.
///
/// # Errors
///
/// [`NormalizeError::Schema`] for an attribute whose value is not a string, a number, a
/// boolean or (for `time`) a timestamp.
pub fn binary_attributes(
    headers: Option<&FieldTable>,
) -> Result<Vec<(String, String)>, NormalizeError> {
    let mut attributes = Vec::new();
    let Some(headers) = headers else {
        return Ok(attributes);
    };
    for (key, value) in headers.inner() {
        let key = key.as_str();
        let Some(name) = CE_PREFIXES.iter().find_map(|p| key.strip_prefix(p)) else {
            continue;
        };
        let text = match value {
            AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            AMQPValue::Boolean(b) => Some(b.to_string()),
            AMQPValue::ShortShortInt(n) => Some(n.to_string()),
            AMQPValue::ShortShortUInt(n) => Some(n.to_string()),
            AMQPValue::ShortInt(n) => Some(n.to_string()),
            AMQPValue::ShortUInt(n) => Some(n.to_string()),
            AMQPValue::LongInt(n) => Some(n.to_string()),
            AMQPValue::LongUInt(n) => Some(n.to_string()),
            AMQPValue::LongLongInt(n) => Some(n.to_string()),
            // The binding maps `time` to the AMQP timestamp type (seconds, in AMQP 0-9-1).
            AMQPValue::Timestamp(t) => i64::try_from(*t)
                .ok()
                .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            _ => None,
        };
        let Some(text) = text else {
            return Err(NormalizeError::Schema {
                format: "CloudEvents binary-mode",
                detail: format!(
                    "application property {key:?} is not a UTF-8 string, a number, a boolean                      or a timestamp"
                ),
            });
        };
        attributes.push((name.to_owned(), text));
    }
    Ok(attributes)
}

/// Publishes `delivery` to the dead-letter exchange with `reason` in [`ERROR_HEADER`], then
/// acks it. If that publish fails, rejects it without requeue so the broker dead-letters it
/// itself (without our header, but not lost).
async fn dead_letter(intake: &Intake, delivery: &Delivery, reason: &str) -> Result<(), AmqpError> {
    metrics::counter!(EVENTS_DEAD_LETTERED).increment(1);
    tracing::warn!(reason, routing_key = %delivery.routing_key, "dead-lettering message");
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert(
        crate::broker::DEAD_AT_HEADER.into(),
        AMQPValue::LongString(LongString::from(chrono::Utc::now().to_rfc3339())),
    );
    headers.insert(
        "x-byokd-original-exchange".into(),
        AMQPValue::LongString(LongString::from(delivery.exchange.as_str())),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    let published = intake
        .publisher
        .publish(Outgoing {
            exchange: &intake.settings.dead_letter_exchange,
            routing_key: delivery.routing_key.as_str(),
            body: &delivery.data,
            properties,
            mandatory: true,
        })
        .await;
    match published {
        Ok(()) => {
            bounded(delivery.acker.ack(BasicAckOptions::default())).await?;
        }
        Err(e) => {
            tracing::warn!(error = %e, "dead-letter publish failed; rejecting to the broker's DLX");
            bounded(delivery.acker.reject(BasicRejectOptions { requeue: false })).await?;
        }
    }
    Ok(())
}

/// Routing key for a lifecycle event published by byokd itself: `<provider>.<kind>`.
pub fn routing_key(event: &crate::domain::LifecycleEvent) -> String {
    format!("{}.{}", event.provider, event.kind)
}

/// Routing key for a message holding `events` (several for an Event Grid array): that of its
/// most urgent event, so a revocation inside a batch still reaches the urgent lane.
pub fn message_routing_key(events: &[crate::domain::LifecycleEvent]) -> String {
    use crate::domain::EventKind::{
        AccessRevoked, DeletionScheduled, Destroyed, Disabled, Expired,
    };
    events
        .iter()
        .find(|e| {
            matches!(
                e.kind,
                Disabled | DeletionScheduled | Destroyed | AccessRevoked | Expired
            )
        })
        .or(events.first())
        .map_or_else(|| "unknown".to_owned(), routing_key)
}

#[cfg(test)]
mod tests {
    use super::publish_latency;

    #[test]
    fn publish_latency_needs_a_timestamp_and_is_never_negative() {
        assert_eq!(publish_latency(None, 1000.5), None);
        assert_eq!(publish_latency(Some(0), 1000.5), None);
        assert_eq!(publish_latency(Some(998), 1000.5), Some(2.5));
        // The publisher's clock runs ahead of ours.
        assert_eq!(publish_latency(Some(1002), 1000.5), Some(0.0));
    }
}
