//! Azure Key Vault and Managed HSM as a KMS provider, over Key Vault's REST API (api-version
//! 7.5, pinned) with reqwest, authenticated with Microsoft Entra ID.
//!
//! Why not the Azure SDK crates: `azure_security_keyvault_keys` and `azure_identity` bring their
//! own HTTP stack and release cadence (pre-1.0, a new `typespec` core each month), and
//! pointing them at a loopback peer over plain HTTP is not supported; Key Vault's REST
//! surface byokd needs is four calls, documented and stable per api-version.
//!
//! Keys are named by their versionless key identifier, `https://<vault>.vault.azure.net/keys/
//! <name>` (or `<hsm>.managedhsm.azure.net`, or a sovereign cloud's suffix): a rotation is a
//! new version of the same key, and [`canonical`] drops a version given at registration and
//! lower-cases the name (Key Vault names are case-insensitive), so two spellings cannot bind
//! one key twice. Only Key Vault's own DNS suffixes are accepted ([`VAULT_SUFFIXES`]): a key
//! reference chooses where byokd sends its Entra ID token, so it must never name another host.
//! `endpoint_url` (a private endpoint's address, or a test peer) replaces the scheme, host
//! and port of every request; the key reference still names the vault.
//!
//! Wrapping: RSA keys (`RSA`, `RSA-HSM`) with `RSA-OAEP-256`; Managed HSM AES keys (`oct-HSM`)
//! with `A256KW`. Neither takes additional authenticated data, so byokd binds each wrapped DEK
//! to its tenant and DEK id itself: the stored ciphertext is `0x01 || tag || wrapped`, where
//! `tag = HMAC-SHA256(dek, "byokd/azure/binding/v1" || aad || wrapped)`. Unwrap recomputes the
//! tag from the DEK Key Vault returned and refuses a mismatch ([`KmsError::Integrity`]), so a
//! wrapped DEK copied to another row or tenant fails like an AAD mismatch would.
//!
//! Versions: new wraps use the key's current version (the `kid` of `GET /keys/<name>`, cached
//! for a minute); unwraps use the version the DEK was wrapped under, so an old version keeps
//! unwrapping its DEKs until they are re-wrapped. Re-wrap is the trait's default (unwrap, then
//! wrap under the new version): Key Vault has no re-wrap. State: a disabled current version,
//! or one not yet valid (`nbf` in the future), is `disabled`; a key deleted but recoverable
//! (found under `deletedkeys`) is `pending_deletion`; a key found in neither is `destroyed`.
//! Expiry is the current version's `exp`; Key Vault still unwraps with an expired key, so
//! expiry blocks new DEKs only.
//!
//! [`classify`] is the one place that decides what an answer means. Definitive, because Key
//! Vault itself says so in its own error body (`{"error": {"code", "message", "innererror"}}`):
//! 404 `KeyNotFound`, 403 `Forbidden` (`innererror.code` `KeyDisabled` is the disabled key;
//! `AccessDenied`, `ForbiddenByPolicy`, `ForbiddenByRbac` and the rest are byokd's access
//! revoked), and 400 on unwrap for one ciphertext. Indeterminate, never revoking: 401 (byokd's
//! token), 429 (retried after `Retry-After`, then an outage), 5xx, a 403/404 without Key
//! Vault's body (a proxy's), timeouts, connection and TLS failures, and every failure to get
//! an Entra ID token (byokd's credentials are byokd's problem, not the tenant's decision).
//!
//! Entra ID: client credentials with a client secret or a certificate (an RS256 client
//! assertion with the certificate's `x5t`, signed with its key, loaded at start), or the
//! managed identity through the instance metadata service; the authority and IMDS endpoints
//! are settings (sovereign clouds; the test peer). One token per audience (vault or Managed
//! HSM), cached until five minutes before it expires.
//!
//! Rate limits: one token bucket per vault host, `requests_per_10s` (Key Vault's documented
//! limit per vault and region for RSA 2048 HSM keys is 2,000 transactions per 10 s; software
//! keys 4,000; larger RSA keys less), and after a 429 the vault's bucket waits out the
//! `Retry-After` for every request to that vault.
//!
//! Plaintext DEKs: the base64url of a DEK in a wrap request and in an unwrap answer is held in
//! zeroizing buffers here; what reqwest, hyper and rustls copy on the way is out of reach.

use super::{
    Dek, DekContext, KeyInfo, KmsError, KmsProvider, Wrapped, WrappedRef, canonical_key_ref,
};
use crate::config::{AzureAuth, AzureSettings};
use crate::domain::{KeyState, Provider};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use url::Url;
use zeroize::{Zeroize, Zeroizing};

/// The Key Vault REST api-version every request names.
pub const API_VERSION: &str = "7.5";

/// DNS suffixes of Key Vault vaults and Managed HSMs, public and sovereign clouds (Azure
/// China, Azure Government). A key reference's host is `<name>.<suffix>`.
pub const VAULT_SUFFIXES: &[&str] = &[
    "vault.azure.net",
    "vault.azure.cn",
    "vault.usgovcloudapi.net",
    "managedhsm.azure.net",
    "managedhsm.azure.cn",
    "managedhsm.usgovcloudapi.net",
];

/// The stored ciphertext's format byte (tag and wrapped key follow).
const FORMAT_V1: u8 = 1;
const TAG_LEN: usize = 32;
const BINDING_LABEL: &[u8] = b"byokd/azure/binding/v1";
/// A token is renewed this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

