//! AWS KMS as a KMS provider, on the official SDK (`aws-sdk-kms`, `aws-config`).
//!
//! Keys are stored by their key ARN: a key id, alias name or alias ARN given at registration
//! is resolved with DescribeKey first ([`AwsKms::bind`]), so two spellings cannot bind one key
//! to two tenants. Every wrap carries the encryption context `{tenant, dek}`: KMS binds it to
//! the ciphertext, so a wrapped DEK copied to another row or tenant fails to decrypt. KMS has
//! no batch API, so a batch is one request per DEK, `concurrency` at a time, under a rate
//! limit per account and region ([`Limits`]) and the SDK's adaptive retry, which slows down
//! on `ThrottlingException`. A rotation re-wraps with ReEncrypt (the plaintext never leaves
//! KMS), and so does a replacement between two AWS keys reachable with the same credentials
//! in the same region.
//!
//! Versions: AWS rotates a key's material in place and decrypts old ciphertexts with the old
//! material by itself, and Encrypt always uses the current material. A version label is the
//! key's `CurrentKeyMaterialId` when DescribeKey reports it, else the newest entry of
//! ListKeyRotations (its `KeyMaterialId`, or `rotated@<rotation date>`), else `original`; a
//! label only has to change when the material does.
//!
//! Credentials: the SDK's default chain (environment, profile, web identity, instance
//! metadata), or, for a key registered with a `role_arn`, that role assumed through STS with
//! its `external_id` (the cross-account BYOK pattern). The role of a bound key is read from
//! the store, since callers name keys only by ARN.
//!
//! [`classify`] is the one place that decides what an error means. Definitive, because KMS
//! itself says so about the key: `NotFoundException`, `DisabledException`,
//! `KMSInvalidStateException`, `AccessDeniedException`, and `InvalidCiphertextException` /
//! `IncorrectKeyException` for one ciphertext. Everything else is indeterminate and never
//! revokes: throttling, `KMSInternalException`, `DependencyTimeoutException`,
//! `KeyUnavailableException`, HTTP failures and timeouts, and failures to obtain credentials
//! (byokd's own, or an AssumeRole the tenant's trust policy refuses: STS is not KMS, and a
//! byokd misconfiguration must not revoke every tenant behind it).
//!
//! Plaintext DEKs: byokd's own copies are zeroizing ([`Dek`]), and the `Vec` a Decrypt
//! answer's plaintext arrives in is zeroized once copied out. Out of reach, and so not
//! zeroized: the SDK's request `Blob`, the JSON (base64) it serializes, the response body it
//! parses, hyper's and rustls's buffers, and the kernel's.

use super::{
    Dek, DekContext, KeyInfo, KmsError, KmsProvider, Wrapped, WrappedRef, canonical_key_ref,
};
use crate::config::AwsSettings;
use crate::domain::{AwsRole, KeyState, Provider};
use crate::store::Store;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::sts::AssumeRoleProvider;
use aws_config::timeout::TimeoutConfig;
use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
use aws_sdk_kms::Client;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeyMetadata, KeySpec, KeyUsageType};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroize;

/// One KMS account and region's request limits, as AWS counts its quotas.
struct Limits {
    crypto: DefaultKeyedRateLimiter<String>,
    describe: DefaultKeyedRateLimiter<String>,
}

fn quota(per_sec: u32) -> Quota {
    let rate = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
    // A tenth of a second's worth at once: AWS counts per second, and a full second's burst
    // at the start of a batch invites throttling from requests the rest of the account sends.
    let burst = NonZeroU32::new(per_sec / 10).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

/// AWS KMS through the SDK; cheap to clone.
#[derive(Clone)]
pub struct AwsKms {
    inner: Arc<Inner>,
}

struct Inner {
    settings: AwsSettings,
    store: Store,
    /// The SDK's shared configuration (credentials chain, HTTP client), loaded on first use.
    base: tokio::sync::OnceCell<aws_config::SdkConfig>,
    /// One client per region and role: an assumed role's credentials are cached inside it.
    clients: Mutex<HashMap<(String, Option<AwsRole>), Client>>,
    /// The role of each bound key, as registered (immutable once bound).
    roles: moka::sync::Cache<String, Option<AwsRole>>,
    /// The last version label seen per key ARN, so a wrap need not describe the key first.
    versions: moka::sync::Cache<String, String>,
    limits: Limits,
}

impl std::fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKms")
            .field("region", &self.inner.settings.region)
            .field("endpoint_url", &self.inner.settings.endpoint_url)
            .finish_non_exhaustive()
    }
}

