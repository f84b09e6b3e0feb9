//! The command line: clap definitions and dispatch. Errors surface as one line on stderr.

use crate::broker::{Outgoing, Publisher};
use crate::config::Config;
use crate::domain::{EventKind, KeyState, LifecycleEvent, Provider};
use crate::events::amqp::{message_routing_key, routing_key};
use crate::events::normalize::canonical;
use crate::events::normalize::normalize;
use crate::keys::Keys;
use crate::kms::LocalKms;
use crate::rootkey::RootKeyRotation;
use crate::seal::{LOCAL_KMS_PURPOSE, Sealer};
use crate::store::{AuditRow, Store};
use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use lapin::BasicProperties;
use secrecy::ExposeSecret;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

mod api;
mod check;
mod dead;
mod demo;
pub mod exit;
mod jobs;

/// byokd: the key-lifecycle daemon behind Bring Your Own Key.
#[derive(Debug, Parser)]
#[command(
    name = "byokd",
    version,
    about,
    long_about = None,
    after_help = "Moving from standalone (SQLite) to PostgreSQL: stop the daemon, run \
                  `byokd export --out FILE`, then `byokd import --in FILE` with \
                  BYOKD_DATABASE_URL set and the same root key (BYOKD_LOCAL_KMS_ROOT_KEY, the \
                  contents of root.key), and start the daemon there (README, \"Moving from \
                  standalone to PostgreSQL\")."
)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: consumer, access relay and HTTP API.
    Run,
    /// A scripted tour in a temporary data dir, in well under a minute: a tenant and a local
    /// key, 10,000 DEKs, a rotation, an expiry warning, a revocation and recovery; prints a
    /// timeline and where the emails went.
    Demo {
        /// Keep the data dir and print how to start `byokd run` on it.
        #[arg(long)]
        keep: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Publish one lifecycle event (any supported format) with publisher confirms; without a
    /// broker, post it to the running daemon, which applies it before answering.
    Publish {
        /// File holding the event; `-` or nothing reads standard input.
        file: Option<PathBuf>,
        /// Publish without validating (e.g. to exercise dead-lettering).
        #[arg(long)]
        raw: bool,
        /// Routing key (default: `<provider>.<kind>` of the event).
        #[arg(long)]
        routing_key: Option<String>,
    },
    /// Check everything `run` needs from the configuration (URLs, root key, schedules,
    /// templates, unknown settings) without connecting; print each check and the
    /// configuration with secrets redacted. Exit 3 if any check fails.
    CheckConfig,
    /// Run one sweep schedule now and print what it did.
    Sweep {
        /// Schedule name (from `schedules/*.toml`).
        name: String,
    },
    /// Operate a KMS provider directly.
    Kms {
        /// Which provider.
        #[command(subcommand)]
        provider: KmsCommand,
    },
    /// Inspect DEKs.
    Deks {
        /// What to do.
        #[command(subcommand)]
        command: DeksCommand,
    },
    /// Manage clients of the key-access API (the platform's services).
    Clients {
        /// What to do.
        #[command(subcommand)]
        command: ClientsCommand,
    },
    /// Make or rotate the root key that seals secrets at rest.
    RootKey {
        /// What to do.
        #[command(subcommand)]
        command: RootKeyCommand,
    },
    /// Follow re-wrap jobs.
    Jobs {
        /// What to do.
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Inspect, replay or purge the lifecycle dead-letter queue.
    Dead {
        /// What to do.
        #[command(subcommand)]
        command: dead::DeadCommand,
    },
    /// Write the whole database (tenants, keys, DEKs, the audit trail and the rest) to one
    /// archive, to move the deployment to another database, e.g. from standalone SQLite to
    /// PostgreSQL. Stop the daemon first; secrets stay sealed under the root key.
    Export {
        /// Archive file; `-` or nothing writes standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Load an archive written by `byokd export` into the configured database (migrated
    /// first, and empty), in one transaction, after checking the whole archive; needs the
    /// exported deployment's root key. `audit verify` and `deks verify` pass after it.
    Import {
        /// Archive file; `-` or nothing reads standard input.
        #[arg(long = "in")]
        input: Option<PathBuf>,
    },
    /// Verify or export the audit trail.
    Audit {
        /// What to do.
        #[command(subcommand)]
        command: AuditCommand,
    },
}

/// `byokd clients ...`
#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Create a client and print its token (shown this once; only its hash is kept).
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["tenants", "all_tenants"])))]
    Create {
        /// Unique name.
        name: String,
        /// Tenants it may create and unwrap DEKs of.
        #[arg(long, value_delimiter = ',')]
        tenants: Vec<String>,
        /// Every tenant.
        #[arg(long)]
        all_tenants: bool,
    },
    /// List clients and their scopes.
    List,
    /// Revoke a client: its token is refused on every replica from now on.
    Revoke {
        /// The client's name.
        name: String,
    },
}

