//! Event intake: turning messages from RabbitMQ (or the HTTP API) into [`LifecycleEvent`]s.
//!
//! [`normalize`] owns the formats; [`amqp`] owns the broker: topology, the batching consumer,
//! dead-lettering and the confirmed publisher shared by everything that publishes.
//!
//! [`LifecycleEvent`]: crate::domain::LifecycleEvent

pub mod amqp;
pub mod normalize;
