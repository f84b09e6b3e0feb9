//! The tests' Google Cloud KMS: a small Cloud KMS REST v1 + OAuth 2.0 token endpoint peer,
//! because no Cloud KMS emulator can be installed here (Google ships none; PyPI's
//! `gcplocal` has no KMS, `cloudbox` has no installable release, npm has only clients). It
//! serves, on 127.0.0.1 port 0, the documented subset byokd uses, as faithfully as a test
//! needs:
//!
//! * `POST /token`: the JWT bearer grant of a service-account key file (RFC 7523, as
//!   <https://developers.google.com/identity/protocols/oauth2/service-account#httprest>
//!   shows): the assertion's RS256 signature is verified with the test account's public key,
//!   and `iss`, `aud` (this endpoint), `scope` (cloudkms) and `exp` are checked; refusals use
//!   Google's OAuth error body (`{"error": "invalid_grant", ...}`).
//! * `GET /v1/{cryptoKey}` (`cryptoKeys.get`, <https://cloud.google.com/kms/docs/reference/rest/v1/projects.locations.keyRings.cryptoKeys/get>)
//!   and `GET /v1/{cryptoKey}/cryptoKeyVersions` (`cryptoKeyVersions.list`, paged).
//! * `POST /v1/{cryptoKey or version}:encrypt` and `POST /v1/{cryptoKey}:decrypt`
//!   (<https://cloud.google.com/kms/docs/reference/rest/v1/projects.locations.keyRings.cryptoKeys/encrypt>,
//!   `.../decrypt`): real AES-256-GCM per version with `additionalAuthenticatedData`, the
//!   ciphertext naming its version, the CRC32C fields checked and answered as
//!   <https://cloud.google.com/kms/docs/data-integrity-guidelines> describes.
//! * Errors in Google's JSON body (<https://cloud.google.com/apis/design/errors>): 401
//!   `UNAUTHENTICATED` without a token it issued, 403 `PERMISSION_DENIED` for a key whose
//!   IAM binding the test removed, 404 `NOT_FOUND`, 400 `FAILED_PRECONDITION` for a version
//!   that is not enabled ("... is not enabled, current state is: DISABLED."), 400
//!   `INVALID_ARGUMENT` for a ciphertext that does not authenticate, and injected 429
//!   `RESOURCE_EXHAUSTED` (with `Retry-After`) and 503 `UNAVAILABLE`.
//!
//! Not modelled: IAM policies beyond one deny switch per key, key rings and key creation
//! over the API (tests create keys directly), asymmetric or MAC operations (a key of another
//! purpose only answers `get`), protection levels, the eventual consistency of disabling,
//! quotas (429 only when injected), and Cloud KMS's real ciphertext format.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use byokd::config::GcpSettings;
use rand::RngCore;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The committed test-only service-account key file (generated for these tests).
const KEY_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/gcp-test-service-account.json"
);
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
const PROJECT: &str = "byokd-test";

fn crc32c(b: &[u8]) -> String {
    CRC32C.checksum(b).to_string()
}

/// One version's state and key material.
struct Version {
    state: &'static str,
    material: [u8; 32],
}

struct Key {
    purpose: &'static str,
    versions: Vec<Version>,
    primary: Option<usize>,
    denied: bool,
}

/// An injected failure of the next Cloud KMS requests.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// 429 RESOURCE_EXHAUSTED with `Retry-After: 1`.
    Quota,
    /// 503 UNAVAILABLE.
    Unavailable,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<String, Key>,
    tokens: HashSet<String>,
    faults: VecDeque<Fault>,
    token_failures: u32,
    /// Requests per `(method, suffix)`, e.g. `("POST", "encrypt")`.
    counts: HashMap<String, u64>,
}

/// A running peer.
#[derive(Clone)]
pub struct CloudKms {
    /// Its base URL (`http://127.0.0.1:<port>`), byokd's `endpoint_url`.
    pub url: String,
    /// The key file byokd reads: the test account with `token_uri` pointing here.
    pub key_file: std::path::PathBuf,
    inner: Arc<Mutex<Inner>>,
    public_key: Arc<Vec<u8>>,
    client_email: String,
    /// Crypto requests that came without their CRC32C fields.
    missing: Arc<std::sync::atomic::AtomicU64>,
}

