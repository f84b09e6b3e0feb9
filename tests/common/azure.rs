//! A test peer for Azure Key Vault (or a Managed HSM) and Microsoft Entra ID, on loopback.
//!
//! Why it exists: no Key Vault emulator can be installed here. PyPI and npm were searched
//! (`lowkey-vault` is a JVM/Docker image and on neither registry; the `azure-keyvault-emulator`
//! is a .NET container; PyPI's `amber-cloud` models vaults but has no wrapKey/unwrapKey and no
//! REST server), and Azure itself is out of reach. So byokd's Azure provider is tested against
//! this server, which implements the documented REST subset byokd uses, with real
//! cryptography, so that a wrong request shape, algorithm or binding fails here as it would
//! against Key Vault:
//!
//! - Entra ID client credentials, `POST /{tenant}/oauth2/v2.0/token` (form `grant_type=
//!   client_credentials`, `client_id`, `client_secret`, `scope=<resource>/.default`; answer
//!   `{token_type, expires_in (number), access_token}`; a wrong secret is 401 `invalid_client`
//!   AADSTS7000215). Reference: "Microsoft identity platform and the OAuth 2.0 client
//!   credentials flow" (learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow).
//!   A certificate credential instead sends `client_assertion_type=urn:ietf:params:oauth:
//!   client-assertion-type:jwt-bearer` and an RS256 `client_assertion` whose `x5t` names a
//!   registered certificate, verified here with its key ("Microsoft identity platform
//!   application authentication certificate credentials").
//! - Managed identity through the instance metadata service, `GET /metadata/identity/oauth2/
//!   token?api-version=2018-02-01&resource=...` with `Metadata: true` (`expires_in` is a
//!   string there). Reference: "How to use managed identities for Azure resources on an Azure
//!   VM to acquire an access token" (learn.microsoft.com/entra/identity/managed-identities-azure-resources/how-to-use-vm-token).
//! - Key Vault, api-version 7.5 required on every request (else 400 `BadParameter`), a bearer
//!   token for the vault's audience (`https://vault.azure.net`, or `https://managedhsm.azure.net`
//!   for an HSM) required (else 401 `Unauthorized` with a `WWW-Authenticate` challenge):
//!   `GET /keys/{name}[/{version}]` (KeyBundle: `key.kid/kty/key_ops/n/e`, `attributes.enabled/
//!   nbf/exp/created/updated/recoveryLevel/recoverableDays`), `POST /keys/{name}/{version}/
//!   wrapkey|unwrapkey` (`{alg, value}` base64url; RSA-OAEP-256 with the `rsa` crate for RSA keys,
//!   A256KW with `aes-kw` for `oct-HSM` keys), `GET /deletedkeys/{name}`. References: Key Vault
//!   REST API 7.5, "Get Key", "Wrap Key", "Unwrap Key", "Get Deleted Key"
//!   (learn.microsoft.com/rest/api/keyvault/keys/...).
//! - Error bodies `{"error": {"code", "message", "innererror": {"code"}}}`: 404 `KeyNotFound`;
//!   403 `Forbidden` with inner `AccessDenied` (access policy) or `ForbiddenByRbac` (Azure
//!   RBAC) when byokd's access is revoked; 403 `Forbidden` inner `KeyDisabled` for unwrapKey on a
//!   disabled key, while wrapKey on a disabled key still answers (as Key Vault does:
//!   Azure/azure-sdk-for-python#45342 lists the server's behaviour per operation); 429
//!   `Throttled` with `Retry-After` (seconds), per "Azure Key Vault throttling guidance";
//!   500 `InternalServerError`.
//!
//! Not modelled: `exp`/`nbf` enforcement on operations (Key Vault's own refusals there are not
//! documented with their bodies; byokd reads both attributes instead), the exact error of an
//! operation missing from `key_ops` (answered 403 `Forbidden` here; byokd checks `key_ops` at
//! registration), rotation policies (a test creates the new version), request signing (PoP),
//! the vault's real throttling counts, several vaults (one peer is one vault), and purge
//! protection.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use byokd::config::AzureSettings;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The directory (tenant) id, client id and secret the peer's Entra ID accepts.
pub const TENANT_ID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const CLIENT_ID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";
pub const CLIENT_SECRET: &str = "peer~client.secret-0123456789";

/// A key type the peer creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kty {
    Rsa,
    RsaHsm,
    OctHsm,
    Ec,
}

