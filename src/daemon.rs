//! `byokd run`: wires the store, the consumer, the access relay and the HTTP server together,
//! supervises them, and shuts them down in order.
//!
//! [`run`] takes its listener and shutdown signal as arguments (as mini-redis and zero2prod
//! do), so integration tests start the whole daemon in-process on port 0.
//!
//! # Supervision
//!
//! Every long-running task runs in one [`JoinSet`] under a name: `consumer`,
//! `urgent_consumer`, `access_relay`, `outbox`, `rewrap_1`..`rewrap_N`, `confirmer`, `sweeps`,
//! `audit_spool_shipper`, `audit_chainer`, `metrics_collector` and `http` (the shipper and
//! the chainer run on the [`background`] thread and are awaited from the set like the
//! others). Each loop retries its own errors (a lost
//! broker, database or KMS), so a task that panics, fails, or returns before it was told to
//! stop has *died*: a bug, not a bad day. A replica with a dead task must not look healthy, so the supervisor then
//!
//! 1. logs the task and its cause at error level and records its name in the
//!    [`TaskRegistry`], which turns `/readyz` to 503 naming it;
//! 2. stops the other workers, as on SIGTERM, but keeps the HTTP server answering (`/readyz`
//!    503) for the rest of the grace period, so an orchestrator sees why before the exit;
//! 3. after `shutdown_grace_secs` aborts whatever still runs and returns
//!    [`RunError::TaskFailed`], so `byokd run` exits non-zero and is restarted.
//!
//! # Without a broker
//!
//! With no `BYOKD_AMQP_URL` the daemon runs as a single node without RabbitMQ: there is no
//! consumer (events arrive over `POST /v1/events`, applied through the same
//! [`crate::events::intake`] path before the answer), the access relay removes access
//! messages instead of publishing them (no `byok.access` exchange), and `/readyz` and the
//! metrics report the consumers as `disabled`, not as down. Everything else (the outbox's
//! email and webhooks, re-wrap, confirmations, sweeps, key access and its invalidation by
//! database notifications) is the same.
//!
//! On SIGTERM the workers and the HTTP server stop together; tasks still running when the
//! grace period ends are aborted rather than awaited (their work is redelivered: unacked
//! events go back to the queue, leased notifications and jobs are picked up again).

pub mod background;
pub mod collector;

