//! The use cases on a tenant's keys: register (or replace) a KEK, read a tenant's access as
//! it is now, create a DEK, verify every DEK of a tenant.
//!
//! HTTP handlers, the CLI and tests all call these, so a rule (a key the platform cannot use
//! is refused; access is derived when asked and stored when it changed; a DEK is only ever
//! stored wrapped) lives in one place. Callers map [`KeyError`] to their own surface.

use crate::domain::kek::AccessDecision;
use crate::domain::{Access, AwsRole, KekStatus, Provider};
use crate::kms::{self, Dek, DekContext, Kms, KmsError, KmsProvider, WrappedRef};
use crate::lifecycle::{self, Cause};
use crate::store::{AuditRow, KekOptions, NewDek, Store, StoreError, TenantView};
use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Notify;
use uuid::Uuid;

/// DEKs [`Keys::create_deks`] stores at once: enough to keep a few connections busy, not the
/// whole pool.
const INSERT_CONCURRENCY: usize = 8;

/// Why a use case refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The request cannot be carried out as given (a key the platform cannot use, a
    /// malformed key name, an expiry the KMS holds).
    #[error("{0}")]
    Invalid(String),
    /// The tenant's state forbids it now (inaccessible, no key registered).
    #[error("{0}")]
    Refused(String),
    /// The database failed or the thing asked for does not exist.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The KMS failed.
    #[error(transparent)]
    Kms(#[from] KmsError),
}

/// A KEK to register.
#[derive(Debug, Clone)]
pub struct NewKek {
    /// Its provider.
    pub provider: Provider,
    /// Its name at the provider, as given (canonicalised here).
    pub key_ref: String,
    /// Its expiry, for providers whose KMS holds none (and byokd's own keyring).
    pub expires_at: Option<DateTime<Utc>>,
    /// Replace the tenant's current key: its DEKs move to this one, then it is retired.
    pub replace: bool,
    /// AWS: the tenant's role byokd assumes to reach the key.
    pub aws_role: Option<AwsRole>,
    /// Whether a rotation at the KMS re-wraps the DEKs.
    pub rewrap_on_rotation: bool,
}

/// A DEK just made: its plaintext (zeroized on drop) and what was stored.
#[derive(Debug)]
pub struct CreatedDek {
    /// Id.
    pub id: Uuid,
    /// KEK version it is wrapped under.
    pub kek_version: String,
    /// Key check value.
    pub kcv: String,
    /// The plaintext; never stored, never logged.
    pub plaintext: Dek,
}

/// What `deks verify` found.
#[derive(Debug, Default, Serialize)]
pub struct Verification {
    /// Tenant.
    pub tenant: String,
    /// DEKs looked at.
    pub total: u64,
    /// Unwrapped with a matching key check value.
    pub ok: u64,
    /// Failed to unwrap or did not match.
    pub failed: u64,
    /// DEKs per KEK version.
    pub by_version: BTreeMap<String, u64>,
    /// The first failures (at most 20), with their reasons.
    pub failures: Vec<serde_json::Value>,
}

/// The use cases, with what they need; cheap to clone.
#[derive(Debug, Clone)]
pub struct Keys {
    store: Store,
    kms: Kms,
    /// Woken when a use case recorded an access change (the access relay).
    access_changed: Arc<Notify>,
    /// Woken when a replacement created a re-wrap job.
    rewrap_work: Arc<Notify>,
}

impl Keys {
    /// The use cases over `store` and `kms`; the two wake-ups may be fresh `Notify`s where
    /// nothing listens (the CLI).
    pub fn new(
        store: Store,
        kms: Kms,
        access_changed: Arc<Notify>,
        rewrap_work: Arc<Notify>,
    ) -> Keys {
        Keys {
            store,
            kms,
            access_changed,
            rewrap_work,
        }
    }