/// `byokd root-key ...`
#[derive(Debug, Subcommand)]
pub enum RootKeyCommand {
    /// Print a new random root key (base64 of 32 bytes); needs no configuration.
    Generate,
    /// Re-seal everything under the current root key, in resumable batches.
    ///
    /// Whatever is sealed under a previous root key (BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS) or in
    /// the legacy seal format is re-sealed under BYOKD_LOCAL_KMS_ROOT_KEY. Daemons configured
    /// with both keys keep working meanwhile; once it reports nothing left under another root
    /// key, the previous keys can be removed from the configuration.
    Rotate {
        /// Values re-sealed per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch_size: i64,
    },
}

/// `byokd audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the whole audit chain, its checkpoints and unchained rows; print `{rows, ok,
    /// head}`, or exit non-zero naming the first row modified, inserted or deleted.
    Verify {
        /// Also count this tenant's rows (the whole chain is verified all the same: a
        /// deleted row leaves a gap, not a tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Print audit entries as JSON lines, oldest first, with their chain_seq and chain
    /// value (for a SIEM).
    Export {
        /// From this time on (RFC 3339, inclusive).
        #[arg(long)]
        since: DateTime<Utc>,
        /// Up to this time (RFC 3339, exclusive).
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        /// Only this tenant's entries.
        #[arg(long)]
        tenant: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
}

/// Formats of `byokd audit export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

/// `byokd kms ...`
#[derive(Debug, Subcommand)]
pub enum KmsCommand {
    /// byokd's local KMS: change a key, then publish the lifecycle event a real KMS would.
    Local {
        /// The operation.
        #[command(subcommand)]
        op: LocalOp,
    },
}

/// The key and whether to announce the change.
#[derive(Debug, clap::Args)]
pub struct LocalKey {
    /// Key name (`key_ref`).
    pub key: String,
    /// Change the key without publishing the lifecycle event (a KMS that lost the event).
    #[arg(long)]
    pub no_event: bool,
}

/// Local KMS operations.
#[derive(Debug, Subcommand)]
pub enum LocalOp {
    /// Create a key at version 1.
    Create {
        /// Key name.
        key: String,
        /// Expiry (RFC 3339).
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
    },
    /// Add a new version and make it current (publishes `rotated`).
    Rotate(LocalKey),
    /// Disable (publishes `disabled`).
    Disable(LocalKey),
    /// Enable (publishes `enabled`).
    Enable(LocalKey),
    /// Schedule deletion (publishes `deletion_scheduled`).
    ScheduleDeletion(LocalKey),
    /// Cancel a scheduled deletion; the key comes back disabled (publishes `deletion_cancelled`).
    CancelDeletion(LocalKey),
    /// Destroy the key material for good (publishes `destroyed`).
    Destroy(LocalKey),
    /// Set or clear the expiry (publishes `expiry_changed`).
    SetExpiry {
        /// Key and publishing.
        #[command(flatten)]
        key: LocalKey,
        /// New expiry (RFC 3339).
        #[arg(long, conflicts_with = "clear", required_unless_present = "clear")]
        expires_at: Option<DateTime<Utc>>,
        /// Remove the expiry.
        #[arg(long)]
        clear: bool,
    },
}

/// `byokd deks ...`
#[derive(Debug, Subcommand)]
pub enum DeksCommand {
    /// Unwrap every DEK of a tenant and check its key check value; exit non-zero on any failure.
    Verify {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
    },
}

/// Parses arguments and runs the command.
///
/// # Errors
///
/// Whatever made the command fail; `main` prints it as one line.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::RootKey {
        command: RootKeyCommand::Generate,
    } = cli.command
    {
        // Before the configuration is loaded: making a key must not need one.
        generate_root_key(cli.json);
        return Ok(());
    }
    if let Command::CheckConfig = cli.command {
        // Reports a configuration that does not load as a failed check, not as an error.
        return check::run(cli.json);
    }
    crate::install_crypto_provider();
    let mut config = Config::load()?;
    if let Command::Demo { keep } = cli.command {
        // The tour makes a data dir of its own and prints its own timeline.
        crate::telemetry::init_logging_at(config.log_format, "warn");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        return runtime.block_on(demo::run(cli.json, keep, config.database_url.take()));
    }
    crate::telemetry::init_logging(config.log_format);
    // Standalone mode: only the daemon makes the data dir and its secrets; every other
    // command uses what it made, if it made any (otherwise it says what it lacks as ever).
    let create = matches!(cli.command, Command::Run);
    if (create || config.data_dir.is_dir())
        && let Some(data_dir) = crate::standalone::prepare(&mut config, create)?
        && create
    {
        data_dir.log();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(dispatch(cli, config))
}

