//! PostgreSQL back end.
//!
//! Every query is checked against the schema at compile time (`sqlx::query!` and friends);
//! the offline data in `.sqlx/` lets a build do that without a database (see
//! `scripts/sqlx-prepare`). Domain enums live in text columns and decode from their
//! snake_case names. Batch writes bind one array per column and `UNNEST` them, so applying a
//! batch of events costs a fixed handful of round trips whatever its size.

use super::{
    AccessUpdate, AuditRow, Channel, KekOptions, KekRow, KekView, NewOutbox, NewTenant,
    ObserveDone, ObserveTarget, OutboxRow, SpooledAudit, StoreError, TenantRow, TenantView,
};
use crate::domain::{
    Access, AwsRole, EventKind, JobKind, JobState, KekStatus, KeyState, LifecycleEvent, Provider,
};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgTypeInfo, PgValueRef};
use sqlx::{Postgres, Transaction};
use std::collections::HashSet;
use std::time::Duration;
use uuid::Uuid;

/// `sqlx::query_as!` into `$out` of `$select`, then a tenant (`t`) with whom to notify, then
/// `$rest`. The tenant lands in the fields `id, access, access_reason, contacts, webhooks`:
/// `$out` is a [`TenantRow`] or a flat row that has them too. The list is written once here;
/// the query macros accept concatenated literals, so every query using it is still checked.
macro_rules! query_recipients {
    ($out:path, $select:literal, $rest:literal $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            $out,
            $select
                + "t.id, t.access AS \"access: crate::domain::Access\", t.access_reason,
                   ARRAY(SELECT email FROM tenant_contacts c WHERE c.tenant_id = t.id
                         ORDER BY email) AS \"contacts!\",
                   ARRAY(SELECT w.id FROM webhook_endpoints w
                         WHERE w.tenant_id = t.id AND w.enabled
                         ORDER BY w.created_at, w.id) AS \"webhooks!\" "
                + $rest
            $(, $arg)*
        )
    };
}

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

pub(crate) use audit::PgAuditChainConn;
pub(crate) use sweeps::PgScheduleLock;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A PostgreSQL connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// An open PostgreSQL transaction.
pub struct PgTx {
    tx: Transaction<'static, Postgres>,
}

/// Domain enums are stored as their names in text columns. Decoding checks the name, so a
/// value the code does not know fails the query with a decode error naming it, not a panic.
macro_rules! text_enum {
    ($($ty:ty),+) => {$(
        impl sqlx::Type<Postgres> for $ty {
            fn type_info() -> PgTypeInfo {
                <str as sqlx::Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <str as sqlx::Type<Postgres>>::compatible(ty)
            }
        }

        impl<'r> sqlx::Decode<'r, Postgres> for $ty {
            fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok(<&str as sqlx::Decode<'r, Postgres>>::decode(value)?.parse()?)
            }
        }
    )+};
}

text_enum!(Provider, KeyState, Access, EventKind, JobKind, JobState);

fn key_columns(keys: &[(Provider, String)]) -> (Vec<&'static str>, Vec<&str>) {
    keys.iter().map(|(p, k)| (p.as_str(), k.as_str())).unzip()
}

/// The inbox key columns (provider, source, id) of `events`, for UNNEST.
fn event_keys<'a>(events: &[&'a LifecycleEvent]) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>) {
    let mut columns = (
        Vec::with_capacity(events.len()),
        Vec::with_capacity(events.len()),
        Vec::with_capacity(events.len()),
    );
    for e in events {
        columns.0.push(e.provider.as_str());
        columns.1.push(e.source.as_str());
        columns.2.push(e.event_id.as_str());
    }
    columns
}

