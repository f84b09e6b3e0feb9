//! Configuration: compiled-in defaults, then a TOML file (`BYOKD_CONFIG`), then `BYOKD_*`
//! environment variables, validated once at start.
//!
//! Secrets are [`SecretString`]s and URLs print with their passwords redacted, so `Debug`
//! output of a [`Config`] is safe to log.

use base64::Engine;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The data dir of standalone mode when `BYOKD_DATA_DIR` is not set.
pub const DEFAULT_DATA_DIR: &str = "./byokd-data";

/// Why the configuration cannot be used: one line per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct ConfigError(pub Vec<String>);

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// AMQP names and tuning. The names default to the topology in the README; tests and
/// side-by-side environments override them to share one broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Topic exchange KMS lifecycle events are published to.
    pub lifecycle_exchange: String,
    /// Quorum queue byokd consumes.
    pub lifecycle_queue: String,
    /// Quorum queue of the urgent lane (revocations skip the backlog); empty disables it.
    pub urgent_queue: String,
    /// Routing keys bound to the urgent lane.
    pub urgent_routing_keys: Vec<String>,
    /// Exchange dead-lettered events go to.
    pub dead_letter_exchange: String,
    /// Queue that keeps dead-lettered events.
    pub dead_letter_queue: String,
    /// Topic exchange tenant access changes are published to.
    pub access_exchange: String,
    /// Unacknowledged deliveries the broker may push ahead (basic.qos).
    pub prefetch: u16,
    /// Most events applied in one database transaction.
    pub batch_size: usize,
    /// Batches a consumer applies at once, each in its own transaction: while one waits for
    /// the database, the next is parsed and planned. Acks still follow delivery order.
    pub pipeline: usize,
    /// Deliveries after which the broker dead-letters a message (quorum `x-delivery-limit`).
    pub delivery_limit: u32,
    /// Larger messages are dead-lettered unparsed.
    pub max_message_bytes: usize,
    /// The most memory unacknowledged deliveries may take per consumer: the prefetch is cut
    /// to `prefetch_bytes / max_message_bytes` when that is smaller, so a flood of messages
    /// at the size limit cannot hold more than this. (The broker's `max_message_size` must
    /// be `max_message_bytes` for the bound to hold: a larger message is read whole before
    /// byokd can look at it.)
    pub prefetch_bytes: usize,
}

impl AmqpSettings {
    /// The prefetch actually asked of the broker: `prefetch`, bounded by the memory budget.
    pub fn effective_prefetch(&self) -> u16 {
        let by_budget = (self.prefetch_bytes / self.max_message_bytes.max(1)).max(1);
        u16::try_from(by_budget)
            .unwrap_or(u16::MAX)
            .min(self.prefetch)
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            lifecycle_exchange: "byok.lifecycle".into(),
            lifecycle_queue: "byokd.lifecycle".into(),
            urgent_queue: "byokd.lifecycle.urgent".into(),
            urgent_routing_keys: [
                "*.disabled",
                "*.deletion_scheduled",
                "*.destroyed",
                "*.access_revoked",
                "*.expired",
            ]
            .map(String::from)
            .to_vec(),
            dead_letter_exchange: "byok.lifecycle.dlx".into(),
            dead_letter_queue: "byokd.lifecycle.dead".into(),
            access_exchange: "byok.access".into(),
            prefetch: 2048,
            batch_size: 1024,
            pipeline: 2,
            delivery_limit: 20,
            max_message_bytes: 256 * 1024,
            prefetch_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Notification delivery (`[notify]`): retry schedule, timeouts, concurrency and endpoint
/// health. Defaults follow Svix's schedule and limits. (How long delivered rows are kept is
/// the `outbox_prune` schedule's `retention_days`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifySettings {
    /// Seconds to wait after each failed attempt, in order; once exhausted the notification
    /// is dead (so `len + 1` attempts in all).
    pub retry_schedule_secs: Vec<u64>,
    /// Each delay is drawn uniformly from `delay * (1 +- jitter)`, so a burst of failures
    /// does not retry in lockstep.
    pub retry_jitter: f64,
    /// Upper bound on a peer's `Retry-After`, in seconds.
    pub retry_after_max_secs: u64,
    /// Per-request timeout of a webhook POST, in milliseconds.
    pub webhook_timeout_ms: u64,
    /// Timeout of one SMTP send (connect to end of DATA), in milliseconds.
    pub smtp_timeout_ms: u64,
    /// Deliveries in flight at once, over all recipients.
    pub max_in_flight: usize,
    /// Deliveries in flight at once to one endpoint or mailbox.
    pub max_in_flight_per_recipient: usize,
    /// Database connections of delivery's own pool, kept apart from the consumer's so a
    /// delivery backlog never starves event intake of connections.
    pub database_connections: u32,
    /// How long a claim lasts; a worker that dies mid-delivery loses its rows after this.
    /// Longer than either timeout.
    pub lease_secs: u64,
    /// How often to look for due rows when idle, in milliseconds.
    pub poll_ms: u64,
    /// A webhook endpoint failing without a success for this long is disabled.
    pub disable_endpoint_after_secs: u64,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            retry_schedule_secs: vec![5, 300, 1800, 7200, 18000, 36000, 36000],
            retry_jitter: 0.2,
            retry_after_max_secs: 3600,
            webhook_timeout_ms: 15_000,
            smtp_timeout_ms: 30_000,
            max_in_flight: 64,
            max_in_flight_per_recipient: 4,
            database_connections: 4,
            lease_secs: 120,
            poll_ms: 500,
            disable_endpoint_after_secs: 5 * 24 * 3600,
        }
    }
}

/// A webhook the platform's operators receive notifications on (`[[operator_webhooks]]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorWebhook {
    /// Short name, unique among operator webhooks: the outbox recipient is
    /// `operator:<name>`, so renaming one starts a new delivery history.
    pub name: String,
    /// Where to POST (the SSRF guard applies as for tenants' endpoints).
    pub url: String,
    /// Standard Webhooks signing secret (`whsec_...`).
    pub secret: SecretString,
}

impl std::fmt::Debug for OperatorWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorWebhook")
            .field("name", &self.name)
            .field("url", &redact_query(&self.url))
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

/// A list given either as a TOML array or as one comma-separated string (an environment
/// variable such as `BYOKD_OPERATOR_EMAILS=a@x,b@y`).
fn comma_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Either::Many(v) => v,
    })
}

