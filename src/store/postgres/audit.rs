//! PostgreSQL SQL of the audit trail: filtered reads, exports, the chain and its checkpoints.
//!
//! An audit row is written once and never updated: its place and chain value live in
//! `audit_chain` (one narrow row per chained audit row), which the chainer appends to. The
//! migration that moved them there says why.

use super::PgStore;
use crate::store::{
    AuditCheckpoint, AuditEntry, AuditFilter, ChainHead, ChainLink, ChainRecord, PendingRows,
    StoreError,
};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{Connection, Row};

/// The `detail` text a row is chained with: `detail::text`, PostgreSQL's canonical text of
/// the jsonb, except for rows imported from SQLite (`byokd import`), which were chained with
/// the text SQLite stored and keep it in `detail_text`. That text counts only while it says
/// what the jsonb says (a CHECK keeps them so; this guards a dropped CHECK too): otherwise the
/// jsonb's text is hashed, which differs from what was chained, so editing either column
/// breaks the chain as editing `detail` always did.
macro_rules! chained_detail {
    () => {
        "CASE WHEN detail_text IS NOT NULL AND detail_text::jsonb = detail
              THEN detail_text ELSE detail::text END"
    };
}
pub(crate) use chained_detail;

/// The columns of a [`ChainRecord`] but its place and value, from `audit_log a`, as
/// [`chain_record`] reads them.
macro_rules! row_columns {
    () => {
        concat!(
            "a.id, a.txid::text::bigint AS txid, a.at, a.tenant_id, a.client, a.provider,
             a.key_ref, a.action, a.outcome, a.source, a.event_id, ",
            chained_detail!(),
            " AS detail"
        )
    };
}

/// The columns of a chained [`ChainRecord`], from `audit_chain c JOIN audit_log a`.
const CHAINED_COLUMNS: &str = concat!("c.chain_seq, c.chain, ", row_columns!());

/// The columns of a [`ChainRecord`] still to chain, from `audit_log a`.
const UNCHAINED_COLUMNS: &str = concat!(
    "NULL::bigint AS chain_seq, NULL::bytea AS chain, ",
    row_columns!()
);