/// Why an Azure key reference is refused, or its canonical form.
pub(super) fn canonical(key_ref: &str) -> Result<String, String> {
    let url = Url::parse(key_ref).map_err(|e| format!("it is not a URL ({e})"))?;
    if url.scheme() != "https" {
        return Err("a Key Vault key identifier is an https:// URL".to_owned());
    }
    if !url.username().is_empty()
        || url.password().is_some()
        || url.port().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err("a Key Vault key identifier has no user, port, query or fragment".to_owned());
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let Some((vault, suffix)) = host.split_once('.') else {
        return Err(format!("{host:?} is not a Key Vault host"));
    };
    if !VAULT_SUFFIXES.contains(&suffix) {
        return Err(format!(
            "{host:?} is not a Key Vault or Managed HSM host (<name>.{})",
            VAULT_SUFFIXES.join(" | <name>.")
        ));
    }
    let vault_ok = (3..=24).contains(&vault.len())
        && vault.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !vault_ok {
        return Err(format!(
            "{vault:?} is not a vault name (3-24 letters, digits, '-')"
        ));
    }
    let segments: Vec<&str> = url
        .path_segments()
        .map(Iterator::collect)
        .unwrap_or_default();
    let name = match segments.as_slice() {
        ["keys", name] | ["keys", name, _] => *name,
        _ => {
            return Err("expected https://<vault>.<suffix>/keys/<name>[/<version>]".to_owned());
        }
    };
    if let [_, _, version] = segments.as_slice()
        && !version.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err(format!("{version:?} is not a key version"));
    }
    let name_ok = (1..=127).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !name_ok {
        return Err(format!(
            "{name:?} is not a key name (1-127 letters, digits, '-')"
        ));
    }
    Ok(format!("https://{host}/keys/{}", name.to_ascii_lowercase()))
}

/// A key reference taken apart: where to send requests for it.
#[derive(Debug, Clone)]
struct Target {
    /// The canonical key reference.
    key: String,
    /// The vault host (rate-limit bucket).
    host: String,
    /// The key's name.
    name: String,
    /// The Entra ID scope of the vault's kind.
    managed_hsm: bool,
}

impl Target {
    fn scope(&self) -> Audience {
        if self.managed_hsm {
            Audience::ManagedHsm
        } else {
            Audience::Vault
        }
    }
}

/// Which resource a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Audience {
    Vault,
    ManagedHsm,
}

impl Audience {
    fn resource(self) -> &'static str {
        match self {
            Audience::Vault => "https://vault.azure.net",
            Audience::ManagedHsm => "https://managedhsm.azure.net",
        }
    }
}

struct Token {
    value: SecretString,
    renew_at: Instant,
}

/// Azure Key Vault through its REST API; cheap to clone.
#[derive(Clone)]
pub struct AzureKms {
    inner: Arc<Inner>,
}

struct Inner {
    settings: AzureSettings,
    /// The certificate credential, loaded at start.
    certificate: Option<ClientCertificate>,
    client: reqwest::Client,
    /// One token per audience; the lock is held while a token is fetched, so a burst of
    /// requests asks Entra ID once.
    tokens: tokio::sync::Mutex<HashMap<Audience, Token>>,
    /// The current version per key, so a wrap need not read the key first.
    versions: moka::sync::Cache<String, String>,
    limits: DefaultKeyedRateLimiter<String>,
    /// Per vault host: no request before this instant (a 429's `Retry-After`).
    backoff: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for AzureKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureKms")
            .field("endpoint_url", &self.inner.settings.endpoint_url)
            .field("auth", &self.inner.settings.auth().kind())
            .finish_non_exhaustive()
    }
}

/// Why an [`AzureKms`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum AzureSetupError {
    /// The certificate credential's PEM file cannot be used.
    #[error("kms.azure.client_certificate_path: {0}")]
    Certificate(String),
    /// The HTTP client cannot be built (TLS setup).
    #[error(transparent)]
    Client(#[from] reqwest::Error),
}

fn unreachable(detail: impl std::fmt::Display) -> KmsError {
    KmsError::Unreachable {
        provider: Provider::Azure,
        detail: detail.to_string(),
    }
}

/// A reqwest error's text, shortened where the kind says enough.
fn without_url(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        e.to_string()
    }
}

/// Key Vault's own error body: `{"error": {"code", "message", "innererror": {"code"}}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VaultError {
    code: String,
    message: String,
    inner: Option<String>,
}