use crate::audit::{self, ChainKey, Chainer};
use crate::broker::Publisher;
use crate::config::{AuditMode, Config, ConfigError};
use crate::events::amqp::{self, ConsumerHealth, Intake};
use crate::events::intake;
use crate::http::TaskRegistry;
use crate::http::{self, AppState};
use crate::kms::{Kms, LocalKms};
use crate::notify::access::{self, Relay};
use crate::notify::outbox::{self as notify_outbox, Dispatcher, NotifyError};
use crate::reconcile::{self, Confirmer};
use crate::rewrap::{self, Rewrapper};
use crate::seal::{LOCAL_KMS_PURPOSE, Sealer, WEBHOOK_SECRET_PURPOSE};
use crate::store::{Store, StoreError};
use crate::sweeps::{self, Sweeper, Wakers};
use background::Background;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;

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
    /// The audit chain's key cannot be had.
    #[error(transparent)]
    AuditKey(#[from] crate::audit::ChainKeyError),
    /// Notification delivery could not be set up (SMTP URL, sender, allowlist).
    #[error(transparent)]
    Notify(#[from] NotifyError),
    /// The audit spool cannot be opened (or another daemon uses it).
    #[error(transparent)]
    AuditSpool(#[from] crate::access::spool::SpoolError),
    /// The background thread (audit shipping and chaining) cannot be started.
    #[error("cannot start the background thread: {0}")]
    Background(std::io::Error),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
    /// Daemon tasks died (panicked, failed or returned early); the daemon stopped after the
    /// grace period. Their causes were logged at error level.
    #[error("daemon task died: {}; see the error log for the cause", .0.join(", "))]
    TaskFailed(Vec<String>),
}

/// The KMS providers byokd is configured for.
///
/// # Errors
///
/// A provider's client cannot be built.
pub fn build_kms(
    store: &Store,
    root_keys: &crate::config::RootKeys,
    settings: &crate::config::KmsSettings,
) -> Result<Kms, RunError> {
    let mut kms = Kms::with_local(LocalKms::new(
        store.clone(),
        Arc::new(Sealer::with_previous(root_keys, LOCAL_KMS_PURPOSE)),
    ));
    if let Some(vault) = &settings.vault {
        kms = kms.with_vault(
            crate::kms::VaultKms::new(vault)
                .map_err(|e| RunError::Kms(format!("cannot build the Vault client: {e}")))?,
        );
    }
    if let Some(aws) = &settings.aws {
        kms = kms.with_aws(crate::kms::AwsKms::new(aws, store.clone()));
    }
    if let Some(azure) = &settings.azure {
        kms = kms.with_azure(
            crate::kms::AzureKms::new(azure)
                .map_err(|e| RunError::Kms(format!("cannot build the Azure client: {e}")))?,
        );
    }
    if let Some(gcp) = &settings.gcp {
        kms = kms.with_gcp(
            crate::kms::GcpKms::new(gcp)
                .map_err(|e| RunError::Kms(format!("cannot build the Cloud KMS client: {e}")))?,
        );
    }
    Ok(kms)
}

/// Runs the daemon until `shutdown` resolves, then stops consuming, lets in-flight batches
/// commit and ack, and returns within `shutdown_grace_secs`. If a task dies first, stops
/// after the grace period with [`RunError::TaskFailed`] (see the module docs).
///
/// # Errors
///
/// Configuration, an unreachable database at start, or a daemon task that died.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    supervise(config, listener, shutdown, None).await
}

/// A fault for tests of supervision to inject: the task named `task` panics inside its own
/// tokio task when `trigger` fires, as a bug in it would. Every daemon loop retries the
/// faults the outside world can cause (a lost broker, database or KMS), so without this no
/// test could make one die. Not for production use.
#[doc(hidden)]
pub struct Fault {
    /// The task's name, as listed in the module docs (e.g. `outbox`).
    pub task: String,
    /// Fires the fault; dropping it unfired leaves the task alone.
    pub trigger: oneshot::Receiver<()>,
}

/// [`run`] with a [`Fault`] armed. Test-only.
///
/// # Errors
///
/// As [`run`].
#[doc(hidden)]
pub async fn run_with_fault(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    fault: Fault,
) -> Result<(), RunError> {
    supervise(config, listener, shutdown, Some(fault)).await
}

async fn supervise(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    fault: Option<Fault>,
) -> Result<(), RunError> {
    let database_url = config.require_database_url()?.to_owned();
    let amqp_url = config.amqp_url.clone();
    let root_keys = config.require_root_keys()?;
    let schedules = Arc::new(sweeps::load_dir(&config.schedules_dir)?);
    rewrap::rate_limits(&config.rewrap)
        .map_err(|e| ConfigError(vec![format!("rewrap.rate_limits: {e}")]))?;

    let store = Store::connect(&database_url, config.database_max_connections).await?;
    // SQLite serves one node: a second daemon on the same file is refused here, before it
    // migrates or consumes anything. Held until this function returns.
    let _single_node = store.lock_single_node()?;
    store.migrate().await?;
    crate::telemetry::metrics();

    let sealer = Arc::new(Sealer::with_previous(&root_keys, WEBHOOK_SECRET_PURPOSE));
    let notify_store = Store::connect(&database_url, config.notify.database_connections).await?;
    let dispatcher = Dispatcher::new(notify_store, &config, sealer.clone())?;

    let (stop_tx, stop_rx) = watch::channel(false);
    // The HTTP server has a stop signal of its own: after a task died it keeps answering
    // /readyz (503) while the workers stop.
    let (http_stop_tx, http_stop_rx) = watch::channel(false);
    let registry = Arc::new(TaskRegistry::default());
    let mut tasks = Supervisor::new(registry.clone(), fault);
    let health = Arc::new(ConsumerHealth::default());
    let urgent_health = Arc::new(ConsumerHealth::default());
    let wake = intake::Wakers::default();
    let access_changed = wake.access_changed.clone();
    let rewrap_work = wake.rewrap_work.clone();
    let confirm_work = wake.confirm_work.clone();
    let publisher = amqp_url
        .as_ref()
        .map(|url| Arc::new(Publisher::new(url.clone())));
    let kms = build_kms(&store, &root_keys, &config.kms)?;

    if let (Some(url), Some(publisher)) = (&amqp_url, &publisher) {
        let intake = Intake {
            queue: config.amqp.lifecycle_queue.clone(),
            store: store.clone(),
            url: url.clone(),
            settings: config.amqp.clone(),
            health: health.clone(),
            wake: wake.clone(),
            max_skew: config.state.max_skew(),
            publisher: publisher.clone(),
        };
        tasks.spawn(
            "consumer",
            &stop_rx,
            amqp::consume_loop(intake.clone(), stop_rx.clone()),
        );
        if !config.amqp.urgent_queue.is_empty() {
            let urgent = Intake {
                queue: config.amqp.urgent_queue.clone(),
                health: urgent_health.clone(),
                ..intake
            };
            tasks.spawn(
                "urgent_consumer",
                &stop_rx,
                amqp::consume_loop(urgent, stop_rx.clone()),
            );
        } else {
            urgent_health.disable();
        }
    } else {
        health.disable();
        urgent_health.disable();
        tracing::info!(
            "no broker configured (BYOKD_AMQP_URL is unset): events are applied as they are \
             posted to /v1/events, and access changes reach tenants by email and webhook only"
        );
    }
    let relay = Relay {
        store: store.clone(),
        publisher: publisher.clone(),
        exchange: config.amqp.access_exchange.clone(),
    };
    tasks.spawn(
        "access_relay",
        &stop_rx,
        access::relay_loop(relay, access_changed.clone(), stop_rx.clone()),
    );
    tasks.spawn(
        "outbox",
        &stop_rx,
        notify_outbox::outbox_loop(dispatcher, stop_rx.clone()),
    );

    let rewrapper = Rewrapper::new(
        store.clone(),
        kms.clone(),
        config.rewrap.clone(),
        rewrap_work.clone(),
    );
    for n in 1..=config.rewrap.concurrency {
        tasks.spawn(
            &format!("rewrap_{n}"),
            &stop_rx,
            rewrap::rewrap_loop(rewrapper.clone(), stop_rx.clone()),
        );
    }

    // Confirmations and sweeps ask KMSs in bursts (the local KMS through the database): a
    // pool of their own keeps them from taking the consumer's connections.
    let reconcile_store = Store::connect(&database_url, config.state.database_connections).await?;
    let reconcile_kms = build_kms(&reconcile_store, &root_keys, &config.kms)?;
    let confirmer = Confirmer::new(
        reconcile_store.clone(),
        reconcile_kms.clone(),
        config.state.clone(),
        confirm_work.clone(),
        access_changed.clone(),
        rewrap_work.clone(),
    );
    tasks.spawn(
        "confirmer",
        &stop_rx,
        reconcile::confirm_loop(confirmer, stop_rx.clone()),
    );

    // The collector's aggregate queries share the sweeps' pool: both are periodic and
    // brief, and neither may take the consumer's connections.
    let metrics_collector = collector::Collector {
        store: reconcile_store.clone(),
        amqp_url: amqp_url.clone(),
        dead_letter_queue: config.amqp.dead_letter_queue.clone(),
        schedules: schedules.clone(),
        consumers: vec![
            (config.amqp.lifecycle_queue.clone(), health.clone()),
            (config.amqp.urgent_queue.clone(), urgent_health.clone()),
        ],
        interval: Duration::from_millis(config.metrics.collect_interval_ms),
    };
    tasks.spawn(
        "metrics_collector",
        &stop_rx,
        collector::collect_loop(metrics_collector, stop_rx.clone()),
    );

    let sweeper = Sweeper {
        store: reconcile_store,
        kms: reconcile_kms,
        schedules,
        wake: Wakers {
            access: access_changed.clone(),
            rewrap: rewrap_work.clone(),
        },
    };
    tasks.spawn(
        "sweeps",
        &stop_rx,
        sweeps::sweep_loop(sweeper, stop_rx.clone()),
    );

    let keys = crate::keys::Keys::new(
        store.clone(),
        kms.clone(),
        access_changed.clone(),
        rewrap_work.clone(),
    );
    // The audit writer (or the spool's shipper) has connections of its own: a burst of
    // unwraps must not wait behind the consumer for one, nor starve it. The shipper and the
    // chainer work in big batches, on a thread of their own that keeps those off the request
    // workers (see `background`); commit mode's writer answers requests, so its pool stays
    // on the request runtime.
    let background = Background::start().map_err(RunError::Background)?;
    let audit_writer = match config.access.audit_mode {
        AuditMode::Commit => crate::access::audit::AuditWriter::start(
            Store::connect(&database_url, 4).await?,
            config.access.audit_batch,
        ),
        AuditMode::Spool => {
            let audit_store = connect_in(&background, &database_url, 4).await?;
            let dir = config.access.spool_dir(&config.data_dir);
            let spool = crate::access::spool::Spool::open(
                &dir,
                config.access.audit_fsync_ms,
                config.access.audit_spool_max_bytes,
            )?;
            // Ships what an earlier process left first, while the API already serves.
            tasks.spawn(
                "audit_spool_shipper",
                &stop_rx,
                background.run(crate::access::spool::ship_loop(
                    spool.clone(),
                    audit_store,
                    config.access.audit_batch,
                    stop_rx.clone(),
                )),
            );
            crate::access::audit::AuditWriter::spooled(spool)
        }
    };
    let gate = crate::access::Gate::new(
        store.clone(),
        kms.clone(),
        keys.clone(),
        audit_writer,
        &config.access,
        &root_keys.current.0,
    );
    tasks.spawn(
        "access_invalidation",
        &stop_rx,
        crate::access::invalidate_loop(gate.clone(), store.clone(), stop_rx.clone()),
    );
    // The chainer keeps a connection while it leads (the advisory lock lives on it): a pool
    // of its own keeps that connection from being one the API or the consumer needs.
    let chainer = Chainer::new(
        connect_in(
            &background,
            &database_url,
            config.audit.database_connections,
        )
        .await?,
        ChainKey::load(&store, &root_keys).await?,
        config.audit.clone(),
    );
    tasks.spawn(
        "audit_chainer",
        &stop_rx,
        background.run(audit::chain_loop(chainer, stop_rx.clone())),
    );

    let state = AppState::from(http::Services {
        store: store.clone(),
        admin_token: config.admin_token.clone(),
        events_token: config.events_token.clone(),
        consumer: health,
        urgent_consumer: urgent_health,
        sealer,
        publisher,
        keys,
        gate,
        kms,
        rewrap_work,
        access_changed,
        confirm_work,
        state: config.state.clone(),
        amqp: config.amqp.clone(),
        tasks: registry.clone(),
    });
    tracing::info!(addr = %listener.local_addr()?, "byokd listening");
    let mut http_stop = http_stop_rx.clone();
    tasks.spawn_fallible("http", &http_stop_rx, async move {
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|stop| *stop).await;
            })
            .await
            .map_err(|e| e.to_string())
    });

    let died = tokio::select! {
        () = shutdown => false,
        () = tasks.first_death() => true,
    };
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let _ = stop_tx.send(true);
    if died {
        tracing::error!(
            failed = %registry.failed().join(", "),
            ?grace,
            "a daemon task died: stopping the others; /readyz answers 503 until the grace \
             period ends, then byokd exits"
        );
    } else {
        tracing::info!("shutting down: finishing in-flight work");
        let _ = http_stop_tx.send(true);
    }
    tasks.drain(Instant::now() + grace).await;
    let failed = registry.failed();
    if !failed.is_empty() {
        return Err(RunError::TaskFailed(failed));
    }
    tracing::info!("byokd stopped");
    Ok(())
}