/// Parses a comma-separated list of CIDR ranges (a bare address counts as /32 or /128).
///
/// # Errors
///
/// The first part that is not a range, named.
pub fn parse_cidrs(cidrs: &str) -> Result<Vec<ipnet::IpNet>, String> {
    cidrs
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            part.parse::<ipnet::IpNet>()
                .or_else(|_| part.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("{part:?} is not a CIDR range"))
        })
        .collect()
}

/// A URL without its query string, fragment and password, safe to log.
pub fn redact_query(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            u.set_fragment(None);
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// Re-wrap tuning (`[rewrap]` in the config file, `BYOKD_REWRAP__*`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewrapSettings {
    /// DEKs per claimed batch (one transaction each).
    pub batch_size: i64,
    /// Worker tasks per replica.
    pub concurrency: usize,
    /// Attempts before a failing DEK counts as failed for good.
    pub max_attempts: i32,
    /// Most DEK operations per second per provider name (0: unlimited). Remote KMSs
    /// throttle. Names are checked when the daemon starts (`rewrap::rate_limits`).
    pub rate_limits: BTreeMap<String, u32>,
}

impl Default for RewrapSettings {
    fn default() -> Self {
        RewrapSettings {
            batch_size: 1000,
            concurrency: 2,
            max_attempts: 5,
            rate_limits: BTreeMap::new(),
        }
    }
}

/// `[kms]` settings: one optional table per remote provider.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KmsSettings {
    /// `[kms.vault]`.
    pub vault: Option<VaultSettings>,
    /// `[kms.aws]`.
    pub aws: Option<AwsSettings>,
    /// `[kms.azure]`.
    pub azure: Option<AzureSettings>,
    /// `[kms.gcp]`.
    pub gcp: Option<GcpSettings>,
}

/// `[kms.gcp]` settings: Google Cloud KMS over its REST API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpSettings {
    /// Cloud KMS endpoint (a Private Service Connect endpoint; a test peer).
    #[serde(default = "default_gcp_endpoint")]
    pub endpoint_url: String,
    /// A service-account JSON key file; unset: the metadata server's default account.
    /// (Not `credentials_file`: `BYOKD_*_FILE` variables read a setting's value from a file.)
    #[serde(default)]
    pub credentials_path: Option<PathBuf>,
    /// The metadata server, when no key file is set.
    #[serde(default = "default_gcp_metadata")]
    pub metadata_url: String,
    /// Timeout of one request.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Attempts per request (429 and 5xx are retried, slowing down on 429).
    #[serde(default = "default_aws_attempts")]
    pub max_attempts: u32,
    /// Encrypt and decrypt requests per minute: Cloud KMS's default "Cryptographic
    /// requests" quota of the calling project is 60,000 per minute, enforced per second.
    #[serde(default = "default_gcp_crypto_rate")]
    pub crypto_requests_per_min: u32,
    /// `cryptoKeys.get` and `cryptoKeyVersions.list` per minute: the default "Read
    /// requests" quota of the calling project is 300 per minute.
    #[serde(default = "default_gcp_read_rate")]
    pub read_requests_per_min: u32,
    /// Requests in flight per batch (Cloud KMS has no batch API).
    #[serde(default = "default_aws_concurrency")]
    pub concurrency: usize,
}

impl GcpSettings {
    /// What is wrong with these settings, one sentence each.
    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for (name, url) in [
            ("endpoint_url", &self.endpoint_url),
            ("metadata_url", &self.metadata_url),
        ] {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => errors.push(format!(
                    "kms.gcp.{name} {:?} is not an http(s) URL",
                    redact_url(url)
                )),
            }
        }
        if self.max_attempts == 0
            || self.concurrency == 0
            || self.crypto_requests_per_min == 0
            || self.read_requests_per_min == 0
        {
            errors.push(
                "kms.gcp.max_attempts, concurrency, crypto_requests_per_min and \
                 read_requests_per_min must be at least 1"
                    .to_owned(),
            );
        }
        errors
    }
}

fn default_gcp_endpoint() -> String {
    "https://cloudkms.googleapis.com".to_owned()
}

fn default_gcp_metadata() -> String {
    "http://metadata.google.internal".to_owned()
}

fn default_gcp_crypto_rate() -> u32 {
    60_000
}

fn default_gcp_read_rate() -> u32 {
    300
}

/// How byokd authenticates to Microsoft Entra ID for Key Vault (`kms.azure.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AzureAuthKind {
    /// An app registration's client secret (OAuth 2.0 client credentials).
    ClientSecret,
    /// An app registration's certificate: a client assertion signed with its private key.
    ClientCertificate,
    /// The managed identity of the machine byokd runs on (the instance metadata service).
    ManagedIdentity,
}

/// The credentials `[kms.azure]` names, borrowed.
pub enum AzureAuth<'a> {
    /// Client credentials with a secret.
    ClientSecret {
        /// Directory (tenant) id.
        tenant_id: &'a str,
        /// Application (client) id.
        client_id: &'a str,
        /// The secret.
        client_secret: &'a SecretString,
    },
    /// Client credentials with a certificate (PEM with the private key and the certificate).
    ClientCertificate {
        /// Directory (tenant) id.
        tenant_id: &'a str,
        /// Application (client) id.
        client_id: &'a str,
        /// The PEM file.
        path: &'a std::path::Path,
    },
    /// Managed identity; `client_id` picks a user-assigned one.
    ManagedIdentity {
        /// A user-assigned identity's client id.
        client_id: Option<&'a str>,
    },
}

impl AzureAuth<'_> {
    /// The kind's name, for logs and Debug (never the secret).
    pub fn kind(&self) -> &'static str {
        match self {
            AzureAuth::ClientSecret { .. } => "client_secret",
            AzureAuth::ClientCertificate { .. } => "client_certificate",
            AzureAuth::ManagedIdentity { .. } => "managed_identity",
        }
    }
}