fn vault_error(body: &[u8]) -> Option<VaultError> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?.as_object()?;
    let code = error.get("code")?.as_str()?.to_owned();
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    // Seen as `innererror` and `innerError`.
    let inner = error
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("innererror"))
        .and_then(|(_, v)| v.get("code"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Some(VaultError {
        code,
        message,
        inner,
    })
}

/// What an answer says about `key`; see the module docs. `operation` names what was refused.
fn classify(key: &str, operation: &'static str, status: StatusCode, body: &[u8]) -> KmsError {
    let Some(error) = vault_error(body) else {
        return unreachable(format!(
            "HTTP {status} without Key Vault's error body (a proxy or another server answered)"
        ));
    };
    let key_ref = key.to_owned();
    let detail = || match &error.inner {
        Some(inner) => format!("{} ({inner}): {}", error.code, error.message),
        None => format!("{}: {}", error.code, error.message),
    };
    match status {
        StatusCode::NOT_FOUND if error.code == "KeyNotFound" => KmsError::NotFound {
            provider: Provider::Azure,
            key_ref,
        },
        StatusCode::FORBIDDEN if error.inner.as_deref() == Some("KeyDisabled") => {
            KmsError::Unusable {
                provider: Provider::Azure,
                key_ref,
                state: KeyState::Disabled,
                operation,
            }
        }
        StatusCode::FORBIDDEN if error.code == "Forbidden" => KmsError::AccessDenied {
            provider: Provider::Azure,
            key_ref,
            detail: detail(),
        },
        StatusCode::BAD_REQUEST if operation == "unwrap" => KmsError::Integrity,
        s => unreachable(format!("HTTP {s}: {}", detail())),
    }
}

/// `Retry-After` in seconds (Key Vault sends seconds), bounded.
fn retry_after(headers: &reqwest::header::HeaderMap, cap: Duration) -> Duration {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
        .min(cap)
}

/// The binding tag of a wrapped DEK; see the module docs.
fn binding_tag(dek: &Dek, ctx: &DekContext<'_>, wrapped: &[u8]) -> [u8; TAG_LEN] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(dek.expose()).expect("HMAC takes any key length");
    mac.update(BINDING_LABEL);
    mac.update(&ctx.aad());
    mac.update(wrapped);
    mac.finalize().into_bytes().into()
}

/// The stored form of a wrap: format byte, binding tag, Key Vault's wrapped key.
fn seal(dek: &Dek, ctx: &DekContext<'_>, wrapped: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + TAG_LEN + wrapped.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&binding_tag(dek, ctx, wrapped));
    out.extend_from_slice(wrapped);
    out
}

/// Splits a stored ciphertext into its tag and Key Vault's wrapped key.
fn open(ciphertext: &[u8]) -> Result<(&[u8], &[u8]), KmsError> {
    match ciphertext.split_first() {
        Some((&FORMAT_V1, rest)) if rest.len() > TAG_LEN => Ok(rest.split_at(TAG_LEN)),
        _ => Err(KmsError::Integrity),
    }
}

/// Checks a DEK Key Vault unwrapped against its binding.
fn check_binding(
    dek: &Dek,
    ctx: &DekContext<'_>,
    tag: &[u8],
    wrapped: &[u8],
) -> Result<(), KmsError> {
    let expected = binding_tag(dek, ctx, wrapped);
    let diff = expected
        .iter()
        .zip(tag)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff == 0 && tag.len() == TAG_LEN {
        Ok(())
    } else {
        Err(KmsError::Integrity)
    }
}

/// The parts of a key bundle byokd reads.
#[derive(Deserialize)]
struct KeyBundle {
    key: JsonWebKey,
    #[serde(default)]
    attributes: Attributes,
}

#[derive(Deserialize)]
struct JsonWebKey {
    kid: String,
    kty: String,
    #[serde(default)]
    key_ops: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Attributes {
    enabled: Option<bool>,
    nbf: Option<i64>,
    exp: Option<i64>,
    recovery_level: Option<String>,
}

/// The algorithm byokd wraps with for a key type, or why the type does not do.
fn algorithm(kty: &str) -> Result<&'static str, String> {
    match kty {
        "RSA" | "RSA-HSM" => Ok("RSA-OAEP-256"),
        "oct-HSM" => Ok("A256KW"),
        other => Err(format!(
            "its key type is {other}; byokd wraps with RSA (RSA-OAEP-256) or Managed HSM \
             AES (oct-HSM, A256KW) keys"
        )),
    }
}

/// What a key's current version says, read from its bundle.
struct Described {
    info: KeyInfo,
    kty: String,
    key_ops: Vec<String>,
    recovery_level: Option<String>,
}

fn describe_bundle(bundle: &KeyBundle, now: DateTime<Utc>) -> Result<Described, KmsError> {
    let version = bundle
        .key
        .kid
        .rsplit('/')
        .next()
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric()))
        .ok_or_else(|| {
            unreachable(format!(
                "the key's kid {:?} names no version",
                bundle.key.kid
            ))
        })?
        .to_owned();
    let attributes = &bundle.attributes;
    let at = |secs: Option<i64>| secs.and_then(|s| DateTime::from_timestamp(s, 0));
    let not_yet = at(attributes.nbf).is_some_and(|nbf| nbf > now);
    let state = if attributes.enabled == Some(false) || not_yet {
        KeyState::Disabled
    } else {
        KeyState::Enabled
    };
    Ok(Described {
        info: KeyInfo {
            state,
            current_version: version,
            expires_at: at(attributes.exp),
        },
        kty: bundle.key.kty.clone(),
        key_ops: bundle.key.key_ops.clone(),
        recovery_level: attributes.recovery_level.clone(),
    })
}

/// A wrap or unwrap answer: `{"kid", "value"}` (base64url).
#[derive(Deserialize)]
struct OperationResult {
    #[serde(deserialize_with = "zeroizing_string")]
    value: Zeroizing<String>,
}

fn zeroizing_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    Ok(Zeroizing::new(String::deserialize(d)?))
}

/// A form body (`application/x-www-form-urlencoded`), built without reqwest's `form` feature.
fn form(pairs: &[(&str, &str)]) -> Zeroizing<String> {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        serializer.append_pair(k, v);
    }
    Zeroizing::new(serializer.finish())
}

/// An Entra ID token answer. IMDS sends `expires_in` as a string, the v2.0 endpoint as a
/// number.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: SecretString,
    expires_in: Value,
}

/// The app registration's certificate credential: its RSA key, and the base64url SHA-1
/// thumbprint of its DER certificate (the assertion's `x5t`: which of the app's certificates
/// Entra ID verifies with). Reference: "Microsoft identity platform application
/// authentication certificate credentials" (learn.microsoft.com/entra/identity-platform/
/// certificate-credentials).
struct ClientCertificate {
    key: rsa::pkcs1v15::SigningKey<Sha256>,
    x5t: String,
}

