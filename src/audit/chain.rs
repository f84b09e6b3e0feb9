//! The chain's arithmetic: its key, the canonical encoding of a row, and one link.
//!
//! A row's chain value is `HMAC-SHA256(key, previous value || canonical(row))`; the first
//! row's previous value is [`GENESIS`]. The encoding leaves no room for two different rows
//! to encode alike: a format label, then fixed-width big-endian integers (chain_seq, id,
//! txid, `at` in microseconds), then each text column in a fixed order as a presence byte
//! (0: NULL, 1: present) followed by its length (8 bytes) and its UTF-8 bytes. Changing it
//! breaks every stored chain, so a test pins one value.

use crate::config::RootKey;
use crate::seal::{AUDIT_CHAIN_PURPOSE, Sealer};
use crate::store::{ChainHead, ChainLink, ChainRecord};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

/// HKDF info label of the chain key: no other key byokd derives from the root key uses it.
const KEY_INFO: &[u8] = b"byokd/audit-chain/v1";
/// Leads every encoding, naming its format.
const FORMAT: &[u8] = b"byokd-audit-row/v1";
/// What the first row chains from.
pub const GENESIS: [u8; 32] = [0; 32];

/// Binding of the sealed chain key (see [`crate::seal::Sealer::seal_bytes`]).
const SEAL_BINDING: &[u8] = b"byokd/audit-chain-key/v1";

/// The key of the chain's HMAC. Stored sealed under the root key ([`ChainKey::load`]), so a
/// root-key rotation re-seals it and never changes it. Zeroized on drop.
pub struct ChainKey(Zeroizing<[u8; 32]>);

/// Why the chain key cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ChainKeyError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The stored key does not open with any configured root key.
    #[error("the audit chain key cannot be opened")]
    Sealed(#[from] crate::seal::SealError),
}

impl std::fmt::Debug for ChainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainKey([REDACTED])")
    }
}

impl ChainKey {
    /// The stored chain key, opened with any of `keys`; stored first if there is none.
    ///
    /// A deployment whose rows were chained before keys were stored used the key derived
    /// from the root key (HKDF), so that one is stored, and those rows keep verifying; a new
    /// deployment gets 32 random bytes. Replicas starting together store one key between
    /// them (the first insert wins, everyone reads it back).
    ///
    /// # Errors
    ///
    /// The database failed, or the stored key is sealed under a root key not configured.
    pub async fn load(
        store: &crate::store::Store,
        keys: &crate::config::RootKeys,
    ) -> Result<ChainKey, ChainKeyError> {
        let sealer = Sealer::with_previous(keys, AUDIT_CHAIN_PURPOSE);
        let sealed = match store.audit_chain_key().await? {
            Some(sealed) => sealed,
            None => {
                let (key, origin) = if store.audit_has_chained_rows().await? {
                    (ChainKey::derive(&keys.current), "derived")
                } else {
                    let mut bytes = Zeroizing::new([0u8; 32]);
                    rand::rng().fill_bytes(bytes.as_mut());
                    (ChainKey(bytes), "random")
                };
                let sealed = sealer.seal_bytes(key.0.as_slice(), SEAL_BINDING);
                store.init_audit_chain_key(&sealed, origin).await?
            }
        };
        ChainKey::open(&sealer, &sealed).map_err(ChainKeyError::Sealed)
    }

    /// Opens a sealed chain key.
    pub fn open(sealer: &Sealer, sealed: &[u8]) -> Result<ChainKey, crate::seal::SealError> {
        let plain = sealer.open_bytes(sealed, SEAL_BINDING)?;
        let bytes: [u8; 32] = plain
            .as_slice()
            .try_into()
            .map_err(|_| crate::seal::SealError::Malformed)?;
        Ok(ChainKey(Zeroizing::new(bytes)))
    }

    /// Seals `sealed`'s key anew under `sealer`'s current root key (root-key rotation).
    pub fn reseal(sealer: &Sealer, sealed: &[u8]) -> Result<Vec<u8>, crate::seal::SealError> {
        let key = ChainKey::open(sealer, sealed)?;
        Ok(sealer.seal_bytes(key.0.as_slice(), SEAL_BINDING))
    }