async fn dispatch(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Run => run(config).await,
        Command::Demo { keep } => demo::run(cli.json, keep, config.database_url).await,
        Command::Migrate => {
            let store = Store::connect(config.require_database_url()?, 2).await?;
            store.migrate().await?;
            print(
                cli.json,
                &serde_json::json!({ "migrated": true }),
                "migrations applied",
            );
            Ok(())
        }
        Command::Publish {
            file,
            raw,
            routing_key: key,
        } => publish(cli.json, &config, file, raw, key).await,
        Command::Sweep { name } => sweep(cli.json, &config, &name).await,
        Command::Kms {
            provider: KmsCommand::Local { op },
        } => kms_local(cli.json, &config, op).await,
        Command::Deks {
            command: DeksCommand::Verify { tenant },
        } => verify_deks(cli.json, &config, &tenant).await,
        Command::Clients { command } => clients(cli.json, &config, command).await,
        Command::RootKey {
            command: RootKeyCommand::Rotate { batch_size },
        } => rotate_root_key(cli.json, &config, batch_size).await,
        Command::RootKey {
            command: RootKeyCommand::Generate,
        } => {
            generate_root_key(cli.json);
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { tenant },
        } => verify_audit(cli.json, &config, tenant.as_deref()).await,
        Command::Audit {
            command:
                AuditCommand::Export {
                    since,
                    until,
                    tenant,
                    format: ExportFormat::Jsonl,
                },
        } => export_audit(&config, since, until, tenant).await,
        Command::Export { out } => export(cli.json, &config, out).await,
        Command::Import { input } => import(cli.json, &config, input).await,
        Command::CheckConfig => check::run(cli.json),
        Command::Dead { command } => dead::run(cli.json, &config, command).await,
        Command::Jobs { command } => jobs::run(cli.json, &config, command).await,
    }
}