/// `[kms.azure]` settings: Azure Key Vault and Managed HSM keys, reached with a Microsoft Entra
/// ID token (client secret, or managed identity).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    /// `client_secret` or `managed_identity`; default: `client_secret` when one is set.
    #[serde(default)]
    pub auth: Option<AzureAuthKind>,
    /// Directory (tenant) id of byokd's app registration (client secret auth).
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Application (client) id; with a managed identity, picks a user-assigned one.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The app registration's client secret.
    #[serde(default)]
    pub client_secret: Option<SecretString>,
    /// A PEM file with the app registration's certificate and its RSA private key (PKCS#8
    /// or PKCS#1), for certificate credentials.
    #[serde(default)]
    pub client_certificate_path: Option<PathBuf>,
    /// Entra ID's authority host (a sovereign cloud's, e.g. `https://login.chinacloudapi.cn`).
    #[serde(default = "default_azure_authority")]
    pub authority_host: String,
    /// The managed identity token endpoint (the instance metadata service).
    #[serde(default = "default_azure_imds")]
    pub imds_endpoint: String,
    /// Sent every Key Vault request to this base URL instead of `https://<vault host>` (a
    /// private endpoint's address; a test peer). Key references still name the vault.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Attempts per request when Key Vault answers 429, 401 or 5xx.
    #[serde(default = "default_aws_attempts")]
    pub max_attempts: u32,
    /// The longest `Retry-After` byokd waits out before a retry.
    #[serde(default = "default_azure_retry_after")]
    pub max_retry_after_secs: u64,
    /// Requests per 10 seconds per vault: Key Vault's documented limit is per vault and
    /// region, 2,000 per 10 s for RSA 2048 HSM keys (4,000 software, less for larger RSA keys),
    /// shared with the tenant's other applications.
    #[serde(default = "default_azure_rate")]
    pub requests_per_10s: u32,
    /// Requests in flight per batch (Key Vault has no batch wrap: one request per DEK).
    #[serde(default = "default_azure_concurrency")]
    pub concurrency: usize,
    /// Refuse to bind a key whose deletion is not recoverable (no soft delete): a deleted key
    /// would take every DEK under it at once, with no way back.
    #[serde(default = "default_true_setting")]
    pub require_recoverable: bool,
}

impl AzureSettings {
    /// `auth`, or what the credentials given imply: a client secret, else a certificate,
    /// else the managed identity.
    fn auth_kind(&self) -> AzureAuthKind {
        self.auth.unwrap_or(if self.client_secret.is_some() {
            AzureAuthKind::ClientSecret
        } else if self.client_certificate_path.is_some() {
            AzureAuthKind::ClientCertificate
        } else {
            AzureAuthKind::ManagedIdentity
        })
    }

    /// The credentials to use.
    pub fn auth(&self) -> AzureAuth<'_> {
        let kind = self.auth_kind();
        let tenant_id = self.tenant_id.as_deref().unwrap_or_default();
        let client_id = self.client_id.as_deref().unwrap_or_default();
        match (kind, &self.client_secret, &self.client_certificate_path) {
            (AzureAuthKind::ClientSecret, Some(secret), _) => AzureAuth::ClientSecret {
                tenant_id,
                client_id,
                client_secret: secret,
            },
            (AzureAuthKind::ClientCertificate, _, Some(path)) => AzureAuth::ClientCertificate {
                tenant_id,
                client_id,
                path,
            },
            _ => AzureAuth::ManagedIdentity {
                client_id: self.client_id.as_deref(),
            },
        }
    }

    /// What is wrong with these settings, one sentence each.
    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let kind = self.auth_kind();
        if kind != AzureAuthKind::ManagedIdentity {
            let id_ok = |s: &Option<String>| {
                s.as_deref().is_some_and(|s| {
                    !s.is_empty()
                        && s.len() <= 256
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
                })
            };
            let credential = match kind {
                AzureAuthKind::ClientSecret => self.client_secret.is_some(),
                _ => self.client_certificate_path.is_some(),
            };
            if !id_ok(&self.tenant_id) || !id_ok(&self.client_id) || !credential {
                errors.push(
                    "kms.azure client_secret and client_certificate auth need tenant_id and \
                     client_id (ids or domain names), and client_secret or \
                     client_certificate_path"
                        .to_owned(),
                );
            }
        }
        for (name, url) in [
            ("authority_host", Some(&self.authority_host)),
            ("imds_endpoint", Some(&self.imds_endpoint)),
            ("endpoint_url", self.endpoint_url.as_ref()),
        ] {
            if let Some(url) = url {
                match url::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                    _ => errors.push(format!(
                        "kms.azure.{name} {:?} is not an http(s) URL",
                        redact_url(url)
                    )),
                }
            }
        }
        if self.max_attempts == 0 || self.concurrency == 0 || self.requests_per_10s == 0 {
            errors.push(
                "kms.azure.max_attempts, concurrency and requests_per_10s must be at least 1"
                    .to_owned(),
            );
        }
        errors
    }
}

impl std::fmt::Debug for AzureSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureSettings")
            .field("auth", &self.auth().kind())
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[REDACTED]"),
            )
            .field("client_certificate_path", &self.client_certificate_path)
            .field("authority_host", &self.authority_host)
            .field("imds_endpoint", &self.imds_endpoint)
            .field("endpoint_url", &self.endpoint_url)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_attempts", &self.max_attempts)
            .field("max_retry_after_secs", &self.max_retry_after_secs)
            .field("requests_per_10s", &self.requests_per_10s)
            .field("concurrency", &self.concurrency)
            .field("require_recoverable", &self.require_recoverable)
            .finish()
    }
}

fn default_azure_authority() -> String {
    "https://login.microsoftonline.com".to_owned()
}

fn default_azure_imds() -> String {
    "http://169.254.169.254/metadata/identity/oauth2/token".to_owned()
}

fn default_azure_retry_after() -> u64 {
    30
}

fn default_azure_rate() -> u32 {
    2000
}

fn default_azure_concurrency() -> usize {
    16
}

fn default_true_setting() -> bool {
    true
}

