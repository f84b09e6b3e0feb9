//! SQLite back end: standalone mode, one node (one daemon process per database file).
//!
//! The same store API as PostgreSQL over one database file in WAL mode. Queries are the
//! runtime functions (`sqlx::query`, read back with `Row::try_get`): the checked macros are
//! bound to PostgreSQL's offline data. Representations are fixed in
//! `migrations/sqlite/`: times are fixed-width UTC text ([`ts`]), UUIDs hyphenated text,
//! JSON and text arrays JSON text.
//!
//! PostgreSQL's multi-writer mechanisms get their one-node meaning here:
//! - row locks and `SKIP LOCKED`: every write transaction is `BEGIN IMMEDIATE`, taken in
//!   turn through one in-process queue per database file ([`Shared::writer`]), so a
//!   transaction that reads then writes never loses its snapshot to another writer and
//!   what it reads stays true until it commits;
//! - LISTEN/NOTIFY: a `changes` table written in the committing transaction and read by
//!   listeners after commit (woken at once in this process, polled for other processes such
//!   as a CLI command);
//! - advisory locks (schedules, the audit chain's lead): in-process locks per file, the
//!   daemon holding an exclusive lock file beside the database so no second daemon shares it.

use super::{
    AccessUpdate, AuditRow, Channel, KekOptions, KekRow, KekView, NewOutbox, NewTenant,
    ObserveDone, ObserveTarget, OutboxRow, SpooledAudit, StoreError, TenantRow, TenantView,
};
use crate::domain::{
    Access, AwsRole, EventKind, JobKind, JobState, KekStatus, KeyState, LifecycleEvent, Provider,
};
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous, SqliteTypeInfo, SqliteValueRef,
};
use sqlx::{Row, Sqlite, Transaction};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};
use uuid::Uuid;

mod access;
mod audit;
mod fleet;
mod kms;
mod metrics;
mod outbox;
mod reseal;
mod rewrap;
mod sweeps;
mod transfer;

