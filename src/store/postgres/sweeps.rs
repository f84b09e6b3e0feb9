//! PostgreSQL SQL of the sweeps.

use super::{PgStore, PgTx, TENANT_RECIPIENTS, parse, tenant_row};
use crate::store::{ExpiringKek, NewOutbox, ObserveTarget, ProbeRecord, ProbeTarget, StoreError};
use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

/// An advisory lock on a connection taken out of the pool for it.
pub(crate) struct PgScheduleLock {
    conn: PgConnection,
    name: String,
}

impl PgScheduleLock {
    pub(crate) async fn release(mut self) {
        // Unlock explicitly so the next claimant finds it free at once (the server ends a
        // closed session asynchronously); ending the session releases it in any case.
        let _ =
            sqlx::query("SELECT pg_advisory_unlock(hashtextextended('byokd-schedule:' || $1, 0))")
                .bind(&self.name)
                .execute(&mut self.conn)
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
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtextextended('byokd-schedule:' || $1, 0))",
        )
        .bind(name)
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
        Ok(
            sqlx::query_scalar("SELECT last_tick_at FROM schedule_runs WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub(crate) async fn record_schedule_run(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        started_at: DateTime<Utc>,
        status: &str,
        report: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO schedule_runs (name, last_tick_at, last_started_at, last_finished_at,
                                        last_status, last_report)
             VALUES ($1, $2, $3, now(), $4, $5::jsonb)
             ON CONFLICT (name) DO UPDATE
             SET last_tick_at = GREATEST(schedule_runs.last_tick_at, EXCLUDED.last_tick_at),
                 last_started_at = EXCLUDED.last_started_at,
                 last_finished_at = EXCLUDED.last_finished_at,
                 last_status = EXCLUDED.last_status, last_report = EXCLUDED.last_report",
        )
        .bind(name)
        .bind(tick)
        .bind(started_at)
        .bind(status)
        .bind(report.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn expiring_keks(
        &self,
        until: DateTime<Utc>,
    ) -> Result<Vec<ExpiringKek>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT k.id, k.provider, k.key_ref, k.expires_at, {TENANT_RECIPIENTS}
             FROM keks k JOIN tenants t ON t.id = k.tenant_id
             WHERE k.state = 'enabled' AND k.is_primary AND k.expires_at IS NOT NULL
               AND k.expires_at <= $1"
        ));
        let rows = sqlx::query(sql).bind(until).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(ExpiringKek {
                    kek_id: r.try_get("id")?,
                    provider: parse(r, "provider")?,
                    key_ref: r.try_get("key_ref")?,
                    expires_at: r.try_get("expires_at")?,
                    tenant: tenant_row(r)?,
                })
            })
            .collect()
    }

    pub(crate) async fn probe_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT k.id, k.provider, k.key_ref, k.watch_gen, k.confirm_attempts,
                    k.unreachable_since, k.unreachable_notified_at IS NOT NULL AS notified,
                    {TENANT_RECIPIENTS}
             FROM keks k JOIN tenants t ON t.id = k.tenant_id
             WHERE k.state <> 'destroyed' AND k.retired_at IS NULL
             ORDER BY k.id"
        ));
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(ProbeTarget {
                    key: ObserveTarget {
                        kek_id: r.try_get("id")?,
                        provider: parse(r, "provider")?,
                        key_ref: r.try_get("key_ref")?,
                        watch_gen: r.try_get("watch_gen")?,
                        attempts: r.try_get("confirm_attempts")?,
                    },
                    tenant: tenant_row(r)?,
                    unreachable_since: r.try_get("unreachable_since")?,
                    unreachable_notified: r.try_get("notified")?,
                })
            })
            .collect()
    }

    pub(crate) async fn record_probe(
        &self,
        kek_id: i64,
        record: &ProbeRecord,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        match record {
            ProbeRecord::Answered => {
                sqlx::query(
                    "UPDATE keks SET probed_at = $2, probe_error = NULL, unreachable_since = NULL,
                            unreachable_notified_at = NULL
                     WHERE id = $1",
                )
                .bind(kek_id)
                .bind(now)
                .execute(&self.pool)
                .await?;
                Ok(None)
            }
            ProbeRecord::Unreachable { error } => Ok(sqlx::query_scalar(
                "UPDATE keks SET probed_at = $2, probe_error = $3,
                        unreachable_since = COALESCE(unreachable_since, $2)
                 WHERE id = $1 RETURNING unreachable_since",
            )
            .bind(kek_id)
            .bind(now)
            .bind(error)
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
        let marked = sqlx::query(
            "UPDATE keks SET unreachable_notified_at = $2
             WHERE id = $1 AND unreachable_since IS NOT NULL AND unreachable_notified_at IS NULL",
        )
        .bind(kek_id)
        .bind(now)
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