/// Connects a pool on the background runtime, so its connections are driven there.
async fn connect_in(background: &Background, url: &str, max: u32) -> Result<Store, StoreError> {
    let url = url.to_owned();
    background
        .run(async move { Store::connect(&url, max).await })
        .await
}

/// The daemon's long-running tasks under their names (see the module docs). Dropping it
/// aborts them all, so a start that fails half-way leaves nothing running.
struct Supervisor {
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, String>,
    registry: Arc<TaskRegistry>,
    fault: Option<Fault>,
}

impl Supervisor {
    fn new(registry: Arc<TaskRegistry>, fault: Option<Fault>) -> Supervisor {
        Supervisor {
            set: JoinSet::new(),
            names: HashMap::new(),
            registry,
            fault,
        }
    }

    /// Spawns a loop that runs until `stop` turns true.
    fn spawn(
        &mut self,
        name: &str,
        stop: &watch::Receiver<bool>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.spawn_fallible(name, stop, async move {
            task.await;
            Ok(())
        });
    }

    /// Spawns a task that runs until `stop` turns true, or fails with one line. It died if
    /// it fails, panics, or returns while `stop` is still false.
    fn spawn_fallible(
        &mut self,
        name: &str,
        stop: &watch::Receiver<bool>,
        task: impl Future<Output = Result<(), String>> + Send + 'static,
    ) {
        let stop = stop.clone();
        let fault = self.fault.take_if(|f| f.task == name).map(|f| f.trigger);
        let handle = self.set.spawn(async move {
            match fault {
                Some(trigger) => tokio::select! {
                    ended = task => ended?,
                    Ok(()) = trigger => panic!("fault injected by a test"),
                },
                None => task.await?,
            }
            if *stop.borrow() {
                Ok(())
            } else {
                Err("returned before it was told to stop".to_owned())
            }
        });
        self.names.insert(handle.id(), name.to_owned());
    }