pub(crate) use access::SqliteChangeListener;
pub(crate) use audit::SqliteAuditChainConn;
pub(crate) use sweeps::SqliteScheduleLock;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a writer waits for its turn (in this process, then at SQLite for another
/// process) before the store reports the database unavailable.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// PostgreSQL's `'infinity'` (a re-wrap failure that is never retried).
pub(crate) const INFINITY: &str = "9999-12-31T23:59:59.999999Z";

/// A time as stored: fixed-width UTC text with microseconds, so text order is time order.
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// [`ts`] of an optional time.
pub(crate) fn ots(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(ts)
}

/// A UUID as stored.
pub(crate) fn uid(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// A JSON array of `items`, for `json_each(?)`.
pub(crate) fn json_list<T: serde::Serialize>(items: &[T]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

fn decode_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::Other(sqlx::Error::Decode(e.into()))
}

/// Reads a UUID column.
pub(crate) fn get_uuid(row: &SqliteRow, col: &str) -> Result<Uuid, StoreError> {
    let text: String = row.try_get(col)?;
    Uuid::parse_str(&text).map_err(decode_error)
}

/// Reads a JSON column.
pub(crate) fn get_json(row: &SqliteRow, col: &str) -> Result<serde_json::Value, StoreError> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(decode_error)
}

/// Reads a column holding a JSON array of strings.
pub(crate) fn get_strings(row: &SqliteRow, col: &str) -> Result<Vec<String>, StoreError> {
    let text: Option<String> = row.try_get(col)?;
    match text {
        None => Ok(Vec::new()),
        Some(text) => serde_json::from_str(&text).map_err(decode_error),
    }
}

/// Reads a column holding a JSON array of UUIDs.
pub(crate) fn get_uuids(row: &SqliteRow, col: &str) -> Result<Vec<Uuid>, StoreError> {
    get_strings(row, col)?
        .iter()
        .map(|s| Uuid::parse_str(s).map_err(decode_error))
        .collect()
}

/// Domain enums are stored as their names in text columns, as in PostgreSQL.
macro_rules! text_enum {
    ($($ty:ty),+) => {$(
        impl sqlx::Type<Sqlite> for $ty {
            fn type_info() -> SqliteTypeInfo {
                <str as sqlx::Type<Sqlite>>::type_info()
            }

            fn compatible(ty: &SqliteTypeInfo) -> bool {
                <str as sqlx::Type<Sqlite>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, Sqlite> for $ty {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<'r, Sqlite>>::decode(value)?.parse()?)
            }
        }
    )+};
}

text_enum!(Provider, KeyState, Access, EventKind, JobKind, JobState);

/// What every store on one database file in this process shares.
pub(crate) struct Shared {
    /// One write transaction at a time, in arrival order.
    writer: Arc<Mutex<()>>,
    /// Woken after a commit that wrote to `changes`.
    pub(crate) changes: Notify,
    /// The audit chain's lead.
    pub(crate) chain_lead: Arc<Mutex<()>>,
    /// One lock per schedule name.
    pub(crate) schedules: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

static SHARED: LazyLock<std::sync::Mutex<HashMap<PathBuf, Arc<Shared>>>> =
    LazyLock::new(Default::default);

fn shared_for(path: &Path) -> Arc<Shared> {
    let mut all = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    all.entry(path.to_owned())
        .or_insert_with(|| {
            Arc::new(Shared {
                writer: Arc::new(Mutex::new(())),
                changes: Notify::new(),
                chain_lead: Arc::new(Mutex::new(())),
                schedules: std::sync::Mutex::new(HashMap::new()),
            })
        })
        .clone()
}

/// A SQLite connection pool on one database file.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    path: Arc<PathBuf>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// An open SQLite write transaction (`BEGIN IMMEDIATE`), holding this process's writer turn.
pub struct SqliteTx {
    tx: Transaction<'static, Sqlite>,
    shared: Arc<Shared>,
    /// Whether it wrote to `changes` (listeners are woken after commit).
    changed: bool,
    _turn: OwnedMutexGuard<()>,
}

/// The exclusive lock file a daemon holds beside its database while it runs (released when
/// dropped, or by the kernel when the process dies).
#[derive(Debug)]
pub struct NodeLock {
    _file: std::fs::File,
}

/// Whether `url` names a SQLite database.
pub(crate) fn is_sqlite_url(url: &str) -> bool {
    url.starts_with("sqlite:")
}

impl SqliteStore {
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed transaction (an acked event, a re-wrapped DEK) survives a
            // power loss too, not only a crash of the process.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let file = options.get_filename().to_owned();
        let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
        if path.is_empty()
            || path.starts_with(":memory:")
            || url.contains("mode=memory")
            || file.to_string_lossy().starts_with("file:")
        {
            return Err(StoreError::Conflict(
                "a SQLite database for byokd must be a file (sqlite://PATH), not in memory"
                    .to_owned(),
            ));
        }
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            return Err(StoreError::Conflict(format!(
                "the directory of the SQLite database {} does not exist",
                file.display()
            )));
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await?;
        let path = std::fs::canonicalize(&file).unwrap_or(file);
        Ok(SqliteStore {
            shared: shared_for(&path),
            path: Arc::new(path),
            pool,
        })
    }

    /// The underlying pool (tests compare against raw SQL with it).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the exclusive lock file beside the database; fails while another daemon holds
    /// it.
    pub(super) fn lock_node(&self) -> Result<NodeLock, StoreError> {
        let mut lock_path = self.path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                StoreError::Conflict(format!("cannot open {}: {e}", lock_path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => Ok(NodeLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Conflict(format!(
                "another byokd daemon is running on the SQLite database {} (it holds {}); \
                 several replicas need PostgreSQL",
                self.path.display(),
                lock_path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Conflict(format!(
                "cannot lock {}: {e}",
                lock_path.display()
            ))),
        }
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    /// Opens a write transaction once this process's previous writer is done.
    pub(super) async fn begin(&self) -> Result<SqliteTx, StoreError> {
        let turn = tokio::time::timeout(BUSY_TIMEOUT, self.shared.writer.clone().lock_owned())
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolTimedOut))?;
        let tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(SqliteTx {
            tx,
            shared: self.shared.clone(),
            changed: false,
            _turn: turn,
        })
    }

    pub(super) async fn create_tenant(&self, t: &NewTenant) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let now = ts(Utc::now());
        let inserted = sqlx::query(
            "INSERT INTO tenants (id, name, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&now)
        .execute(&mut *tx.tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "tenant {:?} already exists",
                t.id
            )));
        }
        for email in &t.contacts {
            sqlx::query(
                "INSERT INTO tenant_contacts (tenant_id, email) VALUES (?1, ?2)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&t.id)
            .bind(email)
            .execute(&mut *tx.tx)
            .await?;
        }
        for w in &t.webhooks {
            sqlx::query(
                "INSERT INTO webhook_endpoints (id, tenant_id, url, secret_sealed, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(uid(w.id))
            .bind(&t.id)
            .bind(&w.url)
            .bind(&w.secret_sealed)
            .bind(&now)
            .execute(&mut *tx.tx)
            .await?;
        }
        tx.commit().await
    }

    pub(super) async fn tenant(&self, id: &str) -> Result<TenantView, StoreError> {
        let row = sqlx::query(
            "SELECT t.id, t.name, t.access, t.access_reason, t.updated_at,
                    (SELECT json_group_array(email) FROM
                        (SELECT email FROM tenant_contacts c WHERE c.tenant_id = t.id
                         ORDER BY email)) AS contacts
             FROM tenants t WHERE t.id = ?1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {id:?}")))?;
        let now = Utc::now();
        let mut keks = Vec::new();
        for r in sqlx::query(
            "SELECT provider, key_ref, state, revoked, current_version, expires_at,
                    expiry_event_at, claim, is_primary, retired_at, observed_at, role_arn,
                    rewrap_on_rotation
             FROM keks WHERE tenant_id = ?1 ORDER BY is_primary DESC, id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        {
            let s = KekStatus {
                provider: r.try_get("provider")?,
                key_ref: r.try_get("key_ref")?,
                state: r.try_get("state")?,
                revoked: r.try_get("revoked")?,
                current_version: r.try_get("current_version")?,
                expires_at: r.try_get("expires_at")?,
                expiry_event_at: r.try_get("expiry_event_at")?,
                claim: r.try_get("claim")?,
                versions: Default::default(),
            };
            keks.push(KekView {
                provider: s.provider,
                state: crate::domain::kek::shown_state(&s, now),
                observed_state: crate::domain::kek::effective_state(&s, now),
                confirmed: s.claim.is_none(),
                claim: s.claim,
                revoked: s.revoked || s.claim == Some(EventKind::AccessRevoked),
                key_ref: s.key_ref,
                current_version: s.current_version,
                expires_at: s.expires_at,
                primary: r.try_get("is_primary")?,
                retired_at: r.try_get("retired_at")?,
                observed_at: r.try_get("observed_at")?,
                role_arn: r.try_get("role_arn")?,
                rewrap_on_rotation: r.try_get("rewrap_on_rotation")?,
            });
        }
        Ok(TenantView {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            access: row.try_get("access")?,
            reason: row.try_get("access_reason")?,
            contacts: get_strings(&row, "contacts")?,
            keks,
            updated_at: row.try_get("updated_at")?,
        })
    }

    pub(super) async fn register_kek(
        &self,
        tenant_id: &str,
        s: &KekStatus,
        options: &KekOptions,
        audit: &AuditRow,
        replace: bool,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.begin().await?;
        let now = ts(Utc::now());
        let found = sqlx::query("SELECT id FROM tenants WHERE id = ?1")
            .bind(tenant_id)
            .fetch_optional(&mut *tx.tx)
            .await?;
        if found.is_none() {
            return Err(StoreError::NotFound(format!("tenant {tenant_id:?}")));
        }
        let primary = sqlx::query(
            "SELECT id, provider, key_ref FROM keks WHERE tenant_id = ?1 AND is_primary",
        )
        .bind(tenant_id)
        .fetch_optional(&mut *tx.tx)
        .await?;
        let mut old_id = None;
        if let Some(p) = &primary {
            let provider: Provider = p.try_get("provider")?;
            let key_ref: String = p.try_get("key_ref")?;
            if !replace {
                return Err(StoreError::Conflict(format!(
                    "tenant {tenant_id:?} already has a key; register the new one with \"replace\": true"
                )));
            }
            if provider == s.provider && key_ref == s.key_ref {
                return Err(StoreError::Conflict(format!(
                    "{provider} key {key_ref:?} is already the tenant's key"
                )));
            }
            old_id = Some(p.try_get::<i64, _>("id")?);
            sqlx::query(
                "UPDATE keks SET is_primary = 0, updated_at = ?2
                 WHERE tenant_id = ?1 AND is_primary",
            )
            .bind(tenant_id)
            .bind(&now)
            .execute(&mut *tx.tx)
            .await?;
        }
        let new_id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO keks (tenant_id, provider, key_ref, state, revoked, current_version,
                               expires_at, observed_at, role_arn, external_id,
                               rewrap_on_rotation, state_changed_at, version_changed_at,
                               expiry_changed_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?8, ?8, ?8, ?8, ?8)
             ON CONFLICT (provider, key_ref) DO NOTHING
             RETURNING id",
        )
        .bind(tenant_id)
        .bind(s.provider.as_str())
        .bind(&s.key_ref)
        .bind(s.state.as_str())
        .bind(s.revoked)
        .bind(&s.current_version)
        .bind(ots(s.expires_at))
        .bind(&now)
        .bind(options.aws_role.as_ref().map(|r| r.role_arn.as_str()))
        .bind(
            options
                .aws_role
                .as_ref()
                .and_then(|r| r.external_id.as_deref()),
        )
        .bind(options.rewrap_on_rotation)
        .fetch_optional(&mut *tx.tx)
        .await?;
        let Some(new_id) = new_id else {
            return Err(StoreError::Conflict(format!(
                "{} key {:?} is already registered",
                s.provider, s.key_ref
            )));
        };
        let mut job_id = None;
        if let (Some(old), Some(version)) = (old_id, &s.current_version) {
            job_id = Some(
                sqlx::query_scalar(
                    "INSERT INTO rewrap_jobs (tenant_id, kind, kek_id, target_kek_id,
                                              target_version, not_before, created_at,
                                              updated_at)
                     VALUES (?1, 'replacement', ?2, ?3, ?4, ?5, ?5, ?5) RETURNING id",
                )
                .bind(tenant_id)
                .bind(old)
                .bind(new_id)
                .bind(version)
                .bind(&now)
                .fetch_one(&mut *tx.tx)
                .await?,
            );
        }
        tx.audit(std::slice::from_ref(audit)).await?;
        tx.commit().await?;
        Ok(job_id)
    }

    pub(super) async fn aws_role(&self, key_ref: &str) -> Result<Option<AwsRole>, StoreError> {
        let row = sqlx::query(
            "SELECT role_arn, external_id FROM keks
             WHERE provider = 'aws' AND key_ref = ?1 AND role_arn IS NOT NULL",
        )
        .bind(key_ref)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(AwsRole {
                role_arn: r.try_get("role_arn")?,
                external_id: r.try_get("external_id")?,
            })
        })
        .transpose()
    }

    pub(super) async fn tenant_keks(&self, tenant_id: &str) -> Result<Vec<KekRow>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut keks = keks_of(&[tenant_id.to_owned()], &mut conn).await?;
        count_held(&mut keks, &mut conn).await?;
        Ok(keks)
    }

    pub(super) async fn claim_confirmations(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ObserveTarget>, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "UPDATE keks SET confirm_due_at = ?2
             WHERE id IN (SELECT id FROM keks WHERE confirm_due_at <= ?1
                          ORDER BY confirm_due_at LIMIT ?3)
             RETURNING id, provider, key_ref, watch_gen, confirm_attempts",
        )
        .bind(ts(now))
        .bind(ts(lease_until))
        .bind(limit)
        .fetch_all(&mut *tx.tx)
        .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                Ok(ObserveTarget {
                    kek_id: r.try_get("id")?,
                    provider: r.try_get("provider")?,
                    key_ref: r.try_get("key_ref")?,
                    watch_gen: r.try_get("watch_gen")?,
                    attempts: r.try_get("confirm_attempts")?,
                })
            })
            .collect()
    }
}