    /// Registers a KEK after a test wrap/unwrap against its KMS succeeds, so a key the
    /// platform cannot use is refused now instead of failing on the first DEK. Returns the
    /// re-wrap job a replacement created.
    ///
    /// # Errors
    ///
    /// [`KeyError::Invalid`] for a key that fails the test or a malformed name; store and
    /// transient KMS errors.
    pub async fn register_kek(
        &self,
        tenant_id: &str,
        kek: NewKek,
        now: DateTime<Utc>,
    ) -> Result<Option<i64>, KeyError> {
        let provider = kek.provider;
        // Canonical before the one-key-one-tenant check, so two spellings cannot bind one key.
        let key_ref = kms::canonical_key_ref(provider, &kek.key_ref)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        if kek.aws_role.is_some() && provider != Provider::Aws {
            return Err(KeyError::Invalid(format!(
                "role_arn and external_id are for aws keys, not {provider} keys"
            )));
        }
        self.store.tenant(tenant_id).await?;
        // AWS resolves aliases and key ids to the key ARN here, still before the check.
        let (key_ref, mut info) = self
            .kms
            .bind(provider, &key_ref, kek.aws_role.as_ref())
            .await
            .map_err(|e| match e {
                e if e.is_transient() => KeyError::Kms(e),
                KmsError::NotConfigured(_) => KeyError::Kms(e),
                e => KeyError::Invalid(format!("the key failed a test wrap/unwrap: {e}")),
            })?;
        if provider.kms_holds_expiry()
            && kek.expires_at.is_some()
            && kek.expires_at != info.expires_at
        {
            // The KMS holds this key's expiry and the next observation would undo a date
            // given here. byokd's own keyring takes it; another KMS must be told directly.
            match self.kms.provider(provider)? {
                kms::Backend::Local(local) => {
                    info = local.set_expiry(&key_ref, kek.expires_at).await?;
                }
                _ => {
                    return Err(KeyError::Invalid(format!(
                        "the {provider} KMS holds this key's expiry; set it there, not here"
                    )));
                }
            }
        }
        let expires_at = if provider.kms_holds_expiry() {
            info.expires_at
        } else {
            kek.expires_at
        };
        let status = KekStatus::observed(provider, key_ref, Some(info.current_version), expires_at);
        let action = if kek.replace {
            "kek_replaced"
        } else {
            "kek_registered"
        };
        let audit = AuditRow {
            tenant_id: Some(tenant_id.to_owned()),
            provider: Some(provider),
            key_ref: Some(status.key_ref.clone()),
            action: action.into(),
            outcome: "applied".into(),
            source: "api".into(),
            event_id: None,
            detail: json!({ "version": status.current_version, "expires_at": status.expires_at,
                            "role_arn": kek.aws_role.as_ref().map(|r| &r.role_arn),
                            "rewrap_on_rotation": kek.rewrap_on_rotation }),
        };
        let options = KekOptions {
            aws_role: kek.aws_role,
            rewrap_on_rotation: kek.rewrap_on_rotation,
        };
        let job = self
            .store
            .register_kek_with(tenant_id, &status, &options, &audit, kek.replace)
            .await?;
        if job.is_some() {
            self.rewrap_work.notify_one();
        }
        // A new key, or a replacement, changes what the tenant's access derives from.
        let kind = if kek.replace {
            "replacement"
        } else {
            "registration"
        };
        let cause = Cause::new(kind, Some((provider, status.key_ref.clone())));
        self.refresh(tenant_id, &cause, now).await?;
        Ok(job)
    }

