//! Google Cloud KMS as a KMS provider, on its REST API v1 (reqwest; Google's Rust crates
//! pull a gRPC stack and their own TLS and auth set-up, which this crate does not carry).
//!
//! A key is a `CryptoKey` of purpose `ENCRYPT_DECRYPT`, named by its resource name
//! (`projects/P/locations/L/keyRings/R/cryptoKeys/K`), checked segment by segment before any
//! request so a reference can only ever name one key. Every wrap is `cryptoKeys.encrypt` with
//! the DEK binding as `additionalAuthenticatedData`, so a wrapped DEK copied to another row or
//! tenant fails to decrypt; `encrypt` names the version it used, which is stored with the DEK.
//! Cloud KMS decrypts with the version the ciphertext names, so `decrypt` takes the key's name.
//! Requests and answers carry CRC32C checksums (`plaintextCrc32c`, `ciphertextCrc32c`, ...,
//! as <https://cloud.google.com/kms/docs/data-integrity-guidelines> asks): byokd sends them
//! and checks every answer; a mismatch is damage in transit, retried, never a fact about
//! the key.
//!
//! Versions have states of their own (`ENABLED`, `DISABLED`, `DESTROY_SCHEDULED`,
//! `DESTROYED`): the key's state is its primary version's (what `encrypt` uses), and
//! [`KmsProvider::version_states`] lists every version for the DEKs still under an older one.
//! A new primary is a rotation; re-wrap moves DEKs to it by encrypting under that version.
//!
//! Authentication: an OAuth 2.0 access token, from a service-account key file (a JWT signed
//! with RS256 exchanged at the file's `token_uri`) or from the metadata server of the machine
//! byokd runs on; cached until a minute before it expires, refreshed by one caller at a time.
//!
//! [`classify`] is the one place that decides what an answer means. Definitive, because Cloud
//! KMS says so in its own error body (`{"error": {"code", "message", "status"}}`): 403
//! `PERMISSION_DENIED` (byokd's account lost the key), 404 `NOT_FOUND`, 400
//! `FAILED_PRECONDITION` (the version is not enabled; its state is read from the message) and
//! 400 `INVALID_ARGUMENT` on decrypt (the ciphertext or its binding does not authenticate).
//! Everything else says nothing about the key and never revokes: 429 `RESOURCE_EXHAUSTED`
//! (retried after `Retry-After`, and the project's rate slowed), 5xx / `UNAVAILABLE`, a 401
//! or any failure to obtain a token (byokd's own credentials), a 403/404 without Google's
//! body (a proxy), timeouts and connection failures.
//!
//! Plaintext DEKs cross this module base64-encoded in JSON; the buffers it holds them in are
//! zeroizing, as in the Vault provider (`vault::json_body`, `vault::scrub`). Out of reach:
//! hyper's and rustls's buffers and the kernel's.

use super::vault::{dek_from_base64, json_body, scrub};
use super::{Dek, DekContext, KeyInfo, KmsError, KmsProvider, Wrapped, WrappedRef};
use crate::config::GcpSettings;
use crate::domain::{KeyState, Provider};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use url::Url;
use zeroize::Zeroizing;

/// The OAuth scope Cloud KMS calls need.
const SCOPE: &str = "https://www.googleapis.com/auth/cloudkms";
/// A token is renewed this long before Google says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// The CRC32C of Cloud KMS's integrity fields (Castagnoli).
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

fn crc32c(bytes: &[u8]) -> u32 {
    CRC32C.checksum(bytes)
}

fn unreachable(detail: impl std::fmt::Display) -> KmsError {
    KmsError::Unreachable {
        provider: Provider::Gcp,
        detail: detail.to_string(),
    }
}

