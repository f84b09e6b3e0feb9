//! `byokd audit verify`: walks the whole chain in chain_seq order and names the first row
//! that was modified, inserted or deleted; then checks the checkpoints (a truncated tail)
//! and the rows still unchained (only legitimate while recent).

use super::chain::{ChainKey, GENESIS, hex};
use crate::store::{AuditCheckpoint, ChainRecord, Store, StoreError};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// Rows read per page of the walk.
const PAGE: i64 = 5000;

/// The first sign of tampering found, as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// Places are missing: the rows there were deleted.
    #[error(
        "rows were deleted: chain_seq {first_missing}..={last_missing} missing {}",
        gap_place(*after, *before)
    )]
    Deleted {
        /// First missing place.
        first_missing: i64,
        /// Last missing place.
        last_missing: i64,
        /// The row before the gap (id, chain_seq), if any.
        after: Option<(i64, i64)>,
        /// The row after it (id, chain_seq).
        before: (i64, i64),
    },
    /// The row's stored chain value is the one the next row chains from, but its content no
    /// longer matches it.
    #[error(
        "row {id} (chain_seq {seq}) was modified: its content no longer matches its chain value"
    )]
    Modified {
        /// Row id.
        id: i64,
        /// Its place.
        seq: i64,
    },
    /// The next row chains straight from the row before this one: this one was put between.
    #[error(
        "row {id} (chain_seq {seq}) was inserted: the row after it chains from chain_seq {} \
         directly (later rows were renumbered)",
        seq - 1
    )]
    Inserted {
        /// Row id.
        id: i64,
        /// Its place.
        seq: i64,
    },
    /// The row does not match the chain, and its neighbours do not say why.
    #[error(
        "row {id} (chain_seq {seq}) does not match the chain: it was modified or inserted, \
         or rows before it were deleted and the rest renumbered"
    )]
    Mismatch {
        /// Row id.
        id: i64,
        /// Its place.
        seq: i64,
    },
    /// A checkpoint lies beyond the chain's end: its tail was deleted.
    #[error(
        "rows were deleted from the end: the chain ends at {} but a checkpoint recorded at {} \
         had reached chain_seq {}",
        head.map_or_else(|| "nothing (it is empty)".to_owned(), |seq| format!("chain_seq {seq}")),
        when(&checkpoint.at),
        checkpoint.chain_seq
    )]
    Truncated {
        /// Where the chain ends now.
        head: Option<i64>,
        /// The checkpoint past it.
        checkpoint: AuditCheckpoint,
    },
    /// The chain at a checkpoint's place is not what the checkpoint recorded: rows up to it
    /// were deleted and the chain rebuilt, which takes the key.
    #[error(
        "the chain at chain_seq {} no longer has the value checkpointed at {}: rows up to it \
         were replaced",
        checkpoint.chain_seq,
        when(&checkpoint.at)
    )]
    CheckpointMismatch {
        /// The checkpoint.
        checkpoint: AuditCheckpoint,
    },
    /// A row has waited to be chained far longer than chaining takes.
    #[error(
        "row {id} (recorded {}) is still unchained after more than {grace_secs} s: it was \
         inserted behind byokd's back, or no replica is chaining (a stopped daemon, or a \
         transaction held open that long)",
        when(at)
    )]
    Unchained {
        /// Row id.
        id: i64,
        /// When it says it was recorded.
        at: DateTime<Utc>,
        /// The allowed wait.
        grace_secs: u64,
    },
}

/// Where a gap lies, between two rows (id, chain_seq) or before the first one left.
fn gap_place(after: Option<(i64, i64)>, before: (i64, i64)) -> String {
    let (id, seq) = before;
    match after {
        Some((a_id, a_seq)) => {
            format!("between row {a_id} (chain_seq {a_seq}) and row {id} (chain_seq {seq})")
        }
        None => format!("before row {id} (chain_seq {seq}), the first left"),
    }
}

