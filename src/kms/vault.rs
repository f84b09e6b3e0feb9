//! HashiCorp Vault / OpenBao Transit as a KMS provider.
//!
//! Wraps and unwraps through the batch `encrypt`/`decrypt` endpoints with the DEK binding as
//! `associated_data` (AES-GCM keys), so one HTTP call serves a whole re-wrap batch. Transit's
//! native `rewrap` does not take associated data, so re-wraps use the trait's default
//! (decrypt + encrypt inside byokd).
//!
//! Every key reference is checked by [`canonical_key_ref`] before any request and then
//! percent-encoded as one path segment, so a reference can only ever name a key in the
//! configured mount: `x/../acme-kek` must not bind another tenant's `acme-kek`, and
//! `../../sys/mounts` must not point byokd's token at the rest of Vault. (Encoding alone would
//! not do: OpenBao decodes `%2F` before routing.)
//!
//! [`VaultKms::call`] is the one place that decides what an answer means, because callers act on
//! it: a `NotFound` makes the probe record the key as destroyed and an `AccessDenied` as
//! revoked, while an `Unreachable` only raises an alert and leaves the tenant's access alone.
//! So an answer is definitive only when it is Vault's own: a JSON body with an `errors` array.
//! - 404 with that body: the key does not exist (`GET keys/<missing>` answers `{"errors":[]}`),
//!   except `no handler for route`, which says the mount is missing (a configuration fault
//!   that must not destroy every key behind it).
//! - 400 `encryption key not found`: Transit's answer to `decrypt` on a missing key.
//! - 403 with that body: byokd's token may not do this to the key.
//! - Anything else, including a 404 or 403 from a proxy or load balancer (an HTML page, an
//!   empty body), 5xx, timeouts, connection and TLS failures, says nothing about the key and is
//!   [`KmsError::Unreachable`].
//!
//! Transit's `encrypt` creates a missing key when the token may; registration therefore
//! describes the key first, and byokd's token should not hold `create` on the transit mount
//! (without it, `encrypt` on a missing key is a 403).

use super::{
    Dek, DekContext, KeyInfo, KmsError, KmsProvider, Wrapped, WrappedRef, canonical_key_ref,
};
use crate::domain::{KeyState, Provider};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;
use url::Url;
use zeroize::Zeroizing;

use crate::config::VaultSettings;