/// The first PEM block labelled `label`, decoded (zeroized when dropped: it may be a key).
fn pem_block(text: &str, label: &str) -> Option<Zeroizing<Vec<u8>>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: Zeroizing<String> = Zeroizing::new(
        text[start..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    );
    base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .ok()
        .map(Zeroizing::new)
}

fn load_certificate(path: &std::path::Path) -> Result<ClientCertificate, String> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    use sha1::Digest;
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let key = if let Some(der) = pem_block(&text, "PRIVATE KEY") {
        rsa::RsaPrivateKey::from_pkcs8_der(&der).map_err(|e| format!("the private key: {e}"))?
    } else if let Some(der) = pem_block(&text, "RSA PRIVATE KEY") {
        rsa::RsaPrivateKey::from_pkcs1_der(&der).map_err(|e| format!("the private key: {e}"))?
    } else {
        return Err(format!(
            "{} holds no RSA private key (PEM \"PRIVATE KEY\" or \"RSA PRIVATE KEY\")",
            path.display()
        ));
    };
    let certificate = pem_block(&text, "CERTIFICATE")
        .ok_or_else(|| format!("{} holds no PEM \"CERTIFICATE\"", path.display()))?;
    Ok(ClientCertificate {
        key: rsa::pkcs1v15::SigningKey::new(key),
        x5t: B64URL.encode(sha1::Sha1::digest(&certificate[..])),
    })
}

/// A client assertion (RS256 JWT) for `client_id` at the token endpoint `audience`, valid for
/// ten minutes.
fn client_assertion(
    cert: &ClientCertificate,
    client_id: &str,
    audience: &str,
) -> Zeroizing<String> {
    use rsa::signature::{SignatureEncoding, Signer};
    let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "x5t": cert.x5t });
    let now = Utc::now().timestamp();
    let claims = serde_json::json!({
        "aud": audience, "iss": client_id, "sub": client_id,
        "jti": uuid::Uuid::new_v4().to_string(), "nbf": now, "iat": now, "exp": now + 600,
    });
    let input = format!(
        "{}.{}",
        B64URL.encode(header.to_string()),
        B64URL.encode(claims.to_string())
    );
    let signature = cert.key.sign(input.as_bytes()).to_bytes();
    Zeroizing::new(format!("{input}.{}", B64URL.encode(signature)))
}

/// `<authority>/<tenant>/oauth2/v2.0/token`.
fn token_url(authority: &str, tenant_id: &str) -> Result<Url, String> {
    let mut url = Url::parse(authority).map_err(|e| format!("authority_host: {e}"))?;
    url.path_segments_mut()
        .map_err(|()| "authority_host cannot hold a path".to_owned())?
        .pop_if_empty()
        .extend([tenant_id, "oauth2", "v2.0", "token"]);
    Ok(url)
}