impl Kty {
    fn name(self) -> &'static str {
        match self {
            Kty::Rsa => "RSA",
            Kty::RsaHsm => "RSA-HSM",
            Kty::OctHsm => "oct-HSM",
            Kty::Ec => "EC",
        }
    }
}

enum Material {
    Rsa(Box<RsaPrivateKey>),
    Aes([u8; 32]),
    None,
}

struct Version {
    id: String,
    kty: Kty,
    material: Material,
    enabled: bool,
    nbf: Option<i64>,
    exp: Option<i64>,
    created: i64,
    key_ops: Vec<String>,
}

#[derive(Default)]
struct Key {
    versions: Vec<Version>,
    deleted: bool,
}

/// A fault the next Key Vault requests answer with.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// 429 with `Retry-After: <secs>`.
    Throttle(u64),
    /// 500.
    ServerError,
}

/// One Key Vault request as the peer saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub api_version: Option<String>,
    pub status: u16,
}

struct State_ {
    base: String,
    /// Registered certificate credentials: x5t (base64url SHA-1 of the DER) and public key.
    certificates: HashMap<String, RsaPublicKey>,
    vault_host: String,
    audience: &'static str,
    keys: HashMap<String, Key>,
    tokens: HashMap<String, &'static str>,
    token_requests: usize,
    client_secret: String,
    tokens_down: bool,
    denied: Option<&'static str>,
    faults: Vec<Fault>,
    recovery_level: &'static str,
    seen: Vec<Seen>,
}

type Shared = Arc<Mutex<State_>>;

/// The peer: one vault (or Managed HSM) and its Entra ID, on `127.0.0.1:<port>`.
pub struct AzurePeer {
    pub base: String,
    /// The vault's host as key identifiers name it (`<name>.vault.azure.net`).
    pub vault_host: String,
    state: Shared,
    handle: JoinHandle<()>,
}

impl Drop for AzurePeer {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn error(status: StatusCode, code: &str, message: &str, inner: Option<&str>) -> Response {
    let mut error = json!({ "code": code, "message": message });
    if let Some(inner) = inner {
        error["innererror"] = json!({ "code": inner });
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
}

fn not_found(what: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "KeyNotFound",
        &format!(
            "A key with (name/id) {what} was not found in this key vault. If you recently \
             deleted this key you may be able to recover it using the correct recovery command. \
             For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        ),
        None,
    )
}

impl AzurePeer {
    /// A Key Vault (`vault.azure.net`) peer.
    pub async fn vault(name: &str) -> AzurePeer {
        Self::start(format!("{name}.vault.azure.net"), "https://vault.azure.net").await
    }

    /// A Managed HSM (`managedhsm.azure.net`) peer.
    pub async fn managed_hsm(name: &str) -> AzurePeer {
        Self::start(
            format!("{name}.managedhsm.azure.net"),
            "https://managedhsm.azure.net",
        )
        .await
    }

