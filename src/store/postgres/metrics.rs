//! PostgreSQL SQL of the metrics collector.

use super::PgStore;
use crate::store::StoreError;
use crate::store::metrics::{JobProgress, KeyCount, OutboxDepth};
use chrono::{DateTime, Utc};

impl PgStore {
    pub(crate) async fn outbox_depth(&self) -> Result<Vec<OutboxDepth>, StoreError> {
        // Served by the partial index outbox_undelivered.
        let rows = sqlx::query!(
            r#"SELECT channel, status, count(*) AS "rows!", min(created_at) AS oldest
               FROM outbox WHERE status <> 'delivered'
               GROUP BY channel, status"#
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| OutboxDepth {
                channel: r.channel,
                status: r.status,
                rows: r.rows,
                oldest: r.oldest,
            })
            .collect())
    }

    pub(crate) async fn key_counts(&self) -> Result<Vec<KeyCount>, StoreError> {
        let rows = sqlx::query!(
            r#"SELECT provider, state, count(*) AS "keys!",
                      count(*) FILTER (WHERE unreachable_since IS NOT NULL) AS "unreachable!"
               FROM keks WHERE retired_at IS NULL
               GROUP BY provider, state"#
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| KeyCount {
                provider: r.provider,
                state: r.state,
                keys: r.keys,
                unreachable: r.unreachable,
            })
            .collect())
    }

    pub(crate) async fn tenant_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows =
            sqlx::query!(r#"SELECT access, count(*) AS "tenants!" FROM tenants GROUP BY access"#)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|r| (r.access, r.tenants)).collect())
    }

    pub(crate) async fn active_job_progress(
        &self,
        limit: i64,
    ) -> Result<Vec<JobProgress>, StoreError> {
        // Served by the partial index rewrap_jobs_active.
        let rows = sqlx::query!(
            r#"SELECT id, kind, state, GREATEST(total - done, 0) AS "remaining!"
               FROM rewrap_jobs WHERE state IN ('pending', 'running', 'waiting')
               ORDER BY id LIMIT $1"#,
            limit
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| JobProgress {
                id: r.id,
                kind: r.kind,
                state: r.state,
                remaining: r.remaining,
            })
            .collect())
    }

    pub(crate) async fn schedule_successes(
        &self,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let rows = sqlx::query!(
            r#"SELECT name, last_success_at AS "last_success_at!" FROM schedule_runs
               WHERE last_success_at IS NOT NULL"#
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.name, r.last_success_at))
            .collect())
    }
}