/// `[kms.aws]` settings. Credentials come from the SDK's default chain (environment, profile,
/// web identity, instance metadata), never from here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    /// Region for keys named without one (key ids, alias names); an ARN names its own.
    pub region: String,
    /// KMS endpoint instead of the regional one (a VPC endpoint; moto in tests).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// STS endpoint for assuming tenants' roles, when not the regional one. Kept apart from
    /// `endpoint_url` so a KMS VPC endpoint is never sent STS calls.
    #[serde(default)]
    pub sts_endpoint_url: Option<String>,
    /// Named profile of the shared config and credentials files (the SDK's default chain
    /// otherwise; `AWS_PROFILE` works too).
    #[serde(default)]
    pub profile: Option<String>,
    /// A credentials file read instead of `~/.aws/credentials` (e.g. a mounted secret), in
    /// the shared credentials file format. (Not `credentials_file`: `BYOKD_*_FILE` variables
    /// read a setting's value from a file.)
    #[serde(default)]
    pub credentials_path: Option<PathBuf>,
    /// Per-attempt timeout of one KMS request.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Attempts per request (the SDK's adaptive retry: it slows down on throttling).
    #[serde(default = "default_aws_attempts")]
    pub max_attempts: u32,
    /// Cryptographic requests (Encrypt, Decrypt, ReEncrypt) per second per account and
    /// region: AWS's shared quota for symmetric keys is 5,500/s by default (more in a few
    /// regions, and raised on request), and it is shared with everything else in the account.
    #[serde(default = "default_aws_crypto_rate")]
    pub crypto_requests_per_sec: u32,
    /// DescribeKey and ListKeyRotations per second per account and region (DescribeKey's
    /// default quota is 2,000/s).
    #[serde(default = "default_aws_describe_rate")]
    pub describe_requests_per_sec: u32,
    /// Requests in flight per batch (KMS has no batch API: one request per DEK).
    #[serde(default = "default_aws_concurrency")]
    pub concurrency: usize,
}

impl AwsSettings {
    /// What is wrong with these settings, one sentence each.
    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let region_ok = !self.region.is_empty()
            && self.region.len() <= 64
            && self
                .region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !region_ok {
            errors.push(format!(
                "kms.aws.region {:?} is not an AWS region name (e.g. eu-west-1)",
                self.region
            ));
        }
        for (name, url) in [
            ("endpoint_url", &self.endpoint_url),
            ("sts_endpoint_url", &self.sts_endpoint_url),
        ] {
            if let Some(url) = url {
                match url::Url::parse(url) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                    _ => errors.push(format!(
                        "kms.aws.{name} {:?} is not an http(s) URL",
                        redact_url(url)
                    )),
                }
            }
        }
        if self.max_attempts == 0
            || self.concurrency == 0
            || self.crypto_requests_per_sec == 0
            || self.describe_requests_per_sec == 0
        {
            errors.push(
                "kms.aws.max_attempts, concurrency, crypto_requests_per_sec and \
                 describe_requests_per_sec must be at least 1"
                    .to_owned(),
            );
        }
        errors
    }
}

fn default_aws_attempts() -> u32 {
    3
}

fn default_aws_crypto_rate() -> u32 {
    5500
}

fn default_aws_describe_rate() -> u32 {
    2000
}

fn default_aws_concurrency() -> usize {
    32
}

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

/// Key access (`[access]`): the caches of the unwrap path and the audit writer's batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessSettings {
    /// Most unwrapped DEKs kept in memory per replica (zeroized when evicted).
    pub cache_entries: u64,
    /// How long an unwrapped DEK stays cached (an access change drops it at once).
    pub cache_ttl_secs: u64,
    /// How long a client (its scope, whether it is revoked) is trusted without asking the
    /// database: the bound on a revocation whose notification was lost.
    pub client_cache_ms: u64,
    /// How long a tenant's access is trusted without asking the database, likewise.
    pub tenant_cache_ms: u64,
    /// Most audit rows written in one transaction (`commit` mode) or shipped in one INSERT
    /// (`spool` mode).
    pub audit_batch: usize,
    /// How an attempt's audit row is made durable before the answer leaves.
    pub audit_mode: AuditMode,
    /// The spool of `spool` mode; unset: `audit-spool` in the data dir (`BYOKD_DATA_DIR`,
    /// `./byokd-data` by default), in either mode. One daemon per directory (a lock file).
    pub audit_spool_dir: Option<PathBuf>,
    /// Longest time between two fdatasyncs of the spool; 0 syncs every group before it is
    /// acknowledged (no attempt lost to a machine crash, at a disk flush per group).
    pub audit_fsync_ms: u64,
    /// Unshipped spool above which attempts are refused (the database is unreachable for
    /// long) and `/readyz` answers 503.
    pub audit_spool_max_bytes: u64,
}

/// `access.audit_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    /// Each group of attempts is appended to a local spool file (one write) before the
    /// answer; a shipper moves the rows into `audit_log` in large batches, within about a
    /// second.
    #[default]
    Spool,
    /// Each group of attempts is committed to `audit_log` before the answer (a database
    /// commit per group: slower, nothing local).
    Commit,
}

impl AccessSettings {
    /// The audit spool's directory: `audit_spool_dir`, or `audit-spool` in `data_dir`.
    pub fn spool_dir(&self, data_dir: &Path) -> PathBuf {
        self.audit_spool_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("audit-spool"))
    }
}

