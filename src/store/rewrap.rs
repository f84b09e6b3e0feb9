//! Store API of DEKs and re-wrap jobs.

use super::{KekRef, Store, StoreError, StoreTx, TenantRow};
use crate::domain::{Access, JobKind, JobState, KeyState, Provider};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// A DEK to insert (already wrapped).
#[derive(Debug, Clone)]
pub struct NewDek {
    /// Id (bound into the wrap's AAD).
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// KEK it is wrapped under.
    pub kek_id: i64,
    /// KEK version it is wrapped under.
    pub kek_version: String,
    /// Ciphertext.
    pub wrapped: Vec<u8>,
    /// Key check value of the plaintext.
    pub kcv: String,
}

/// A stored DEK with its KEK.
#[derive(Debug, Clone)]
pub struct DekRow {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// KEK provider.
    pub provider: Provider,
    /// KEK name.
    pub key_ref: String,
    /// KEK state (a destroyed KEK's DEKs are unrecoverable).
    pub kek_state: KeyState,
    /// KEK version.
    pub kek_version: String,
    /// Ciphertext.
    pub wrapped: Vec<u8>,
    /// Key check value.
    pub kcv: String,
}

/// The KEK a tenant's new DEKs are wrapped under, with the tenant's access.
#[derive(Debug, Clone)]
pub struct DekTarget {
    /// Tenant access.
    pub access: Access,
    /// Why, when not accessible.
    pub reason: Option<String>,
    /// Primary KEK, if registered.
    pub kek: Option<KekRef>,
}

/// A re-wrap job to create from a lifecycle transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRewrapJob {
    /// Tenant.
    pub tenant_id: String,
    /// Rotation or replacement.
    pub kind: JobKind,
    /// KEK the DEKs are under now.
    pub kek_id: i64,
    /// KEK they move to (same as `kek_id` for a rotation).
    pub target_kek_id: i64,
    /// Version they move to.
    pub target_version: String,
}

/// An active job, as a worker sees it.
#[derive(Debug, Clone)]
pub struct RewrapJob {
    /// Id.
    pub id: i64,
    /// Tenant.
    pub tenant_id: String,
    /// Rotation or replacement.
    pub kind: JobKind,
    /// Source KEK.
    pub kek: KekRef,
    /// Target KEK (the source itself for a rotation).
    pub target: KekRef,
    /// Target version.
    pub target_version: String,
    /// Versions being moved off.
    pub from_versions: Vec<String>,
    /// Whether `from_versions`/`total` were computed.
    pub planned: bool,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RewrapJobView {
    /// Id.
    pub id: i64,
    /// The tenant whose DEKs it moves.
    pub tenant_id: String,
    /// Rotation or replacement.
    pub kind: JobKind,
    /// Source key.
    pub provider: Provider,
    /// Source key name.
    pub key_ref: String,
    /// Target key name (differs for a replacement).
    pub target_key_ref: String,
    /// Versions moved off.
    pub from_versions: Vec<String>,
    /// Version moved to.
    pub target_version: String,
    /// Where it stands.
    pub state: JobState,
    /// DEKs to re-wrap.
    pub total: i64,
    /// DEKs re-wrapped.
    pub done: i64,
    /// DEKs that failed for good.
    pub failed: i64,
    /// Why it waits or failed.
    pub last_error: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Finished.
    pub completed_at: Option<DateTime<Utc>>,
}

/// A claimed DEK.
#[derive(Debug, Clone)]
pub struct ClaimedDek {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub tenant_id: String,
    /// Current version (compare-and-swap guard).
    pub kek_version: String,
    /// Current ciphertext.
    pub wrapped: Vec<u8>,
}

/// A re-wrapped DEK to write back.
#[derive(Debug, Clone)]
pub struct RewrappedDek {
    /// Id.
    pub id: Uuid,
    /// Version it was under (the swap only happens if it still is).
    pub old_version: String,
    /// New version.
    pub version: String,
    /// New ciphertext.
    pub wrapped: Vec<u8>,
}

impl Store {
    /// Puts a `failed` job back to `pending` with its failures forgotten, so its DEKs are
    /// tried again. Returns the job's tenant; `NotFound` unless the job exists and failed.
    pub async fn retry_rewrap_job(&self, job_id: i64) -> Result<String, StoreError> {
        dispatch!(self, s => s.retry_rewrap_job(job_id).await)
    }

    /// The tenant's access and primary KEK, for creating a DEK.
    pub async fn dek_target(&self, tenant_id: &str) -> Result<DekTarget, StoreError> {
        dispatch!(self, s => s.dek_target(tenant_id).await)
    }

    /// Inserts a DEK if the tenant is still accessible and `kek_id` still its primary KEK
    /// ([`StoreError::Conflict`] otherwise).
    pub async fn insert_dek(&self, dek: &NewDek) -> Result<(), StoreError> {
        dispatch!(self, s => s.insert_dek(dek).await)
    }

    /// One DEK of a tenant.
    pub async fn dek(&self, tenant_id: &str, id: Uuid) -> Result<DekRow, StoreError> {
        dispatch!(self, s => s.dek(tenant_id, id).await)
    }

