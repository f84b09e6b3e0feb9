//! SQLite SQL of the audit trail: filtered reads, exports, the chain and its checkpoints.
//!
//! The chain's order is PostgreSQL's `(txid, id)` with `txid` always 0: writers are
//! serialized, so a row's id is given while its transaction holds the write lock and every
//! row committed later gets a higher one. A chaining transaction holds that lock too, so
//! every row it can see is final and nothing can still appear before them: the horizon of
//! PostgreSQL's chainer is the whole table here.

use super::{SqliteStore, get_json, ts};
use crate::store::{
    AuditCheckpoint, AuditEntry, AuditFilter, ChainHead, ChainLink, ChainRecord, PendingRows,
    StoreError,
};
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use tokio::sync::OwnedMutexGuard;

/// The chainer's handle: the lead is an in-process lock per database file (one node).
pub(crate) struct SqliteAuditChainConn {
    store: SqliteStore,
    lead: Option<OwnedMutexGuard<()>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn entry(r: &SqliteRow) -> Result<AuditEntry, StoreError> {
    let chain: Option<Vec<u8>> = r.try_get("chain")?;
    Ok(AuditEntry {
        id: r.try_get("id")?,
        chain_seq: r.try_get("chain_seq")?,
        chain: chain.as_deref().map(hex),
        at: r.try_get("at")?,
        tenant_id: r.try_get("tenant_id")?,
        client: r.try_get("client")?,
        provider: r.try_get("provider")?,
        key_ref: r.try_get("key_ref")?,
        action: r.try_get("action")?,
        outcome: r.try_get("outcome")?,
        source: r.try_get("source")?,
        event_id: r.try_get("event_id")?,
        detail: get_json(r, "detail")?,
    })
}

fn record(r: &SqliteRow) -> Result<ChainRecord, StoreError> {
    Ok(ChainRecord {
        id: r.try_get("id")?,
        chain_seq: r.try_get("chain_seq")?,
        chain: r.try_get("chain")?,
        txid: r.try_get("txid")?,
        at: r.try_get("at")?,
        tenant_id: r.try_get("tenant_id")?,
        client: r.try_get("client")?,
        provider: r.try_get("provider")?,
        key_ref: r.try_get("key_ref")?,
        action: r.try_get("action")?,
        outcome: r.try_get("outcome")?,
        source: r.try_get("source")?,
        event_id: r.try_get("event_id")?,
        detail: r.try_get("detail")?,
    })
}

fn checkpoint(r: &SqliteRow) -> Result<AuditCheckpoint, StoreError> {
    let chain: Vec<u8> = r.try_get("chain")?;
    Ok(AuditCheckpoint {
        chain_seq: r.try_get("chain_seq")?,
        chain: hex(&chain),
        at: r.try_get("at")?,
    })
}

const ENTRY_COLUMNS: &str = "id, chain_seq, chain, at, tenant_id, client, provider, key_ref,
    action, outcome, source, event_id, detail";

async fn head(
    conn: impl sqlx::Executor<'_, Database = sqlx::Sqlite>,
) -> Result<Option<ChainHead>, StoreError> {
    let row = sqlx::query(
        "SELECT chain_seq, chain FROM audit_log
         WHERE chain_seq IS NOT NULL ORDER BY chain_seq DESC LIMIT 1",
    )
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(ChainHead {
            chain_seq: r.try_get("chain_seq")?,
            chain: r.try_get("chain")?,
        })
    })
    .transpose()
}

impl SqliteAuditChainConn {
    pub(crate) async fn try_lead(&mut self) -> Result<bool, StoreError> {
        if self.lead.is_none() {
            self.lead = self.store.shared.chain_lead.clone().try_lock_owned().ok();
        }
        Ok(self.lead.is_some())
    }

    pub(crate) async fn head(&mut self) -> Result<Option<ChainHead>, StoreError> {
        head(&self.store.pool).await
    }

