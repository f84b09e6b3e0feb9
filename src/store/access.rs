//! Store API of key access: clients and their tokens (hashes only), the DEKs an unwrap
//! reads, alerts, the counts the anomaly rules read from the audit trail, and the change
//! notifications that invalidate every replica's caches.

use super::{AuditRow, DekRow, Store, StoreError};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Channel a tenant id is sent on when its access changes (PostgreSQL NOTIFY; SQLite's
/// `changes` table).
pub const ACCESS_CHANNEL: &str = "byokd_access";
/// Channel a client name is sent on when it is revoked.
pub const CLIENTS_CHANNEL: &str = "byokd_clients";

/// A client of the key-access API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ClientRow {
    /// Unique name.
    pub name: String,
    /// Every tenant is in scope.
    pub all_tenants: bool,
    /// The tenants in scope otherwise.
    pub tenants: Vec<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Revoked (its token is refused from then on).
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A client to create.
#[derive(Debug, Clone)]
pub struct NewClient {
    /// Unique name.
    pub name: String,
    /// SHA-256 of its token.
    pub token_hash: Vec<u8>,
    /// Every tenant is in scope.
    pub all_tenants: bool,
    /// The tenants in scope otherwise.
    pub tenants: Vec<String>,
}

/// An alert an anomaly rule raised.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct AlertRow {
    /// Id.
    pub id: i64,
    /// The rule.
    pub rule: String,
    /// What it is about (a client, a tenant, a token fingerprint).
    pub subject: String,
    /// Start of the window it was seen in.
    pub window_start: DateTime<Utc>,
    /// The tenant concerned, if one is.
    pub tenant_id: Option<String>,
    /// The client concerned, if one is.
    pub client: Option<String>,
    /// What was observed.
    pub observed: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// More facts.
    pub detail: serde_json::Value,
    /// When.
    pub raised_at: DateTime<Utc>,
}

/// An alert to raise (ignored if the same rule, subject and window exist).
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlert {
    /// The rule.
    pub rule: String,
    /// What it is about.
    pub subject: String,
    /// Start of the window.
    pub window_start: DateTime<Utc>,
    /// The tenant concerned.
    pub tenant_id: Option<String>,
    /// The client concerned.
    pub client: Option<String>,
    /// What was observed.
    pub observed: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// More facts.
    pub detail: serde_json::Value,
}

/// Counts of access attempts in one window, grouped: what the anomaly rules read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptCount {
    /// `client`, `tenant_refused`, `token`, `inaccessible`.
    pub group: String,
    /// The client name, tenant id or token fingerprint.
    pub subject: String,
    /// The tenant, when the group is per tenant.
    pub tenant_id: Option<String>,
    /// Attempts.
    pub n: i64,
}

/// A notification received on a change channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The channel ([`ACCESS_CHANNEL`], [`CLIENTS_CHANNEL`]).
    pub channel: String,
    /// The tenant id or client name.
    pub payload: String,
}

/// A dedicated connection listening on the change channels (PostgreSQL), or a reader of
/// the changes committed to the database file (SQLite).
pub struct ChangeListener {
    inner: ListenerInner,
}

enum ListenerInner {
    Postgres(sqlx::postgres::PgListener),
    Sqlite(super::sqlite::SqliteChangeListener),
}

impl std::fmt::Debug for ChangeListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeListener")
    }
}

impl ChangeListener {
    /// The next change. An error means notifications may have been missed (the connection
    /// broke): whoever caches must forget everything.
    pub async fn next(&mut self) -> Result<Change, StoreError> {
        let inner = match &mut self.inner {
            ListenerInner::Postgres(l) => l,
            ListenerInner::Sqlite(l) => return l.next().await,
        };
        let n = inner.try_recv().await?.ok_or_else(|| {
            StoreError::Unavailable(sqlx::Error::Protocol(
                "the change listener's connection was lost".into(),
            ))
        })?;
        Ok(Change {
            channel: n.channel().to_owned(),
            payload: n.payload().to_owned(),
        })
    }
}

impl Store {
    /// Creates a client; `Conflict` if the name is taken.
    pub async fn create_client(&self, client: &NewClient) -> Result<ClientRow, StoreError> {
        dispatch!(self, s => s.create_client(client).await)
    }

    /// Every client, by name.
    pub async fn clients(&self) -> Result<Vec<ClientRow>, StoreError> {
        dispatch!(self, s => s.clients().await)
    }

    /// The client holding the token with this hash, revoked or not.
    pub async fn client_by_token_hash(&self, hash: &[u8]) -> Result<Option<ClientRow>, StoreError> {
        dispatch!(self, s => s.client_by_token_hash(hash).await)
    }

    /// Revokes a client and tells every replica; `NotFound` if there is no such client.
    pub async fn revoke_client(&self, name: &str) -> Result<ClientRow, StoreError> {
        dispatch!(self, s => s.revoke_client(name).await)
    }

    /// The tenant's DEKs among `ids` (unknown ids are left out).
    pub async fn deks_by_ids(
        &self,
        tenant_id: &str,
        ids: &[Uuid],
    ) -> Result<Vec<DekRow>, StoreError> {
        dispatch!(self, s => s.deks_by_ids(tenant_id, ids).await)
    }

    /// Appends audit rows in one transaction.
    pub async fn append_audit(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        tx.audit(rows).await?;
        tx.commit().await
    }

    /// Ships spooled audit rows in one transaction (see [`super::Tx::ship_audit`]);
    /// returns how many were new.
    pub async fn ship_audit(&self, rows: &[super::SpooledAudit]) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let inserted = tx.ship_audit(rows).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    /// Raises an alert; `false` when the same rule, subject and window was raised already.
    pub async fn raise_alert(&self, alert: &NewAlert) -> Result<bool, StoreError> {
        dispatch!(self, s => s.raise_alert(alert).await)
    }

    /// Alerts, newest first.
    pub async fn alerts(&self, limit: i64) -> Result<Vec<AlertRow>, StoreError> {
        dispatch!(self, s => s.alerts(limit).await)
    }

    /// Access attempts audited in `[from, to)`, grouped for the anomaly rules.
    pub async fn attempt_counts(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<AttemptCount>, StoreError> {
        dispatch!(self, s => s.attempt_counts(from, to).await)
    }

    /// Allowed unwraps per client in each of the `windows` windows of `width` ending at
    /// `to`: the baseline of the rate rule.
    pub async fn client_baselines(
        &self,
        to: DateTime<Utc>,
        width: chrono::Duration,
        windows: i32,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        dispatch!(self, s => s.client_baselines(to, width, windows).await)
    }

    /// Tenants that became inaccessible after `since`, with when.
    pub async fn recently_inaccessible(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        dispatch!(self, s => s.recently_inaccessible(since).await)
    }

    /// A connection listening on the access and client change channels.
    pub async fn listen_changes(&self) -> Result<ChangeListener, StoreError> {
        let inner = match self {
            Store::Postgres(s) => {
                ListenerInner::Postgres(s.listener(&[ACCESS_CHANNEL, CLIENTS_CHANNEL]).await?)
            }
            Store::Sqlite(s) => ListenerInner::Sqlite(s.listener().await?),
        };
        Ok(ChangeListener { inner })
    }
}