    async fn start(vault_host: String, audience: &'static str) -> AzurePeer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State_ {
            base: base.clone(),
            certificates: HashMap::new(),
            vault_host: vault_host.clone(),
            audience,
            keys: HashMap::new(),
            tokens: HashMap::new(),
            token_requests: 0,
            client_secret: CLIENT_SECRET.to_owned(),
            tokens_down: false,
            denied: None,
            faults: Vec::new(),
            recovery_level: "Recoverable+Purgeable",
            seen: Vec::new(),
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        AzurePeer {
            base,
            vault_host,
            state,
            handle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State_> {
        self.state.lock().expect("peer state")
    }

    /// byokd's settings for this peer with client secret auth.
    pub fn settings(&self) -> AzureSettings {
        serde_json::from_value(json!({
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "authority_host": self.base,
            "endpoint_url": self.base,
            "timeout_secs": 5,
            "max_retry_after_secs": 2,
        }))
        .expect("azure settings")
    }

    /// Registers a certificate credential (its DER and public key) for the app.
    pub fn register_certificate(&self, der: &[u8], public: RsaPublicKey) {
        use sha1::Digest;
        let x5t = B64URL.encode(sha1::Sha1::digest(der));
        self.lock().certificates.insert(x5t, public);
    }

    /// byokd's settings for this peer with certificate credentials from `pem` (a file).
    pub fn certificate_settings(&self, pem: &std::path::Path) -> AzureSettings {
        serde_json::from_value(json!({
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "client_certificate_path": pem,
            "authority_host": self.base,
            "endpoint_url": self.base,
            "timeout_secs": 5,
        }))
        .expect("azure settings")
    }

    /// byokd's settings for this peer with managed identity auth.
    pub fn managed_identity_settings(&self) -> AzureSettings {
        serde_json::from_value(json!({
            "auth": "managed_identity",
            "imds_endpoint": format!("{}/metadata/identity/oauth2/token", self.base),
            "endpoint_url": self.base,
            "timeout_secs": 5,
        }))
        .expect("azure settings")
    }

    /// The versionless key identifier of `name`.
    pub fn key_ref(&self, name: &str) -> String {
        format!("https://{}/keys/{name}", self.vault_host)
    }

    /// Creates key `name` (or a new version of it) of type `kty` with `exp`; returns the
    /// version.
    pub fn create_key(&self, name: &str, kty: Kty, exp: Option<i64>) -> String {
        let material = match kty {
            Kty::Rsa | Kty::RsaHsm => {
                let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa key");
                Material::Rsa(Box::new(key))
            }
            Kty::OctHsm => {
                let mut k = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut k);
                Material::Aes(k)
            }
            Kty::Ec => Material::None,
        };
        let ops = match kty {
            Kty::Ec => vec!["sign", "verify"],
            Kty::OctHsm => vec!["encrypt", "decrypt", "wrapKey", "unwrapKey"],
            _ => vec![
                "encrypt",
                "decrypt",
                "sign",
                "verify",
                "wrapKey",
                "unwrapKey",
            ],
        };
        let id = Uuid::new_v4().simple().to_string();
        let mut state = self.lock();
        let key = state.keys.entry(name.to_owned()).or_default();
        key.versions.push(Version {
            id: id.clone(),
            kty,
            material,
            enabled: true,
            nbf: None,
            exp,
            created: now(),
            key_ops: ops.into_iter().map(str::to_owned).collect(),
        });
        id
    }

    /// A new current version of `name` (a rotation), same type; returns it.
    pub fn rotate(&self, name: &str, exp: Option<i64>) -> String {
        let kty = self.lock().keys[name]
            .versions
            .last()
            .expect("a version")
            .kty;
        self.create_key(name, kty, exp)
    }

    fn with_current(&self, name: &str, f: impl FnOnce(&mut Version)) {
        let mut state = self.lock();
        let version = state
            .keys
            .get_mut(name)
            .and_then(|k| k.versions.last_mut())
            .expect("key exists");
        f(version);
    }

    /// Enables or disables the current version (as the portal's "Enabled" switch does).
    pub fn set_enabled(&self, name: &str, enabled: bool) {
        self.with_current(name, |v| v.enabled = enabled);
    }

    /// Sets the current version's `nbf`.
    pub fn set_nbf(&self, name: &str, nbf: Option<i64>) {
        self.with_current(name, |v| v.nbf = nbf);
    }

    /// Sets the current version's permitted operations.
    pub fn set_key_ops(&self, name: &str, ops: &[&str]) {
        self.with_current(name, |v| {
            v.key_ops = ops.iter().map(|s| (*s).to_owned()).collect();
        });
    }

    /// Soft-deletes the key (recoverable).
    pub fn delete(&self, name: &str) {
        if let Some(k) = self.lock().keys.get_mut(name) {
            k.deleted = true;
        }
    }

    /// Purges the key: gone for good.
    pub fn purge(&self, name: &str) {
        self.lock().keys.remove(name);
    }

    /// The vault's recovery level for new key bundles.
    pub fn set_recovery_level(&self, level: &'static str) {
        self.lock().recovery_level = level;
    }

    /// Refuses byokd with 403 `Forbidden` and this inner code (`AccessDenied`,
    /// `ForbiddenByRbac`); `None` lets it in again.
    pub fn deny(&self, inner: Option<&'static str>) {
        self.lock().denied = inner;
    }

    /// The next `n` Key Vault requests answer `fault`.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut state = self.lock();
        state.faults = vec![fault; n];
    }

    /// Entra ID answers 503 to every token request (and forgets the tokens it issued, so
    /// byokd must ask again); `false` restores it.
    pub fn tokens_down(&self, down: bool) {
        let mut state = self.lock();
        state.tokens_down = down;
        if down {
            state.tokens.clear();
        }
    }