    /// A tenant's access derived now from its keys and the clock (what the API shows and
    /// enforces), and the tenant as stored after it. When it differs from the stored value
    /// (a date passed since the last sweep, say), the change is recorded now, with its
    /// access message and notifications, so the API, the enforcement and the platform never
    /// disagree.
    ///
    /// # Errors
    ///
    /// Store errors (`NotFound` for an unknown tenant).
    pub async fn current_access(
        &self,
        tenant_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(AccessDecision, TenantView), KeyError> {
        let keks = self.store.tenant_keks(tenant_id).await?;
        let decision = lifecycle::derive_now(&keks, now);
        let mut view = self.store.tenant(tenant_id).await?;
        if view.access != decision.access || view.reason != decision.reason {
            self.refresh(tenant_id, &Cause::new("clock", None), now)
                .await?;
            view = self.store.tenant(tenant_id).await?;
        }
        Ok((decision, view))
    }

    async fn refresh(
        &self,
        tenant_id: &str,
        cause: &Cause,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let tenants = [tenant_id.to_owned()];
        if lifecycle::refresh_access(&self.store, &tenants, cause, now).await? > 0 {
            self.access_changed.notify_one();
        }
        Ok(())
    }

    /// Generates a DEK, wraps it under the tenant's primary KEK at the KMS's current
    /// version, and stores only the wrapped form.
    ///
    /// # Errors
    ///
    /// [`KeyError::Refused`] unless the tenant is `accessible` and has a key; store and KMS
    /// errors.
    pub async fn create_dek(
        &self,
        tenant_id: &str,
        now: DateTime<Utc>,
    ) -> Result<CreatedDek, KeyError> {
        // `create_deks` answers exactly as many DEKs as asked for, or an error.
        self.create_deks(tenant_id, 1, now)
            .await?
            .pop()
            .ok_or_else(|| KeyError::Refused("no DEK was created".to_owned()))
    }

    /// [`Keys::create_dek`] `count` times over, with one access check and one call to the
    /// KMS (`wrap_many`) for them all; the DEKs are then stored, a few at a time. For
    /// provisioning many at once (`byokd demo`).
    ///
    /// # Errors
    ///
    /// As [`Keys::create_dek`]; DEKs stored before a failure stay stored.
    pub async fn create_deks(
        &self,
        tenant_id: &str,
        count: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<CreatedDek>, KeyError> {
        let target = self.store.dek_target(tenant_id).await?;
        let (access, _) = self.current_access(tenant_id, now).await?;
        if access.access != Access::Accessible {
            return Err(KeyError::Refused(format!(
                "tenant {tenant_id:?} is {}: {}; no new DEKs",
                access.access,
                access.reason.as_deref().unwrap_or("no reason recorded")
            )));
        }
        let Some(kek) = target.kek else {
            return Err(KeyError::Refused(format!(
                "tenant {tenant_id:?} has no key registered"
            )));
        };
        let deks: Vec<(Uuid, Dek)> = (0..count)
            .map(|_| (Uuid::now_v7(), Dek::generate()))
            .collect();
        let items: Vec<(&Dek, DekContext<'_>)> = deks
            .iter()
            .map(|(id, dek)| {
                (
                    dek,
                    DekContext {
                        tenant_id,
                        dek_id: *id,
                    },
                )
            })
            .collect();
        let provider = kek.provider;
        let wrapped = self
            .kms
            .provider(provider)?
            .wrap_many(&kek.key_ref, None, &items)
            .await?;
        if wrapped.len() != deks.len() {
            return Err(KeyError::Kms(KmsError::Unreachable {
                provider,
                detail: format!(
                    "the KMS answered {} wraps with {} ciphertexts",
                    deks.len(),
                    wrapped.len()
                ),
            }));
        }
        let stored = deks.into_iter().zip(wrapped).map(|((id, dek), wrapped)| {
            let row = NewDek {
                id,
                tenant_id: tenant_id.to_owned(),
                kek_id: kek.id,
                kek_version: wrapped.version.clone(),
                wrapped: wrapped.ciphertext,
                kcv: dek.kcv(),
            };
            async move {
                self.store.insert_dek(&row).await?;
                Ok::<_, KeyError>(CreatedDek {
                    id,
                    kek_version: row.kek_version,
                    kcv: row.kcv,
                    plaintext: dek,
                })
            }
        });
        futures_util::stream::iter(stored)
            .buffered(INSERT_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Runs a `failed` re-wrap job again: its failures are forgotten and every DEK it could
    /// not move is tried anew (after the cause, a KMS refusing or a corrupted DEK, was dealt
    /// with). Returns the job's tenant.
    ///
    /// # Errors
    ///
    /// `NotFound` unless the job exists and failed; store errors.
    pub async fn retry_rewrap_job(&self, job_id: i64) -> Result<String, KeyError> {
        let tenant = self.store.retry_rewrap_job(job_id).await?;
        self.store
            .append_audit(&[AuditRow::operation(
                Some(&tenant),
                "rewrap_retried",
                "api",
                json!({ "job_id": job_id }),
            )])
            .await?;
        self.rewrap_work.notify_one();
        Ok(tenant)
    }

    /// Unwraps every DEK of `tenant_id` and checks its key check value, one KMS call per
    /// key and page of 1000.
    ///
    /// # Errors
    ///
    /// Store errors; a DEK that fails is counted in the report, not returned.
    pub async fn verify_deks(&self, tenant_id: &str) -> Result<Verification, KeyError> {
        self.store.tenant(tenant_id).await?;
        let mut report = Verification {
            tenant: tenant_id.to_owned(),
            ..Verification::default()
        };
        let mut after = None;
        loop {
            let page = self.store.deks_page(tenant_id, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            let mut by_key: BTreeMap<(Provider, &str), Vec<usize>> = BTreeMap::new();
            for (i, d) in page.iter().enumerate() {
                by_key.entry((d.provider, &d.key_ref)).or_default().push(i);
            }
            for ((provider, key_ref), indexes) in by_key {
                let items: Vec<WrappedRef<'_>> = indexes
                    .iter()
                    .map(|&i| WrappedRef {
                        ctx: DekContext {
                            tenant_id: &page[i].tenant_id,
                            dek_id: page[i].id,
                        },
                        version: &page[i].kek_version,
                        ciphertext: &page[i].wrapped,
                    })
                    .collect();
                let results = match self.kms.provider(provider) {
                    Ok(p) => p.unwrap_many(key_ref, &items).await,
                    Err(e) => Err(e),
                };
                for (n, &i) in indexes.iter().enumerate() {
                    let dek = &page[i];
                    report.total += 1;
                    *report
                        .by_version
                        .entry(dek.kek_version.clone())
                        .or_default() += 1;
                    let outcome = match &results {
                        Ok(r) => match &r[n] {
                            Ok(plain) if plain.kcv() == dek.kcv => Ok(()),
                            Ok(_) => Err(
                                "key check value does not match the one recorded at creation"
                                    .to_owned(),
                            ),
                            Err(e) => Err(e.to_string()),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                    match outcome {
                        Ok(()) => report.ok += 1,
                        Err(reason) => {
                            report.failed += 1;
                            if report.failures.len() < 20 {
                                report.failures.push(json!({
                                    "dek_id": dek.id, "kek_version": dek.kek_version,
                                    "reason": reason,
                                }));
                            }
                        }
                    }
                }
            }
        }
        Ok(report)
    }
}
