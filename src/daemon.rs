//! `byokd run`: wires the store, the consumer, the access relay and the HTTP server together
//! and shuts them down in order.
//!
//! [`run`] takes its listener and shutdown signal as arguments (as mini-redis and zero2prod
//! do), so integration tests start the whole daemon in-process on port 0.

use crate::broker::Publisher;
use crate::config::{Config, ConfigError};
use crate::events::amqp::{self, ConsumerHealth, Intake};
use crate::http::{self, AppState};
use crate::kms::{Kms, LocalKms};
use crate::notify::access::{self, Relay};
use crate::notify::outbox::{self as notify_outbox, Dispatcher, NotifyError};
use crate::reconcile::{self, Confirmer};
use crate::rewrap::{self, Rewrapper};
use crate::seal::Sealer;
use crate::store::{Store, StoreError};
use crate::sweeps::{self, Sweeper, Wakers};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// Sealing purpose of webhook signing secrets.
pub const WEBHOOK_SECRET_PURPOSE: &str = "webhook-secret";
/// Sealing purpose of the local KMS's key material.
pub const LOCAL_KMS_PURPOSE: &str = "local-kms-key";

/// Why the daemon could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be reached or migrated at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A schedule file is unusable.
    #[error(transparent)]
    Schedule(#[from] crate::sweeps::ScheduleError),
    /// A KMS provider cannot be set up.
    #[error("{0}")]
    Kms(String),
    /// Notification delivery could not be set up (SMTP URL, sender, allowlist).
    #[error(transparent)]
    Notify(#[from] NotifyError),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
}

/// The KMS providers byokd is configured for.
///
/// # Errors
///
/// A provider's client cannot be built.
pub fn build_kms(
    store: &Store,
    root_key: &crate::config::RootKey,
    settings: &crate::config::KmsSettings,
) -> Result<Kms, RunError> {
    let mut kms = Kms::with_local(LocalKms::new(
        store.clone(),
        Arc::new(Sealer::new(root_key, LOCAL_KMS_PURPOSE)),
    ));
    if let Some(vault) = &settings.vault {
        kms = kms.with_vault(
            crate::kms::VaultKms::new(vault)
                .map_err(|e| RunError::Kms(format!("cannot build the Vault client: {e}")))?,
        );
    }
    Ok(kms)
}

/// Runs the daemon until `shutdown` resolves, then stops consuming, lets in-flight batches
/// commit and ack, and returns within `shutdown_grace_secs`.
///
/// # Errors
///
/// Configuration, an unreachable database at start, or an HTTP server failure.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let database_url = config.require_database_url()?.to_owned();
    let amqp_url = config.require_amqp_url()?.to_owned();
    let root_key = config.require_root_key()?;
    let schedules = Arc::new(sweeps::load_dir(&config.schedules_dir)?);
    rewrap::rate_limits(&config.rewrap)
        .map_err(|e| ConfigError(vec![format!("rewrap.rate_limits: {e}")]))?;

    let store = Store::connect(&database_url, config.database_max_connections).await?;
    store.migrate().await?;
    crate::telemetry::metrics();

    let sealer = Arc::new(Sealer::new(&root_key, WEBHOOK_SECRET_PURPOSE));
    let notify_store = Store::connect(&database_url, config.notify.database_connections).await?;
    let dispatcher = Dispatcher::new(notify_store, &config, sealer.clone())?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let health = Arc::new(ConsumerHealth::default());
    let urgent_health = Arc::new(ConsumerHealth::default());
    let access_changed = Arc::new(Notify::new());
    let publisher = Arc::new(Publisher::new(amqp_url.clone()));
    let rewrap_work = Arc::new(Notify::new());
    let confirm_work = Arc::new(Notify::new());
    let kms = build_kms(&store, &root_key, &config.kms)?;

    let intake = Intake {
        queue: config.amqp.lifecycle_queue.clone(),
        store: store.clone(),
        url: amqp_url,
        settings: config.amqp.clone(),
        health: health.clone(),
        access_changed: access_changed.clone(),
        rewrap_work: rewrap_work.clone(),
        confirm_work: confirm_work.clone(),
        max_skew: config.state.max_skew(),
        publisher: publisher.clone(),
    };
    let mut consumers = vec![tokio::spawn(amqp::consume_loop(
        intake.clone(),
        stop_rx.clone(),
    ))];
    if !config.amqp.urgent_queue.is_empty() {
        consumers.push(tokio::spawn(amqp::consume_loop(
            Intake {
                queue: config.amqp.urgent_queue.clone(),
                health: urgent_health.clone(),
                ..intake
            },
            stop_rx.clone(),
        )));
    } else {
        urgent_health.disable();
    }
    let relay = tokio::spawn(access::relay_loop(
        Relay {
            store: store.clone(),
            publisher: publisher.clone(),
            exchange: config.amqp.access_exchange.clone(),
        },
        access_changed.clone(),
        stop_rx.clone(),
    ));
    let notifier = tokio::spawn(notify_outbox::outbox_loop(dispatcher, stop_rx.clone()));

    let rewrapper = Rewrapper::new(
        store.clone(),
        kms.clone(),
        config.rewrap.clone(),
        rewrap_work.clone(),
    );
    let rewrap_workers: Vec<_> = (0..config.rewrap.concurrency)
        .map(|_| tokio::spawn(rewrap::rewrap_loop(rewrapper.clone(), stop_rx.clone())))
        .collect();

    // Confirmations and sweeps ask KMSs in bursts (the local KMS through the database): a
    // pool of their own keeps them from taking the consumer's connections.
    let reconcile_store = Store::connect(&database_url, config.state.database_connections).await?;
    let reconcile_kms = build_kms(&reconcile_store, &root_key, &config.kms)?;
    let confirmer = Confirmer::new(
        reconcile_store.clone(),
        reconcile_kms.clone(),
        config.state.clone(),
        confirm_work.clone(),
        access_changed.clone(),
        rewrap_work.clone(),
    );
    let confirms = tokio::spawn(reconcile::confirm_loop(confirmer, stop_rx.clone()));

    let sweeper = Sweeper {
        store: reconcile_store,
        kms: reconcile_kms,
        schedules,
        wake: Wakers {
            access: access_changed.clone(),
            rewrap: rewrap_work.clone(),
        },
    };
    let sweeps = tokio::spawn(sweeps::sweep_loop(sweeper, stop_rx.clone()));

    let state = AppState {
        store: store.clone(),
        admin_token: config.admin_token.clone(),
        consumer: health,
        urgent_consumer: urgent_health,
        sealer,
        publisher,
        keys: crate::keys::Keys::new(
            store.clone(),
            kms.clone(),
            access_changed.clone(),
            rewrap_work.clone(),
        ),
        kms,
        rewrap_work,
        access_changed,
        confirm_work,
        state: config.state.clone(),
        amqp: config.amqp.clone(),
    };
    tracing::info!(addr = %listener.local_addr()?, "byokd listening");
    let mut http_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|stop| *stop).await;
            })
            .await
    });

    shutdown.await;
    tracing::info!("shutting down: finishing in-flight work");
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let all = async {
        for consumer in consumers {
            let _ = consumer.await;
        }
        let _ = relay.await;
        let _ = sweeps.await;
        let _ = confirms.await;
        for worker in rewrap_workers {
            let _ = worker.await;
        }
        let _ = notifier.await;
        server.await
    };
    match tokio::time::timeout(grace, all).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => tracing::error!(error = %join, "HTTP server task failed"),
        Err(_) => tracing::warn!(
            ?grace,
            "shutdown grace period over; exiting with work pending"
        ),
    }
    tracing::info!("byokd stopped");
    Ok(())
}