fn google_error(code: StatusCode, status: &str, message: &str) -> Response {
    (
        code,
        [("content-type", "application/json; charset=UTF-8")],
        json!({"error": {"code": code.as_u16(), "message": message, "status": status}}).to_string(),
    )
        .into_response()
}

fn version_name(key: &str, i: usize) -> String {
    format!("{key}/cryptoKeyVersions/{}", i + 1)
}

impl CloudKms {
    /// Starts a peer on a port of its own.
    pub async fn start() -> CloudKms {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let file: Value =
            serde_json::from_str(&std::fs::read_to_string(KEY_FILE).expect("key file"))
                .expect("json");
        let pem = file["private_key"].as_str().expect("private_key");
        let der: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&B64.decode(der).expect("base64"))
            .expect("pkcs8");
        let public_key = pair.public().as_ref().to_vec();
        let mut own = file.clone();
        own["token_uri"] = json!(format!("{url}/token"));
        let key_file = std::env::temp_dir().join(format!("byokd-gcp-sa-{}.json", Uuid::now_v7()));
        std::fs::write(&key_file, own.to_string()).expect("write key file");
        let peer = CloudKms {
            url,
            key_file,
            inner: Arc::new(Mutex::new(Inner::default())),
            public_key: Arc::new(public_key),
            missing: Arc::default(),
            client_email: file["client_email"].as_str().expect("email").to_owned(),
        };
        let app = Router::new().fallback(handle).with_state(peer.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        peer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// byokd's `[kms.gcp]` settings for this peer.
    pub fn settings(&self) -> GcpSettings {
        serde_json::from_value(json!({
            "endpoint_url": self.url,
            "credentials_path": self.key_file,
            "timeout_secs": 5,
            "max_attempts": 2,
        }))
        .expect("gcp settings")
    }

    /// The same settings with the metadata server (this peer) instead of a key file.
    pub fn metadata_settings(&self) -> GcpSettings {
        serde_json::from_value(json!({
            "endpoint_url": self.url,
            "metadata_url": self.url,
            "timeout_secs": 5,
            "max_attempts": 2,
        }))
        .expect("gcp settings")
    }

    /// A new symmetric key (`ENCRYPT_DECRYPT`, version 1 enabled and primary); its name.
    pub fn create_key(&self, id: &str) -> String {
        self.create_key_with(id, "ENCRYPT_DECRYPT")
    }

    /// A new key of `purpose` with one enabled version.
    pub fn create_key_with(&self, id: &str, purpose: &'static str) -> String {
        let name = format!(
            "projects/{PROJECT}/locations/europe-west1/keyRings/byok-{}/cryptoKeys/{id}",
            &Uuid::now_v7().simple().to_string()[20..]
        );
        let mut material = [0u8; 32];
        rand::rng().fill_bytes(&mut material);
        self.lock().keys.insert(
            name.clone(),
            Key {
                purpose,
                versions: vec![Version {
                    state: "ENABLED",
                    material,
                }],
                primary: (purpose == "ENCRYPT_DECRYPT").then_some(0),
                denied: false,
            },
        );
        name
    }

    /// `CreateCryptoKeyVersion` (and, when `primary`, `UpdateCryptoKeyPrimaryVersion`):
    /// the new version's number.
    pub fn add_version(&self, key: &str, primary: bool) -> String {
        let mut material = [0u8; 32];
        rand::rng().fill_bytes(&mut material);
        let mut inner = self.lock();
        let k = inner.keys.get_mut(key).expect("key");
        k.versions.push(Version {
            state: "ENABLED",
            material,
        });
        if primary {
            k.primary = Some(k.versions.len() - 1);
        }
        k.versions.len().to_string()
    }

    /// `UpdateCryptoKeyVersion` / `DestroyCryptoKeyVersion` / `RestoreCryptoKeyVersion`:
    /// sets version `n`'s state (`ENABLED`, `DISABLED`, `DESTROY_SCHEDULED`, `DESTROYED`).
    pub fn set_state(&self, key: &str, n: &str, state: &'static str) {
        let i: usize = n.parse::<usize>().expect("number") - 1;
        self.lock().keys.get_mut(key).expect("key").versions[i].state = state;
    }

    /// Removes (or gives back) byokd's IAM binding on the key.
    pub fn deny(&self, key: &str, denied: bool) {
        self.lock().keys.get_mut(key).expect("key").denied = denied;
    }

    /// The next `n` Cloud KMS requests fail with `fault`.
    pub fn fault(&self, fault: Fault, n: usize) {
        let mut inner = self.lock();
        inner.faults.clear();
        inner.faults.extend(std::iter::repeat_n(fault, n));
    }

    /// The next `n` token requests fail with 503 (Google's OAuth endpoint down).
    pub fn fail_tokens(&self, n: u32) {
        self.lock().token_failures = n;
    }

    /// Forgets every issued token, as their expiry would.
    pub fn expire_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// Requests seen of one kind (`token`, `get`, `list`, `encrypt`, `decrypt`).
    pub fn count(&self, kind: &str) -> u64 {
        self.lock().counts.get(kind).copied().unwrap_or(0)
    }

    /// Crypto requests that came without their CRC32C fields.
    pub fn missing_checksums(&self) -> u64 {
        self.missing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decrypts as Cloud KMS would for someone with access, with `aad`: whether it
    /// authenticates (the tests' check of the binding, outside byokd).
    pub fn decrypts(&self, key: &str, ciphertext: &[u8], aad: &[u8]) -> bool {
        let inner = self.lock();
        let k = &inner.keys[key];
        open(k, ciphertext, aad).is_ok()
    }
}

/// The ciphertext format: version number (4 bytes), nonce (12), AES-256-GCM output.
fn seal(k: &Key, i: usize, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new_from_slice(&k.versions[i].material).expect("32 bytes");
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("encrypt");
    let mut out = u32::try_from(i + 1).expect("small").to_be_bytes().to_vec();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Opens a ciphertext: `Err(Some(i))` when version `i` is not enabled, `Err(None)` when it
/// does not authenticate.
fn open(k: &Key, ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, Option<usize>> {
    if ciphertext.len() < 16 + 16 {
        return Err(None);
    }
    let n = u32::from_be_bytes(ciphertext[..4].try_into().map_err(|_| None)?) as usize;
    let i = n
        .checked_sub(1)
        .filter(|i| *i < k.versions.len())
        .ok_or(None)?;
    if k.versions[i].state != "ENABLED" {
        return Err(Some(i));
    }
    let cipher = Aes256Gcm::new_from_slice(&k.versions[i].material).expect("32 bytes");
    cipher
        .decrypt(
            &Nonce::from(<[u8; 12]>::try_from(&ciphertext[4..16]).map_err(|_| None)?),
            Payload {
                msg: &ciphertext[16..],
                aad,
            },
        )
        .map_err(|_| None)
}

async fn handle(State(peer): State<CloudKms>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    if path == "/token" && parts.method == Method::POST {
        return token(&peer, &body);
    }
    if path == "/computeMetadata/v1/instance/service-accounts/default/token" {
        return metadata_token(&peer, &parts.headers, parts.uri.query());
    }
    let Some(rest) = path.strip_prefix("/v1/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    kms(
        &peer,
        &parts.method,
        rest,
        parts.uri.query(),
        &parts.headers,
        &body,
    )
}

/// The metadata server's token for the machine's default account
/// (<https://cloud.google.com/compute/docs/access/authenticate-workloads#applications>): only
/// with `Metadata-Flavor: Google`, and only for the cloudkms scope when scopes are asked.
fn metadata_token(peer: &CloudKms, headers: &HeaderMap, query: Option<&str>) -> Response {
    *peer.lock().counts.entry("metadata".into()).or_default() += 1;
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.",
        )
            .into_response();
    }
    let params: HashMap<String, String> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    if params.get("scopes").is_some_and(|s| {
        !s.split(',')
            .any(|s| s == "https://www.googleapis.com/auth/cloudkms")
    }) {
        return (StatusCode::BAD_REQUEST, "scopes do not include cloudkms").into_response();
    }
    let access_token = format!("ya29.metadata-{}", Uuid::now_v7().simple());
    peer.lock().tokens.insert(access_token.clone());
    ok(json!({"access_token": access_token, "expires_in": 3599, "token_type": "Bearer"}))
}

fn token(peer: &CloudKms, body: &Bytes) -> Response {
    peer.lock()
        .counts
        .entry("token".into())
        .and_modify(|n| *n += 1)
        .or_insert(1);
    {
        let mut inner = peer.lock();
        if inner.token_failures > 0 {
            inner.token_failures -= 1;
            return (StatusCode::SERVICE_UNAVAILABLE, "token service unavailable").into_response();
        }
    }
    let refuse = |why: &str| {
        (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/json")],
            json!({"error": "invalid_grant", "error_description": why}).to_string(),
        )
            .into_response()
    };
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return refuse("Invalid grant_type.");
    }
    let Some(assertion) = form.get("assertion") else {
        return refuse("Missing assertion.");
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    let [h, c, s] = parts.as_slice() else {
        return refuse("Invalid JWT.");
    };
    let Ok(signature) = B64URL.decode(s) else {
        return refuse("Invalid JWT Signature.");
    };
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        peer.public_key.as_slice(),
    );
    if key
        .verify(format!("{h}.{c}").as_bytes(), &signature)
        .is_err()
    {
        return refuse("Invalid JWT Signature.");
    }
    let decode = |p: &str| {
        B64URL
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    };
    let (Some(header), Some(claims)) = (decode(h), decode(c)) else {
        return refuse("Invalid JWT.");
    };
    let now = chrono::Utc::now().timestamp();
    let valid = header["alg"] == "RS256"
        && claims["iss"] == peer.client_email.as_str()
        && claims["aud"] == format!("{}/token", peer.url).as_str()
        && claims["scope"].as_str().is_some_and(|s| {
            s.split(' ')
                .any(|s| s == "https://www.googleapis.com/auth/cloudkms")
        })
        && claims["exp"]
            .as_i64()
            .is_some_and(|e| e > now && e <= now + 3700)
        && claims["iat"].as_i64().is_some_and(|i| i <= now + 60);
    if !valid {
        return refuse("Invalid JWT: claims do not match the account, audience or scope.");
    }
    let access_token = format!("ya29.test-{}", Uuid::now_v7().simple());
    peer.lock().tokens.insert(access_token.clone());
    ok(json!({"access_token": access_token, "expires_in": 3599, "token_type": "Bearer"}))
}

fn ok(v: Value) -> Response {
    axum::Json(v).into_response()
}

fn kms(
    peer: &CloudKms,
    method: &Method,
    rest: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let mut inner = peer.lock();
    if !bearer.is_some_and(|t| inner.tokens.contains(t)) {
        return google_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        );
    }
    if let Some(fault) = inner.faults.pop_front() {
        return match fault {
            Fault::Quota => {
                let mut r = google_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RESOURCE_EXHAUSTED",
                    "Quota exceeded for quota metric 'Cryptographic requests'.",
                );
                r.headers_mut()
                    .insert("retry-after", axum::http::HeaderValue::from_static("1"));
                r
            }
            Fault::Unavailable => google_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "The service is currently unavailable.",
            ),
        };
    }
    let (name, verb) = match rest.rsplit_once(':') {
        Some((n, v)) if matches!(v, "encrypt" | "decrypt") => (n, Some(v)),
        _ => (rest, None),
    };
    let (key_name, version, list) = if let Some(k) = name.strip_suffix("/cryptoKeyVersions") {
        (k, None, true)
    } else if let Some((k, v)) = name.split_once("/cryptoKeyVersions/") {
        (k, Some(v), false)
    } else {
        (name, None, false)
    };
    let kind = match (method.as_str(), verb, list) {
        ("GET", None, false) => "get",
        ("GET", None, true) => "list",
        ("POST", Some(v), false) => v,
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    *inner.counts.entry(kind.into()).or_default() += 1;
    let Some(key) = inner.keys.get(key_name) else {
        return google_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("CryptoKey {key_name} not found."),
        );
    };
    if key.denied {
        let permission = match kind {
            "get" => "cloudkms.cryptoKeys.get",
            "list" => "cloudkms.cryptoKeyVersions.list",
            "encrypt" => "cloudkms.cryptoKeyVersions.useToEncrypt",
            _ => "cloudkms.cryptoKeyVersions.useToDecrypt",
        };
        return google_error(
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
            &format!(
                "Permission '{permission}' denied on resource '{key_name}' (or it may not exist)."
            ),
        );
    }
    let describe = |i: usize| {
        json!({"name": version_name(key_name, i), "state": key.versions[i].state,
               "protectionLevel": "SOFTWARE", "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION",
               "createTime": "2026-11-01T00:00:00Z"})
    };
    match kind {
        "get" => {
            let mut v = json!({"name": key_name, "purpose": key.purpose,
                "createTime": "2026-11-01T00:00:00Z", "rotationPeriod": "7776000s",
                "nextRotationTime": "2027-01-30T00:00:00Z",
                "versionTemplate": {"protectionLevel": "SOFTWARE",
                                    "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"},
                "destroyScheduledDuration": "2592000s"});
            if let Some(p) = key.primary {
                v["primary"] = describe(p);
            }
            ok(v)
        }
        "list" => {
            let params: HashMap<String, String> =
                url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                    .into_owned()
                    .collect();
            let size: usize = params
                .get("pageSize")
                .and_then(|s| s.parse().ok())
                .unwrap_or(25)
                .clamp(1, 1000);
            let from: usize = params
                .get("pageToken")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let to = (from + size).min(key.versions.len());
            let page: Vec<Value> = (from..to).map(describe).collect();
            let mut v = json!({"cryptoKeyVersions": page, "totalSize": key.versions.len()});
            if to < key.versions.len() {
                v["nextPageToken"] = json!(to.to_string());
            }
            ok(v)
        }
        "encrypt" => {
            if key.purpose != "ENCRYPT_DECRYPT" {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "FAILED_PRECONDITION",
                    &format!(
                        "CryptoKey {key_name} has purpose {}, not ENCRYPT_DECRYPT.",
                        key.purpose
                    ),
                );
            }
            let Ok(req) = serde_json::from_slice::<Value>(body) else {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "Invalid JSON payload.",
                );
            };
            let field = |f: &str| req[f].as_str().and_then(|s| B64.decode(s).ok());
            let (Some(plaintext), aad) = (
                field("plaintext"),
                field("additionalAuthenticatedData").unwrap_or_default(),
            ) else {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "plaintext is required.",
                );
            };
            let i = match version {
                Some(v) => match v
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| n.checked_sub(1))
                    .filter(|i| *i < key.versions.len())
                {
                    Some(i) => i,
                    None => {
                        return google_error(
                            StatusCode::NOT_FOUND,
                            "NOT_FOUND",
                            &format!("CryptoKeyVersion {name} not found."),
                        );
                    }
                },
                None => match key.primary {
                    Some(p) => p,
                    None => {
                        return google_error(
                            StatusCode::BAD_REQUEST,
                            "FAILED_PRECONDITION",
                            &format!("CryptoKey {key_name} has no primary CryptoKeyVersion."),
                        );
                    }
                },
            };
            if key.versions[i].state != "ENABLED" {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "FAILED_PRECONDITION",
                    &format!(
                        "The request cannot be fulfilled: CryptoKeyVersion {} is not enabled, current state is: {}.",
                        version_name(key_name, i),
                        key.versions[i].state
                    ),
                );
            }
            let p_crc = req["plaintextCrc32c"].as_str();
            let a_crc = req["additionalAuthenticatedDataCrc32c"].as_str();
            if p_crc.is_some_and(|c| c != crc32c(&plaintext)) {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "The checksum in field plaintext_crc32c did not match the data in field plaintext.",
                );
            }
            if a_crc.is_some_and(|c| c != crc32c(&aad)) {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "The checksum in field additional_authenticated_data_crc32c did not match the data in field additional_authenticated_data.",
                );
            }
            let ciphertext = seal(key, i, &plaintext, &aad);
            let answer = json!({"name": version_name(key_name, i),
                "ciphertext": B64.encode(&ciphertext), "ciphertextCrc32c": crc32c(&ciphertext),
                "verifiedPlaintextCrc32c": p_crc.is_some(),
                "verifiedAdditionalAuthenticatedDataCrc32c": a_crc.is_some(),
                "protectionLevel": "SOFTWARE"});
            if p_crc.is_none() || a_crc.is_none() {
                peer.missing
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            ok(answer)
        }
        _ => {
            if version.is_some() {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "Decrypt takes a CryptoKey name, not a CryptoKeyVersion.",
                );
            }
            let Ok(req) = serde_json::from_slice::<Value>(body) else {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "Invalid JSON payload.",
                );
            };
            let field = |f: &str| req[f].as_str().and_then(|s| B64.decode(s).ok());
            let (Some(ciphertext), aad) = (
                field("ciphertext"),
                field("additionalAuthenticatedData").unwrap_or_default(),
            ) else {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "ciphertext is required.",
                );
            };
            let c_crc = req["ciphertextCrc32c"].as_str();
            let a_crc = req["additionalAuthenticatedDataCrc32c"].as_str();
            if c_crc.is_some_and(|c| c != crc32c(&ciphertext))
                || a_crc.is_some_and(|c| c != crc32c(&aad))
            {
                return google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "The checksum in field ciphertext_crc32c did not match the data in field ciphertext.",
                );
            }
            if c_crc.is_none() || a_crc.is_none() {
                peer.missing
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            match open(key, &ciphertext, &aad) {
                Ok(plain) => {
                    let used_primary = key.primary.is_some_and(|p| {
                        u32::from_be_bytes(ciphertext[..4].try_into().unwrap_or_default()) as usize
                            == p + 1
                    });
                    ok(
                        json!({"plaintext": B64.encode(&plain), "plaintextCrc32c": crc32c(&plain),
                        "usedPrimary": used_primary, "protectionLevel": "SOFTWARE"}),
                    )
                }
                Err(Some(i)) => google_error(
                    StatusCode::BAD_REQUEST,
                    "FAILED_PRECONDITION",
                    &format!(
                        "The request cannot be fulfilled: CryptoKeyVersion {} is not enabled, current state is: {}.",
                        version_name(key_name, i),
                        key.versions[i].state
                    ),
                ),
                Err(None) => google_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    "Decryption failed: verify that 'name' refers to the correct CryptoKey.",
                ),
            }
        }
    }
}

