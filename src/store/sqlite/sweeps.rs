//! SQLite SQL of the sweeps. A schedule's lock is an in-process lock per database file and
//! schedule name: one node runs the schedules, and the lock only keeps two runs of one
//! schedule in this process apart.

use super::{SqliteStore, recipients, tenant_row, ts};
use crate::store::{ExpiringKek, NewOutbox, ObserveTarget, ProbeRecord, ProbeTarget, StoreError};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::sync::Arc;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// A schedule's lock, held until released or dropped.
pub(crate) struct SqliteScheduleLock {
    _guard: OwnedMutexGuard<()>,
}

impl SqliteScheduleLock {
    pub(crate) async fn release(self) {}
}

impl SqliteStore {
    pub(crate) async fn try_lock_schedule(
        &self,
        name: &str,
    ) -> Result<Option<SqliteScheduleLock>, StoreError> {
        let lock = {
            let mut all = self
                .shared
                .schedules
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            all.entry(name.to_owned())
                .or_insert_with(|| Arc::new(Mutex::new(())))
                .clone()
        };
        Ok(lock
            .try_lock_owned()
            .ok()
            .map(|guard| SqliteScheduleLock { _guard: guard }))
    }

    pub(crate) async fn last_tick(&self, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT last_tick_at FROM schedule_runs WHERE name = ?1")
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
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO schedule_runs (name, last_tick_at, last_started_at, last_finished_at,
                                        last_status, last_report, last_success_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?5 = 'ok' THEN ?4 END)
             ON CONFLICT (name) DO UPDATE
             SET last_tick_at = max(schedule_runs.last_tick_at, excluded.last_tick_at),
                 last_started_at = excluded.last_started_at,
                 last_finished_at = excluded.last_finished_at,
                 last_status = excluded.last_status, last_report = excluded.last_report,
                 last_success_at = COALESCE(excluded.last_success_at,
                                            schedule_runs.last_success_at)",
        )
        .bind(name)
        .bind(ts(tick))
        .bind(ts(started_at))
        .bind(ts(Utc::now()))
        .bind(status)
        .bind(report.to_string())
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await
    }

    pub(crate) async fn expiring_keks(
        &self,
        until: DateTime<Utc>,
    ) -> Result<Vec<ExpiringKek>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT k.id AS kek_id, k.provider, k.key_ref, k.expires_at, ",
            recipients!(),
            "FROM keks k JOIN tenants t ON t.id = k.tenant_id
             WHERE k.state = 'enabled' AND k.is_primary AND k.expires_at IS NOT NULL
               AND k.expires_at <= ?1"
        ))
        .bind(ts(until))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ExpiringKek {
                    kek_id: r.try_get("kek_id")?,
                    provider: r.try_get("provider")?,
                    key_ref: r.try_get("key_ref")?,
                    expires_at: r.try_get("expires_at")?,
                    tenant: tenant_row(r)?,
                })
            })
            .collect()
    }

    pub(crate) async fn probe_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT k.id AS kek_id, k.provider, k.key_ref, k.watch_gen, k.confirm_attempts,
                    k.unreachable_since, k.unreachable_notified_at IS NOT NULL AS notified, ",
            recipients!(),
            "FROM keks k JOIN tenants t ON t.id = k.tenant_id
             WHERE k.state <> 'destroyed' AND k.retired_at IS NULL
             ORDER BY k.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ProbeTarget {
                    key: ObserveTarget {
                        kek_id: r.try_get("kek_id")?,
                        provider: r.try_get("provider")?,
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
        let mut tx = self.begin().await?;
        let since = match record {
            ProbeRecord::Answered => {
                sqlx::query(
                    "UPDATE keks SET probed_at = ?2, probe_error = NULL, unreachable_since = NULL,
                            unreachable_notified_at = NULL
                     WHERE id = ?1",
                )
                .bind(kek_id)
                .bind(ts(now))
                .execute(&mut *tx.tx)
                .await?;
                None
            }
            ProbeRecord::Unreachable { error } => {
                sqlx::query_scalar(
                    "UPDATE keks SET probed_at = ?2, probe_error = ?3,
                        unreachable_since = COALESCE(unreachable_since, ?2)
                 WHERE id = ?1 RETURNING unreachable_since",
                )
                .bind(kek_id)
                .bind(ts(now))
                .bind(error)
                .fetch_optional(&mut *tx.tx)
                .await?
            }
        };
        tx.commit().await?;
        Ok(since)
    }

    pub(crate) async fn notify_unreachable(
        &self,
        kek_id: i64,
        rows: &[NewOutbox],
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let marked = sqlx::query(
            "UPDATE keks SET unreachable_notified_at = ?2
             WHERE id = ?1 AND unreachable_since IS NOT NULL AND unreachable_notified_at IS NULL",
        )
        .bind(kek_id)
        .bind(ts(now))
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