fn chain_record(r: &PgRow) -> Result<ChainRecord, StoreError> {
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

/// `LIMIT 1` of the newest-row reads, as a parameter: PostgreSQL plans a parameterless
/// statement once per connection (`plan_cache_mode`, set on the chainer's connection, applies
/// to parameterized ones only), so a head read first made on an empty table would sort the
/// whole table ever after.
const HEAD_LIMIT: i64 = 1;

/// A connection taken out of the pool for chaining, and whether it holds the chain's lock.
pub(crate) struct PgAuditChainConn {
    conn: PgConnection,
    leading: bool,
}

impl PgAuditChainConn {
    pub(crate) async fn try_lead(&mut self) -> Result<bool, StoreError> {
        // Session-level advisory locks stack: taking it again while holding it would need as
        // many unlocks, so a leader does not ask twice.
        if !self.leading {
            self.leading = sqlx::query_scalar!(
                r#"SELECT pg_try_advisory_lock(hashtextextended('byokd-audit-chain', 0))
                       AS "locked!""#
            )
            .fetch_one(&mut self.conn)
            .await?;
        }
        Ok(self.leading)
    }

    pub(crate) async fn head(&mut self) -> Result<Option<ChainHead>, StoreError> {
        head(&mut self.conn).await
    }

    pub(crate) async fn chain_batch(
        &mut self,
        limit: i64,
        link: impl FnOnce(Option<&ChainHead>, &[ChainRecord]) -> Vec<ChainLink> + Send,
    ) -> Result<(Option<ChainHead>, usize), StoreError> {
        if !self.leading {
            return Err(StoreError::Conflict(
                "this connection does not lead the audit chain".to_owned(),
            ));
        }
        let mut tx = self.conn.begin().await?;
        let cursor = sqlx::query!(
            r#"SELECT chain_seq, chain, id, row_txid::text::bigint AS "row_txid!"
               FROM audit_chain ORDER BY chain_seq DESC LIMIT $1"#,
            HEAD_LIMIT
        )
        .fetch_optional(&mut *tx)
        .await?;
        let (head, after) = match cursor {
            Some(c) => (
                Some(ChainHead {
                    chain_seq: c.chain_seq,
                    chain: c.chain,
                }),
                (c.row_txid, c.id),
            ),
            // Rows imported from SQLite carry txid 0; ids start at 1.
            None => (None, (0, 0)),
        };
        // A row whose transaction is older than every running one is final: no transaction
        // that could still commit has a txid below the horizon, so (txid, id) order never
        // gains a row before the rows chained so far, and every row still to chain sorts
        // after the last chained one (the cursor): the rows are read from there, through
        // the (txid, id) index. Except when the head's txid is not below the horizon: its
        // row came from a cluster whose transaction ids ran ahead of this one's (`byokd
        // import` from another PostgreSQL, a pg_dump restored elsewhere), and this cluster's
        // new rows sort before it. Then the rows are read from the start. Either way a row
        // already chained is skipped (such imported rows can lie above the cursor).
        //
        // The read below must be a walk of the (txid, id) index from the cursor, each row
        // probed in audit_chain's id index, stopping at the limit: a few milliseconds
        // whatever the tables hold. Fed the statistics of a trail that grows by thousands of
        // rows a second (months old, or taken when the table was empty), the planner was
        // seen choosing a hash anti join over all of audit_chain instead, and the read grew
        // with the trail (1 ms to 250 ms within a minute). The other plans are switched off
        // for this transaction only (set_config's `true`), with the horizon's round trip.
        let horizon: i64 = sqlx::query!(
            r#"SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS "horizon!",
                      set_config('enable_hashjoin', 'off', true) AS hashjoin,
                      set_config('enable_mergejoin', 'off', true) AS mergejoin,
                      set_config('enable_bitmapscan', 'off', true) AS bitmapscan,
                      set_config('enable_seqscan', 'off', true) AS seqscan,
                      set_config('enable_sort', 'off', true) AS sort"#
        )
        .fetch_one(&mut *tx)
        .await?
        .horizon;
        let from = if after.0 < horizon { after } else { (0, 0) };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {UNCHAINED_COLUMNS} FROM audit_log a
             WHERE (a.txid, a.id) > ($2::text::xid8, $3)
               AND a.txid < $4::text::xid8
               AND NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.id = a.id)
             ORDER BY a.txid, a.id
             LIMIT $1"
        )))
        .bind(limit)
        .bind(from.0.to_string())
        .bind(from.1)
        .bind(horizon.to_string())
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(chain_record)
        .collect::<Result<Vec<_>, _>>()?;
        if rows.is_empty() {
            return Ok((head, 0));
        }
        // One link per row, in the rows' order.
        let links = link(head.as_ref(), &rows);
        let ids: Vec<i64> = links.iter().map(|l| l.id).collect();
        let seqs: Vec<i64> = links.iter().map(|l| l.chain_seq).collect();
        let row_txids: Vec<String> = rows.iter().map(|r| r.txid.to_string()).collect();
        let chains: Vec<Vec<u8>> = links.iter().map(|l| l.chain.clone()).collect();
        // A plain INSERT (ON CONFLICT would double its cost): a place or row already taken
        // means another writer chained meanwhile, and dropping the transaction rolls back.
        let inserted = sqlx::query!(
            "INSERT INTO audit_chain (chain_seq, id, row_txid, chain)
             SELECT u.seq, u.id, u.txid::xid8, u.chain
             FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bytea[])
                 AS u(id, seq, txid, chain)",
            &ids,
            &seqs,
            &row_txids,
            &chains
        )
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                return Err(StoreError::Conflict(
                    "audit rows were chained by another writer meanwhile; batch rolled back"
                        .to_owned(),
                ));
            }
            Err(e) => return Err(e.into()),
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
        Ok(sqlx::query_as!(
            AuditCheckpoint,
            r#"SELECT chain_seq, encode(chain, 'hex') AS "chain!", at FROM audit_checkpoints
               ORDER BY chain_seq DESC LIMIT $1"#,
            HEAD_LIMIT
        )
        .fetch_optional(&mut self.conn)
        .await?)
    }

    pub(crate) async fn record_checkpoint(
        &mut self,
        head: &ChainHead,
    ) -> Result<Option<AuditCheckpoint>, StoreError> {
        // A checkpoint is never overwritten: one that disagrees is evidence.
        Ok(sqlx::query_as!(
            AuditCheckpoint,
            r#"INSERT INTO audit_checkpoints (chain_seq, chain) VALUES ($1, $2)
               ON CONFLICT (chain_seq) DO NOTHING
               RETURNING chain_seq, encode(chain, 'hex') AS "chain!", at"#,
            head.chain_seq,
            &head.chain
        )
        .fetch_optional(&mut self.conn)
        .await?)
    }

    pub(crate) async fn close(mut self) {
        // Unlock explicitly so another replica finds the lead free at once (the server ends
        // a closed session asynchronously); ending the session releases it in any case.
        if self.leading {
            let _ = sqlx::query_scalar!(
                r#"SELECT pg_advisory_unlock(hashtextextended('byokd-audit-chain', 0))
                       AS "unlocked!""#
            )
            .fetch_one(&mut self.conn)
            .await;
        }
        let _ = self.conn.close().await;
    }
}

