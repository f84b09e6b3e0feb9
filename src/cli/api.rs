//! The CLI's way to a running daemon's HTTP API, for what needs the daemon rather than the
//! database: on a node without a broker, `byokd publish` and `byokd kms local` hand their
//! events to `POST /v1/events`, which applies them before it answers.
//!
//! The daemon is looked for at `BYOKD_HTTP_ADDR` (a wildcard address is reached on
//! loopback) with the admin token of the settings or, in standalone mode, of the data dir.

use crate::config::Config;
use anyhow::{Context, bail};
use secrecy::ExposeSecret;
use std::net::SocketAddr;

/// The line that says why an event cannot go anywhere, and what to do.
const NO_WAY: &str = "no broker is configured (BYOKD_AMQP_URL is unset), so events go to a \
                      running daemon's POST /v1/events";

/// The base URL of the daemon this configuration runs.
pub fn base_url(config: &Config) -> String {
    let mut addr: SocketAddr = config.http_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{addr}")
}

/// What the daemon answered to an event.
#[derive(Debug)]
pub struct Posted {
    /// 202 (applied) or 200 (changes nothing).
    pub status: u16,
    /// The answer's JSON.
    pub body: serde_json::Value,
}

/// Posts one event message to the daemon, which applies it before answering.
///
/// # Errors
///
/// One line saying what to do: no admin token, no daemon answering, or the daemon's refusal
/// (its reason).
pub async fn post_event(config: &Config, body: Vec<u8>) -> anyhow::Result<Posted> {
    let Some(token) = &config.admin_token else {
        bail!(
            "{NO_WAY}, but there is no admin token to call it with: set BYOKD_ADMIN_TOKEN, or \
             BYOKD_DATA_DIR to the daemon's data dir, or BYOKD_AMQP_URL to publish to a broker"
        );
    };
    let base = base_url(config);
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;
    let response = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(token.expose_secret())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{NO_WAY}, and no daemon answers on {base} ({:#}): start `byokd run` (with the \
                 same settings), set BYOKD_HTTP_ADDR to where it listens, or set \
                 BYOKD_AMQP_URL to publish to a broker",
                anyhow::Error::from(e.without_url())
            )
        })?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let body: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|_| serde_json::Value::String(text.clone()));
    if !(200..300).contains(&status) {
        let reason = body
            .get("error")
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| text.clone(), str::to_owned);
        bail!("the daemon at {base} refused the event ({status}): {reason}");
    }
    Ok(Posted { status, body })
}
