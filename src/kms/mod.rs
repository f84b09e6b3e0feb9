//! Key management: the provider trait, the dispatch enum, and the envelope-encryption types.
//!
//! A DEK is 256 random bits that only ever leave this module wrapped by a tenant's KEK. Every
//! wrap binds the tenant id and the DEK id as additional authenticated data, so a wrapped DEK
//! copied to another row or tenant fails to unwrap. [`Kms`] routes each call to the provider
//! of the KEK; providers implement [`KmsProvider`], whose batch `rewrap` defaults to unwrap +
//! wrap and may be overridden by a provider with a native re-wrap.

pub mod aws;
pub mod azure;
pub mod gcp;
pub mod local;
pub mod vault;

pub use aws::AwsKms;
pub use azure::AzureKms;
pub use gcp::GcpKms;
pub use local::LocalKms;
pub use vault::VaultKms;

use crate::domain::{AwsRole, KeyState, Provider};
use crate::store::StoreError;
use crate::telemetry::{KMS_ERRORS, KMS_REQUEST_DURATION};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::collections::BTreeMap;
use uuid::Uuid;
use zeroize::Zeroizing;

/// A plaintext data-encryption key. Zeroized on drop; its `Debug` shows only the KCV.
pub struct Dek(Zeroizing<[u8; 32]>);

impl Dek {
    /// A fresh random DEK.
    pub fn generate() -> Dek {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(key.as_mut());
        Dek(key)
    }

    /// Takes ownership of 32 bytes (zeroizing the source is the caller's business).
    pub fn from_bytes(bytes: &[u8]) -> Option<Dek> {
        let array: [u8; 32] = bytes.try_into().ok()?;
        Some(Dek(Zeroizing::new(array)))
    }

    /// The key bytes, for a cipher.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Key check value: the first 6 bytes of HMAC-SHA256(dek, "byokd-kcv"), hex. Lets anyone
    /// confirm a DEK survived a re-wrap without seeing it.
    pub fn kcv(&self) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_ref()).expect("any key length");
        mac.update(b"byokd-kcv");
        let digest = mac.finalize().into_bytes();
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dek(kcv={})", self.kcv())
    }
}

/// What a wrap is bound to: the owning tenant and the DEK's own id.
#[derive(Debug, Clone, Copy)]
pub struct DekContext<'a> {
    /// Owning tenant.
    pub tenant_id: &'a str,
    /// The DEK's id.
    pub dek_id: Uuid,
}

impl DekContext<'_> {
    /// Additional authenticated data: unambiguous (length-prefixed tenant id) and versioned.
    pub fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(16 + self.tenant_id.len() + 16);
        aad.extend_from_slice(b"byokd/dek/v1");
        aad.extend_from_slice(&(self.tenant_id.len() as u32).to_be_bytes());
        aad.extend_from_slice(self.tenant_id.as_bytes());
        aad.extend_from_slice(self.dek_id.as_bytes());
        aad
    }
}

/// A DEK wrapped under one KEK version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// The KEK version it is wrapped under.
    pub version: String,
    /// Provider-specific ciphertext.
    pub ciphertext: Vec<u8>,
}

/// One wrapped DEK to unwrap or re-wrap.
#[derive(Debug, Clone, Copy)]
pub struct WrappedRef<'a> {
    /// What the wrap is bound to.
    pub ctx: DekContext<'a>,
    /// The KEK version it is wrapped under.
    pub version: &'a str,
    /// The ciphertext.
    pub ciphertext: &'a [u8],
}

/// What a provider says about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Provider-side state (expiry is reported through `expires_at`).
    pub state: KeyState,
    /// Version new wraps use.
    pub current_version: String,
    /// Expiry, if any.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Why a KMS call failed. [`KmsError::is_transient`] decides retry vs give up; a definitive