async fn head(conn: &mut PgConnection) -> Result<Option<ChainHead>, StoreError> {
    Ok(sqlx::query_as!(
        ChainHead,
        "SELECT chain_seq, chain FROM audit_chain ORDER BY chain_seq DESC LIMIT $1",
        HEAD_LIMIT
    )
    .fetch_optional(conn)
    .await?)
}

impl PgStore {
    pub(crate) async fn audit_trail(
        &self,
        filter: &AuditFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        // Two statements, so a tenant's listing always reads the tenant's index (a generic
        // plan of `$1 IS NULL OR tenant_id = $1` could not).
        let query =
            match filter.tenant.as_deref() {
                Some(tenant) => sqlx::query_as!(
                    AuditEntry,
                    r#"SELECT a.id, c.chain_seq AS "chain_seq?", encode(c.chain, 'hex') AS chain,
                          at, tenant_id, client, provider, key_ref, action, outcome, source,
                          event_id, detail
                   FROM audit_log a LEFT JOIN audit_chain c ON c.id = a.id
                   WHERE tenant_id = $1 AND ($2::bigint IS NULL OR a.id < $2)
                     AND ($3::text IS NULL OR client = $3) AND ($4::text IS NULL OR action = $4)
                     AND ($5::text IS NULL OR outcome = $5)
                     AND ($6::timestamptz IS NULL OR at >= $6)
                     AND ($7::timestamptz IS NULL OR at < $7)
                   ORDER BY a.id DESC LIMIT $8"#,
                    tenant,
                    before,
                    filter.client,
                    filter.action,
                    filter.outcome,
                    filter.since,
                    filter.until,
                    limit
                )
                .fetch_all(&self.pool)
                .await?,
                None => sqlx::query_as!(
                    AuditEntry,
                    r#"SELECT a.id, c.chain_seq AS "chain_seq?", encode(c.chain, 'hex') AS chain,
                          at, tenant_id, client, provider, key_ref, action, outcome, source,
                          event_id, detail
                   FROM audit_log a LEFT JOIN audit_chain c ON c.id = a.id
                   WHERE ($1::bigint IS NULL OR a.id < $1)
                     AND ($2::text IS NULL OR client = $2) AND ($3::text IS NULL OR action = $3)
                     AND ($4::text IS NULL OR outcome = $4)
                     AND ($5::timestamptz IS NULL OR at >= $5)
                     AND ($6::timestamptz IS NULL OR at < $6)
                   ORDER BY a.id DESC LIMIT $7"#,
                    before,
                    filter.client,
                    filter.action,
                    filter.outcome,
                    filter.since,
                    filter.until,
                    limit
                )
                .fetch_all(&self.pool)
                .await?,
            };
        Ok(query)
    }

