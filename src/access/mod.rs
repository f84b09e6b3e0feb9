//! Key access: the platform's services create and unwrap DEKs through byokd with a client
//! token, so a revoked key is refused at the point of use.
//!
//! [`Gate`] owns the decision for each attempt: who is asking (a client token, checked
//! against its hash; the admin token never unwraps), whether the tenant is in the client's
//! scope, whether the tenant's access allows it (an `inaccessible` tenant is refused; an
//! `encrypt_blocked` one still unwraps), and the DEK itself, from a bounded cache of
//! unwrapped DEKs or from the KMS. Every attempt, allowed or refused, is recorded by
//! [`audit::AuditWriter`] before the answer leaves (in the replica's local [`spool`], shipped
//! to the audit trail within about a second, or committed to it): an attempt that cannot be
//! recorded is not served.
//!
//! Caches are per replica and dropped by PostgreSQL notifications sent in the very
//! transaction that changes a tenant's access or revokes a client ([`invalidate_loop`]), so
//! every replica stops serving within a notification's latency of the commit. While the
//! listening connection is down nothing is cached at all, and short TTLs bound what a lost
//! notification could leave.

pub mod audit;
pub mod spool;

use crate::config::AccessSettings;
use crate::domain::Access;
use crate::keys::{CreatedDek, KeyError, Keys};
use crate::kms::{Dek, DekContext, Kms, KmsProvider, WrappedRef};
use crate::store::access::{ACCESS_CHANNEL, CLIENTS_CHANNEL, ClientRow};
use crate::store::{AuditRow, DekRow, Store, StoreError};
use audit::AuditWriter;
use chrono::Utc;
use hmac::{Hmac, Mac};
use moka::sync::Cache;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// Prefix of client tokens, so a leaked one is recognisable (secret scanners).
pub const TOKEN_PREFIX: &str = "byokd_ct_";

/// Who is calling the key-access routes.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin token: manages, never unwraps.
    Admin,
    /// A client of the key-access API.
    Client(Arc<ClientRow>),
}

/// Why an attempt was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Unknown or revoked token (401).
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, not allowed (403): out of scope, admin token, tenant inaccessible.
    #[error("{0}")]
    Forbidden(String),
    /// No such DEK for this tenant (404).
    #[error("{0}")]
    NotFound(String),
    /// The attempt could not be recorded or the KMS/database failed (503): not served.
    #[error("{0}")]
    Unavailable(String),
    /// Anything the key use cases refused (their own statuses).
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// One unwrapped DEK as answered.
#[derive(Debug, Clone)]
pub struct Unwrapped {
    /// Id.
    pub dek_id: Uuid,
    /// KEK version it is wrapped under.
    pub kek_version: String,
    /// Key check value.
    pub kcv: String,
    /// The plaintext (zeroized when the last holder drops it).
    pub plaintext: Arc<Dek>,
}

/// Why one DEK of an unwrap was not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemError {
    /// No such DEK for the tenant.
    NotFound,
    /// The KMS refused for good (disabled, destroyed, permission revoked) or the DEK does
    /// not match its check value.
    Refused,
    /// The KMS gave no answer (timeout, 5xx): worth retrying.
    Unavailable,
}

/// The answer for one id of a batch unwrap.
#[derive(Debug)]
pub enum BatchItem {
    /// Unwrapped (shared with the cache: an answer copies no key material).
    Ok(Arc<Unwrapped>),
    /// Refused or failed, with why (no plaintext, no secret).
    Err(Uuid, ItemError, String),
}

struct CachedTenant {
    access: Access,
    reason: Option<String>,
}

/// The key-access gate; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    kms: Kms,
    keys: Keys,
    audit: AuditWriter,
    fingerprint_key: [u8; 32],
    clients: Cache<[u8; 32], Option<Arc<ClientRow>>>,
    tenants: Cache<String, Arc<CachedTenant>>,
    /// By DEK id (a primary key: unique across tenants), with the tenant it belongs to,
    /// checked on every hit; keyed so a lookup allocates nothing.
    deks: Cache<Uuid, (Arc<str>, Arc<Unwrapped>)>,
    /// Caching is on only while the change listener is connected.
    listening: AtomicBool,
    /// Bumped by every invalidation: a value read from the database before a bump is not
    /// cached after it (it may predate the change the bump stands for).
    epoch: AtomicU64,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("cached_deks", &self.inner.deks.entry_count())
            .finish_non_exhaustive()
    }
}