/// Whose credentials reach a key.
#[derive(Debug, Clone)]
enum Access {
    /// The role the key was registered with (read from the store).
    Bound,
    /// The given role, for a key not bound yet.
    Given(Option<AwsRole>),
}

/// A key as one request addresses it.
struct Target {
    client: Client,
    /// What the request names the key by (the ARN, once bound).
    key: String,
    /// The quota bucket: `region:account` (account `?` until the key is resolved).
    bucket: String,
}

/// The parts of a KMS ARN (`arn:<partition>:kms:<region>:<account>:<key|alias>/<id>`).
struct Arn<'a> {
    region: &'a str,
    account: &'a str,
    kind: &'a str,
    id: &'a str,
}

fn parse_arn(s: &str) -> Option<Arn<'_>> {
    let mut parts = s.splitn(6, ':');
    let (arn, partition, service, region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let (kind, id) = resource.split_once('/')?;
    let region_ok = !region.is_empty()
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let partition_ok = !partition.is_empty()
        && partition
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '-');
    (arn == "arn"
        && partition_ok
        && service == "kms"
        && region_ok
        && account.len() == 12
        && account.chars().all(|c| c.is_ascii_digit()))
    .then_some(Arn {
        region,
        account,
        kind,
        id,
    })
}

/// A KMS key id: a UUID, or `mrk-` and 32 hex digits (a multi-Region key).
fn is_key_id(s: &str) -> bool {
    if let Some(hex) = s.strip_prefix("mrk-") {
        return hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
    }
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// An alias name after `alias/`: 1-250 of `[A-Za-z0-9/_-]`, and not an AWS managed key's
/// (`alias/aws/...`), which only its AWS service may use.
fn alias_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 250 {
        return Some("an alias name is 1 to 250 characters after \"alias/\"".to_owned());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-')))
    {
        return Some(format!(
            "an alias name holds only letters, digits, '/', '_' and '-', not {c:?}"
        ));
    }
    if name.starts_with("aws/") {
        return Some("alias/aws/... names an AWS managed key, which byokd cannot use".to_owned());
    }
    None
}

/// Checks an AWS key reference's form: a key id, key ARN, alias name or alias ARN. Whatever
/// else (a bare name, another service's ARN, a path) is refused before any request.
pub(super) fn key_ref_problem(key_ref: &str) -> Option<String> {
    if key_ref.starts_with("arn:") {
        let Some(arn) = parse_arn(key_ref) else {
            return Some(
                "an ARN must read arn:<partition>:kms:<region>:<12-digit account>:key/<id> \
                 or ...:alias/<name>"
                    .to_owned(),
            );
        };
        return match arn.kind {
            "key" if is_key_id(arn.id) => None,
            "key" => Some(format!("{:?} is not a KMS key id", arn.id)),
            "alias" => alias_problem(arn.id),
            other => Some(format!(
                "a KMS ARN names a key or an alias, not a {other:?}"
            )),
        };
    }
    if let Some(name) = key_ref.strip_prefix("alias/") {
        return alias_problem(name);
    }
    if is_key_id(key_ref) {
        return None;
    }
    Some("expected a key id, a key ARN, an alias name (alias/...) or an alias ARN".to_owned())
}

fn to_chrono(t: &aws_sdk_kms::primitives::DateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

fn unreachable(detail: impl std::fmt::Display) -> KmsError {
    KmsError::Unreachable {
        provider: Provider::Aws,
        detail: detail.to_string(),
    }
}

/// The state a `KMSInvalidStateException` reports, from its message ("... is pending
/// deletion"); any other state (pending import included) counts as disabled, since the key
/// refuses cryptographic operations either way and the answer must stay definitive (an
/// `expired` refusal is not: elsewhere expired keys still decrypt).
fn state_in_message(message: &str) -> KeyState {
    let m = message.to_ascii_lowercase().replace(' ', "");
    if m.contains("pendingdeletion") || m.contains("pendingreplicadeletion") {
        KeyState::PendingDeletion
    } else {
        KeyState::Disabled
    }
}

/// What a failed request says about `key`; see the module docs. `operation` names what was
/// refused in [`KmsError::Unusable`].
fn classify<E, R>(key: &str, operation: &'static str, e: &SdkError<E, R>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let SdkError::ServiceError(service) = e else {
        // Timeouts, connection and TLS failures, unreadable answers, missing credentials.
        return unreachable(DisplayErrorContext(e));
    };
    let err = service.err();
    let message = err.message().unwrap_or_default().to_owned();
    let key_ref = key.to_owned();
    match err.code() {
        Some("NotFoundException") => KmsError::NotFound {
            provider: Provider::Aws,
            key_ref,
        },
        Some("DisabledException") => KmsError::Unusable {
            provider: Provider::Aws,
            key_ref,
            state: KeyState::Disabled,
            operation,
        },
        Some("KMSInvalidStateException") => KmsError::Unusable {
            provider: Provider::Aws,
            key_ref,
            state: state_in_message(&message),
            operation,
        },
        Some("AccessDeniedException") => KmsError::AccessDenied {
            provider: Provider::Aws,
            key_ref,
            detail: message,
        },
        Some("InvalidCiphertextException" | "IncorrectKeyException") => KmsError::Integrity,
        Some(
            code @ ("InvalidKeyUsageException"
            | "InvalidArnException"
            | "UnsupportedOperationException"),
        ) => KmsError::InvalidKeyRef {
            provider: Provider::Aws,
            reason: format!("{code}: {message}"),
        },
        Some(code) => {
            if code == "ThrottlingException" {
                metrics::counter!(crate::telemetry::AWS_KMS_THROTTLED).increment(1);
            }
            unreachable(format!("{code}: {message}"))
        }
        None => unreachable(DisplayErrorContext(e)),
    }
}

/// Whether an item's error is about that ciphertext alone (the batch goes on) rather than
/// the key (the batch fails as a whole).
fn per_item(e: &KmsError) -> bool {
    matches!(e, KmsError::Integrity)
}

/// Per-item results in order, or the first error about the key.
fn settle<T>(results: Vec<Result<T, KmsError>>) -> Result<Vec<Result<T, KmsError>>, KmsError> {
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

/// The encryption context of a DEK: the AAD binding, as KMS takes it.
fn context(ctx: &DekContext<'_>) -> HashMap<String, String> {
    HashMap::from([
        ("tenant".to_owned(), ctx.tenant_id.to_owned()),
        ("dek".to_owned(), ctx.dek_id.to_string()),
    ])
}

/// Checks that a key is one byokd can wrap with: symmetric, for encryption.
fn check_kind(key: &str, meta: &KeyMetadata) -> Result<(), KmsError> {
    let spec = meta
        .key_spec()
        .cloned()
        .unwrap_or(KeySpec::SymmetricDefault);
    let usage = meta
        .key_usage()
        .cloned()
        .unwrap_or(KeyUsageType::EncryptDecrypt);
    if spec == KeySpec::SymmetricDefault && usage == KeyUsageType::EncryptDecrypt {
        return Ok(());
    }
    Err(KmsError::InvalidKeyRef {
        provider: Provider::Aws,
        reason: format!(
            "{key} is a {} {} key; byokd needs a symmetric (SYMMETRIC_DEFAULT) ENCRYPT_DECRYPT key",
            spec.as_str(),
            usage.as_str()
        ),
    })
}

/// The key's state as byokd models it, at `now`.
fn key_state(key: &str, meta: &KeyMetadata, now: DateTime<Utc>) -> Result<KeyState, KmsError> {
    use aws_sdk_kms::types::KeyState as S;
    match meta.key_state() {
        Some(S::Enabled | S::Updating) => Ok(KeyState::Enabled),
        Some(S::Disabled) => Ok(KeyState::Disabled),
        Some(S::PendingDeletion | S::PendingReplicaDeletion) => Ok(KeyState::PendingDeletion),
        // No key material (expired, deleted, or never imported): every cryptographic operation
        // is refused until material is imported again. Expired material is `expired` (its
        // `ValidTo`, now past, blocks the tenant: AWS keys do not decrypt after expiry); any
        // other missing material counts as disabled, because an observed `expired` only means
        // "look at the date", and there may be none.
        Some(S::PendingImport) => Ok(
            if meta
                .valid_to()
                .and_then(to_chrono)
                .is_some_and(|at| at <= now)
            {
                KeyState::Expired
            } else {
                KeyState::Disabled
            },
        ),
        // A custom key store the tenant disconnected: its kill switch, refused until it
        // reconnects.
        Some(S::Unavailable) => Ok(KeyState::Disabled),
        Some(other) => Err(unreachable(format!(
            "{key} is in state {} (not settled yet)",
            other.as_str()
        ))),
        None => Err(unreachable(format!("DescribeKey gave no state for {key}"))),
    }
}

impl AwsKms {
    /// A provider for `settings`; the SDK configuration is loaded on first use.
    pub fn new(settings: &AwsSettings, store: Store) -> AwsKms {
        AwsKms {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                store,
                base: tokio::sync::OnceCell::new(),
                clients: Mutex::new(HashMap::new()),
                roles: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(300))
                    .build(),
                versions: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(60))
                    .build(),
                limits: Limits {
                    crypto: RateLimiter::keyed(quota(settings.crypto_requests_per_sec)),
                    describe: RateLimiter::keyed(quota(settings.describe_requests_per_sec)),
                },
            }),
        }
    }

    async fn base(&self) -> &aws_config::SdkConfig {
        self.inner
            .base
            .get_or_init(|| async {
                crate::install_crypto_provider();
                let http = aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https();
                let s = &self.inner.settings;
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .region(aws_config::Region::new(s.region.clone()))
                    .http_client(http);
                if let Some(profile) = &s.profile {
                    loader = loader.profile_name(profile);
                }
                if let Some(file) = &s.credentials_path {
                    loader = loader.profile_files(
                        EnvConfigFiles::builder()
                            .include_default_config_file(true)
                            .with_file(EnvConfigFileKind::Credentials, file)
                            .build(),
                    );
                }
                loader.load().await
            })
            .await
    }

    /// The client for `region` with `role`'s credentials (byokd's own without one).
    async fn client(&self, region: &str, role: Option<&AwsRole>) -> Client {
        let id = (region.to_owned(), role.cloned());
        if let Some(client) = self.lock_clients().get(&id) {
            return client.clone();
        }
        let s = &self.inner.settings;
        let base = self.base().await;
        let mut conf = aws_sdk_kms::config::Builder::from(base)
            .region(aws_config::Region::new(region.to_owned()))
            .retry_config(RetryConfig::adaptive().with_max_attempts(s.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(s.timeout_secs.max(1)))
                    .build(),
            );
        if let Some(url) = &s.endpoint_url {
            conf = conf.endpoint_url(url.clone());
        }
        if let Some(role) = role {
            let mut sts = base.clone().into_builder();
            if let Some(url) = &s.sts_endpoint_url {
                sts = sts.endpoint_url(url.clone());
            }
            let mut assume = AssumeRoleProvider::builder(role.role_arn.clone())
                .session_name("byokd")
                .region(aws_config::Region::new(region.to_owned()))
                .configure(&sts.build());
            if let Some(external_id) = &role.external_id {
                assume = assume.external_id(external_id.clone());
            }
            conf = conf.credentials_provider(assume.build().await);
        }
        let client = Client::from_conf(conf.build());
        self.lock_clients().insert(id, client.clone());
        client
    }

    fn lock_clients(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, Option<AwsRole>), Client>> {
        // Nothing can panic while the map is held; a poisoned lock still holds a valid map.
        self.inner
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The role a bound key was registered with.
    async fn bound_role(&self, key_arn: &str) -> Result<Option<AwsRole>, KmsError> {
        if let Some(role) = self.inner.roles.get(key_arn) {
            return Ok(role);
        }
        let role = self.inner.store.aws_role(key_arn).await?;
        self.inner.roles.insert(key_arn.to_owned(), role.clone());
        Ok(role)
    }

    async fn target(&self, key_ref: &str, access: &Access) -> Result<Target, KmsError> {
        let key = canonical_key_ref(Provider::Aws, key_ref)?;
        let (region, account) = match parse_arn(&key) {
            Some(arn) => (arn.region.to_owned(), arn.account.to_owned()),
            None => (self.inner.settings.region.clone(), "?".to_owned()),
        };
        let role = match access {
            Access::Bound => self.bound_role(&key).await?,
            Access::Given(role) => role.clone(),
        };
        let client = self.client(&region, role.as_ref()).await;
        Ok(Target {
            client,
            key,
            bucket: format!("{region}:{account}"),
        })
    }

    async fn describe_key(&self, t: &Target) -> Result<KeyMetadata, KmsError> {
        self.inner.limits.describe.until_key_ready(&t.bucket).await;
        let out = t
            .client
            .describe_key()
            .key_id(&t.key)
            .send()
            .await
            .map_err(|e| classify(&t.key, "describe", &e))?;
        let meta = out
            .key_metadata
            .ok_or_else(|| unreachable("DescribeKey answered without KeyMetadata"))?;
        check_kind(&t.key, &meta)?;
        Ok(meta)
    }

    /// The newest rotation's label (see the module docs), or `original`.
    async fn latest_rotation(&self, t: &Target) -> Result<String, KmsError> {
        let mut marker = None;
        let mut latest: Option<(DateTime<Utc>, String)> = None;
        loop {
            self.inner.limits.describe.until_key_ready(&t.bucket).await;
            let out = t
                .client
                .list_key_rotations()
                .key_id(&t.key)
                .limit(1000)
                .set_marker(marker.take())
                .send()
                .await
                .map_err(|e| match classify(&t.key, "describe", &e) {
                    // The key may be usable even so: not being allowed to list its rotations
                    // is a permission for byokd to ask the tenant for, not a revocation.
                    KmsError::AccessDenied { detail, .. } => unreachable(format!(
                        "byokd may not ListKeyRotations on {} ({detail}); the key policy must \
                         allow kms:ListKeyRotations",
                        t.key
                    )),
                    other => other,
                })?;
            for r in out.rotations() {
                let Some(at) = r.rotation_date().and_then(to_chrono) else {
                    continue;
                };
                let label = r.key_material_id().map_or_else(
                    || format!("rotated@{}", at.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
                    str::to_owned,
                );
                if latest.as_ref().is_none_or(|(t, _)| at >= *t) {
                    latest = Some((at, label));
                }
            }
            match (out.truncated, out.next_marker) {
                (true, Some(next)) => marker = Some(next),
                _ => break,
            }
        }
        Ok(latest.map_or_else(|| "original".to_owned(), |(_, label)| label))
    }

    async fn describe_in(&self, t: &Target) -> Result<(String, KeyInfo), KmsError> {
        let meta = self.describe_key(t).await?;
        let state = key_state(&t.key, &meta, Utc::now())?;
        let arn = meta
            .arn()
            .ok_or_else(|| unreachable("DescribeKey answered without the key's ARN"))?
            .to_owned();
        let target = Target {
            client: t.client.clone(),
            key: arn.clone(),
            bucket: t.bucket.clone(),
        };
        let version = match meta.current_key_material_id() {
            Some(id) => id.to_owned(),
            None => self.latest_rotation(&target).await?,
        };
        self.inner.versions.insert(arn.clone(), version.clone());
        Ok((
            arn,
            KeyInfo {
                state,
                current_version: version,
                expires_at: meta.valid_to().and_then(to_chrono),
            },
        ))
    }

    /// The label new wraps get: the cached one, else the key's current one.
    async fn current_version(&self, t: &Target) -> Result<String, KmsError> {
        if let Some(v) = self.inner.versions.get(&t.key) {
            return Ok(v);
        }
        Ok(self.describe_in(t).await?.1.current_version)
    }

    async fn encrypt(
        &self,
        t: &Target,
        dek: &Dek,
        ctx: &DekContext<'_>,
    ) -> Result<Vec<u8>, KmsError> {
        self.inner.limits.crypto.until_key_ready(&t.bucket).await;
        let out = t
            .client
            .encrypt()
            .key_id(&t.key)
            .plaintext(Blob::new(dek.expose().to_vec()))
            .set_encryption_context(Some(context(ctx)))
            .send()
            .await
            .map_err(|e| classify(&t.key, "wrap", &e))?;
        out.ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| unreachable("Encrypt answered without a ciphertext"))
    }

    async fn decrypt(&self, t: &Target, item: &WrappedRef<'_>) -> Result<Dek, KmsError> {
        self.inner.limits.crypto.until_key_ready(&t.bucket).await;
        let mut out = t
            .client
            .decrypt()
            .key_id(&t.key)
            .ciphertext_blob(Blob::new(item.ciphertext.to_vec()))
            .set_encryption_context(Some(context(&item.ctx)))
            .send()
            .await
            .map_err(|e| classify(&t.key, "unwrap", &e))?;
        let mut plain = out
            .plaintext
            .take()
            .map(Blob::into_inner)
            .ok_or_else(|| unreachable("Decrypt answered without a plaintext"))?;
        let dek = Dek::from_bytes(&plain);
        plain.zeroize();
        dek.ok_or(KmsError::Integrity)
    }

    async fn reencrypt(
        &self,
        t: &Target,
        destination: &str,
        item: &WrappedRef<'_>,
    ) -> Result<Vec<u8>, KmsError> {
        self.inner.limits.crypto.until_key_ready(&t.bucket).await;
        let ctx = context(&item.ctx);
        let out = t
            .client
            .re_encrypt()
            .source_key_id(&t.key)
            .ciphertext_blob(Blob::new(item.ciphertext.to_vec()))
            .set_source_encryption_context(Some(ctx.clone()))
            .destination_key_id(destination)
            .set_destination_encryption_context(Some(ctx))
            .send()
            .await
            .map_err(|e| classify(&t.key, "rewrap", &e))?;
        out.ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| unreachable("ReEncrypt answered without a ciphertext"))
    }

    async fn wrap_with(
        &self,
        access: &Access,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError> {
        let t = self.target(key_ref, access).await?;
        let label = match version {
            Some(v) => v.to_owned(),
            None => self.current_version(&t).await?,
        };
        let calls: Vec<_> = items
            .iter()
            .map(|(dek, ctx)| self.encrypt(&t, dek, ctx))
            .collect();
        let results = self.run(calls).await;
        results
            .into_iter()
            .map(|r| {
                r.map(|ciphertext| Wrapped {
                    version: label.clone(),
                    ciphertext,
                })
            })
            .collect()
    }

    async fn unwrap_with(
        &self,
        access: &Access,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError> {
        let t = self.target(key_ref, access).await?;
        let calls: Vec<_> = items.iter().map(|item| self.decrypt(&t, item)).collect();
        settle(self.run(calls).await)
    }

    /// Re-wraps `items` from `source` to `destination` with ReEncrypt, labelled `version`.
    async fn reencrypt_many(
        &self,
        source: &Target,
        destination: &str,
        items: &[WrappedRef<'_>],
        version: &str,
    ) -> Result<Vec<Result<Wrapped, KmsError>>, KmsError> {
        let calls: Vec<_> = items
            .iter()
            .map(|item| self.reencrypt(source, destination, item))
            .collect();
        let results = self.run(calls).await.into_iter().map(|r| {
            r.map(|ciphertext| Wrapped {
                version: version.to_owned(),
                ciphertext,
            })
        });
        settle(results.collect())
    }

    /// Runs one request per item, `concurrency` at a time, results in item order. (The
    /// futures are made first: a stream mapping items to futures that borrow them is a
    /// higher-ranked type the compiler cannot prove `Send` inside the daemon's tasks.)
    async fn run<F: Future>(&self, calls: Vec<F>) -> Vec<F::Output> {
        futures_util::stream::iter(calls)
            .buffered(self.inner.settings.concurrency.max(1))
            .collect()
            .await
    }

    /// Resolves `key_ref` (key id, key ARN, alias name or alias ARN) to the key's ARN with
    /// DescribeKey, through `role` (byokd's own credentials without one), and checks that
    /// byokd can use it: a symmetric ENCRYPT_DECRYPT key, enabled, and a test Encrypt and
    /// Decrypt with an encryption context succeeds.
    ///
    /// # Errors
    ///
    /// KMS's answer, classified (see the module docs).
    pub async fn bind(
        &self,
        key_ref: &str,
        role: Option<&AwsRole>,
    ) -> Result<(String, KeyInfo), KmsError> {
        if let Some(role) = role {
            self.check_assume_role(key_ref, role).await?;
        }
        let access = Access::Given(role.cloned());
        let t = self.target(key_ref, &access).await?;
        let (arn, info) = self.describe_in(&t).await?;
        if info.state != KeyState::Enabled {
            return Err(KmsError::Unusable {
                provider: Provider::Aws,
                key_ref: arn,
                state: info.state,
                operation: "wrap",
            });
        }
        super::round_trip(&WithRole { kms: self, access }, &arn).await?;
        // The role is the key's from now on (if the registration commits).
        self.inner.roles.invalidate(&arn);
        Ok((arn, info))
    }

    /// At registration, asks STS for the tenant's role once, so a trust policy that does not
    /// let byokd in is refused with STS's reason ([`KmsError::AccessDenied`], a 422) instead
    /// of a "retry later". Once a key is bound the same refusal is an outage, never a
    /// revocation (see the module docs), and this check is not made.
    async fn check_assume_role(&self, key_ref: &str, role: &AwsRole) -> Result<(), KmsError> {
        let s = &self.inner.settings;
        let region = parse_arn(key_ref).map_or_else(|| s.region.clone(), |a| a.region.to_owned());
        let mut conf = aws_sdk_sts::config::Builder::from(self.base().await)
            .region(aws_config::Region::new(region))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(s.timeout_secs.max(1)))
                    .build(),
            );
        if let Some(url) = &s.sts_endpoint_url {
            conf = conf.endpoint_url(url.clone());
        }
        let sts = aws_sdk_sts::Client::from_conf(conf.build());
        let answer = sts
            .assume_role()
            .role_arn(&role.role_arn)
            .role_session_name("byokd-registration")
            .set_external_id(role.external_id.clone())
            .send()
            .await;
        match answer {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e))
                if matches!(
                    e.err().code(),
                    Some("AccessDenied" | "RegionDisabledException" | "MalformedPolicyDocument")
                ) =>
            {
                Err(KmsError::AccessDenied {
                    provider: Provider::Aws,
                    key_ref: key_ref.to_owned(),
                    detail: format!(
                        "STS refused to let byokd assume {}: {}",
                        role.role_arn,
                        e.err().message().unwrap_or("no reason given")
                    ),
                })
            }
            Err(e) => Err(unreachable(format!(
                "STS AssumeRole of {}: {}",
                role.role_arn,
                DisplayErrorContext(&e)
            ))),
        }
    }

    /// Moves DEKs from `source` to `destination` (both AWS keys) with ReEncrypt when one set
    /// of credentials reaches both in one region (ReEncrypt is one request to one region);
    /// `None` when they do not, for the caller to decrypt and encrypt instead.
    ///
    /// # Errors
    ///
    /// The source key's or the store's errors.
    pub async fn transfer(
        &self,
        source: &str,
        destination: &str,
        items: &[WrappedRef<'_>],
        version: &str,
    ) -> Result<Option<Vec<Result<Wrapped, KmsError>>>, KmsError> {
        let from = self.target(source, &Access::Bound).await?;
        let to = self.target(destination, &Access::Bound).await?;
        let region = |key: &str| parse_arn(key).map(|a| a.region.to_owned());
        let same_role = self.bound_role(&from.key).await? == self.bound_role(&to.key).await?;
        if !same_role || region(&from.key) != region(&to.key) {
            return Ok(None);
        }
        self.reencrypt_many(&from, &to.key, items, version)
            .await
            .map(Some)
    }
}