    /// The chain key derived from `root`: what deployments used before the key was stored.
    pub fn derive(root: &RootKey) -> ChainKey {
        // The root key is 32 random bytes, so HKDF needs no salt to extract from it.
        let hkdf = Hkdf::<Sha256>::new(None, root.0.as_slice());
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf.expand(KEY_INFO, key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        ChainKey(key)
    }

    /// The chain value of `record` placed at `chain_seq` after a row whose value is `prev`
    /// (32 bytes: [`GENESIS`] or a stored value, which the schema keeps at 32 bytes).
    pub fn link(&self, prev: &[u8], chain_seq: i64, record: &ChainRecord) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_slice())
            .expect("HMAC accepts any key length");
        mac.update(prev);
        mac.update(&canonical(chain_seq, record));
        mac.finalize().into_bytes().into()
    }

    /// Places and chain values for `rows`, in their order, after `head`.
    pub fn link_rows(&self, head: Option<&ChainHead>, rows: &[ChainRecord]) -> Vec<ChainLink> {
        let (mut seq, mut prev) = match head {
            Some(h) => (h.chain_seq, h.chain.clone()),
            None => (0, GENESIS.to_vec()),
        };
        rows.iter()
            .map(|row| {
                seq += 1;
                prev = self.link(&prev, seq, row).to_vec();
                ChainLink {
                    id: row.id,
                    chain_seq: seq,
                    chain: prev.clone(),
                }
            })
            .collect()
    }
}

/// The bytes a row's chain value covers (see the module docs).
fn canonical(chain_seq: i64, r: &ChainRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(FORMAT.len() + 32 + 9 * 9 + r.detail.len() + 64);
    out.extend_from_slice(FORMAT);
    for n in [chain_seq, r.id, r.txid, r.at.timestamp_micros()] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    let texts = [
        r.tenant_id.as_deref(),
        r.client.as_deref(),
        r.provider.as_deref(),
        r.key_ref.as_deref(),
        Some(r.action.as_str()),
        Some(r.outcome.as_str()),
        Some(r.source.as_str()),
        r.event_id.as_deref(),
        Some(r.detail.as_str()),
    ];
    for text in texts {
        match text {
            None => out.push(0),
            Some(text) => {
                out.push(1);
                out.extend_from_slice(&(text.len() as u64).to_be_bytes());
                out.extend_from_slice(text.as_bytes());
            }
        }
    }
    out
}