    pub(crate) async fn chain_batch(
        &mut self,
        limit: i64,
        link: impl FnOnce(Option<&ChainHead>, &[ChainRecord]) -> Vec<ChainLink> + Send,
    ) -> Result<(Option<ChainHead>, usize), StoreError> {
        if self.lead.is_none() {
            return Err(StoreError::Conflict(
                "this connection does not lead the audit chain".to_owned(),
            ));
        }
        let mut tx = self.store.begin().await?;
        let head = head(&mut *tx.tx).await?;
        let rows = sqlx::query(
            "SELECT id, chain_seq, chain, txid, at, tenant_id, client, provider, key_ref,
                    action, outcome, source, event_id, detail
             FROM audit_log WHERE chain_seq IS NULL
             ORDER BY txid, id LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&mut *tx.tx)
        .await?;
        if rows.is_empty() {
            return Ok((head, 0));
        }
        let rows = rows.iter().map(record).collect::<Result<Vec<_>, _>>()?;
        let links = link(head.as_ref(), &rows);
        for l in &links {
            let updated = sqlx::query(
                "UPDATE audit_log SET chain_seq = ?2, chain = ?3
                 WHERE id = ?1 AND chain_seq IS NULL",
            )
            .bind(l.id)
            .bind(l.chain_seq)
            .bind(&l.chain)
            .execute(&mut *tx.tx)
            .await?;
            if updated.rows_affected() != 1 {
                // Dropping the transaction rolls it back.
                return Err(StoreError::Conflict(
                    "audit rows were chained by another writer meanwhile; batch rolled back"
                        .to_owned(),
                ));
            }
        }
        tx.commit().await?;
        let new_head = links.last().map(|l| ChainHead {
            chain_seq: l.chain_seq,
            chain: l.chain.clone(),
        });
        Ok((new_head, links.len()))
    }

    pub(crate) async fn latest_checkpoint(
        &mut self,
    ) -> Result<Option<AuditCheckpoint>, StoreError> {
        sqlx::query(
            "SELECT chain_seq, chain, at FROM audit_checkpoints ORDER BY chain_seq DESC LIMIT 1",
        )
        .fetch_optional(&self.store.pool)
        .await?
        .as_ref()
        .map(checkpoint)
        .transpose()
    }

    pub(crate) async fn record_checkpoint(
        &mut self,
        head: &ChainHead,
    ) -> Result<Option<AuditCheckpoint>, StoreError> {
        // A checkpoint is never overwritten: one that disagrees is evidence.
        let mut tx = self.store.begin().await?;
        let row = sqlx::query(
            "INSERT INTO audit_checkpoints (chain_seq, chain, at) VALUES (?1, ?2, ?3)
             ON CONFLICT (chain_seq) DO NOTHING
             RETURNING chain_seq, chain, at",
        )
        .bind(head.chain_seq)
        .bind(&head.chain)
        .bind(ts(Utc::now()))
        .fetch_optional(&mut *tx.tx)
        .await?;
        let cp = row.as_ref().map(checkpoint).transpose()?;
        tx.commit().await?;
        Ok(cp)
    }

    pub(crate) async fn close(self) {
        drop(self.lead);
    }
}

