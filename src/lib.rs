//! byokd: the key-lifecycle daemon behind a SaaS platform's Bring Your Own Key feature.
//!
//! Tenants keep their key-encryption keys (KEKs) in their own KMS; byokd consumes the KMS's
//! lifecycle events, keeps each tenant's access in step with its key, and tells the platform
//! and the tenant what changed.
//!
//! # Layout
//!
//! * `cli`: clap definitions and dispatch; `main.rs` only prints the outcome.
//! * `config`: defaults, then a TOML file, then `BYOKD_*` variables, validated once.
//! * `telemetry`: tracing subscriber and the Prometheus registry; every metric's name, type,
//!   unit, labels and help text in one table.
//! * `domain`: pure types and the KEK state machine / access derivation; no I/O.
//! * `broker`: RabbitMQ topology, the confirmed publisher and reconnect backoff.
//! * `events`: intake. `normalize` turns messages (canonical, AWS, Azure, GCP; CloudEvents
//!   in structured or binary mode) into events; `intake` is the path from events to a commit
//!   that every carrier shares; `amqp` consumes them in batches and dead-letters what cannot
//!   be applied (without a broker, `POST /v1/events` applies them through `intake`).
//! * `lifecycle`: applies events, KMS observations and the passing of time, one transaction
//!   each (dedupe, key record, derived access, audit, outbox).
//! * `access`: key access for the platform's services: client tokens, DEK unwrap with a
//!   cache dropped on every access change, every attempt audited (fail closed).
//! * `keys`: the use cases on a tenant's keys (register or replace a KEK, current access,
//!   create a DEK, verify DEKs) that the API, the CLI and tests share.
//! * `reconcile`: asks a KMS what a key is (metadata and a test wrap/unwrap) and confirms
//!   events off the consumer's path.
//! * `kms`: the KMS provider trait and dispatch; `local` is byokd's own keyring, `vault` Vault /
//!   OpenBao Transit, `aws` AWS KMS through the official SDK, `azure` Azure Key Vault and
//!   Managed HSM over their REST API, `gcp`
//!   Google Cloud KMS over REST.
//! * `rewrap`: re-wrap jobs (rotation, key replacement), worked in resumable batches.
//! * `sweeps`: cron schedules (`schedules/*.toml`) and their jobs: expiry scan, key probe,
//!   outbox prune; one replica at a time per schedule.
//! * `notify`: delivery of outbox rows; `access` relays access changes to `byok.access`,
//!   `outbox` delivers tenant notifications by `email` (lettre) and `webhook` (Standard
//!   Webhooks, SSRF-guarded), rendered by `render` from `templates/email/`; `catalog` is
//!   every notification byokd sends, with its facts, audience and advice.
//! * `audit`: tamper evidence of the audit trail (an HMAC chain in one total order across
//!   replicas, its chainer task, checkpoints, `audit verify`) and its JSON lines export.
//! * `http`: health, metrics, the admin API (with the fleet views) and key access, each
//!   route registered with its OpenAPI description (`http::openapi`).
//! * `store`: all SQL, behind a back-end-neutral API.
//! * `seal`: encryption of secrets at rest under the root key (current and previous keys).
//! * `rootkey`: root-key rotation, re-sealing everything sealed under the root key.
//! * `daemon`: `run`, wiring it all together with graceful shutdown; `collector` refreshes
//!   the gauges read from the database and the broker.
//! * `transfer`: `byokd export` / `byokd import`, a whole deployment as one checked archive
//!   (standalone SQLite to PostgreSQL, audit chain intact).
//! * `standalone`: the mode without a database or broker URL: the data dir, its SQLite
//!   database, and the root key and admin token generated there on first start.
//!
//! Data flows one way: intake -> normalize -> lifecycle (one transaction) -> ack; slow work
//! is picked up later from the database by its own loop.

pub mod access;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod domain;
pub mod events;
pub mod http;
pub mod keys;
pub mod kms;
pub mod lifecycle;
pub mod notify;
pub mod reconcile;
pub mod rewrap;
pub mod rootkey;
pub mod seal;
pub mod standalone;
pub mod store;
pub mod sweeps;
pub mod telemetry;
pub mod transfer;

/// Installs ring as the process's TLS crypto provider (lapin, reqwest and lettre all use
/// rustls, built without a provider of their own). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
