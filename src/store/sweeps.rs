//! Store API of the sweeps: schedule bookkeeping and locks, the expiry window, key probes.

use super::{NewOutbox, Store, StoreError, TenantRow};
use crate::domain::Provider;
use chrono::{DateTime, Utc};

/// An exclusive claim on one schedule across replicas: a PostgreSQL advisory lock held by a
/// connection of its own. Closing that connection releases it, so a crashed run or a lost
/// connection never leaves the schedule locked. On SQLite (one node) it is an in-process
/// lock per database file and schedule.
pub struct ScheduleLock {
    inner: LockInner,
}

enum LockInner {
    Postgres(super::postgres::PgScheduleLock),
    Sqlite(super::sqlite::SqliteScheduleLock),
}

impl ScheduleLock {
    /// Releases the lock.
    pub async fn release(self) {
        match self.inner {
            LockInner::Postgres(l) => l.release().await,
            LockInner::Sqlite(l) => l.release().await,
        }
    }
}

/// A primary, enabled KEK whose expiry falls inside the sweep's window.
#[derive(Debug, Clone)]
pub struct ExpiringKek {
    /// KEK row id.
    pub kek_id: i64,
    /// Provider.
    pub provider: Provider,
    /// Key name.
    pub key_ref: String,
    /// Expiry.
    pub expires_at: DateTime<Utc>,
    /// Owner and recipients.
    pub tenant: TenantRow,
}

/// A KEK the key probe asks about.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The key, as the observation code sees it.
    pub key: super::ObserveTarget,
    /// Owner and recipients.
    pub tenant: TenantRow,
    /// Start of the current outage episode, if any.
    pub unreachable_since: Option<DateTime<Utc>>,
    /// Whether this episode was notified.
    pub unreachable_notified: bool,
}

/// What a probe found, to record on the KEK.
#[derive(Debug, Clone)]
pub enum ProbeRecord {
    /// The KMS answered (definitively).
    Answered,
    /// The KMS could not be reached; the episode starts now unless it already started.
    Unreachable {
        /// What went wrong.
        error: String,
    },
}

impl Store {
    /// Tries to take the lock of schedule `name`; `None` when another replica holds it.
    pub async fn try_lock_schedule(&self, name: &str) -> Result<Option<ScheduleLock>, StoreError> {
        Ok(match self {
            Store::Postgres(s) => s.try_lock_schedule(name).await?.map(LockInner::Postgres),
            Store::Sqlite(s) => s.try_lock_schedule(name).await?.map(LockInner::Sqlite),
        }
        .map(|inner| ScheduleLock { inner }))
    }

    /// The last tick a schedule ran for.
    pub async fn last_tick(&self, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        dispatch!(self, s => s.last_tick(name).await)
    }

    /// Records a run of a schedule.
    pub async fn record_schedule_run(
        &self,
        name: &str,
        tick: DateTime<Utc>,
        started_at: DateTime<Utc>,
        status: &str,
        report: &serde_json::Value,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.record_schedule_run(name, tick, started_at, status, report).await)
    }

    /// Enabled primary KEKs expiring at or before `until`.
    pub async fn expiring_keks(
        &self,
        until: DateTime<Utc>,
    ) -> Result<Vec<ExpiringKek>, StoreError> {
        dispatch!(self, s => s.expiring_keks(until).await)
    }

    /// Every KEK worth probing: not destroyed, not retired.
    pub async fn probe_targets(&self) -> Result<Vec<ProbeTarget>, StoreError> {
        dispatch!(self, s => s.probe_targets().await)
    }

    /// Records a probe's result on a KEK; returns when the outage episode started, if the
    /// key is unreachable.
    pub async fn record_probe(
        &self,
        kek_id: i64,
        record: &ProbeRecord,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        dispatch!(self, s => s.record_probe(kek_id, record, now).await)
    }

    /// Queues a `key.unreachable` notification once per outage episode.
    pub async fn notify_unreachable(
        &self,
        kek_id: i64,
        rows: &[NewOutbox],
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        dispatch!(self, s => s.notify_unreachable(kek_id, rows, now).await)
    }

    /// Inserts outbox rows in a transaction of their own (dedupe keys make repeats no-ops);
    /// returns how many were new.
    pub async fn enqueue_outbox(&self, rows: &[NewOutbox]) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let inserted = tx.enqueue(rows).await?;
        tx.commit().await?;
        Ok(inserted)
    }
}
