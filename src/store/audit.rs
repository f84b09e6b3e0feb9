//! Store API of the audit trail: reading it (filtered listings, exports), and the chain that
//! makes it tamper-evident (reading rows in chain order, chaining new rows, checkpoints).
//!
//! Rows are written unchained by whichever transaction decides them (see
//! [`super::StoreTx::audit`]); the chain is computed by the `audit` module, which hands the
//! store the values to write through an [`AuditChainConn`].

use super::{Store, StoreError};
use chrono::{DateTime, Utc};

/// One audit entry as the API and exports show it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Row id, in insertion order (newest is highest).
    pub id: i64,
    /// Place in the chain (the total order of the trail); `None` until chained, about a
    /// second after the row's transaction committed.
    pub chain_seq: Option<i64>,
    /// The row's chain value (hex HMAC-SHA256), when chained.
    pub chain: Option<String>,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// The tenant concerned, when known.
    pub tenant_id: Option<String>,
    /// The API client whose request this records, if any.
    pub client: Option<String>,
    /// Key provider, when a key is concerned.
    pub provider: Option<String>,
    /// Key, when a key is concerned.
    pub key_ref: Option<String>,
    /// What was attempted.
    pub action: String,
    /// What came of it.
    pub outcome: String,
    /// Who asked: event, api, probe, sweep.
    pub source: String,
    /// The event id, for event-driven entries.
    pub event_id: Option<String>,
    /// States before and after, reasons.
    pub detail: serde_json::Value,
}

/// Conditions on audit entries; `None` matches anything. Times are `since <= at < until`.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this tenant's entries.
    pub tenant: Option<String>,
    /// Only this client's.
    pub client: Option<String>,
    /// Only this action.
    pub action: Option<String>,
    /// Only this outcome.
    pub outcome: Option<String>,
    /// Recorded at or after.
    pub since: Option<DateTime<Utc>>,
    /// Recorded before.
    pub until: Option<DateTime<Utc>>,
}

/// A row as the chain covers it: every column that says what happened, exactly as stored.
/// Text columns stay text (a provider name the code does not know must still verify);
/// `detail` is PostgreSQL's text form of the stored `jsonb`, which is canonical (keys
/// ordered, fixed spacing, numbers as stored), so any change to the value changes it; on
/// SQLite, the text as stored. A row brought from SQLite to PostgreSQL by `byokd import` keeps
/// the text it was chained with (`audit_log.detail_text`, checked against the jsonb).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRecord {
    /// Row id.
    pub id: i64,
    /// Place in the chain, when chained.
    pub chain_seq: Option<i64>,
    /// Chain value, when chained.
    pub chain: Option<Vec<u8>>,
    /// The inserting transaction (`xid8`): with the id, the key of the chain's order.
    pub txid: i64,
    /// When it was recorded (microseconds, as stored).
    pub at: DateTime<Utc>,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// API client.
    pub client: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// Key.
    pub key_ref: Option<String>,
    /// Action.
    pub action: String,
    /// Outcome.
    pub outcome: String,
    /// Source.
    pub source: String,
    /// Event id.
    pub event_id: Option<String>,
    /// The `detail` text the chain covers (see above).
    pub detail: String,
}

/// The last chained row: where the next row's chain starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// Its place.
    pub chain_seq: i64,
    /// Its chain value.
    pub chain: Vec<u8>,
}

/// A place and chain value to give an unchained row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// The row.
    pub id: i64,
    /// Its place.
    pub chain_seq: i64,
    /// Its chain value.
    pub chain: Vec<u8>,
}

/// A recorded head of the chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct AuditCheckpoint {
    /// The head's place.
    pub chain_seq: i64,
    /// Its chain value (hex).
    pub chain: String,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

/// Rows not chained yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingRows {
    /// How many.
    pub count: i64,
    /// The oldest by its recorded time: (row id, at).
    pub oldest: Option<(i64, DateTime<Utc>)>,
}

/// A connection of its own for chaining, on which one replica at a time holds the chain's
/// PostgreSQL advisory lock. Every chaining transaction runs on this same connection, so a
/// replica that loses the connection loses the lock and its open transaction together:
/// two chainers never write at once. Closing it releases the lock. On SQLite (one node) the
/// lead is an in-process lock per database file.
pub struct AuditChainConn {
    inner: ChainInner,
}

enum ChainInner {
    Postgres(super::postgres::PgAuditChainConn),
    Sqlite(super::sqlite::SqliteAuditChainConn),
}

/// Forwards a method to the back end of an [`AuditChainConn`].
macro_rules! chain_dispatch {
    ($self:ident, $inner:ident => $call:expr) => {
        match $self {
            ChainInner::Postgres($inner) => $call,
            ChainInner::Sqlite($inner) => $call,
        }
    };
}

impl AuditChainConn {
    /// Takes the lead if no other connection holds it; `true` while this one leads.
    pub async fn try_lead(&mut self) -> Result<bool, StoreError> {
        let inner = &mut self.inner;
        chain_dispatch!(inner, c => c.try_lead().await)
    }

