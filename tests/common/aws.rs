//! The tests' AWS: the shared moto_server (AWS KMS and STS, started by `scripts/services
//! --test-peers` on 127.0.0.1:5005), byokd's `[kms.aws]` settings pointed at it, an SDK client
//! with which the tests play the tenant operating its keys, and [`Gate`], an HTTP server in
//! front of moto for what moto cannot do: enforce a revoked grant, and throttle like AWS's
//! request quotas.
//!
//! moto keeps keys per account and region and every key, alias and id is new per test, so
//! tests run in parallel on the one server. moto accepts any credentials; those STS issues for
//! an assumed role act in the role's account, which is what the assume-role test relies on.

use aws_sdk_kms::Client;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use byokd::config::AwsSettings;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// The region every test key lives in.
pub const REGION: &str = "eu-west-1";
/// moto's default account: byokd's own credentials act here.
pub const ACCOUNT: &str = "123456789012";

/// moto_server's address (`BYOKD_TEST_MOTO_URL`, else the local default).
pub fn moto_url() -> String {
    std::env::var("BYOKD_TEST_MOTO_URL").unwrap_or_else(|_| "http://127.0.0.1:5005".to_owned())
}

/// A shared-credentials file with moto's dummy keys, for byokd's default credential chain
/// (tests cannot set the process environment). Every test writes the same content to a
/// file of its own and renames it into place, so a reader never sees a partial file.
pub fn credentials_path() -> std::path::PathBuf {
    let path = std::env::temp_dir().join("byokd-test-aws-credentials");
    let mine = std::env::temp_dir().join(format!("byokd-test-aws-{}", Uuid::new_v4().simple()));
    std::fs::write(
        &mine,
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .expect("credentials file");
    std::fs::rename(&mine, &path).expect("credentials file in place");
    path
}

/// byokd's `[kms.aws]` for a KMS at `endpoint` (moto, or a [`Gate`] in front of it); STS is
/// moto itself.
pub fn settings(endpoint: &str) -> AwsSettings {
    serde_json::from_value(json!({
        "region": REGION,
        "endpoint_url": endpoint,
        "sts_endpoint_url": moto_url(),
        "credentials_path": credentials_path(),
        "profile": "default",
        "timeout_secs": 5,
        "max_attempts": 2,
    }))
    .expect("aws settings")
}

/// The environment `byokd` subprocesses need for the same settings.
pub fn env(settings: &AwsSettings) -> Vec<(String, String)> {
    let mut env = vec![
        ("BYOKD_KMS__AWS__REGION".to_owned(), settings.region.clone()),
        ("BYOKD_KMS__AWS__PROFILE".to_owned(), "default".to_owned()),
    ];
    if let Some(url) = &settings.endpoint_url {
        env.push(("BYOKD_KMS__AWS__ENDPOINT_URL".to_owned(), url.clone()));
    }
    if let Some(url) = &settings.sts_endpoint_url {
        env.push(("BYOKD_KMS__AWS__STS_ENDPOINT_URL".to_owned(), url.clone()));
    }
    if let Some(file) = &settings.credentials_path {
        env.push((
            "BYOKD_KMS__AWS__CREDENTIALS_PATH".to_owned(),
            file.display().to_string(),
        ));
    }
    env
}

fn http() -> aws_sdk_kms::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new().build_http()
}

/// The tenant's view of KMS: a client acting in moto's default account.
pub fn tenant_client() -> Client {
    let conf = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(moto_url())
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .http_client(http())
        .build();
    Client::from_conf(conf)
}

/// A client acting as `role_arn` (assumed through moto's STS), in the role's account.
pub async fn client_as(role_arn: &str, external_id: &str) -> Client {
    let base = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(moto_url())
        .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
        .http_client(http())
        .load()
        .await;
    let role = aws_config::sts::AssumeRoleProvider::builder(role_arn)
        .session_name("tests")
        .external_id(external_id)
        .configure(&base)
        .build()
        .await;
    let conf = aws_sdk_kms::config::Builder::from(&base)
        .credentials_provider(role)
        .build();
    Client::from_conf(conf)
}

/// A new symmetric key (id, ARN) made with `client`.
pub async fn create_key(client: &Client) -> (String, String) {
    let meta = client
        .create_key()
        .description("byokd test")
        .send()
        .await
        .expect("CreateKey")
        .key_metadata
        .expect("metadata");
    (
        meta.key_id().to_owned(),
        meta.arn().expect("arn").to_owned(),
    )
}

