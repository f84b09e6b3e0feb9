//! `byokd dead list|show|replay|purge`: the lifecycle dead-letter queue, for operators.
//!
//! Messages are read with `basic.get` and held unacknowledged while the queue is scanned, so
//! nothing is lost if the command dies: whatever it did not ack returns to the queue when
//! its channel closes. A message is named by its AMQP `message-id` (every event byokd or a
//! KMS publishes has one), or by `sha256:` and the start of its body's digest when it has
//! none. Replaying republishes to the lifecycle exchange with the message's routing key and
//! acks it only after the broker confirmed the republish and the audit row is written; a
//! replay interrupted in between leaves a copy in both queues, which intake's deduplication
//! (provider, source, id) makes harmless. Purging writes the audit row, then acks.

use crate::broker::{ERROR_HEADER, Outgoing, Publisher, declare_topology};
use crate::config::Config;
use crate::store::{AuditRow, Store};
use base64::Engine;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Header counting how often a message was replayed from the dead-letter queue.
pub const REPLAYED_HEADER: &str = "x-byokd-replayed";

/// `byokd dead ...`
#[derive(Debug, clap::Subcommand)]
pub enum DeadCommand {
    /// List dead-lettered messages, oldest first: id, routing key, size, reason.
    List {
        /// Look at this many messages at most.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Print one message: its headers, the reason and the body.
    Show {
        /// Its id (from `dead list`).
        id: String,
        /// Messages scanned to find it, at most.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Republish messages to the lifecycle exchange with their routing key, then remove them
    /// from the dead-letter queue; audited.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Replay {
        /// The messages' ids.
        ids: Vec<String>,
        /// Every message in the queue.
        #[arg(long)]
        all: bool,
        /// Messages scanned, at most.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Remove messages from the dead-letter queue for good; audited.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Purge {
        /// The messages' ids.
        ids: Vec<String>,
        /// Every message in the queue.
        #[arg(long)]
        all: bool,
        /// Messages scanned, at most.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
}

/// What `list` and `show` print of a message.
#[derive(Debug, Serialize)]
struct Summary {
    id: String,
    routing_key: String,
    bytes: usize,
    reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_lettered_at: Option<String>,
    replayed: i64,
}

/// Runs one `dead` command.
pub async fn run(json_out: bool, config: &Config, command: DeadCommand) -> anyhow::Result<()> {
    let Some(url) = config.amqp_url.as_deref() else {
        anyhow::bail!(
            "no broker is configured (BYOKD_AMQP_URL is unset), so there is no dead-letter \
             queue: without a broker an event byokd cannot apply is refused when it is posted"
        );
    };
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    declare_topology(&channel, &config.amqp).await?;
    let queue = config.amqp.dead_letter_queue.as_str();
    let result = match command {
        DeadCommand::List { limit } => {
            let mut shown = Vec::new();
            while shown.len() < limit {
                let Some(m) = get(&channel, queue).await? else {
                    break;
                };
                shown.push(summary(&m));
            }
            if json_out {
                println!("{}", json!({ "queue": queue, "messages": shown }));
            } else if shown.is_empty() {
                println!("{queue} is empty");
            } else {
                for s in &shown {
                    println!(
                        "{}\t{}\t{} bytes\t{}\t{}",
                        s.id,
                        s.routing_key,
                        s.bytes,
                        s.dead_lettered_at.as_deref().unwrap_or("-"),
                        s.reason
                    );
                }
            }
            Ok(())
        }
        DeadCommand::Show { id, limit } => show(json_out, &channel, queue, &id, limit).await,
        DeadCommand::Replay { ids, all, limit } => {
            // Audited: the database must be there before a message is taken.
            let store = Store::connect(config.require_database_url()?, 2).await?;
            let publisher = Publisher::new(url);
            let done = act(&channel, queue, &ids, all, limit, async |m, s| {
                replay(config, &publisher, &store, m, s).await
            })
            .await?;
            report(json_out, "replayed", &done, &ids)
        }
        DeadCommand::Purge { ids, all, limit } => {
            let store = Store::connect(config.require_database_url()?, 2).await?;
            let done = act(&channel, queue, &ids, all, limit, async |_, s| {
                audit(&store, "dead_letter_purged", s).await
            })
            .await?;
            report(json_out, "purged", &done, &ids)
        }
    };
    // Whatever was read and not acked goes back to the queue now.
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    result
}

async fn get(channel: &Channel, queue: &str) -> anyhow::Result<Option<BasicGetMessage>> {
    Ok(channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?)
}

async fn show(
    json_out: bool,
    channel: &Channel,
    queue: &str,
    id: &str,
    limit: usize,
) -> anyhow::Result<()> {
    for _ in 0..limit {
        let Some(m) = get(channel, queue).await? else {
            break;
        };
        let s = summary(&m);
        if s.id != id {
            continue;
        }
        let headers = headers_json(m.delivery.properties.headers().as_ref());
        let body = match std::str::from_utf8(&m.delivery.data) {
            Ok(text) => json!({ "text": text }),
            Err(_) => json!({
                "base64": base64::engine::general_purpose::STANDARD.encode(&m.delivery.data)
            }),
        };
        if json_out {
            println!(
                "{}",
                json!({ "message": s, "headers": headers, "body": body })
            );
        } else {
            println!(
                "id: {}\nrouting key: {}\nbytes: {}\nreason: {}\nheaders: {headers}\n",
                s.id, s.routing_key, s.bytes, s.reason
            );
            match body.get("text").and_then(Value::as_str) {
                Some(text) => println!("{text}"),
                None => println!("(binary body, base64) {}", body["base64"]),
            }
        }
        return Ok(());
    }
    anyhow::bail!("no message {id:?} among the first {limit} of {queue}")
}

/// Scans the queue and calls `each` on every message chosen (by id, or all), acking it once
/// `each` succeeded. Returns the summaries of the messages handled.
async fn act(
    channel: &Channel,
    queue: &str,
    ids: &[String],
    all: bool,
    limit: usize,
    mut each: impl AsyncFnMut(&BasicGetMessage, &Summary) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Summary>> {
    let mut done = Vec::new();
    for _ in 0..limit {
        let Some(m) = get(channel, queue).await? else {
            break;
        };
        let s = summary(&m);
        if !all && !ids.contains(&s.id) {
            continue;
        }
        each(&m, &s).await?;
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        done.push(s);
    }
    Ok(done)
}

async fn replay(
    config: &Config,
    publisher: &Publisher,
    store: &Store,
    m: &BasicGetMessage,
    s: &Summary,
) -> anyhow::Result<()> {
    let mut headers = m.delivery.properties.headers().clone().unwrap_or_default();
    let kept: FieldTable = headers
        .inner()
        .iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            !(k.starts_with("x-death")
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death")
                || k == "x-delivery-count"
                || k == ERROR_HEADER
                || k.starts_with("x-byokd-original"))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into();
    headers = kept;
    headers.insert(
        REPLAYED_HEADER.into(),
        AMQPValue::LongLongInt(s.replayed + 1),
    );
    let properties: BasicProperties = m.delivery.properties.clone().with_headers(headers);
    publisher
        .publish(Outgoing {
            exchange: &config.amqp.lifecycle_exchange,
            routing_key: &s.routing_key,
            body: &m.delivery.data,
            properties,
            mandatory: true,
        })
        .await?;
    audit(store, "dead_letter_replayed", s).await
}

async fn audit(store: &Store, action: &str, s: &Summary) -> anyhow::Result<()> {
    store
        .append_audit(&[AuditRow::operation(
            None,
            action,
            "cli",
            json!({
                "message_id": s.id,
                "routing_key": s.routing_key,
                "bytes": s.bytes,
                "reason": s.reason,
            }),
        )])
        .await?;
    Ok(())
}

fn report(json_out: bool, what: &str, done: &[Summary], ids: &[String]) -> anyhow::Result<()> {
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !done.iter().any(|s| &s.id == *id))
        .collect();
    if json_out {
        println!("{}", json!({ what: done, "not_found": missing }));
    } else {
        println!("{what} {} message(s)", done.len());
        for s in done {
            println!("{}\t{}", s.id, s.routing_key);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "not in the dead-letter queue: {}",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn summary(m: &BasicGetMessage) -> Summary {
    let props = &m.delivery.properties;
    let headers = props.headers().as_ref();
    let header = |name: &str| headers.and_then(|h| h.inner().get(name));
    let id = props
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| {
            let digest = Sha256::digest(&m.delivery.data);
            format!(
                "sha256:{}",
                digest[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        });
    // byokd's own dead letters carry the reason; the broker's (delivery limit, rejection)
    // say theirs in x-first-death-reason / x-death.
    let reason = header(ERROR_HEADER)
        .and_then(text)
        .or_else(|| {
            header("x-first-death-reason")
                .and_then(text)
                .map(|r| format!("dead-lettered by the broker: {r}"))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let dead_lettered_at = header(crate::broker::DEAD_AT_HEADER).and_then(text);
    let replayed = match header(REPLAYED_HEADER) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        _ => 0,
    };
    Summary {
        id,
        routing_key: m.delivery.routing_key.to_string(),
        bytes: m.delivery.data.len(),
        reason,
        dead_lettered_at,
        replayed,
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn headers_json(headers: Option<&FieldTable>) -> Value {
    let Some(headers) = headers else {
        return json!({});
    };
    headers
        .inner()
        .iter()
        .map(|(k, v)| (k.to_string(), amqp_json(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn amqp_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => json!(s.to_string()),
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldArray(a) => a.as_slice().iter().map(amqp_json).collect(),
        AMQPValue::FieldTable(t) => headers_json(Some(t)),
        other => json!(format!("{other:?}")),
    }
}