/// Why a [`GcpKms`] cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum GcpSetupError {
    /// The service-account key file cannot be read or is not one.
    #[error("the service-account key file {path:?}: {reason}")]
    KeyFile {
        /// The configured path.
        path: std::path::PathBuf,
        /// What is wrong with it (never its content).
        reason: String,
    },
    /// An endpoint is not an http(s) URL.
    #[error("kms.gcp.{name} {value:?} is not an http(s) URL")]
    Endpoint {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// The HTTP client cannot be built (TLS setup).
    #[error(transparent)]
    Client(#[from] reqwest::Error),
}

/// Checks a Cloud KMS key reference: `projects/P/locations/L/keyRings/R/cryptoKeys/K`, with
/// each id in the form Cloud KMS allows (project ids lowercase letters, digits, `-`, and an
/// optional `domain:` prefix; locations lowercase letters, digits, `-`; key ring and key ids
/// 1-63 of letters, digits, `_`, `-`). A version suffix is refused: byokd binds keys, and a
/// key's versions come and go.
pub(super) fn key_ref_problem(key_ref: &str) -> Option<String> {
    let parts: Vec<&str> = key_ref.split('/').collect();
    let [
        "projects",
        project,
        "locations",
        location,
        "keyRings",
        ring,
        "cryptoKeys",
        key,
    ] = parts.as_slice()
    else {
        if key_ref.contains("/cryptoKeyVersions/") {
            return Some(
                "name the key (…/cryptoKeys/K), not one of its versions: byokd follows the \
                 key's primary version"
                    .to_owned(),
            );
        }
        return Some(
            "expected a Cloud KMS key name: projects/P/locations/L/keyRings/R/cryptoKeys/K"
                .to_owned(),
        );
    };
    let project_ok = {
        let id = project.rsplit(':').next().unwrap_or_default();
        (6..=30).contains(&id.len())
            && id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && project.split(':').count() <= 2
            && project.split(':').next().is_some_and(|d| {
                d.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            })
    };
    if !project_ok {
        return Some(format!("{project:?} is not a Google Cloud project id"));
    }
    if location.is_empty()
        || !location
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Some(format!("{location:?} is not a Cloud KMS location"));
    }
    for (what, id) in [("key ring", ring), ("key", key)] {
        if id.is_empty()
            || id.len() > 63
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Some(format!(
                "{id:?} is not a {what} id (1 to 63 letters, digits, '_' and '-')"
            ));
        }
    }
    None
}

/// The version number at the end of a `CryptoKeyVersion` name, if `name` is one of `key`'s.
fn version_of(key: &str, name: &str) -> Option<String> {
    let n = name
        .strip_prefix(key)?
        .strip_prefix("/cryptoKeyVersions/")?;
    (!n.is_empty() && n.chars().all(|c| c.is_ascii_digit())).then(|| n.to_owned())
}

/// A `CryptoKeyVersionState` as byokd's key state. States that cannot decrypt and are not
/// named here (pending generation or import, import or generation failed, external
/// destruction) count as disabled: the version refuses, and the answer stays definitive.
fn state_of(gcp: &str) -> KeyState {
    match gcp {
        "ENABLED" => KeyState::Enabled,
        "DESTROY_SCHEDULED" => KeyState::PendingDeletion,
        "DESTROYED" => KeyState::Destroyed,
        _ => KeyState::Disabled,
    }
}

/// The state a `FAILED_PRECONDITION` names ("... is not enabled, current state is:
/// DESTROYED."): the last state name in the message, else disabled.
fn state_in_message(message: &str) -> KeyState {
    let upper = message.to_ascii_uppercase();
    for (name, state) in [
        ("DESTROY_SCHEDULED", KeyState::PendingDeletion),
        ("DESTROYED", KeyState::Destroyed),
    ] {
        if upper.contains(name) {
            return state;
        }
    }
    KeyState::Disabled
}

/// Google's error body: `{"error": {"code": 403, "message": "...", "status": "PERMISSION_DENIED"}}`
/// (<https://cloud.google.com/apis/design/errors#http_mapping>).
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    status: String,
}

/// Which call failed, for [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Describe,
    Encrypt,
    Decrypt,
}

impl Call {
    fn operation(self) -> &'static str {
        match self {
            Call::Describe => "describe",
            Call::Encrypt => "wrap",
            Call::Decrypt => "unwrap",
        }
    }
}

