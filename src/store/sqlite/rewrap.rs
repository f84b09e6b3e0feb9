//! SQLite SQL of DEKs and re-wrap jobs. A job's `from_versions` is a JSON array.

use super::access::dek_row;
use super::{
    INFINITY, SqliteStore, SqliteTx, get_strings, get_uuid, json_list, recipients, tenant_row, ts,
    uid,
};
use crate::domain::{JobKind, JobState};
use crate::store::{
    ClaimedDek, DekRow, DekTarget, KekRef, NewDek, NewRewrapJob, RewrapJob, RewrapJobView,
    RewrappedDek, StoreError, TenantRow,
};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

/// A job (`j`) with its source (`s`) and target (`t`) KEKs, as the API shows it; the
/// query goes on with its conditions.
macro_rules! job_view_select {
    () => {
        "SELECT j.id, j.tenant_id, j.kind, s.provider, s.key_ref, t.key_ref AS target_key_ref,
                j.from_versions, j.target_version, j.state, j.total, j.done, j.failed,
                j.last_error, j.created_at, j.completed_at
         FROM rewrap_jobs j JOIN keks s ON s.id = j.kek_id JOIN keks t ON t.id = j.target_kek_id "
    };
}
pub(crate) use job_view_select;

/// A job (`j`) with both KEKs, as a worker sees it; the query goes on with its conditions.
macro_rules! job_select {
    () => {
        "SELECT j.id, j.tenant_id, j.kind, j.target_version, j.from_versions, j.planned,
                j.kek_id, s.provider AS s_provider, s.key_ref AS s_key_ref, j.target_kek_id,
                t.provider AS t_provider, t.key_ref AS t_key_ref
         FROM rewrap_jobs j JOIN keks s ON s.id = j.kek_id JOIN keks t ON t.id = j.target_kek_id "
    };
}

pub(crate) fn job_view(r: &SqliteRow) -> Result<RewrapJobView, StoreError> {
    Ok(RewrapJobView {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        kind: r.try_get("kind")?,
        provider: r.try_get("provider")?,
        key_ref: r.try_get("key_ref")?,
        target_key_ref: r.try_get("target_key_ref")?,
        from_versions: get_strings(r, "from_versions")?,
        target_version: r.try_get("target_version")?,
        state: r.try_get("state")?,
        total: r.try_get("total")?,
        done: r.try_get("done")?,
        failed: r.try_get("failed")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        completed_at: r.try_get("completed_at")?,
    })
}

fn job(r: &SqliteRow) -> Result<RewrapJob, StoreError> {
    Ok(RewrapJob {
        id: r.try_get("id")?,
        tenant_id: r.try_get("tenant_id")?,
        kind: r.try_get("kind")?,
        kek: KekRef {
            id: r.try_get("kek_id")?,
            provider: r.try_get("s_provider")?,
            key_ref: r.try_get("s_key_ref")?,
        },
        target: KekRef {
            id: r.try_get("target_kek_id")?,
            provider: r.try_get("t_provider")?,
            key_ref: r.try_get("t_key_ref")?,
        },
        target_version: r.try_get("target_version")?,
        from_versions: get_strings(r, "from_versions")?,
        planned: r.try_get("planned")?,
    })
}

fn version_counts(rows: &[SqliteRow]) -> Result<Vec<(String, i64)>, StoreError> {
    rows.iter()
        .map(|r| Ok((r.try_get("kek_version")?, r.try_get("n")?)))
        .collect()
}