/// The SHA-256 of a client token: what is stored and looked up.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new client token: the prefix and 32 random bytes, base64url.
pub fn generate_token() -> String {
    random_token(TOKEN_PREFIX)
}

/// Prefix of the admin tokens byokd generates itself (standalone mode's data dir), so a
/// leaked one is recognisable and never taken for a client token.
pub const ADMIN_TOKEN_PREFIX: &str = "byokd_at_";

/// A new admin token: [`ADMIN_TOKEN_PREFIX`] and 32 random bytes, base64url.
pub fn generate_admin_token() -> secrecy::SecretString {
    secrecy::SecretString::from(random_token(ADMIN_TOKEN_PREFIX))
}

fn random_token(prefix: &str) -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(bytes.as_mut());
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_ref())
    )
}

/// Why a client cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad name or scope.
    #[error("{0}")]
    Invalid(String),
    /// The database failed, the name is taken, a tenant does not exist.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates a client of the key-access API and returns it with its token, shown this once
/// (only its hash is stored). Audited.
///
/// # Errors
///
/// A name that is not 1-64 of `[A-Za-z0-9._-]`, a scope that is not exactly one of a
/// tenant list and all tenants, an unknown tenant, a taken name.
pub async fn create_client(
    store: &Store,
    name: &str,
    tenants: Vec<String>,
    all_tenants: bool,
) -> Result<(ClientRow, String), ClientError> {
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(ClientError::Invalid(format!(
            "client name {name:?} must be 1 to 64 letters, digits, '.', '_' or '-'"
        )));
    }
    if all_tenants != tenants.is_empty() {
        return Err(ClientError::Invalid(
            "give either a list of tenants or all tenants, not both or neither".into(),
        ));
    }
    for tenant in &tenants {
        store.tenant(tenant).await?;
    }
    let token = generate_token();
    let row = store
        .create_client(&crate::store::access::NewClient {
            name: name.to_owned(),
            token_hash: token_hash(&token).to_vec(),
            all_tenants,
            tenants,
        })
        .await?;
    store
        .append_audit(&[AuditRow::operation(
            None,
            "client_created",
            "api",
            json!({ "client": row.name, "all_tenants": row.all_tenants, "tenants": row.tenants }),
        )])
        .await?;
    Ok((row, token))
}

/// Revokes a client: every replica refuses its token from the commit on. Audited.
///
/// # Errors
///
/// `NotFound` for an unknown client; store errors.
pub async fn revoke_client(store: &Store, name: &str) -> Result<ClientRow, StoreError> {
    let row = store.revoke_client(name).await?;
    store
        .append_audit(&[AuditRow::operation(
            None,
            "client_revoked",
            "api",
            json!({ "client": row.name }),
        )])
        .await?;
    Ok(row)
}

