//! DEK re-wrap jobs: rotation (every DEK of a KEK moves to its new version) and replacement
//! (every DEK moves to another KEK).
//!
//! Jobs are created by the lifecycle transaction (a `rotated` event) or the admin API (key
//! replacement) and worked by [`Rewrapper::run_once`], called in a loop by each of
//! `rewrap.concurrency` workers on every replica. A step claims a batch of DEKs with
//! `FOR UPDATE SKIP LOCKED`, re-wraps it through the KMS, and writes the batch back with a
//! compare-and-swap on the old KEK and version in the same transaction, so a crash at any
//! point rolls the batch back and a restarted worker picks it up again: no DEK is skipped,
//! wrapped twice or lost. A DEK that fails is recorded with its reason and retried with
//! backoff without holding up the rest; a key the KMS refuses puts the job in `waiting` until
//! the key is usable again.

use crate::config::RewrapSettings;
use crate::domain::job::{JobKind, JobState, needs_rewrap};
use crate::domain::{Provider, UnknownName};
use crate::kms::{DekContext, Kms, KmsError, KmsProvider, Wrapped, WrappedRef};
use crate::lifecycle;
use crate::notify::catalog::{KeyReplaced, KeyRewrapFailed, KeyRotated, Notification};
use crate::store::{AuditRow, RewrapJob, RewrappedDek, Store, StoreError};
use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::json;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// The per-provider rate limits of `settings`, keyed by provider.
///
/// # Errors
///
/// A key that names no provider (the daemon refuses to start with it).
pub fn rate_limits(settings: &RewrapSettings) -> Result<HashMap<Provider, u32>, UnknownName> {
    settings
        .rate_limits
        .iter()
        .map(|(name, rate)| Ok((name.parse::<Provider>()?, *rate)))
        .collect()
}

/// Why a step failed; the loop retries after a pause either way.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No job is due.
    Idle,
    /// Re-wrapped a batch: `done` swapped, `failed` recorded.
    Batch {
        /// DEKs re-wrapped.
        done: u64,
        /// DEKs that failed this time.
        failed: usize,
    },
    /// The job's remaining DEKs are held by other workers or backing off.
    Busy,
    /// The KMS refused or could not be reached; the job waits.
    Deferred,
    /// The job finished.
    Finished,
}

/// The re-wrap engine shared by a replica's workers.
#[derive(Clone)]
pub struct Rewrapper {
    store: Store,
    kms: Kms,
    settings: RewrapSettings,
    limiters: Arc<HashMap<Provider, DefaultDirectRateLimiter>>,
    wake: Arc<Notify>,
}