impl SqliteStore {
    pub(crate) async fn audit_trail(
        &self,
        filter: &AuditFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENTRY_COLUMNS} FROM audit_log
             WHERE (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR id < ?2)
               AND (?3 IS NULL OR client = ?3) AND (?4 IS NULL OR action = ?4)
               AND (?5 IS NULL OR outcome = ?5)
               AND (?6 IS NULL OR at >= ?6) AND (?7 IS NULL OR at < ?7)
             ORDER BY id DESC LIMIT ?8"
        )))
        .bind(&filter.tenant)
        .bind(before)
        .bind(&filter.client)
        .bind(&filter.action)
        .bind(&filter.outcome)
        .bind(filter.since.map(ts))
        .bind(filter.until.map(ts))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry).collect()
    }

    pub(crate) async fn audit_export_page(
        &self,
        filter: &AuditFilter,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        // Keyset paging on (at, id); the first page starts just before (since, any id).
        let (after_at, after_id) = match after {
            Some((at, id)) => (Some(at), id),
            None => (filter.since, i64::MIN),
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENTRY_COLUMNS} FROM audit_log
             WHERE (?1 IS NULL OR at > ?1 OR (at = ?1 AND id > ?2))
               AND (?3 IS NULL OR at < ?3)
               AND (?4 IS NULL OR tenant_id = ?4) AND (?5 IS NULL OR client = ?5)
               AND (?6 IS NULL OR action = ?6) AND (?7 IS NULL OR outcome = ?7)
             ORDER BY at, id LIMIT ?8"
        )))
        .bind(after_at.map(ts))
        .bind(after_id)
        .bind(filter.until.map(ts))
        .bind(&filter.tenant)
        .bind(&filter.client)
        .bind(&filter.action)
        .bind(&filter.outcome)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry).collect()
    }

    pub(crate) async fn audit_chain_page(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<ChainRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, chain_seq, chain, txid, at, tenant_id, client, provider, key_ref,
                    action, outcome, source, event_id, detail
             FROM audit_log WHERE chain_seq > ?1 ORDER BY chain_seq LIMIT ?2",
        )
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    pub(crate) async fn audit_pending(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<PendingRows, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log
             WHERE chain_seq IS NULL AND (?1 IS NULL OR tenant_id = ?1)",
        )
        .bind(tenant_id)
        .fetch_one(&self.pool)
        .await?;
        let oldest = sqlx::query(
            "SELECT id, at FROM audit_log
             WHERE chain_seq IS NULL AND (?1 IS NULL OR tenant_id = ?1)
             ORDER BY at, id LIMIT 1",
        )
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| Ok::<_, StoreError>((r.try_get("id")?, r.try_get("at")?)))
        .transpose()?;
        Ok(PendingRows { count, oldest })
    }

    pub(crate) async fn audit_checkpoints(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT chain_seq, chain, at FROM audit_checkpoints
             WHERE (?1 IS NULL OR chain_seq < ?1)
             ORDER BY chain_seq DESC LIMIT ?2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(checkpoint).collect()
    }

    pub(crate) async fn audit_checkpoint_mismatch(
        &self,
        up_to_seq: i64,
    ) -> Result<(i64, Option<AuditCheckpoint>), StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM audit_checkpoints WHERE chain_seq <= ?1")
                .bind(up_to_seq)
                .fetch_one(&self.pool)
                .await?;
        let mismatch = sqlx::query(
            "SELECT c.chain_seq, c.chain, c.at
             FROM audit_checkpoints c LEFT JOIN audit_log a ON a.chain_seq = c.chain_seq
             WHERE c.chain_seq <= ?1 AND a.chain IS NOT c.chain
             ORDER BY c.chain_seq LIMIT 1",
        )
        .bind(up_to_seq)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(checkpoint)
        .transpose()?;
        Ok((count, mismatch))
    }

    pub(crate) async fn audit_chain_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT sealed FROM audit_chain_key WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub(crate) async fn audit_has_chained_rows(&self) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM audit_log WHERE chain_seq IS NOT NULL)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub(crate) async fn init_audit_chain_key(
        &self,
        sealed: &[u8],
        origin: &str,
    ) -> Result<Vec<u8>, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO audit_chain_key (id, sealed, origin, created_at) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(sealed)
        .bind(origin)
        .bind(ts(Utc::now()))
        .execute(&mut *tx.tx)
        .await?;
        let stored: Vec<u8> = sqlx::query_scalar("SELECT sealed FROM audit_chain_key WHERE id = 1")
            .fetch_one(&mut *tx.tx)
            .await?;
        tx.commit().await?;
        Ok(stored)
    }

    pub(crate) async fn reseal_audit_chain_key(
        &self,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done =
            sqlx::query("UPDATE audit_chain_key SET sealed = ?2 WHERE id = 1 AND sealed = ?1")
                .bind(old)
                .bind(new)
                .execute(&mut *tx.tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        Ok(done == 1)
    }

    pub(crate) fn audit_chain_conn(&self) -> SqliteAuditChainConn {
        SqliteAuditChainConn {
            store: self.clone(),
            lead: None,
        }
    }
}
