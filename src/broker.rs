//! The message broker (RabbitMQ) as every part of byokd uses it: the topology, the confirmed
//! [`Publisher`] that event intake, the access relay and the CLI publish through, and the
//! [`Backoff`] their reconnects share.
//!
//! Consuming is not here: the lifecycle consumer belongs to event intake (`events::amqp`).

use crate::config::AmqpSettings;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use std::time::Duration;
use tokio::sync::Mutex;

/// Header carrying the reason a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-byokd-error";

/// Header carrying when byokd dead-lettered a message (RFC 3339).
pub const DEAD_AT_HEADER: &str = "x-byokd-dead-lettered-at";

/// Why talking to the broker failed. Every variant is transient from byokd's point of view:
/// the caller reconnects or retries.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// Connection, channel or protocol failure.
    #[error("AMQP error: {0}")]
    Lapin(#[from] lapin::Error),
    /// The broker refused to take responsibility for a published message.
    #[error("broker nacked the publish to {0:?}")]
    Nacked(String),
    /// A mandatory publish matched no queue.
    #[error("no queue is bound to exchange {0:?} for this routing key")]
    Unroutable(String),
    /// No channel to the broker could be opened.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The server cancelled our consumer (queue deleted?).
    #[error("the broker cancelled the consumer")]
    ConsumerCancelled,
}

/// How long opening a connection and channel (and declaring and subscribing) may take before
/// the attempt is abandoned and retried.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Exponential backoff between `min` and `max`, with up to 25% jitter so replicas that lost
/// the same broker do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = base.mul_f64(rand::random::<f64>() * 0.25);
        base + jitter
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Declares the exchanges and queues of the topology (README, "AMQP topology"). Idempotent; run on every (re)connect.
pub async fn declare_topology(channel: &Channel, s: &AmqpSettings) -> Result<(), AmqpError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for exchange in [
        &s.lifecycle_exchange,
        &s.dead_letter_exchange,
        &s.access_exchange,
    ] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
    }
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(s.dead_letter_exchange.as_str())),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(s.delivery_limit)),
    );
    channel
        .queue_declare(
            s.lifecycle_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            args.clone(),
        )
        .await?;
    if !s.urgent_queue.is_empty() {
        channel
            .queue_declare(
                s.urgent_queue.as_str().into(),
                QueueDeclareOptions::durable(),
                args,
            )
            .await?;
        for key in &s.urgent_routing_keys {
            channel
                .queue_bind(
                    s.urgent_queue.as_str().into(),
                    s.lifecycle_exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    let mut dead_args = FieldTable::default();
    dead_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            s.dead_letter_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            dead_args,
        )
        .await?;
    for (queue, exchange) in [
        (&s.lifecycle_queue, &s.lifecycle_exchange),
        (&s.dead_letter_queue, &s.dead_letter_exchange),
    ] {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// A confirm-mode channel that reconnects on demand. Every publish waits for the broker's
/// confirm, so a successful return means the broker has the message.
pub struct Publisher {
    url: String,
    inner: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("url", &crate::config::redact_url(&self.url))
            .finish_non_exhaustive()
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Target exchange.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body.
    pub body: &'a [u8],
    /// Properties (persistence is forced on).
    pub properties: BasicProperties,
    /// Fail if no queue takes it.
    pub mandatory: bool,
}

impl Publisher {
    /// A publisher that connects to `url` on first use.
    pub fn new(url: impl Into<String>) -> Publisher {
        Publisher {
            url: url.into(),
            inner: Mutex::new(None),
        }
    }

    /// The confirm channel, connecting if there is none or the last one broke.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        let mut inner = self.inner.lock().await;
        if let Some((conn, channel)) = inner.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *inner = None;
        let open = async {
            let conn = Connection::connect(&self.url, ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, AmqpError>((conn, channel))
        };
        let (conn, channel) = tokio::time::timeout(SETUP_TIMEOUT, open)
            .await
            .map_err(|_| {
                AmqpError::Unavailable(format!("no channel within {SETUP_TIMEOUT:?}"))
            })??;
        *inner = Some((conn, channel.clone()));
        Ok(channel)
    }

    /// Publishes `messages` pipelined on one channel and waits for every confirm; one result
    /// per message, in order.
    pub async fn publish_all(&self, messages: &[Outgoing<'_>]) -> Vec<Result<(), AmqpError>> {
        let channel = match self.channel().await {
            Ok(c) => c,
            Err(e) => {
                let text = e.to_string();
                return messages
                    .iter()
                    .map(|_| Err(AmqpError::Unavailable(text.clone())))
                    .collect();
            }
        };
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let props = m.properties.clone().with_delivery_mode(2);
            pending.push(
                channel
                    .basic_publish(
                        m.exchange.into(),
                        m.routing_key.into(),
                        BasicPublishOptions {
                            mandatory: m.mandatory,
                            ..BasicPublishOptions::default()
                        },
                        m.body,
                        props,
                    )
                    .await,
            );
        }
        let mut results = Vec::with_capacity(messages.len());
        let mut broken = false;
        for (m, p) in messages.iter().zip(pending) {
            let result = match p {
                Err(e) => Err(AmqpError::from(e)),
                Ok(confirm) => match confirm.await {
                    Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
                    Ok(Confirmation::Ack(Some(_))) => Err(AmqpError::Unroutable(m.exchange.into())),
                    Ok(Confirmation::Nack(_)) => Err(AmqpError::Nacked(m.exchange.into())),
                    Err(e) => Err(AmqpError::from(e)),
                },
            };
            broken |= matches!(result, Err(AmqpError::Lapin(_)));
            results.push(result);
        }
        if broken {
            *self.inner.lock().await = None;
        }
        results
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), AmqpError> {
        self.publish_all(std::slice::from_ref(&message))
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Declares the topology on the publisher's channel (the CLI publishes before any daemon
    /// may have run).
    pub async fn declare_topology(&self, settings: &AmqpSettings) -> Result<(), AmqpError> {
        let channel = self.channel().await?;
        declare_topology(&channel, settings).await
    }
}