impl AzureKms {
    /// A provider for `settings`.
    ///
    /// # Errors
    ///
    /// The HTTP client cannot be built, or the certificate credential cannot be read.
    pub fn new(settings: &AzureSettings) -> Result<AzureKms, AzureSetupError> {
        crate::install_crypto_provider();
        let certificate = match settings.auth() {
            AzureAuth::ClientCertificate { path, .. } => {
                Some(load_certificate(path).map_err(AzureSetupError::Certificate)?)
            }
            _ => None,
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let per_10s = settings.requests_per_10s.max(1);
        let per_sec = NonZeroU32::new(per_10s.div_ceil(10)).unwrap_or(NonZeroU32::MIN);
        // A tenth of a second's worth at once: a batch's first requests must not spend the
        // vault's budget that the rest of the tenant's applications share.
        let burst = NonZeroU32::new(per_10s / 100).unwrap_or(NonZeroU32::MIN);
        Ok(AzureKms {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                certificate,
                client,
                tokens: tokio::sync::Mutex::new(HashMap::new()),
                versions: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(60))
                    .build(),
                limits: RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst)),
                backoff: Mutex::new(HashMap::new()),
            }),
        })
    }

    fn target(&self, key_ref: &str) -> Result<Target, KmsError> {
        let key = canonical_key_ref(Provider::Azure, key_ref)?;
        let url = Url::parse(&key).map_err(|e| unreachable(e.to_string()))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let name = key.rsplit('/').next().unwrap_or_default().to_owned();
        Ok(Target {
            managed_hsm: host.contains(".managedhsm."),
            key,
            host,
            name,
        })
    }

    /// `<base>/<segments...>?api-version=7.5`, the base being `https://<vault host>` or
    /// `endpoint_url`.
    fn url(&self, t: &Target, segments: &[&str]) -> Result<Url, KmsError> {
        let base = match &self.inner.settings.endpoint_url {
            Some(endpoint) => endpoint.clone(),
            None => format!("https://{}", t.host),
        };
        let mut url = Url::parse(&base).map_err(|e| unreachable(format!("endpoint_url: {e}")))?;
        url.path_segments_mut()
            .map_err(|()| unreachable("endpoint_url cannot hold a path"))?
            .pop_if_empty()
            .extend(segments);
        url.query_pairs_mut()
            .append_pair("api-version", API_VERSION);
        Ok(url)
    }

    /// A bearer token for `audience`, from the cache or Entra ID.
    async fn token(&self, audience: Audience) -> Result<SecretString, KmsError> {
        let mut tokens = self.inner.tokens.lock().await;
        if let Some(token) = tokens.get(&audience)
            && Instant::now() < token.renew_at
        {
            return Ok(token.value.clone());
        }
        let (value, lifetime) = self.fetch_token(audience).await.map_err(|detail| {
            unreachable(format!(
                "could not get a Microsoft Entra ID token: {detail}"
            ))
        })?;
        tokens.insert(
            audience,
            Token {
                value: value.clone(),
                renew_at: Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
            },
        );
        Ok(value)
    }

    async fn fetch_token(&self, audience: Audience) -> Result<(SecretString, Duration), String> {
        let s = &self.inner.settings;
        let request = match s.auth() {
            AzureAuth::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
            } => {
                let url = token_url(&s.authority_host, tenant_id)?;
                let scope = format!("{}/.default", audience.resource());
                let body = form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", client_secret.expose_secret()),
                    ("scope", &scope),
                ]);
                self.inner
                    .client
                    .post(url)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body.as_bytes().to_vec())
            }
            AzureAuth::ClientCertificate {
                tenant_id,
                client_id,
                ..
            } => {
                let url = token_url(&s.authority_host, tenant_id)?;
                let cert = self
                    .inner
                    .certificate
                    .as_ref()
                    .ok_or_else(|| "the certificate credential is not loaded".to_owned())?;
                let assertion = client_assertion(cert, client_id, url.as_str());
                let scope = format!("{}/.default", audience.resource());
                let body = form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", &assertion),
                    ("scope", &scope),
                ]);
                self.inner
                    .client
                    .post(url)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body.as_bytes().to_vec())
            }
            AzureAuth::ManagedIdentity { client_id } => {
                let mut url =
                    Url::parse(&s.imds_endpoint).map_err(|e| format!("imds_endpoint: {e}"))?;
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("api-version", "2018-02-01")
                        .append_pair("resource", audience.resource());
                    if let Some(id) = client_id {
                        q.append_pair("client_id", id);
                    }
                }
                self.inner.client.get(url).header("Metadata", "true")
            }
        };
        let response = request.send().await.map_err(|e| without_url(&e))?;
        let status = response.status();
        let body = Zeroizing::new(
            response
                .bytes()
                .await
                .map_err(|e| without_url(&e))?
                .to_vec(),
        );
        if !status.is_success() {
            // Entra ID's error body: `error` is a code, never a secret; the description can
            // be long, so only its first line is kept.
            let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let code = value["error"].as_str().unwrap_or("no error code");
            let description = value["error_description"]
                .as_str()
                .and_then(|d| d.lines().next())
                .unwrap_or_default();
            return Err(format!("HTTP {status}: {code} {description}")
                .trim()
                .to_owned());
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            format!(
                "unexpected token answer ({:?} at column {})",
                e.classify(),
                e.column()
            )
        })?;
        let seconds = match &answer.expires_in {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .ok_or_else(|| "the token answer has no expires_in".to_owned())?;
        Ok((answer.access_token, Duration::from_secs(seconds)))
    }

    /// Waits for the vault's rate limit and any `Retry-After` in force.
    async fn pace(&self, host: &str) {
        let until = self
            .lock_backoff()
            .get(host)
            .copied()
            .filter(|at| *at > Instant::now());
        if let Some(at) = until {
            tokio::time::sleep_until(at.into()).await;
        }
        self.inner.limits.until_key_ready(&host.to_owned()).await;
    }

    fn lock_backoff(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // An insert or a read cannot leave the map half-written.
        self.inner
            .backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends a Key Vault request (JSON `body`, if any) with byokd's token, retrying 429 (after
    /// its `Retry-After`, for every request to the vault) and 5xx up to `max_attempts`;
    /// returns a 2xx body in a zeroizing buffer or the classified error.
    async fn call(
        &self,
        t: &Target,
        operation: &'static str,
        method: reqwest::Method,
        url: Url,
        body: Option<&Zeroizing<Vec<u8>>>,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let attempts = self.inner.settings.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.pace(&t.host).await;
            let token = self.token(t.scope()).await?;
            let mut request = self
                .inner
                .client
                .request(method.clone(), url.clone())
                .header(AUTHORIZATION, format!("Bearer {}", token.expose_secret()));
            let sent = body.map(|b| Bytes::copy_from_slice(b));
            if let Some(bytes) = &sent {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(bytes.clone());
            }
            let response = request.send().await;
            if let Some(bytes) = sent
                && let Ok(mut owned) = bytes.try_into_mut()
            {
                owned[..].zeroize();
            }
            let response = response
                .map_err(|e| unreachable(format!("request failed: {}", without_url(&e))))?;
            let status = response.status();
            let headers = response.headers().clone();
            let raw = response.bytes().await.map_err(|e| {
                unreachable(format!("reading the response failed: {}", without_url(&e)))
            })?;
            let answer = Zeroizing::new(raw.to_vec());
            if let Ok(mut owned) = raw.try_into_mut() {
                owned[..].zeroize();
            }
            if status.is_success() {
                return Ok(answer);
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = retry_after(
                    &headers,
                    Duration::from_secs(self.inner.settings.max_retry_after_secs.max(1)),
                );
                let until = Instant::now() + wait;
                let mut backoff = self.lock_backoff();
                let entry = backoff.entry(t.host.clone()).or_insert(until);
                *entry = (*entry).max(until);
                drop(backoff);
                tracing::warn!(vault = %t.host, wait_ms = wait.as_millis() as u64,
                    "Key Vault throttled byokd (429); waiting out Retry-After");
                if attempt < attempts {
                    continue;
                }
                return Err(unreachable(format!(
                    "HTTP 429: Key Vault throttled {} requests {attempts} times",
                    t.host
                )));
            }
            if status == StatusCode::UNAUTHORIZED && attempt < attempts {
                // A token Key Vault no longer takes (revoked, or the clock): get a new one.
                self.inner.tokens.lock().await.remove(&t.scope());
                continue;
            }
            if status.is_server_error() && attempt < attempts {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                continue;
            }
            return Err(classify(&t.key, operation, status, &answer));
        }
    }

    async fn get_bundle(&self, t: &Target, segments: &[&str]) -> Result<KeyBundle, KmsError> {
        let url = self.url(t, segments)?;
        let body = self
            .call(t, "describe", reqwest::Method::GET, url, None)
            .await?;
        serde_json::from_slice(&body).map_err(|e| {
            unreachable(format!(
                "unexpected key bundle ({:?} error at column {})",
                e.classify(),
                e.column()
            ))
        })
    }

    /// Reads the key's current version; a key not found is looked for among deleted keys.
    async fn read(&self, t: &Target) -> Result<Described, KmsError> {
        match self.get_bundle(t, &["keys", &t.name]).await {
            Ok(bundle) => {
                let described = describe_bundle(&bundle, Utc::now())?;
                self.inner
                    .versions
                    .insert(t.key.clone(), described.info.current_version.clone());
                Ok(described)
            }
            Err(KmsError::NotFound { .. }) => Err(self.deleted_or_gone(t).await),
            Err(e) => Err(e),
        }
    }

    /// After a `KeyNotFound`: a soft-deleted key (recoverable until purged) is pending
    /// deletion; one found nowhere is gone. When byokd may not read deleted keys (or the
    /// answer says nothing), the key counts as pending deletion: refused either way, and not
    /// the final `destroyed` on a guess.
    async fn deleted_or_gone(&self, t: &Target) -> KmsError {
        let pending = KmsError::Unusable {
            provider: Provider::Azure,
            key_ref: t.key.clone(),
            state: KeyState::PendingDeletion,
            operation: "describe",
        };
        let url = match self.url(t, &["deletedkeys", &t.name]) {
            Ok(url) => url,
            Err(e) => return e,
        };
        match self
            .call(t, "describe", reqwest::Method::GET, url, None)
            .await
        {
            Ok(_) => pending,
            Err(e @ KmsError::NotFound { .. }) => e,
            Err(e) if e.is_transient() => e,
            Err(_) => pending,
        }
    }

    async fn current_version(&self, t: &Target) -> Result<String, KmsError> {
        if let Some(v) = self.inner.versions.get(&t.key) {
            return Ok(v);
        }
        Ok(self.read(t).await?.info.current_version)
    }

    /// The wrap algorithm of a key version (read once per version: a version's type never
    /// changes).
    async fn algorithm_of(&self, t: &Target, version: &str) -> Result<&'static str, KmsError> {
        let cache_key = format!("{}/{version}#kty", t.key);
        if let Some(kty) = self.inner.versions.get(&cache_key) {
            return algorithm(&kty).map_err(|reason| KmsError::InvalidKeyRef {
                provider: Provider::Azure,
                reason,
            });
        }
        let bundle = match self.get_bundle(t, &["keys", &t.name, version]).await {
            Err(KmsError::NotFound { .. }) => {
                return Err(KmsError::NoSuchVersion {
                    provider: Provider::Azure,
                    key_ref: t.key.clone(),
                    version: version.to_owned(),
                });
            }
            other => other?,
        };
        self.inner
            .versions
            .insert(cache_key, bundle.key.kty.clone());
        algorithm(&bundle.key.kty).map_err(|reason| KmsError::InvalidKeyRef {
            provider: Provider::Azure,
            reason,
        })
    }

    async fn key_operation(
        &self,
        t: &Target,
        version: &str,
        operation: &'static str,
        alg: &str,
        value: &str,
    ) -> Result<Zeroizing<String>, KmsError> {
        let path = if operation == "wrap" {
            "wrapkey"
        } else {
            "unwrapkey"
        };
        let url = self.url(t, &["keys", &t.name, version, path])?;
        let body = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({ "alg": alg, "value": value }))
                .expect("serializing two strings cannot fail"),
        );
        let answer = self
            .call(t, operation, reqwest::Method::POST, url, Some(&body))
            .await?;
        let result: OperationResult = serde_json::from_slice(&answer).map_err(|e| {
            unreachable(format!(
                "unexpected {operation} answer ({:?} error at column {})",
                e.classify(),
                e.column()
            ))
        })?;
        Ok(result.value)
    }

    async fn wrap_one(
        &self,
        t: &Target,
        version: &str,
        alg: &str,
        dek: &Dek,
        ctx: &DekContext<'_>,
    ) -> Result<Vec<u8>, KmsError> {
        let plaintext = Zeroizing::new(B64URL.encode(dek.expose()));
        let wrapped = self
            .key_operation(t, version, "wrap", alg, &plaintext)
            .await?;
        let wrapped = B64URL
            .decode(wrapped.as_bytes())
            .map_err(|_| unreachable("wrapKey answered a value that is not base64url"))?;
        Ok(seal(dek, ctx, &wrapped))
    }

    async fn unwrap_one(
        &self,
        t: &Target,
        alg: &str,
        item: &WrappedRef<'_>,
    ) -> Result<Dek, KmsError> {
        let (tag, wrapped) = open(item.ciphertext)?;
        let value = B64URL.encode(wrapped);
        let plaintext = self
            .key_operation(t, item.version, "unwrap", alg, &value)
            .await?;
        let mut raw = Zeroizing::new([0u8; 48]);
        let len = B64URL
            .decode_slice(plaintext.as_bytes(), raw.as_mut())
            .map_err(|_| KmsError::Integrity)?;
        let dek = raw
            .get(..len)
            .and_then(Dek::from_bytes)
            .ok_or(KmsError::Integrity)?;
        check_binding(&dek, &item.ctx, tag, wrapped)?;
        Ok(dek)
    }

    /// Runs `calls`, `concurrency` at a time, results in order.
    async fn run<F: Future>(&self, calls: Vec<F>) -> Vec<F::Output> {
        futures_util::stream::iter(calls)
            .buffered(self.inner.settings.concurrency.max(1))
            .collect()
            .await
    }

    /// Checks that byokd can use a key and describes it: RSA or Managed HSM AES, its
    /// `key_ops` permitting wrapKey and unwrapKey, enabled and valid now, recoverable
    /// deletion (when `require_recoverable`), then a test wrap and unwrap.
    ///
    /// # Errors
    ///
    /// [`KmsError::InvalidKeyRef`] with the reason for a key of the wrong kind, or Key
    /// Vault's answer, classified.
    pub async fn bind(&self, key_ref: &str) -> Result<(String, KeyInfo), KmsError> {
        let t = self.target(key_ref)?;
        let described = self.read(&t).await?;
        let refuse = |reason: String| KmsError::InvalidKeyRef {
            provider: Provider::Azure,
            reason: format!("{}: {reason}", t.key),
        };
        algorithm(&described.kty).map_err(refuse)?;
        let missing: Vec<&str> = ["wrapKey", "unwrapKey"]
            .into_iter()
            .filter(|op| !described.key_ops.iter().any(|k| k == op))
            .collect();
        if !missing.is_empty() {
            return Err(refuse(format!(
                "its key_ops ({}) do not permit {}",
                described.key_ops.join(", "),
                missing.join(" and ")
            )));
        }
        if self.inner.settings.require_recoverable
            && !described.recovery_level.as_deref().is_some_and(|l| {
                l.starts_with("Recoverable") || l.starts_with("CustomizedRecoverable")
            })
        {
            return Err(refuse(format!(
                "its deletion is not recoverable (recoveryLevel {}); enable soft delete \
                 (and purge protection) on the vault",
                described.recovery_level.as_deref().unwrap_or("absent")
            )));
        }
        if described.info.state != KeyState::Enabled {
            return Err(KmsError::Unusable {
                provider: Provider::Azure,
                key_ref: t.key.clone(),
                state: described.info.state,
                operation: "wrap",
            });
        }
        super::round_trip(self, &t.key).await?;
        Ok((t.key, described.info))
    }
}