async fn clients(json: bool, config: &Config, command: ClientsCommand) -> anyhow::Result<()> {
    let store = Store::connect(config.require_database_url()?, 2).await?;
    match command {
        ClientsCommand::Create {
            name,
            tenants,
            all_tenants,
        } => {
            let (row, token) =
                crate::access::create_client(&store, &name, tenants, all_tenants).await?;
            let mut value = serde_json::to_value(&row)?;
            value["token"] = token.clone().into();
            print(
                json,
                &value,
                &format!(
                    "client {} created; its token (shown once, keep it secret):\n{token}",
                    row.name
                ),
            );
        }
        ClientsCommand::List => {
            let rows = store.clients().await?;
            let text = rows
                .iter()
                .map(|c| {
                    format!(
                        "{}\t{}\t{}",
                        c.name,
                        if c.all_tenants {
                            "all tenants".to_owned()
                        } else {
                            c.tenants.join(",")
                        },
                        c.revoked_at
                            .map_or("active".to_owned(), |at| format!("revoked {at}"))
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(json, &serde_json::json!({ "clients": rows }), &text);
        }
        ClientsCommand::Revoke { name } => {
            let row = crate::access::revoke_client(&store, &name).await?;
            print(
                json,
                &serde_json::to_value(&row)?,
                &format!("client {} revoked", row.name),
            );
        }
    }
    Ok(())
}

fn print(json: bool, value: &serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    for unknown in &config.unknown {
        tracing::warn!("{unknown}: ignored (byokd check-config lists every unknown setting)");
    }
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    crate::daemon::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn publish(
    json: bool,
    config: &Config,
    file: Option<PathBuf>,
    raw: bool,
    key: Option<String>,
) -> anyhow::Result<()> {
    let body = match file.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
    };
    let (event_id, default_key) = if raw {
        (None, "raw".to_owned())
    } else {
        // Several events (an Event Grid array) go out as the one message they came in.
        let events = normalize(&body, config.amqp.max_message_bytes)?;
        (
            events.first().map(|e| e.event_id.clone()),
            message_routing_key(&events),
        )
    };
    if config.amqp_url.is_none() {
        if key.is_some() {
            bail!(
                "--routing-key needs a broker (BYOKD_AMQP_URL); without one events are posted to the daemon"
            );
        }
        let posted = api::post_event(config, body).await?;
        print(
            json,
            &posted.body,
            &describe_posted(&posted, event_id.as_deref()),
        );
        return Ok(());
    }
    let routing_key = key.unwrap_or(default_key);
    let publisher = Publisher::new(config.require_amqp_url()?);
    publisher
        .declare_topology(&config.amqp)
        .await
        .context("cannot reach the broker")?;
    let mut properties = BasicProperties::default().with_content_type("application/json".into());
    if let Some(id) = &event_id {
        properties = properties.with_message_id(id.as_str().into());
    }
    publisher
        .publish(Outgoing {
            exchange: &config.amqp.lifecycle_exchange,
            routing_key: &routing_key,
            body: &body,
            properties,
            mandatory: true,
        })
        .await?;
    print(
        json,
        &serde_json::json!({
            "published": true,
            "id": event_id,
            "exchange": config.amqp.lifecycle_exchange,
            "routing_key": routing_key,
        }),
        &format!(
            "published {} to {} with routing key {routing_key}",
            event_id.as_deref().unwrap_or("message"),
            config.amqp.lifecycle_exchange
        ),
    );
    Ok(())
}

/// One line for an event the daemon applied (or found to change nothing).
fn describe_posted(posted: &api::Posted, event_id: Option<&str>) -> String {
    if posted.status != 202 {
        let reason = posted
            .body
            .get("ignored")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("no reason given");
        return format!("the daemon applied nothing: {reason}");
    }
    let outcomes: Vec<String> = posted
        .body
        .get("events")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            format!(
                "{} {}",
                e.get("id")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("?"),
                e.get("outcome")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("accepted")
            )
        })
        .collect();
    format!(
        "applied {} by the daemon (no broker): {}",
        event_id.unwrap_or("the message"),
        outcomes.join(", ")
    )
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .context("cannot read standard input")?;
    if body.is_empty() {
        bail!("no event given: pass a file or pipe one on standard input");
    }
    Ok(body)
}

async fn sweep(json: bool, config: &Config, name: &str) -> anyhow::Result<()> {
    let schedules = crate::sweeps::load_dir(&config.schedules_dir)?;
    let root = config.require_root_keys()?;
    let store = Store::connect(config.require_database_url()?, 4).await?;
    store.migrate().await?;
    let sweeper = crate::sweeps::Sweeper {
        kms: crate::daemon::build_kms(&store, &root, &config.kms)?,
        store,
        schedules: Arc::new(schedules),
        wake: crate::sweeps::Wakers::default(),
    };
    let Some(report) = sweeper.run_now(name, Utc::now()).await? else {
        bail!("schedule {name:?} is running on another replica right now; try again shortly");
    };
    let text = format!(
        "{} ({}) {}: {}",
        report.schedule, report.job, report.status, report.details
    );
    print(json, &serde_json::to_value(&report)?, &text);
    if report.status != "ok" {
        bail!("sweep {name:?} failed");
    }
    Ok(())
}

async fn local_kms(config: &Config) -> anyhow::Result<LocalKms> {
    let root = config.require_root_keys()?;
    let store = Store::connect(config.require_database_url()?, 2).await?;
    store.migrate().await?;
    Ok(LocalKms::new(
        store,
        Arc::new(Sealer::with_previous(&root, LOCAL_KMS_PURPOSE)),
    ))
}

async fn kms_local(json: bool, config: &Config, op: LocalOp) -> anyhow::Result<()> {
    use KeyState::{Destroyed, Disabled, Enabled, PendingDeletion};
    let kms = local_kms(config).await?;
    let (key, no_event, kind, info) = match op {
        LocalOp::Create { key, expires_at } => {
            let info = kms.create(&key, expires_at).await?;
            (key, true, None, info)
        }
        LocalOp::Rotate(k) => {
            let info = kms.rotate(&k.key).await?;
            (k.key, k.no_event, Some(EventKind::Rotated), info)
        }
        LocalOp::Disable(k) => {
            let info = kms
                .transition(&k.key, &[Enabled, Disabled], Disabled)
                .await?;
            (k.key, k.no_event, Some(EventKind::Disabled), info)
        }
        LocalOp::Enable(k) => {
            let info = kms
                .transition(&k.key, &[Enabled, Disabled], Enabled)
                .await?;
            (k.key, k.no_event, Some(EventKind::Enabled), info)
        }
        LocalOp::ScheduleDeletion(k) => {
            let info = kms
                .transition(&k.key, &[Enabled, Disabled], PendingDeletion)
                .await?;
            (k.key, k.no_event, Some(EventKind::DeletionScheduled), info)
        }
        LocalOp::CancelDeletion(k) => {
            let info = kms.transition(&k.key, &[PendingDeletion], Disabled).await?;
            (k.key, k.no_event, Some(EventKind::DeletionCancelled), info)
        }
        LocalOp::Destroy(k) => {
            let info = kms
                .transition(&k.key, &[Enabled, Disabled, PendingDeletion], Destroyed)
                .await?;
            (k.key, k.no_event, Some(EventKind::Destroyed), info)
        }
        LocalOp::SetExpiry {
            key,
            expires_at,
            clear,
        } => {
            let info = kms
                .set_expiry(&key.key, if clear { None } else { expires_at })
                .await?;
            (key.key, key.no_event, Some(EventKind::ExpiryChanged), info)
        }
    };
    let mut event_id = None;
    if let Some(kind) = kind.filter(|_| no_event) {
        // A change no event will announce: the audit trail is the only record of it.
        let store = Store::connect(config.require_database_url()?, 2).await?;
        store
            .append_audit(&[AuditRow {
                provider: Some(Provider::Local),
                key_ref: Some(key.clone()),
                ..AuditRow::operation(
                    None,
                    "local_kms_changed",
                    "cli",
                    serde_json::json!({ "change": kind, "state": info.state,
                                        "version": info.current_version, "event": false }),
                )
            }])
            .await?;
    }
    if let Some(kind) = kind.filter(|_| !no_event) {
        let event = LifecycleEvent {
            provider: Provider::Local,
            event_id: uuid::Uuid::now_v7().to_string(),
            kind,
            key_ref: key.clone(),
            version: (kind == EventKind::Rotated).then(|| info.current_version.clone()),
            expires_at: info.expires_at,
            time: Utc::now(),
            source: "byokd://local-kms".to_owned(),
            origin: crate::domain::Origin::Event,
        };
        let body = canonical::to_json(&event).to_string();
        if config.amqp_url.is_none() {
            api::post_event(config, body.into_bytes()).await.context(
                "the key changed, but its lifecycle event could not be handed to the daemon",
            )?;
            event_id = Some(event.event_id);
        } else {
            let publisher = Publisher::new(config.require_amqp_url()?);
            publisher.declare_topology(&config.amqp).await?;
            publisher
                .publish(Outgoing {
                    exchange: &config.amqp.lifecycle_exchange,
                    routing_key: &routing_key(&event),
                    body: body.as_bytes(),
                    properties: BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_message_id(event.event_id.as_str().into()),
                    mandatory: true,
                })
                .await
                .context("the key changed, but its lifecycle event could not be published")?;
            event_id = Some(event.event_id);
        }
    }
    print(
        json,
        &serde_json::json!({
            "key_ref": key,
            "state": info.state,
            "current_version": info.current_version,
            "expires_at": info.expires_at,
            "event_id": event_id,
        }),
        &format!(
            "local key {key}: {} at version {}{}",
            info.state,
            info.current_version,
            event_id
                .as_deref()
                .map(|id| format!(" (published event {id})"))
                .unwrap_or_default()
        ),
    );
    Ok(())
}

async fn verify_deks(json: bool, config: &Config, tenant: &str) -> anyhow::Result<()> {
    let root = config.require_root_keys()?;
    let store = Store::connect(config.require_database_url()?, 2).await?;
    let kms = crate::daemon::build_kms(&store, &root, &config.kms)?;
    let keys = Keys::new(store.clone(), kms, Arc::default(), Arc::default());
    let report = keys.verify_deks(tenant).await?;
    store
        .append_audit(&[AuditRow::operation(
            Some(tenant),
            "deks_verified",
            "cli",
            serde_json::json!({ "total": report.total, "ok": report.ok, "failed": report.failed }),
        )])
        .await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "tenant {}: {} DEKs, {} ok, {} failed; by version: {}",
            report.tenant,
            report.total,
            report.ok,
            report.failed,
            report
                .by_version
                .iter()
                .map(|(v, n)| format!("{v}={n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if report.failed > 0 {
        bail!(
            "{} of {} DEKs failed verification",
            report.failed,
            report.total
        );
    }
    Ok(())
}

fn generate_root_key(json: bool) {
    let key = crate::seal::generate_root_key();
    print(
        json,
        &serde_json::json!({ "root_key": key.expose_secret() }),
        key.expose_secret(),
    );
}

async fn rotate_root_key(json: bool, config: &Config, batch_size: i64) -> anyhow::Result<()> {
    let keys = config.require_root_keys()?;
    let store = Store::connect(config.require_database_url()?, 2).await?;
    store.migrate().await?;
    let previous = keys.previous.len();
    let report = RootKeyRotation::new(store, &keys, batch_size).run().await?;
    let (l, w, a) = (
        &report.local_kms_keys,
        &report.webhook_secrets,
        &report.audit_chain_key,
    );
    let text = format!(
        "re-sealed under the current root key: {} of {} local KMS key versions, {} of {} \
         webhook secrets, {} of {} audit chain keys; {} failed, {} still under another root \
         key{}",
        l.resealed,
        l.total,
        w.resealed,
        w.total,
        a.resealed,
        a.total,
        l.failed + w.failed + a.failed,
        l.remaining + w.remaining + a.remaining,
        if report.complete() && previous > 0 {
            "; BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS can now be removed"
        } else {
            ""
        }
    );
    print(json, &serde_json::to_value(&report)?, &text);
    let failed = l.failed + w.failed + a.failed;
    if failed > 0 {
        bail!(
            "{failed} sealed values cannot be opened with any configured root key and were left \
             as they are: {}",
            report.failures.join("; ")
        );
    }
    if !report.complete() {
        bail!(
            "{} values were sealed under another root key while the rotation ran (is a daemon \
             still configured with the old root key as current?); run it again",
            l.remaining + w.remaining + a.remaining
        );
    }
    Ok(())
}

async fn verify_audit(json: bool, config: &Config, tenant: Option<&str>) -> anyhow::Result<()> {
    let keys = config.require_root_keys()?;
    let store = Store::connect(config.require_database_url()?, 2).await?;
    let key = crate::audit::ChainKey::load(&store, &keys).await?;
    let grace = std::time::Duration::from_secs(config.audit.pending_grace_secs);
    let report = match crate::audit::verify(&store, &key, tenant, grace, Utc::now()).await {
        Ok(report) => report,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": e.to_string() })
                );
            }
            return Err(e.into());
        }
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let head = report.head.as_ref().map_or_else(
        || "the chain is empty".to_owned(),
        |h| format!("head chain_seq {} = {}", h.chain_seq, h.chain),
    );
    println!(
        "audit chain ok: {} rows, {head}; {} checkpoints match; {} rows pending (recent)",
        report.rows, report.checkpoints, report.pending
    );
    if let Some(t) = &report.tenant {
        println!(
            "tenant {}: {} rows in the verified chain, {} pending (the whole chain was walked: \
             a deleted row leaves a gap, not a tenant, so no tenant's share is verified alone)",
            t.id, t.rows, t.pending
        );
    }
    Ok(())
}