/// The tenant columns of a [`TenantRow`] with whom to notify, for a query over `tenants t`
/// (a literal, so queries stay `&'static str` through `concat!`).
macro_rules! recipients {
    () => {
        "t.id, t.access, t.access_reason,
         (SELECT json_group_array(email) FROM
             (SELECT email FROM tenant_contacts c WHERE c.tenant_id = t.id ORDER BY email))
             AS contacts,
         (SELECT json_group_array(id) FROM
             (SELECT w.id FROM webhook_endpoints w WHERE w.tenant_id = t.id AND w.enabled
              ORDER BY w.created_at, w.id)) AS webhooks "
    };
}
pub(crate) use recipients;

/// A [`TenantRow`] from a row selecting [`recipients!`].
pub(crate) fn tenant_row(r: &SqliteRow) -> Result<TenantRow, StoreError> {
    Ok(TenantRow {
        id: r.try_get("id")?,
        access: r.try_get("access")?,
        access_reason: r.try_get("access_reason")?,
        contacts: get_strings(r, "contacts")?,
        webhooks: get_uuids(r, "webhooks")?,
    })
}

/// Every KEK of `tenants` in id order; `held_deks` is filled in by [`count_held`].
async fn keks_of(
    tenants: &[String],
    conn: &mut sqlx::SqliteConnection,
) -> Result<Vec<KekRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, tenant_id, is_primary, retired_at IS NOT NULL AS retired, provider, key_ref,
                state, revoked, current_version, expires_at, expiry_event_at, claim, claimed_at,
                watch_gen, version_states
         FROM keks WHERE tenant_id IN (SELECT value FROM json_each(?1)) ORDER BY id",
    )
    .bind(json_list(tenants))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(KekRow {
                id: r.try_get("id")?,
                tenant_id: r.try_get("tenant_id")?,
                is_primary: r.try_get("is_primary")?,
                retired: r.try_get("retired")?,
                held_deks: 0,
                watch_gen: r.try_get("watch_gen")?,
                claimed_at: r.try_get("claimed_at")?,
                status: KekStatus {
                    provider: r.try_get("provider")?,
                    key_ref: r.try_get("key_ref")?,
                    state: r.try_get("state")?,
                    revoked: r.try_get("revoked")?,
                    current_version: r.try_get("current_version")?,
                    expires_at: r.try_get("expires_at")?,
                    expiry_event_at: r.try_get("expiry_event_at")?,
                    claim: r.try_get("claim")?,
                    versions: version_states(&r.try_get::<String, _>("version_states")?),
                },
            })
        })
        .collect()
}

