//! Store API of the metrics collector: one aggregate query per gauge family, cheap enough
//! for every replica to run each round.

use super::{Store, StoreError};
use chrono::{DateTime, Utc};

/// Undelivered outbox rows of one channel and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxDepth {
    /// `amqp`, `email`, `webhook`, `operator`.
    pub channel: String,
    /// `pending` or `dead`.
    pub status: String,
    /// How many.
    pub rows: i64,
    /// When the oldest was enqueued.
    pub oldest: Option<DateTime<Utc>>,
}

/// KEKs in use of one provider and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCount {
    /// Provider name.
    pub provider: String,
    /// Key state name.
    pub state: String,
    /// How many.
    pub keys: i64,
    /// How many of them the last probe could not reach.
    pub unreachable: i64,
}

/// An active re-wrap job's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProgress {
    /// Job id.
    pub id: i64,
    /// `rotation` or `replacement`.
    pub kind: String,
    /// `pending`, `running` or `waiting`.
    pub state: String,
    /// DEKs still to move.
    pub remaining: i64,
}

impl Store {
    /// Undelivered outbox rows by channel and status.
    pub async fn outbox_depth(&self) -> Result<Vec<OutboxDepth>, StoreError> {
        dispatch!(self, s => s.outbox_depth().await)
    }

    /// KEKs in use (not retired) by provider and state.
    pub async fn key_counts(&self) -> Result<Vec<KeyCount>, StoreError> {
        dispatch!(self, s => s.key_counts().await)
    }

    /// Tenants by access name.
    pub async fn tenant_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        dispatch!(self, s => s.tenant_counts().await)
    }

    /// The oldest `limit` active re-wrap jobs (pending, running, waiting).
    pub async fn active_job_progress(&self, limit: i64) -> Result<Vec<JobProgress>, StoreError> {
        dispatch!(self, s => s.active_job_progress(limit).await)
    }

    /// Each schedule's last successful run, for those that had one.
    pub async fn schedule_successes(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        dispatch!(self, s => s.schedule_successes().await)
    }
}