/// Every KEK of `tenants` in id order; `held_deks` is filled in by [`count_held`].
async fn keks_of<'c, E>(tenants: &[String], db: E) -> Result<Vec<KekRow>, StoreError>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    let rows = sqlx::query!(
        r#"SELECT k.id, k.tenant_id, k.is_primary, k.retired_at IS NOT NULL AS "retired!",
                  k.provider AS "provider: Provider", k.key_ref, k.state AS "state: KeyState",
                  k.revoked, k.current_version, k.expires_at, k.expiry_event_at,
                  k.claim AS "claim: EventKind", k.claimed_at, k.watch_gen, k.version_states
           FROM keks k WHERE k.tenant_id = ANY($1) ORDER BY k.id"#,
        tenants
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| KekRow {
            id: r.id,
            tenant_id: r.tenant_id,
            is_primary: r.is_primary,
            retired: r.retired,
            held_deks: 0,
            watch_gen: r.watch_gen,
            claimed_at: r.claimed_at,
            status: KekStatus {
                provider: r.provider,
                key_ref: r.key_ref,
                state: r.state,
                revoked: r.revoked,
                current_version: r.current_version,
                expires_at: r.expires_at,
                expiry_event_at: r.expiry_event_at,
                claim: r.claim,
                versions: version_states(r.version_states),
            },
        })
        .collect())
}

/// The stored `version_states`; written only by [`PgTx::update_keks`], so anything else in
/// it is a bug, read as nothing known rather than refusing the whole tenant.
fn version_states(
    json: serde_json::Value,
) -> std::collections::BTreeMap<String, crate::domain::KeyState> {
    serde_json::from_value(json).unwrap_or_default()
}

/// DEKs wrapped under each version of `kek_id` other than `except` (its primary): the
/// versions are found with one index probe each (a loose index scan), and only the other
/// versions' DEKs are counted, so a key holding a million DEKs under its primary costs
/// milliseconds, not a scan of them all.
async fn dek_version_counts<'c, E>(
    kek_id: i64,
    except: Option<&str>,
    db: E,
) -> Result<Vec<(String, i64)>, StoreError>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    let rows = sqlx::query!(
        r#"WITH RECURSIVE v(ver) AS (
               SELECT min(kek_version) FROM deks WHERE kek_id = $1
             UNION ALL
               SELECT (SELECT min(kek_version) FROM deks
                       WHERE kek_id = $1 AND kek_version > v.ver)
               FROM v WHERE v.ver IS NOT NULL
           )
           SELECT ver AS "version!",
                  (SELECT count(*) FROM deks d WHERE d.kek_id = $1 AND d.kek_version = ver)
                      AS "n!"
           FROM v WHERE ver IS NOT NULL AND ver IS DISTINCT FROM $2"#,
        kek_id,
        except
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.version, r.n)).collect())
}

/// DEKs wrapped under each of `kek_ids` (any version); keys with none are absent.
async fn dek_counts<'c, E>(kek_ids: &[i64], db: E) -> Result<Vec<(i64, i64)>, StoreError>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    let rows = sqlx::query!(
        r#"SELECT kek_id, count(*) AS "n!" FROM deks WHERE kek_id = ANY($1) GROUP BY kek_id"#,
        kek_ids
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.kek_id, r.n)).collect())
}

/// Counts the DEKs of keys a replacement is still moving DEKs off (not primary, not
/// retired): that count decides access while such a key is unusable. A separate statement,
/// run only when there are such keys: as a subquery in every read of a tenant's keys it made
/// the planner's estimate for a key holding a million DEKs push each read into JIT
/// compilation, on the path every event takes.
async fn count_held<'c, E>(rows: &mut [KekRow], db: E) -> Result<(), StoreError>
where
    E: sqlx::Executor<'c, Database = Postgres>,
{
    let ids: Vec<i64> = rows
        .iter()
        .filter(|k| !k.is_primary && !k.retired)
        .map(|k| k.id)
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    for (id, n) in dek_counts(&ids, db).await? {
        if let Some(k) = rows.iter_mut().find(|k| k.id == id) {
            k.held_deks = n;
        }
    }
    Ok(())
}