impl SqliteStore {
    pub(crate) async fn retry_rewrap_job(&self, job_id: i64) -> Result<String, StoreError> {
        let mut tx = self.begin().await?;
        let now = ts(Utc::now());
        let tenant: String = sqlx::query_scalar(
            "UPDATE rewrap_jobs SET state = 'pending', failed = 0, last_error = NULL,
                    completed_at = NULL, not_before = ?2, updated_at = ?2
             WHERE id = ?1 AND state = 'failed'
             RETURNING tenant_id",
        )
        .bind(job_id)
        .bind(&now)
        .fetch_optional(&mut *tx.tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("failed re-wrap job {job_id}")))?;
        sqlx::query("DELETE FROM rewrap_failures WHERE job_id = ?1")
            .bind(job_id)
            .execute(&mut *tx.tx)
            .await?;
        tx.commit().await?;
        Ok(tenant)
    }

    pub(crate) async fn dek_target(&self, tenant_id: &str) -> Result<DekTarget, StoreError> {
        let r = sqlx::query(
            "SELECT t.access, t.access_reason, k.id AS kek_id, k.provider, k.key_ref
             FROM tenants t LEFT JOIN keks k ON k.tenant_id = t.id AND k.is_primary
             WHERE t.id = ?1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {tenant_id:?}")))?;
        let kek_id: Option<i64> = r.try_get("kek_id")?;
        let kek = match kek_id {
            Some(id) => Some(KekRef {
                id,
                provider: r.try_get("provider")?,
                key_ref: r.try_get("key_ref")?,
            }),
            None => None,
        };
        Ok(DekTarget {
            access: r.try_get("access")?,
            reason: r.try_get("access_reason")?,
            kek,
        })
    }

    pub(crate) async fn insert_dek(&self, d: &NewDek) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let now = ts(Utc::now());
        // The tenant's access and primary KEK are re-checked in the insert itself, so a
        // revocation committed while the DEK was being wrapped wins.
        let inserted = sqlx::query(
            "INSERT INTO deks (id, tenant_id, kek_id, kek_version, wrapped, kcv, created_at,
                               updated_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7
             WHERE EXISTS (SELECT 1 FROM tenants t JOIN keks k ON k.tenant_id = t.id
                           WHERE t.id = ?2 AND t.access = 'accessible'
                             AND k.id = ?3 AND k.is_primary)",
        )
        .bind(uid(d.id))
        .bind(&d.tenant_id)
        .bind(d.kek_id)
        .bind(&d.kek_version)
        .bind(&d.wrapped)
        .bind(&d.kcv)
        .bind(&now)
        .execute(&mut *tx.tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "tenant {:?} stopped being accessible while the DEK was created",
                d.tenant_id
            )));
        }
        tx.commit().await
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
        let rows = sqlx::query(
            "SELECT d.id, d.tenant_id, k.provider, k.key_ref, k.state AS kek_state,
                    d.kek_version, d.wrapped, d.kcv
             FROM deks d JOIN keks k ON k.id = d.kek_id
             WHERE d.tenant_id = ?1 AND (?2 IS NULL OR d.id > ?2)
             ORDER BY d.id LIMIT ?3",
        )
        .bind(tenant_id)
        .bind(after.map(uid))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(dek_row).collect()
    }

    pub(crate) async fn rewrap_jobs(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<RewrapJobView>, StoreError> {
        let rows = sqlx::query(concat!(
            job_view_select!(),
            "WHERE j.tenant_id = ?1 ORDER BY j.id DESC"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_view).collect()
    }

    pub(crate) async fn due_rewrap_jobs(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<RewrapJob>, StoreError> {
        let rows = sqlx::query(concat!(
            job_select!(),
            "WHERE j.state IN ('pending', 'running', 'waiting') AND j.not_before <= ?1
             ORDER BY j.id LIMIT ?2"
        ))
        .bind(ts(now))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job).collect()
    }

    pub(crate) async fn dek_versions(&self, kek_id: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kek_version, count(*) AS n FROM deks WHERE kek_id = ?1 GROUP BY kek_version",
        )
        .bind(kek_id)
        .fetch_all(&self.pool)
        .await?;
        version_counts(&rows)
    }

    pub(crate) async fn plan_rewrap_job(
        &self,
        job_id: i64,
        from_versions: &[String],
        total: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE rewrap_jobs SET from_versions = ?2, total = ?3, planned = 1,
                    state = 'running', updated_at = ?4
             WHERE id = ?1 AND NOT planned",
        )
        .bind(job_id)
        .bind(json_list(from_versions))
        .bind(total)
        .bind(ts(Utc::now()))
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await
    }

    pub(crate) async fn defer_rewrap_job(
        &self,
        job_id: i64,
        waiting: bool,
        until: DateTime<Utc>,
        reason: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE rewrap_jobs
             SET state = CASE WHEN ?2 THEN 'waiting' ELSE state END,
                 not_before = ?3, last_error = ?4, updated_at = ?5
             WHERE id = ?1 AND state IN ('pending', 'running', 'waiting')",
        )
        .bind(job_id)
        .bind(waiting)
        .bind(ts(until))
        .bind(reason)
        .bind(ts(Utc::now()))
        .execute(&mut *tx.tx)
        .await?;
        tx.commit().await
    }
}