async fn export_audit(
    config: &Config,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    tenant: Option<String>,
) -> anyhow::Result<()> {
    let store = Store::connect(config.require_database_url()?, 2).await?;
    let filter = crate::store::AuditFilter {
        tenant,
        since: Some(since),
        until,
        ..Default::default()
    };
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match crate::audit::export(&store, &filter, &mut out).await {
        // A reader that has seen enough (`| head`) is not an error.
        Err(crate::audit::ExportError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(())
        }
        Err(e) => Err(e.into()),
        Ok(_) => Ok(()),
    }
}

/// Whether `path` means standard input or output.
fn is_std(path: Option<&std::path::Path>) -> bool {
    path.is_none_or(|p| p.as_os_str() == "-")
}

async fn export(json: bool, config: &Config, out: Option<PathBuf>) -> anyhow::Result<()> {
    let store = Store::connect(config.require_database_url()?, 2).await?;
    // A daemon on the SQLite file would go on writing after the snapshot.
    let _node = store
        .lock_single_node()
        .map_err(|e| anyhow::anyhow!("{e}: stop the daemon before exporting its database"))?;
    let to_stdout = is_std(out.as_deref());
    let summary = if to_stdout {
        let mut w = std::io::BufWriter::new(std::io::stdout());
        crate::transfer::export(&store, &mut w).await?
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        let path = out.as_deref().unwrap_or_else(|| std::path::Path::new("-"));
        // Written aside and renamed when complete, so FILE is never half an archive; 0600, as
        // it holds everything sealed, wrapped and hashed that the database does.
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        let mut w = std::io::BufWriter::new(file);
        let summary = crate::transfer::export(&store, &mut w).await?;
        w.into_inner()
            .map_err(std::io::IntoInnerError::into_error)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("cannot write {}", path.display()))?;
        summary
    };
    let text = format!(
        "exported {} rows from {} ({}), sha256 {}",
        summary.rows,
        summary.source,
        describe_counts(&summary.counts),
        summary.sha256
    );
    // The archive may be on standard output: the report then goes to standard error.
    if to_stdout {
        eprintln!("{text}");
    } else {
        print(json, &serde_json::to_value(&summary)?, &text);
    }
    Ok(())
}