/// What a non-success answer says; see the module docs.
fn classify(key: &str, call: Call, status: StatusCode, body: &[u8]) -> KmsError {
    let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) else {
        return unreachable(format!(
            "HTTP {status} without Cloud KMS's error body (a proxy or load balancer?)"
        ));
    };
    let key_ref = key.to_owned();
    match (status, error.status.as_str()) {
        (StatusCode::FORBIDDEN, "PERMISSION_DENIED") => KmsError::AccessDenied {
            provider: Provider::Gcp,
            key_ref,
            detail: error.message,
        },
        (StatusCode::NOT_FOUND, "NOT_FOUND") => KmsError::NotFound {
            provider: Provider::Gcp,
            key_ref,
        },
        (StatusCode::BAD_REQUEST, "FAILED_PRECONDITION") => KmsError::Unusable {
            provider: Provider::Gcp,
            key_ref,
            state: state_in_message(&error.message),
            operation: call.operation(),
        },
        (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT") if call == Call::Decrypt => {
            KmsError::Integrity
        }
        (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT") => KmsError::InvalidKeyRef {
            provider: Provider::Gcp,
            reason: error.message,
        },
        (status, name) => unreachable(format!("HTTP {status} {name}: {}", error.message)),
    }
}

/// An access token and when to renew it.
struct Token {
    value: SecretString,
    renew_at: Instant,
}

/// Where tokens come from.
enum Credentials {
    /// A service-account key file.
    ServiceAccount(Box<ServiceAccount>),
    /// The metadata server (`<url>/computeMetadata/v1/instance/service-accounts/default/token`).
    Metadata(Url),
}

/// The parts of a service-account key file byokd uses. The private key never leaves this
/// struct except as a signature.
struct ServiceAccount {
    client_email: String,
    private_key_id: Option<String>,
    token_uri: Url,
    key: ring::signature::RsaKeyPair,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: SecretString,
    #[serde(default)]
    private_key_id: Option<String>,
    token_uri: String,
}

impl ServiceAccount {
    fn load(path: &std::path::Path) -> Result<ServiceAccount, GcpSetupError> {
        let fail = |reason: String| GcpSetupError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?,
        );
        let file: KeyFile = serde_json::from_str(&text)
            .map_err(|e| fail(format!("not a service-account key file: {e}")))?;
        if file.kind != "service_account" {
            return Err(fail(format!(
                "its type is {:?}, not \"service_account\"",
                file.kind
            )));
        }
        let token_uri = Url::parse(&file.token_uri)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| fail("token_uri is not an http(s) URL".to_owned()))?;
        let pem = file.private_key.expose_secret();
        let body: Zeroizing<String> = Zeroizing::new(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::trim)
                .collect(),
        );
        let der = Zeroizing::new(
            B64.decode(body.as_bytes())
                .map_err(|_| fail("private_key is not a PEM key".to_owned()))?,
        );
        let key = ring::signature::RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| fail(format!("private_key is not a PKCS#8 RSA key: {e}")))?;
        Ok(ServiceAccount {
            client_email: file.client_email,
            private_key_id: file.private_key_id,
            token_uri,
            key,
        })
    }

    /// The JWT bearer assertion of RFC 7523 that Google's token endpoint takes
    /// (<https://developers.google.com/identity/protocols/oauth2/service-account#authorizingrequests>).
    fn assertion(&self, now: i64) -> Result<Zeroizing<String>, KmsError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.private_key_id {
            header["kid"] = serde_json::json!(kid);
        }
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri.as_str(),
            "iat": now,
            "exp": now + 3600,
        });
        let signed = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .map_err(|_| unreachable("cannot sign the token request"))?;
        Ok(Zeroizing::new(format!(
            "{signed}.{}",
            b64.encode(signature)
        )))
    }
}

/// A token endpoint's answer (both flows).
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: SecretString,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// One quota's limiter, slowed for a while after a 429 (adaptive: the project's real quota
/// may be lower than configured, or shared with others).
struct Limit {
    limiter: DefaultDirectRateLimiter,
    /// No request starts before this instant (set from `Retry-After` or the backoff).
    hold_until: Mutex<Option<Instant>>,
}

impl Limit {
    fn per_minute(n: u32) -> Limit {
        let per_min = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        // Cloud KMS enforces hosting-project quotas by the second: allow a second's worth at
        // once, not a minute's.
        let burst = NonZeroU32::new(n / 60).unwrap_or(NonZeroU32::MIN);
        Limit {
            limiter: RateLimiter::direct(Quota::per_minute(per_min).allow_burst(burst)),
            hold_until: Mutex::new(None),
        }
    }

    async fn wait(&self) {
        let hold = *self.hold_until.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = hold {
            tokio::time::sleep_until(until.into()).await;
        }
        self.limiter.until_ready().await;
    }

