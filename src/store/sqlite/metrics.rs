//! SQLite SQL of the metrics collector.

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::metrics::{JobProgress, KeyCount, OutboxDepth};
use chrono::{DateTime, Utc};
use sqlx::Row;

impl SqliteStore {
    pub(crate) async fn outbox_depth(&self) -> Result<Vec<OutboxDepth>, StoreError> {
        let rows = sqlx::query(
            "SELECT channel, status, count(*) AS n, min(created_at) AS oldest
             FROM outbox WHERE status <> 'delivered'
             GROUP BY channel, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let oldest: Option<String> = r.try_get("oldest")?;
                Ok(OutboxDepth {
                    channel: r.try_get("channel")?,
                    status: r.try_get("status")?,
                    rows: r.try_get("n")?,
                    oldest: oldest
                        .map(|t| t.parse::<DateTime<Utc>>())
                        .transpose()
                        .map_err(|e| StoreError::Other(sqlx::Error::Decode(e.into())))?,
                })
            })
            .collect()
    }

    pub(crate) async fn key_counts(&self) -> Result<Vec<KeyCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT provider, state, count(*) AS n,
                    count(*) FILTER (WHERE unreachable_since IS NOT NULL) AS unreachable
             FROM keks WHERE retired_at IS NULL
             GROUP BY provider, state",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KeyCount {
                    provider: r.try_get("provider")?,
                    state: r.try_get("state")?,
                    keys: r.try_get("n")?,
                    unreachable: r.try_get("unreachable")?,
                })
            })
            .collect()
    }

    pub(crate) async fn tenant_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT access, count(*) AS n FROM tenants GROUP BY access")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("access")?, r.try_get("n")?)))
            .collect()
    }

    pub(crate) async fn active_job_progress(
        &self,
        limit: i64,
    ) -> Result<Vec<JobProgress>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, state, max(total - done, 0) AS remaining
             FROM rewrap_jobs WHERE state IN ('pending', 'running', 'waiting')
             ORDER BY id LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JobProgress {
                    id: r.try_get("id")?,
                    kind: r.try_get("kind")?,
                    state: r.try_get("state")?,
                    remaining: r.try_get("remaining")?,
                })
            })
            .collect()
    }

    pub(crate) async fn schedule_successes(
        &self,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, last_success_at FROM schedule_runs WHERE last_success_at IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("name")?, r.try_get("last_success_at")?)))
            .collect()
    }
}
