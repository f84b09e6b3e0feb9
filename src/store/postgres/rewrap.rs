//! PostgreSQL SQL of DEKs and re-wrap jobs.

use super::{PgStore, PgTx};
use crate::domain::{Access, JobKind, JobState, KeyState, Provider};
use crate::store::{
    ClaimedDek, DekRow, DekTarget, KekRef, NewDek, NewRewrapJob, RewrapJob, RewrapJobView,
    RewrappedDek, StoreError, TenantRow,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// An active job joined with both KEKs, flat as the query returns it.
struct JobRecord {
    id: i64,
    tenant_id: String,
    kind: JobKind,
    target_version: String,
    from_versions: Vec<String>,
    planned: bool,
    kek_id: i64,
    s_provider: Provider,
    s_key_ref: String,
    target_kek_id: i64,
    t_provider: Provider,
    t_key_ref: String,
}

impl From<JobRecord> for RewrapJob {
    fn from(r: JobRecord) -> Self {
        RewrapJob {
            id: r.id,
            tenant_id: r.tenant_id,
            kind: r.kind,
            kek: KekRef {
                id: r.kek_id,
                provider: r.s_provider,
                key_ref: r.s_key_ref,
            },
            target: KekRef {
                id: r.target_kek_id,
                provider: r.t_provider,
                key_ref: r.t_key_ref,
            },
            target_version: r.target_version,
            from_versions: r.from_versions,
            planned: r.planned,
        }
    }
}

/// `sqlx::query_as!` of [`JobRecord`]s: a job (`j`) joined with its source (`s`) and target
/// (`t`) KEKs, then `$rest`. The select-list is written once for both queries using it.
macro_rules! query_jobs {
    ($rest:literal $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            JobRecord,
            r#"SELECT j.id, j.tenant_id, j.kind AS "kind: JobKind", j.target_version,
                      j.from_versions, j.planned, j.kek_id,
                      s.provider AS "s_provider: Provider", s.key_ref AS s_key_ref,
                      j.target_kek_id,
                      t.provider AS "t_provider: Provider", t.key_ref AS t_key_ref
               FROM rewrap_jobs j JOIN keks s ON s.id = j.kek_id
                    JOIN keks t ON t.id = j.target_kek_id "#
                + $rest
            $(, $arg)*
        )
    };
}

impl PgStore {
    pub(crate) async fn retry_rewrap_job(&self, job_id: i64) -> Result<String, StoreError> {
        let mut tx = self.pool.begin().await?;
        let tenant = sqlx::query_scalar!(
            "UPDATE rewrap_jobs SET state = 'pending', failed = 0, last_error = NULL,
                    completed_at = NULL, not_before = now(), updated_at = now()
             WHERE id = $1 AND state = 'failed'
             RETURNING tenant_id",
            job_id
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("failed re-wrap job {job_id}")))?;
        sqlx::query!("DELETE FROM rewrap_failures WHERE job_id = $1", job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(tenant)
    }