/// The stored `version_states`; written only by [`SqliteTx::update_keks`], so anything else
/// in it is a bug, read as nothing known rather than refusing the whole tenant (as on
/// PostgreSQL).
fn version_states(json: &str) -> std::collections::BTreeMap<String, crate::domain::KeyState> {
    serde_json::from_str(json).unwrap_or_default()
}

/// DEKs wrapped under each version of `kek_id` other than `except` (its primary), versions
/// without DEKs absent. The `(kek_id, kek_version)` index answers it without a scan of the
/// primary's DEKs beyond the count of the others.
async fn dek_version_counts(
    kek_id: i64,
    except: Option<&str>,
    conn: &mut sqlx::SqliteConnection,
) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = sqlx::query(
        "SELECT kek_version AS version, count(*) AS n FROM deks
         WHERE kek_id = ?1 AND kek_version IS NOT ?2 GROUP BY kek_version",
    )
    .bind(kek_id)
    .bind(except)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("version")?, r.try_get("n")?)))
        .collect()
}

/// DEKs wrapped under each of `kek_ids` (any version); keys with none are absent.
async fn dek_counts(
    kek_ids: &[i64],
    conn: &mut sqlx::SqliteConnection,
) -> Result<Vec<(i64, i64)>, StoreError> {
    let rows = sqlx::query(
        "SELECT kek_id, count(*) AS n FROM deks
         WHERE kek_id IN (SELECT value FROM json_each(?1)) GROUP BY kek_id",
    )
    .bind(json_list(kek_ids))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("kek_id")?, r.try_get("n")?)))
        .collect()
}