impl KmsProvider for AzureKms {
    async fn describe(&self, key_ref: &str) -> Result<KeyInfo, KmsError> {
        let t = self.target(key_ref)?;
        Ok(self.read(&t).await?.info)
    }

    async fn wrap_many(
        &self,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError> {
        let t = self.target(key_ref)?;
        let version = match version {
            Some(v) => v.to_owned(),
            None => self.current_version(&t).await?,
        };
        let alg = self.algorithm_of(&t, &version).await?;
        let calls: Vec<_> = items
            .iter()
            .map(|(dek, ctx)| self.wrap_one(&t, &version, alg, dek, ctx))
            .collect();
        self.run(calls)
            .await
            .into_iter()
            .map(|r| {
                r.map(|ciphertext| Wrapped {
                    version: version.clone(),
                    ciphertext,
                })
            })
            .collect()
    }

    async fn unwrap_many(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError> {
        let t = self.target(key_ref)?;
        let mut algs: HashMap<&str, &'static str> = HashMap::new();
        for item in items {
            if !algs.contains_key(item.version) {
                algs.insert(item.version, self.algorithm_of(&t, item.version).await?);
            }
        }
        let calls: Vec<_> = items
            .iter()
            .map(|item| self.unwrap_one(&t, algs[item.version], item))
            .collect();
        let results = self.run(calls).await;
        // One bad ciphertext fails alone; anything about the key fails the batch.
        if let Some(pos) = results
            .iter()
            .position(|r| r.as_ref().is_err_and(|e| !matches!(e, KmsError::Integrity)))
        {
            return match results.into_iter().nth(pos) {
                Some(Err(e)) => Err(e),
                _ => Err(KmsError::Integrity),
            };
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn key_refs_are_versionless_key_vault_urls() {
        for (given, canonical_form) in [
            (
                "https://acme-kv.vault.azure.net/keys/tenant-kek",
                "https://acme-kv.vault.azure.net/keys/tenant-kek",
            ),
            (
                "https://ACME-kv.Vault.Azure.net/keys/Tenant-KEK/0123456789abcdef0123456789abcdef",
                "https://acme-kv.vault.azure.net/keys/tenant-kek",
            ),
            (
                "https://acme-kv.vault.azure.net/keys/tenant-kek/",
                "https://acme-kv.vault.azure.net/keys/tenant-kek",
            ),
            (
                "https://acme-hsm.managedhsm.azure.net/keys/k1",
                "https://acme-hsm.managedhsm.azure.net/keys/k1",
            ),
            (
                "https://acme-kv.vault.azure.cn/keys/k",
                "https://acme-kv.vault.azure.cn/keys/k",
            ),
        ] {
            assert_eq!(canonical(given).as_deref(), Ok(canonical_form), "{given}");
        }
        for bad in [
            "http://acme-kv.vault.azure.net/keys/k",
            "https://evil.example/keys/k",
            "https://acme-kv.vault.azure.net.evil.example/keys/k",
            "https://a.b.vault.azure.net/keys/k",
            "https://acme-kv.vault.azure.net:8443/keys/k",
            "https://u:p@acme-kv.vault.azure.net/keys/k",
            "https://acme-kv.vault.azure.net/secrets/k",
            "https://acme-kv.vault.azure.net/keys/k?x=1",
            "https://acme-kv.vault.azure.net/keys/k#f",
            "https://acme-kv.vault.azure.net/keys/k_1",
            "https://acme-kv.vault.azure.net/keys/k/v/wrapkey",
            "https://acme-kv.vault.azure.net/keys/k/..",
            "https://acme-kv.vault.azure.net/keys/",
            "https://ab.vault.azure.net/keys/k",
            "acme-kv/keys/k",
        ] {
            assert!(canonical(bad).is_err(), "{bad}");
        }
        // Through the shared entry point, too.
        assert_eq!(
            canonical_key_ref(
                Provider::Azure,
                "https://acme-kv.vault.azure.net/keys/K/abc"
            )
            .expect("canonical"),
            "https://acme-kv.vault.azure.net/keys/k"
        );
    }

    fn body(value: Value) -> Vec<u8> {
        serde_json::to_vec(&value).expect("json")
    }

    #[test]
    fn only_key_vaults_own_error_body_is_definitive() {
        use serde_json::json;
        let not_found = body(json!({"error": {"code": "KeyNotFound",
            "message": "A key with (name/id) k was not found in this key vault."}}));
        assert!(matches!(
            classify("k", "describe", StatusCode::NOT_FOUND, &not_found),
            KmsError::NotFound { .. }
        ));
        let disabled = body(json!({"error": {"code": "Forbidden",
            "message": "Operation unwrapKey is not allowed on a disabled key.",
            "innerError": {"code": "KeyDisabled"}}}));
        assert!(matches!(
            classify("k", "unwrap", StatusCode::FORBIDDEN, &disabled),
            KmsError::Unusable {
                state: KeyState::Disabled,
                ..
            }
        ));
        for inner in ["AccessDenied", "ForbiddenByPolicy", "ForbiddenByRbac"] {
            let denied = body(json!({"error": {"code": "Forbidden",
                "message": "The user, group or application does not have keys unwrapKey permission",
                "innererror": {"code": inner}}}));
            match classify("k", "unwrap", StatusCode::FORBIDDEN, &denied) {
                KmsError::AccessDenied { detail, .. } => {
                    assert!(detail.contains(inner), "{detail}")
                }
                other => panic!("{inner}: {other:?}"),
            }
        }
        let bad = body(json!({"error": {"code": "BadParameter", "message": "Bad Request"}}));
        assert!(matches!(
            classify("k", "unwrap", StatusCode::BAD_REQUEST, &bad),
            KmsError::Integrity
        ));
        for (status, answer) in [
            (StatusCode::NOT_FOUND, b"<html>Not Found</html>".to_vec()),
            (
                StatusCode::NOT_FOUND,
                body(json!({"error": {"code": "NotFound", "message": "x"}})),
            ),
            (StatusCode::FORBIDDEN, Vec::new()),
            (
                StatusCode::UNAUTHORIZED,
                body(json!({"error": {"code": "Unauthorized", "message": "AKV10000"}})),
            ),
            (
                StatusCode::TOO_MANY_REQUESTS,
                body(json!({"error": {"code": "Throttled", "message": "x"}})),
            ),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                body(json!({"error": {"code": "InternalError", "message": "x"}})),
            ),
            (StatusCode::SERVICE_UNAVAILABLE, Vec::new()),
            (StatusCode::BAD_REQUEST, bad.clone()),
        ] {
            let e = classify("k", "wrap", status, &answer);
            assert!(e.is_transient(), "{status}: {e:?}");
        }
    }

    #[test]
    fn the_binding_refuses_a_moved_or_tampered_wrap() {
        let dek = Dek::generate();
        let id = Uuid::now_v7();
        let ctx = DekContext {
            tenant_id: "acme",
            dek_id: id,
        };
        let wrapped = [9u8; 256];
        let stored = seal(&dek, &ctx, &wrapped);
        let (tag, inner) = open(&stored).expect("opens");
        assert_eq!(inner, wrapped);
        assert!(check_binding(&dek, &ctx, tag, inner).is_ok());
        let moved = DekContext {
            tenant_id: "other",
            dek_id: id,
        };
        assert!(matches!(
            check_binding(&dek, &moved, tag, inner),
            Err(KmsError::Integrity)
        ));
        let renamed = DekContext {
            tenant_id: "acme",
            dek_id: Uuid::now_v7(),
        };
        assert!(matches!(
            check_binding(&dek, &renamed, tag, inner),
            Err(KmsError::Integrity)
        ));
        assert!(matches!(
            check_binding(&Dek::generate(), &ctx, tag, inner),
            Err(KmsError::Integrity)
        ));
        for bad in [&[][..], &[2u8; 40][..], &stored[..TAG_LEN + 1]] {
            assert!(matches!(open(bad), Err(KmsError::Integrity)));
        }
    }

    #[test]
    fn key_types_choose_the_algorithm() {
        assert_eq!(algorithm("RSA"), Ok("RSA-OAEP-256"));
        assert_eq!(algorithm("RSA-HSM"), Ok("RSA-OAEP-256"));
        assert_eq!(algorithm("oct-HSM"), Ok("A256KW"));
        assert!(algorithm("EC").is_err());
        assert!(algorithm("oct").is_err());
        assert!(algorithm("EC-HSM").is_err());
    }
}
