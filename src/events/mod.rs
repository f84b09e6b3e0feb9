//! Event intake: turning messages from RabbitMQ (or the HTTP API) into [`LifecycleEvent`]s.
//!
//! [`normalize`] owns the formats; [`intake`] the path from events to a commit that every
//! carrier shares; [`amqp`] the broker: the batching consumer and dead-lettering.
//!
//! [`LifecycleEvent`]: crate::domain::LifecycleEvent

pub mod amqp;
pub mod intake;
pub mod normalize;
