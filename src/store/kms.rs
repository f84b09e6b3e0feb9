//! Store API of the local KMS keyring.

use super::{Store, StoreError};
use crate::domain::KeyState;
use chrono::{DateTime, Utc};

/// A local key as stored (material excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalKeyRow {
    /// Key name.
    pub key_ref: String,
    /// `enabled`, `disabled`, `pending_deletion` or `destroyed` (expiry is separate).
    pub state: KeyState,
    /// Version new wraps use.
    pub current_version: i32,
    /// Expiry, if any.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Creates a key with its first version's sealed material.
    pub async fn local_key_create(
        &self,
        key_ref: &str,
        material_sealed: &[u8],
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<LocalKeyRow, StoreError> {
        dispatch!(self, s => s.local_key_create(key_ref, material_sealed, expires_at).await)
    }

    /// Adds a version and makes it current; refused for pending-deletion or destroyed keys.
    /// `material` seals the new version's material for the version number it is given (the
    /// seal is bound to it), under the key's lock.
    pub async fn local_key_rotate(
        &self,
        key_ref: &str,
        material: impl FnOnce(i32) -> Vec<u8> + Send,
    ) -> Result<LocalKeyRow, StoreError> {
        dispatch!(self, s => s.local_key_rotate(key_ref, material).await)
    }

    /// Moves a key to `to` when its state is one of `from` (else [`StoreError::Conflict`]).
    /// Moving to `destroyed` also erases every version's material.
    pub async fn local_key_transition(
        &self,
        key_ref: &str,
        from: &[KeyState],
        to: KeyState,
    ) -> Result<LocalKeyRow, StoreError> {
        dispatch!(self, s => s.local_key_transition(key_ref, from, to).await)
    }

    /// Sets or clears a key's expiry.
    pub async fn local_key_set_expiry(
        &self,
        key_ref: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<LocalKeyRow, StoreError> {
        dispatch!(self, s => s.local_key_set_expiry(key_ref, expires_at).await)
    }

    /// Reads a key.
    pub async fn local_key(&self, key_ref: &str) -> Result<LocalKeyRow, StoreError> {
        dispatch!(self, s => s.local_key(key_ref).await)
    }

    /// Reads a key and the sealed material of `versions` (`[]`: the current version).
    /// Versions that do not exist are simply absent from the result.
    pub async fn local_key_material(
        &self,
        key_ref: &str,
        versions: &[i32],
    ) -> Result<(LocalKeyRow, Vec<(i32, Vec<u8>)>), StoreError> {
        dispatch!(self, s => s.local_key_material(key_ref, versions).await)
    }
}
