//! The command line: clap definitions and dispatch. Errors surface as one line on stderr.

use crate::config::Config;
use crate::events::amqp::{Outgoing, Publisher, routing_key};
use crate::events::normalize::normalize;
use crate::store::Store;
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use lapin::BasicProperties;
use std::io::Read;
use std::path::PathBuf;

/// byokd: the key-lifecycle daemon behind Bring Your Own Key.
#[derive(Debug, Parser)]
#[command(name = "byokd", version, about, long_about = None)]
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
    /// Apply database migrations and exit.
    Migrate,
    /// Publish one lifecycle event (any supported format) with publisher confirms.
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
    /// Load and validate the configuration, print it with secrets redacted, and exit.
    CheckConfig,
}

/// Parses arguments and runs the command.
///
/// # Errors
///
/// Whatever made the command fail; `main` prints it as one line.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load()?;
    crate::telemetry::init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(dispatch(cli, config))
}

async fn dispatch(cli: Cli, config: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Run => run(config).await,
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
        Command::CheckConfig => {
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({ "valid": true, "config": format!("{config:?}") })
                );
            } else {
                println!("configuration is valid\n{config:#?}");
            }
            Ok(())
        }
    }
}

fn print(json: bool, value: &serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
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
        let event = normalize(&body, config.amqp.max_message_bytes)?;
        (Some(event.event_id.clone()), routing_key(&event))
    };
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