/// Why a [`VaultKms`] cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum VaultSetupError {
    /// `address` is not an http(s) URL.
    #[error("the Vault address {address:?} is not an http(s) URL: {reason}")]
    Address {
        /// The configured address.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client cannot be built (TLS setup).
    #[error(transparent)]
    Client(#[from] reqwest::Error),
}

/// A Transit mount.
#[derive(Clone)]
pub struct VaultKms {
    client: reqwest::Client,
    /// `<address>/v1/<mount>`; key URLs add `<operation>/<key>` as encoded path segments.
    base: Url,
    token: SecretString,
}

impl std::fmt::Debug for VaultKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultKms")
            .field("base", &self.base.as_str())
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
    /// The address is not an http(s) URL, or the HTTP client cannot be built (TLS setup).
    pub fn new(settings: &VaultSettings) -> Result<VaultKms, VaultSetupError> {
        crate::install_crypto_provider();
        let bad_address = |reason: String| VaultSetupError::Address {
            address: settings.address.clone(),
            reason,
        };
        let mut base = Url::parse(&settings.address).map_err(|e| bad_address(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad_address(format!("the scheme is {:?}", base.scheme())));
        }
        base.path_segments_mut()
            .map_err(|()| bad_address("it cannot hold a path".to_owned()))?
            .pop_if_empty()
            .push("v1")
            .extend(settings.mount.split('/').filter(|s| !s.is_empty()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(VaultKms {
            client,
            base,
            token: settings.token.clone(),
        })
    }

    /// `<base>/<operation>/<key>` for a key reference already checked by
    /// [`canonical_key_ref`]. The key is still pushed as one encoded segment (`/` becomes `%2F`)
    /// in case a caller ever skips the check; `push` drops `.` and `..` silently, which the
    /// check refuses.
    fn url(&self, operation: &str, key: &str) -> Result<Url, KmsError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| unreachable("the Vault address cannot hold a path"))?
            .push(operation)
            .push(key);
        Ok(url)
    }

    /// Sends a request and classifies the answer (see the module docs); `Ok` carries the JSON
    /// body of a 2xx, or of a 400 with batch results (a batch with a failed item).
    async fn call(&self, key: &str, request: reqwest::RequestBuilder) -> Result<Value, KmsError> {
        let response = request
            .header("X-Vault-Token", self.token.expose_secret())
            .send()
            .await
            .map_err(|e| unreachable(format!("request failed: {}", without_url(&e))))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            unreachable(format!("reading the response failed: {}", without_url(&e)))
        })?;
        classify(
            key,
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
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

/// The messages of Vault's own error body, `{"errors": ["...", ...]}`; `None` for any other
/// body (a proxy's HTML page, an empty body, some other JSON).
fn vault_errors(body: &Value) -> Option<Vec<String>> {
    body.as_object()?
        .get("errors")?
        .as_array()?
        .iter()
        // Vault wraps messages as "1 error occurred:\n\t* permission denied\n\n".
        .map(|e| Some(e.as_str()?.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect()
}

/// What an HTTP answer says about `key`. Only Vault's own error body makes a 404, 403 or 400
/// definitive; see the module docs.
fn classify(key: &str, status: StatusCode, body: Value) -> Result<Value, KmsError> {
    if status.is_success()
        || status == StatusCode::BAD_REQUEST && body["data"]["batch_results"].is_array()
    {
        return Ok(body);
    }
    let Some(errors) = vault_errors(&body) else {
        return Err(unreachable(format!(
            "HTTP {status} without Vault's error body (a proxy or another server answered)"
        )));
    };
    let says = |text: &str| errors.iter().any(|e| e.contains(text));
    let not_found = || KmsError::NotFound {
        provider: Provider::Vault,
        key_ref: key.to_owned(),
    };
    match status {
        StatusCode::NOT_FOUND if says("no handler for route") => Err(unreachable(format!(
            "HTTP {status}: the transit mount does not exist ({})",
            errors.join("; ")
        ))),
        StatusCode::NOT_FOUND => Err(not_found()),
        StatusCode::BAD_REQUEST if says("encryption key not found") => Err(not_found()),
        StatusCode::FORBIDDEN => Err(KmsError::AccessDenied {
            provider: Provider::Vault,
            key_ref: key.to_owned(),
            detail: errors.join("; "),
        }),
        s => Err(unreachable(format!("HTTP {s}: {}", errors.join("; ")))),
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
        let key = canonical_key_ref(Provider::Vault, key_ref)?;
        let body = self
            .call(&key, self.client.get(self.url("keys", &key)?))
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
        let key = canonical_key_ref(Provider::Vault, key_ref)?;
        let url = self.url("encrypt", &key)?;
        // Transit's batch encrypt ignores a top-level `key_version`: it must be on each item.
        let pinned = version
            .map(|v| {
                v.parse::<u64>().map_err(|_| KmsError::NoSuchVersion {
                    provider: Provider::Vault,
                    key_ref: key.clone(),
                    version: v.to_owned(),
                })
            })
            .transpose()?;
        let batch: Vec<Value> = items
            .iter()
            .map(|(dek, ctx)| {
                let plaintext = Zeroizing::new(B64.encode(dek.expose()));
                let mut item = json!({ "plaintext": plaintext.as_str(),
                                       "associated_data": B64.encode(ctx.aad()) });
                if let Some(v) = pinned {
                    item["key_version"] = v.into();
                }
                item
            })
            .collect();
        let body = json!({ "batch_input": batch });
        let request = self.client.post(url).json(&body);
        let response = self.call(&key, request).await?;
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
        let key = canonical_key_ref(Provider::Vault, key_ref)?;
        let url = self.url("decrypt", &key)?;
        let batch: Vec<Value> = items
            .iter()
            .map(|i| {
                json!({
                    "ciphertext": String::from_utf8_lossy(i.ciphertext),
                    "associated_data": B64.encode(i.ctx.aad()),
                })
            })
            .collect();
        let request = self.client.post(url).json(&json!({ "batch_input": batch }));
        let response = self.call(&key, request).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kms(address: &str, mount: &str) -> VaultKms {
        let settings: VaultSettings = serde_json::from_value(json!({
            "address": address,
            "token": "t",
            "mount": mount,
        }))
        .expect("settings");
        VaultKms::new(&settings).expect("client")
    }

    #[test]
    fn urls_keep_the_key_in_one_segment() {
        let vault = kms("http://vault.example:8200/", "/tenants/transit/");
        let url = |op: &str, key: &str| vault.url(op, key).expect("url").to_string();
        assert_eq!(
            url("keys", "acme-kek"),
            "http://vault.example:8200/v1/tenants/transit/keys/acme-kek"
        );
        // Defense in depth below canonical_key_ref: even an unchecked reference stays one
        // segment of the configured mount.
        assert_eq!(
            url("keys", "x/../acme-kek"),
            "http://vault.example:8200/v1/tenants/transit/keys/x%2F..%2Facme-kek"
        );
        assert_eq!(
            url("encrypt", "a b?c#d%"),
            "http://vault.example:8200/v1/tenants/transit/encrypt/a%20b%3Fc%23d%25"
        );
        assert_eq!(
            kms("https://h/vault", "transit")
                .url("decrypt", "k")
                .expect("url")
                .as_str(),
            "https://h/vault/v1/transit/decrypt/k"
        );
    }

    #[test]
    fn addresses_must_be_http_urls() {
        for bad in ["vault.example:8200", "ftp://h", "", "mailto:ops@h"] {
            let settings: VaultSettings =
                serde_json::from_value(json!({ "address": bad, "token": "t" })).expect("settings");
            assert!(
                matches!(
                    VaultKms::new(&settings),
                    Err(VaultSetupError::Address { .. })
                ),
                "{bad:?}"
            );
        }
    }

    fn outcome(status: u16, body: Value) -> Result<Value, KmsError> {
        classify("k", StatusCode::from_u16(status).expect("status"), body)
    }

    #[test]
    fn only_vaults_own_error_body_is_definitive() {
        // Bodies as OpenBao 2.x returns them.
        assert!(matches!(
            outcome(404, json!({ "errors": [] })),
            Err(KmsError::NotFound { key_ref, .. }) if key_ref == "k"
        ));
        assert!(matches!(
            outcome(
                404,
                json!({ "errors": ["1 error occurred:\n\t* unsupported path\n\n"] })
            ),
            Err(KmsError::NotFound { .. })
        ));
        assert!(matches!(
            outcome(400, json!({ "errors": ["encryption key not found"] })),
            Err(KmsError::NotFound { .. })
        ));
        match outcome(
            403,
            json!({ "errors": ["1 error occurred:\n\t* permission denied\n\n"] }),
        ) {
            Err(KmsError::AccessDenied { detail, .. }) => {
                assert_eq!(detail, "1 error occurred: * permission denied");
            }
            other => panic!("{other:?}"),
        }
        // Indeterminate: not Vault's body, a missing mount, server errors.
        for (status, body) in [
            (404, Value::Null),
            (404, json!({ "message": "Not Found" })),
            (404, json!({ "errors": "not a list" })),
            (404, json!({ "errors": [404] })),
            (
                404,
                json!({ "errors": ["no handler for route \"transit/keys/k\". route entry not found."] }),
            ),
            (403, Value::Null),
            (403, json!(["errors"])),
            (400, json!({ "errors": ["missing client token"] })),
            (500, json!({ "errors": ["internal error"] })),
            (503, json!({ "errors": ["Vault is sealed"] })),
            (307, Value::Null),
        ] {
            match outcome(status, body.clone()) {
                Err(e @ KmsError::Unreachable { .. }) => assert!(e.is_transient()),
                other => panic!("{status} {body}: {other:?}"),
            }
        }
        assert!(outcome(200, json!({ "data": {} })).is_ok());
        assert!(outcome(400, json!({ "data": { "batch_results": [] } })).is_ok());
    }
}
