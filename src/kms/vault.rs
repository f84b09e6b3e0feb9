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
//!
//! Plaintext DEKs cross this module base64-encoded in JSON: in the `encrypt` request body and
//! in the `decrypt` response body. Every buffer this module holds them in is zeroized when it
//! is dropped: the request body is serialized into a [`Zeroizing`] buffer that grows without
//! leaving copies behind ([`json_body`]), the response body is copied into one, its items are
//! read into typed results whose `plaintext` is a `Zeroizing<String>` (no `serde_json::Value`
//! ever holds a plaintext), and the base64 is decoded into a zeroizing array. The bytes
//! handed to reqwest and received from it are zeroed too when this module holds the last
//! reference once the call is done ([`scrub`]; with reqwest 0.13 and hyper 1 it does, for
//! requests and responses alike). Out of reach, and so not zeroized: what hyper and rustls
//! copy on the way (write and read buffers, TLS records), copies `http-body-util` makes to
//! join a body received in several frames, serde_json's scratch buffer for strings with
//! escapes (Transit's base64 has none), and the kernel's socket buffers.

use super::{
    Dek, DekContext, KeyInfo, KmsError, KmsProvider, Wrapped, WrappedRef, canonical_key_ref,
};
use crate::domain::{KeyState, Provider};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use secrecy::{ExposeSecret, SecretString};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::time::Duration;
use url::Url;
use zeroize::{Zeroize, Zeroizing};

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

/// A batch request: `{"batch_input": [...]}`.
#[derive(Serialize)]
struct BatchInput<T> {
    batch_input: Vec<T>,
}

/// One item of an `encrypt` batch; `plaintext` borrows a zeroizing buffer.
#[derive(Serialize)]
struct EncryptItem<'a> {
    plaintext: &'a str,
    associated_data: String,
    /// Transit's batch encrypt ignores a top-level `key_version`: it must be on each item.
    #[serde(skip_serializing_if = "Option::is_none")]
    key_version: Option<u64>,
}

/// One item of a `decrypt` batch.
#[derive(Serialize)]
struct DecryptItem<'a> {
    ciphertext: std::borrow::Cow<'a, str>,
    associated_data: String,
}

/// A batch answer: `{"data": {"batch_results": [...]}}`.
#[derive(Deserialize)]
struct BatchOutput<T> {
    data: BatchResults<T>,
}

#[derive(Deserialize)]
struct BatchResults<T> {
    batch_results: Vec<T>,
}

#[derive(Deserialize)]
struct EncryptResult {
    ciphertext: Option<String>,
    key_version: Option<u64>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct DecryptResult {
    #[serde(default, deserialize_with = "zeroizing_string")]
    plaintext: Option<Zeroizing<String>>,
    error: Option<String>,
}

/// Reads a string straight into a zeroizing buffer (serde_json allocates it at its size, so
/// nothing is reallocated and left behind).
fn zeroizing_string<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Zeroizing<String>>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.map(Zeroizing::new))
}

/// Serializes a request body into a zeroizing buffer. Growing copies into a new zeroizing
/// buffer, so a reallocation never leaves a copy of the plaintext in freed memory.
pub(super) fn json_body(value: &impl Serialize) -> Zeroizing<Vec<u8>> {
    struct Writer(Zeroizing<Vec<u8>>);
    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let needed = self.0.len() + buf.len();
            if needed > self.0.capacity() {
                let mut bigger =
                    Zeroizing::new(Vec::with_capacity(needed.max(self.0.capacity() * 2)));
                bigger.extend_from_slice(&self.0);
                // The old buffer is zeroized as it drops.
                self.0 = bigger;
            }
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut writer = Writer(Zeroizing::new(Vec::with_capacity(4096)));
    serde_json::to_writer(&mut writer, value)
        .expect("serializing strings and numbers into memory cannot fail");
    writer.0
}

/// Zeroes bytes shared with reqwest when this is the last reference to them (reqwest and
/// hyper let go of a request body once it is sent); otherwise there is nothing it may touch.
pub(super) fn scrub(bytes: Bytes) {
    if let Ok(mut owned) = bytes.try_into_mut() {
        owned[..].zeroize();
    }
}

