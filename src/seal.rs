//! Sealing secrets at rest under a key derived from the root key: webhook signing secrets
//! ([`WEBHOOK_SECRET_PURPOSE`]) and the local KMS's key material ([`LOCAL_KMS_PURPOSE`]).
//! `byokd root-key rotate` (the `rootkey` module) re-seals every one of them; whatever starts
//! sealing something new under the root key must be added there.
//!
//! Webhook secrets must be recoverable to sign requests, so they cannot be hashed; they are
//! stored AES-256-GCM encrypted instead. The sealing key is derived from the root key with
//! HMAC-SHA256 and a purpose label, so it is never the key the local KMS uses for KEKs.
//!
//! # Format
//!
//! Version 2 (written by [`Sealer::seal`] and [`Sealer::seal_bytes`]):
//! `0x02 | key id (8) | nonce (12) | ciphertext and tag`. The key id names the root key
//! (the first 8 bytes of HMAC-SHA256(root key, "byokd/seal/key-id")), so opening picks the
//! right key among the current and previous ones without trial decryption, and
//! `root-key rotate` finds what is not yet under the current key with a prefix comparison in
//! SQL. The associated data is `"byokd/seal/v2" | purpose (length-prefixed) | key id |
//! binding`, where the binding is the caller's statement of what the secret belongs to (the
//! local KMS: key and version), so a blob moved to another row does not open.
//!
//! Version 1 (legacy, read only): `0x01 | nonce | ciphertext and tag`, associated data the
//! purpose alone: no key id (opening tries each configured root key) and no binding.
//! `root-key rotate` rewrites such blobs as version 2.

use crate::config::{RootKey, RootKeys};
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Sealing purpose of webhook signing secrets.
pub const WEBHOOK_SECRET_PURPOSE: &str = "webhook-secret";
/// Sealing purpose of the local KMS's key material.
pub const LOCAL_KMS_PURPOSE: &str = "local-kms-key";

/// Seal purpose of the audit chain's HMAC key.
pub const AUDIT_CHAIN_PURPOSE: &str = "audit-chain-key";

const LEGACY: u8 = 1;
const VERSION: u8 = 2;
const KEY_ID_LEN: usize = 8;
const NONCE_LEN: usize = 12;

/// Length of [`Sealer::current_prefix`].
pub const PREFIX_LEN: usize = 1 + KEY_ID_LEN;

/// Why a sealed secret cannot be opened. The messages name no secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Version 2, sealed under a root key byokd is not configured with.
    #[error(
        "sealed under a root key that is not configured (neither BYOKD_LOCAL_KMS_ROOT_KEY nor \
         one of BYOKD_LOCAL_KMS_PREVIOUS_ROOT_KEYS)"
    )]
    UnknownRootKey,
    /// The key is known but the blob does not authenticate under it and its binding.
    #[error(
        "it fails its integrity check (corrupted, tampered with, or moved from the row it was \
         sealed for)"
    )]
    Integrity,
    /// Version 1: no configured root key opens it.
    #[error(
        "sealed in the legacy format and no configured root key opens it (another root key, or \
         corrupted)"
    )]
    Legacy,
    /// Not a format byokd writes, or truncated.
    #[error("not sealed data byokd knows (unknown format or truncated)")]
    Malformed,
}

/// One root key's cipher for one purpose, and the id blobs sealed under it carry.
struct SealKey {
    id: [u8; KEY_ID_LEN],
    cipher: Aes256Gcm,
}

impl SealKey {
    fn new(root: &RootKey, purpose: &str) -> SealKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(root.0.as_slice())
            .expect("HMAC accepts any key length");
        // The derivation is the one version 1 used: both formats share a key per purpose and
        // are told apart by the version byte and the associated data.
        mac.update(b"byokd/seal/v1/");
        mac.update(purpose.as_bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&mac.finalize().into_bytes());
        SealKey {
            id: key_id(root),
            cipher: Aes256Gcm::new_from_slice(key.as_ref()).expect("32-byte key"),
        }
    }
}

/// The id of a root key in version-2 blobs: public, and says nothing about the key.
fn key_id(root: &RootKey) -> [u8; KEY_ID_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(root.0.as_slice())
        .expect("HMAC accepts any key length");
    mac.update(b"byokd/seal/key-id");
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&mac.finalize().into_bytes()[..KEY_ID_LEN]);
    id
}

/// Seals under the current root key and opens under it or a previous one, for one purpose.
pub struct Sealer {
    /// Current first, then the previous keys in configured order.
    keys: Vec<SealKey>,
    purpose: &'static str,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for `purpose` with `root` alone.
    pub fn new(root: &RootKey, purpose: &'static str) -> Sealer {
        Sealer {
            keys: vec![SealKey::new(root, purpose)],
            purpose,
        }
    }

    /// A sealer for `purpose` that seals under `keys.current` and also opens what the
    /// previous keys sealed.
    pub fn with_previous(keys: &RootKeys, purpose: &'static str) -> Sealer {
        Sealer {
            keys: std::iter::once(&keys.current)
                .chain(&keys.previous)
                .map(|root| SealKey::new(root, purpose))
                .collect(),
            purpose,
        }
    }