    /// Changes the secret Entra ID accepts (byokd's becomes wrong).
    pub fn rotate_client_secret(&self, secret: &str) {
        self.lock().client_secret = secret.to_owned();
    }

    /// Token requests answered so far.
    pub fn token_requests(&self) -> usize {
        self.lock().token_requests
    }

    /// Key Vault requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// The kid of `name`'s `version`.
    pub fn kid(&self, name: &str, version: &str) -> String {
        format!("https://{}/keys/{name}/{version}", self.vault_host)
    }
}

/// `BYOKD_KMS__AZURE__*` variables for a `byokd` child process with `settings`.
pub fn env(settings: &AzureSettings) -> Vec<(String, String)> {
    use secrecy::ExposeSecret;
    let var = |name: &str| format!("BYOKD_KMS__AZURE__{name}");
    let mut env = vec![
        (var("AUTH"), settings.auth().kind().to_owned()),
        (var("AUTHORITY_HOST"), settings.authority_host.clone()),
        (var("IMDS_ENDPOINT"), settings.imds_endpoint.clone()),
    ];
    for (name, value) in [
        ("TENANT_ID", settings.tenant_id.clone()),
        ("CLIENT_ID", settings.client_id.clone()),
        (
            "CLIENT_SECRET",
            settings
                .client_secret
                .as_ref()
                .map(|s| s.expose_secret().to_owned()),
        ),
        ("ENDPOINT_URL", settings.endpoint_url.clone()),
        (
            "CLIENT_CERTIFICATE_PATH",
            settings
                .client_certificate_path
                .as_ref()
                .map(|p| p.display().to_string()),
        ),
    ] {
        if let Some(value) = value {
            env.push((var(name), value));
        }
    }
    env
}

fn query(uri: &Uri) -> HashMap<String, String> {
    url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let segments: Vec<String> = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let mut state = state.lock().expect("peer state");
    match (method.as_str(), segments.as_slice()) {
        ("POST", [_tenant, "oauth2", "v2.0", "token"]) => client_credentials(&mut state, &body),
        ("GET", ["metadata", "identity", "oauth2", "token"]) => imds(&mut state, &uri, &headers),
        _ => {
            let response = key_vault(&mut state, &method, &uri, &headers, &segments, &body);
            let seen = Seen {
                method: method.to_string(),
                path: uri.path().to_owned(),
                api_version: query(&uri).get("api-version").cloned(),
                status: response.status().as_u16(),
            };
            state.seen.push(seen);
            response
        }
    }
}

fn issue(state: &mut State_, audience: &'static str) -> String {
    let token = format!("eyJ0eXAiOiJKV1Qi.{}", Uuid::new_v4().simple());
    state.tokens.insert(token.clone(), audience);
    state.token_requests += 1;
    token
}

fn audience_of(resource: &str) -> Option<&'static str> {
    match resource.trim_end_matches('/') {
        "https://vault.azure.net" => Some("https://vault.azure.net"),
        "https://managedhsm.azure.net" => Some("https://managedhsm.azure.net"),
        _ => None,
    }
}

fn client_credentials(state: &mut State_, body: &[u8]) -> Response {
    if state.tokens_down {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": "temporarily_unavailable",
                "error_description": "AADSTS90033: A transient error has occurred. Please try again."})),
        )
            .into_response();
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str);
    if field("grant_type") != Some("client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "unsupported_grant_type",
                "error_description": "AADSTS70003: The app requested an unsupported grant type."})),
        )
            .into_response();
    }
    let authenticated = match field("client_assertion_type") {
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer") => {
            field("client_id") == Some(CLIENT_ID)
                && field("client_assertion").is_some_and(|a| assertion_ok(state, a))
        }
        _ => {
            field("client_id") == Some(CLIENT_ID)
                && field("client_secret") == Some(&state.client_secret)
        }
    };
    if !authenticated {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                "error_codes": [7000215]})),
        )
            .into_response();
    }
    let Some(audience) = field("scope")
        .and_then(|s| s.strip_suffix("/.default"))
        .and_then(audience_of)
    else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_scope",
                "error_description": "AADSTS1002012: The provided value for scope is not valid."})),
        )
            .into_response();
    };
    let token = issue(state, audience);
    axum::Json(
        json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
        "access_token": token}),
    )
    .into_response()
}

