//! Root-key rotation (`byokd root-key rotate`): re-seals every secret sealed under the root
//! key (the local KMS's key material, webhook signing secrets, the audit chain's key) under
//! the current root key.
//!
//! This module owns the list of what is sealed under the root key; anything new sealed with
//! `seal::Sealer` joins it here. Daemons configured with the new key as current and the old
//! one as previous open both while a rotation runs, so it needs no downtime.
//!
//! Each table is walked in primary-key order in batches of `batch_size`, reading only values
//! that do not carry the current key's prefix; each batch is opened with any configured key,
//! sealed under the current one (legacy-format values become version 2, bound to their row)
//! and written back in one transaction, each value guarded by the one it replaces (a value a
//! daemon changed meanwhile is left alone: it was sealed under the current key). Committed
//! batches stay done, so a rotation is resumable by running it again, and idempotent: a
//! finished one finds nothing to do. A value no configured key opens is counted, named in
//! the report and left as it is.

use crate::audit::ChainKey;
use crate::config::RootKeys;
use crate::kms::local::material_binding;
use crate::seal::{
    AUDIT_CHAIN_PURPOSE, LOCAL_KMS_PURPOSE, PREFIX_LEN, Sealer, WEBHOOK_SECRET_PURPOSE,
};
use crate::store::{SealedMaterial, SealedWebhookSecrets, Store, StoreError};
use serde::Serialize;
use uuid::Uuid;

/// Failures named in a report; the count is always complete.
const MAX_NAMED_FAILURES: usize = 20;
/// Passes over every table: a value a daemon sealed under another key while a pass ran (a
/// replica still configured with the old root key as current) is taken by the next one.
const MAX_PASSES: u32 = 3;

/// What a rotation did to one kind of sealed value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Sealed values there are.
    pub total: i64,
    /// Values re-sealed under the current root key.
    pub resealed: u64,
    /// Values no configured root key opens (last pass).
    pub failed: u64,
    /// Values still not under the current root key when the rotation ended.
    pub remaining: i64,
}

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RotationReport {
    /// The local KMS's key versions.
    pub local_kms_keys: Tally,
    /// Webhook signing secrets (current and previous ones).
    pub webhook_secrets: Tally,
    /// The audit chain's key (one value, once a daemon has started).
    pub audit_chain_key: Tally,
    /// The first failures: which row, and why (no secret).
    pub failures: Vec<String>,
}

impl RotationReport {
    /// Whether nothing is left under another root key: the previous keys can go.
    pub fn complete(&self) -> bool {
        self.local_kms_keys.remaining == 0
            && self.webhook_secrets.remaining == 0
            && self.audit_chain_key.remaining == 0
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < MAX_NAMED_FAILURES {
            self.failures.push(what);
        }
    }
}

/// Where a pass is.
enum Cursor {
    LocalKeys(Option<(String, i32)>),
    Webhooks(Option<Uuid>),
    AuditKey,
    Done,
}

/// A rotation in progress: [`RootKeyRotation::next_batch`] does one batch,
/// [`RootKeyRotation::run`] the rest.
pub struct RootKeyRotation {
    store: Store,
    local_kms: Sealer,
    webhooks: Sealer,
    audit: Sealer,
    prefix: [u8; PREFIX_LEN],
    batch_size: i64,
    cursor: Cursor,
    passes: u32,
    report: RotationReport,
}

impl RootKeyRotation {
    /// A rotation to `keys.current` of whatever `keys` open, `batch_size` values per
    /// transaction.
    pub fn new(store: Store, keys: &RootKeys, batch_size: i64) -> RootKeyRotation {
        let local_kms = Sealer::with_previous(keys, LOCAL_KMS_PURPOSE);
        RootKeyRotation {
            prefix: local_kms.current_prefix(),
            local_kms,
            webhooks: Sealer::with_previous(keys, WEBHOOK_SECRET_PURPOSE),
            audit: Sealer::with_previous(keys, AUDIT_CHAIN_PURPOSE),
            store,
            batch_size: batch_size.max(1),
            cursor: Cursor::LocalKeys(None),
            passes: 1,
            report: RotationReport::default(),
        }
    }

    /// Re-seals the next batch of the current pass and commits it; `false` once the pass
    /// has walked every table.
    ///
    /// # Errors
    ///
    /// The database failed; the batch was not written, and running again resumes.
    pub async fn next_batch(&mut self) -> Result<bool, StoreError> {
        match &self.cursor {
            Cursor::LocalKeys(after) => {
                let after = after.as_ref().map(|(k, v)| (k.as_str(), *v));
                let rows = self
                    .store
                    .sealed_materials_without(&self.prefix, after, self.batch_size)
                    .await?;
                self.cursor = match rows.last() {
                    Some(last) => Cursor::LocalKeys(Some((last.key_ref.clone(), last.version))),
                    None => Cursor::Webhooks(None),
                };
                self.reseal_materials(rows).await?;
            }
            Cursor::Webhooks(after) => {
                let rows = self
                    .store
                    .sealed_webhook_secrets_without(&self.prefix, *after, self.batch_size)
                    .await?;
                self.cursor = match rows.last() {
                    Some(last) => Cursor::Webhooks(Some(last.id)),
                    None => Cursor::AuditKey,
                };
                self.reseal_webhooks(rows).await?;
            }
            Cursor::AuditKey => {
                self.cursor = Cursor::Done;
                self.reseal_audit_key().await?;
            }
            Cursor::Done => return Ok(false),
        }
        Ok(true)
    }

