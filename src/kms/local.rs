//! byokd's built-in KMS: versioned 256-bit KEKs kept in the database, each version sealed
//! under the root key, used with AES-256-GCM and a random 96-bit nonce per wrap.
//!
//! Each version's seal is bound to the key's name and the version number
//! ([`material_binding`]): material copied to another key's or version's row in the database
//! does not open there ([`KmsError::SealedMaterial`]), so write access to the database cannot
//! make one key decrypt with another's material.
//!
//! It behaves like a real KMS where byokd relies on it: a disabled, pending-deletion or
//! destroyed key refuses to wrap and unwrap; an expired key still unwraps but refuses to wrap;
//! old versions keep unwrapping after a rotation. Plaintext key material lives only in
//! zeroizing buffers for the length of one call.

use super::{Dek, DekContext, KeyInfo, KmsError, KmsProvider, Wrapped, WrappedRef};
use crate::domain::{KeyState, Provider};
use crate::seal::Sealer;
use crate::store::{LocalKeyRow, Store, StoreError};
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use chrono::{DateTime, Utc};
use rand::RngCore;
use std::collections::HashMap;
use std::sync::Arc;
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;

/// The local keyring.
#[derive(Clone)]
pub struct LocalKms {
    store: Store,
    sealer: Arc<Sealer>,
}

impl std::fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKms").finish_non_exhaustive()
    }
}

fn info(row: &LocalKeyRow, now: DateTime<Utc>) -> KeyInfo {
    let expired = row.expires_at.is_some_and(|at| at <= now);
    KeyInfo {
        state: if row.state == KeyState::Enabled && expired {
            KeyState::Expired
        } else {
            row.state
        },
        current_version: row.current_version.to_string(),
        expires_at: row.expires_at,
    }
}

/// What the seal of `version` of `key_ref` is bound to: the name (length-prefixed) and the
/// version, so the seal names exactly one row.
pub fn material_binding(key_ref: &str, version: i32) -> Vec<u8> {
    let mut binding = Vec::with_capacity(4 + key_ref.len() + 4);
    binding.extend_from_slice(&(key_ref.len() as u32).to_be_bytes());
    binding.extend_from_slice(key_ref.as_bytes());
    binding.extend_from_slice(&version.to_be_bytes());
    binding
}

impl LocalKms {
    /// A keyring stored in `store`, sealed by `sealer` (purpose `local-kms-key`).
    pub fn new(store: Store, sealer: Arc<Sealer>) -> LocalKms {
        LocalKms { store, sealer }
    }

