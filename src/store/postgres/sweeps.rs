//! PostgreSQL SQL of the sweeps.

use super::{PgStore, PgTx};
use crate::domain::{Access, Provider};
use crate::store::{
    ExpiringKek, NewOutbox, ObserveTarget, ProbeRecord, ProbeTarget, StoreError, TenantRow,
};
use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

/// An advisory lock on a connection taken out of the pool for it.
pub(crate) struct PgScheduleLock {
    conn: PgConnection,
    name: String,
}

impl PgScheduleLock {
    pub(crate) async fn release(mut self) {
        // Unlock explicitly so the next claimant finds it free at once (the server ends a
        // closed session asynchronously); ending the session releases it in any case.
        let _ = sqlx::query!(
            "SELECT pg_advisory_unlock(hashtextextended('byokd-schedule:' || $1, 0)) AS unlocked",
            self.name
        )
        .fetch_one(&mut self.conn)
        .await;
        let _ = self.conn.close().await;
    }
}

impl PgStore {
    pub(crate) async fn try_lock_schedule(
        &self,
        name: &str,
    ) -> Result<Option<PgScheduleLock>, StoreError> {
        let mut conn = self.pool.acquire().await?.detach();
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock(hashtextextended('byokd-schedule:' || $1, 0))
                   AS "locked!""#,
            name
        )
        .fetch_one(&mut conn)
        .await?;
        if locked {
            Ok(Some(PgScheduleLock {
                conn,
                name: name.to_owned(),
            }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    pub(crate) async fn last_tick(&self, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar!(
            "SELECT last_tick_at FROM schedule_runs WHERE name = $1",
            name
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    pub(crate) async fn record_schedule_run(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        started_at: DateTime<Utc>,
        status: &str,
        report: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "INSERT INTO schedule_runs (name, last_tick_at, last_started_at, last_finished_at,
                                        last_status, last_report, last_success_at)
             VALUES ($1, $2, $3, now(), $4, $5, CASE WHEN $4 = 'ok' THEN now() END)
             ON CONFLICT (name) DO UPDATE
             SET last_tick_at = GREATEST(schedule_runs.last_tick_at, EXCLUDED.last_tick_at),
                 last_started_at = EXCLUDED.last_started_at,
                 last_finished_at = EXCLUDED.last_finished_at,
                 last_status = EXCLUDED.last_status, last_report = EXCLUDED.last_report,
                 last_success_at = COALESCE(EXCLUDED.last_success_at,
                                            schedule_runs.last_success_at)",
            name,
            tick,
            started_at,
            status,
            report
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn expiring_keks(
        &self,
        until: DateTime<Utc>,
    ) -> Result<Vec<ExpiringKek>, StoreError> {
        let rows = query_recipients!(
            ExpiringRow,
            r#"SELECT k.id AS kek_id, k.provider AS "provider: Provider", k.key_ref,
                      k.expires_at AS "expires_at!", "#,
            "FROM keks k JOIN tenants t ON t.id = k.tenant_id
             WHERE k.state = 'enabled' AND k.is_primary AND k.expires_at IS NOT NULL
               AND k.expires_at <= $1",
            until,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ExpiringKek {
                kek_id: r.kek_id,
                provider: r.provider,
                key_ref: r.key_ref,
                expires_at: r.expires_at,
                tenant: TenantRow {
                    id: r.id,
                    access: r.access,
                    access_reason: r.access_reason,
                    contacts: r.contacts,
                    webhooks: r.webhooks,
                },
            })
            .collect())
    }

    pub(crate) async fn probe_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
        let rows = query_recipients!(
            ProbeRow,
            r#"SELECT k.id AS kek_id, k.provider AS "provider: Provider", k.key_ref, k.watch_gen,
                      k.confirm_attempts, k.unreachable_since,
                      k.unreachable_notified_at IS NOT NULL AS "notified!", "#,
            "FROM keks k JOIN tenants t ON t.id = k.tenant_id
             WHERE k.state <> 'destroyed' AND k.retired_at IS NULL
             ORDER BY k.id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ProbeTarget {
                key: ObserveTarget {
                    kek_id: r.kek_id,
                    provider: r.provider,
                    key_ref: r.key_ref,
                    watch_gen: r.watch_gen,
                    attempts: r.confirm_attempts,
                },
                tenant: TenantRow {
                    id: r.id,
                    access: r.access,
                    access_reason: r.access_reason,
                    contacts: r.contacts,
                    webhooks: r.webhooks,
                },
                unreachable_since: r.unreachable_since,
                unreachable_notified: r.notified,
            })
            .collect())
    }

    pub(crate) async fn record_probe(
        &self,
        kek_id: i64,
        record: &ProbeRecord,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        match record {
            ProbeRecord::Answered => {
                sqlx::query!(
                    "UPDATE keks SET probed_at = $2, probe_error = NULL, unreachable_since = NULL,
                            unreachable_notified_at = NULL
                     WHERE id = $1",
                    kek_id,
                    now
                )
                .execute(&self.pool)
                .await?;
                Ok(None)
            }
            ProbeRecord::Unreachable { error } => Ok(sqlx::query_scalar!(
                r#"UPDATE keks SET probed_at = $2, probe_error = $3,
                          unreachable_since = COALESCE(unreachable_since, $2)
                   WHERE id = $1 RETURNING unreachable_since AS "unreachable_since!""#,
                kek_id,
                now,
                error
            )
            .fetch_optional(&self.pool)
            .await?),
        }
    }

    pub(crate) async fn notify_unreachable(
        &self,
        kek_id: i64,
        rows: &[NewOutbox],
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = PgTx {
            tx: self.pool.begin().await?,
        };
        let marked = sqlx::query!(
            "UPDATE keks SET unreachable_notified_at = $2
             WHERE id = $1 AND unreachable_since IS NOT NULL AND unreachable_notified_at IS NULL",
            kek_id,
            now
        )
        .execute(&mut *tx.tx)
        .await?;
        if marked.rows_affected() == 0 {
            return Ok(false);
        }
        tx.enqueue(rows).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// A row of [`PgStore::expiring_keks`], flat as the query returns it.
struct ExpiringRow {
    kek_id: i64,
    provider: Provider,
    key_ref: String,
    expires_at: DateTime<Utc>,
    id: String,
    access: Access,
    access_reason: Option<String>,
    contacts: Vec<String>,
    webhooks: Vec<Uuid>,
}

/// A row of [`PgStore::probe_targets`], flat as the query returns it.
struct ProbeRow {
    kek_id: i64,
    provider: Provider,
    key_ref: String,
    watch_gen: i64,
    confirm_attempts: i32,
    unreachable_since: Option<DateTime<Utc>>,
    notified: bool,
    id: String,
    access: Access,
    access_reason: Option<String>,
    contacts: Vec<String>,
    webhooks: Vec<Uuid>,
}