/// Why verification did not complete.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The trail was tampered with. (Not a `source`: the line already says it all, and an
    /// error chain printed in full would say it twice.)
    #[error("audit trail tampered with: {0}")]
    Broken(Broken),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Broken> for VerifyError {
    fn from(b: Broken) -> VerifyError {
        VerifyError::Broken(b)
    }
}

/// A time as the messages show it.
fn when(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The chain's last row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Head {
    /// Its place.
    pub chain_seq: i64,
    /// Its chain value (hex).
    pub chain: String,
}

/// One tenant's share of a verified chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TenantShare {
    /// Tenant id.
    pub id: String,
    /// Its rows in the verified chain.
    pub rows: u64,
    /// Its rows not chained yet.
    pub pending: i64,
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Chained rows verified: the whole chain, whatever the tenant.
    pub rows: u64,
    /// Always true in a report (a failure is a [`VerifyError`]).
    pub ok: bool,
    /// The last row, if any.
    pub head: Option<Head>,
    /// Rows not chained yet (all recent).
    pub pending: i64,
    /// Checkpoints found to match the chain.
    pub checkpoints: i64,
    /// The tenant asked about, with its share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantShare>,
}

/// Verifies the whole chain, the checkpoints and the unchained rows at `now`; with `tenant`,
/// also counts that tenant's rows. A tenant's rows cannot be verified apart from the rest: a
/// deleted row leaves no tenant behind, only a gap, so the whole chain is always walked.
///
/// # Errors
///
/// [`VerifyError::Broken`] naming the first row found modified, inserted or deleted; or a
/// database failure (a tenant that neither exists nor has rows in the trail is
/// [`StoreError::NotFound`]).
pub async fn verify(
    store: &Store,
    key: &ChainKey,
    tenant: Option<&str>,
    pending_grace: Duration,
    now: DateTime<Utc>,
) -> Result<Report, VerifyError> {
    if let Some(tenant) = tenant {
        match store.tenant(tenant).await {
            // A deleted (crypto-shredded) tenant's rows stay in the trail, verifiable by the
            // id they carry; a tenant that never had a row is a typo.
            Err(StoreError::NotFound(what)) => {
                let filter = crate::store::AuditFilter {
                    tenant: Some(tenant.to_owned()),
                    ..Default::default()
                };
                if store.audit_trail(&filter, None, 1).await?.is_empty() {
                    return Err(StoreError::NotFound(what).into());
                }
            }
            other => {
                other?;
            }
        }
    }
    // Read before the walk: every checkpoint recorded by then is of a head the walk reaches.
    let latest = store.audit_checkpoints(None, 1).await?.into_iter().next();
    let mut walker = Walker::new(key, tenant);
    let mut after = 0;
    loop {
        let page = store.audit_chain_page(after, PAGE).await?;
        let full = page.len() as i64 == PAGE;
        for row in page {
            after = row.chain_seq.unwrap_or(after);
            walker.push(row)?;
        }
        if !full {
            break;
        }
    }
    let (rows, tenant_rows, head) = walker.finish()?;
    let mut checkpoints = 0;
    if let Some(latest) = latest {
        let head_seq = head.as_ref().map(|h| h.chain_seq);
        if head_seq.is_none_or(|seq| seq < latest.chain_seq) {
            return Err(Broken::Truncated {
                head: head_seq,
                checkpoint: latest,
            }
            .into());
        }
        let (count, mismatch) = store.audit_checkpoint_mismatch(latest.chain_seq).await?;
        if let Some(checkpoint) = mismatch {
            return Err(Broken::CheckpointMismatch { checkpoint }.into());
        }
        checkpoints = count;
    }
    let pending = store.audit_pending(None).await?;
    let grace = chrono::Duration::from_std(pending_grace).unwrap_or(chrono::Duration::MAX);
    if let Some((id, at)) = pending.oldest
        && at < now - grace
    {
        return Err(Broken::Unchained {
            id,
            at,
            grace_secs: pending_grace.as_secs(),
        }
        .into());
    }
    let tenant = match tenant {
        Some(id) => Some(TenantShare {
            id: id.to_owned(),
            rows: tenant_rows,
            pending: store.audit_pending(Some(id)).await?.count,
        }),
        None => None,
    };
    Ok(Report {
        rows,
        ok: true,
        head,
        pending: pending.count,
        checkpoints,
        tenant,
    })
}

