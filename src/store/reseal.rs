//! Store API of root-key rotation: walking every sealed column in key order and writing
//! re-sealed values back, each guarded by the value it replaces.

use super::{Store, StoreError};
use uuid::Uuid;

/// One local KMS key version's sealed material (no `Debug`: sealed bytes are nobody's log
/// content).
pub struct SealedMaterial {
    /// Key name.
    pub key_ref: String,
    /// Version.
    pub version: i32,
    /// Sealed material.
    pub sealed: Vec<u8>,
}

/// A webhook endpoint's sealed signing secrets.
pub struct SealedWebhookSecrets {
    /// Endpoint id.
    pub id: Uuid,
    /// The signing secret, sealed.
    pub secret_sealed: Vec<u8>,
    /// The secret it replaced, sealed, if one is kept.
    pub previous_secret_sealed: Option<Vec<u8>>,
}

/// How many sealed values a table holds, and how many of them lack a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SealedCount {
    /// Sealed values in all.
    pub total: i64,
    /// Those that do not start with the prefix asked about.
    pub without_prefix: i64,
}

impl Store {
    /// Up to `limit` local key versions after `after` (key, version) in key order whose
    /// sealed material does not start with `prefix`.
    pub async fn sealed_materials_without(
        &self,
        prefix: &[u8],
        after: Option<(&str, i32)>,
        limit: i64,
    ) -> Result<Vec<SealedMaterial>, StoreError> {
        dispatch!(self, s => s.sealed_materials_without(prefix, after, limit).await)
    }

    /// Replaces sealed material, each only where it still is the value read (a row changed
    /// meanwhile is left alone); says which were replaced. One transaction.
    pub async fn reseal_materials(
        &self,
        rows: &[(SealedMaterial, Vec<u8>)],
    ) -> Result<Vec<bool>, StoreError> {
        dispatch!(self, s => s.reseal_materials(rows).await)
    }

    /// Counts local key versions' sealed material, and those not starting with `prefix`.
    pub async fn count_sealed_materials(&self, prefix: &[u8]) -> Result<SealedCount, StoreError> {
        dispatch!(self, s => s.count_sealed_materials(prefix).await)
    }

    /// Up to `limit` webhook endpoints after `after` in id order with a sealed secret that
    /// does not start with `prefix`.
    pub async fn sealed_webhook_secrets_without(
        &self,
        prefix: &[u8],
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<SealedWebhookSecrets>, StoreError> {
        dispatch!(self, s => s.sealed_webhook_secrets_without(prefix, after, limit).await)
    }

    /// Replaces endpoints' sealed secrets (old, new), each only where both still are the
    /// values read; says which endpoints were updated. One transaction.
    pub async fn reseal_webhook_secrets(
        &self,
        rows: &[(SealedWebhookSecrets, SealedWebhookSecrets)],
    ) -> Result<Vec<bool>, StoreError> {
        dispatch!(self, s => s.reseal_webhook_secrets(rows).await)
    }

    /// Counts sealed webhook secrets (current and previous), and those not starting with
    /// `prefix`.
    pub async fn count_sealed_webhook_secrets(
        &self,
        prefix: &[u8],
    ) -> Result<SealedCount, StoreError> {
        dispatch!(self, s => s.count_sealed_webhook_secrets(prefix).await)
    }
}