/// The provider seen through a given role, for a key not bound yet.
struct WithRole<'a> {
    kms: &'a AwsKms,
    access: Access,
}

impl KmsProvider for WithRole<'_> {
    async fn describe(&self, key_ref: &str) -> Result<KeyInfo, KmsError> {
        let t = self.kms.target(key_ref, &self.access).await?;
        Ok(self.kms.describe_in(&t).await?.1)
    }

    async fn wrap_many(
        &self,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError> {
        self.kms
            .wrap_with(&self.access, key_ref, version, items)
            .await
    }

    async fn unwrap_many(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError> {
        self.kms.unwrap_with(&self.access, key_ref, items).await
    }
}

impl AwsKms {
    /// The provider as bound keys are reached: through the role each was registered with.
    fn bound(&self) -> WithRole<'_> {
        WithRole {
            kms: self,
            access: Access::Bound,
        }
    }
}

impl KmsProvider for AwsKms {
    async fn describe(&self, key_ref: &str) -> Result<KeyInfo, KmsError> {
        self.bound().describe(key_ref).await
    }

    async fn wrap_many(
        &self,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError> {
        self.bound().wrap_many(key_ref, version, items).await
    }

    async fn unwrap_many(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError> {
        self.bound().unwrap_many(key_ref, items).await
    }

    /// ReEncrypt to the key's current material: the plaintext never leaves KMS.
    async fn rewrap(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
        target_version: &str,
    ) -> Result<Vec<Result<Wrapped, KmsError>>, KmsError> {
        let t = self.target(key_ref, &Access::Bound).await?;
        let destination = t.key.clone();
        self.reencrypt_many(&t, &destination, items, target_version)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn key_refs_of_every_form_are_accepted() {
        for ok in [
            KEY,
            "mrk-1234abcd12ab34cd56ef1234567890ab",
            &format!("arn:aws:kms:eu-west-1:111122223333:key/{KEY}"),
            &format!("arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/{KEY}"),
            "alias/acme-kek",
            "alias/tenants/acme_kek-1",
            "arn:aws:kms:eu-west-1:111122223333:alias/acme-kek",
        ] {
            assert_eq!(key_ref_problem(ok), None, "{ok}");
        }
    }

    #[test]
    fn other_key_refs_are_refused_before_any_request() {
        for bad in [
            "acme-kek",
            "1234abcd",
            "alias/",
            "alias/aws/ebs",
            "alias/a b",
            "alias/a?b",
            "arn:aws:kms:eu-west-1:111122223333:key/not-a-key-id",
            "arn:aws:s3:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:eu-west-1:1111:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:EU:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:eu-west-1:111122223333:grant/x",
            "arn:aws:kms:eu-west-1:111122223333",
            "../alias/x",
            &format!("alias/{}", "a".repeat(251)),
        ] {
            assert!(key_ref_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn roles_are_iam_role_arns_with_an_optional_external_id() {
        let ok = AwsRole::new(
            "arn:aws:iam::111122223333:role/path/byok-platform",
            Some("x-1"),
        )
        .expect("a role");
        assert_eq!(ok.external_id.as_deref(), Some("x-1"));
        assert!(AwsRole::new("arn:aws-cn:iam::111122223333:role/r", None).is_ok());
        for (arn, id) in [
            ("arn:aws:iam::111122223333:user/u", None),
            ("arn:aws:iam::1111:role/r", None),
            ("arn:aws:iam:eu-west-1:111122223333:role/r", None),
            ("arn:aws:kms:eu-west-1:111122223333:key/k", None),
            ("arn:aws:iam::111122223333:role/", None),
            ("arn:aws:iam::111122223333:role/r r", None),
            ("arn:aws:iam::111122223333:role/r", Some("x")),
            ("arn:aws:iam::111122223333:role/r", Some("has space")),
        ] {
            assert!(AwsRole::new(arn, id).is_err(), "{arn} {id:?}");
        }
    }

    #[test]
    fn arns_name_region_and_account() {
        let arn = parse_arn("arn:aws:kms:eu-west-1:111122223333:key/k").expect("arn");
        assert_eq!(
            (arn.region, arn.account, arn.kind, arn.id),
            ("eu-west-1", "111122223333", "key", "k")
        );
    }

    #[test]
    fn invalid_state_messages_name_the_state() {
        assert_eq!(
            state_in_message("arn:aws:kms:eu-west-1:111122223333:key/k is pending deletion."),
            KeyState::PendingDeletion
        );
        assert_eq!(
            state_in_message("arn:... is pending import."),
            KeyState::Disabled
        );
        assert_eq!(state_in_message("something new"), KeyState::Disabled);
    }

    #[test]
    fn one_bad_ciphertext_fails_alone_and_a_key_error_fails_the_batch() {
        let ok: Vec<Result<u8, KmsError>> = vec![Ok(1), Err(KmsError::Integrity), Ok(2)];
        let settled = settle(ok).expect("per-item errors keep the batch");
        assert!(matches!(settled[1], Err(KmsError::Integrity)));
        let refused: Vec<Result<u8, KmsError>> = vec![
            Ok(1),
            Err(KmsError::Integrity),
            Err(KmsError::AccessDenied {
                provider: Provider::Aws,
                key_ref: "k".into(),
                detail: "no".into(),
            }),
        ];
        assert!(matches!(
            settle(refused),
            Err(KmsError::AccessDenied { .. })
        ));
    }
}