impl Default for AccessSettings {
    fn default() -> Self {
        AccessSettings {
            cache_entries: 10_000,
            cache_ttl_secs: 300,
            client_cache_ms: 500,
            tenant_cache_ms: 1_000,
            audit_batch: 1_024,
            audit_mode: AuditMode::Spool,
            audit_spool_dir: None,
            audit_fsync_ms: 100,
            audit_spool_max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Confirmation tuning (`[state]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateSettings {
    /// An event dated more than this far ahead of byokd's clock is refused.
    pub max_event_skew_secs: u64,
    /// Per-key timeout of one observation.
    pub observe_timeout_secs: u64,
    /// Keys observed at once.
    pub concurrency: usize,
    /// Keys leased per confirmation round.
    pub batch: i64,
    /// How often the loop looks for due keys when nothing wakes it.
    pub poll_ms: u64,
    /// Longest wait between attempts while a KMS gives no answer.
    pub retry_max_secs: u64,
    /// Database connections of the confirmation loop and the sweeps (a pool of their own).
    pub database_connections: u32,
    /// Pause between two busy confirmation rounds.
    pub round_gap_ms: u64,
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            max_event_skew_secs: 300,
            observe_timeout_secs: 10,
            concurrency: 4,
            batch: 64,
            poll_ms: 500,
            retry_max_secs: 60,
            database_connections: 4,
            round_gap_ms: 100,
        }
    }
}

impl StateSettings {
    /// The allowed skew of event times.
    pub fn max_skew(&self) -> chrono::Duration {
        chrono::Duration::seconds(i64::try_from(self.max_event_skew_secs).unwrap_or(i64::MAX))
    }
}

/// The audit trail's chain (`[audit]`, `BYOKD_AUDIT__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    /// How often the chainer looks for rows to chain when idle, and how often the other
    /// replicas check whether the lead is free.
    pub chain_interval_ms: u64,
    /// Most rows chained in one transaction.
    pub batch_size: i64,
    /// How often the chainer records a checkpoint of the head (only when it moved).
    pub checkpoint_interval_secs: u64,
    /// `audit verify` reports a row still unchained this long after it was recorded.
    pub pending_grace_secs: u64,
    /// Database connections of the chainer's pool (it keeps one of them while it leads).
    pub database_connections: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            chain_interval_ms: 1000,
            batch_size: 1000,
            checkpoint_interval_secs: 60,
            pending_grace_secs: 300,
            database_connections: 2,
        }
    }
}

/// The metrics collector (`[metrics]`, `BYOKD_METRICS__*`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// How often the collector refreshes the gauges read from the database and the broker
    /// (outbox depth, dead letters, keys, tenants, re-wrap jobs, schedules). Each refresh is
    /// a handful of aggregate queries per replica.
    pub collect_interval_ms: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            collect_interval_ms: 15_000,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `postgres://...`.
    pub database_url: Option<String>,
    /// Connections in the database pool.
    pub database_max_connections: u32,
    /// `amqp://...`.
    pub amqp_url: Option<String>,
    /// `smtp://` or `smtps://`; unset writes .eml files to `mail_dir`.
    pub smtp_url: Option<SecretString>,
    /// Sender address of notification emails.
    pub mail_from: String,
    /// Where emails go without an SMTP server.
    pub mail_dir: PathBuf,
    /// Standalone mode (neither `BYOKD_DATABASE_URL` nor `BYOKD_AMQP_URL` set): where the
    /// SQLite database, the generated root key and admin token, and the emails live (see
    /// the `standalone` module).
    pub data_dir: PathBuf,
    /// Admin/health HTTP listener.
    pub http_addr: SocketAddr,
    /// Bearer token for `/v1`; unset disables the admin API.
    pub admin_token: Option<SecretString>,
    /// A token for event intake only (`/v1/events`), as a bearer token or the `token` query
    /// parameter: what an Azure Event Grid subscription's endpoint URL carries, since Event
    /// Grid sends no bearer token of its own. Unset: only the admin token reaches the route.
    pub events_token: Option<SecretString>,
    /// Sweep schedules.
    pub schedules_dir: PathBuf,
    /// Base64 of 32 bytes: seals the local KMS keyring and webhook secrets.
    pub local_kms_root_key: Option<SecretString>,
    /// Comma-separated base64 root keys that sealed data may still be under: opened, never
    /// used to seal. Set while `byokd root-key rotate` moves everything to the current key.
    pub local_kms_previous_root_keys: Option<SecretString>,
    /// Log format.
    pub log_format: LogFormat,
    /// Comma-separated CIDR ranges exempt from the webhook SSRF guard.
    pub webhook_allow_cidrs: Option<String>,
    /// Seconds to finish in-flight work after SIGTERM before exiting anyway.
    pub shutdown_grace_secs: u64,
    /// AMQP names and tuning.
    pub amqp: AmqpSettings,
    /// DEK re-wrap tuning.
    pub rewrap: RewrapSettings,
    /// Remote KMS providers (`[kms.vault]`, `[kms.aws]`).
    pub kms: KmsSettings,
    /// Notification delivery.
    pub notify: NotifySettings,
    /// `[state]`: event skew and confirmation of events at the KMS.
    pub state: StateSettings,
    /// `[audit]`: the audit trail's chain and checkpoints.
    pub audit: AuditSettings,
    /// The name tenants know the platform by, used in notifications (never "byokd", an
    /// internal component to them).
    pub platform_name: String,
    /// Operators' emails (`BYOKD_OPERATOR_EMAILS`, comma-separated): told of what a tenant
    /// cannot fix (unconfirmed revocations, failed jobs, disabled endpoints).
    #[serde(deserialize_with = "comma_list")]
    pub operator_emails: Vec<String>,
    /// Operators' webhooks (`[[operator_webhooks]]` in the config file).
    pub operator_webhooks: Vec<OperatorWebhook>,
    /// `[access]`: key access caches and audit batching.
    pub access: AccessSettings,
    /// `[metrics]`: the periodic metrics collector.
    pub metrics: MetricsSettings,
    /// Settings given that byokd does not know (filled by [`Config::load`]): `run` logs them,
    /// `check-config` fails on them.
    #[serde(skip)]
    pub unknown: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: None,
            database_max_connections: 10,
            amqp_url: None,
            smtp_url: None,
            mail_from: "byokd@localhost".into(),
            mail_dir: PathBuf::from("./mail"),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_token: None,
            events_token: None,
            schedules_dir: PathBuf::from("./schedules"),
            local_kms_root_key: None,
            local_kms_previous_root_keys: None,
            log_format: LogFormat::Text,
            webhook_allow_cidrs: None,
            shutdown_grace_secs: 20,
            amqp: AmqpSettings::default(),
            rewrap: RewrapSettings::default(),
            kms: KmsSettings::default(),
            notify: NotifySettings::default(),
            state: StateSettings::default(),
            audit: AuditSettings::default(),
            platform_name: "the platform".into(),
            operator_emails: Vec::new(),
            operator_webhooks: Vec::new(),
            access: AccessSettings::default(),
            metrics: MetricsSettings::default(),
            unknown: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("database_max_connections", &self.database_max_connections)
            .field("amqp_url", &self.amqp_url.as_deref().map(redact_url))
            .field(
                "smtp_url",
                &self
                    .smtp_url
                    .as_ref()
                    .map(|u| redact_url(u.expose_secret())),
            )
            .field("mail_from", &self.mail_from)
            .field("mail_dir", &self.mail_dir)
            .field("data_dir", &self.data_dir)
            .field("http_addr", &self.http_addr)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field(
                "events_token",
                &self.events_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("schedules_dir", &self.schedules_dir)
            .field(
                "local_kms_root_key",
                &self.local_kms_root_key.as_ref().map(|_| "[REDACTED]"),
            )
            .field(
                "local_kms_previous_root_keys",
                &self
                    .local_kms_previous_root_keys
                    .as_ref()
                    .map(|_| "[REDACTED]"),
            )
            .field("log_format", &self.log_format)
            .field("webhook_allow_cidrs", &self.webhook_allow_cidrs)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .field("amqp", &self.amqp)
            .field("rewrap", &self.rewrap)
            .field("kms", &self.kms)
            .field("notify", &self.notify)
            .field("state", &self.state)
            .field("audit", &self.audit)
            .field("platform_name", &self.platform_name)
            .field("operator_emails", &self.operator_emails)
            .field("operator_webhooks", &self.operator_webhooks)
            .field("access", &self.access)
            .field("metrics", &self.metrics)
            .finish()
    }
}