    fn hold(&self, for_: Duration) {
        let until = Instant::now() + for_;
        let mut hold = self.hold_until.lock().unwrap_or_else(|e| e.into_inner());
        if hold.is_none_or(|h| h < until) {
            *hold = Some(until);
        }
    }
}

/// Google Cloud KMS over REST; cheap to clone.
#[derive(Clone)]
pub struct GcpKms {
    inner: Arc<Inner>,
}

struct Inner {
    settings: GcpSettings,
    client: reqwest::Client,
    /// `https://cloudkms.googleapis.com/v1/` (or the configured endpoint).
    base: Url,
    credentials: Credentials,
    token: tokio::sync::Mutex<Option<Token>>,
    crypto: Limit,
    reads: Limit,
}

impl std::fmt::Debug for GcpKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcpKms")
            .field("endpoint", &self.inner.base.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EncryptRequest<'a> {
    plaintext: &'a str,
    additional_authenticated_data: String,
    plaintext_crc32c: String,
    additional_authenticated_data_crc32c: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EncryptResponse {
    name: String,
    ciphertext: String,
    #[serde(default, deserialize_with = "int64")]
    ciphertext_crc32c: Option<u32>,
    #[serde(default)]
    verified_plaintext_crc32c: bool,
    #[serde(default)]
    verified_additional_authenticated_data_crc32c: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DecryptRequest {
    ciphertext: String,
    additional_authenticated_data: String,
    ciphertext_crc32c: String,
    additional_authenticated_data_crc32c: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DecryptResponse {
    #[serde(deserialize_with = "zeroizing_string")]
    plaintext: Zeroizing<String>,
    #[serde(default, deserialize_with = "int64")]
    plaintext_crc32c: Option<u32>,
}

fn zeroizing_string<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    Ok(Zeroizing::new(String::deserialize(d)?))
}

/// Protobuf JSON writes int64 as a decimal string (a number is accepted too).
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Number(u64),
    }
    let value = Option::<Either>::deserialize(d)?;
    let n = match value {
        None => return Ok(None),
        Some(Either::Number(n)) => n,
        Some(Either::Text(s)) => s.parse::<u64>().map_err(serde::de::Error::custom)?,
    };
    u32::try_from(n)
        .map(Some)
        .map_err(|_| serde::de::Error::custom("a CRC32C is at most 32 bits"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CryptoKey {
    #[serde(default)]
    purpose: String,
    #[serde(default)]
    primary: Option<CryptoKeyVersion>,
    #[serde(default)]
    rotation_period: Option<String>,
    #[serde(default)]
    next_rotation_time: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CryptoKeyVersion {
    name: String,
    state: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VersionPage {
    #[serde(default)]
    crypto_key_versions: Vec<CryptoKeyVersion>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// Most pages of 1000 versions read per key: a key rotated daily for 27 years.
const MAX_VERSION_PAGES: usize = 10;

impl GcpKms {
    /// A client for `settings`: reads the service-account key file now, if one is set.
    ///
    /// # Errors
    ///
    /// [`GcpSetupError`] naming the bad setting or file.
    pub fn new(settings: &GcpSettings) -> Result<GcpKms, GcpSetupError> {
        let url = |name: &'static str, value: &str| {
            let mut u = Url::parse(value)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .ok_or_else(|| GcpSetupError::Endpoint {
                    name,
                    value: value.to_owned(),
                })?;
            if !u.path().ends_with('/') {
                let path = format!("{}/", u.path());
                u.set_path(&path);
            }
            Ok::<Url, GcpSetupError>(u)
        };
        let endpoint = url("endpoint_url", &settings.endpoint_url)?;
        let base = endpoint.join("v1/").map_err(|_| GcpSetupError::Endpoint {
            name: "endpoint_url",
            value: settings.endpoint_url.clone(),
        })?;
        let credentials = match &settings.credentials_path {
            Some(path) => Credentials::ServiceAccount(Box::new(ServiceAccount::load(path)?)),
            None => Credentials::Metadata(url("metadata_url", &settings.metadata_url)?),
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)))
            .connect_timeout(Duration::from_secs(settings.timeout_secs.clamp(1, 5)))
            .build()?;
        Ok(GcpKms {
            inner: Arc::new(Inner {
                crypto: Limit::per_minute(settings.crypto_requests_per_min),
                reads: Limit::per_minute(settings.read_requests_per_min),
                settings: settings.clone(),
                client,
                base,
                credentials,
                token: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// A valid access token, fetched when none is cached or it is about to expire. A failure
    /// is byokd's own (credentials, metadata server, token endpoint): [`KmsError::Unreachable`].
    async fn token(&self) -> Result<SecretString, KmsError> {
        let mut cached = self.inner.token.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.renew_at
        {
            return Ok(t.value.clone());
        }
        let fetched = self.fetch_token().await.inspect_err(|_| {
            metrics::counter!(crate::telemetry::KMS_ERRORS, "provider" => "gcp",
                "operation" => "token", "class" => "unreachable")
            .increment(1);
        })?;
        let value = fetched.access_token.clone();
        let lifetime = Duration::from_secs(fetched.expires_in.unwrap_or(3600));
        *cached = Some(Token {
            value: fetched.access_token,
            renew_at: Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
        });
        Ok(value)
    }

    async fn fetch_token(&self) -> Result<TokenAnswer, KmsError> {
        let request = match &self.inner.credentials {
            Credentials::ServiceAccount(sa) => {
                let assertion = sa.assertion(chrono::Utc::now().timestamp())?;
                let body = Zeroizing::new(
                    url::form_urlencoded::Serializer::new(String::new())
                        .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
                        .append_pair("assertion", &assertion)
                        .finish(),
                );
                self.inner
                    .client
                    .post(sa.token_uri.clone())
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body.as_bytes().to_vec())
            }
            Credentials::Metadata(base) => {
                let mut url = base
                    .join("computeMetadata/v1/instance/service-accounts/default/token")
                    .map_err(|e| unreachable(format!("metadata URL: {e}")))?;
                url.query_pairs_mut().append_pair("scopes", SCOPE);
                self.inner
                    .client
                    .get(url)
                    .header("Metadata-Flavor", "Google")
            }
        };
        let response = request
            .send()
            .await
            .map_err(|e| unreachable(format!("cannot get an access token: {e}")))?;
        let status = response.status();
        let body = Zeroizing::new(
            response
                .bytes()
                .await
                .map_err(|e| unreachable(format!("cannot get an access token: {e}")))?
                .to_vec(),
        );
        if !status.is_success() {
            return Err(unreachable(format!(
                "the token endpoint answered HTTP {status}"
            )));
        }
        serde_json::from_slice::<TokenAnswer>(&body)
            .map_err(|_| unreachable("the token endpoint's answer holds no access_token"))
    }

    /// Sends one request (built by `build` with a token, with `json` as its body), waiting
    /// for the quota first and retrying 429s and 5xx up to `max_attempts`. Returns the
    /// success body or the classified error. Each attempt's copy of the body (it may hold a
    /// plaintext DEK) is zeroed once reqwest let go of it ([`scrub`]).
    async fn call(
        &self,
        key: &str,
        call: Call,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
        json: Option<&[u8]>,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let limit = match call {
            Call::Describe => &self.inner.reads,
            Call::Encrypt | Call::Decrypt => &self.inner.crypto,
        };
        let attempts = self.inner.settings.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            limit.wait().await;
            let token = self.token().await?;
            let mut request = build(&self.inner.client, token.expose_secret());
            let payload = json.map(|b| bytes::Bytes::from(b.to_vec()));
            if let Some(p) = &payload {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(p.clone());
            }
            let sent = request.send().await;
            if let Some(p) = payload {
                scrub(p);
            }
            let response = match sent {
                Ok(r) => r,
                Err(e) if attempt < attempts && (e.is_connect() || e.is_timeout()) => {
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                Err(e) => return Err(unreachable(e)),
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = response.bytes().await.map_err(unreachable)?;
            let body = Zeroizing::new(bytes.to_vec());
            scrub(bytes);
            if status.is_success() {
                return Ok(body);
            }
            if status == StatusCode::UNAUTHORIZED {
                // The token was refused: byokd's credentials, never the key's state.
                *self.inner.token.lock().await = None;
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                metrics::counter!(crate::telemetry::GCP_KMS_THROTTLED).increment(1);
                limit.hold(retry_after.unwrap_or_else(|| backoff(attempt)));
            }
            let retryable = status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::UNAUTHORIZED
                || status.is_server_error();
            if retryable && attempt < attempts {
                if status.is_server_error() {
                    tokio::time::sleep(retry_after.unwrap_or_else(|| backoff(attempt))).await;
                }
                continue;
            }
            return Err(classify(key, call, status, &body));
        }
    }

    fn url(&self, path: &str) -> Result<Url, KmsError> {
        self.inner
            .base
            .join(path)
            .map_err(|e| unreachable(format!("cannot form the request URL: {e}")))
    }

    fn checked(key_ref: &str) -> Result<(), KmsError> {
        match key_ref_problem(key_ref) {
            Some(reason) => Err(KmsError::InvalidKeyRef {
                provider: Provider::Gcp,
                reason,
            }),
            None => Ok(()),
        }
    }

    async fn get_key(&self, key_ref: &str) -> Result<CryptoKey, KmsError> {
        Self::checked(key_ref)?;
        let url = self.url(key_ref)?;
        let body = self
            .call(
                key_ref,
                Call::Describe,
                |c, token| c.get(url.clone()).bearer_auth(token),
                None,
            )
            .await?;
        serde_json::from_slice(&body)
            .map_err(|e| unreachable(format!("cryptoKeys.get answered no CryptoKey: {e}")))
    }

    async fn encrypt_one(
        &self,
        key_ref: &str,
        name: &str,
        dek: &Dek,
        ctx: DekContext<'_>,
    ) -> Result<Wrapped, KmsError> {
        let plaintext = Zeroizing::new(B64.encode(dek.expose()));
        let aad = ctx.aad();
        let request = EncryptRequest {
            plaintext: &plaintext,
            additional_authenticated_data: B64.encode(&aad),
            plaintext_crc32c: crc32c(dek.expose()).to_string(),
            additional_authenticated_data_crc32c: crc32c(&aad).to_string(),
        };
        let body = json_body(&request);
        let url = self.url(&format!("{name}:encrypt"))?;
        let answer = self
            .call(
                key_ref,
                Call::Encrypt,
                |c, token| c.post(url.clone()).bearer_auth(token),
                Some(body.as_slice()),
            )
            .await?;
        let r: EncryptResponse = serde_json::from_slice(&answer)
            .map_err(|e| unreachable(format!("encrypt answered no ciphertext: {e}")))?;
        if !r.verified_plaintext_crc32c || !r.verified_additional_authenticated_data_crc32c {
            return Err(unreachable(
                "encrypt did not verify the request's checksums (damaged in transit)",
            ));
        }
        let ciphertext = B64
            .decode(&r.ciphertext)
            .map_err(|_| unreachable("encrypt answered a ciphertext that is not base64"))?;
        if r.ciphertext_crc32c != Some(crc32c(&ciphertext)) {
            return Err(unreachable(
                "encrypt's ciphertext does not match its checksum (damaged in transit)",
            ));
        }
        let version = version_of(key_ref, &r.name).ok_or_else(|| {
            unreachable(format!(
                "encrypt answered with version {:?}, not one of this key's",
                r.name
            ))
        })?;
        Ok(Wrapped {
            version,
            ciphertext,
        })
    }

    async fn decrypt_one(&self, key_ref: &str, item: &WrappedRef<'_>) -> Result<Dek, KmsError> {
        let aad = item.ctx.aad();
        let request = DecryptRequest {
            ciphertext: B64.encode(item.ciphertext),
            additional_authenticated_data: B64.encode(&aad),
            ciphertext_crc32c: crc32c(item.ciphertext).to_string(),
            additional_authenticated_data_crc32c: crc32c(&aad).to_string(),
        };
        let url = self.url(&format!("{key_ref}:decrypt"))?;
        let body = serde_json::to_vec(&request).map_err(unreachable)?;
        let answer = self
            .call(
                key_ref,
                Call::Decrypt,
                |c, token| c.post(url.clone()).bearer_auth(token),
                Some(body.as_slice()),
            )
            .await?;
        let r: DecryptResponse = serde_json::from_slice(&answer)
            .map_err(|_| unreachable("decrypt answered no plaintext"))?;
        let dek = dek_from_base64(&r.plaintext)?;
        if r.plaintext_crc32c != Some(crc32c(dek.expose())) {
            return Err(unreachable(
                "decrypt's plaintext does not match its checksum (damaged in transit)",
            ));
        }
        Ok(dek)
    }

    /// Runs one request per item, `concurrency` at a time, results in item order. (The
    /// futures are made first, as in the AWS provider: a stream mapping items to futures
    /// that borrow them is a higher-ranked type the compiler cannot prove `Send`.)
    async fn run<F: std::future::Future>(&self, calls: Vec<F>) -> Vec<F::Output> {
        futures_util::stream::iter(calls)
            .buffered(self.inner.settings.concurrency.max(1))
            .collect()
            .await
    }
}

/// Exponential from 200 ms, capped at 5 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(5))).min(Duration::from_secs(5))
}

/// Whether an item's error is about that ciphertext or its version alone (the batch goes
/// on) rather than the key or the service (the batch fails as a whole). A DEK under a
/// disabled or destroyed old version fails alone: the other DEKs may be under other versions.
fn per_item(e: &KmsError) -> bool {
    matches!(e, KmsError::Integrity | KmsError::Unusable { .. })
}

impl KmsProvider for GcpKms {
    async fn describe(&self, key_ref: &str) -> Result<KeyInfo, KmsError> {
        let key = self.get_key(key_ref).await?;
        if key.purpose != "ENCRYPT_DECRYPT" {
            return Err(KmsError::InvalidKeyRef {
                provider: Provider::Gcp,
                reason: format!(
                    "the key's purpose is {:?}; byokd wraps DEKs with ENCRYPT_DECRYPT keys only",
                    key.purpose
                ),
            });
        }
        let Some(primary) = key.primary else {
            // No primary: encrypt has no version to use.
            return Err(KmsError::Unusable {
                provider: Provider::Gcp,
                key_ref: key_ref.to_owned(),
                state: KeyState::Disabled,
                operation: "wrap",
            });
        };
        let version = version_of(key_ref, &primary.name).ok_or_else(|| {
            unreachable(format!(
                "cryptoKeys.get named primary {:?}, not one of this key's versions",
                primary.name
            ))
        })?;
        tracing::debug!(key_ref, version, rotation_period = ?key.rotation_period,
            next_rotation_time = ?key.next_rotation_time, "described Cloud KMS key");
        Ok(KeyInfo {
            state: state_of(&primary.state),
            current_version: version,
            // Cloud KMS keys do not expire; expiry is byokd's own record.
            expires_at: None,
        })
    }

    async fn version_states(
        &self,
        key_ref: &str,
    ) -> Result<Option<BTreeMap<String, KeyState>>, KmsError> {
        Self::checked(key_ref)?;
        let mut states = BTreeMap::new();
        let mut page_token: Option<String> = None;
        for _ in 0..MAX_VERSION_PAGES {
            let mut url = self.url(&format!("{key_ref}/cryptoKeyVersions"))?;
            url.query_pairs_mut().append_pair("pageSize", "1000");
            if let Some(t) = &page_token {
                url.query_pairs_mut().append_pair("pageToken", t);
            }
            let body = self
                .call(
                    key_ref,
                    Call::Describe,
                    |c, token| c.get(url.clone()).bearer_auth(token),
                    None,
                )
                .await?;
            let page: VersionPage = serde_json::from_slice(&body).map_err(|e| {
                unreachable(format!("cryptoKeyVersions.list answered no versions: {e}"))
            })?;
            for v in page.crypto_key_versions {
                if let Some(n) = version_of(key_ref, &v.name) {
                    states.insert(n, state_of(&v.state));
                }
            }
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => page_token = Some(t),
                None => return Ok(Some(states)),
            }
        }
        // More versions than byokd reads: report those read; the rest say nothing.
        Ok(Some(states))
    }

    async fn wrap_many(
        &self,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError> {
        Self::checked(key_ref)?;
        let name = match version {
            Some(v) if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()) => {
                format!("{key_ref}/cryptoKeyVersions/{v}")
            }
            Some(v) => {
                return Err(KmsError::NoSuchVersion {
                    provider: Provider::Gcp,
                    key_ref: key_ref.to_owned(),
                    version: v.to_owned(),
                });
            }
            None => key_ref.to_owned(),
        };
        let calls: Vec<_> = items
            .iter()
            .map(|(dek, ctx)| self.encrypt_one(key_ref, &name, dek, *ctx))
            .collect();
        self.run(calls).await.into_iter().collect()
    }

    async fn unwrap_many(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError> {
        Self::checked(key_ref)?;
        let calls: Vec<_> = items
            .iter()
            .map(|item| self.decrypt_one(key_ref, item))
            .collect();
        let results = self.run(calls).await;
        if let Some(pos) = results
            .iter()
            .position(|r| r.as_ref().is_err_and(|e| !per_item(e)))
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

    const KEY: &str = "projects/acme-prod/locations/europe-west1/keyRings/byok/cryptoKeys/kek-1";

    #[test]
    fn key_refs_name_one_key() {
        assert_eq!(key_ref_problem(KEY), None);
        assert_eq!(
            key_ref_problem(
                "projects/example.com:acme-prod/locations/global/keyRings/r/cryptoKeys/k"
            ),
            None
        );
        for bad in [
            "projects/acme-prod/locations/europe-west1/keyRings/byok/cryptoKeys/kek-1/cryptoKeyVersions/3",
            "projects/acme-prod/locations/europe-west1/keyRings/byok",
            "projects/acme-prod/locations/europe-west1/keyRings/../cryptoKeys/k",
            "projects/ACME/locations/global/keyRings/r/cryptoKeys/k",
            "projects/acme-prod/locations/global/keyRings/r/cryptoKeys/k:encrypt",
            "projects/acme-prod/locations/global/keyRings/r/cryptoKeys/",
            "//cloudkms.googleapis.com/projects/acme-prod/locations/global/keyRings/r/cryptoKeys/k",
        ] {
            assert!(key_ref_problem(bad).is_some(), "{bad}");
        }
        assert!(
            key_ref_problem(&format!("{KEY}/cryptoKeyVersions/3"))
                .is_some_and(|p| p.contains("not one of its versions"))
        );
    }

    #[test]
    fn versions_come_from_the_keys_own_names() {
        assert_eq!(
            version_of(KEY, &format!("{KEY}/cryptoKeyVersions/12")).as_deref(),
            Some("12")
        );
        assert_eq!(
            version_of(KEY, &format!("{KEY}2/cryptoKeyVersions/1")),
            None
        );
        assert_eq!(version_of(KEY, &format!("{KEY}/cryptoKeyVersions/x")), None);
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn only_googles_own_error_bodies_are_definitive() {
        let body = |status: &str| {
            format!(
                r#"{{"error":{{"code":0,"message":"m is not enabled, current state is: DESTROYED.","status":"{status}"}}}}"#
            )
        };
        let c = |status, s: &str, call| classify(KEY, call, status, body(s).as_bytes());
        assert!(matches!(
            c(StatusCode::FORBIDDEN, "PERMISSION_DENIED", Call::Encrypt),
            KmsError::AccessDenied { .. }
        ));
        assert!(matches!(
            c(StatusCode::NOT_FOUND, "NOT_FOUND", Call::Describe),
            KmsError::NotFound { .. }
        ));
        assert!(matches!(
            c(
                StatusCode::BAD_REQUEST,
                "FAILED_PRECONDITION",
                Call::Decrypt
            ),
            KmsError::Unusable {
                state: KeyState::Destroyed,
                ..
            }
        ));
        assert!(matches!(
            c(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", Call::Decrypt),
            KmsError::Integrity
        ));
        for (status, name) in [
            (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
            (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        ] {
            assert!(c(status, name, Call::Decrypt).is_transient(), "{name}");
        }
        for status in [StatusCode::FORBIDDEN, StatusCode::NOT_FOUND] {
            let proxy = classify(KEY, Call::Describe, status, b"<html>Forbidden</html>");
            assert!(proxy.is_transient(), "{status}");
        }
    }

    #[test]
    fn states_map_and_unknown_ones_refuse() {
        assert_eq!(state_of("ENABLED"), KeyState::Enabled);
        assert_eq!(state_of("DISABLED"), KeyState::Disabled);
        assert_eq!(state_of("DESTROY_SCHEDULED"), KeyState::PendingDeletion);
        assert_eq!(state_of("DESTROYED"), KeyState::Destroyed);
        assert_eq!(state_of("PENDING_IMPORT"), KeyState::Disabled);
        assert_eq!(
            state_in_message(
                "CryptoKeyVersion x is not enabled, current state is: DESTROY_SCHEDULED."
            ),
            KeyState::PendingDeletion
        );
        assert_eq!(
            state_in_message("is not enabled, current state is: DISABLED."),
            KeyState::Disabled
        );
    }
}