    /// Finishes the pass, makes further passes while values a configured key opens are left
    /// (up to three passes in all), and counts what remains.
    ///
    /// # Errors
    ///
    /// The database failed; what was committed stays done, and running again resumes.
    pub async fn run(mut self) -> Result<RotationReport, StoreError> {
        loop {
            while self.next_batch().await? {}
            self.count().await?;
            let r = &self.report;
            let openable_left = [r.local_kms_keys, r.webhook_secrets, r.audit_chain_key]
                .iter()
                .map(|t| t.remaining - t.failed as i64)
                .sum::<i64>();
            if openable_left <= 0 || self.passes >= MAX_PASSES {
                return Ok(self.report);
            }
            tracing::warn!(
                left = openable_left,
                "values were sealed under another root key while the rotation ran; another pass"
            );
            self.passes += 1;
            self.cursor = Cursor::LocalKeys(None);
            self.report.local_kms_keys.failed = 0;
            self.report.webhook_secrets.failed = 0;
            self.report.audit_chain_key.failed = 0;
            self.report.failures.clear();
        }
    }

    async fn count(&mut self) -> Result<(), StoreError> {
        let materials = self.store.count_sealed_materials(&self.prefix).await?;
        let webhooks = self
            .store
            .count_sealed_webhook_secrets(&self.prefix)
            .await?;
        let chain_key = self.store.audit_chain_key().await?;
        let r = &mut self.report;
        r.audit_chain_key.total = i64::from(chain_key.is_some());
        r.audit_chain_key.remaining =
            i64::from(chain_key.is_some_and(|k| !k.starts_with(&self.prefix)));
        (r.local_kms_keys.total, r.local_kms_keys.remaining) =
            (materials.total, materials.without_prefix);
        (r.webhook_secrets.total, r.webhook_secrets.remaining) =
            (webhooks.total, webhooks.without_prefix);
        Ok(())
    }

    async fn reseal_materials(&mut self, rows: Vec<SealedMaterial>) -> Result<(), StoreError> {
        let mut resealed = Vec::with_capacity(rows.len());
        for row in rows {
            let binding = material_binding(&row.key_ref, row.version);
            match self.local_kms.open_bytes(&row.sealed, &binding) {
                Ok(material) => {
                    let new = self.local_kms.seal_bytes(&material, &binding);
                    resealed.push((row, new));
                }
                Err(e) => {
                    self.report.local_kms_keys.failed += 1;
                    self.report.fail(format!(
                        "local key {:?} version {}: {e}",
                        row.key_ref, row.version
                    ));
                }
            }
        }
        let written = self.store.reseal_materials(&resealed).await?;
        let count = written.iter().filter(|w| **w).count() as u64;
        self.report.local_kms_keys.resealed += count;
        tracing::info!(
            resealed = count,
            "re-sealed a batch of local KMS key material under the current root key"
        );
        Ok(())
    }

    async fn reseal_webhooks(&mut self, rows: Vec<SealedWebhookSecrets>) -> Result<(), StoreError> {
        let mut resealed = Vec::with_capacity(rows.len());
        let mut values = Vec::with_capacity(rows.len());
        for row in rows {
            let secret = self.reseal_secret(row.id, "secret", &row.secret_sealed);
            let previous = match row.previous_secret_sealed.as_deref() {
                Some(sealed) => self.reseal_secret(row.id, "previous secret", sealed),
                None => None,
            };
            if secret.is_none() && previous.is_none() {
                continue;
            }
            values.push(u64::from(secret.is_some()) + u64::from(previous.is_some()));
            // A value left alone (already current, or unopenable) is written back as it was.
            let new = SealedWebhookSecrets {
                id: row.id,
                secret_sealed: secret.unwrap_or_else(|| row.secret_sealed.clone()),
                previous_secret_sealed: previous.or_else(|| row.previous_secret_sealed.clone()),
            };
            resealed.push((row, new));
        }
        let written = self.store.reseal_webhook_secrets(&resealed).await?;
        let count: u64 = written
            .iter()
            .zip(&values)
            .filter(|(w, _)| **w)
            .map(|(_, n)| n)
            .sum();
        self.report.webhook_secrets.resealed += count;
        tracing::info!(
            resealed = count,
            "re-sealed a batch of webhook signing secrets under the current root key"
        );
        Ok(())
    }

    async fn reseal_audit_key(&mut self) -> Result<(), StoreError> {
        let Some(sealed) = self.store.audit_chain_key().await? else {
            return Ok(());
        };
        if sealed.starts_with(&self.prefix) {
            return Ok(());
        }
        match ChainKey::reseal(&self.audit, &sealed) {
            Ok(new) => {
                if self.store.reseal_audit_chain_key(&sealed, &new).await? {
                    self.report.audit_chain_key.resealed += 1;
                    tracing::info!("re-sealed the audit chain key under the current root key");
                }
            }
            Err(e) => {
                self.report.audit_chain_key.failed += 1;
                self.report.fail(format!("audit chain key: {e}"));
            }
        }
        Ok(())
    }

    /// `sealed` re-sealed under the current key; `None` when it already is, or (counted as
    /// a failure) when no configured key opens it.
    fn reseal_secret(&mut self, endpoint: Uuid, which: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.starts_with(&self.prefix) {
            return None;
        }
        match self.webhooks.open(sealed) {
            Ok(secret) => Some(self.webhooks.seal(&secret)),
            Err(e) => {
                self.report.webhook_secrets.failed += 1;
                self.report
                    .fail(format!("webhook endpoint {endpoint} {which}: {e}"));
                None
            }
        }
    }
}