    /// A page of a tenant's DEKs in id order, after `after`.
    pub async fn deks_page(
        &self,
        tenant_id: &str,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<DekRow>, StoreError> {
        dispatch!(self, s => s.deks_page(tenant_id, after, limit).await)
    }

    /// A tenant's re-wrap jobs, newest first.
    pub async fn rewrap_jobs(&self, tenant_id: &str) -> Result<Vec<RewrapJobView>, StoreError> {
        dispatch!(self, s => s.rewrap_jobs(tenant_id).await)
    }

    /// Up to `limit` active jobs due at `now`, oldest first.
    pub async fn due_rewrap_jobs(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RewrapJob>, StoreError> {
        dispatch!(self, s => s.due_rewrap_jobs(now, limit).await)
    }

    /// DEK counts per version under a KEK.
    pub async fn dek_versions(&self, kek_id: i64) -> Result<Vec<(String, i64)>, StoreError> {
        dispatch!(self, s => s.dek_versions(kek_id).await)
    }

    /// Records a job's plan (first planner wins) and marks it running.
    pub async fn plan_rewrap_job(
        &self,
        job_id: i64,
        from_versions: &[String],
        total: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.plan_rewrap_job(job_id, from_versions, total).await)
    }

    /// Makes a job wait (the KMS refused the key or is unreachable) until `until`.
    pub async fn defer_rewrap_job(
        &self,
        job_id: i64,
        waiting: bool,
        until: DateTime<Utc>,
        reason: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.defer_rewrap_job(job_id, waiting, until, reason).await)
    }
}

impl StoreTx {
    /// Creates jobs (a job that exists already is left alone) and supersedes older active
    /// rotation jobs of the same KEKs.
    pub async fn create_rewrap_jobs(&mut self, jobs: &[NewRewrapJob]) -> Result<(), StoreError> {
        dispatch!(self, t => t.create_rewrap_jobs(jobs).await)
    }

    /// Makes waiting jobs of these KEKs due now (the key became usable again).
    pub async fn resume_rewrap_jobs(&mut self, kek_ids: &[i64]) -> Result<(), StoreError> {
        dispatch!(self, t => t.resume_rewrap_jobs(kek_ids).await)
    }

    /// Locks up to `limit` DEKs of the job still under one of its `from_versions`, skipping
    /// DEKs other workers hold and DEKs whose failure backoff has not elapsed.
    pub async fn claim_deks(
        &mut self,
        job: &RewrapJob,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimedDek>, StoreError> {
        dispatch!(self, t => t.claim_deks(job, limit, now).await)
    }

    /// Writes re-wrapped DEKs with compare-and-swap on their old KEK and version; returns how
    /// many were swapped.
    pub async fn store_rewrapped(
        &mut self,
        job: &RewrapJob,
        deks: &[RewrappedDek],
    ) -> Result<u64, StoreError> {
        dispatch!(self, t => t.store_rewrapped(job, deks).await)
    }

    /// Records failures; returns how many just reached `max_attempts` (failed for good).
    pub async fn record_rewrap_failures(
        &mut self,
        job_id: i64,
        failures: &[(Uuid, String)],
        now: DateTime<Utc>,
        max_attempts: i32,
    ) -> Result<i64, StoreError> {
        dispatch!(self, t => t.record_rewrap_failures(job_id, failures, now, max_attempts).await)
    }

    /// Adds progress to a job.
    pub async fn add_rewrap_progress(
        &mut self,
        job_id: i64,
        done: i64,
        failed: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self, t => t.add_rewrap_progress(job_id, done, failed).await)
    }

    /// Locks an active job; `None` if it is no longer active.
    pub async fn lock_active_job(&mut self, job_id: i64) -> Result<Option<RewrapJob>, StoreError> {
        dispatch!(self, t => t.lock_active_job(job_id).await)
    }

    /// DEK counts per version under a KEK, excluding `target_version` when given.
    pub async fn remaining_versions(
        &mut self,
        kek_id: i64,
        except_version: Option<&str>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        dispatch!(self, t => t.remaining_versions(kek_id, except_version).await)
    }

    /// DEKs of the job that failed for good.
    pub async fn permanent_failures(&mut self, job_id: i64) -> Result<i64, StoreError> {
        dispatch!(self, t => t.permanent_failures(job_id).await)
    }

    /// Adds newly found versions (and their DEKs) to an active job's plan.
    pub async fn extend_rewrap_job(
        &mut self,
        job_id: i64,
        versions: &[String],
        more: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self, t => t.extend_rewrap_job(job_id, versions, more).await)
    }

    /// Ends a job ([`JobState::Completed`] or [`JobState::Failed`]); a completed replacement
    /// retires the old KEK.
    pub async fn finish_rewrap_job(
        &mut self,
        job: &RewrapJob,
        state: JobState,
        reason: Option<&str>,
    ) -> Result<(i64, i64), StoreError> {
        dispatch!(self, t => t.finish_rewrap_job(job, state, reason).await)
    }

    /// Reads a tenant's notification recipients (no lock).
    pub async fn tenant_recipients(&mut self, tenant_id: &str) -> Result<TenantRow, StoreError> {
        dispatch!(self, t => t.tenant_recipients(tenant_id).await)
    }
}