/// Replaces the password in a URL's userinfo with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_owned(),
    }
}

/// Names the variable or file key an extraction error is about, as the user wrote it.
const PREFIX: &str = "BYOKD_";
const FILE_SUFFIX: &str = "_FILE";

/// Reads each `BYOKD_X_FILE` into setting `X` (nested with `__` like the variables), so
/// secrets can come from mounted files (Kubernetes, Docker secrets) rather than the
/// environment. One trailing newline is dropped; the contents never appear in an error.
fn secrets_from_files(
    vars: &BTreeMap<String, String>,
    file_vars: &[&str],
) -> Result<figment::value::Dict, ConfigError> {
    use figment::value::{Dict, Value};
    fn insert(dict: &mut Dict, path: &[String], value: Value) {
        match path {
            [] => {}
            [last] => {
                dict.insert(last.clone(), value);
            }
            [first, rest @ ..] => {
                let entry = dict
                    .entry(first.clone())
                    .or_insert_with(|| Value::from(Dict::new()));
                if let Value::Dict(_, inner) = entry {
                    insert(inner, rest, value);
                }
            }
        }
    }
    let mut errors = Vec::new();
    let mut dict = Dict::new();
    for var in file_vars {
        let file_var = format!("{var}{FILE_SUFFIX}");
        if vars.contains_key(*var) {
            errors.push(format!("set {var} or {file_var}, not both"));
            continue;
        }
        let path = &vars[&file_var];
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                errors.push(format!("{file_var}: cannot read {path:?}: {e}"));
                continue;
            }
        };
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        let key: Vec<String> = var[PREFIX.len()..]
            .to_lowercase()
            .split("__")
            .map(str::to_owned)
            .collect();
        insert(&mut dict, &key, Value::from(text.to_owned()));
    }
    if errors.is_empty() {
        Ok(dict)
    } else {
        Err(ConfigError(errors))
    }
}

/// Settings given (in the file or as `BYOKD_*` variables) that byokd does not know, named as
/// they were given: a misspelt `BYOKD_ADMIN_TOKN` would otherwise silently leave the admin
/// API off. Sections reject unknown keys outright (`deny_unknown_fields`); the top level
/// cannot, because variables are not only settings.
fn unknown_settings(figment: &Figment) -> Vec<String> {
    let Ok(value) = figment.extract::<figment::value::Value>() else {
        return Vec::new();
    };
    let mut unknown = Vec::new();
    let _: Result<Config, _> = serde_ignored::deserialize(&value, |path| {
        let key = path.to_string();
        let from_env = figment
            .find_metadata(&key)
            .is_some_and(|m| m.name.contains("environment"));
        unknown.push(if from_env {
            format!(
                "{PREFIX}{} is not a byokd setting",
                key.replace('.', "__").to_uppercase()
            )
        } else {
            format!("{key:?} in the config file is not a byokd setting")
        });
    });
    unknown
}

fn describe(e: figment::Error) -> String {
    let key = e.path.join(".");
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    let source = e.metadata.as_ref().and_then(|m| m.source.as_ref());
    let location = match source {
        _ if from_env => format!("BYOKD_{}", e.path.join("__").to_uppercase()),
        Some(src) => format!("{key} in {src}"),
        None => key,
    };
    format!("{location}: {}", e.kind)
}

/// The local KMS root key, decoded.
pub struct RootKey(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RootKey([REDACTED])")
    }
}

/// The root key that seals, and the previous ones sealed data may still be under.
pub struct RootKeys {
    /// `BYOKD_LOCAL_KMS_ROOT_KEY`: seals everything, and opens first.
    pub current: RootKey,
    /// `BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS`, in the order given: only open.
    pub previous: Vec<RootKey>,
}

impl std::fmt::Debug for RootKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RootKeys([REDACTED], {} previous [REDACTED])",
            self.previous.len()
        )
    }
}

const ROOT_KEY_VAR: &str = "BYOKD_LOCAL_KMS_ROOT_KEY";
const PREVIOUS_ROOT_KEYS_VAR: &str = "BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS";

/// Decodes one root key; errors name `what` (the variable, and which of a list) and never
/// show the value.
pub(crate) fn decode_root_key(b64: &str, what: &str) -> Result<RootKey, String> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| format!("{what} is not valid base64"))?,
    );
    let array: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| format!("{what} must decode to 32 bytes, got {}", bytes.len()))?;
    Ok(RootKey(Zeroizing::new(array)))
}

/// Decodes the previous root keys (comma-separated), refusing the current one among them:
/// listing it is harmless to byokd but says the operator changed the wrong variable.
fn decode_previous_root_keys(
    list: &str,
    current: Option<&RootKey>,
) -> Result<Vec<RootKey>, String> {
    let parts: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let mut keys = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let key = decode_root_key(
            part,
            &format!(
                "{PREVIOUS_ROOT_KEYS_VAR} (key {} of {})",
                i + 1,
                parts.len()
            ),
        )?;
        if current.is_some_and(|c| c.0 == key.0) {
            return Err(format!(
                "{PREVIOUS_ROOT_KEYS_VAR} (key {} of {}) is the current root key ({ROOT_KEY_VAR}); list only keys being retired",
                i + 1,
                parts.len()
            ));
        }
        keys.push(key);
    }
    Ok(keys)
}