    /// Fresh key material for `version` of `key_ref`, sealed and bound to both.
    fn new_material(&self, key_ref: &str, version: i32) -> Vec<u8> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(key.as_mut());
        self.sealer
            .seal_bytes(key.as_ref(), &material_binding(key_ref, version))
    }

    /// Creates a key at version 1.
    pub async fn create(
        &self,
        key_ref: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<KeyInfo, KmsError> {
        let row = self
            .store
            .local_key_create(key_ref, &self.new_material(key_ref, 1), expires_at)
            .await?;
        Ok(info(&row, Utc::now()))
    }

    /// Adds a new version and makes it current.
    pub async fn rotate(&self, key_ref: &str) -> Result<KeyInfo, KmsError> {
        let row = self
            .store
            .local_key_rotate(key_ref, |version| self.new_material(key_ref, version))
            .await
            .map_err(|e| self.not_found(key_ref, e))?;
        Ok(info(&row, Utc::now()))
    }

    /// Moves the key to `to` if it is in one of `from`.
    pub async fn transition(
        &self,
        key_ref: &str,
        from: &[KeyState],
        to: KeyState,
    ) -> Result<KeyInfo, KmsError> {
        let row = self
            .store
            .local_key_transition(key_ref, from, to)
            .await
            .map_err(|e| self.not_found(key_ref, e))?;
        Ok(info(&row, Utc::now()))
    }

    /// Sets or clears the expiry.
    pub async fn set_expiry(
        &self,
        key_ref: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<KeyInfo, KmsError> {
        let row = self
            .store
            .local_key_set_expiry(key_ref, expires_at)
            .await
            .map_err(|e| self.not_found(key_ref, e))?;
        Ok(info(&row, Utc::now()))
    }

    fn not_found(&self, key_ref: &str, e: StoreError) -> KmsError {
        match e {
            StoreError::NotFound(_) => KmsError::NotFound {
                provider: Provider::Local,
                key_ref: key_ref.to_owned(),
            },
            other => KmsError::Store(other),
        }
    }

    /// Loads the key and the named versions' material (`[]`: the current version).
    async fn material(
        &self,
        key_ref: &str,
        versions: &[i32],
    ) -> Result<(LocalKeyRow, HashMap<i32, Zeroizing<Vec<u8>>>), KmsError> {
        let (row, sealed) = self
            .store
            .local_key_material(key_ref, versions)
            .await
            .map_err(|e| self.not_found(key_ref, e))?;
        let mut keys = HashMap::with_capacity(sealed.len());
        for (version, blob) in sealed {
            let key = self
                .sealer
                .open_bytes(&blob, &material_binding(&row.key_ref, version))
                .map_err(|reason| KmsError::SealedMaterial {
                    key_ref: row.key_ref.clone(),
                    version,
                    reason,
                })?;
            keys.insert(version, key);
        }
        Ok((row, keys))
    }

    fn unusable(key_ref: &str, state: KeyState, operation: &'static str) -> KmsError {
        KmsError::Unusable {
            provider: Provider::Local,
            key_ref: key_ref.to_owned(),
            state,
            operation,
        }
    }

    fn parse_version(key_ref: &str, version: &str) -> Result<i32, KmsError> {
        version.parse().map_err(|_| KmsError::NoSuchVersion {
            provider: Provider::Local,
            key_ref: key_ref.to_owned(),
            version: version.to_owned(),
        })
    }
}

impl KmsProvider for LocalKms {
    /// byokd's own keyring has no grants or policies: its state is the whole answer.
    fn describe_is_complete(&self) -> bool {
        true
    }

    async fn describe(&self, key_ref: &str) -> Result<KeyInfo, KmsError> {
        let row = self
            .store
            .local_key(key_ref)
            .await
            .map_err(|e| self.not_found(key_ref, e))?;
        Ok(info(&row, Utc::now()))
    }

    async fn wrap_many(
        &self,
        key_ref: &str,
        version: Option<&str>,
        items: &[(&Dek, DekContext<'_>)],
    ) -> Result<Vec<Wrapped>, KmsError> {
        let wanted = version
            .map(|v| Self::parse_version(key_ref, v))
            .transpose()?;
        let (row, keys) = self.material(key_ref, wanted.as_slice()).await?;
        let state = info(&row, Utc::now()).state;
        if state != KeyState::Enabled {
            return Err(Self::unusable(key_ref, state, "wrap"));
        }
        let version = wanted.unwrap_or(row.current_version);
        let key = keys.get(&version).ok_or_else(|| KmsError::NoSuchVersion {
            provider: Provider::Local,
            key_ref: key_ref.to_owned(),
            version: version.to_string(),
        })?;
        let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| KmsError::Integrity)?;
        items
            .iter()
            .map(|(dek, ctx)| {
                let mut nonce = [0u8; NONCE_LEN];
                rand::rng().fill_bytes(&mut nonce);
                let aad = ctx.aad();
                let sealed = cipher
                    .encrypt(
                        &nonce.into(),
                        Payload {
                            msg: dek.expose(),
                            aad: &aad,
                        },
                    )
                    .map_err(|_| KmsError::Integrity)?;
                let mut ciphertext = Vec::with_capacity(NONCE_LEN + sealed.len());
                ciphertext.extend_from_slice(&nonce);
                ciphertext.extend_from_slice(&sealed);
                Ok(Wrapped {
                    version: version.to_string(),
                    ciphertext,
                })
            })
            .collect()
    }

    async fn unwrap_many(
        &self,
        key_ref: &str,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Dek, KmsError>>, KmsError> {
        let mut versions: Vec<i32> = items
            .iter()
            .filter_map(|i| i.version.parse().ok())
            .collect();
        versions.sort_unstable();
        versions.dedup();
        if versions.is_empty() {
            // Still check the key exists and is usable, so the answer is about the key.
            versions.push(-1);
        }
        let (row, keys) = self.material(key_ref, &versions).await?;
        // Expired keys still decrypt; every other non-enabled state refuses.
        if row.state != KeyState::Enabled {
            return Err(Self::unusable(key_ref, row.state, "unwrap"));
        }
        let ciphers: HashMap<i32, Aes256Gcm> = keys
            .iter()
            .filter_map(|(v, k)| Aes256Gcm::new_from_slice(k).ok().map(|c| (*v, c)))
            .collect();
        Ok(items
            .iter()
            .map(|item| {
                let version = Self::parse_version(key_ref, item.version)?;
                let cipher = ciphers
                    .get(&version)
                    .ok_or_else(|| KmsError::NoSuchVersion {
                        provider: Provider::Local,
                        key_ref: key_ref.to_owned(),
                        version: item.version.to_owned(),
                    })?;
                if item.ciphertext.len() < NONCE_LEN {
                    return Err(KmsError::Integrity);
                }
                let (nonce, sealed) = item.ciphertext.split_at(NONCE_LEN);
                let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| KmsError::Integrity)?;
                let aad = item.ctx.aad();
                let plain = Zeroizing::new(
                    cipher
                        .decrypt(
                            &nonce.into(),
                            Payload {
                                msg: sealed,
                                aad: &aad,
                            },
                        )
                        .map_err(|_| KmsError::Integrity)?,
                );
                Dek::from_bytes(&plain).ok_or(KmsError::Integrity)
            })
            .collect())
    }
}