impl Rewrapper {
    /// An engine; `wake` is notified by whoever creates or resumes a job.
    pub fn new(store: Store, kms: Kms, settings: RewrapSettings, wake: Arc<Notify>) -> Rewrapper {
        let limiters = rate_limits(&settings)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(p, rate)| {
                let rate = NonZeroU32::new(rate)?;
                let burst = NonZeroU32::new(
                    u32::try_from(settings.batch_size)
                        .unwrap_or(u32::MAX)
                        .max(rate.get()),
                )?;
                Some((
                    p,
                    RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
                ))
            })
            .collect();
        Rewrapper {
            store,
            kms,
            settings,
            limiters: Arc::new(limiters),
            wake,
        }
    }

    /// Works one batch of the oldest due job.
    ///
    /// # Errors
    ///
    /// Database failures; KMS failures defer the job instead.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<Step, RewrapError> {
        // Several due jobs, oldest first: when other workers hold the rest of one job, this
        // worker moves on to the next instead of idling behind it.
        let jobs = self.store.due_rewrap_jobs(now, 8).await?;
        if jobs.is_empty() {
            return Ok(Step::Idle);
        }
        for mut job in jobs {
            if !job.planned {
                self.plan(&mut job).await?;
            }
            let mut tx = self.store.begin().await?;
            let claimed = tx.claim_deks(&job, self.settings.batch_size, now).await?;
            if claimed.is_empty() {
                drop(tx);
                match self.try_finish(&job, now).await? {
                    Step::Busy => continue,
                    step => return Ok(step),
                }
            }
            return self.work(&job, tx, claimed, now).await;
        }
        Ok(Step::Busy)
    }

    /// Re-wraps one claimed batch and commits it.
    async fn work(
        &self,
        job: &RewrapJob,
        mut tx: crate::store::StoreTx,
        claimed: Vec<crate::store::ClaimedDek>,
        now: DateTime<Utc>,
    ) -> Result<Step, RewrapError> {
        if let Some(limiter) = self.limiters.get(&job.kek.provider)
            && let Some(n) = NonZeroU32::new(u32::try_from(claimed.len()).unwrap_or(u32::MAX))
        {
            // `n` never exceeds the burst (batch size), so this only waits.
            let _ = limiter.until_n_ready(n).await;
        }
        let items: Vec<WrappedRef<'_>> = claimed
            .iter()
            .map(|d| WrappedRef {
                ctx: DekContext {
                    tenant_id: &d.tenant_id,
                    dek_id: d.id,
                },
                version: &d.kek_version,
                ciphertext: &d.wrapped,
            })
            .collect();
        let results = match self.rewrap(job, &items).await {
            Ok(r) => r,
            Err(e) => {
                drop(tx);
                return self.defer(job, &e, now).await;
            }
        };
        let mut swapped = Vec::with_capacity(claimed.len());
        let mut failures = Vec::new();
        for (dek, result) in claimed.iter().zip(results) {
            match result {
                Ok(Wrapped {
                    version,
                    ciphertext,
                }) => swapped.push(RewrappedDek {
                    id: dek.id,
                    old_version: dek.kek_version.clone(),
                    version,
                    wrapped: ciphertext,
                }),
                Err(e) => failures.push((dek.id, e.to_string())),
            }
        }
        let done = tx.store_rewrapped(job, &swapped).await?;
        let failed_for_good = tx
            .record_rewrap_failures(job.id, &failures, now, self.settings.max_attempts)
            .await?;
        tx.add_rewrap_progress(
            job.id,
            i64::try_from(done).unwrap_or(i64::MAX),
            failed_for_good,
        )
        .await?;
        tx.commit().await?;
        metrics::counter!(crate::telemetry::REWRAP_DEKS, "outcome" => "rewrapped").increment(done);
        metrics::counter!(crate::telemetry::REWRAP_DEKS, "outcome" => "failed")
            .increment(failures.len() as u64);
        if !failures.is_empty() {
            tracing::warn!(job = job.id, failed = failures.len(), first = %failures[0].1,
                "DEKs failed to re-wrap; will retry");
        }
        tracing::debug!(job = job.id, done, "re-wrapped a batch");
        Ok(Step::Batch {
            done,
            failed: failures.len(),
        })
    }

    async fn rewrap(
        &self,
        job: &RewrapJob,
        items: &[WrappedRef<'_>],
    ) -> Result<Vec<Result<Wrapped, KmsError>>, KmsError> {
        match job.kind {
            JobKind::Rotation => {
                self.kms
                    .provider(job.kek.provider)?
                    .rewrap(&job.kek.key_ref, items, &job.target_version)
                    .await
            }
            JobKind::Replacement => {
                self.kms
                    .transfer(
                        (job.kek.provider, &job.kek.key_ref),
                        (job.target.provider, &job.target.key_ref),
                        items,
                        &job.target_version,
                    )
                    .await
            }
        }
    }

    async fn plan(&self, job: &mut RewrapJob) -> Result<(), RewrapError> {
        let versions = self.store.dek_versions(job.kek.id).await?;
        let (from, total): (Vec<String>, i64) = versions
            .into_iter()
            .filter(|(v, _)| needs_rewrap(job.kind, v, &job.target_version))
            .fold((Vec::new(), 0), |(mut vs, n), (v, c)| {
                vs.push(v);
                (vs, n + c)
            });
        self.store.plan_rewrap_job(job.id, &from, total).await?;
        self.store
            .append_audit(&[AuditRow::operation(
                Some(&job.tenant_id),
                "rewrap_started",
                "rewrap",
                json!({ "job_id": job.id, "kind": job.kind, "key_ref": job.kek.key_ref,
                        "target_key_ref": job.target.key_ref, "to_version": job.target_version,
                        "from_versions": from, "total": total }),
            )])
            .await?;
        tracing::info!(job = job.id, tenant = %job.tenant_id, key = %job.kek.key_ref,
            to = %job.target_version, total, "re-wrap job planned");
        job.from_versions = from;
        job.planned = true;
        Ok(())
    }

    async fn defer(
        &self,
        job: &RewrapJob,
        e: &KmsError,
        now: DateTime<Utc>,
    ) -> Result<Step, RewrapError> {
        // A refusal waits for the key to come back (an `enabled` event resumes the job at
        // once); an outage retries sooner.
        let (waiting, delay) = if e.is_transient() {
            (false, chrono::Duration::seconds(5))
        } else {
            (true, chrono::Duration::seconds(60))
        };
        tracing::warn!(job = job.id, error = %e, "re-wrap job deferred");
        self.store
            .defer_rewrap_job(job.id, waiting, now + delay, &e.to_string())
            .await?;
        if waiting {
            // The KMS refused a key: look at both ends now, so the tenant's access shows a
            // key that cannot give up its DEKs (and the job resumes when it can).
            self.store
                .request_confirmation(&[job.kek.id, job.target.id], now)
                .await?;
        }
        Ok(Step::Deferred)
    }

    /// Completes the job if nothing is left to re-wrap; otherwise picks up DEKs that appeared
    /// under versions the plan did not know, or reports that other workers hold the rest.
    async fn try_finish(&self, job: &RewrapJob, now: DateTime<Utc>) -> Result<Step, RewrapError> {
        let mut tx = self.store.begin().await?;
        let Some(job) = tx.lock_active_job(job.id).await? else {
            return Ok(Step::Busy);
        };
        let except = (job.kind == JobKind::Rotation).then_some(job.target_version.as_str());
        let remaining: Vec<(String, i64)> = tx
            .remaining_versions(job.kek.id, except)
            .await?
            .into_iter()
            .filter(|(v, _)| needs_rewrap(job.kind, v, &job.target_version))
            .collect();
        let new: Vec<(String, i64)> = remaining
            .iter()
            .filter(|(v, _)| !job.from_versions.contains(v))
            .cloned()
            .collect();
        if !new.is_empty() {
            let versions: Vec<String> = new.iter().map(|(v, _)| v.clone()).collect();
            let more = new.iter().map(|(_, n)| n).sum();
            tx.extend_rewrap_job(job.id, &versions, more).await?;
            tx.commit().await?;
            return Ok(Step::Busy);
        }
        let left: i64 = remaining.iter().map(|(_, n)| n).sum();
        let failed = tx.permanent_failures(job.id).await?;
        if left > failed {
            return Ok(Step::Busy);
        }
        let state = if failed > 0 {
            JobState::Failed
        } else {
            JobState::Completed
        };
        let reason = (failed > 0).then(|| format!("{failed} DEKs could not be re-wrapped"));
        let (done, _) = tx.finish_rewrap_job(&job, state, reason.as_deref()).await?;
        let notice = match (failed > 0, job.kind) {
            (true, kind) => Notification::KeyRewrapFailed(KeyRewrapFailed {
                tenant_id: job.tenant_id.clone(),
                job_id: job.id,
                job_kind: kind,
                provider: job.kek.provider,
                key_ref: job.kek.key_ref.clone(),
                target_key_ref: job.target.key_ref.clone(),
                to_version: job.target_version.clone(),
                failed,
                done,
                finished_at: now,
            }),
            (false, JobKind::Rotation) => Notification::KeyRotated(KeyRotated {
                tenant_id: job.tenant_id.clone(),
                provider: job.target.provider,
                key_ref: job.target.key_ref.clone(),
                from_version: job.from_versions.join(","),
                to_version: job.target_version.clone(),
                dek_count: done,
                job_id: job.id,
            }),
            (false, JobKind::Replacement) => Notification::KeyReplaced(KeyReplaced {
                tenant_id: job.tenant_id.clone(),
                previous_provider: job.kek.provider,
                previous_key_ref: job.kek.key_ref.clone(),
                provider: job.target.provider,
                key_ref: job.target.key_ref.clone(),
                to_version: job.target_version.clone(),
                dek_count: done,
                job_id: job.id,
            }),
        };
        let tenant = tx.tenant_recipients(&job.tenant_id).await?;
        tx.enqueue(&notice.outbox_rows(Some(&tenant), now)).await?;
        let mut audit = vec![AuditRow::operation(
            Some(&job.tenant_id),
            if failed > 0 {
                "rewrap_failed"
            } else {
                "rewrap_completed"
            },
            "rewrap",
            json!({ "job_id": job.id, "kind": job.kind, "done": done, "failed": failed }),
        )];
        if job.kind == JobKind::Replacement && failed == 0 {
            audit.push(AuditRow::operation(
                Some(&job.tenant_id),
                "kek_retired",
                "rewrap",
                json!({ "job_id": job.id, "provider": job.kek.provider,
                        "key_ref": job.kek.key_ref }),
            ));
        }
        tx.audit(&audit).await?;
        tx.commit().await?;
        if job.kind == JobKind::Replacement && state == JobState::Completed {
            // The old key holds no DEK any more: it stops counting for the tenant's access.
            let cause = lifecycle::Cause::new(
                "replacement",
                Some((job.kek.provider, job.kek.key_ref.clone())),
            );
            lifecycle::refresh_access(
                &self.store,
                std::slice::from_ref(&job.tenant_id),
                &cause,
                now,
            )
            .await?;
        }
        metrics::counter!(crate::telemetry::REWRAP_JOBS_FINISHED, "state" => state.as_str())
            .increment(1);
        tracing::info!(job = job.id, tenant = %job.tenant_id, state = state.as_str(), done, failed,
            "re-wrap job finished");
        Ok(Step::Finished)
    }
}

/// One worker: runs [`Rewrapper::run_once`] until shutdown, pausing when idle (woken early
/// when a job is created or resumed) and after errors.
pub async fn rewrap_loop(engine: Rewrapper, mut shutdown: watch::Receiver<bool>) {
    let wake = engine.wake.clone();
    while !*shutdown.borrow() {
        let pause = match engine.run_once(Utc::now()).await {
            Ok(Step::Batch { .. } | Step::Finished) => continue,
            Ok(Step::Busy) => Duration::from_millis(200),
            Ok(Step::Idle | Step::Deferred) => Duration::from_secs(2),
            Err(e) => {
                tracing::warn!(error = %e, "re-wrap step failed; retrying");
                Duration::from_secs(2)
            }
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
    }
}