/// Checks a client assertion as Entra ID documents it: an RS256 JWT whose header's `x5t`
/// names a registered certificate whose key verifies the signature, `aud` the token
/// endpoint, `iss` and `sub` the client id, and a current `nbf`..`exp`.
fn assertion_ok(state: &State_, assertion: &str) -> bool {
    use rsa::signature::Verifier;
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts.as_slice() else {
        return false;
    };
    let decode =
        |p: &str| -> Option<Value> { serde_json::from_slice(&B64URL.decode(p).ok()?).ok() };
    let (Some(h), Some(c)) = (decode(header), decode(claims)) else {
        return false;
    };
    let Some(public) = h["x5t"].as_str().and_then(|t| state.certificates.get(t)) else {
        return false;
    };
    let Ok(sig) = B64URL
        .decode(signature)
        .map_err(|_| ())
        .and_then(|b| rsa::pkcs1v15::Signature::try_from(b.as_slice()).map_err(|_| ()))
    else {
        return false;
    };
    let verifier = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(public.clone());
    let audience = format!("{}/{TENANT_ID}/oauth2/v2.0/token", state.base);
    let t = now();
    h["alg"] == "RS256"
        && verifier
            .verify(format!("{header}.{claims}").as_bytes(), &sig)
            .is_ok()
        && c["aud"] == audience.as_str()
        && c["iss"] == CLIENT_ID
        && c["sub"] == CLIENT_ID
        && c["exp"].as_i64().is_some_and(|exp| exp > t)
        && c["nbf"].as_i64().is_some_and(|nbf| nbf <= t + 60)
}

fn imds(state: &mut State_, uri: &Uri, headers: &HeaderMap) -> Response {
    let q = query(uri);
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_request",
                "error_description": "Required metadata header not specified"})),
        )
            .into_response();
    }
    if state.tokens_down {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(
                json!({"error": "unknown", "error_description": "Failed to retrieve token"}),
            ),
        )
            .into_response();
    }
    let audience = q.get("resource").and_then(|r| audience_of(r));
    let (Some(audience), Some("2018-02-01")) = (audience, q.get("api-version").map(String::as_str))
    else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_resource",
                "error_description": "AADSTS500011: The resource principal was not found"})),
        )
            .into_response();
    };
    let token = issue(state, audience);
    let exp = now() + 86_399;
    axum::Json(
        json!({"access_token": token, "client_id": CLIENT_ID, "expires_in": "86399",
        "expires_on": exp.to_string(), "ext_expires_in": "86399", "not_before": now().to_string(),
        "resource": audience, "token_type": "Bearer"}),
    )
    .into_response()
}

fn bundle(state: &State_, name: &str, v: &Version) -> Value {
    let mut key = json!({
        "kid": format!("https://{}/keys/{name}/{}", state.vault_host, v.id),
        "kty": v.kty.name(),
        "key_ops": v.key_ops,
    });
    if let Material::Rsa(k) = &v.material {
        key["n"] = json!(B64URL.encode(k.n().to_bytes_be()));
        key["e"] = json!(B64URL.encode(k.e().to_bytes_be()));
    }
    let mut attributes = json!({
        "enabled": v.enabled, "created": v.created, "updated": v.created,
        "recoveryLevel": state.recovery_level, "recoverableDays": 90,
    });
    if let Some(nbf) = v.nbf {
        attributes["nbf"] = json!(nbf);
    }
    if let Some(exp) = v.exp {
        attributes["exp"] = json!(exp);
    }
    json!({ "key": key, "attributes": attributes })
}