/// Counts the DEKs of keys a replacement is still moving DEKs off (not primary, not
/// retired): that count decides access while such a key is unusable.
async fn count_held(
    rows: &mut [KekRow],
    conn: &mut sqlx::SqliteConnection,
) -> Result<(), StoreError> {
    let ids: Vec<i64> = rows
        .iter()
        .filter(|k| !k.is_primary && !k.retired)
        .map(|k| k.id)
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    for (id, n) in dek_counts(&ids, conn).await? {
        if let Some(k) = rows.iter_mut().find(|k| k.id == id) {
            k.held_deks = n;
        }
    }
    Ok(())
}

impl SqliteTx {
    /// Records a change for the listeners (see `access`); they see it after commit.
    pub(crate) async fn notify_change(
        &mut self,
        channel: &str,
        payload: &str,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        sqlx::query("INSERT INTO changes (channel, payload, at) VALUES (?1, ?2, ?3)")
            .bind(channel)
            .bind(payload)
            .bind(ts(now))
            .execute(&mut *self.tx)
            .await?;
        // Listeners read changes within moments; older ones only take space.
        sqlx::query("DELETE FROM changes WHERE at < ?1")
            .bind(ts(now - access::KEEP_CHANGES))
            .execute(&mut *self.tx)
            .await?;
        self.changed = true;
        Ok(())
    }