    /// The last chained row, if any.
    pub async fn head(&mut self) -> Result<Option<ChainHead>, StoreError> {
        let inner = &mut self.inner;
        chain_dispatch!(inner, c => c.head().await)
    }

    /// In one transaction: reads the head and up to `limit` unchained rows whose inserting
    /// transaction is older than every running one (so no row can still appear before
    /// them), in (txid, id) order; asks `link` for their places and chain values; writes
    /// them.
    /// Returns the new head (the old one when nothing was chainable) and how many rows were
    /// chained. Refuses ([`StoreError::Conflict`]) without this connection leading, and
    /// rolls back if another writer chained any of the rows meanwhile.
    pub async fn chain_batch(
        &mut self,
        limit: i64,
        link: impl FnOnce(Option<&ChainHead>, &[ChainRecord]) -> Vec<ChainLink> + Send,
    ) -> Result<(Option<ChainHead>, usize), StoreError> {
        let inner = &mut self.inner;
        chain_dispatch!(inner, c => c.chain_batch(limit, link).await)
    }

    /// The newest checkpoint.
    pub async fn latest_checkpoint(&mut self) -> Result<Option<AuditCheckpoint>, StoreError> {
        let inner = &mut self.inner;
        chain_dispatch!(inner, c => c.latest_checkpoint().await)
    }

    /// Records `head` as a checkpoint now; `None` if one exists at its place already (it is
    /// kept as it was).
    pub async fn record_checkpoint(
        &mut self,
        head: &ChainHead,
    ) -> Result<Option<AuditCheckpoint>, StoreError> {
        let inner = &mut self.inner;
        chain_dispatch!(inner, c => c.record_checkpoint(head).await)
    }

    /// Lets the lead go and closes the connection.
    pub async fn close(self) {
        let inner = self.inner;
        chain_dispatch!(inner, c => c.close().await);
    }
}

impl Store {
    /// The audit chain's key, sealed, if one was stored.
    pub async fn audit_chain_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        dispatch!(self, s => s.audit_chain_key().await)
    }

    /// Whether any audit row is chained already.
    pub async fn audit_has_chained_rows(&self) -> Result<bool, StoreError> {
        dispatch!(self, s => s.audit_has_chained_rows().await)
    }

    /// Stores the sealed chain key unless one is stored already; returns the stored one
    /// (replicas starting together all end up with the first).
    pub async fn init_audit_chain_key(
        &self,
        sealed: &[u8],
        origin: &str,
    ) -> Result<Vec<u8>, StoreError> {
        dispatch!(self, s => s.init_audit_chain_key(sealed, origin).await)
    }

    /// Replaces the sealed chain key where it still is `old`; says whether it was.
    pub async fn reseal_audit_chain_key(&self, old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        dispatch!(self, s => s.reseal_audit_chain_key(old, new).await)
    }

    /// Audit entries matching `filter`, newest first, older than row `before` when given.
    pub async fn audit_trail(
        &self,
        filter: &AuditFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        dispatch!(self, s => s.audit_trail(filter, before, limit).await)
    }

    /// Entries matching `filter` in time order (`at`, then id), after the entry at `after`
    /// (`at`, id) when given: one page of an export.
    pub async fn audit_export_page(
        &self,
        filter: &AuditFilter,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        dispatch!(self, s => s.audit_export_page(filter, after, limit).await)
    }

    /// Chained rows in chain order, from the one after `after_seq`.
    pub async fn audit_chain_page(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<ChainRecord>, StoreError> {
        dispatch!(self, s => s.audit_chain_page(after_seq, limit).await)
    }

    /// Rows not chained yet, of one tenant when given.
    pub async fn audit_pending(&self, tenant_id: Option<&str>) -> Result<PendingRows, StoreError> {
        dispatch!(self, s => s.audit_pending(tenant_id).await)
    }

    /// Checkpoints, newest first, below `before` (a chain_seq) when given.
    pub async fn audit_checkpoints(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        dispatch!(self, s => s.audit_checkpoints(before, limit).await)
    }

    /// How many checkpoints there are up to `up_to_seq`, and the first of them whose value
    /// differs from the chain value stored at its place (or whose row is gone).
    pub async fn audit_checkpoint_mismatch(
        &self,
        up_to_seq: i64,
    ) -> Result<(i64, Option<AuditCheckpoint>), StoreError> {
        dispatch!(self, s => s.audit_checkpoint_mismatch(up_to_seq).await)
    }

    /// A connection of its own for chaining (see [`AuditChainConn`]), not yet leading.
    pub async fn audit_chain_conn(&self) -> Result<AuditChainConn, StoreError> {
        let inner = match self {
            Store::Postgres(s) => ChainInner::Postgres(s.audit_chain_conn().await?),
            Store::Sqlite(s) => ChainInner::Sqlite(s.audit_chain_conn()),
        };
        Ok(AuditChainConn { inner })
    }
}