fn key_vault(
    state: &mut State_,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    segments: &[&str],
    body: &[u8],
) -> Response {
    let q = query(uri);
    if q.get("api-version").map(String::as_str) != Some("7.5") {
        return error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "The specified version is not recognized. Consider using the latest supported version.",
            None,
        );
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token.and_then(|t| state.tokens.get(t)) != Some(&state.audience) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "AKV10000: Request is missing a Bearer or PoP token.",
            None,
        );
        if let Ok(v) = format!(
            "Bearer authorization=\"https://login.microsoftonline.com/{TENANT_ID}\", resource=\"{}\"",
            state.audience
        )
        .parse()
        {
            response.headers_mut().insert("www-authenticate", v);
        }
        return response;
    }
    if !state.faults.is_empty() {
        return match state.faults.remove(0) {
            Fault::Throttle(secs) => {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Throttled",
                    "Request was not processed because too many requests were received. Reason: A1",
                    None,
                );
                r.headers_mut()
                    .insert("retry-after", secs.to_string().parse().expect("header"));
                r
            }
            Fault::ServerError => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "An unexpected error occurred.",
                None,
            ),
        };
    }
    if let Some(inner) = state.denied {
        let message = if inner == "ForbiddenByRbac" {
            format!(
                "Caller is not authorized to perform action on resource.\r\nCaller: appid={CLIENT_ID}\r\nAction: 'Microsoft.KeyVault/vaults/keys/read'"
            )
        } else {
            format!(
                "The user, group or application 'appid={CLIENT_ID}' does not have keys permission on key vault '{};location=westeurope'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
                state.vault_host
            )
        };
        return error(StatusCode::FORBIDDEN, "Forbidden", &message, Some(inner));
    }
    match (method.as_str(), segments) {
        ("GET", ["keys", name]) => match state.keys.get(*name).filter(|k| !k.deleted) {
            Some(key) => axum::Json(bundle(state, name, key.versions.last().expect("version")))
                .into_response(),
            None => not_found(name),
        },
        ("GET", ["keys", name, version]) => {
            match state
                .keys
                .get(*name)
                .filter(|k| !k.deleted)
                .and_then(|k| k.versions.iter().find(|v| v.id == *version))
            {
                Some(v) => axum::Json(bundle(state, name, v)).into_response(),
                None => not_found(&format!("{name}/{version}")),
            }
        }
        ("GET", ["deletedkeys", name]) => match state.keys.get(*name).filter(|k| k.deleted) {
            Some(key) => {
                let mut b = bundle(state, name, key.versions.last().expect("version"));
                b["recoveryId"] = json!(format!("https://{}/deletedkeys/{name}", state.vault_host));
                b["deletedDate"] = json!(now());
                b["scheduledPurgeDate"] = json!(now() + 90 * 86_400);
                axum::Json(b).into_response()
            }
            None => not_found(name),
        },
        ("POST", ["keys", name, version, op @ ("wrapkey" | "unwrapkey")]) => {
            let Some(v) = state
                .keys
                .get(*name)
                .filter(|k| !k.deleted)
                .and_then(|k| k.versions.iter().find(|v| v.id == *version))
            else {
                return not_found(&format!("{name}/{version}"));
            };
            let kid = format!("https://{}/keys/{name}/{version}", state.vault_host);
            key_operation(v, &kid, op, body)
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "The requested resource does not exist.",
            None,
        ),
    }
}

fn bad(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "BadParameter", message, None)
}

fn key_operation(v: &Version, kid: &str, op: &str, body: &[u8]) -> Response {
    let wrap = op == "wrapkey";
    let operation = if wrap { "wrapKey" } else { "unwrapKey" };
    if !v.key_ops.iter().any(|o| o == operation) {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("Operation {operation} is not permitted on this key."),
            None,
        );
    }
    if !wrap && !v.enabled {
        return error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Operation unwrapKey is not allowed on a disabled key.",
            Some("KeyDisabled"),
        );
    }
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (Some(alg), Some(value)) = (request["alg"].as_str(), request["value"].as_str()) else {
        return bad("The request body must carry alg and value.");
    };
    let Ok(input) = B64URL.decode(value) else {
        return bad("value is not base64url.");
    };
    let output = match (&v.material, alg) {
        (Material::Rsa(key), "RSA-OAEP-256") => {
            if wrap {
                RsaPublicKey::from(key.as_ref())
                    .encrypt(
                        &mut rsa::rand_core::OsRng,
                        Oaep::new::<sha2::Sha256>(),
                        &input,
                    )
                    .ok()
            } else {
                key.decrypt(Oaep::new::<sha2::Sha256>(), &input).ok()
            }
        }
        (Material::Aes(k), "A256KW") => {
            let kek = aes_kw::KekAes256::from(*k);
            if wrap {
                kek.wrap_vec(&input).ok()
            } else {
                kek.unwrap_vec(&input).ok()
            }
        }
        _ => {
            return bad(&format!(
                "Invalid algorithm {alg} for a {} key.",
                v.kty.name()
            ));
        }
    };
    match output {
        Some(out) => axum::Json(json!({
            "kid": kid,
            "value": B64URL.encode(out),
        }))
        .into_response(),
        None => bad("Bad Request"),
    }
}
