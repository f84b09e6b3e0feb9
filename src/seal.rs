//! Sealing secrets at rest (webhook signing secrets) under a key derived from the root key.
//!
//! Webhook secrets must be recoverable to sign requests, so they cannot be hashed; they are
//! stored AES-256-GCM encrypted instead. The sealing key is derived from the root key with
//! HMAC-SHA256 and a purpose label, so it is never the key the local KMS uses for KEKs.

use crate::config::RootKey;
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use zeroize::Zeroizing;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// Sealing failed: the blob is not one this root key sealed (wrong key, corrupted, tampered).
#[derive(Debug, thiserror::Error)]
#[error("sealed secret cannot be opened with this root key (wrong key or corrupted data)")]
pub struct SealError;

/// Seals and opens secrets for one purpose.
pub struct Sealer {
    cipher: Aes256Gcm,
    purpose: &'static [u8],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for `purpose`, keyed from `root`.
    pub fn new(root: &RootKey, purpose: &'static str) -> Sealer {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(root.0.as_slice())
            .expect("HMAC accepts any key length");
        mac.update(b"byokd/seal/v1/");
        mac.update(purpose.as_bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&mac.finalize().into_bytes());
        let cipher = Aes256Gcm::new_from_slice(key.as_ref()).expect("32-byte key");
        Sealer {
            cipher,
            purpose: purpose.as_bytes(),
        }
    }

    /// Encrypts `secret` with a fresh random nonce.
    pub fn seal(&self, secret: &SecretString) -> Vec<u8> {
        self.seal_bytes(secret.expose_secret().as_bytes())
    }

    /// Encrypts raw secret bytes (key material) with a fresh random nonce.
    pub fn seal_bytes(&self, secret: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: secret,
                    aad: self.purpose,
                },
            )
            .expect("AES-GCM encryption of a short secret cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    /// Decrypts what [`Sealer::seal`] produced.
    pub fn open(&self, sealed: &[u8]) -> Result<SecretString, SealError> {
        let plain = self.open_bytes(sealed)?;
        let text = std::str::from_utf8(&plain).map_err(|_| SealError)?;
        Ok(SecretString::from(text.to_owned()))
    }

    /// Decrypts what [`Sealer::seal_bytes`] produced; the result is zeroized on drop.
    pub fn open_bytes(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError)?;
        if version != VERSION || rest.len() < NONCE_LEN {
            return Err(SealError);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError)?;
        self.cipher
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad: self.purpose,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError)
    }
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

    #[test]
    fn round_trips_and_uses_a_fresh_nonce_each_time() {
        let sealer = Sealer::new(&root(7), "webhook-secret");
        let secret = SecretString::from("whsec_abc".to_owned());
        let a = sealer.seal(&secret);
        let b = sealer.seal(&secret);
        assert_ne!(a, b);
        assert_eq!(sealer.open(&a).expect("opens").expose_secret(), "whsec_abc");
        assert!(!a.windows(9).any(|w| w == b"whsec_abc"));
    }

    #[test]
    fn refuses_other_keys_other_purposes_and_tampering() {
        let sealed = Sealer::new(&root(7), "webhook-secret").seal(&SecretString::from("s"));
        assert!(
            Sealer::new(&root(8), "webhook-secret")
                .open(&sealed)
                .is_err()
        );
        assert!(Sealer::new(&root(7), "other").open(&sealed).is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(
            Sealer::new(&root(7), "webhook-secret")
                .open(&tampered)
                .is_err()
        );
        assert!(Sealer::new(&root(7), "webhook-secret").open(&[]).is_err());
    }

    #[test]
    fn generated_secrets_have_the_standard_webhooks_shape() {
        let s = generate_webhook_secret();
        let b64 = s.expose_secret().strip_prefix("whsec_").expect("prefix");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        assert_eq!(raw.len(), 24);
    }
}