async fn import(json: bool, config: &Config, input: Option<PathBuf>) -> anyhow::Result<()> {
    let keys = config.require_root_keys()?;
    let archive = if is_std(input.as_deref()) {
        crate::transfer::read_archive(std::io::BufReader::new(std::io::stdin().lock()))?
    } else {
        let path = input
            .as_deref()
            .unwrap_or_else(|| std::path::Path::new("-"));
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        crate::transfer::read_archive(std::io::BufReader::new(file))?
    };
    let store = Store::connect(config.require_database_url()?, 2).await?;
    let _node = store
        .lock_single_node()
        .map_err(|e| anyhow::anyhow!("{e}: stop the daemon before importing into its database"))?;
    store.migrate().await?;
    crate::transfer::import(&store, &archive, &keys).await?;
    let s = &archive.summary;
    print(
        json,
        &serde_json::json!({ "imported": true, "archive": s }),
        &format!(
            "imported {} rows exported from {} by byokd {} ({}); run `byokd audit verify` \
             and `byokd deks verify` to check",
            s.rows,
            s.source,
            s.byokd_version,
            describe_counts(&s.counts)
        ),
    );
    Ok(())
}

/// `table=n, ...` of the tables that hold rows.
fn describe_counts(counts: &std::collections::BTreeMap<String, i64>) -> String {
    counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(t, n)| format!("{t}={n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
