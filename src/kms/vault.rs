//! HashiCorp Vault / OpenBao Transit as a KMS provider.
//!
//! Wraps and unwraps through the batch `encrypt`/`decrypt` endpoints with the DEK binding as
//! `associated_data` (AES-GCM keys), so one HTTP call serves a whole re-wrap batch. Transit's
//! native `rewrap` does not take associated data, so re-wraps use the trait's default
//! (decrypt + encrypt inside byokd). A 404 means the key is gone, a 403 that byokd's token may
//! no longer use it: definitive answers. Timeouts, connection failures and 5xx say nothing
//! about the key and are [`KmsError::Unreachable`].
//!
//! Transit's `encrypt` creates a missing key when the token may; registration therefore
//! describes the key first, and byokd's token should not hold `create` on the transit mount.

use super::{Dek, DekContext, KeyInfo, KmsError, KmsProvider, Wrapped, WrappedRef};
use crate::domain::{KeyState, Provider};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;
use zeroize::Zeroizing;

/// `[kms.vault]` settings.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultSettings {
    /// Server address, e.g. `https://vault.example:8200`.
    pub address: String,
    /// Token with encrypt/decrypt/read on the transit keys.
    pub token: SecretString,
    /// Transit mount path.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_mount() -> String {
    "transit".to_owned()
}

fn default_timeout() -> u64 {
    10
}

impl std::fmt::Debug for VaultSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultSettings")
            .field("address", &self.address)
            .field("token", &"[REDACTED]")
            .field("mount", &self.mount)
            .field("timeout_secs", &self.timeout_secs)
            .finish()
    }
}

/// A Transit mount.
#[derive(Clone)]
pub struct VaultKms {
    client: reqwest::Client,
    base: String,
    token: SecretString,
}

impl std::fmt::Debug for VaultKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultKms")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn unreachable(detail: impl std::fmt::Display) -> KmsError {
    KmsError::Unreachable {
        provider: Provider::Vault,
        detail: detail.to_string(),
    }
}

#[derive(Deserialize)]
struct BatchResult {
    #[serde(default)]
    ciphertext: Option<String>,
    #[serde(default)]
    plaintext: Option<String>,
    #[serde(default)]
    key_version: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

impl VaultKms {
    /// A client for `settings`.
    ///
    /// # Errors
    ///
    /// The HTTP client cannot be built (TLS setup).
    pub fn new(settings: &VaultSettings) -> Result<VaultKms, reqwest::Error> {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(VaultKms {
            client,
            base: format!(
                "{}/v1/{}",
                settings.address.trim_end_matches('/'),
                settings.mount.trim_matches('/')
            ),
            token: settings.token.clone(),
        })
    }

    /// Sends a request and classifies the outcome; `Ok` carries the status and JSON body of
    /// any 2xx or 400 (batch results come back with 400 when an item fails).
    async fn call(
        &self,
        key_ref: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, Value), KmsError> {
        let response = request
            .header("X-Vault-Token", self.token.expose_secret())
            .send()
            .await
            .map_err(|e| unreachable(format!("request failed: {}", without_url(&e))))?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let errors = body["errors"].to_string();
        match status {
            s if s.is_success()
                || s == StatusCode::BAD_REQUEST && body["data"]["batch_results"].is_array() =>
            {
                Ok((s, body))
            }
            StatusCode::NOT_FOUND => Err(KmsError::NotFound {
                provider: Provider::Vault,
                key_ref: key_ref.to_owned(),
            }),
            StatusCode::FORBIDDEN => Err(KmsError::AccessDenied {
                provider: Provider::Vault,
                key_ref: key_ref.to_owned(),
                detail: errors,
            }),
            s => Err(unreachable(format!("HTTP {s}: {errors}"))),
        }
    }

    fn results(body: &Value, expected: usize) -> Result<Vec<BatchResult>, KmsError> {
        let results: Vec<BatchResult> =
            serde_json::from_value(body["data"]["batch_results"].clone())
                .map_err(|e| unreachable(format!("unexpected response: {e}")))?;
        if results.len() != expected {
            return Err(unreachable(format!(
                "expected {expected} batch results, got {}",
                results.len()
            )));
        }
        Ok(results)
    }
}

/// A reqwest error's text without the URL (which may carry nothing secret, but is noise).
fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        e.to_string()
    }
}

impl KmsProvider for VaultKms {
    async fn describe(&self, key_ref: &str) -> Result<KeyInfo, KmsError> {
        let (_, body) = self
            .call(
                key_ref,
                self.client.get(format!("{}/keys/{key_ref}", self.base)),
            )
            .await?;
        let data = &body["data"];
        let latest = data["latest_version"]
            .as_u64()
            .ok_or_else(|| unreachable("response has no latest_version"))?;
        // OpenBao can soft-delete a key: it refuses every operation until restored.
        let state = if data["soft_deleted"].as_bool() == Some(true) {
            KeyState::Disabled
        } else {
            KeyState::Enabled
        };
        Ok(KeyInfo {
            state,
            current_version: latest.to_string(),
            expires_at: None,
        })
    }

    async fn wrap_many(
        &self,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError> {
        let batch: Vec<Value> = items
            .iter()
            .map(|(dek, ctx)| {
                let plaintext = Zeroizing::new(B64.encode(dek.expose()));
                json!({ "plaintext": plaintext.as_str(), "associated_data": B64.encode(ctx.aad()) })
            })
            .collect();
        let mut body = json!({ "batch_input": batch });
        if let Some(v) = version {
            body["key_version"] = v
                .parse::<u64>()
                .map_err(|_| KmsError::NoSuchVersion {
                    provider: Provider::Vault,
                    key_ref: key_ref.to_owned(),
                    version: v.to_owned(),
                })?
                .into();
        }
        let request = self
            .client
            .post(format!("{}/encrypt/{key_ref}", self.base))
            .json(&body);
        let (_, response) = self.call(key_ref, request).await?;
        // Best effort: the request body held plaintext DEKs.
        drop(body);
        Self::results(&response, items.len())?
            .into_iter()
            .map(|r| match (r.ciphertext, r.key_version, r.error) {
                (Some(ct), Some(v), None) => Ok(Wrapped {
                    version: v.to_string(),
                    ciphertext: ct.into_bytes(),
                }),
                (_, _, error) => Err(unreachable(format!(
                    "encrypt failed: {}",
                    error.unwrap_or_default()
                ))),
            })
            .collect()
    }

    async fn unwrap_many(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError> {
        let batch: Vec<Value> = items
            .iter()
            .map(|i| {
                json!({
                    "ciphertext": String::from_utf8_lossy(i.ciphertext),
                    "associated_data": B64.encode(i.ctx.aad()),
                })
            })
            .collect();
        let request = self
            .client
            .post(format!("{}/decrypt/{key_ref}", self.base))
            .json(&json!({ "batch_input": batch }));
        let (_, response) = self.call(key_ref, request).await?;
        Ok(Self::results(&response, items.len())?
            .into_iter()
            .map(|r| match (r.plaintext, r.error) {
                (Some(p), None) => {
                    let raw = Zeroizing::new(B64.decode(p).map_err(|_| KmsError::Integrity)?);
                    Dek::from_bytes(&raw).ok_or(KmsError::Integrity)
                }
                _ => Err(KmsError::Integrity),
            })
            .collect())
    }
}