impl SqliteTx {
    pub(crate) async fn create_rewrap_jobs(
        &mut self,
        jobs: &[NewRewrapJob],
    ) -> Result<(), StoreError> {
        let now = ts(Utc::now());
        for j in jobs {
            if j.kind == JobKind::Rotation {
                // The key's owner chose not to re-wrap after rotations.
                let rewrap: Option<bool> =
                    sqlx::query_scalar("SELECT rewrap_on_rotation FROM keks WHERE id = ?1")
                        .bind(j.kek_id)
                        .fetch_optional(&mut *self.tx)
                        .await?;
                if rewrap == Some(false) {
                    continue;
                }
                // A newer rotation takes over: it re-wraps everything the older one had left.
                sqlx::query(
                    "UPDATE rewrap_jobs SET state = 'superseded', updated_at = ?3,
                            completed_at = ?3
                     WHERE kek_id = ?1 AND kind = 'rotation' AND target_version <> ?2
                       AND state IN ('pending', 'running', 'waiting')",
                )
                .bind(j.kek_id)
                .bind(&j.target_version)
                .bind(&now)
                .execute(&mut *self.tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO rewrap_jobs (tenant_id, kind, kek_id, target_kek_id, target_version,
                                          not_before, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?6)
                 ON CONFLICT (kek_id, target_kek_id, target_version) DO NOTHING",
            )
            .bind(&j.tenant_id)
            .bind(j.kind.as_str())
            .bind(j.kek_id)
            .bind(j.target_kek_id)
            .bind(&j.target_version)
            .bind(&now)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    pub(crate) async fn resume_rewrap_jobs(&mut self, kek_ids: &[i64]) -> Result<(), StoreError> {
        if kek_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE rewrap_jobs SET not_before = ?2, updated_at = ?2
             WHERE state = 'waiting'
               AND (kek_id IN (SELECT value FROM json_each(?1))
                    OR target_kek_id IN (SELECT value FROM json_each(?1)))",
        )
        .bind(json_list(kek_ids))
        .bind(ts(Utc::now()))
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
        // No SKIP LOCKED: this transaction holds the write lock until it commits, so no
        // other worker claims these DEKs meanwhile.
        let rows = sqlx::query(
            "SELECT d.id, d.tenant_id, d.kek_version, d.wrapped FROM deks d
             WHERE d.kek_id = ?1 AND d.kek_version IN (SELECT value FROM json_each(?2))
               AND NOT EXISTS (SELECT 1 FROM rewrap_failures f
                               WHERE f.job_id = ?3 AND f.dek_id = d.id
                                 AND f.next_attempt_at > ?4)
             LIMIT ?5",
        )
        .bind(job.kek.id)
        .bind(json_list(&job.from_versions))
        .bind(job.id)
        .bind(ts(now))
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ClaimedDek {
                    id: get_uuid(r, "id")?,
                    tenant_id: r.try_get("tenant_id")?,
                    kek_version: r.try_get("kek_version")?,
                    wrapped: r.try_get("wrapped")?,
                })
            })
            .collect()
    }

    pub(crate) async fn store_rewrapped(
        &mut self,
        job: &RewrapJob,
        deks: &[RewrappedDek],
    ) -> Result<u64, StoreError> {
        let now = ts(Utc::now());
        let mut swapped = 0;
        for d in deks {
            swapped += sqlx::query(
                "UPDATE deks SET kek_id = ?1, kek_version = ?5, wrapped = ?6, updated_at = ?7
                 WHERE id = ?3 AND kek_id = ?2 AND kek_version = ?4",
            )
            .bind(job.target.id)
            .bind(job.kek.id)
            .bind(uid(d.id))
            .bind(&d.old_version)
            .bind(&d.version)
            .bind(&d.wrapped)
            .bind(&now)
            .execute(&mut *self.tx)
            .await?
            .rows_affected();
        }
        if !deks.is_empty() {
            let ids: Vec<String> = deks.iter().map(|d| uid(d.id)).collect();
            sqlx::query(
                "DELETE FROM rewrap_failures
                 WHERE job_id = ?1 AND dek_id IN (SELECT value FROM json_each(?2))",
            )
            .bind(job.id)
            .bind(json_list(&ids))
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(swapped)
    }

    pub(crate) async fn record_rewrap_failures(
        &mut self,
        job_id: i64,
        failures: &[(Uuid, String)],
        now: DateTime<Utc>,
        max_attempts: i32,
    ) -> Result<i64, StoreError> {
        let mut given_up = 0;
        for (id, reason) in failures {
            let attempts: i32 = sqlx::query_scalar(
                "SELECT attempts FROM rewrap_failures WHERE job_id = ?1 AND dek_id = ?2",
            )
            .bind(job_id)
            .bind(uid(*id))
            .fetch_optional(&mut *self.tx)
            .await?
            .map_or(1, |a: i32| a.saturating_add(1));
            // Backoff doubles from 5 s; at `max_attempts` the DEK waits forever (failed for
            // good).
            let next = if attempts >= max_attempts {
                INFINITY.to_owned()
            } else {
                let exp = u32::try_from(attempts - 1).unwrap_or(0).min(20);
                ts(now + chrono::Duration::seconds(5 * 2i64.pow(exp)))
            };
            sqlx::query(
                "INSERT INTO rewrap_failures (job_id, dek_id, reason, attempts, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (job_id, dek_id) DO UPDATE
                 SET attempts = excluded.attempts, reason = excluded.reason,
                     next_attempt_at = excluded.next_attempt_at",
            )
            .bind(job_id)
            .bind(uid(*id))
            .bind(reason)
            .bind(attempts)
            .bind(next)
            .execute(&mut *self.tx)
            .await?;
            if attempts >= max_attempts {
                given_up += 1;
            }
        }
        Ok(given_up)
    }

    pub(crate) async fn add_rewrap_progress(
        &mut self,
        job_id: i64,
        done: i64,
        failed: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE rewrap_jobs SET done = done + ?2, failed = failed + ?3, state = 'running',
                    last_error = NULL, updated_at = ?4
             WHERE id = ?1",
        )
        .bind(job_id)
        .bind(done)
        .bind(failed)
        .bind(ts(Utc::now()))
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub(crate) async fn lock_active_job(
        &mut self,
        job_id: i64,
    ) -> Result<Option<RewrapJob>, StoreError> {
        sqlx::query(concat!(
            job_select!(),
            "WHERE j.id = ?1 AND j.state IN ('pending', 'running', 'waiting')"
        ))
        .bind(job_id)
        .fetch_optional(&mut *self.tx)
        .await?
        .as_ref()
        .map(job)
        .transpose()
    }

    pub(crate) async fn remaining_versions(
        &mut self,
        kek_id: i64,
        except_version: Option<&str>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kek_version, count(*) AS n FROM deks
             WHERE kek_id = ?1 AND (?2 IS NULL OR kek_version < ?2 OR kek_version > ?2)
             GROUP BY kek_version",
        )
        .bind(kek_id)
        .bind(except_version)
        .fetch_all(&mut *self.tx)
        .await?;
        version_counts(&rows)
    }

    pub(crate) async fn permanent_failures(&mut self, job_id: i64) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM rewrap_failures WHERE job_id = ?1 AND next_attempt_at = ?2",
        )
        .bind(job_id)
        .bind(INFINITY)
        .fetch_one(&mut *self.tx)
        .await?)
    }

    pub(crate) async fn extend_rewrap_job(
        &mut self,
        job_id: i64,
        versions: &[String],
        more: i64,
    ) -> Result<(), StoreError> {
        let current: String =
            sqlx::query_scalar("SELECT from_versions FROM rewrap_jobs WHERE id = ?1")
                .bind(job_id)
                .fetch_one(&mut *self.tx)
                .await?;
        let mut all: Vec<String> = serde_json::from_str(&current)
            .map_err(|e| StoreError::Other(sqlx::Error::Decode(e.into())))?;
        all.extend(versions.iter().cloned());
        sqlx::query(
            "UPDATE rewrap_jobs SET from_versions = ?2, total = total + ?3, updated_at = ?4
             WHERE id = ?1",
        )
        .bind(job_id)
        .bind(json_list(&all))
        .bind(more)
        .bind(ts(Utc::now()))
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
        let now = ts(Utc::now());
        let r = sqlx::query(
            "UPDATE rewrap_jobs SET state = ?2, last_error = ?3, completed_at = ?4,
                    updated_at = ?4
             WHERE id = ?1 RETURNING done, failed",
        )
        .bind(job.id)
        .bind(state.as_str())
        .bind(reason)
        .bind(&now)
        .fetch_one(&mut *self.tx)
        .await?;
        if job.kind == JobKind::Replacement && state == JobState::Completed {
            sqlx::query("UPDATE keks SET retired_at = ?2, updated_at = ?2 WHERE id = ?1")
                .bind(job.kek.id)
                .bind(&now)
                .execute(&mut *self.tx)
                .await?;
        }
        Ok((r.try_get("done")?, r.try_get("failed")?))
    }

    pub(crate) async fn tenant_recipients(
        &mut self,
        tenant_id: &str,
    ) -> Result<TenantRow, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            recipients!(),
            "FROM tenants t WHERE t.id = ?1"
        ))
        .bind(tenant_id)
        .fetch_optional(&mut *self.tx)
        .await?
        .as_ref()
        .map(tenant_row)
        .transpose()?
        .ok_or_else(|| StoreError::NotFound(format!("tenant {tenant_id:?}")))
    }
}