    pub(crate) async fn audit_export_page(
        &self,
        filter: &AuditFilter,
        after: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        // Keyset paging on (at, id), which the (at, id) index serves: the first page starts
        // just before (since, any id).
        let (after_at, after_id) = match after {
            Some((at, id)) => (Some(at), id),
            None => (filter.since, i64::MIN),
        };
        Ok(sqlx::query_as!(
            AuditEntry,
            r#"SELECT a.id, c.chain_seq AS "chain_seq?", encode(c.chain, 'hex') AS chain, at,
                      tenant_id, client, provider, key_ref, action, outcome, source, event_id,
                      detail
               FROM audit_log a LEFT JOIN audit_chain c ON c.id = a.id
               WHERE (at, a.id) > (COALESCE($1::timestamptz, '-infinity'), $2)
                 AND at < COALESCE($3::timestamptz, 'infinity')
                 AND ($4::text IS NULL OR tenant_id = $4) AND ($5::text IS NULL OR client = $5)
                 AND ($6::text IS NULL OR action = $6) AND ($7::text IS NULL OR outcome = $7)
               ORDER BY at, a.id LIMIT $8"#,
            after_at,
            after_id,
            filter.until,
            filter.tenant,
            filter.client,
            filter.action,
            filter.outcome,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn audit_chain_page(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<ChainRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CHAINED_COLUMNS} FROM audit_chain c JOIN audit_log a ON a.id = c.id
             WHERE c.chain_seq > $1 ORDER BY c.chain_seq LIMIT $2"
        )))
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(chain_record)
        .collect()
    }

    pub(crate) async fn audit_pending(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<PendingRows, StoreError> {
        let count = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM audit_log a
               WHERE NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.id = a.id)
                 AND ($1::text IS NULL OR tenant_id = $1)"#,
            tenant_id
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest = sqlx::query!(
            "SELECT a.id, a.at FROM audit_log a
             WHERE NOT EXISTS (SELECT 1 FROM audit_chain c WHERE c.id = a.id)
               AND ($1::text IS NULL OR tenant_id = $1)
             ORDER BY a.at, a.id LIMIT 1",
            tenant_id
        )
        .fetch_optional(&self.pool)
        .await?
        .map(|r| (r.id, r.at));
        Ok(PendingRows { count, oldest })
    }

    pub(crate) async fn audit_checkpoints(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditCheckpoint>, StoreError> {
        Ok(sqlx::query_as!(
            AuditCheckpoint,
            r#"SELECT chain_seq, encode(chain, 'hex') AS "chain!", at FROM audit_checkpoints
               WHERE ($1::bigint IS NULL OR chain_seq < $1)
               ORDER BY chain_seq DESC LIMIT $2"#,
            before,
            limit
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn audit_checkpoint_mismatch(
        &self,
        up_to_seq: i64,
    ) -> Result<(i64, Option<AuditCheckpoint>), StoreError> {
        let count = sqlx::query_scalar!(
            r#"SELECT count(*) AS "count!" FROM audit_checkpoints WHERE chain_seq <= $1"#,
            up_to_seq
        )
        .fetch_one(&self.pool)
        .await?;
        let mismatch = sqlx::query_as!(
            AuditCheckpoint,
            r#"SELECT c.chain_seq, encode(c.chain, 'hex') AS "chain!", c.at
               FROM audit_checkpoints c LEFT JOIN audit_chain a ON a.chain_seq = c.chain_seq
               WHERE c.chain_seq <= $1 AND a.chain IS DISTINCT FROM c.chain
               ORDER BY c.chain_seq LIMIT 1"#,
            up_to_seq
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok((count, mismatch))
    }

    pub(crate) async fn audit_chain_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar!("SELECT sealed FROM audit_chain_key WHERE id = 1")
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub(crate) async fn audit_has_chained_rows(&self) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM audit_chain) AS "e!""#)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub(crate) async fn init_audit_chain_key(
        &self,
        sealed: &[u8],
        origin: &str,
    ) -> Result<Vec<u8>, StoreError> {
        sqlx::query!(
            "INSERT INTO audit_chain_key (id, sealed, origin) VALUES (1, $1, $2)
             ON CONFLICT (id) DO NOTHING",
            sealed,
            origin
        )
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar!("SELECT sealed FROM audit_chain_key WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub(crate) async fn reseal_audit_chain_key(
        &self,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query!(
            "UPDATE audit_chain_key SET sealed = $2 WHERE id = 1 AND sealed = $1",
            old,
            new
        )
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    pub(crate) async fn audit_chain_conn(&self) -> Result<PgAuditChainConn, StoreError> {
        let mut conn = self.pool.acquire().await?.detach();
        // Each execution planned for its parameters and the tables as they are then: the
        // chainer's connection lives as long as its lead, while audit_log and audit_chain
        // grow from empty by millions of rows, and PostgreSQL's default keeps the generic
        // plan it settles on after five executions (made while the tables were nearly
        // empty: a sequential scan, a sort of the whole table). Only here: on the pooled
        // connections, planning every intake statement cost about a tenth of the intake
        // rate (ingest bench, 200 tenants: 25k events/s without, 22k with).
        sqlx::query("SET plan_cache_mode = force_custom_plan")
            .execute(&mut conn)
            .await?;
        Ok(PgAuditChainConn {
            conn,
            leading: false,
        })
    }
}