impl Gate {
    /// A gate over `store` and `kms`. `root_key` derives the key that fingerprints refused
    /// tokens in the audit trail (so repeated use of one bad token can be seen without the
    /// trail holding it).
    pub fn new(
        store: Store,
        kms: Kms,
        keys: Keys,
        audit: AuditWriter,
        settings: &AccessSettings,
        root_key: &[u8; 32],
    ) -> Gate {
        let mut fingerprint_key = [0u8; 32];
        let hk = hkdf::Hkdf::<Sha256>::new(None, root_key);
        // 32 bytes is far below HKDF-SHA256's output limit: expand cannot fail.
        let _ = hk.expand(b"byokd/token-fingerprint/v1", &mut fingerprint_key);
        Gate {
            inner: Arc::new(Inner {
                store,
                kms,
                keys,
                audit,
                fingerprint_key,
                clients: Cache::builder()
                    .max_capacity(10_000)
                    .time_to_live(Duration::from_millis(settings.client_cache_ms.max(1)))
                    .build(),
                tenants: Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_millis(settings.tenant_cache_ms.max(1)))
                    .build(),
                deks: Cache::builder()
                    .max_capacity(settings.cache_entries)
                    .time_to_live(Duration::from_secs(settings.cache_ttl_secs.max(1)))
                    .support_invalidation_closures()
                    .build(),
                listening: AtomicBool::new(false),
                epoch: AtomicU64::new(0),
            }),
        }
    }

    /// Why every attempt is refused now (the audit spool's backlog is over its cap), for
    /// `/readyz`.
    pub fn audit_refusing(&self) -> Option<String> {
        self.inner.audit.refusing()
    }

    /// Unwrapped DEKs cached on this replica now.
    pub fn cached_deks(&self) -> u64 {
        self.inner.deks.run_pending_tasks();
        self.inner.deks.entry_count()
    }

    fn fingerprint(&self, token: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.inner.fingerprint_key)
            .expect("HMAC takes any key length");
        mac.update(token.as_bytes());
        mac.finalize().into_bytes()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Who holds `token` (`None`: not a client token of any client, revoked ones included).
    async fn client(&self, token: &str) -> Result<Option<Arc<ClientRow>>, StoreError> {
        let hash = token_hash(token);
        if let Some(hit) = self.inner.clients.get(&hash) {
            return Ok(hit);
        }
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        let found = self
            .inner
            .store
            .client_by_token_hash(&hash)
            .await?
            .map(Arc::new);
        self.cache_if_current(epoch, || self.inner.clients.insert(hash, found.clone()));
        Ok(found)
    }

    fn cache_if_current(&self, epoch: u64, insert: impl FnOnce()) {
        if self.inner.listening.load(Ordering::Acquire)
            && self.inner.epoch.load(Ordering::Acquire) == epoch
        {
            insert();
        }
    }

    /// Resolves a bearer token other than the admin token to a client; a refusal is
    /// audited (with the token's fingerprint, never the token).
    ///
    /// # Errors
    ///
    /// [`Refusal::Unauthenticated`] for an unknown or revoked token.
    pub async fn authenticate(&self, token: &str, route: &str) -> Result<Caller, Refusal> {
        let client = self
            .client(token)
            .await
            .map_err(|e| Refusal::Unavailable(format!("cannot check the token: {e}")))?;
        let why = match &client {
            Some(c) if c.revoked_at.is_none() => return Ok(Caller::Client(c.clone())),
            Some(_) => "revoked token",
            None => "unknown token",
        };
        self.record(vec![Self::auth_refused(json!({
            "reason": why, "token": self.fingerprint(token),
            "client": client.as_ref().map(|c| c.name.clone()), "route": route,
        }))])
        .await?;
        Err(Refusal::Unauthenticated(format!(
            "{why}: the bearer token is not accepted"
        )))
    }

    /// The audit row of a refused authentication.
    fn auth_refused(detail: serde_json::Value) -> AuditRow {
        AuditRow {
            outcome: "refused".into(),
            ..AuditRow::operation(None, "auth", "api", detail)
        }
    }

    /// Records a failed admin authentication (the token's fingerprint only).
    pub async fn admin_refused(&self, token: Option<&str>, route: &str) {
        let row = Self::auth_refused(json!({
            "reason": if token.is_some() { "wrong admin token" } else { "no token" },
            "token": token.map(|t| self.fingerprint(t)), "route": route,
        }));
        if let Err(e) = self.record(vec![row]).await {
            tracing::warn!(error = %e, "could not audit a refused admin authentication");
        }
    }

    async fn record(&self, rows: Vec<AuditRow>) -> Result<(), Refusal> {
        self.inner.audit.record(rows).await.map_err(|e| {
            Refusal::Unavailable(format!(
                "the audit trail cannot be written ({e}); the attempt is refused"
            ))
        })
    }

    /// The tenant's access as key access enforces it (cached until it changes).
    async fn tenant_access(&self, tenant_id: &str) -> Result<Arc<CachedTenant>, Refusal> {
        if let Some(hit) = self.inner.tenants.get(tenant_id) {
            return Ok(hit);
        }
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        let (decision, _) = self
            .inner
            .keys
            .current_access(tenant_id, Utc::now())
            .await?;
        let cached = Arc::new(CachedTenant {
            access: decision.access,
            reason: decision.reason,
        });
        self.cache_if_current(epoch, || {
            self.inner
                .tenants
                .insert(tenant_id.to_owned(), cached.clone())
        });
        Ok(cached)
    }

    /// Scope and access checks common to every attempt; the refusal's cause for the audit.
    async fn admit(
        &self,
        caller: &Caller,
        tenant_id: &str,
        unwrap: bool,
    ) -> Result<(), (Refusal, &'static str)> {
        let client = match caller {
            Caller::Admin => {
                return Err((
                    Refusal::Forbidden(
                        "the admin token cannot unwrap DEKs (separation of duties); use a client token"
                            .into(),
                    ),
                    "admin_token",
                ));
            }
            Caller::Client(c) => c,
        };
        if !client.all_tenants && !client.tenants.iter().any(|t| t == tenant_id) {
            return Err((
                Refusal::Forbidden(format!(
                    "tenant {tenant_id:?} is not in client {:?}'s scope",
                    client.name
                )),
                "out_of_scope",
            ));
        }
        let tenant = self
            .tenant_access(tenant_id)
            .await
            .map_err(|e| (e, "error"))?;
        let blocked = match tenant.access {
            Access::Inaccessible => true,
            Access::EncryptBlocked => !unwrap,
            Access::Accessible => false,
        };
        if blocked {
            return Err((
                Refusal::Forbidden(format!(
                    "tenant {tenant_id:?} is {}: {}",
                    tenant.access,
                    tenant.reason.as_deref().unwrap_or("no reason recorded")
                )),
                "inaccessible",
            ));
        }
        Ok(())
    }

    fn attempt(
        caller: &Caller,
        tenant_id: &str,
        action: &str,
        dek: Option<Uuid>,
        outcome: &str,
        detail: serde_json::Value,
    ) -> AuditRow {
        let client = match caller {
            Caller::Admin => None,
            Caller::Client(c) => Some(c.name.clone()),
        };
        let mut detail = detail;
        if let Some(map) = detail.as_object_mut() {
            map.insert("client".into(), json!(client));
            map.insert("dek_id".into(), json!(dek));
        }
        AuditRow {
            tenant_id: Some(tenant_id.to_owned()),
            provider: None,
            key_ref: None,
            action: action.into(),
            outcome: outcome.into(),
            source: "api".into(),
            event_id: None,
            detail,
        }
    }

    /// Creates a DEK for a client (its plaintext returned once, like GenerateDataKey) or
    /// for the admin (wrapped form only). Audited either way.
    ///
    /// # Errors
    ///
    /// A [`Refusal`]; a refused attempt is audited before it is returned.
    pub async fn create_dek(
        &self,
        caller: &Caller,
        tenant_id: &str,
    ) -> Result<CreatedDek, Refusal> {
        if let Caller::Client(_) = caller
            && let Err((refusal, cause)) = self.admit(caller, tenant_id, false).await
        {
            let row = Self::attempt(
                caller,
                tenant_id,
                "dek_create",
                None,
                "refused",
                json!({ "cause": cause, "reason": refusal.to_string() }),
            );
            self.record(vec![row]).await?;
            return Err(refusal);
        }
        let created = match self.inner.keys.create_dek(tenant_id, Utc::now()).await {
            Ok(c) => c,
            Err(e) => {
                let row = Self::attempt(
                    caller,
                    tenant_id,
                    "dek_create",
                    None,
                    "refused",
                    json!({ "cause": "key", "reason": e.to_string() }),
                );
                self.record(vec![row]).await?;
                return Err(e.into());
            }
        };
        let row = Self::attempt(
            caller,
            tenant_id,
            "dek_create",
            Some(created.id),
            "allowed",
            json!({ "kek_version": created.kek_version,
                    "plaintext_returned": matches!(caller, Caller::Client(_)) }),
        );
        self.record(vec![row]).await?;
        Ok(created)
    }

    /// Unwraps one DEK for a client.
    ///
    /// # Errors
    ///
    /// A [`Refusal`], audited.
    pub async fn unwrap(
        &self,
        caller: &Caller,
        tenant_id: &str,
        dek_id: Uuid,
    ) -> Result<Arc<Unwrapped>, Refusal> {
        let mut items = self.unwrap_many(caller, tenant_id, &[dek_id]).await?;
        match items.pop() {
            Some(BatchItem::Ok(u)) => Ok(u),
            Some(BatchItem::Err(_, ItemError::NotFound, why)) => Err(Refusal::NotFound(why)),
            Some(BatchItem::Err(_, ItemError::Refused, why)) => Err(Refusal::Forbidden(why)),
            Some(BatchItem::Err(_, ItemError::Unavailable, why)) => Err(Refusal::Unavailable(why)),
            None => Err(Refusal::Unavailable("nothing was unwrapped".into())),
        }
    }

    /// Unwraps DEKs for a client: cached ones at once, the rest with one KMS call per key.
    /// One audit row per DEK, written before the answer leaves.
    ///
    /// # Errors
    ///
    /// A [`Refusal`] for the whole request (caller, scope, tenant access, audit); a DEK
    /// that is unknown or fails to unwrap is an item error instead.
    pub async fn unwrap_many(
        &self,
        caller: &Caller,
        tenant_id: &str,
        ids: &[Uuid],
    ) -> Result<Vec<BatchItem>, Refusal> {
        // Read before the access check: an access change after it (which drops the
        // tenant's cached DEKs) must also keep what this request unwraps out of the cache.
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        if let Err((refusal, cause)) = self.admit(caller, tenant_id, true).await {
            let reason = refusal.to_string();
            let rows = ids
                .iter()
                .map(|id| {
                    Self::attempt(
                        caller,
                        tenant_id,
                        "dek_unwrap",
                        Some(*id),
                        "refused",
                        json!({ "cause": cause, "reason": reason }),
                    )
                })
                .collect();
            self.record(rows).await?;
            return Err(refusal);
        }
        let mut found: HashMap<Uuid, Arc<Unwrapped>> = HashMap::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match self.inner.deks.get(id) {
                Some((tenant, hit)) if *tenant == *tenant_id => {
                    found.insert(*id, hit);
                }
                _ => missing.push(*id),
            }
        }
        let mut errors: HashMap<Uuid, (ItemError, String)> = HashMap::new();
        if !missing.is_empty() {
            let rows = self
                .inner
                .store
                .deks_by_ids(tenant_id, &missing)
                .await
                .map_err(|e| Refusal::Unavailable(format!("cannot read the DEKs: {e}")))?;
            for id in &missing {
                if !rows.iter().any(|r| r.id == *id) {
                    errors.insert(
                        *id,
                        (
                            ItemError::NotFound,
                            format!("no DEK {id} for tenant {tenant_id:?}"),
                        ),
                    );
                }
            }
            let tenant: Arc<str> = Arc::from(tenant_id);
            for (id, result) in self.unwrap_rows(&rows).await {
                match result {
                    Ok(u) => {
                        let u = Arc::new(u);
                        self.cache_if_current(epoch, || {
                            self.inner.deks.insert(id, (tenant.clone(), u.clone()))
                        });
                        found.insert(id, u);
                    }
                    Err(why) => {
                        errors.insert(id, why);
                    }
                }
            }
        }
        let mut audit = Vec::with_capacity(ids.len());
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(u) = found.get(id) {
                audit.push(Self::attempt(
                    caller,
                    tenant_id,
                    "dek_unwrap",
                    Some(*id),
                    "allowed",
                    json!({ "kek_version": u.kek_version }),
                ));
                out.push(BatchItem::Ok(u.clone()));
            } else {
                let (kind, why) = errors.remove(id).unwrap_or_else(|| {
                    (
                        ItemError::NotFound,
                        format!("no DEK {id} for tenant {tenant_id:?}"),
                    )
                });
                audit.push(Self::attempt(
                    caller,
                    tenant_id,
                    "dek_unwrap",
                    Some(*id),
                    "failed",
                    json!({ "reason": why }),
                ));
                out.push(BatchItem::Err(*id, kind, why));
            }
        }
        self.record(audit).await?;
        Ok(out)
    }

    /// Unwraps stored DEKs, one KMS call per key; checks each key check value.
    async fn unwrap_rows(
        &self,
        rows: &[DekRow],
    ) -> Vec<(Uuid, Result<Unwrapped, (ItemError, String)>)> {
        let kms_error = |e: &crate::kms::KmsError| {
            let kind = if e.is_transient() {
                ItemError::Unavailable
            } else {
                ItemError::Refused
            };
            (kind, format!("the KMS refused to unwrap: {e}"))
        };
        let mut by_key: BTreeMap<(crate::domain::Provider, &str), Vec<&DekRow>> = BTreeMap::new();
        for r in rows {
            by_key.entry((r.provider, &r.key_ref)).or_default().push(r);
        }
        let mut out = Vec::with_capacity(rows.len());
        for ((provider, key_ref), group) in by_key {
            let items: Vec<WrappedRef<'_>> = group
                .iter()
                .map(|r| WrappedRef {
                    ctx: DekContext {
                        tenant_id: &r.tenant_id,
                        dek_id: r.id,
                    },
                    version: &r.kek_version,
                    ciphertext: &r.wrapped,
                })
                .collect();
            let results = match self.inner.kms.provider(provider) {
                Ok(p) => p.unwrap_many(key_ref, &items).await,
                Err(e) => Err(e),
            };
            match results {
                Ok(results) => {
                    for (r, result) in group.iter().zip(results) {
                        out.push((
                            r.id,
                            match result {
                                Ok(plain) if plain.kcv() == r.kcv => Ok(Unwrapped {
                                    dek_id: r.id,
                                    kek_version: r.kek_version.clone(),
                                    kcv: r.kcv.clone(),
                                    plaintext: Arc::new(plain),
                                }),
                                Ok(_) => Err((
                                    ItemError::Refused,
                                    "the DEK does not match its key check value".into(),
                                )),
                                Err(e) => Err(kms_error(&e)),
                            },
                        ));
                    }
                }
                Err(e) => {
                    for r in group {
                        out.push((r.id, Err(kms_error(&e))));
                    }
                }
            }
        }
        out
    }

    /// Forgets what this replica cached about `tenant_id`.
    pub fn tenant_changed(&self, tenant_id: &str) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        self.inner.tenants.invalidate(tenant_id);
        let tenant = tenant_id.to_owned();
        // Invalidated entries are never returned again; moka frees them in the background.
        let _ = self
            .inner
            .deks
            .invalidate_entries_if(move |_, (t, _)| **t == *tenant);
    }

    /// Forgets every cached client (one was revoked).
    pub fn clients_changed(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        self.inner.clients.invalidate_all();
    }

    /// Forgets everything and stops (or resumes) caching: while no notification can arrive
    /// nothing may be cached.
    fn set_listening(&self, on: bool) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        self.inner.listening.store(on, Ordering::Release);
        self.inner.clients.invalidate_all();
        self.inner.tenants.invalidate_all();
        self.inner.deks.invalidate_all();
    }
}

/// Listens for access changes and client revocations and drops what they concern from the
/// gate's caches, reconnecting (with caching off meanwhile) until shutdown.
pub async fn invalidate_loop(gate: Gate, store: Store, mut shutdown: watch::Receiver<bool>) {
    let mut backoff =
        crate::broker::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !*shutdown.borrow() {
        let mut listener = match store.listen_changes().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for access changes; caching is off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        };
        backoff.reset();
        gate.set_listening(true);
        loop {
            tokio::select! {
                change = listener.next() => match change {
                    Ok(c) if c.channel == ACCESS_CHANNEL => gate.tenant_changed(&c.payload),
                    Ok(c) if c.channel == CLIENTS_CHANNEL => gate.clients_changed(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "access change listener lost; caching is off until it is back");
                        break;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        gate.set_listening(false);
    }
}
