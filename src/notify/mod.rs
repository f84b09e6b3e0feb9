//! Delivery of what the lifecycle code put in the outbox.
//!
//! [`access`] relays tenant access changes to the `byok.access` exchange. Email and webhook
//! delivery of tenant notifications will live beside it; their rows already accumulate in the
//! outbox with one row per cause, channel and recipient.

pub mod access;