impl Config {
    /// Loads defaults, then `BYOKD_CONFIG` (if set), then `BYOKD_*` variables (and the files
    /// `BYOKD_*_FILE` variables name), and validates.
    pub fn load() -> Result<Config, ConfigError> {
        Config::load_from(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// [`Config::load`] over the given variables instead of the process's environment
    /// (the `BYOKD_*` ones are read from the process either way by figment's `Env`; this list
    /// decides `BYOKD_CONFIG` and the `_FILE` secrets).
    fn load_from(vars: impl Iterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let vars: BTreeMap<String, String> = vars.filter(|(k, _)| k.starts_with(PREFIX)).collect();
        // Missing fields take `Config::default()` through `#[serde(default)]`.
        let mut figment = Figment::new();
        if let Some(path) = vars.get("BYOKD_CONFIG") {
            if !std::path::Path::new(path).is_file() {
                return Err(ConfigError(vec![format!(
                    "BYOKD_CONFIG names {path:?}, which is not a readable file"
                )]));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let file_vars: Vec<&str> = vars
            .keys()
            .filter_map(|k| k.strip_suffix(FILE_SUFFIX))
            .collect();
        let mut ignore: Vec<String> = vec!["config".to_owned()];
        ignore.extend(
            file_vars
                .iter()
                .map(|v| format!("{}{FILE_SUFFIX}", &v[PREFIX.len()..]).to_lowercase()),
        );
        let ignore: Vec<&str> = ignore.iter().map(String::as_str).collect();
        figment = figment.merge(Env::prefixed(PREFIX).ignore(&ignore).split("__"));
        let secrets = secrets_from_files(&vars, &file_vars)?;
        if !secrets.is_empty() {
            figment = figment.merge(figment::providers::Serialized::defaults(secrets));
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError(e.into_iter().map(describe).collect()))?;
        config.unknown = unknown_settings(&figment);
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
        {
            errors.push(format!(
                "BYOKD_DATABASE_URL {:?} must start with postgres:// or sqlite://",
                redact_url(url)
            ));
        }
        if let Some(url) = &self.amqp_url
            && !(url.starts_with("amqp://") || url.starts_with("amqps://"))
        {
            errors.push(format!(
                "BYOKD_AMQP_URL {:?} must start with amqp:// or amqps://",
                redact_url(url)
            ));
        }
        let current = match self
            .local_kms_root_key
            .as_ref()
            .map(|key| decode_root_key(key.expose_secret(), ROOT_KEY_VAR))
        {
            Some(Ok(key)) => Some(key),
            Some(Err(e)) => {
                errors.push(e);
                None
            }
            None => None,
        };
        // An empty list (`BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS=`) is no list.
        let previous = self
            .local_kms_previous_root_keys
            .as_ref()
            .filter(|list| !list.expose_secret().trim().is_empty());
        match (previous, &self.local_kms_root_key) {
            (Some(_), None) => errors.push(format!(
                "{PREVIOUS_ROOT_KEYS_VAR} is set but {ROOT_KEY_VAR} is not: the current root key seals, the previous ones only open"
            )),
            (Some(list), Some(_)) => {
                if let Err(e) = decode_previous_root_keys(list.expose_secret(), current.as_ref())
                {
                    errors.push(e);
                }
            }
            (None, _) => {}
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| t.expose_secret().len() < 16)
        {
            errors.push("BYOKD_ADMIN_TOKEN must be at least 16 characters".to_owned());
        }
        if let Some(t) = &self.events_token {
            let t = t.expose_secret();
            // It travels in a URL's query: only characters that need no escaping there.
            if t.len() < 16
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
            {
                errors.push(
                    "BYOKD_EVENTS_TOKEN must be at least 16 characters of letters, digits, \
                     '-', '.', '_' and '~'"
                        .to_owned(),
                );
            }
        }
        if self.amqp.prefetch == 0 {
            errors.push("amqp.prefetch must be at least 1".to_owned());
        }
        if self.amqp.prefetch_bytes < self.amqp.max_message_bytes {
            errors.push(
                "amqp.prefetch_bytes must hold at least one message of max_message_bytes"
                    .to_owned(),
            );
        }
        if self.amqp.batch_size == 0 || self.amqp.pipeline == 0 {
            errors.push("amqp.batch_size and amqp.pipeline must be at least 1".to_owned());
        }
        if self.rewrap.batch_size < 1 || self.rewrap.concurrency < 1 {
            errors.push("rewrap.batch_size and rewrap.concurrency must be at least 1".to_owned());
        }
        let n = &self.notify;
        if n.max_in_flight == 0 || n.max_in_flight_per_recipient == 0 {
            errors.push(
                "notify.max_in_flight and max_in_flight_per_recipient must be at least 1"
                    .to_owned(),
            );
        }
        if n.database_connections == 0 {
            errors.push("notify.database_connections must be at least 1".to_owned());
        }
        if n.lease_secs * 1000 <= n.webhook_timeout_ms.max(n.smtp_timeout_ms) {
            errors.push(
                "notify.lease_secs must be longer than the webhook and SMTP timeouts".to_owned(),
            );
        }
        if !(0.0..1.0).contains(&n.retry_jitter) {
            errors.push("notify.retry_jitter must be in [0, 1)".to_owned());
        }
        if let Some(aws) = &self.kms.aws {
            errors.extend(aws.problems());
        }
        if let Some(gcp) = &self.kms.gcp {
            errors.extend(gcp.problems());
        }
        if let Some(azure) = &self.kms.azure {
            errors.extend(azure.problems());
        }
        if let Some(cidrs) = &self.webhook_allow_cidrs
            && let Err(e) = parse_cidrs(cidrs)
        {
            errors.push(format!("BYOKD_WEBHOOK_ALLOW_CIDRS: {e}"));
        }
        for email in &self.operator_emails {
            if email.parse::<lettre::Address>().is_err() {
                errors.push(format!(
                    "BYOKD_OPERATOR_EMAILS: {email:?} is not an email address"
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for hook in &self.operator_webhooks {
            if hook.name.is_empty() || !names.insert(hook.name.as_str()) {
                errors.push(format!(
                    "operator_webhooks: name {:?} is empty or used twice",
                    hook.name
                ));
            }
            if !hook.url.starts_with("https://") && !hook.url.starts_with("http://") {
                errors.push(format!(
                    "operator_webhooks.{}: url must be http(s)",
                    hook.name
                ));
            }
            if !hook.secret.expose_secret().starts_with("whsec_") {
                errors.push(format!(
                    "operator_webhooks.{}: secret must be a whsec_ secret",
                    hook.name
                ));
            }
        }
        if self.access.cache_ttl_secs == 0 || self.access.audit_batch == 0 {
            errors
                .push("access.cache_ttl_secs and access.audit_batch must be at least 1".to_owned());
        }
        if self.platform_name.trim().is_empty() {
            errors.push("BYOKD_PLATFORM_NAME must not be empty".to_owned());
        }
        let a = &self.audit;
        if a.chain_interval_ms == 0
            || a.batch_size < 1
            || a.checkpoint_interval_secs == 0
            || a.database_connections == 0
        {
            errors.push(
                "audit.chain_interval_ms, batch_size, checkpoint_interval_secs and \
                 database_connections must be at least 1"
                    .to_owned(),
            );
        }
        // Gauges not refreshed for five minutes drop out of /metrics (see telemetry): the
        // collector must refresh them well within that.
        if !(100..=60_000).contains(&self.metrics.collect_interval_ms) {
            errors.push("metrics.collect_interval_ms must be between 100 and 60000".to_owned());
        }
        if self.database_max_connections < 2 {
            errors.push("database_max_connections must be at least 2".to_owned());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errors))
        }
    }

    /// The database URL, or the error naming the variable to set.
    pub fn require_database_url(&self) -> Result<&str, ConfigError> {
        self.database_url
            .as_deref()
            .ok_or_else(|| ConfigError(vec!["BYOKD_DATABASE_URL is not set".to_owned()]))
    }

    /// The AMQP URL, or the error naming the variable to set.
    pub fn require_amqp_url(&self) -> Result<&str, ConfigError> {
        self.amqp_url
            .as_deref()
            .ok_or_else(|| ConfigError(vec!["BYOKD_AMQP_URL is not set".to_owned()]))
    }

    /// The root key, or the error saying how to make one. byokd never invents one: a key
    /// made up at start would make every sealed secret unreadable after a restart.
    pub fn require_root_key(&self) -> Result<RootKey, ConfigError> {
        let key = self.local_kms_root_key.as_ref().ok_or_else(|| {
            ConfigError(vec![format!(
                "{ROOT_KEY_VAR} is not set (generate one with: byokd root-key generate)"
            )])
        })?;
        decode_root_key(key.expose_secret(), ROOT_KEY_VAR).map_err(|e| ConfigError(vec![e]))
    }

    /// The current root key and the previous ones (see [`Config::require_root_key`]).
    pub fn require_root_keys(&self) -> Result<RootKeys, ConfigError> {
        let current = self.require_root_key()?;
        let previous = match &self.local_kms_previous_root_keys {
            Some(list) => decode_previous_root_keys(list.expose_secret(), Some(&current))
                .map_err(|e| ConfigError(vec![e]))?,
            None => Vec::new(),
        };
        Ok(RootKeys { current, previous })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_urls() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/byokd"),
            "postgres://app:***@db:5432/byokd"
        );
        assert_eq!(redact_url("amqp://guest@mq/%2f"), "amqp://guest@mq/%2f");
        assert_eq!(redact_url("amqp://mq:5672"), "amqp://mq:5672");
        assert_eq!(redact_url("smtp://u:p@ss@mail:25"), "smtp://u:***@mail:25");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let config = Config {
            database_url: Some("postgres://app:pw-db@db/byokd".into()),
            admin_token: Some(SecretString::from("token-0123456789abcdef")),
            local_kms_root_key: Some(SecretString::from(
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            )),
            local_kms_previous_root_keys: Some(SecretString::from(
                "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=",
            )),
            smtp_url: Some(SecretString::from("smtp://u:pw-smtp@mail:25")),
            ..Config::default()
        };
        let debug = format!("{config:?}");
        let keys = config.require_root_keys().expect("keys");
        let debug = format!("{debug} {keys:?}");
        for secret in ["pw-db", "token-0123", "AAAAAAAA", "QkJCQkJC", "pw-smtp"] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
    }

    #[test]
    fn prefetch_is_bounded_by_the_memory_budget() {
        let mut s = AmqpSettings::default();
        assert_eq!(s.effective_prefetch(), 1024, "256 MiB / 256 KiB");
        s.prefetch = 64;
        assert_eq!(
            s.effective_prefetch(),
            64,
            "the configured prefetch when smaller"
        );
        s.prefetch = 2048;
        s.max_message_bytes = 16 * 1024;
        assert_eq!(s.effective_prefetch(), 2048);
        s.prefetch_bytes = 1;
        assert_eq!(s.effective_prefetch(), 1, "never zero");
    }

    #[test]
    fn validation_reports_every_problem() {
        let config = Config {
            database_url: Some("mysql://x".into()),
            amqp_url: Some("http://x".into()),
            local_kms_root_key: Some(SecretString::from("c2hvcnQ=")),
            admin_token: Some(SecretString::from("short")),
            ..Config::default()
        };
        let err = config.validate().expect_err("invalid").0;
        assert_eq!(err.len(), 4, "{err:?}");
        assert!(err[2].contains("32 bytes, got 5"), "{err:?}");
    }

    #[test]
    fn previous_root_keys_are_a_checked_comma_separated_list() {
        const A: &str = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
        const B: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
        const C: &str = "Q0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0NDQ0M=";
        let config = |current: Option<&str>, previous: &str| Config {
            local_kms_root_key: current.map(|c| SecretString::from(c.to_owned())),
            local_kms_previous_root_keys: Some(SecretString::from(previous.to_owned())),
            ..Config::default()
        };
        let keys = config(Some(C), &format!(" {A}, {B} ,"))
            .require_root_keys()
            .expect("valid");
        assert_eq!(*keys.current.0, [b'C'; 32]);
        let previous: Vec<[u8; 32]> = keys.previous.iter().map(|k| *k.0).collect();
        assert_eq!(previous, [[b'A'; 32], [b'B'; 32]]);

        let short = config(Some(C), &format!("{A},c2hvcnQ=")).validate();
        assert_eq!(
            short.expect_err("short").0,
            ["BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS (key 2 of 2) must decode to 32 bytes, got 5"]
        );
        let repeated = config(Some(C), &format!("{A},{C}")).validate();
        let err = repeated.expect_err("current").to_string();
        assert!(err.contains("key 2 of 2) is the current root key"), "{err}");
        assert!(!err.contains("QUFB") && !err.contains("Q0ND"), "{err}");
        let alone = config(None, A).validate();
        let err = alone.expect_err("no current key").to_string();
        assert!(err.contains("BYOKD_LOCAL_KMS_ROOT_KEY is not"), "{err}");
        assert!(
            config(None, " ").validate().is_ok(),
            "an empty list is no list"
        );
        let only_current = Config {
            local_kms_root_key: Some(SecretString::from(C.to_owned())),
            ..Config::default()
        };
        assert!(
            only_current
                .require_root_keys()
                .expect("keys")
                .previous
                .is_empty()
        );
    }
}