/// A Cloud Audit Log entry for a Cloud KMS admin call, as a log sink delivers it (see
/// `src/events/normalize/gcp.rs`).
pub fn audit_entry(method: &str, resource: &str, request: Value, response: Value) -> Value {
    json!({
        "logName": format!("projects/{PROJECT}/logs/cloudaudit.googleapis.com%2Factivity"),
        "resource": {"type": "cloudkms_cryptokeyversion", "labels": {"project_id": PROJECT}},
        "protoPayload": {
            "@type": "type.googleapis.com/google.cloud.audit.AuditLog",
            "serviceName": "cloudkms.googleapis.com",
            "methodName": method,
            "resourceName": resource,
            "authenticationInfo": {"principalEmail": "ops@tenant.example"},
            "request": request,
            "response": response,
            "status": {}
        },
        "insertId": format!("ins-{}", Uuid::now_v7().simple()),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "severity": "NOTICE",
        "receiveTimestamp": chrono::Utc::now().to_rfc3339(),
    })
}

/// The environment a `byokd` subprocess needs for the same settings.
pub fn env(settings: &GcpSettings) -> Vec<(String, String)> {
    let mut env = vec![(
        "BYOKD_KMS__GCP__ENDPOINT_URL".to_owned(),
        settings.endpoint_url.clone(),
    )];
    if let Some(path) = &settings.credentials_path {
        env.push((
            "BYOKD_KMS__GCP__CREDENTIALS_PATH".to_owned(),
            path.display().to_string(),
        ));
    }
    env
}