/// A DEK from Transit's base64 plaintext, decoded into a zeroizing array.
pub(super) fn dek_from_base64(plaintext: &str) -> Result<Dek, KmsError> {
    let mut raw = Zeroizing::new([0u8; 48]);
    let len = B64
        .decode_slice(plaintext, raw.as_mut())
        .map_err(|_| KmsError::Integrity)?;
    raw.get(..len)
        .and_then(Dek::from_bytes)
        .ok_or(KmsError::Integrity)
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

    /// Sends a request (with `body` as its JSON body) and classifies the answer (see the
    /// module docs); `Ok` carries the body of a 2xx, or of a 400 with batch results (a batch
    /// with a failed item), in a zeroizing buffer.
    async fn call(
        &self,
        key: &str,
        request: reqwest::RequestBuilder,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let mut request = request.header("X-Vault-Token", self.token.expose_secret());
        // reqwest takes the body as shared bytes: keeping a handle lets `scrub` zero them once
        // the request is done.
        let sent = body.map(|b| Bytes::copy_from_slice(&b));
        if let Some(bytes) = &sent {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(bytes.clone());
        }
        let response = request.send().await;
        if let Some(bytes) = sent {
            scrub(bytes);
        }
        let response =
            response.map_err(|e| unreachable(format!("request failed: {}", without_url(&e))))?;
        let status = response.status();
        let raw = response.bytes().await.map_err(|e| {
            unreachable(format!("reading the response failed: {}", without_url(&e)))
        })?;
        let body = Zeroizing::new(raw.to_vec());
        scrub(raw);
        classify(key, status, &body)?;
        Ok(body)
    }

    /// The batch results of an answer, exactly `expected` of them. An answer that is not
    /// Transit's is reported by position only: serde's messages can quote values.
    fn results<T: DeserializeOwned>(body: &[u8], expected: usize) -> Result<Vec<T>, KmsError> {
        let results = serde_json::from_slice::<BatchOutput<T>>(body)
            .map_err(|e| {
                unreachable(format!(
                    "unexpected response ({:?} error at line {}, column {})",
                    e.classify(),
                    e.line(),
                    e.column()
                ))
            })?
            .data
            .batch_results;
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

/// Whether a body holds batch results, read without keeping any of their values.
fn has_batch_results(body: &[u8]) -> bool {
    serde_json::from_slice::<BatchOutput<IgnoredAny>>(body).is_ok()
}

/// What an HTTP answer says about `key`. Only Vault's own error body makes a 404, 403 or 400
/// definitive; see the module docs.
fn classify(key: &str, status: StatusCode, body: &[u8]) -> Result<(), KmsError> {
    if status.is_success() || status == StatusCode::BAD_REQUEST && has_batch_results(body) {
        return Ok(());
    }
    // An error answer carries no plaintext: reading it as a `Value` is safe.
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
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
            .call(&key, self.client.get(self.url("keys", &key)?), None)
            .await?;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
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
        let pinned = version
            .map(|v| {
                v.parse::<u64>().map_err(|_| KmsError::NoSuchVersion {
                    provider: Provider::Vault,
                    key_ref: key.clone(),
                    version: v.to_owned(),
                })
            })
            .transpose()?;
        let plaintexts: Vec<Zeroizing<String>> = items
            .iter()
            .map(|(dek, _)| Zeroizing::new(B64.encode(dek.expose())))
            .collect();
        let body = json_body(&BatchInput {
            batch_input: items
                .iter()
                .zip(&plaintexts)
                .map(|((_, ctx), plaintext)| EncryptItem {
                    plaintext: plaintext.as_str(),
                    associated_data: B64.encode(ctx.aad()),
                    key_version: pinned,
                })
                .collect(),
        });
        let response = self.call(&key, self.client.post(url), Some(body)).await?;
        Self::results::<EncryptResult>(&response, items.len())?
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
        let body = json_body(&BatchInput {
            batch_input: items
                .iter()
                .map(|i| DecryptItem {
                    ciphertext: String::from_utf8_lossy(i.ciphertext),
                    associated_data: B64.encode(i.ctx.aad()),
                })
                .collect(),
        });
        let response = self.call(&key, self.client.post(url), Some(body)).await?;
        Ok(Self::results::<DecryptResult>(&response, items.len())?
            .into_iter()
            .map(|r| match (r.plaintext, r.error) {
                (Some(plaintext), None) => dek_from_base64(&plaintext),
                _ => Err(KmsError::Integrity),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    fn outcome(status: u16, body: Value) -> Result<(), KmsError> {
        let body = serde_json::to_vec(&body).expect("json");
        classify("k", StatusCode::from_u16(status).expect("status"), &body)
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
        assert!(outcome(400, json!({ "data": { "batch_results": {} } })).is_err());
    }

    #[test]
    fn decrypt_results_decode_into_deks_and_refuse_other_lengths() {
        let dek = Dek::generate();
        let body = json!({ "data": { "batch_results": [
            { "plaintext": B64.encode(dek.expose()) },
            { "plaintext": B64.encode([7u8; 31]) },
            { "plaintext": B64.encode([7u8; 64]) },
            { "plaintext": "not base64!" },
            { "error": "cipher: message authentication failed" },
        ] } });
        let body = serde_json::to_vec(&body).expect("json");
        let results = VaultKms::results::<DecryptResult>(&body, 5).expect("results");
        let deks: Vec<Result<Dek, KmsError>> = results
            .into_iter()
            .map(|r| match (r.plaintext, r.error) {
                (Some(p), None) => dek_from_base64(&p),
                _ => Err(KmsError::Integrity),
            })
            .collect();
        assert_eq!(deks[0].as_ref().expect("the DEK").kcv(), dek.kcv());
        for bad in &deks[1..] {
            assert!(matches!(bad, Err(KmsError::Integrity)));
        }
        assert!(matches!(
            VaultKms::results::<DecryptResult>(&body, 4),
            Err(KmsError::Unreachable { .. })
        ));
        // A malformed answer is reported by position, never by quoting its content (serde's
        // own message would quote this string).
        let secret = B64.encode(dek.expose());
        let odd = serde_json::to_vec(&json!({ "data": { "batch_results": [
            { "ciphertext": "vault:v1:x", "key_version": secret }
        ] } }))
        .expect("json");
        match VaultKms::results::<EncryptResult>(&odd, 1) {
            Err(e) => assert!(!e.to_string().contains(&secret), "{e}"),
            Ok(_) => panic!("a string is not a key version"),
        }
    }

    #[test]
    fn request_bodies_grow_without_losing_content() {
        let items: Vec<String> = (0..500).map(|i| format!("item-{i:04}")).collect();
        let body = json_body(&BatchInput {
            batch_input: items.iter().map(String::as_str).collect(),
        });
        let parsed: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(parsed["batch_input"].as_array().map(Vec::len), Some(500));
        assert_eq!(parsed["batch_input"][499], "item-0499");
        assert!(body.len() > 4096, "the buffer had to grow");
    }
}