/// answer about the key (not found, unusable, access denied) is never transient.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// No such key at the provider.
    #[error("{provider} key {key_ref:?} does not exist")]
    NotFound {
        /// Provider.
        provider: Provider,
        /// Key.
        key_ref: String,
    },
    /// The key exists but refuses the operation in its current state.
    #[error("{provider} key {key_ref:?} is {state} and refuses to {operation}")]
    Unusable {
        /// Provider.
        provider: Provider,
        /// Key.
        key_ref: String,
        /// Its state.
        state: KeyState,
        /// What was refused (`wrap`, `unwrap`).
        operation: &'static str,
    },
    /// The provider denied byokd access to the key.
    #[error("access to {provider} key {key_ref:?} was denied: {detail}")]
    AccessDenied {
        /// Provider.
        provider: Provider,
        /// Key.
        key_ref: String,
        /// Provider's message.
        detail: String,
    },
    /// Timeout, connection failure or server error: says nothing about the key.
    #[error("{provider} KMS unreachable: {detail}")]
    Unreachable {
        /// Provider.
        provider: Provider,
        /// What went wrong.
        detail: String,
    },
    /// The ciphertext does not authenticate under this key, version and binding.
    #[error(
        "wrapped DEK does not authenticate (wrong key or version, moved to another row, or tampered)"
    )]
    Integrity,
    /// The local keyring cannot open a key version's sealed material: it was moved from
    /// another key or version, tampered with, or sealed under a root key not configured.
    #[error("local key {key_ref:?} version {version}: cannot open its key material: {reason}")]
    SealedMaterial {
        /// Key.
        key_ref: String,
        /// Version.
        version: i32,
        /// Why.
        reason: crate::seal::SealError,
    },
    /// The requested key version does not exist.
    #[error("{provider} key {key_ref:?} has no version {version:?}")]
    NoSuchVersion {
        /// Provider.
        provider: Provider,
        /// Key.
        key_ref: String,
        /// The version asked for.
        version: String,
    },
    /// The key reference cannot name a key of this provider. Checked before any request, so a
    /// reference never reaches a provider's URL or API as anything but one key name.
    #[error("invalid {provider} key_ref: {reason}")]
    InvalidKeyRef {
        /// Provider.
        provider: Provider,
        /// Why it was refused.
        reason: String,
    },
    /// byokd has no configuration for this provider.
    #[error("the {0} KMS provider is not configured")]
    NotConfigured(Provider),
    /// The local keyring's storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl KmsError {
    /// The error's class, a bounded name for metrics (`byokd_kms_errors_total`).
    pub fn class(&self) -> &'static str {
        match self {
            KmsError::NotFound { .. } => "not_found",
            KmsError::Unusable { .. } => "unusable",
            KmsError::AccessDenied { .. } => "access_denied",
            KmsError::Unreachable { .. } => "unreachable",
            KmsError::Integrity => "integrity",
            KmsError::SealedMaterial { .. } => "sealed_material",
            KmsError::NoSuchVersion { .. } => "no_such_version",
            KmsError::InvalidKeyRef { .. } => "invalid_key_ref",
            KmsError::NotConfigured(_) => "not_configured",
            KmsError::Store(_) => "store",
        }
    }

    /// Whether the same call may succeed later without anyone changing the key.
    pub fn is_transient(&self) -> bool {
        match self {
            KmsError::Unreachable { .. } => true,
            KmsError::Store(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Checks a key reference for `provider` and returns its canonical form, the one byokd stores
/// and sends. Refused references are [`KmsError::InvalidKeyRef`].
///
/// A reference becomes part of a URL path (Vault) or a file-like name (local), so anything that
/// could address another key or another path (`/`, `..`, whitespace) is refused rather than
/// escaped: two spellings of one key would let two tenants bind it. Vault Transit names are
/// 1-128 of `[A-Za-z0-9_.-]` and never `.` or `..`; local names 1-256 of `[A-Za-z0-9_.:/-]`.
/// AWS references are a key id, key ARN, alias name or alias ARN (and are resolved to the key
/// ARN when bound: [`Kms::bind`]). Azure references are versionless Key Vault key
/// identifiers on Key Vault's own hosts ([`azure::canonical`]). GCP references are key
/// resource names (`projects/P/locations/L/keyRings/R/cryptoKeys/K`, checked id by id;
/// [`gcp::key_ref_problem`]), so neither provider can bind one key twice under two
/// spellings.
pub fn canonical_key_ref(provider: Provider, key_ref: &str) -> Result<String, KmsError> {
    let refuse = |reason: String| KmsError::InvalidKeyRef { provider, reason };
    let (max, allowed, allowed_text): (usize, fn(char) -> bool, &str) = match provider {
        Provider::Vault => (
            128,
            |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'),
            "letters, digits, '_', '.' and '-'",
        ),
        Provider::Local => (
            256,
            |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-'),
            "letters, digits, '_', '.', ':', '/' and '-'",
        ),
        Provider::Aws | Provider::Azure | Provider::Gcp => (
            2048,
            |c| !c.is_whitespace() && !c.is_control(),
            "characters other than whitespace and control characters",
        ),
    };
    if key_ref.is_empty() {
        return Err(refuse("it is empty".to_owned()));
    }
    let len = key_ref.chars().count();
    if len > max {
        return Err(refuse(format!(
            "it is {len} characters long and the limit is {max}"
        )));
    }
    if let Some(c) = key_ref.chars().find(|c| !allowed(*c)) {
        return Err(refuse(format!(
            "it contains {c:?}, and only {allowed_text} are allowed"
        )));
    }
    if provider == Provider::Aws
        && let Some(problem) = aws::key_ref_problem(key_ref)
    {
        return Err(refuse(problem));
    }
    if provider == Provider::Azure {
        return azure::canonical(key_ref).map_err(refuse);
    }
    if provider == Provider::Gcp
        && let Some(problem) = gcp::key_ref_problem(key_ref)
    {
        return Err(refuse(problem));
    }
    if provider == Provider::Vault && matches!(key_ref, "." | "..") {
        return Err(refuse(format!(
            "{key_ref:?} is a relative path segment, not a key name"
        )));
    }
    Ok(key_ref.to_owned())
}

/// A KMS back end. Batch methods fail as a whole when the key itself refuses (state, access,
/// reachability) and per item when one ciphertext is bad.
#[allow(async_fn_in_trait)]
pub trait KmsProvider {
    /// The key's state, current version and expiry.
    async fn describe(&self, key_ref: &str) -> Result<KeyInfo, KmsError>;

    /// Whether [`KmsProvider::describe`] alone tells whether byokd may use the key. A KMS with
    /// grants or policies (every remote one) can deny byokd a key its metadata calls enabled,
    /// so observing it takes a test wrap/unwrap as well.
    fn describe_is_complete(&self) -> bool {
        false
    }

    /// The state of each of the key's versions, where versions have a state of their own
    /// ([`Provider::versions_have_state`]); `None` where they do not.
    async fn version_states(
        &self,
        _key_ref: &str,
    ) -> Result<Option<BTreeMap<String, KeyState>>, KmsError> {
        Ok(None)
    }

    /// Wraps each DEK under `version` (`None`: the current version).
    async fn wrap_many(
        &self,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError>;

    /// Unwraps each item.
    async fn unwrap_many(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError>;

    /// Re-wraps each item under `target_version` of the same key. The default unwraps and
    /// wraps; providers with a native re-wrap (AWS ReEncrypt, Vault rewrap) override it so
    /// plaintext never leaves the KMS.
    async fn rewrap(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
        target_version: &str,
    ) -> Result<Vec<Result<Wrapped, KmsError>>, KmsError> {
        let plain = self.unwrap_many(key_ref, items).await?;
        rewrap_via(self, key_ref, items, plain, target_version).await
    }
}

/// Wraps the successfully unwrapped `plain[i]` (bound to `items[i].ctx`) under `target`,
/// keeping per-item errors in place.
async fn rewrap_via<P: KmsProvider + ?Sized>(
    target: &P,
    target_key: &str,
    items: &[WrappedRef<'_>],
    plain: Vec<Result<Dek, KmsError>>,
    target_version: &str,
) -> Result<Vec<Result<Wrapped, KmsError>>, KmsError> {
    let ok: Vec<(&Dek, DekContext<'_>)> = plain
        .iter()
        .zip(items)
        .filter_map(|(p, item)| p.as_ref().ok().map(|dek| (dek, item.ctx)))
        .collect();
    let mut wrapped = target
        .wrap_many(target_key, Some(target_version), &ok)
        .await?
        .into_iter();
    Ok(plain
        .into_iter()
        .map(|p| match p {
            Ok(_) => wrapped.next().ok_or(KmsError::Integrity),
            Err(e) => Err(e),
        })
        .collect())
}

/// Wraps a throwaway DEK bound to a throwaway context under `key_ref` and unwraps it again:
/// the one way to know byokd may still use a key whose metadata says it is enabled (a
/// revoked grant or policy does not show in the metadata).
///
/// # Errors
///
/// The provider's error for whichever call refused, or [`KmsError::Integrity`] when the
/// key gave back something else.
pub async fn round_trip<P: KmsProvider + ?Sized>(kms: &P, key_ref: &str) -> Result<(), KmsError> {
    let dek = Dek::generate();
    let ctx = DekContext {
        tenant_id: "byokd-key-test",
        dek_id: Uuid::now_v7(),
    };
    let wrapped = kms
        .wrap_many(key_ref, None, &[(&dek, ctx)])
        .await?
        .pop()
        .ok_or(KmsError::Integrity)?;
    let back = kms
        .unwrap_many(
            key_ref,
            &[WrappedRef {
                ctx,
                version: &wrapped.version,
                ciphertext: &wrapped.ciphertext,
            }],
        )
        .await?
        .pop()
        .ok_or(KmsError::Integrity)??;
    if back.expose() != dek.expose() {
        return Err(KmsError::Integrity);
    }
    Ok(())
}

/// The configured providers, by name.
#[derive(Debug, Clone)]
pub enum Backend {
    /// byokd's own keyring.
    Local(LocalKms),
    /// Vault / OpenBao Transit.
    Vault(VaultKms),
    /// AWS KMS.
    Aws(AwsKms),
    /// Azure Key Vault and Managed HSM.
    Azure(AzureKms),
    /// Google Cloud KMS.
    Gcp(GcpKms),
}

macro_rules! backend {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            Backend::Local($b) => $call,
            Backend::Vault($b) => $call,
            Backend::Aws($b) => $call,
            Backend::Azure($b) => $call,
            Backend::Gcp($b) => $call,
        }
    };
}

impl Backend {
    /// The provider this back end talks to.
    pub fn provider(&self) -> Provider {
        match self {
            Backend::Local(_) => Provider::Local,
            Backend::Vault(_) => Provider::Vault,
            Backend::Aws(_) => Provider::Aws,
            Backend::Azure(_) => Provider::Azure,
            Backend::Gcp(_) => Provider::Gcp,
        }
    }

    /// Records a call's duration and its failures (the call's own, or per item for a
    /// batch) under this provider and `operation`. Every provider goes through this
    /// dispatch, so every provider is measured alike.
    fn observe<'e>(
        &self,
        operation: &'static str,
        started: std::time::Instant,
        errors: impl IntoIterator<Item = &'e KmsError>,
    ) {
        let provider = self.provider().as_str();
        metrics::histogram!(KMS_REQUEST_DURATION, "provider" => provider, "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        for e in errors {
            metrics::counter!(KMS_ERRORS, "provider" => provider, "operation" => operation,
                "class" => e.class())
            .increment(1);
        }
    }
}

/// A batch call's failures: the whole call's, or each failed item's.
fn batch_errors<T>(result: &Result<Vec<Result<T, KmsError>>, KmsError>) -> Vec<&KmsError> {
    match result {
        Ok(items) => items.iter().filter_map(|r| r.as_ref().err()).collect(),
        Err(e) => vec![e],
    }
}

impl KmsProvider for Backend {
    async fn describe(&self, key_ref: &str) -> Result<KeyInfo, KmsError> {
        let started = std::time::Instant::now();
        let result = backend!(self, b => b.describe(key_ref).await);
        self.observe("describe", started, result.as_ref().err());
        result
    }

    fn describe_is_complete(&self) -> bool {
        backend!(self, b => b.describe_is_complete())
    }

    async fn version_states(
        &self,
        key_ref: &str,
    ) -> Result<Option<BTreeMap<String, KeyState>>, KmsError> {
        if !self.provider().versions_have_state() {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let result = backend!(self, b => b.version_states(key_ref).await);
        self.observe("versions", started, result.as_ref().err());
        result
    }

    async fn wrap_many(
        &self,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError> {
        let started = std::time::Instant::now();
        let result = backend!(self, b => b.wrap_many(key_ref, version, items).await);
        self.observe("wrap", started, result.as_ref().err());
        result
    }

    async fn unwrap_many(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError> {
        let started = std::time::Instant::now();
        let result = backend!(self, b => b.unwrap_many(key_ref, items).await);
        self.observe("unwrap", started, batch_errors(&result));
        result
    }

    async fn rewrap(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
        target_version: &str,
    ) -> Result<Vec<Result<Wrapped, KmsError>>, KmsError> {
        let started = std::time::Instant::now();
        let result = backend!(self, b => b.rewrap(key_ref, items, target_version).await);
        self.observe("rewrap", started, batch_errors(&result));
        result
    }
}

/// Every configured provider; routes a call to the KEK's provider.
#[derive(Debug, Clone, Default)]
pub struct Kms {
    local: Option<Backend>,
    vault: Option<Backend>,
    aws: Option<Backend>,
    azure: Option<Backend>,
    gcp: Option<Backend>,
}

impl Kms {
    /// A registry with the local keyring.
    pub fn with_local(local: LocalKms) -> Kms {
        Kms {
            local: Some(Backend::Local(local)),
            vault: None,
            aws: None,
            azure: None,
            gcp: None,
        }
    }

    /// Adds the Google Cloud KMS provider.
    pub fn with_gcp(mut self, gcp: GcpKms) -> Kms {
        self.gcp = Some(Backend::Gcp(gcp));
        self
    }

    /// Adds the AWS provider.
    pub fn with_aws(mut self, aws: AwsKms) -> Kms {
        self.aws = Some(Backend::Aws(aws));
        self
    }

    /// Adds the Azure Key Vault provider.
    pub fn with_azure(mut self, azure: AzureKms) -> Kms {
        self.azure = Some(Backend::Azure(azure));
        self
    }

    /// Adds the Vault provider.
    pub fn with_vault(mut self, vault: VaultKms) -> Kms {
        self.vault = Some(Backend::Vault(vault));
        self
    }

    /// The back end for `provider`.
    ///
    /// # Errors
    ///
    /// [`KmsError::NotConfigured`] when byokd has no settings for it.
    pub fn provider(&self, provider: Provider) -> Result<&Backend, KmsError> {
        match provider {
            Provider::Local => self.local.as_ref(),
            Provider::Vault => self.vault.as_ref(),
            Provider::Aws => self.aws.as_ref(),
            Provider::Azure => self.azure.as_ref(),
            Provider::Gcp => self.gcp.as_ref(),
        }
        .ok_or(KmsError::NotConfigured(provider))
    }

    /// Checks that the platform can use a key: a wrap and unwrap round trip of a throwaway
    /// DEK, then describes it.
    pub async fn test_key(&self, provider: Provider, key_ref: &str) -> Result<KeyInfo, KmsError> {
        let kms = self.provider(provider)?;
        // Describe first: some KMSs (Vault Transit) create a missing key on encrypt.
        let info = kms.describe(key_ref).await?;
        if info.state != KeyState::Enabled {
            return Err(KmsError::Unusable {
                provider,
                key_ref: key_ref.to_owned(),
                state: info.state,
                operation: "wrap",
            });
        }
        round_trip(kms, key_ref).await?;
        Ok(info)
    }

    /// Checks that the platform can use a key about to be bound and returns the reference to
    /// store: AWS resolves any spelling to the key ARN (through the tenant's role, if given),
    /// other providers keep the canonical reference. See [`Kms::test_key`].
    ///
    /// # Errors
    ///
    /// The provider's answer; a role given for a provider other than AWS is
    /// [`KmsError::InvalidKeyRef`].
    pub async fn bind(
        &self,
        provider: Provider,
        key_ref: &str,
        role: Option<&AwsRole>,
    ) -> Result<(String, KeyInfo), KmsError> {
        match self.provider(provider)? {
            Backend::Aws(aws) => aws.bind(key_ref, role).await,
            Backend::Azure(azure) if role.is_none() => azure.bind(key_ref).await,
            _ if role.is_some() => Err(KmsError::InvalidKeyRef {
                provider,
                reason: "role_arn and external_id are for aws keys only".to_owned(),
            }),
            _ => Ok((key_ref.to_owned(), self.test_key(provider, key_ref).await?)),
        }
    }

    /// Moves DEKs from one key to another (key replacement): unwrap with the source, wrap
    /// with the target's current version; between two AWS keys, ReEncrypt where it can (the
    /// plaintext never leaves KMS).
    pub async fn transfer(
        &self,
        from: (Provider, &str),
        to: (Provider, &str),
        items: &[WrappedRef<'_>],
        target_version: &str,
    ) -> Result<Vec<Result<Wrapped, KmsError>>, KmsError> {
        if let (Backend::Aws(aws), Provider::Aws) = (self.provider(from.0)?, to.0)
            && let Some(done) = aws.transfer(from.1, to.1, items, target_version).await?
        {
            return Ok(done);
        }
        let plain = self.provider(from.0)?.unwrap_many(from.1, items).await?;
        rewrap_via(self.provider(to.0)?, to.1, items, plain, target_version).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kcv_is_stable_and_short() {
        let dek = Dek::from_bytes(&[7u8; 32]).expect("32 bytes");
        assert_eq!(dek.kcv(), Dek::from_bytes(&[7u8; 32]).expect("32").kcv());
        assert_eq!(dek.kcv().len(), 12);
        assert_ne!(dek.kcv(), Dek::from_bytes(&[8u8; 32]).expect("32").kcv());
        assert!(!format!("{dek:?}").contains("7, 7"));
    }

    fn refused(provider: Provider, key_ref: &str) -> String {
        match canonical_key_ref(provider, key_ref) {
            Err(e @ KmsError::InvalidKeyRef { .. }) => {
                assert!(!e.is_transient());
                e.to_string()
            }
            other => panic!("{provider} {key_ref:?}: expected InvalidKeyRef, got {other:?}"),
        }
    }

    #[test]
    fn vault_key_refs_are_single_transit_names() {
        for ok in [
            "acme-kek",
            "a",
            "A_b.c-9",
            ".hidden",
            "a..b",
            &"k".repeat(128),
        ] {
            assert_eq!(
                canonical_key_ref(Provider::Vault, ok).expect(ok),
                ok,
                "{ok:?}"
            );
        }
        for bad in [
            "",
            ".",
            "..",
            "x/../acme-kek",
            "../../sys/mounts",
            "a/b",
            "a b",
            " a",
            "a\n",
            "a%2Fb",
            "a?b",
            "a#b",
            "a:b",
            "kék",
            &"k".repeat(129),
        ] {
            let e = refused(Provider::Vault, bad);
            assert!(e.starts_with("invalid vault key_ref: "), "{e}");
        }
        assert_eq!(
            refused(Provider::Vault, "x/../k"),
            "invalid vault key_ref: it contains '/', and only letters, digits, '_', '.' \
             and '-' are allowed"
        );
        assert!(refused(Provider::Vault, "..").contains("relative path segment"));
        assert!(refused(Provider::Vault, "").contains("empty"));
        assert!(refused(Provider::Vault, &"k".repeat(129)).contains("limit is 128"));
    }

    #[test]
    fn local_key_refs_allow_paths_but_not_whitespace() {
        for ok in ["pr-key", "tenant:a/kek-1", "a.b_c", &"k".repeat(256)] {
            assert_eq!(canonical_key_ref(Provider::Local, ok).expect(ok), ok);
        }
        for bad in [
            "",
            " pr-key",
            "pr-key ",
            "a b",
            "a\tb",
            "a\u{0}",
            "k\u{e9}",
            &"k".repeat(257),
        ] {
            refused(Provider::Local, bad);
        }
    }

    #[test]
    fn cloud_key_refs_are_only_checked_for_length_and_whitespace() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let azure = "https://acme.vault.azure.net/keys/kek";
        let gcp = "projects/acme-prod/locations/global/keyRings/r/cryptoKeys/k";
        for (provider, ok) in [
            (Provider::Aws, arn),
            (Provider::Aws, "alias/acme"),
            (
                Provider::Aws,
                "arn:aws:kms:eu-west-1:111122223333:alias/acme",
            ),
            (Provider::Azure, azure),
            (Provider::Gcp, gcp),
        ] {
            assert_eq!(canonical_key_ref(provider, ok).expect(ok), ok);
        }
        for provider in [Provider::Aws, Provider::Azure, Provider::Gcp] {
            for bad in ["", "a b", "a\nb", "\u{7f}", " alias/x", &"k".repeat(2049)] {
                refused(provider, bad);
            }
        }
    }

    #[test]
    fn aws_key_refs_are_key_ids_arns_or_aliases() {
        for bad in [
            "acme-kek",
            "alias/aws/s3",
            "arn:aws:iam::111122223333:role/x",
            "arn:aws:kms:eu-west-1:111122223333:key/../x",
        ] {
            let e = refused(Provider::Aws, bad);
            assert!(e.starts_with("invalid aws key_ref: "), "{e}");
        }
    }

    #[test]
    fn aad_binds_tenant_and_dek_unambiguously() {
        let id = Uuid::now_v7();
        let a = DekContext {
            tenant_id: "ab",
            dek_id: id,
        }
        .aad();
        let b = DekContext {
            tenant_id: "a",
            dek_id: id,
        }
        .aad();
        let c = DekContext {
            tenant_id: "ab",
            dek_id: Uuid::now_v7(),
        }
        .aad();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