impl PgStore {
    pub(super) async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options = url
            .parse::<PgConnectOptions>()?
            // PostgreSQL's NOTICEs (sqlx logs them at INFO) say nothing byokd acts on, and
            // migrations raise one on every start ("relation _sqlx_migrations already
            // exists"); warnings and errors still come through.
            .options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // Fail fast while the database is down: callers decide how to wait.
            .acquire_timeout(Duration::from_secs(3))
            .connect_with(options)
            .await?;
        Ok(PgStore { pool })
    }

    /// The underlying pool (benchmarks and tests compare against raw SQL with it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query!("SELECT 1 AS one")
            .fetch_one(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn begin(&self) -> Result<PgTx, StoreError> {
        Ok(PgTx {
            tx: self.pool.begin().await?,
        })
    }

    pub(super) async fn create_tenant(&self, t: &NewTenant) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query!(
            "INSERT INTO tenants (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            t.id,
            t.name
        )
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "tenant {:?} already exists",
                t.id
            )));
        }
        sqlx::query!(
            "INSERT INTO tenant_contacts (tenant_id, email)
             SELECT $1, e FROM UNNEST($2::text[]) AS e ON CONFLICT DO NOTHING",
            t.id,
            &t.contacts
        )
        .execute(&mut *tx)
        .await?;
        let ids: Vec<Uuid> = t.webhooks.iter().map(|w| w.id).collect();
        let urls: Vec<&str> = t.webhooks.iter().map(|w| w.url.as_str()).collect();
        let secrets: Vec<&[u8]> = t
            .webhooks
            .iter()
            .map(|w| w.secret_sealed.as_slice())
            .collect();
        sqlx::query!(
            "INSERT INTO webhook_endpoints (id, tenant_id, url, secret_sealed)
             SELECT u.id, $1, u.url, u.secret FROM UNNEST($2::uuid[], $3::text[], $4::bytea[])
                 AS u(id, url, secret)",
            t.id,
            &ids,
            &urls as &[&str],
            &secrets as &[&[u8]]
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn tenant(&self, id: &str) -> Result<TenantView, StoreError> {
        let row = sqlx::query!(
            r#"SELECT t.id, t.name, t.access AS "access: Access", t.access_reason, t.updated_at,
                      ARRAY(SELECT email FROM tenant_contacts c WHERE c.tenant_id = t.id
                            ORDER BY email) AS "contacts!"
               FROM tenants t WHERE t.id = $1"#,
            id
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {id:?}")))?;
        let now = Utc::now();
        let keks = sqlx::query!(
            r#"SELECT provider AS "provider: Provider", key_ref, state AS "state: KeyState",
                      revoked, current_version, expires_at, expiry_event_at,
                      claim AS "claim: EventKind", is_primary, retired_at, observed_at,
                      role_arn, rewrap_on_rotation
               FROM keks WHERE tenant_id = $1 ORDER BY is_primary DESC, id"#,
            id
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| {
            let s = KekStatus {
                provider: r.provider,
                key_ref: r.key_ref,
                state: r.state,
                revoked: r.revoked,
                current_version: r.current_version,
                expires_at: r.expires_at,
                expiry_event_at: r.expiry_event_at,
                claim: r.claim,
                versions: Default::default(),
            };
            KekView {
                provider: s.provider,
                state: crate::domain::kek::shown_state(&s, now),
                observed_state: crate::domain::kek::effective_state(&s, now),
                confirmed: s.claim.is_none(),
                claim: s.claim,
                key_ref: s.key_ref,
                revoked: s.revoked || s.claim == Some(EventKind::AccessRevoked),
                current_version: s.current_version,
                expires_at: s.expires_at,
                primary: r.is_primary,
                retired_at: r.retired_at,
                observed_at: r.observed_at,
                role_arn: r.role_arn,
                rewrap_on_rotation: r.rewrap_on_rotation,
            }
        })
        .collect();
        Ok(TenantView {
            id: row.id,
            name: row.name,
            access: row.access,
            reason: row.access_reason,
            contacts: row.contacts,
            keks,
            updated_at: row.updated_at,
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
        let mut tx = PgTx {
            tx: self.pool.begin().await?,
        };
        let locked =
            sqlx::query_scalar!("SELECT id FROM tenants WHERE id = $1 FOR UPDATE", tenant_id)
                .fetch_optional(&mut *tx.tx)
                .await?;
        if locked.is_none() {
            return Err(StoreError::NotFound(format!("tenant {tenant_id:?}")));
        }
        let primary = sqlx::query!(
            r#"SELECT id, provider AS "provider: Provider", key_ref FROM keks
               WHERE tenant_id = $1 AND is_primary"#,
            tenant_id
        )
        .fetch_optional(&mut *tx.tx)
        .await?;
        if let Some(p) = &primary {
            if !replace {
                return Err(StoreError::Conflict(format!(
                    "tenant {tenant_id:?} already has a key; register the new one with \"replace\": true"
                )));
            }
            if p.provider == s.provider && p.key_ref == s.key_ref {
                return Err(StoreError::Conflict(format!(
                    "{} key {:?} is already the tenant's key",
                    p.provider, p.key_ref
                )));
            }
            sqlx::query!(
                "UPDATE keks SET is_primary = FALSE, updated_at = now()
                 WHERE tenant_id = $1 AND is_primary",
                tenant_id
            )
            .execute(&mut *tx.tx)
            .await?;
        }
        let new_id = sqlx::query_scalar!(
            "INSERT INTO keks (tenant_id, provider, key_ref, state, revoked, current_version,
                               expires_at, observed_at, role_arn, external_id,
                               rewrap_on_rotation)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8, $9, $10)
             ON CONFLICT (provider, key_ref) DO NOTHING
             RETURNING id",
            tenant_id,
            s.provider.as_str(),
            s.key_ref,
            s.state.as_str(),
            s.revoked,
            s.current_version,
            s.expires_at,
            options.aws_role.as_ref().map(|r| r.role_arn.as_str()),
            options
                .aws_role
                .as_ref()
                .and_then(|r| r.external_id.as_deref()),
            options.rewrap_on_rotation
        )
        .fetch_optional(&mut *tx.tx)
        .await?;
        let Some(new_id) = new_id else {
            return Err(StoreError::Conflict(format!(
                "{} key {:?} is already registered",
                s.provider, s.key_ref
            )));
        };
        let mut job_id = None;
        if let (Some(old), Some(version)) = (&primary, &s.current_version) {
            job_id = Some(
                sqlx::query_scalar!(
                    "INSERT INTO rewrap_jobs (tenant_id, kind, kek_id, target_kek_id, target_version)
                     VALUES ($1, 'replacement', $2, $3, $4) RETURNING id",
                    tenant_id,
                    old.id,
                    new_id,
                    version
                )
                .fetch_one(&mut *tx.tx)
                .await?,
            );
        }
        tx.audit(std::slice::from_ref(audit)).await?;
        tx.commit().await?;
        Ok(job_id)
    }

    pub(super) async fn aws_role(&self, key_ref: &str) -> Result<Option<AwsRole>, StoreError> {
        let row = sqlx::query!(
            r#"SELECT role_arn AS "role_arn!", external_id FROM keks
               WHERE provider = 'aws' AND key_ref = $1 AND role_arn IS NOT NULL"#,
            key_ref
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| AwsRole {
            role_arn: r.role_arn,
            external_id: r.external_id,
        }))
    }

    pub(super) async fn tenant_keks(&self, tenant_id: &str) -> Result<Vec<KekRow>, StoreError> {
        let mut keks = keks_of(&[tenant_id.to_owned()], &self.pool).await?;
        count_held(&mut keks, &self.pool).await?;
        Ok(keks)
    }

    pub(super) async fn claim_confirmations(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ObserveTarget>, StoreError> {
        Ok(sqlx::query_as!(
            ObserveTarget,
            r#"UPDATE keks k SET confirm_due_at = $2
               WHERE k.id IN (SELECT id FROM keks
                              WHERE confirm_due_at <= $1
                              ORDER BY confirm_due_at LIMIT $3
                              FOR UPDATE SKIP LOCKED)
               RETURNING k.id AS kek_id, k.provider AS "provider: Provider", k.key_ref,
                         k.watch_gen, k.confirm_attempts AS attempts"#,
            now,
            lease_until,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }
}

impl PgTx {
    pub(super) async fn record_events(
        &mut self,
        events: &[&LifecycleEvent],
    ) -> Result<Vec<bool>, StoreError> {
        // Looking the batch up, then inserting what is new, costs PostgreSQL about half of
        // INSERT .. ON CONFLICT DO NOTHING RETURNING (speculative insertion, per row).
        let (providers, sources, ids) = event_keys(events);
        let rows = sqlx::query!(
            r#"SELECT p.provider AS "provider!", p.source AS "source!", p.event_id AS "event_id!"
               FROM processed_events p
               JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS u(provider, source, event_id)
                 ON p.provider = u.provider AND p.source = u.source AND p.event_id = u.event_id"#,
            &providers as &[&str],
            &sources as &[&str],
            &ids as &[&str]
        )
        .fetch_all(&mut *self.tx)
        .await?;
        let mut seen: HashSet<(&str, &str, &str)> = rows
            .iter()
            .map(|r| (r.provider.as_str(), r.source.as_str(), r.event_id.as_str()))
            .collect();
        // Fresh: not applied before, and the first copy inside the batch (the plain INSERT
        // below must not meet itself).
        let fresh: Vec<bool> = events
            .iter()
            .map(|e| seen.insert((e.provider.as_str(), &e.source, &e.event_id)))
            .collect();
        let new: Vec<&LifecycleEvent> = events
            .iter()
            .zip(&fresh)
            .filter_map(|(e, f)| f.then_some(*e))
            .collect();
        if new.is_empty() {
            return Ok(fresh);
        }
        let (providers, sources, ids) = event_keys(&new);
        let kinds: Vec<&str> = new.iter().map(|e| e.kind.as_str()).collect();
        let keys: Vec<&str> = new.iter().map(|e| e.key_ref.as_str()).collect();
        let times: Vec<DateTime<Utc>> = new.iter().map(|e| e.time).collect();
        let inserted = sqlx::query!(
            "INSERT INTO processed_events (provider, source, event_id, kind, key_ref, event_time)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::timestamptz[])",
            &providers as &[&str],
            &sources as &[&str],
            &ids as &[&str],
            &kinds as &[&str],
            &keys as &[&str],
            &times
        )
        .execute(&mut *self.tx)
        .await;
        match inserted {
            Ok(_) => Ok(fresh),
            // Another transaction (a second copy of an event, delivered to another consumer
            // or through the HTTP API) committed one of these events after the lookup: this
            // batch lost the race. Retried, it finds the event and calls it a duplicate.
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Err(StoreError::Raced(
                "another transaction applied one of these events meanwhile".to_owned(),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn lock_tenants_of(
        &mut self,
        keys: &[(Provider, String)],
    ) -> Result<Vec<TenantRow>, StoreError> {
        let (providers, refs) = key_columns(keys);
        Ok(query_recipients!(
            TenantRow,
            "SELECT ",
            "FROM tenants t
             WHERE t.id IN (SELECT k.tenant_id FROM keks k
                            JOIN UNNEST($1::text[], $2::text[]) AS u(provider, key_ref)
                              ON k.provider = u.provider AND k.key_ref = u.key_ref)
             ORDER BY t.id
             FOR UPDATE OF t",
            &providers as &[&str],
            &refs as &[&str],
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    pub(super) async fn lock_tenants_of_keks(
        &mut self,
        kek_ids: &[i64],
    ) -> Result<Vec<TenantRow>, StoreError> {
        Ok(query_recipients!(
            TenantRow,
            "SELECT ",
            "FROM tenants t
             WHERE t.id IN (SELECT k.tenant_id FROM keks k WHERE k.id = ANY($1))
             ORDER BY t.id
             FOR UPDATE OF t",
            kek_ids,
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    pub(super) async fn lock_tenants(
        &mut self,
        ids: &[String],
    ) -> Result<Vec<TenantRow>, StoreError> {
        Ok(query_recipients!(
            TenantRow,
            "SELECT ",
            "FROM tenants t
             WHERE t.id = ANY($1)
             ORDER BY t.id
             FOR UPDATE OF t",
            ids,
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    pub(super) async fn keks_of_tenants(
        &mut self,
        tenants: &[String],
    ) -> Result<Vec<KekRow>, StoreError> {
        let mut keks = keks_of(tenants, &mut *self.tx).await?;
        count_held(&mut keks, &mut *self.tx).await?;
        Ok(keks)
    }

    pub(super) async fn update_keks(
        &mut self,
        keks: &[KekRow],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if keks.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = keks.iter().map(|k| k.id).collect();
        let states: Vec<&str> = keks.iter().map(|k| k.status.state.as_str()).collect();
        let revoked: Vec<bool> = keks.iter().map(|k| k.status.revoked).collect();
        let versions: Vec<Option<&str>> = keks
            .iter()
            .map(|k| k.status.current_version.as_deref())
            .collect();
        let expires: Vec<Option<DateTime<Utc>>> =
            keks.iter().map(|k| k.status.expires_at).collect();
        let expiry_event: Vec<Option<DateTime<Utc>>> =
            keks.iter().map(|k| k.status.expiry_event_at).collect();
        let claims: Vec<Option<&str>> = keks
            .iter()
            .map(|k| k.status.claim.map(|c| c.as_str()))
            .collect();
        let version_states: Vec<serde_json::Value> = keks
            .iter()
            .map(|k| serde_json::to_value(&k.status.versions).unwrap_or_default())
            .collect();
        sqlx::query!(
            "UPDATE keks k SET state = u.state, revoked = u.revoked,
                    current_version = u.current_version, expires_at = u.expires_at,
                    expiry_event_at = u.expiry_event_at, claim = u.claim,
                    claimed_at = CASE WHEN u.claim IS NULL THEN NULL
                                      WHEN k.claim IS DISTINCT FROM u.claim THEN $8
                                      ELSE k.claimed_at END,
                    version_states = u.version_states,
                    updated_at = now()
             FROM UNNEST($1::bigint[], $2::text[], $3::bool[], $4::text[], $5::timestamptz[],
                         $6::timestamptz[], $7::text[], $9::jsonb[])
                 AS u(id, state, revoked, current_version, expires_at, expiry_event_at, claim,
                      version_states)
             WHERE k.id = u.id",
            &ids,
            &states as &[&str],
            &revoked,
            &versions as &[Option<&str>],
            &expires as &[Option<DateTime<Utc>>],
            &expiry_event as &[Option<DateTime<Utc>>],
            &claims as &[Option<&str>],
            now,
            &version_states
        )
        .execute(&mut *self.tx)
        .await?;
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
        sqlx::query!(
            "UPDATE keks SET confirm_due_at = LEAST(COALESCE(confirm_due_at, $2), $2),
                             watch_gen = watch_gen + 1
             WHERE id = ANY($1)",
            kek_ids,
            due
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn finish_observations(
        &mut self,
        done: &[ObserveDone],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = done.iter().map(|d| d.kek_id).collect();
        let gens: Vec<i64> = done.iter().map(|d| d.watch_gen).collect();
        let answered: Vec<bool> = done.iter().map(|d| d.answered).collect();
        let set_due: Vec<bool> = done.iter().map(|d| d.next_due.is_some()).collect();
        let due: Vec<Option<DateTime<Utc>>> = done.iter().map(|d| d.next_due.flatten()).collect();
        sqlx::query!(
            "UPDATE keks k SET
                 confirm_due_at = CASE
                     -- Events came in while the KMS was asked: look again, after a moment
                     -- for more of them to gather.
                     WHEN k.watch_gen <> u.gen THEN GREATEST(k.confirm_due_at, $7)
                     WHEN NOT u.set_due THEN k.confirm_due_at
                     ELSE u.due END,
                 confirm_attempts = CASE WHEN u.answered THEN 0 ELSE k.confirm_attempts + 1 END,
                 observed_at = CASE WHEN u.answered THEN $6 ELSE k.observed_at END
             FROM UNNEST($1::bigint[], $2::bigint[], $3::bool[], $4::bool[], $5::timestamptz[])
                 AS u(id, gen, answered, set_due, due)
             WHERE k.id = u.id",
            &ids,
            &gens,
            &answered,
            &set_due,
            &due as &[Option<DateTime<Utc>>],
            now,
            now + chrono::Duration::milliseconds(250)
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn dek_counts(
        &mut self,
        kek_ids: &[i64],
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        if kek_ids.is_empty() {
            return Ok(Vec::new());
        }
        dek_counts(kek_ids, &mut *self.tx).await
    }

    pub(super) async fn dek_version_counts(
        &mut self,
        keks: &[(i64, Option<String>)],
    ) -> Result<Vec<(i64, String, i64)>, StoreError> {
        let mut counts = Vec::new();
        if keks.is_empty() {
            return Ok(counts);
        }
        // The planner expects a key's million DEKs and JIT-compiles what takes a few index
        // probes: 1 ms without, 300-500 ms with, measured on a key holding a million DEKs.
        sqlx::query("SET LOCAL jit = off")
            .execute(&mut *self.tx)
            .await?;
        for (kek_id, except) in keks {
            for (version, n) in
                dek_version_counts(*kek_id, except.as_deref(), &mut *self.tx).await?
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
        if updates.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = updates.iter().map(|u| u.tenant_id.as_str()).collect();
        let access: Vec<&str> = updates.iter().map(|u| u.access.as_str()).collect();
        let reasons: Vec<Option<&str>> = updates.iter().map(|u| u.reason.as_deref()).collect();
        // Every replica drops what it cached about these tenants when this commits (and
        // only then): key access must not serve a DEK on a stale decision. The notification
        // rides on the UPDATE itself: a statement less on the path of every revocation.
        sqlx::query!(
            "UPDATE tenants t SET access = u.access, access_reason = u.reason, updated_at = now()
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(id, access, reason)
             WHERE t.id = u.id
             RETURNING pg_notify('byokd_access', t.id)",
            &ids as &[&str],
            &access as &[&str],
            &reasons as &[Option<&str>]
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn audit(&mut self, rows: &[AuditRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let tenants: Vec<Option<&str>> = rows.iter().map(|r| r.tenant_id.as_deref()).collect();
        let providers: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.provider.map(|p| p.as_str()))
            .collect();
        let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key_ref.as_deref()).collect();
        let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
        let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
        let sources: Vec<&str> = rows.iter().map(|r| r.source.as_str()).collect();
        let events: Vec<Option<&str>> = rows.iter().map(|r| r.event_id.as_deref()).collect();
        let details: Vec<String> = rows.iter().map(|r| r.detail.to_string()).collect();
        let clients: Vec<Option<&str>> = rows.iter().map(AuditRow::client).collect();
        // WITH ORDINALITY keeps the ids in the order the entries were decided. The client
        // comes as a column of its own: extracting it from the detail in SQL parsed every
        // row's JSON a second time (9.5 ms for 1,024 event rows, 7.4 ms without, timed in
        // psql).
        sqlx::query!(
            "INSERT INTO audit_log (tenant_id, provider, key_ref, action, outcome, source,
                                    event_id, detail, client)
             SELECT u.tenant_id, u.provider, u.key_ref, u.action, u.outcome, u.source,
                    u.event_id, u.detail::jsonb, u.client
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::text[]) WITH ORDINALITY
                 AS u(tenant_id, provider, key_ref, action, outcome, source, event_id, detail,
                      client, n)
             ORDER BY u.n",
            &tenants as &[Option<&str>],
            &providers as &[Option<&str>],
            &keys as &[Option<&str>],
            &actions as &[&str],
            &outcomes as &[&str],
            &sources as &[&str],
            &events as &[Option<&str>],
            &details,
            &clients as &[Option<&str>]
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn ship_audit(&mut self, rows: &[SpooledAudit]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.attempt_id).collect();
        let ats: Vec<DateTime<Utc>> = rows.iter().map(|r| r.at).collect();
        let tenants: Vec<Option<&str>> = rows.iter().map(|r| r.row.tenant_id.as_deref()).collect();
        let providers: Vec<Option<&str>> = rows
            .iter()
            .map(|r| r.row.provider.map(|p| p.as_str()))
            .collect();
        let keys: Vec<Option<&str>> = rows.iter().map(|r| r.row.key_ref.as_deref()).collect();
        let actions: Vec<&str> = rows.iter().map(|r| r.row.action.as_str()).collect();
        let outcomes: Vec<&str> = rows.iter().map(|r| r.row.outcome.as_str()).collect();
        let sources: Vec<&str> = rows.iter().map(|r| r.row.source.as_str()).collect();
        let events: Vec<Option<&str>> = rows.iter().map(|r| r.row.event_id.as_deref()).collect();
        let details: Vec<String> = rows.iter().map(|r| r.row.detail.to_string()).collect();
        let clients: Vec<Option<&str>> = rows.iter().map(|r| r.row.client()).collect();
        // As `audit`, with the attempt's own time and id: a row shipped again after a crash
        // is skipped. The client comes as a column of its own (the detail is parsed once).
        let inserted = sqlx::query!(
            "INSERT INTO audit_log (attempt_id, at, tenant_id, provider, key_ref, action,
                                    outcome, source, event_id, detail, client)
             SELECT u.attempt_id, u.at, u.tenant_id, u.provider, u.key_ref, u.action,
                    u.outcome, u.source, u.event_id, u.detail::jsonb, u.client
             FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::text[])
                 WITH ORDINALITY
                 AS u(attempt_id, at, tenant_id, provider, key_ref, action, outcome, source,
                      event_id, detail, client, n)
             ORDER BY u.n
             ON CONFLICT (attempt_id) WHERE attempt_id IS NOT NULL DO NOTHING",
            &ids,
            &ats,
            &tenants as &[Option<&str>],
            &providers as &[Option<&str>],
            &keys as &[Option<&str>],
            &actions as &[&str],
            &outcomes as &[&str],
            &sources as &[&str],
            &events as &[Option<&str>],
            &details,
            &clients as &[Option<&str>]
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(inserted.rows_affected())
    }

    pub(super) async fn enqueue(&mut self, rows: &[NewOutbox]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let tenants: Vec<Option<&str>> = rows.iter().map(|r| r.tenant_id.as_deref()).collect();
        let channels: Vec<&str> = rows.iter().map(|r| r.channel.as_str()).collect();
        let recipients: Vec<&str> = rows.iter().map(|r| r.recipient.as_str()).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
        let dedupe: Vec<&str> = rows.iter().map(|r| r.dedupe_key.as_str()).collect();
        let payloads: Vec<String> = rows.iter().map(|r| r.payload.to_string()).collect();
        // WITH ORDINALITY keeps `seq` in the order the rows were decided.
        let inserted = sqlx::query!(
            "INSERT INTO outbox (id, tenant_id, channel, recipient, kind, dedupe_key, payload)
             SELECT u.id, u.tenant_id, u.channel, u.recipient, u.kind, u.dedupe_key,
                    u.payload::jsonb
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[]) WITH ORDINALITY
                 AS u(id, tenant_id, channel, recipient, kind, dedupe_key, payload, n)
             ORDER BY u.n
             ON CONFLICT (dedupe_key) DO NOTHING",
            &ids,
            &tenants as &[Option<&str>],
            &channels as &[&str],
            &recipients as &[&str],
            &kinds as &[&str],
            &dedupe as &[&str],
            &payloads
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(inserted.rows_affected())
    }

    pub(super) async fn claim_outbox(
        &mut self,
        channel: Channel,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        Ok(sqlx::query_as!(
            OutboxRow,
            "SELECT id, tenant_id, dedupe_key, recipient, kind, payload, attempts, created_at
             FROM outbox
             WHERE channel = $1 AND status = 'pending' AND next_attempt_at <= $2
             ORDER BY seq
             LIMIT $3
             FOR UPDATE SKIP LOCKED",
            channel.as_str(),
            now,
            limit
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    pub(super) async fn remove_published(&mut self, ids: &[Uuid]) -> Result<(), StoreError> {
        sqlx::query!(
            "DELETE FROM outbox WHERE id = ANY($1) AND channel = 'amqp'",
            ids
        )
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
        sqlx::query!(
            "UPDATE outbox SET status = 'delivered', delivered_at = $2, last_error = NULL,
                    locked_until = NULL
             WHERE id = ANY($1)",
            ids,
            now
        )
        .execute(&mut *self.tx)
        .await?;
        sqlx::query!(
            "INSERT INTO notification_attempts (outbox_id, at, outcome, detail, duration_ms)
             SELECT id, $2, 'delivered', $3, 0 FROM UNNEST($1::uuid[]) AS u(id)",
            ids,
            now,
            detail
        )
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
        sqlx::query!(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3
             WHERE id = ANY($1)",
            ids,
            next_attempt_at,
            error
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(super) async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