    /// Waits for the next task to end; `Some(true)` if it died (then it is logged and
    /// recorded), `None` once no task is left. Cancel safe.
    async fn next(&mut self) -> Option<bool> {
        let (id, death) = match self.set.join_next_with_id().await? {
            Ok((id, Ok(()))) => (id, None),
            Ok((id, Err(e))) => (id, Some(format!("failed: {e}"))),
            Err(e) if e.is_panic() => {
                let id = e.id();
                (
                    id,
                    Some(format!("panicked: {}", panic_text(&*e.into_panic()))),
                )
            }
            Err(e) => (e.id(), Some("was cancelled".to_owned())),
        };
        let name = self.names.remove(&id).unwrap_or_default();
        let Some(cause) = death else {
            return Some(false);
        };
        tracing::error!(task = %name, %cause, "daemon task died");
        self.registry.record_failure(&name);
        Some(true)
    }

    /// Resolves when a task dies; never if none does.
    async fn first_death(&mut self) {
        while let Some(died) = self.next().await {
            if died {
                return;
            }
        }
        std::future::pending().await
    }

    /// Waits until every task has ended or `deadline` has passed, then aborts the rest.
    async fn drain(mut self, deadline: Instant) {
        let all = async { while self.next().await.is_some() {} };
        if tokio::time::timeout_at(deadline, all).await.is_err() {
            let mut running: Vec<&str> = self.names.values().map(String::as_str).collect();
            running.sort_unstable();
            tracing::warn!(
                tasks = %running.join(", "),
                "shutdown grace period over; aborting the tasks still running"
            );
            self.set.abort_all();
        }
    }
}

/// The message of a panic payload (`panic!` with a literal or a format string).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-text payload")
}
