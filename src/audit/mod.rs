//! Tamper evidence of the audit trail, and its export.
//!
//! Owns the chain: its key ([`ChainKey`], stored sealed under the root key), the canonical
//! encoding of a row and the HMAC link (`chain`), the daemon task that chains new rows and
//! records checkpoints (`chainer`), the walk that verifies it all (`verify`), and the JSON
//! lines export for a SIEM ([`export`]). The SQL behind them is the store's.
//!
//! # One total order across replicas
//!
//! Writers never wait for the chain: any transaction on any replica inserts its audit rows
//! unchained, stamped with its transaction id (`txid`). The replica holding the chain's
//! advisory lock chains rows in batches, and only rows whose transaction is older than
//! every transaction still running (`txid < pg_snapshot_xmin(pg_current_snapshot())`),
//! taken in `(txid, id)` order. Such a row is final: no transaction that could still commit
//! has a smaller txid. So the chain grows as a prefix of one order fixed by the rows
//! themselves, whatever the timing, the batch size or the replica that chains, and a
//! transaction that committed before another began comes first (its txid is smaller).
//! `chain_seq` numbers that order densely from 1; its uniqueness and the lock, held on the
//! connection the chaining transactions run on, keep two chainers from ever both writing.
//! Because nothing can sort before the last chained row, the rows still to chain are found
//! after its `(txid, id)`; on PostgreSQL the places and values are rows of their own
//! (`audit_chain`), so an audit row is written once and never updated.

mod chain;
mod chainer;
mod verify;

pub use chain::{ChainKey, ChainKeyError};
pub use chainer::{Chainer, Round, Seat, chain_loop};
pub use verify::{Broken, Head, Report, TenantShare, VerifyError, verify};

use crate::store::{AuditFilter, Store, StoreError};
use std::io::Write;

/// Rows read per page of an export.
const EXPORT_PAGE: i64 = 500;

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output could not be written.
    #[error("cannot write the export: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes the entries matching `filter` to `out` as JSON lines, oldest first (by `at`, then
/// id), page by page, flushing after each; returns how many. Each line carries `chain_seq`
/// and `chain`, null for a row written in the last moments and not chained yet.
///
/// # Errors
///
/// A database failure, or `out` refusing a write (a closed pipe is the caller's to forgive).
pub async fn export(
    store: &Store,
    filter: &AuditFilter,
    out: &mut impl Write,
) -> Result<u64, ExportError> {
    let mut after = None;
    let mut written = 0;
    loop {
        let page = store.audit_export_page(filter, after, EXPORT_PAGE).await?;
        for entry in &page {
            serde_json::to_writer(&mut *out, entry).map_err(std::io::Error::from)?;
            out.write_all(b"\n")?;
            written += 1;
        }
        out.flush()?;
        match page.last() {
            Some(last) if page.len() as i64 == EXPORT_PAGE => after = Some((last.at, last.id)),
            _ => return Ok(written),
        }
    }
}