    /// What every blob sealed now starts with (version and current key id): a blob without
    /// this prefix is due for re-sealing.
    pub fn current_prefix(&self) -> [u8; PREFIX_LEN] {
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[0] = VERSION;
        prefix[1..].copy_from_slice(&self.keys[0].id);
        prefix
    }

    /// Encrypts `secret`, bound to nothing but its purpose (webhook secrets).
    pub fn seal(&self, secret: &SecretString) -> Vec<u8> {
        self.seal_bytes(secret.expose_secret().as_bytes(), &[])
    }

    /// Encrypts raw secret bytes (key material) under the current root key with a fresh
    /// random nonce, bound to `binding`: [`Sealer::open_bytes`] must be given the same.
    pub fn seal_bytes(&self, secret: &[u8], binding: &[u8]) -> Vec<u8> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = key
            .cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: secret,
                    aad: &self.aad(&key.id, binding),
                },
            )
            .expect("AES-GCM encryption of a short secret cannot fail");
        let mut out = Vec::with_capacity(PREFIX_LEN + NONCE_LEN + ciphertext.len());
        out.extend_from_slice(&self.current_prefix());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Decrypts what [`Sealer::seal`] produced.
    pub fn open(&self, sealed: &[u8]) -> Result<SecretString, SealError> {
        let plain = self.open_bytes(sealed, &[])?;
        let text = std::str::from_utf8(&plain).map_err(|_| SealError::Malformed)?;
        Ok(SecretString::from(text.to_owned()))
    }

    /// Decrypts what [`Sealer::seal_bytes`] produced with the same `binding` (ignored for
    /// legacy blobs, which have none); the result is zeroized on drop.
    pub fn open_bytes(
        &self,
        sealed: &[u8],
        binding: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Malformed)?;
        match version {
            VERSION => {
                if rest.len() < KEY_ID_LEN + NONCE_LEN {
                    return Err(SealError::Malformed);
                }
                let (id, rest) = rest.split_at(KEY_ID_LEN);
                let key = self
                    .keys
                    .iter()
                    .find(|k| k.id == id)
                    .ok_or(SealError::UnknownRootKey)?;
                decrypt(&key.cipher, rest, &self.aad(&key.id, binding)).ok_or(SealError::Integrity)
            }
            LEGACY => {
                if rest.len() < NONCE_LEN {
                    return Err(SealError::Malformed);
                }
                // No key id: each configured key is tried, the current one first.
                self.keys
                    .iter()
                    .find_map(|k| decrypt(&k.cipher, rest, self.purpose.as_bytes()))
                    .ok_or(SealError::Legacy)
            }
            _ => Err(SealError::Malformed),
        }
    }

    /// Associated data of a version-2 blob (see the module docs).
    fn aad(&self, id: &[u8; KEY_ID_LEN], binding: &[u8]) -> Vec<u8> {
        let purpose = self.purpose.as_bytes();
        let mut aad = Vec::with_capacity(13 + 4 + purpose.len() + KEY_ID_LEN + binding.len());
        aad.extend_from_slice(b"byokd/seal/v2");
        aad.extend_from_slice(&(purpose.len() as u32).to_be_bytes());
        aad.extend_from_slice(purpose);
        aad.extend_from_slice(id);
        aad.extend_from_slice(binding);
        aad
    }
}