    pub(super) async fn record_events(
        &mut self,
        events: &[&LifecycleEvent],
    ) -> Result<Vec<bool>, StoreError> {
        let now = ts(Utc::now());
        let mut fresh = Vec::with_capacity(events.len());
        // A duplicate inside `events` finds its first occurrence's row: counted once.
        for e in events {
            let inserted = sqlx::query(
                "INSERT INTO processed_events (provider, source, event_id, kind, key_ref,
                                               event_time, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
            )
            .bind(e.provider.as_str())
            .bind(&e.source)
            .bind(&e.event_id)
            .bind(e.kind.as_str())
            .bind(&e.key_ref)
            .bind(ts(e.time))
            .bind(&now)
            .execute(&mut *self.tx)
            .await?;
            fresh.push(inserted.rows_affected() == 1);
        }
        Ok(fresh)
    }

    /// Tenants are not locked one by one: this transaction holds the database's write lock.
    async fn tenants_where(
        &mut self,
        sql: &'static str,
        list: String,
    ) -> Result<Vec<TenantRow>, StoreError> {
        let rows = sqlx::query(sql).bind(list).fetch_all(&mut *self.tx).await?;
        rows.iter().map(tenant_row).collect()
    }

    pub(super) async fn lock_tenants_of(
        &mut self,
        keys: &[(Provider, String)],
    ) -> Result<Vec<TenantRow>, StoreError> {
        let pairs: Vec<[&str; 2]> = keys.iter().map(|(p, k)| [p.as_str(), k.as_str()]).collect();
        self.tenants_where(
            concat!(
                "SELECT ",
                recipients!(),
                "FROM tenants t
                 WHERE t.id IN (SELECT k.tenant_id FROM keks k
                                JOIN json_each(?1) u
                                  ON k.provider = u.value ->> 0 AND k.key_ref = u.value ->> 1)
                 ORDER BY t.id"
            ),
            json_list(&pairs),
        )
        .await
    }

    pub(super) async fn lock_tenants_of_keks(
        &mut self,
        kek_ids: &[i64],
    ) -> Result<Vec<TenantRow>, StoreError> {
        self.tenants_where(
            concat!(
                "SELECT ",
                recipients!(),
                "FROM tenants t
                 WHERE t.id IN (SELECT k.tenant_id FROM keks k
                                WHERE k.id IN (SELECT value FROM json_each(?1)))
                 ORDER BY t.id"
            ),
            json_list(kek_ids),
        )
        .await
    }

    pub(super) async fn lock_tenants(
        &mut self,
        ids: &[String],
    ) -> Result<Vec<TenantRow>, StoreError> {
        self.tenants_where(
            concat!(
                "SELECT ",
                recipients!(),
                "FROM tenants t WHERE t.id IN (SELECT value FROM json_each(?1)) ORDER BY t.id"
            ),
            json_list(ids),
        )
        .await
    }

    pub(super) async fn keks_of_tenants(
        &mut self,
        tenants: &[String],
    ) -> Result<Vec<KekRow>, StoreError> {
        let mut keks = keks_of(tenants, &mut self.tx).await?;
        count_held(&mut keks, &mut self.tx).await?;
        Ok(keks)
    }