/// Lowercase hex, as chain values are shown (API, logs, reports).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};
    use proptest::prelude::*;

    pub(crate) fn key() -> ChainKey {
        ChainKey::derive(&RootKey(Zeroizing::new([0x42; 32])))
    }

    pub(crate) fn record(id: i64) -> ChainRecord {
        ChainRecord {
            id,
            chain_seq: None,
            chain: None,
            txid: 1000 + id,
            at: Utc
                .timestamp_opt(1_790_000_000, 123_456_000)
                .single()
                .expect("valid time"),
            tenant_id: Some("acme".into()),
            client: None,
            provider: Some("local".into()),
            key_ref: Some("acme-kek".into()),
            action: "disabled".into(),
            outcome: "applied".into(),
            source: "event".into(),
            event_id: Some("evt-1".into()),
            detail: r#"{"after": {"claim": "disabled"}}"#.into(),
        }
    }

    #[test]
    fn text_moved_across_a_field_boundary_encodes_differently() {
        let mut a = record(1);
        a.tenant_id = Some("ab".into());
        a.client = Some("c".into());
        let mut b = record(1);
        b.tenant_id = Some("a".into());
        b.client = Some("bc".into());
        assert_ne!(canonical(1, &a), canonical(1, &b));

        let mut a = record(1);
        a.action = "disabledapplied".into();
        a.outcome = String::new();
        let mut b = record(1);
        b.action = "disabled".into();
        b.outcome = "applied".into();
        assert_ne!(canonical(1, &a), canonical(1, &b));
    }

    #[test]
    fn null_empty_and_a_value_in_another_column_differ() {
        let mut null = record(1);
        null.client = None;
        let mut empty = record(1);
        empty.client = Some(String::new());
        assert_ne!(canonical(1, &null), canonical(1, &empty));

        let mut in_tenant = record(1);
        in_tenant.tenant_id = Some("x".into());
        in_tenant.client = None;
        let mut in_client = record(1);
        in_client.tenant_id = None;
        in_client.client = Some("x".into());
        assert_ne!(canonical(1, &in_tenant), canonical(1, &in_client));
    }

    #[test]
    fn every_column_and_the_place_change_the_chain_value() {
        let k = key();
        let base = record(7);
        let value = k.link(&GENESIS, 3, &base);
        let mut changed: Vec<ChainRecord> = Vec::new();
        let mut push = |f: &dyn Fn(&mut ChainRecord)| {
            let mut r = base.clone();
            f(&mut r);
            changed.push(r);
        };
        push(&|r| r.id += 1);
        push(&|r| r.txid += 1);
        push(&|r| r.at += chrono::Duration::microseconds(1));
        push(&|r| r.tenant_id = None);
        push(&|r| r.client = Some("svc".into()));
        push(&|r| r.provider = Some("vault".into()));
        push(&|r| r.key_ref = Some("other".into()));
        push(&|r| r.action = "enabled".into());
        push(&|r| r.outcome = "stale".into());
        push(&|r| r.source = "api".into());
        push(&|r| r.event_id = None);
        push(&|r| r.detail = r#"{"after": {"claim": null}}"#.into());
        for r in &changed {
            assert_ne!(k.link(&GENESIS, 3, r), value, "{r:?}");
        }
        assert_ne!(k.link(&GENESIS, 4, &base), value, "the place");
        assert_ne!(k.link(&[1; 32], 3, &base), value, "the predecessor");
        // The stored chain columns are what is checked, never part of the content.
        let mut chained = base.clone();
        chained.chain_seq = Some(3);
        chained.chain = Some(value.to_vec());
        assert_eq!(k.link(&GENESIS, 3, &chained), value);
    }

    #[test]
    fn the_key_is_its_own_and_the_encoding_is_pinned() {
        let other = ChainKey::derive(&RootKey(Zeroizing::new([0x43; 32])));
        assert_ne!(
            key().link(&GENESIS, 1, &record(1)),
            other.link(&GENESIS, 1, &record(1))
        );
        assert_ne!(key().0.as_slice(), [0x42; 32].as_slice());
        assert!(!format!("{:?}", key()).contains("42"));
        // A changed encoding or key label would fail every stored chain: pin one value (also
        // computed apart, with Python's hmac and hashlib, from the description above).
        assert_eq!(
            hex(&key().link(&GENESIS, 1, &record(1))),
            "d3331678805f4a594df1c70f074b346ef65648e52149158db2a6927a7b7d76c1",
            "the canonical encoding changed"
        );
    }

    #[test]
    fn rows_are_linked_one_after_another_from_the_head() {
        let k = key();
        let rows = [record(1), record(2), record(3)];
        let from_start = k.link_rows(None, &rows);
        assert_eq!(
            from_start.iter().map(|l| l.chain_seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(from_start[0].chain, k.link(&GENESIS, 1, &rows[0]).to_vec());
        assert_eq!(
            from_start[2].chain,
            k.link(&from_start[1].chain, 3, &rows[2]).to_vec()
        );
        // Chaining in two batches gives the same values as in one.
        let head = ChainHead {
            chain_seq: 1,
            chain: from_start[0].chain.clone(),
        };
        assert_eq!(k.link_rows(Some(&head), &rows[1..]), from_start[1..]);
    }

    fn text() -> impl Strategy<Value = Option<String>> {
        // A tiny alphabet makes concatenations of different splits likely to collide if the
        // encoding let them.
        proptest::option::of("[ab]{0,3}")
    }

    fn arb_record() -> impl Strategy<Value = ChainRecord> {
        (
            (0i64..3, 0i64..3, 0i64..3),
            (text(), text(), text(), text()),
            ("[ab]{0,3}", "[ab]{0,3}", "[ab]{0,3}"),
            (text(), "[ab]{0,3}"),
        )
            .prop_map(
                |((id, txid, micros), (tenant, client, provider, key_ref), (a, o, s), (e, d))| {
                    ChainRecord {
                        id,
                        chain_seq: None,
                        chain: None,
                        txid,
                        at: DateTime::from_timestamp_micros(micros).expect("valid"),
                        tenant_id: tenant,
                        client,
                        provider,
                        key_ref,
                        action: a,
                        outcome: o,
                        source: s,
                        event_id: e,
                        detail: d,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn two_rows_encode_alike_only_when_they_are_alike(
            a in arb_record(), b in arb_record(), sa in 0i64..3, sb in 0i64..3
        ) {
            prop_assert_eq!(canonical(sa, &a) == canonical(sb, &b), a == b && sa == sb);
        }
    }
}