/// A verified row: where the next one chains from.
#[derive(Debug, Clone)]
struct Verified {
    id: i64,
    seq: i64,
    chain: Vec<u8>,
}

/// Checks rows fed in chain_seq order. A row that does not match is judged only when the
/// next one arrives (or the walk ends): the next row tells a modified row from an inserted
/// one.
struct Walker<'a> {
    key: &'a ChainKey,
    tenant: Option<&'a str>,
    last: Option<Verified>,
    suspect: Option<ChainRecord>,
    rows: u64,
    tenant_rows: u64,
}

impl<'a> Walker<'a> {
    fn new(key: &'a ChainKey, tenant: Option<&'a str>) -> Walker<'a> {
        Walker {
            key,
            tenant,
            last: None,
            suspect: None,
            rows: 0,
            tenant_rows: 0,
        }
    }

    fn push(&mut self, row: ChainRecord) -> Result<(), Broken> {
        if let Some(suspect) = self.suspect.take() {
            return Err(self.judge(&suspect, Some(&row)));
        }
        let seq = row.chain_seq.unwrap_or_default();
        let expected = self.last.as_ref().map_or(1, |l| l.seq + 1);
        if seq != expected {
            return Err(Broken::Deleted {
                first_missing: expected,
                last_missing: seq - 1,
                after: self.last.as_ref().map(|l| (l.id, l.seq)),
                before: (row.id, seq),
            });
        }
        let prev = self.last.as_ref().map_or(&GENESIS[..], |l| &l.chain);
        match &row.chain {
            Some(chain) if chain[..] == self.key.link(prev, seq, &row) => {
                self.rows += 1;
                if self.tenant.is_some() && row.tenant_id.as_deref() == self.tenant {
                    self.tenant_rows += 1;
                }
                self.last = Some(Verified {
                    id: row.id,
                    seq,
                    chain: chain.clone(),
                });
            }
            _ => self.suspect = Some(row),
        }
        Ok(())
    }

    /// Rows verified, the tenant's among them, and the head.
    fn finish(mut self) -> Result<(u64, u64, Option<Head>), Broken> {
        if let Some(suspect) = self.suspect.take() {
            return Err(self.judge(&suspect, None));
        }
        let head = self.last.map(|l| Head {
            chain_seq: l.seq,
            chain: hex(&l.chain),
        });
        Ok((self.rows, self.tenant_rows, head))
    }

    /// Why `suspect` (right after `self.last`) does not match, as far as `next` tells.
    fn judge(&self, suspect: &ChainRecord, next: Option<&ChainRecord>) -> Broken {
        let (id, seq) = (suspect.id, suspect.chain_seq.unwrap_or_default());
        if let Some(next) = next.filter(|n| n.chain_seq == Some(seq + 1)) {
            let chains_from = |prev: &[u8], at: i64| {
                next.chain.as_deref() == Some(&self.key.link(prev, at, next)[..])
            };
            if suspect
                .chain
                .as_deref()
                .is_some_and(|c| chains_from(c, seq + 1))
            {
                return Broken::Modified { id, seq };
            }
            let before = self.last.as_ref().map_or(&GENESIS[..], |l| &l.chain);
            if chains_from(before, seq) {
                return Broken::Inserted { id, seq };
            }
        }
        Broken::Mismatch { id, seq }
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::tests::{key, record};
    use super::*;

    /// A chain of `n` rows of which every third is tenant `beta`'s.
    fn chain(n: i64) -> Vec<ChainRecord> {
        let k = key();
        let mut rows: Vec<ChainRecord> = (1..=n)
            .map(|id| {
                let mut r = record(id);
                if id % 3 == 0 {
                    r.tenant_id = Some("beta".into());
                }
                r
            })
            .collect();
        let links = k.link_rows(None, &rows);
        for (r, link) in rows.iter_mut().zip(links) {
            r.chain_seq = Some(link.chain_seq);
            r.chain = Some(link.chain);
        }
        rows
    }

    fn walk(
        rows: &[ChainRecord],
        tenant: Option<&str>,
    ) -> Result<(u64, u64, Option<Head>), Broken> {
        let k = key();
        let mut w = Walker::new(&k, tenant);
        for r in rows {
            w.push(r.clone())?;
        }
        w.finish()
    }

    #[test]
    fn an_intact_chain_verifies_and_counts_the_tenant() {
        let rows = chain(9);
        let (n, beta, head) = walk(&rows, Some("beta")).expect("intact");
        assert_eq!((n, beta), (9, 3));
        let head = head.expect("head");
        assert_eq!(head.chain_seq, 9);
        assert_eq!(head.chain, hex(rows[8].chain.as_deref().expect("chained")));
        assert_eq!(walk(&[], None).expect("empty"), (0, 0, None));
    }

    #[test]
    fn a_modified_row_is_named() {
        let mut rows = chain(5);
        rows[2].outcome = "stale".into();
        assert_eq!(walk(&rows, None), Err(Broken::Modified { id: 3, seq: 3 }));
        // The last row has no successor to tell why.
        let mut rows = chain(5);
        rows[4].detail = "{}".into();
        assert_eq!(walk(&rows, None), Err(Broken::Mismatch { id: 5, seq: 5 }));
    }

    #[test]
    fn a_deleted_row_leaves_a_gap_and_so_do_the_first_rows() {
        let mut rows = chain(6);
        rows.remove(3);
        assert_eq!(
            walk(&rows, None),
            Err(Broken::Deleted {
                first_missing: 4,
                last_missing: 4,
                after: Some((3, 3)),
                before: (5, 5)
            })
        );
        let rows = chain(6);
        assert_eq!(
            walk(&rows[2..], None),
            Err(Broken::Deleted {
                first_missing: 1,
                last_missing: 2,
                after: None,
                before: (3, 3)
            })
        );
    }

    #[test]
    fn an_inserted_row_is_named_even_with_a_plausible_chain_value() {
        let mut rows = chain(5);
        // Renumber rows 3.. and put a forged row at chain_seq 3, carrying the chain value the
        // displaced row had.
        for r in rows.iter_mut().skip(2) {
            r.chain_seq = r.chain_seq.map(|s| s + 1);
        }
        let mut forged = record(99);
        forged.chain_seq = Some(3);
        forged.chain = rows[2].chain.clone();
        rows.insert(2, forged);
        assert_eq!(walk(&rows, None), Err(Broken::Inserted { id: 99, seq: 3 }));
    }

    #[test]
    fn a_renumbered_deletion_is_still_caught() {
        let mut rows = chain(5);
        rows.remove(2);
        for r in rows.iter_mut().skip(2) {
            r.chain_seq = r.chain_seq.map(|s| s - 1);
        }
        assert_eq!(walk(&rows, None), Err(Broken::Mismatch { id: 4, seq: 3 }));
    }

    #[test]
    fn messages_are_one_line_naming_the_row() {
        let cases = [
            Broken::Modified { id: 42, seq: 17 }.to_string(),
            Broken::Deleted {
                first_missing: 4,
                last_missing: 5,
                after: Some((3, 3)),
                before: (6, 6),
            }
            .to_string(),
            Broken::Inserted { id: 9, seq: 4 }.to_string(),
        ];
        assert_eq!(
            cases[0],
            "row 42 (chain_seq 17) was modified: its content no longer matches its chain value"
        );
        assert_eq!(
            cases[1],
            "rows were deleted: chain_seq 4..=5 missing between row 3 (chain_seq 3) and row 6 \
             (chain_seq 6)"
        );
        assert!(cases[2].starts_with("row 9 (chain_seq 4) was inserted"));
        assert!(cases.iter().all(|c| !c.contains('\n')));
    }
}