    pub(super) async fn update_keks(
        &mut self,
        keks: &[KekRow],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let now = ts(now);
        for k in keks {
            let claim = k.status.claim.map(|c| c.as_str());
            sqlx::query(
                "UPDATE keks SET state = ?2, revoked = ?3, current_version = ?4,
                        expires_at = ?5, expiry_event_at = ?6, claim = ?7,
                        claimed_at = CASE WHEN ?7 IS NULL THEN NULL
                                          WHEN claim IS NOT ?7 THEN ?8
                                          ELSE claimed_at END,
                        version_states = ?9, updated_at = ?8
                 WHERE id = ?1",
            )
            .bind(k.id)
            .bind(k.status.state.as_str())
            .bind(k.status.revoked)
            .bind(&k.status.current_version)
            .bind(ots(k.status.expires_at))
            .bind(ots(k.status.expiry_event_at))
            .bind(claim)
            .bind(&now)
            .bind(serde_json::to_string(&k.status.versions).unwrap_or_else(|_| "{}".to_owned()))
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    pub(super) async fn request_confirmation(
        &mut self,
        kek_ids: &[i64],
        due: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if kek_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE keks SET confirm_due_at = min(COALESCE(confirm_due_at, ?2), ?2),
                             watch_gen = watch_gen + 1
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_list(kek_ids))
        .bind(ts(due))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn finish_observations(
        &mut self,
        done: &[ObserveDone],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let later = ts(now + chrono::Duration::milliseconds(250));
        let now = ts(now);
        for d in done {
            sqlx::query(
                "UPDATE keks SET
                     confirm_due_at = CASE
                         -- Events came in while the KMS was asked: look again, after a
                         -- moment for more of them to gather. (max() of a NULL is NULL, as
                         -- PostgreSQL's GREATEST is not: keep the moment then.)
                         WHEN watch_gen <> ?2 THEN max(COALESCE(confirm_due_at, ?6), ?6)
                         WHEN NOT ?4 THEN confirm_due_at
                         ELSE ?5 END,
                     confirm_attempts = CASE WHEN ?3 THEN 0 ELSE confirm_attempts + 1 END,
                     observed_at = CASE WHEN ?3 THEN ?7 ELSE observed_at END
                 WHERE id = ?1",
            )
            .bind(d.kek_id)
            .bind(d.watch_gen)
            .bind(d.answered)
            .bind(d.next_due.is_some())
            .bind(ots(d.next_due.flatten()))
            .bind(&later)
            .bind(&now)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    pub(super) async fn dek_counts(
        &mut self,
        kek_ids: &[i64],
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        if kek_ids.is_empty() {
            return Ok(Vec::new());
        }
        dek_counts(kek_ids, &mut self.tx).await
    }

    pub(super) async fn dek_version_counts(
        &mut self,
        keks: &[(i64, Option<String>)],
    ) -> Result<Vec<(i64, String, i64)>, StoreError> {
        let mut counts = Vec::new();
        for (kek_id, except) in keks {
            for (version, n) in dek_version_counts(*kek_id, except.as_deref(), &mut self.tx).await?
            {
                counts.push((*kek_id, version, n));
            }
        }
        Ok(counts)
    }

    pub(super) async fn update_access(
        &mut self,
        updates: &[AccessUpdate],
    ) -> Result<(), StoreError> {
        let now = ts(Utc::now());
        for u in updates {
            sqlx::query(
                "UPDATE tenants SET access = ?2, access_reason = ?3, updated_at = ?4
                 WHERE id = ?1",
            )
            .bind(&u.tenant_id)
            .bind(u.access.as_str())
            .bind(&u.reason)
            .bind(&now)
            .execute(&mut *self.tx)
            .await?;
            // Every cache drops what it holds about the tenant once this commits.
            self.notify_change(super::access::ACCESS_CHANNEL, &u.tenant_id)
                .await?;
        }
        Ok(())
    }

    pub(super) async fn audit(&mut self, rows: &[AuditRow]) -> Result<(), StoreError> {
        // One timestamp per call, as clock_timestamp() at one insert in PostgreSQL; ids
        // keep the order the entries were decided.
        let at = ts(Utc::now());
        for r in rows {
            let detail = r.detail.to_string();
            sqlx::query(
                "INSERT INTO audit_log (at, tenant_id, provider, key_ref, action, outcome,
                                        source, event_id, detail, client)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .bind(&at)
            .bind(&r.tenant_id)
            .bind(r.provider.map(|p| p.as_str()))
            .bind(&r.key_ref)
            .bind(&r.action)
            .bind(&r.outcome)
            .bind(&r.source)
            .bind(&r.event_id)
            .bind(detail)
            .bind(r.client())
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    pub(super) async fn ship_audit(&mut self, rows: &[SpooledAudit]) -> Result<u64, StoreError> {
        let mut inserted = 0;
        for r in rows {
            let detail = r.row.detail.to_string();
            inserted += sqlx::query(
                "INSERT INTO audit_log (attempt_id, at, tenant_id, provider, key_ref, action,
                                        outcome, source, event_id, detail, client)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (attempt_id) DO NOTHING",
            )
            .bind(uid(r.attempt_id))
            .bind(ts(r.at))
            .bind(&r.row.tenant_id)
            .bind(r.row.provider.map(|p| p.as_str()))
            .bind(&r.row.key_ref)
            .bind(&r.row.action)
            .bind(&r.row.outcome)
            .bind(&r.row.source)
            .bind(&r.row.event_id)
            .bind(detail)
            .bind(r.row.client())
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        }
        Ok(inserted)
    }

    pub(super) async fn enqueue(&mut self, rows: &[NewOutbox]) -> Result<u64, StoreError> {
        let now = ts(Utc::now());
        let mut inserted = 0;
        for r in rows {
            // seq: insertion order, max + 1 (this transaction is the only writer).
            inserted += sqlx::query(
                "INSERT INTO outbox (id, seq, tenant_id, channel, recipient, kind, dedupe_key,
                                     payload, next_attempt_at, created_at)
                 VALUES (?1, (SELECT COALESCE(max(seq), 0) + 1 FROM outbox), ?2, ?3, ?4, ?5,
                         ?6, ?7, ?8, ?8)
                 ON CONFLICT (dedupe_key) DO NOTHING",
            )
            .bind(uid(r.id))
            .bind(&r.tenant_id)
            .bind(r.channel.as_str())
            .bind(&r.recipient)
            .bind(&r.kind)
            .bind(&r.dedupe_key)
            .bind(r.payload.to_string())
            .bind(&now)
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        }
        Ok(inserted)
    }

    pub(super) async fn claim_outbox(
        &mut self,
        channel: Channel,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        // No SKIP LOCKED: this transaction holds the write lock until it commits, so no
        // other claimant reads these rows meanwhile.
        let rows = sqlx::query(
            "SELECT id, tenant_id, dedupe_key, recipient, kind, payload, attempts, created_at
             FROM outbox
             WHERE channel = ?1 AND status = 'pending' AND next_attempt_at <= ?2
             ORDER BY seq LIMIT ?3",
        )
        .bind(channel.as_str())
        .bind(ts(now))
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: get_uuid(r, "id")?,
                    tenant_id: r.try_get("tenant_id")?,
                    dedupe_key: r.try_get("dedupe_key")?,
                    recipient: r.try_get("recipient")?,
                    kind: r.try_get("kind")?,
                    payload: get_json(r, "payload")?,
                    attempts: r.try_get("attempts")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    pub(super) async fn remove_published(&mut self, ids: &[Uuid]) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?1))
               AND channel = 'amqp'",
        )
        .bind(json_list(ids))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn mark_delivered(
        &mut self,
        ids: &[Uuid],
        now: DateTime<Utc>,
        detail: &str,
    ) -> Result<(), StoreError> {
        let now = ts(now);
        let list = json_list(ids);
        sqlx::query(
            "UPDATE outbox SET status = 'delivered', delivered_at = ?2, last_error = NULL,
                    locked_until = NULL
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&list)
        .bind(&now)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query(
            "INSERT INTO notification_attempts (outbox_id, at, outcome, detail, duration_ms)
             SELECT value, ?2, 'delivered', ?3, 0 FROM json_each(?1)",
        )
        .bind(&list)
        .bind(&now)
        .bind(detail)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn reschedule(
        &mut self,
        ids: &[Uuid],
        next_attempt_at: DateTime<Utc>,
        error: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_list(ids))
        .bind(ts(next_attempt_at))
        .bind(error)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn commit(self) -> Result<(), StoreError> {
        let SqliteTx {
            tx,
            shared,
            changed,
            _turn,
        } = self;
        tx.commit().await?;
        drop(_turn);
        if changed {
            shared.changes.notify_waiters();
        }
        Ok(())
    }
}