/// A new key with a new alias `alias/<prefix>-<random>`; returns (alias, key id, ARN).
pub async fn create_aliased_key(client: &Client, prefix: &str) -> (String, String, String) {
    let (id, arn) = create_key(client).await;
    let alias = format!(
        "alias/{prefix}-{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    client
        .create_alias()
        .alias_name(&alias)
        .target_key_id(&id)
        .send()
        .await
        .expect("CreateAlias");
    (alias, id, arn)
}

/// Why a [`Gate`] refuses a request.
#[derive(Default)]
struct Rules {
    /// Keys (id or ARN, as the request names them) whose Encrypt/Decrypt/ReEncrypt is denied.
    denied: HashSet<String>,
    /// Keys whose DescribeKey answer carries this `ValidTo` (epoch seconds), as a key with
    /// imported, expiring material would.
    valid_to: std::collections::HashMap<String, f64>,
    /// Keys whose DescribeKey answer reports this `KeyState` (e.g. `PendingImport`).
    key_state: std::collections::HashMap<String, String>,
    /// Every request is throttled (an account whose quota others use up).
    throttle_all: bool,
    /// Roles whose trust policy does not let byokd in: STS refuses their AssumeRole.
    untrusting: HashSet<String>,
}

struct GateState {
    moto: String,
    http: reqwest::Client,
    rules: Mutex<Rules>,
    limiter: Option<DefaultDirectRateLimiter>,
    forwarded: AtomicU64,
    throttled: AtomicU64,
    denied: AtomicU64,
    /// Forwarded requests per operation (`Encrypt`, `ReEncrypt`, ...).
    operations: Mutex<std::collections::HashMap<String, u64>>,
}

/// An HTTP server in front of moto. It forwards every request unchanged, except:
/// - cryptographic requests on a key [`Gate::revoke_grant`] named get AWS's
///   `AccessDeniedException`, as after RevokeGrant (moto records grants but never enforces
///   them);
/// - beyond its quota (requests per second, like AWS's shared quota) a request gets AWS's
///   `ThrottlingException`, without reaching moto.
pub struct Gate {
    pub url: String,
    state: Arc<GateState>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// A gate with no quota.
    pub async fn start() -> Gate {
        Gate::serve(None).await
    }

    /// A gate that throttles beyond `per_sec` requests per second (AWS counts per second: a
    /// second's worth may come at once).
    pub async fn with_quota(per_sec: u32) -> Gate {
        let rate = NonZeroU32::new(per_sec).expect("a quota above 0");
        Gate::serve(Some(RateLimiter::direct(Quota::per_second(rate)))).await
    }

    async fn serve(limiter: Option<DefaultDirectRateLimiter>) -> Gate {
        byokd::install_crypto_provider();
        let state = Arc::new(GateState {
            moto: moto_url(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .expect("client"),
            rules: Mutex::new(Rules::default()),
            limiter,
            forwarded: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            operations: Mutex::new(std::collections::HashMap::new()),
        });
        let app = axum::Router::new().fallback(gate).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Gate { url, state, task }
    }

    /// From now on, Encrypt, Decrypt and ReEncrypt naming `key` (id or ARN) are denied.
    pub fn revoke_grant(&self, key: &str) {
        self.state
            .rules
            .lock()
            .expect("rules")
            .denied
            .insert(key.to_owned());
    }

    /// From now on DescribeKey naming `key` reports imported material valid until `at`
    /// (moto implements no ImportKeyMaterial).
    pub fn set_valid_to(&self, key: &str, at: chrono::DateTime<chrono::Utc>) {
        self.state
            .rules
            .lock()
            .expect("rules")
            .valid_to
            .insert(key.to_owned(), at.timestamp() as f64);
    }

    /// From now on DescribeKey naming `key` reports `state` (moto cannot put a key in
    /// `PendingImport` after creating it).
    pub fn set_key_state(&self, key: &str, state: &str) {
        self.state
            .rules
            .lock()
            .expect("rules")
            .key_state
            .insert(key.to_owned(), state.to_owned());
    }

    /// From now on every request (`true`) or none beyond the quota (`false`) is throttled.
    pub fn throttle_all(&self, on: bool) {
        self.state.rules.lock().expect("rules").throttle_all = on;
    }

    /// Undoes [`Gate::revoke_grant`] (a new grant).
    pub fn restore_grant(&self, key: &str) {
        self.state.rules.lock().expect("rules").denied.remove(key);
    }

    /// From now on, STS refuses to let anyone assume `role_arn` (its trust policy no longer
    /// names byokd), as moto, which checks no trust policy, cannot. For this the gate must
    /// also be byokd's STS endpoint.
    pub fn distrust_role(&self, role_arn: &str) {
        self.state
            .rules
            .lock()
            .expect("rules")
            .untrusting
            .insert(role_arn.to_owned());
    }

    /// Requests passed on to moto.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// Requests answered `ThrottlingException`.
    pub fn throttled(&self) -> u64 {
        self.state.throttled.load(Ordering::SeqCst)
    }

    /// Requests for `operation` (e.g. `ReEncrypt`, or `Decrypt/acme` for those carrying
    /// tenant `acme`'s encryption context) passed on to moto.
    pub fn count(&self, operation: &str) -> u64 {
        self.state
            .operations
            .lock()
            .expect("operations")
            .get(operation)
            .copied()
            .unwrap_or(0)
    }

    /// Requests answered `AccessDeniedException`.
    pub fn denied(&self) -> u64 {
        self.state.denied.load(Ordering::SeqCst)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn aws_error(code: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [("content-type", "application/x-amz-json-1.1")],
        json!({ "__type": code, "message": message }).to_string(),
    )
        .into_response()
}

async fn gate(
    State(state): State<Arc<GateState>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let throttle_all = state.rules.lock().expect("rules").throttle_all;
    if throttle_all
        || state
            .limiter
            .as_ref()
            .is_some_and(|limiter| limiter.check().is_err())
    {
        state.throttled.fetch_add(1, Ordering::SeqCst);
        return aws_error("ThrottlingException", "Rate exceeded");
    }
    // STS speaks the query protocol: a form body, XML errors.
    let form = String::from_utf8_lossy(&body);
    if form.contains("Action=AssumeRole") {
        let untrusting = state.rules.lock().expect("rules").untrusting.clone();
        if let Some(role) = untrusting
            .iter()
            .find(|r| form.contains(&r.replace(':', "%3A").replace('/', "%2F")))
        {
            state.denied.fetch_add(1, Ordering::SeqCst);
            let xml = format!(
                "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error>\
                 <Type>Sender</Type><Code>AccessDenied</Code><Message>User: \
                 arn:aws:iam::{ACCOUNT}:user/byokd is not authorized to perform: \
                 sts:AssumeRole on resource: {role}</Message></Error>\
                 <RequestId>{}</RequestId></ErrorResponse>",
                Uuid::new_v4()
            );
            return (StatusCode::FORBIDDEN, [("content-type", "text/xml")], xml).into_response();
        }
    }
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let asked: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // Whose DEK a request carries: its encryption context's tenant.
    let tenant = ["EncryptionContext", "SourceEncryptionContext"]
        .iter()
        .find_map(|k| asked[*k]["tenant"].as_str())
        .map(str::to_owned);
    if matches!(
        target,
        "TrentService.Encrypt" | "TrentService.Decrypt" | "TrentService.ReEncrypt"
    ) {
        let named = ["KeyId", "SourceKeyId", "DestinationKeyId"]
            .iter()
            .filter_map(|k| asked[*k].as_str())
            .any(|k| state.rules.lock().expect("rules").denied.contains(k));
        if named {
            state.denied.fetch_add(1, Ordering::SeqCst);
            return aws_error(
                "AccessDeniedException",
                "User is not authorized to perform this operation: the grant was revoked",
            );
        }
    }
    let mut request = state.http.request(
        reqwest::Method::from_bytes(method.as_str().as_bytes()).expect("method"),
        format!("{}{}", state.moto, uri),
    );
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            request = request.header(name.as_str(), value.as_bytes());
        }
    }
    match request.body(body).send().await {
        Ok(r) => {
            state.forwarded.fetch_add(1, Ordering::SeqCst);
            let operation = target.strip_prefix("TrentService.").unwrap_or(target);
            {
                let mut counts = state.operations.lock().expect("operations");
                *counts.entry(operation.to_owned()).or_default() += 1;
                if let Some(tenant) = &tenant {
                    *counts.entry(format!("{operation}/{tenant}")).or_default() += 1;
                }
            }
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut out = HeaderMap::new();
            for (name, value) in r.headers() {
                if name != "content-length"
                    && name != "transfer-encoding"
                    && name != "connection"
                    && let (Ok(n), Ok(v)) = (
                        axum::http::HeaderName::from_bytes(name.as_str().as_bytes()),
                        axum::http::HeaderValue::from_bytes(value.as_bytes()),
                    )
                {
                    out.insert(n, v);
                }
            }
            let mut bytes = r.bytes().await.unwrap_or_default().to_vec();
            let (valid_to, key_state) = asked["KeyId"]
                .as_str()
                .map(|k| {
                    let rules = state.rules.lock().expect("rules");
                    (
                        rules.valid_to.get(k).copied(),
                        rules.key_state.get(k).cloned(),
                    )
                })
                .unwrap_or_default();
            if target == "TrentService.DescribeKey" && (valid_to.is_some() || key_state.is_some()) {
                let mut answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let meta = &mut answer["KeyMetadata"];
                meta["Origin"] = json!("EXTERNAL");
                if let Some(valid_to) = valid_to {
                    meta["ValidTo"] = json!(valid_to);
                    meta["ExpirationModel"] = json!("KEY_MATERIAL_EXPIRES");
                }
                if let Some(key_state) = key_state {
                    meta["KeyState"] = json!(key_state);
                }
                bytes = answer.to_string().into_bytes();
            }
            (status, out, bytes).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