    pub(crate) async fn dek_target(&self, tenant_id: &str) -> Result<DekTarget, StoreError> {
        let r = sqlx::query!(
            r#"SELECT t.access AS "access: Access", t.access_reason, k.id AS "kek_id?",
                      k.provider AS "provider?: Provider", k.key_ref AS "key_ref?"
               FROM tenants t LEFT JOIN keks k ON k.tenant_id = t.id AND k.is_primary
               WHERE t.id = $1"#,
            tenant_id
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {tenant_id:?}")))?;
        let kek = match (r.kek_id, r.provider, r.key_ref) {
            (Some(id), Some(provider), Some(key_ref)) => Some(KekRef {
                id,
                provider,
                key_ref,
            }),
            _ => None,
        };
        Ok(DekTarget {
            access: r.access,
            reason: r.access_reason,
            kek,
        })
    }

    pub(crate) async fn insert_dek(&self, d: &NewDek) -> Result<(), StoreError> {
        // The tenant's access and primary KEK are re-checked in the insert itself, so a
        // revocation committed while the DEK was being wrapped wins.
        let inserted = sqlx::query!(
            "INSERT INTO deks (id, tenant_id, kek_id, kek_version, wrapped, kcv)
             SELECT $1, $2, $3, $4, $5, $6
             WHERE EXISTS (SELECT 1 FROM tenants t JOIN keks k ON k.tenant_id = t.id
                           WHERE t.id = $2 AND t.access = 'accessible'
                             AND k.id = $3 AND k.is_primary)",
            d.id,
            d.tenant_id,
            d.kek_id,
            d.kek_version,
            d.wrapped,
            d.kcv
        )
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "tenant {:?} stopped being accessible while the DEK was created",
                d.tenant_id
            )));
        }
        Ok(())
    }

    pub(crate) async fn dek(&self, tenant_id: &str, id: Uuid) -> Result<DekRow, StoreError> {
        self.deks_by_ids(tenant_id, &[id])
            .await?
            .pop()
            .ok_or_else(|| StoreError::NotFound(format!("DEK {id} of tenant {tenant_id:?}")))
    }

    pub(crate) async fn deks_page(
        &self,
        tenant_id: &str,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<DekRow>, StoreError> {
        Ok(sqlx::query_as!(
            DekRow,
            r#"SELECT d.id, d.tenant_id, k.provider AS "provider: Provider", k.key_ref,
                      k.state AS "kek_state: KeyState", d.kek_version, d.wrapped, d.kcv
               FROM deks d JOIN keks k ON k.id = d.kek_id
               WHERE d.tenant_id = $1 AND ($2::uuid IS NULL OR d.id > $2)
               ORDER BY d.id LIMIT $3"#,
            tenant_id,
            after,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn rewrap_jobs(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<RewrapJobView>, StoreError> {
        Ok(sqlx::query_as!(
            RewrapJobView,
            r#"SELECT j.id, j.tenant_id, j.kind AS "kind: JobKind", s.provider AS "provider: Provider",
                      s.key_ref, t.key_ref AS target_key_ref, j.from_versions, j.target_version,
                      j.state AS "state: JobState", j.total, j.done, j.failed, j.last_error,
                      j.created_at, j.completed_at
               FROM rewrap_jobs j JOIN keks s ON s.id = j.kek_id
                    JOIN keks t ON t.id = j.target_kek_id
               WHERE j.tenant_id = $1 ORDER BY j.id DESC"#,
            tenant_id
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn due_rewrap_jobs(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RewrapJob>, StoreError> {
        let rows = query_jobs!(
            "WHERE j.state IN ('pending', 'running', 'waiting') AND j.not_before <= $1
             ORDER BY j.id LIMIT $2",
            now,
            limit,
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(RewrapJob::from).collect())
    }

    pub(crate) async fn dek_versions(&self, kek_id: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query!(
            r#"SELECT kek_version, count(*) AS "n!" FROM deks WHERE kek_id = $1
               GROUP BY kek_version"#,
            kek_id
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| (r.kek_version, r.n)).collect())
    }

    pub(crate) async fn plan_rewrap_job(
        &self,
        job_id: i64,
        from_versions: &[String],
        total: i64,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "UPDATE rewrap_jobs SET from_versions = $2, total = $3, planned = TRUE,
                    state = 'running', updated_at = now()
             WHERE id = $1 AND NOT planned",
            job_id,
            from_versions,
            total
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn defer_rewrap_job(
        &self,
        job_id: i64,
        waiting: bool,
        until: DateTime<Utc>,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "UPDATE rewrap_jobs
             SET state = CASE WHEN $2 THEN 'waiting' ELSE state END,
                 not_before = $3, last_error = $4, updated_at = now()
             WHERE id = $1 AND state IN ('pending', 'running', 'waiting')",
            job_id,
            waiting,
            until,
            reason
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

impl PgTx {
    pub(crate) async fn create_rewrap_jobs(
        &mut self,
        jobs: &[NewRewrapJob],
    ) -> Result<(), StoreError> {
        for j in jobs {
            if j.kind == JobKind::Rotation {
                // The key's owner chose not to re-wrap after rotations (AWS: old material
                // still decrypts); the observation that found the version is audited anyway.
                let rewrap = sqlx::query_scalar!(
                    "SELECT rewrap_on_rotation FROM keks WHERE id = $1",
                    j.kek_id
                )
                .fetch_optional(&mut *self.tx)
                .await?;
                if rewrap == Some(false) {
                    continue;
                }
                // A newer rotation takes over: it re-wraps everything the older one had left.
                sqlx::query!(
                    "UPDATE rewrap_jobs SET state = 'superseded', updated_at = now(),
                            completed_at = now()
                     WHERE kek_id = $1 AND kind = 'rotation' AND target_version <> $2
                       AND state IN ('pending', 'running', 'waiting')",
                    j.kek_id,
                    j.target_version
                )
                .execute(&mut *self.tx)
                .await?;
            }
            sqlx::query!(
                "INSERT INTO rewrap_jobs (tenant_id, kind, kek_id, target_kek_id, target_version)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (kek_id, target_kek_id, target_version) DO NOTHING",
                j.tenant_id,
                j.kind.as_str(),
                j.kek_id,
                j.target_kek_id,
                j.target_version
            )
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    pub(crate) async fn resume_rewrap_jobs(&mut self, kek_ids: &[i64]) -> Result<(), StoreError> {
        if kek_ids.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            "UPDATE rewrap_jobs SET not_before = now(), updated_at = now()
             WHERE state = 'waiting' AND (kek_id = ANY($1) OR target_kek_id = ANY($1))",
            kek_ids
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(crate) async fn claim_deks(
        &mut self,
        job: &RewrapJob,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimedDek>, StoreError> {
        Ok(sqlx::query_as!(
            ClaimedDek,
            "SELECT d.id, d.tenant_id, d.kek_version, d.wrapped FROM deks d
             WHERE d.kek_id = $1 AND d.kek_version = ANY($2)
               AND NOT EXISTS (SELECT 1 FROM rewrap_failures f
                               WHERE f.job_id = $3 AND f.dek_id = d.id AND f.next_attempt_at > $4)
             LIMIT $5
             FOR UPDATE OF d SKIP LOCKED",
            job.kek.id,
            &job.from_versions,
            job.id,
            now,
            limit
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    pub(crate) async fn store_rewrapped(
        &mut self,
        job: &RewrapJob,
        deks: &[RewrappedDek],
    ) -> Result<u64, StoreError> {
        if deks.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = deks.iter().map(|d| d.id).collect();
        let old: Vec<&str> = deks.iter().map(|d| d.old_version.as_str()).collect();
        let versions: Vec<&str> = deks.iter().map(|d| d.version.as_str()).collect();
        let wrapped: Vec<&[u8]> = deks.iter().map(|d| d.wrapped.as_slice()).collect();
        let done = sqlx::query!(
            "UPDATE deks d SET kek_id = $1, kek_version = u.version, wrapped = u.wrapped,
                    updated_at = now()
             FROM UNNEST($3::uuid[], $4::text[], $5::text[], $6::bytea[])
                 AS u(id, old_version, version, wrapped)
             WHERE d.id = u.id AND d.kek_id = $2 AND d.kek_version = u.old_version",
            job.target.id,
            job.kek.id,
            &ids,
            &old as &[&str],
            &versions as &[&str],
            &wrapped as &[&[u8]]
        )
        .execute(&mut *self.tx)
        .await?;
        sqlx::query!(
            "DELETE FROM rewrap_failures WHERE job_id = $1 AND dek_id = ANY($2)",
            job.id,
            &ids
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn record_rewrap_failures(
        &mut self,
        job_id: i64,
        failures: &[(Uuid, String)],
        now: DateTime<Utc>,
        max_attempts: i32,
    ) -> Result<i64, StoreError> {
        if failures.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = failures.iter().map(|f| f.0).collect();
        let reasons: Vec<&str> = failures.iter().map(|f| f.1.as_str()).collect();
        // Backoff doubles from 5 s; at `max_attempts` the DEK waits forever (failed for good).
        let attempts = sqlx::query_scalar!(
            "INSERT INTO rewrap_failures AS f (job_id, dek_id, reason, attempts, next_attempt_at)
             SELECT $1, u.id, u.reason, 1, $3::timestamptz + interval '5 seconds'
             FROM UNNEST($2::uuid[], $5::text[]) AS u(id, reason)
             ON CONFLICT (job_id, dek_id) DO UPDATE
             SET attempts = f.attempts + 1, reason = EXCLUDED.reason,
                 next_attempt_at = CASE WHEN f.attempts + 1 >= $4 THEN 'infinity'::timestamptz
                     ELSE $3 + interval '5 seconds' * power(2, f.attempts) END
             RETURNING attempts",
            job_id,
            &ids,
            now,
            max_attempts,
            &reasons as &[&str]
        )
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(attempts.into_iter().filter(|&a| a >= max_attempts).count() as i64)
    }

    pub(crate) async fn add_rewrap_progress(
        &mut self,
        job_id: i64,
        done: i64,
        failed: i64,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "UPDATE rewrap_jobs SET done = done + $2, failed = failed + $3, state = 'running',
                    last_error = NULL, updated_at = now()
             WHERE id = $1",
            job_id,
            done,
            failed
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(crate) async fn lock_active_job(
        &mut self,
        job_id: i64,
    ) -> Result<Option<RewrapJob>, StoreError> {
        let row = query_jobs!(
            "WHERE j.id = $1 AND j.state IN ('pending', 'running', 'waiting')
             FOR UPDATE OF j",
            job_id,
        )
        .fetch_optional(&mut *self.tx)
        .await?;
        Ok(row.map(RewrapJob::from))
    }

    pub(crate) async fn remaining_versions(
        &mut self,
        kek_id: i64,
        except_version: Option<&str>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        // Two index ranges around the target version, so a finished job does not scan the
        // DEKs it already moved.
        let rows = sqlx::query!(
            r#"SELECT kek_version, count(*) AS "n!" FROM deks
               WHERE kek_id = $1
                 AND ($2::text IS NULL OR kek_version < $2 OR kek_version > $2)
               GROUP BY kek_version"#,
            kek_id,
            except_version
        )
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows.into_iter().map(|r| (r.kek_version, r.n)).collect())
    }

    pub(crate) async fn permanent_failures(&mut self, job_id: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM rewrap_failures
               WHERE job_id = $1 AND next_attempt_at = 'infinity'::timestamptz"#,
            job_id
        )
        .fetch_one(&mut *self.tx)
        .await?)
    }

    pub(crate) async fn extend_rewrap_job(
        &mut self,
        job_id: i64,
        versions: &[String],
        more: i64,
    ) -> Result<(), StoreError> {
        sqlx::query!(
            "UPDATE rewrap_jobs SET from_versions = from_versions || $2, total = total + $3,
                    updated_at = now()
             WHERE id = $1",
            job_id,
            versions,
            more
        )
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(crate) async fn finish_rewrap_job(
        &mut self,
        job: &RewrapJob,
        state: JobState,
        reason: Option<&str>,
    ) -> Result<(i64, i64), StoreError> {
        let r = sqlx::query!(
            "UPDATE rewrap_jobs SET state = $2, last_error = $3, completed_at = now(),
                    updated_at = now()
             WHERE id = $1 RETURNING done, failed",
            job.id,
            state.as_str(),
            reason
        )
        .fetch_one(&mut *self.tx)
        .await?;
        if job.kind == JobKind::Replacement && state == JobState::Completed {
            sqlx::query!(
                "UPDATE keks SET retired_at = now(), updated_at = now() WHERE id = $1",
                job.kek.id
            )
            .execute(&mut *self.tx)
            .await?;
        }
        Ok((r.done, r.failed))
    }

    pub(crate) async fn tenant_recipients(
        &mut self,
        tenant_id: &str,
    ) -> Result<TenantRow, StoreError> {
        query_recipients!(
            TenantRow,
            "SELECT ",
            "FROM tenants t WHERE t.id = $1",
            tenant_id,
        )
        .fetch_optional(&mut *self.tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {tenant_id:?}")))
    }
}