/// Opens `nonce | ciphertext` under `cipher` and `aad`.
fn decrypt(
    cipher: &Aes256Gcm,
    nonce_and_ciphertext: &[u8],
    aad: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let (nonce, ciphertext) = nonce_and_ciphertext.split_at_checked(NONCE_LEN)?;
    let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
    cipher
        .decrypt(
            &nonce.into(),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .ok()
        .map(Zeroizing::new)
}

/// A new root key: base64 of 32 random bytes (what `BYOKD_LOCAL_KMS_ROOT_KEY` takes).
pub fn generate_root_key() -> SecretString {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(bytes.as_mut());
    SecretString::from(base64::engine::general_purpose::STANDARD.encode(bytes.as_ref()))
}

/// A new Standard Webhooks signing secret: `whsec_` + base64 of 24 random bytes.
pub fn generate_webhook_secret() -> SecretString {
    let mut bytes = Zeroizing::new([0u8; 24]);
    rand::rng().fill_bytes(bytes.as_mut());
    SecretString::from(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes.as_ref())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(byte: u8) -> RootKey {
        RootKey(Zeroizing::new([byte; 32]))
    }

    fn keys(current: u8, previous: &[u8]) -> RootKeys {
        RootKeys {
            current: root(current),
            previous: previous.iter().map(|&b| root(b)).collect(),
        }
    }

    /// A version-1 blob as byokd wrote it before version 2: the format is pinned here.
    fn legacy_blob(root_byte: u8, purpose: &'static str, secret: &[u8]) -> Vec<u8> {
        let key = SealKey::new(&root(root_byte), purpose);
        let nonce = [9u8; NONCE_LEN];
        let ciphertext = key
            .cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: secret,
                    aad: purpose.as_bytes(),
                },
            )
            .expect("encrypt");
        [&[LEGACY][..], &nonce, &ciphertext].concat()
    }

    #[test]
    fn round_trips_and_uses_a_fresh_nonce_each_time() {
        let sealer = Sealer::new(&root(7), WEBHOOK_SECRET_PURPOSE);
        let secret = SecretString::from("whsec_abc".to_owned());
        let a = sealer.seal(&secret);
        let b = sealer.seal(&secret);
        assert_ne!(a, b);
        assert_eq!(sealer.open(&a).expect("opens").expose_secret(), "whsec_abc");
        assert!(!a.windows(9).any(|w| w == b"whsec_abc"));
        assert!(a.starts_with(&sealer.current_prefix()));
    }

    #[test]
    fn refuses_other_keys_other_purposes_other_bindings_and_tampering() {
        let sealer = Sealer::new(&root(7), LOCAL_KMS_PURPOSE);
        let sealed = sealer.seal_bytes(b"material", b"key a, version 1");
        assert_eq!(
            Sealer::new(&root(8), LOCAL_KMS_PURPOSE).open_bytes(&sealed, b"key a, version 1"),
            Err(SealError::UnknownRootKey)
        );
        assert_eq!(
            Sealer::new(&root(7), "other").open_bytes(&sealed, b"key a, version 1"),
            Err(SealError::Integrity)
        );
        assert_eq!(
            sealer.open_bytes(&sealed, b"key b, version 1"),
            Err(SealError::Integrity)
        );
        assert_eq!(
            sealer.open_bytes(&sealed, b"key a, version 2"),
            Err(SealError::Integrity)
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            sealer.open_bytes(&tampered, b"key a, version 1"),
            Err(SealError::Integrity)
        );
        // A forged key id does not reach another key: the id is authenticated too.
        let mut forged = sealed.clone();
        forged[1] ^= 1;
        assert_eq!(
            sealer.open_bytes(&forged, b"key a, version 1"),
            Err(SealError::UnknownRootKey)
        );
        for bad in [&[][..], &[VERSION], &[3, 0, 0], &sealed[..PREFIX_LEN + 4]] {
            assert_eq!(sealer.open_bytes(bad, b""), Err(SealError::Malformed));
        }
        assert_eq!(
            *sealer
                .open_bytes(&sealed, b"key a, version 1")
                .expect("opens"),
            b"material"
        );
    }

    #[test]
    fn seals_under_the_current_key_and_opens_under_previous_ones_by_id() {
        let old = Sealer::new(&root(1), WEBHOOK_SECRET_PURPOSE);
        let older = Sealer::new(&root(2), WEBHOOK_SECRET_PURPOSE);
        let rotating = Sealer::with_previous(&keys(3, &[1, 2]), WEBHOOK_SECRET_PURPOSE);
        let secret = SecretString::from("s".to_owned());
        for blob in [old.seal(&secret), older.seal(&secret)] {
            assert_eq!(rotating.open(&blob).expect("opens").expose_secret(), "s");
        }
        let new = rotating.seal(&secret);
        assert!(new.starts_with(&rotating.current_prefix()));
        assert_eq!(
            rotating.current_prefix(),
            Sealer::new(&root(3), WEBHOOK_SECRET_PURPOSE).current_prefix()
        );
        assert_ne!(rotating.current_prefix(), old.current_prefix());
        // The key id is the root key's, whatever the purpose, so one prefix finds every
        // table's rows still under an old key.
        assert_eq!(
            old.current_prefix(),
            Sealer::new(&root(1), LOCAL_KMS_PURPOSE).current_prefix()
        );
        assert_eq!(old.open(&new).map(|_| ()), Err(SealError::UnknownRootKey));
    }

    #[test]
    fn legacy_blobs_open_under_any_configured_key_and_nowhere_else() {
        let blob = legacy_blob(1, LOCAL_KMS_PURPOSE, b"material");
        let current = Sealer::new(&root(1), LOCAL_KMS_PURPOSE);
        // Legacy blobs carry no binding: any binding opens them.
        assert_eq!(
            *current.open_bytes(&blob, b"anything").expect("opens"),
            b"material"
        );
        let rotating = Sealer::with_previous(&keys(2, &[1]), LOCAL_KMS_PURPOSE);
        assert_eq!(
            *rotating.open_bytes(&blob, b"").expect("opens"),
            b"material"
        );
        assert_eq!(
            Sealer::new(&root(2), LOCAL_KMS_PURPOSE).open_bytes(&blob, b""),
            Err(SealError::Legacy)
        );
        assert!(!blob.starts_with(&current.current_prefix()));
    }

    #[test]
    fn generated_keys_and_secrets_have_their_shapes() {
        let s = generate_webhook_secret();
        let b64 = s.expose_secret().strip_prefix("whsec_").expect("prefix");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        assert_eq!(raw.len(), 24);
        let key = generate_root_key();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key.expose_secret())
            .expect("base64");
        assert_eq!(raw.len(), 32);
        assert_ne!(key.expose_secret(), generate_root_key().expose_secret());
    }
}
